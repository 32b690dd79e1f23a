"""Timing of the fused Triton sketched-linear kernels against cuBLAS and the C++ op, in one run.

    python -m inductor_ext.triton_linear_bench            # the two H200 workloads of issue [D]
    python -m inductor_ext.triton_linear_bench --markdown docs/benchmarks.md   # and write the tables there

Every row is a median of CUDA-event timings (``triton.testing.do_bench``, L2 flushed between runs)
taken in the same process: as eager calls (Python and launch overhead included), as eager calls queued
back to back with no synchronisation (``panther.bench.back_to_back_time_fn``: about max(CPU, GPU) per
call, what a layer of an eager model costs) and replayed from a CUDA graph (``do_bench_cudagraph``: GPU
time only); the memory floor is the bytes that must move (each tensor once) over the device-to-device
copy bandwidth measured in the same run.
"""
from __future__ import annotations

import torch
from tabulate import tabulate

import panther  # noqa: F401  (loads the C++ op)
from panther.bench import back_to_back_time_fn
from panther.ops.linear import concat_factors

from . import triton_linear as tlin
from ._timing import graph_median_ms as _graph_ms
from ._timing import median_ms as _ms

__all__ = ["bench_triton_linear", "sweep_grad_pass", "main"]


def _copy_bandwidth(numel, dtype, device):
    """Bytes per ms of a device-to-device copy, counting bytes read plus bytes written."""
    a = torch.empty(numel, dtype=dtype, device=device).normal_()
    b = torch.empty_like(a)
    return 2 * a.numel() * a.element_size() / _ms(lambda: b.copy_(a))


def bench_triton_linear(in_features=8192, out_features=8192, batch=16384, num_terms=1, low_rank=16, *,
                        dtype=torch.bfloat16, device="cuda", backward=True, seed=0):
    """Time forward (and forward+backward) of cuBLAS two-GEMM, the C++ op and the Triton kernels.

    Returns ``(rows, headers)`` for tabulate. Backward rows take gradients for x, S1s, S2s and bias
    (U1s, U2s are SKLinear's frozen buffers) with a random upstream gradient.
    """
    if torch.device(device).type != "cuda":
        raise ValueError(f"bench_triton_linear needs a CUDA device, got {device!r}")
    g = torch.Generator(device=device).manual_seed(seed)
    L, k, d_in, d_out, N = num_terms, low_rank, in_features, out_features, batch

    def mk(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device, dtype=torch.float32) * scale).to(dtype)

    x = mk(N, d_in)
    S1s, U2s = mk(L, d_in, k, scale=d_in ** -0.5), mk(L, d_in, k, scale=d_in ** -0.5)
    S2s, U1s = mk(L, k, d_out, scale=k ** -0.5), mk(L, k, d_out, scale=k ** -0.5)
    bias = mk(d_out)
    fac = (S1s, S2s, U1s, U2s)
    A, Bm = concat_factors(*fac)
    gy = mk(N, d_out)
    esize = x.element_size()
    factor_bytes = sum(t.numel() for t in fac) * esize + bias.numel() * esize
    bw = _copy_bandwidth(max(x.numel(), 1 << 26), dtype, device)

    rows = []

    def row(name, ms, floor_ms=None, graph_ms=None, queued_ms=None):
        rows.append([name, f"{ms:.4f}", f"{queued_ms:.4f}" if queued_ms else "",
                     f"{graph_ms:.4f}" if graph_ms else "",
                     f"{min(ms, graph_ms or ms) / floor_ms:.2f}x" if floor_ms else "",
                     f"{floor_ms:.4f}" if floor_ms else ""])

    def timed(name, fn, floor_ms=None):
        row(name, _ms(fn), floor_ms, _graph_ms(fn), back_to_back_time_fn(fn, device=device))

    fwd_floor = (x.numel() + N * d_out) * esize / bw + factor_bytes / bw
    # what sketched_linear_triton runs at this rank: the fused kernel or (2Lk above
    # CUDA_FUSED_MAX_RANK) two cuBLAS GEMMs
    path = "fused kernel" if tlin._served(x, S1s, S2s) else "two cuBLAS GEMMs"
    with torch.no_grad():
        # the C++ op's math with factors concatenated ahead of time (its best case)
        timed("fwd: cuBLAS two-GEMM (x@A, addmm; A, Bm prebuilt)", lambda: torch.addmm(bias, x @ A, Bm), fwd_floor)
        timed("fwd: C++ op panther::sketched_linear", lambda: torch.ops.panther.sketched_linear(x, *fac, bias),
              fwd_floor)
        timed(f"fwd: sketched_linear_triton ({path})", lambda: tlin.sketched_linear_triton(x, *fac, bias),
              fwd_floor)
        timed(f"fwd: the C++ op compiled, backend=panther ({_compiled_path(x, *fac, bias)})",
              _compiled(lambda x: torch.ops.panther.sketched_linear(x, *fac, bias), x), fwd_floor)
    row("fwd memory floor (x + y + factors once)", fwd_floor)

    if backward:
        # floor: x, y, g, dx once each; the current design also re-reads x (dS1s)
        bwd_floor = (2 * x.numel() + 2 * N * d_out) * esize / bw + 2 * factor_bytes / bw
        reread_floor = bwd_floor + x.numel() * esize / bw
        leaves = [t.detach().requires_grad_(True) for t in (x, S1s, S2s, bias)]
        xs, S1g, S2g, bg = leaves

        def fwd_bwd(op):
            def step():
                y = op(xs, S1g, S2g, U1s, U2s, bg)
                torch.autograd.grad(y, leaves, gy)
            return step

        timed("fwd+bwd: C++ op", fwd_bwd(torch.ops.panther.sketched_linear), bwd_floor)
        timed(f"fwd+bwd: sketched_linear_triton ({path})", fwd_bwd(tlin.sketched_linear_triton), bwd_floor)
        compiled_op = torch.compile(lambda *args: torch.ops.panther.sketched_linear(*args),
                                    backend=_panther_backend())
        timed(f"fwd+bwd: the C++ op compiled, backend=panther ({_compiled_path(x, *fac, bias)})",
              fwd_bwd(compiled_op), bwd_floor)
        with torch.no_grad():
            _, xA = torch.ops.panther.sketched_linear_triton_fwd(x, *fac, bias)
            H = L * k
            grads = torch.ops.panther.sketched_linear_triton_grads
            timed(f"  part: one pass over g: dx, dxA, dS2s, db ({path})",
                  lambda: grads(gy, None, xA, *fac, True, False, True, True))
            if tlin._served(gy, S1s, S2s, "backward"):
                parts, _, _ = tlin.grad_pass(gy, xA[:, H:], tlin._half_out(U1s).mT, tlin._half_out(S2s).mT)
                timed("    of which: grad_pass (g read once, partials)",
                      lambda: tlin.grad_pass(gy, xA[:, H:], tlin._half_out(U1s).mT, tlin._half_out(S2s).mT))
                timed("    of which: dx from the partials",
                      lambda: tlin.chain_from_partials(parts, tlin._half_in(S1s).mT, tlin._half_in(U2s).mT,
                                                       None, 1.0 / (2 * L), dtype=dtype))
            _, dxA, _, _ = grads(gy, None, xA, *fac, True, False, True, True)
            timed("  part: dS1s GEMM x^T dxA", lambda: x.mT @ dxA[:, :H])
            timed("  (before: dx, dxA kernel)", lambda: torch.ops.panther.sketched_linear_triton_bwd(gy, None, *fac))
        row("fwd+bwd memory floor (x, y, g, dx once)", bwd_floor)
        row("fwd+bwd floor with x re-read for dS1s", reread_floor)
    headers = ["what", "median ms", "back-to-back ms", "CUDA-graph ms", "best / floor", "floor ms"]
    return rows, headers


def _panther_backend():
    from panther.backend import panther_backend

    return panther_backend


def _compiled(fn, x):
    """``fn`` compiled with ``backend="panther"`` (Inductor), compiled here rather than in the timing."""
    compiled = torch.compile(fn, backend=_panther_backend())
    compiled(x)
    return lambda: compiled(x)


def _compiled_path(x, *fac):
    from .kernel_routing import linear_routed

    return "routed to the fused kernel" if linear_routed(x, *fac) else "two GEMMs"


# --sweep-grad-pass's launch candidates (BLOCK_M, BLOCK_N, num_warps, num_stages), by element size:
# fp32's hold smaller tiles (its operands take twice the shared memory, tf32x3 three products)
_GRAD_PASS_CANDIDATES = {
    2: ((64, 256, 8, 3), (64, 128, 4, 4), (128, 128, 8, 4), (32, 512, 8, 3), (64, 256, 8, 4),
        (128, 256, 8, 3)),
    4: ((64, 64, 8, 2), (64, 64, 4, 2), (64, 64, 8, 3), (64, 128, 8, 2), (128, 64, 8, 2),
        (32, 128, 4, 3), (64, 128, 4, 3), (128, 128, 8, 2), (32, 64, 4, 3)),
}


def sweep_grad_pass(in_features=8192, out_features=8192, batch=16384, num_terms=1, low_rank=16, *,
                    dtype=torch.bfloat16, device="cuda", seed=0):
    """CUDA-graph ms of the backward's pass over g and of the dx launch over its partials, for launch
    configurations, partial dtypes and row splits: the data behind ``_GRAD_PASS_CONFIG``."""
    g = torch.Generator(device=device).manual_seed(seed)
    L, k, N = num_terms, low_rank, batch
    H = L * k

    def mk(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=torch.float32).to(dtype)

    gy, xA = mk(N, out_features), mk(N, 2 * H)
    BL, BH = mk(H, out_features).mT, mk(H, out_features).mT
    GL, GH = mk(H, in_features), mk(H, in_features)
    sms = torch.cuda.get_device_properties(device).multi_processor_count if torch.device(device).type == "cuda" else 2
    rows = []
    for cfg in _GRAD_PASS_CANDIDATES[dtype.itemsize]:
        J = -(-out_features // cfg[1])
        # fp32 calls keep fp32 partials (bf16 ones would cost fp32's accuracy)
        for part_dtype in (torch.float32,) if dtype == torch.float32 else (torch.float32, torch.bfloat16):
            for splits in sorted({max(1, -(-sms // J)), max(1, -(-2 * sms // J)), max(1, -(-4 * sms // J))}):
                def pass_():
                    return tlin.grad_pass(gy, xA[:, H:], BL, BH, config=cfg, row_splits=splits,
                                          part_dtype=part_dtype)
                try:
                    parts = pass_()[0]
                    t1 = _graph_ms(pass_)
                    t2 = _graph_ms(lambda: tlin.chain_from_partials(parts, GL, GH, None, 0.5, dtype=dtype))
                    t12 = _graph_ms(lambda: tlin.chain_from_partials(pass_()[0], GL, GH, None, 0.5, dtype=dtype))
                    rows.append([str(cfg), str(part_dtype).split(".")[-1], splits, J * splits,
                                 f"{t1:.4f}", f"{t2:.4f}", f"{t12:.4f}"])
                except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory
                    rows.append([str(cfg), str(part_dtype).split(".")[-1], splits, J * splits,
                                 f"{type(exc).__name__}", "", ""])
                print(rows[-1], flush=True)
    return rows, ["config (BM, BN, warps, stages)", "partials", "row splits", "programs", "grad pass ms",
                  "dx from partials ms", "both ms"]


def main(argv=None):
    import argparse

    p = argparse.ArgumentParser(prog="python -m inductor_ext.triton_linear_bench", description=__doc__)
    p.add_argument("--in-features", type=int, default=None)
    p.add_argument("--out-features", type=int, default=None)
    p.add_argument("--batch", type=int, default=16384)
    p.add_argument("--num-terms", type=int, default=1)
    p.add_argument("--low-rank", type=int, default=None)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--no-backward", action="store_true")
    p.add_argument("--sweep-grad-pass", action="store_true",
                   help="time the backward's grad-pass launches over configs, partial dtypes and row splits")
    p.add_argument("--markdown", metavar="FILE", default=None,
                   help="also write each table into this markdown file (e.g. docs/benchmarks.md)")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA device")
    dtype = getattr(torch, a.dtype)
    if a.sweep_grad_pass:
        rows, headers = sweep_grad_pass(a.in_features or 8192, a.out_features or a.in_features or 8192, a.batch,
                                        a.num_terms, a.low_rank or 16, dtype=dtype)
        print(tabulate(rows, headers=headers))
        return
    if a.in_features is None and a.low_rank is None:
        # issue [D]'s workloads: targets fwd <= 0.146 ms, fwd+bwd <= 0.40 ms; k=64 at 16384^2 fwd <= 0.29 ms
        workloads = [dict(in_features=8192, out_features=8192, low_rank=16, backward=not a.no_backward),
                     dict(in_features=16384, out_features=16384, low_rank=64, backward=False)]
        targets = ["targets: fwd <= 0.146 ms (floor ~0.127, cuBLAS two-GEMM ~0.165); fwd+bwd <= 0.40 ms",
                   "target: fwd <= 0.29 ms"]
    else:
        d = a.in_features or 8192
        workloads = [dict(in_features=d, out_features=a.out_features or d, low_rank=a.low_rank or 16,
                          backward=not a.no_backward)]
        targets = [""]
    for w, target in zip(workloads, targets):
        cfg = dict(batch=a.batch, num_terms=a.num_terms, **w)
        rows, headers = bench_triton_linear(**cfg, dtype=dtype)
        print(f"\nsketched linear: {cfg}, {dtype}, {torch.cuda.get_device_name()}, torch {torch.__version__}, "
              f"triton {__import__('triton').__version__}")
        print(tabulate(rows, headers=headers))
        if target:
            print(target)
        if a.markdown:
            import sys

            from panther.bench import command_line, write_markdown
            cmd = command_line("python -m inductor_ext.triton_linear_bench",
                               sys.argv[1:] if argv is None else argv)
            write_markdown(a.markdown, f"{cmd} [{w['in_features']}->{w['out_features']}, k={w['low_rank']}]",
                           f"sketched linear: {cfg}, {dtype}" + (f"; {target}" if target else ""),
                           rows, headers, device="cuda")
        for (h_pad, esize), c in tlin.tuned_configs().items():
            print(f"autotuned (half width {h_pad}, {esize}-byte elements): {c}")


if __name__ == "__main__":
    main()
