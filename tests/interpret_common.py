"""Helpers shared by the TRITON_INTERPRET checker scripts (run as subprocesses by the tests), and the
tests' runner of those scripts."""
import itertools
import os
import subprocess
import sys
from pathlib import Path

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


def run_interpreter_check(script, marker):
    """Run ``tests/<script>`` in a subprocess with ``TRITON_INTERPRET=1`` (it must be set before triton
    is imported) and fail, with the end of its output, unless it exits 0 having printed ``marker``."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(root / "tests" / script)], env=env, cwd=root,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and marker in proc.stdout, proc.stdout[-4000:] + proc.stderr[-4000:]
