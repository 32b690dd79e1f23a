"""Causal random-feature attention carried from call to call (generation): panther.ops.rf_attention_step,
rf_causal_state and panther.nn.RandAttentionState, against attention over the whole sequence."""
import pytest
import torch

import panther  # noqa: F401  (registers the ops)
from panther.nn import RandAttentionState, RandMultiHeadAttention, sinSRPE
from panther.ops import attention as ops
from panther.ops.attention import RFState, rf_attention_reference, rf_attention_step, rf_causal_state

from test_attention import make, module_reference


def in_pieces(q, k, v, W, kern, mask, cuts):
    """Attention of the whole sequence as a prompt (the op + ``rf_causal_state``) then ``rf_attention_step``
    over the pieces between ``cuts``."""
    def part(t, a, b):
        return None if t is None else t[..., a:b, :] if t.dim() == 4 else t[:, a:b]

    p = cuts[0]
    outs = [torch.ops.panther.rf_attention(part(q, 0, p), part(k, 0, p), part(v, 0, p), W, kern, True, None,
                                           part(mask, 0, p))]
    state = rf_causal_state(part(k, 0, p), part(v, 0, p), W, kern, None, part(mask, 0, p))
    for a, b in zip(cuts, cuts[1:] + [q.shape[2]]):
        out, state = rf_attention_step(part(q, a, b), part(k, a, b), part(v, a, b), W, kern, None,
                                       part(mask, a, b), state)
        outs.append(out)
    return torch.cat(outs, dim=2), state


@pytest.mark.parametrize("kern", ["softmax", "relu"])
@pytest.mark.parametrize("mask_p", [None, 0.3])
def test_pieces_equal_whole_sequence(kern, mask_p, monkeypatch):
    monkeypatch.setattr(ops, "STEP_BLOCK", 3)   # a multi-token step crosses several blocks
    monkeypatch.setattr(ops, "STATE_BLOCK", 4)  # and so does the prompt's sum
    q, k, v, W, mask = make(B=3, H=2, Lq=20, S=20, d=4, dv=5, m=8, mask_p=mask_p, sigma=1.0)
    out, state = in_pieces(q, k, v, W, kern, mask, [6, 7, 8, 9, 17])   # prompt 6, three tokens, 8, then 3
    torch.testing.assert_close(out, rf_attention_reference(q, k, v, W, kern, True, None, mask))
    assert state.length == 20 and state.kv.shape == (3, 2, 8, 5) and state.k_sum.shape == (3, 2, 8)
    # from nothing: a step is the whole causal attention
    whole, _ = rf_attention_step(q, k, v, W, kern, None, mask)
    torch.testing.assert_close(whole, rf_attention_reference(q, k, v, W, kern, True, None, mask))


def test_shift_follows_the_keys_seen(monkeypatch):
    # The sums are kept at the largest key exponent seen so far (fp32 underflows below exp(-103)). Row 0's
    # prompt ends with long keys (exponents near -200), its later ones are short: the sums must be rescaled
    # to the later keys' shift, or their features overflow. Row 1's prompt is all padding and its later keys long:
    # its shift must start at those keys' exponents, or their features underflow to zero.
    monkeypatch.setattr(ops, "STATE_BLOCK", 4)   # the prompt's second block holds the first long keys
    q, k, v, W, _ = make(B=2, H=2, Lq=12, S=12, d=4, dv=3, m=8, sigma=0.5, dtype=torch.float32)
    k[0, :, 2:6] *= 30
    k[1, :, 6:] *= 30
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[1, :6] = True
    out, state = in_pieces(q, k, v, W, "softmax", mask, [6, 7, 8])
    # the reference in fp64: its one shift over all keys underflows the prompt's features in fp32
    ref = rf_attention_reference(q.double(), k.double(), v.double(), W.double(), "softmax", True, None, mask)
    torch.testing.assert_close(out, ref.float(), rtol=1e-4, atol=1e-4)
    assert torch.isfinite(state.kv).all()
    empty = rf_causal_state(k[:, :, :6], v[:, :, :6], W, "softmax", None, torch.ones(2, 6, dtype=torch.bool))
    assert torch.isneginf(empty.shift).all() and not empty.kv.any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_keep_fp32_sums(dtype):
    q, k, v, W, mask = make(B=2, H=2, Lq=10, S=10, d=8, dv=8, m=16, dtype=torch.float32)
    h = [t.to(dtype) for t in (q, k, v)]
    state = rf_causal_state(h[1][:, :, :7], h[2][:, :, :7], W, "softmax")
    out, state = rf_attention_step(h[0][:, :, 7:], h[1][:, :, 7:], h[2][:, :, 7:], W, "softmax", None, None,
                                   state)
    assert out.dtype == dtype and state.kv.dtype == torch.float32
    ref = rf_attention_reference(q, k, v, W, "softmax", True)[:, :, 7:]
    assert ((out.float() - ref).norm() / ref.norm()).item() < 2e-2


def test_step_gradcheck():
    q, k, v, W, mask = make(B=2, H=1, Lq=7, S=7, d=3, dv=2, m=5, sigma=0.7, mask_p=0.3, requires_grad=True)
    prompt = rf_causal_state(k[:, :, :4].detach(), v[:, :, :4].detach(), W.detach(), "softmax", None,
                             mask[:, :4])

    def step(q, k, v, kv):
        state = RFState(kv, prompt.k_sum, prompt.shift, prompt.length)
        return rf_attention_step(q, k, v, W.detach(), "softmax", None, mask[:, 4:], state)[0]

    assert torch.autograd.gradcheck(step, (q[:, :, 4:], k[:, :, 4:], v[:, :, 4:],
                                           prompt.kv.clone().requires_grad_()))


def test_state_errors():
    q, k, v, W, _ = make(B=2, H=2, Lq=4, S=4, d=4, dv=3, m=8)
    state = rf_causal_state(k, v, W)
    with pytest.raises(TypeError, match="RFState"):
        rf_attention_step(q, k, v, W, "softmax", None, None, (state.kv, state.k_sum))
    with pytest.raises(ValueError, match="batch, heads, features or value width"):
        rf_attention_step(q[:1], k[:1], v[:1], W, "softmax", None, None, state)
    with pytest.raises(ValueError, match="causal=True requires equal"):
        rf_attention_step(q[:, :, :2], k, v, W, "softmax", None, None, state)


# ------------------------------------------------------------------------------------------
# panther.nn: generation with RandAttentionState

def layer_and_inputs(kern="softmax", srpe=False, L=24):
    torch.manual_seed(0)
    E, H = 16, 2
    pe = sinSRPE(H, E // H, 3, num_realizations=6, dtype=torch.float64) if srpe else None
    layer = RandMultiHeadAttention(E, H, 10, kernel_fn=kern, iscausal=True, SRPE=pe, dtype=torch.float64).eval()
    with torch.no_grad():
        for b in (layer.bq, layer.bk, layer.bv, layer.b0):
            b.normal_()
    x = torch.randn(3, L, E, dtype=torch.float64) * 0.5
    mask = torch.zeros(3, L, dtype=torch.bool)
    mask[1, :5] = True   # left padding
    return layer, x, mask


def generate(layer, x, mask, cuts, state):
    outs = []
    for a, b in zip(cuts, cuts[1:] + [x.shape[1]]):
        outs.append(layer(x[:, a:b], x[:, a:b], x[:, a:b], mask[:, a:b], state=state)[0])
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("kern,srpe", [("softmax", False), ("relu", False), ("softmax", True)])
def test_module_generation_equals_whole_sequence(kern, srpe):
    layer, x, mask = layer_and_inputs(kern, srpe)
    state = RandAttentionState()
    with torch.no_grad():
        out = generate(layer, x, mask, [0, 8, 9, 10, 11, 20], state)
        torch.testing.assert_close(out, module_reference(layer, x, x, x, mask))
    assert state.length == 24 and len(state) == 1 and state[layer].length == 24


@pytest.mark.parametrize("srpe", [False, True])
def test_compiled_generation_compiles_a_bounded_number_of_graphs(srpe):
    # fullgraph: Dynamo traces the state's lookups and updates without a break. The position is an int of the
    # state: the second step compiles again with it symbolic, and every later step reuses that graph
    from torch._dynamo.utils import counters

    layer, x, mask = layer_and_inputs(srpe=srpe, L=20)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    cuts = [0, 8] + list(range(9, 20))
    with torch.no_grad():
        eager = generate(layer, x, mask, cuts, RandAttentionState())
        state = RandAttentionState()
        out = generate(compiled, x, mask, cuts, state)
    torch.testing.assert_close(out, eager)
    assert state.length == 20 and counters["stats"]["unique_graphs"] == 3   # the prompt, a step, any step


def test_state_memory_does_not_grow():
    layer, x, mask = layer_and_inputs()
    state = RandAttentionState()
    with torch.no_grad():
        generate(layer, x[:, :8], mask[:, :8], [0], state)
        held = state.nbytes
        generate(layer, x, mask, [8, 9, 10, 11], state)
    assert held == state.nbytes == (3 * 2 * 10 * 8 + 3 * 2 * 10 + 3 * 2) * 8   # kv, k_sum, shift in fp64


def test_index_select_reorders_the_batch():
    layer, x, mask = layer_and_inputs(L=12)
    state = RandAttentionState()
    order = torch.tensor([2, 0, 0])
    with torch.no_grad():
        generate(layer, x[:, :10], mask[:, :10], [0], state)
        state.index_select(order)
        out = layer(x[order, 10:], x[order, 10:], x[order, 10:], mask[order, 10:], state=state)[0]
        whole = module_reference(layer, x, x, x, mask)
    torch.testing.assert_close(out, whole[order, 10:])


def test_module_state_errors():
    layer, x, mask = layer_and_inputs(L=4)
    with pytest.raises(TypeError, match="RandAttentionState"):
        layer(x, x, x, state={})
    plain = RandMultiHeadAttention(16, 2, 10, dtype=torch.float64)
    with pytest.raises(ValueError, match="iscausal=True"):
        plain(x, x, x, state=RandAttentionState())
    state = RandAttentionState()
    layer(x, x, x, state=state)
    with pytest.raises(ValueError, match="batch, heads"):
        layer(x[:2], x[:2], x[:2], state=state)
    with pytest.raises(TypeError, match="RFState"):
        state[layer] = None


def test_srpe_positions_from_an_offset():
    torch.manual_seed(0)
    pe = sinSRPE(2, 4, 3, num_realizations=5, dtype=torch.float64)
    q, k = torch.randn(2, 2, 9, 2, 4, dtype=torch.float64)
    qh, kh = pe.filter(q, k)
    qs, ks = pe.filter(q[:, 6:], k[:, 6:], 6)
    torch.testing.assert_close((qs, ks), (qh[:, 6:], kh[:, 6:]))
    # the positions' gradients too (the angles are n * theta + phase)
    theta, phase = (t.detach().requires_grad_() for t in pe.angles())
    w = pe.mixing().detach()
    assert torch.autograd.gradcheck(
        lambda x, th, ph: ops.srpe_filter_sines_chunked(x, th, ph, w, 6), (q[:, 6:].requires_grad_(), theta, phase))


@pytest.mark.parametrize("srpe", [False, True])
def test_static_state_updates_its_buffers_under_one_graph(srpe):
    # to_static: the outputs of the state it came from, the sums kept in the same tensors, and under torch.compile
    # with dynamic=False one graph for every token (a plain state's int position would recompile at each)
    from torch._dynamo.utils import counters

    layer, x, mask = layer_and_inputs(srpe=srpe, L=16)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True, dynamic=False)
    with torch.no_grad():
        prompt = RandAttentionState()
        layer(x[:, :8], x[:, :8], x[:, :8], mask[:, :8], state=prompt)
        static = prompt.to_static()
        buffers = [t.data_ptr() for t in static[layer]]
        out = generate(compiled, x, mask, list(range(8, 16)), static)
        torch.testing.assert_close(out, module_reference(layer, x, x, x, mask)[:, 8:])
    assert static.static and not prompt.static
    assert static.length == 16 and prompt.length == 8 and torch.is_tensor(static[layer].length)
    assert [t.data_ptr() for t in static[layer]] == buffers
    assert counters["stats"]["unique_graphs"] == 1


def test_static_state_reorders_in_place_and_takes_no_new_layer():
    layer, x, mask = layer_and_inputs(L=12)
    order = torch.tensor([2, 0, 0])
    with torch.no_grad():
        plain = RandAttentionState()
        with pytest.raises(ValueError, match="holds no layer"):
            plain.to_static()
        generate(layer, x[:, :10], mask[:, :10], [0], plain)
        static = plain.to_static()
        kv = static[layer].kv.data_ptr()
        static.index_select(order)
        out = layer(x[order, 10:], x[order, 10:], x[order, 10:], mask[order, 10:], state=static)[0]
        torch.testing.assert_close(out, module_reference(layer, x, x, x, mask)[order, 10:])
        assert static[layer].kv.data_ptr() == kv
        other = RandMultiHeadAttention(16, 2, 10, iscausal=True, dtype=torch.float64)
        with pytest.raises(ValueError, match="to_static"):
            other(x, x, x, state=static)
        with pytest.raises(ValueError, match="keeps its batch"):   # broadcast into the buffers, it would mix rows
            static.index_select(torch.tensor([1]))


def test_static_state_holds_no_autograd_graph():
    layer, x, mask = layer_and_inputs(L=12)
    plain = RandAttentionState()
    layer(x[:, :10], x[:, :10], x[:, :10], mask[:, :10], state=plain)   # a prompt with gradients on
    static = plain.to_static()
    layer(x[:, 10:11], x[:, 10:11], x[:, 10:11], mask[:, 10:11], state=static)
    assert plain[layer].kv.grad_fn is not None
    assert all(not t.requires_grad for t in static[layer])
