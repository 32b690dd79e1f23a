"""Tests for panther.sketch: scaling (E[SᵀS] = I), JL distance preservation, reproducibility,
sparse/dense agreement, dtype/device handling and argument validation."""
import math

import pytest
import torch

import panther.sketch as sk
from panther.sketch import (
    Axis,
    DistributionFamily,
    count_skop,
    dense_sketch_operator,
    gaussian_skop,
    scaled_sign_sketch,
    sjlt_skop,
    sketch_tensor,
    sparse_sketch_operator,
    srht,
)
from panther.sketch.core import _distinct_indices, _fwht

pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")


# Every operator as a function (m, n, **kw) -> dense (m, n) matrix S, so shared properties are tested
# uniformly. srht and sketch_tensor are materialised by sketching the identity (columns = S e_j).
def _srht_matrix(m, n, **kw):
    dtype = kw.pop("dtype", None) or torch.get_default_dtype()
    g = kw.get("generator")  # srht runs where its input lives: put the identity with the generator
    return srht(torch.eye(n, dtype=dtype, device=g.device if g is not None else None), m, dim=0, **kw)


def _sketch_tensor_matrix(m, n, **kw):
    dtype = kw.pop("dtype", None) or torch.get_default_dtype()
    g = kw.get("generator")  # sketch_tensor runs where its input lives: put the identity with the generator
    eye = torch.eye(n, dtype=dtype, device=g.device if g is not None else None)
    out, S = sketch_tensor(eye, 0, m, DistributionFamily.Uniform, **kw)
    assert torch.equal(out, S)
    return out


OPERATORS = {
    "sign": scaled_sign_sketch,
    "gaussian_skop": gaussian_skop,
    "dense_gaussian": lambda m, n, **kw: dense_sketch_operator(m, n, DistributionFamily.Gaussian, **kw),
    "dense_uniform": lambda m, n, **kw: dense_sketch_operator(m, n, DistributionFamily.Uniform, **kw),
    "count": count_skop,
    "sjlt3": lambda m, n, **kw: sjlt_skop(m, n, 3, **kw),
    # sparse layouts are checked equal to these dense ones in test_sparse_layouts_equal_dense
    "sparse_short": lambda m, n, **kw: sparse_sketch_operator(m, n, 3, Axis.Short, layout=torch.strided, **kw),
    "sparse_long": lambda m, n, **kw: sparse_sketch_operator(m, n, 3, Axis.Long, layout=torch.strided, **kw),
    "srht": _srht_matrix,
    "sketch_tensor": _sketch_tensor_matrix,
}
OP_IDS = list(OPERATORS)


@pytest.fixture(params=OP_IDS)
def op(request):
    return OPERATORS[request.param]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# randomness


def test_reproducible_with_generator(op):
    a = op(6, 10, generator=_gen(1))
    b = op(6, 10, generator=_gen(1))
    c = op(6, 10, generator=_gen(2))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_generator_leaves_global_rng_alone(op):
    state = torch.get_rng_state()
    op(6, 10, generator=_gen(3))
    assert torch.equal(state, torch.get_rng_state())


def test_global_rng_reproducible_and_advancing(op):
    torch.manual_seed(1234)
    a, b = op(6, 10), op(6, 10)
    torch.manual_seed(1234)
    a2 = op(6, 10)
    assert torch.equal(a, a2)
    assert not torch.equal(a, b)  # consecutive draws differ


# ---------------------------------------------------------------------------------------------
# scaling: E[SᵀS] = I


# (m, n) shapes per operator: wide for all, plus tall ones where the construction changes with it
GRAM_SHAPES = [(8, 12), (12, 8)]


@pytest.mark.parametrize("m,n", GRAM_SHAPES)
def test_expected_gram_is_identity(op, m, n):
    # Monte-Carlo mean of SᵀS over K draws. Per-entry noise is about sqrt(2/(m·K)) ≈ 0.02, so the
    # bounds below are > 5 sd away, yet a factor-2 error in S (Gram ×4 or ×¼) or sqrt(2) (×2, ×½) fails.
    if op is _srht_matrix and m > 1 << (n - 1).bit_length():
        pytest.skip("srht needs m <= padded length")
    if op is _sketch_tensor_matrix and m > n:
        pytest.skip("sketch_tensor needs new_size <= n")
    g = _gen(10 + m)
    K = 300
    acc = torch.zeros(n, n, dtype=torch.float64)
    for _ in range(K):
        S = op(m, n, generator=g, dtype=torch.float64)
        assert S.shape == (m, n)
        acc += S.T @ S
    gram = acc / K
    diag = gram.diagonal()
    off = gram - torch.diag(diag)
    assert abs(diag.mean().item() - 1) < 0.08, diag
    assert (diag - 1).abs().max().item() < 0.3, diag
    assert off.abs().max().item() < 0.2, off


def test_exact_values_and_structure():
    m, n = 7, 40
    S = scaled_sign_sketch(m, n, generator=_gen(0), dtype=torch.float64)
    assert torch.equal(S.abs(), torch.full_like(S, 1 / math.sqrt(m)))

    C = count_skop(m, n, generator=_gen(0), dtype=torch.float64)
    assert torch.equal((C != 0).sum(0), torch.ones(n, dtype=torch.long))
    assert torch.equal(C.abs().sum(0), torch.ones(n, dtype=torch.float64))

    J = sjlt_skop(m, n, 4, generator=_gen(0), dtype=torch.float64)
    assert torch.equal((J != 0).sum(0), torch.full((n,), 4))  # distinct rows per column
    assert torch.allclose(J[J != 0].abs(), torch.tensor(0.5, dtype=torch.float64))

    # Short on a tall operator: rows carry the draws, distinct columns, scale sqrt(n/(m·k))
    T = sparse_sketch_operator(12, 5, 2, Axis.Short, generator=_gen(0), dtype=torch.float64).to_dense()
    assert torch.equal((T != 0).sum(1), torch.full((12,), 2))
    assert torch.allclose(T[T != 0].abs(), torch.tensor(math.sqrt(5 / 24), dtype=torch.float64))

    # Long on a wide operator: rows carry vec_nnz draws with replacement (repeats summed)
    L = sparse_sketch_operator(4, 9, 3, Axis.Long, generator=_gen(0), dtype=torch.float64).to_dense()
    c = math.sqrt(9 / 12)
    k = L / c  # integer sums of 3 signs per row
    torch.testing.assert_close(k, k.round())
    assert (k.abs().sum(1) <= 3).all() and (k.abs().sum(1) % 2 == 1).all()  # odd: 3 signs never cancel fully


def test_uniform_entries_bounded():
    S = dense_sketch_operator(50, 60, DistributionFamily.Uniform, generator=_gen(0), dtype=torch.float64)
    bound = math.sqrt(3 / 50)
    assert S.abs().max() <= bound
    assert S.abs().max() > 0.9 * bound


# ---------------------------------------------------------------------------------------------
# distance preservation (Johnson–Lindenstrauss)


@pytest.mark.parametrize("n", [512, 500])
def test_pairwise_distances_preserved(op, n):
    m, p = 256, 16
    gx = _gen(5)
    X = torch.randn(p, n, generator=gx, dtype=torch.float64)
    X[:4] = X[:4] * torch.linspace(0.01, 3, n, dtype=torch.float64)  # a few anisotropic points
    S = op(m, n, generator=_gen(6), dtype=torch.float64)
    Y = X @ S.T
    i, j = torch.triu_indices(p, p, 1)
    ratio = ((Y[i] - Y[j]).norm(dim=1) / (X[i] - X[j]).norm(dim=1)) ** 2
    # ‖Sx‖²/‖x‖² has sd ≈ sqrt(2/m) ≈ 0.09; 120 pairs
    assert ratio.min() > 0.5 and ratio.max() < 1.5, ratio
    assert abs(ratio.mean().item() - 1) < 0.15, ratio.mean()


# ---------------------------------------------------------------------------------------------
# srht


def test_fwht_is_sylvester_hadamard():
    H = torch.ones(1, 1, dtype=torch.float64)
    base = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    for _ in range(5):
        H = torch.kron(base, H)
        x = torch.randn(3, 2, H.shape[0], dtype=torch.float64)
        torch.testing.assert_close(_fwht(x), x @ H.T)


@pytest.mark.parametrize("m", [6, 13, 16])
@pytest.mark.parametrize("dim", [1, -2])
def test_srht_along_dim_equals_explicit_matrix(m, dim):
    n = 10  # not a power of two: padded to 16
    x = torch.randn(4, n, 3, generator=_gen(0), dtype=torch.float64)
    y = srht(x, m, dim=dim, generator=_gen(7))
    S = srht(torch.eye(n, dtype=torch.float64), m, dim=0, generator=_gen(7))
    assert y.shape == (4, m, 3)
    torch.testing.assert_close(y, torch.einsum("mn,bnc->bmc", S, x))


def test_srht_norm_preserved_in_expectation():
    # E‖Sx‖² = ‖x‖² for a fixed 1-D x (default dim=-1), with a spiky x where the padding matters;
    # without the sqrt(N/m) rescale the mean would be m/N = 3/8 of ‖x‖².
    v = torch.zeros(10, dtype=torch.float64)
    v[[0, 3, 9]] = torch.tensor([3.0, -1.0, 2.0], dtype=torch.float64)
    g = _gen(100)
    sq = torch.stack([srht(v, 6, generator=g).square().sum() for _ in range(400)])
    assert abs(sq.mean().item() / v.square().sum().item() - 1) < 0.1


def test_srht_full_rows_is_orthonormal_on_power_of_two():
    # m = n = N: S = H D / sqrt(N) up to a row permutation, an orthogonal matrix
    S = srht(torch.eye(32, dtype=torch.float64), 32, dim=0, generator=_gen(3))
    torch.testing.assert_close(S.T @ S, torch.eye(32, dtype=torch.float64))


def test_srht_half_and_dtype_arguments():
    x = torch.randn(3, 20, generator=_gen(0))
    ref = srht(x.double(), 8, generator=_gen(1))
    y16 = srht(x.half(), 8, generator=_gen(1))
    assert y16.dtype == torch.float16
    torch.testing.assert_close(y16.double(), ref, atol=1e-2, rtol=1e-2)
    y = srht(x, 8, generator=_gen(1), dtype=torch.float64)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, ref)
    assert srht(torch.arange(6), 4, generator=_gen(1)).dtype == torch.get_default_dtype()


def test_srht_and_sketch_tensor_gradcheck():
    x = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: srht(t, 4, dim=1, generator=_gen(0)), (x,))
    S = gaussian_skop(3, 5, generator=_gen(0), dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: sketch_tensor(t, -2, 3, sketch_matrix=S), (x,))


# ---------------------------------------------------------------------------------------------
# sketch_tensor


@pytest.mark.parametrize("axis", [0, 1, 2, -1, -3])
def test_sketch_tensor_matches_tensordot(axis):
    x = torch.randn(6, 7, 5, generator=_gen(0), dtype=torch.float64)
    n = x.shape[axis]
    out, S = sketch_tensor(x, axis, 4, DistributionFamily.Gaussian, generator=_gen(1))
    assert S.shape == (4, n) and S.dtype == torch.float64
    expected = torch.tensordot(S, x, dims=([1], [axis])).movedim(0, axis)
    torch.testing.assert_close(out, expected)
    # a given (dense or sparse) matrix gives the same result and returns only the tensor
    torch.testing.assert_close(sketch_tensor(x, axis, 4, sketch_matrix=S), expected)
    Ssp = sjlt_skop(4, n, 2, generator=_gen(2), dtype=torch.float64)
    torch.testing.assert_close(
        sketch_tensor(x, axis, 4, sketch_matrix=Ssp.to_sparse()),
        sketch_tensor(x, axis, 4, sketch_matrix=Ssp),
    )


def test_sketch_tensor_distribution_same_as_operator():
    x = torch.randn(5, 9)
    _, S = sketch_tensor(x, 1, 3, DistributionFamily.Uniform, generator=_gen(4))
    assert torch.equal(S, dense_sketch_operator(3, 9, DistributionFamily.Uniform, generator=_gen(4)))
    _, S2 = sketch_tensor(x, 1, 3, "gaussian", generator=_gen(4))
    assert torch.equal(S2, dense_sketch_operator(3, 9, "Gaussian", generator=_gen(4)))


# ---------------------------------------------------------------------------------------------
# sparse layouts


SPARSE_BUILDERS = {
    "count": lambda **kw: count_skop(9, 30, **kw),
    "sjlt": lambda **kw: sjlt_skop(9, 30, 4, **kw),
    "short_wide": lambda **kw: sparse_sketch_operator(9, 30, 3, Axis.Short, **kw),
    "short_tall": lambda **kw: sparse_sketch_operator(30, 9, 3, Axis.Short, **kw),
    "long_wide": lambda **kw: sparse_sketch_operator(9, 30, 20, Axis.Long, **kw),
    "long_tall": lambda **kw: sparse_sketch_operator(30, 9, 20, Axis.Long, **kw),
}


def _check_sparse_invariants(sp):
    # the library builds these with check_invariants=False; rebuild with checks (sorted, unique, in range)
    if sp.layout == torch.sparse_coo:
        assert sp.is_coalesced()
        r, c = sp.indices()
        lin = r * sp.shape[1] + c
        assert (lin[1:] > lin[:-1]).all()  # a coalesced COO is sorted and duplicate-free
        torch.sparse_coo_tensor(sp.indices(), sp.values(), sp.shape, check_invariants=True)
    elif sp.layout == torch.sparse_csr:
        torch.sparse_csr_tensor(sp.crow_indices(), sp.col_indices(), sp.values(), sp.shape, check_invariants=True)
    else:
        torch.sparse_csc_tensor(sp.ccol_indices(), sp.row_indices(), sp.values(), sp.shape, check_invariants=True)


@pytest.mark.parametrize("name", list(SPARSE_BUILDERS))
def test_sparse_layouts_equal_dense(name):
    build = SPARSE_BUILDERS[name]
    dense = build(layout=torch.strided, generator=_gen(8))
    assert dense.layout == torch.strided
    for layout in (torch.sparse_coo, torch.sparse_csr, torch.sparse_csc):
        sp = build(layout=layout, generator=_gen(8))
        assert sp.layout == layout
        assert torch.equal(sp.to_dense(), dense)
        _check_sparse_invariants(sp)
        if layout == torch.sparse_coo and not name.startswith("long"):
            assert sp._nnz() == int((dense != 0).sum())  # distinct indices: every stored value is a nonzero
    assert sparse_sketch_operator(4, 6, 2, Axis.Short).layout == torch.sparse_coo  # documented default
    assert count_skop(4, 6).layout == torch.strided


@pytest.mark.parametrize("high,k", [(5, 2), (3, 2), (6, 6), (40, 3)])
def test_distinct_indices_uniform_subsets(high, k):
    # covers both the Floyd (k² <= high) and the argsort (k² > high) branches
    count = 20000
    idx = _distinct_indices(count, high, k, _gen(11))
    assert idx.shape == (count, k)
    assert idx.min() >= 0 and idx.max() < high
    srt = idx.sort(dim=1).values
    assert (srt[:, 1:] != srt[:, :-1]).all()  # distinct
    freq = torch.bincount(idx.reshape(-1), minlength=high).double() / count
    torch.testing.assert_close(freq, torch.full((high,), k / high, dtype=torch.float64), atol=0.02, rtol=0)
    if math.comb(high, k) <= 20:  # every subset equally likely
        codes = (srt * torch.tensor([high**i for i in range(k)])).sum(1)
        _, counts = torch.unique(codes, return_counts=True)
        assert len(counts) == math.comb(high, k)
        assert (counts.double() / count - 1 / math.comb(high, k)).abs().max() < 0.015


# ---------------------------------------------------------------------------------------------
# dtype / device


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_dtype_honoured(op, dtype):
    S = op(5, 8, generator=_gen(0), dtype=dtype)
    assert S.dtype == dtype and S.device.type == "cpu"
    # low precision is a rounding of the same draw
    S64 = op(5, 8, generator=_gen(0), dtype=torch.float64)
    if dtype in (torch.float32, torch.float64):
        torch.testing.assert_close(S.double(), S64, atol=1e-6, rtol=1e-6)
    else:
        torch.testing.assert_close(S.double(), S64, atol=1e-2, rtol=1e-2)


def test_default_dtype_followed(op):
    old = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float64)
        assert op(3, 4).dtype == torch.float64
    finally:
        torch.set_default_dtype(old)
    assert op(3, 4).dtype == old


def test_device_argument_cpu_and_meta():
    for f in (scaled_sign_sketch, gaussian_skop, count_skop, lambda m, n, **kw: sjlt_skop(m, n, 2, **kw)):
        assert f(3, 4, device="cpu").device.type == "cpu"
        assert f(3, 4, device=torch.device("meta")).device.type == "meta"
    x = torch.randn(2, 8)
    assert srht(x, 4, device="meta").device.type == "meta"
    out, S = sketch_tensor(x, 1, 3, DistributionFamily.Gaussian, device="meta")
    assert out.device.type == "meta" and S.device.type == "meta" and out.shape == (2, 3)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_same_draws_as_cpu(op):
    # drawn on the (CPU) generator's device, then moved: identical values on CUDA
    a = op(6, 10, generator=_gen(0))
    b = op(6, 10, generator=_gen(0), device="cuda")
    assert b.device.type == "cuda"
    torch.testing.assert_close(b.cpu(), a)
    gc = torch.Generator(device="cuda").manual_seed(0)
    c = op(6, 10, generator=gc)
    assert c.device.type == "cuda"
    x = torch.randn(3, 11, 2, device="cuda")
    y = srht(x, 5, dim=1, generator=torch.Generator(device="cuda").manual_seed(1))
    assert y.device.type == "cuda" and y.shape == (3, 5, 2)
    sp = sjlt_skop(6, 10, 2, layout=torch.sparse_csr, device="cuda", generator=_gen(0))
    assert sp.device.type == "cuda"
    torch.testing.assert_close(sp.to_dense().cpu(), sjlt_skop(6, 10, 2, generator=_gen(0)))


# ---------------------------------------------------------------------------------------------
# validation


x3 = torch.randn(2, 5, 3)
S_ok = torch.randn(2, 5)
BAD = [
    (lambda: scaled_sign_sketch(0, 3), ValueError, "m must"),
    (lambda: scaled_sign_sketch(3, -1), ValueError, "n must"),
    (lambda: scaled_sign_sketch(2.5, 3), TypeError, "m must be an int"),
    (lambda: scaled_sign_sketch(True, 3), TypeError, "m must be an int"),
    (lambda: scaled_sign_sketch(2, 3, dtype=torch.int64), TypeError, "dtype"),
    (lambda: scaled_sign_sketch(2, 3, generator=5), TypeError, "generator"),
    (lambda: gaussian_skop(2, 0), ValueError, "d must"),
    (lambda: dense_sketch_operator(2, 3, "laplace"), TypeError, "distribution"),
    (lambda: dense_sketch_operator(0, 3, DistributionFamily.Gaussian), ValueError, "m must"),
    (lambda: count_skop(0, 3), ValueError, "m must"),
    (lambda: count_skop(2, 3, layout="coo"), TypeError, "layout"),
    (lambda: count_skop(2, 3, layout=torch.sparse_bsr), ValueError, "layout"),
    (lambda: sjlt_skop(3, 5, sparsity=4), ValueError, "sparsity"),
    (lambda: sjlt_skop(3, 5, sparsity=0), ValueError, "sparsity"),
    (lambda: sparse_sketch_operator(3, 5, 4, Axis.Short), ValueError, "vec_nnz"),
    (lambda: sparse_sketch_operator(3, 5, 2, "short"), TypeError, "axis"),
    (lambda: sparse_sketch_operator(3, 5, 0, Axis.Long), ValueError, "vec_nnz"),
    (lambda: sketch_tensor(x3, 3, 2, DistributionFamily.Gaussian), ValueError, "axis"),
    (lambda: sketch_tensor(x3, -4, 2, DistributionFamily.Gaussian), ValueError, "axis"),
    (lambda: sketch_tensor(x3, 1.0, 2, DistributionFamily.Gaussian), TypeError, "axis"),
    (lambda: sketch_tensor(x3, 1, 6, DistributionFamily.Gaussian), ValueError, "new_size"),
    (lambda: sketch_tensor(x3, 1, 0, DistributionFamily.Gaussian), ValueError, "new_size"),
    (lambda: sketch_tensor(x3, 1, 2), ValueError, "distribution and sketch_matrix"),
    (lambda: sketch_tensor(x3, 1, 2, DistributionFamily.Gaussian, S_ok), ValueError, "exactly one"),
    (lambda: sketch_tensor(x3, 1, 2, sketch_matrix=S_ok.T), ValueError, "sketch_matrix must have shape"),
    (lambda: sketch_tensor(x3, 1, 3, sketch_matrix=S_ok), ValueError, "sketch_matrix must have shape"),
    (lambda: sketch_tensor(x3, 1, 2, sketch_matrix=[[1.0]]), TypeError, "sketch_matrix"),
    (lambda: sketch_tensor([1.0], 0, 1, DistributionFamily.Gaussian), TypeError, "input"),
    (lambda: srht(x3, 9, dim=1), ValueError, "m must"),
    (lambda: srht(x3, 0, dim=1), ValueError, "m must"),
    (lambda: srht(x3, 2, dim=3), ValueError, "dim"),
    (lambda: srht(torch.zeros(3, 0), 1), ValueError, "x.size"),
    (lambda: srht(torch.zeros(4, dtype=torch.complex64), 2), TypeError, "real"),
    (lambda: srht([1.0, 2.0], 1), TypeError, "x must"),
]


@pytest.mark.parametrize("call,exc,match", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_all_exported():
    names = {"scaled_sign_sketch", "gaussian_skop", "srht", "count_skop", "sjlt_skop", "dense_sketch_operator",
             "sketch_tensor", "sparse_sketch_operator", "DistributionFamily", "Axis"}
    assert names <= set(sk.__all__)
    for name in sk.__all__:
        assert hasattr(sk, name)
    assert {e.name for e in DistributionFamily} == {"Gaussian", "Uniform"}
    assert {e.name for e in Axis} == {"Short", "Long"}
    assert len(sk.__all__) == len(set(sk.__all__))  # no duplicates
