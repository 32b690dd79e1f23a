"""The sine-SRPE contraction with its bases computed on chip: ``panther::srpe_filter_sines``.

``out[b, n, h, r] = sum_{i, j} x[b, n, h, i] omega[n, h, i, j] weight[h, i, j, r]`` with the bases
``omega[n, h, i, :] = [cos(theta n + phase), sin(theta n + phase)]`` (``panther.ops.attention.
sine_bases``), the contraction of ``panther::srpe_filter`` without its ``omega`` input. That input
holds ``L·H·d·2S`` values: at 65,536 positions, 16 heads, d = 64 and 8 sines, 1.07e9 (2 GiB in
bf16, per queries and keys). The Triton kernel builds each (positions × features × sines) block of
``x · omega`` in registers from theta and the phases and feeds it to the tensor cores against the
matching rows of ``weight``; nothing of size ``L·d·S`` reaches HBM.

The backward kernel rebuilds the same blocks on chip: with ``z = x · omega``, ``dW = z^T g`` and
``dz = g W^T``, whence ``dx = sum_j dz omega`` and the angles' gradient ``x (cos dz_sin - sin dz_cos)``
(times the position for theta). cos and sin come from the SFU after a reduction to [-pi, pi]
(``_cos_sin``): libdevice's accurate ones made the forward 4.9 times slower on the H200.

Registered as ``torch.library.triton_op``: CUDA tensors (and CPU tensors under ``TRITON_INTERPRET=1``)
take the kernels; other calls (CPU, float64) build the bases a few thousand positions at a time and
call ``panther::srpe_filter`` and ``panther::srpe_filter_backward`` on them
(``panther.ops.attention.srpe_filter_sines_forward`` / ``_backward``).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

import panther  # noqa: F401  (loads the native ops)
from panther.ops.attention import (sine_bases, srpe_filter_sines_backward,
                                   srpe_filter_sines_forward)

from .triton_attention import _DTYPES, _INTERPRET, _launcher, _num_sms, _rel, _time_ms

try:  # Triton is optional: without it every call takes the C++ op.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

__all__ = ["srpe_filter_sines", "srpe_filter_sines_reference"]

_MAX_GRID = 65535      # CUDA's limit on a launch grid's second dimension (B·H)


class Launch(NamedTuple):
    """A kernel launch's tiles: positions per step, rows of W per product (features · padded sines;
    tl.dot needs 16), outputs per program (at most), warps."""
    block_n: int
    rows: int
    block_r: int
    warps: int


# Best of 9 forward and 24 backward launches on the H200 (bf16, 65,536 positions, 16 heads, d = 64,
# 8 sines, R = 64 and 256; docs/benchmarks.md).
FORWARD = Launch(block_n=64, rows=32, block_r=128, warps=4)
BACKWARD = Launch(block_n=64, rows=32, block_r=64, warps=4)
_BACKWARD_PER_SM = 4   # the backward splits the rows until about this many programs per SM run


if triton is not None:
    from triton.language.extra.cuda import libdevice

    from .triton_attention import _TF32X3, _mm_at

    # fp32 products (H200, 16,384 positions × 16 heads, 8 sines, R = 64, fp32; errors against float64
    # the same both ways, 7e-6): the forward's as "ieee" (0.88 ms against 1.05 as tf32x3); the
    # backward's as tf32x3, which lets fp32 take the bf16 tiles (BACKWARD) on wgmma: 2.53 ms against
    # 18.4 with "ieee" FMA loops on the smaller tiles they needed to fit the registers
    _FWD_FP32 = tl.constexpr("ieee")

    # 2 pi split in two: _TWO_PI_HI has 8 significant bits, so k * _TWO_PI_HI is exact for |k| < 2^16
    # (angles below 4e5 rad; beyond, an fp32 angle is off by more than 0.03 rad anyway)
    _INV_TWO_PI = tl.constexpr(1.0 / (2.0 * math.pi))
    _TWO_PI_HI = tl.constexpr(6.28125)
    _TWO_PI_LO = tl.constexpr(2.0 * math.pi - 6.28125)

    @triton.jit
    def _cos_sin(ang, FAST: tl.constexpr):
        """cos and sin of fp32 angles, reduced to [-pi, pi] first (Cody-Waite, two constants). FAST
        (GPU): the SFU's approximations (CUDA's __cosf / __sinf: absolute error below 1e-6 on
        [-pi, pi]), one instruction each where libdevice's accurate ones take dozens; else tl.cos
        and tl.sin (the interpreter, which thus checks the reduction)."""
        k = tl.floor(ang * _INV_TWO_PI + 0.5)
        r = tl.fma(-k, _TWO_PI_HI, ang)
        r = tl.fma(-k, _TWO_PI_LO, r)
        if FAST:
            return libdevice.fast_cosf(r), libdevice.fast_sinf(r)
        else:
            return tl.cos(r), tl.sin(r)

    @triton.jit
    def _sine_rows(h, offs_i, i_ok, offs_s, s_ok, D, S):
        """For a block of features (I, S_PAD) of head h: the sines' offsets in theta and the phases
        ``(H, D, S)``, the rows of W ``(H, D, 2S, R)`` that hold their cosines (sines: + S), and the
        mask of real features and sines. (Kept apart from the loads: Inductor's mutation analysis
        counts a helper's pointer arguments as written when a store address comes out of it.)"""
        hi = (h * D + offs_i)[:, None]
        return hi * S + offs_s[None, :], hi * (2 * S) + offs_s[None, :], i_ok[:, None] & s_ok[None, :]

    @triton.jit
    def _load_sines(THETA, PHASE, idx, ok, HAS_PHASE: tl.constexpr):
        """Angular frequencies and phases at ``idx`` (0 where masked or without phases)."""
        th = tl.load(THETA + idx, mask=ok, other=0.0)
        if HAS_PHASE:
            ph = tl.load(PHASE + idx, mask=ok, other=0.0)
        else:
            ph = tl.zeros(th.shape, dtype=th.dtype)
        return th, ph

    @triton.jit
    def _srpe_sines_kernel(X, THETA, PHASE, W, OUT, L, H, D, S, R,
                           sxb, sxl, sxh, sxd, sob, sol, soh, sor,
                           HAS_PHASE: tl.constexpr, UPCAST: tl.constexpr, FAST: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_I: tl.constexpr, S_PAD: tl.constexpr,
                           BLOCK_R: tl.constexpr):
        """One block of positions of one (b, h), BLOCK_R outputs: per block of BLOCK_I features,
        the (positions × features·sines) products x·cos and x·sin on chip, each against its rows
        of W (H, D, 2S, R contiguous). Grid (position blocks, B·H, output blocks)."""
        pn = tl.program_id(0)
        bh = tl.program_id(1)
        pr = tl.program_id(2)
        b = bh // H
        h = bh % H
        rows = pn * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < L
        offs_r = pr * BLOCK_R + tl.arange(0, BLOCK_R)
        r_ok = offs_r < R
        offs_s = tl.arange(0, S_PAD)
        s_ok = offs_s < S
        pos = rows.to(tl.float32)
        x_base = X + b.to(tl.int64) * sxb + h.to(tl.int64) * sxh + rows.to(tl.int64)[:, None] * sxl
        acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
        for i0 in range(0, D, BLOCK_I):
            offs_i = i0 + tl.arange(0, BLOCK_I)
            i_ok = offs_i < D
            xt = tl.load(x_base + offs_i[None, :] * sxd, mask=row_ok[:, None] & i_ok[None, :],
                         other=0.0).to(tl.float32)                          # (N, I)
            idx, w_cos, is_ok = _sine_rows(h, offs_i, i_ok, offs_s, s_ok, D, S)
            th, ph = _load_sines(THETA, PHASE, idx, is_ok, HAS_PHASE)
            c, s = _cos_sin(pos[:, None, None] * th[None, :, :] + ph[None, :, :], FAST)  # as sine_bases
            xc = tl.reshape(xt[:, :, None] * c, (BLOCK_N, BLOCK_I * S_PAD))
            xs = tl.reshape(xt[:, :, None] * s, (BLOCK_N, BLOCK_I * S_PAD))
            # rows (i, j) of W: cosines j = s, sines j = S + s (padded sines and features: 0)
            w_row = tl.reshape(w_cos, (BLOCK_I * S_PAD,))
            w_ok = tl.reshape(is_ok, (BLOCK_I * S_PAD,))[:, None] & r_ok[None, :]
            wc = tl.load(W + w_row.to(tl.int64)[:, None] * R + offs_r[None, :], mask=w_ok, other=0.0)
            ws = tl.load(W + (w_row + S).to(tl.int64)[:, None] * R + offs_r[None, :], mask=w_ok,
                         other=0.0)
            acc += _mm_at(xc.to(wc.dtype), wc, UPCAST, _FWD_FP32)
            acc += _mm_at(xs.to(ws.dtype), ws, UPCAST, _FWD_FP32)
        tl.store(OUT + b.to(tl.int64) * sob + h.to(tl.int64) * soh + rows.to(tl.int64)[:, None] * sol
                 + offs_r[None, :] * sor, acc.to(OUT.dtype.element_ty),
                 mask=row_ok[:, None] & r_ok[None, :])

    @triton.jit
    def _srpe_sines_bwd_kernel(X, THETA, PHASE, W, G, DX, DW, DTH, DPH, L, H, D, S, R, ROWS,
                               ROWS_PER_SPLIT, sxb, sxl, sxh, sxd, sgb, sgl, sgh, sgr,
                               HAS_PHASE: tl.constexpr, NEED_DZ: tl.constexpr, NEED_DW: tl.constexpr,
                               ATOMIC_DX: tl.constexpr, UPCAST: tl.constexpr, FAST: tl.constexpr,
                               BLOCK_N: tl.constexpr, BLOCK_I: tl.constexpr, S_PAD: tl.constexpr,
                               BLOCK_R: tl.constexpr):
        """The backward of ``_srpe_sines_kernel``, bases on chip again. Grid (feature blocks ·
        output blocks, H, splits of the B·L rows). A program owns features [i0, i0 + BLOCK_I) of
        head h and outputs [r0, r0 + BLOCK_R), holds their rows of W, and walks its split's rows:
            dW[h, (i, j), r] += sum_rows z[row, (i, j)] g[row, r],  z = x · omega (partial per split);
            dz = g W^T over its outputs; dx[row, i] = sum_j dz omega (added over output blocks);
            d angle = x (cos dz_sin - sin dz_cos), summed times the position into dtheta and
            as is into dphase (partials per split and output block)."""
        pid = tl.program_id(0)
        h = tl.program_id(1)
        sp = tl.program_id(2)
        n_iblocks = tl.cdiv(D, BLOCK_I)
        offs_i = (pid % n_iblocks) * BLOCK_I + tl.arange(0, BLOCK_I)
        i_ok = offs_i < D
        rb = pid // n_iblocks
        offs_r = rb * BLOCK_R + tl.arange(0, BLOCK_R)
        r_ok = offs_r < R
        offs_s = tl.arange(0, S_PAD)
        s_ok = offs_s < S
        idx, w_cos, is_ok = _sine_rows(h, offs_i, i_ok, offs_s, s_ok, D, S)
        th, ph = _load_sines(THETA, PHASE, idx, is_ok, HAS_PHASE)
        IS: tl.constexpr = BLOCK_I * S_PAD
        w_row = tl.reshape(w_cos, (IS,)).to(tl.int64)
        w_ok = tl.reshape(is_ok, (IS,))[:, None] & r_ok[None, :]
        wc = tl.load(W + w_row[:, None] * R + offs_r[None, :], mask=w_ok, other=0.0)   # (IS, R)
        ws = tl.load(W + (w_row + S)[:, None] * R + offs_r[None, :], mask=w_ok, other=0.0)
        if UPCAST:
            wc = wc.to(tl.float32)
            ws = ws.to(tl.float32)
        acc_wc = tl.zeros((IS, BLOCK_R), dtype=tl.float32)
        acc_ws = tl.zeros((IS, BLOCK_R), dtype=tl.float32)
        acc_th = tl.zeros((BLOCK_I, S_PAD), dtype=tl.float32)
        acc_ph = tl.zeros((BLOCK_I, S_PAD), dtype=tl.float32)
        row_end = tl.minimum(ROWS, (sp + 1) * ROWS_PER_SPLIT)
        for t0 in range(sp * ROWS_PER_SPLIT, row_end, BLOCK_N):
            rows = t0 + tl.arange(0, BLOCK_N)
            row_ok = rows < row_end
            bb = rows // L
            n = rows - bb * L
            x_rows = bb.to(tl.int64) * sxb + n.to(tl.int64) * sxl + h.to(tl.int64) * sxh
            x_ok = row_ok[:, None] & i_ok[None, :]
            xt = tl.load(X + x_rows[:, None] + offs_i[None, :] * sxd, mask=x_ok, other=0.0).to(tl.float32)
            g = tl.load(G + bb.to(tl.int64)[:, None] * sgb + n.to(tl.int64)[:, None] * sgl
                        + h.to(tl.int64) * sgh + offs_r[None, :] * sgr,
                        mask=row_ok[:, None] & r_ok[None, :], other=0.0)            # (N, R)
            if UPCAST:
                g = g.to(tl.float32)
            pos = n.to(tl.float32)[:, None, None]
            c, s = _cos_sin(pos * th[None, :, :] + ph[None, :, :], FAST)          # (N, I, S)
            if NEED_DW:
                zc = tl.reshape(xt[:, :, None] * c, (BLOCK_N, IS)).to(g.dtype)
                zs = tl.reshape(xt[:, :, None] * s, (BLOCK_N, IS)).to(g.dtype)
                acc_wc += _mm_at(tl.trans(zc), g, UPCAST, _TF32X3)
                acc_ws += _mm_at(tl.trans(zs), g, UPCAST, _TF32X3)
            if NEED_DZ:
                dzc = _mm_at(g, tl.trans(wc), UPCAST, _TF32X3)
                dzs = _mm_at(g, tl.trans(ws), UPCAST, _TF32X3)
                dzc = tl.reshape(dzc, (BLOCK_N, BLOCK_I, S_PAD))
                dzs = tl.reshape(dzs, (BLOCK_N, BLOCK_I, S_PAD))
                dx = tl.sum(dzc * c + dzs * s, axis=2)                                # (N, I)
                dx_ptr = DX + (bb.to(tl.int64) * L + n)[:, None] * (H * D) + h * D + offs_i[None, :]
                if ATOMIC_DX:
                    tl.atomic_add(dx_ptr, dx, mask=x_ok)
                else:
                    tl.store(dx_ptr, dx.to(DX.dtype.element_ty), mask=x_ok)
                dang = xt[:, :, None] * (c * dzs - s * dzc)
                acc_ph += tl.sum(dang, axis=0)
                acc_th += tl.sum(dang * pos, axis=0)
        if NEED_DW:
            # partial sums of this split: DW (splits, H, D, 2S, R), rows (i, j) as in W
            dw_ptr = DW + sp.to(tl.int64) * (H * D * 2 * S * R) + w_row[:, None] * R + offs_r[None, :]
            tl.store(dw_ptr, acc_wc, mask=w_ok)
            tl.store(dw_ptr + S * R, acc_ws, mask=w_ok)
        if NEED_DZ:
            # partial sums of this split and output block: (splits, output blocks, H, D, S)
            part = (sp * (tl.num_programs(0) // n_iblocks) + rb).to(tl.int64) * (H * D * S)
            tl.store(DTH + part + idx, acc_th, mask=is_ok)
            tl.store(DPH + part + idx, acc_ph, mask=is_ok)


def _check(x, theta, phase, weight):
    if x.dim() != 4 or theta.dim() != 3 or weight.dim() != 4:
        raise ValueError("srpe_filter_sines: expected x (B, L, H, d), theta (H, d, S), "
                         f"weight (H, d, 2S, R); got {tuple(x.shape)}, {tuple(theta.shape)}, "
                         f"{tuple(weight.shape)}")
    B, L, H, d = x.shape
    S = theta.shape[2]
    if tuple(theta.shape) != (H, d, S) or tuple(weight.shape[:3]) != (H, d, 2 * S) or (
            phase is not None and tuple(phase.shape) != (H, d, S)):
        raise ValueError(f"srpe_filter_sines: inconsistent shapes x {tuple(x.shape)}, theta "
                         f"{tuple(theta.shape)}, phase {None if phase is None else tuple(phase.shape)}, "
                         f"weight {tuple(weight.shape)}")
    if x.dtype not in (*_DTYPES, torch.float64) or weight.dtype != x.dtype:
        raise TypeError("srpe_filter_sines: x and weight must share one floating dtype, got "
                        f"{x.dtype} and {weight.dtype}")
    if not theta.is_floating_point() or (phase is not None and phase.dtype != theta.dtype):
        raise TypeError("srpe_filter_sines: theta and phase must share one floating dtype")


def kernel_ok(x, theta, weight):
    """Whether the Triton kernel serves the call: CUDA (or the interpreter's CPU tensors), fp16 /
    bf16 / fp32, fp32 angles, a grid within CUDA's limits, nothing empty."""
    if triton is None or not (x.is_cuda or _INTERPRET) or x.dtype not in _DTYPES:
        return False
    B, L, H, d = x.shape
    return (theta.dtype == torch.float32 and 0 < B * H <= _MAX_GRID and L > 0 and d > 0
            and theta.shape[2] > 0 and weight.shape[3] > 0)


def _tiles(cfg, S, R):
    """(S_PAD, BLOCK_I, BLOCK_R) of a launch for S sines and R outputs."""
    S_PAD = triton.next_power_of_2(S)
    return S_PAD, max(1, cfg.rows // S_PAD), min(max(triton.next_power_of_2(R), 16), cfg.block_r)


def _upcast(x):
    # the products' operands in fp32 for fp32 inputs (and in the interpreter, which has no fp16 dot)
    return _INTERPRET or x.dtype == torch.float32


def _launch(x, theta, phase, weight, cfg=FORWARD):
    B, L, H, d = x.shape
    S, R = theta.shape[2], weight.shape[3]
    out = torch.empty((B, L, H, R), device=x.device, dtype=x.dtype)
    upcast = _upcast(x)
    # the products' operand: fp32 for fp32 inputs, else fp16 (x·omega is within |x|, W small)
    w = weight.contiguous().to(torch.float32 if upcast else torch.float16)
    S_PAD, BLOCK_I, BLOCK_R = _tiles(cfg, S, R)
    grid = (triton.cdiv(L, cfg.block_n), B * H, triton.cdiv(R, BLOCK_R))
    theta = theta.contiguous()
    _launcher(_srpe_sines_kernel)[grid](
        x, theta, phase.contiguous() if phase is not None else theta, w, out, L, H, d, S, R,
        *x.stride(), *out.stride(), HAS_PHASE=phase is not None, UPCAST=upcast, FAST=not _INTERPRET,
        BLOCK_N=cfg.block_n, BLOCK_I=BLOCK_I, S_PAD=S_PAD, BLOCK_R=BLOCK_R, num_warps=cfg.warps)
    return out


def _launch_backward(grad, x, theta, phase, weight, need_dz, need_dw, cfg=None, splits=None):
    """The kernel's gradients ``(dx, dtheta, dphase, dweight)`` (None where not needed: need_dz
    covers dx, dtheta and dphase). ``splits``: how many row ranges (default: enough programs to keep
    every SM busy)."""
    B, L, H, d = x.shape
    S, R = theta.shape[2], weight.shape[3]
    upcast = _upcast(x)
    cfg = cfg or BACKWARD
    S_PAD, BLOCK_I, BLOCK_R = _tiles(cfg, S, R)
    r_blocks = triton.cdiv(R, BLOCK_R)
    blocks = triton.cdiv(d, BLOCK_I) * r_blocks
    rows = B * L
    if splits is None:
        splits = max(1, _BACKWARD_PER_SM * _num_sms(x.device) // (blocks * H))
    per_split = triton.cdiv(triton.cdiv(rows, min(splits, triton.cdiv(rows, cfg.block_n))),
                            cfg.block_n) * cfg.block_n
    splits = triton.cdiv(rows, per_split)
    atomic = r_blocks > 1   # dx: a sum over the output blocks
    dev, f32 = x.device, torch.float32
    dx = dangles = dw = None
    if need_dz:
        dx = torch.zeros(x.shape, device=dev, dtype=f32 if atomic else x.dtype)   # contiguous
        # the angles' partial sums per row range and output block: theta's, then the phases'
        dangles = torch.empty((2, splits * r_blocks, H, d, S), device=dev, dtype=f32)
    if need_dw:
        dw = torch.empty((splits, H, d, 2 * S, R), device=dev, dtype=f32)
    theta = theta.contiguous()
    unused = x   # stands in for outputs not asked for: their stores are compiled out
    _launcher(_srpe_sines_bwd_kernel)[(blocks, H, splits)](
        x, theta, phase.contiguous() if phase is not None else theta,
        weight.contiguous().to(f32 if upcast else x.dtype), grad,
        unused if dx is None else dx, unused if dw is None else dw,
        unused if dangles is None else dangles[0], unused if dangles is None else dangles[1],
        L, H, d, S, R, rows, per_split, *x.stride(), *grad.stride(),
        HAS_PHASE=phase is not None, NEED_DZ=need_dz, NEED_DW=need_dw, ATOMIC_DX=atomic,
        UPCAST=upcast, FAST=not _INTERPRET, BLOCK_N=cfg.block_n, BLOCK_I=BLOCK_I, S_PAD=S_PAD,
        BLOCK_R=BLOCK_R, num_warps=cfg.warps)
    dw = None if dw is None else dw.sum(0).to(weight.dtype)
    if dx is None:
        return None, None, None, dw
    dtheta, dphase = dangles.sum(1).to(theta.dtype).unbind(0)
    return dx.to(x.dtype), dtheta, (dphase if phase is not None else None), dw


def srpe_filter_sines_reference(x, theta, phase, weight):
    """Plain torch: the whole sequence's bases (``sine_bases``, in x's dtype) into
    ``panther::srpe_filter``; the bench's "materialised" route."""
    omega = sine_bases(theta, phase, x.shape[1]).to(x.dtype)
    return torch.ops.panther.srpe_filter(x, omega, weight)


@torch.library.triton_op("panther::srpe_filter_sines", mutates_args=())
def srpe_filter_sines_op(x: Tensor, theta: Tensor, phase: Optional[Tensor], weight: Tensor) -> Tensor:
    """``panther::srpe_filter`` with ``omega = sine_bases(theta, phase, L)`` built on chip."""
    _check(x, theta, phase, weight)
    if kernel_ok(x, theta, weight):
        return _launch(x, theta, phase, weight)
    return srpe_filter_sines_forward(x, theta, phase, weight)


def _setup_context(ctx, inputs, output):
    x, theta, phase, weight = inputs
    ctx.save_for_backward(x, theta, phase, weight)
    ctx.has_phase = phase is not None


def _backward(ctx, grad):
    """The kernel's backward where it serves the call (bases rebuilt on chip), else
    ``srpe_filter_sines_backward`` (bases rebuilt a block of positions at a time)."""
    x, theta, phase, weight = ctx.saved_tensors
    if not ctx.has_phase:
        phase = None
    if not kernel_ok(x, theta, weight):
        return srpe_filter_sines_backward(grad, x, theta, phase, weight, ctx.needs_input_grad)
    need_x, need_theta, need_phase, need_w = ctx.needs_input_grad
    dx, dtheta, dphase, dw = _launch_backward(grad, x, theta, phase, weight,
                                              need_x or need_theta or need_phase, need_w)
    return (dx if need_x else None, dtheta if need_theta else None, dphase if need_phase else None,
            dw if need_w else None)


srpe_filter_sines_op.register_autograd(_backward, setup_context=_setup_context)


def srpe_filter_sines(x, theta, phase, weight):
    """``out[b, n, h, r] = sum_{i, j} x[b, n, h, i] omega[n, h, i, j] weight[h, i, j, r]`` with
    ``omega = sine_bases(theta, phase, L)`` (never materialised on CUDA).

    Args:
        x: queries or keys ``(B, L, H, d)``, fp16 / bf16 / fp32 / fp64.
        theta: angular frequencies ``(H, d, S)``: fp32 (fp64 for fp64 ``x``).
        phase: phases ``(H, d, S)`` in theta's dtype, or None.
        weight: mixing ``(H, d, 2S, R)`` in x's dtype.

    Returns:
        ``(B, L, H, R)`` in x's dtype.

    Raises:
        ValueError: inconsistent shapes.
        TypeError: mismatched dtypes.
    """
    return torch.ops.panther.srpe_filter_sines(x, theta, phase, weight)


def _peak_mib(fn, dev):
    """Peak memory (MiB) allocated during one call above what was allocated before it (CUDA)."""
    if dev.type != "cuda":
        fn()
        return 0.0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return round((torch.cuda.max_memory_allocated() - base) / 2 ** 20, 1)


def bench_srpe(cases=None, H=16, d=64, sines=8, R=64, dtype=torch.bfloat16, device="cuda"):
    """Rows timing ``sinSRPE.filter``'s contraction of the queries (phases on) both ways: the fused
    op (bases on chip) against the bases materialised by ``sine_bases`` and contracted by the C++
    ``panther::srpe_filter`` (``srpe_filter_sines_reference``): forward, forward +
    backward (x, theta, phase and the weights all take gradients), each call's peak memory, and the
    forward's relative error between the two. ``cases``: (L, B) pairs. Off CUDA (the interpreter smoke
    test of this code) nothing is timed."""
    dev = torch.device(device)
    rows = []
    for L, B in cases or [(65536, 1), (4096, 16)]:
        g = torch.Generator(device=dev).manual_seed(0)
        x = torch.randn(B, L, H, d, device=dev, dtype=dtype, generator=g)
        theta = torch.rand(H, d, sines, device=dev, generator=g) * 0.05
        phase = torch.randn(H, d, sines, device=dev, generator=g)
        w = (torch.randn(H, d, 2 * sines, R, device=dev, generator=g) / (d * sines) ** 0.5).to(dtype)
        ways = {"fused": srpe_filter_sines, "materialised": srpe_filter_sines_reference}
        err = _rel(ways["fused"](x, theta, phase, w), ways["materialised"](x, theta, phase, w))
        line = {"case": f"L={L} B={B} H={H} d={d} sines={sines} R={R}",
                "fused vs materialised rel err": f"{err:.2e}"}
        args = [t.detach().requires_grad_() for t in (x, theta, phase, w)]
        go = torch.randn(B, L, H, R, device=dev, dtype=dtype, generator=g)
        for name, fn in ways.items():
            with torch.no_grad():
                line[f"{name} fwd ms"] = _time_ms(lambda: fn(x, theta, phase, w))
                line[f"{name} fwd peak MiB"] = _peak_mib(lambda: fn(x, theta, phase, w), dev)

            def train(fn=fn):
                return torch.autograd.grad(fn(*args), args, go)
            line[f"{name} fwd+bwd ms"] = _time_ms(train)
            line[f"{name} fwd+bwd peak MiB"] = _peak_mib(train, dev)
        print(line, flush=True)
        rows.append(line)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return rows
