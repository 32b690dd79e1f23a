"""Random-feature attention: the panther::rf_attention op and panther.nn.RandMultiHeadAttention."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn
from torch.nn import functional as F

import panther  # noqa: F401  (registers the ops)
from panther.nn import RandMultiHeadAttention, sinSRPE
from panther.ops.attention import rf_attention_reference
from panther.sketch import orthogonal_random_features

OP = torch.ops.panther.rf_attention
OPB = torch.ops.panther.rf_attention_backward


def make(B=2, H=2, Lq=6, S=6, d=4, dv=3, m=8, *, dtype=torch.float64, sigma=0.5, seed=0,
         mask_p=None, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, H, Lq, d, generator=g, dtype=dtype) * sigma)
    k = (torch.randn(B, H, S, d, generator=g, dtype=dtype) * sigma)
    v = torch.randn(B, H, S, dv, generator=g, dtype=dtype)
    W = orthogonal_random_features(m, d, generator=g, dtype=dtype)
    mask = (torch.rand(B, S, generator=g) < mask_p) if mask_p else None
    if requires_grad:
        q, k, v, W = (t.requires_grad_() for t in (q, k, v, W))
    return q, k, v, W, mask


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


# ------------------------------------------------------------------------------------------
# op vs plain-torch reference (same features), forward and gradients

CASES = [(kern, causal, mask_p, scale)
         for kern in ("softmax", "relu") for causal in (False, True)
         for mask_p in (None, 0.3) for scale in (None, 0.7)]


@pytest.mark.parametrize("kern,causal,mask_p,scale", CASES)
def test_matches_reference(kern, causal, mask_p, scale):
    # 150 > 2 chunks of 64 with a ragged tail, so the chunk scan and its rescaling are exercised
    S = 150
    Lq = S if causal else 37
    q, k, v, W, mask = make(2, 1, Lq, S, 5, 3, 12, mask_p=mask_p, requires_grad=True)
    out = OP(q, k, v, W, kern, causal, scale, mask)
    ref = rf_attention_reference(q, k, v, W, kern, causal, scale, mask)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v, W), g)
    exp = torch.autograd.grad(ref, (q, k, v, W), g)
    for a, b in zip(got, exp):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@settings(max_examples=15, deadline=None)
@given(B=st.integers(1, 2), H=st.integers(1, 2), S=st.integers(1, 140), Lq=st.integers(1, 9),
       d=st.integers(1, 6), dv=st.integers(1, 4), m=st.integers(1, 10), causal=st.booleans(),
       kern=st.sampled_from(["softmax", "relu"]), masked=st.booleans(), seed=st.integers(0, 99))
def test_random_shapes(B, H, S, Lq, d, dv, m, causal, kern, masked, seed):
    if causal:
        Lq = S
    q, k, v, W, mask = make(B, H, Lq, S, d, dv, m, seed=seed, mask_p=0.4 if masked else None)
    torch.testing.assert_close(OP(q, k, v, W, kern, causal, None, mask),
                               rf_attention_reference(q, k, v, W, kern, causal, None, mask),
                               rtol=1e-9, atol=1e-11)


# ------------------------------------------------------------------------------------------
# opcheck and gradcheck

OPCHECK_CASES = [("softmax", True, 0.3, 0.5), ("softmax", False, None, None),
                 ("relu", True, None, None), ("relu", False, 0.3, None)]


@pytest.mark.parametrize("kern,causal,mask_p,scale", OPCHECK_CASES)
def test_opcheck(kern, causal, mask_p, scale):
    q, k, v, W, mask = make(2, 2, 7, 7, 4, 3, 6, dtype=torch.float32, mask_p=mask_p,
                            requires_grad=True)
    torch.library.opcheck(OP, (q, k, v, W, kern, causal, scale, mask))
    g = torch.randn(2, 2, 7, 3)
    torch.library.opcheck(OPB, (g, q.detach(), k.detach(), v.detach(), W.detach(), kern, causal,
                                scale, mask, True),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("kern", ["softmax", "relu"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mask_p", [None, 0.3])
def test_gradcheck(kern, causal, mask_p):
    q, k, v, W, mask = make(2, 1, 4, 4 if causal else 3, 3, 2, 4, mask_p=mask_p,
                            requires_grad=True, seed=3)
    assert torch.autograd.gradcheck(lambda *a: OP(*a, kern, causal, 0.8, mask), (q, k, v, W))


@pytest.mark.parametrize("kern", ["softmax", "relu"])
def test_gradcheck_multi_chunk(kern):
    q, k, v, W, mask = make(1, 2, 140, 140, 3, 2, 4, mask_p=0.2, requires_grad=True, seed=4)
    assert torch.autograd.gradcheck(lambda *a: OP(*a, kern, True, None, mask), (q, k, v, W),
                                    fast_mode=True)


def test_needs_input_grad_respected():
    q, k, v, W, _ = make(requires_grad=True)
    W.requires_grad_(False)
    OP(q, k, v, W, "softmax", True, None, None).sum().backward()
    assert W.grad is None and q.grad is not None and v.grad is not None


# ------------------------------------------------------------------------------------------
# accuracy against exact attention (statistical)

def _softmax_err(m, seeds, sigma=0.35, L=512, d=64, H=2):
    g = torch.Generator().manual_seed(1234)
    q = torch.randn(1, H, L, d, generator=g) * sigma
    k = torch.randn(1, H, L, d, generator=g) * sigma
    v = torch.randn(1, H, L, d, generator=g)
    exact = F.scaled_dot_product_attention(q, k, v)
    errs = []
    for s in seeds:
        W = orthogonal_random_features(m, d, generator=torch.Generator().manual_seed(s))
        errs.append(rel(OP(q, k, v, W, "softmax", False, None, None), exact))
    return sum(errs) / len(errs)


def test_softmax_accuracy_and_rate():
    seeds = range(5)
    ms = [64, 256, 1024]
    errs = [_softmax_err(m, seeds) for m in ms]
    assert errs[1] <= 0.15, errs
    # error ~ m^-1/2: least-squares slope of log(err) vs log(m)
    xs = [math.log(m) for m in ms]
    ys = [math.log(e) for e in errs]
    xm, ym = sum(xs) / 3, sum(ys) / 3
    slope = sum((x - xm) * (y - ym) for x, y in zip(xs, ys)) / sum((x - xm) ** 2 for x in xs)
    assert -0.7 <= slope <= -0.3, (errs, slope)


def _arccos_attention(q, k, v):
    nq, nk = q.norm(dim=-1, keepdim=True), k.norm(dim=-1, keepdim=True)
    cos = ((q / nq) @ (k / nk).transpose(-2, -1)).clamp(-1, 1)
    th = torch.arccos(cos)
    K = nq * nk.transpose(-2, -1) * (torch.sin(th) + (math.pi - th) * cos) / (2 * math.pi)
    return (K / K.sum(-1, keepdim=True)) @ v


def test_relu_matches_arccos_kernel():
    g = torch.Generator().manual_seed(7)
    q, k = torch.randn(1, 2, 256, 64, generator=g), torch.randn(1, 2, 256, 64, generator=g)
    v = torch.randn(1, 2, 256, 64, generator=g)
    exact = _arccos_attention(q.double(), k.double(), v.double()).float()
    errs = [rel(OP(q, k, v, orthogonal_random_features(256, 64, generator=torch.Generator()
                                                            .manual_seed(s)),
                   "relu", False, None, None), exact) for s in range(5)]
    assert sum(errs) / 5 <= 0.15, errs


# ------------------------------------------------------------------------------------------
# causality, stability, edge cases, dtypes

@pytest.mark.parametrize("kern", ["softmax", "relu"])
def test_causal_no_leak(kern):
    q, k, v, W, mask = make(2, 2, 200, 200, 16, 8, 32, dtype=torch.float32, mask_p=0.1)
    out = OP(q, k, v, W, kern, True, None, mask)
    s = 90  # inside the second chunk: the rest of that chunk is "future"
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    g = torch.Generator().manual_seed(99)
    q2[:, :, s + 1:] = torch.randn(q2[:, :, s + 1:].shape, generator=g)
    k2[:, :, s + 1:] = torch.randn(k2[:, :, s + 1:].shape, generator=g) * 3  # large future keys
    k2[:, :, s + 3] *= 20
    v2[:, :, s + 1:] = torch.randn(v2[:, :, s + 1:].shape, generator=g) * 5
    out2 = OP(q2, k2, v2, W, kern, True, None, mask)
    past = out[:, :, : s + 1]
    diff = (out2[:, :, : s + 1] - past).abs().max() / past.abs().max()
    assert diff <= 1e-6
    assert not torch.allclose(out2[:, :, s + 1:], out[:, :, s + 1:])


def test_causal_prefix_equals_short_sequence():
    q, k, v, W, _ = make(1, 2, 300, 300, 8, 4, 16, dtype=torch.float32)
    full = OP(q, k, v, W, "softmax", True, None, None)
    for n in (1, 64, 65, 130):
        part = OP(q[:, :, :n], k[:, :, :n], v[:, :, :n], W, "softmax", True, None, None)
        torch.testing.assert_close(full[:, :, :n], part, rtol=1e-5, atol=1e-6)


def test_causal_is_chunked_linear_structure():
    # Structural O(L) check at L = 4096: no intermediate of any ATen op holds L x L entries.
    L = 4096
    q, k, v, W, _ = make(1, 1, L, L, 8, 8, 16, dtype=torch.float32)
    with torch.profiler.profile(record_shapes=True) as prof:
        out = OP(q, k, v, W, "softmax", True, None, None)
    biggest = 0
    for ev in prof.events():
        for shape in ev.input_shapes or []:
            if shape:
                biggest = max(biggest, math.prod(shape))
    assert 0 < biggest < L * L // 16
    # and it is still exact causal attention on a prefix
    n = 200
    torch.testing.assert_close(out[:, :, :n], rf_attention_reference(
        q[:, :, :n], k[:, :, :n], v[:, :, :n], W, "softmax", True), rtol=1e-4, atol=1e-5)


def test_stabilisers_large_norms():
    # huge logits: the shifts keep everything finite; fp64 reference agrees
    q, k, v, W, _ = make(1, 2, 130, 130, 8, 4, 16, sigma=6.0, dtype=torch.float32)
    for causal in (False, True):
        out = OP(q, k, v, W, "softmax", causal, None, None)
        assert torch.isfinite(out).all()
        ref = OP(q.double(), k.double(), v.double(), W.double(), "softmax", causal, None, None)
        torch.testing.assert_close(out.double(), ref, rtol=1e-3, atol=1e-4)


def test_attention_rows_sum_to_one():
    # V = I reads off the attention matrix: rows are non-negative and sum to 1
    q, k, _, W, mask = make(1, 1, 70, 70, 8, 1, 16, mask_p=0.2)
    mask[:, 0] = False
    v = torch.eye(70, dtype=torch.float64).view(1, 1, 70, 70)
    for causal in (False, True):
        A = OP(q, k, v, W, "softmax", causal, None, mask)[0, 0]
        torch.testing.assert_close(A.sum(-1), torch.ones(70, dtype=torch.float64))
        assert (A >= 0).all() and (A[:, mask[0]] == 0).all()


def test_empty_and_length_one():
    for B, L in ((0, 5), (2, 1), (2, 0)):
        q, k, v, W, _ = make(B, 2, L, L, 4, 3, 6, requires_grad=True)
        for causal in (False, True):
            out = OP(q, k, v, W, "softmax", causal, None, None)
            assert out.shape == (B, 2, L, 3)
            out.sum().backward()
    # no keys at all (non-causal): zero output
    q, k, v, W, _ = make(2, 2, 3, 0, 4, 3, 6)
    assert (OP(q, k, v, W, "relu", False, None, None) == 0).all()
    # length 1 causal = v itself
    q, k, v, W, _ = make(2, 2, 1, 1, 4, 3, 6)
    torch.testing.assert_close(OP(q, k, v, W, "softmax", True, None, None), v)


def test_fully_masked_rows_give_zero():
    q, k, v, W, _ = make(2, 2, 5, 5, 4, 3, 6)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[1] = True
    mask[0, :2] = True
    out = OP(q, k, v, W, "softmax", True, None, mask)
    assert (out[1] == 0).all() and (out[0, :, :2] == 0).all()
    assert torch.isfinite(out).all()


def test_nan_propagates():
    q, k, v, W, mask = make(1, 1, 6, 6, 4, 3, 6, dtype=torch.float32)
    q[0, 0, 2, 1] = float("nan")
    out = OP(q, k, v, W, "softmax", False, None, None)
    assert torch.isnan(out[0, 0, 2]).all() and torch.isfinite(out[0, 0, [0, 1, 3]]).all()
    k2 = k.clone()
    k2[0, 0, 4, 0] = float("nan")
    assert torch.isnan(OP(q, k2, v, W, "relu", True, None, None)[0, 0, 4:]).all()
    # a NaN in a masked key stays out
    mask = torch.zeros(1, 6, dtype=torch.bool)
    mask[0, 4] = True
    q[0, 0, 2, 1] = 0.0
    assert torch.isfinite(OP(q, k2, v, W, "softmax", True, None, mask)).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
def test_half_precision_accumulates_in_fp32(dtype, causal):
    q, k, v, W, mask = make(2, 2, 130, 130, 16, 8, 32, dtype=torch.float32, mask_p=0.1)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    out = OP(q, k, v, W, "softmax", causal, None, mask)
    assert out.dtype == dtype
    ref = OP(q.float(), k.float(), v.float(), W, "softmax", causal, None, mask)
    assert rel(out.float(), ref) <= 1e-2
    qq = q.clone().requires_grad_()
    OP(qq, k, v, W, "softmax", causal, None, mask).float().sum().backward()
    assert qq.grad.dtype == dtype and torch.isfinite(qq.grad).all()


def test_autocast_cpu():
    q, k, v, W, _ = make(1, 2, 8, 8, 4, 3, 6, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = OP(q, k, v, W, "softmax", True, None, None)
    assert out.dtype == torch.bfloat16


def test_op_errors():
    q, k, v, W, _ = make(2, 2, 5, 6, 4, 3, 6)
    with pytest.raises(ValueError, match="causal"):
        OP(q, k, v, W, "softmax", True, None, None)
    with pytest.raises(ValueError, match="kernel_fn"):
        OP(q, k, v, W, "tanh", False, None, None)
    with pytest.raises(ValueError, match="key_padding_mask"):
        OP(q, k, v, W, "softmax", False, None, torch.zeros(2, 6))
    with pytest.raises(ValueError, match="key_padding_mask"):
        OP(q, k, v, W, "softmax", False, None, torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="projection"):
        OP(q, k, v, W[:, :3], "softmax", False, None, None)
    with pytest.raises(ValueError, match="scale"):
        OP(q, k, v, W, "softmax", False, -1.0, None)
    with pytest.raises(TypeError, match="dtype"):
        OP(q.float(), k, v, W, "softmax", False, None, None)


# ------------------------------------------------------------------------------------------
# orthogonal random features

def test_orthogonal_random_features():
    g = torch.Generator().manual_seed(0)
    W = orthogonal_random_features(40, 16, generator=g, dtype=torch.float64)
    assert W.shape == (40, 16)
    for b in range(3):
        blk = W[16 * b: 16 * (b + 1)]
        unit = blk / blk.norm(dim=-1, keepdim=True)
        gram = unit @ unit.T
        torch.testing.assert_close(gram, torch.eye(gram.shape[0], dtype=torch.float64))
    # row norms are chi_16 draws, not all equal
    assert W.norm(dim=-1).std() > 0.1
    state = torch.get_rng_state()
    orthogonal_random_features(8, 4, generator=torch.Generator().manual_seed(1))
    assert torch.equal(state, torch.get_rng_state())


# ------------------------------------------------------------------------------------------
# the module

SEED_EXAMPLE = '''
from panther.nn import RandMultiHeadAttention
from panther.nn.pawXimpl import sinSRPE
import torch

device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# Randomized multi-head attention with SPRE
spre = sinSRPE(
    num_heads=8,
    perHead_in=512 // 8,  # embed_dim // num_heads
    sines=16,
    num_realizations=256,
    device=device,
    dtype=torch.float32
)

randomized_attention = RandMultiHeadAttention(
    embed_dim=512,
    num_heads=8,
    num_random_features=256,  # Number of random features for approximation
    kernel_fn="softmax",      # Can be "softmax" or "relu"
    SRPE=spre,                # Sketched Random Positional Encoding
    device=device
)

# Self-attention
x = torch.randn(32, 100, 512, device=device)  # (batch, seq_len, embed_dim)
output, attn_weights = randomized_attention(x, x, x)
print(f"Output shape: {output.shape}")  # (32, 100, 512)
'''


def test_seed_example_verbatim(capsys):
    ns = {}
    with torch.no_grad():  # the example has no backward; keeps CI memory low
        exec(compile(SEED_EXAMPLE, "panther-nn-api.rst", "exec"), ns)
    assert ns["output"].shape == (32, 100, 512) and ns["attn_weights"] is None
    assert torch.isfinite(ns["output"]).all()
    assert capsys.readouterr().out == "Output shape: torch.Size([32, 100, 512])\n"


def module_reference(layer, query, key, value, mask=None):
    """Explicit path: projections, (SRPE codes), quadratic reference attention, output proj."""
    B, Lq, E = query.shape
    S, H = key.shape[1], layer.num_heads
    q = F.linear(query, layer.Wq, layer.bq).view(B, Lq, H, -1)
    k = F.linear(key, layer.Wk, layer.bk).view(B, S, H, -1)
    v = F.linear(value, layer.Wv, layer.bv).view(B, S, H, -1)
    if layer.srpe is not None:
        qbar, _ = layer.srpe(Lq)
        _, kbar = layer.srpe(S)
        q = torch.einsum("blhd,blhdr->blhr", q, qbar.expand(B, -1, -1, -1, -1))
        k = torch.einsum("blhd,blhdr->blhr", k, kbar.expand(B, -1, -1, -1, -1))
    att = rf_attention_reference(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                 layer.projection_matrix, layer.kernel_fn, layer.causal, None,
                                 mask)
    return F.linear(att.transpose(1, 2).reshape(B, Lq, E), layer.W0, layer.b0)


@pytest.mark.parametrize("kern,causal,masked,srpe", [
    ("softmax", False, False, False), ("softmax", True, True, False),
    ("relu", False, True, False), ("relu", True, False, False),
    ("softmax", True, True, True), ("relu", False, False, True)])
def test_module_matches_reference(kern, causal, masked, srpe):
    torch.manual_seed(0)
    E, H = 16, 2
    pe = sinSRPE(H, E // H, 3, num_realizations=6, dtype=torch.float64) if srpe else None
    layer = RandMultiHeadAttention(E, H, 10, kernel_fn=kern, iscausal=causal, SRPE=pe,
                                   dtype=torch.float64)
    with torch.no_grad():
        for b in (layer.bq, layer.bk, layer.bv, layer.b0):
            b.normal_()
    Lq, S = (9, 9) if causal else (5, 9)
    query = torch.randn(3, Lq, E, dtype=torch.float64) * 0.5
    kv = torch.randn(3, S, E, dtype=torch.float64) * 0.5
    mask = (torch.rand(3, S) < 0.3) if masked else None
    out, w = layer(query, kv, kv, mask)
    assert w is None and out.shape == (3, Lq, E)
    torch.testing.assert_close(out, module_reference(layer, query, kv, kv, mask))


@pytest.mark.parametrize("causal,masked", [(False, False), (True, True)])
def test_module_gradcheck_with_srpe(causal, masked):
    torch.manual_seed(1)
    E, H = 4, 2
    pe = sinSRPE(H, 2, 2, num_realizations=3, dtype=torch.float64)
    layer = RandMultiHeadAttention(E, H, 5, iscausal=causal, SRPE=pe, dtype=torch.float64)
    x = torch.randn(2, 4, E, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[False, True, False, False], [False, False, False, True]]) if masked \
        else None
    params = {n: p.detach().clone().requires_grad_() for n, p in layer.named_parameters()
              if n.startswith("srpe.")}

    def f(x, *ps):
        out, _ = torch.func.functional_call(layer, dict(zip(params, ps)), (x, x, x, mask),
                                            strict=False)
        return out

    assert torch.autograd.gradcheck(f, (x, *params.values()), fast_mode=causal)


def test_module_parameters_and_init():
    layer = RandMultiHeadAttention(32, 4, 20, seed=0)
    names = dict(layer.named_parameters())
    assert set(names) == {"Wq", "Wk", "Wv", "W0", "bq", "bk", "bv", "b0"}
    bound = math.sqrt(6 / 64)
    for n in ("Wq", "Wk", "Wv", "W0"):
        assert names[n].shape == (32, 32) and names[n].abs().max() <= bound
        assert names[n].abs().max() > 0.8 * bound
    for n in ("bq", "bk", "bv", "b0"):
        assert (names[n] == 0).all()
    assert layer.projection_matrix.shape == (20, 8)
    assert "projection_matrix" in layer.state_dict()
    nb = RandMultiHeadAttention(32, 4, 20, bias=False)
    assert nb.bq is None and nb.b0 is None and len(list(nb.parameters())) == 4
    assert nb(torch.randn(2, 3, 32), torch.randn(2, 5, 32), torch.randn(2, 5, 32))[0].shape \
        == (2, 3, 32)
    pe = sinSRPE(4, 8, 2, num_realizations=12)
    ls = RandMultiHeadAttention(32, 4, 20, SRPE=pe)
    assert ls.projection_matrix.shape == (20, 12)
    assert {"srpe.freqs", "srpe.phases", "srpe.scales"} <= set(dict(ls.named_parameters()))
    assert "srpe.z" in ls.state_dict()
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        assert RandMultiHeadAttention(8, 2, 4).Wq.dtype == torch.float64
    finally:
        torch.set_default_dtype(old)


def test_module_randomness():
    state = torch.get_rng_state()
    a = RandMultiHeadAttention(16, 2, 8, seed=5)
    b = RandMultiHeadAttention(16, 2, 8, seed=5)
    assert torch.equal(state, torch.get_rng_state())  # seed= leaves the global RNG alone
    assert torch.equal(a.Wq, b.Wq) and torch.equal(a.projection_matrix, b.projection_matrix)
    torch.manual_seed(3)
    c = RandMultiHeadAttention(16, 2, 8)
    d = RandMultiHeadAttention(16, 2, 8)  # built right after: different draws
    assert not torch.equal(c.Wq, d.Wq)
    assert not torch.equal(c.projection_matrix, d.projection_matrix)
    torch.manual_seed(3)
    c2 = RandMultiHeadAttention(16, 2, 8)
    assert torch.equal(c.Wq, c2.Wq) and torch.equal(c.projection_matrix, c2.projection_matrix)
    e = RandMultiHeadAttention(16, 2, 8, generator=torch.Generator().manual_seed(5))
    assert torch.equal(e.projection_matrix, a.projection_matrix)
    # redraw: new features, in place, still reproducible with seed=
    state = torch.get_rng_state()
    old = a.projection_matrix.clone()
    a.redraw_features()
    b.redraw_features()
    assert not torch.equal(old, a.projection_matrix)
    assert torch.equal(a.projection_matrix, b.projection_matrix)
    assert torch.equal(state, torch.get_rng_state())


def test_dropout_train_and_eval():
    torch.manual_seed(0)
    layer = RandMultiHeadAttention(8, 2, 16, dropout=0.5)
    x = torch.randn(2, 6, 8)
    layer.eval()
    e1, _ = layer(x, x, x)
    e2, _ = layer(x, x, x)
    assert torch.equal(e1, e2)
    ref = RandMultiHeadAttention(8, 2, 16, dropout=0.0)
    ref.load_state_dict(layer.state_dict())
    torch.testing.assert_close(e1, ref(x, x, x)[0])
    layer.train()
    with torch.no_grad():
        t1, t2 = layer(x, x, x)[0], layer(x, x, x)[0]
        assert not torch.allclose(t1, t2) and not torch.allclose(t1, e1)
        # masks are independent across the batch: 500 copies give a Monte-Carlo mean
        n = 500
        xs = x.repeat(n, 1, 1)
        mean = layer(xs, xs, xs)[0].view(n, *e1.shape).mean(0)
    b0 = layer.b0  # the attention part is an unbiased estimate: compare without the bias
    assert rel(mean - b0, e1 - b0) < 0.1


def test_mask_semantics():
    torch.manual_seed(0)
    layer = RandMultiHeadAttention(8, 2, 16, dtype=torch.float64)
    q = torch.randn(2, 4, 8, dtype=torch.float64)
    kv = torch.randn(2, 7, 8, dtype=torch.float64)
    mask = torch.zeros(2, 7, dtype=torch.bool)
    mask[0, 5:] = True
    mask[1, :2] = True
    out, _ = layer(q, kv, kv, mask)
    kv2 = kv.clone()
    kv2[mask] = torch.randn(int(mask.sum()), 8, dtype=torch.float64) * 10  # masked: irrelevant
    torch.testing.assert_close(layer(q, kv2, kv2, mask)[0], out)
    # same as dropping the masked keys altogether
    torch.testing.assert_close(out[0], layer(q[:1], kv[:1, :5], kv[:1, :5])[0][0])
    torch.testing.assert_close(out[1], layer(q[1:], kv[1:, 2:], kv[1:, 2:])[0][0])
    # a batch with every key masked: attention part is zero
    full = torch.ones(2, 7, dtype=torch.bool)
    torch.testing.assert_close(layer(q, kv, kv, full)[0], layer.b0.expand(2, 4, 8))


@pytest.mark.parametrize("bad", [torch.zeros(2, 7), torch.zeros(2, 4, 7, dtype=torch.bool),
                                 torch.zeros(7, dtype=torch.bool),
                                 torch.zeros(2, 6, dtype=torch.bool), [[True] * 7] * 2])
def test_mask_errors(bad):
    layer = RandMultiHeadAttention(8, 2, 4)
    with pytest.raises(ValueError, match="attention_mask"):
        layer(torch.randn(2, 4, 8), torch.randn(2, 7, 8), torch.randn(2, 7, 8), bad)


def test_forward_errors():
    layer = RandMultiHeadAttention(8, 2, 4, iscausal=True)
    with pytest.raises(ValueError, match="equal query and key lengths"):
        layer(torch.randn(2, 4, 8), torch.randn(2, 7, 8), torch.randn(2, 7, 8))
    with pytest.raises(ValueError, match="query"):
        layer(torch.randn(4, 8), torch.randn(4, 8), torch.randn(4, 8))
    with pytest.raises(ValueError):
        layer(torch.randn(2, 4, 6), torch.randn(2, 4, 6), torch.randn(2, 4, 6))


def test_forward_names_a_dtype_or_device_mismatch():
    layer = RandMultiHeadAttention(8, 2, 4, seed=0)
    q, kv = torch.randn(2, 4, 8), torch.randn(2, 7, 8)
    with pytest.raises(TypeError, match=r"RandMultiHeadAttention: value has dtype torch.float64 .*torch.float32"):
        layer(q, kv, kv.double())
    with pytest.raises(ValueError, match="RandMultiHeadAttention: key is on device meta .* on device cpu"):
        layer(q, kv.to("meta"), kv)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(q.bfloat16(), kv.bfloat16(), kv.bfloat16())[0]
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), layer(q, kv, kv)[0], atol=0.1, rtol=0.05)


@pytest.mark.parametrize("kwargs,exc", [
    (dict(num_heads=0), ValueError), (dict(embed_dim=0), ValueError),
    (dict(embed_dim=10, num_heads=4), ValueError), (dict(dropout=1.0), ValueError),
    (dict(dropout=-0.1), ValueError), (dict(bias=1), ValueError),
    (dict(kernel_fn="tanh"), ValueError), (dict(iscausal="yes"), ValueError),
    (dict(num_random_features=0), ValueError), (dict(num_random_features=-3), ValueError),
    (dict(num_random_features=2.5), TypeError), (dict(num_random_features=True), TypeError),
    (dict(SRPE="sin"), TypeError)])
def test_constructor_validation(kwargs, exc):
    args = dict(embed_dim=8, num_heads=2, num_random_features=4)
    args.update(kwargs)
    with pytest.raises(exc):
        RandMultiHeadAttention(**args)


def test_srpe_head_mismatch():
    with pytest.raises(ValueError, match="SRPE"):
        RandMultiHeadAttention(8, 2, 4, SRPE=sinSRPE(2, 3, 2, 4))


@pytest.mark.parametrize("batch_first", [True, False])
def test_from_mha(batch_first):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=batch_first)
    with torch.no_grad():
        mha.in_proj_bias.normal_(0, 0.05)
        mha.out_proj.bias.normal_(0, 0.05)
    layer = RandMultiHeadAttention.from_mha(mha, 2048)
    torch.testing.assert_close(layer.Wk, mha.in_proj_weight[32:64])
    torch.testing.assert_close(layer.bv, mha.in_proj_bias[64:])
    torch.testing.assert_close(layer.W0, mha.out_proj.weight)
    torch.testing.assert_close(layer.b0, mha.out_proj.bias)
    assert layer.Wq.data_ptr() != mha.in_proj_weight.data_ptr()
    x = torch.randn(2, 50, 32)
    mask = torch.zeros(2, 50, dtype=torch.bool)
    mask[1, 40:] = True
    xin = x if batch_first else x.transpose(0, 1)
    with torch.no_grad():
        exact, _ = mha(xin, xin, xin, key_padding_mask=mask, need_weights=False)
        exact = exact if batch_first else exact.transpose(0, 1)
        approx, _ = layer(x, x, x, mask)  # always batch-first
        # baseline: uniform attention over the unmasked keys
        v = F.linear(x, layer.Wv, layer.bv)
        w = (~mask).to(v.dtype)[:, :, None]
        uniform = F.linear(((v * w).sum(1, keepdim=True) / w.sum(1, keepdim=True)).expand_as(v),
                           layer.W0, layer.b0)
    err, base = rel(approx, exact), rel(uniform, exact)
    assert err < 0.25 and err < 0.5 * base, (err, base)
    with torch.no_grad():
        mha.in_proj_weight.zero_()  # copies, not shared storage
    assert layer.Wq.abs().sum() > 0


def test_from_mha_errors():
    with pytest.raises(ValueError, match="kdim"):
        RandMultiHeadAttention.from_mha(nn.MultiheadAttention(8, 2, kdim=4, vdim=4), 4)
    with pytest.raises(ValueError, match="bias_k"):
        RandMultiHeadAttention.from_mha(nn.MultiheadAttention(8, 2, add_bias_kv=True), 4)
    with pytest.raises(ValueError, match="add_zero_attn"):
        RandMultiHeadAttention.from_mha(nn.MultiheadAttention(8, 2, add_zero_attn=True), 4)
    nb = RandMultiHeadAttention.from_mha(nn.MultiheadAttention(8, 2, bias=False), 4,
                                         kernel_fn="relu", iscausal=True)
    assert nb.bq is None and nb.kernel_fn == "relu" and nb.causal


def test_module_causal_no_leak_with_srpe():
    torch.manual_seed(0)
    pe = sinSRPE(2, 8, 4, num_realizations=16)
    layer = RandMultiHeadAttention(16, 2, 32, iscausal=True, SRPE=pe)
    x = torch.randn(2, 150, 16)
    out, _ = layer(x, x, x)
    x2 = x.clone()
    x2[:, 100:] = torch.randn(2, 50, 16) * 4
    out2, _ = layer(x2, x2, x2)
    diff = (out2[:, :100] - out[:, :100]).abs().max() / out[:, :100].abs().max()
    assert diff <= 1e-6
