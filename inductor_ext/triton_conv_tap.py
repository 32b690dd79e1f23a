"""The "tap-GEMM" forward of ``panther::sketched_conv2d``: one wide dense GEMM, then one fused epilogue.

A conv to only R = 2·L·k channels is a poor GEMM (K = C_in·kh·kw long, N = R narrow). Here the
taps move from the GEMM's K dimension to its N dimension:

    stage 1 (cuBLAS):  U = X · A_all          X = x as (B·H·W, C_in) rows (a view of channels_last x),
                                              A_all (C_in, kh·kw·R), tap t = (i, j) in columns
                                              [t·R, (t+1)·R): A_all[:, t·R + r] = S1s[r, :, i, j]
    stage 2 (Triton):  T[p] = Σ_t U[input pixel of p under tap t, tap t's R columns]   (fp32)
                       out[p] = T[p] · Mix / (2L) + bias,   Mix = U1s as (R, C_out)

U holds every input pixel's contribution to every tap, so any stride / padding / dilation works
(taps landing in the zero padding contribute nothing and are masked). Stage 2 reads U once and
writes out once; it shares the channel-mix epilogue (``triton_conv._mix_store``) with the fused
kernels, T rounded once to the input dtype before it as there. U is stored in the input dtype
(rounded per tap, summed in fp32), so half-precision results differ from the fused kernels' in
the last bits.

Which calls take it: ``TAP_GEMM`` (read by ``panther::sketched_conv2d_triton``, hence by
``SKConv2d`` and the backend's kernel routing): "stride1" (default) for stride-1 channels_last
calls whose U is at most ``TAP_MAX_GROWTH`` times x's size, "always" for every channels_last call
``tap_ok`` accepts, "never". The backward is the op's (cuDNN ``convolution_backward``).
``tap_forward_torch`` is the same algorithm in plain torch (the CPU check of the tap bookkeeping).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import triton_conv as tc

__all__ = ["tap_weight", "tap_stage1", "tap_stage2", "tap_forward", "tap_forward_torch", "tap_ok",
           "use_tap", "tap_configs", "tuned_tap_configs", "TAP_GEMM", "TAP_GEMM_CHOICES", "TAP_MAX_GROWTH"]

TAP_GEMM = "stride1"
TAP_GEMM_CHOICES = ("never", "stride1", "always")
# U is kh·kw·R / C_in times x's size; past this the extra traffic (write U, read it back) is
# unlikely to beat the fused kernels (a guess, not measured).
TAP_MAX_GROWTH = 2

triton, tl = tc.triton, (tc.tl if tc.triton is not None else None)

if triton is not None:
    from .triton_conv import _mix_store  # the fused kernels' epilogue (a plain name for the JIT)

    @triton.jit
    def _tap_sum_mix_kernel(
        U, MIX, BIAS, OUT,
        P, C_OUT, H, W, HO, WO, R,
        sur, suc,
        smr, smn,
        son, soc, soh, sow,
        stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
        TWO_L,
        P_BUCKET,
        KH: tl.constexpr,
        KW: tl.constexpr,
        R_PAD: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        DOT_MIX: tl.constexpr,
        BLOCK_P: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        """OUT[p, :] = (Σ_t U[row(p, t), t·R:(t+1)·R] rounded to U's dtype)·MIX / TWO_L + BIAS.

        U (N·H·W, KH·KW·R) by strides; MIX (R_PAD, C_OUT), zero rows past R; OUT (N, C_OUT, HO, WO)
        by strides. Grid: (pixel blocks, column groups), as the fused kernels'.
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
        offs_r = tl.arange(0, R_PAD)
        r_cols = offs_r[None, :] * suc
        mask_r = offs_r[None, :] < R
        acc = tl.zeros((BLOCK_P, R_PAD), dtype=tl.float32)
        # unrolled: all taps' loads are independent, so they can all be in flight at once
        for t in tl.static_range(KH * KW):
            hi = h0 + (t // KW) * dil_h
            wi = w0 + (t % KW) * dil_w
            ok = mask_p & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)  # off-image taps: zero padding
            row = (n64 * H + hi) * W + wi  # int64: U can pass 2**31 elements
            u = tl.load(U + row[:, None] * sur + (t * R) * suc + r_cols, mask=ok[:, None] & mask_r, other=0.0)
            acc += u.to(tl.float32)
        z = acc.to(U.dtype.element_ty)
        o_row = n64 * son + ho.to(tl.int64) * soh + wo.to(tl.int64) * sow
        _mix_store(z, MIX, BIAS, OUT, o_row, mask_p, C_OUT, smr, smn, soc, 1.0 / TWO_L, pid_g,
                      R_PAD, HAS_BIAS, DOT_MIX, BLOCK_P, BLOCK_N)


# --------------------------------------------------------------------------------------------
# Launch configurations
# --------------------------------------------------------------------------------------------
# (BLOCK_P, BLOCK_N, num_warps, num_stages), best guess first (not yet measured); the autotuner
# tries the first _MAX_TAP_CONFIGS that fit. The bench times the full grid (tap_configs(grid=True)).
# Offline sm_90 compiles (bf16, 3x3, rank 32; no spills in the whole grid) guided the order: a
# gather kernel wants many loads in flight, so low register counts (more resident programs) first.
_TAP_CANDIDATES = (
    (128, 64, 8, 2),    # 94 regs: 2 programs (16 warps) / SM
    (64, 64, 4, 2),     # 94 regs: 5 programs (20 warps) / SM
    (128, 128, 8, 2),   # 153 regs
    (256, 64, 8, 2),    # 162 regs
    (64, 128, 8, 2),
    (32, 32, 4, 1),     # small ranks' last resort (R_PAD 256)
)
_MAX_TAP_CONFIGS = 4
_TAP_KEY = ["P_BUCKET", "C_OUT", "KH", "KW", "stride_h", "stride_w"]
_INTERPRET_TAP_CONFIG = {"BLOCK_P": 16, "BLOCK_N": 16}


def _fits(block_p, block_n, num_warps, num_stages, r_pad, elem_size):
    # The fused kernels' budget, whose mix phase is this kernel's; the unrolled tap loads are not
    # staged through shared memory, so phase 1 gets the smallest chunk (BLOCK_C = 16).
    return tc.config_fits(block_p, 16, block_n, num_warps, num_stages, r_pad, elem_size, r_pad)


def tap_configs(r_pad, elem_size, grid=False, limit=None):
    """Stage-2 configs as ``(BLOCK_P, BLOCK_N, num_warps, num_stages)`` tuples that fit Hopper's
    shared memory and the register budget: the production candidates (first ``limit``), or with
    ``grid`` the bench's grid (pixel block 64/128/256 × C_out tile 64/128/256 × 4/8 warps × 2/3
    stages)."""
    if grid:
        cands = [(bp, bn, w, s) for bp in (64, 128, 256) for bn in (64, 128, 256) for w in (4, 8) for s in (2, 3)]
    else:
        cands = _TAP_CANDIDATES
    out = [c for c in cands if _fits(*c, r_pad, elem_size)]
    return out if grid else out[:limit or _MAX_TAP_CONFIGS]


_AUTOTUNERS: dict = {}


def _autotuned(r_pad, elem_size):
    """One Autotuner per (rank padded, element size): a stable kernel object (Inductor's side table
    keys on it) whose configs fit that bucket."""
    key = (r_pad, elem_size)
    if key not in _AUTOTUNERS:
        if tc._INTERPRET:
            configs = [triton.Config(dict(_INTERPRET_TAP_CONFIG), num_warps=4, num_stages=1)]
        else:
            configs = [triton.Config({"BLOCK_P": bp, "BLOCK_N": bn}, num_warps=w, num_stages=s)
                       for bp, bn, w, s in tap_configs(r_pad, elem_size)]
        _AUTOTUNERS[key] = triton.autotune(configs=configs, key=_TAP_KEY)(_tap_sum_mix_kernel) if configs else None
    return _AUTOTUNERS[key]


def tuned_tap_configs():
    """``{(rank padded, element size): best stage-2 config}`` chosen so far by autotuning."""
    return {k: getattr(v, "best_config", None) for k, v in _AUTOTUNERS.items() if v is not None}


# --------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------
def tap_weight(S1s):
    """A_all (C_in, kh·kw·R): tap t = i·kw + j in columns [t·R, (t+1)·R), A_all[c, t·R + r] = S1s[r, c, i, j]
    (one small copy)."""
    R, C, kh, kw = S1s.shape
    return S1s.permute(1, 2, 3, 0).reshape(C, kh * kw * R)


def tap_stage1(x4, S1s):
    """U (N·H·W, kh·kw·R) = X · A_all, X the pixels as rows (a view for channels_last x)."""
    N, C, H, W = x4.shape
    return torch.mm(x4.permute(0, 2, 3, 1).reshape(N * H * W, C), tap_weight(S1s))


def _out_tensor(x4, N, C_out, Ho, Wo):
    # the C++ op's layout rule
    if tc._wants_channels_last(x4):
        return x4.new_empty((N, Ho, Wo, C_out)).permute(0, 3, 1, 2)
    return x4.new_empty((N, C_out, Ho, Wo))


def tap_stage2(U, x4, U1s, bias, stride, padding, dilation, kh, kw, *, config=None, col_groups=None, out=None):
    """Launch the stage-2 kernel on U (from ``tap_stage1(x4, ...)``; ``x4`` gives the geometry and the
    output layout). ``config`` (dict: BLOCK_P, BLOCK_N, optionally num_warps / num_stages) bypasses
    the autotuner; ``col_groups`` overrides the column-group heuristic; ``out`` is written into."""
    N, _, H, W = x4.shape
    two_l, k, C_out = U1s.shape
    R = two_l * k
    (sh, sw), (ph, pw), (dh, dw) = ([int(v) for v in a] for a in (stride, padding, dilation))
    Ho, Wo = tc._out_size(H, kh, sh, ph, dh), tc._out_size(W, kw, sw, pw, dw)
    if out is None:
        out = _out_tensor(x4, N, C_out, Ho, Wo)
    P = N * Ho * Wo
    if P == 0 or C_out == 0:
        return out
    r_pad = tc._rank_pad(R)
    MIX = tc._arrange_mix(U1s, r_pad)
    groups = col_groups if col_groups is not None else tc._column_groups(P, C_out, x4.device)
    consts = dict(KH=kh, KW=kw, R_PAD=r_pad, HAS_BIAS=bias is not None, DOT_MIX=tc._dot_modes(U.dtype)[1])
    args = (U, MIX, bias if bias is not None else U, out,
            P, C_out, H, W, Ho, Wo, R,
            U.stride(0), U.stride(1), MIX.stride(0), MIX.stride(1), *out.stride(),
            sh, sw, ph, pw, dh, dw,
            two_l, tc._p_bucket(P))

    def grid(meta):
        return (triton.cdiv(P, meta["BLOCK_P"]), groups)

    if config is not None:
        meta = dict(config)
        launch = {k: meta.pop(k) for k in ("num_warps", "num_stages") if k in meta}
        tc._launcher(_tap_sum_mix_kernel)[grid](*args, **consts, **meta, **launch)
    else:
        tc._launcher(_autotuned(r_pad, U.element_size()))[grid](*args, **consts)
    return out


def tap_forward(x4, S1s, U1s, bias, stride, padding, dilation, *, config=None, col_groups=None, out=None):
    """Both stages on a 4-D x (stage 1 copies x into rows unless it is channels_last)."""
    return tap_stage2(tap_stage1(x4, S1s), x4, U1s, bias, stride, padding, dilation, *S1s.shape[2:],
                      config=config, col_groups=col_groups, out=out)


def tap_forward_torch(x, S1s, U1s, bias=None, stride=1, padding=0, dilation=1):
    """The tap-GEMM algorithm in plain torch (4-D x, any device and dtype): stage 1 as above, stage 2
    as zero-padded strided slices of U summed over the taps (in fp32 at least), then the mix."""
    (sh, sw), (ph, pw), (dh, dw) = (tc._pair(a, name) for a, name in
                                    ((stride, "stride"), (padding, "padding"), (dilation, "dilation")))
    N, C, H, W = x.shape
    R, _, kh, kw = S1s.shape
    two_l, k, C_out = U1s.shape
    Ho, Wo = tc._out_size(H, kh, sh, ph, dh), tc._out_size(W, kw, sw, pw, dw)
    U = tap_stage1(x, S1s).view(N, H, W, kh * kw, R)
    U = F.pad(U, (0, 0, 0, 0, pw, pw, ph, ph))  # zero pixels around the image: the conv's padding
    T = torch.zeros(N, Ho, Wo, R, dtype=torch.promote_types(U.dtype, torch.float32), device=x.device)
    for i in range(kh):
        for j in range(kw):
            T += U[:, i * dh: i * dh + sh * (Ho - 1) + 1: sh, j * dw: j * dw + sw * (Wo - 1) + 1: sw, i * kw + j]
    y = (T.to(x.dtype) @ U1s.reshape(R, C_out)) / two_l
    if bias is not None:
        y = y + bias
    y = y.permute(0, 3, 1, 2)
    return y if tc._wants_channels_last(x) else y.contiguous()


def tap_ok(x, S1s, U1s, bias, stride, padding, dilation):
    """Whether the tap-GEMM path can serve the call: what the fused kernels take (``kernel_ok``:
    dtype, device or interpreter, rank, arguments) with a channels_last batch (X a free view)."""
    return (tc.kernel_ok(x, S1s, U1s, bias, stride, padding, dilation) and x.dim() == 4
            and x.is_contiguous(memory_format=torch.channels_last)
            and _autotuned(tc._rank_pad(S1s.shape[0]), x.element_size()) is not None)


def use_tap(x, S1s, U1s, bias, stride, padding, dilation):
    """Whether ``panther::sketched_conv2d_triton`` takes the tap-GEMM path (``TAP_GEMM``)."""
    if TAP_GEMM == "never" or not tap_ok(x, S1s, U1s, bias, stride, padding, dilation):
        return False
    R, C_in, kh, kw = S1s.shape
    return TAP_GEMM == "always" or (list(stride) == [1, 1] and kh * kw * R <= TAP_MAX_GROWTH * C_in)
