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


def _term_major(F):
    """(L, r, c) factors -> (r, L*c) with term-major columns (a view when L == 1)."""
    L, r, c = F.shape
    return F.permute(1, 0, 2).reshape(r, L * c) if L > 1 else F[0]


def sketched_linear_fwd_decomposition(x, S1s, S2s, U1s, U2s, bias=None):
    """``panther::sketched_linear_fwd`` -> (y, xA) as GEMMs, chosen by device.

    CUDA: the op's own two GEMMs over the concatenated factors, ``xA = x·A`` and ``y = xA·Bm + bias``
    (``A, Bm = concat_factors(...)``): x read once and y written once, as by the C++ kernel. Four GEMMs
    on the separate factors read x twice and write y twice: 3.5x slower on the H200 (8192 -> 8192, 16,384
    rows, k = 16, bf16: 0.590 ms against 0.167; docs/benchmarks.md).

    CPU: those four GEMMs (``h1 = x S1cat``, ``h2 = x U2cat``, ``y = (h1 U1cat + h2 S2cat) / (2L) + bias``
    through two addmm's whose ``alpha`` carries the 1/(2L)), which copy no factor: the concatenation is a
    generated kernel per layer shape, and compiling those took the demo's compile from under a second to
    14.6 s on the 2-core CI machine. In inference ``xA = [h1 | h2]`` is dead code.
    """
    L, d_in, k = S1s.shape
    d_out = S2s.shape[-1]
    x2 = x.reshape(-1, d_in)
    lead = x.shape[:-1]
    if x.device.type == "cuda":
        from panther.ops.linear import concat_factors

        A, Bm = concat_factors(S1s, S2s, U1s, U2s)
        xA = torch.mm(x2, A)
        y = torch.addmm(bias, xA, Bm) if bias is not None else torch.mm(xA, Bm)
        return y.reshape(*lead, d_out), xA.reshape(*lead, 2 * L * k)
    s = 1.0 / (2 * L)
    h1 = torch.mm(x2, _term_major(S1s))  # (N, Lk)
    h2 = torch.mm(x2, _term_major(U2s))  # (N, Lk)
    U1cat, S2cat = U1s.reshape(L * k, d_out), S2s.reshape(L * k, d_out)
    if bias is None:
        y = torch.addmm(torch.mm(h1, U1cat), h2, S2cat, beta=s, alpha=s)
    else:
        y = torch.addmm(torch.addmm(bias, h1, U1cat, alpha=s), h2, S2cat, alpha=s)
    return y.reshape(*lead, d_out), torch.cat([h1, h2], dim=1).reshape(*lead, 2 * L * k)


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
        return (_rebuild_table, (self._key(),))

    def cache_tag(self) -> str:
        """The table's identity as text, for ``torch.compiler.config.cache_key_tag``: AOTAutograd's cache
        key leaves the decomposition table out, so the backend adds it there."""
        return "panther-decompositions:" + ":".join(map(str, self._key()))

    def _key(self):
        return _table_key(tuple(sorted(str(k) for k in self if _is_panther(k))))


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
