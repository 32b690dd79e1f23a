"""The tap-GEMM sketched conv (inductor_ext/triton_conv.py, ``panther::sketched_conv2d_triton``).

CPU CI: the kernel's arithmetic in Triton's interpreter (one subprocess, TRITON_INTERPRET=1), the op's
C++ branch through opcheck / gradcheck, the routing rule and SKConv2d's CPU path. CUDA (the lent H200,
``pytest -m cuda``): odd shapes in fp16/bf16/fp32 against float64, gradients, autocast, SKConv2d taking
the tap GEMM, and Inductor inlining the kernel (through the backend's routing too).
"""

import pytest
import torch

import panther  # noqa: F401
from inductor_ext import triton_conv as tconv
from panther.nn import SKConv2d
from panther.ops.conv import sketched_conv2d_reference
from panther.policy import SketchSpec
from interpret_common import run_interpreter_check  # tests/ is on sys.path

OP = torch.ops.panther.sketched_conv2d_triton.default
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
CL = torch.channels_last


def conv_args(B=2, C=24, H=7, W=6, L=1, k=3, CO=10, ks=(3, 3), dtype=torch.float64, device="cpu", bias=True,
              requires_grad=False, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, device=device, dtype=dtype).requires_grad_(requires_grad)  # noqa: E731
    x = torch.randn(B, C, H, W, generator=g, device=device, dtype=dtype).contiguous(memory_format=CL)
    return x.requires_grad_(requires_grad), mk(2 * L * k, C, *ks), mk(2 * L, k, CO), mk(CO) if bias else None


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


# ------------------------------------------------------------------ interpreter (CPU CI)
@pytest.mark.skipif(tconv.triton is None, reason="needs triton")
def test_kernel_arithmetic_in_triton_interpreter():
    """Odd channels, rank not a power of two, k=1, L=3, 1x1 and 5x3 kernels, padding, dilation, strides, bias
    or not, fp32/bf16/fp16: all against float64, outputs NaN-poisoned so unwritten elements fail."""
    run_interpreter_check("triton_conv_interpret_check.py", "ALL OK")


# ------------------------------------------------------------------ the op's C++ branch (CPU)
@pytest.mark.parametrize("bias", [True, False])
def test_opcheck(bias):
    x, S1s, U1s, b = conv_args(dtype=torch.float32, bias=bias, requires_grad=True)
    torch.library.opcheck(OP, (x, S1s, U1s, b, [1, 1], [1, 1], [1, 1]))


def test_gradcheck_float64():
    x, S1s, U1s, b = conv_args(B=1, C=5, H=5, W=4, k=2, CO=3, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: OP(*a, [1, 1], [1, 0], [1, 1]), (x, S1s, U1s, b))


def test_cpu_branch_is_the_cpp_op():
    """Off CUDA (outside the interpreter) the wrapper and the op are the C++ op: same numbers, same layout,
    and the reference's."""
    x, S1s, U1s, b = conv_args()
    assert not tconv.tap_ok(x, S1s, [1, 1]) or tconv._INTERPRET
    out = tconv.sketched_conv2d_triton(x, S1s, U1s, b, (1, 1), (1, 1), (1, 1))
    assert out.is_contiguous(memory_format=CL)
    torch.testing.assert_close(out, torch.ops.panther.sketched_conv2d(x, S1s, U1s, b, [1, 1], [1, 1], [1, 1]))
    torch.testing.assert_close(out, sketched_conv2d_reference(x, S1s, U1s, b, 1, 1, 1))


def test_autocast_cpu_bfloat16():
    x, S1s, U1s, b = conv_args(dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = tconv.sketched_conv2d_triton(x, S1s, U1s, b, (1, 1), (1, 1), (1, 1))
    assert out.dtype == torch.bfloat16
    assert rel(out, sketched_conv2d_reference(x, S1s, U1s, b, 1, 1, 1)) < 3e-2


def test_tap_rule():
    """The tap GEMM takes 4-D channels_last stride-1 half/fp32 calls with R <= 32 and U <= 4.5x x, on CUDA
    (or interpreted)."""
    x, S1s, _, _ = conv_args(C=48, k=2, dtype=torch.float32)          # R = 4, U: 9·4 / 48 = 0.75x x
    assert tconv.tap_suits(x, S1s, [1, 1])
    assert tconv.tap_ok(x, S1s, [1, 1]) == tconv._INTERPRET           # CPU: only in the interpreter
    assert tconv.tap_suits(x, torch.randn(24, 48, 3, 3), [1, 1])      # R = 24, U 4.5x x
    assert not tconv.tap_suits(x, torch.randn(40, 48, 3, 3), [1, 1])  # R = 40 > 32
    assert not tconv.tap_suits(x, torch.randn(8, 48, 5, 7), [1, 1])   # U 5.8x x
    assert not tconv.tap_suits(x.contiguous(), S1s, [1, 1])           # NCHW
    assert not tconv.tap_suits(x, S1s, [2, 2])                        # strided
    assert not tconv.tap_suits(x[0], S1s, [1, 1])                     # unbatched
    assert not tconv.tap_suits(x.double(), S1s.double(), [1, 1])      # float64: the C++ op
    assert not tconv.tap_suits(x.half(), S1s, [1, 1])                 # mixed dtypes


def test_tap_weight_columns():
    S1s = torch.randn(6, 4, 3, 2)
    A = tconv.tap_weight(S1s)
    assert A.shape == (4, 3 * 2 * 6)
    for i in range(3):
        for j in range(2):
            t = i * 2 + j
            torch.testing.assert_close(A[:, t * 6:(t + 1) * 6], S1s[:, :, i, j].t())


def test_compile_cpu_branch():
    x, S1s, U1s, b = conv_args(dtype=torch.float32)
    fn = torch.compile(lambda *a: tconv.sketched_conv2d_triton(*a, (1, 1), (1, 1), (1, 1)), backend="aot_eager",
                       fullgraph=True)
    torch.testing.assert_close(fn(x, S1s, U1s, b), sketched_conv2d_reference(x, S1s, U1s, b, 1, 1, 1), rtol=1e-4,
                               atol=1e-4)


# ------------------------------------------------------------------ CUDA (the lent H200)
@pytest.mark.cuda
@cuda_only
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 3e-3)])
@pytest.mark.parametrize("shape", [dict(B=3, C=100, H=13, W=11, L=1, k=5, CO=77),
                                   dict(B=2, C=512, H=14, W=14, L=1, k=16, CO=512),
                                   dict(B=2, C=64, H=9, W=10, L=2, k=3, CO=33, ks=(3, 1))],
                         ids=["odd", "resnet", "L2_3x1"])
def test_cuda_against_float64(dtype, tol, shape):
    x, S1s, U1s, b = conv_args(dtype=dtype, device="cuda", **shape)
    assert tconv.tap_ok(x, S1s, [1, 1])
    pad = [1, 0] if "ks" in shape else [1, 1]   # the 3x1 kernel keeps the size with (1, 0)
    ref = sketched_conv2d_reference(*(t.double() for t in (x, S1s, U1s, b)), 1, pad, 1)
    prev = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32: ieee GEMM and dots, so 1e-5 is meaningful
        out = OP(x, S1s, U1s, b, [1, 1], pad, [1, 1])
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    assert out.dtype == dtype and out.shape == ref.shape and out.is_contiguous(memory_format=CL)
    assert rel(out, ref) < tol


@pytest.mark.cuda
@cuda_only
def test_cuda_gradients_match_cpp_op():
    args = conv_args(B=2, C=96, H=9, W=9, k=4, CO=48, dtype=torch.float32, device="cuda", requires_grad=True)
    assert tconv.tap_ok(args[0], args[1], [1, 1])
    want = None
    for fn in (lambda: OP(*args, [1, 1], [1, 1], [1, 1]),                                # the op (compiled path)
               lambda: tconv.sketched_conv2d_triton(*args, (1, 1), (1, 1), (1, 1))):     # the eager wrapper
        out = fn()
        if want is None:
            g = torch.randn_like(out)
            want = torch.autograd.grad(torch.ops.panther.sketched_conv2d(*args, [1, 1], [1, 1], [1, 1]), args, g)
        for a, b in zip(torch.autograd.grad(out, args, g), want):
            assert rel(a, b) < 1e-3


@pytest.mark.cuda
@cuda_only
def test_cuda_sklayer_takes_the_tap_gemm_under_autocast():
    layer = SKConv2d(128, 96, 3, padding=1, num_terms=1, low_rank=4, seed=0).cuda().to(memory_format=CL)
    x = torch.randn(4, 128, 12, 12, device="cuda").contiguous(memory_format=CL)
    assert tconv.tap_ok(x.bfloat16(), layer.S1s.bfloat16(), [1, 1])
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = layer(x)
    ref = sketched_conv2d_reference(x.double(), layer.S1s.double(), layer.U1s.double(), layer.bias.double(), 1, 1, 1)
    assert out.dtype == torch.bfloat16 and rel(out, ref) < 2e-2
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            layer(x)
        torch.cuda.synchronize()
    assert any("_tap_mix_kernel" in e.key for e in prof.key_averages())


@pytest.mark.cuda
@cuda_only
def test_inductor_inlines_the_tap_kernel_and_the_backend_routes_to_it():
    from torch._inductor.utils import run_and_get_code

    from panther.backend import panther_backend

    layer = SKConv2d(128, 96, 3, padding=1, low_rank=4, seed=0).cuda().bfloat16().to(memory_format=CL)
    x = torch.randn(4, 128, 12, 12, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=CL)
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="inductor", fullgraph=True)
    (y,), code = run_and_get_code(lambda: (compiled(x),))
    src = "\n".join(code)
    assert "_tap_mix_kernel" in src and "torch.ops.panther.sketched_conv2d_triton" not in src
    assert rel(y, layer(x)) < 1e-2
    # a dense conv the backend sketches: its panther.sketched_conv2d node is routed to the Triton twin
    dense = torch.nn.Conv2d(128, 96, 3, padding=1).cuda().bfloat16().to(memory_format=CL)
    torch._dynamo.reset()
    with torch.no_grad():
        net = torch.compile(dense, backend=panther_backend, options={"policy": {"conv2d": SketchSpec(low_rank=4)}})
        (_,), code = run_and_get_code(lambda: (net(x),))
    assert "_tap_mix_kernel" in "\n".join(code)
