"""The CUDA benchmarks' timers: medians of ``triton.testing``'s, the method behind the issues'
reference numbers (``../shared/peers/anchor_bench*.py``)."""
from __future__ import annotations


def median_ms(fn, rep=200):
    """Median ms of one eager call of ``fn`` (``do_bench``: CUDA events around every call, L2 flushed
    between calls; Python and launch overhead included where the GPU waits for them). A first call
    outside the timing compiles and autotunes."""
    import torch
    from triton.testing import do_bench

    fn()
    torch.cuda.synchronize()
    return do_bench(fn, warmup=25, rep=rep, return_mode="median")


def graph_median_ms(fn, rep=200):
    """Median ms of ``fn`` replayed from a CUDA graph (``do_bench_cudagraph``): its GPU time without
    Python and launch overhead, as ``torch.compile(mode="reduce-overhead")`` runs it. None, with a
    warning that says why, where the call cannot be captured (a silent blank once hid a capture bug:
    docs/benchmarks.md, eighteenth session)."""
    import warnings

    import torch
    from triton.testing import do_bench_cudagraph

    fn()
    torch.cuda.synchronize()
    try:
        return do_bench_cudagraph(fn, rep=rep, return_mode="median")
    except Exception as e:  # noqa: BLE001 - not capturable: the eager median stands alone
        warnings.warn(f"not timed from a CUDA graph: the capture failed with {type(e).__name__}: "
                      f"{str(e).splitlines()[0] if str(e) else ''}", stacklevel=2)
        return None
