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

Kernels (all fp32 accumulation; q, k, v, W read in their own dtype, W cast to q's dtype for the
tensor cores when q is half precision):
    ``_kv_state_kernel``   grid (feature blocks of 64, B·H, key splits): per key range and feature
                           block, the state ``phi(K)^T V`` and ``z = phi(K)^T 1`` at the block's own
                           running-max reference (online rescaling, FlashAttention-style).
    ``_merge_kernel``      grid (B·H, feature blocks): walks the splits in order, rescaling to the
                           running max of kappa: the exclusive prefix per split, written in place
                           (causal), or the total (non-causal; bf16 for half inputs).
    ``_query_kernel``      non-causal, grid (B·H, query blocks): ``phi(q)·S / phi(q)·z``.
    ``_causal_kernel``     causal, grid (B·H, segments): each program walks its segment in chunks
                           of C = 64 from the segment's prefix state: intra-chunk masked product plus
                           inter-chunk ``phi(Q)·S``. The (m × dv) state lives in the program's own
                           slice of the prefix buffer (L2) and is streamed per feature block, which
                           keeps the registers for the (C × 64) feature tiles.
The causal op is thus a three-launch chunked scan (segment states, scan over segments, chunk walk)
whose parallelism is B·H·segments, not B·H. Non-causal is three launches as well.

Registered as ``torch.library.triton_op("panther::rf_attention_triton")``. A device branch sends CPU
tensors, float64 and shapes the kernels do not cover (head dim > 128, m > 256, dv > 128, empty) to
``torch.ops.panther.rf_attention``. The backward is the fused Triton backward
(``inductor_ext/triton_attention_bwd.py``, triton_op ``panther::rf_attention_triton_backward``)
where the kernels serve the call and the projection needs no gradient, else the C++
``panther::rf_attention_backward``. ``rf_attention_triton`` calls the variant
``panther::rf_attention_triton_train`` when a gradient is needed: the same output plus per-row
den and shifts (``SAVE_STATS`` below), which spare the backward's dq walk two of its three passes.
Under ``TRITON_INTERPRET=1`` (set before triton is imported) CPU tensors run the kernels in Triton's
interpreter (eager only): that is how CPU CI checks the arithmetic.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch
from torch import Tensor

import panther  # noqa: F401  (loads the native ops)
from panther.ops.attention import _check_rf, _rf_setup_context

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


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, 1 << max(int(n) - 1, 0).bit_length())


if triton is not None:

    @triton.jit
    def _mm(a, b, UPCAST: tl.constexpr):
        # Triton's CPU interpreter multiplies bf16 bit patterns wrongly; fp32 is exact there.
        if UPCAST:
            r = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        else:
            r = tl.dot(a, b)
        return r

    @triton.jit
    def _features(x, w_t, feat_ok, row_ok, alpha, KERNEL: tl.constexpr, UPCAST: tl.constexpr):
        """(rows, M_PAD) exponents e = x'W^T - |x'|^2/2 (softmax; padded features/rows LOWEST) or
        relu(xW^T) (relu). Returns (e, kappa) with kappa the row max (softmax) / 0 (relu)."""
        u = _mm(x, w_t, UPCAST)
        if KERNEL == 0:
            # Inductor passes Python floats as fp64 scalars: cast back so the accumulators stay fp32
            xf = x.to(tl.float32)
            h = (tl.sum(xf * xf, axis=1) * (0.5 * alpha * alpha)).to(tl.float32)
            e = (u * alpha).to(tl.float32) - h[:, None]
            e = tl.where(feat_ok[None, :] & row_ok[:, None], e, -3.0e38)
            kappa = tl.max(e, axis=1)
        else:
            e = tl.maximum(u, 0.0)
            e = tl.where(feat_ok[None, :] & row_ok[:, None], e, 0.0)
            kappa = tl.zeros_like(tl.max(e, axis=1))
        return e, kappa

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
        """One feature block of one key split: P[bh, i, f] = sum_s exp(e_sf - R) v_s^T, Z likewise,
        MX[bh, i, fb] = R, the running max of e over the split's keys and the block's features.
        Grid (feature blocks, B·H, splits): the feature blocks of one key range run side by side
        and share its k / v tiles through L2."""
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
        w_t = tl.load(W + offs_f[None, :] * swm + offs_d[:, None] * swd,
                      mask=feat_ok[None, :] & (offs_d[:, None] < D), other=0.0)
        k_base = K + b.to(tl.int64) * skb + hh.to(tl.int64) * skh
        v_base = V + b.to(tl.int64) * svb + hh.to(tl.int64) * svh
        acc = tl.zeros((BLOCK_F, DV_PAD), dtype=tl.float32)
        z = tl.zeros((BLOCK_F,), dtype=tl.float32)
        run = tl.max(tl.full((BLOCK_N,), -3.0e38, tl.float32), axis=0)
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
            e, kappa = _features(kt, w_t, feat_ok, row_ok, alpha, KERNEL, UPCAST)
            if KERNEL == 0:
                new = tl.maximum(run, tl.max(kappa, axis=0))
                r = tl.exp(run - new)
                phi = tl.where(feat_ok[None, :] & row_ok[:, None], tl.exp(e - new), 0.0)
                acc = acc * r
                z = z * r
                run = new
            else:
                phi = e
            acc += _mm(tl.trans(phi.to(vt.dtype)), vt, UPCAST)
            z += tl.sum(phi, axis=0)
        base = bh.to(tl.int64) * nsp + sp
        tl.store(P + base * (M_PAD * DV_PAD) + offs_f[:, None] * DV_PAD + offs_v[None, :], acc)
        tl.store(Z + base * M_PAD + offs_f, z)
        tl.store(MX + base * nfb + fb, run)

    @triton.jit
    def _merge_kernel(
        P, Z, MX, RP, ST, ZT, NSPLIT,
        PREFIX: tl.constexpr, M_PAD: tl.constexpr, DV_PAD: tl.constexpr, BLOCK_F: tl.constexpr,
        NF: tl.constexpr, NF_PAD: tl.constexpr,
    ):
        """Walk the splits of one (b, h) in order, keeping the running sum at the running max of
        the per-split maxima over all feature blocks (= the running max of kappa over the keys).
        PREFIX: P[bh, i] <- exclusive prefix (reference RP[bh, i]); else ST/ZT <- total (reference
        is the overall max, whose value is never needed: it cancels)."""
        bh = tl.program_id(0)
        fb = tl.program_id(1)
        offs_f = fb * BLOCK_F + tl.arange(0, BLOCK_F)
        offs_v = tl.arange(0, DV_PAD)
        offs_nf = tl.arange(0, NF_PAD)
        acc = tl.zeros((BLOCK_F, DV_PAD), dtype=tl.float32)
        z = tl.zeros((BLOCK_F,), dtype=tl.float32)
        run = tl.max(tl.full((BLOCK_F,), -3.0e38, tl.float32), axis=0)
        for i in range(0, NSPLIT):
            base = bh.to(tl.int64) * NSPLIT + i
            p_ptr = P + base * (M_PAD * DV_PAD) + offs_f[:, None] * DV_PAD + offs_v[None, :]
            pi = tl.load(p_ptr)
            zi = tl.load(Z + base * M_PAD + offs_f)
            mi = tl.load(MX + base * NF + fb)
            mg = tl.max(tl.load(MX + base * NF + offs_nf, mask=offs_nf < NF, other=-3.0e38), axis=0)
            if PREFIX:
                tl.store(p_ptr, acc)
                tl.store(Z + base * M_PAD + offs_f, z)
                if fb == 0:
                    tl.store(RP + base, run)
            new = tl.maximum(run, mg)
            r_old = tl.exp(run - new)
            r_new = tl.exp(mi - new)
            acc = acc * r_old + pi * r_new
            z = z * r_old + zi * r_new
            run = new
        if not PREFIX:
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
        SAVE_STATS: tl.constexpr,
    ):
        """out = phi(q)·S / phi(q)·z for one query block (0 where the denominator is 0).
        SAVE_STATS: per row den and the query shift into STATS (B·H, 3, L) for the backward."""
        bh = tl.program_id(0)
        pm = tl.program_id(1)
        b = bh // H
        hh = bh % H
        offs_m = pm * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D_PAD)
        offs_f = tl.arange(0, M_PAD)
        offs_v = tl.arange(0, DV_PAD)
        row_ok = offs_m < L
        rows64 = offs_m.to(tl.int64)
        feat_ok = offs_f < M
        w_t = tl.load(W + offs_f[None, :] * swm + offs_d[:, None] * swd,
                      mask=feat_ok[None, :] & (offs_d[:, None] < D), other=0.0)
        qt = tl.load(Q + b.to(tl.int64) * sqb + hh.to(tl.int64) * sqh + rows64[:, None] * sql
                     + offs_d[None, :] * sqd,
                     mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
        e, kappa = _features(qt, w_t, feat_ok, row_ok, alpha, KERNEL, UPCAST)
        if KERNEL == 0:
            phi = tl.where(feat_ok[None, :], tl.exp(e - kappa[:, None]), 0.0)
        else:
            phi = e
        st = tl.load(ST + bh.to(tl.int64) * (M_PAD * DV_PAD) + offs_f[:, None] * DV_PAD
                     + offs_v[None, :])
        zt = tl.load(ZT + bh.to(tl.int64) * M_PAD + offs_f)
        num = _mm(phi.to(st.dtype), st, UPCAST)
        den = tl.sum(phi * zt[None, :], axis=1)
        out = num / tl.where(den == 0.0, 1.0, den)[:, None]
        out = tl.where((den == 0.0)[:, None], 0.0, out)
        tl.store(O + b.to(tl.int64) * sob + hh.to(tl.int64) * soh + rows64[:, None] * sol
                 + offs_v[None, :] * sod, out.to(O.dtype.element_ty),
                 mask=row_ok[:, None] & (offs_v[None, :] < DV))
        if SAVE_STATS:
            s_base = STATS + bh.to(tl.int64) * (3 * L)
            tl.store(s_base + rows64, den, mask=row_ok)
            tl.store(s_base + L + rows64, kappa, mask=row_ok)

    @triton.jit
    def _causal_kernel(
        Q, K, V, W, MASK, P, Z, RP, O, STATS,
        H, L, M, D, DV, SEG,
        sqb, sqh, sql, sqd,
        skb, skh, sks, skd,
        svb, svh, svs, svd,
        swm, swd,
        smb, sms,
        sob, soh, sol, sod,
        alpha,
        KERNEL: tl.constexpr, HAS_MASK: tl.constexpr, UPCAST: tl.constexpr,
        M_PAD: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr, BLOCK_F: tl.constexpr,
        C: tl.constexpr, HALF_STATE: tl.constexpr, SAVE_STATS: tl.constexpr,
    ):
        """One segment of one (b, h): chunk walk from the segment's prefix state (P, Z at RP).
        SAVE_STATS: per row den, the query shift and the key running max M into STATS
        (B·H, 3, L) for the backward.

        The (m × dv) state would not fit the registers next to the feature tiles, so it stays in
        this program's own slice of P (L2-resident) and is streamed per feature block: pass 1
        over the feature blocks finds the row maxima (query shift, key kappa), pass 2 builds the
        intra-chunk weights, the inter-chunk product with the old state and the state update."""
        bh = tl.program_id(0)
        sg = tl.program_id(1)
        nsg = tl.num_programs(1)
        b = bh // H
        hh = bh % H
        offs_c = tl.arange(0, C)
        offs_d = tl.arange(0, D_PAD)
        offs_fb = tl.arange(0, BLOCK_F)
        offs_v = tl.arange(0, DV_PAD)
        tril = offs_c[None, :] <= offs_c[:, None]          # [t, s]: key s visible to query t
        base = bh.to(tl.int64) * nsg + sg
        p_base = P + base * (M_PAD * DV_PAD)
        z_base = Z + base * M_PAD
        run = tl.load(RP + base)
        q_base = Q + b.to(tl.int64) * sqb + hh.to(tl.int64) * sqh
        k_base = K + b.to(tl.int64) * skb + hh.to(tl.int64) * skh
        v_base = V + b.to(tl.int64) * svb + hh.to(tl.int64) * svh
        o_base = O + b.to(tl.int64) * sob + hh.to(tl.int64) * soh
        start = sg * SEG
        for t0 in range(start, start + SEG, C):
            rows = t0 + offs_c
            in_seq = rows < L
            rows64 = rows.to(tl.int64)
            key_ok = in_seq
            if HAS_MASK:
                mk = tl.load(MASK + b.to(tl.int64) * smb + rows64 * sms, mask=in_seq, other=1)
                key_ok = key_ok & (mk == 0)
            qt = tl.load(q_base + rows64[:, None] * sql + offs_d[None, :] * sqd,
                         mask=in_seq[:, None] & (offs_d[None, :] < D), other=0.0)
            kt = tl.load(k_base + rows64[:, None] * sks + offs_d[None, :] * skd,
                         mask=key_ok[:, None] & (offs_d[None, :] < D), other=0.0)
            vt = tl.load(v_base + rows64[:, None] * svs + offs_v[None, :] * svd,
                         mask=key_ok[:, None] & (offs_v[None, :] < DV), other=0.0)
            if KERNEL == 0:
                # pass 1: row maxima over all features
                kq = tl.full((C,), -3.0e38, tl.float32)
                kk = tl.full((C,), -3.0e38, tl.float32)
                for f0 in range(0, M, BLOCK_F):  # runtime bound: no full unroll
                    offs_f = f0 + offs_fb
                    feat_ok = offs_f < M
                    w_t = tl.load(W + offs_f[None, :] * swm + offs_d[:, None] * swd,
                                  mask=feat_ok[None, :] & (offs_d[:, None] < D), other=0.0)
                    _e, kq_f = _features(qt, w_t, feat_ok, in_seq, alpha, KERNEL, UPCAST)
                    _e, kk_f = _features(kt, w_t, feat_ok, key_ok, alpha, KERNEL, UPCAST)
                    kq = tl.maximum(kq, kq_f)
                    kk = tl.maximum(kk, kk_f)
                # running max over keys <= t (within the chunk, then against the carried one)
                mt = tl.max(tl.where(tril, kk[None, :], -3.0e38), axis=1)
                mt = tl.maximum(mt, run)
                new = tl.maximum(run, tl.max(kk, axis=0))
                fac = tl.exp(run - mt)          # carried state (reference run) -> M_t
                r = tl.exp(run - new)           # carried state -> this chunk's end
                kscale = tl.exp(mt - new)       # key s at M_s -> chunk end
            a = tl.zeros((C, C), dtype=tl.float32)
            inter = tl.zeros((C, DV_PAD), dtype=tl.float32)
            iden = tl.zeros((C,), dtype=tl.float32)
            # pass 2: per feature block, weights, inter-chunk product, state update
            for f0 in range(0, M, BLOCK_F):  # runtime bound: no full unroll
                offs_f = f0 + offs_fb
                feat_ok = offs_f < M
                w_t = tl.load(W + offs_f[None, :] * swm + offs_d[:, None] * swd,
                              mask=feat_ok[None, :] & (offs_d[:, None] < D), other=0.0)
                eq, _kq = _features(qt, w_t, feat_ok, in_seq, alpha, KERNEL, UPCAST)
                ek, _kk = _features(kt, w_t, feat_ok, key_ok, alpha, KERNEL, UPCAST)
                s_ptr = p_base + offs_f[:, None] * DV_PAD + offs_v[None, :]
                st = tl.load(s_ptr)
                zf = tl.load(z_base + offs_f)
                if KERNEL == 0:
                    phq = tl.where(feat_ok[None, :], tl.exp(eq - kq[:, None]), 0.0)
                    # key s at its own reference M_s (<= 1); the (t, s) weight adds exp(M_s - M_t)
                    phk = tl.where(feat_ok[None, :] & key_ok[:, None],
                                   tl.exp(ek - mt[:, None]), 0.0)
                else:
                    phq = eq
                    phk = ek
                a += _mm(phq.to(vt.dtype), tl.trans(phk.to(vt.dtype)), UPCAST)
                # the state can exceed fp16's range: half inputs multiply it in bf16
                if HALF_STATE:
                    inter += _mm(phq.to(tl.bfloat16), st.to(tl.bfloat16), UPCAST)
                else:
                    inter += _mm(phq, st, UPCAST)
                iden += tl.sum(phq * zf[None, :], axis=1)
                if KERNEL == 0:
                    phk = phk * kscale[:, None]
                    st = st * r
                    zf = zf * r
                st += _mm(tl.trans(phk.to(vt.dtype)), vt, UPCAST)
                zf += tl.sum(phk, axis=0)
                tl.store(s_ptr, st)
                tl.store(z_base + offs_f, zf)
            if KERNEL == 0:
                # the (t, s) weight's exp(M_s - M_t); clamped above the diagonal (discarded there)
                a = tl.where(tril, a * tl.exp(tl.minimum(mt[None, :] - mt[:, None], 0.0)), 0.0)
            else:
                a = tl.where(tril, a, 0.0)
            num = _mm(a.to(vt.dtype), vt, UPCAST)
            den = tl.sum(a, axis=1)
            if KERNEL == 0:
                num += inter * fac[:, None]
                den += iden * fac
                run = new
            else:
                num += inter
                den += iden
            out = num / tl.where(den == 0.0, 1.0, den)[:, None]
            out = tl.where((den == 0.0)[:, None], 0.0, out)
            tl.store(o_base + rows64[:, None] * sol + offs_v[None, :] * sod,
                     out.to(O.dtype.element_ty), mask=in_seq[:, None] & (offs_v[None, :] < DV))
            if SAVE_STATS:
                s_base = STATS + bh.to(tl.int64) * (3 * L)
                tl.store(s_base + rows64, den, mask=in_seq)
                if KERNEL == 0:
                    tl.store(s_base + L + rows64, kq, mask=in_seq)
                    tl.store(s_base + 2 * L + rows64, mt, mask=in_seq)
            # the state slice is re-read by other threads in the next chunk
            tl.debug_barrier()

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
    return d <= MAX_HEAD_DIM and dv <= MAX_HEAD_DIM and m <= MAX_FEATURES


def _splits(bh, length, block, device, min_len):
    """Split `length` into ranges (multiples of `block`) so that about 4 programs run per SM."""
    want = max(1, (4 * _num_sms(device)) // max(bh, 1))
    seg = max(min_len, -(-length // want))
    seg = -(-seg // block) * block
    return seg, -(-length // seg)


def _forward(q, k, v, projection, kernel_fn, causal, scale, key_padding_mask, *, seg=None,
             block_n=64, block_m=128,
             causal_warps=4, causal_stages=2, block_f=None, stats=None):
    """The output; ``stats`` (a (B·H, 3, Lq) fp32 buffer) also receives per row den, the query
    shift and (causal) the key running max, which the fused backward reuses."""
    B, H, Lq, d = q.shape
    S, dv, m = k.shape[2], v.shape[3], projection.shape[0]
    dev = q.device
    kid = _KERNEL_ID[kernel_fn]
    alpha = math.sqrt(scale if scale is not None else 1.0 / math.sqrt(d))
    # fp32 inputs (and the interpreter) multiply in true fp32; half inputs use the tensor cores
    upcast = _INTERPRET or q.dtype == torch.float32
    W = projection.to(q.dtype) if q.dtype != torch.float32 else projection.float()
    M_PAD, D_PAD, DV_PAD = _pow2(m), _pow2(d), _pow2(dv)
    out = torch.empty((B, H, Lq, dv), device=dev, dtype=q.dtype)
    if _INTERPRET:
        out.fill_(float("nan"))  # an element the kernels fail to write fails the checks
    has_mask = key_padding_mask is not None
    mask = key_padding_mask.to(torch.uint8) if has_mask else q.new_empty((1, 1), dtype=torch.uint8)
    BH = B * H
    f32 = torch.float32
    # feature block: tiles of (rows, block_f) on chip. Defaults measured on the H200 (65,536 tokens,
    # 16 heads, d=64, m=256, bf16): the causal walk holds more tiles per feature block, so smaller
    block_f = min(M_PAD, block_f or (32 if causal else 128))
    NF = M_PAD // block_f
    if causal:
        block_n = CHUNK
    if seg is None:
        # causal: the chunk walk's parallelism is B·H·segments; non-causal: the key pass's is
        # feature blocks·B·H·splits
        seg, nsplit = _splits(BH if causal else BH * NF, S, block_n, dev, 4 * block_n)
    else:
        seg = -(-seg // block_n) * block_n
        nsplit = -(-S // seg)
    P = torch.empty((BH, nsplit, M_PAD, DV_PAD), device=dev, dtype=f32)
    Z = torch.empty((BH, nsplit, M_PAD), device=dev, dtype=f32)
    MX = torch.empty((BH, nsplit, NF), device=dev, dtype=f32)
    _launcher(_kv_state_kernel)[(NF, BH, nsplit)](
        k, v, W, mask, P, Z, MX,
        H, S, m, d, dv, seg,
        *k.stride(), *v.stride(), *W.stride(), *mask.stride(),
        alpha,
        KERNEL=kid, HAS_MASK=has_mask, UPCAST=upcast,
        M_PAD=M_PAD, D_PAD=D_PAD, DV_PAD=DV_PAD, BLOCK_F=block_f, BLOCK_N=block_n,
        num_warps=4)
    merge_meta = dict(M_PAD=M_PAD, DV_PAD=DV_PAD, BLOCK_F=block_f, NF=NF, NF_PAD=_pow2(NF, 2),
                      num_warps=4)
    if causal:
        RP = torch.empty((BH, nsplit), device=dev, dtype=f32)
        _launcher(_merge_kernel)[(BH, NF)](P, Z, MX, RP, P, Z, nsplit, PREFIX=True, **merge_meta)
        _launcher(_causal_kernel)[(BH, nsplit)](
            q, k, v, W, mask, P, Z, RP, out, stats if stats is not None else RP,
            H, Lq, m, d, dv, seg,
            *q.stride(), *k.stride(), *v.stride(), *W.stride(), *mask.stride(), *out.stride(),
            alpha,
            KERNEL=kid, HAS_MASK=has_mask, UPCAST=upcast,
            M_PAD=M_PAD, D_PAD=D_PAD, DV_PAD=DV_PAD, BLOCK_F=block_f, C=CHUNK,
            HALF_STATE=q.dtype != torch.float32, SAVE_STATS=stats is not None,
            num_warps=causal_warps, num_stages=causal_stages)
        return out
    # the state is read by every query block: bf16 for half inputs (fp16 could overflow: it sums
    # up to S values of phi·v), fp32 for fp32 inputs
    ST = torch.empty((BH, M_PAD, DV_PAD), device=dev,
                     dtype=torch.bfloat16 if q.dtype != torch.float32 else f32)
    ZT = torch.empty((BH, M_PAD), device=dev, dtype=f32)
    _launcher(_merge_kernel)[(BH, NF)](P, Z, MX, MX, ST, ZT, nsplit, PREFIX=False, **merge_meta)
    _launcher(_query_kernel)[(BH, triton.cdiv(Lq, block_m))](
        q, W, ST, ZT, out, stats if stats is not None else ZT,
        H, Lq, m, d, dv,
        *q.stride(), *W.stride(), *out.stride(),
        alpha,
        KERNEL=kid, UPCAST=upcast,
        M_PAD=M_PAD, D_PAD=D_PAD, DV_PAD=DV_PAD, BLOCK_M=block_m, SAVE_STATS=stats is not None,
        num_warps=4 if _INTERPRET else 8)
    return out


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
    from inductor_ext import triton_attention_bwd
    return triton_attention_bwd.autograd_backward(ctx, grad)


torch.library.register_autograd("panther::rf_attention_triton", _rf_triton_backward,
                                setup_context=_rf_setup_context)


def _attend(*args):
    # with a gradient to come, the variant that also returns the forward's per-row statistics
    # (den, shifts), which spares the fused backward two of its three passes
    q, k, v = args[:3]
    causal = args[5]
    from .triton_attention_bwd import fused_backward_enabled
    if fused_backward_enabled(causal) and torch.is_grad_enabled() and any(
            isinstance(t, Tensor) and t.requires_grad for t in (q, k, v)):
        return torch.ops.panther.rf_attention_triton_train(*args)[0]
    return torch.ops.panther.rf_attention_triton(*args)


def rf_attention_triton(q, k, v, projection, kernel_fn="softmax", causal=False, scale=None,
                        key_padding_mask=None):
    """Drop-in for ``panther.ops.rf_attention`` that runs the fused Triton kernels on CUDA
    (forward and backward)."""
    if isinstance(q, Tensor) and torch.is_autocast_enabled(q.device.type):
        dt = torch.get_autocast_dtype(q.device.type)
        with torch.autocast(q.device.type, enabled=False):
            return _attend(q.to(dt), k.to(dt), v.to(dt), projection.to(dt), kernel_fn, causal,
                           scale, key_padding_mask)
    return _attend(q, k, v, projection, kernel_fn, causal, scale, key_padding_mask)


# --------------------------------------------------------------------------------------------
# Benchmark (CUDA)
# --------------------------------------------------------------------------------------------
def _time_ms(fn, iters=20):
    if not torch.cuda.is_available():  # the interpreter smoke test of the bench code
        fn()
        return 0.0
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def _rel(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def bench_triton_attention(cases=None, m=256, H=16, d=64, dtype=torch.bfloat16, backward=True,
                           sweep=False, long_len=262144, device="cuda"):
    """Prints SDPA vs the C++ op vs the Triton op (forward, and forward+backward) on CUDA.

    fwd+bwd of the Triton op uses the fused Triton backward (the projection needs no gradient);
    "triton bwd ms" times that backward alone, "bwd_vs_c++" is the largest relative error of its
    dq, dk, dv against the C++ backward. ``long_len`` adds a causal B=1 forward+backward at that
    length (Triton only) with its peak memory. ``sweep`` also times launch parameters of the
    forward and of the backward. (``device="cpu"`` under TRITON_INTERPRET=1 only smoke-tests
    this code on tiny cases: no timings.)"""
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
        err = _rel(fns["triton"](), ref)
        line = {"case": f"{name} L={L} B={B}", "triton_vs_c++_rel_err": f"{err:.2e}"}
        with torch.no_grad():
            for key, fn in fns.items():
                line[f"{key} fwd ms"] = round(_time_ms(fn), 3)
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
                line[f"{key} fwd+bwd ms"] = round(
                    _time_ms(lambda: torch.autograd.grad(fn(), (qg, kg, vg), go), iters=5), 3)
            from .triton_attention_bwd import fused_backward_enabled
            if fused_backward_enabled(causal):
                line["triton bwd ms"] = round(_time_ms(
                    lambda: torch.ops.panther.rf_attention_triton_backward(
                        go, q, k, v, W, "softmax", causal, None, None), iters=10), 3)
            else:
                line["triton bwd"] = "C++ backward (the fused causal backward is opt-in)"
        print(line, flush=True)
        rows.append(line)
        if sweep:
            _sweep(q, k, v, W, name, causal, backward)
        del q, k, v, fns
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    if backward and long_len:
        rows.append(_bench_long(long_len, m, H, d, dtype, dev))
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
            "triton fwd+bwd ms": round(_time_ms(
                lambda: torch.autograd.grad(rf_attention_triton(q, k, v, W, "softmax", True),
                                            (q, k, v), go), iters=3), 3),
            "peak MiB above inputs": round(peak_mb, 1), "inputs+grad_out MiB": round(inputs_mb, 1),
            "max_memory_allocated MiB": round(peak / 2**20, 1),
            "finite grads": ok}
    print(line, flush=True)
    return line


def _sweep(q, k, v, W, name, causal, backward, fwd=True):
    """Times the Triton forward / backward over launch parameters, to pick the defaults."""
    B_, L_ = q.shape[0], q.shape[2]
    if fwd:
        for seg in (None, 256, 512, 1024):
            for warps, stages in ((4, 1), (8, 1), (8, 2), (8, 3)) if causal else ((8, 2),):
                for bn in (64,) if causal else (32, 64, 128):
                    def run_cfg():
                        return _forward(q, k, v, W, "softmax", causal, None, None, seg=seg,
                                        block_n=bn, causal_warps=warps, causal_stages=stages)
                    try:
                        ms = round(_time_ms(run_cfg, iters=10), 3)
                    except Exception as exc:  # noqa: BLE001 - report and go on
                        ms = f"failed: {type(exc).__name__}: {str(exc)[:80]}"
                    print(f"  sweep fwd {name} L={L_} B={B_}: seg={seg} warps={warps} "
                          f"stages={stages} block_n={bn}: {ms} ms", flush=True)
    if not backward:
        return
    from inductor_ext.triton_attention_bwd import _backward, backward_params
    go = torch.randn_like(q)
    out, stats = torch.ops.panther.rf_attention_triton_train(q, k, v, W, "softmax", causal, None,
                                                             None)
    base = dict(backward_params)
    configs = [dict(chunk=c, block_f=bf, q_warps=w, k_warps=w, stages=st)
               for c, bf, w, st in ((64, 32, 8, 2), (64, 32, 8, 1), (64, 32, 4, 2), (64, 32, 4, 1),
                                    (64, 64, 8, 2), (64, 64, 8, 1), (64, 64, 4, 2), (64, 64, 4, 1),
                                    (32, 32, 8, 2), (32, 32, 4, 2), (32, 64, 8, 2), (32, 64, 4, 2))]
    configs += [dict(seg=sg) for sg in (512, 1024, 2048, 4096)]
    configs += [dict(tf32=True), dict(q_warps=8, k_warps=4), dict(q_warps=4, k_warps=8)]
    for cfg in configs:
        full = {**base, **cfg}

        def run_bwd():
            return _backward(go, q, k, v, W, "softmax", causal, None, None, out, stats, **full)
        try:
            ms = round(_time_ms(run_bwd, iters=5), 3)
        except Exception as exc:  # noqa: BLE001 - report and go on
            ms = f"failed: {type(exc).__name__}: {str(exc)[:80]}"
        print(f"  sweep bwd {name} L={L_} B={B_}: {full}: {ms} ms", flush=True)


# registers panther::rf_attention_triton_backward (imported last: it uses the kernels above)
from inductor_ext import triton_attention_bwd  # noqa: E402,F401
