"""Random-feature attention ops: fake kernels, autograd and plain-torch references.

Ops (schemas and ATen kernels in ``csrc/rf_attention.cpp``):

``torch.ops.panther.rf_attention(q, k, v, projection, kernel_fn, causal, scale, key_padding_mask)``
    q ``(B, H, Lq, d)``, k ``(B, H, S, d)``, v ``(B, H, S, dv)``, projection ``(m, d)`` random
    features, ``kernel_fn`` in ``{"softmax", "relu"}``, ``scale`` the logit scale (None means
    ``1/sqrt(d)``), ``key_padding_mask`` ``(B, S)`` bool with True = ignore that key.
    Returns ``(B, H, Lq, dv)``. ``causal=True`` needs ``Lq == S``.

    * softmax: FAVOR+ positive features ``phi(x)_j = exp(w_j.x' - |x'|^2/2) / sqrt(m)`` with
      ``x' = x * scale**0.5``, so that ``E[phi(q).phi(k)] = exp(scale * q.k)``;
    * relu: ``phi(x) = relu(x W^T) / sqrt(m)``, an unbiased estimate of the order-1 arc-cosine
      kernel (``scale`` has no effect: the kernel is homogeneous and cancels in the normalisation);
    * output ``(phi(Q) phi(K)^T ⊙ M) V / rowsum`` computed in linear time (ones column on V,
      chunked prefix states when causal). A query that sees no key with positive weight (all
      keys masked) returns 0.

``torch.ops.panther.srpe_filter(x, omega, weight)``
    ``out[b,n,h,r] = sum_{i,j} x[b,n,h,i] omega[n,h,i,j] weight[h,i,j,r]``: the sine-SRPE
    contraction of queries/keys with their positional codes, without building the codes for
    every batch element.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch


__all__ = [
    "RFState",
    "dropped_keys",
    "rf_attention",
    "rf_attention_step",
    "rf_attention_reference",
    "rf_causal_state",
    "rf_feature_maps",
    "sine_bases",
    "srpe_filter",
    "srpe_filter_reference",
    "srpe_filter_sines_chunked",
]

_KERNELS = ("softmax", "relu")


def rf_attention(q, k, v, projection, kernel_fn="softmax", causal=False, scale=None,
                 key_padding_mask=None):
    """Random-feature attention ``(φ(Q) φ(K)ᵀ ⊙ M) V / rowsum`` in time linear in the sequence length.

    Wrapper around ``torch.ops.panther.rf_attention``; the feature maps are given in
    :mod:`panther.ops.attention`.

    Args:
        q: queries ``(B, H, Lq, d)``.
        k: keys ``(B, H, S, d)``.
        v: values ``(B, H, S, dv)``.
        projection: random features ``(m, d)``, e.g. from
            :func:`panther.sketch.orthogonal_random_features`.
        kernel_fn: ``"softmax"`` (positive features, unbiased for ``exp(scale·q·k)``) or ``"relu"``.
        causal: each query attends only to keys at or before its position (needs ``Lq == S``).
        scale: logit scale; ``None`` means ``1/sqrt(d)``.
        key_padding_mask: optional bool ``(B, S)``, True = ignore that key.

    Returns:
        ``(B, H, Lq, dv)``; a query that sees no key (all masked) gets zeros.

    Raises:
        ValueError: an unknown ``kernel_fn``, inconsistent shapes, ``causal`` with ``Lq != S``, a bad
            ``scale`` or mask.
        TypeError: ``q``, ``k``, ``v`` of different or non-floating dtypes.
    """
    return torch.ops.panther.rf_attention(q, k, v, projection, kernel_fn, causal, scale,
                                          key_padding_mask)


def _positions(theta, start, length):
    """Positions ``start .. start + length - 1`` as ``(length, 1, 1, 1)`` in theta's dtype; ``start`` an int or a
    0-dim tensor (added on the device: a static state's position is never read back to the host)."""
    n = torch.arange(length, device=theta.device) + start
    return n.to(theta.dtype).view(length, 1, 1, 1)


def sine_bases(theta, phase, length, start=0):
    """The sine-SRPE bases ``omega[n, h, i, :] = [cos(theta n + phase), sin(theta n + phase)]``.

    Args:
        theta: angular frequencies ``(H, d, S)`` (radians per position).
        phase: phases ``(H, d, S)``, or None (keys: no phase).
        length: number of positions ``n = start .. start + length - 1``.
        start: the first position (an int, or a 0-dim integer tensor: a static decoding state's).

    Returns:
        ``(length, H, d, 2S)`` in theta's dtype: the ``S`` cosines, then the ``S`` sines.
    """
    ang = theta * _positions(theta, start, length)
    if phase is not None:
        ang = ang + phase
    return torch.cat([torch.cos(ang), torch.sin(ang)], dim=-1)


def srpe_filter(x, omega, weight):
    """``out[b, n, h, r] = Σ_{i, j} x[b, n, h, i] · omega[n, h, i, j] · weight[h, i, j, r]``.

    Wrapper around ``torch.ops.panther.srpe_filter``: the sine-SRPE contraction of queries or keys with
    their positional codes (:class:`panther.nn.sinSRPE`), without building the codes per batch element.

    Args:
        x: queries or keys ``(B, L, H, d)``.
        omega: sine bases ``(L, H, d, J)``.
        weight: mixing ``(H, d, J, R)``.

    Returns:
        ``(B, L, H, R)``.

    Raises:
        ValueError: inconsistent shapes.
        TypeError: arguments of different or non-floating dtypes.
    """
    return torch.ops.panther.srpe_filter(x, omega, weight)


# The sine-SRPE contraction with its bases built a block of positions at a time (CPU, float64, and
# what the Triton op does not serve): no step holds the bases of the whole sequence, (L, H, d, 2S)
# per queries and keys (2 GiB in bf16 at 65,536 positions, 16 heads, d = 64, 8 sines). A block
# holds this many bytes of bases: 4096 positions at 16 heads, d = 64, 8 sines (fp32).
SRPE_CHUNK_BYTES = 256 * 2 ** 20


def _srpe_blocks(theta, length):
    """Position ranges ``(n0, n1)`` of at most ``SRPE_CHUNK_BYTES`` of bases each (no positions:
    one empty range)."""
    H, d, S = theta.shape
    step = max(1, SRPE_CHUNK_BYTES // (H * d * 2 * S * theta.element_size()))
    return [(n0, min(length, n0 + step)) for n0 in range(0, max(length, 1), step)]


def srpe_filter_sines_forward(x, theta, phase, weight, start=0):
    """``srpe_filter(x, sine_bases(theta, phase, L, start), weight)`` with the bases built block by block
    (``SRPE_CHUNK_BYTES``), in x's dtype."""
    outs = [torch.ops.panther.srpe_filter(x[:, n0:n1],
                                          sine_bases(theta, phase, n1 - n0, start=start + n0).to(x.dtype),
                                          weight)
            for n0, n1 in _srpe_blocks(theta, x.shape[1])]
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


def srpe_filter_sines_backward(grad, x, theta, phase, weight, needs, start=0):
    """The gradients ``(dx, dtheta, dphase, dweight)`` of :func:`srpe_filter_sines_forward`, the
    bases rebuilt block by block; ``needs``: which of the four an autograd backward wants
    (``ctx.needs_input_grad``), the others None (dphase also None without a phase)."""
    S = theta.shape[2]
    need = [needs[0], needs[1] or needs[2], needs[3]]   # the C++ backward's: dx, d omega, dweight
    dx = torch.empty_like(x) if need[0] else None
    acc = torch.promote_types(weight.dtype, torch.float32)   # the weights' block sums: fp32 at least
    dw = torch.zeros(weight.shape, device=weight.device, dtype=acc) if need[2] else None
    dtheta = torch.zeros_like(theta) if need[1] else None
    dphase = torch.zeros_like(theta) if need[1] and phase is not None else None
    for n0, n1 in _srpe_blocks(theta, x.shape[1]):
        omega = sine_bases(theta, phase, n1 - n0, start=start + n0)
        dxc, dom, dwc = torch.ops.panther.srpe_filter_backward(
            grad[:, n0:n1].contiguous(), x[:, n0:n1], omega.to(x.dtype), weight, need)
        if dx is not None:
            dx[:, n0:n1] = dxc
        if dw is not None:
            dw += dwc
        if need[1]:
            # omega = [cos(a), sin(a)] with a = theta n + phase: d a = -sin(a) d cos + cos(a) d sin
            dom = dom.to(theta.dtype)
            dang = -omega[..., S:] * dom[..., :S] + omega[..., :S] * dom[..., S:]
            dtheta += (dang * _positions(theta, start + n0, n1 - n0)).sum(0)
            if dphase is not None:
                dphase += dang.sum(0)
    return (dx, dtheta if needs[1] else None, dphase if needs[2] else None,
            dw.to(weight.dtype) if dw is not None else None)


class _SrpeSinesBlocks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, theta, phase, weight, start):
        ctx.save_for_backward(x, theta, phase, weight)
        ctx.has_phase, ctx.start = phase is not None, start
        return srpe_filter_sines_forward(x, theta, phase, weight, start)

    @staticmethod
    def backward(ctx, grad):
        x, theta, phase, weight = ctx.saved_tensors
        return srpe_filter_sines_backward(grad, x, theta, phase if ctx.has_phase else None, weight,
                                          ctx.needs_input_grad[:4], ctx.start) + (None,)


def srpe_filter_sines_chunked(x, theta, phase, weight, start=0):
    """The sine-SRPE contraction ``srpe_filter(x, sine_bases(theta, phase, L, start), weight)`` with the
    bases built a block of positions at a time, forward and backward, so that memory does not grow
    with the bases of the whole sequence. :meth:`panther.nn.sinSRPE.filter` takes it where the
    fused Triton op (bases built on chip) does not serve the call.

    Args:
        x: queries or keys ``(B, L, H, d)``.
        theta: angular frequencies ``(H, d, S)``.
        phase: phases ``(H, d, S)`` in theta's dtype, or None.
        weight: mixing ``(H, d, 2S, R)`` in x's dtype.
        start: the position of ``x``'s first row (a decoding step's offset).

    Returns:
        ``(B, L, H, R)`` in x's dtype.
    """
    return _SrpeSinesBlocks.apply(x, theta, phase, weight, start)


# ------------------------------------------------------------------------------------------
# validation shared by the fake kernels (the C++ kernels raise the same errors)

def _check_rf(q, k, v, projection, kernel_fn, causal, scale, key_padding_mask):
    if kernel_fn not in _KERNELS:
        raise ValueError(f"rf_attention: kernel_fn must be 'softmax' or 'relu', got {kernel_fn!r}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"rf_attention: q, k, v must be 4-D (B, H, L, d); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[:2] != k.shape[:2] or q.shape[:2] != v.shape[:2]:
        raise ValueError("rf_attention: q, k, v must share batch and head sizes")
    if k.shape[3] != q.shape[3] or v.shape[2] != k.shape[2]:
        raise ValueError("rf_attention: k must be (B, H, S, d) and v (B, H, S, dv)")
    if projection.dim() != 2 or projection.shape[1] != q.shape[3] or projection.shape[0] < 1:
        raise ValueError(f"rf_attention: projection must be (m, d) with d = {q.shape[3]}")
    if not (q.dtype.is_floating_point and q.dtype == k.dtype == v.dtype):
        raise TypeError("rf_attention: q, k, v must share one floating dtype")
    if not projection.dtype.is_floating_point:
        raise TypeError("rf_attention: projection must be floating point")
    if causal and q.shape[2] != k.shape[2]:
        raise ValueError(f"rf_attention: causal=True requires equal query and key lengths; got "
                         f"Lq={q.shape[2]}, S={k.shape[2]}")
    if scale is not None and not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"rf_attention: scale must be a positive finite float or None, got {scale}")
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != (
                q.shape[0], k.shape[2]):
            raise ValueError("rf_attention: key_padding_mask must be a bool tensor of shape (B, S)")


@torch.library.register_fake("panther::rf_attention")
def _rf_attention_fake(q, k, v, projection, kernel_fn, causal, scale, key_padding_mask):
    _check_rf(q, k, v, projection, kernel_fn, causal, scale, key_padding_mask)
    return q.new_empty((q.shape[0], q.shape[1], q.shape[2], v.shape[3]))


@torch.library.register_fake("panther::rf_attention_backward")
def _rf_attention_backward_fake(grad_out, q, k, v, projection, kernel_fn, causal, scale,
                                key_padding_mask, projection_grad):
    _check_rf(q, k, v, projection, kernel_fn, causal, scale, key_padding_mask)
    # the kernel returns contiguous gradients whatever the input strides
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),
            projection.new_empty(projection.shape))


def _rf_setup_context(ctx, inputs, output):
    q, k, v, projection, kernel_fn, causal, scale, key_padding_mask = inputs
    ctx.save_for_backward(q, k, v, projection, key_padding_mask)
    ctx.kernel_fn, ctx.causal, ctx.scale = kernel_fn, causal, scale


def _rf_backward(ctx, grad):
    q, k, v, projection, key_padding_mask = ctx.saved_tensors
    need = ctx.needs_input_grad
    if not any(need[:4]):
        return (None,) * 8
    # the backward recomputes features and chunk states (the forward saves only its inputs)
    dq, dk, dv, dp = torch.ops.panther.rf_attention_backward(
        grad.contiguous(), q, k, v, projection, ctx.kernel_fn, ctx.causal, ctx.scale, key_padding_mask,
        bool(need[3]))
    return (dq if need[0] else None, dk if need[1] else None, dv if need[2] else None,
            dp if need[3] else None, None, None, None, None)


torch.library.register_autograd("panther::rf_attention", _rf_backward,
                                setup_context=_rf_setup_context)


def _check_srpe(x, omega, weight):
    if x.dim() != 4 or omega.dim() != 4 or weight.dim() != 4:
        raise ValueError("srpe_filter: expected x (B, L, H, d), omega (L, H, d, J), "
                         "weight (H, d, J, R)")
    B, L, H, d = x.shape
    if tuple(omega.shape[:3]) != (L, H, d) or tuple(weight.shape[:3]) != (H, d, omega.shape[3]):
        raise ValueError(f"srpe_filter: inconsistent shapes x {tuple(x.shape)}, omega "
                         f"{tuple(omega.shape)}, weight {tuple(weight.shape)}")
    if not (x.dtype.is_floating_point and x.dtype == omega.dtype == weight.dtype):
        raise TypeError("srpe_filter: x, omega, weight must share one floating dtype")


@torch.library.register_fake("panther::srpe_filter")
def _srpe_filter_fake(x, omega, weight):
    _check_srpe(x, omega, weight)
    return x.new_empty((x.shape[0], x.shape[1], x.shape[2], weight.shape[3]))


@torch.library.register_fake("panther::srpe_filter_backward")
def _srpe_filter_backward_fake(grad_out, x, omega, weight, output_mask):
    _check_srpe(x, omega, weight)
    return x.new_empty(x.shape), omega.new_empty(omega.shape), weight.new_empty(weight.shape)


def _srpe_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _srpe_backward(ctx, grad):
    x, omega, weight = ctx.saved_tensors
    need = [bool(n) for n in ctx.needs_input_grad[:3]]
    if not any(need):
        return None, None, None
    dx, dom, dw = torch.ops.panther.srpe_filter_backward(grad, x, omega, weight, need)
    return (dx if need[0] else None, dom if need[1] else None, dw if need[2] else None)


torch.library.register_autograd("panther::srpe_filter", _srpe_backward,
                                setup_context=_srpe_setup_context)


def dropped_keys(v, p):
    """Attention dropout for random-feature attention: ``v`` ``(B, H, S, dv)`` with whole keys dropped, each with
    probability ``p`` (independently across batch, heads and keys; every query of a head loses the same ones), and
    the rest scaled by ``1 / (1 - p)``. Dropping value rows after the normalisation is fixed drops those columns of
    the normalised attention matrix, so the output is an unbiased estimate of the undropped one; random-feature
    attention has no per-(query, key) weights to drop one by one."""
    keep = torch.rand_like(v[..., :1], dtype=torch.float32) >= p
    return v * (keep.to(v.dtype) / (1.0 - p))


# ------------------------------------------------------------------------------------------
# decoding: causal random-feature attention carried from call to call by its running sums

class RFState(NamedTuple):
    """What causal random-feature attention keeps of the keys it has seen, whatever their number: per
    (batch, head), ``kv = Σ_j φ(k_j) v_jᵀ`` ``(B, H, m, dv)`` and ``k_sum = Σ_j φ(k_j)`` ``(B, H, m)`` in fp32
    (fp64 for fp64 inputs), the keys' shared softmax ``shift`` ``(B, H, 1, 1)`` both sums are taken at (zeros
    for relu; -inf while no key was seen), and ``length``, the positions seen (masked ones included): an int, or
    a 0-dim int64 tensor on the sums' device in a static state (``panther.nn.RandAttentionState.to_static``)."""
    kv: torch.Tensor
    k_sum: torch.Tensor
    shift: torch.Tensor
    length: int | torch.Tensor

    @classmethod
    def empty(cls, B, H, m, dv, kernel_fn, device, dtype=torch.float32):
        """The state before any position: zero sums, no shift yet (relu: none needed)."""
        like = dict(device=device, dtype=dtype)
        return cls(torch.zeros(B, H, m, dv, **like), torch.zeros(B, H, m, **like),
                   torch.full((B, H, 1, 1), 0.0 if kernel_fn == "relu" else float("-inf"), **like), 0)

    def index_select(self, index):
        """The state of the batch rows ``index`` (a beam search's reordering)."""
        return RFState(self.kv.index_select(0, index), self.k_sum.index_select(0, index),
                       self.shift.index_select(0, index), self.length)


# Positions worked through at a time: a step's queries attend within such a block ((n, n) per head), and
# a prompt's keys are summed in blocks of STATE_BLOCK, so that no call holds the features of them all
# ((B, H, L, m) in fp32: 1 GiB at 65,536 positions, 16 heads, m = 256).
STEP_BLOCK = 128
STATE_BLOCK = 4096


def _check_state(state, B, H, m, dv, ct):
    if not isinstance(state, RFState):
        raise TypeError(f"state must be a panther.ops.RFState or None, got {type(state).__name__}")
    if tuple(state.kv.shape) != (B, H, m, dv) or state.kv.dtype != ct:
        raise ValueError(f"state holds sums of shape {tuple(state.kv.shape)} ({state.kv.dtype}); these inputs "
                         f"need ({B}, {H}, {m}, {dv}) ({ct}): batch, heads, features or value width differ")


def _start(state, v, projection, kernel_fn):
    """``(state, compute dtype)``: ``state`` checked against these values, or the empty state for None."""
    ct = torch.float64 if v.dtype == torch.float64 else torch.float32
    B, H, _, dv = v.shape
    m = projection.shape[0]
    if state is None:
        state = RFState.empty(B, H, m, dv, kernel_fn, v.device, ct)
    _check_state(state, B, H, m, dv, ct)
    return state, ct


def _rebased(kv, k_sum, shift, k, projection, kernel_fn, scale, key_padding_mask):
    """For a block of keys ``k``: ``(kv, k_sum, shift, φ(k))``, the sums rescaled to the shift that also covers
    those keys (softmax), that shift, and the keys' features at it."""
    if kernel_fn == "relu":
        return kv, k_sum, shift, _key_features(k, projection, kernel_fn, None, key_padding_mask, None)
    uk = _exponents(k, projection, scale)
    new = torch.maximum(shift, _largest_visible(uk, key_padding_mask))
    at = torch.nan_to_num(new, neginf=0.0)   # -inf: no key seen yet, whose sums are zeros at any shift
    factor = torch.exp(shift - at)           # <= 1; exp(-inf) = 0 for empty sums
    return (kv * factor, k_sum * factor[..., 0], new,
            _key_features(k, projection, kernel_fn, at, key_padding_mask, uk))


def _absorbed(kv, k_sum, fk, v):
    """The running sums after keys of features ``fk`` ``(B, H, n, m)`` and their values ``v`` ``(B, H, n, dv)``."""
    return kv + fk.transpose(-2, -1) @ v, k_sum + fk.sum(-2)


def _span(t, sl):
    """Positions ``sl`` of q, k, v ``(B, H, L, d)`` or of a key padding mask ``(B, L)`` (None stays None)."""
    return None if t is None else t[:, :, sl] if t.dim() == 4 else t[:, sl]


def rf_causal_state(k, v, projection, kernel_fn="softmax", scale=None, key_padding_mask=None, state=None):
    """The :class:`RFState` after the keys ``k`` ``(B, H, L, d)`` and values ``v`` ``(B, H, L, dv)``, at the
    positions following ``state``'s (None: from the first). With :func:`rf_attention` ``causal=True`` over
    the same keys, this is a prompt's state; :func:`rf_attention_step` goes on from it."""
    _check_rf(k, k, v, projection, kernel_fn, True, scale, key_padding_mask)
    state, ct = _start(state, v, projection, kernel_fn)
    kv, k_sum, shift = state[:3]
    for t0 in range(0, k.shape[2], STATE_BLOCK):
        sl = slice(t0, t0 + STATE_BLOCK)
        vb = _span(v, sl).to(ct)
        kv, k_sum, shift, fk = _rebased(kv, k_sum, shift, _span(k, sl).to(ct), projection, kernel_fn, scale,
                                        _span(key_padding_mask, sl))
        kv, k_sum = _absorbed(kv, k_sum, fk, vb)
    return RFState(kv, k_sum, shift, state.length + k.shape[2])


def rf_attention_step(q, k, v, projection, kernel_fn="softmax", scale=None, key_padding_mask=None,
                      state=None):
    """Causal random-feature attention of ``L`` new positions (one token while generating) given the
    :class:`RFState` of the positions before them: ``(output (B, H, L, dv), the state after them)``.

    Time and memory per call grow with ``L`` only, not with the positions before: the output equals
    :func:`rf_attention` ``causal=True`` over the whole sequence at those rows (same features, up to
    rounding). Arguments as :func:`rf_attention`; ``key_padding_mask`` ``(B, L)`` covers the new keys.
    """
    _check_rf(q, k, v, projection, kernel_fn, True, scale, key_padding_mask)
    state, ct = _start(state, v, projection, kernel_fn)
    kv, k_sum, shift = state[:3]
    outs = []
    for t0 in range(0, q.shape[2], STEP_BLOCK):
        sl = slice(t0, t0 + STEP_BLOCK)
        vb = _span(v, sl).to(ct)
        kv, k_sum, shift, fk = _rebased(kv, k_sum, shift, _span(k, sl).to(ct), projection, kernel_fn, scale,
                                        _span(key_padding_mask, sl))
        fq = _query_features(_span(q, sl).to(ct), projection, kernel_fn, scale)
        a = (fq @ fk.transpose(-2, -1)).tril()   # within the block, causal
        num = fq @ kv + a @ vb
        den = fq @ k_sum.unsqueeze(-1) + a.sum(-1, keepdim=True)
        outs.append(num / torch.where(den == 0, torch.ones_like(den), den))   # sees no key: 0
        kv, k_sum = _absorbed(kv, k_sum, fk, vb)
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2) if outs else v.new_zeros(q.shape[:3] + v.shape[3:])
    return out.to(q.dtype), RFState(kv, k_sum, shift, state.length + q.shape[2])


# ------------------------------------------------------------------------------------------
# plain-torch references (test oracles: explicit quadratic attention over the same features)

def rf_feature_maps(q, k, projection, kernel_fn="softmax", scale=None, key_padding_mask=None):
    """``(phi(q), phi(k))`` of :func:`rf_attention` as tensors, ``(B, H, L, m)`` in q's dtype, for q, k
    ``(B, H, L, d)``: the feature maps written out in torch ops (``1/sqrt(m)`` included; masked keys'
    features 0).

    Softmax shifts: each query's by its largest exponent, the keys' of one (b, h) by one shared
    constant (their largest visible exponent); both cancel in the normalised output."""
    fq = _query_features(q, projection, kernel_fn, scale)
    if kernel_fn == "relu":
        return fq, _key_features(k, projection, kernel_fn, None, key_padding_mask, None)
    uk = _exponents(k, projection, scale)
    kshift = torch.nan_to_num(_largest_visible(uk, key_padding_mask), neginf=0.0)
    return fq, _key_features(k, projection, kernel_fn, kshift, key_padding_mask, uk)


def _exponents(x, projection, scale):
    """The softmax features' exponents ``w_j.x' - |x'|^2/2``, ``x' = x * scale**0.5``: ``(..., L, m)``."""
    m, d = projection.shape
    xs = x * math.sqrt(scale if scale is not None else 1.0 / math.sqrt(d))
    return xs @ projection.to(x.dtype).T - (xs * xs).sum(-1, keepdim=True) / 2


def _query_features(q, projection, kernel_fn, scale):
    """phi(q), each query's softmax exponents shifted by their largest (the shift cancels in its row)."""
    m = projection.shape[0]
    if kernel_fn == "relu":
        return torch.relu(q @ projection.to(q.dtype).T) / math.sqrt(m)
    uq = _exponents(q, projection, scale)
    return torch.exp(uq - uq.amax(-1, keepdim=True).detach()) / math.sqrt(m)


def _largest_visible(uk, key_padding_mask):
    """The largest exponent of the keys a (b, h) sees, ``(B, H, 1, 1)``, detached; -inf where it sees none."""
    if key_padding_mask is not None:
        uk = uk.masked_fill(key_padding_mask[:, None, :, None], float("-inf"))
    if not uk.shape[2]:
        return uk.new_full((*uk.shape[:2], 1, 1), float("-inf"))
    return uk.detach().amax(dim=(-2, -1), keepdim=True)


def _key_features(k, projection, kernel_fn, shift, key_padding_mask, exponents):
    """phi(k): relu's of ``k``, or softmax's from the keys' ``exponents`` (``_exponents``, which the caller
    needs for the shift too) and their shared ``shift`` (``(B, H, 1, 1)``); masked keys 0."""
    m = projection.shape[0]
    if kernel_fn == "relu":
        fk = torch.relu(k @ projection.to(k.dtype).T) / math.sqrt(m)
    else:
        fk = torch.exp(exponents - shift) / math.sqrt(m)
    return _masked(fk, key_padding_mask)


def _masked(fk, key_padding_mask):
    if key_padding_mask is None:
        return fk
    return fk.masked_fill(key_padding_mask[:, None, :, None], 0.0)


def rf_attention_reference(q, k, v, projection, kernel_fn="softmax", causal=False, scale=None,
                           key_padding_mask=None):
    """Explicit ``(phi(Q) phi(K)^T ⊙ M) V / rowsum`` with the op's feature maps, O(Lq·S) memory.

    The test oracle of :func:`rf_attention`: same arguments, result and errors.
    """
    _check_rf(q, k, v, projection, kernel_fn, causal, scale, key_padding_mask)
    out_dtype = q.dtype
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k, v = q.to(ct), k.to(ct), v.to(ct)
    fq, fk = rf_feature_maps(q, k, projection, kernel_fn, scale, key_padding_mask)
    A = fq @ fk.transpose(-2, -1)
    if causal:
        L = q.shape[2]
        A = A.masked_fill(torch.ones(L, L, dtype=torch.bool, device=A.device).triu(1), 0.0)
    den = A.sum(-1, keepdim=True)
    out = (A @ v) / torch.where(den == 0, torch.ones_like(den), den)
    return out.to(out_dtype)


def srpe_filter_reference(x, omega, weight):
    """``einsum('blhd,lhdj,hdjr->blhr')`` written out with the (L, H, d, R) codes materialised.

    The test oracle of :func:`srpe_filter` (same arguments and result; no argument checks).
    """
    codes = torch.einsum("lhdj,hdjr->lhdr", omega, weight)
    return torch.einsum("blhd,lhdr->blhr", x, codes)


# ------------------------------------------------------------------------------------------

