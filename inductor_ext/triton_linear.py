"""Fused Triton kernels for ``panther::sketched_linear`` (the SKLinear layer).

The layer is two chained GEMMs through a thin rank ``R = 2·L·k``:

    xA = x·A,            A  = [S1cat | U2cat]            (d_in, R)
    y  = xA·Bm + bias,   Bm = [U1cat; S2cat] / (2L)      (R, d_out)

For small R the whole chain is memory bound: the floor is reading x once and writing y once.
One kernel does exactly that (on a GPU for R <= ``CUDA_FUSED_MAX_RANK``; above it two cuBLAS
GEMMs measured faster). Each program owns BLOCK_M rows of x, accumulates their
(BLOCK_M × R) ``xA`` tile in fp32 registers while streaming x through in BLOCK_K chunks, stores
that small tile (the backward needs it), then streams y out in BLOCK_N chunks of ``xA·Bm + bias``.
The backward reads g once (``_grad_pass_kernel``): program (column group, row range) writes the
partial products of its columns for ``dxA = g·Bmᵀ`` and accumulates ``xA_selᵀ·g`` and ``Σ g`` for
its columns over its rows (the B-side and bias gradients). The chain kernel's second phase then
sums the partials (+ grad_xA) into ``dxA`` and streams ``dx = dxA·Aᵀ`` out; ``xᵀ·dxA`` (the A side)
is one cuBLAS GEMM. (The earlier backward, kept as ``sketched_linear_triton_bwd``, ran the chain with
the factors' roles swapped and re-read g for the B side.)

The concatenation is never materialised: each half of A (``S1cat``, ``U2cat``) and of Bm
(``U1cat``, ``S2cat``) is passed as its own strided 2-D view (a free view when L == 1) and gets its
own ``tl.dot``; ``1/(2L)`` is a scalar applied to the fp32 accumulator. So the forward is one
launch with no preparatory copies (inside the op, large outputs take two: ``split_chain``).

Registered as ``torch.library.triton_op`` (``panther::sketched_linear_triton_fwd`` / ``_grads``), so
Inductor inlines the kernel on CUDA. Plain eager calls skip the ops' Python dispatch: an
``autograd.Function`` (``_EagerChain``) launches the same kernels with the same backward. Inside the
op body a device branch sends CPU tensors (and shapes the kernel does not cover) to the plain
two-GEMM torch math, so CPU graphs, ``opcheck`` and ``gradcheck`` work. Under ``TRITON_INTERPRET=1``
(set before triton is imported) CPU tensors run the kernel in Triton's interpreter instead, eager
only: that is how CPU CI checks its arithmetic.
"""
from __future__ import annotations

import functools
import math
import os
from typing import Optional

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from panther.ops.linear import concat_factors, grad_y_or_zeros, setup_context

from ._autocast import autocast_call
from ._eager import direct_launch_ok, grad_needed

try:  # Triton is optional: without it every call takes the torch path.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with Linux torch wheels
    triton = None

__all__ = [
    "sketched_linear_triton",
    "sketched_linear_triton_fwd",
    "sketched_linear_triton_bwd",
    "lowrank_chain",
    "kernel_configs",
    "smem_bytes",
    "tuned_configs",
    "MAX_RANK",
    "CUDA_FUSED_MAX_RANK",
    "SMEM_LIMIT",
]

# Hopper's per-block shared-memory limit (227 KiB). Every autotune config is checked against it.
SMEM_LIMIT = 227 * 1024
# Largest 2·L·k the fused kernel takes (each half padded to a power of two ≤ 128); above it the
# fp32 xA tile no longer fits the registers and the op falls back to two cuBLAS GEMMs.
MAX_RANK = 256
# Largest 2·L·k the fused kernel takes on a GPU: above it cuBLAS's two GEMMs measured faster on the
# H200 (bf16, batch 16384, 8192 -> 8192; CUDA-graph medians, python -m inductor_ext.triton_linear_bench):
# 2Lk = 32: fused 0.151 ms, two GEMMs 0.164; 2Lk = 64: 0.175 vs 0.166; 2Lk = 128 (16384 -> 16384):
# 0.443 vs 0.349. The interpreter (CPU CI) keeps checking the kernel up to MAX_RANK.
CUDA_FUSED_MAX_RANK = 32
# fp32 on a GPU: the fused kernel only from this many rows (x's leading dimensions together). Below it
# (256 and 2048 rows) cuBLAS's two GEMMs were faster at every width measured in the forward, and in
# forward+backward at all but one shape; at 16,384 rows the fused kernel was faster at every width
# (H200, k = 16, 768 to 8192 features, CUDA-graph medians;
# e.g. forward 256 rows × 8192: 0.177 ms against 0.027, 16,384 rows: 0.586 against 0.688; table in
# docs/benchmarks.md, eighteenth session).
CUDA_FP32_FUSED_MIN_ROWS = 16384
# Half precision on a GPU: the fused kernels from this many rows per feature of the layer's wider side
# (in or out), for layers wider than CUDA_HALF_ANY_ROWS_MAX_WIDTH. With fewer rows they have too few
# programs, each walking a whole side of the layer, and cuBLAS's GEMMs (split over it) win. Measured on
# the H200 (bf16, k = 16, CUDA-graph medians; docs/benchmarks.md, nineteenth session): e.g. one row of
# 16384 -> 16384, forward 0.051 ms against 0.012; from 8192 rows 0.167 against 0.179. The backward's
# pass over g (split into column groups) catches up with cuBLAS at about half the forward's rows.
CUDA_HALF_FUSED_MIN_ROWS_PER_FEATURE = {"forward": 0.5, "backward": 0.25}
CUDA_HALF_ANY_ROWS_MAX_WIDTH = 2048
# Ranks whose halves are zero-padded (``_vector_halves``; L·k < 16, e.g. k = 8) pay the copies in
# every forward: there the fused forward only won from 8192 rows, at every width measured (2048 to
# 16384; e.g. 2048 -> 2048 at 4096 rows 0.024 ms against 0.018, at 8192 rows 0.033 against 0.037).
CUDA_PADDED_FORWARD_MIN_ROWS = 8192

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# tl.dot flavours (a constexpr of the kernel).
# fp32 without torch's tf32 takes tf32x3 (three tf32 products, about fp32's accuracy): "ieee" FMA
# loops measured 4.20 ms for the H200's fp32 forward+backward at 8192 -> 8192, 16,384 rows, k = 16,
# against 2.09 (relative error against float64 1.6e-6 against 2.8e-7; docs/benchmarks.md).
_DOT_NATIVE, _DOT_TF32, _DOT_TF32X3, _DOT_UPCAST = 0, 1, 2, 3


def _next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def _dot_width(n: int) -> int:
    """Register width of n columns as a tl.dot operand (here: one half's L·k): a power of two, at least
    16 (tl.dot's minimum)."""
    return max(16, _next_pow2(n))


# --------------------------------------------------------------------------------------------
# The kernel
# --------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _mma(a, b, acc, DOT_MODE: tl.constexpr):
        if DOT_MODE == 3:
            # Triton's CPU interpreter multiplies bf16 bit patterns as integers; upcasting is exact.
            out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        elif DOT_MODE == 1:
            out = tl.dot(a, b, acc, input_precision="tf32")
        elif DOT_MODE == 2:
            out = tl.dot(a, b, acc, input_precision="tf32x3")
        else:
            out = tl.dot(a, b, acc)
        return out

    @triton.jit
    def _sketched_linear_chain_kernel(
        X, FL, FH, GL, GH, BIAS, E, Y, P,
        M, D_IN, D_OUT, H, HF, HG,
        sxm, sxd,
        sfl_d, sfl_h, sfh_d, sfh_h,
        sgl_h, sgl_n, sgh_h, sgh_n,
        sem, seh,
        sym, syn,
        spm, sph,
        alpha_p, alpha_y,
        M_BUCKET,
        H_PAD: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        HAS_E: tl.constexpr,
        DOT_MODE: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_N: tl.constexpr,
        NPART: tl.constexpr = 0,
    ):
        """P = alpha_p·X·[FL | FH] (+ E);  Y = alpha_y·(P_L·GL + P_H·GH) (+ bias).

        X (M, D_IN); FL, FH (D_IN, HF); GL, GH (HG, D_OUT); E, P (M, 2H); Y (M, D_OUT); all strided.
        HF, HG: H, or H_PAD for halves zero-padded to whole vectors (``_vector_halves``).
        Grid: (row blocks, column groups). Column group g writes a contiguous range of Y's column
        tiles; every group recomputes its rows' P (only group 0 stores it). One group is the
        memory-floor layout (x read once); more groups only help when there are few row blocks.
        NPART > 0: no X·F; P = alpha_p·(the sum of NPART fp32 partial products stacked in X, each
        (M, 2H) with strides (sxd: between partials, sxm: rows, unit columns)) (+ E).
        """
        pid_m = tl.program_id(0)
        pid_g = tl.program_id(1)
        # Inductor passes float arguments as fp64: in fp64 the scalings ran every tile through the fp64
        # units (0.206 ms against 0.150 for the 8192 -> 8192 forward inlined by Inductor, H200)
        alpha_p = tl.cast(alpha_p, tl.float32)
        alpha_y = tl.cast(alpha_y, tl.float32)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        rows = offs_m.to(tl.int64)  # row offsets can pass 2**31 elements
        offs_h = tl.arange(0, H_PAD)
        mask_h = offs_h < H
        ph_mask = mask_m[:, None] & mask_h[None, :]
        if NPART == 0:
            acc_l, acc_h = _chain_xf(X, FL, FH, rows, mask_m, offs_h, offs_h < HF, D_IN, sxm, sxd,
                                     sfl_d, sfl_h, sfh_d, sfh_h, H_PAD, DOT_MODE, BLOCK_M, BLOCK_K)
        else:
            acc_l = tl.zeros((BLOCK_M, H_PAD), dtype=tl.float32)
            acc_h = tl.zeros((BLOCK_M, H_PAD), dtype=tl.float32)
            part = X + rows[:, None] * sxm + offs_h[None, :]
            for j in range(0, NPART):
                acc_l += tl.load(part + j * sxd, mask=ph_mask, other=0.0)
                acc_h += tl.load(part + j * sxd + H, mask=ph_mask, other=0.0)
        acc_l = acc_l * alpha_p
        acc_h = acc_h * alpha_p
        if HAS_E:
            e_ptrs = E + rows[:, None] * sem + offs_h[None, :] * seh
            acc_l += tl.load(e_ptrs, mask=ph_mask, other=0.0).to(tl.float32)
            acc_h += tl.load(e_ptrs + H * seh, mask=ph_mask, other=0.0).to(tl.float32)
        # Round once to the output dtype: the stored P and the second GEMM's operand agree, as in
        # the two-GEMM reference where xA is a tensor of the input dtype.
        p_l = acc_l.to(P.dtype.element_ty)
        p_h = acc_h.to(P.dtype.element_ty)
        p_ptrs = P + rows[:, None] * spm + offs_h[None, :] * sph
        if pid_g == 0:
            tl.store(p_ptrs, p_l, mask=ph_mask)
            tl.store(p_ptrs + H * sph, p_h, mask=ph_mask)

        # ---- phase 2: Y's column tiles of this group, y written once ---------------------------
        n_tiles = tl.cdiv(D_OUT, BLOCK_N)
        per_group = tl.cdiv(n_tiles, tl.num_programs(1))
        t_begin = pid_g * per_group
        t_end = tl.minimum(t_begin + per_group, n_tiles)
        offs_n = tl.arange(0, BLOCK_N)
        if HAS_BIAS:
            # Prefetched one tile ahead: a plain load used right away would stall every iteration
            # on L2 latency (the pipeliner only prefetches the loads feeding tl.dot).
            b_cols = t_begin * BLOCK_N + offs_n
            bias_next = tl.load(BIAS + b_cols, mask=b_cols < D_OUT, other=0.0)
        for t in range(t_begin, t_end):
            cols = t * BLOCK_N + offs_n
            mask_n = cols < D_OUT
            if HAS_BIAS:
                bias_tile = bias_next
                bias_next = tl.load(BIAS + cols + BLOCK_N, mask=(cols + BLOCK_N) < D_OUT, other=0.0)
            g_mask = (offs_h < HG)[:, None] & mask_n[None, :]
            gl = tl.load(GL + offs_h[:, None] * sgl_h + cols[None, :] * sgl_n, mask=g_mask, other=0.0)
            gh = tl.load(GH + offs_h[:, None] * sgh_h + cols[None, :] * sgh_n, mask=g_mask, other=0.0)
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            acc = _mma(p_l, gl, acc, DOT_MODE)
            acc = _mma(p_h, gh, acc, DOT_MODE)
            acc = acc * alpha_y
            if HAS_BIAS:
                acc += bias_tile.to(tl.float32)[None, :]
            y_ptrs = Y + rows[:, None] * sym + cols[None, :] * syn
            tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])

    @triton.jit
    def _chain_xf(X, FL, FH, rows, mask_m, offs_h, mask_h, D_IN, sxm, sxd, sfl_d, sfl_h, sfh_d, sfh_h,
                  H_PAD: tl.constexpr, DOT_MODE: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_K: tl.constexpr):
        """Phase 1: the row block's (BLOCK_M, 2H) tile of X·[FL | FH] in fp32, x streamed once."""
        offs_k = tl.arange(0, BLOCK_K)
        x_ptrs = X + rows[:, None] * sxm + offs_k[None, :] * sxd
        fl_ptrs = FL + offs_k[:, None] * sfl_d + offs_h[None, :] * sfl_h
        fh_ptrs = FH + offs_k[:, None] * sfh_d + offs_h[None, :] * sfh_h
        acc_l = tl.zeros((BLOCK_M, H_PAD), dtype=tl.float32)
        acc_h = tl.zeros((BLOCK_M, H_PAD), dtype=tl.float32)
        for d0 in range(0, D_IN, BLOCK_K):
            mask_k = (d0 + offs_k) < D_IN
            xt = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            f_mask = mask_k[:, None] & mask_h[None, :]
            fl = tl.load(fl_ptrs, mask=f_mask, other=0.0)
            fh = tl.load(fh_ptrs, mask=f_mask, other=0.0)
            acc_l = _mma(xt, fl, acc_l, DOT_MODE)
            acc_h = _mma(xt, fh, acc_h, DOT_MODE)
            x_ptrs += BLOCK_K * sxd
            fl_ptrs += BLOCK_K * sfl_d
            fh_ptrs += BLOCK_K * sfh_d
        return acc_l, acc_h

    @triton.jit
    def _grad_pass_kernel(
        G, XA, BL, BH, DXA_PART, DB_PART,
        M, D_OUT, H, R, ROWS_PER_PROG,
        sgm, sgn, sxam, sxar, sbl_n, sbl_h, sbh_n, sbh_h,
        spj, spm, sdbs, sdbr, sdbn,
        H_PAD: tl.constexpr, R_PAD: tl.constexpr, HAS_DB: tl.constexpr, HAS_DBIAS: tl.constexpr,
        DOT_MODE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        """The backward's one pass over g: program (column group j of BLOCK_N columns, row range s)
        writes, for its rows, the partial dxA_j = g[:, j]·[BL | BH][j] (slot j of DXA_PART (J, M, 2H)),
        and for its columns the partial over its rows of [XA | 1]ᵀ·g (DB_PART (S, R + HAS_DBIAS,
        D_OUT), fp32; XA: the R columns of xA that need it; the ones column, HAS_DBIAS, gives Σ_rows g
        on the tensor cores). g is read once; the partials are small (J·M·2H and S·(R + 1)·D_OUT).
        BL, BH: (D_OUT, H) views (Bmᵀ's halves, unscaled)."""
        pid_j = tl.program_id(0)
        pid_s = tl.program_id(1)
        cols = pid_j * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = cols < D_OUT
        offs_h = tl.arange(0, H_PAD)
        mask_h = offs_h < H
        offs_r = tl.arange(0, R_PAD)
        mask_r = offs_r < R
        n_db: tl.constexpr = HAS_DB or HAS_DBIAS
        b_mask = mask_n[:, None] & mask_h[None, :]
        bl = tl.load(BL + cols[:, None] * sbl_n + offs_h[None, :] * sbl_h, mask=b_mask, other=0.0)
        bh = tl.load(BH + cols[:, None] * sbh_n + offs_h[None, :] * sbh_h, mask=b_mask, other=0.0)
        db = tl.zeros((R_PAD, BLOCK_N), dtype=tl.float32)
        row0 = pid_s * ROWS_PER_PROG
        row_end = tl.minimum(row0 + ROWS_PER_PROG, M)
        offs_bm = tl.arange(0, BLOCK_M)
        part = DXA_PART + pid_j.to(tl.int64) * spj
        for m0 in range(row0, row_end, BLOCK_M):
            rows = m0 + offs_bm
            mask_m = rows < row_end
            rows64 = rows.to(tl.int64)
            g = tl.load(G + rows64[:, None] * sgm + cols[None, :] * sgn,
                        mask=mask_m[:, None] & mask_n[None, :], other=0.0)
            d_l = _mma(g, bl, tl.zeros((BLOCK_M, H_PAD), dtype=tl.float32), DOT_MODE)
            d_h = _mma(g, bh, tl.zeros((BLOCK_M, H_PAD), dtype=tl.float32), DOT_MODE)
            p_ptrs = part + rows64[:, None] * spm + offs_h[None, :]
            p_mask = mask_m[:, None] & mask_h[None, :]
            tl.store(p_ptrs, d_l, mask=p_mask)
            tl.store(p_ptrs + H, d_h, mask=p_mask)
            if n_db:
                xa = tl.load(XA + rows64[:, None] * sxam + offs_r[None, :] * sxar,
                             mask=mask_m[:, None] & mask_r[None, :], other=0.0)
                if HAS_DBIAS:
                    xa = tl.where(offs_r[None, :] == R, 1.0, xa).to(XA.dtype.element_ty)
                db = _mma(tl.trans(xa), g, db, DOT_MODE)
        if n_db:
            out = DB_PART + pid_s.to(tl.int64) * sdbs + offs_r[:, None] * sdbr + cols[None, :] * sdbn
            tl.store(out, db, mask=(offs_r[:, None] < R + HAS_DBIAS) & mask_n[None, :])

    @triton.jit
    def _grad_finish_kernel(DB_PART, DB, DBIAS, S, R, D_OUT, scale,
                            sdbs, sdbr, sdbn, sdr, sdn,
                            S_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr):
        """The grad pass's row splits summed in one launch (not a sum, a scale and two casts):
        program (column block, row r) writes DB[r] = scale·Σ_s DB_PART[s, r] for r < R, else
        DBIAS = Σ_s DB_PART[s, R]; fp32 sums rounded once to the outputs' dtype. The splits are
        loaded S_BLOCK at a time (one load for the usual S <= S_BLOCK), not one after another."""
        r = tl.program_id(1)
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = cols < D_OUT
        offs_s = tl.arange(0, S_BLOCK)
        ptrs = DB_PART + offs_s[:, None] * sdbs + r * sdbr + cols[None, :] * sdbn
        acc = tl.zeros((S_BLOCK, BLOCK_N), dtype=tl.float32)
        for s0 in range(0, S, S_BLOCK):
            acc += tl.load(ptrs + s0 * sdbs, mask=((s0 + offs_s)[:, None] < S) & mask_n[None, :], other=0.0)
        total = tl.sum(acc, axis=0)
        if r < R:   # scale cast: a Python float arrives as fp64
            tl.store(DB + r * sdr + cols * sdn, (total * tl.cast(scale, tl.float32)).to(DB.dtype.element_ty),
                     mask=mask_n)
        else:
            tl.store(DBIAS + cols, total.to(DBIAS.dtype.element_ty), mask=mask_n)


# --------------------------------------------------------------------------------------------
# Autotune configs: a few tile shapes, each checked against the shared-memory and register budget
# --------------------------------------------------------------------------------------------
# (BLOCK_M, BLOCK_K, BLOCK_N, num_warps, num_stages), best first for the memory-bound regime.
_CANDIDATES = (
    (128, 64, 128, 8, 4),
    (32, 128, 128, 4, 4),  # twice the programs of BLOCK_M=64: fuller waves, more bytes in flight
    (32, 256, 128, 4, 3),
    (64, 128, 128, 4, 4),
    (128, 128, 64, 8, 3),
    (64, 64, 256, 8, 3),
    (128, 32, 128, 8, 4),
    (128, 64, 64, 8, 3),
    (64, 64, 64, 4, 4),
    (128, 32, 64, 8, 3),
    (64, 64, 128, 4, 3),
    (64, 64, 128, 8, 3),
    (64, 32, 128, 4, 3),
    (64, 32, 64, 8, 3),
    (64, 32, 64, 4, 3),
    (64, 32, 64, 8, 2),
    (64, 32, 32, 4, 2),
    (32, 32, 32, 4, 2),
)
_MAX_CONFIGS = 10


def smem_bytes(block_m, block_k, block_n, num_stages, h_pad, elem_size):
    """An upper bound on one program's shared memory, counting every buffer as live at once.

    phase 1: num_stages copies of the x tile and both F tiles; phase 2: num_stages copies of both
    G tiles plus the two P operand tiles; the epilogue's layout conversion of the fp32 y tile.
    (Triton reuses phase-1 buffers in phase 2, so the real figure is lower.)
    """
    phase1 = num_stages * (block_m * block_k + 2 * block_k * h_pad) * elem_size
    phase2 = num_stages * (2 * h_pad * block_n) * elem_size + 2 * block_m * h_pad * elem_size
    epilogue = block_m * block_n * 4
    return phase1 + phase2 + epilogue


def _acc_registers(block_m, block_n, h_pad, num_warps):
    """fp32 accumulator registers per thread: both xA halves and the y tile."""
    return (2 * block_m * h_pad + block_m * block_n) // (32 * num_warps)


def kernel_configs(h_pad, elem_size):
    """The autotune candidates for one (half width, element size) bucket, all of them within
    ``SMEM_LIMIT`` and a register budget that leaves room for addresses."""
    return [_config(c) for c in _fitting_candidates(h_pad, elem_size)]


def _fitting_candidates(h_pad, elem_size):
    """:func:`kernel_configs` as plain tuples (BLOCK_M, BLOCK_K, BLOCK_N, num_warps, num_stages)."""
    fits = [c for c in _CANDIDATES if smem_bytes(c[0], c[1], c[2], c[4], h_pad, elem_size) <= SMEM_LIMIT
            and _acc_registers(c[0], c[2], h_pad, c[3]) <= 128]
    return fits[:_MAX_CONFIGS]


def _config(c):
    bm, bk, bn, warps, stages = c
    return triton.Config({"BLOCK_M": bm, "BLOCK_K": bk, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


# The interpreter cannot benchmark; it runs one small config (tails are exercised by the tests,
# which also pass explicit configs).
_INTERPRET_CONFIG = (32, 32, 32, 4, 1)


_AUTOTUNERS: dict = {}


# Buckets whose best config is known: (half width padded, element size) -> (BLOCK_M, BLOCK_K, BLOCK_N,
# num_warps, num_stages). Their autotuner has this one config: eager calls skip tuning ten configs on the
# first call, and a kernel Inductor inlines (it re-tunes the configs with its own benchmark) runs the same
# config as an eager call. Eager autotuning chose 64/128/128/4/4 at every shape measured on the H200
# (bf16, 2Lk = 32; batch 256 to 16,384, 768 to 8192 features; docs/benchmarks.md), where it is the fastest
# of the ten candidates or within 1% of it. 2Lk <= 32 is the only width the fused kernel serves on a GPU
# (CUDA_FUSED_MAX_RANK), so every bf16/fp16 CUDA call has this config; fp32 keeps the autotuner.
_MEASURED_BEST = {(16, 2): (64, 128, 128, 4, 4)}


def _bucket_candidates(h_pad, elem_size):
    """The configs (plain tuples) a bucket's Autotuner holds: the interpreter's one, a measured best, or the
    fitting candidates; empty when none fits. Plain Python, so that routing a call can ask whether a kernel
    exists while Dynamo traces it (an Autotuner's constructor reads Triton's environment knobs through a C
    extension, which Dynamo cannot trace)."""
    if _INTERPRET:
        return [_INTERPRET_CONFIG]
    if (h_pad, elem_size) in _MEASURED_BEST:
        return [_MEASURED_BEST[h_pad, elem_size]]
    return _fitting_candidates(h_pad, elem_size)


def _autotuned(h_pad, elem_size):
    """One Autotuner per bucket over :func:`_bucket_candidates` (None where there are none). Kept so that
    the kernel object is stable (Inductor's kernel side table keys on it)."""
    key = (h_pad, elem_size)
    if key not in _AUTOTUNERS:
        configs = [_config(c) for c in _bucket_candidates(h_pad, elem_size)]
        _AUTOTUNERS[key] = triton.autotune(configs=configs, key=["M_BUCKET", "D_IN", "D_OUT", "H"])(
            _sketched_linear_chain_kernel) if configs else None
    return _AUTOTUNERS[key]


def tuned_configs():
    """``{(half width padded, element size): best config}`` chosen so far by eager autotuning."""
    return {k: getattr(v, "best_config", None) for k, v in _AUTOTUNERS.items() if v is not None}


def _num_sms(device):
    """Streaming multiprocessors of a CUDA device (no index: the current device)."""
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _sm_count(device_index):
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _column_groups(m, d_out, device):
    """Column groups for few rows: enough programs to fill the GPU, each x row block re-read by
    every group (from L2). With many rows, one group: x is read exactly once."""
    if device.type != "cuda":
        return 1
    sms = _num_sms(device)
    row_blocks = (m + 63) // 64
    if row_blocks >= sms:
        return 1
    return max(1, min((sms + row_blocks - 1) // row_blocks, (d_out + 127) // 128, 8))


def _allow_tf32():
    """cuBLAS's fp32 policy: the newer ``fp32_precision`` setting when set, else ``allow_tf32``
    (reading the latter raises once the two APIs were mixed)."""
    precision = getattr(torch.backends.cuda.matmul, "fp32_precision", "none")
    if precision in ("tf32", "ieee"):
        return precision == "tf32"
    try:
        return bool(torch.backends.cuda.matmul.allow_tf32)
    except RuntimeError:
        return False


def _dot_mode(dtype):
    if dtype == torch.float32:
        return _DOT_TF32 if _allow_tf32() else _DOT_TF32X3
    if dtype == torch.bfloat16 and _INTERPRET:
        return _DOT_UPCAST
    return _DOT_NATIVE


def _m_bucket(m):
    # The autotune key: batch sizes in one power-of-two bucket share a tuned config.
    return min(_next_pow2(m), 1 << 20) if isinstance(m, int) else 0


def lowrank_chain(X, FL, FH, GL, GH, bias=None, E=None, alpha_p=1.0, alpha_y=1.0, *, config=None,
                  col_groups=None, out=None, in_op=True):
    """Launch the chain kernel: returns ``Y = alpha_y·(P_L·GL + P_H·GH) + bias`` and
    ``P = [P_L | P_H] = alpha_p·X·[FL | FH] + E``, both in X's dtype.

    ``config`` (a dict with BLOCK_M/BLOCK_K/BLOCK_N and optionally num_warps/num_stages) bypasses
    the autotuner (tests use it to cover tails with several tile shapes); ``col_groups`` overrides
    the column-group heuristic; ``out=(Y, P)`` writes into given tensors (tests poison them);
    ``in_op=False``: a plain launch, for eager calls outside the custom ops (``wrap_triton`` is
    for launches inside them).
    """
    M, D_IN = X.shape
    H = FL.shape[1]
    D_OUT = GL.shape[1]
    Y, P = out if out is not None else (X.new_empty((M, D_OUT)), X.new_empty((M, 2 * H)))
    if M == 0:
        return Y, P
    h_pad = _dot_width(H)
    (FL, FH), HF = _vector_halves(FL, FH, 1, h_pad)
    (GL, GH), HG = _vector_halves(GL, GH, 0, h_pad)
    groups = col_groups if col_groups is not None else _column_groups(M, D_OUT, X.device)
    args = (X, FL, FH, GL, GH, bias if bias is not None else X, E if E is not None else X, Y, P,
            M, D_IN, D_OUT, H, HF, HG,
            X.stride(0), X.stride(1),
            FL.stride(0), FL.stride(1), FH.stride(0), FH.stride(1),
            GL.stride(0), GL.stride(1), GH.stride(0), GH.stride(1),
            E.stride(0) if E is not None else 0, E.stride(1) if E is not None else 0,
            Y.stride(0), Y.stride(1),
            P.stride(0), P.stride(1),
            float(alpha_p), float(alpha_y),
            _m_bucket(M))
    # every constexpr is passed: Inductor's wrap_triton expects the full signature (defaults too)
    consts = dict(H_PAD=h_pad, HAS_BIAS=bias is not None, HAS_E=E is not None, DOT_MODE=_dot_mode(X.dtype),
                  NPART=0)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]), groups)

    if config is not None:
        meta = dict(config)
        launch = {k: meta.pop(k) for k in ("num_warps", "num_stages") if k in meta}
        kernel = _sketched_linear_chain_kernel
        _launcher(kernel, in_op)[grid](*args, **consts, **meta, **launch)
    else:
        kernel = _autotuned(h_pad, X.element_size())
        _launcher(kernel, in_op)[grid](*args, **consts)
    return Y, P


# The backward's pass over g and the dx launch that sums its partials, (BLOCK_M, BLOCK_N, num_warps,
# num_stages), by element size. 2 bytes: the fastest pair of ``triton_linear_bench --sweep-grad-pass``
# on the H200 (8192 -> 8192, 16,384 rows, k = 16, bf16; docs/benchmarks.md), with about four programs
# per SM for the pass. 4 bytes (tf32x3 or tf32 products): the fastest of 9 tiles of the fp32 sweep
# there, no spills on triton 3.6 or 3.9 (tests/test_hopper_compile.py); 240 registers, so two programs
# per SM: the pass took 0.457 ms at 256 programs against 0.98 for the (64, 64, 8, 2) tiles chosen for
# "ieee" products, and 0.53-0.59 at 384 or 640 programs (a part wave).
# The launch over the
# partials (and over the forward's P, ``split_chain``) writes a large output: for 2-byte elements
# in two column groups of 128-column tiles, which balance its waves (dx: H200, CUDA-graph
# forward+backward 0.4110 ms against 0.4118 with one group of 256-column tiles).
_GRAD_PASS_CONFIG = {2: (128, 256, 8, 3), 4: (64, 64, 4, 2)}
_PARTIALS_CONFIG = {2: (64, 128, 4, 3), 4: (64, 128, 4, 3)}
_PARTIALS_COL_GROUPS = {2: 2, 4: 1}
# programs per SM the pass's row splits aim at (the nearest whole number of splits), by element size
_GRAD_PASS_PROGRAMS_PER_SM = {2: 4, 4: 2}
# The sum of its row splits (S_BLOCK splits per load, BLOCK_N columns, num_warps): on the H200 the
# CUDA-graph forward+backward took 0.3975-0.3979 ms with it, 0.3972-0.4003 with (32, 128, 4) and
# 0.4034-0.4042 with torch's sum, scale and casts (docs/benchmarks.md). The interpreter takes two
# splits per load, so that its cases cover the loop.
_FINISH_CONFIG = (32, 32, 1)
_INTERPRET_FINISH_CONFIG = (2, 16, 4)
_INTERPRET_GRAD_CONFIG = (16, 32, 4, 1)


def grad_pass(g, xA, BL, BH, *, need_dbias=True, scale=1.0, out_dtype=torch.float32, config=None,
              row_splits=None, part_dtype=None, in_op=True):
    """One pass over g (M, D_OUT): ``(parts, dB, dbias)`` with ``parts`` (J, M, 2H) partial
    products g·[BL | BH] over J column groups (their sum is g·Bmᵀ without the 1/(2L)), ``dB``
    (R, D_OUT) = scale·xAᵀ·g for the R columns of ``xA`` given (none: R = 0) and ``dbias`` (D_OUT,)
    = Σ_rows g (``need_dbias``, else empty), both summed in fp32 over the row splits and rounded
    once to ``out_dtype`` (``_grad_finish_kernel``). ``part_dtype``: the partials' dtype; None:
    bf16 for bf16 g (half the traffic; dxA is rounded to bf16 anyway), else fp32 (fp16's range is
    too small for unscaled partial sums)."""
    M, D_OUT = g.shape
    H = BL.shape[1]
    R = xA.shape[1]
    bm, bn, warps, stages = config or (_INTERPRET_GRAD_CONFIG if _INTERPRET else
                                       _GRAD_PASS_CONFIG[g.element_size()])
    J = triton.cdiv(D_OUT, bn)
    if row_splits is None:
        sms = _num_sms(g.device) if g.device.type == "cuda" else 2
        want = _GRAD_PASS_PROGRAMS_PER_SM[g.element_size()] * sms
        row_splits = max(1, min(round(want / J), triton.cdiv(M, bm)))
    rows_per = triton.cdiv(triton.cdiv(M, row_splits), bm) * bm
    S = triton.cdiv(M, rows_per) if M else 1
    f32 = torch.float32
    if part_dtype is None:
        part_dtype = torch.bfloat16 if g.dtype == torch.bfloat16 else f32
    parts = g.new_empty((J, M, 2 * H), dtype=part_dtype)
    dB = g.new_empty((R, D_OUT), dtype=out_dtype)
    dbias = g.new_empty((D_OUT,) if need_dbias else (0,), dtype=out_dtype)
    if M == 0:
        return parts, dB.zero_(), dbias.zero_()
    rows_db = R + int(need_dbias)
    db_part = g.new_empty((S, rows_db, D_OUT), dtype=f32)
    _launcher(_grad_pass_kernel, in_op)[(J, S)](
        g, xA if R else g, BL, BH, parts, db_part,
        M, D_OUT, H, R, rows_per,
        g.stride(0), g.stride(1), xA.stride(0), xA.stride(1),
        BL.stride(0), BL.stride(1), BH.stride(0), BH.stride(1),
        parts.stride(0), parts.stride(1), db_part.stride(0), db_part.stride(1), db_part.stride(2),
        H_PAD=_dot_width(H), R_PAD=_dot_width(rows_db), HAS_DB=R > 0, HAS_DBIAS=need_dbias,
        DOT_MODE=_dot_mode(g.dtype),
        BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)
    if rows_db:
        s_block, fin_n, fin_warps = _INTERPRET_FINISH_CONFIG if _INTERPRET else _FINISH_CONFIG
        _launcher(_grad_finish_kernel, in_op)[(triton.cdiv(D_OUT, fin_n), rows_db)](
            db_part, dB if R else db_part, dbias if need_dbias else db_part, S, R, D_OUT, float(scale),
            db_part.stride(0), db_part.stride(1), db_part.stride(2), dB.stride(0), dB.stride(1),
            S_BLOCK=s_block, BLOCK_N=fin_n, num_warps=fin_warps)
    return parts, dB, dbias


def chain_from_partials(parts, GL, GH, E=None, alpha_p=1.0, *, dtype, bias=None, alpha_y=1.0,
                        config=None, col_groups=None, in_op=True):
    """``(Y, P)``: ``P = alpha_p·Σ_j parts[j] (+ E)`` rounded to ``dtype`` and ``Y = alpha_y·(P_L·GL
    + P_H·GH) (+ bias)``: the chain kernel's second phase over the partials of ``grad_pass`` (or
    over the forward's stored P, ``split_chain``), in ``col_groups`` column groups (None:
    ``_PARTIALS_COL_GROUPS``)."""
    J, M, R = parts.shape
    H = R // 2
    D_OUT = GL.shape[1]
    Y, P = parts.new_empty((M, D_OUT), dtype=dtype), parts.new_empty((M, R), dtype=dtype)
    if M == 0:
        return Y, P
    bm, bn, warps, stages = config or (_INTERPRET_GRAD_CONFIG if _INTERPRET else
                                       _PARTIALS_CONFIG[dtype.itemsize])
    col_groups = col_groups or _PARTIALS_COL_GROUPS[dtype.itemsize]
    (GL, GH), HG = _vector_halves(GL, GH, 0, _dot_width(H))
    _launcher(_sketched_linear_chain_kernel, in_op)[(triton.cdiv(M, bm), col_groups)](
        parts, GL, GH, GL, GH, bias if bias is not None else Y, E if E is not None else Y, Y, P,
        M, 0, D_OUT, H, H, HG,
        parts.stride(1), parts.stride(0),
        0, 0, 0, 0,
        GL.stride(0), GL.stride(1), GH.stride(0), GH.stride(1),
        E.stride(0) if E is not None else 0, E.stride(1) if E is not None else 0,
        Y.stride(0), Y.stride(1),
        P.stride(0), P.stride(1),
        float(alpha_p), float(alpha_y),
        0,
        H_PAD=_dot_width(H), HAS_BIAS=bias is not None, HAS_E=E is not None,
        DOT_MODE=_dot_mode(dtype), BLOCK_M=bm, BLOCK_K=16, BLOCK_N=bn, NPART=J, num_warps=warps,
        num_stages=stages)
    return Y, P


# The op's forward in two launches above this many output elements (``split_chain``), for inputs of
# these element sizes. fp32 keeps one launch: its split measured slower (H200, 16,384 × 8192 → 8192,
# k = 16: 0.721 ms replayed from a CUDA graph against the fused kernel's 0.585 eager), and with one
# launch an eager call under CUDA-graph capture runs the config its warm-up call autotuned (the
# split's first launch would autotune a new key, which capture forbids).
SPLIT_MIN_OUTPUT = 1 << 26
SPLIT_ELEMENT_SIZES = (2,)


def split_chain(X, FL, FH, GL, GH, bias=None, alpha_y=1.0, *, config=None, col_groups=None,
                in_op=True):
    """``lowrank_chain``'s ``(Y, P)`` in two launches: P from the chain kernel with no output
    columns, then Y from the stored P (``chain_from_partials``, one partial). For large outputs:
    the y-writing phase then runs with the tiles and column groups of the launch over partials
    instead of the fused kernel's (the fused kernel's extra groups would re-read x). H200,
    16,384 × 8192 → 8192, k = 16, bf16, CUDA-graph medians: 0.1442–0.1447 ms against 0.1486–0.1500
    fused; but a plain eager call's median went 0.150 → 0.229 ms (the second launch's Python cost
    made it CPU-bound), so only calls where a launch is cheap take it (``_chain_forward``)."""
    P = X.new_empty((X.shape[0], 2 * FL.shape[1]))
    lowrank_chain(X, FL, FH, GL[:, :0], GH[:, :0], out=(P[:, :0], P), in_op=in_op)  # no null Y
    Y, _ = chain_from_partials(P[None], GL, GH, dtype=X.dtype, bias=bias, alpha_y=alpha_y,
                               config=config, col_groups=col_groups, in_op=in_op)
    return Y, P


def _vector_halves(TL, TH, h_axis, h_pad):
    """``((TL, TH), n)``: two factor halves with H entries along ``h_axis``, zero-padded to ``h_pad``
    entries (n = h_pad) where that axis is their contiguous one and H < h_pad, else as given (n = H).
    The kernel loads whole 16-byte vectors of a padded half. A view with, say, 8 contiguous entries per
    row it loads element by element: neither its mask nor its row stride is a multiple of 16 it can
    prove. The zeros add nothing to the products."""
    H = TL.shape[h_axis]
    if H >= h_pad or TL.numel() == 0 or all(T.stride(h_axis) != 1 for T in (TL, TH)):
        return (TL, TH), H

    def pad(T):
        T = T if h_axis == 1 else T.mT
        T = torch.nn.functional.pad(T, (0, h_pad - H))
        return T if h_axis == 1 else T.mT
    return (pad(TL), pad(TH)), h_pad


def _launcher(kernel, in_op=True):
    # Eager interpreter runs call the kernel directly (torch 2.11's wrap_triton rejects it).
    return torch.library.wrap_triton(kernel) if in_op and not _INTERPRET else kernel


# --------------------------------------------------------------------------------------------
# Factor views: the halves of A and Bm without concatenating them
# --------------------------------------------------------------------------------------------
def _half_in(T):
    """(L, d, k) -> (d, L·k), term-major columns: a view when L == 1, a small copy otherwise."""
    L, d, k = T.shape
    return T[0] if L == 1 else T.permute(1, 0, 2).reshape(d, L * k)


def _half_out(T):
    """(L, k, d) -> (L·k, d): a view for contiguous factors."""
    L, k, d = T.shape
    return T.reshape(L * k, d)


def _kernel_ok(t, rank, widest=None, direction="forward"):
    """Whether the fused kernels serve this call (else: the two-GEMM torch math). ``t``: x for the
    forward, grad_y for the backward (``direction``), whose leading dimensions are the rows; ``widest``:
    the layer's wider side, max(in, out) features (None: ``t``'s last dimension)."""
    if triton is None or rank > MAX_RANK or t.dtype not in _DTYPES:
        return False
    if not _bucket_candidates(_dot_width(rank // 2), t.element_size()):
        return False
    if t.device.type == "cuda":
        widest = t.shape[-1] if widest is None else widest
        return rank <= CUDA_FUSED_MAX_RANK and _enough_rows(t, rank, widest, direction)
    return _INTERPRET and t.device.type == "cpu"


def _served(t, S1s, S2s, direction="forward"):
    """``_kernel_ok`` for a call with these factors: rank 2·L·k, the layer's wider side max(in, out)."""
    L, d_in, k = S1s.shape
    return _kernel_ok(t, 2 * L * k, max(d_in, S2s.shape[-1]), direction)


def _enough_rows(t, rank, widest, direction):
    """Whether a GPU call has the rows from which the fused kernels beat cuBLAS's GEMMs (a symbolic row
    count is guarded on: a compiled graph recompiles across the bound)."""
    rows = math.prod(t.shape[:-1])
    if t.dtype == torch.float32:
        return bool(rows >= CUDA_FP32_FUSED_MIN_ROWS)
    bound = 0
    if widest > CUDA_HALF_ANY_ROWS_MAX_WIDTH:
        bound = widest * CUDA_HALF_FUSED_MIN_ROWS_PER_FEATURE[direction]
    if direction == "forward" and rank // 2 < _dot_width(rank // 2):   # padded halves
        bound = max(bound, CUDA_PADDED_FORWARD_MIN_ROWS)
    return bool(rows >= bound) if bound else True


def _with_last(t, lead, last):
    return t.view(*lead, last)


# --------------------------------------------------------------------------------------------
# The ops
# --------------------------------------------------------------------------------------------
def _chain_forward(x, S1s, S2s, U1s, U2s, bias, in_op=True):
    """``(y, xA)`` with ``xA = x·A`` and ``y = xA·Bm + bias``: one fused kernel where ``_kernel_ok``,
    else the two-GEMM torch math."""
    L, d_in, k = S1s.shape
    d_out = S2s.shape[-1]
    H = L * k
    lead = x.shape[:-1]
    x2 = x.reshape(-1, d_in)
    if _served(x, S1s, S2s):
        # two launches only where a launch costs little: inside the op (compiled graphs) and under
        # CUDA-graph capture; a plain eager call's extra launch made it CPU-bound (split_chain)
        split = (x.element_size() in SPLIT_ELEMENT_SIZES and x2.shape[0] * d_out >= SPLIT_MIN_OUTPUT
                 and (in_op or (x.is_cuda and torch.cuda.is_current_stream_capturing())))
        chain = split_chain if split else lowrank_chain
        y2, xA2 = chain(x2, _half_in(S1s), _half_in(U2s), _half_out(U1s), _half_out(S2s),
                        bias=bias, alpha_y=1.0 / (2 * L), in_op=in_op)
    else:
        A, Bm = concat_factors(S1s, S2s, U1s, U2s)
        xA2 = x2 @ A
        y2 = torch.addmm(bias, xA2, Bm) if bias is not None else xA2 @ Bm
    return _with_last(y2, lead, d_out), _with_last(xA2, lead, 2 * H)


def _torch_dx_dxA(g, e, S1s, S2s, U1s, U2s, need_dx=True):
    """The two-GEMM torch math of the backward's chain: ``dxA = g·Bmᵀ (+ e)`` and ``dx = dxA·Aᵀ``
    (None unless ``need_dx``), for g (N, d_out) and e (N, 2H) or None."""
    A, Bm = concat_factors(S1s, S2s, U1s, U2s)
    dxA = g @ Bm.mT
    if e is not None:
        dxA = dxA + e
    return (dxA @ A.mT if need_dx else None), dxA


def _chain_backward(grad_y, grad_xA, S1s, S2s, U1s, U2s, in_op=True):
    """``(dx, dxA)`` with ``dxA = grad_y·Bmᵀ (+ grad_xA)`` and ``dx = dxA·Aᵀ``: g read once, dx
    written once."""
    L, d_in, k = S1s.shape
    d_out = S2s.shape[-1]
    H = L * k
    lead = grad_y.shape[:-1]
    g = grad_y.reshape(-1, d_out)
    e = grad_xA.reshape(-1, 2 * H) if grad_xA is not None else None
    if _served(grad_y, S1s, S2s, "backward"):
        # The forward chain with roles swapped: F = Bmᵀ halves, G = Aᵀ halves (transposed views).
        dx2, dxA2 = lowrank_chain(g, _half_out(U1s).mT, _half_out(S2s).mT, _half_in(S1s).mT,
                                  _half_in(U2s).mT, E=e, alpha_p=1.0 / (2 * L), in_op=in_op)
    else:
        dx2, dxA2 = _torch_dx_dxA(g, e, S1s, S2s, U1s, U2s)
    return _with_last(dx2, lead, d_in), _with_last(dxA2, lead, 2 * H)


@torch.library.triton_op("panther::sketched_linear_triton_fwd", mutates_args=())
def sketched_linear_triton_fwd(x: Tensor, S1s: Tensor, S2s: Tensor, U1s: Tensor, U2s: Tensor,
                               bias: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """``(y, xA)`` with ``xA = x·A`` and ``y = xA·Bm + bias``: the same contract as
    ``panther::sketched_linear_fwd``, computed by one fused kernel on CUDA."""
    return _chain_forward(x, S1s, S2s, U1s, U2s, bias)


@torch.library.triton_op("panther::sketched_linear_triton_bwd", mutates_args=())
def sketched_linear_triton_bwd(grad_y: Tensor, grad_xA: Optional[Tensor], S1s: Tensor, S2s: Tensor,
                               U1s: Tensor, U2s: Tensor) -> tuple[Tensor, Tensor]:
    """``(dx, dxA)`` with ``dxA = grad_y·Bmᵀ (+ grad_xA)`` and ``dx = dxA·Aᵀ``: g read once,
    dx written once; dxA (N, 2Lk) is returned for the weight gradients."""
    return _chain_backward(grad_y, grad_xA, S1s, S2s, U1s, U2s)


def _chain_grads(grad_y, grad_xA, xA, S1s, S2s, U1s, U2s, need_dx, need_U1, need_S2, need_db, in_op=True):
    """``(dx, dxA, dB, db)`` for the backward, g read once: ``dxA = grad_y·Bmᵀ (+ grad_xA)``,
    ``dx = dxA·Aᵀ`` (empty unless ``need_dx``), ``dB = xA_selᵀ·grad_y / (2L)`` (the U1 rows if
    ``need_U1``, then the S2 rows if ``need_S2``) and ``db = Σ_rows grad_y`` (empty unless
    ``need_db``); dB, db summed in fp32 (float64 for float64), rounded once to grad_y's dtype
    (the factors' and the bias's, which ``_check_args`` makes equal). The kernels where ``_kernel_ok``
    (``grad_pass``, then ``chain_from_partials`` for dx), else the torch math."""
    L, d_in, k = S1s.shape
    d_out = S2s.shape[-1]
    H = L * k
    scale = 1.0 / (2 * L)
    lead = grad_y.shape[:-1]
    g = grad_y.reshape(-1, d_out)
    xA2 = xA.reshape(-1, 2 * H)
    e = grad_xA.reshape(-1, 2 * H) if grad_xA is not None else None
    # the columns of xA whose product with g is needed: [xA_U1 | xA_S2] (contiguous either way)
    xA_sel = xA2[:, (0 if need_U1 else H):(2 * H if need_S2 else H)]
    if _served(grad_y, S1s, S2s, "backward"):
        parts, dB, db = grad_pass(g, xA_sel, _half_out(U1s).mT, _half_out(S2s).mT, need_dbias=need_db,
                                  scale=scale, out_dtype=g.dtype, in_op=in_op)
        GL, GH = _half_in(S1s).mT, _half_in(U2s).mT
        if not need_dx:   # dxA alone: the same launch with no dx columns
            GL, GH = GL[:, :0], GH[:, :0]
        dx2, dxA2 = chain_from_partials(parts, GL, GH, e, scale, dtype=grad_y.dtype, in_op=in_op)
    else:
        dx2, dxA2 = _torch_dx_dxA(g, e, S1s, S2s, U1s, U2s, need_dx)
        # GEMMs accumulate in fp32 and apply alpha before their one rounding; no fp32 copy of g (with
        # such copies the op's forward+backward took 0.471 ms against the C++ op's 0.195: H200, bf16,
        # 2048 rows of 16384 -> 16384; docs/benchmarks.md, nineteenth session)
        dB = torch.addmm(g.new_empty((xA_sel.shape[1], d_out)), xA_sel.mT, g, beta=0, alpha=scale)
        acc = torch.promote_types(g.dtype, torch.float32)   # float64 stays float64
        db = g.sum(0, dtype=acc).to(g.dtype) if need_db else g.new_empty((0,))
    dx = _with_last(dx2, lead, d_in) if need_dx else grad_y.new_empty((0,))
    return dx, _with_last(dxA2, lead, 2 * H), dB, db


@torch.library.triton_op("panther::sketched_linear_triton_grads", mutates_args=())
def sketched_linear_triton_grads(grad_y: Tensor, grad_xA: Optional[Tensor], xA: Tensor, S1s: Tensor,
                                 S2s: Tensor, U1s: Tensor, U2s: Tensor, need_dx: bool, need_U1: bool,
                                 need_S2: bool, need_db: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The backward's pass over grad_y: ``(dx, dxA, dB, db)`` as ``_chain_grads``."""
    return _chain_grads(grad_y, grad_xA, xA, S1s, S2s, U1s, U2s, need_dx, need_U1, need_S2, need_db)


def _backward(ctx, grad_y, grad_xA, grads=None):
    """6·N·L·k·(d_in+d_out) FLOPs for dx, dS1s, dS2s: one pass over g gives dx, dxA and the B-side
    gradients (``_chain_grads``), then dS1s, dU2s = xᵀ·dxA (x read once for both).
    ``grads``: what computes ``_chain_grads``; by default the custom op."""
    x, xA, S1s, S2s, U1s, U2s = ctx.saved_tensors
    grad_y = grad_y_or_zeros(grad_y, x, S2s)
    need_x, need_S1, need_S2, need_U1, need_U2, need_b = ctx.needs_input_grad
    need_b = need_b and ctx.has_bias
    L, d_in, k = S1s.shape
    d_out = S2s.shape[-1]
    H = L * k
    x2 = x.reshape(-1, d_in)
    grads = grads or torch.ops.panther.sketched_linear_triton_grads
    dx, dxA, dB, db = grads(grad_y, grad_xA, xA, S1s, S2s, U1s, U2s, need_x, need_U1, need_S2, need_b)
    dx = dx if need_x else None
    dxA = dxA.reshape(-1, 2 * H)
    dS1s = dU2s = None
    if need_S1 or need_U2:
        # x read once for both A-side factors when both need a gradient.
        cols = slice(0, 2 * H) if (need_S1 and need_U2) else slice(0, H) if need_S1 else slice(H, 2 * H)
        dA = (x2.mT @ dxA[:, cols]).reshape(d_in, -1, k).permute(1, 0, 2)
        if need_S1:
            dS1s = dA[:L]
        if need_U2:
            dU2s = dA[-L:]
    dU1s = dB[:H].to(U1s.dtype).reshape(L, k, d_out) if need_U1 else None
    dS2s = dB[-H:].to(S2s.dtype).reshape(L, k, d_out) if need_S2 else None
    db = db.to(grad_y.dtype) if need_b else None
    return dx, dS1s, dS2s, dU1s, dU2s, db


torch.library.register_autograd("panther::sketched_linear_triton_fwd", _backward, setup_context=setup_context)


class _EagerChain(torch.autograd.Function):
    """Eager calls the fused kernel serves skip the custom ops' Python dispatch: the same forward,
    the same backward (``_backward`` with the kernels launched directly). CPU per call on the H200
    host: forward+backward 1186 -> 1109 µs (16 rows), 1286 -> 1188 µs (16384 × 8192); the forward
    alone is the Triton launch either way (docs/benchmarks.md)."""

    @staticmethod
    def forward(ctx, x, S1s, S2s, U1s, U2s, bias):
        y, xA = _chain_forward(x, S1s, S2s, U1s, U2s, bias, in_op=False)
        setup_context(ctx, (x, S1s, S2s, U1s, U2s, bias), (y, xA))
        return y

    @staticmethod
    def backward(ctx, grad_y):
        return _backward(ctx, grad_y, None, functools.partial(_chain_grads, in_op=False))


# FlopCounterMode sees the ops, not their kernels: both run two GEMMs through the rank 2·L·k.
@register_flop_formula([torch.ops.panther.sketched_linear_triton_fwd, torch.ops.panther.sketched_linear_triton_bwd])
def _chain_flops(a_shape, grad_xA_or_S1s_shape, *shapes, out_shape=None, **kwargs):
    (first, p), n = out_shape, math.prod(a_shape[:-1])  # (y or dx, xA or dxA)
    return 2 * n * p[-1] * (a_shape[-1] + first[-1])


@register_flop_formula(torch.ops.panther.sketched_linear_triton_grads)
def _grads_flops(g_shape, *shapes, out_shape=None, **kwargs):
    # dxA = g·Bmᵀ, dx = dxA·Aᵀ, dB = xA_selᵀ·g, db as the ones column of that product
    dx, dxA, dB, db = out_shape
    n, d_out, r = math.prod(g_shape[:-1]), g_shape[-1], dxA[-1]
    d_in = dx[-1] if len(dx) > 1 else 0
    return 2 * n * r * (d_out + d_in) + 2 * n * (dB[0] + (1 if db[0] else 0)) * d_out


def _check_args(x, S1s, S2s, U1s, U2s, bias):
    for name, t in (("x", x), ("S1s", S1s), ("S2s", S2s), ("U1s", U1s), ("U2s", U2s), ("bias", bias)):
        if t is not None and not isinstance(t, Tensor):
            raise TypeError(f"sketched_linear_triton: {name} must be a torch.Tensor, got {type(t).__name__}")
    if any(t.dim() != 3 for t in (S1s, S2s, U1s, U2s)):
        raise ValueError("sketched_linear_triton: S1s, S2s, U1s, U2s must be 3-D (L, ., .), got shapes "
                         f"{[tuple(t.shape) for t in (S1s, S2s, U1s, U2s)]}")
    L, d_in, k = S1s.shape
    d_out = S2s.shape[-1]
    for name, t, want in (("S2s", S2s, (L, k, d_out)), ("U1s", U1s, (L, k, d_out)), ("U2s", U2s, (L, d_in, k))):
        if tuple(t.shape) != want:
            raise ValueError(f"sketched_linear_triton: {name} must be (L, ., .) = {want}, got {tuple(t.shape)}")
    if x.dim() < 1 or x.shape[-1] != d_in:
        raise ValueError(f"sketched_linear_triton: x must have last dimension in_features={d_in}, "
                         f"got shape {tuple(x.shape)}")
    if bias is not None and tuple(bias.shape) != (d_out,):
        raise ValueError(f"sketched_linear_triton: bias must be (out_features,) = ({d_out},), got {tuple(bias.shape)}")
    for name, t in (("S1s", S1s), ("S2s", S2s), ("U1s", U1s), ("U2s", U2s), ("bias", bias)):
        if t is None:
            continue
        if t.device != x.device:
            raise ValueError(f"sketched_linear_triton: {name} must be on x's device {x.device}, got {t.device}")
        if t.dtype != x.dtype:
            raise TypeError(f"sketched_linear_triton: {name} must have x's dtype {x.dtype}, got {t.dtype}")


def sketched_linear_triton(x, S1s, S2s, U1s, U2s, bias=None):
    """``y = 1/(2L) Σ_i [(x S1_i) U1_i + (x U2_i) S2_i] + bias``, like ``torch.ops.panther.sketched_linear``
    (any leading shape, autocast honoured), through the fused Triton kernel on CUDA."""
    return autocast_call(_checked_forward, x, S1s, S2s, U1s, U2s, bias)


def _checked_forward(x, S1s, S2s, U1s, U2s, bias):
    _check_args(x, S1s, S2s, U1s, U2s, bias)
    args = (x, S1s, S2s, U1s, U2s, bias)
    served = _served(x, S1s, S2s)
    if x.is_cuda and not served:
        # a GPU call the fused kernel does not serve: the op would run the C++ op's two GEMMs at three
        # times its Python cost per call (tiny shapes, 2-core CPU host: forward 63 µs against 20,
        # forward+backward 343 against 214; the script is in docs/benchmarks.md, eighteenth session).
        # Other devices keep the op: its torch branch is the same math (on CPU, the C++ op's too).
        return torch.ops.panther.sketched_linear(*args)
    if served and direct_launch_ok():
        if grad_needed(*args):
            return _EagerChain.apply(*args)
        # nothing to differentiate: the kernels without autograd.Function's cost (about 23 µs of
        # Python per call on the 2-core CI machine)
        return _chain_forward(*args, in_op=False)[0]
    return torch.ops.panther.sketched_linear_triton_fwd(*args)[0]
