"""Fused Triton forward kernels for ``panther::sketched_conv2d`` (the SKConv2d layer).

The layer is a convolution to a thin rank ``R = 2·L·k`` followed by a 1×1 channel mix:

    z   = conv(x, S1s)                          (N, R, Ho, Wo)   S1s (R, C_in, kh, kw)
    out = Mixᵀ·z / (2L) + bias                  (N, C_out, Ho, Wo), Mix = U1s as (R, C_out)

For small R the pair is memory bound: the floor is reading x once and writing out once. The ATen
path (cuDNN conv to R channels, then a GEMM) also writes and re-reads z and pays two launches with
poor tensor-core shapes. Here one kernel does everything as an implicit GEMM over NHWC memory:

    * each program owns BLOCK_P output pixels (flattened n·Ho·Wo) and accumulates their
      (BLOCK_P × R_PAD) z tile in fp32 registers by looping over the kh·kw taps and C_in in
      BLOCK_C chunks: the x tile of a tap is a (BLOCK_P × BLOCK_C) load at shifted / strided
      positions (out-of-image positions masked to zero = the zero padding), contiguous along the
      channels in channels_last memory; it meets the matching (BLOCK_C × R_PAD) slice of the
      weight, pre-arranged by one cheap host-side permute into (kh·kw, C_in, R_PAD);
    * z is rounded once to the input dtype (as the ATen path's intermediate tensor is) and
      multiplied by Mix in BLOCK_N column chunks; the 1/(2L) scale is applied to the fp32
      result, the bias added, and the (BLOCK_P × BLOCK_N) tile stored straight into the output
      (channels_last output for channels_last input: rows are pixels, columns channels).

z never reaches HBM. Loop order over (tap, channel chunk) is a launch parameter (``TAPS_INNER``:
the kh·kw taps of one channel chunk back to back, whose x tiles overlap, so they can hit in
L1/L2), as is an L1-caching hint on the x loads (``X_CA``).

That "direct" kernel reads each x element kh·kw times from L2 (about 0.9 GB for issue [D]'s
workload, against 0.1 GB from HBM). The "rowtap" kernel (unit column stride) cuts that by kw:
a program owns a strip of whole output rows, loads each row tap's input strip once and
multiplies it by all kw column taps in a wider GEMM (N = kw·R_PAD, as two power-of-two parts),
then folds the column taps with a shifted gather of the fp32 accumulators. Which one serves the op is ``ALGO``;
``python -m inductor_ext.triton_conv_bench --sweep`` times both. Before either, the op takes the
"tap-GEMM" path (``triton_conv_tap``: one cuBLAS GEMM to kh·kw·R columns, then one gather-sum-mix
kernel) for the calls ``triton_conv_tap.TAP_GEMM`` names (default: stride 1, channels_last).

Registered as ``torch.library.triton_op("panther::sketched_conv2d_triton")`` with the arguments of
``panther::sketched_conv2d``; the autograd is that op's (``panther/ops/conv.py``: cuDNN
``convolution_backward`` on the mixed-back gradient). A device branch sends CPU tensors, float64,
NCHW CUDA inputs (the kernel's loads want contiguous channels; cuDNN handles NCHW well) and
anything unusual (empty tensors, rank > ``MAX_RANK``, invalid arguments: the C++ op raises the
error) to ``torch.ops.panther.sketched_conv2d``. Under ``TRITON_INTERPRET=1`` (set before triton
is imported) CPU tensors run the kernel in Triton's interpreter instead, eager only: that is how
CPU CI checks its arithmetic.
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

import panther  # noqa: F401  (loads the native op the fallback calls)
from panther.ops.conv import _backward as _conv_backward
from panther.ops.conv import _pair
from panther.ops.conv import _setup_context as _conv_setup_context
from panther.ops.conv import _wants_channels_last

try:  # Triton is optional: without it every call takes the C++ op.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with Linux torch wheels
    triton = None

__all__ = [
    "sketched_conv2d_triton",
    "sketched_conv2d_triton_op",
    "kernel_ok",
    "rowtap_ok",
    "conv_forward",
    "kernel_configs",
    "config_fits",
    "smem_bytes",
    "tuned_configs",
    "ALGO",
    "ALGOS",
    "MAX_RANK",
    "MAX_ROWTAP_WIDTH",
    "NCHW_KERNEL",
    "SMEM_LIMIT",
]

# Hopper's per-block shared-memory limit (227 KiB). Every config is checked against it.
SMEM_LIMIT = 227 * 1024
# Largest 2·L·k the kernel takes (padded to a power of two): the fp32 z tile lives in registers.
MAX_RANK = 256

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Whether NCHW-contiguous inputs take the kernel (its loads are then strided along the channels,
# so on CUDA they go to cuDNN by default). The interpreter takes them, so CPU CI checks that path
# through the op as well.
NCHW_KERNEL = _INTERPRET

# tl.dot flavours (constexprs of the kernel).
_DOT_NATIVE, _DOT_TF32, _DOT_IEEE, _DOT_UPCAST = 0, 1, 2, 3


def _next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def _rank_pad(r: int) -> int:
    """Register width of z: a power of two, at least 16 (tl.dot's minimum)."""
    return max(16, _next_pow2(r))


# --------------------------------------------------------------------------------------------
# The kernel
# --------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _mma(a, b, acc, DOT_MODE: tl.constexpr):
        if DOT_MODE == 3:
            # Triton's CPU interpreter multiplies bf16 bit patterns wrongly; upcasting is exact.
            out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        elif DOT_MODE == 1:
            out = tl.dot(a, b, acc, input_precision="tf32")
        elif DOT_MODE == 2:
            out = tl.dot(a, b, acc, input_precision="ieee")
        else:
            out = tl.dot(a, b, acc)
        return out

    @triton.jit
    def _sketched_conv2d_kernel(
        X, WM, MIX, BIAS, OUT,
        P, C_IN, C_OUT, H, W, HO, WO,
        sxn, sxc, sxh, sxw,
        swt, swc,
        smr, smn,
        son, soc, soh, sow,
        stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
        TWO_L,
        P_BUCKET,
        KH: tl.constexpr,
        KW: tl.constexpr,
        R_PAD: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        DOT_CONV: tl.constexpr,
        DOT_MIX: tl.constexpr,
        BLOCK_P: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_N: tl.constexpr,
        TAPS_INNER: tl.constexpr,
        X_CA: tl.constexpr,
    ):
        """OUT[p, :] = (conv(X, WM)[p, :] rounded to X's dtype)·MIX / TWO_L + BIAS, p = (n, ho, wo).

        X (N, C_IN, H, W) and OUT (N, C_OUT, HO, WO) by strides (channels_last: sxc = soc = 1);
        WM (KH·KW, C_IN, R_PAD) with unit stride along the rank (zero columns past 2Lk);
        MIX (R_PAD, C_OUT) (zero rows past 2Lk). Grid: (pixel blocks, column groups). Column
        group g writes a contiguous range of OUT's channel tiles; every group recomputes its
        pixels' z. One group is the memory-floor layout (x read once); more groups only help
        when there are few pixel blocks.
        """
        pid_p = tl.program_id(0)
        pid_g = tl.program_id(1)
        offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        mask_p = offs_p < P
        hw = HO * WO
        n = offs_p // hw
        rem = offs_p - n * hw
        ho = rem // WO
        wo = rem - ho * WO
        h0 = ho * stride_h - pad_h
        w0 = wo * stride_w - pad_w
        n64 = n.to(tl.int64)
        # element offsets can pass 2**31: rows in int64
        x_row = n64 * sxn + h0.to(tl.int64) * sxh + w0.to(tl.int64) * sxw
        offs_c = tl.arange(0, BLOCK_C)
        offs_r = tl.arange(0, R_PAD)

        # ---- phase 1: the (BLOCK_P, R_PAD) z tile, implicit GEMM over (tap, channel) ----------
        KK = KH * KW
        n_cb = tl.cdiv(C_IN, BLOCK_C)
        acc = tl.zeros((BLOCK_P, R_PAD), dtype=tl.float32)
        # (tap, channel chunk) as carried counters: no run-time division per iteration
        tap = pid_p * 0
        cb = pid_p * 0
        for _ in range(0, KK * n_cb):
            ti = tap // KW
            tj = tap - ti * KW
            dh = ti * dil_h
            dw = tj * dil_w
            hi = h0 + dh
            wi = w0 + dw
            ok = mask_p & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
            cs = cb * BLOCK_C + offs_c
            mask_c = cs < C_IN
            x_ptrs = X + (x_row + dh * sxh + dw * sxw)[:, None] + cs[None, :] * sxc
            x_mask = ok[:, None] & mask_c[None, :]
            if X_CA:
                xt = tl.load(x_ptrs, mask=x_mask, other=0.0, cache_modifier=".ca")
            else:
                xt = tl.load(x_ptrs, mask=x_mask, other=0.0)
            wt = tl.load(WM + tap * swt + cs[:, None] * swc + offs_r[None, :], mask=mask_c[:, None],
                         other=0.0)
            acc = _mma(xt, wt, acc, DOT_CONV)
            if TAPS_INNER:
                wrap = tap == KK - 1
                cb = tl.where(wrap, cb + 1, cb)
                tap = tl.where(wrap, 0, tap + 1)
            else:
                wrap = cb == n_cb - 1
                tap = tl.where(wrap, tap + 1, tap)
                cb = tl.where(wrap, 0, cb + 1)

        # Round once to the input dtype: the second GEMM's operand is what the ATen path's z
        # tensor holds (and the tensor cores want matching operand types).
        z = acc.to(X.dtype.element_ty)

        # ---- phase 2: this group's output channel tiles, out written once --------------------
        o_row = n64 * son + ho.to(tl.int64) * soh + wo.to(tl.int64) * sow
        # 1/(2L) from an int argument: an fp32 scalar (Inductor may pass Python floats as fp64)
        _mix_store(z, MIX, BIAS, OUT, o_row, mask_p, C_OUT, smr, smn, soc, 1.0 / TWO_L, pid_g,
                   R_PAD, HAS_BIAS, DOT_MIX, BLOCK_P, BLOCK_N)

    @triton.jit
    def _mix_store(z, MIX, BIAS, OUT, o_row, o_ok, C_OUT, smr, smn, soc, scale, pid_g,
                   R_PAD: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_MIX: tl.constexpr,
                   BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
        """OUT[rows, tiles of this group] = scale·z·MIX + BIAS, z (BLOCK_P, R_PAD) in registers;
        o_row: each row's element offset in OUT, o_ok: the rows to write."""
        offs_r = tl.arange(0, R_PAD)
        n_tiles = tl.cdiv(C_OUT, BLOCK_N)
        per_group = tl.cdiv(n_tiles, tl.num_programs(1))
        t_begin = pid_g * per_group
        t_end = tl.minimum(t_begin + per_group, n_tiles)
        offs_n = tl.arange(0, BLOCK_N)
        if HAS_BIAS:
            # Prefetched one tile ahead: a plain load used right away would stall every iteration
            # on L2 latency (the pipeliner only prefetches the loads feeding tl.dot).
            b_cols = t_begin * BLOCK_N + offs_n
            bias_next = tl.load(BIAS + b_cols, mask=b_cols < C_OUT, other=0.0)
        for t in range(t_begin, t_end):
            cols = t * BLOCK_N + offs_n
            mask_n = cols < C_OUT
            if HAS_BIAS:
                bias_tile = bias_next
                bias_next = tl.load(BIAS + cols + BLOCK_N, mask=(cols + BLOCK_N) < C_OUT, other=0.0)
            m = tl.load(MIX + offs_r[:, None] * smr + cols[None, :] * smn, mask=mask_n[None, :],
                        other=0.0)
            o = _mma(z, m, tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32), DOT_MIX)
            o = o * scale
            if HAS_BIAS:
                o += bias_tile.to(tl.float32)[None, :]
            tl.store(OUT + o_row[:, None] + cols[None, :] * soc, o.to(OUT.dtype.element_ty),
                     mask=o_ok[:, None] & mask_n[None, :])

    @triton.jit
    def _sketched_conv2d_rowtap_kernel(
        X, WR, MIX, BIAS, OUT,
        C_IN, C_OUT, H, W, HO, WO, W_SPAN,
        sxn, sxc, sxh, sxw,
        swi, swc,
        smr, smn,
        son, soc, soh, sow,
        stride_h, pad_h, pad_w, dil_h, dil_w,
        TWO_L,
        P_BUCKET,
        KH: tl.constexpr,
        KW: tl.constexpr,
        KW_A: tl.constexpr,
        KW_B: tl.constexpr,
        R_PAD: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        DOT_CONV: tl.constexpr,
        DOT_MIX: tl.constexpr,
        BLOCK_P: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_N: tl.constexpr,
        TAPS_INNER: tl.constexpr,
        X_CA: tl.constexpr,
    ):
        """The same result for stride_w == 1, with x loaded kw times less often.

        A program owns ROWS output rows × BW_OUT consecutive output columns of one image
        (BW = min(W_SPAN, BLOCK_P) input columns per row, W_SPAN = next_pow2(WO + (KW-1)·dil_w),
        ROWS = BLOCK_P // BW, BW_OUT = BW - (KW-1)·dil_w). For each row tap i it loads the
        (ROWS·BW × BLOCK_C) input strip ONCE and multiplies it by all column taps at once:
        WR (KH, C_IN, (KW_A + KW_B)·R_PAD) holds column tap j's weights in columns
        [j·R_PAD, (j+1)·R_PAD). tl.dot wants power-of-two widths, so the taps go in two groups:
        the first KW_A (a power of two) and the rest, padded to KW_B (a power of two or 0; for
        3 taps 2 + 1, no padding). Strip element q (input column c0 + q) feeds output column
        q - j·dil_w through tap j, so at the end z[f] = Σ_j acc[f + j·dil_w, j-th column block]:
        a row gather of each fp32 accumulator (through shared memory), then a sum over the taps.
        """
        pid = tl.program_id(0)
        pid_g = tl.program_id(1)
        HALO = (KW - 1) * dil_w
        BW = tl.minimum(W_SPAN, BLOCK_P)
        BW_OUT = BW - HALO
        ROWS = BLOCK_P // BW
        n_wb = tl.cdiv(WO, BW_OUT)
        n_hb = tl.cdiv(HO, ROWS)
        wb = pid % n_wb
        tmp = pid // n_wb
        hb = tmp % n_hb
        n = tmp // n_hb
        f = tl.arange(0, BLOCK_P)
        r = f // BW
        q = f - r * BW
        ho = hb * ROWS + r
        wo = wb * BW_OUT + q          # row f's output column (when q < BW_OUT)
        wi = wo - pad_w               # strip element q's input column (tap j: output q - j·dil_w)
        row_ok = (ho < HO) & (wi >= 0) & (wi < W)
        h0 = ho * stride_h - pad_h
        n64 = n.to(tl.int64)
        x_row = n64 * sxn + h0.to(tl.int64) * sxh + wi.to(tl.int64) * sxw
        offs_c = tl.arange(0, BLOCK_C)
        offs_a = tl.arange(0, KW_A * R_PAD)
        offs_b = tl.arange(0, KW_B * R_PAD if KW_B > 0 else R_PAD)  # unused when KW_B == 0

        acc_a = tl.zeros((BLOCK_P, KW_A * R_PAD), dtype=tl.float32)
        acc_b = tl.zeros((BLOCK_P, KW_B * R_PAD if KW_B > 0 else R_PAD), dtype=tl.float32)
        n_cb = tl.cdiv(C_IN, BLOCK_C)
        ti = pid * 0
        cb = pid * 0
        for _ in range(0, KH * n_cb):
            dh = ti * dil_h
            hi = h0 + dh
            ok = row_ok & (hi >= 0) & (hi < H)
            cs = cb * BLOCK_C + offs_c
            mask_c = cs < C_IN
            x_ptrs = X + (x_row + dh * sxh)[:, None] + cs[None, :] * sxc
            x_mask = ok[:, None] & mask_c[None, :]
            if X_CA:
                xt = tl.load(x_ptrs, mask=x_mask, other=0.0, cache_modifier=".ca")
            else:
                xt = tl.load(x_ptrs, mask=x_mask, other=0.0)
            w_row = WR + ti * swi + cs[:, None] * swc
            wa = tl.load(w_row + offs_a[None, :], mask=mask_c[:, None], other=0.0)
            acc_a = _mma(xt, wa, acc_a, DOT_CONV)
            if KW_B > 0:
                wb_t = tl.load(w_row + KW_A * R_PAD + offs_b[None, :], mask=mask_c[:, None], other=0.0)
                acc_b = _mma(xt, wb_t, acc_b, DOT_CONV)
            if TAPS_INNER:
                wrap = ti == KH - 1
                cb = tl.where(wrap, cb + 1, cb)
                ti = tl.where(wrap, 0, ti + 1)
            else:
                wrap = cb == n_cb - 1
                ti = tl.where(wrap, ti + 1, ti)
                cb = tl.where(wrap, 0, cb + 1)

        # fold the column taps; rows past the block only reach outputs q >= BW_OUT (not stored)
        src = tl.minimum(f[:, None] + (offs_a // R_PAD)[None, :] * dil_w, BLOCK_P - 1)
        zf = tl.sum(tl.reshape(tl.gather(acc_a, src, axis=0), (BLOCK_P, KW_A, R_PAD)), axis=1)
        if KW_B > 0:
            src = tl.minimum(f[:, None] + (KW_A + offs_b // R_PAD)[None, :] * dil_w, BLOCK_P - 1)
            zf += tl.sum(tl.reshape(tl.gather(acc_b, src, axis=0), (BLOCK_P, KW_B, R_PAD)), axis=1)
        z = zf.to(X.dtype.element_ty)
        o_ok = (q < BW_OUT) & (wo < WO) & (ho < HO)
        o_row = n64 * son + ho.to(tl.int64) * soh + wo.to(tl.int64) * sow
        _mix_store(z, MIX, BIAS, OUT, o_row, o_ok, C_OUT, smr, smn, soc, 1.0 / TWO_L, pid_g,
                   R_PAD, HAS_BIAS, DOT_MIX, BLOCK_P, BLOCK_N)


# --------------------------------------------------------------------------------------------
# Launch configurations
# --------------------------------------------------------------------------------------------
# Which kernel serves calls both can take: "direct" (_sketched_conv2d_kernel, any stride) or
# "rowtap" (_sketched_conv2d_rowtap_kernel: stride_w == 1, x loaded kw times less often, at the
# price of a fold (gather) per program and a few wasted strip columns). Not yet measured on the
# GPU: "rowtap" because, by the byte count, issue [D]'s workload moves ~0.6 GB through L2 with
# it against ~1.1 GB with "direct". `python -m inductor_ext.triton_conv_bench --sweep` times both.
ALGO = "rowtap"
ALGOS = ("direct", "rowtap")

# (BLOCK_P, BLOCK_C, BLOCK_N, num_warps, num_stages, TAPS_INNER, X_CA), best guess first; the
# autotuner tries the first _MAX_CONFIGS that fit a bucket. The bench's sweep re-ranks them.
# Offline sm_90 compiles (bf16, 3x3, rank 32) guided the order: a 128-wide output tile costs
# ~60 more registers per thread than a 64-wide one (152 vs 90 with 8 warps), which halves the
# programs an SM holds; two or more resident programs let one's loads overlap another's stores.
_CANDIDATES = {
    "direct": (
        (128, 64, 64, 8, 3, 0, 0),    # 90 regs, 60 KB smem: 2 programs / SM
        (128, 64, 64, 4, 3, 0, 0),    # 148 regs: 3 / SM
        (64, 64, 64, 4, 4, 0, 0),     # 92 regs, 48 KB: 4 / SM
        (256, 64, 32, 8, 3, 0, 0),    # 110 regs, 108 KB: 2 / SM
        (128, 64, 128, 8, 3, 0, 0),   # 152 regs: 1 / SM
        (64, 32, 64, 4, 2, 0, 0),
        (32, 32, 32, 4, 2, 0, 0),
    ),
    "rowtap": (
        (128, 64, 64, 8, 3, 0, 0),    # 124 regs, 84 KB: 2 / SM
        (128, 32, 64, 8, 3, 0, 0),    # 95 regs, 42 KB: 2 / SM
        (64, 64, 64, 4, 2, 0, 0),     # 96 regs, 40 KB: 5 / SM
        (64, 32, 64, 4, 4, 0, 0),     # 96 regs, 40 KB: 5 / SM
        (256, 32, 64, 16, 3, 0, 0),
        (64, 32, 64, 4, 2, 0, 0),
        (32, 32, 32, 4, 2, 0, 0),
        (16, 32, 32, 4, 2, 0, 0),
    ),
}
_MAX_CONFIGS = 4
# The rowtap kernel's phase-1 accumulators are (BLOCK_P, kw_split·R_PAD) together: at most this wide.
MAX_ROWTAP_WIDTH = 256


def smem_bytes(block_p, block_c, block_n, num_stages, width, elem_size, r_pad=None, gather=False):
    """An upper bound on one program's shared memory: the largest of the buffers live together.

    phase 1: num_stages copies of the x tile and the weight tile (``width`` columns: R_PAD, or
    (kw_a + kw_b)·R_PAD for the rowtap kernel); the rowtap kernel's fold, whose gather stages the fp32
    accumulator in shared memory; phase 2: num_stages copies of the Mix tile plus the z operand,
    and the epilogue's layout conversion of the output tile (counted as fp32). Triton gives
    buffers of disjoint lifetimes the same memory; the sm_90 compile test checks the real figure.
    """
    r_pad = width if r_pad is None else r_pad
    phase1 = num_stages * (block_p * block_c + block_c * width) * elem_size
    fold = block_p * width * 4 if gather else 0
    phase2 = num_stages * r_pad * block_n * elem_size + block_p * r_pad * elem_size + block_p * block_n * 4
    return max(phase1, fold, phase2)


def _acc_registers(block_p, block_n, width, num_warps):
    """fp32 accumulator registers per thread: the phase-1 tile and the output tile."""
    return (block_p * width + block_p * block_n) // (32 * num_warps)


def config_fits(block_p, block_c, block_n, num_warps, num_stages, width, elem_size, r_pad=None,
                gather=False):
    """Within Hopper's shared memory, an accumulator budget that leaves room for addresses (at
    most 3/4 of a thread's share of the register file, and 128), and tl.dot's minimum tile of 16."""
    acc_budget = min(128, 3 * (65536 // (32 * num_warps)) // 4)
    return (smem_bytes(block_p, block_c, block_n, num_stages, width, elem_size, r_pad, gather) <= SMEM_LIMIT
            and _acc_registers(block_p, block_n, width, num_warps) <= acc_budget
            and min(block_p, block_c, block_n) >= 16)


def _as_config(c):
    bp, bc, bn, warps, stages, taps_inner, ca = c
    return triton.Config({"BLOCK_P": bp, "BLOCK_C": bc, "BLOCK_N": bn, "TAPS_INNER": taps_inner,
                          "X_CA": ca}, num_warps=warps, num_stages=stages)


def _kw_split(kw):
    """Column taps as (a power of two, the rest padded to a power of two or 0): 3 -> (2, 1)."""
    a = 1 << (int(kw).bit_length() - 1)
    return a, (_next_pow2(kw - a) if kw > a else 0)


def _width(algo, r_pad, kw):
    """Columns of the phase-1 accumulator(s)."""
    return r_pad if algo == "direct" else sum(_kw_split(kw)) * r_pad


def kernel_configs(r_pad, elem_size, algo="direct", kw=3, candidates=None, limit=None):
    """The autotune candidates for one bucket (algorithm, rank padded, element size, and for
    rowtap the kernel width): the first ``limit`` (default ``_MAX_CONFIGS``) passing ``config_fits``."""
    limit = _MAX_CONFIGS if limit is None else limit
    width = _width(algo, r_pad, kw)
    out = []
    for c in candidates or _CANDIDATES[algo]:
        if config_fits(*c[:5], width, elem_size, r_pad, gather=algo == "rowtap"):
            out.append(_as_config(c))
        if len(out) == limit:
            break
    return out


# The interpreter cannot benchmark; it runs one small config (the checker passes others).
_INTERPRET_CONFIG = {"BLOCK_P": 16, "BLOCK_C": 16, "BLOCK_N": 16, "TAPS_INNER": 0, "X_CA": 0}

_AUTOTUNERS: dict = {}
_AUTOTUNE_KEYS = {
    "direct": ["P_BUCKET", "C_IN", "C_OUT", "KH", "KW", "stride_h", "stride_w"],
    "rowtap": ["P_BUCKET", "C_IN", "C_OUT", "KH", "KW", "WO", "stride_h"],
}


def _autotuned(algo, r_pad, elem_size, kw=3):
    """One Autotuner per bucket: its config list fits that bucket's shared-memory need. Kept so
    that the kernel object is stable (Inductor's kernel side table keys on it)."""
    key = (algo, r_pad, elem_size, _kw_split(kw) if algo == "rowtap" else 1)
    if key not in _AUTOTUNERS:
        if _INTERPRET:
            configs = [triton.Config(dict(_INTERPRET_CONFIG), num_warps=4, num_stages=1)]
        else:
            configs = kernel_configs(r_pad, elem_size, algo, kw)
        kernel = _sketched_conv2d_kernel if algo == "direct" else _sketched_conv2d_rowtap_kernel
        _AUTOTUNERS[key] = triton.autotune(configs=configs, key=_AUTOTUNE_KEYS[algo])(kernel) \
            if configs else None
    return _AUTOTUNERS[key]


def tuned_configs():
    """``{(algorithm, rank padded, element size, kw split): best config}`` chosen so far by eager
    autotuning."""
    return {k: getattr(v, "best_config", None) for k, v in _AUTOTUNERS.items() if v is not None}


def rowtap_ok(kw, stride_w, dil_w, r_pad):
    """Whether the rowtap kernel can serve a call: unit column stride, a column halo that fits the
    smallest tile (16), an accumulator of at most MAX_ROWTAP_WIDTH columns."""
    return stride_w == 1 and (kw - 1) * dil_w < 16 and _width("rowtap", r_pad, kw) <= MAX_ROWTAP_WIDTH


@functools.lru_cache(maxsize=None)
def _num_sms(device_index):
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _column_groups(p, c_out, device):
    """Column groups for few output pixels: enough programs to fill the GPU, each pixel block's
    z recomputed by every group. With many pixels, one group: x is read exactly once."""
    if device.type != "cuda":
        return 1
    sms = _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    blocks = (p + 127) // 128
    if blocks >= sms:
        return 1
    return max(1, min((sms + blocks - 1) // blocks, (c_out + 127) // 128, 8))


def _tf32(setting, legacy):
    """Whether an fp32 product may use TF32: the newer ``fp32_precision`` setting when set, else
    the legacy ``allow_tf32`` flag (reading it raises once the two APIs were mixed)."""
    precision = getattr(setting, "fp32_precision", "none")
    if precision in ("tf32", "ieee"):
        return precision == "tf32"
    try:
        return bool(legacy())
    except RuntimeError:
        return False


def _dot_modes(dtype):
    """(conv phase, mix phase) dot flavours. fp32 follows torch's policies for the two halves of
    the ATen path (cuDNN conv: TF32 by default; matmul: IEEE by default); half types use the
    tensor cores natively, upcast under the interpreter (which multiplies bf16 wrongly)."""
    if dtype == torch.float32:
        if _INTERPRET:
            return _DOT_IEEE, _DOT_IEEE
        cudnn = torch.backends.cudnn
        conv = _tf32(getattr(cudnn, "conv", None), lambda: cudnn.allow_tf32)
        mm = _tf32(torch.backends.cuda.matmul, lambda: torch.backends.cuda.matmul.allow_tf32)
        return (_DOT_TF32 if conv else _DOT_IEEE), (_DOT_TF32 if mm else _DOT_IEEE)
    return (_DOT_UPCAST, _DOT_UPCAST) if _INTERPRET else (_DOT_NATIVE, _DOT_NATIVE)


def _p_bucket(p):
    # The autotune key: pixel counts in one power-of-two bucket share a tuned config.
    return min(_next_pow2(p), 1 << 24) if isinstance(p, int) else 0


def _launcher(kernel):
    # Eager interpreter runs call the kernel directly (wrap_triton rejects CPU tensors there).
    return kernel if _INTERPRET else torch.library.wrap_triton(kernel)


# --------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------
def _arrange_weight(S1s, r_pad):
    """(R, C_in, kh, kw) -> (kh·kw, C_in, R_PAD), rank innermost, zero columns past R: one small
    copy (the weight is tiny next to x), so every weight tile load is contiguous."""
    R, C, kh, kw = S1s.shape
    w = S1s.permute(2, 3, 1, 0).reshape(kh * kw, C, R)
    return F.pad(w, (0, r_pad - R)) if r_pad != R else w.contiguous()


def _arrange_mix(U1s, r_pad):
    """(2L, k, C_out) -> (R_PAD, C_out), zero rows past R (a view when R is a power of two)."""
    two_l, k, c_out = U1s.shape
    m = U1s.reshape(two_l * k, c_out)
    return F.pad(m, (0, 0, 0, r_pad - two_l * k)) if r_pad != two_l * k else m


def _out_size(size, k, s, p, d):
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def _arrange_row_weight(S1s, r_pad):
    """(R, C_in, kh, kw) -> (kh, C_in, (kw_a + kw_b)·R_PAD): row tap i, channel c hold column tap
    j's weights in columns [j·R_PAD, j·R_PAD + R), zeros elsewhere (the rowtap kernel's layout)."""
    R, C, kh, kw = S1s.shape
    w = F.pad(S1s.permute(2, 1, 3, 0), (0, r_pad - R, 0, sum(_kw_split(kw)) - kw))
    return w.reshape(kh, C, -1)


def _rowtap_grid(block_p, N, Ho, Wo, halo):
    """Programs of the rowtap kernel (its in-kernel tiling, repeated on the host)."""
    bw = min(_next_pow2(Wo + halo), block_p)
    rows = block_p // bw
    return N * triton.cdiv(Ho, rows) * triton.cdiv(Wo, bw - halo)


def conv_forward(x4, S1s, U1s, bias, stride, padding, dilation, *, algo=None, config=None,
                 col_groups=None, out=None):
    """Launch a fused kernel on a 4-D x (any strides): returns the (N, C_out, Ho, Wo) output,
    channels_last exactly when the C++ op's output would be (``_wants_channels_last``).

    ``algo``: "direct" or "rowtap" (default: ``ALGO`` where the call allows it, else "direct";
    asking for "rowtap" where it does not apply raises). ``config`` (a dict with BLOCK_P/BLOCK_C/
    BLOCK_N, optionally TAPS_INNER/X_CA/num_warps/num_stages) bypasses the autotuner;
    ``col_groups`` overrides the column-group heuristic; ``out`` writes into a given tensor
    (tests poison it).
    """
    N, C_in, H, W = x4.shape
    R, _, KH, KW = S1s.shape
    two_l, _, C_out = U1s.shape
    (sh, sw), (ph, pw), (dh, dw) = ([int(v) for v in a] for a in (stride, padding, dilation))
    Ho, Wo = _out_size(H, KH, sh, ph, dh), _out_size(W, KW, sw, pw, dw)
    if out is None:
        if _wants_channels_last(x4):
            out = x4.new_empty((N, Ho, Wo, C_out)).permute(0, 3, 1, 2)
        else:
            out = x4.new_empty((N, C_out, Ho, Wo))
    P = N * Ho * Wo
    if P == 0 or C_out == 0:
        return out
    r_pad = _rank_pad(R)
    if algo is None:
        fits = ALGO == "direct" or (rowtap_ok(KW, sw, dw, r_pad)
                                    and _autotuned(ALGO, r_pad, x4.element_size(), KW) is not None)
        algo = ALGO if fits else "direct"
    elif algo not in ALGOS or (algo == "rowtap" and not rowtap_ok(KW, sw, dw, r_pad)):
        raise ValueError(f"conv_forward: algo must be one of {ALGOS} ('rowtap' needs stride_w == 1, "
                         f"(kw-1)*dil_w < 16, kw*R_PAD <= {MAX_ROWTAP_WIDTH} after padding), got {algo!r}")
    MIX = _arrange_mix(U1s, r_pad)
    groups = col_groups if col_groups is not None else _column_groups(P, C_out, x4.device)
    dot_conv, dot_mix = _dot_modes(x4.dtype)
    consts = dict(KH=KH, KW=KW, R_PAD=r_pad, HAS_BIAS=bias is not None, DOT_CONV=dot_conv,
                  DOT_MIX=dot_mix)
    b = bias if bias is not None else x4
    if algo == "direct":
        WM = _arrange_weight(S1s, r_pad)
        kernel = _sketched_conv2d_kernel
        args = (x4, WM, MIX, b, out,
                P, C_in, C_out, H, W, Ho, Wo,
                *x4.stride(), WM.stride(0), WM.stride(1), MIX.stride(0), MIX.stride(1), *out.stride(),
                sh, sw, ph, pw, dh, dw,
                two_l, _p_bucket(P))

        def grid(meta):
            return (triton.cdiv(P, meta["BLOCK_P"]), groups)
    else:
        WR = _arrange_row_weight(S1s, r_pad)
        kernel = _sketched_conv2d_rowtap_kernel
        halo = (KW - 1) * dw
        consts["KW_A"], consts["KW_B"] = _kw_split(KW)
        args = (x4, WR, MIX, b, out,
                C_in, C_out, H, W, Ho, Wo, _next_pow2(Wo + halo),
                *x4.stride(), WR.stride(0), WR.stride(1), MIX.stride(0), MIX.stride(1), *out.stride(),
                sh, ph, pw, dh, dw,
                two_l, _p_bucket(P))

        def grid(meta):
            return (_rowtap_grid(meta["BLOCK_P"], N, Ho, Wo, halo), groups)

    if config is not None:
        meta = {"TAPS_INNER": 0, "X_CA": 0, **config}
        launch = {k: meta.pop(k) for k in ("num_warps", "num_stages") if k in meta}
        _launcher(kernel)[grid](*args, **consts, **meta, **launch)
    else:
        _launcher(_autotuned(algo, r_pad, x4.element_size(), KW))[grid](*args, **consts)
    return out


def _ints(v, n=2):
    return isinstance(v, (list, tuple)) and len(v) == n and all(
        isinstance(a, (int, torch.SymInt)) and not isinstance(a, bool) for a in v)


def kernel_ok(x, S1s, U1s, bias, stride, padding, dilation):
    """Whether the fused kernel serves this call (else the C++ op does, raising for bad input)."""
    if triton is None:
        return False
    if not all(isinstance(t, Tensor) for t in (x, S1s, U1s)) or not (bias is None or isinstance(bias, Tensor)):
        return False
    if x.dim() not in (3, 4) or S1s.dim() != 4 or U1s.dim() != 3:
        return False
    if not (_ints(stride) and _ints(padding) and _ints(dilation)):
        return False
    if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
        return False
    x4 = x.unsqueeze(0) if x.dim() == 3 else x
    N, C_in, H, W = x4.shape
    R, s_cin, KH, KW = S1s.shape
    two_l, k, C_out = U1s.shape
    if R != two_l * k or s_cin != C_in or R == 0 or _rank_pad(R) > MAX_RANK:
        return False
    if bias is not None and tuple(bias.shape) != (C_out,):
        return False
    tensors = [t for t in (x, S1s, U1s, bias) if t is not None]
    if x.dtype not in _DTYPES or any(t.dtype != x.dtype or t.device != x.device for t in tensors):
        return False
    if not (x.device.type == "cuda" or (_INTERPRET and x.device.type == "cpu")):
        return False
    Ho = _out_size(H, KH, stride[0], padding[0], dilation[0])
    Wo = _out_size(W, KW, stride[1], padding[1], dilation[1])
    if N * C_in * C_out == 0 or Ho < 1 or Wo < 1:
        return False
    if not (NCHW_KERNEL or x4.is_contiguous(memory_format=torch.channels_last)):
        return False
    return _autotuned("direct", _rank_pad(R), x.element_size()) is not None


# --------------------------------------------------------------------------------------------
# The op
# --------------------------------------------------------------------------------------------
# The tap-GEMM path (cuBLAS GEMM + one epilogue kernel) builds on this module's helpers, so it is
# imported here, once they exist.
from . import triton_conv_tap as _tap  # noqa: E402


# The schema is inferred from the annotations: that of panther::sketched_conv2d with SymInt[]
# for its SymInt[2] (triton_op ignores an explicit schema); the wrapper below always passes pairs.
@torch.library.triton_op("panther::sketched_conv2d_triton", mutates_args=())
def sketched_conv2d_triton_op(x: Tensor, S1s: Tensor, U1s: Tensor, bias: Optional[Tensor],
                              stride: list[int], padding: list[int], dilation: list[int]) -> Tensor:
    """``panther::sketched_conv2d`` computed on CUDA by the tap-GEMM path where ``triton_conv_tap.TAP_GEMM``
    says so, else by a fused Triton kernel."""
    if _tap.use_tap(x, S1s, U1s, bias, list(stride), list(padding), list(dilation)):
        return _tap.tap_forward(x, S1s, U1s, bias, stride, padding, dilation)
    if kernel_ok(x, S1s, U1s, bias, list(stride), list(padding), list(dilation)):
        if x.dim() == 3:
            return conv_forward(x.unsqueeze(0), S1s, U1s, bias, stride, padding, dilation).squeeze(0)
        return conv_forward(x, S1s, U1s, bias, stride, padding, dilation)
    return torch.ops.panther.sketched_conv2d(x, S1s, U1s, bias, stride, padding, dilation)


# Same autograd as panther::sketched_conv2d (cuDNN convolution_backward on the mixed-back gradient).
torch.library.register_autograd("panther::sketched_conv2d_triton", _conv_backward,
                                setup_context=_conv_setup_context)


def sketched_conv2d_triton(x, S1s, U1s, bias=None, stride=1, padding=0, dilation=1):
    """Drop-in for ``panther.ops.sketched_conv2d`` (ints or pairs; numeric padding; autocast
    honoured) that runs the fused Triton kernel for channels_last CUDA inputs."""
    args = (_pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation"))
    if isinstance(x, Tensor) and torch.is_autocast_enabled(x.device.type):
        dt = torch.get_autocast_dtype(x.device.type)
        # as the C++ op's autocast kernel (at::autocast::cached_cast): float64 stays float64
        cast = lambda t: t.to(dt) if isinstance(t, Tensor) and t.is_floating_point() \
            and t.dtype != torch.float64 else t  # noqa: E731
        with torch.autocast(x.device.type, enabled=False):
            return torch.ops.panther.sketched_conv2d_triton(cast(x), cast(S1s), cast(U1s), cast(bias), *args)
    return torch.ops.panther.sketched_conv2d_triton(x, S1s, U1s, bias, *args)
