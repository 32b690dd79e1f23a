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

__all__ = ["panther_decompositions", "inductor_decompositions", "DecompositionTable", "sketched_linear_fwd_decomposition", "sketched_conv2d_decomposition"]


def sketched_linear_fwd_decomposition(x, S1s, S2s, U1s, U2s, bias=None):
    """``panther::sketched_linear_fwd`` -> (y, xA) as the op's own two GEMMs over the concatenated factors.

    ``xA = x·A`` and ``y = xA·Bm + bias`` (one ``mm``, one ``addmm``), with ``A, Bm = concat_factors(...)``:
    x is read once and y written once, as by the C++ kernel. Concatenating the factors costs a copy of
    (d_in + d_out)·2Lk elements, small next to x and y; splitting the GEMMs per factor instead (to avoid
    it) reads x twice and writes y twice, which measured 3.4x slower on the H200 (8192 -> 8192, 16,384
    rows, k = 16, bf16: 0.590 ms against 0.173 for the op; docs/benchmarks.md).
    """
    from panther.ops.linear import concat_factors

    d_in = S1s.shape[1]
    d_out = S2s.shape[-1]
    A, Bm = concat_factors(S1s, S2s, U1s, U2s)
    xA = torch.mm(x.reshape(-1, d_in), A)
    y = torch.addmm(bias, xA, Bm) if bias is not None else torch.mm(xA, Bm)
    lead = x.shape[:-1]
    return y.reshape(*lead, d_out), xA.reshape(*lead, A.shape[1])


def sketched_conv2d_decomposition(x, S1s, U1s, bias, stride, padding, dilation):
    """``panther::sketched_conv2d`` -> a convolution to 2Lk channels, then the channel mix as a batched GEMM
    with the (transposed, unscaled) U1 factors; 1/(2L) and the bias fuse into one pointwise epilogue."""
    terms, k, C_out = U1s.shape
    h = torch.ops.aten.convolution(x, S1s, None, stride, padding, dilation, False, [0, 0], 1)
    # out[c] = 1/(2L) Σ_{i,j} U1[i, j, c] h[i*k + j]
    lead, (R, Ho, Wo) = h.shape[:-3], h.shape[-3:]
    out = torch.matmul(U1s.reshape(terms * k, C_out).mT, h.reshape(*lead, R, Ho * Wo)) * (1.0 / terms)
    out = out.reshape(*lead, C_out, Ho, Wo)
    return out if bias is None else out + bias.reshape(C_out, 1, 1)


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
                     ("sketched_conv2d", sketched_conv2d_decomposition)):
        op = _overload(name)
        if op is None or fn is None or _is_composite(op):
            continue
        table[op] = fn
    return table


class DecompositionTable(dict):
    """Inductor's default decompositions plus panther's, with a stable identity for Inductor's caches.

    ``compile_fx(decompositions=...)`` makes the table part of the FX-graph cache key, and the default
    table holds pybind functions that cannot be pickled, which would bypass the cache on every compile.
    This dict pickles as (torch version, hash of this file, op names) instead: everything its content
    depends on (Inductor's config is keyed separately).
    """

    def __reduce__(self):
        return (_rebuild_table, (_table_key(tuple(sorted(str(k) for k in self if _is_panther(k)))),))


def _is_panther(op) -> bool:
    return getattr(op, "namespace", None) == "panther"


def _table_key(ops):
    import hashlib

    with open(__file__, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    return ("panther-inductor-decompositions", torch.__version__, digest, ops)


def _rebuild_table(key):
    return inductor_decompositions()


def inductor_decompositions() -> DecompositionTable:
    """``{**select_decomp_table(), **panther_decompositions()}`` as a cache-friendly table."""
    from torch._inductor.decomposition import select_decomp_table

    return DecompositionTable({**select_decomp_table(), **panther_decompositions()})
