"""Checks the tap-GEMM path's stage-2 kernel (inductor_ext/triton_conv_tap.py) in Triton's CPU interpreter.

Run by tests/test_triton_conv_tap.py in ONE subprocess with ``TRITON_INTERPRET=1`` (set before triton is
imported). Each case runs ``tap_forward`` (stage 1 in torch, stage 2 in the interpreter) with explicit
small tiles on a NaN-poisoned output and compares it with ``sketched_conv2d_reference`` in float64 and
with ``torch.ops.panther.sketched_conv2d``: R not a power of two, C_out not a multiple of 16, pixel
tails, stride 2, padding 0/1, dilation 2, 1x1 / 3x3 / 5x3 kernels, with and without bias, column
groups. Then the op's routing to the path and its backward, and the bench's smoke run. Prints one line
per case and exits non-zero on the first failure.
"""
import contextlib
import io
import os
import sys
import time

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

import torch  # noqa: E402

import panther  # noqa: E402,F401
from interpret_common import check, rel  # noqa: E402  (tests/ is on sys.path: run as a script)
from inductor_ext import triton_conv as tc  # noqa: E402
from inductor_ext import triton_conv_tap as tap  # noqa: E402
from panther.ops.conv import sketched_conv2d_reference  # noqa: E402

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}
T16 = dict(BLOCK_P=16, BLOCK_N=16)
_seed = [100]


def rand(*shape):
    _seed[0] += 1
    return torch.randn(*shape, generator=torch.Generator().manual_seed(_seed[0]), dtype=torch.float64)


def case(N=2, C_in=3, C_out=5, H=7, W=9, kh=3, kw=3, L=1, k=3, stride=(1, 1), padding=(0, 0), dilation=(1, 1),
         bias=True, dtype=torch.float32, channels_last=True, config=T16, groups=1):
    t0 = time.perf_counter()
    x, S1s, U1s = rand(N, C_in, H, W), rand(2 * L * k, C_in, kh, kw), rand(2 * L, k, C_out)
    b = rand(C_out).to(dtype) if bias else None
    x, S1s, U1s = x.to(dtype), S1s.to(dtype), U1s.to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    conv = (stride, padding, dilation)
    ref = sketched_conv2d_reference(x.double(), S1s.double(), U1s.double(), b.double() if bias else None, *conv)
    layout = torch.channels_last if tc._wants_channels_last(x) else torch.contiguous_format
    poisoned = torch.full(ref.shape, float("nan"), dtype=dtype).contiguous(memory_format=layout)
    out = tap.tap_forward(x, S1s, U1s, b, *conv, config=config, col_groups=groups, out=poisoned)
    assert out.dtype == dtype and out.shape == ref.shape and out.is_contiguous(memory_format=layout)
    assert torch.isfinite(out).all(), "an output element was not written"
    name = (f"N{N} Cin{C_in} Cout{C_out} {H}x{W} k{kh}x{kw} R{2 * L * k} s{stride} p{padding} d{dilation} "
            f"bias={bias} {str(dtype)[6:]} cl={channels_last} {config} groups={groups}")
    check(f"{name} [{time.perf_counter() - t0:.1f}s]", rel(out, ref), TOL[dtype])
    cpp = torch.ops.panther.sketched_conv2d(x, S1s, U1s, b, *[list(a) for a in conv])
    check("  vs the C++ op", rel(out, cpp), TOL[dtype])


def main():
    bf, fp16 = torch.bfloat16, torch.float16
    case()                                                                  # R = 6, pixel tails (126 px)
    case(stride=(2, 2), padding=(1, 1), L=2, k=5, bias=False)               # R = 20 -> R_PAD 32
    case(padding=(2, 2), dilation=(2, 2), config=dict(BLOCK_P=32, BLOCK_N=16))
    case(kh=1, kw=1, L=1, k=1, C_out=37, groups=3)                          # 1x1, R = 2, C_out tail, groups
    case(kh=5, kw=3, stride=(2, 1), padding=(1, 0), dilation=(1, 2), L=2, k=3, C_in=20, C_out=37, H=11, W=8,
         config=dict(BLOCK_P=32, BLOCK_N=32), groups=2)                     # 5x3, mixed pairs, two C_out tiles
    case(C_in=16, C_out=16, H=4, W=4, N=1, k=8, padding=(1, 1))              # exact tiles (R = 16)
    case(padding=(1, 1), channels_last=False)                                # NCHW x: stage 1 copies into rows
    case(stride=(2, 2), padding=(1, 1), dtype=bf)                            # bf16 (the interpreter upcasts dots)
    case(padding=(1, 1), L=2, k=5, C_out=37, dtype=fp16, bias=False)

    # the op: TAP_GEMM routing (stride-1 channels_last calls whose U is small enough), backward
    x, S1s, U1s, b = (t.float() for t in (rand(2, 32, 6, 5), rand(6, 32, 3, 3), rand(2, 3, 7), rand(7)))
    xc = x.contiguous(memory_format=torch.channels_last)
    one = [1, 1]
    assert tap.use_tap(xc, S1s, U1s, b, one, one, one)
    assert not tap.use_tap(x, S1s, U1s, b, one, one, one)                  # NCHW: the fused kernel
    assert not tap.use_tap(xc, S1s, U1s, b, [2, 2], one, one)              # stride 2: the fused kernel
    assert not tap.use_tap(xc.double(), S1s.double(), U1s.double(), b.double(), one, one, one)  # float64
    assert not tap.use_tap(xc[:, :4], S1s[:, :4], U1s, b, one, one, one)  # U (54 columns) > 2 x (4 channels)
    saved = tap.TAP_GEMM
    try:
        tap.TAP_GEMM = "always"
        assert tap.use_tap(xc, S1s, U1s, b, [2, 2], one, one)
        tap.TAP_GEMM = "never"
        assert not tap.use_tap(xc, S1s, U1s, b, one, one, one)
    finally:
        tap.TAP_GEMM = saved
    calls = []
    real = tap.tap_stage2
    tap.tap_stage2 = lambda *a, **kw: calls.append(1) or real(*a, **kw)
    try:
        leaves = [t.detach().clone().requires_grad_() for t in (xc, S1s, U1s, b)]
        y = tc.sketched_conv2d_triton(*leaves, 1, 1)
    finally:
        tap.tap_stage2 = real
    assert calls, "the op did not take the tap-GEMM path"
    assert y.is_contiguous(memory_format=torch.channels_last)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref = sketched_conv2d_reference(*ref_leaves, 1, 1)
    check("op (tap-GEMM path) forward", rel(y, ref), 1e-5)
    gy = rand(*y.shape)
    got = torch.autograd.grad(y, leaves, gy.float())
    want = torch.autograd.grad(ref, ref_leaves, gy)
    for name, a, w in zip(("dx", "dS1s", "dU1s", "db"), got, want):
        check(f"op (tap-GEMM path) backward {name}", rel(a, w), 1e-5)

    # the bench's smoke run: every variant and config row measured, none failing
    from inductor_ext import triton_conv_bench

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        triton_conv_bench.main(["--tapgemm", "--smoke"])
    text = buf.getvalue()
    print(text, end="")
    assert "failed" not in text, "a bench variant failed"
    for want_row in ("dense cuDNN conv (F.conv2d)", "tconv fused direct", "tap stage 2 (", "tap-GEMM stage 1",
                     "tap-GEMM stage 2, best", "tap-GEMM total", "op panther::sketched_conv2d_triton (tap-GEMM",
                     "cudnn.benchmark=True", "memory floor"):
        assert want_row in text, f"bench row missing: {want_row}"
    print("all interpreter checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
