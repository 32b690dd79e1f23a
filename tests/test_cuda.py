"""CUDA checks of the ATen paths (skipped without a GPU; run on the lent H200 with `pytest -m cuda`)."""
import pytest
import torch

import panther  # noqa: F401
from panther.ops import sketched_linear_reference

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _linear_args(dtype, lead=(37,), d_in=1000, k=5, d_out=333, L=1, bias=True, requires_grad=False):
    g = torch.Generator(device="cuda").manual_seed(0)
    mk = lambda *s: torch.randn(*s, device="cuda", dtype=dtype, generator=g).requires_grad_(requires_grad)  # noqa
    return (mk(*lead, d_in), mk(L, d_in, k), mk(L, k, d_out), mk(L, k, d_out), mk(L, d_in, k),
            mk(d_out) if bias else None)


@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_sketched_linear_cuda(bias):
    args = _linear_args(torch.float32, lead=(4, 5), d_in=40, k=3, d_out=24, L=2, bias=bias, requires_grad=True)
    torch.library.opcheck(torch.ops.panther.sketched_linear_fwd.default, args)
    torch.library.opcheck(torch.ops.panther.sketched_linear.default, args)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_sketched_linear_cuda_odd_shapes(dtype, tol):
    args = _linear_args(dtype)
    y = torch.ops.panther.sketched_linear(*args)
    ref = sketched_linear_reference(*[a.double() if a is not None else None for a in args])
    assert y.dtype == dtype
    assert ((y.double() - ref).norm() / ref.norm()).item() < tol


def test_gradcheck_cuda_float64():
    args = _linear_args(torch.float64, lead=(3,), d_in=7, k=2, d_out=5, L=2, requires_grad=True)
    assert torch.autograd.gradcheck(torch.ops.panther.sketched_linear, args)


def test_autocast_cuda():
    args = _linear_args(torch.float32, d_in=64, d_out=32)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = torch.ops.panther.sketched_linear(*args)
    assert y.dtype == torch.bfloat16


@pytest.mark.parametrize("bias", [True, False])
def test_sketched_conv2d_cuda_matches_cpu(bias):
    g = torch.Generator().manual_seed(1)
    x, S1s, U1s = (torch.randn(2, 3, 9, 9, generator=g), torch.randn(8, 3, 3, 3, generator=g),
                   torch.randn(4, 2, 5, generator=g))
    b = torch.randn(5, generator=g) if bias else None
    args = [x, S1s, U1s, b, [2, 1], [1, 0], [1, 2]]
    cpu = torch.ops.panther.sketched_conv2d(*args)
    cuda_args = [a.cuda() if isinstance(a, torch.Tensor) else a for a in args]
    torch.testing.assert_close(torch.ops.panther.sketched_conv2d(*cuda_args).cpu(), cpu, rtol=1e-4, atol=1e-4)
    for a in cuda_args[:4]:
        if a is not None:
            a.requires_grad_(True)
    torch.library.opcheck(torch.ops.panther.sketched_conv2d.default, cuda_args)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kernel_fn", ["softmax", "relu"])
def test_rf_attention_cuda_matches_cpu(causal, kernel_fn):
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 3, 70, 16, generator=g) * 0.5 for _ in range(3))
    proj = torch.randn(32, 16, generator=g)
    mask = torch.zeros(2, 70, dtype=torch.bool)
    mask[1, 60:] = True
    args = [q, k, v, proj, kernel_fn, causal, None, mask]
    cpu = torch.ops.panther.rf_attention(*args)
    cuda_args = [a.cuda() if isinstance(a, torch.Tensor) else a for a in args]
    torch.testing.assert_close(torch.ops.panther.rf_attention(*cuda_args).cpu(), cpu, rtol=1e-4, atol=1e-4)
    for a in cuda_args[:3]:
        a.requires_grad_(True)
    torch.library.opcheck(torch.ops.panther.rf_attention.default, cuda_args)


def test_rand_mha_uses_the_triton_kernels_on_cuda():
    from panther.nn import RandMultiHeadAttention, attention

    layer = RandMultiHeadAttention(128, 4, 64, iscausal=True, seed=0).cuda()
    assert attention.triton_attention.op is not None
    x = torch.randn(2, 300, 128, device="cuda") * 0.5
    with torch.no_grad():
        out, _ = layer(x, x, x)
        q = torch.nn.functional.linear(x, layer.Wq, layer.bq).view(2, 300, 4, 32).transpose(1, 2)
        k = torch.nn.functional.linear(x, layer.Wk, layer.bk).view(2, 300, 4, 32).transpose(1, 2)
        v = torch.nn.functional.linear(x, layer.Wv, layer.bv).view(2, 300, 4, 32).transpose(1, 2)
        ref = torch.ops.panther.rf_attention(q, k, v, layer.projection_matrix, "softmax", True, None, None)
        ref = torch.nn.functional.linear(ref.transpose(1, 2).reshape(2, 300, 128), layer.W0, layer.b0)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-4


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_generation_state_on_cuda_equals_the_whole_sequence(dtype, tol):
    # the prompt through the Triton kernel and the state's sums, then tokens one at a time (also compiled)
    from panther.nn import RandAttentionState, RandMultiHeadAttention, attention, sinSRPE

    pe = sinSRPE(4, 32, 4, num_realizations=32, device="cuda", dtype=dtype)
    layer = RandMultiHeadAttention(128, 4, 64, iscausal=True, SRPE=pe, seed=0, device="cuda", dtype=dtype).eval()
    x = torch.randn(2, 300, 128, device="cuda", dtype=dtype) * 0.5
    pad = torch.zeros(2, 300, dtype=torch.bool, device="cuda")
    pad[1, :40] = True
    compiled = torch.compile(layer)
    with torch.no_grad():
        ref, _ = layer(x, x, x, pad)
        state = RandAttentionState()
        outs = [layer(x[:, :200], x[:, :200], x[:, :200], pad[:, :200], state=state)[0]]
        for t in range(200, 300):
            fn = compiled if t % 2 else layer
            outs.append(fn(x[:, t:t + 1], x[:, t:t + 1], x[:, t:t + 1], pad[:, t:t + 1], state=state)[0])
    out = torch.cat(outs, dim=1)
    assert attention.triton_step.op is not None   # the one-token steps ran the Triton kernel
    assert state.length == 300 and state[layer].kv.dtype == torch.float32
    assert ((out.float() - ref.float()).norm() / ref.float().norm()).item() < tol


class _CausalStack(torch.nn.Module):
    def __init__(self):
        super().__init__()
        from panther.nn import RandMultiHeadAttention, sinSRPE

        pe = sinSRPE(4, 32, 4, num_realizations=32, device="cuda")
        self.a = RandMultiHeadAttention(128, 4, 64, iscausal=True, SRPE=pe, seed=0, device="cuda")
        self.b = RandMultiHeadAttention(128, 4, 64, iscausal=True, seed=1, device="cuda")

    def forward(self, x, state=None):
        x = x + self.a(x, x, x, state=state)[0]
        return x + self.b(x, x, x, state=state)[0]


def test_static_state_steps_replay_one_cuda_graph():
    # mode="reduce-overhead": a static state's steps run as CUDA-graph replays (no skip), one graph for all
    from torch._dynamo.utils import counters
    from panther.nn import RandAttentionState

    model = _CausalStack().eval()
    x = torch.randn(2, 60, 128, device="cuda") * 0.5
    torch._dynamo.reset()
    counters.clear()
    step = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    with torch.no_grad():
        ref = model(x)
        state = RandAttentionState()
        outs = [model(x[:, :40], state)]
        state = state.to_static()
        for t in range(40, 60):
            outs.append(step(x[:, t:t + 1], state).clone())   # a replay's output is overwritten by the next
    assert counters["inductor"]["cudagraph_skips"] == 0 and counters["stats"]["unique_graphs"] == 1
    assert state.length == 60
    torch.testing.assert_close(torch.cat(outs, dim=1), ref, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("kern", ["softmax", "relu"])
def test_decoding_kernel_opcheck_and_torch_step_on_cuda(kern):
    from inductor_ext import triton_rf_step as ts
    from panther.ops.attention import rf_attention_step, rf_causal_state
    from panther.sketch import orthogonal_random_features

    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(3, 4, 9, 64, device="cuda", generator=g) * 0.7 for _ in range(3))
    P = orthogonal_random_features(256, 64, device="cuda")
    mask = torch.zeros(3, 9, dtype=torch.bool, device="cuda")
    mask[0, :8] = True
    mask[1, 8] = True
    state = rf_causal_state(k[:, :, :8], v[:, :, :8], P, kern, None, mask[:, :8])
    new = [t[:, :, 8:] for t in (q, k, v)]
    assert ts.kernel_ok(*new, P, state)
    torch.library.opcheck(torch.ops.panther.rf_attention_token.default, (*new, P, kern, None, mask[:, 8:], *state[:3]))
    out, got = ts.rf_attention_step_triton(*new, P, kern, None, mask[:, 8:], state)
    ref, want = rf_attention_step(*new, P, kern, None, mask[:, 8:], state)
    torch.testing.assert_close((out, got.kv, got.k_sum), (ref, want.kv, want.k_sum), rtol=1e-4, atol=1e-5)


class _SDPABlock(torch.nn.Module):
    def forward(self, q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True) * 2


def _attention_case(kind):
    """(model, inputs, a kernel name of the Triton attention it should run) on CUDA."""
    torch.manual_seed(0)
    if kind == "sdpa":
        return _SDPABlock(), [torch.randn(2, 4, 300, 32, device="cuda") * 0.5 for _ in range(3)], "_causal_out_kernel"
    x = [torch.randn(2, 300, 128, device="cuda") * 0.5]
    if kind == "mha":
        mha = torch.nn.MultiheadAttention(128, 4, batch_first=True, device="cuda").eval()
        return (lambda t: mha(t, t, t, need_weights=False)[0]), x, "_query"
    # in eval mode without gradients one fused native call, which panther expands first
    layer = torch.nn.TransformerEncoderLayer(128, 4, 256, dropout=0.0, batch_first=True, device="cuda")
    encoder = torch.nn.TransformerEncoder(layer, 1, enable_nested_tensor=False).eval()
    if kind == "encoder_layer":
        return encoder, x, "_query"

    def causal(t, pad):  # the fused call takes the mask built here merged with the padding: read as causal
        length = t.shape[1]
        mask = torch.ones(length, length, dtype=torch.bool, device=t.device).triu(1)
        return encoder(t, mask=mask, src_key_padding_mask=pad, is_causal=True)

    pad = torch.zeros(2, 300, dtype=torch.bool, device="cuda")
    pad[1, 250:] = True
    return causal, x + [pad], "_causal_out_kernel"


@pytest.mark.parametrize("kind", ["sdpa", "mha", "encoder_layer", "causal_encoder"])
def test_backend_attention_rewrites_inline_the_triton_attention_kernels(kind):
    """backend="panther" with Inductor on CUDA: the rewritten attention runs panther's Triton kernels,
    inlined in the generated code (not the C++ op), and matches the same rewrite run by aot_eager
    (which calls the C++ op with the same random features). nn.MultiheadAttention's rewrite once hid its
    attention op inside one opaque call, which kept it on the slow C++ path."""
    from torch._inductor.utils import run_and_get_code

    from panther.backend import panther_backend
    from panther.policy import SketchSpec

    model, inputs, kernel = _attention_case(kind)
    outs, reports = {}, []
    for compiler in ("aot_eager", "inductor"):
        torch._dynamo.reset()
        options = {"policy": {"attention": SketchSpec(num_random_features=64, seed=1)},
                   "report": reports.append, "compiler": compiler}
        compiled = torch.compile(model, backend=panther_backend, options=options)
        with torch.no_grad():
            outs[compiler], code = run_and_get_code(compiled, *inputs)
    src = "\n".join(code)
    assert kernel in src and "torch.ops.panther.rf_attention." not in src
    assert all([r for r in rep.rows if r.kind == "attention"][0].replaced for rep in reports)
    ref = outs["aot_eager"]
    assert ((outs["inductor"] - ref).norm() / ref.norm()).item() < 1e-3


def test_backend_training_step_with_attention_dropout_runs_the_triton_kernels():
    """nn.MultiheadAttention with dropout in training: the rewrite drops whole keys per head in the graph, and
    Inductor still inlines the Triton attention kernels, forward and backward; eval mode drops nothing."""
    from torch._inductor.utils import run_and_get_code

    from panther.backend import panther_backend
    from panther.policy import SketchSpec

    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(128, 4, dropout=0.1, batch_first=True, device="cuda")
    x = torch.randn(2, 300, 128, device="cuda") * 0.5
    reports = []
    torch._dynamo.reset()
    compiled = torch.compile(lambda t: mha(t, t, t, need_weights=False)[0], backend=panther_backend,
                             options={"policy": {"attention": SketchSpec(num_random_features=64, seed=1)},
                                      "report": reports.append})

    def step():
        out = compiled(x)
        out.square().mean().backward()
        return out

    out, code = run_and_get_code(step)
    assert reports[0].rows[0].replaced, reports[0].rows[0].reason
    src = "\n".join(code)
    assert "_query" in src and "torch.ops.panther.rf_attention." not in src
    assert torch.isfinite(out).all() and all(torch.isfinite(p.grad).all() for p in mha.parameters())
    mha.eval()  # with gradients, so that nn.MultiheadAttention keeps its ordinary path
    undropped, again = compiled(x).detach(), compiled(x).detach()
    assert torch.equal(undropped, again)  # eval: no dropout
    assert reports[-1].rows[0].replaced
    assert ((out.detach() - undropped).norm() / undropped.norm()).item() > 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_empty_batches_run_forward_and_backward_on_cuda(dtype):
    """Zero rows through every GPU path (fused linear kernels, the tap GEMM, the attention kernels): the
    outputs have the dense layers' shapes and the parameter gradients are zero."""
    from panther.nn import RandMultiHeadAttention, SKConv2d, SKLinear, SKLinear_triton

    kw = dict(seed=0, device="cuda", dtype=dtype)
    cases = [(SKLinear(64, 32, 1, 8, **kw), (0, 64)), (SKLinear_triton(64, 32, 1, 8, **kw), (0, 64)),
             (SKLinear_triton(64, 32, 1, 8, **kw), (3, 0, 64)),
             (SKConv2d(16, 32, 3, padding=1, num_terms=1, low_rank=4, **kw), (0, 16, 8, 8)),
             (SKConv2d(16, 32, 3, padding=1, num_terms=1, low_rank=4, **kw).to(memory_format=torch.channels_last),
              (0, 16, 8, 8))]
    for layer, shape in cases:
        x = torch.randn(shape, device="cuda", dtype=dtype, requires_grad=True)
        y = layer(x)
        assert y.shape[:-1 if x.dim() < 4 else 1] == x.shape[:-1 if x.dim() < 4 else 1]
        y.sum().backward()
        assert x.grad.shape == x.shape and not any(p.grad.any() for p in layer.parameters())
    for causal in (False, True):
        layer = RandMultiHeadAttention(128, 2, 64, iscausal=causal, **kw)
        for B, L in ((0, 40), (2, 0)):
            x = torch.randn(B, L, 128, device="cuda", dtype=dtype, requires_grad=True)
            out, _ = layer(x, x, x)
            assert out.shape == x.shape
            out.sum().backward()
            assert x.grad.shape == x.shape
            assert not any(p.grad.any() for p in layer.parameters() if p.grad is not None)
            layer.zero_grad()


def test_backend_routes_to_the_triton_kernels_under_autocast():
    """Compiled inside torch.autocast (bf16), the rewritten attention still runs the Triton kernels: the
    routing casts the panther ops' inputs in the graph as the C++ ops' autocast kernels would (it kept every
    C++ op before, the attention on its slow ATen path). The aot_eager run calls the C++ ops."""
    from torch._inductor.utils import run_and_get_code

    from panther.backend import panther_backend
    from panther.policy import SketchSpec

    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(128, 4, batch_first=True, device="cuda").eval()
    head = torch.nn.Linear(128, 128, device="cuda").eval()

    def model(t):
        return head(mha(t, t, t, need_weights=False)[0])

    x = torch.randn(2, 300, 128, device="cuda")
    policy = {"attention": SketchSpec(num_random_features=64, seed=1), "linear": SketchSpec(low_rank=8, init="svd")}
    outs = {}
    for compiler in ("aot_eager", "inductor"):
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=panther_backend, options={"policy": policy, "compiler": compiler})
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            outs[compiler], code = run_and_get_code(compiled, x)
    src = "\n".join(code)
    assert "_query" in src  # the Triton attention; the small linear keeps the GEMMs, its inputs cast the same way
    assert "torch.ops.panther.rf_attention." not in src
    assert outs["inductor"].dtype == outs["aot_eager"].dtype == torch.bfloat16
    ref = outs["aot_eager"].float()
    assert ((outs["inductor"].float() - ref).norm() / ref.norm()).item() < 2e-2


def _bert_mask(pad, dtype):
    """BERT's older additive mask, built in the graph from the keys to keep."""
    return (1.0 - (~pad).long()[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def _future(q):
    """The keys after each query, True."""
    return torch.ones(q.shape[-2], q.shape[-2], dtype=torch.bool, device=q.device).triu(1)


# name: (attention, its inputs from (q, k, v, pad), the rf_attention it means: (q, k, v, causal, scale, kpm))
_FORMS = {
    "sdpa_5d": (lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v),
                lambda q, k, v, pad: [t.view(2, 2, 2, *t.shape[-2:]) for t in (q, k, v)],
                lambda q, k, v, pad: (q, k, v, False, None, None)),
    "bmm_3d": (lambda q, k, v: torch.bmm(torch.bmm(q * 0.125, k.transpose(1, 2)).softmax(-1), v),
               lambda q, k, v, pad: [t.flatten(0, 1) for t in (q, k, v)],
               lambda q, k, v, pad: (q, k, v, False, 0.125, None)),
    "baddbmm_3d": (lambda q, k, v: torch.bmm(torch.baddbmm(
        torch.empty(q.shape[0], q.shape[1], k.shape[1], device=q.device, dtype=q.dtype), q, k.transpose(-1, -2),
        beta=0, alpha=0.125).softmax(-1), v),
        lambda q, k, v, pad: [t.flatten(0, 1) for t in (q, k, v)],
        lambda q, k, v, pad: (q, k, v, False, 0.125, None)),
    "multi_query_causal": (lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True),
                           lambda q, k, v, pad: [q, k[:, :1], v[:, :1]],
                           lambda q, k, v, pad: (q, k[:, :1].expand_as(q), v[:, :1].expand_as(q), True, None, None)),
    "bert_mask_sdpa": (lambda q, k, v, pad: torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=_bert_mask(pad, q.dtype)),
        lambda q, k, v, pad: [q, k, v, pad],
        lambda q, k, v, pad: (q, k, v, False, None, pad)),
    "bert_mask_written": (lambda q, k, v, pad: torch.softmax(
        q.matmul(k.transpose(-1, -2)) / 8.0 + _bert_mask(pad, q.dtype), dim=-1).matmul(v),
        lambda q, k, v, pad: [q, k, v, pad],
        lambda q, k, v, pad: (q, k, v, False, 0.125, pad)),
    "kept_transposed_two_masks": (lambda q, k, v, pad: torch.softmax(
        (q @ k.transpose(-1, -2).contiguous() * 0.125).masked_fill(_future(q), float("-inf"))
        + _bert_mask(pad, q.dtype), dim=-1) @ v,
        lambda q, k, v, pad: [q, k, v, pad],
        lambda q, k, v, pad: (q, k, v, True, 0.125, pad)),
    "fairseq_masks": (lambda q, k, v, pad: torch.bmm(torch.softmax(torch.max(
        (torch.bmm(q, k.transpose(1, 2)) * 0.125).view(2, 4, 512, 512).masked_fill(pad[:, None, None, :], float("-inf"))
        + torch.triu(torch.full((512, 512), float("-inf"), device=q.device), 1),
        torch.tensor(torch.finfo(q.dtype).min, device=q.device)).view(8, 512, 512), dim=-1), v),
        lambda q, k, v, pad: [q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), pad],
        lambda q, k, v, pad: (q, k, v, True, 0.125, pad)),
    "flash_layout_einsum": (lambda q, k, v: torch.einsum("bhts,bshd->bthd", torch.einsum(
        "bthd,bshd->bhts", q * 0.125, k).masked_fill(_future(q.transpose(1, 2)), float("-inf")).softmax(-1),
        v).transpose(1, 2),
        lambda q, k, v, pad: [t.transpose(1, 2) for t in (q, k, v)],
        lambda q, k, v, pad: (q, k, v, True, 0.125, None)),
    "opt_prescaled_sdpa": (lambda x, k, v: torch.nn.functional.scaled_dot_product_attention(
        (x * 0.125).view(2, 512, 4, 64).transpose(1, 2), k, v, is_causal=True, scale=1.0),
        lambda q, k, v, pad: [q.transpose(1, 2).reshape(2, 512, 256), k, v],
        lambda q, k, v, pad: (q, k, v, True, 0.125, None)),
}


@pytest.mark.parametrize("form", _FORMS)
def test_backend_attention_forms_run_the_triton_kernels(form):
    """The attention forms the CPU tests read (other ranks folded, multi-query heads, BERT's float mask,
    baddbmm, method products) compile with Inductor on CUDA to panther's inlined Triton attention, in bf16,
    within 1% of the C++ op on the same random features."""
    from torch._inductor.utils import run_and_get_code

    from panther.attention_error import layer_features
    from panther.backend import panther_backend
    from panther.policy import SketchSpec

    fn, inputs, meaning = _FORMS[form]
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 4, 512, 64, device="cuda", dtype=torch.bfloat16, generator=g) * 0.35 for _ in range(3))
    pad = torch.zeros(2, 512, dtype=torch.bool, device="cuda")
    pad[1, 400:] = True
    spec, reports = SketchSpec(num_random_features=128, seed=1), []
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend=panther_backend, options={"policy": {"attention": spec},
                                                                   "report": reports.append})
    args = inputs(q, k, v, pad)
    with torch.no_grad():
        y, code = run_and_get_code(compiled, *args)
    (row,) = reports[0].rows
    assert row.replaced, row.reason
    assert "torch.ops.panther.rf_attention." not in "\n".join(code)
    qq, kk, vv, causal, scale, kpm = meaning(q, k, v, pad)
    P = layer_features(row.name, 128, 64, 1, dtype=torch.bfloat16, device="cuda").float()  # as the backend drew it
    ref = torch.ops.panther.rf_attention(qq.float(), kk.float(), vv.float(), P, "softmax", causal, scale, kpm)
    assert ((y.float().reshape(ref.shape) - ref).norm() / ref.norm()).item() < 1e-2


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_decoding_steps_compile_with_inductor_to_the_triton_attention(impl):
    """Generation's steps (one query, the cache length symbolic from the second step) under Inductor on CUDA:
    random-feature attention, the causal random-feature attention of the whole sequence at their positions."""
    from backend_common import decode_steps_and_whole  # tests/ is on sys.path

    steps, whole, rows = decode_steps_and_whole(impl, "cuda", {"compiler": "inductor"})
    assert all(r.replaced for r in rows), [r.reason for r in rows]
    torch.testing.assert_close(steps, whole, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_prompts_of_two_lengths_share_one_dynamic_graph_under_inductor(impl):
    """Under ``dynamic=True`` on CUDA, Inductor: the causal padded mask of a symbolic length is read for every
    length, and both lengths run the random-feature attention of their static graphs."""
    from backend_common import prompts_dynamic_and_static  # tests/ is on sys.path

    outputs, compiles, rows = prompts_dynamic_and_static(impl, "cuda", {"compiler": "inductor"})
    assert compiles[0] == compiles[1], compiles
    assert rows and all(r.replaced for r in rows), [r.reason for r in rows]
    for dynamic, static in outputs:
        torch.testing.assert_close(dynamic, static, rtol=2e-3, atol=2e-3)
