"""Inductor-scoped decompositions of panther ops into aten GEMMs / convolutions.

The ops stay opaque in eager mode and in ``torch.export``; only the panther backend passes this table to
``compile_fx(..., decompositions={**select_decomp_table(), **panther_decompositions()})``. Seen as
``aten.mm`` / ``aten.addmm`` / ``aten.convolution``, the sketched layers let Inductor pick its GEMM
kernels and fuse the bias and neighbouring pointwise ops (activations, residual adds) into their
epilogues, which an opaque custom op would block.

Each decomposition computes exactly what the op's kernel computes (same factor concatenation, same
1/(2L) placement), so compiled and eager results agree to rounding.
"""
from __future__ import annotations

from typing import Callable, Dict

import torch

__all__ = ["panther_decompositions", "sketched_linear_fwd_decomposition", "sketched_conv2d_decomposition"]


def sketched_linear_fwd_decomposition(x, S1s, S2s, U1s, U2s, bias=None):
    """``panther::sketched_linear_fwd`` -> (y, xA) as two GEMMs over the concatenated factors."""
    from panther.ops.linear import concat_factors

    d_in = S1s.shape[1]
    A, Bm = concat_factors(S1s, S2s, U1s, U2s)
    x2 = x.reshape(-1, d_in)
    xA = torch.mm(x2, A)
    y = torch.mm(xA, Bm) if bias is None else torch.addmm(bias, xA, Bm)
    lead = x.shape[:-1]
    return y.reshape(*lead, Bm.shape[1]), xA.reshape(*lead, A.shape[1])


def sketched_conv2d_decomposition(x, S1s, U1s, bias, stride, padding, dilation):
    """``panther::sketched_conv2d`` -> a convolution to 2Lk channels and a 1x1 channel-mix convolution."""
    terms, k, C_out = U1s.shape
    h = torch.ops.aten.convolution(x, S1s, None, stride, padding, dilation, False, [0, 0], 1)
    # out[c] = 1/(2L) Σ_{i,j} U1[i, j, c] h[i*k + j]: a 1x1 conv with weight U1catᵀ / (2L).
    mix = (U1s.reshape(terms * k, C_out).mT / terms).reshape(C_out, terms * k, 1, 1)
    return torch.ops.aten.convolution(h, mix.to(h.dtype), bias, [1, 1], [0, 0], [1, 1], False, [0, 0], 1)


def _overload(name: str):
    ns = getattr(torch.ops, "panther", None)
    packet = getattr(ns, name, None) if ns is not None else None
    return getattr(packet, "default", None) if packet is not None else None


def _is_composite(op) -> bool:
    """True when the op already decomposes itself (CompositeImplicitAutograd): nothing to add."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CompositeImplicitAutograd")


def panther_decompositions() -> Dict[torch._ops.OpOverload, Callable]:
    """Decompositions for the panther ops present in this build (the table is rebuilt on each call)."""
    import panther.ops  # noqa: F401  (registers the ops)

    table = {}
    for name, fn in (("sketched_linear_fwd", sketched_linear_fwd_decomposition),
                     ("sketched_conv2d_fwd", None),
                     ("sketched_conv2d", sketched_conv2d_decomposition)):
        op = _overload(name)
        if op is None or fn is None or _is_composite(op):
            continue
        table[op] = fn
    return table
