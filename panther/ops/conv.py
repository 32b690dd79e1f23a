"""Sketched conv2d op: fake kernel, autograd formula and the plain-torch reference.

``panther::sketched_conv2d(x, S1s, U1s, bias, stride, padding, dilation)`` (schema and CPU/CUDA/autocast
kernels in ``csrc/sketched_conv2d.cpp``) computes::

    out[b, o] = 1/(2L) * sum_{i<2L, r<k} U1s[i, r, o] * conv(x, S1s)[b, i*k + r] + bias[o]

with ``x`` (B, C_in, H, W) or unbatched (C_in, H, W), ``S1s`` (2Lk, C_in, kh, kw) an ordinary conv
weight, ``U1s`` (2L, k, C_out), ``bias`` (C_out,) or None. The native kernel does one convolution with
2Lk output channels and one 1x1 channel mix with ``M = U1catᵀ/(2L)`` (C_out, 2Lk).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["sketched_conv2d", "sketched_conv2d_reference"]

_OP = "panther::sketched_conv2d"


def _pair(v, name):
    if isinstance(v, int) and not isinstance(v, bool):
        return [v, v]
    if isinstance(v, (tuple, list)) and len(v) == 2:
        return [int(a) for a in v]
    raise TypeError(f"sketched_conv2d: {name} must be an int or a pair of ints, got {v!r}")


def sketched_conv2d(x, S1s, U1s, bias=None, stride=1, padding=0, dilation=1):
    """Call ``torch.ops.panther.sketched_conv2d``; ``stride``/``padding``/``dilation`` may be ints or pairs
    (numeric padding only; ``panther.nn.SKConv2d`` handles ``"same"``/``"valid"``).

    Computes ``out[b, o] = 1/(2L) Σ_{i<2L, r<k} U1s[i, r, o] · conv2d(x, S1s)[b, i·k + r] + bias[o]``
    (see :mod:`panther.ops.conv`).

    Args:
        x: ``(B, C_in, H, W)`` or unbatched ``(C_in, H, W)``.
        S1s: ``(2Lk, C_in, kh, kw)``, an ordinary conv weight.
        U1s: ``(2L, k, C_out)``, the channel mix.
        bias: optional ``(C_out,)``.
        stride, padding, dilation: ints or pairs of ints.

    Returns:
        ``(B, C_out, H_out, W_out)`` (or unbatched), with ``F.conv2d``'s output size.

    Raises:
        TypeError: ``stride``/``padding``/``dilation`` not an int or a pair of ints, or ``S1s``, ``U1s``
            or ``bias`` of another dtype than ``x``.
        ValueError: inconsistent shapes (e.g. channel counts of ``x`` and ``S1s`` differ).
    """
    return torch.ops.panther.sketched_conv2d(
        x, S1s, U1s, bias, _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
    )


def sketched_conv2d_reference(x, S1s, U1s, bias=None, stride=1, padding=0, dilation=1):
    """Test oracle: literally the average of the 2L per-term convolutions.

    Term ``i`` is a conv with the dense kernel ``W_i[o] = sum_r U1s[i, r, o] * S1s[i*k + r]``.
    ``padding`` may be anything ``F.conv2d`` accepts (ints, pairs, ``"same"``, ``"valid"``).
    """
    two_l, k, _ = U1s.shape
    out = None
    for i in range(two_l):
        s_i = S1s[i * k:(i + 1) * k]  # (k, C_in, kh, kw)
        w_i = torch.einsum("rchw,ro->ochw", s_i, U1s[i])  # (C_out, C_in, kh, kw)
        term = F.conv2d(x, w_i, None, stride, padding, dilation)
        out = term if out is None else out + term
    out = out / two_l
    if bias is not None:
        out = out + bias.reshape(-1, 1, 1)
    return out


# ---------------------------------------------------------------------------------------------------
# helpers shared by the fake kernel and the backward (layout rule identical to the C++ kernel)


def _wants_channels_last(t4):
    return t4.is_contiguous(memory_format=torch.channels_last) and not t4.is_contiguous()


def _channel_mix(t, mat):
    """``out[b, p] = sum_c mat[p, c] * t[b, c]`` over the channel dim of a 4-D tensor (layout kept)."""
    b, c, h, w = t.shape
    p = mat.shape[0]  # not -1 in the views: an empty batch leaves it ambiguous
    if _wants_channels_last(t):
        rows = t.permute(0, 2, 3, 1).reshape(-1, c)
        return (rows @ mat.t()).view(b, h, w, p).permute(0, 3, 1, 2)
    return torch.matmul(mat, t.reshape(b, c, h * w)).view(b, p, h, w)


def _pixel_contract(g, z):
    """``sum_{b, h, w} g[b, o, h, w] * z[b, j, h, w]`` -> (C_g, C_z)."""
    b, cg, h, w = g.shape
    cz = z.shape[1]
    if _wants_channels_last(z):
        g_rows = g.permute(0, 2, 3, 1).reshape(-1, cg)
        z_rows = z.permute(0, 2, 3, 1).reshape(-1, cz)
        return g_rows.t() @ z_rows
    return torch.bmm(g.reshape(b, cg, h * w), z.reshape(b, cz, h * w).transpose(1, 2)).sum(0)


# ---------------------------------------------------------------------------------------------------
# fake kernel


@torch.library.register_fake(_OP)
def _sketched_conv2d_fake(x, S1s, U1s, bias, stride, padding, dilation):
    torch._check(x.dim() in (3, 4), lambda: "sketched_conv2d: x must be 3-D or 4-D")
    torch._check(S1s.dim() == 4, lambda: "sketched_conv2d: S1s must be 4-D")
    torch._check(U1s.dim() == 3, lambda: "sketched_conv2d: U1s must be 3-D")
    unbatched = x.dim() == 3
    x4 = x.unsqueeze(0) if unbatched else x
    batch, c_in, h, w = x4.shape
    rank, s_cin, kh, kw = S1s.shape
    two_l, k, c_out = U1s.shape
    torch._check(rank == two_l * k, lambda: "sketched_conv2d: S1s.size(0) must equal 2L*k")
    torch._check(s_cin == c_in, lambda: "sketched_conv2d: channel mismatch between x and S1s")
    h_out = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    w_out = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    if _wants_channels_last(x4):
        out = x4.new_empty((batch, h_out, w_out, c_out)).permute(0, 3, 1, 2)
    else:
        out = x4.new_empty((batch, c_out, h_out, w_out))
    return out.squeeze(0) if unbatched else out


# ---------------------------------------------------------------------------------------------------
# autograd


def _setup_context(ctx, inputs, output):
    x, S1s, U1s, bias, stride, padding, dilation = inputs
    ctx.save_for_backward(x, S1s, U1s)
    ctx.has_bias = bias is not None
    ctx.conv_args = (list(stride), list(padding), list(dilation))


def _backward(ctx, grad):
    x, S1s, U1s = ctx.saved_tensors
    need_x, need_s, need_u, need_b = ctx.needs_input_grad[:4]
    stride, padding, dilation = ctx.conv_args
    unbatched = x.dim() == 3
    if unbatched:
        x, grad = x.unsqueeze(0), grad.unsqueeze(0)
    two_l, k, c_out = U1s.shape
    rank = two_l * k
    m = U1s.reshape(rank, c_out).t() / two_l  # (C_out, 2Lk), as in the forward
    dx = ds = du = db = None
    if need_x or need_s:
        dz = _channel_mix(grad, m.t())  # (B, 2Lk, H_out, W_out)
        dx, ds, _ = torch.ops.aten.convolution_backward(
            dz, x, S1s, None, stride, padding, dilation, False, [0, 0], 1, [need_x, need_s, False]
        )
        if unbatched and dx is not None:
            dx = dx.squeeze(0)
    if need_u:
        # U1s is normally a fixed buffer, so z is recomputed here instead of being saved by the forward.
        z = torch.ops.aten.convolution(x, S1s, None, stride, padding, dilation, False, [0, 0], 1)
        dm = _pixel_contract(grad, z)  # (C_out, 2Lk) = dL/dM
        du = (dm.t() / two_l).reshape(two_l, k, c_out)
    if need_b and ctx.has_bias:
        db = grad.sum((0, 2, 3))
    return dx, ds, du, db, None, None, None


torch.library.register_autograd(_OP, _backward, setup_context=_setup_context)
