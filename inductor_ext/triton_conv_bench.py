"""Timing of the fused Triton sketched-conv2d kernel against cuDNN and the C++ op, in one run.

    python -m inductor_ext.triton_conv_bench            # issue [D]'s workload, bf16 channels_last
    python -m inductor_ext.triton_conv_bench --sweep    # + every launch config of the sweep list

Workload (defaults): 3×3 conv, C_in = C_out = 512, 56×56, batch 32, L = 1, k = 16, padding 1,
bf16, channels_last. Every time is a median of CUDA-event timings (``triton.testing.do_bench``,
which flushes L2 between runs) taken in the same process; the memory floor is x read once plus
out written once over the device-to-device copy bandwidth measured in the same run. Errors are
relative Frobenius errors against the C++ op run in fp32 on the same (bf16-valued) inputs.
The sweep prints each config's time as it goes (slowest to compile first is fine: a time budget
stops it before the 10-minute command limit) and ends with the best configs in ``_CANDIDATES``'s
tuple form, ready to paste into ``inductor_ext/triton_conv.py``.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import panther  # noqa: F401  (loads the C++ op)

from . import triton_conv as tc

__all__ = ["bench_triton_conv", "sweep_configs", "main"]


def sweep_configs(r_pad, elem_size):
    """(BLOCK_P, BLOCK_C, BLOCK_N, num_warps, num_stages, TAPS_INNER, X_CA) tuples to time: a grid
    over the tile shapes and pipeline depth, plus loop-order / L1-hint variants of the main tiles;
    only those within Hopper's shared memory and the register budget."""
    out = []
    for bp in (64, 128, 256):
        for bc in (32, 64, 128):
            for warps in (4, 8):
                for stages in (3, 4):
                    out.append((bp, bc, 128 if warps == 8 else 64, warps, stages, 0, 0))
    for bp, bc, warps in ((128, 64, 8), (128, 64, 4), (256, 64, 8), (128, 128, 8), (64, 128, 4)):
        bn = 128 if warps == 8 else 64
        for taps_inner, ca in ((1, 0), (0, 1), (1, 1)):
            out.append((bp, bc, bn, warps, 3, taps_inner, ca))
        for stages in (2, 5):
            out.append((bp, bc, bn, warps, stages, 0, 0))
        for bn2 in (32, 64, 128, 256):
            if bn2 != bn:
                out.append((bp, bc, bn2, warps, 3, 0, 0))
    seen, fits = set(), []
    for c in out:
        if c not in seen and tc.config_fits(*c[:5], r_pad, elem_size):
            seen.add(c)
            fits.append(c)
    return fits


def _ms(fn, rep=100):
    from triton.testing import do_bench

    fn()  # compile / autotune outside the timing
    torch.cuda.synchronize()
    return do_bench(fn, warmup=10, rep=rep, return_mode="median")


def _copy_bandwidth(numel, dtype, device):
    """Bytes per ms of a device-to-device copy, counting bytes read plus bytes written."""
    a = torch.empty(numel, dtype=dtype, device=device).normal_()
    b = torch.empty_like(a)
    return 2 * a.numel() * a.element_size() / _ms(lambda: b.copy_(a))


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def bench_triton_conv(batch=32, channels=512, out_channels=None, size=56, kernel=3, num_terms=1,
                      low_rank=16, stride=1, dtype=torch.bfloat16, sweep=False, backward=False,
                      budget_s=420.0, seed=0):
    """Prints dense cuDNN conv vs the C++ sketched op vs the Triton op (forward; optionally
    forward+backward), then optionally the sweep. Returns the rows as dicts."""
    if not torch.cuda.is_available():
        print("triton_conv_bench: CUDA is not available; nothing to time")
        return []
    if tc.triton is None:
        print("triton_conv_bench: triton is not installed")
        return []
    t_start = time.time()
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(seed)
    C_in, C_out, L, k = channels, out_channels or channels, num_terms, low_rank
    R = 2 * L * k
    pad = (kernel - 1) // 2
    conv = ([stride, stride], [pad, pad], [1, 1])

    def mk(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=dev) * scale).to(dtype)

    x = mk(batch, C_in, size, size).contiguous(memory_format=torch.channels_last)
    W = mk(C_out, C_in, kernel, kernel, scale=(C_in * kernel * kernel) ** -0.5).contiguous(
        memory_format=torch.channels_last)
    S1s = mk(R, C_in, kernel, kernel, scale=(C_in * kernel * kernel) ** -0.5)
    U1s = mk(2 * L, k, C_out, scale=k ** -0.5)
    bias = mk(C_out)
    print(f"workload: x ({batch}, {C_in}, {size}, {size}) {str(dtype)[6:]} channels_last, {kernel}x{kernel} "
          f"stride {stride} pad {pad}, C_out {C_out}, L={L}, k={k} (rank {R}); {torch.cuda.get_device_name()}, "
          f"torch {torch.__version__}, triton {tc.triton.__version__}", flush=True)

    ops = {
        "dense cuDNN conv (F.conv2d)": lambda: F.conv2d(x, W, bias, stride, pad),
        "C++ op panther::sketched_conv2d (cuDNN conv + GEMM)":
            lambda: torch.ops.panther.sketched_conv2d(x, S1s, U1s, bias, *conv),
        "Triton op panther::sketched_conv2d_triton (autotuned)":
            lambda: torch.ops.panther.sketched_conv2d_triton(x, S1s, U1s, bias, *conv),
    }
    with torch.no_grad():
        exact = torch.ops.panther.sketched_conv2d(x.float(), S1s.float(), U1s.float(), bias.float(), *conv)
        aten = ops["C++ op panther::sketched_conv2d (cuDNN conv + GEMM)"]()
        tri = ops["Triton op panther::sketched_conv2d_triton (autotuned)"]()
        assert tri.is_contiguous(memory_format=torch.channels_last)
        print(f"rel err vs fp32 C++ op: Triton {_rel(tri, exact):.2e}, C++ op (bf16) {_rel(aten, exact):.2e}; "
              f"Triton vs C++ op {_rel(tri, aten):.2e}", flush=True)
        bw = _copy_bandwidth(max(x.numel(), 1 << 26), dtype, dev)
        floor = (x.numel() + tri.numel()) * x.element_size() / bw
        rows = []
        times = {}
        for name, fn in ops.items():
            times[name] = _ms(fn)
        base = times["C++ op panther::sketched_conv2d (cuDNN conv + GEMM)"]
        dense = times["dense cuDNN conv (F.conv2d)"]
        for name, ms in times.items():
            rows.append(dict(name=name, ms=ms))
            print(f"  {name:58s} {ms:8.4f} ms   {dense / ms:5.2f}x vs dense   {base / ms:5.2f}x vs C++ op   "
                  f"{ms / floor:5.2f}x floor", flush=True)
        print(f"  {'memory floor (x read once + out written once)':58s} {floor:8.4f} ms   "
              f"(copy bandwidth {bw / 1e9:.2f} TB/s)", flush=True)
        print(f"  autotuned choice: {tc.tuned_configs()}", flush=True)
        # NCHW input (the op sends it to the C++ op unless NCHW_KERNEL): the kernel's strided path
        xn = x.contiguous()
        t_nchw_aten = _ms(lambda: torch.ops.panther.sketched_conv2d(xn, S1s, U1s, bias, *conv))
        t_nchw_tri = _ms(lambda: tc.conv_forward(xn, S1s, U1s, bias, *conv))
        print(f"  NCHW input: C++ op {t_nchw_aten:.4f} ms, Triton kernel on NCHW strides {t_nchw_tri:.4f} ms "
              f"(NCHW_KERNEL={tc.NCHW_KERNEL})", flush=True)

    if backward:
        xg = x.detach().requires_grad_()
        Sg = S1s.detach().requires_grad_()
        bg = bias.detach().requires_grad_()
        Wg = W.detach().requires_grad_()
        go = torch.randn_like(tri)
        fb = {
            "dense cuDNN conv": lambda: torch.autograd.grad(F.conv2d(xg, Wg, bg, stride, pad), (xg, Wg, bg), go),
            "C++ op": lambda: torch.autograd.grad(
                torch.ops.panther.sketched_conv2d(xg, Sg, U1s, bg, *conv), (xg, Sg, bg), go),
            "Triton op": lambda: torch.autograd.grad(
                torch.ops.panther.sketched_conv2d_triton(xg, Sg, U1s, bg, *conv), (xg, Sg, bg), go),
        }
        for name, fn in fb.items():
            ms = _ms(fn, rep=50)
            rows.append(dict(name=f"fwd+bwd {name}", ms=ms))
            print(f"  fwd+bwd (dx, dS1s, db) {name:34s} {ms:8.4f} ms", flush=True)

    if sweep:
        cands = sweep_configs(tc._rank_pad(R), x.element_size())
        print(f"sweep: {len(cands)} configs (BLOCK_P, BLOCK_C, BLOCK_N, num_warps, num_stages, TAPS_INNER, X_CA), "
              f"budget {budget_s:.0f} s", flush=True)
        results = []
        with torch.no_grad():
            for c in cands:
                if time.time() - t_start > budget_s:
                    print(f"  sweep stopped: time budget reached after {len(results)} configs", flush=True)
                    break
                cfg = dict(BLOCK_P=c[0], BLOCK_C=c[1], BLOCK_N=c[2], num_warps=c[3], num_stages=c[4],
                           TAPS_INNER=c[5], X_CA=c[6])
                try:
                    out = tc.conv_forward(x, S1s, U1s, bias, *conv, config=cfg)
                    err = _rel(out, exact)
                    ms = _ms(lambda: tc.conv_forward(x, S1s, U1s, bias, *conv, config=cfg), rep=40)
                    results.append((ms, c))
                    print(f"  {c}: {ms:.4f} ms  ({base / ms:.2f}x vs C++ op, {dense / ms:.2f}x vs dense, "
                          f"err {err:.1e})", flush=True)
                except Exception as exc:  # noqa: BLE001 - report and go on
                    print(f"  {c}: failed: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
        results.sort()
        print("best configs (paste into triton_conv._CANDIDATES):", flush=True)
        for ms, c in results[:6]:
            print(f"    {c},  # {ms:.4f} ms", flush=True)
        rows += [dict(name=f"sweep {c}", ms=ms) for ms, c in results]
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m inductor_ext.triton_conv_bench", description=__doc__.split("\n")[0])
    ap.add_argument("--sweep", action="store_true", help="also time every launch config of the sweep list")
    ap.add_argument("--backward", action="store_true", help="also time forward+backward")
    ap.add_argument("--budget", type=float, default=420.0, help="seconds after which the sweep stops")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--channels", type=int, default=512)
    ap.add_argument("--size", type=int, default=56)
    ap.add_argument("--kernel", type=int, default=3)
    ap.add_argument("--stride", type=int, default=1)
    ap.add_argument("--num-terms", type=int, default=1)
    ap.add_argument("--low-rank", type=int, default=16)
    ap.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    a = ap.parse_args(argv)
    bench_triton_conv(batch=a.batch, channels=a.channels, size=a.size, kernel=a.kernel, stride=a.stride,
                      num_terms=a.num_terms, low_rank=a.low_rank, dtype=getattr(torch, a.dtype), sweep=a.sweep,
                      backward=a.backward, budget_s=a.budget)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
