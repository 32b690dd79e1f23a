"""The fused Triton sketched-linear kernels (inductor_ext/triton_linear.py).

CPU CI: the kernels' arithmetic in Triton's interpreter (one subprocess, TRITON_INTERPRET=1), the
triton_ops' CPU branch through opcheck / gradcheck, and the autotune configs' shared-memory budget.
CUDA (the lent H200, ``pytest -m cuda``): odd shapes in fp16/bf16/fp32 against float64, every
autotune config launching, and Inductor inlining the kernel.
"""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import panther  # noqa: F401
from inductor_ext import triton_linear as tlin
from panther.ops import sketched_linear_reference
from interpret_common import run_interpreter_check  # tests/ is on sys.path

FWD = torch.ops.panther.sketched_linear_triton_fwd.default
BWD = torch.ops.panther.sketched_linear_triton_bwd.default
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def factors(L, d_in, k, d_out, lead=(4,), dtype=torch.float64, device="cpu", bias=True, requires_grad=False,
            u_grad=False, seed=0):
    g = torch.Generator(device=device).manual_seed(seed + 1000 * L + 100 * d_in + 10 * k + d_out)
    mk = lambda *s, rg=requires_grad: torch.randn(*s, generator=g, device=device, dtype=dtype).requires_grad_(rg)  # noqa: E731,E501
    return (mk(*lead, d_in), mk(L, d_in, k), mk(L, k, d_out), mk(L, k, d_out, rg=u_grad), mk(L, d_in, k, rg=u_grad),
            mk(d_out) if bias else None)


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


# the production row bounds (the autouse fixture below lifts them; _real_row_bounds puts them back)
_FP32_MIN_ROWS = tlin.CUDA_FP32_FUSED_MIN_ROWS
_HALF_ANY_ROWS_WIDTH = tlin.CUDA_HALF_ANY_ROWS_MAX_WIDTH
_PADDED_MIN_ROWS = tlin.CUDA_PADDED_FORWARD_MIN_ROWS


def _real_row_bounds(monkeypatch):
    monkeypatch.setattr(tlin, "CUDA_FP32_FUSED_MIN_ROWS", _FP32_MIN_ROWS)
    monkeypatch.setattr(tlin, "CUDA_HALF_ANY_ROWS_MAX_WIDTH", _HALF_ANY_ROWS_WIDTH)
    monkeypatch.setattr(tlin, "CUDA_PADDED_FORWARD_MIN_ROWS", _PADDED_MIN_ROWS)


@pytest.fixture(autouse=True)
def _fused_at_any_rows(monkeypatch):
    """The CUDA tests' small calls run the fused kernels at any row count (production sends calls below
    its row bounds to cuBLAS: ``test_cuda_below_the_row_bounds_takes_the_gemms``)."""
    monkeypatch.setattr(tlin, "CUDA_FP32_FUSED_MIN_ROWS", 0)
    monkeypatch.setattr(tlin, "CUDA_HALF_ANY_ROWS_MAX_WIDTH", 1 << 62)
    monkeypatch.setattr(tlin, "CUDA_PADDED_FORWARD_MIN_ROWS", 0)


# ------------------------------------------------------------------ interpreter (CPU CI)
@pytest.mark.skipif(tlin.triton is None, reason="needs triton")
def test_kernel_arithmetic_in_triton_interpreter():
    """Tails in every dimension, k=1, L=2/3, bias or not, fp32/bf16/fp16, 1-D/3-D input, forward and
    backward kernels: all against float64, outputs NaN-poisoned so unwritten elements fail."""
    run_interpreter_check("triton_interpret_check.py", "ALL OK")


# ------------------------------------------------------------------ CPU branch of the ops
@pytest.mark.parametrize("lead,bias", [((5,), True), ((2, 3), False), ((), True)], ids=["2d-bias", "3d", "1d-bias"])
def test_opcheck_fwd(bias, lead):
    args = factors(2, 6, 3, 5, lead=lead, dtype=torch.float32, bias=bias, requires_grad=True)
    torch.library.opcheck(FWD, args)


@pytest.mark.parametrize("with_grad_xA", [True, False])
def test_opcheck_bwd(with_grad_xA):
    _, S1s, S2s, U1s, U2s, _ = factors(2, 6, 3, 5, dtype=torch.float32)
    g = torch.randn(2, 3, 5)
    gxa = torch.randn(2, 3, 12) if with_grad_xA else None
    torch.library.opcheck(BWD, (g, gxa, S1s, S2s, U1s, U2s))


@pytest.mark.parametrize("needs", [(True, True, True, True), (False, False, True, True), (True, True, False, False)],
                         ids=["all", "S2-db", "dx-U1"])
def test_opcheck_grads(needs):
    _, S1s, S2s, U1s, U2s, _ = factors(2, 6, 3, 5, dtype=torch.float32)
    g, gxa, xA = torch.randn(2, 3, 5), torch.randn(2, 3, 12), torch.randn(2, 3, 12)
    torch.library.opcheck(torch.ops.panther.sketched_linear_triton_grads, (g, gxa, xA, S1s, S2s, U1s, U2s, *needs))
    dx, dxA, dB, db = torch.ops.panther.sketched_linear_triton_grads(g, None, xA, S1s, S2s, U1s, U2s, *needs)
    rows = (6 if needs[1] else 0) + (6 if needs[2] else 0)
    assert dx.shape == ((2, 3, 6) if needs[0] else (0,)) and dxA.shape == (2, 3, 12)
    assert dB.shape == (rows, 5) and db.shape == ((5,) if needs[3] else (0,))


@pytest.mark.parametrize("lead,bias", [((5,), True), ((2, 3), False), ((), True)], ids=["2d-bias", "3d", "1d-bias"])
def test_gradcheck_float64(bias, lead):
    args = factors(2, 6, 3, 5, lead=lead, bias=bias, requires_grad=True, u_grad=True)
    assert torch.autograd.gradcheck(tlin.sketched_linear_triton, args)


@pytest.mark.parametrize("needs", ["x", "S1s", "S2s", "bias", "x,S2s", "S1s,U2s", "U1s,S2s,bias"])
def test_partial_gradients_match_reference(needs):
    """Each subset of requires_grad takes its own branch of the backward (ones column, joint GEMMs)."""
    names = ["x", "S1s", "S2s", "U1s", "U2s", "bias"]
    args = list(factors(2, 7, 3, 6, lead=(3, 4)))
    want = [n in needs.split(",") for n in names]
    args = [a.requires_grad_(w) for a, w in zip(args, want)]
    gy = torch.randn(3, 4, 6, dtype=torch.float64)
    inputs = [a for a, w in zip(args, want) if w]
    got = torch.autograd.grad(tlin.sketched_linear_triton(*args), inputs, gy)
    ref = torch.autograd.grad(sketched_linear_reference(*args), inputs, gy)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_matches_cpp_op_and_reference():
    args = factors(3, 17, 4, 11, lead=(2, 5))
    y = tlin.sketched_linear_triton(*args)
    torch.testing.assert_close(y, torch.ops.panther.sketched_linear(*args), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y, sketched_linear_reference(*args), rtol=1e-10, atol=1e-10)
    y_fwd, xA = FWD(*args)
    assert xA.shape == (2, 5, 24)


def test_non_contiguous_input_and_empty_batch():
    _, *rest = factors(2, 6, 3, 5)
    xt = torch.randn(6, 7, dtype=torch.float64).t()
    torch.testing.assert_close(tlin.sketched_linear_triton(xt, *rest), sketched_linear_reference(xt, *rest))
    assert tlin.sketched_linear_triton(torch.empty(0, 6, dtype=torch.float64), *rest).shape == (0, 5)


def test_backward_flops_are_six_nlk_plus_bias_column():
    """dx, dS1s, dS2s cost 6·N·L·k·(d_in+d_out); db rides in the dS2 GEMM as one more row (2·N·d_out)."""
    N, L, d_in, k, d_out = 64, 2, 48, 4, 40
    x, S1s, S2s, U1s, U2s, b = factors(L, d_in, k, d_out, lead=(N,), dtype=torch.float32, requires_grad=True)
    y = tlin.sketched_linear_triton(x, S1s, S2s, U1s, U2s, b)
    with FlopCounterMode(display=False) as counter:
        y.backward(torch.ones_like(y))
    assert counter.get_total_flops() == 6 * N * L * k * (d_in + d_out) + 2 * N * d_out


@pytest.mark.parametrize("device,op", [("cuda", "sketched_linear_fwd"), ("cpu", "sketched_linear_triton_fwd")])
def test_gpu_calls_the_kernels_do_not_serve_take_the_cpp_op(monkeypatch, device, op):
    """A GPU call the fused kernel does not serve (here fp32 below the row bound) runs the C++ op itself:
    the same GEMMs, less Python per call; a CPU call goes through the Triton op's CPU branch. Fake
    tensors: no GPU needed (the served GPU calls: ``test_cuda_below_the_row_bounds_takes_the_gemms``)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func._opname)
            return func(*args, **(kwargs or {}))

    _real_row_bounds(monkeypatch)
    seen = []
    with FakeTensorMode():
        args = [torch.empty(s, device=device) for s in
                ((4, 40), (1, 40, 4), (1, 4, 24), (1, 4, 24), (1, 40, 4), (24,))]
        with Ops():
            y = tlin.sketched_linear_triton(*args)
    assert y.shape == (4, 24) and y.device.type == device
    # the C++ op reaches the dispatcher as its forward, panther::sketched_linear_fwd
    assert op in seen and ({"sketched_linear_fwd", "sketched_linear_triton_fwd"} - {op}).isdisjoint(seen), seen


def test_autocast_cpu_bfloat16():
    args = [a.float() if a is not None else None for a in factors(1, 32, 4, 16)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = tlin.sketched_linear_triton(*args)
    assert y.dtype == torch.bfloat16
    ref = sketched_linear_reference(*args)
    assert rel(y, ref) < 3e-2


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_cpu_branch(backend, monkeypatch):
    """Inductor on CPU decomposes the triton_op's body: the torch branch, same numbers. Compiled in one graph
    before any eager call: with no Autotuner built yet, routing the call must not build one while Dynamo
    traces (its constructor reads Triton's knobs through a C extension Dynamo cannot trace)."""
    monkeypatch.setattr(tlin, "_AUTOTUNERS", {})
    args = factors(2, 9, 3, 7, dtype=torch.float32, lead=(5,))
    torch._dynamo.reset()
    fn = torch.compile(tlin.sketched_linear_triton, backend=backend, fullgraph=True)
    torch.testing.assert_close(fn(*args), sketched_linear_reference(*args), rtol=1e-5, atol=1e-5)


def test_bad_arguments_raise():
    x, S1s, S2s, U1s, U2s, b = factors(2, 6, 3, 5)
    with pytest.raises(ValueError, match="in_features=6"):
        tlin.sketched_linear_triton(x[..., :5], S1s, S2s, U1s, U2s, b)
    with pytest.raises(ValueError, match="U2s must be"):
        tlin.sketched_linear_triton(x, S1s, S2s, U1s, U2s[:, :, :2], b)
    with pytest.raises(ValueError, match="bias must be"):
        tlin.sketched_linear_triton(x, S1s, S2s, U1s, U2s, b[:3])
    with pytest.raises(TypeError, match="S2s must have x's dtype"):
        tlin.sketched_linear_triton(x, S1s, S2s.float(), U1s, U2s, b)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        tlin.sketched_linear_triton([1.0] * 6, S1s, S2s, U1s, U2s, b)


# ------------------------------------------------------------------ autotune configs
@pytest.mark.skipif(tlin.triton is None, reason="needs triton")
@pytest.mark.parametrize("elem_size", [2, 4])
@pytest.mark.parametrize("h_pad", [16, 32, 64, 128])
def test_every_config_fits_hopper_shared_memory(h_pad, elem_size):
    configs = tlin.kernel_configs(h_pad, elem_size)
    assert configs, "no config for a rank the fused kernel accepts"
    for c in configs:
        kw = c.kwargs
        assert tlin.smem_bytes(kw["BLOCK_M"], kw["BLOCK_K"], kw["BLOCK_N"], c.num_stages, h_pad,
                               elem_size) <= tlin.SMEM_LIMIT == 227 * 1024
        assert min(kw["BLOCK_M"], kw["BLOCK_K"], kw["BLOCK_N"]) >= 16  # tl.dot's minimum


@pytest.mark.skipif(tlin.triton is None, reason="needs triton")
def test_measured_best_configs_are_candidates_that_fit():
    """A bucket with a measured best config tunes over that one config, which must be one of the
    candidates and fit the shared-memory and register budgets like them."""
    for (h_pad, elem_size), (bm, bk, bn, warps, stages) in tlin._MEASURED_BEST.items():
        assert (bm, bk, bn, warps, stages) in tlin._CANDIDATES
        assert any((c.kwargs["BLOCK_M"], c.kwargs["BLOCK_K"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
                   == (bm, bk, bn, warps, stages) for c in tlin.kernel_configs(h_pad, elem_size))


# ------------------------------------------------------------------ CUDA (the lent H200)
@pytest.mark.cuda
@cuda_only
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1.5e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("shape", [(1, 1000, 5, 333, (37,)), (2, 1000, 5, 333, (3, 1001)), (1, 257, 64, 129, (515,))],
                         ids=["N37", "L2_3d", "k64"])
@pytest.mark.parametrize("split", [False, True], ids=["fused", "split"])
def test_cuda_odd_shapes_against_float64(dtype, tol, shape, split, monkeypatch):
    L, d_in, k, d_out, lead = shape
    if split:   # every output above the threshold: the forward in two launches (split_chain)
        monkeypatch.setattr(tlin, "SPLIT_MIN_OUTPUT", 0)
        monkeypatch.setattr(tlin, "SPLIT_ELEMENT_SIZES", (2, 4))
    args = factors(L, d_in, k, d_out, lead=lead, dtype=dtype, device="cuda")
    ref = sketched_linear_reference(*[a.double() if a is not None else None for a in args])
    prev = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32: ieee dots, so 1e-5 is meaningful
        y, xA = FWD(*args)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    assert y.dtype == dtype and y.shape == (*lead, d_out)
    assert rel(y, ref) < tol
    from panther.ops.linear import concat_factors
    A, _ = concat_factors(*[a.double() for a in args[1:5]])
    assert rel(xA, args[0].double() @ A) < tol


@pytest.mark.cuda
@cuda_only
@pytest.mark.parametrize("dtype,splits", [(torch.bfloat16, True), (torch.float32, False)])
def test_cuda_eager_call_captured_in_a_cuda_graph_takes_the_split(monkeypatch, dtype, splits):
    """A replayed graph pays no Python per launch, so a half-precision eager call under capture takes
    the two-launch forward (a plain eager call keeps one launch); fp32 keeps one launch. The replay
    gives the eager call's output. The eager call is the only warm-up, as a user's would be: nothing
    may autotune under capture (fp32 took the split here and autotuned its first launch, which
    failed the capture)."""
    monkeypatch.setattr(tlin, "SPLIT_MIN_OUTPUT", 0)
    calls = []
    split_chain = tlin.split_chain
    monkeypatch.setattr(tlin, "split_chain", lambda *a, **kw: calls.append(1) or split_chain(*a, **kw))
    args = factors(1, 1000, 5, 333, lead=(37,), dtype=dtype, device="cuda")
    with torch.no_grad():
        y_eager = tlin.sketched_linear_triton(*args)
        assert not calls
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y_graph = tlin.sketched_linear_triton(*args)
        graph.replay()
    torch.cuda.synchronize()
    assert bool(calls) == splits
    assert rel(y_graph, y_eager) < 1e-2


@pytest.mark.cuda
@cuda_only
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_cuda_gradients_against_float64(dtype, tol):
    args = factors(2, 1000, 5, 333, lead=(37,), dtype=dtype, device="cuda", requires_grad=True, u_grad=True)
    y = tlin.sketched_linear_triton(*args)
    gy = torch.randn_like(y)
    got = torch.autograd.grad(y, args, gy)
    ref_in = [a.detach().double().requires_grad_(True) for a in args]
    want = torch.autograd.grad(sketched_linear_reference(*ref_in), ref_in, gy.double())
    for a, b in zip(got, want):
        assert rel(a, b) < tol


_WIDE = 2 * _HALF_ANY_ROWS_WIDTH   # a half-precision width with a row bound


@pytest.mark.parametrize("dtype,width,rank,direction,bound", [
    (torch.float32, 9, 6, "forward", _FP32_MIN_ROWS),
    (torch.bfloat16, _WIDE, 32, "forward", _WIDE * tlin.CUDA_HALF_FUSED_MIN_ROWS_PER_FEATURE["forward"]),
    (torch.float16, _WIDE, 32, "backward", _WIDE * tlin.CUDA_HALF_FUSED_MIN_ROWS_PER_FEATURE["backward"]),
    (torch.bfloat16, 64, 6, "forward", _PADDED_MIN_ROWS)])
@pytest.mark.parametrize("below", [True, False])
def test_row_bound_on_symbolic_rows_is_a_guard(monkeypatch, dtype, width, rank, direction, bound, below):
    """With a dynamic batch a row bound is decided by the row count's hint and recorded as a shape guard
    (a compiled graph recompiles across it). Half precision with whole 16-column halves, at widths with
    no bound, adds no guard."""
    from torch._dynamo.source import ConstantSource
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv

    _real_row_bounds(monkeypatch)
    rows = int(bound) - 1 if below else int(bound)
    env = ShapeEnv()
    with FakeTensorMode(shape_env=env):   # CUDA example values, no GPU needed
        n = env.create_symintnode(env.create_symbol(rows, ConstantSource("n"), dynamic_dim=DimDynamic.DYNAMIC),
                                  hint=rows)
        narrow = torch.empty(n, _HALF_ANY_ROWS_WIDTH, device="cuda", dtype=torch.bfloat16)
        assert tlin._kernel_ok(narrow, 32, direction=direction) is True
        assert not env.guards
        fused = tlin._kernel_ok(torch.empty(n, width, device="cuda", dtype=dtype), rank, direction=direction)
    assert fused is (not below)
    assert len(env.guards) == 1


def test_row_bound_takes_the_wider_side_of_the_layer(monkeypatch):
    """A layer is as wide as its wider side: few rows of a narrow input into a wide output take the GEMMs,
    forward (the backend's route and ``_served``) and backward, and enough rows take the kernels."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from inductor_ext.kernel_routing import linear_routed

    _real_row_bounds(monkeypatch)
    wide_rows = int(_WIDE * tlin.CUDA_HALF_FUSED_MIN_ROWS_PER_FEATURE["forward"])
    with FakeTensorMode():
        def layer(rows):   # 64 -> _WIDE, rank 32 (whole 16-column halves)
            mk = lambda *shape: torch.empty(*shape, device="cuda", dtype=torch.bfloat16)  # noqa: E731
            return mk(rows, 64), mk(1, 64, 16), mk(1, 16, _WIDE), mk(1, 16, _WIDE), mk(1, 64, 16), mk(_WIDE)
        x, S1s, S2s, U1s, U2s, b = layer(8)
        assert tlin._kernel_ok(x, 32)   # by x's own width alone it would be served
        assert not linear_routed(x, S1s, S2s, U1s, U2s, b)
        assert not tlin._served(x.new_empty(8, _WIDE), S1s, S2s, "backward")
        assert linear_routed(*layer(wide_rows))


@pytest.mark.cuda
@cuda_only
def test_cuda_below_the_row_bounds_takes_the_gemms(monkeypatch):
    """On a GPU the fused kernels run from their row bounds (x's leading dimensions together) and
    cuBLAS's GEMMs below, forward and backward: fp32 from ``CUDA_FP32_FUSED_MIN_ROWS`` rows; half
    precision at any rows up to ``CUDA_HALF_ANY_ROWS_MAX_WIDTH`` features and from a number of rows per
    feature above it, and narrow (padded) ranks from ``CUDA_PADDED_FORWARD_MIN_ROWS`` rows."""
    _real_row_bounds(monkeypatch)
    launches = []
    chain, grads = tlin.lowrank_chain, tlin.grad_pass
    monkeypatch.setattr(tlin, "lowrank_chain", lambda *a, **kw: launches.append("fwd") or chain(*a, **kw))
    monkeypatch.setattr(tlin, "grad_pass", lambda *a, **kw: launches.append("bwd") or grads(*a, **kw))
    wide_rows = int(_WIDE * tlin.CUDA_HALF_FUSED_MIN_ROWS_PER_FEATURE["forward"])
    for lead, d_in, k, dtype, fused in [((_FP32_MIN_ROWS - 1,), 64, 4, torch.float32, False),
                                        ((2, _FP32_MIN_ROWS // 2), 64, 4, torch.float32, True),
                                        ((37,), 64, 16, torch.bfloat16, True),
                                        ((37,), _WIDE, 16, torch.bfloat16, False),
                                        ((wide_rows - 1,), _WIDE, 16, torch.float16, False),
                                        ((2, wide_rows // 2), _WIDE, 16, torch.bfloat16, True),
                                        ((_PADDED_MIN_ROWS - 1,), 64, 4, torch.bfloat16, False),
                                        ((_PADDED_MIN_ROWS,), 64, 4, torch.bfloat16, True)]:
        args = factors(1, d_in, k, 48, lead=lead, dtype=dtype, device="cuda", requires_grad=True)
        y = tlin.sketched_linear_triton(*args)
        torch.autograd.grad(y, [a for a in args if a.requires_grad], torch.ones_like(y))
        if fused:   # the forward's launch, then the backward's
            assert launches[:1] == ["fwd"] and len(launches) >= 2, (lead, dtype, launches)
        else:
            assert not launches, (lead, dtype, launches)
        launches.clear()


@pytest.mark.cuda
@cuda_only
@pytest.mark.parametrize("h_pad,dtype", [(16, torch.bfloat16), (32, torch.bfloat16), (64, torch.bfloat16),
                                         (128, torch.bfloat16), (16, torch.float32), (64, torch.float32)])
def test_cuda_every_autotune_config_launches(h_pad, dtype):
    """Each config of a bucket compiles, fits the device's shared memory and computes the right thing."""
    M, D_IN, D_OUT, H = 300, 515, 389, h_pad - 3
    dev = "cuda"
    X, FL, FH = (torch.randn(s, device=dev, dtype=dtype) for s in ((M, D_IN), (D_IN, H), (D_IN, H)))
    GL, GH = (torch.randn(H, D_OUT, device=dev, dtype=dtype) for _ in range(2))
    bias = torch.randn(D_OUT, device=dev, dtype=dtype)
    P_ref = X.double() @ torch.cat([FL, FH], 1).double()
    for c in tlin.kernel_configs(h_pad, X.element_size()):
        cfg = dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
        out = (torch.full((M, D_OUT), float("nan"), device=dev, dtype=dtype),
               torch.full((M, 2 * H), float("nan"), device=dev, dtype=dtype))
        Y, P = tlin.lowrank_chain(X, FL, FH, GL, GH, bias=bias, alpha_y=0.5, config=cfg, out=out)
        Y_ref = 0.5 * P.double() @ torch.cat([GL, GH], 0).double() + bias.double()
        tol = 2e-2 if dtype != torch.float32 else 2e-3  # fp32 may use tf32 here
        assert rel(P, P_ref) < tol, cfg
        assert rel(Y, Y_ref) < tol, cfg


@pytest.mark.cuda
@cuda_only
def test_inductor_inlines_the_triton_kernel(monkeypatch):
    from torch._inductor.utils import run_and_get_code

    monkeypatch.setattr(tlin, "_AUTOTUNERS", {})  # compiled before any eager call has built an Autotuner

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            S1s, S2s, U1s, U2s, bias = factors(1, 1000, 5, 333, lead=(), dtype=torch.bfloat16, device="cuda")[1:]
            self.S1s, self.S2s, self.bias = (torch.nn.Parameter(t) for t in (S1s, S2s, bias))
            self.register_buffer("U1s", U1s)
            self.register_buffer("U2s", U2s)

        def forward(self, x):
            return torch.relu(tlin.sketched_linear_triton(x, self.S1s, self.S2s, self.U1s, self.U2s, self.bias))

    net = Net()
    x = torch.randn(37, 1000, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(net, backend="inductor", fullgraph=True)
    (y,), code = run_and_get_code(lambda: (compiled(x),))
    src = "\n".join(code)
    assert "_sketched_linear_chain_kernel" in src
    assert "torch.ops.panther.sketched_linear_triton_fwd" not in src  # inlined, not an opaque op call
    assert rel(y, net(x)) < 1e-2
    # the backward graph (compiled with the forward or at the first backward) runs it for dx too
    _, code_bwd = run_and_get_code(lambda: y.sum().backward())
    assert sum("_sketched_linear_chain_kernel" in c for c in code + code_bwd) >= 2
    assert x.grad is not None and torch.isfinite(x.grad).all()


# ------------------------------------------------------------------ the backend's kernel routing
def _routed(gm, serves):
    """``use_triton_kernels(gm)`` with CUDA reported present and ``serves`` in place of the linear route's
    check (its CUDA-only conditions); returns how many nodes moved."""
    from unittest import mock

    from inductor_ext import kernel_routing

    route = kernel_routing._ROUTES["sketched_linear"]
    with mock.patch.object(torch.cuda, "is_available", lambda: True), \
            mock.patch.dict(kernel_routing._ROUTES, {"sketched_linear": (serves, route[1])}):
        return kernel_routing.use_triton_kernels(gm)


@pytest.mark.parametrize("bias_as", ["positional", "keyword"])
def test_backend_routes_sketched_linear_to_the_triton_twin(bias_as):
    """A ``panther.sketched_linear`` node becomes ``sketched_linear_triton_fwd(...)[0]``, bias passed
    either way; the rewritten graph computes the same (the twin's CPU branch)."""
    x, S1s, S2s, U1s, U2s, b = factors(2, 9, 3, 7, dtype=torch.float32)

    def fn(x, S1s, S2s, U1s, U2s, b):
        op = torch.ops.panther.sketched_linear
        if bias_as == "positional":
            return torch.relu(op(x, S1s, S2s, U1s, U2s, b))
        return torch.relu(op(x, S1s, S2s, U1s, U2s, bias=b))

    gm = torch.fx.symbolic_trace(fn)
    moved = _routed(gm, lambda gm, n: True)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert moved == 1 and FWD in targets
    assert torch.ops.panther.sketched_linear not in targets
    args = (x, S1s, S2s, U1s, U2s, b)
    torch.testing.assert_close(gm(*args), fn(*args), rtol=1e-6, atol=1e-6)


def test_backend_keeps_the_cpp_linear_where_the_kernels_do_not_serve(monkeypatch):
    """The route's check declines CPU tensors, float32 below the GPU kernel's row bound and a rank above
    its bound. Under an ambient CUDA autocast the node's inputs are first cast in the graph, as the C++
    op's autocast kernel would cast them (the twins have none), then routed; a graph that opens an autocast
    block itself keeps the C++ op."""
    from inductor_ext.kernel_routing import _linear_ok, linear_routed

    _real_row_bounds(monkeypatch)
    x, S1s, S2s, U1s, U2s, b = factors(1, 9, 3, 7, dtype=torch.float32)
    assert not linear_routed(x, S1s, S2s, U1s, U2s, b)   # CPU tensors
    with torch._subclasses.fake_tensor.FakeTensorMode():   # CUDA example values, no GPU needed
        def cuda(dtype, k=16, d_in=9, d_out=7, rows=4):
            mk = lambda *shape: torch.empty(*shape, device="cuda", dtype=dtype)  # noqa: E731
            return [mk(rows, d_in), mk(1, d_in, k), mk(1, k, d_out), mk(1, k, d_out), mk(1, d_in, k), mk(d_out)]
        # the fused kernel itself serves all of them (its CPU checks run in the interpreter); the route
        # sends half precision at 2Lk <= CUDA_FUSED_MAX_RANK, and fp32 from CUDA_FP32_FUSED_MIN_ROWS rows
        assert linear_routed(*cuda(torch.bfloat16)) and linear_routed(*cuda(torch.float16))
        assert not linear_routed(*cuda(torch.float32))
        assert linear_routed(*cuda(torch.float32, rows=_FP32_MIN_ROWS))
        # wide half-precision layers from their row bound
        wide_rows = int(_WIDE * tlin.CUDA_HALF_FUSED_MIN_ROWS_PER_FEATURE["forward"])
        assert not linear_routed(*cuda(torch.bfloat16, d_in=_WIDE, rows=wide_rows - 1))
        assert linear_routed(*cuda(torch.bfloat16, d_in=_WIDE, rows=wide_rows))
        # ranks with padded halves from their own bound
        assert not linear_routed(*cuda(torch.bfloat16, k=3))
        assert linear_routed(*cuda(torch.bfloat16, k=3, rows=_PADDED_MIN_ROWS))
        assert not linear_routed(*cuda(torch.bfloat16, k=tlin.CUDA_FUSED_MAX_RANK))
        mixed = cuda(torch.bfloat16)
        mixed[-1] = mixed[-1].float()
        assert not linear_routed(*mixed)

    def fn(x, S1s, S2s, U1s, U2s, b):
        return torch.ops.panther.sketched_linear(x, S1s, S2s, U1s, U2s, b)

    gm = torch.fx.symbolic_trace(fn)
    for n in gm.graph.nodes:   # the example values Dynamo records
        if n.op == "placeholder":
            n.meta["example_value"] = dict(zip(["x", "S1s", "S2s", "U1s", "U2s", "b"], (x, S1s, S2s, U1s, U2s, b)))[n.target]
    assert _routed(gm, _linear_ok) == 0   # the real check: CPU example values
    enters = torch.fx.symbolic_trace(fn)
    first = next(iter(enters.graph.nodes))
    with enters.graph.inserting_after(first):
        enters.graph.call_function(torch.amp.autocast_mode._enter_autocast, ("cpu", torch.bfloat16, True, None))
    assert _routed(enters, lambda gm, n: True) == 0
    assert _routed(gm, lambda gm, n: True) == 1   # the same graph, routed without the autocast block

    # ambient CUDA autocast (reported on; no GPU needed): bf16 input, fp32 factors as the weights are
    with torch._subclasses.fake_tensor.FakeTensorMode():
        values = cuda(torch.float32)
        values[0] = values[0].to(torch.bfloat16)
    gm = torch.fx.symbolic_trace(fn)
    for n, v in zip([n for n in gm.graph.nodes if n.op == "placeholder"], values):
        n.meta["example_value"] = v
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda device="cuda": device == "cuda")
    monkeypatch.setattr(torch, "get_autocast_dtype", lambda device: torch.bfloat16)
    assert _routed(gm, _linear_ok) == 1
    casts = [n for n in gm.graph.nodes if n.op == "call_method" and n.target == "to"]
    assert len(casts) == 5 and all(c.args[1] is torch.bfloat16 for c in casts)  # the factors and bias
    (fused,) = [n for n in gm.graph.nodes if n.target is FWD]
    assert all(a.meta["example_value"].dtype == torch.bfloat16 for a in fused.args)


@pytest.mark.cuda
@cuda_only
def test_cuda_backend_routes_sklinear_to_the_fused_kernel():
    """``backend="panther"`` on CUDA: SKLinear (rank 2k <= 32) runs the fused kernel, forward and backward,
    with the C++ op's results; a rank the kernel does not serve on a GPU (2k = 128) keeps the GEMMs."""
    from torch._inductor.utils import run_and_get_code

    from panther.backend import panther_backend
    from panther.nn import SKLinear

    for k, fused in ((16, True), (64, False)):
        torch.manual_seed(0)
        layer = SKLinear(512, 384, num_terms=1, low_rank=k, seed=0).cuda().bfloat16()
        x = torch.randn(3, 70, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        torch._dynamo.reset()
        net = torch.compile(layer, backend=panther_backend)
        (y,), code = run_and_get_code(lambda: (net(x),))
        _, code_bwd = run_and_get_code(lambda: y.float().square().sum().backward())
        src = "\n".join(code + code_bwd)
        assert ("_sketched_linear_chain_kernel" in src) is fused, k
        assert ("_grad_pass_kernel" in src) is fused, k
        x2 = x.detach().clone().requires_grad_()
        y_ref = layer(x2)
        y_ref.float().square().sum().backward()
        assert rel(y, y_ref) < 1e-2
        assert rel(x.grad, x2.grad) < 2e-2
