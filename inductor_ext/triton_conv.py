"""Triton forward for ``panther::sketched_conv2d`` on CUDA: the tap GEMM.

A convolution to only R = 2·L·k channels is a poor GEMM: its N = R is narrow and its K = C_in·kh·kw
long. Here each kernel tap moves from K to N:

    U   = X · A_all     X: the channels_last input as (B·H·W, C_in) rows (a view); A_all (C_in, kh·kw·R),
                        whose columns [t·R, (t+1)·R) hold tap t = (i, j): S1s[:, :, i, j]ᵀ (cuBLAS)
    out = T · Mix / (2L) + bias,   T[p] = Σ_t U[the input pixel tap t of output pixel p lands on,
                        tap t's columns], Mix = U1s as (R, C_out): one Triton kernel,
                        ``_tap_mix_kernel``, with T on chip

Each element of U is read once (by the one output pixel its tap serves), so the convolution reads x
and U once and writes the output once. A tap that lands in the zero padding is masked. T is rounded
to the input dtype before the mix, as the C++ op's convolution output is; U is stored in the input
dtype, so half-precision results differ from the C++ op's in the last bits (each tap is rounded
before the sum).

Which calls take it (``tap_ok``): CUDA, 4-D channels_last input, fp16 / bf16 / fp32, stride 1,
R <= ``TAP_MAX_RANK`` and U at most ``TAP_MAX_GROWTH`` times x's size. Everything else, and the
backward (cuDNN's ``convolution_backward``, ``panther.ops.conv``), is the C++ op's. Registered as
``torch.library.triton_op("panther::sketched_conv2d_triton")``, same schema and autograd formula as
``panther::sketched_conv2d``, so Inductor inlines the kernel; eager calls of ``sketched_conv2d_triton``
(SKConv2d's CUDA path) skip the op's dispatch through an ``autograd.Function`` around the same kernel
and backward. Under ``TRITON_INTERPRET=1`` (set before
triton is imported) CPU tensors run the kernel in Triton's interpreter, eager only: that is how CPU CI
checks its arithmetic.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

import panther  # noqa: F401  (loads the native ops)
from panther.ops.conv import _backward, _setup_context

from ._autocast import autocast_call
from ._eager import direct_launch_ok, grad_needed
from .triton_linear import _DTYPES, _INTERPRET, _dot_mode, _dot_width, _launcher, triton

if triton is not None:
    import triton.language as tl

    from .triton_linear import _mma  # a plain global name, as the JIT wants it

__all__ = ["sketched_conv2d_triton", "sketched_conv2d_triton_op", "tap_conv", "tap_ok", "tap_suits", "tap_weight",
           "TAP_MAX_GROWTH", "TAP_MAX_RANK"]

# Where the tap GEMM measured faster than the C++ op on the H200 (bf16, 3×3, 56×56, batch 32, CUDA
# graphs; the sweep in docs/benchmarks.md): every R <= 32 tried, from 64 channels (U 4.5x x's size)
# to 1024; at R = 64 and 128 the C++ op wins (stage 2 reads kh·kw·R per pixel, the mix is K = R).
TAP_MAX_RANK = 32
# U is kh·kw·R / C_in times x's size, held until stage 2 is done: the largest growth measured.
TAP_MAX_GROWTH = 4.5
# (BLOCK_P output pixels, BLOCK_N output channels per step, warps, stages): the fastest of 8 measured
# on the H200 (bf16, 56×56, batch 32, R = 32, 512 channels: 0.061 ms, 0.10 at (128, 128, 8, 1));
# the interpreter takes small tiles.
_CONFIG = (64, 64, 4, 1)
_INTERPRET_CONFIG = (16, 16, 4, 1)
_INT32_LIMIT = 2**31   # offsets past this need int64 (the interpreter check lowers it)


if triton is not None:

    @triton.jit
    def _tap_mix_kernel(
        U, MIX, BIAS, OUT,
        P, H, W, HO, WO, C_OUT, R,
        stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
        scale,
        KH: tl.constexpr, KW: tl.constexpr, R_PAD: tl.constexpr, HAS_BIAS: tl.constexpr,
        EVEN_N: tl.constexpr, INT64: tl.constexpr, DOT_MODE: tl.constexpr, BLOCK_P: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        """OUT[p, :] = (Σ_t U[row(p, t), t·R:(t+1)·R], rounded to U's dtype) · MIX · scale + BIAS.

        U (B·H·W, KH·KW·R), MIX (R, C_OUT) and OUT (B·HO·WO, C_OUT) contiguous; INT64: offsets in
        int64 (U or OUT has 2^31 elements or more). One program owns
        BLOCK_P output pixels: it sums their taps (every tap's loads independent, so all in flight
        at once), then streams their output rows out BLOCK_N channels at a time."""
        pid = tl.program_id(0)
        scale = tl.cast(scale, tl.float32)   # Inductor passes a float argument as fp64
        offs_p = pid * BLOCK_P + tl.arange(0, BLOCK_P)
        p_ok = offs_p < P
        n = offs_p // (HO * WO)
        rem = offs_p % (HO * WO)
        h0 = (rem // WO) * stride_h - pad_h
        w0 = (rem % WO) * stride_w - pad_w
        offs_r = tl.arange(0, R_PAD)
        r_ok = offs_r < R
        t_sum = tl.zeros((BLOCK_P, R_PAD), dtype=tl.float32)
        for t in tl.static_range(KH * KW):
            hi = h0 + (t // KW) * dil_h
            wi = w0 + (t % KW) * dil_w
            ok = p_ok & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)   # off the image: zero padding
            row = (n * H + hi) * W + wi
            if INT64:
                row = row.to(tl.int64)
            row = row * (KH * KW * R) + t * R
            if R == R_PAD:   # the row mask alone keeps the loads vectorised
                u = tl.load(U + row[:, None] + offs_r[None, :], mask=ok[:, None], other=0.0)
            else:
                u = tl.load(U + row[:, None] + offs_r[None, :], mask=ok[:, None] & r_ok[None, :],
                            other=0.0)
            t_sum += u.to(tl.float32)
        z = t_sum.to(U.dtype.element_ty)
        offs_n = tl.arange(0, BLOCK_N)
        out_rows = OUT + (offs_p.to(tl.int64) if INT64 else offs_p)[:, None] * C_OUT
        for n0 in range(0, C_OUT, BLOCK_N):
            cols = n0 + offs_n
            n_ok = cols < C_OUT
            if EVEN_N and R == R_PAD:
                mix = tl.load(MIX + offs_r[:, None] * C_OUT + cols[None, :])
            else:
                mix = tl.load(MIX + offs_r[:, None] * C_OUT + cols[None, :],
                              mask=r_ok[:, None] & n_ok[None, :], other=0.0)
            y = _mma(z, mix, None, DOT_MODE) * scale
            if HAS_BIAS:
                if EVEN_N:   # (masked, the kernel measured 0.069 ms against 0.061)
                    y += tl.load(BIAS + cols).to(tl.float32)[None, :]
                else:
                    y += tl.load(BIAS + cols, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            y = y.to(OUT.dtype.element_ty)
            if EVEN_N:   # the row mask alone keeps the stores vectorised
                tl.store(out_rows + cols[None, :], y, mask=p_ok[:, None])
            else:
                tl.store(out_rows + cols[None, :], y, mask=p_ok[:, None] & n_ok[None, :])


def _out_size(size, k, stride, pad, dil):
    return (size + 2 * pad - dil * (k - 1) - 1) // stride + 1


def tap_ok(x, S1s, stride) -> bool:
    """Whether the tap GEMM serves this call (else the C++ op): a device whose kernel runs (CUDA, or
    the CPU under the interpreter) and ``tap_suits``."""
    if triton is None or not isinstance(x, Tensor):
        return False
    return (x.device.type == "cuda" or (_INTERPRET and x.device.type == "cpu")) and tap_suits(x, S1s, stride)


def tap_suits(x, S1s, stride) -> bool:
    """The shapes, layout and dtypes the tap GEMM takes (see the module docstring), on any device."""
    if x.dim() != 4 or x.numel() == 0 or list(stride) != [1, 1]:
        return False
    if x.dtype not in _DTYPES or S1s.dtype != x.dtype:
        return False
    if not x.is_contiguous(memory_format=torch.channels_last):
        return False
    rank, c_in, kh, kw = S1s.shape
    return rank <= TAP_MAX_RANK and kh * kw * rank <= TAP_MAX_GROWTH * c_in


def tap_weight(S1s: Tensor) -> Tensor:
    """A_all (C_in, kh·kw·R): column t·R + r is S1s[r, :, i, j] for tap t = i·kw + j."""
    rank, c_in, kh, kw = S1s.shape
    return S1s.permute(1, 2, 3, 0).reshape(c_in, kh * kw * rank)


def tap_conv(x: Tensor, S1s: Tensor, U1s: Tensor, bias: Optional[Tensor], stride, padding, dilation, *,
             in_op: bool = True) -> Tensor:
    """The tap GEMM itself, for any stride, padding and dilation (``tap_ok`` picks the calls it
    serves best): ``panther::sketched_conv2d``'s result, channels_last. ``in_op``: called from the
    triton_op's body (the kernel launched through ``wrap_triton``), else eagerly outside any op (a
    plain launch: ``wrap_triton`` is for launches inside an op)."""
    B, c_in, H, W = x.shape
    rank, _, kh, kw = S1s.shape
    two_l, _, c_out = U1s.shape
    ho = _out_size(H, kh, stride[0], padding[0], dilation[0])
    wo = _out_size(W, kw, stride[1], padding[1], dilation[1])
    torch._check(ho > 0 and wo > 0, lambda: "sketched_conv2d: the output would be empty")
    X = x.permute(0, 2, 3, 1).reshape(B * H * W, c_in)   # a free view of channels_last x
    U = X @ tap_weight(S1s)
    out = x.new_empty((B, ho, wo, c_out))
    if _INTERPRET:
        out.fill_(float("nan"))  # an element the kernel fails to write fails the checks
    P = B * ho * wo
    block_p, block_n, warps, stages = _INTERPRET_CONFIG if _INTERPRET else _CONFIG
    block_n = min(block_n, _dot_width(c_out))
    _launcher(_tap_mix_kernel, in_op)[(triton.cdiv(P, block_p),)](
        U, U1s.reshape(rank, c_out), bias if bias is not None else U, out,
        P, H, W, ho, wo, c_out, rank,
        *stride, *padding, *dilation,
        1.0 / two_l,
        KH=kh, KW=kw, R_PAD=_dot_width(rank), HAS_BIAS=bias is not None, EVEN_N=c_out % block_n == 0,
        INT64=max(U.numel(), out.numel()) >= _INT32_LIMIT,
        DOT_MODE=_dot_mode(x.dtype), BLOCK_P=block_p, BLOCK_N=block_n, num_warps=warps, num_stages=stages)
    return out.permute(0, 3, 1, 2)   # channels_last, as the C++ op returns for channels_last x


@torch.library.triton_op("panther::sketched_conv2d_triton", mutates_args=())
def sketched_conv2d_triton_op(x: Tensor, S1s: Tensor, U1s: Tensor, bias: Optional[Tensor],
                              stride: list[int], padding: list[int], dilation: list[int]) -> Tensor:
    """``panther::sketched_conv2d`` through the tap GEMM where ``tap_ok``, else the C++ op."""
    if tap_ok(x, S1s, stride):
        return tap_conv(x, S1s, U1s, bias, stride, padding, dilation)
    return torch.ops.panther.sketched_conv2d(x, S1s, U1s, bias, stride, padding, dilation)


torch.library.register_autograd("panther::sketched_conv2d_triton", _backward, setup_context=_setup_context)


class _EagerTapConv(torch.autograd.Function):
    """Eager calls the tap GEMM serves that need a gradient skip the custom op's Python dispatch (CPU
    per call on the H200 host, tiny input: 206 -> 139 µs; docs/benchmarks.md); same forward, same
    backward (``panther.ops.conv``'s formula). Calls with nothing to differentiate skip this Function
    too (``_conv``)."""

    @staticmethod
    def forward(ctx, x, S1s, U1s, bias, stride, padding, dilation):
        _setup_context(ctx, (x, S1s, U1s, bias, stride, padding, dilation), None)
        return tap_conv(x, S1s, U1s, bias, stride, padding, dilation, in_op=False)

    @staticmethod
    def backward(ctx, grad):
        return _backward(ctx, grad)


def _conv(x, S1s, U1s, bias, stride, padding, dilation):
    if direct_launch_ok() and tap_ok(x, S1s, stride):
        if grad_needed(x, S1s, U1s, bias):
            return _EagerTapConv.apply(x, S1s, U1s, bias, stride, padding, dilation)
        # nothing to differentiate: the launch without autograd.Function's cost, as the linear does
        return tap_conv(x, S1s, U1s, bias, stride, padding, dilation, in_op=False)
    return torch.ops.panther.sketched_conv2d_triton(x, S1s, U1s, bias, stride, padding, dilation)


def sketched_conv2d_triton(x, S1s, U1s, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1)):
    """``torch.ops.panther.sketched_conv2d``'s contract (pairs of ints, autocast honoured), through the
    tap GEMM where it serves the call: eagerly without the custom op's dispatch, under
    ``torch.compile`` as ``panther::sketched_conv2d_triton`` (which Inductor inlines)."""
    return autocast_call(_conv, x, S1s, U1s, bias, list(stride), list(padding), list(dilation))
