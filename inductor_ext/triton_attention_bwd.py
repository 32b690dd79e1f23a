"""Fused Triton backward kernels for ``panther::rf_attention_triton`` (random-feature attention).

The gradients are those of the C++ ``panther::rf_attention_backward`` (the spec): every stabiliser
is a constant (it cancels between numerator and denominator), ``out = num / den`` gives
``G_t = [g_t / den_t, -(g_t . o_t) / den_t]`` per query (0 where ``den_t == 0``), and with
``vp_s = [v_s, 1]``::

    dphi_q[t] = sum_{s visible to t} phi_k[s] (G_t . vp_s)      = S_t G_t    (prefix state S)
    dphi_k[s] = sum_{t that see s}  phi_q[t] (G_t . vp_s)      = P_s vp_s   (suffix state P)
    dv[s]     = sum_{t that see s}  (phi_q[t] . phi_k[s]) G_t   = phi_k[s] P_s   (first dv columns)

then through the feature maps (``du = dphi * phi``; ``dphi * [u > 0]`` for relu)::

    softmax  e = a x.w - a^2 |x|^2 / 2   ->  dx = a (du W) - a^2 (sum_j du_j) x
    relu     e = relu(x.w)               ->  dx = du W

The projection gets no gradient here: the autograd sends calls that need one to the C++ backward.
phi(q), phi(k) are recomputed on chip from q, k and W and never written to HBM; states are fp32.

Causal (chunks of C = 64 as in the forward by default, parallel over B·H·segments):
    1. ``_kv_state_kernel`` + ``_merge_kernel`` (the forward's): prefix states at segment starts.
    2. ``_bwd_q_kernel`` grid (B·H, segments): a chunk walk (row maxima, num/den;
       or, on the training path, the forward's saved out and per-row den / shifts instead),
       then per chunk ``dq`` from the intra-chunk ``dA phi_k`` and the inter-chunk ``G S^T``.
       It writes per row ``1/den``, ``(g.o)/den``, the query shift and the key running max
       (4 floats a row) and each segment's suffix increment
       ``sum_t exp(R_seg - M_t) phi_q[t]^T G_t`` (at the segment's start reference R_seg).
    3. ``_suffix_kernel`` grid (B·H, feature blocks): reverse scan over the segments, rescaling to
       each segment's end reference: the suffix state after every segment (never total - prefix).
    4. ``_bwd_k_kernel`` grid (B·H, segments): reverse chunk walk from the segment's suffix state:
       ``dk``, ``dv`` from the intra-chunk ``dA^T phi_q``, ``A^T G`` and the inter-chunk ``P vp``,
       ``phi_k P``; the state gains the chunk's queries as the walk moves back.
Non-causal: the forward's key pass gives the total state (fp32 here); ``_bwd_q_kernel`` (no
intra-chunk part, no state update) gives ``dq`` and per-segment ``phi_q^T G``, summed into ``P``;
``_bwd_k_kernel`` with one chunk per program gives ``dk``, ``dv``.

Softmax references (as in the forward): query t at its own max feature; causal keys at the running
max ``M`` of their prefix (cross weights ``exp(M_s - M_t) <= 1``), states at their chunk's end
reference, suffix states rescaled by ``exp(R_prev - R) <= 1`` as the walk moves back; non-causal
keys at the overall max of the visible keys (the reference the merged forward state is at).

Registered as ``torch.library.triton_op("panther::rf_attention_triton_backward")`` (Inductor inlines
it when compiled); a device branch sends what ``kernel_ok`` rejects to the C++ backward. Also here:
``panther::rf_attention_triton_train`` (the forward that also returns the per-row statistics) and
its autograd. Under ``TRITON_INTERPRET=1`` CPU tensors run the kernels in Triton's interpreter.

Work per chunk and feature block (GEMMs of about 64x64x64): dq walk 7 (13 when recomputing),
dk/dv walk 8, key states 2; features are recomputed twice (four times when recomputing).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from inductor_ext.triton_attention import (CHUNK, _INTERPRET, _launcher, _operands, _pow2,
                                           _splits, kernel_ok, triton)
from panther.ops.attention import _check_rf

if triton is not None:
    import triton.language as tl

    from inductor_ext.triton_attention import (_LN2, _features, _kv_state_kernel, _load_w_t,
                                               _merge_kernel, _mm)

__all__ = ["rf_attention_triton_backward_op", "rf_attention_triton_train_op", "backward_params",
           "fused_backward_enabled"]

# launch parameters of the backward (a sweep can change them: see bench_triton_attention)
# non-causal: block_f features per streamed block (32: ptxas reports about a third of the register
# spills of 64 at d = dv = 64, m = 256, 8 warps, bf16 on sm_90), q_warps / k_warps, seg;
# causal: causal_block_f / causal_warps for the per-chunk dq and dk-dv kernels (64 / 8: no
# spills in dq, few in dk-dv, same check), seg the key side's segments;
# "causal": whether causal calls take the fused backward (else the C++ one).
backward_params = {"seg": None, "block_f": 32, "q_warps": 8, "k_warps": 8, "stages": 2,
                   "tf32": False, "chunk": CHUNK, "causal": True,
                   "causal_block_f": 64, "causal_warps": 8}


if triton is not None:

    @triton.jit
    def _dot(a, b, UPCAST: tl.constexpr, TF32: tl.constexpr):
        """Attention-side products, fp32 accumulation. Operands: fp32 (ieee) for fp32 inputs and
        in the interpreter; else bf16 (fp16 could overflow: G ~ 1/den), or tf32 when TF32 (8x
        finer rounding at half the tensor-core rate: about 4e-3 instead of 1.5e-2 relative error
        in bf16 gradients, emulated)."""
        if UPCAST:
            r = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        elif TF32:
            r = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="tf32")
        else:
            r = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
        return r

    @triton.jit
    def _operand(x, UPCAST: tl.constexpr, TF32: tl.constexpr):
        # a loop-invariant product operand, cast once to what _dot feeds the tensor cores (half
        # the registers of fp32 on the bf16 path)
        if UPCAST or TF32:
            r = x
        else:
            r = x.to(tl.bfloat16)
        return r

    @triton.jit
    def _bwd_q_kernel(
        Q, K, V, GO, W, W_LO, MASK, ST, ZT, RP, PI, PZ, ROWS, DQ, OUT, STATS,
        H, L, M, D, DV, SEG, LROW, ST_BH, ST_SG,
        sqb, sqh, sql, sqd,
        skb, skh, sks, skd,
        svb, svh, svs, svd,
        sgb, sgh, sgl, sgd,
        swm, swd,
        smb, sms,
        sdb, sdh, sdl, sdd,
        sob, soh, sol, sod,
        alpha,
        KERNEL: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, UPCAST: tl.constexpr,
        SPLIT_W: tl.constexpr,
        TF32: tl.constexpr, HAS_STATS: tl.constexpr,
        M_PAD: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr, BLOCK_F: tl.constexpr,
        C: tl.constexpr,
    ):
        """dq for one segment of queries of one (b, h), plus the segment's phi_q^T G increment.

        Causal: the forward's chunk walk from the segment's prefix state (ST, ZT at RP), the state
        streamed per feature block through this program's slice. Per chunk: pass 0 row maxima,
        pass 1 num/den (-> G), pass 2 dphi_q, dq, the increment and the state update. HAS_STATS:
        the forward's output OUT and per-row STATS (den, query shift, M) replace passes 0 and 1.
        Non-causal: ST, ZT is the total state (ST_SG = 0, read only), no intra-chunk part."""
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
        sbase = bh.to(tl.int64) * ST_BH + sg * ST_SG
        s_base = ST + sbase * (M_PAD * DV_PAD)
        z_base = ZT + sbase * M_PAD
        pbase = bh.to(tl.int64) * nsg + sg
        pi_base = PI + pbase * (M_PAD * DV_PAD)
        pz_base = PZ + pbase * M_PAD
        r_base = ROWS + bh.to(tl.int64) * (4 * LROW)       # 1/den, (g.o)/den, query shift, M
        q_base = Q + b.to(tl.int64) * sqb + hh.to(tl.int64) * sqh
        k_base = K + b.to(tl.int64) * skb + hh.to(tl.int64) * skh
        v_base = V + b.to(tl.int64) * svb + hh.to(tl.int64) * svh
        g_base = GO + b.to(tl.int64) * sgb + hh.to(tl.int64) * sgh
        d_base = DQ + b.to(tl.int64) * sdb + hh.to(tl.int64) * sdh
        o_base = OUT + b.to(tl.int64) * sob + hh.to(tl.int64) * soh
        for f0 in range(0, M_PAD, BLOCK_F):  # the increment starts at zero
            offs_f = f0 + offs_fb
            tl.store(pi_base + offs_f[:, None] * DV_PAD + offs_v[None, :],
                     tl.zeros((BLOCK_F, DV_PAD), dtype=tl.float32))
            tl.store(pz_base + offs_f, tl.zeros((BLOCK_F,), dtype=tl.float32))
        run = tl.max(tl.full((C,), -3.0e38, tl.float32), axis=0)
        if CAUSAL:
            run = tl.load(RP + pbase)
        ref0 = run  # the segment's start reference: the increment is kept there (factors <= 1)
        start = sg * SEG
        end = tl.minimum(start + SEG, L)
        tl.debug_barrier()
        for t0 in range(start, end, C):
            rows = t0 + offs_c
            in_seq = rows < L
            rows64 = rows.to(tl.int64)
            qt = tl.load(q_base + rows64[:, None] * sql + offs_d[None, :] * sqd,
                         mask=in_seq[:, None] & (offs_d[None, :] < D), other=0.0)
            go = tl.load(g_base + rows64[:, None] * sgl + offs_v[None, :] * sgd,
                         mask=in_seq[:, None] & (offs_v[None, :] < DV), other=0.0).to(tl.float32)
            key_ok = in_seq
            if CAUSAL:
                if HAS_MASK:
                    mk = tl.load(MASK + b.to(tl.int64) * smb + rows64 * sms, mask=in_seq, other=1)
                    key_ok = key_ok & (mk == 0)
                kt = tl.load(k_base + rows64[:, None] * sks + offs_d[None, :] * skd,
                             mask=key_ok[:, None] & (offs_d[None, :] < D), other=0.0)
                vt = tl.load(v_base + rows64[:, None] * svs + offs_v[None, :] * svd,
                             mask=key_ok[:, None] & (offs_v[None, :] < DV), other=0.0)
            kq = tl.zeros((C,), dtype=tl.float32)
            mt = tl.zeros((C,), dtype=tl.float32)
            fac = tl.full((C,), 1.0, tl.float32)
            pfac = tl.full((C,), 1.0, tl.float32)
            if HAS_STATS:
                # the forward's per-row den, query shift and key running max: no passes 0, 1
                x_base = STATS + bh.to(tl.int64) * (3 * L)
                den = tl.load(x_base + rows64, mask=in_seq, other=0.0)
                if KERNEL == 0:
                    kq = tl.load(x_base + L + rows64, mask=in_seq, other=0.0)
                    if CAUSAL:
                        kk = tl.load(x_base + 2 * L + rows64, mask=in_seq, other=-3.0e38)
            elif KERNEL == 0:
                # ---- pass 0 (softmax): row maxima over all features
                kq = tl.full((C,), -3.0e38, tl.float32)
                kk = tl.full((C,), -3.0e38, tl.float32)
                for f0 in range(0, M, BLOCK_F):
                    offs_f = f0 + offs_fb
                    feat_ok = offs_f < M
                    w_t, w_lo = _load_w_t(W, W_LO, offs_f, offs_d, swm, swd, feat_ok, D, SPLIT_W)
                    _e, kq_f = _features(qt, w_t, w_lo, feat_ok, in_seq, alpha, KERNEL, UPCAST,
                                          SPLIT_W)
                    kq = tl.maximum(kq, kq_f)
                    if CAUSAL:
                        _e, kk_f = _features(kt, w_t, w_lo, feat_ok, key_ok, alpha, KERNEL, UPCAST,
                                          SPLIT_W)
                        kk = tl.maximum(kk, kk_f)
            if KERNEL == 0:
                if CAUSAL:
                    # running max over keys <= t (kk: key maxima, or the saved M itself)
                    mt = tl.max(tl.where(tril, kk[None, :], -3.0e38), axis=1)
                    mt = tl.maximum(mt, run)
                    new = tl.max(mt, axis=0)
                    fac = tl.exp(run - mt)          # carried state (reference run) -> M_t
                    r = tl.exp(run - new)           # carried state -> this chunk's end
                    kscale = tl.exp(mt - new)       # key s at M_s -> chunk end
                    pfac = tl.exp(ref0 - mt)        # query t's G at M_t -> the segment's start
            if HAS_STATS:
                ot = tl.load(o_base + rows64[:, None] * sol + offs_v[None, :] * sod,
                             mask=in_seq[:, None] & (offs_v[None, :] < DV), other=0.0)
                inv = tl.where(den == 0.0, 0.0, 1.0 / tl.where(den == 0.0, 1.0, den))
                gv = go * inv[:, None]
                gdo = tl.sum(gv * ot.to(tl.float32), axis=1)
            else:
                # ---- pass 1: num | den
                a = tl.zeros((C, C), dtype=tl.float32)
                inum = tl.zeros((C, DV_PAD), dtype=tl.float32)
                iden = tl.zeros((C,), dtype=tl.float32)
                for f0 in range(0, M, BLOCK_F):
                    offs_f = f0 + offs_fb
                    feat_ok = offs_f < M
                    w_t, w_lo = _load_w_t(W, W_LO, offs_f, offs_d, swm, swd, feat_ok, D, SPLIT_W)
                    eq, _kq = _features(qt, w_t, w_lo, feat_ok, in_seq, alpha, KERNEL, UPCAST,
                                          SPLIT_W)
                    if KERNEL == 0:
                        phq = tl.where(feat_ok[None, :], tl.exp(eq - kq[:, None]), 0.0)
                    else:
                        phq = eq
                    if CAUSAL:
                        ek, _kk = _features(kt, w_t, w_lo, feat_ok, key_ok, alpha, KERNEL, UPCAST,
                                          SPLIT_W)
                        if KERNEL == 0:
                            phk = tl.where(feat_ok[None, :] & key_ok[:, None],
                                           tl.exp(ek - mt[:, None]), 0.0)
                        else:
                            phk = ek
                        a += _mm(phq.to(qt.dtype), tl.trans(phk.to(qt.dtype)), UPCAST)
                    st = tl.load(s_base + offs_f[:, None] * DV_PAD + offs_v[None, :])
                    zf = tl.load(z_base + offs_f)
                    inum += _dot(phq, st, UPCAST, TF32)
                    iden += tl.sum(phq * zf[None, :], axis=1)
                if CAUSAL:
                    if KERNEL == 0:
                        a = tl.where(tril, a * tl.exp(tl.minimum(mt[None, :] - mt[:, None], 0.0)),
                                     0.0)
                    else:
                        a = tl.where(tril, a, 0.0)
                    num = _dot(a, vt, UPCAST, TF32) + inum * fac[:, None]
                    den = tl.sum(a, axis=1) + iden * fac
                else:
                    num = inum
                    den = iden
                # ---- G = [g / den, -(g . o) / den]  (0 where den == 0)
                inv = tl.where(den == 0.0, 0.0, 1.0 / tl.where(den == 0.0, 1.0, den))
                gv = go * inv[:, None]
                gdo = tl.sum(gv * num, axis=1) * inv
            if CAUSAL:
                r_ok = rows < LROW
                tl.store(r_base + rows, inv, mask=r_ok)
                tl.store(r_base + LROW + rows, gdo, mask=r_ok)
                tl.store(r_base + 2 * LROW + rows, kq, mask=r_ok)
                tl.store(r_base + 3 * LROW + rows, mt, mask=r_ok)
                # dA[t, s] = G_t . [v_s, 1], with the intra-chunk weights' mask and decay
                da = _dot(gv, tl.trans(vt), UPCAST, TF32) - gdo[:, None]
                if KERNEL == 0:
                    da = tl.where(tril, da * tl.exp(tl.minimum(mt[None, :] - mt[:, None], 0.0)),
                                  0.0)
                else:
                    da = tl.where(tril, da, 0.0)
                da = _operand(da, UPCAST, TF32)
            gv = _operand(gv, UPCAST, TF32)  # only a matrix-product operand from here on
            tl.debug_barrier()
            # ---- pass 2: dphi_q -> dq; the segment's phi_q^T G; the state update
            dqa = tl.zeros((C, D_PAD), dtype=tl.float32)
            rs = tl.zeros((C,), dtype=tl.float32)
            for f0 in range(0, M, BLOCK_F):
                offs_f = f0 + offs_fb
                feat_ok = offs_f < M
                w_t, w_lo = _load_w_t(W, W_LO, offs_f, offs_d, swm, swd, feat_ok, D, SPLIT_W)
                eq, _kq = _features(qt, w_t, w_lo, feat_ok, in_seq, alpha, KERNEL, UPCAST,
                                          SPLIT_W)
                if KERNEL == 0:
                    phq = tl.where(feat_ok[None, :], tl.exp(eq - kq[:, None]), 0.0)
                else:
                    phq = eq
                s_ptr = s_base + offs_f[:, None] * DV_PAD + offs_v[None, :]
                st = tl.load(s_ptr)
                zf = tl.load(z_base + offs_f)
                dphq = _dot(gv, tl.trans(st), UPCAST, TF32) - gdo[:, None] * zf[None, :]
                if CAUSAL:
                    ek, _kk = _features(kt, w_t, w_lo, feat_ok, key_ok, alpha, KERNEL, UPCAST,
                                          SPLIT_W)
                    if KERNEL == 0:
                        phk = tl.where(feat_ok[None, :] & key_ok[:, None],
                                       tl.exp(ek - mt[:, None]), 0.0)
                    else:
                        phk = ek
                    dphq = dphq * fac[:, None] + _dot(da, phk, UPCAST, TF32)
                if KERNEL == 0:
                    du = dphq * phq
                else:
                    du = tl.where(eq > 0.0, dphq, 0.0)
                w_f = tl.load(W + offs_f[:, None] * swm + offs_d[None, :] * swd,
                              mask=feat_ok[:, None] & (offs_d[None, :] < D), other=0.0)
                dqa += _dot(du, w_f, UPCAST, TF32)
                rs += tl.sum(du, axis=1)
                qf = phq * pfac[:, None]
                pi_ptr = pi_base + offs_f[:, None] * DV_PAD + offs_v[None, :]
                tl.store(pi_ptr, tl.load(pi_ptr) + _dot(tl.trans(qf), gv, UPCAST, TF32))
                tl.store(pz_base + offs_f,
                         tl.load(pz_base + offs_f) - tl.sum(qf * gdo[:, None], axis=0))
                if CAUSAL:
                    if KERNEL == 0:
                        phk = phk * kscale[:, None]
                        st = st * r
                        zf = zf * r
                    st += _dot(tl.trans(phk), vt, UPCAST, TF32)
                    zf += tl.sum(phk, axis=0)
                    # every thread's reads of this block (st, zf feed dq) precede the update
                    tl.debug_barrier()
                    tl.store(s_ptr, st)
                    tl.store(z_base + offs_f, zf)
            if KERNEL == 0:
                # Inductor may pass alpha as an fp64 scalar: keep the tiles fp32
                dq = (alpha * dqa).to(tl.float32) \
                    - ((alpha * alpha) * rs).to(tl.float32)[:, None] * qt.to(tl.float32)
                if CAUSAL:
                    run = new
            else:
                dq = dqa
            tl.store(d_base + rows64[:, None] * sdl + offs_d[None, :] * sdd,
                     dq.to(DQ.dtype.element_ty), mask=in_seq[:, None] & (offs_d[None, :] < D))
            # the state / increment slices are re-read by other threads in the next chunk
            tl.debug_barrier()

    @triton.jit
    def _suffix_kernel(
        PI, PZ, RP, NSEG,
        M_PAD: tl.constexpr, DV_PAD: tl.constexpr, BLOCK_F: tl.constexpr,
    ):
        """Reverse scan over the segments of one (b, h): slot i <- the suffix state of segments > i
        at reference RP[i + 1] (the running max at segment i's end), from the increments (slot i
        at reference RP[i]); each step rescales by exp(RP[i] - RP[i + 1]) <= 1."""
        bh = tl.program_id(0)
        fb = tl.program_id(1)
        offs_f = fb * BLOCK_F + tl.arange(0, BLOCK_F)
        offs_v = tl.arange(0, DV_PAD)
        acc = tl.zeros((BLOCK_F, DV_PAD), dtype=tl.float32)
        z = tl.zeros((BLOCK_F,), dtype=tl.float32)
        nxt = tl.load(RP + bh.to(tl.int64) * NSEG + NSEG - 1)
        for i in range(0, NSEG):
            base = bh.to(tl.int64) * NSEG + (NSEG - 1 - i)
            p_ptr = PI + base * (M_PAD * DV_PAD) + offs_f[:, None] * DV_PAD + offs_v[None, :]
            pi = tl.load(p_ptr)
            zi = tl.load(PZ + base * M_PAD + offs_f)
            tl.store(p_ptr, acc)
            tl.store(PZ + base * M_PAD + offs_f, z)
            rp = tl.load(RP + base)
            f = tl.exp(rp - nxt)
            acc = acc * f + pi
            z = z * f + zi
            nxt = rp

    @triton.jit
    def _bwd_k_kernel(
        Q, K, V, GO, W, W_LO, MASK, PS, PSZ, MK, ROWS, DK, DVO,
        H, L, M, D, DV, SEG, LROW, PS_BH, PS_SG,
        sqb, sqh, sql, sqd,
        skb, skh, sks, skd,
        svb, svh, svs, svd,
        sgb, sgh, sgl, sgd,
        swm, swd,
        smb, sms,
        sdkb, sdkh, sdkl, sdkd,
        sdvb, sdvh, sdvl, sdvd,
        alpha,
        KERNEL: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, UPCAST: tl.constexpr,
        SPLIT_W: tl.constexpr,
        TF32: tl.constexpr,
        M_PAD: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr, BLOCK_F: tl.constexpr,
        C: tl.constexpr,
    ):
        """dk, dv for one segment of keys of one (b, h).

        Causal: reverse chunk walk from the suffix state after the segment (PS, PSZ at the
        segment's end reference), streamed per feature block through this program's slice; the
        per-row 1/den, (g.o)/den, query shift and running max M come from _bwd_q_kernel.
        Non-causal: PS, PSZ is the total phi_q^T G (PS_SG = 0, read only), keys at MK[bh]."""
        bh = tl.program_id(0)
        sg = tl.program_id(1)
        b = bh // H
        hh = bh % H
        offs_c = tl.arange(0, C)
        offs_d = tl.arange(0, D_PAD)
        offs_fb = tl.arange(0, BLOCK_F)
        offs_v = tl.arange(0, DV_PAD)
        tril = offs_c[None, :] <= offs_c[:, None]          # [t, s]: key s visible to query t
        sbase = bh.to(tl.int64) * PS_BH + sg * PS_SG
        p_base = PS + sbase * (M_PAD * DV_PAD)
        pz_base = PSZ + sbase * M_PAD
        r_base = ROWS + bh.to(tl.int64) * (4 * LROW)
        q_base = Q + b.to(tl.int64) * sqb + hh.to(tl.int64) * sqh
        k_base = K + b.to(tl.int64) * skb + hh.to(tl.int64) * skh
        v_base = V + b.to(tl.int64) * svb + hh.to(tl.int64) * svh
        g_base = GO + b.to(tl.int64) * sgb + hh.to(tl.int64) * sgh
        dk_base = DK + b.to(tl.int64) * sdkb + hh.to(tl.int64) * sdkh
        dv_base = DVO + b.to(tl.int64) * sdvb + hh.to(tl.int64) * sdvh
        mkey = 0.0
        if not CAUSAL:
            if KERNEL == 0:
                mkey = tl.load(MK + bh)
        start = sg * SEG
        end = tl.minimum(start + SEG, L)
        nchunks = (end - start + C - 1) // C
        for i in range(0, nchunks):
            t0 = start + (nchunks - 1 - i) * C              # last chunk first
            rows = t0 + offs_c
            in_seq = rows < L
            rows64 = rows.to(tl.int64)
            key_ok = in_seq
            if HAS_MASK:
                mk = tl.load(MASK + b.to(tl.int64) * smb + rows64 * sms, mask=in_seq, other=1)
                key_ok = key_ok & (mk == 0)
            kt = tl.load(k_base + rows64[:, None] * sks + offs_d[None, :] * skd,
                         mask=key_ok[:, None] & (offs_d[None, :] < D), other=0.0)
            vt = tl.load(v_base + rows64[:, None] * svs + offs_v[None, :] * svd,
                         mask=key_ok[:, None] & (offs_v[None, :] < DV), other=0.0)
            mt = tl.zeros((C,), dtype=tl.float32) + mkey   # key s at reference mt[s]
            eks = tl.full((C,), 1.0, tl.float32)
            if CAUSAL:
                r_ok = rows < LROW
                qt = tl.load(q_base + rows64[:, None] * sql + offs_d[None, :] * sqd,
                             mask=in_seq[:, None] & (offs_d[None, :] < D), other=0.0)
                go = tl.load(g_base + rows64[:, None] * sgl + offs_v[None, :] * sgd,
                             mask=in_seq[:, None] & (offs_v[None, :] < DV), other=0.0)
                inv = tl.load(r_base + rows, mask=r_ok, other=0.0)
                gdo = tl.load(r_base + LROW + rows, mask=r_ok, other=0.0)
                gv = go.to(tl.float32) * inv[:, None]
                facq = tl.full((C,), 1.0, tl.float32)
                r = 1.0
                if KERNEL == 0:
                    kq = tl.load(r_base + 2 * LROW + rows, mask=r_ok, other=0.0)
                    mt = tl.load(r_base + 3 * LROW + rows, mask=r_ok, other=-3.0e38)
                    rc = tl.max(mt, axis=0)                          # chunk end reference R_c
                    rprev = tl.load(r_base + 3 * LROW + tl.maximum(t0 - 1, 0))
                    eks = tl.exp(mt - rc)                            # key s at M_s -> R_c
                    facq = tl.exp(rprev - mt)                        # query t at M_t -> R_prev
                    r = tl.exp(rprev - rc)                           # state R_c -> R_prev
                da = _dot(gv, tl.trans(vt), UPCAST, TF32) - gdo[:, None]
                if KERNEL == 0:
                    decay = tl.exp(tl.minimum(mt[None, :] - mt[:, None], 0.0))
                    da = tl.where(tril, da * decay, 0.0)
                else:
                    da = tl.where(tril, da, 0.0)
                da = _operand(da, UPCAST, TF32)
                gv = _operand(gv, UPCAST, TF32)  # only a matrix-product operand from here on
                a = tl.zeros((C, C), dtype=tl.float32)
            dvi = tl.zeros((C, DV_PAD), dtype=tl.float32)
            dka = tl.zeros((C, D_PAD), dtype=tl.float32)
            rs = tl.zeros((C,), dtype=tl.float32)
            for f0 in range(0, M, BLOCK_F):
                offs_f = f0 + offs_fb
                feat_ok = offs_f < M
                w_t, w_lo = _load_w_t(W, W_LO, offs_f, offs_d, swm, swd, feat_ok, D, SPLIT_W)
                ek, _kk = _features(kt, w_t, w_lo, feat_ok, key_ok, alpha, KERNEL, UPCAST,
                                          SPLIT_W)
                if KERNEL == 0:
                    phk = tl.where(feat_ok[None, :] & key_ok[:, None], tl.exp(ek - mt[:, None]),
                                   0.0)
                else:
                    phk = ek
                p_ptr = p_base + offs_f[:, None] * DV_PAD + offs_v[None, :]
                pv = tl.load(p_ptr)
                pz = tl.load(pz_base + offs_f)
                # dphi_k[s] = P [v_s, 1] (later chunks), at the key's reference
                dphk = _dot(vt, tl.trans(pv), UPCAST, TF32) + pz[None, :]
                dvi += _dot(phk, pv, UPCAST, TF32)
                if CAUSAL:
                    eq, _kq = _features(qt, w_t, w_lo, feat_ok, in_seq, alpha, KERNEL, UPCAST,
                                          SPLIT_W)
                    if KERNEL == 0:
                        phq = tl.where(feat_ok[None, :], tl.exp(eq - kq[:, None]), 0.0)
                    else:
                        phq = eq
                    a += _mm(phq.to(qt.dtype), tl.trans(phk.to(qt.dtype)), UPCAST)
                    dphk = dphk * eks[:, None] + _dot(tl.trans(da), phq, UPCAST, TF32)
                    # the state gains this chunk's queries (moves to the previous chunk's end)
                    qf = phq * facq[:, None]
                    if KERNEL == 0:
                        pv = pv * r
                        pz = pz * r
                    pv += _dot(tl.trans(qf), gv, UPCAST, TF32)
                    # every thread's reads of this block (pv, pz feed dk, dv) precede the update
                    tl.debug_barrier()
                    tl.store(p_ptr, pv)
                    tl.store(pz_base + offs_f, pz - tl.sum(qf * gdo[:, None], axis=0))
                if KERNEL == 0:
                    du = dphk * phk
                else:
                    du = tl.where(ek > 0.0, dphk, 0.0)
                w_f = tl.load(W + offs_f[:, None] * swm + offs_d[None, :] * swd,
                              mask=feat_ok[:, None] & (offs_d[None, :] < D), other=0.0)
                dka += _dot(du, w_f, UPCAST, TF32)
                rs += tl.sum(du, axis=1)
            if CAUSAL:
                if KERNEL == 0:
                    a = tl.where(tril, a * decay, 0.0)
                else:
                    a = tl.where(tril, a, 0.0)
                dvv = _dot(tl.trans(a), gv, UPCAST, TF32) + dvi * eks[:, None]
            else:
                dvv = dvi
            if KERNEL == 0:
                dk = (alpha * dka).to(tl.float32) \
                    - ((alpha * alpha) * rs).to(tl.float32)[:, None] * kt.to(tl.float32)
            else:
                dk = dka
            tl.store(dk_base + rows64[:, None] * sdkl + offs_d[None, :] * sdkd,
                     dk.to(DK.dtype.element_ty), mask=in_seq[:, None] & (offs_d[None, :] < D))
            tl.store(dv_base + rows64[:, None] * sdvl + offs_v[None, :] * sdvd,
                     dvv.to(DVO.dtype.element_ty), mask=in_seq[:, None] & (offs_v[None, :] < DV))
            tl.debug_barrier()


    # ---- causal: every chunk independent (as the forward's chunk outputs), two short scans ----
    @triton.jit
    def _chunk_tiles(Q, K, V, GO, MASK, STATS, b, hh, bh, rows, L, D, DV,
                     sqb, sqh, sql, sqd, skb, skh, sks, skd, svb, svh, svs, svd,
                     sgb, sgh, sgl, sgd, smb, sms,
                     KERNEL: tl.constexpr, HAS_MASK: tl.constexpr,
                     D_PAD: tl.constexpr, DV_PAD: tl.constexpr):
        """One chunk's q, k, v, g tiles (keys masked), and per row the forward's query shift kq
        and key running max M (natural units; 0 for relu)."""
        offs_d = tl.arange(0, D_PAD)
        offs_v = tl.arange(0, DV_PAD)
        in_seq = rows < L
        rows64 = rows.to(tl.int64)
        key_ok = in_seq
        if HAS_MASK:
            mk = tl.load(MASK + b.to(tl.int64) * smb + rows64 * sms, mask=in_seq, other=1)
            key_ok = key_ok & (mk == 0)
        dmask = offs_d[None, :] < D
        vmask = offs_v[None, :] < DV
        qt = tl.load(Q + b.to(tl.int64) * sqb + hh.to(tl.int64) * sqh + rows64[:, None] * sql
                     + offs_d[None, :] * sqd, mask=in_seq[:, None] & dmask, other=0.0)
        kt = tl.load(K + b.to(tl.int64) * skb + hh.to(tl.int64) * skh + rows64[:, None] * sks
                     + offs_d[None, :] * skd, mask=key_ok[:, None] & dmask, other=0.0)
        vt = tl.load(V + b.to(tl.int64) * svb + hh.to(tl.int64) * svh + rows64[:, None] * svs
                     + offs_v[None, :] * svd, mask=key_ok[:, None] & vmask, other=0.0)
        go = tl.load(GO + b.to(tl.int64) * sgb + hh.to(tl.int64) * sgh + rows64[:, None] * sgl
                     + offs_v[None, :] * sgd, mask=in_seq[:, None] & vmask, other=0.0)
        x_base = STATS + bh.to(tl.int64) * (3 * L)
        kq = tl.load(x_base + L + rows64, mask=in_seq, other=0.0)
        mt = tl.load(x_base + 2 * L + rows64, mask=in_seq, other=0.0)
        if KERNEL != 0:
            mt = tl.zeros_like(mt)
        return qt, kt, vt, go.to(tl.float32), kq, mt, in_seq, key_ok, rows64

    @triton.jit
    def _chunk_da(gv, gdo, vt, mt, KERNEL: tl.constexpr, UPCAST: tl.constexpr,
                  TF32: tl.constexpr, C: tl.constexpr):
        """dA[t, s] = (G_t . [v_s, 1]) exp(M_s - M_t) for keys s <= t of the chunk (else 0), and
        the decay exp(M_s - M_t) itself."""
        offs_c = tl.arange(0, C)
        tril = offs_c[None, :] <= offs_c[:, None]
        decay = tl.exp(tl.minimum(mt[None, :] - mt[:, None], 0.0))
        if KERNEL != 0:
            decay = tl.full((C, C), 1.0, tl.float32)
        decay = tl.where(tril, decay, 0.0)
        da = (_dot(gv, tl.trans(vt), UPCAST, TF32) - gdo[:, None]) * decay
        return da, decay

    @triton.jit
    def _dq_chunk_kernel(
        Q, K, V, GO, OUT, W, W_LO, MASK, STATS, HS, HZ, HR, ROWS, DQ,
        H, L, M, D, DV, NCHUNK,
        sqb, sqh, sql, sqd,
        skb, skh, sks, skd,
        svb, svh, svs, svd,
        sgb, sgh, sgl, sgd,
        sob, soh, sol, sod,
        swm, swd,
        smb, sms,
        sdb, sdh, sdl, sdd,
        alpha,
        KERNEL: tl.constexpr, HAS_MASK: tl.constexpr, UPCAST: tl.constexpr,
        SPLIT_W: tl.constexpr, TF32: tl.constexpr,
        M_PAD: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr, BLOCK_F: tl.constexpr,
        C: tl.constexpr,
    ):
        """Causal dq of one chunk, grid (chunks, B·H): the intra-chunk dA phi_k plus the
        inter-chunk G S^T from the forward's state at the chunk start (HS, HZ at HR, log2).
        Also writes per row 1/den and (g.o)/den into ROWS (B·H, 2, L) for the key side."""
        c = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        hh = bh % H
        offs_d = tl.arange(0, D_PAD)
        offs_fb = tl.arange(0, BLOCK_F)
        offs_v = tl.arange(0, DV_PAD)
        rows = c * C + tl.arange(0, C)
        qt, kt, vt, go, kq, mt, in_seq, key_ok, rows64 = _chunk_tiles(
            Q, K, V, GO, MASK, STATS, b, hh, bh, rows, L, D, DV,
            sqb, sqh, sql, sqd, skb, skh, sks, skd, svb, svh, svs, svd,
            sgb, sgh, sgl, sgd, smb, sms, KERNEL, HAS_MASK, D_PAD, DV_PAD)
        den = tl.load(STATS + bh.to(tl.int64) * (3 * L) + rows64, mask=in_seq, other=0.0)
        ot = tl.load(OUT + b.to(tl.int64) * sob + hh.to(tl.int64) * soh + rows64[:, None] * sol
                     + offs_v[None, :] * sod, mask=in_seq[:, None] & (offs_v[None, :] < DV),
                     other=0.0)
        inv = tl.where(den == 0.0, 0.0, 1.0 / tl.where(den == 0.0, 1.0, den))
        gv = go * inv[:, None]
        gdo = tl.sum(gv * ot.to(tl.float32), axis=1)
        r_base = ROWS + bh.to(tl.int64) * (2 * L)
        tl.store(r_base + rows64, inv, mask=in_seq)
        tl.store(r_base + L + rows64, gdo, mask=in_seq)
        ch = bh.to(tl.int64) * NCHUNK + c
        fac = tl.full((C,), 1.0, tl.float32)
        if KERNEL == 0:
            # chunk-start state -> M_t (rows past L: 0, never stored)
            fac = tl.where(in_seq, tl.exp(tl.minimum(tl.load(HR + ch) * _LN2 - mt, 0.0)), 0.0)
        da, _decay = _chunk_da(gv, gdo, vt, mt, KERNEL, UPCAST, TF32, C)
        da = _operand(da, UPCAST, TF32)
        gv = _operand(gv, UPCAST, TF32)
        dqa = tl.zeros((C, D_PAD), dtype=tl.float32)
        rs = tl.zeros((C,), dtype=tl.float32)
        hs_base = HS + ch * (M_PAD * DV_PAD)
        for f0 in range(0, M, BLOCK_F):
            offs_f = f0 + offs_fb
            feat_ok = offs_f < M
            w_t, w_lo = _load_w_t(W, W_LO, offs_f, offs_d, swm, swd, feat_ok, D, SPLIT_W)
            eq, _kq = _features(qt, w_t, w_lo, feat_ok, in_seq, alpha, KERNEL, UPCAST, SPLIT_W)
            ek, _kk = _features(kt, w_t, w_lo, feat_ok, key_ok, alpha, KERNEL, UPCAST, SPLIT_W)
            if KERNEL == 0:
                phq = tl.where(feat_ok[None, :], tl.exp(eq - kq[:, None]), 0.0)
                phk = tl.where(feat_ok[None, :] & key_ok[:, None], tl.exp(ek - mt[:, None]), 0.0)
            else:
                phq = eq
                phk = ek
            st = tl.load(hs_base + offs_f[:, None] * DV_PAD + offs_v[None, :])
            zf = tl.load(HZ + ch * M_PAD + offs_f)
            dphq = (_dot(gv, tl.trans(st), UPCAST, TF32) - gdo[:, None] * zf[None, :]) \
                * fac[:, None] + _dot(da, phk, UPCAST, TF32)
            if KERNEL == 0:
                du = dphq * phq
            else:
                du = tl.where(eq > 0.0, dphq, 0.0)
            dqa += _dot(du, tl.trans(w_t), UPCAST, TF32)
            rs += tl.sum(du, axis=1)
        _store_dx(DQ, dqa, rs, qt, b, hh, rows64, in_seq, sdb, sdh, sdl, sdd, D, alpha,
                  KERNEL, D_PAD)

    @triton.jit
    def _store_dx(DX, dxa, rs, xt, b, hh, rows64, row_ok, sxb, sxh, sxl, sxd, D, alpha,
                  KERNEL: tl.constexpr, D_PAD: tl.constexpr):
        """dx from du W (dxa) and sum_j du_j (rs): softmax e = a x.w - a^2 |x|^2 / 2 gives
        dx = a du W - a^2 (sum_j du_j) x; relu dx = du W."""
        offs_d = tl.arange(0, D_PAD)
        if KERNEL == 0:
            # Inductor may pass alpha as an fp64 scalar: keep the tiles fp32
            dx = (alpha * dxa).to(tl.float32) \
                - ((alpha * alpha) * rs).to(tl.float32)[:, None] * xt.to(tl.float32)
        else:
            dx = dxa
        tl.store(DX + b.to(tl.int64) * sxb + hh.to(tl.int64) * sxh + rows64[:, None] * sxl
                 + offs_d[None, :] * sxd, dx.to(DX.dtype.element_ty),
                 mask=row_ok[:, None] & (offs_d[None, :] < D))

    @triton.jit
    def _query_g_tile(Q, GO, STATS, ROWS, w, w_lo, b, hh, bh, rows, ref, L, D, DV,
                      sqb, sqh, sql, sqd, sgb, sgh, sgl, sgd, alpha,
                      KERNEL: tl.constexpr, UPCAST: tl.constexpr, SPLIT_W: tl.constexpr,
                      D_PAD: tl.constexpr, DV_PAD: tl.constexpr, BLOCK_F: tl.constexpr):
        """For a block of queries and one feature block: p[f, t] = phi_q[t, f] exp(ref - M_t)
        (features as rows; every factor <= 1 for ref <= M_t), g = 1/den_t g_t and
        gdo = (g.o)/den_t: the pieces of sum_t p[:, t] [g_t, -gdo_t]."""
        offs_d = tl.arange(0, D_PAD)
        offs_v = tl.arange(0, DV_PAD)
        in_seq = rows < L
        rows64 = rows.to(tl.int64)
        qt = tl.load(Q + b.to(tl.int64) * sqb + hh.to(tl.int64) * sqh + rows64[:, None] * sql
                     + offs_d[None, :] * sqd, mask=in_seq[:, None] & (offs_d[None, :] < D),
                     other=0.0)
        go = tl.load(GO + b.to(tl.int64) * sgb + hh.to(tl.int64) * sgh + rows64[:, None] * sgl
                     + offs_v[None, :] * sgd, mask=in_seq[:, None] & (offs_v[None, :] < DV),
                     other=0.0)
        r_base = ROWS + bh.to(tl.int64) * (2 * L)
        inv = tl.load(r_base + rows64, mask=in_seq, other=0.0)
        gdo = tl.load(r_base + L + rows64, mask=in_seq, other=0.0)
        s = _mm(w, tl.trans(qt), UPCAST)                   # (features, queries)
        if SPLIT_W:
            s += _mm(w_lo, tl.trans(qt), UPCAST)
        if KERNEL == 0:
            x_base = STATS + bh.to(tl.int64) * (3 * L)
            kq = tl.load(x_base + L + rows64, mask=in_seq, other=0.0)
            mt = tl.load(x_base + 2 * L + rows64, mask=in_seq, other=0.0)
            qf = qt.to(tl.float32)
            hq = tl.sum(qf * qf, axis=1) * (0.5 * alpha * alpha)
            # phi_q = exp(a q.w - |q|^2 a^2/2 - kq), times exp(ref - M_t); rows past L: 0
            off = tl.where(in_seq, hq + kq + mt - ref, 3.0e38).to(tl.float32)
            p = tl.exp(tl.minimum((s * alpha).to(tl.float32) - off[None, :], 0.0))
        else:
            p = tl.maximum(s, 0.0)
        p = tl.where(in_seq[None, :], p, 0.0)
        return p, go.to(tl.float32) * inv[:, None], gdo

    @triton.jit
    def _q_increment_kernel(
        Q, GO, W, W_LO, STATS, ROWS, RPB, PI, PZ,
        H, L, M, D, DV, SEG,
        sqb, sqh, sql, sqd,
        sgb, sgh, sgl, sgd,
        swm, swd,
        alpha,
        KERNEL: tl.constexpr, UPCAST: tl.constexpr, SPLIT_W: tl.constexpr, TF32: tl.constexpr,
        M_PAD: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr, BLOCK_F: tl.constexpr,
        C: tl.constexpr,
    ):
        """Causal, key side step 1, grid (feature blocks, B·H, segments): each segment's
        sum_t phi_q[t]^T [g_t, -gdo_t] / den_t at the segment's start reference RPB (the key
        running max before it), into PI (fp32), PZ."""
        fb = tl.program_id(0)
        bh = tl.program_id(1)
        sg = tl.program_id(2)
        nsg = tl.num_programs(2)
        b = bh // H
        hh = bh % H
        offs_f = fb * BLOCK_F + tl.arange(0, BLOCK_F)
        offs_d = tl.arange(0, D_PAD)
        offs_v = tl.arange(0, DV_PAD)
        feat_ok = offs_f < M
        w_off = offs_f[:, None] * swm + offs_d[None, :] * swd
        w_ok = feat_ok[:, None] & (offs_d[None, :] < D)
        w = tl.load(W + w_off, mask=w_ok, other=0.0)
        w_lo = w
        if SPLIT_W:
            w_lo = tl.load(W_LO + w_off, mask=w_ok, other=0.0)
        base = bh.to(tl.int64) * nsg + sg
        ref = tl.load(RPB + base)
        acc = tl.zeros((BLOCK_F, DV_PAD), dtype=tl.float32)
        z = tl.zeros((BLOCK_F,), dtype=tl.float32)
        start = sg * SEG
        for t0 in range(start, start + SEG, C):
            rows = t0 + tl.arange(0, C)
            p, gv, gdo = _query_g_tile(Q, GO, STATS, ROWS, w, w_lo, b, hh, bh, rows, ref,
                                       L, D, DV, sqb, sqh, sql, sqd, sgb, sgh, sgl, sgd, alpha,
                                       KERNEL, UPCAST, SPLIT_W, D_PAD, DV_PAD, BLOCK_F)
            acc += _dot(p, gv, UPCAST, TF32)
            z -= tl.sum(p * gdo[None, :], axis=1)
        acc = tl.where(feat_ok[:, None], acc, 0.0)
        z = tl.where(feat_ok, z, 0.0)
        tl.store(PI + base * (M_PAD * DV_PAD) + offs_f[:, None] * DV_PAD + offs_v[None, :], acc)
        tl.store(PZ + base * M_PAD + offs_f, z)

    @triton.jit
    def _suffix_state_kernel(
        Q, GO, W, W_LO, STATS, ROWS, PI, PZ, HP, HPZ, HPR,
        H, L, M, D, DV, SEG, NCHUNK,
        sqb, sqh, sql, sqd,
        sgb, sgh, sgl, sgd,
        swm, swd,
        alpha,
        KERNEL: tl.constexpr, UPCAST: tl.constexpr, SPLIT_W: tl.constexpr, TF32: tl.constexpr,
        M_PAD: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr, BLOCK_F: tl.constexpr,
        C: tl.constexpr,
    ):
        """Causal, key side step 3, grid (feature blocks, B·H, segments): walks the segment's
        chunks last first from the suffix state after the segment (PI, PZ, from the segment
        scan) and writes, per chunk, the suffix state of the queries after it (HP in the state
        dtype, HPZ fp32) at the reference HPR = M at the chunk's last row (natural units)."""
        fb = tl.program_id(0)
        bh = tl.program_id(1)
        sg = tl.program_id(2)
        nsg = tl.num_programs(2)
        b = bh // H
        hh = bh % H
        offs_f = fb * BLOCK_F + tl.arange(0, BLOCK_F)
        offs_d = tl.arange(0, D_PAD)
        offs_v = tl.arange(0, DV_PAD)
        feat_ok = offs_f < M
        w_off = offs_f[:, None] * swm + offs_d[None, :] * swd
        w_ok = feat_ok[:, None] & (offs_d[None, :] < D)
        w = tl.load(W + w_off, mask=w_ok, other=0.0)
        w_lo = w
        if SPLIT_W:
            w_lo = tl.load(W_LO + w_off, mask=w_ok, other=0.0)
        base = bh.to(tl.int64) * nsg + sg
        acc = tl.load(PI + base * (M_PAD * DV_PAD) + offs_f[:, None] * DV_PAD + offs_v[None, :])
        z = tl.load(PZ + base * M_PAD + offs_f)
        m_base = STATS + bh.to(tl.int64) * (3 * L) + 2 * L
        start = sg * SEG
        end = tl.minimum(start + SEG, L)
        cur = 0.0
        if KERNEL == 0:
            cur = tl.load(m_base + end - 1)
        nch = (end - start + C - 1) // C
        for i in range(0, nch):
            t0 = start + (nch - 1 - i) * C
            ch = bh.to(tl.int64) * NCHUNK + t0 // C
            tl.store(HP + ch * (M_PAD * DV_PAD) + offs_f[:, None] * DV_PAD + offs_v[None, :],
                     acc.to(HP.dtype.element_ty))
            tl.store(HPZ + ch * M_PAD + offs_f, z)
            if fb == 0:
                tl.store(HPR + ch, cur)
            prev = 0.0
            if KERNEL == 0:
                # the reference before this chunk: M at its row t0 - 1 (none before row 0)
                prev = tl.load(m_base + tl.maximum(t0 - 1, 0))
                prev = tl.where(t0 == 0, -2.0e38, prev)
            p, gv, gdo = _query_g_tile(Q, GO, STATS, ROWS, w, w_lo, b, hh, bh,
                                       t0 + tl.arange(0, C), prev, L, D, DV,
                                       sqb, sqh, sql, sqd, sgb, sgh, sgl, sgd, alpha,
                                       KERNEL, UPCAST, SPLIT_W, D_PAD, DV_PAD, BLOCK_F)
            if KERNEL == 0:
                r = tl.exp(prev - cur)
                acc = acc * r
                z = z * r
                cur = prev
            acc += _dot(p, gv, UPCAST, TF32)
            z -= tl.sum(p * gdo[None, :], axis=1)
            acc = tl.where(feat_ok[:, None], acc, 0.0)
            z = tl.where(feat_ok, z, 0.0)

    @triton.jit
    def _dkdv_chunk_kernel(
        Q, K, V, GO, W, W_LO, MASK, STATS, ROWS, HP, HPZ, HPR, DK, DVO,
        H, L, M, D, DV, NCHUNK,
        sqb, sqh, sql, sqd,
        skb, skh, sks, skd,
        svb, svh, svs, svd,
        sgb, sgh, sgl, sgd,
        swm, swd,
        smb, sms,
        sdkb, sdkh, sdkl, sdkd,
        sdvb, sdvh, sdvl, sdvd,
        alpha,
        KERNEL: tl.constexpr, HAS_MASK: tl.constexpr, UPCAST: tl.constexpr,
        SPLIT_W: tl.constexpr, TF32: tl.constexpr,
        M_PAD: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr, BLOCK_F: tl.constexpr,
        C: tl.constexpr,
    ):
        """Causal dk, dv of one chunk, grid (chunks, B·H): the intra-chunk dA^T phi_q, A^T G plus
        the inter-chunk P [v_s, 1], phi_k P from the suffix state after the chunk (HP, HPZ at
        HPR)."""
        c = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        hh = bh % H
        offs_d = tl.arange(0, D_PAD)
        offs_fb = tl.arange(0, BLOCK_F)
        offs_v = tl.arange(0, DV_PAD)
        rows = c * C + tl.arange(0, C)
        qt, kt, vt, go, kq, mt, in_seq, key_ok, rows64 = _chunk_tiles(
            Q, K, V, GO, MASK, STATS, b, hh, bh, rows, L, D, DV,
            sqb, sqh, sql, sqd, skb, skh, sks, skd, svb, svh, svs, svd,
            sgb, sgh, sgl, sgd, smb, sms, KERNEL, HAS_MASK, D_PAD, DV_PAD)
        r_base = ROWS + bh.to(tl.int64) * (2 * L)
        gv = go * tl.load(r_base + rows64, mask=in_seq, other=0.0)[:, None]
        gdo = tl.load(r_base + L + rows64, mask=in_seq, other=0.0)
        ch = bh.to(tl.int64) * NCHUNK + c
        eks = tl.full((C,), 1.0, tl.float32)
        if KERNEL == 0:
            # key s at M_s -> the suffix's reference (rows past L: 0, never stored)
            eks = tl.where(in_seq, tl.exp(tl.minimum(mt - tl.load(HPR + ch), 0.0)), 0.0)
        da, decay = _chunk_da(gv, gdo, vt, mt, KERNEL, UPCAST, TF32, C)
        da = _operand(da, UPCAST, TF32)
        a = tl.zeros((C, C), dtype=tl.float32)
        dvi = tl.zeros((C, DV_PAD), dtype=tl.float32)
        dka = tl.zeros((C, D_PAD), dtype=tl.float32)
        rs = tl.zeros((C,), dtype=tl.float32)
        hp_base = HP + ch * (M_PAD * DV_PAD)
        for f0 in range(0, M, BLOCK_F):
            offs_f = f0 + offs_fb
            feat_ok = offs_f < M
            w_t, w_lo = _load_w_t(W, W_LO, offs_f, offs_d, swm, swd, feat_ok, D, SPLIT_W)
            eq, _kq = _features(qt, w_t, w_lo, feat_ok, in_seq, alpha, KERNEL, UPCAST, SPLIT_W)
            ek, _kk = _features(kt, w_t, w_lo, feat_ok, key_ok, alpha, KERNEL, UPCAST, SPLIT_W)
            if KERNEL == 0:
                phq = tl.where(feat_ok[None, :], tl.exp(eq - kq[:, None]), 0.0)
                phk = tl.where(feat_ok[None, :] & key_ok[:, None], tl.exp(ek - mt[:, None]), 0.0)
            else:
                phq = eq
                phk = ek
            pv = tl.load(hp_base + offs_f[:, None] * DV_PAD + offs_v[None, :])
            pz = tl.load(HPZ + ch * M_PAD + offs_f)
            dphk = (_dot(vt, tl.trans(pv), UPCAST, TF32) + pz[None, :]) * eks[:, None] \
                + _dot(tl.trans(da), phq, UPCAST, TF32)
            dvi += _dot(phk, pv, UPCAST, TF32)
            a += _mm(phq.to(qt.dtype), tl.trans(phk.to(qt.dtype)), UPCAST)
            if KERNEL == 0:
                du = dphk * phk
            else:
                du = tl.where(ek > 0.0, dphk, 0.0)
            dka += _dot(du, tl.trans(w_t), UPCAST, TF32)
            rs += tl.sum(du, axis=1)
        a = _operand(a * decay, UPCAST, TF32)
        dvv = _dot(tl.trans(a), _operand(gv, UPCAST, TF32), UPCAST, TF32) + dvi * eks[:, None]
        tl.store(DVO + b.to(tl.int64) * sdvb + hh.to(tl.int64) * sdvh + rows64[:, None] * sdvl
                 + offs_v[None, :] * sdvd, dvv.to(DVO.dtype.element_ty),
                 mask=in_seq[:, None] & (offs_v[None, :] < DV))
        _store_dx(DK, dka, rs, kt, b, hh, rows64, in_seq, sdkb, sdkh, sdkl, sdkd, D, alpha,
                  KERNEL, D_PAD)


# --------------------------------------------------------------------------------------------
# Launch
# --------------------------------------------------------------------------------------------
def _backward(go, q, k, v, projection, kernel_fn, causal, scale, key_padding_mask, out=None,
              stats=None, *, seg=None, block_f=None, q_warps=None, k_warps=None, stages=None,
              tf32=None, chunk=None):
    """(dq, dk, dv) of ``panther::rf_attention`` by the fused kernels (no projection gradient).
    ``out`` and ``stats`` (the forward's output and per-row statistics, ``_forward(stats=...)``),
    when given, spare the dq walk its recomputation of the row maxima and of num / den.
    Launch parameters default to ``backward_params``: ``seg`` keys/queries per program of the
    chunk walks (None: about 4 programs per SM), ``block_f`` features per streamed block,
    ``q_warps`` / ``k_warps`` warps of the dq / dk-dv walks, ``stages`` software-pipelining
    depth, ``tf32`` tf32 instead of bf16 operands for half inputs, ``chunk`` the chunk length of
    the walks (a power of two >= 16; the forward's statistics do not depend on it)."""
    p = backward_params
    tf32 = p["tf32"] if tf32 is None else tf32
    C = chunk or p["chunk"]
    seg = p["seg"] if seg is None else seg
    q_warps = q_warps or p["causal_warps" if causal else "q_warps"]
    k_warps = k_warps or p["causal_warps" if causal else "k_warps"]
    stages = stages or p["stages"]
    if causal:
        if stats is None:
            B, H, Lq = q.shape[:3]
            stats = torch.zeros((B * H, 3, Lq), device=q.device, dtype=torch.float32)
            out = _ta()._forward(q, k, v, projection, kernel_fn, True, scale, key_padding_mask,
                                 stats=stats, chunk=C)
        return _causal_backward(go, q, k, v, projection, kernel_fn, scale, key_padding_mask,
                                out, stats, seg=seg, block_f=min(_pow2(projection.shape[0]),
                                                                 block_f or p["causal_block_f"]),
                                q_warps=q_warps, k_warps=k_warps, stages=stages, tf32=tf32,
                                chunk=C)
    B, H, Lq, d = q.shape
    S, dv, m = k.shape[2], v.shape[3], projection.shape[0]
    dev = q.device
    # the forward's operands (bf16: W as hi + lo): its statistics were computed with them
    kid, alpha, upcast, W, W_lo, split_w, has_mask, mask = _operands(q, projection, kernel_fn,
                                                                     scale, key_padding_mask)
    M_PAD, D_PAD, DV_PAD = _pow2(m), _pow2(d), _pow2(dv)
    block_f = min(M_PAD, block_f or p["block_f"])
    NF = M_PAD // block_f
    BH = B * H
    f32 = torch.float32
    dq = torch.empty((B, H, Lq, d), device=dev, dtype=q.dtype)
    dk = torch.empty((B, H, S, d), device=dev, dtype=k.dtype)
    dvo = torch.empty((B, H, S, dv), device=dev, dtype=v.dtype)
    if _INTERPRET:
        for t in (dq, dk, dvo):
            t.fill_(float("nan"))  # an element the kernels fail to write fails the checks
    meta = dict(KERNEL=kid, HAS_MASK=has_mask, UPCAST=upcast, SPLIT_W=split_w, TF32=bool(tf32),
                M_PAD=M_PAD, D_PAD=D_PAD, DV_PAD=DV_PAD, BLOCK_F=block_f, C=C, num_stages=stages)
    # ---- the forward's key states: prefix states at segment starts (causal) / total (non-causal)
    kblock = C if causal else 64
    if causal and seg is not None:
        kseg = -(-seg // C) * C
        nk = -(-S // kseg)
    else:
        kseg, nk = _splits(BH if causal else BH * NF, S, kblock, dev, 4 * kblock)
    P = torch.empty((BH, nk, M_PAD, DV_PAD), device=dev, dtype=f32)
    Z = torch.empty((BH, nk, M_PAD), device=dev, dtype=f32)
    MX = torch.empty((BH, nk, NF), device=dev, dtype=f32)
    _launcher(_kv_state_kernel)[(NF, BH, nk)](
        k, v, W, W_lo, mask, P, Z, MX, MX,
        H, S, m, d, dv, kseg,
        *k.stride(), *v.stride(), *W.stride(), *mask.stride(),
        alpha,
        KERNEL=kid, HAS_MASK=has_mask, UPCAST=upcast,
        M_PAD=M_PAD, D_PAD=D_PAD, DV_PAD=DV_PAD, BLOCK_F=block_f, BLOCK_N=kblock,
        SAVE_KAPPA=False, SPLIT_W=split_w, num_warps=4)
    merge_meta = dict(M_PAD=M_PAD, DV_PAD=DV_PAD, BLOCK_F=block_f, NF=NF, NF_PAD=_pow2(NF, 2),
                      num_warps=4)
    RP = torch.empty((BH, nk), device=dev, dtype=f32)
    if causal:
        _launcher(_merge_kernel)[(BH, NF)](P, Z, MX, RP, P, Z, nk, PREFIX=True, **merge_meta)
        ST, ZT, st_bh, st_sg = P, Z, nk, 1
        qseg, nq = kseg, nk
    else:
        ST = torch.empty((BH, M_PAD, DV_PAD), device=dev, dtype=f32)
        ZT = torch.empty((BH, M_PAD), device=dev, dtype=f32)
        _launcher(_merge_kernel)[(BH, NF)](P, Z, MX, MX, ST, ZT, nk, PREFIX=False, **merge_meta)
        st_bh, st_sg = 1, 0
        if seg is not None:
            qseg = -(-seg // C) * C
            nq = -(-Lq // qseg)
        else:
            qseg, nq = _splits(BH, Lq, C, dev, 4 * C)
    # ---- dq, per-row statistics, per-segment phi_q^T G
    LROW = nq * qseg
    ROWS = torch.empty((BH, 4, LROW) if causal else (1, 4), device=dev, dtype=f32)
    PI = torch.empty((BH, nq, M_PAD, DV_PAD), device=dev, dtype=f32)
    PZ = torch.empty((BH, nq, M_PAD), device=dev, dtype=f32)
    has_stats = stats is not None
    if not has_stats:
        out, stats = go, RP  # never read (read-only stand-ins: nothing aliases an output)
    _launcher(_bwd_q_kernel)[(BH, nq)](
        q, k, v, go, W, W_lo, mask, ST, ZT, RP, PI, PZ, ROWS, dq, out, stats,
        H, Lq, m, d, dv, qseg, LROW, st_bh, st_sg,
        *q.stride(), *k.stride(), *v.stride(), *go.stride(), *W.stride(), *mask.stride(),
        *dq.stride(), *out.stride(),
        alpha, CAUSAL=causal, HAS_STATS=has_stats, num_warps=q_warps, **meta)
    # ---- suffix states, then dk, dv
    if causal:
        _launcher(_suffix_kernel)[(BH, NF)](PI, PZ, RP, nq, M_PAD=M_PAD, DV_PAD=DV_PAD,
                                            BLOCK_F=block_f, num_warps=4)
        PS, PSZ, ps_bh, ps_sg, kseg2, nk2 = PI, PZ, nq, 1, qseg, nq
        MK = RP
    else:
        PS, PSZ = PI.sum(1), PZ.sum(1)  # queries carry no shared reference: a plain sum
        ps_bh, ps_sg = 1, 0
        kseg2, nk2 = C, triton.cdiv(S, C)  # no state to carry: one chunk per program
        # keys at the reference of the merged total state: the max over all splits and blocks
        MK = MX.reshape(BH, -1).amax(1).contiguous()
    _launcher(_bwd_k_kernel)[(BH, nk2)](
        q, k, v, go, W, W_lo, mask, PS, PSZ, MK, ROWS, dk, dvo,
        H, S, m, d, dv, kseg2, LROW, ps_bh, ps_sg,
        *q.stride(), *k.stride(), *v.stride(), *go.stride(), *W.stride(), *mask.stride(),
        *dk.stride(), *dvo.stride(),
        alpha, CAUSAL=causal, num_warps=k_warps, **meta)
    return dq, dk, dvo


def _causal_backward(go, q, k, v, projection, kernel_fn, scale, key_padding_mask, out, stats, *,
                     seg, block_f, q_warps, k_warps, stages, tf32, chunk):
    """Causal (dq, dk, dv), every chunk independent (as the forward's chunk outputs):
        dq:     the forward's chunk-start states (recomputed: ``causal_chunk_states``), then
                ``_dq_chunk_kernel`` per chunk (also writes 1/den and (g.o)/den per row);
        dk, dv: per segment sum_t phi_q^T G (``_q_increment_kernel``), a reverse scan over the
                segments (``_suffix_kernel``), a reverse chunk walk per segment writing the
                suffix state after every chunk (``_suffix_state_kernel``), then
                ``_dkdv_chunk_kernel`` per chunk.
    ``out`` and ``stats`` are the forward's (``_forward(stats=...)``)."""
    ta = _ta()
    B, H, L, d = q.shape
    dv, m = v.shape[3], projection.shape[0]
    dev, BH, f32 = q.device, B * H, torch.float32
    ops = _operands(q, projection, kernel_fn, scale, key_padding_mask)
    kid, alpha, upcast, W, W_lo, split_w, has_mask, mask = ops
    M_PAD, D_PAD, DV_PAD = _pow2(m), _pow2(d), _pow2(dv)
    HS, HZ, HR, _kap = ta.causal_chunk_states(q, k, v, ops, m, chunk=chunk)
    nchunk = HS.shape[1]
    dq = torch.empty((B, H, L, d), device=dev, dtype=q.dtype)
    dk = torch.empty((B, H, L, d), device=dev, dtype=k.dtype)
    dvo = torch.empty((B, H, L, dv), device=dev, dtype=v.dtype)
    if _INTERPRET:
        for t in (dq, dk, dvo):
            t.fill_(float("nan"))  # an element the kernels fail to write fails the checks
    ROWS = torch.empty((BH, 2, L), device=dev, dtype=f32)
    meta = dict(KERNEL=kid, UPCAST=upcast, SPLIT_W=split_w, TF32=bool(tf32), M_PAD=M_PAD,
                D_PAD=D_PAD, DV_PAD=DV_PAD, C=chunk)
    chunk_meta = dict(meta, HAS_MASK=has_mask, BLOCK_F=block_f, num_stages=stages)
    strides = (*q.stride(), *k.stride(), *v.stride(), *go.stride())
    _launcher(_dq_chunk_kernel)[(nchunk, BH)](
        q, k, v, go, out, W, W_lo, mask, stats, HS, HZ, HR, ROWS, dq,
        H, L, m, d, dv, nchunk, *strides, *out.stride(), *W.stride(), *mask.stride(),
        *dq.stride(), alpha, num_warps=q_warps, **chunk_meta)
    del HS, HZ, HR, _kap
    # ---- the key side's suffix states: per segment, scan, per chunk
    sblock_f = min(M_PAD, 64)
    NFS = M_PAD // sblock_f
    if seg is None:
        seg, nseg = _splits(BH * NFS, L, chunk, dev, 4 * chunk, per_sm=4)
    else:
        seg = -(-seg // chunk) * chunk
        nseg = -(-L // seg)
    # segment g's reference: the key running max before it (M at row g·seg - 1)
    RPB = torch.full((BH, nseg), -2.0e38 if kid == 0 else 0.0, device=dev, dtype=f32)
    if kid == 0 and nseg > 1:
        RPB[:, 1:] = stats[:, 2, seg - 1:(nseg - 1) * seg:seg]
    PI = torch.empty((BH, nseg, M_PAD, DV_PAD), device=dev, dtype=f32)
    PZ = torch.empty((BH, nseg, M_PAD), device=dev, dtype=f32)
    side = (q, go, W, W_lo, stats, ROWS)
    side_strides = (*q.stride(), *go.stride(), *W.stride())
    _launcher(_q_increment_kernel)[(NFS, BH, nseg)](
        *side, RPB, PI, PZ, H, L, m, d, dv, seg, *side_strides, alpha,
        BLOCK_F=sblock_f, num_warps=4, **meta)
    _launcher(_suffix_kernel)[(BH, NFS)](PI, PZ, RPB, nseg, M_PAD=M_PAD, DV_PAD=DV_PAD,
                                         BLOCK_F=sblock_f, num_warps=4)
    HP = torch.empty((BH, nchunk, M_PAD, DV_PAD), device=dev,
                     dtype=f32 if q.dtype == torch.float32 else torch.bfloat16)
    HPZ = torch.empty((BH, nchunk, M_PAD), device=dev, dtype=f32)
    HPR = torch.empty((BH, nchunk), device=dev, dtype=f32)
    _launcher(_suffix_state_kernel)[(NFS, BH, nseg)](
        *side, PI, PZ, HP, HPZ, HPR, H, L, m, d, dv, seg, nchunk, *side_strides, alpha,
        BLOCK_F=sblock_f, num_warps=4, **meta)
    _launcher(_dkdv_chunk_kernel)[(nchunk, BH)](
        q, k, v, go, W, W_lo, mask, stats, ROWS, HP, HPZ, HPR, dk, dvo,
        H, L, m, d, dv, nchunk, *strides, *W.stride(), *mask.stride(), *dk.stride(),
        *dvo.stride(), alpha, num_warps=k_warps, **chunk_meta)
    return dq, dk, dvo


def _stats_ok(stats, q):
    return stats is not None and tuple(stats.shape) == (q.shape[0] * q.shape[1], 3, q.shape[2])


@torch.library.triton_op("panther::rf_attention_triton_backward", mutates_args=())
def rf_attention_triton_backward_op(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor,
                                    projection: Tensor, kernel_fn: str, causal: bool,
                                    scale: Optional[float], key_padding_mask: Optional[Tensor],
                                    out: Optional[Tensor] = None, stats: Optional[Tensor] = None
                                    ) -> Tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of ``panther::rf_attention`` (no projection gradient): the fused Triton kernels
    where ``kernel_ok`` holds (causal calls only when ``backward_params["causal"]``), else the C++
    ``panther::rf_attention_backward``. ``out`` and
    ``stats`` are the forward's output and per-row statistics (``rf_attention_triton_train``);
    without them the kernels recompute what they need."""
    _check_rf(q, k, v, projection, kernel_fn, causal, scale, key_padding_mask)
    if tuple(grad_out.shape) != (q.shape[0], q.shape[1], q.shape[2], v.shape[3]):
        raise ValueError("rf_attention_triton_backward: grad_out must have shape (B, H, Lq, dv)")
    if _fused_serves(q, k, v, projection, key_padding_mask, causal):
        if not (_stats_ok(stats, q) and out is not None and out.shape == grad_out.shape):
            out = stats = None
        return _backward(grad_out, q, k, v, projection, kernel_fn, causal, scale, key_padding_mask,
                         out, stats)
    dq, dk, dv, _ = torch.ops.panther.rf_attention_backward(
        grad_out, q, k, v, projection, kernel_fn, causal, scale, key_padding_mask, False)
    return dq, dk, dv


def fused_backward_enabled(causal: bool) -> bool:
    """Whether calls of this causality take the fused backward at all (causal ones are opt-in)."""
    return backward_params["causal"] or not causal


def _fused_serves(q, k, v, projection, key_padding_mask, causal):
    return kernel_ok(q, k, v, projection, key_padding_mask) and fused_backward_enabled(causal)


def _fused_or_cpp(ctx, grad, q, k, v, projection, key_padding_mask, out=None, stats=None):
    need = ctx.needs_input_grad
    if not any(need[:4]):
        return (None,) * 8
    if need[3] or not _fused_serves(q, k, v, projection, key_padding_mask, ctx.causal):
        # the C++ backward, which also gives the projection's gradient
        dq, dk, dv, dp = torch.ops.panther.rf_attention_backward(
            grad.contiguous(), q, k, v, projection, ctx.kernel_fn, ctx.causal, ctx.scale,
            key_padding_mask, bool(need[3]))
    else:
        dq, dk, dv = torch.ops.panther.rf_attention_triton_backward(
            grad, q, k, v, projection, ctx.kernel_fn, ctx.causal, ctx.scale, key_padding_mask,
            out, stats)
        dp = None
    return (dq if need[0] else None, dk if need[1] else None, dv if need[2] else None,
            dp if need[3] else None, None, None, None, None)


def autograd_backward(ctx, grad):
    """Autograd of ``panther::rf_attention_triton`` (saves its inputs only): the Triton backward
    (recomputing num / den) when the kernels serve the call and the projection needs no gradient,
    else the C++ backward (which also gives dW)."""
    q, k, v, projection, key_padding_mask = ctx.saved_tensors
    return _fused_or_cpp(ctx, grad, q, k, v, projection, key_padding_mask)


@torch.library.triton_op("panther::rf_attention_triton_train", mutates_args=())
def rf_attention_triton_train_op(q: Tensor, k: Tensor, v: Tensor, projection: Tensor,
                                 kernel_fn: str, causal: bool, scale: Optional[float],
                                 key_padding_mask: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """``panther::rf_attention_triton`` plus the per-row statistics its fused backward reuses:
    ``(out, stats)`` with ``stats`` (B·H, 3, Lq) fp32 = den, query shift, key running max, or
    empty where the C++ op serves the call. ``rf_attention_triton`` calls this when a gradient
    is needed."""
    _check_rf(q, k, v, projection, kernel_fn, causal, scale, key_padding_mask)
    if kernel_ok(q, k, v, projection, key_padding_mask):
        B, H, Lq = q.shape[:3]
        stats = torch.empty((B * H, 3, Lq), device=q.device, dtype=torch.float32)
        if kernel_fn == "relu" or not causal:
            stats.zero_()  # rows the kernels leave unwritten (relu shifts, non-causal M)
        out = _ta()._forward(q, k, v, projection, kernel_fn, causal, scale, key_padding_mask,
                             stats=stats)
        return out, stats
    out = torch.ops.panther.rf_attention(q, k, v, projection, kernel_fn, causal, scale,
                                         key_padding_mask)
    return out, q.new_empty((0,), dtype=torch.float32)


def _ta():
    from inductor_ext import triton_attention
    return triton_attention


def _train_setup_context(ctx, inputs, output):
    q, k, v, projection, kernel_fn, causal, scale, key_padding_mask = inputs
    out, stats = output
    ctx.mark_non_differentiable(stats)
    ctx.save_for_backward(q, k, v, projection, key_padding_mask, out, stats)
    ctx.kernel_fn, ctx.causal, ctx.scale = kernel_fn, causal, scale


def _train_backward(ctx, grad, _grad_stats):
    q, k, v, projection, key_padding_mask, out, stats = ctx.saved_tensors
    if grad is None:
        return (None,) * 8
    if not _stats_ok(stats, q):
        out = stats = None
    return _fused_or_cpp(ctx, grad, q, k, v, projection, key_padding_mask, out, stats)


torch.library.register_autograd("panther::rf_attention_triton_train", _train_backward,
                                setup_context=_train_setup_context)
