"""Fused Triton forward kernels for ``panther::rf_attention`` (random-feature attention).

Same contract and semantics as ``torch.ops.panther.rf_attention`` (see ``panther/ops/attention.py``);
the feature maps phi(q), phi(k) are computed on chip and never written to HBM.

Shifts. Every stabiliser is a constant shared by the numerator and the denominator of one query,
so it cancels exactly (there is no epsilon); ``1/sqrt(m)`` cancels the same way and is dropped.
    * query t: ``exp(u_tj - max_j u_tj)``;
    * keys: ``e_sj = w_j.k_s' - |k_s'|^2/2``, ``kappa_s = max_j e_sj`` (masked keys: none);
      non-causal: one shift per (b, h) = max of kappa over the visible keys (reached through an
      online max across key blocks and a rescaling merge, FlashAttention-style);
      causal: query t sees key s <= t through ``exp(e_sj - M_t)`` with ``M_t`` the running max of
      kappa over keys <= t (never a future key), so every weight is <= 1. States carry their
      reference (the running max at their last key) and are rescaled when it grows.

Kernels (all fp32 accumulation; exponents in log2 units inside the kernels, where the softmax
projection comes pre-scaled, ``_Operands.WL``; q, k, v read in their own dtype; the feature products
x·W on the tensor cores in fp32 for fp32 inputs, else in fp16 (bf16 q, k tiles are converted on
chip: rounding W to bf16 would be the bf16 path's largest error, see ``_projection_operand``):
    ``_kv_state_kernel``   non-causal, grid (feature blocks, B·H, key splits): per key range and
                           feature block, the state ``phi(K)^T V`` and ``z = phi(K)^T 1`` at the
                           block's max, laid out as FlashAttention's forward with the features as
                           the queries (per-feature online max).
    ``_merge_kernel``      non-causal, grid (B·H, feature blocks): the total over the splits,
                           rescaled to the running max of kappa (bf16 for half inputs).
    ``_query_kernel``      non-causal, grid (B·H, query blocks): ``phi(q)·S / phi(q)·z``,
                           FlashAttention-style over the feature blocks (online row max).
    ``_query_persistent_kernel`` the same for half inputs with d <= 64, grid (B·H, a few
                           programs per head): the projection and the head's state loaded once
                           per program, every query's features whole (``persistent_queries``).
    ``_causal_state_kernel`` causal, grid (feature blocks, B·H, segments): walks the segment's
                           chunks of C = 64 from zero and writes the state of the segment's keys
                           before every chunk (bf16 for half inputs, as the product takes it) at
                           the block's reference, each key's shift per block (KAP), and the
                           segment's total; references and shifts per block of the chunk kernels
                           (a walk block may span several: ``walk_block``).
    ``_segment_prefix_kernel`` causal, grid (B·H, feature sub-blocks): the state of the segments
                           before each segment, from their totals.
    ``_causal_out_kernel`` causal, grid (chunks, B·H), every chunk independent: intra-chunk masked
                           product plus the inter-chunk ``phi(Q)·state``, the state in two parts
                           (the segment's keys so far, the earlier segments') whose products are
                           scaled to the chunk's reference (``_chunk_factors``).
Causal is thus chunk walk, segment prefix, chunk outputs (as flash-linear-attention's chunked
form, with the segment level added so the state walk runs on every SM; no pass over the keys runs
before the walk, the chunk outputs add the earlier segments); non-causal is key pass, merge,
query pass.

Registered as ``torch.library.triton_op("panther::rf_attention_triton")``. A device branch sends CPU
tensors, float64 and shapes the kernels do not cover (head dim > 128, m > 256, dv > 128, empty) to
``torch.ops.panther.rf_attention``. The backward is the fused Triton backward
(``inductor_ext/triton_attention_bwd.py``, triton_op ``panther::rf_attention_triton_backward``)
where the kernels serve the call and the projection needs no gradient, else the C++
``panther::rf_attention_backward``. ``rf_attention_triton`` calls the variant
``panther::rf_attention_triton_train`` when a gradient is needed: the same output plus per-row
den and shifts (``SAVE_STATS`` below), which spare the backward's dq walk two of its three passes,
and the keys' states (causal: the state before every chunk), which spare the backward its own
pass over the keys (``backward_params["save_states"]``).
Under ``TRITON_INTERPRET=1`` (set before triton is imported) CPU tensors run the kernels in Triton's
interpreter (eager only): that is how CPU CI checks the arithmetic.
"""
from __future__ import annotations

import math
import os
from typing import NamedTuple, Optional

import torch
from torch import Tensor

import panther  # noqa: F401  (loads the native ops)
from panther.ops.attention import _check_rf, _rf_setup_context

from ._autocast import autocast_call
from ._eager import grad_needed

try:  # Triton is optional: without it every call takes the C++ op.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

__all__ = ["rf_attention_triton", "rf_attention_triton_op", "kernel_ok", "bench_triton_attention",
           "CHUNK", "MAX_FEATURES", "MAX_HEAD_DIM"]

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
CHUNK = 64            # causal chunk length (keys per step of the chunk walk)
MAX_FEATURES = 256    # m (padded to a power of two) the kernels hold in registers
MAX_HEAD_DIM = 128    # d and dv limits
_LOWEST = -3.0e38     # finite "minus infinity": differences of shifts never give inf - inf
_KERNEL_ID = {"softmax": 0, "relu": 1}
_LOG2E_F = 1.4426950408889634   # exp(x) = exp2(x·log2(e)): the kernels' exponents are in log2 units
_MAX_GRID_Y = 65535      # CUDA's limit on a launch grid's second (and third) dimension
# launch defaults of the non-causal key pass and of the causal chunk states, shared by the forward
# and the fused backward (the fastest measured on the H200: see _forward)
_KV = dict(kv_block_f=128, kv_warps=4, kv_stages=3)
# walk_block_f: the causal chunk walk's features per program, by input precision (``walk_block``).
# The bf16 walk holds 250 registers, 2 programs per SM; capped at 168-200 (3 per SM, spilling) it took
# 0.50-1.02 ms against 0.39 (H200, docs/benchmarks.md, twenty-second session).
_STATES = dict(state_block_f=64, walk_block_f={"half": 128, "fp32": 64}, state_warps=4,
               state_stages=3)
# the causal chunk outputs' pipelining depth, by input precision and by whether the launch also
# stores the training statistics. H200, bf16, 65,536 tokens × 16 heads, ms at 4 stages against 3:
# inference 0.72 against 0.74, training 0.765 against 0.74 (4096 × 16: 0.61 / 0.62, 0.66 / 0.615);
# 2 stages 0.82-0.85; 8 warps 1.9-2.1 (docs/benchmarks.md, twenty-first session, with the script).
# fp32 keeps 3: at 4, inference took 8.39 ms against 8.47-8.52 at 65,536 × 1 but 9.30 against
# 6.12 at 4096 × 16 (twenty-second session).
_OUT_STAGES = {"half": {False: 4, True: 3}, "fp32": {False: 3, True: 3}}


def precision(dtype) -> str:
    """The key of the launch tables by input precision: "fp32" or "half" (bf16 / fp16)."""
    return "fp32" if dtype == torch.float32 else "half"


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, 1 << max(int(n) - 1, 0).bit_length())


if triton is not None:
    # kernel constants (globals a kernel reads must be constexpr)
    _LOWEST_C = tl.constexpr(_LOWEST)
    _ZW = tl.constexpr(16)              # width of the sum products' operand (tl.dot's minimum)
    _LOG2E = tl.constexpr(_LOG2E_F)
    _LN2 = tl.constexpr(0.6931471805599453)
    _TF32X3 = tl.constexpr("tf32x3")

    @triton.jit
    def _max2(a, b):
        # the combine of a running-max scan (tl.associative_scan)
        return tl.maximum(a, b)

    @triton.jit
    def _mm_at(a, b, UPCAST: tl.constexpr, FP32: tl.constexpr):
        # Triton's CPU interpreter multiplies bf16 bit patterns wrongly; fp32 is exact there.
        # UPCAST: fp32 operands, multiplied at input precision FP32, a tl.constexpr string (callers
        # pass a constexpr global: triton 3.6 takes no plain-str default for a jit argument)
        if UPCAST:
            r = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=FP32)
        else:
            r = tl.dot(a, b)
        return r

    @triton.jit
    def _mm(a, b, UPCAST: tl.constexpr):
        # Attention's products. fp32 as tf32x3 (three tf32 products, about fp32's accuracy) on the
        # tensor cores: "ieee" FMA loops spilled 8-15 KB per thread and made the causal fp32 step
        # 29x slower (H200, 16,384 tokens × 16 heads: forward 57 ms against 2.8, forward+backward
        # 271 against 9.3; both 2e-6 off the fp32 C++ op).
        return _mm_at(a, b, UPCAST, _TF32X3)

    @triton.jit
    def _load_w(W, offs_f, offs_d, swm, swd, feat_ok, D):
        """The (features, d) block of the projection."""
        return tl.load(W + offs_f[:, None] * swm + offs_d[None, :] * swd,
                       mask=feat_ok[:, None] & (offs_d[None, :] < D), other=0.0)

    @triton.jit
    def _load_w_t(W, offs_f, offs_d, swm, swd, feat_ok, D):
        """The (d, features) block of the projection, transposed."""
        return tl.load(W + offs_f[None, :] * swm + offs_d[:, None] * swd,
                       mask=feat_ok[None, :] & (offs_d[:, None] < D), other=0.0)

    @triton.jit
    def _to_w(x, W):
        """A q / k tile as the projection's product operand (W: the projection's pointer). bf16
        tiles meet the fp16 projection (``_projection_operand``): bf16 values of magnitude
        2^-17 to 65504 convert exactly (smaller ones lose at most 2^-25); beyond +-65504 they are
        clamped."""
        if x.dtype == W.dtype.element_ty:
            r = x
        else:
            r = tl.clamp(x.to(tl.float32), -65504.0, 65504.0).to(W.dtype.element_ty)
        return r

    @triton.jit
    def _half_sq_norm(x, alpha, scale):
        """Per row of a q / k tile, a·scale·|x|^2 / 2: the softmax exponents' a^2 |x|^2 / 2 for
        scale = a (natural units) or scale = a·log2(e) (the kernels' log2 units)."""
        xf = x.to(tl.float32)
        # Inductor passes Python floats as fp64 scalars: cast back so the tiles stay fp32
        return (tl.sum(xf * xf, axis=1) * (0.5 * alpha * scale)).to(tl.float32)

    @triton.jit
    def _column0(rows: tl.constexpr, dtype):
        """A (rows, _ZW) operand with ones in column 0: x·it sums x's rows on the tensor cores
        (into column 0 of the product), with no elementwise work per x element."""
        col = tl.arange(0, _ZW)[None, :] + tl.zeros((rows, 1), tl.int32)
        return tl.where(col == 0, 1.0, 0.0).to(dtype)

    @triton.jit
    def _feature_operands(x, W, alpha):
        """A q / k tile's loop invariants for ``_features``: the tile as the product operand
        (``_to_w``) and its rows' a^2 |x|^2 / 2 in log2 units (as the products of the
        projection operand ``_Operands.WL``)."""
        return _to_w(x, W), _half_sq_norm(x, alpha, alpha * _LOG2E)

    @triton.jit
    def _features(xw, hx, w_t, feat_ok, row_ok, KERNEL: tl.constexpr, UPCAST: tl.constexpr):
        """(rows, features) exponents e = x'W^T - |x'|^2/2 in log2 units (softmax, from blocks of
        ``_Operands.WL``; padded features / rows LOWEST) or relu(xW^T) (relu), from
        ``_feature_operands`` (xw, hx) and the (d, features) block w_t of the projection
        operand."""
        u = _mm(xw, w_t, UPCAST)
        if KERNEL == 0:
            e = u.to(tl.float32) - hx[:, None]
            e = tl.where(feat_ok[None, :] & row_ok[:, None], e, _LOWEST_C)
        else:
            e = tl.where(feat_ok[None, :] & row_ok[:, None], tl.maximum(u, 0.0), 0.0)
        return e

    @triton.jit
    def _query_operands(x, W):
        """A query tile's ``_feature_operands`` in the backward: the saved query shift leaves out
        the row's -|q|^2/2 (``_store_rows``), so the exponents leave it out too (zeros)."""
        return _to_w(x, W), tl.zeros((x.shape[0],), dtype=tl.float32)

    @triton.jit
    def _store_rows(O, STATS, num, den, shift, mt, b, hh, bh, rows64, row_ok, offs_v,
                    sob, soh, sol, sod, L, DV,
                    KERNEL: tl.constexpr, CAUSAL: tl.constexpr, SAVE_STATS: tl.constexpr):
        """out = num / den into O (0 where den == 0). SAVE_STATS: the rows' statistics the fused
        backward reads, STATS (B·H, 3, L): den, the query shift in natural units (shift is the
        kernels' log2 row max of q·w, without the row's -|q|^2/2, which cancels: the backward's
        query exponents leave it out too, ``_query_operands``; 0 for relu) and, causal softmax,
        the key running max M (mt, log2 units). (The |q|^2 term kept the q tile live to the end:
        the causal chunk outputs spilled 104 bytes against 32 without statistics, triton 3.9.)"""
        out = num / tl.where(den == 0.0, 1.0, den)[:, None]
        out = tl.where((den == 0.0)[:, None], 0.0, out)
        tl.store(O + b.to(tl.int64) * sob + hh.to(tl.int64) * soh + rows64[:, None] * sol
                 + offs_v[None, :] * sod, out.to(O.dtype.element_ty),
                 mask=row_ok[:, None] & (offs_v[None, :] < DV))
        if SAVE_STATS:
            s_base = STATS + bh.to(tl.int64) * (3 * L)
            tl.store(s_base + rows64, den, mask=row_ok)
            if KERNEL == 0:
                tl.store(s_base + L + rows64, shift * _LN2, mask=row_ok)
                if CAUSAL:
                    tl.store(s_base + 2 * L + rows64, mt * _LN2, mask=row_ok)
            else:
                tl.store(s_base + L + rows64, tl.zeros_like(den), mask=row_ok)

    @triton.jit
    def _kv_state_kernel(
        K, V, W, MASK, P, Z, MX,
        H, S, M, D, DV, SEG,
        skb, skh, sks, skd,
        svb, svh, svs, svd,
        swm, swd,
        smb, sms,
        alpha,
        KERNEL: tl.constexpr, HAS_MASK: tl.constexpr, UPCAST: tl.constexpr,
        M_PAD: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr, BLOCK_F: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        """Non-causal: one feature block of one key split: P[bh, i, f] = sum_s exp(e_sf - R) v_s^T,
        Z likewise, MX[bh, i, fb] = R, the max of e over the split's keys and the block's features.
        Grid (feature blocks, B·H, splits): the feature blocks of one key range run side by side
        and share its k / v tiles through L2.

        Laid out as FlashAttention's forward with the feature rows in the place of the queries:
        the (features × keys) exponent tile feeds the state product as it comes out of the first
        product (no transpose), and each feature keeps its own running max (a row reduction;
        one shift per tile would need a cross-warp reduction every step). The per-feature
        references are brought to the block's max once at the end. The product comes out in
        exp2's log2 units (``_Operands.WL``), and z is summed on the tensor cores
        (``_column0``), and an invalid key needs no select per weight. At 65,536 tokens × 16
        heads on the H200 this measured 0.245 ms, against 0.258 with the selects and the
        elementwise z, and 0.28 with the selects alone."""
        alpha = tl.cast(alpha, tl.float32)   # Inductor passes a float argument as fp64
        fb = tl.program_id(0)
        bh = tl.program_id(1)
        sp = tl.program_id(2)
        nfb = tl.num_programs(0)
        nsp = tl.num_programs(2)
        b = bh // H
        hh = bh % H
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, D_PAD)
        offs_f = fb * BLOCK_F + tl.arange(0, BLOCK_F)
        offs_v = tl.arange(0, DV_PAD)
        feat_ok = offs_f < M
        w = _load_w(W, offs_f, offs_d, swm, swd, feat_ok, D)
        k_base = K + b.to(tl.int64) * skb + hh.to(tl.int64) * skh
        v_base = V + b.to(tl.int64) * svb + hh.to(tl.int64) * svh
        acc = tl.zeros((BLOCK_F, DV_PAD), dtype=tl.float32)
        zacc = tl.zeros((BLOCK_F, _ZW), dtype=tl.float32)   # z in column 0
        ones = _column0(BLOCK_N, V.dtype.element_ty)
        run = tl.full((BLOCK_F,), _LOWEST_C, tl.float32)   # per feature, log2 units
        scale2 = alpha * _LOG2E
        start = sp * SEG
        for s0 in range(start, start + SEG, BLOCK_N):
            rows = s0 + offs_n
            row_ok = rows < S
            rows64 = rows.to(tl.int64)
            if HAS_MASK:
                mk = tl.load(MASK + b.to(tl.int64) * smb + rows64 * sms, mask=row_ok, other=1)
                row_ok = row_ok & (mk == 0)
            kt = tl.load(k_base + rows64[:, None] * sks + offs_d[None, :] * skd,
                         mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
            vt = tl.load(v_base + rows64[:, None] * svs + offs_v[None, :] * svd,
                         mask=row_ok[:, None] & (offs_v[None, :] < DV), other=0.0)
            s = _mm(w, tl.trans(_to_w(kt, W)), UPCAST)        # (features, keys)
            if KERNEL == 0:
                # |k|^2 a^2 / 2 in log2 units, as the product; an invalid key's is +inf: its
                # exponents are -inf, out of the max, and exp2 gives 0 with no select
                hk = tl.where(row_ok, _half_sq_norm(kt, alpha, scale2), float("inf"))
                e = s - hk[None, :]
                new = tl.maximum(run, tl.max(e, axis=1))
                r = tl.exp2(run - new)
                p = tl.exp2(e - new[:, None])
                acc = acc * r[:, None]
                zacc = zacc * r[:, None]
                run = new
            else:
                p = tl.maximum(s, 0.0)     # an invalid key's row of k was loaded as 0
            pv = p.to(vt.dtype)
            acc += _mm(pv, vt, UPCAST)
            zacc += _mm(pv, ones, UPCAST)
        z = tl.sum(zacc, axis=1)
        if KERNEL == 0:
            # one reference for the block: the max over its (real) features, in natural units
            ref = tl.max(tl.where(feat_ok, run, _LOWEST_C), axis=0)
            to_ref = tl.exp2(run - ref)
            acc = acc * to_ref[:, None]
            z = z * to_ref
            ref = ref * _LN2
        else:
            ref = tl.max(tl.full((BLOCK_F,), _LOWEST_C, tl.float32), axis=0)
        acc = tl.where(feat_ok[:, None], acc, 0.0)
        z = tl.where(feat_ok, z, 0.0)
        base = bh.to(tl.int64) * nsp + sp
        tl.store(P + base * (M_PAD * DV_PAD) + offs_f[:, None] * DV_PAD + offs_v[None, :], acc)
        tl.store(Z + base * M_PAD + offs_f, z)
        tl.store(MX + base * nfb + fb, ref)

    @triton.jit
    def _merge_kernel(
        P, Z, MX, ST, ZT, NSPLIT,
        M_PAD: tl.constexpr, DV_PAD: tl.constexpr, BLOCK_F: tl.constexpr,
        NF: tl.constexpr, NF_PAD: tl.constexpr,
    ):
        """Non-causal: ST, ZT <- the total over the splits of one (b, h), rescaled to the running
        max of the per-split maxima over all feature blocks (the overall max, whose value is never
        needed: it cancels)."""
        bh = tl.program_id(0)
        fb = tl.program_id(1)
        offs_f = fb * BLOCK_F + tl.arange(0, BLOCK_F)
        offs_v = tl.arange(0, DV_PAD)
        offs_nf = tl.arange(0, NF_PAD)
        acc = tl.zeros((BLOCK_F, DV_PAD), dtype=tl.float32)
        z = tl.zeros((BLOCK_F,), dtype=tl.float32)
        run = tl.max(tl.full((BLOCK_F,), _LOWEST_C, tl.float32), axis=0)
        for i in range(0, NSPLIT):
            base = bh.to(tl.int64) * NSPLIT + i
            pi = tl.load(P + base * (M_PAD * DV_PAD) + offs_f[:, None] * DV_PAD + offs_v[None, :])
            zi = tl.load(Z + base * M_PAD + offs_f)
            mi = tl.load(MX + base * NF + fb)
            mg = tl.max(tl.load(MX + base * NF + offs_nf, mask=offs_nf < NF, other=_LOWEST_C),
                        axis=0)
            new = tl.maximum(run, mg)
            r_old = tl.exp(run - new)
            r_new = tl.exp(mi - new)
            acc = acc * r_old + pi * r_new
            z = z * r_old + zi * r_new
            run = new
        tl.store(ST + bh.to(tl.int64) * (M_PAD * DV_PAD) + offs_f[:, None] * DV_PAD
                 + offs_v[None, :], acc.to(ST.dtype.element_ty))
        tl.store(ZT + bh.to(tl.int64) * M_PAD + offs_f, z)

    @triton.jit
    def _query_kernel(
        Q, W, ST, ZT, O, STATS,
        H, L, M, D, DV,
        sqb, sqh, sql, sqd,
        swm, swd,
        sob, soh, sol, sod,
        alpha,
        KERNEL: tl.constexpr, UPCAST: tl.constexpr,
        M_PAD: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_F: tl.constexpr, SAVE_STATS: tl.constexpr, EVEN_F: tl.constexpr,
    ):
        """out = phi(q)·S / phi(q)·z for one query block (0 where the denominator is 0).
        SAVE_STATS: per row den and the query shift into STATS (B·H, 3, L) for the backward.

        FlashAttention's forward with the features in the place of the keys and the state rows
        in the place of the values: feature blocks of BLOCK_F with an online row max, so the
        (rows × m) feature tile is never held whole. The query's -|q|^2/2 is a per-row constant
        and cancels; it is only added back to the saved shift."""
        alpha = tl.cast(alpha, tl.float32)   # Inductor passes a float argument as fp64
        bh = tl.program_id(0)
        pm = tl.program_id(1)
        b = bh // H
        hh = bh % H
        offs_m = pm * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D_PAD)
        offs_v = tl.arange(0, DV_PAD)
        row_ok = offs_m < L
        rows64 = offs_m.to(tl.int64)
        qt = tl.load(Q + b.to(tl.int64) * sqb + hh.to(tl.int64) * sqh + rows64[:, None] * sql
                     + offs_d[None, :] * sqd,
                     mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
        qw = _to_w(qt, W)
        st_base = ST + bh.to(tl.int64) * (M_PAD * DV_PAD)
        zt_base = ZT + bh.to(tl.int64) * M_PAD
        run = tl.full((BLOCK_M,), _LOWEST_C, tl.float32)
        acc = tl.zeros((BLOCK_M, DV_PAD), dtype=tl.float32)
        den = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for f0 in range(0, M_PAD, BLOCK_F):
            offs_f = f0 + tl.arange(0, BLOCK_F)
            feat_ok = offs_f < M
            w_t = _load_w_t(W, offs_f, offs_d, swm, swd, feat_ok, D)
            st = tl.load(st_base + offs_f[:, None] * DV_PAD + offs_v[None, :])
            zt = tl.load(zt_base + offs_f)
            s = _mm(qw, w_t, UPCAST)       # softmax: log2 units (_Operands.WL)
            if KERNEL == 0:
                e = s
                if not EVEN_F:             # padded features (W rows 0) out of the max
                    e = tl.where(feat_ok[None, :], e, -float("inf"))
                new = tl.maximum(run, tl.max(e, axis=1))
                r = tl.exp2(run - new)
                p = tl.exp2(e - new[:, None])
                acc = acc * r[:, None]
                den = den * r
                run = new
            else:
                p = tl.maximum(s, 0.0)     # padded features: W rows 0
            acc += _mm(p.to(st.dtype), st, UPCAST)
            den += tl.sum(p * zt[None, :], axis=1)
        _store_rows(O, STATS, acc, den, run, run, b, hh, bh, rows64, row_ok, offs_v,
                    sob, soh, sol, sod, L, DV, KERNEL, False, SAVE_STATS)

    @triton.jit
    def _query_persistent_kernel(
        Q, W, ST, ZT, O, STATS,
        H, L, M, D, DV, NPROG,
        sqb, sqh, sql, sqd,
        swm, swd,
        sob, soh, sol, sod,
        alpha,
        KERNEL: tl.constexpr, UPCAST: tl.constexpr,
        M_PAD: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
        SAVE_STATS: tl.constexpr, EVEN_F: tl.constexpr,
    ):
        """Non-causal queries, NPROG programs per (b, h), each over every NPROG-th block of
        BLOCK_M queries: the projection and the head's state are loaded once per program (no
        reload per query block), and each query's features are taken whole, (BLOCK_M × M_PAD),
        so the row max needs no online rescale."""
        alpha = tl.cast(alpha, tl.float32)   # Inductor passes a float argument as fp64
        bh = tl.program_id(0)
        part = tl.program_id(1)
        b = bh // H
        hh = bh % H
        offs_d = tl.arange(0, D_PAD)
        offs_v = tl.arange(0, DV_PAD)
        offs_f = tl.arange(0, M_PAD)
        feat_ok = offs_f < M
        w_t = _load_w_t(W, offs_f, offs_d, swm, swd, feat_ok, D)
        st = tl.load(ST + bh.to(tl.int64) * (M_PAD * DV_PAD) + offs_f[:, None] * DV_PAD
                     + offs_v[None, :])
        zt = tl.load(ZT + bh.to(tl.int64) * M_PAD + offs_f)
        q_base = Q + b.to(tl.int64) * sqb + hh.to(tl.int64) * sqh
        for blk in range(part, tl.cdiv(L, BLOCK_M), NPROG):
            offs_m = blk * BLOCK_M + tl.arange(0, BLOCK_M)
            row_ok = offs_m < L
            rows64 = offs_m.to(tl.int64)
            qt = tl.load(q_base + rows64[:, None] * sql + offs_d[None, :] * sqd,
                         mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
            s = _mm(_to_w(qt, W), w_t, UPCAST)       # softmax: log2 units (_Operands.WL)
            if KERNEL == 0:
                e = s
                if not EVEN_F:             # padded features (W rows 0) out of the max
                    e = tl.where(feat_ok[None, :], e, -float("inf"))
                run = tl.max(e, axis=1)
                p = tl.exp2(e - run[:, None])
            else:
                run = tl.zeros((BLOCK_M,), dtype=tl.float32)
                p = tl.maximum(s, 0.0)     # padded features: W rows 0
            acc = _mm(p.to(st.dtype), st, UPCAST)
            den = tl.sum(p * zt[None, :], axis=1)
            _store_rows(O, STATS, acc, den, run, run, b, hh, bh, rows64, row_ok, offs_v,
                        sob, soh, sol, sod, L, DV, KERNEL, False, SAVE_STATS)

    @triton.jit
    def _causal_state_kernel(
        K, V, W, MASK, HS, HZ, HR, KAP, P, Z, R,
        H, L, M, D, DV, SEG, NCHUNK,
        skb, skh, sks, skd,
        svb, svh, svs, svd,
        swm, swd,
        smb, sms,
        alpha,
        KERNEL: tl.constexpr, HAS_MASK: tl.constexpr, UPCAST: tl.constexpr,
        M_PAD: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr, BLOCK_F: tl.constexpr,
        C: tl.constexpr, EVEN_F: tl.constexpr, REF_F: tl.constexpr,
    ):
        """Chunked causal, step 1: one feature block of one segment walks the segment's chunks from
        zero. Before every chunk it writes the state of the segment's keys so far (HS in the state
        dtype, HZ fp32) at the block's reference HR[bh, chunk, fb] (log2 units: the max exponent
        of the block's features over those keys); per key of the chunk, its shift over the block's
        features (KAP[bh, fb, s], natural units; softmax), from which the chunk kernels build the
        running max M. At the end: the segment's total (P, Z at R[bh, segment, fb]), which
        ``_segment_prefix_kernel`` turns into the state of the earlier segments. Grid (feature
        blocks, B·H, segments). No pass over the keys runs before it: the chunk kernels add the
        two parts (``_chunk_factors``). relu: references 0.
        References, shifts and totals are written per REF_F features (the chunk kernels' block,
        a divisor of BLOCK_F): the walk's one reference goes into each of its REF_F blocks."""
        alpha = tl.cast(alpha, tl.float32)   # Inductor passes a float argument as fp64
        fb = tl.program_id(0)
        bh = tl.program_id(1)
        sg = tl.program_id(2)
        nsg = tl.num_programs(2)
        NFR: tl.constexpr = M_PAD // REF_F
        RPW: tl.constexpr = BLOCK_F // REF_F      # reference slots per walk block
        offs_r = fb * RPW + tl.arange(0, RPW)
        # one value into each of the RPW slots: (RPW,)-shaped values and masks. (Leaving the
        # broadcast to tl.store compiles the bf16 softmax walk differently, untimed.)
        ones_r = tl.full((RPW,), 1.0, tl.float32)
        b = bh // H
        hh = bh % H
        offs_c = tl.arange(0, C)
        offs_d = tl.arange(0, D_PAD)
        offs_f = fb * BLOCK_F + tl.arange(0, BLOCK_F)
        offs_v = tl.arange(0, DV_PAD)
        feat_ok = offs_f < M
        w = _load_w(W, offs_f, offs_d, swm, swd, feat_ok, D)
        st = tl.zeros((BLOCK_F, DV_PAD), dtype=tl.float32)
        zf = tl.zeros((BLOCK_F,), dtype=tl.float32)
        run = tl.max(tl.zeros((BLOCK_F,), dtype=tl.float32), axis=0)
        if KERNEL == 0:
            run += _LOWEST_C
        scale2 = alpha * _LOG2E
        k_base = K + b.to(tl.int64) * skb + hh.to(tl.int64) * skh
        v_base = V + b.to(tl.int64) * svb + hh.to(tl.int64) * svh
        kap_base = KAP + (bh.to(tl.int64) * NFR + offs_r) * L
        start = sg * SEG
        for t0 in range(start, start + SEG, C):
            ch = bh.to(tl.int64) * NCHUNK + t0 // C
            live = (t0 + 0 * offs_f) < L      # the segment's last chunks may lie past L
            tl.store(HS + ch * (M_PAD * DV_PAD) + offs_f[:, None] * DV_PAD + offs_v[None, :],
                     st.to(HS.dtype.element_ty), mask=live[:, None])
            tl.store(HZ + ch * M_PAD + offs_f, zf, mask=live)
            tl.store(HR + ch * NFR + offs_r, run * ones_r, mask=(t0 + 0 * offs_r) < L)
            rows = t0 + offs_c
            key_ok = rows < L
            rows64 = rows.to(tl.int64)
            if HAS_MASK:
                mk = tl.load(MASK + b.to(tl.int64) * smb + rows64 * sms, mask=key_ok, other=1)
                key_ok = key_ok & (mk == 0)
            kt = tl.load(k_base + rows64[:, None] * sks + offs_d[None, :] * skd,
                         mask=key_ok[:, None] & (offs_d[None, :] < D), other=0.0)
            vt = tl.load(v_base + rows64[:, None] * svs + offs_v[None, :] * svd,
                         mask=key_ok[:, None] & (offs_v[None, :] < DV), other=0.0)
            s = _mm(w, tl.trans(_to_w(kt, W)), UPCAST)         # (features, keys)
            if KERNEL == 0:
                # log2 units (_Operands.WL). A key's |k|^2 term is constant over the block, so
                # its shift is its largest product less that term, and the weights take the term
                # and the reference as one per-key offset. The select on the weights stays:
                # without it (invalid keys' term +inf, as in the key pass) the walk measured
                # 0.56 ms against 0.52.
                hk = _half_sq_norm(kt, alpha, scale2)
                sm = s
                if not EVEN_F:
                    sm = tl.where(feat_ok[:, None], s, _LOWEST_C)
                kap = tl.where(key_ok, tl.max(sm, axis=0) - hk, _LOWEST_C)
                tl.store(kap_base[:, None] + rows64[None, :],
                         ones_r[:, None] * (kap * _LN2)[None, :],
                         mask=(offs_r >= 0)[:, None] & (rows < L)[None, :])
                new = tl.maximum(run, tl.max(kap, axis=0))
                p = tl.where(feat_ok[:, None] & key_ok[None, :], tl.exp2(s - (hk + new)[None, :]),
                             0.0)
                r = tl.exp2(run - new)
                st = st * r
                zf = zf * r
                run = new
            else:
                p = tl.maximum(s, 0.0)     # invalid keys (rows of k loaded as 0), padded features
            st += _mm(p.to(vt.dtype), vt, UPCAST)
            zf += tl.sum(p, axis=1)
        base = bh.to(tl.int64) * nsg + sg
        tl.store(P + base * (M_PAD * DV_PAD) + offs_f[:, None] * DV_PAD + offs_v[None, :], st)
        tl.store(Z + base * M_PAD + offs_f, zf)
        tl.store(R + base * NFR + offs_r, run * ones_r)

    @triton.jit
    def _segment_prefix_kernel(P, Z, R, PP, PZ, PR, NSEG, NFB,
                               M_PAD: tl.constexpr, DV_PAD: tl.constexpr, BLOCK_F: tl.constexpr,
                               SUB_F: tl.constexpr):
        """Causal: slot i of PP, PZ, PR <- the state of the segments before i (from their totals
        P, Z at R), at the running max of their references: features [SUB_F·j, SUB_F·(j + 1))
        of the walk's block of BLOCK_F (its reference). Grid (B·H, M_PAD / SUB_F)."""
        bh = tl.program_id(0)
        sub = tl.program_id(1)
        fb = (sub * SUB_F) // BLOCK_F
        offs_f = sub * SUB_F + tl.arange(0, SUB_F)
        offs_v = tl.arange(0, DV_PAD)
        acc = tl.zeros((SUB_F, DV_PAD), dtype=tl.float32)
        z = tl.zeros((SUB_F,), dtype=tl.float32)
        run = tl.max(tl.full((SUB_F,), _LOWEST_C, tl.float32), axis=0)
        first = bh.to(tl.int64) * NSEG
        in_tile = offs_f[:, None] * DV_PAD + offs_v[None, :]
        # each segment's total is loaded one step ahead (the last step reloads the last slot),
        # so a step waits on no memory round trip but its stores'
        p_next = tl.load(P + first * (M_PAD * DV_PAD) + in_tile)
        z_next = tl.load(Z + first * M_PAD + offs_f)
        r_next = tl.load(R + first * NFB + fb)
        for i in range(0, NSEG):
            base = first + i
            pi, zi, ri = p_next, z_next, r_next
            ahead = first + tl.minimum(i + 1, NSEG - 1)
            p_next = tl.load(P + ahead * (M_PAD * DV_PAD) + in_tile)
            z_next = tl.load(Z + ahead * M_PAD + offs_f)
            r_next = tl.load(R + ahead * NFB + fb)
            tl.store(PP + base * (M_PAD * DV_PAD) + in_tile, acc.to(PP.dtype.element_ty))
            tl.store(PZ + base * M_PAD + offs_f, z)
            if sub * SUB_F % BLOCK_F == 0:
                tl.store(PR + base * NFB + fb, run)
            new = tl.maximum(run, ri)
            a = tl.exp2(run - new)
            c = tl.exp2(ri - new)
            acc = acc * a + pi * c
            z = z * a + zi * c
            run = new

    @triton.jit
    def _chunk_ref(HR, PR, ch, sg, NFB: tl.constexpr, HAS_PREFIX: tl.constexpr):
        """The reference of the state before a chunk (log2 units): the max of its parts' block
        references, i.e. the running max M of the keys before the chunk (ch: the chunk's slot
        in HR, sg: its segment's in PR; 0 for relu)."""
        offs = tl.arange(0, NFB)
        ref = tl.load(HR + ch * NFB + offs)
        if HAS_PREFIX:
            ref = tl.maximum(ref, tl.load(PR + sg * NFB + offs))
        return tl.max(ref, axis=0)

    @triton.jit
    def _chunk_factors(HR, PR, ch, sg, fb, ref, NFB: tl.constexpr, HAS_PREFIX: tl.constexpr):
        """The factors (each <= 1) that bring feature block fb of the two parts of the state
        before a chunk to reference ref: the segment's keys so far (HS, HZ of slot ch) and the
        earlier segments' (PP, PZ of slot sg; 0 without a prefix). The chunk kernels apply them
        to the parts' products, so the stored states feed the tensor cores as they are."""
        a = tl.exp2(tl.load(HR + ch * NFB + fb) - ref)
        c = 0.0
        if HAS_PREFIX:
            c = tl.exp2(tl.load(PR + sg * NFB + fb) - ref)
        return a, c

    @triton.jit
    def _causal_out_kernel(
        Q, K, V, W, MASK, HS, HZ, HR, PP, PZ, PR, KAP, O, STATS,
        H, L, M, D, DV, NCHUNK, NSEG, SEG_CHUNKS,
        sqb, sqh, sql, sqd,
        skb, skh, sks, skd,
        svb, svh, svs, svd,
        swm, swd,
        smb, sms,
        sob, soh, sol, sod,
        alpha,
        KERNEL: tl.constexpr, HAS_MASK: tl.constexpr, UPCAST: tl.constexpr,
        M_PAD: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr, BLOCK_F: tl.constexpr,
        C: tl.constexpr, SAVE_STATS: tl.constexpr, HAS_PREFIX: tl.constexpr,
        EVEN_F: tl.constexpr,
    ):
        """Chunked causal, step 2: one chunk of one (b, h), independent of every other chunk:
        the intra-chunk masked product plus the inter-chunk phi(Q)·S, S the state of the keys
        before the chunk in two parts (``ChunkStates``: its segment's keys so far, HS, HZ, and,
        HAS_PREFIX, the earlier segments', PP, PZ; SEG_CHUNKS chunks per segment), each product
        scaled by ``_chunk_factors``. BLOCK_F is the walk's feature block. Grid (chunks, B·H).
        The query's shift is an online row max over the feature blocks (-|q|^2/2 cancels); key s
        enters at M_s, the running max of the key shifts up to s, and the (t, s) weight gains
        exp(M_s - M_t) <= 1.
        SAVE_STATS: per row den, the query shift and M into STATS (B·H, 3, L)."""
        alpha = tl.cast(alpha, tl.float32)   # Inductor passes a float argument as fp64
        c = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        hh = bh % H
        offs_c = tl.arange(0, C)
        offs_d = tl.arange(0, D_PAD)
        offs_fb = tl.arange(0, BLOCK_F)
        offs_v = tl.arange(0, DV_PAD)
        NFB: tl.constexpr = M_PAD // BLOCK_F
        offs_kf = tl.arange(0, NFB)
        tril = offs_c[None, :] <= offs_c[:, None]          # [t, s]: key s visible to query t
        ch = bh.to(tl.int64) * NCHUNK + c
        sg = bh.to(tl.int64) * NSEG + c // SEG_CHUNKS
        rows = c * C + offs_c
        in_seq = rows < L
        rows64 = rows.to(tl.int64)
        key_ok = in_seq
        if HAS_MASK:
            mk = tl.load(MASK + b.to(tl.int64) * smb + rows64 * sms, mask=in_seq, other=1)
            key_ok = key_ok & (mk == 0)
        kt = tl.load(K + b.to(tl.int64) * skb + hh.to(tl.int64) * skh + rows64[:, None] * sks
                     + offs_d[None, :] * skd, mask=key_ok[:, None] & (offs_d[None, :] < D),
                     other=0.0)
        vt = tl.load(V + b.to(tl.int64) * svb + hh.to(tl.int64) * svh + rows64[:, None] * svs
                     + offs_v[None, :] * svd, mask=key_ok[:, None] & (offs_v[None, :] < DV),
                     other=0.0)
        scale2 = alpha * _LOG2E
        mt = tl.zeros((C,), dtype=tl.float32)   # the key running max (softmax only)
        m_store = mt
        run = _chunk_ref(HR, PR, ch, sg, NFB, HAS_PREFIX)   # 0 for relu
        if KERNEL == 0:
            kap = tl.load(KAP + bh.to(tl.int64) * (NFB * L) + offs_kf[None, :] * L
                          + rows64[:, None], mask=key_ok[:, None], other=_LOWEST_C)
            kk = tl.where(key_ok, tl.max(kap, axis=1), -2.0e38) * _LOG2E
            # M, the key running max, as a 1-D scan: a (C, C) masked max stored as the statistics
            # made Triton convert it between layouts (the training launch spilled 32 bytes)
            mt = tl.maximum(tl.associative_scan(kk, 0, _max2), run)
            m_store = mt
            fac = tl.exp2(run - mt)                       # chunk-start state -> M_t
            # an invalid key's exponents are -inf (exp2 gives 0). (Folding M_s into this
            # per-key term, one subtraction less per weight, measured 0.89 ms against 0.82.)
            hk = tl.where(key_ok, _half_sq_norm(kt, alpha, scale2), float("inf"))
        # The chunk's queries (rows :C) and keys (rows C:, as kt: k again, from L2) as one
        # operand, so both feature products go out as one with one wait per feature block:
        # training chunk outputs 0.74 ms against 0.79 (H200, bf16, 65,536 tokens × 16 heads;
        # docs/benchmarks.md, twenty-first session).
        # (Joining qt and kt with tl.join instead made Triton recompute M in the products'
        # layout: 540 more SASS instructions per program, sm_90 compiled offline.)
        is_q = tl.arange(0, 2 * C) < C
        rows2 = c * C + tl.arange(0, 2 * C) % C
        ok2 = rows2 < L
        if HAS_MASK:
            mk2 = tl.load(MASK + b.to(tl.int64) * smb + rows2.to(tl.int64) * sms,
                          mask=ok2 & ~is_q, other=0)
            ok2 = ok2 & (mk2 == 0)
        rows2 = rows2.to(tl.int64)
        qk_ptr = tl.where(is_q[:, None],
                          Q + b.to(tl.int64) * sqb + hh.to(tl.int64) * sqh + rows2[:, None] * sql
                          + offs_d[None, :] * sqd,
                          K + b.to(tl.int64) * skb + hh.to(tl.int64) * skh + rows2[:, None] * sks
                          + offs_d[None, :] * skd)
        qkw = _to_w(tl.load(qk_ptr, mask=ok2[:, None] & (offs_d[None, :] < D), other=0.0), W)
        mq = tl.full((C,), _LOWEST_C, tl.float32)
        a = tl.zeros((C, C), dtype=tl.float32)
        inter = tl.zeros((C, DV_PAD), dtype=tl.float32)
        iden = tl.zeros((C,), dtype=tl.float32)
        for f0 in range(0, M_PAD, BLOCK_F):
            offs_f = f0 + offs_fb
            feat_ok = offs_f < M
            w_t = _load_w_t(W, offs_f, offs_d, swm, swd, feat_ok, D)
            # (2C, features) -> the queries' and the keys' (C, features) halves
            sq, sk = tl.split(tl.permute(tl.reshape(_mm(qkw, w_t, UPCAST), (2, C, BLOCK_F)),
                                         (1, 2, 0)))
            fa, fc = _chunk_factors(HR, PR, ch, sg, f0 // BLOCK_F, run, NFB, HAS_PREFIX)
            st = tl.load(HS + ch * (M_PAD * DV_PAD) + offs_f[:, None] * DV_PAD + offs_v[None, :])
            zf = tl.load(HZ + ch * M_PAD + offs_f) * fa
            if KERNEL == 0:
                # log2 units (_Operands.WL); padded features (W rows 0) -inf
                eq = sq
                ek = sk - hk[:, None]
                if not EVEN_F:
                    eq = tl.where(feat_ok[None, :], eq, -float("inf"))
                    ek = tl.where(feat_ok[None, :], ek, -float("inf"))
                nq = tl.maximum(mq, tl.max(eq, axis=1))
                resc = tl.exp2(mq - nq)
                a = a * resc[:, None]
                inter = inter * resc[:, None]
                iden = iden * resc
                mq = nq
                phq = tl.exp2(eq - mq[:, None])
                phk = tl.exp2(ek - mt[:, None])
            else:
                # padded features (W rows 0) and invalid keys (rows of k loaded as 0) give 0
                phq = tl.maximum(sq, 0.0)
                phk = tl.maximum(sk, 0.0)
            a += _mm(phq.to(vt.dtype), tl.trans(phk.to(vt.dtype)), UPCAST)
            # the parts' factors scale the (rows × features) operand, not the (rows × dv)
            # products: each product accumulates into inter in place, with no temporary
            # accumulator (0.73 ms against 0.81 at 65,536 tokens × 16 heads, H200)
            inter += _mm((phq * fa).to(st.dtype), st, UPCAST)
            if HAS_PREFIX:
                pt = tl.load(PP + sg * (M_PAD * DV_PAD) + offs_f[:, None] * DV_PAD
                             + offs_v[None, :])
                inter += _mm((phq * fc).to(pt.dtype), pt, UPCAST)
                zf += tl.load(PZ + sg * M_PAD + offs_f) * fc
            iden += tl.sum(phq * zf[None, :], axis=1)
        if KERNEL == 0:
            # the (t, s) weight's exp(M_s - M_t); clamped above the diagonal (discarded there)
            a = tl.where(tril, a * tl.exp2(tl.minimum(mt[None, :] - mt[:, None], 0.0)), 0.0)
        else:
            a = tl.where(tril, a, 0.0)
        num = _mm(a.to(vt.dtype), vt, UPCAST)
        den = tl.sum(a, axis=1)
        if KERNEL == 0:
            num += inter * fac[:, None]
            den += iden * fac
        else:
            num += inter
            den += iden
        _store_rows(O, STATS, num, den, mq, m_store, b, hh, bh, rows64, in_seq, offs_v,
                    sob, soh, sol, sod, L, DV, KERNEL, True, SAVE_STATS)

# --------------------------------------------------------------------------------------------
# Launch helpers
# --------------------------------------------------------------------------------------------
def _launcher(kernel):
    # Eager interpreter runs call the kernel directly (wrap_triton rejects CPU tensors there).
    return kernel if _INTERPRET else torch.library.wrap_triton(kernel)


def _num_sms(device):
    if device.type != "cuda":
        return 4
    idx = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_properties(idx).multi_processor_count


def kernel_ok(q, k, v, projection, key_padding_mask=None):
    """Whether the Triton kernels serve this call (else the C++ op does)."""
    if triton is None or q.dtype not in _DTYPES:
        return False
    if not (q.device.type == "cuda" or (_INTERPRET and q.device.type == "cpu")):
        return False
    B, H, Lq, d = q.shape
    S, dv, m = k.shape[2], v.shape[3], projection.shape[0]
    if B * H * Lq * dv == 0 or S == 0:
        return False
    # B·H is a grid's second dimension in several launches (CUDA allows 65,535 there)
    return d <= MAX_HEAD_DIM and dv <= MAX_HEAD_DIM and m <= MAX_FEATURES and B * H <= _MAX_GRID_Y


def _projection_operand(projection, dtype, scale=1.0):
    """The projection as the feature products' operand: fp32 for fp32 inputs, else fp16, which the
    kernels meet with q, k tiles converted to fp16 (``_to_w``; exact for bf16 magnitudes from
    2^-17 to fp16's 65504). Rounding W to bf16 instead shifts every exponent by up to |a x| 2^-9:
    the output moved by 0.53% relative against 0.069% for fp16, in a float64 emulation (the C++ op with the rounded
    W, d = 64, m = 256, 4096 tokens × 4 heads), while the issue's bar for bf16 is 0.5% in all.
    ``scale`` multiplies W before its one rounding (one kernel)."""
    out = torch.empty_like(projection, dtype=torch.float32 if dtype == torch.float32 else
                           torch.float16)
    return torch.mul(projection, scale, out=out)


class _Operands(NamedTuple):
    """What every launch of the forward and backward kernels shares."""
    kid: int           # _KERNEL_ID of the feature map
    alpha: float       # sqrt of the logit scale (applied to q and k)
    upcast: bool       # products in true fp32 (fp32 inputs, the interpreter)
    has_mask: bool
    mask: Tensor       # uint8 key padding mask, or a (1, 1) stand-in
    # the feature products' projection operand (forward and backward): softmax's exponents come
    # out of the product in the kernels' log2 units (W·a·log2(e), rounded once), sparing a
    # multiply per feature; relu's W
    WL: Tensor


def _operands(q, projection, kernel_fn, scale, key_padding_mask):
    """The launches' shared operands."""
    d = q.shape[-1]
    alpha = math.sqrt(scale if scale is not None else 1.0 / math.sqrt(d))
    # fp32 inputs (and the interpreter) multiply in true fp32; half inputs use the tensor cores
    upcast = _INTERPRET or q.dtype == torch.float32
    has_mask = key_padding_mask is not None
    mask = key_padding_mask.to(torch.uint8) if has_mask else q.new_empty((1, 1), dtype=torch.uint8)
    kid = _KERNEL_ID[kernel_fn]
    WL = _projection_operand(projection, q.dtype, alpha * _LOG2E_F if kid == 0 else 1.0)
    return _Operands(kid, alpha, upcast, has_mask, mask, WL)


def _splits(bh, length, block, device, min_len, per_sm=4, seg=None):
    """Split `length` into ranges (multiples of `block`) so that about `per_sm` programs run per
    SM, or of about `seg` each when given. Returns (range length, number of ranges)."""
    if seg is not None:
        seg = -(-seg // block) * block
        return seg, -(-length // seg)
    want = max(1, (per_sm * _num_sms(device)) // max(bh, 1))
    seg = max(min_len, -(-length // want))
    seg = -(-seg // block) * block
    return seg, -(-length // seg)


def _key_pass(k, v, ops, m, seg, block_n, kv_block_f, kv_warps, kv_stages):
    """Non-causal key pass: per key split and feature block, the state at the block's max (P, Z,
    MX). Returns (P, Z, MX, nsplit, NF, kv_block_f)."""
    kid, alpha, upcast, has_mask, mask, WL = ops
    B, H, S, d = k.shape
    dv = v.shape[3]
    M_PAD, D_PAD, DV_PAD = _pow2(m), _pow2(d), _pow2(dv)
    BH, dev, f32 = B * H, k.device, torch.float32
    kv_block_f = min(M_PAD, kv_block_f)
    NF = M_PAD // kv_block_f
    # feature blocks·B·H·splits programs: about 2 per SM measured fastest (H200, 65,536 tokens ×
    # 16 heads: 0.59 ms forward against 0.65 at 1 per SM)
    seg, nsplit = _splits(BH * NF, S, block_n, dev, 4 * block_n, per_sm=2, seg=seg)
    P = torch.empty((BH, nsplit, M_PAD, DV_PAD), device=dev, dtype=f32)
    Z = torch.empty((BH, nsplit, M_PAD), device=dev, dtype=f32)
    MX = torch.empty((BH, nsplit, NF), device=dev, dtype=f32)
    _launcher(_kv_state_kernel)[(NF, BH, nsplit)](
        k, v, WL, mask, P, Z, MX,
        H, S, m, d, dv, seg,
        *k.stride(), *v.stride(), *WL.stride(), *mask.stride(),
        alpha,
        KERNEL=kid, HAS_MASK=has_mask, UPCAST=upcast,
        M_PAD=M_PAD, D_PAD=D_PAD, DV_PAD=DV_PAD, BLOCK_F=kv_block_f, BLOCK_N=block_n,
        num_warps=kv_warps, num_stages=kv_stages)
    return P, Z, MX, nsplit, NF, kv_block_f


def state_dtype(dtype):
    """The dtype of stored key / query states: bf16 for half inputs (the products take them so; fp16
    could overflow, a state sums up to S values of phi·v), fp32 for fp32 inputs."""
    return torch.float32 if dtype == torch.float32 else torch.bfloat16


def total_key_state(k, v, ops, m, *, seg=None, block_n=64, kv_block_f=_KV["kv_block_f"],
                    kv_warps=_KV["kv_warps"], kv_stages=_KV["kv_stages"]):
    """Non-causal: the state of all keys, (ST (B·H, M_PAD, DV_PAD) in ``state_dtype``, ZT fp32,
    MX): key pass, then the merge of the splits at the overall max of the per-split references MX
    (whose value cancels in the output; the backward's keys need it). The forward and the fused
    backward's dq share it."""
    B, H = k.shape[:2]
    M_PAD, DV_PAD = _pow2(m), _pow2(v.shape[3])
    P, Z, MX, nsplit, NF, kv_block_f = _key_pass(k, v, ops, m, seg, block_n, kv_block_f,
                                                 kv_warps, kv_stages)
    ST = torch.empty((B * H, M_PAD, DV_PAD), device=k.device, dtype=state_dtype(k.dtype))
    ZT = torch.empty((B * H, M_PAD), device=k.device, dtype=torch.float32)
    _launcher(_merge_kernel)[(B * H, NF)](P, Z, MX, ST, ZT, nsplit, M_PAD=M_PAD,
                                          DV_PAD=DV_PAD, BLOCK_F=kv_block_f, NF=NF,
                                          NF_PAD=_pow2(NF, 2), num_warps=4)
    return ST, ZT, MX


class ChunkStates(NamedTuple):
    """The causal state of the keys before every chunk, in two parts that the chunk kernels add
    (``_chunk_factors``): the chunk's segment's keys so far, and the earlier segments'. States in
    ``state_dtype``, z fp32, references fp32 in log2 units, one per feature block of ``block_f``
    (the chunk kernels' feature block)."""
    HS: Tensor         # (B·H, chunks, M_PAD, DV_PAD): the segment's keys before the chunk
    HZ: Tensor         # (B·H, chunks, M_PAD)
    HR: Tensor         # (B·H, chunks, NF)
    PP: Tensor         # (B·H, segments, M_PAD, DV_PAD): the earlier segments' keys
    PZ: Tensor         # (B·H, segments, M_PAD)
    PR: Tensor         # (B·H, segments, NF)
    KAP: Tensor        # (B·H, NF, L): each key's shift per block (softmax; else a stand-in)
    seg_chunks: int    # chunks per segment
    has_prefix: bool   # more than one segment (else PP, PZ, PR are never read)
    block_f: int

    def saved(self):
        """The six states the fused backward's dq reads (HS, HZ, HR, PP, PZ, PR), as the training
        op returns them: outputs may not alias, so PP, PZ, PR are empty without a prefix."""
        if self.has_prefix:
            return (self.HS, self.HZ, self.HR, self.PP, self.PZ, self.PR)
        return (self.HS, self.HZ, self.HR, *empties(self.HZ, 3))

    @classmethod
    def restore(cls, saved, length, chunk, block_f):
        """The ``ChunkStates`` of ``saved()`` (KAP, which only the forward reads, left empty), or
        None where they do not match a walk of ``chunk`` rows and ``block_f`` features with the
        default segments (``walk_segments``): the caller recomputes them then."""
        HS, HZ, HR, PP, PZ, PR = saved
        BH, nchunk, M_PAD = HS.shape[:3]
        nf = M_PAD // block_f
        seg, nseg = walk_segments(BH, M_PAD, block_f, length, chunk, HS.device)
        # bool(): under dynamic shapes these are SymBools, which cannot be compared with `!=`
        has_prefix = bool(PP.numel() > 0)
        if (nchunk != -(-length // chunk) or tuple(HR.shape) != (BH, nchunk, nf)
                or has_prefix != bool(nseg > 1)
                or (has_prefix and tuple(PR.shape) != (BH, nseg, nf))):
            return None
        if not has_prefix:
            PP, PZ, PR = HS, HZ, HR      # stand-ins, never read
        return cls(HS, HZ, HR, PP, PZ, PR, HZ.new_empty((0,)), seg // chunk, has_prefix, block_f)


def empties(like, n):
    """n distinct empty tensors like ``like``: an op's outputs may not alias one another."""
    return tuple(like.new_empty((0,)) for _ in range(n))


def walk_block(M_PAD, block_f, dtype, walk_block_f=None):
    """The chunk walk's feature block: ``walk_block_f`` (default ``_STATES``, by precision), at
    least the chunk kernels' ``block_f`` (whose references it writes) and at most M_PAD.
    Half inputs walk 128 features per program: on the H200 (bf16, 16 heads, d = 64, m = 256) the
    walk took 0.39 ms against 0.50 at 64, the causal forward 1.13 against 1.24 at 65,536 tokens
    and 1.02 against 1.12 at 4096 × 16 (docs/benchmarks.md, twentieth session). fp32 keeps 64:
    at 128 its tiles spill 872 bytes per thread (sm_90, triton 3.9)."""
    if walk_block_f is None:
        walk_block_f = _STATES["walk_block_f"][precision(dtype)]
    wblock = max(block_f, min(M_PAD, walk_block_f))
    if wblock & (wblock - 1) or wblock % block_f:
        raise ValueError(f"walk_block_f must be a power of two, a multiple of the chunk kernels' "
                         f"feature block ({block_f}); got {walk_block_f}")
    return wblock


def walk_segments(BH, M_PAD, block_f, length, chunk, device, seg=None):
    """(keys per segment, segments) of the causal chunk walk, counted in programs of the chunk
    kernels' ``block_f`` features (B·H·M_PAD / block_f per segment), about 8 of them per SM:
    4,096-key segments at 65,536 tokens × 16 heads, where the causal forward measured 1.44 ms
    against 1.45 / 1.52 / 1.51 at 2,048 / 8,192 / 16,384 (H200, one --sweep run). The count
    does not follow ``walk_block``: a wider walk block then runs fewer programs over the same
    segments, and a head of 4,096 tokens stays one segment (more segments cost the chunk outputs
    a second state product; see ``walk_block``)."""
    return _splits(BH * (M_PAD // block_f), length, chunk, device, 4 * chunk, per_sm=8, seg=seg)


def causal_chunk_states(k, v, ops, m, *, seg=None, chunk=CHUNK,
                        state_block_f=_STATES["state_block_f"], walk_block_f=None,
                        state_warps=_STATES["state_warps"], state_stages=_STATES["state_stages"]):
    """The causal state before every chunk (a ``ChunkStates``): every segment walks its chunks
    from zero (``_causal_state_kernel``), then the segments' totals become the states of the
    earlier segments (``_segment_prefix_kernel``). No pass over the keys runs first. The forward
    and the fused backward's dq share it. ``seg``: keys per segment (None: about 8 walk programs
    per SM)."""
    kid, alpha, upcast, has_mask, mask, WL = ops
    B, H, L, d = k.shape
    dv = v.shape[3]
    M_PAD, D_PAD, DV_PAD = _pow2(m), _pow2(d), _pow2(dv)
    BH, dev, f32 = B * H, k.device, torch.float32
    block_f = min(M_PAD, state_block_f)
    NF = M_PAD // block_f
    wblock = walk_block(M_PAD, block_f, k.dtype, walk_block_f)
    seg, nseg = walk_segments(BH, M_PAD, block_f, L, chunk, dev, seg)
    nchunk = triton.cdiv(L, chunk)
    sdt = state_dtype(k.dtype)
    HS = torch.empty((BH, nchunk, M_PAD, DV_PAD), device=dev, dtype=sdt)
    HZ = torch.empty((BH, nchunk, M_PAD), device=dev, dtype=f32)
    HR = torch.empty((BH, nchunk, NF), device=dev, dtype=f32)
    P = torch.empty((BH, nseg, M_PAD, DV_PAD), device=dev, dtype=f32)
    Z = torch.empty((BH, nseg, M_PAD), device=dev, dtype=f32)
    R = torch.empty((BH, nseg, NF), device=dev, dtype=f32)
    KAP = torch.empty((BH, NF, L) if kid == 0 else (1, NF), device=dev, dtype=f32)
    _launcher(_causal_state_kernel)[(M_PAD // wblock, BH, nseg)](
        k, v, WL, mask, HS, HZ, HR, KAP, P, Z, R,
        H, L, m, d, dv, seg, nchunk,
        *k.stride(), *v.stride(), *WL.stride(), *mask.stride(),
        alpha,
        KERNEL=kid, HAS_MASK=has_mask, UPCAST=upcast,
        M_PAD=M_PAD, D_PAD=D_PAD, DV_PAD=DV_PAD, BLOCK_F=wblock, C=chunk, EVEN_F=m == M_PAD,
        REF_F=block_f, num_warps=state_warps, num_stages=state_stages)
    if nseg > 1:
        PP = torch.empty((BH, nseg, M_PAD, DV_PAD), device=dev, dtype=sdt)
        PZ, PR = torch.empty_like(Z), torch.empty_like(R)
        sub_f = min(block_f, 16)   # more programs for a short sequential walk
        _launcher(_segment_prefix_kernel)[(BH, M_PAD // sub_f)](
            P, Z, R, PP, PZ, PR, nseg, NF, M_PAD=M_PAD, DV_PAD=DV_PAD, BLOCK_F=block_f,
            SUB_F=sub_f, num_warps=4)
    else:
        PP, PZ, PR = HS, HZ, HR    # stand-ins, never read
    return ChunkStates(HS, HZ, HR, PP, PZ, PR, KAP, seg // chunk, nseg > 1, block_f)


def persistent_queries(dtype, d):
    """Whether the non-causal queries take ``_query_persistent_kernel``: half inputs with
    d <= 64. It holds a (64 × m) fp32 feature tile and the (d × m) projection and (m × dv) state
    operands per program. On the H200 (d = 64, m = 256, bf16, 16 heads) it measured 0.235 ms at
    65,536 tokens and 0.231 at 4096 × 16, against 0.251–0.255 for the feature-blocked
    ``_query_kernel``, at 4 warps (8 warps: 0.44) although ptxas spills 248 bytes per thread.
    fp32 operands do not fit its shared memory, and at d = 128 it spills 664 bytes (unmeasured):
    those keep the blocked kernel."""
    return dtype in (torch.bfloat16, torch.float16) and _pow2(d) <= 64


def _forward(*args, **kwargs):
    """The output (``_forward_and_states``'s, without the states)."""
    return _forward_and_states(*args, **kwargs)[0]


def _forward_and_states(q, k, v, projection, kernel_fn, causal, scale, key_padding_mask, *,
                        seg=None, block_n=64, block_m=64, kv_block_f=_KV["kv_block_f"],
                        q_block_f=64, kv_warps=_KV["kv_warps"], q_warps=4,
                        kv_stages=_KV["kv_stages"], q_stages=2, causal_warps=4, causal_stages=None,
                        chunk=CHUNK, state_block_f=_STATES["state_block_f"], walk_block_f=None,
                        state_warps=_STATES["state_warps"], state_stages=_STATES["state_stages"],
                        stats=None, q_persist=None, q_per_sm=2):
    """``(out, states)``: the output and the keys' states, six tensors, which the fused backward
    reuses in place of its own pass over the keys: causal, ``ChunkStates.saved()`` (None when
    ``seg`` made segments other than the default); else the merged total ``(ST, ZT, MX)`` of
    ``total_key_state`` and three empty tensors. ``stats`` (a
    (B·H, 3, Lq) fp32 buffer) also receives per row den, the query shift and (causal) the key
    running max, which the fused backward reuses too.
    Launch parameters (defaults: the fastest measured on the H200 at 65,536 tokens × 16 heads,
    d = 64, m = 256, bf16, by per-kernel profiles; see docs/benchmarks.md): ``seg`` keys per
    split (non-causal key pass) or segment (causal walk); None: a few programs per SM.
    Non-causal: key pass ``kv_block_f`` features per program, ``block_n`` keys per step,
    ``kv_warps``, ``kv_stages``; query pass ``block_m`` queries per program, ``q_block_f``
    features per step, ``q_warps``, ``q_stages``. Causal: ``chunk`` rows per chunk (a power of
    two >= 16), ``state_block_f`` features per block (the chunk walk's and the chunk outputs'),
    chunk walk ``state_warps`` / ``state_stages``, chunk outputs ``causal_warps`` /
    ``causal_stages`` (None: ``_OUT_STAGES``). ``q_persist``: the non-causal queries by
    ``_query_persistent_kernel`` (``q_per_sm`` programs per SM, ``block_m`` rows per step,
    ``q_warps``, ``q_stages``; None: where ``persistent_queries`` says)."""
    B, H, Lq, d = q.shape
    dv, m = v.shape[3], projection.shape[0]
    dev = q.device
    ops = _operands(q, projection, kernel_fn, scale, key_padding_mask)
    kid, alpha, upcast, has_mask, mask, WL = ops
    M_PAD, D_PAD, DV_PAD = _pow2(m), _pow2(d), _pow2(dv)
    out = torch.empty((B, H, Lq, dv), device=dev, dtype=q.dtype)
    if _INTERPRET:
        out.fill_(float("nan"))  # an element the kernels fail to write fails the checks
    BH = B * H
    if causal:
        cs = causal_chunk_states(k, v, ops, m, seg=seg, chunk=chunk,
                                 state_block_f=state_block_f, walk_block_f=walk_block_f,
                                 state_warps=state_warps, state_stages=state_stages)
        nchunk = cs.HS.shape[1]
        if causal_stages is None:
            causal_stages = _OUT_STAGES[precision(q.dtype)][stats is not None]
        _launcher(_causal_out_kernel)[(nchunk, BH)](
            q, k, v, WL, mask, *cs[:7], out, stats if stats is not None else cs.HZ,
            H, Lq, m, d, dv, nchunk, cs.PP.shape[1], cs.seg_chunks,
            *q.stride(), *k.stride(), *v.stride(), *WL.stride(), *mask.stride(),
            *out.stride(),
            alpha,
            KERNEL=kid, HAS_MASK=has_mask, UPCAST=upcast,
            M_PAD=M_PAD, D_PAD=D_PAD, DV_PAD=DV_PAD, BLOCK_F=cs.block_f,
            C=chunk, SAVE_STATS=stats is not None, HAS_PREFIX=cs.has_prefix, EVEN_F=m == M_PAD,
            num_warps=causal_warps, num_stages=causal_stages)
        # the backward restores states of the default segments only (ChunkStates.restore)
        default_seg = walk_segments(BH, M_PAD, cs.block_f, k.shape[2], chunk, dev)[0]
        return out, (cs.saved() if cs.seg_chunks * chunk == default_seg else None)
    q_block_f = min(M_PAD, q_block_f)
    ST, ZT, MX = total_key_state(k, v, ops, m, seg=seg, block_n=block_n, kv_block_f=kv_block_f,
                                 kv_warps=kv_warps, kv_stages=kv_stages)
    states = (ST, ZT, MX, *empties(ZT, 3))
    if q_persist is None:
        q_persist = persistent_queries(q.dtype, d)
    if q_persist:
        nblk = triton.cdiv(Lq, block_m)
        nprog = max(1, min(nblk, (q_per_sm * _num_sms(dev)) // BH))
        _launcher(_query_persistent_kernel)[(BH, nprog)](
            q, WL, ST, ZT, out, stats if stats is not None else ZT,
            H, Lq, m, d, dv, nprog,
            *q.stride(), *WL.stride(), *out.stride(),
            alpha,
            KERNEL=kid, UPCAST=upcast,
            M_PAD=M_PAD, D_PAD=D_PAD, DV_PAD=DV_PAD, BLOCK_M=block_m,
            SAVE_STATS=stats is not None, EVEN_F=m == M_PAD, num_warps=q_warps,
            num_stages=q_stages)
        return out, states
    _launcher(_query_kernel)[(BH, triton.cdiv(Lq, block_m))](
        q, WL, ST, ZT, out, stats if stats is not None else ZT,
        H, Lq, m, d, dv,
        *q.stride(), *WL.stride(), *out.stride(),
        alpha,
        KERNEL=kid, UPCAST=upcast,
        M_PAD=M_PAD, D_PAD=D_PAD, DV_PAD=DV_PAD, BLOCK_M=block_m, BLOCK_F=q_block_f,
        SAVE_STATS=stats is not None, EVEN_F=m == M_PAD, num_warps=q_warps,
        num_stages=q_stages)
    return out, states


# --------------------------------------------------------------------------------------------
# The op
# --------------------------------------------------------------------------------------------
@torch.library.triton_op("panther::rf_attention_triton", mutates_args=())
def rf_attention_triton_op(q: Tensor, k: Tensor, v: Tensor, projection: Tensor, kernel_fn: str,
                           causal: bool, scale: Optional[float],
                           key_padding_mask: Optional[Tensor]) -> Tensor:
    """``panther::rf_attention`` computed by the fused Triton kernels on CUDA."""
    _check_rf(q, k, v, projection, kernel_fn, causal, scale, key_padding_mask)
    if kernel_ok(q, k, v, projection, key_padding_mask):
        return _forward(q, k, v, projection, kernel_fn, causal, scale, key_padding_mask)
    return torch.ops.panther.rf_attention(q, k, v, projection, kernel_fn, causal, scale,
                                          key_padding_mask)


def _rf_triton_backward(ctx, grad):
    # the fused backward (inductor_ext/triton_attention_bwd.py) where the kernels serve the call
    # and the projection needs no gradient; else the C++ backward, as for panther::rf_attention
    # (triton_attention_bwd is imported at the end of this module)
    return triton_attention_bwd.autograd_backward(ctx, grad)


torch.library.register_autograd("panther::rf_attention_triton", _rf_triton_backward,
                                setup_context=_rf_setup_context)


def _attend(*args):
    # with a gradient to come, the variant that also returns the forward's per-row statistics
    # (den, shifts), which spares the fused backward two of its three passes
    q, k, v = args[:3]
    causal = args[5]
    from .triton_attention_bwd import fused_backward_enabled
    if fused_backward_enabled(causal) and grad_needed(q, k, v):
        return torch.ops.panther.rf_attention_triton_train(*args)[0]
    return torch.ops.panther.rf_attention_triton(*args)


def rf_attention_triton(q, k, v, projection, kernel_fn="softmax", causal=False, scale=None,
                        key_padding_mask=None):
    """Drop-in for ``panther.ops.rf_attention`` that runs the fused Triton kernels on CUDA
    (forward and backward)."""
    return autocast_call(_attend, q, k, v, projection, kernel_fn, causal, scale, key_padding_mask)


# --------------------------------------------------------------------------------------------
# Benchmark (CUDA)
# --------------------------------------------------------------------------------------------
def _time_ms(fn, graph=False):
    """Median ms of one call (``_timing``: do_bench's, as the issue's reference numbers were taken),
    eager or (``graph``) replayed from a CUDA graph ("-" where it cannot be captured). Off CUDA
    (the interpreter smoke test of the bench code): one call, no timing."""
    if not torch.cuda.is_available():
        fn()
        return 0.0
    from ._timing import graph_median_ms, median_ms
    if not graph:
        return round(median_ms(fn, rep=100), 3)
    ms = graph_median_ms(fn, rep=100)
    return "-" if ms is None else round(ms, 3)


def _rel(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def bench_triton_attention(cases=None, m=256, H=16, d=64, dtype=torch.bfloat16, backward=True,
                           sweep=False, long_len=262144, device="cuda", profile=False, peers=False):
    """Prints SDPA vs the C++ op vs the Triton op (forward, and forward+backward) on CUDA.

    fwd+bwd of the Triton op uses the fused Triton backward (the projection needs no gradient);
    "triton bwd ms" times that backward alone, "bwd_vs_c++" is the largest relative error of its
    dq, dk, dv against the C++ backward. ``long_len`` adds a causal B=1 forward+backward at that
    length (Triton only) with its peak memory. ``sweep`` also times launch parameters of the
    forward and of the backward; ``profile`` only prints the per-kernel times of the defaults.
    ``peers``: also rows (with a "peer" key) timing other libraries on the same inputs beside the
    Triton op (``_peer_rows``).
    (``device="cpu"`` under TRITON_INTERPRET=1 only smoke-tests this code on tiny cases: no
    timings.)"""
    import torch.nn.functional as F
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("bench_triton_attention: CUDA not available")
        return []
    from panther.sketch import orthogonal_random_features
    cases = cases or [("non-causal", 65536, 1, False), ("causal", 65536, 1, True),
                      ("causal", 4096, 16, True)]
    rows = []
    for name, L, B, causal in cases:
        g = torch.Generator(device=dev).manual_seed(0)
        q, k, v = (torch.randn(B, H, L, d, device=dev, dtype=dtype, generator=g) for _ in range(3))
        W = orthogonal_random_features(m, d, device=dev, dtype=torch.float32)
        fns = {
            "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
            "c++": lambda: torch.ops.panther.rf_attention(q, k, v, W, "softmax", causal, None, None),
            "triton": lambda: rf_attention_triton(q, k, v, W, "softmax", causal),
        }
        ref = fns["c++"]().float()
        tri = fns["triton"]()
        err = _rel(tri, ref)
        line = {"case": f"{name} L={L} B={B}", "triton_vs_c++_rel_err": f"{err:.2e}"}
        with torch.no_grad():
            for key, fn in fns.items():
                line[f"{key} fwd ms"] = _time_ms(fn)
            line["triton fwd ms (CUDA graph)"] = _time_ms(fns["triton"], graph=True)
        if backward:
            qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
            go = torch.randn_like(q)
            bw = {
                "sdpa": lambda: F.scaled_dot_product_attention(qg, kg, vg, is_causal=causal),
                "c++": lambda: torch.ops.panther.rf_attention(qg, kg, vg, W, "softmax", causal,
                                                              None, None),
                "triton": lambda: rf_attention_triton(qg, kg, vg, W, "softmax", causal),
            }
            gref = torch.ops.panther.rf_attention_backward(go, q, k, v, W, "softmax", causal, None,
                                                           None, False)[:3]
            gtri = torch.autograd.grad(bw["triton"](), (qg, kg, vg), go)
            line["bwd_vs_c++_rel_err"] = f"{max(_rel(a, b) for a, b in zip(gtri, gref)):.2e}"
            del gref, gtri
            for key, fn in bw.items():
                line[f"{key} fwd+bwd ms"] = _time_ms(lambda: torch.autograd.grad(fn(), (qg, kg, vg), go))
            line["triton fwd+bwd ms (CUDA graph)"] = _time_ms(
                lambda: torch.autograd.grad(bw["triton"](), (qg, kg, vg), go), graph=True)
            from .triton_attention_bwd import fused_backward_enabled
            if fused_backward_enabled(causal):
                # with the forward's output and statistics, as autograd calls it
                out, stats, *states = torch.ops.panther.rf_attention_triton_train(
                    q, k, v, W, "softmax", causal, None, None)
                line["triton bwd ms"] = _time_ms(
                    lambda: torch.ops.panther.rf_attention_triton_train_backward(
                        go, q, k, v, W, "softmax", causal, None, None, out, stats, states))
                del out, stats, states
            else:
                line["triton bwd"] = "C++ backward (backward_params['causal'] is off)"
        print(line, flush=True)
        rows.append(line)
        if peers:
            for row in _peer_rows(line, tri, q, k, v, W, causal, backward):
                print(row, flush=True)
                rows.append(row)
        if sweep or profile:
            _sweep(q, k, v, W, name, causal, backward, defaults_only=not sweep)
        q = k = v = fns = tri = None   # free the case's tensors before the next one's
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    if backward and long_len:
        rows.append(_bench_long(long_len, m, H, d, dtype, dev))
    return rows


def _peer_rows(line, ours, q, k, v, W, causal, backward):
    """The Triton op's row of ``line`` (its output ``ours``) and, where installed, the peers on the
    same q, k, v (B, H, L, d) that a user would otherwise reach for. Causal:
    flash-linear-attention's chunked kernel (``fla.ops.linear_attn.chunk_linear_attn``, normalised)
    fed with ``rf_feature_maps`` of the same random features, timed with the feature maps (the glued
    pipeline, features and kernel under autograd for fwd+bwd) and alone (the features already in its
    (B, L, H, m) layout). Non-causal: performer-pytorch's ``FastAttention`` (its own m random
    features, so no error column). A peer that is missing or fails gives the reason in its "note"."""
    from panther.ops.attention import rf_feature_maps
    case, m = line["case"], W.shape[0]
    rows = [{"case": case, "peer": "panther rf_attention_triton", "fwd ms": line["triton fwd ms"],
             "fwd+bwd ms": line.get("triton fwd+bwd ms", "-"), "rel err vs panther": "-"}]
    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
    go = torch.randn_like(v)

    def timed(name, fwd, train=None, out=None):
        row = {"case": case, "peer": name}
        try:
            with torch.no_grad():
                row["fwd ms"] = _time_ms(fwd)
            row["fwd+bwd ms"] = _time_ms(train) if backward and train else "-"
            row["rel err vs panther"] = f"{_rel(out(), ours):.2e}" if out else "-"
        except Exception as exc:  # noqa: BLE001 - report and go on
            row["note"] = f"failed: {type(exc).__name__}: {str(exc)[:100]}"
        rows.append(row)

    def grads(fn):
        return lambda: torch.autograd.grad(fn(qg, kg, vg), (qg, kg, vg), go)

    if causal:
        try:
            from fla.ops.linear_attn import chunk_linear_attn
        except ImportError as exc:
            return rows + [{"case": case, "peer": "flash-linear-attention",
                            "note": f"not installed ({exc})"}]

        def glued(q_, k_, v_):
            fq, fk = rf_feature_maps(q_, k_, W, "softmax")
            o, _ = chunk_linear_attn(fq.transpose(1, 2), fk.transpose(1, 2), v_.transpose(1, 2),
                                     scale=1.0, normalize=True)
            return o.transpose(1, 2)

        timed("fla chunk_linear_attn + torch feature maps", lambda: glued(q, k, v), grads(glued),
              lambda: glued(q, k, v))
        fq, fk = (t.transpose(1, 2).contiguous() for t in rf_feature_maps(q, k, W, "softmax"))
        vt = v.transpose(1, 2).contiguous()
        timed("fla chunk_linear_attn alone (features given)",
              lambda: chunk_linear_attn(fq, fk, vt, scale=1.0, normalize=True))
    else:
        try:
            from performer_pytorch import FastAttention
        except ImportError as exc:
            return rows + [{"case": case, "peer": "performer-pytorch", "note": f"not installed ({exc})"}]
        fast = FastAttention(dim_heads=q.shape[-1], nb_features=m, causal=False).to(q.device)
        timed("performer-pytorch FastAttention", lambda: fast(q, k, v),
              grads(lambda q_, k_, v_: fast(q_, k_, v_)))
    return rows


def _bench_long(L, m, H, d, dtype, dev):
    """Causal B=1 forward + backward at length L with the Triton op: time and peak memory (the
    C++ op would hold several (H, L, m) fp32 feature tensors: 4 GiB each at L = 262144)."""
    from panther.sketch import orthogonal_random_features
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(1, H, L, d, device=dev, dtype=dtype, generator=g).requires_grad_()
               for _ in range(3))
    W = orthogonal_random_features(m, d, device=dev, dtype=torch.float32)
    go = torch.randn_like(q)
    inputs_mb = 4 * q.numel() * q.element_size() / 2**20  # q, k, v, grad_out
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else 0
    grads = torch.autograd.grad(rf_attention_triton(q, k, v, W, "softmax", True), (q, k, v), go)
    if cuda:
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() if cuda else 0
    peak_mb = (peak - base) / 2**20
    ok = all(bool(torch.isfinite(t).all()) for t in grads)
    del grads
    line = {"case": f"causal L={L} B=1 H={H} fwd+bwd (triton)",
            "triton fwd+bwd ms": _time_ms(
                lambda: torch.autograd.grad(rf_attention_triton(q, k, v, W, "softmax", True),
                                            (q, k, v), go)),
            "peak MiB above inputs": round(peak_mb, 1), "inputs+grad_out MiB": round(inputs_mb, 1),
            "max_memory_allocated MiB": round(peak / 2**20, 1),
            "finite grads": ok}
    print(line, flush=True)
    return line


def _kernel_ms(fn, iters=10):
    """Per-kernel device time of one call of ``fn`` in ms (``torch.profiler``), by kernel name.
    Off CUDA (the interpreter smoke test): one call and an empty table."""
    if not torch.cuda.is_available():
        fn()
        return {}
    from torch.profiler import ProfilerActivity, profile
    for _ in range(2):  # compile and warm up
        fn()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    table = {}
    for e in prof.key_averages():
        if e.key.startswith("_"):  # the Triton kernels (``_name_0d1d...``); not ATen fills
            t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
            table[e.key.split("_0d")[0]] = table.get(e.key.split("_0d")[0], 0.0) + t / iters / 1e3
    return table


# the forward's launch parameters the sweep varies, one group at a time from the defaults
_FWD_SWEEP = {
    False: [dict(kv_block_f=bf, block_n=bn, kv_warps=w, kv_stages=st)
            for bf, bn, w, st in ((128, 64, 8, 3), (128, 128, 4, 3), (256, 64, 4, 3),
                                  (128, 64, 4, 2), (64, 64, 4, 3))]
    + [dict(block_m=bm, q_warps=w, q_stages=st, q_per_sm=ps)
       for bm, w, st, ps in ((64, 4, 2, 4), (64, 4, 3, 2), (64, 8, 3, 2), (128, 8, 2, 1))]
    + [dict(q_persist=False, block_m=bm, q_block_f=qf, q_warps=w, q_stages=st)
       for bm, qf, w, st in ((64, 64, 4, 2), (128, 64, 8, 3), (64, 128, 4, 2))]
    + [dict(seg=sg) for sg in (4096, 16384)],
    True: [dict(chunk=c, causal_warps=w, causal_stages=st)
           for c, w, st in ((64, 8, 3), (64, 4, 2), (64, 4, 3), (32, 4, 3))]
    + [dict(state_block_f=bf, state_warps=w, state_stages=st)
       for bf, w, st in ((64, 8, 3), (128, 8, 2), (32, 4, 3), (64, 4, 2), (64, 4, 4))]
    + [dict(walk_block_f=wb, state_warps=w) for wb, w in ((64, 4), (128, 8), (256, 8))]
    + [dict(seg=sg) for sg in (2048, 8192, 16384)],
}


def _sweep(q, k, v, W, name, causal, backward, fwd=True, defaults_only=False):
    """Per-kernel times of the Triton forward over launch parameters (how the defaults were
    picked), and times of the backward over its parameters (``defaults_only``: the defaults'
    per-kernel profile alone)."""
    B_, L_ = q.shape[0], q.shape[2]
    if fwd:
        for cfg in [{}] + ([] if defaults_only else _FWD_SWEEP[causal]):
            try:
                table = _kernel_ms(lambda: _forward(q, k, v, W, "softmax", causal, None, None,
                                                    **cfg))
                ms = f"total {sum(table.values()):.3f} ms | " + " ".join(
                    f"{key}={t:.3f}" for key, t in sorted(table.items()))
            except Exception as exc:  # noqa: BLE001 - report and go on
                ms = f"failed: {type(exc).__name__}: {str(exc)[:80]}"
            print(f"  sweep fwd {name} L={L_} B={B_}: {cfg or 'defaults'}: {ms}", flush=True)
    if not backward:
        return
    from inductor_ext.triton_attention_bwd import _backward
    go = torch.randn_like(q)
    out, stats, *states = torch.ops.panther.rf_attention_triton_train(q, k, v, W, "softmax",
                                                                      causal, None, None)
    # (block_f, warps of both kernels, dq's stages); causal: the chunk kernels, else the segment
    # walks. (dk-dv at 1 stage: triton 3.6 compiles out-of-range shared-memory accesses.)
    tiles = ((64, 8, 2), (64, 8, 1), (64, 4, 2), (32, 8, 2), (32, 4, 2)) if causal else \
        ((32, 8, 2), (32, 8, 1), (32, 4, 2), (64, 8, 2), (64, 4, 2))
    configs = [dict(block_f=bf, q_warps=w, k_warps=w, stages=st) for bf, w, st in tiles]
    configs += [dict(seg=sg) for sg in (1024, 2048, 4096, 8192)]
    configs += [dict(chunk=32), dict(tf32=True), dict(q_warps=8, k_warps=4),
                dict(q_warps=4, k_warps=8), dict(k_block_f=32), dict(k_block_f=64),
                dict(stages=2), dict(stages=3), dict(k_stages=2)]
    for cfg in [{}] + ([] if defaults_only else configs):
        try:
            # the forward's key states where the launch matches theirs (the defaults)
            table = _kernel_ms(lambda: _backward(go, q, k, v, W, "softmax", causal, None, None,
                                                 out, stats, states, **cfg))
            ms = f"total {sum(table.values()):.3f} ms | " + " ".join(
                f"{key}={t:.3f}" for key, t in sorted(table.items()))
        except Exception as exc:  # noqa: BLE001 - report and go on
            ms = f"failed: {type(exc).__name__}: {str(exc)[:80]}"
        print(f"  sweep bwd {name} L={L_} B={B_}: {cfg or 'defaults'}: {ms}", flush=True)


# registers panther::rf_attention_triton_backward (imported last: it uses the kernels above)
from inductor_ext import triton_attention_bwd  # noqa: E402,F401
