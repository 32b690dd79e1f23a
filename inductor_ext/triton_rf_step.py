"""One generated token of causal random-feature attention in one kernel: ``panther::rf_attention_token``.

A decoding step (``panther.ops.attention.rf_attention_step`` with one new position) maps the token's
query and key to their features, rescales the state's running sums to the keys' new shift, adds the key's
``φ(k) vᵀ`` and ``φ(k)`` and reads the output ``φ(q)·kv / φ(q)·k_sum``. Written in torch ops that is about
forty launches over a few KiB each: the step's time is launch overhead. The kernel does it in one
launch per call, one program per (batch · head, block of value columns), reading the ``(m, dv)`` sums
once and writing them once (fp32), whatever the number of positions before.

Registered as ``torch.library.triton_op`` (no autograd: a decoding step runs without gradients; off the
kernel's devices its body is the torch step).
:func:`rf_attention_step_triton` takes the op where it serves the call (CUDA, or CPU under
``TRITON_INTERPRET=1``; one position; fp16 / bf16 / fp32; ``d, dv <= 128``, ``m <= 256``; nothing
needing a gradient) and ``rf_attention_step`` otherwise.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

import panther  # noqa: F401  (loads the native ops)
from panther.ops.attention import RFState, _check_rf, _start, rf_attention_step

from .triton_attention import _DTYPES, _INTERPRET, MAX_FEATURES, MAX_HEAD_DIM, _launcher, _pow2

try:  # Triton is optional: without it every call takes the torch step.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

__all__ = ["rf_attention_step_triton"]

BLOCK_M = 64   # features per pass (the exponents of a (BLOCK_M, d) block of W at a time)
BLOCK_V = 32   # value columns per program


def _kernel_device(x):
    return triton is not None and (x.device.type == "cuda" or (_INTERPRET and x.device.type == "cpu"))


def kernel_ok(q, k, v, projection, state):
    """Whether the kernel serves this step (else ``rf_attention_step`` does)."""
    if q.dtype not in _DTYPES or q.shape[2] != 1:
        return False
    if not _kernel_device(q):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, projection, *state[:3])):
        return False
    return q.shape[3] <= MAX_HEAD_DIM and v.shape[3] <= MAX_HEAD_DIM and projection.shape[0] <= MAX_FEATURES


if triton is not None:
    @triton.jit
    def _token_kernel(Q, K, V, W, KV, KSUM, SHIFT, PAD, OUT, KV_NEW, KSUM_NEW, SHIFT_NEW,
                      H, d, dv, m, a, inv_sqrt_m,
                      SOFTMAX: tl.constexpr, HAS_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
                      BLOCK_M: tl.constexpr, M_BLOCKS: tl.constexpr, BLOCK_V: tl.constexpr):
        bh = tl.program_id(0)
        vb = tl.program_id(1)
        offs_d = tl.arange(0, BLOCK_D)
        in_d = offs_d < d
        offs_v = vb * BLOCK_V + tl.arange(0, BLOCK_V)
        in_v = offs_v < dv
        q = tl.load(Q + bh * d + offs_d, mask=in_d, other=0.0).to(tl.float32) * a
        k = tl.load(K + bh * d + offs_d, mask=in_d, other=0.0).to(tl.float32) * a
        v = tl.load(V + bh * dv + offs_v, mask=in_v, other=0.0).to(tl.float32)
        visible = True
        if HAS_PAD:
            visible = tl.load(PAD + bh // H) == 0
        old = tl.load(SHIFT + bh)
        new = old
        at = 0.0
        factor = 1.0
        q_max = 0.0
        q_half = tl.sum(q * q, 0) / 2
        k_half = tl.sum(k * k, 0) / 2
        if SOFTMAX:
            # pass 1: the query's largest exponent (its shift cancels in its row) and the key's, which
            # joins the shift of the keys seen before
            q_max = float("-inf")
            k_max = float("-inf")
            for i in tl.static_range(M_BLOCKS):
                offs_m = i * BLOCK_M + tl.arange(0, BLOCK_M)
                in_m = offs_m < m
                w = tl.load(W + offs_m[:, None] * d + offs_d[None, :], mask=in_m[:, None] & in_d[None, :],
                            other=0.0).to(tl.float32)
                q_max = tl.maximum(q_max, tl.max(tl.where(in_m, tl.sum(w * q[None, :], 1) - q_half, float("-inf")), 0))
                k_max = tl.maximum(k_max, tl.max(tl.where(in_m, tl.sum(w * k[None, :], 1) - k_half, float("-inf")), 0))
            new = tl.where(visible, tl.maximum(old, k_max), old)
            at = tl.where(new == float("-inf"), 0.0, new)   # no key seen yet: the sums are zeros
            factor = tl.exp(old - at)
        num = tl.zeros((BLOCK_V,), dtype=tl.float32)
        den = 0.0
        owned = tl.where(vb == 0, m, 0)   # the first column block stores k_sum and the shift
        for i in tl.static_range(M_BLOCKS):
            offs_m = i * BLOCK_M + tl.arange(0, BLOCK_M)
            in_m = offs_m < m
            w = tl.load(W + offs_m[:, None] * d + offs_d[None, :], mask=in_m[:, None] & in_d[None, :],
                        other=0.0).to(tl.float32)
            uq = tl.sum(w * q[None, :], 1)
            uk = tl.sum(w * k[None, :], 1)
            if SOFTMAX:
                fq = tl.exp(uq - q_half - q_max)
                fk = tl.exp(uk - k_half - at) * inv_sqrt_m
            else:
                fq = tl.maximum(uq, 0.0)
                fk = tl.maximum(uk, 0.0) * inv_sqrt_m
            fq = tl.where(in_m, fq, 0.0)
            fk = tl.where(in_m & visible, fk, 0.0)
            cell = bh * m * dv + offs_m[:, None] * dv + offs_v[None, :]
            in_mv = in_m[:, None] & in_v[None, :]
            kv = tl.load(KV + cell, mask=in_mv, other=0.0) * factor + fk[:, None] * v[None, :]
            tl.store(KV_NEW + cell, kv, mask=in_mv)
            num += tl.sum(fq[:, None] * kv, 0)
            ks = tl.load(KSUM + bh * m + offs_m, mask=in_m, other=0.0) * factor + fk
            tl.store(KSUM_NEW + bh * m + offs_m, ks, mask=offs_m < owned)
            den += tl.sum(fq * ks, 0)
        out = num / tl.where(den == 0.0, 1.0, den)   # a query that sees no key: 0
        tl.store(OUT + bh * dv + offs_v, out.to(OUT.dtype.element_ty), mask=in_v)
        tl.store(SHIFT_NEW + bh, new, mask=owned > 0)


def _token(q: Tensor, k: Tensor, v: Tensor, projection: Tensor, kernel_fn: str, scale: Optional[float],
                       key_padding_mask: Optional[Tensor], kv: Tensor, k_sum: Tensor,
                       shift: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One position of ``rf_attention_step``: ``(out, kv, k_sum, shift)`` of the step from the state
    ``(kv, k_sum, shift)``; q, k ``(B, H, 1, d)``, v ``(B, H, 1, dv)``, ``key_padding_mask`` ``(B, 1)``."""
    if not _kernel_device(q):
        out, state = rf_attention_step(q, k, v, projection, kernel_fn, scale, key_padding_mask,
                                       RFState(kv, k_sum, shift, 0))
        return out, state.kv, state.k_sum, state.shift.clone()   # relu's is the input: an op's outputs never alias
    return _launch(_launcher(_token_kernel), q, k, v, projection, kernel_fn, scale, key_padding_mask, kv, k_sum, shift)


def _launch(kernel, q, k, v, projection, kernel_fn, scale, key_padding_mask, kv, k_sum, shift):
    B, H, _, d = q.shape
    dv, m = v.shape[3], projection.shape[0]
    out = torch.empty_like(v, memory_format=torch.contiguous_format)
    kv_new, k_sum_new, shift_new = torch.empty_like(kv), torch.empty_like(k_sum), torch.empty_like(shift)
    softmax = kernel_fn == "softmax"
    a = math.sqrt(scale if scale is not None else 1.0 / math.sqrt(d)) if softmax else 1.0
    pad = key_padding_mask.to(torch.uint8).contiguous() if key_padding_mask is not None else q
    # Plain int arithmetic: triton.cdiv / next_power_of_2 are ConstexprFunctions in triton 3.9, 2.1 µs a call here
    # against 0.02 (benchmarks.md, thirty-fourth session)
    kernel[(B * H, -(-dv // BLOCK_V))](
        q.contiguous(), k.contiguous(), v.contiguous(), projection.contiguous(), kv.contiguous(), k_sum.contiguous(),
        shift.contiguous(), pad, out, kv_new, k_sum_new, shift_new, H, d, dv, m, a, 1.0 / math.sqrt(m),
        SOFTMAX=softmax, HAS_PAD=key_padding_mask is not None, BLOCK_D=_pow2(d),
        BLOCK_M=BLOCK_M, M_BLOCKS=_pow2(m, BLOCK_M) // BLOCK_M, BLOCK_V=BLOCK_V, num_warps=4)
    return out, kv_new, k_sum_new, shift_new


rf_attention_token = torch.library.triton_op("panther::rf_attention_token", mutates_args=())(_token)


def rf_attention_step_triton(q, k, v, projection, kernel_fn="softmax", scale=None, key_padding_mask=None,
                             state=None):
    """``panther.ops.attention.rf_attention_step`` with a one-position step in one Triton kernel where it
    serves the call (``kernel_ok``); same arguments and result."""
    _check_rf(q, k, v, projection, kernel_fn, True, scale, key_padding_mask)
    state, _ = _start(state, v, projection, kernel_fn)   # checked (the kernel's inputs: fp32 sums)
    if not kernel_ok(q, k, v, projection, state):
        return rf_attention_step(q, k, v, projection, kernel_fn, scale, key_padding_mask, state)
    args = (q, k, v, projection, kernel_fn, scale, key_padding_mask, *state[:3])
    if torch.compiler.is_compiling():   # the op, which Inductor inlines
        out, kv, k_sum, shift = torch.ops.panther.rf_attention_token(*args)
    else:   # eager: the kernel itself, without the op's dispatch and wrap_triton's (CPU time per token)
        out, kv, k_sum, shift = _launch(_token_kernel, *args)
    return out, RFState(kv, k_sum, shift, state.length + 1)
