"""fx_passes.index_pattern reads masks of symbolic sizes for every length: what it reads must be what the mask is
at each length the graph serves. Many masks are captured in one graph under ``dynamic=True``; each one it reads
is materialised at lengths 2 to 24 and compared with the mask computed eagerly at that length."""
import itertools
import operator

import pytest
import torch

from fx_passes import index_pattern

COMPARISONS = (operator.le, operator.lt, operator.ge, operator.gt)
# a * kv_idx + b * q_idx + c compared with 0: every sign and slope, diagonals shifted either way
LINEAR = [lambda q, k, L, a=a, b=b, c=c, op=op: op(a * k + b * q + c, 0)
          for a, b, c, op in itertools.product((-2, -1, 0, 1, 2), (-2, -1, 0, 1), (-2, 0, 1, 3), COMPARISONS)]
OTHERS = [
    lambda q, k, L: k <= q,
    lambda q, k, L: q - k < 15,  # all True up to 15 positions only
    lambda q, k, L: ~(k <= q),
    lambda q, k, L: (k <= q) & (q >= 0),
    lambda q, k, L: (k <= q) & (k + 1 <= q + 1),
    lambda q, k, L: torch.where(k <= q, 0.0, float("-inf")),
    lambda q, k, L: (k > q).float() * -1e4,
    lambda q, k, L: 1 - (k <= q).long(),
    lambda q, k, L: (k <= q)[None, None].expand(2, 1, L, L),
    lambda q, k, L: (k <= q)[:L, :L],
    lambda q, k, L: torch.ones(L, L, dtype=torch.bool).tril(),
    lambda q, k, L: torch.ones(L, L, dtype=torch.bool).tril(-1),
    lambda q, k, L: torch.ones(L, L).triu(1) == 0,
    lambda q, k, L: torch.triu(torch.full((L, L), float("-inf")), diagonal=1),
    lambda q, k, L: torch.full((L, L), float("-inf")).triu(2),
    lambda q, k, L: torch.hstack([torch.zeros((L, 0)), torch.full((L, L), float("-inf")).triu(1)]),
    lambda q, k, L: torch.zeros(L, L).masked_fill(k > q, float("-inf")),
    lambda q, k, L: torch.triu(torch.full((L, L), float("-inf")), diagonal=1).view(1, 1, L, L),  # nn.MHA's view
    lambda q, k, L: (k <= q)[None].expand(3, L, L).reshape(1, 3, L, L),
    # not diagonals: read as nothing, or never as a wrong pattern
    lambda q, k, L: (k <= q) & (q - k < 3),
    lambda q, k, L: (k <= q) | (q - k > 100),  # causal up to 101 positions only
    lambda q, k, L: k <= q + L // 2,
    lambda q, k, L: k.mT <= q.mT,
    lambda q, k, L: (k <= q).flip(-1),
    lambda q, k, L: k * k <= q,
    lambda q, k, L: (k <= q)[None].expand(2, L, L).reshape(2 * L, L),  # rows of two heads: a triangle twice
    lambda q, k, L: (k <= q).reshape(L * L),
]
MASKS = LINEAR + OTHERS


def _all_masks(x):
    L = x.shape[0]
    q, k = torch.arange(L)[:, None], torch.arange(L)[None, :]
    return tuple(m(q, k, L) for m in MASKS)


@pytest.fixture(scope="module")
def captured():
    """The graph of all masks under ``dynamic=True`` and the node of each one."""
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(_all_masks, backend=capture, dynamic=True)(torch.empty(5))
    (gm,) = graphs
    (output,) = [n for n in gm.graph.nodes if n.op == "output"]
    nodes = output.args[0]
    assert len(nodes) == len(MASKS)
    return nodes


def materialise(pattern: index_pattern.Pattern, shape) -> torch.Tensor:
    L = shape[-1]
    i, j = torch.arange(L)[:, None], torch.arange(L)[None, :]
    where = torch.ones(L, L, dtype=torch.bool) if pattern.diagonal is None else j - i <= pattern.diagonal
    return torch.where(where, pattern.hi, pattern.lo).expand(shape)


def test_what_is_read_is_the_mask_at_every_length(captured):
    read = [index_pattern.read(n, lambda _: None) for n in captured]
    for length in range(2, 25):
        q, k = torch.arange(length)[:, None], torch.arange(length)[None, :]
        for mask, pattern in zip(MASKS, read):
            if isinstance(pattern, index_pattern.Pattern):
                expect = mask(q, k, length)
                got = materialise(pattern, expect.shape)
                assert got.dtype == expect.dtype and torch.equal(got, expect), (MASKS.index(mask), length, pattern)
    # it is not vacuous: the diagonals and the constants it should read, it reads
    assert all(isinstance(p, index_pattern.Pattern) for p in read[len(LINEAR):len(LINEAR) + 19])
    assert not any(isinstance(p, index_pattern.Pattern) for p in read[len(LINEAR) + 19:])
    diagonal = [isinstance(p, index_pattern.Pattern) and p.diagonal is not None for p in read[:len(LINEAR)]]
    slopes = [a == -b != 0 for a, b, c, op in itertools.product((-2, -1, 0, 1, 2), (-2, -1, 0, 1), (-2, 0, 1, 3),
                                                               COMPARISONS)]
    assert diagonal == slopes


def test_the_causal_triangle_is_read_as_one(captured):
    causal = index_pattern.read(captured[len(LINEAR)], lambda _: None)
    assert causal.diagonal == 0 and bool(causal.hi) and not bool(causal.lo)
    wide = index_pattern.read(captured[len(LINEAR) + 1], lambda _: None)  # q - k < 15: not True at every length
    assert wide.diagonal is not None


def test_a_module_buffer_triangle_and_its_slices():
    """minGPT's ``bias`` buffer: its lower triangle, sliced to the sequence, is the causal triangle at every length."""
    bias = torch.ones(32, 32).tril().view(1, 1, 32, 32)
    pattern = index_pattern._triangle(bias)
    assert pattern.diagonal == 0 and float(pattern.hi) == 1 and float(pattern.lo) == 0
    for d in (-1, 1):
        assert index_pattern._triangle(torch.ones(8, 8).tril(d)).diagonal == d
    assert index_pattern._triangle(torch.full((4, 4), 2.0)).diagonal is None
    with pytest.raises(index_pattern._Unread):  # a band is not a triangle
        index_pattern._triangle(torch.ones(8, 8).tril() - torch.ones(8, 8).tril(-3))
