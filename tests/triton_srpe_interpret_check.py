"""Checks the sine-SRPE Triton kernel's arithmetic in Triton's CPU interpreter.

Run by tests/test_triton_srpe.py in ONE subprocess with ``TRITON_INTERPRET=1`` (the variable must be
set before triton is imported). Every case calls the op on CPU tensors (the interpreter serves them)
and compares it with ``srpe_filter_reference`` in float64 over the bases of
``sine_bases``; prints one line per case and exits non-zero on the first failure.
"""
import copy
import os

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

import torch  # noqa: E402

import panther  # noqa: E402,F401
# tests/ is on sys.path: run as a script
from interpret_common import check, rel, seeded_generators  # noqa: E402
from inductor_ext import triton_srpe as ts  # noqa: E402
from panther.nn import sinSRPE  # noqa: E402
from panther.ops.attention import sine_bases, srpe_filter_reference  # noqa: E402

gen = seeded_generators(0)
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def case(B, L, H, d, S, R, dtype, phase, big_positions=False):
    g = gen()
    x = torch.randn(B, L, H, d, generator=g).to(dtype)
    # slow sines, as sinSRPE draws them; big_positions: angles far past 2 pi (sin / cos reduction)
    theta = torch.rand(H, d, S, generator=g) * (3.0 if big_positions else 0.1)
    ph = torch.randn(H, d, S, generator=g) if phase else None
    w = (torch.randn(H, d, 2 * S, R, generator=g) / (d * S) ** 0.5).to(dtype)
    assert ts.kernel_ok(x, theta, w)
    out = ts.srpe_filter_sines(x, theta, ph, w)
    omega = sine_bases(theta.double(), None if ph is None else ph.double(), L)
    ref = srpe_filter_reference(x.double(), omega, w.double())
    assert out.dtype == dtype and out.shape == (B, L, H, R)
    check(f"B={B} L={L} H={H} d={d} S={S} R={R} {dtype} phase={phase}", rel(out, ref), TOL[dtype])


case(2, 70, 3, 5, 3, 7, torch.float32, True)       # tails everywhere: positions, features, sines, R
case(1, 64, 2, 16, 8, 40, torch.float32, False)    # keys: no phase
case(1, 130, 1, 64, 8, 256, torch.float32, True)   # two output blocks, several feature blocks
case(2, 33, 2, 8, 1, 16, torch.float32, True)      # one sine
case(1, 40, 2, 12, 4, 24, torch.bfloat16, True)
case(1, 40, 2, 12, 4, 24, torch.float16, False)
case(1, 50, 1, 4, 2, 8, torch.float32, True, big_positions=True)


def backward_case(B, L, H, d, S, R, dtype, phase, cfg=None, splits=None, need_dz=True,
                  need_dw=True, tol=None, strided=False):
    """The backward kernel against the float64 autograd of ``srpe_filter_reference``: every
    gradient, with the rows in ``splits`` ranges and the outputs in blocks of ``cfg.block_r``.
    ``strided``: x and the output gradient are (B, H, L, .) tensors seen as (B, L, H, .)."""
    g = gen()
    x = torch.randn(B, L, H, d, generator=g).to(dtype)
    if strided:
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    theta = torch.rand(H, d, S, generator=g) * 0.1
    ph = torch.randn(H, d, S, generator=g) if phase else None
    w = (torch.randn(H, d, 2 * S, R, generator=g) / (d * S) ** 0.5).to(dtype)
    go = torch.randn(B, L, H, R, generator=g).to(dtype)
    if strided:
        go = go.transpose(1, 2).contiguous().transpose(1, 2)
    got = ts._launch_backward(go, x, theta, ph, w, need_dz, need_dw, cfg=cfg, splits=splits)
    leaves = [t.double().requires_grad_() if t is not None else None for t in (x, theta, ph, w)]
    omega = sine_bases(leaves[1], leaves[2], L)
    ref = torch.autograd.grad(srpe_filter_reference(leaves[0], omega, leaves[3]),
                              [t for t in leaves if t is not None], go.double())
    ref = list(ref[:2]) + ([ref[2]] if phase else [None]) + [ref[-1]]
    name = f"backward B={B} L={L} H={H} d={d} S={S} R={R} {dtype} phase={phase} splits={splits}"
    wanted = (need_dz, need_dz, need_dz and phase, need_dw)
    for grad_name, want, a, b in zip(("dx", "dtheta", "dphase", "dweight"), wanted, got, ref):
        if want:
            assert a.dtype == (dtype if grad_name in ("dx", "dweight") else torch.float32), grad_name
            assert a.shape == b.shape, grad_name
            check(f"{name}: {grad_name}", rel(a, b), tol or TOL[dtype])
        else:
            assert a is None, grad_name


backward_case(2, 70, 3, 5, 3, 7, torch.float32, True)                      # tails everywhere
backward_case(2, 70, 2, 6, 3, 40, torch.float32, True, splits=3,          # row ranges across the batch
              cfg=ts.Launch(block_n=16, rows=16, block_r=16, warps=4))    # and dx over 3 output blocks
backward_case(1, 64, 2, 16, 8, 24, torch.float32, False, splits=2)         # keys: no phase
backward_case(2, 30, 3, 8, 2, 16, torch.float32, True, strided=True)      # head-major x and gradient
backward_case(1, 33, 2, 8, 1, 16, torch.float32, True)                     # one sine
backward_case(1, 40, 2, 12, 4, 24, torch.float32, True, need_dw=False)
backward_case(1, 40, 2, 12, 4, 24, torch.float32, True, need_dz=False)
backward_case(1, 40, 2, 12, 4, 24, torch.bfloat16, True, tol=2e-2)
backward_case(1, 40, 2, 12, 4, 24, torch.float16, False)
# sinSRPE's filter through the kernel (as on CUDA) against its CPU path: outputs and every gradient
pe = sinSRPE(2, 16, 4, num_realizations=32, seed=0)
q, k = torch.randn(2, 50, 2, 16, generator=gen()), torch.randn(2, 40, 2, 16, generator=gen())
results = []
for fused in (False, True):
    m = copy.deepcopy(pe)
    qd, kd = q.clone().requires_grad_(), k.clone().requires_grad_()
    if fused:
        theta, phase = m.angles()
        qh, kh = (ts.srpe_filter_sines(qd, theta, phase, m.mixing()),
                  ts.srpe_filter_sines(kd, theta, None, m.mixing()))
    else:
        qh, kh = m.filter(qd, kd)
    (qh.square().sum() + kh.sum()).backward()
    results.append((qh, kh, qd.grad, kd.grad, m.freqs.grad, m.phases.grad, m.scales.grad))
for name, cpu_path, kernel in zip(("qhat", "khat", "dq", "dk", "dfreqs", "dphases", "dscales"), *results):
    check(f"sinSRPE through the kernel: {name}", rel(kernel, cpu_path), 1e-5)

# the bench's code path (python -m inductor_ext.triton_attention_bench --srpe), untimed here
row, = ts.bench_srpe(cases=[(40, 2)], H=2, d=8, sines=3, R=16, dtype=torch.float32, device="cpu")
check("bench_srpe: fused vs materialised", float(row["fused vs materialised rel err"]), 1e-5)
print("all srpe interpreter checks passed")
