"""Helpers shared by the TRITON_INTERPRET checker scripts (run as subprocesses by the tests)."""
import itertools
import sys

import torch

# tolerances of the attention checkers: fp32 tight; half precision rounds the features and products
ATTENTION_TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}


def seeded_generators(first_seed):
    """A ``gen()`` giving a fresh CPU generator per call (seeds first_seed + 1, + 2, ...), so that
    every case of a checker draws its own reproducible inputs."""
    seeds = itertools.count(first_seed + 1)
    return lambda: torch.Generator().manual_seed(next(seeds))


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def check(name, err, tol):
    ok = err < tol
    print(f"{'ok  ' if ok else 'FAIL'} {name}: rel err {err:.2e} (tol {tol:.0e})", flush=True)
    if not ok:
        sys.exit(1)


def padding_mask(B, S, generator):
    """A (B, S) key-padding mask (True = ignore) with the hard cases: ~30% random keys masked, a
    masked prefix (early queries see no key at all) and, with B > 1, a fully masked row."""
    mask = torch.rand(B, S, generator=generator) < 0.3
    mask[0, : min(S, 5)] = True
    if B > 1:
        mask[1] = True
    return mask
