"""Checks the fused sketched-conv2d Triton kernel's arithmetic in Triton's CPU interpreter.

Run by tests/test_triton_conv.py in ONE subprocess with ``TRITON_INTERPRET=1`` (the variable must
be set before triton is imported). Every case compares the kernel (``triton_conv.conv_forward``
with explicit small tiles, so pixel / channel / output-channel tails and several column groups are
exercised, for both kernels, "direct" and "rowtap"; the output NaN-poisoned so an unwritten
element fails) against
``sketched_conv2d_reference`` in float64; prints one line per case and exits non-zero on the
first failure.
"""
import os
import sys
import time

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

import torch  # noqa: E402

import panther  # noqa: E402,F401
from interpret_common import check, rel  # noqa: E402  (tests/ is on sys.path: run as a script)
from inductor_ext import triton_conv as tc  # noqa: E402
from panther.ops.conv import sketched_conv2d_reference  # noqa: E402

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}
T16 = dict(BLOCK_P=16, BLOCK_C=16, BLOCK_N=16)
_seed = [0]


def rand(*shape):
    _seed[0] += 1
    g = torch.Generator().manual_seed(_seed[0])
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def case(N=2, C_in=3, C_out=5, H=7, W=9, kh=3, kw=3, L=1, k=4, stride=(1, 1), padding=(0, 0),
         dilation=(1, 1), bias=True, dtype=torch.float32, channels_last=False, config=T16, groups=1,
         algo="direct"):
    t0 = time.perf_counter()
    x, S1s, U1s = rand(N, C_in, H, W), rand(2 * L * k, C_in, kh, kw), rand(2 * L, k, C_out)
    b = rand(C_out) if bias else None
    x, S1s, U1s = x.to(dtype), S1s.to(dtype), U1s.to(dtype)
    b = b.to(dtype) if bias else None
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ref = sketched_conv2d_reference(x.double(), S1s.double(), U1s.double(),
                                    b.double() if bias else None, stride, padding, dilation)
    layout = torch.channels_last if tc._wants_channels_last(x) else torch.contiguous_format
    poisoned = torch.full(ref.shape, float("nan"), dtype=dtype).contiguous(memory_format=layout)
    out = tc.conv_forward(x, S1s, U1s, b, stride, padding, dilation, algo=algo, config=config,
                          col_groups=groups, out=poisoned)
    assert out.dtype == dtype and out.shape == ref.shape
    assert out.is_contiguous(memory_format=layout)
    assert torch.isfinite(out).all(), "an output element was not written"
    name = (f"{algo} N{N} Cin{C_in} Cout{C_out} {H}x{W} k{kh}x{kw} L{L} k{k} s{stride} p{padding} "
            f"d{dilation} bias={bias} {str(dtype)[6:]} cl={channels_last} {config} groups={groups}")
    check(f"{name} [{time.perf_counter() - t0:.1f}s]", rel(out, ref), TOL[dtype])


def main():
    f32, bf, fp16 = torch.float32, torch.bfloat16, torch.float16
    # the brief's shapes: C_in=3, C_out=5, 7x9, batch 2, stride 1/2, padding 0/1/'same', dilation 2
    case(stride=(1, 1), padding=(0, 0))
    case(stride=(2, 2), padding=(1, 1), L=2, k=1, channels_last=True)
    case(padding=(2, 2), dilation=(2, 2), channels_last=True)           # 'same' for 3x3 dilated by 2
    case(padding=(1, 1), k=1, bias=False)                              # 'same' for 3x3, k=1
    case(kh=2, kw=3, stride=(2, 1), padding=(1, 0), dilation=(1, 2), L=2, k=3)  # mixed pairs
    case(kh=1, kw=1, L=1, k=1, channels_last=True)                       # 1x1 conv, R = 2
    # tails: channel chunks, output-channel tiles, pixel blocks; taps-inner order; column groups
    case(C_in=20, C_out=37, H=6, W=5, L=2, k=5, padding=(1, 1), channels_last=True,
         config=dict(BLOCK_P=32, BLOCK_C=16, BLOCK_N=16, TAPS_INNER=1))  # R = 20 -> R_PAD 32
    case(C_in=20, C_out=37, H=6, W=5, stride=(2, 2), padding=(1, 1), groups=3,
         config=dict(BLOCK_P=16, BLOCK_C=32, BLOCK_N=16, X_CA=1))
    case(N=1, C_in=16, C_out=16, H=4, W=4, L=1, k=8, channels_last=True, padding=(1, 1))  # exact tiles
    # bf16 / fp16 (the interpreter upcasts the dots; z is rounded to the input dtype as on GPU)
    case(stride=(2, 2), padding=(1, 1), dtype=bf)
    case(padding=(2, 2), dilation=(2, 2), L=2, k=1, dtype=bf, channels_last=True)
    case(C_in=20, C_out=37, H=6, W=5, padding=(1, 1), dtype=bf, channels_last=True, groups=2,
         config=dict(BLOCK_P=32, BLOCK_C=16, BLOCK_N=32, TAPS_INNER=1))
    case(padding=(1, 1), dtype=fp16, channels_last=True)
    # the rowtap kernel (stride_w == 1): one and several output rows per program, several column
    # blocks per row (W=20 > a 16-wide strip), dilation, stride_h 2, 2x3 / 1x1 / 1x7 kernels, tails
    rt = dict(algo="rowtap")
    case(padding=(1, 1), channels_last=True, **rt)
    case(stride=(2, 1), padding=(0, 1), dilation=(2, 2), L=2, k=1, config=dict(T16, BLOCK_P=32), **rt)
    case(H=3, W=20, kh=2, kw=3, padding=(1, 0), bias=False, channels_last=True, **rt)
    case(kh=1, kw=1, k=1, **rt)                                          # 1 column tap: no second group
    case(H=4, kh=1, kw=7, padding=(0, 3), k=2, channels_last=True, **rt)  # 7 taps: 4 + 3 padded to 4
    case(C_in=20, C_out=37, H=6, W=5, L=2, k=5, padding=(1, 1), dtype=bf, channels_last=True, groups=2,
         config=dict(BLOCK_P=64, BLOCK_C=16, BLOCK_N=32, TAPS_INNER=1), **rt)

    # the op itself (the device branch picks the kernel under the interpreter), unbatched input
    # and autocast through the wrapper, backward (the C++ op's formula) through the kernel forward
    x, S1s, U1s, b = rand(2, 3, 7, 9).float(), rand(4, 3, 3, 3).float(), rand(2, 2, 5).float(), rand(5).float()
    xc = x.contiguous(memory_format=torch.channels_last)
    assert tc.kernel_ok(xc, S1s, U1s, b, [1, 1], [1, 1], [1, 1])
    out = tc.sketched_conv2d_triton(xc, S1s, U1s, b, 1, 1)
    assert out.is_contiguous(memory_format=torch.channels_last)
    check("op channels_last", rel(out, sketched_conv2d_reference(x.double(), S1s.double(), U1s.double(),
                                                                  b.double(), 1, 1)), 1e-5)
    out = tc.sketched_conv2d_triton(x[0], S1s, U1s, None, 2, 0, 2)
    check("op unbatched", rel(out, sketched_conv2d_reference(x[:1].double(), S1s.double(), U1s.double(),
                                                              None, 2, 0, 2)[0]), 1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = tc.sketched_conv2d_triton(xc, S1s, U1s, b, 1, 1)
    assert out.dtype == torch.bfloat16
    check("op autocast bf16", rel(out, sketched_conv2d_reference(x.double(), S1s.double(), U1s.double(),
                                                                  b.double(), 1, 1)), 2e-2)
    leaves = [t.clone().requires_grad_() for t in (xc, S1s, U1s, b)]
    leaves[0] = xc.detach().requires_grad_()
    y = tc.sketched_conv2d_triton(*leaves, 2, 1)
    gy = rand(*y.shape).float()
    got = torch.autograd.grad(y, leaves, gy)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    want = torch.autograd.grad(sketched_conv2d_reference(*ref_leaves, 2, 1), ref_leaves, gy.double())
    for name, a, w in zip(("dx", "dS1s", "dU1s", "db"), got, want):
        check(f"op backward {name}", rel(a, w), 1e-5)
    print("all interpreter checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
