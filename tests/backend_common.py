"""Helpers shared by the tests of backend="panther" on attention and other layers."""
import torch

from panther.backend import panther_backend
from panther.policy import seed_for
from panther.sketch import orthogonal_random_features

#: AOTAutograd without Inductor: what these tests check does not depend on the generated code
FAST = {"compiler": "aot_eager"}


def compile_panther(model, **options):
    """``torch.compile(model, backend="panther")`` from a fresh Dynamo, and the list its reports go to."""
    torch._dynamo.reset()
    reports = []
    return torch.compile(model, backend=panther_backend, options={**FAST, "report": reports.append, **options}), reports


def features(spec, name, d=8):
    """The ``(m, d)`` random features an attention layer called ``name`` gets for a seeded ``spec``."""
    return orthogonal_random_features(spec.num_random_features, d,
                                      generator=torch.Generator().manual_seed(seed_for(spec, name)))


def padded_qkv():
    """``q, k, v`` of shape (2, 3, 9, 8) and the keys each sequence keeps, ``(2, 9)``: the second sequence is
    padded from position 6."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 9, 8, generator=g) for _ in range(3))
    keep = torch.ones(2, 9, dtype=torch.bool)
    keep[1, 6:] = False
    return q, k, v, keep
