"""``panther::sketched_linear``: fake kernel, autograd formula and the plain-torch reference.

The forward kernels live in ``csrc/sketched_linear.cpp`` (two GEMMs over concatenated factors).
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["sketched_linear", "sketched_linear_reference", "concat_factors"]


def sketched_linear(x: Tensor, S1s: Tensor, S2s: Tensor, U1s: Tensor, U2s: Tensor, bias: Tensor | None = None):
    """``y = 1/(2L) Σ_i [(x S1_i) U1_i + (x U2_i) S2_i] + bias``: the sketched linear layer as one op.

    Calls ``torch.ops.panther.sketched_linear`` (two GEMMs over concatenated factors; CPU and CUDA,
    autocast, ``torch.compile`` and ``torch.export`` aware; differentiable in every tensor argument).

    Args:
        x: input ``(..., d_in)``.
        S1s: ``(L, d_in, k)``.
        S2s: ``(L, k, d_out)``.
        U1s: ``(L, k, d_out)``.
        U2s: ``(L, d_in, k)``.
        bias: optional ``(d_out,)``.

    Returns:
        ``(..., d_out)``.

    Raises:
        ValueError: inconsistent shapes or devices (e.g. ``x`` not ending in ``d_in``).
        TypeError: a factor or ``bias`` whose dtype is not ``x``'s.
    """
    return torch.ops.panther.sketched_linear(x, S1s, S2s, U1s, U2s, bias)


def sketched_linear_reference(x, S1s, S2s, U1s, U2s, bias=None):
    """The layer's definition, term by term in plain torch: the oracle the kernels are tested against.

    Same arguments, shapes and result as :func:`sketched_linear`.
    """
    L = S1s.shape[0]
    y = sum((x @ S1s[i]) @ U1s[i] + (x @ U2s[i]) @ S2s[i] for i in range(L)) / (2 * L)
    return y if bias is None else y + bias


def concat_factors(S1s, S2s, U1s, U2s):
    """``A = [S1cat | U2cat]`` (d_in, 2Lk) and ``Bm = [U1cat; S2cat] / (2L)`` (2Lk, d_out), as in the C++ kernel.

    ``sketched_linear(x, ...) == x @ A @ Bm + bias``: the two GEMMs the layer costs.

    Args:
        S1s, S2s, U1s, U2s: the factors, shaped as in :func:`sketched_linear`.

    Returns:
        ``(A, Bm)``.
    """
    L, d_in, k = S1s.shape
    d_out = S2s.shape[-1]
    A = torch.cat([S1s.permute(1, 0, 2).reshape(d_in, L * k), U2s.permute(1, 0, 2).reshape(d_in, L * k)], 1)
    Bm = torch.cat([U1s.reshape(L * k, d_out), S2s.reshape(L * k, d_out)], 0) / (2 * L)
    return A, Bm


@torch.library.register_fake("panther::sketched_linear_fwd")
def _sketched_linear_fwd_fake(x, S1s, S2s, U1s, U2s, bias):
    L, d_in, k = S1s.shape
    d_out = S2s.shape[-1]
    torch._check(x.shape[-1] == d_in, lambda: f"sketched_linear: x must end in in_features={d_in}")
    lead = x.shape[:-1]
    return x.new_empty((*lead, d_out)), x.new_empty((*lead, 2 * L * k))


def setup_context(ctx, inputs, output):
    """Autograd context of the sketched linear ops (this one and the Triton op's): saves x and
    the forward's xA. xA is an output only for the backward's sake: its gradient, and y's when y
    is unused, come as None instead of an (N, 2Lk) zero tensor filled per step."""
    x, S1s, S2s, U1s, U2s, bias = inputs
    ctx.save_for_backward(x, output[1], S1s, S2s, U1s, U2s)
    ctx.has_bias = bias is not None
    ctx.set_materialize_grads(False)


def grad_y_or_zeros(grad_y, x, S2s):
    """The output's gradient, zeros where autograd gave None (only xA's gradient flows)."""
    return x.new_zeros((*x.shape[:-1], S2s.shape[-1])) if grad_y is None else grad_y


def _backward(ctx, grad_y, grad_xA):
    """Reuses the forward's xA: dx, dS1s, dS2s together cost 6·N·L·k·(d_in+d_out) FLOPs."""
    x, xA, S1s, S2s, U1s, U2s = ctx.saved_tensors
    grad_y = grad_y_or_zeros(grad_y, x, S2s)
    need_x, need_S1, need_S2, need_U1, need_U2, need_b = ctx.needs_input_grad
    L, d_in, k = S1s.shape
    d_out = S2s.shape[-1]
    Lk = L * k
    A, Bm = concat_factors(S1s, S2s, U1s, U2s)
    g = grad_y.reshape(-1, d_out)
    x2 = x.reshape(-1, d_in)
    xA2 = xA.reshape(-1, 2 * Lk)

    dx = dS1s = dS2s = dU1s = dU2s = db = None
    if need_x or need_S1 or need_U2:
        dxA = g @ Bm.mT  # (N, 2Lk)
        if grad_xA is not None:
            dxA = dxA + grad_xA.reshape(-1, 2 * Lk)
        if need_x:
            dx = (dxA @ A.mT).reshape(x.shape)
        if need_S1:
            dS1s = (x2.mT @ dxA[:, :Lk]).reshape(d_in, L, k).permute(1, 0, 2)
        if need_U2:
            dU2s = (x2.mT @ dxA[:, Lk:]).reshape(d_in, L, k).permute(1, 0, 2)
    if need_S2:
        dS2s = (xA2[:, Lk:].mT @ g).reshape(L, k, d_out) / (2 * L)
    if need_U1:
        dU1s = (xA2[:, :Lk].mT @ g).reshape(L, k, d_out) / (2 * L)
    if need_b and ctx.has_bias:
        db = g.sum(0)
    return dx, dS1s, dS2s, dU1s, dU2s, db


torch.library.register_autograd("panther::sketched_linear_fwd", _backward, setup_context=setup_context)
