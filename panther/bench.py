"""Side-by-side benchmarks: dense vs the public library's formula vs plain two-GEMM torch vs panther.

Every ratio printed comes from one run on one machine; on CUDA the memory floor (read x, write y and
the factors once at the measured copy bandwidth) is printed beside the measured times.
"""
from __future__ import annotations

import statistics
import time

import torch
from tabulate import tabulate

from .nn import SKConv2d, SKLinear
from .ops.linear import concat_factors

__all__ = ["time_fn", "bench_linear", "per_term_bmm"]


def time_fn(fn, *, repeats=20, warmup=3, device="cpu"):
    """Median wall time of ``fn()`` in milliseconds (CUDA: event timing, synchronised)."""
    for _ in range(warmup):
        fn()
    samples = []
    if torch.device(device).type == "cuda":
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end))
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def per_term_bmm(x, S1s, S2s, U1s, U2s, bias):
    """What the public Panther library computes: L-fold broadcast, four bmm chains, mean over terms."""
    L = S1s.shape[0]
    xs = x.unsqueeze(0).expand(L, *x.shape)
    t1 = torch.bmm(torch.bmm(xs, S1s), U1s).mean(0)
    t2 = torch.bmm(torch.bmm(xs, U2s), S2s).mean(0)
    return (t1 + t2) / 2 + bias


def _copy_bandwidth(device, dtype, numel, repeats):
    """Bytes/ms of a device-to-device copy (reads + writes) of ``numel`` elements."""
    a = torch.empty(numel, device=device, dtype=dtype)
    b = torch.empty_like(a)
    ms = time_fn(lambda: b.copy_(a), repeats=repeats, device=device)
    return 2 * a.numel() * a.element_size() / ms


@torch.no_grad()
def bench_linear(in_features=4096, out_features=4096, batch=2048, num_terms=1, low_rank=16, *, device="cpu",
                 dtype=torch.float32, repeats=20, backward=False):
    """Time the four ways of computing one layer; returns (rows, headers) for tabulate.

    Dense ``nn.Linear``, the public library's per-term ``bmm``, the two-GEMM torch reference and panther's
    ``SKLinear``, each timed with :func:`time_fn` on the same input (plus the memory floor on CUDA).
    """
    torch.manual_seed(0)
    dense = torch.nn.Linear(in_features, out_features, device=device, dtype=dtype)
    layer = SKLinear(in_features, out_features, num_terms, low_rank, device=device, dtype=dtype, seed=0)
    x = torch.randn(batch, in_features, device=device, dtype=dtype)
    args = (layer.S1s, layer.S2s, layer.U1s, layer.U2s, layer.bias)
    A, Bm = concat_factors(layer.S1s, layer.S2s, layer.U1s, layer.U2s)
    candidates = {
        "nn.Linear (dense)": lambda: dense(x),
        "per-term bmm (public Panther)": lambda: per_term_bmm(x, *args),
        "two-GEMM torch reference": lambda: torch.addmm(layer.bias, x @ A, Bm),
        "panther SKLinear": lambda: layer(x),
    }
    if backward:
        candidates = {name: _with_backward(fn, x, dense, layer) for name, fn in candidates.items()}
    times = {name: time_fn(fn, repeats=repeats, device=device) for name, fn in candidates.items()}
    ours = times["panther SKLinear"]
    rows = [[name, f"{ms:.3f}", f"{ms / ours:.2f}x"] for name, ms in times.items()]
    headers = ["implementation", "median ms", "time / panther"]
    if torch.device(device).type == "cuda":
        moved = (x.numel() + batch * out_features + sum(t.numel() for t in args)) * x.element_size()
        floor = moved / _copy_bandwidth(device, dtype, x.numel(), repeats)
        rows.append(["memory floor (read x, write y, factors)", f"{floor:.3f}", f"{floor / ours:.2f}x"])
    return rows, headers


@torch.no_grad()
def bench_conv2d(channels=512, size=56, batch=32, num_terms=1, low_rank=16, kernel_size=3, *, device="cpu",
                 dtype=torch.float32, repeats=20, channels_last=True):
    """Dense conv (cuDNN/oneDNN) vs SKConv2d on the same input; returns (rows, headers) for tabulate."""
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    dense = torch.nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, device=device, dtype=dtype)
    layer = SKConv2d.from_conv2d(dense, num_terms, low_rank, seed=0)
    dense, layer = dense.to(memory_format=fmt), layer.to(memory_format=fmt)
    x = torch.randn(batch, channels, size, size, device=device, dtype=dtype).to(memory_format=fmt)
    times = {"nn.Conv2d (dense)": time_fn(lambda: dense(x), repeats=repeats, device=device),
             "panther SKConv2d": time_fn(lambda: layer(x), repeats=repeats, device=device)}
    ours = times["panther SKConv2d"]
    return [[name, f"{ms:.3f}", f"{ms / ours:.2f}x"] for name, ms in times.items()], \
        ["implementation", "median ms", "time / panther"]


@torch.no_grad()
def bench_attention(seq=4096, batch=16, heads=16, head_dim=64, num_features=256, *, causal=False, device="cpu",
                    dtype=torch.float32, repeats=20, backward=False):
    """Exact SDPA vs panther's random-feature attention (feature map included) on the same q, k, v."""
    from .sketch import orthogonal_random_features

    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(batch, heads, seq, head_dim, device=device, dtype=dtype, generator=g) * 0.35
               for _ in range(3))
    proj = orthogonal_random_features(num_features, head_dim, device=device, dtype=dtype)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    candidates = {
        "SDPA (exact)": lambda: sdpa(q, k, v, is_causal=causal),
        "panther rf_attention": lambda: torch.ops.panther.rf_attention(q, k, v, proj, "softmax", causal, None, None),
    }
    if backward:
        def with_backward(fn):
            def step():
                with torch.enable_grad():
                    for t in (q, k, v):
                        t.requires_grad_(True).grad = None
                    fn().backward(torch.ones(batch, heads, seq, head_dim, device=device, dtype=dtype))
            return step
        candidates = {name: with_backward(fn) for name, fn in candidates.items()}
    times = {name: time_fn(fn, repeats=repeats, device=device) for name, fn in candidates.items()}
    ours = times["panther rf_attention"]
    return [[name, f"{ms:.3f}", f"{ms / ours:.2f}x"] for name, ms in times.items()], \
        ["implementation", "median ms", "time / panther"]


def _per_token_causal(q, k, v, proj):
    """The public library's causal scheme: FAVOR+ features, then one state update per token."""
    d, m = q.shape[-1], proj.shape[0]

    def exponent(x):
        return (x * d ** -0.25) @ proj.T - (x * d ** -0.25).pow(2).sum(-1, keepdim=True) / 2

    # shifts that cancel in the normalisation: per query row, and one constant per (batch, head) for keys
    uq, uk = exponent(q), exponent(k)
    fq = torch.exp(uq - uq.amax(-1, keepdim=True)) / m ** 0.5
    fk = torch.exp(uk - uk.amax((-2, -1), keepdim=True)) / m ** 0.5
    v1 = torch.cat([v, torch.ones_like(v[..., :1])], -1)
    state = torch.zeros(*q.shape[:2], m, v1.shape[-1], dtype=q.dtype, device=q.device)
    outs = []
    for t in range(q.shape[2]):
        state += fk[:, :, t, :, None] * v1[:, :, t, None, :]
        o = (fq[:, :, t, None, :] @ state).squeeze(-2)
        outs.append(o[..., :-1] / o[..., -1:])
    return torch.stack(outs, 2)


@torch.no_grad()
def bench_causal_scaling(lengths=(1024, 4096), batch=1, heads=8, head_dim=64, num_features=256, *, device="cpu",
                         dtype=torch.float32, repeats=3):
    """Causal rf_attention time against sequence length (linear = O(L)), and against a per-token loop."""
    from .sketch import orthogonal_random_features

    g = torch.Generator(device=device).manual_seed(0)
    proj = orthogonal_random_features(num_features, head_dim, device=device, dtype=dtype)
    rows, first = [], None
    for L in lengths:
        q, k, v = (torch.randn(batch, heads, L, head_dim, device=device, dtype=dtype, generator=g) * 0.35
                   for _ in range(3))
        ms = time_fn(lambda: torch.ops.panther.rf_attention(q, k, v, proj, "softmax", True, None, None),
                     repeats=repeats, warmup=1, device=device)
        first = first or (L, ms)
        rows.append([f"panther causal rf_attention, L={L}", f"{ms:.1f}",
                     f"{L / first[0]:.0f}x length -> {ms / first[1]:.2f}x time"])
    loop_ms = time_fn(lambda: _per_token_causal(q, k, v, proj), repeats=1, warmup=0, device=device)
    rows.append([f"per-token loop (public library scheme), L={lengths[-1]}", f"{loop_ms:.1f}",
                 f"{loop_ms / ms:.1f}x slower than panther"])
    return rows, ["implementation", "median ms", "note"]


def reuse_freed_memory():
    """Make glibc keep freed large blocks for reuse instead of returning them to the OS.

    By default every tensor of >= 32 MiB is a fresh mmap, so each call pays page faults for its output
    (in sandboxed VMs that costs more than the sketched GEMMs themselves). This is the usual CPU-inference
    setting (jemalloc/tcmalloc do the same); it applies equally to every implementation timed.
    Returns True when applied.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
        return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))
    except (OSError, AttributeError):
        return False


def _with_backward(fn, x, dense, layer):
    def step():
        with torch.enable_grad():
            x.requires_grad_(True)
            fn().sum().backward()
            x.grad = None
            for p in (*dense.parameters(), *layer.parameters()):
                p.grad = None
    return step


def main(argv=None):
    import argparse

    p = argparse.ArgumentParser(prog="python -m panther bench", description=__doc__)
    p.add_argument("what", choices=["linear", "conv2d", "attention", "causal-scaling"])
    p.add_argument("--seq", type=int, default=None, help="attention: sequence length")
    p.add_argument("--causal", action="store_true", help="attention: causal")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--in-features", type=int, default=None)
    p.add_argument("--out-features", type=int, default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--num-terms", type=int, default=1)
    p.add_argument("--low-rank", type=int, default=16)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--backward", action="store_true", help="time forward+backward")
    p.add_argument("--no-malloc-tuning", action="store_true",
                   help="CPU: keep glibc's default of returning large freed blocks to the OS")
    a = p.parse_args(argv)
    tuned = a.device == "cpu" and not a.no_malloc_tuning and reuse_freed_memory()
    cuda = a.device == "cuda"
    d = 8192 if cuda else 4096
    dtype = getattr(torch, a.dtype or ("bfloat16" if cuda else "float32"))
    cfg = dict(in_features=a.in_features or d, out_features=a.out_features or d,
               batch=a.batch or (16384 if cuda else 2048), num_terms=a.num_terms, low_rank=a.low_rank)
    if a.what == "causal-scaling":
        cfg = dict(lengths=(1024, 4096), heads=8, head_dim=64, num_features=256)
        rows, headers = bench_causal_scaling(**cfg, device=a.device, dtype=dtype, repeats=min(a.repeats, 5))
    elif a.what == "attention":
        seq = a.seq or (65536 if cuda else 2048)
        cfg = dict(seq=seq, batch=a.batch or max(1, (65536 if cuda else 4096) // seq), heads=16, head_dim=64,
                   num_features=256, causal=a.causal)
        rows, headers = bench_attention(**cfg, device=a.device, dtype=dtype, repeats=a.repeats,
                                        backward=a.backward)
    elif a.what == "conv2d":
        cfg = dict(channels=512, size=56, batch=a.batch or (32 if cuda else 4), num_terms=a.num_terms,
                   low_rank=a.low_rank)
        rows, headers = bench_conv2d(**cfg, device=a.device, dtype=dtype, repeats=a.repeats)
    else:
        rows, headers = bench_linear(**cfg, device=a.device, dtype=dtype, repeats=a.repeats, backward=a.backward)
    where = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"sketched {a.what} {'forward+backward' if a.backward else 'forward'}: "
          + ", ".join(f"{k}={v}" for k, v in cfg.items()) + f", {dtype}, {where}, torch {torch.__version__}")
    print(tabulate(rows, headers=headers))
    if tuned:
        print("(glibc set to reuse freed memory, see panther.bench.reuse_freed_memory; --no-malloc-tuning to skip)")
