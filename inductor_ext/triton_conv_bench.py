"""Timing of the fused Triton sketched-conv2d kernel against cuDNN and the C++ op, in one run.

    python -m inductor_ext.triton_conv_bench            # issue [D]'s workload, bf16 channels_last
    python -m inductor_ext.triton_conv_bench --sweep    # + each launch config of both kernels
    python -m inductor_ext.triton_conv_bench --tapgemm  # tap-GEMM vs the rest on three workloads
    TRITON_INTERPRET=1 python -m inductor_ext.triton_conv_bench --tapgemm --smoke   # CPU smoke run

Workload (defaults): 3×3 conv, C_in = C_out = 512, 56×56, batch 32, L = 1, k = 16, padding 1,
bf16, channels_last. Every time is a median of CUDA-event timings (``triton.testing.do_bench``,
which flushes L2 between runs) taken in the same process; the memory floor is x read once plus
out written once over the device-to-device copy bandwidth measured in the same run. Errors are
relative Frobenius errors against the C++ op run in fp32 on the same (bf16-valued) inputs.
The sweep prints each config's time as it goes (slowest to compile first is fine: a time budget
stops it before the 10-minute command limit) and ends with the best configs in ``_CANDIDATES``'s
tuple form, ready to paste into ``inductor_ext/triton_conv.py``.

``--tapgemm`` compares, for issue [D]'s workload and C = 256 at 56×56, C = 1024 at 28×28 (batch 32, bf16,
channels_last, 3×3, pad 1, L = 1, k = 16): dense cuDNN, the C++ op, the fused kernels (autotuned), the
tap-GEMM path (``triton_conv_tap``) with each stage-2 config of a grid, its two stages and its total with
the best one, the op as routed, and dense / C++ op again under ``cudnn.benchmark``. Times there are
medians of single-call CUDA-event timings (L2 flushed before each); the floor is x read once plus out
written once at 4.8 TB/s. Each row is printed as soon as it is measured; a failing variant prints its
error and the run goes on.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import panther  # noqa: F401  (loads the C++ op)

from . import triton_conv as tc
from . import triton_conv_tap as tap

__all__ = ["bench_triton_conv", "bench_tap_gemm", "sweep_configs", "main"]


def sweep_configs(r_pad, elem_size, kw=3, rowtap=True):
    """(algo, BLOCK_P, BLOCK_C, BLOCK_N, num_warps, num_stages, TAPS_INNER, X_CA) tuples to time:
    both kernels' autotune candidates first, then a grid over tile shapes and pipeline depth, and
    loop-order / L1-hint variants of the main tiles; only those passing ``config_fits``."""
    out = [("direct", *c) for c in tc._CANDIDATES["direct"]]
    if rowtap:
        out += [("rowtap", *c) for c in tc._CANDIDATES["rowtap"]]
    for bp in (64, 128, 256):
        for bc in (32, 64, 128):
            for warps in (4, 8):
                for stages in (3, 4):
                    out.append(("direct", bp, bc, 64, warps, stages, 0, 0))
    for bp, bc, warps in ((128, 64, 8), (128, 64, 4), (64, 64, 4), (256, 64, 8)):
        for taps_inner, ca in ((1, 0), (0, 1), (1, 1)):
            out.append(("direct", bp, bc, 64, warps, 3, taps_inner, ca))
        for stages in (2, 5):
            out.append(("direct", bp, bc, 64, warps, stages, 0, 0))
        for bn in (32, 128):
            out.append(("direct", bp, bc, bn, warps, 3, 0, 0))
    if rowtap:
        for bp, warps in ((64, 4), (128, 8), (128, 4), (256, 8), (256, 16)):
            for bc in (32, 64):
                for stages in (2, 3, 4):
                    out.append(("rowtap", bp, bc, 64, warps, stages, 0, 0))
        for bp, bc, warps in ((64, 64, 4), (128, 64, 8)):
            for taps_inner, ca in ((1, 0), (0, 1)):
                out.append(("rowtap", bp, bc, 64, warps, 3, taps_inner, ca))
            for bn in (32, 128):
                out.append(("rowtap", bp, bc, bn, warps, 3, 0, 0))
    seen, fits = set(), []
    for c in out:
        algo = c[0]
        width = tc._width(algo, r_pad, kw)
        if c not in seen and tc.config_fits(*c[1:6], width, elem_size, r_pad, gather=algo == "rowtap"):
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


def _workload(batch, channels, out_channels, size, kernel, num_terms, low_rank, stride, dtype, seed,
              device="cuda"):
    """The benchmark's tensors (same values in every process for one argument set)."""
    dev = torch.device(device)
    g = torch.Generator(device=dev).manual_seed(seed)
    C_in, C_out, L, k = channels, out_channels or channels, num_terms, low_rank
    R = 2 * L * k
    pad = (kernel - 1) // 2

    def mk(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=dev) * scale).to(dtype)

    x = mk(batch, C_in, size, size).contiguous(memory_format=torch.channels_last)
    W = mk(C_out, C_in, kernel, kernel, scale=(C_in * kernel * kernel) ** -0.5).contiguous(
        memory_format=torch.channels_last)
    S1s = mk(R, C_in, kernel, kernel, scale=(C_in * kernel * kernel) ** -0.5)
    U1s = mk(2 * L, k, C_out, scale=k ** -0.5)
    bias = mk(C_out)
    conv = ([stride, stride], [pad, pad], [1, 1])
    return x, W, S1s, U1s, bias, conv


def _config_dict(c):
    return dict(BLOCK_P=c[1], BLOCK_C=c[2], BLOCK_N=c[3], num_warps=c[4], num_stages=c[5], TAPS_INNER=c[6],
                X_CA=c[7])


def _tap_config_dict(c):
    """A ``(BLOCK_P, BLOCK_N, num_warps, num_stages)`` stage-2 config as launch arguments."""
    return dict(BLOCK_P=c[0], BLOCK_N=c[1], num_warps=c[2], num_stages=c[3])


def _precompile_worker(spec, configs):
    """Run each config once in this (spawned) process: the compiled kernels land in Triton's
    on-disk cache, so the timing process only loads them. Returns the configs that failed."""
    x, _, S1s, U1s, bias, conv = _workload(**spec)
    failed = []
    with torch.no_grad():
        for c in configs:
            try:
                if c[0] == "tap":  # a stage-2 config of the tap-GEMM path
                    tap.tap_forward(x, S1s, U1s, bias, *conv, config=_tap_config_dict(c[1:]))
                else:
                    tc.conv_forward(x, S1s, U1s, bias, *conv, algo=c[0], config=_config_dict(c))
            except Exception as exc:  # noqa: BLE001 - reported by the timing pass
                failed.append((c, f"{type(exc).__name__}: {str(exc)[:100]}"))
    if x.is_cuda:
        torch.cuda.synchronize()
    return failed


def _precompile(spec, configs, jobs, timeout_s=240.0):
    """Compile configs in ``jobs`` spawned processes (Triton compiles one kernel at a time per
    process; the machine has many cores). Any failure, or ``timeout_s`` passing, just leaves the
    rest to the timing loop."""
    if jobs <= 1 or len(configs) < 2:
        return
    import concurrent.futures as cf
    import multiprocessing as mp

    t0 = time.time()
    chunks = [configs[i::jobs] for i in range(jobs) if configs[i::jobs]]
    pool = cf.ProcessPoolExecutor(max_workers=len(chunks), mp_context=mp.get_context("spawn"))
    try:
        futures = [pool.submit(_precompile_worker, spec, chunk) for chunk in chunks]
        done, pending = cf.wait(futures, timeout=timeout_s)
        failed = sum((f.result() for f in done if f.exception() is None), [])
        errors = [f.exception() for f in done if f.exception() is not None]
        print(f"precompiled {len(configs)} configs in {len(chunks)} processes: {time.time() - t0:.0f} s"
              f"{f', {len(failed)} configs failed' if failed else ''}"
              f"{f', {len(errors)} workers broke ({errors[0]!r:.100})' if errors else ''}"
              f"{f', {len(pending)} workers still compiling (left behind)' if pending else ''}", flush=True)
    except Exception as exc:  # noqa: BLE001 - the timing loop compiles what is missing
        print(f"precompile skipped ({type(exc).__name__}: {str(exc)[:100]})", flush=True)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def bench_triton_conv(batch=32, channels=512, out_channels=None, size=56, kernel=3, num_terms=1,
                      low_rank=16, stride=1, dtype=torch.bfloat16, sweep=False, backward=False,
                      budget_s=420.0, jobs=8, seed=0, device="cuda"):
    """Prints dense cuDNN conv vs the C++ sketched op vs the Triton op and both Triton kernels
    (forward; optionally forward+backward), then optionally the sweep. Returns the rows as dicts.
    ``jobs`` processes compile the configs first; ``budget_s`` (seconds since the start) stops
    the sweep early."""
    if not torch.cuda.is_available():
        print("triton_conv_bench: CUDA is not available; nothing to time")
        return []
    if tc.triton is None:
        print("triton_conv_bench: triton is not installed")
        return []
    t_start = time.time()
    spec = dict(batch=batch, channels=channels, out_channels=out_channels, size=size, kernel=kernel,
                num_terms=num_terms, low_rank=low_rank, stride=stride, dtype=dtype, seed=seed, device=device)
    x, W, S1s, U1s, bias, conv = _workload(**spec)
    C_in, C_out, R, pad = channels, U1s.shape[-1], S1s.shape[0], conv[1][0]
    print(f"workload: x ({batch}, {C_in}, {size}, {size}) {str(dtype)[6:]} channels_last, {kernel}x{kernel} "
          f"stride {stride} pad {pad}, C_out {C_out}, L={num_terms}, k={low_rank} (rank {R}); "
          f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {tc.triton.__version__}", flush=True)
    r_pad = tc._rank_pad(R)
    can_rowtap = tc.rowtap_ok(kernel, stride, 1, r_pad)
    # what the autotuners will try, then the sweep: compiled up front in parallel
    auto = [(algo, c.kwargs["BLOCK_P"], c.kwargs["BLOCK_C"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages,
             c.kwargs["TAPS_INNER"], c.kwargs["X_CA"])
            for algo in (tc.ALGOS if can_rowtap else ("direct",))
            for c in tc.kernel_configs(r_pad, x.element_size(), algo, kernel)]
    cands = sweep_configs(r_pad, x.element_size(), kernel, rowtap=can_rowtap) if sweep else []
    _precompile(spec, list(dict.fromkeys(auto + cands)), jobs)
    dev = x.device

    ops = {
        "dense cuDNN conv (F.conv2d)": lambda: F.conv2d(x, W, bias, stride, pad),
        "C++ op panther::sketched_conv2d (cuDNN conv + GEMM)":
            lambda: torch.ops.panther.sketched_conv2d(x, S1s, U1s, bias, *conv),
        f"Triton op panther::sketched_conv2d_triton (ALGO={tc.ALGO!r})":
            lambda: torch.ops.panther.sketched_conv2d_triton(x, S1s, U1s, bias, *conv),
        "Triton direct kernel (autotuned)": lambda: tc.conv_forward(x, S1s, U1s, bias, *conv, algo="direct"),
    }
    if can_rowtap:
        ops["Triton rowtap kernel (autotuned)"] = lambda: tc.conv_forward(x, S1s, U1s, bias, *conv, algo="rowtap")
    with torch.no_grad():
        exact = torch.ops.panther.sketched_conv2d(x.float(), S1s.float(), U1s.float(), bias.float(), *conv)
        aten = ops["C++ op panther::sketched_conv2d (cuDNN conv + GEMM)"]()
        print(f"rel err vs the C++ op in fp32: C++ op ({str(dtype)[6:]}) {_rel(aten, exact):.2e}", flush=True)
        for name, fn in ops.items():
            if name.startswith("Triton"):
                tri = fn()
                assert tri.is_contiguous(memory_format=torch.channels_last)
                print(f"  {name}: {_rel(tri, exact):.2e} (vs the {str(dtype)[6:]} C++ op {_rel(tri, aten):.2e})",
                      flush=True)
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
        for key, c in tc.tuned_configs().items():
            if c is not None:
                kw = c.kwargs
                tup = (kw["BLOCK_P"], kw["BLOCK_C"], kw["BLOCK_N"], c.num_warps, c.num_stages, kw["TAPS_INNER"],
                       kw["X_CA"])
                print(f"  autotuned {key[0]} (rank pad {key[1]}): {tup}", flush=True)
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
            "dense cuDNN conv": lambda: torch.autograd.grad(F.conv2d(xg, Wg, bg, stride, pad), (xg, Wg, bg),
                                                            go),
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
        print(f"sweep: {len(cands)} configs (algo, BLOCK_P, BLOCK_C, BLOCK_N, num_warps, num_stages, TAPS_INNER, "
              f"X_CA), budget {budget_s:.0f} s since the start", flush=True)
        results = []
        with torch.no_grad():
            for c in cands:
                if time.time() - t_start > budget_s:
                    print(f"  sweep stopped: time budget reached after {len(results)} configs", flush=True)
                    break
                algo = c[0]
                cfg = _config_dict(c)
                try:
                    out = tc.conv_forward(x, S1s, U1s, bias, *conv, algo=algo, config=cfg)
                    err = _rel(out, exact)
                    ms = _ms(lambda: tc.conv_forward(x, S1s, U1s, bias, *conv, algo=algo, config=cfg), rep=40)
                    results.append((ms, c))
                    print(f"  {c}: {ms:.4f} ms  ({base / ms:.2f}x vs C++ op, {dense / ms:.2f}x vs dense, "
                          f"err {err:.1e})", flush=True)
                except Exception as exc:  # noqa: BLE001 - report and go on
                    print(f"  {c}: failed: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
        results.sort()
        for algo in tc.ALGOS:
            best = [(ms, c) for ms, c in results if c[0] == algo][:5]
            if best:
                print(f"best {algo} configs (paste into triton_conv._CANDIDATES[{algo!r}]):", flush=True)
                for ms, c in best:
                    print(f"        {c[1:]},  # {ms:.4f} ms", flush=True)
        if results:
            ms, c = results[0]
            print(f"fastest: {c[0]} {c[1:]} at {ms:.4f} ms -> ALGO = {c[0]!r} in inductor_ext/triton_conv.py",
                  flush=True)
        rows += [dict(name=f"sweep {c}", ms=ms) for ms, c in results]
    return rows


# ---------------------------------------------------------------------------------------------------
# tap-GEMM comparison

HBM_TB_S = 4.8  # H200 HBM bandwidth for the memory floor, TB/s
TAP_WORKLOADS = ((32, 512, 56), (32, 256, 56), (32, 1024, 28))  # (batch, C_in = C_out, H = W)
SMOKE_WORKLOADS = ((1, 24, 4), (1, 144, 3))  # tiny (the second takes the tap path in the op): CPU smoke run

_FLUSH = {}


def _median_ms(fn, device, reps=30, warmup=5):
    """Median of ``reps`` single-call times after ``warmup`` calls: CUDA events around each call, L2
    flushed before each (a 256 MB buffer written, outside the events); wall clock on the CPU."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        if device not in _FLUSH:
            _FLUSH[device] = torch.empty(64 << 20, dtype=torch.int32, device=device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for start, end in events:
            _FLUSH[device].zero_()
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        times = [start.elapsed_time(end) for start, end in events]
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def _bench_tap_workload(batch, channels, size, kernel, num_terms, low_rank, dtype, seed, device, smoke, jobs,
                        reps, warmup):
    spec = dict(batch=batch, channels=channels, out_channels=None, size=size, kernel=kernel, num_terms=num_terms,
                low_rank=low_rank, stride=1, dtype=dtype, seed=seed, device=device)
    x, W, S1s, U1s, bias, conv = _workload(**spec)
    dev = x.device
    pad, (R, C_in, kh, kw), C_out = conv[1][0], S1s.shape, U1s.shape[-1]
    r_pad, elem = tc._rank_pad(R), x.element_size()
    print(f"\nworkload: x ({batch}, {C_in}, {size}, {size}) {str(dtype)[6:]} channels_last, {kh}x{kw} pad {pad}, "
          f"C_out {C_out}, L={num_terms}, k={low_rank} (rank {R}); U is ({batch * size * size}, {kh * kw * R})",
          flush=True)
    grid_cfgs = tap.tap_configs(r_pad, elem, grid=True)
    if smoke:
        grid_cfgs = grid_cfgs[:2]
    algos = tc.ALGOS if tc.rowtap_ok(kw, 1, 1, r_pad) else ("direct",)
    if dev.type == "cuda":  # compile everything this workload launches in parallel first
        fused = [(algo, c.kwargs["BLOCK_P"], c.kwargs["BLOCK_C"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages,
                  c.kwargs["TAPS_INNER"], c.kwargs["X_CA"])
                 for algo in algos for c in tc.kernel_configs(r_pad, elem, algo, kw)]
        taps = [("tap", *c) for c in dict.fromkeys(grid_cfgs + tap.tap_configs(r_pad, elem))]
        _precompile(spec, fused + taps, jobs)
    rows = []
    with torch.no_grad():
        exact = torch.ops.panther.sketched_conv2d(x.float(), S1s.float(), U1s.float(), bias.float(), *conv)
        aten = torch.ops.panther.sketched_conv2d(x, S1s, U1s, bias, *conv)
        floor = (x.numel() + aten.numel()) * elem / (HBM_TB_S * 1e9)  # bytes / (bytes per ms)
        ref = {}

        def row(name, fn, check=True):
            """Time ``fn``, print one line (ratios, errors of its output when ``check``); None on failure."""
            try:
                err = ""
                if check:
                    out = fn()
                    err = f"err vs C++ op {_rel(out, aten):.1e} (fp32 C++ op {_rel(out, exact):.1e})"
                ms = _median_ms(fn, dev, reps, warmup)
            except Exception as exc:  # noqa: BLE001 - report and go on
                print(f"  {name:60s} failed: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
                ref.setdefault("dense", float("nan"))
                return None
            ref.setdefault("dense", ms)  # the first row is dense cuDNN (nan below if it failed)
            print(f"  {name:60s} {ms:8.4f} ms  dense/this {ref['dense'] / ms:5.2f}x  this/floor {ms / floor:5.2f}x  "
                  f"{err}", flush=True)
            rows.append(dict(workload=(batch, C_in, size), name=name, ms=ms))
            return ms

        row("dense cuDNN conv (F.conv2d)", lambda: F.conv2d(x, W, bias, 1, pad), check=False)
        row("C++ op panther::sketched_conv2d (cuDNN conv + GEMM)",
            lambda: torch.ops.panther.sketched_conv2d(x, S1s, U1s, bias, *conv))
        for algo in algos:
            row(f"tconv fused {algo} kernel (autotuned)",
                lambda algo=algo: tc.conv_forward(x, S1s, U1s, bias, *conv, algo=algo))
        try:
            U = tap.tap_stage1(x, S1s)
        except Exception as exc:  # noqa: BLE001
            print(f"  tap-GEMM stage 1 failed: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
            return rows
        print(f"  stage-2 configs (BLOCK_P, BLOCK_N, num_warps, num_stages): {len(grid_cfgs)}", flush=True)
        best = None
        for c in grid_cfgs:
            ms = row(f"  tap stage 2 {c}", lambda c=c: tap.tap_stage2(U, x, U1s, bias, *conv, kh, kw,
                                                                       config=_tap_config_dict(c)))
            if ms is not None and (best is None or ms < best[0]):
                best = (ms, c)
        row("tap-GEMM stage 1 (A_all + cuBLAS GEMM)", lambda: tap.tap_stage1(x, S1s), check=False)
        if best is not None:
            cfg = _tap_config_dict(best[1])
            row(f"tap-GEMM stage 2, best config {best[1]}",
                lambda: tap.tap_stage2(U, x, U1s, bias, *conv, kh, kw, config=cfg))
            row(f"tap-GEMM total, best stage-2 config {best[1]}",
                lambda: tap.tap_forward(x, S1s, U1s, bias, *conv, config=cfg))
        taken = tap.use_tap(x, S1s, U1s, bias, *conv)
        row(f"op panther::sketched_conv2d_triton ({'tap-GEMM' if taken else 'fused ' + tc.ALGO}, autotuned)",
            lambda: torch.ops.panther.sketched_conv2d_triton(x, S1s, U1s, bias, *conv))
        for key, c in tap.tuned_tap_configs().items():
            if c is not None:
                print(f"  autotuned tap stage 2 (rank pad {key[0]}, {key[1]}-byte): "
                      f"{(c.kwargs['BLOCK_P'], c.kwargs['BLOCK_N'], c.num_warps, c.num_stages)}", flush=True)
        prev = torch.backends.cudnn.benchmark
        try:
            torch.backends.cudnn.benchmark = True
            row("dense cuDNN conv, cudnn.benchmark=True", lambda: F.conv2d(x, W, bias, 1, pad), check=False)
            row("C++ op, cudnn.benchmark=True", lambda: torch.ops.panther.sketched_conv2d(x, S1s, U1s, bias, *conv))
        finally:
            torch.backends.cudnn.benchmark = prev
        print(f"  {'memory floor (x read + out written once at %.1f TB/s)' % HBM_TB_S:60s} {floor:8.4f} ms  "
              f"dense/floor {ref.get('dense', float('nan')) / floor:5.2f}x", flush=True)
    return rows


def bench_tap_gemm(workloads=TAP_WORKLOADS, kernel=3, num_terms=1, low_rank=16, dtype=torch.bfloat16, smoke=False,
                   jobs=8, reps=30, warmup=5, seed=0):
    """The tap-GEMM comparison (see the module docstring) for each ``(batch, channels, size)``. On CUDA; on
    the CPU only under ``TRITON_INTERPRET=1`` (the smoke run: tiny shapes, few configs and reps)."""
    if tc.triton is None:
        print("triton_conv_bench: triton is not installed")
        return []
    if torch.cuda.is_available():
        device = "cuda"
    elif tc._INTERPRET:
        device = "cpu"
    else:
        print("triton_conv_bench: CUDA is not available; nothing to time (TRITON_INTERPRET=1 for a CPU smoke run)")
        return []
    where = torch.cuda.get_device_name() if device == "cuda" else "CPU (Triton interpreter)"
    print(f"tap-GEMM comparison on {where}, torch {torch.__version__}, triton {tc.triton.__version__}; "
          f"TAP_GEMM={tap.TAP_GEMM!r}, fused ALGO={tc.ALGO!r}; median of {reps} after {warmup} warmup calls",
          flush=True)
    rows = []
    for batch, channels, size in workloads:
        try:
            rows += _bench_tap_workload(batch, channels, size, kernel, num_terms, low_rank, dtype, seed, device,
                                        smoke, jobs, reps, warmup)
        except Exception as exc:  # noqa: BLE001 - the next workload still runs
            print(f"workload ({batch}, {channels}, {size}) failed: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m inductor_ext.triton_conv_bench", description=__doc__.split("\n")[0])
    ap.add_argument("--sweep", action="store_true", help="also time every launch config of the sweep list")
    ap.add_argument("--backward", action="store_true", help="also time forward+backward")
    ap.add_argument("--budget", type=float, default=420.0, help="seconds after which the sweep stops")
    ap.add_argument("--jobs", type=int, default=8, help="processes that compile the configs first (0: none)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--channels", type=int, default=512)
    ap.add_argument("--size", type=int, default=56)
    ap.add_argument("--kernel", type=int, default=3)
    ap.add_argument("--stride", type=int, default=1)
    ap.add_argument("--num-terms", type=int, default=1)
    ap.add_argument("--low-rank", type=int, default=16)
    ap.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    ap.add_argument("--tapgemm", action="store_true",
                    help="compare the tap-GEMM path with the rest on three workloads (ignores the shape options "
                         "but --kernel/--num-terms/--low-rank/--dtype)")
    ap.add_argument("--smoke", action="store_true", help="with --tapgemm: tiny shapes, few configs (CPU interpreter)")
    a = ap.parse_args(argv)
    if a.tapgemm:
        smoke = dict(workloads=SMOKE_WORKLOADS, reps=1, warmup=0, jobs=0) if a.smoke else {}
        bench_tap_gemm(kernel=a.kernel, num_terms=a.num_terms, low_rank=a.low_rank, dtype=getattr(torch, a.dtype),
                       smoke=a.smoke, **smoke)
        return 0
    bench_triton_conv(batch=a.batch, channels=a.channels, size=a.size, kernel=a.kernel, stride=a.stride,
                      num_terms=a.num_terms, low_rank=a.low_rank, dtype=getattr(torch, a.dtype), sweep=a.sweep,
                      backward=a.backward, budget_s=a.budget, jobs=a.jobs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
