"""The fused random-feature attention Triton kernels (inductor_ext/triton_attention.py).

CPU CI: the kernels' arithmetic in Triton's interpreter (one subprocess, TRITON_INTERPRET=1), the
triton_op's CPU branch through opcheck / gradcheck, argument validation.
CUDA (the lent H200, ``pytest -m cuda``): the kernels against the float64 reference in bf16/fp32,
causal or not, softmax/relu, masks, several segments; gradients (the fused Triton backward, and the
C++ one when the projection needs a gradient) against the C++ backward; torch.compile of the op.
"""
import math
import sys

import pytest
import torch

import panther  # noqa: F401
from inductor_ext import triton_attention as ta
from panther.ops.attention import rf_attention_reference
from panther.sketch import orthogonal_random_features
from interpret_common import run_interpreter_check  # tests/ is on sys.path

OP = torch.ops.panther.rf_attention_triton.default
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def inputs(B=2, H=2, L=9, S=None, d=8, dv=6, m=12, dtype=torch.float64, device="cpu", masked=False,
           requires_grad=False, seed=0, shift=0.0):
    S = L if S is None else S
    g = torch.Generator(device=device).manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, device=device, dtype=dtype)  # noqa: E731
    q, k, v = mk(B, H, L, d), mk(B, H, S, d) + shift, mk(B, H, S, dv)
    W = orthogonal_random_features(m, d, generator=g, device=device, dtype=dtype) \
        if device == "cpu" else orthogonal_random_features(m, d, dtype=dtype).to(device)
    mask = None
    if masked:
        mask = torch.rand(B, S, generator=g, device=device) < 0.3
        mask[0, : min(S, 3)] = True
    for t in (q, k, v, W):
        t.requires_grad_(requires_grad)
    return q, k, v, W, mask


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# ------------------------------------------------------------------ interpreter (CPU CI)
@pytest.mark.skipif(ta.triton is None, reason="needs triton")
def test_kernel_arithmetic_in_triton_interpreter():
    """Non-causal (several key splits) and causal (several segments, chunk tails), softmax/relu,
    masks with fully masked rows and masked prefixes, odd d/dv/m, fp32 and bf16: vs float64."""
    run_interpreter_check("triton_attention_interpret_check.py", "all interpreter checks passed")


@pytest.mark.skipif(ta.triton is None, reason="needs triton")
def test_backward_kernel_arithmetic_in_triton_interpreter():
    """The fused backward: dq, dk, dv vs the C++ backward and autograd of the reference (float64);
    causal (several segments, rising running max) and not, softmax/relu, masks, fp32/bf16/fp16,
    and the op's autograd routing (Triton backward; C++ when the projection needs a gradient)."""
    run_interpreter_check("triton_attention_bwd_interpret_check.py", "all backward interpreter checks passed")


# ------------------------------------------------------------------ CPU branch of the op
@pytest.mark.parametrize("kernel_fn,causal,masked,scale", [
    ("softmax", False, False, None), ("softmax", True, True, 0.5), ("relu", False, True, None),
    ("relu", True, False, None)])
def test_opcheck(kernel_fn, causal, masked, scale):
    q, k, v, W, mask = inputs(dtype=torch.float32, masked=masked, requires_grad=True)
    torch.library.opcheck(OP, (q, k, v, W, kernel_fn, causal, scale, mask))


@pytest.mark.parametrize("kernel_fn,causal,masked",
                         [("softmax", False, True), ("relu", True, False)])
def test_backward_op_cpu_branch(kernel_fn, causal, masked):
    """panther::rf_attention_triton_backward on CPU: opcheck and equality with the C++ backward."""
    q, k, v, W, mask = inputs(dtype=torch.float32, masked=masked)
    go = torch.randn(2, 2, 9, 6, generator=torch.Generator().manual_seed(1))
    args = (go, q, k, v, W, kernel_fn, causal, None, mask)
    torch.library.opcheck(torch.ops.panther.rf_attention_triton_backward.default, args)
    got = torch.ops.panther.rf_attention_triton_backward(*args)
    ref = torch.ops.panther.rf_attention_backward(*args, False)
    for a, b in zip(got, ref):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="grad_out"):
        torch.ops.panther.rf_attention_triton_backward(go[:, :, :3], *args[1:])
    # the training op's backward, given what the training op returned (on CPU: the C++ path's
    # empty statistics and states)
    out, stats, *states = torch.ops.panther.rf_attention_triton_train(*args[1:])
    train_args = args + (out, stats, states)
    torch.library.opcheck(torch.ops.panther.rf_attention_triton_train_backward.default, train_args)
    for a, b in zip(torch.ops.panther.rf_attention_triton_train_backward(*train_args), ref):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="states must be the 6 key states"):
        torch.ops.panther.rf_attention_triton_train_backward(*args, out, stats, states[:2])


@pytest.mark.parametrize("kernel_fn,causal,masked",
                         [("softmax", True, True), ("relu", False, False)])
def test_train_op_cpu_branch(kernel_fn, causal, masked):
    """panther::rf_attention_triton_train (the op rf_attention_triton calls when a gradient is
    needed): opcheck, its output and gradients equal the C++ op's on CPU."""
    q, k, v, W, mask = inputs(dtype=torch.float32, masked=masked, requires_grad=True)
    args = (q, k, v, W, kernel_fn, causal, 0.7, mask)
    torch.library.opcheck(torch.ops.panther.rf_attention_triton_train.default, args)
    out, stats, *states = torch.ops.panther.rf_attention_triton_train(*args)
    assert len(states) == 6
    for t in (stats, *states):
        assert t.numel() == 0 and not t.requires_grad
    ref = torch.ops.panther.rf_attention(*args)
    assert torch.equal(out, ref)
    go = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(ta.rf_attention_triton(*args), (q, k, v, W), go),
                    torch.autograd.grad(ref, (q, k, v, W), go)):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kernel_fn,causal", [("softmax", False), ("softmax", True), ("relu", True)])
def test_gradcheck_float64(kernel_fn, causal):
    q, k, v, W, mask = inputs(B=1, L=6, d=4, dv=3, m=5, masked=True, requires_grad=True)
    fn = lambda q, k, v, W: ta.rf_attention_triton(q, k, v, W, kernel_fn, causal, None, mask)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v, W))


@pytest.mark.parametrize("causal", [False, True])
def test_cpu_matches_reference(causal):
    q, k, v, W, mask = inputs(L=11, S=11, masked=True)
    out = ta.rf_attention_triton(q, k, v, W, "softmax", causal, 0.3, mask)
    ref = rf_attention_reference(q, k, v, W, "softmax", causal, 0.3, mask)
    assert rel(out, ref) < 1e-10


def test_validation_errors():
    q, k, v, W, _ = inputs(dtype=torch.float32)
    with pytest.raises(ValueError, match="kernel_fn"):
        ta.rf_attention_triton(q, k, v, W, "tanh")
    with pytest.raises(ValueError, match="scale"):
        ta.rf_attention_triton(q, k, v, W, "softmax", False, -1.0)
    with pytest.raises(ValueError, match="causal"):
        ta.rf_attention_triton(q, k[:, :, :4], v[:, :, :4], W, "softmax", True)
    with pytest.raises(ValueError, match="key_padding_mask"):
        ta.rf_attention_triton(q, k, v, W, "softmax", False, None, torch.zeros(2, 9))


def _stand_in_fla(monkeypatch):
    """A stand-in ``fla.ops.linear_attn.chunk_linear_attn``: flash-linear-attention's contract
    ((B, T, H, K) layout, ``scale``, ``normalize``) written as the explicit causal formula."""
    import types

    def chunk_linear_attn(q, k, v, scale=None, normalize=True, **_):
        a = torch.einsum("bthk,bshk->bhts", q * scale, k).tril()
        o = torch.einsum("bhts,bshv->bthv", a, v)
        return (o / a.sum(-1).transpose(1, 2)[..., None] if normalize else o), None

    mod = types.ModuleType("fla.ops.linear_attn")
    mod.chunk_linear_attn = chunk_linear_attn
    for name in ("fla", "fla.ops"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "fla.ops.linear_attn", mod)


def test_bench_peers_feed_fla_the_same_features(monkeypatch):
    # ``triton_attention_bench --peers`` glues torch feature maps to flash-linear-attention's
    # kernel: with a stand-in that computes fla's documented contract exactly, the glued output
    # must be panther's (layouts, scale and normalisation agree), and every peer row must be timed.
    _stand_in_fla(monkeypatch)
    rows = ta.bench_triton_attention(cases=[("causal", 40, 2, True)], m=32, H=2, d=16,
                                     dtype=torch.float32, device="cpu", long_len=0, peers=True)
    peers = {r["peer"]: r for r in rows if "peer" in r}
    assert set(peers) == {"panther rf_attention_triton", "fla chunk_linear_attn + torch feature maps",
                          "fla chunk_linear_attn alone (features given)"}
    assert not any("note" in r for r in peers.values()), peers
    assert float(peers["fla chunk_linear_attn + torch feature maps"]["rel err vs panther"]) < 1e-5


def test_bench_peers_missing_are_reported(monkeypatch):
    for name in ("performer_pytorch", "fla"):
        monkeypatch.setitem(sys.modules, name, None)   # their imports fail
    rows = ta.bench_triton_attention(cases=[("non-causal", 24, 1, False), ("causal", 24, 1, True)],
                                     m=16, H=1, d=8, dtype=torch.float32, backward=False,
                                     device="cpu", long_len=0, peers=True)
    peers = [(r["case"], r["peer"], r.get("note", "")) for r in rows if "peer" in r]
    assert [p[:2] for p in peers] == [("non-causal L=24 B=1", "panther rf_attention_triton"),
                                      ("non-causal L=24 B=1", "performer-pytorch"),
                                      ("causal L=24 B=1", "panther rf_attention_triton"),
                                      ("causal L=24 B=1", "flash-linear-attention")]
    assert all("not installed" in note for _, peer, note in peers if not peer.startswith("panther"))


def test_kernel_ok_routing():
    q, k, v, W, _ = inputs(dtype=torch.float32)
    assert not ta.kernel_ok(q, k, v, W)            # CPU without the interpreter: the C++ op
    big = torch.randn(ta.MAX_FEATURES + 1, q.shape[-1])
    assert not ta.kernel_ok(q.to("meta"), k.to("meta"), v.to("meta"), big.to("meta"))
    if ta.triton is not None:
        # more (batch, head) pairs than a CUDA grid's second dimension holds: the C++ op
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(ta, "_INTERPRET", True)  # CPU tensors count as served, as in the interpreter
            assert ta.kernel_ok(*(torch.empty(4095, 16, 2, 8) for _ in range(3)), W)
            assert not ta.kernel_ok(*(torch.empty(4096, 16, 2, 8) for _ in range(3)), W)


@pytest.mark.skipif(ta.triton is None, reason="needs triton")
@pytest.mark.parametrize("nseg", [1, 4])
def test_kept_states_restore_under_symbolic_shapes(nseg):
    """The training backward restores the kept causal states under dynamic shapes (opcheck's
    aot_dispatch_dynamic traces it so): a SymBool compared with a bool once raised there."""
    from torch.fx.experimental.proxy_tensor import make_fx

    BH, nchunk, M, DV, nf = 2, 512, 256, 64, 4
    states = (torch.zeros(BH, nchunk, M, DV), torch.zeros(BH, nchunk, M), torch.zeros(BH, nchunk, nf),
              *((torch.zeros(BH, nseg, M, DV), torch.zeros(BH, nseg, M), torch.zeros(BH, nseg, nf))
                if nseg > 1 else (torch.empty(0),) * 3))

    def restored(*saved):
        cs = ta.ChunkStates.restore(saved, saved[0].shape[1] * ta.CHUNK, ta.CHUNK, M // nf)
        return saved[0].new_zeros(()) if cs is None else cs.HS.sum() + 1

    walk_nseg = ta.walk_segments(BH, M, M // nf, nchunk * ta.CHUNK, ta.CHUNK,
                                 torch.device("cpu"))[1]
    expect = 1.0 if (walk_nseg > 1) == (nseg > 1) else 0.0
    assert restored(*states).item() == expect
    traced = make_fx(restored, tracing_mode="symbolic")(*states)
    assert traced(*states).item() == expect


@pytest.mark.skipif(ta.triton is None, reason="needs triton")
@pytest.mark.parametrize("dtype, walk, query_walk", [(torch.bfloat16, 128, (256, 8, 2)),
                                                     (torch.float32, 64, (64, 4, 3))])
def test_walks_take_their_feature_blocks(dtype, walk, query_walk):
    """The causal walks' feature blocks as measured on the H200 (``walk_block``,
    ``backward_params["walk"]`` and ``["walk_stages"]``): half inputs walk wider blocks than the 64
    features the chunk kernels read, and the chunk walk writes its references per chunk-kernel block
    (REF_F); fp32 keeps 64 (wider blocks spill). The chunk kernels themselves keep their blocks."""
    from hopper_compile import record_launches
    from inductor_ext import triton_attention_bwd as tb
    q, k, v, go = (torch.randn(1, 2, 300, 64, dtype=dtype) for _ in range(4))
    W = torch.randn(256, 64)
    launches = record_launches(
        lambda: tb._backward(go, q, k, v, W, "softmax", True, None, None), ta, tb)
    meta = {la.kernel.__name__: la.kwargs for la in launches}
    assert (meta["_causal_state_kernel"]["BLOCK_F"], meta["_causal_state_kernel"]["REF_F"]) == (walk, 64)
    qw = meta["_query_state_kernel"]
    assert (qw["BLOCK_F"], qw["num_warps"], qw["num_stages"]) == query_walk
    assert meta["_causal_out_kernel"]["BLOCK_F"] == meta["_dq_chunk_kernel"]["BLOCK_F"] == 64
    # the non-causal query walk: the same block and warps; half inputs pipeline one stage deeper
    launches = record_launches(
        lambda: tb._backward(go, q, k, v, W, "softmax", False, None, None), ta, tb)
    qw = {la.kernel.__name__: la.kwargs for la in launches}["_query_state_kernel"]
    assert (qw["BLOCK_F"], qw["num_warps"], qw["num_stages"]) == query_walk[:2] + (3,)


@pytest.mark.skipif(ta.triton is None, reason="needs triton")
@pytest.mark.parametrize("dtype, stages", [(torch.bfloat16, (4, 3)), (torch.float32, (3, 3))])
def test_chunk_outputs_pipeline_by_launch(dtype, stages):
    """The causal chunk outputs' pipelining depth as measured on the H200 (``_OUT_STAGES``): half
    inputs pipeline one stage deeper for inference than for the training launch, which also stores
    the statistics; fp32 keeps 3."""
    from hopper_compile import record_launches
    q, W = torch.randn(1, 2, 300, 64, dtype=dtype), torch.randn(256, 64)

    def outputs_stages(stats):
        launches = record_launches(
            lambda: ta._forward(q, q, q, W, "softmax", True, None, None, stats=stats), ta)
        return {la.kernel.__name__: la.kwargs for la in launches}["_causal_out_kernel"]["num_stages"]

    assert (outputs_stages(None), outputs_stages(torch.zeros(2, 3, 300))) == stages


@pytest.mark.skipif(ta.triton is None, reason="needs triton")
def test_walk_block_must_cover_whole_chunk_blocks():
    """A walk block writes one reference into each chunk-kernel block it spans, so it must span
    whole ones."""
    assert ta.walk_block(256, 64, torch.bfloat16, 512) == 256      # clipped to the features
    assert ta.walk_block(256, 64, torch.bfloat16, 32) == 64        # at least the chunk block
    with pytest.raises(ValueError, match="walk_block_f"):
        ta.walk_block(256, 64, torch.bfloat16, 96)


# inputs no kernel may write (STATS: the forward's statistics, which the backward only reads)
_READ_ONLY = {"Q", "K", "V", "GO", "OUT", "W", "WG", "MASK"}


@pytest.mark.skipif(ta.triton is None, reason="needs triton")
def test_inductor_sees_only_the_outputs_written(monkeypatch):
    """torch.compile inlines the kernels through triton_op; Inductor's analysis of which arguments a
    kernel writes then decides what it may reuse. An input it believes written breaks compiled
    training (AOT autograd: 'a leaf Variable that requires grad is being used in an in-place
    operation'), so every launch of the forward and the backward is analysed here, for an sm_90
    target, without a GPU: the written arguments must be outputs only."""
    import triton
    from triton.backends.compiler import GPUTarget
    from inductor_ext import triton_attention_bwd as tb
    tkw = pytest.importorskip("torch._higher_order_ops.triton_kernel_wrap")
    identify = getattr(tkw, "identify_accessed_tensors", None)
    if identify is None:
        pytest.skip("this torch has no identify_accessed_tensors")

    class Hopper:
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)
    monkeypatch.setattr(type(triton.runtime.driver), "active", property(lambda self: Hopper()))
    launches = []

    class Record:  # _launcher(kernel)[grid](*args, **meta), recorded instead of run
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kw: launches.append((self.kernel, args, kw))
    for mod in (ta, tb):
        monkeypatch.setattr(mod, "_launcher", Record)
    q, k, v, go = (torch.randn(1, 2, 200, 64, dtype=torch.bfloat16) for _ in range(4))
    W = torch.randn(256, 64)
    mask = torch.zeros(1, 200, dtype=torch.bool)
    for causal in (False, True):
        stats = torch.zeros(2, 3, 200)
        ta._forward(q, k, v, W, "softmax", causal, None, mask, stats=stats)
        if not causal:   # the feature-blocked query kernel too (bf16 takes the persistent one)
            ta._forward(q, k, v, W, "softmax", causal, None, mask, stats=stats, q_persist=False)
        tb._backward(go, q, k, v, W, "softmax", causal, None, mask, torch.zeros_like(q), stats)
    seen = set()
    for kernel, args, kw in launches:
        kwargs = {**dict(zip(kernel.arg_names, args)),
                  **{key: val for key, val in kw.items() if key not in ("num_warps", "num_stages")}}
        written = {dep.name for dep in identify(kernel, kwargs, {}).read_writes.writes}
        read_only = _READ_ONLY | ({"STATS"} if kernel.fn.__module__ == tb.__name__ else set())
        assert written and not written & read_only, (kernel.fn.__name__, sorted(written))
        seen.add(kernel.fn.__name__)
    assert {"_kv_state_kernel", "_query_kernel", "_query_persistent_kernel", "_causal_out_kernel",
            "_dq_chunk_kernel",
            "_query_state_kernel", "_dkdv_chunk_kernel"} <= seen


# ------------------------------------------------------------------ CUDA (lent H200)
TOL = {torch.float32: 2e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}


@cuda_only
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kernel_fn", ["softmax", "relu"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_cuda_matches_reference(dtype, kernel_fn, causal, masked):
    # odd sizes: tails in L, d, dv, m; enough length for several splits / segments
    q, k, v, W, mask = inputs(B=2, H=3, L=1000, d=48, dv=40, m=100, dtype=dtype, device="cuda",
                              masked=masked)
    W = W.float()
    out = ta.rf_attention_triton(q, k, v, W, kernel_fn, causal, None, mask)
    ref = rf_attention_reference(q.double(), k.double(), v.double(), W.double(), kernel_fn, causal,
                                 None, mask)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert rel(out, ref) < TOL[dtype]


@cuda_only
@pytest.mark.cuda
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_bf16_within_half_percent_of_fp32(causal):
    """Issue [E]'s accuracy bar: bf16 inputs within 0.5% of the fp32 path at equal random
    features (the C++ op on the same values in fp32), at the benchmark's head shape. The
    projection is fp32, as a module holds it: rounding it to bf16 alone would cost about 0.5%
    (the kernels take it in fp16)."""
    q, k, v, W, _ = inputs(B=1, H=4, L=8192, d=64, dv=64, m=256, dtype=torch.float32,
                           device="cuda", masked=False)
    q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
    out = ta.rf_attention_triton(q, k, v, W, "softmax", causal)
    ref = torch.ops.panther.rf_attention(q.float(), k.float(), v.float(), W.float(), "softmax",
                                         causal, None, None)
    assert rel(out, ref) < 5e-3


@cuda_only
@pytest.mark.cuda
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_full_size_shapes_and_splits(causal):
    """The benchmark's head shape (d=64, m=256) at a length that uses many splits/segments; large
    logits (shifted keys, big scale) exercise the running-max rescaling."""
    q, k, v, W, mask = inputs(B=1, H=4, L=8192, d=64, dv=64, m=256, dtype=torch.bfloat16,
                              device="cuda", masked=True, shift=0.5)
    out = ta.rf_attention_triton(q, k, v, W.float(), "softmax", causal, 0.5, mask)
    ref = torch.ops.panther.rf_attention(q.float(), k.float(), v.float(), W.float(), "softmax",
                                         causal, 0.5, mask)
    assert torch.isfinite(out).all()
    assert rel(out, ref) < 3e-2
    # explicit small segments: many more programs, same answer
    out2 = ta._forward(q, k, v, W.float(), "softmax", causal, 0.5, mask, seg=256)
    assert rel(out2, ref) < 3e-2


@cuda_only
@pytest.mark.cuda
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_backward_matches_cpp_op(causal):
    q, k, v, W, mask = inputs(B=2, H=2, L=300, d=32, dv=32, m=64, dtype=torch.float32,
                              device="cuda", masked=True, requires_grad=True)
    go = torch.randn(2, 2, 300, 32, device="cuda")
    g1 = torch.autograd.grad(ta.rf_attention_triton(q, k, v, W, "softmax", causal, None, mask),
                             (q, k, v, W), go)
    g2 = torch.autograd.grad(torch.ops.panther.rf_attention(q, k, v, W, "softmax", causal, None,
                                                            mask), (q, k, v, W), go)
    for a, b in zip(g1, g2):
        assert rel(a, b) < 1e-3


# a Latin-square-like cover of dtype x kernel x causal x mask (each kernel variant compiles anew)
_BWD_CASES = [
    (torch.float32, "softmax", True, True), (torch.bfloat16, "softmax", True, True),
    (torch.bfloat16, "relu", True, False), (torch.float16, "relu", True, True),
    (torch.float16, "softmax", False, True), (torch.bfloat16, "relu", False, True),
    (torch.float32, "relu", False, False), (torch.bfloat16, "softmax", False, False)]


@cuda_only
@pytest.mark.cuda
@pytest.mark.parametrize("dtype,kernel_fn,causal,masked", _BWD_CASES)
def test_cuda_triton_backward_matches_reference(dtype, kernel_fn, causal, masked):
    """The fused backward (projection without grad) vs the float64 C++ backward: odd sizes (tails
    in L, d, dv, m), several segments, rising key norms (the running max moves across segments)."""
    q, k, v, W, mask = inputs(B=2, H=3, L=1000, S=1000 if causal else 700, d=48, dv=40, m=100,
                              dtype=torch.float64, device="cuda", masked=masked)
    k = k * torch.linspace(0.2, 1.2, k.shape[2], device="cuda", dtype=torch.float64)[:, None]
    go = torch.randn(2, 3, 1000, 40, device="cuda", dtype=torch.float64)
    q, k, v, go = (t.to(dtype) for t in (q, k, v, go))
    # the reference multiplies by the projection the kernels multiply by (fp16 for half inputs)
    W_kernel = ta._projection_operand(W.float(), dtype).double()
    ref = torch.ops.panther.rf_attention_backward(go.double(), q.double(), k.double(), v.double(),
                                                  W_kernel, kernel_fn, causal, None, mask,
                                                  False)[:3]
    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
    out = ta.rf_attention_triton(qg, kg, vg, W.float(), kernel_fn, causal, None, mask)
    got = torch.autograd.grad(out, (qg, kg, vg), go)
    for name, a, b in zip(("dq", "dk", "dv"), got, ref):
        assert a.dtype == dtype and torch.isfinite(a).all(), name
        assert rel(a, b) < BWD_TOL[dtype], (name, rel(a, b))
    # the recomputing backward (the plain op's autograd) and explicit launch parameters (small
    # segments / feature blocks, tf32 products) give the same gradients
    from inductor_ext import triton_attention_bwd as tb
    out2 = torch.ops.panther.rf_attention_triton(qg, kg, vg, W.float(), kernel_fn, causal, None,
                                                 mask)
    got2 = torch.autograd.grad(out2, (qg, kg, vg), go)
    checks = [got2]
    if dtype == torch.bfloat16:
        checks.append(tb._backward(go, q, k, v, W.float(), kernel_fn, causal, None, mask, seg=128,
                                   block_f=64, q_warps=4, k_warps=4, stages=1, k_stages=2, tf32=True,
                                   chunk=32))
    for got_ in checks:
        for name, a, b in zip(("dq", "dk", "dv"), got_, ref):
            assert rel(a, b) < BWD_TOL[dtype], (name, rel(a, b))


BWD_TOL = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 5e-2}


@cuda_only
@pytest.mark.cuda
def test_cuda_triton_backward_full_size():
    """The benchmark's head shape (d=64, m=256), bf16, many segments, masks: vs the fp32 C++."""
    q, k, v, W, mask = inputs(B=1, H=4, L=8192, d=64, dv=64, m=256, dtype=torch.bfloat16,
                              device="cuda", masked=True, shift=0.5)
    go = torch.randn_like(q)
    for causal in (False, True):
        ref = torch.ops.panther.rf_attention_backward(go.float(), q.float(), k.float(), v.float(),
                                                      W.bfloat16().float(), "softmax", causal, 0.5,
                                                      mask, False)
        got = torch.ops.panther.rf_attention_triton_backward(go, q, k, v, W.float(), "softmax",
                                                             causal, 0.5, mask)
        out, stats, *states = torch.ops.panther.rf_attention_triton_train(
            q, k, v, W.float(), "softmax", causal, 0.5, mask)
        assert states[0].numel() > 0   # the forward's key states are kept
        got2 = torch.ops.panther.rf_attention_triton_backward(go, q, k, v, W.float(), "softmax",
                                                              causal, 0.5, mask, out, stats)
        got3 = torch.ops.panther.rf_attention_triton_train_backward(
            go, q, k, v, W.float(), "softmax", causal, 0.5, mask, out, stats, states)
        for name, a, a2, a3, b in zip(("dq", "dk", "dv"), got, got2, got3, ref):
            assert torch.isfinite(a).all() and rel(a, b) < 5e-2, (causal, name, rel(a, b))
            assert torch.isfinite(a2).all() and rel(a2, b) < 5e-2, (causal, name, rel(a2, b))
            # the saved states are the ones the backward would recompute, bit for bit
            assert torch.equal(a3, a2), (causal, name, rel(a3, a2))


@cuda_only
@pytest.mark.cuda
def test_cuda_backward_fills_no_gradient_for_the_kept_states():
    """Autograd hands the training op's statistics and key states no zero-filled gradient (they
    are not differentiable): no fill during the backward is as large as the states."""
    q, k, v, W, _ = inputs(B=1, H=2, L=1024, d=64, dv=64, m=256, dtype=torch.bfloat16,
                           device="cuda", requires_grad=True)
    out, stats, *states = torch.ops.panther.rf_attention_triton_train(
        q, k, v, W, "softmax", True, None, None)
    state_numel = states[0].numel()
    assert state_numel >= 4 * q.numel()
    y = ta.rf_attention_triton(q, k, v, W, "softmax", True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                record_shapes=True) as prof:
        y.backward(torch.randn_like(y))
    fills = [(e.name, e.input_shapes) for e in prof.events()
             if e.name in ("aten::fill_", "aten::zero_") and e.input_shapes and e.input_shapes[0]
             and math.prod(e.input_shapes[0]) >= state_numel]
    assert not fills, fills
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))


@cuda_only
@pytest.mark.cuda
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_compile_backward(causal):
    """torch.compile of forward + backward through the fused backward matches eager."""
    q, k, v, W, mask = inputs(B=1, H=2, L=256, d=64, dv=64, m=128, dtype=torch.bfloat16,
                              device="cuda", masked=True)
    W = W.float()
    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))

    def loss(q, k, v):
        out = ta.rf_attention_triton(q, k, v, W, "softmax", causal, None, mask)
        return out.float().square().sum()

    got = torch.autograd.grad(torch.compile(loss, fullgraph=True)(qg, kg, vg), (qg, kg, vg))
    ref = torch.autograd.grad(loss(qg, kg, vg), (qg, kg, vg))
    for a, b in zip(got, ref):
        assert rel(a, b) < 1e-2


@cuda_only
@pytest.mark.cuda
def test_cuda_compile_inlines_op():
    q, k, v, W, mask = inputs(B=1, H=2, L=256, d=64, dv=64, m=128, dtype=torch.bfloat16,
                              device="cuda", masked=True)
    W = W.float()
    fn = torch.compile(lambda *a: ta.rf_attention_triton(*a, "softmax", True, None, mask),
                       fullgraph=True)
    out = fn(q, k, v, W)
    ref = ta.rf_attention_triton(q, k, v, W, "softmax", True, None, mask)
    assert rel(out, ref) < 1e-2


def test_autocast_cpu_casts_floating_inputs_not_the_mask():
    """The wrapper's autocast (``inductor_ext._autocast``): q, k, v and the projection in the autocast dtype,
    the bool mask untouched; the CPU branch then runs in bf16."""
    q, k, v, W, _ = inputs(B=2, H=2, L=40, d=16, dv=16, m=32, dtype=torch.float32, device="cpu")
    mask = torch.zeros(2, 40, dtype=torch.bool)
    mask[1, :7] = True
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ta.rf_attention_triton(q, k, v, W, key_padding_mask=mask)
    assert out.dtype == torch.bfloat16
    ref = rf_attention_reference(q.double(), k.double(), v.double(), W.double(), key_padding_mask=mask)
    assert rel(out, ref) < 3e-2


@cuda_only
@pytest.mark.cuda
def test_cuda_autocast():
    q, k, v, W, _ = inputs(B=1, H=2, L=200, d=32, dv=32, m=64, dtype=torch.float32, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = ta.rf_attention_triton(q, k, v, W)
    assert out.dtype == torch.bfloat16
    ref = rf_attention_reference(q.double(), k.double(), v.double(), W.double())
    assert rel(out, ref) < 3e-2


@cuda_only
@pytest.mark.cuda
@pytest.mark.parametrize("causal,masked", [(False, False), (True, True)])
def test_cuda_opcheck(causal, masked):
    """Fake tensors / AOT dispatch through the Triton branch (wrap_triton) on CUDA."""
    q, k, v, W, mask = inputs(B=1, H=2, L=130, d=32, dv=16, m=40, dtype=torch.float32,
                              device="cuda", masked=masked, requires_grad=True)
    torch.library.opcheck(OP, (q, k, v, W, "softmax", causal, None, mask))


@cuda_only
@pytest.mark.cuda
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_opcheck_training_ops(causal):
    """The training op's Triton branch (its key states included: 600 causal tokens make three walk
    segments) and its backward through fake tensors / AOT dispatch; the backward given the states
    equals the one that recomputes them."""
    q, k, v, W, mask = inputs(B=1, H=2, L=600, d=32, dv=16, m=40, dtype=torch.float32,
                              device="cuda", masked=True)
    args = (q, k, v, W, "softmax", causal, None, mask)
    torch.library.opcheck(torch.ops.panther.rf_attention_triton_train.default, args)
    out, stats, *states = torch.ops.panther.rf_attention_triton_train(*args)
    assert states[0].numel() > 0
    go = torch.randn_like(out)
    train_args = (go, *args, out, stats, states)
    torch.library.opcheck(torch.ops.panther.rf_attention_triton_train_backward.default, train_args)
    got = torch.ops.panther.rf_attention_triton_train_backward(*train_args)
    ref = torch.ops.panther.rf_attention_triton_backward(go, *args, out, stats)
    for a, b in zip(got, ref):
        assert torch.equal(a, b)
