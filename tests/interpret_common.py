"""Helpers shared by the TRITON_INTERPRET checker scripts (run as subprocesses by the tests)."""
import sys


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def check(name, err, tol):
    ok = err < tol
    print(f"{'ok  ' if ok else 'FAIL'} {name}: rel err {err:.2e} (tol {tol:.0e})", flush=True)
    if not ok:
        sys.exit(1)
