"""Helpers shared by the TRITON_INTERPRET checker scripts (run as subprocesses by the tests), and the
tests' runner of those scripts."""
import functools
import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
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


# A loop over a runtime bound, as every kernel here has. Triton 3.6's interpreter takes such a bound
# with int() of a one-element array, which numpy 2.4 refuses; later Triton squeezes it first.
_LOOP_PROBE = """
import torch, triton, triton.language as tl
@triton.jit
def probe(X, n):
    for i in range(0, n, 1):
        tl.store(X + i, i)
x = torch.zeros(3, dtype=torch.int32)
probe[(1,)](x, 3)
assert x.tolist() == [0, 1, 2]
"""
_NUMPY_SCALAR_ERROR = "only 0-dimensional arrays can be converted to Python scalars"


def _interpret_env():
    root = Path(__file__).resolve().parents[1]
    return root, {**os.environ, "TRITON_INTERPRET": "1",
                  "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}


@functools.lru_cache(maxsize=None)
def interpreter_loop_error():
    """The known Triton / numpy mismatch that stops the interpreter at a runtime loop bound, if this
    environment has it (else None). Any other failure is left to the checks themselves."""
    root, env = _interpret_env()
    proc = subprocess.run([sys.executable, "-c", _LOOP_PROBE], env=env, cwd=root,
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and _NUMPY_SCALAR_ERROR in proc.stderr:
        import numpy
        import triton
        return (f"Triton {triton.__version__}'s interpreter cannot take a runtime loop bound with "
                f"numpy {numpy.__version__} ({_NUMPY_SCALAR_ERROR}); a later Triton can")
    return None


def run_interpreter_check(script, marker):
    """Run ``tests/<script>`` in a subprocess with ``TRITON_INTERPRET=1`` (it must be set before triton
    is imported) and fail, with the end of its output, unless it exits 0 having printed ``marker``.
    Skipped only where the interpreter itself cannot run the kernels (``interpreter_loop_error``)."""
    reason = interpreter_loop_error()
    if reason:
        pytest.skip(reason)
    root, env = _interpret_env()
    proc = subprocess.run([sys.executable, str(root / "tests" / script)], env=env, cwd=root,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and marker in proc.stdout, proc.stdout[-4000:] + proc.stderr[-4000:]
