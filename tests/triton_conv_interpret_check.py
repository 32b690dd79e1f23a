"""Checks the tap-GEMM conv kernel's arithmetic in Triton's CPU interpreter.

Run by tests/test_triton_conv.py in ONE subprocess with ``TRITON_INTERPRET=1`` (the variable must be set
before triton is imported). Every case compares against the float64 plain-torch reference (the 2L
per-term convolutions); outputs start NaN, so an element the kernel does not write fails. The script
prints one line per case and exits non-zero on the first failure.
"""
import os

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

import torch  # noqa: E402

import panther  # noqa: E402,F401
from interpret_common import check, rel, seeded_generators  # noqa: E402  (tests/ is on sys.path)
from inductor_ext import triton_conv as tconv  # noqa: E402
from panther.ops.conv import sketched_conv2d_reference  # noqa: E402

TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
gen = seeded_generators(0)

# (B, C_in, H, W, L, k, C_out, (kh, kw), stride, padding, dilation, bias)
CASES = [
    (2, 20, 7, 9, 1, 5, 13, (3, 3), (1, 1), (1, 1), (1, 1), True),      # odd channels, R = 10 (padded to 16)
    (1, 33, 6, 5, 2, 4, 40, (3, 2), (1, 1), (2, 0), (2, 1), False),     # 16 = R, C_out 40: a column tail
    (3, 16, 5, 4, 1, 1, 17, (1, 1), (1, 1), (0, 0), (1, 1), True),      # k = 1, a 1x1 conv
    (1, 24, 9, 8, 1, 8, 32, (3, 3), (2, 2), (1, 1), (1, 1), True),      # stride 2 (the kernel; tap_ok declines)
    (2, 12, 11, 6, 3, 3, 8, (5, 3), (2, 1), (3, 0), (1, 2), True),      # L = 3, asymmetric everything
]


def case(B, C, H, W, L, k, CO, ks, stride, padding, dilation, bias, dtype):
    g = gen()
    x = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    S1s = torch.randn(2 * L * k, C, *ks, generator=g, dtype=torch.float64)
    U1s = torch.randn(2 * L, k, CO, generator=g, dtype=torch.float64)
    b = torch.randn(CO, generator=g, dtype=torch.float64) if bias else None
    low = [t.to(dtype) if t is not None else None for t in (x, S1s, U1s, b)]
    low[0] = low[0].contiguous(memory_format=torch.channels_last)
    # the reference on the rounded inputs, so only the kernel's own rounding is measured
    ref = sketched_conv2d_reference(*(t.double() if t is not None else None for t in low), stride, padding,
                                    dilation)
    out = tconv.tap_conv(*low, stride, padding, dilation)
    assert out.shape == ref.shape and out.dtype == dtype, (out.shape, ref.shape, out.dtype)
    assert out.is_contiguous(memory_format=torch.channels_last)
    name = f"B={B} C={C} {H}x{W} L={L} k={k} C_out={CO} {ks} s={stride} p={padding} d={dilation} bias={bias} {dtype}"
    check(name, rel(out, ref), TOL[dtype])


for c in CASES:
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        case(*c, dtype)
tconv._INT32_LIMIT = 0   # the int64-offset variant of the kernel (huge U or outputs)
for c in CASES[:2]:
    case(*c, torch.float32)
tconv._INT32_LIMIT = 2**31

# the op routes channels_last stride-1 calls here and everything else to the C++ op
x = torch.randn(1, 32, 6, 6).contiguous(memory_format=torch.channels_last)
S1s, U1s = torch.randn(2, 32, 3, 3), torch.randn(2, 1, 5)   # U: 9·2 / 32 = 0.56x x
assert tconv.tap_ok(x, S1s, [1, 1]) and not tconv.tap_ok(x, S1s, [2, 1])
assert not tconv.tap_ok(x.contiguous(), S1s, [1, 1])
out = torch.ops.panther.sketched_conv2d_triton(x, S1s, U1s, None, [1, 1], [1, 1], [1, 1])
ref = torch.ops.panther.sketched_conv2d(x, S1s, U1s, None, [1, 1], [1, 1], [1, 1])
check("op (tap GEMM) vs the C++ op", rel(out, ref), 1e-5)
# the eager wrapper (SKConv2d's CUDA path): an autograd.Function around the same kernel, the op's backward
x, S1s, U1s, b = (t.requires_grad_(True) for t in (x, S1s, U1s, torch.randn(5)))
out = tconv.sketched_conv2d_triton(x, S1s, U1s, b, (1, 1), (1, 1), (1, 1))
assert type(out.grad_fn).__name__ == "_EagerTapConvBackward", type(out.grad_fn).__name__
g = torch.randn_like(out)
got = torch.autograd.grad(out, (x, S1s, U1s, b), g)
ref = torch.ops.panther.sketched_conv2d(x, S1s, U1s, b, [1, 1], [1, 1], [1, 1])
want = torch.autograd.grad(ref, (x, S1s, U1s, b), g)
check("eager wrapper forward vs the C++ op", rel(out, ref), 1e-5)
for name, a, w in zip(("dx", "dS1s", "dU1s", "dbias"), got, want):
    check(f"eager wrapper {name} vs the C++ op", rel(a, w), 1e-5)
# with nothing to differentiate (no grad mode, or no input needing a gradient) the wrapper launches the
# kernel without the autograd.Function: the same values, no graph
def refuse(*args):
    raise AssertionError("the autograd.Function ran for a call with nothing to differentiate")


tconv._EagerTapConv.apply, function_apply = refuse, tconv._EagerTapConv.apply
for mode, args in (("no_grad", (x, S1s, U1s, b)), ("inputs without grad", (x.detach(), S1s.detach(), U1s.detach(),
                                                                           b.detach()))):
    with torch.set_grad_enabled(mode != "no_grad"):
        plain = tconv.sketched_conv2d_triton(*args, (1, 1), (1, 1), (1, 1))
    assert plain.grad_fn is None and plain.is_contiguous(memory_format=torch.channels_last), mode
    check(f"eager wrapper, {mode}, vs the C++ op", rel(plain, ref), 1e-5)
tconv._EagerTapConv.apply = function_apply
# the sweep's bookkeeping (inductor_ext.triton_conv_bench; its timings need CUDA graphs: a stand-in timer)
from inductor_ext import triton_conv_bench  # noqa: E402

rows, headers = triton_conv_bench.sweep(cases=((32, 2),), size=5, batch=1, dtype=torch.float32, device="cpu",
                                        timer=lambda fn: (fn(), 1.0)[1])
assert len(rows) == 1 and len(rows[0]) == len(headers) and rows[0][-1] is True, rows
print("ok   triton_conv_bench.sweep on the CPU")
print("ALL OK")
