"""Random sketching operators.

Every operator here is *scaled*: a sketch ``S`` of shape ``(m, n)`` satisfies ``E[SᵀS] = I_n``,
hence ``E‖Sx‖² = ‖x‖²`` for every fixed ``x`` (and, for ``m`` large enough, pairwise distances are
preserved with high probability, Johnson–Lindenstrauss style).

Randomness and placement, common to all functions:

* ``generator=None`` draws from torch's global RNG (so ``torch.manual_seed`` makes results
  reproducible); a ``torch.Generator`` is used instead and the global RNG state is left untouched.
* Random numbers are drawn on the generator's device (the default device when ``generator`` is None)
  and the result is then moved to ``device``; so one seed gives the same operator on every device.
* ``dtype=None`` means ``torch.get_default_dtype()`` for the factory functions, and the input's
  (floating) dtype for the functions that sketch a tensor.
* Nothing loops in Python over the sketched dimension; the only Python loops are over
  ``log2(n)`` Hadamard stages (:func:`srht`) or over ``sparsity`` (distinct-index sampling).
"""
from __future__ import annotations

import enum
import math
import operator

import torch

__all__ = [
    "DistributionFamily",
    "Axis",
    "scaled_sign_sketch",
    "gaussian_skop",
    "dense_sketch_operator",
    "sketch_tensor",
    "count_skop",
    "sjlt_skop",
    "sparse_sketch_operator",
    "srht",
]


class DistributionFamily(enum.Enum):
    """Entry distribution of :func:`dense_sketch_operator` (both scaled to variance ``1/m``)."""

    Gaussian = "gaussian"
    Uniform = "uniform"


class Axis(enum.Enum):
    """Which vectors of a :func:`sparse_sketch_operator` carry exactly ``vec_nnz`` draws.

    ``Short``: every short-axis vector gets ``vec_nnz`` *distinct* nonzeros (e.g. the columns of a wide
    ``m < n`` operator: an SJLT). ``Long``: every long-axis vector gets ``vec_nnz`` indices drawn *with
    replacement*; repeated indices are summed.
    """

    Short = "short"
    Long = "long"


_SPARSE_LAYOUTS = (torch.strided, torch.sparse_coo, torch.sparse_csr, torch.sparse_csc)


# ----------------------------------------------------------------------------------------------
# argument checking


def _int(name, value):
    """``value`` (an int, a numpy integer, ...; not a bool) as int, else TypeError naming ``name``."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got bool {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None


def _size(name, value, *, minimum=1):
    value = _int(name, value)
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
    return value


def _tensor_dim(x, x_name, dim, dim_name):
    """``dim`` (negative allowed) as an int index of a dimension of the tensor ``x``; TypeError /
    ValueError naming the arguments for a non-tensor, a 0-d tensor, a non-int or an out-of-range
    ``dim``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{x_name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 0:
        raise ValueError(f"{x_name} must have at least one dimension, got a 0-d tensor")
    dim = _int(dim_name, dim)
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"{dim_name} must be in [{-x.dim()}, {x.dim() - 1}] for a {x.dim()}-d "
                         f"{x_name}, got {dim}")
    return dim


def _float_dtype(dtype, name="dtype"):
    dtype = dtype or torch.get_default_dtype()
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point torch.dtype (e.g. torch.float32), got {dtype!r}")
    return dtype


def _draw_device(generator):
    if generator is None:
        return None
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    return generator.device


def _layout(layout):
    if not isinstance(layout, torch.layout):
        raise TypeError(f"layout must be a torch.layout, got {type(layout).__name__}")
    if layout not in _SPARSE_LAYOUTS:
        raise ValueError(f"layout must be one of torch.strided, torch.sparse_coo, torch.sparse_csr, "
                         f"torch.sparse_csc; got {layout}")
    return layout


def _distribution(distribution):
    if isinstance(distribution, DistributionFamily):
        return distribution
    if isinstance(distribution, str):
        for member in DistributionFamily:
            if distribution.lower() == member.value:
                return member
    raise TypeError(f"distribution must be a DistributionFamily (Gaussian or Uniform) or one of "
                    f"'gaussian', 'uniform'; got {distribution!r}")


def _work_dtype(x, dtype, name):
    """dtype for functions that sketch a tensor: ``dtype`` or the input's floating dtype."""
    if dtype is not None:
        return _float_dtype(dtype)
    if x.dtype.is_complex:
        raise TypeError(f"{name} must be a real tensor, got dtype {x.dtype}")
    return x.dtype if x.dtype.is_floating_point else torch.get_default_dtype()


def _signs(shape, dtype, generator, device):
    """Independent ±1 entries in ``dtype`` (drawn as bits, so no exact-zero corner case)."""
    bits = torch.randint(0, 2, shape, generator=generator, device=device)
    return bits.to(dtype=dtype) * 2 - 1


# ----------------------------------------------------------------------------------------------
# dense operators


def scaled_sign_sketch(m, n, *, generator=None, device=None, dtype=None):
    """Dense ``(m, n)`` matrix of independent ``±1/sqrt(m)`` entries (Rademacher), so ``E[SᵀS] = I_n``.

    Drawn on ``generator``'s device (the default device when ``generator`` is None) and moved to
    ``device`` (``None`` keeps it where it was drawn).

    Raises:
        TypeError: ``m`` or ``n`` not an int, a non-floating ``dtype``, ``generator`` not a
            ``torch.Generator``.
        ValueError: ``m`` or ``n`` below 1.
    """
    m = _size("m", m)
    n = _size("n", n)
    dtype = _float_dtype(dtype)
    signs = torch.randint(0, 2, (m, n), generator=generator, device=_draw_device(generator))
    return (signs.to(dtype=dtype) * 2 - 1).mul_(1.0 / math.sqrt(m)).to(device=device)


# Continuous draws are always made in fp32 and then cast, so one seed gives the same operator (up to
# rounding) in every dtype; fp32 resolution is far finer than any sketching error.
def _gaussian(shape, generator):
    return torch.randn(shape, generator=generator, device=_draw_device(generator), dtype=torch.float32)


def _uniform(shape, generator):
    u = torch.rand(shape, generator=generator, device=_draw_device(generator), dtype=torch.float32)
    return (u - 0.5) * math.sqrt(12.0)  # mean 0, variance 1


def gaussian_skop(m, d, *, generator=None, device=None, dtype=None):
    """Dense ``(m, d)`` Gaussian sketch with i.i.d. ``N(0, 1/m)`` entries, so ``E[SᵀS] = I_d``.

    Drawn in fp32 on ``generator``'s device, then cast to ``dtype`` and moved to ``device``.

    Raises:
        TypeError: ``m`` or ``d`` not an int, a non-floating ``dtype``, ``generator`` not a
            ``torch.Generator``.
        ValueError: ``m`` or ``d`` below 1.
    """
    m = _size("m", m)
    d = _size("d", d)
    dtype = _float_dtype(dtype)
    g = _gaussian((m, d), generator).to(dtype=dtype)
    return g.mul_(1.0 / math.sqrt(m)).to(device=device)


def dense_sketch_operator(m, n, distribution, *, generator=None, device=None, dtype=None):
    """Dense ``(m, n)`` operator with i.i.d. zero-mean entries of variance ``1/m`` (``E[SᵀS] = I_n``).

    ``distribution``: :class:`DistributionFamily` ``Gaussian`` (``N(0, 1/m)``) or ``Uniform``
    (uniform on ``[-sqrt(3/m), sqrt(3/m)]``); the strings ``"gaussian"``/``"uniform"`` are accepted.

    Raises:
        TypeError: ``m`` or ``n`` not an int, an unknown ``distribution``, a non-floating ``dtype``.
        ValueError: ``m`` or ``n`` below 1.
    """
    m = _size("m", m)
    n = _size("n", n)
    distribution = _distribution(distribution)
    dtype = _float_dtype(dtype)
    draw = _gaussian if distribution is DistributionFamily.Gaussian else _uniform
    s = draw((m, n), generator).to(dtype=dtype)
    return s.mul_(1.0 / math.sqrt(m)).to(device=device)


def sketch_tensor(input, axis, new_size, distribution=None, sketch_matrix=None, *,
                  generator=None, device=None, dtype=None):
    """Sketch ``input`` along dimension ``axis`` to length ``new_size``: ``out = S ×_axis input``.

    Exactly one of ``distribution`` and ``sketch_matrix`` must be given.

    * ``distribution`` (:class:`DistributionFamily`): draws ``S = dense_sketch_operator(new_size, n,
      distribution)`` (scaled, ``E[SᵀS] = I``) and returns ``(out, S)``.
    * ``sketch_matrix``: a ``(new_size, n)`` dense or sparse matrix; returns ``out`` only.

    ``n = input.size(axis)``; ``axis`` may be negative; ``1 <= new_size <= n``. The computation runs on
    ``device`` (default: ``input.device``) in ``dtype`` (default: ``input``'s floating dtype).

    Returns:
        ``(out, S)`` with ``distribution``, ``out`` with ``sketch_matrix``; ``out`` has ``input``'s shape
        with ``new_size`` at ``axis``.

    Raises:
        TypeError: ``input``/``sketch_matrix`` not tensors, ``axis``/``new_size`` not ints, a complex
            ``input``.
        ValueError: both or neither of ``distribution`` and ``sketch_matrix``, a 0-d ``input``, ``axis``
            out of range, ``new_size`` outside ``[1, n]``, a ``sketch_matrix`` of the wrong shape.
    """
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    if (distribution is None) == (sketch_matrix is None):
        raise ValueError("exactly one of distribution and sketch_matrix must be given "
                         f"(got distribution={distribution!r}, sketch_matrix="
                         f"{'None' if sketch_matrix is None else 'a tensor'})")
    axis = _tensor_dim(input, "input", axis, "axis")
    axis %= input.dim()
    n = input.size(axis)
    new_size = _size("new_size", new_size)
    if new_size > n:
        raise ValueError(f"new_size must be in [1, input.size(axis)={n}], got {new_size}")
    device = input.device if device is None else torch.device(device)
    dtype = _work_dtype(input, dtype, "input")

    if sketch_matrix is None:
        S = dense_sketch_operator(new_size, n, distribution, generator=generator, device=device, dtype=dtype)
        return _apply_along(S, input.to(device=device, dtype=dtype), axis), S

    if not isinstance(sketch_matrix, torch.Tensor):
        raise TypeError(f"sketch_matrix must be a torch.Tensor, got {type(sketch_matrix).__name__}")
    if tuple(sketch_matrix.shape) != (new_size, n):
        raise ValueError(f"sketch_matrix must have shape (new_size, input.size(axis)) = ({new_size}, {n}), "
                         f"got {tuple(sketch_matrix.shape)}")
    S = sketch_matrix.to(device=device, dtype=dtype)
    return _apply_along(S, input.to(device=device, dtype=dtype), axis)


def _apply_along(S, x, axis):
    # Move the axis to the front and flatten the rest, so a sparse S works too (sparse @ dense).
    xt = x.movedim(axis, 0)
    rest = xt.shape[1:]
    y = S @ xt.reshape(xt.shape[0], -1)
    return y.reshape((S.shape[0],) + tuple(rest)).movedim(0, axis)


# ----------------------------------------------------------------------------------------------
# sparse operators


def _distinct_indices(count, high, k, generator):
    """``(count, k)`` int64: for each of ``count`` rows, a uniform random ``k``-subset of ``range(high)``.

    Robert Floyd's algorithm vectorised over rows (the loop is over ``k``, memory ``O(count·k)``);
    when ``k² > high`` an argsort of uniform keys is cheaper.
    """
    dev = _draw_device(generator)
    if k * k > high:
        keys = torch.rand((count, high), generator=generator, device=dev)
        return keys.argsort(dim=1)[:, :k]
    chosen = torch.empty((count, k), dtype=torch.long, device=dev)
    for i, j in enumerate(range(high - k, high)):
        t = torch.randint(0, j + 1, (count,), generator=generator, device=dev)
        taken = (chosen[:, :i] == t.unsqueeze(1)).any(dim=1)
        chosen[:, i] = torch.where(taken, torch.full_like(t, j), t)
    return chosen


def _ptr(sorted_major, size):
    """Compressed pointer (``size + 1``,) of indices already sorted ascending."""
    counts = torch.bincount(sorted_major, minlength=size)
    return torch.cat((counts.new_zeros(1), counts.cumsum(0)))


def _from_vectors(idx, signs, scale, shape, along_columns, distinct, layout, device):
    """Assemble ``scale`` × a ±1 matrix of ``shape`` from per-vector index draws.

    ``idx``/``signs``: ``(count, k)``; vector ``v`` (column ``v`` if ``along_columns`` else row ``v``)
    gets ``signs[v, t]`` at position ``idx[v, t]``. Repeated positions (possible only when not
    ``distinct``) are summed; sums of ±1 are exact and scaling comes last, so all layouts agree bit for
    bit. With ``distinct`` indices no coalescing sort over all entries is needed.
    """
    target = idx.device if device is None else torch.device(device)
    idx, signs = idx.to(target), signs.to(target)
    count, k = idx.shape
    if distinct:
        # sort inside each vector: the flat entries are then ordered by (owner, index)
        idx, order = idx.sort(dim=1)
        signs = signs.gather(1, order)
    owner = torch.arange(count, device=target).unsqueeze(1).expand(count, k).reshape(-1)
    idx, signs = idx.reshape(-1), signs.reshape(-1)
    rows, cols = (idx, owner) if along_columns else (owner, idx)

    if layout is torch.strided:
        out = torch.zeros(shape, dtype=signs.dtype, device=target)
        return out.index_put_((rows, cols), signs, accumulate=not distinct).mul_(scale)
    if not distinct:
        # indices are in range by construction, so skip torch's invariant checks
        out = torch.sparse_coo_tensor(torch.stack((rows, cols)), signs, shape, check_invariants=False).coalesce()
        out.values().mul_(scale)  # values() aliases the coalesced tensor's storage
        if layout is torch.sparse_csr:
            return out.to_sparse_csr()
        if layout is torch.sparse_csc:
            return out.to_sparse_csc()
        return out

    vals = signs.mul_(scale)
    if layout is torch.sparse_csc:  # column-major order wanted
        if not along_columns:
            perm = cols.argsort(stable=True)  # stable: rows stay ascending inside each column
            rows, cols, vals = rows[perm], cols[perm], vals[perm]
        return torch.sparse_csc_tensor(_ptr(cols, shape[1]), rows, vals, shape, check_invariants=False)
    if along_columns:  # row-major order wanted
        perm = rows.argsort(stable=True)
        rows, cols, vals = rows[perm], cols[perm], vals[perm]
    if layout is torch.sparse_csr:
        return torch.sparse_csr_tensor(_ptr(rows, shape[0]), cols, vals, shape, check_invariants=False)
    return torch.sparse_coo_tensor(torch.stack((rows, cols)), vals, shape, is_coalesced=True,
                                   check_invariants=False)


def _column_sparse(m, d, s, layout, generator, device, dtype):
    """``(m, d)`` with ``s`` distinct ±1/sqrt(s) entries per column (so every column has unit norm)."""
    rows = _distinct_indices(d, m, s, generator)  # (d, s)
    signs = _signs((d, s), dtype, generator, rows.device)
    return _from_vectors(rows, signs, 1.0 / math.sqrt(s), (m, d), True, True, layout, device)


def count_skop(m, d, *, layout=torch.strided, generator=None, device=None, dtype=None):
    """CountSketch ``(m, d)``: one ``±1`` per column at a uniform random row (``E[SᵀS] = I_d``).

    ``SᵀS`` has an exact unit diagonal, so no further scaling is needed. ``layout``: ``torch.strided``
    (default, dense), ``torch.sparse_coo`` (coalesced), ``torch.sparse_csr`` or ``torch.sparse_csc``;
    a sparse layout pays once ``m`` is more than a handful (``d`` nonzeros instead of ``m·d``).
    ``torch.sparse_csc`` is the cheapest to build (entries come out column by column, no global sort).

    Raises:
        TypeError: ``m`` or ``d`` not an int, ``layout`` not a ``torch.layout``, a non-floating ``dtype``.
        ValueError: ``m`` or ``d`` below 1, an unsupported ``layout``.
    """
    m = _size("m", m)
    d = _size("d", d)
    layout = _layout(layout)
    dtype = _float_dtype(dtype)
    return _column_sparse(m, d, 1, layout, generator, device, dtype)


def sjlt_skop(m, d, sparsity=2, *, layout=torch.strided, generator=None, device=None, dtype=None):
    """Sparse JL transform ``(m, d)``: each column has ``sparsity`` distinct uniformly chosen rows holding
    ``±1/sqrt(sparsity)`` (unit-norm columns, ``E[SᵀS] = I_d``). Requires ``1 <= sparsity <= m``.

    ``layout`` as in :func:`count_skop` (dense by default; sparse formats store ``sparsity·d`` values).

    Raises:
        TypeError: a size not an int, ``layout`` not a ``torch.layout``, a non-floating ``dtype``.
        ValueError: a size below 1, ``sparsity > m``, an unsupported ``layout``.
    """
    m = _size("m", m)
    d = _size("d", d)
    sparsity = _size("sparsity", sparsity)
    if sparsity > m:
        raise ValueError(f"sparsity must be in [1, m={m}], got {sparsity}")
    layout = _layout(layout)
    dtype = _float_dtype(dtype)
    return _column_sparse(m, d, sparsity, layout, generator, device, dtype)


def sparse_sketch_operator(m, n, vec_nnz, axis, *, layout=torch.sparse_coo, generator=None, device=None,
                           dtype=None):
    """Sparse ``(m, n)`` sign operator in the style of RandBLAS, scaled so that ``E[SᵀS] = I_n``.

    ``axis=Axis.Short``: every short-axis vector (length ``min(m, n)``) holds ``vec_nnz`` distinct
    nonzeros (requires ``vec_nnz <= min(m, n)``). ``axis=Axis.Long``: every long-axis vector holds
    ``vec_nnz`` nonzeros drawn with replacement (repeats are summed). Values are ``±c`` with
    ``c = 1/sqrt(vec_nnz)`` when the vectors are columns and ``c = sqrt(n / (m·vec_nnz))`` when they are
    rows (for ``m == n`` they are columns). ``layout`` defaults to a coalesced ``torch.sparse_coo``;
    ``torch.strided``, ``torch.sparse_csr`` and ``torch.sparse_csc`` are also accepted (with
    ``Axis.Short``, CSC for column vectors and CSR for row vectors are built without a global sort).

    Raises:
        TypeError: a size not an int, ``axis`` not an :class:`Axis`, ``layout`` not a ``torch.layout``, a
            non-floating ``dtype``.
        ValueError: a size below 1, ``vec_nnz > min(m, n)`` with ``Axis.Short``, an unsupported ``layout``.
    """
    m = _size("m", m)
    n = _size("n", n)
    vec_nnz = _size("vec_nnz", vec_nnz)
    if not isinstance(axis, Axis):
        raise TypeError(f"axis must be Axis.Short or Axis.Long, got {axis!r}")
    layout = _layout(layout)
    dtype = _float_dtype(dtype)
    # the vectors that get vec_nnz draws are columns iff indices range over the rows
    index_range = min(m, n) if axis is Axis.Short else max(m, n)
    along_columns = index_range == m
    count = n if along_columns else m
    if axis is Axis.Short:
        if vec_nnz > index_range:
            raise ValueError(f"vec_nnz must be in [1, min(m, n)={index_range}] for Axis.Short, got {vec_nnz}")
        idx = _distinct_indices(count, index_range, vec_nnz, generator)
    else:
        idx = torch.randint(0, index_range, (count, vec_nnz), generator=generator,
                            device=_draw_device(generator))
    scale = 1.0 / math.sqrt(vec_nnz) if along_columns else math.sqrt(n / (m * vec_nnz))
    signs = _signs((count, vec_nnz), dtype, generator, idx.device)
    return _from_vectors(idx, signs, scale, (m, n), along_columns, axis is Axis.Short, layout, device)


# ----------------------------------------------------------------------------------------------
# subsampled randomized Hadamard transform


def _fwht(x):
    """Unnormalised fast Walsh–Hadamard transform along the last dim (length a power of two),
    Sylvester ordering: ``H[i, j] = (-1)^popcount(i & j)``. ``log2(N)`` vectorised butterfly stages."""
    shape = x.shape
    size = shape[-1]
    x = x.reshape(-1, size)
    h = 1
    while h < size:
        x = x.reshape(x.shape[0], size // (2 * h), 2, h)
        a, b = x[:, :, 0], x[:, :, 1]
        x = torch.stack((a + b, a - b), dim=2)
        h *= 2
    return x.reshape(shape)


def srht(x, m, *, dim=-1, generator=None, device=None, dtype=None):
    """Subsampled randomized Hadamard transform of ``x`` along ``dim``, output length ``m``.

    With ``n = x.size(dim)`` and ``N`` the next power of two ``>= n``, the operator is
    ``S = sqrt(N/m) · P · (H/sqrt(N)) · D · Z``: ``Z`` zero-pads to ``N``, ``D`` is a random ±1
    diagonal, ``H`` the (Sylvester) Walsh–Hadamard matrix, ``P`` picks ``m`` of the ``N`` rows uniformly
    without replacement. So ``E[SᵀS] = I_n`` and ``E‖Sx‖² = ‖x‖²`` exactly. The same ``S`` is applied
    to every slice of ``x``; the draws depend only on ``(N, m)`` and the RNG, not on ``x``'s other dims.
    Requires ``1 <= m <= N``. Runs on ``device`` (default ``x.device``) in ``dtype`` (default ``x``'s
    floating dtype; half/bfloat16 are transformed in fp32).

    Returns:
        ``x``'s shape with length ``m`` at ``dim``.

    Raises:
        TypeError: ``x`` not a tensor, ``dim``/``m`` not ints, a complex ``x``.
        ValueError: a 0-d ``x``, ``dim`` out of range, ``x.size(dim) == 0``, ``m`` outside ``[1, N]``.
    """
    dim = _tensor_dim(x, "x", dim, "dim")
    n = x.size(dim)
    if n == 0:
        raise ValueError(f"x.size(dim) must be >= 1, got 0 (dim={dim})")
    padded = 1 << (n - 1).bit_length()
    m = _size("m", m)
    if m > padded:
        raise ValueError(f"m must be in [1, {padded}] (x.size(dim)={n} padded to a power of two), got {m}")
    dtype = _work_dtype(x, dtype, "x")
    device = x.device if device is None else torch.device(device)

    draw_dev = _draw_device(generator)
    work = torch.promote_types(dtype, torch.float32)
    signs = _signs((padded,), work, generator, draw_dev).to(device)
    rows = torch.randperm(padded, generator=generator, device=draw_dev)[:m].to(device)

    xt = x.to(device=device, dtype=work).movedim(dim, -1)
    xt = torch.nn.functional.pad(xt, (0, padded - n)) * signs
    y = _fwht(xt).index_select(-1, rows).mul_(1.0 / math.sqrt(m))  # sqrt(N/m) · H/sqrt(N)
    return y.movedim(-1, dim).to(dtype)
