"""Side-by-side benchmarks: dense vs the public library's formula vs plain two-GEMM torch vs panther.

Every ratio printed comes from one run on one machine; on CUDA the memory floor (read x, write y and
the factors once at the measured copy bandwidth) is printed beside the measured times.
"""
from __future__ import annotations

import contextlib
import os
import statistics
import textwrap
import time

import torch
from tabulate import tabulate

from .nn import SKConv2d, SKLinear
from .ops.linear import concat_factors
from .policy import SketchSpec

__all__ = ["time_fn", "back_to_back_time_fn", "graph_time_fn", "bench_linear", "bench_conv2d", "bench_attention",
           "bench_transformer",
           "bench_llama", "bench_decode",
           "per_term_bmm", "sweep", "sweep_table", "plot_sweep", "write_markdown", "DEFAULT_SWEEPS"]


def time_fn(fn, *, repeats=20, warmup=3, device="cpu"):
    """Median wall time of ``fn()`` in milliseconds (CUDA: event timing, synchronised around every call)."""
    return back_to_back_time_fn(fn, calls=1, repeats=repeats, warmup=warmup, device=device)


def back_to_back_time_fn(fn, *, calls=20, repeats=5, warmup=3, device="cpu"):
    """Median over ``repeats`` batches of the time per call (ms) of ``calls`` calls of ``fn`` issued back
    to back, with no synchronisation between them. On CUDA the CPU queues the next call while the GPU runs
    the last one, so a call costs about max(its CPU time, its GPU time): what one layer of an eager model
    costs. (``time_fn``, ``calls=1``, synchronises around every call, so its time adds the CPU's part
    to the GPU's.)"""
    for _ in range(warmup):
        fn()
    cuda = torch.device(device).type == "cuda"
    samples = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end) / calls)
        else:
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            samples.append((time.perf_counter() - t0) * 1e3 / calls)
    return statistics.median(samples)


def _timed_table(candidates, ours, *, repeats, device, floor=None, graph=False):
    """(rows, headers) of ``candidates`` ({name: fn}) timed side by side, each column with its ratio to the
    row ``ours``: "median ms" (``time_fn``, one synchronised call); on CUDA also "back-to-back ms"
    (``back_to_back_time_fn``) and, with ``graph`` (True, or the names to capture: a call that replays CUDA
    graphs itself cannot be captured, its cell says "-"), "CUDA-graph ms" (``graph_time_fn``). ``floor``: a
    ``(name, ms)`` row added to every column (the memory floor)."""
    timers = {"median ms": lambda fn: time_fn(fn, repeats=repeats, device=device)}
    if torch.device(device).type == "cuda":
        timers["back-to-back ms"] = lambda fn: back_to_back_time_fn(fn, repeats=max(1, repeats // 4),
                                                                    device=device)
        if graph:
            timers["CUDA-graph ms"] = lambda fn: graph_time_fn(fn, repeats=repeats)
    captured = candidates if graph is True else graph or ()
    columns = {col: {name: timer(fn) for name, fn in candidates.items()
                     if col != "CUDA-graph ms" or name in captured}
               for col, timer in timers.items()}
    if floor is not None:
        for times in columns.values():
            times[floor[0]] = floor[1]
    names = list(next(iter(columns.values())))
    rows = [[name] for name in names]
    headers = ["implementation"]
    for col, times in columns.items():
        headers += [col, "time / panther" + ("" if col == "median ms" else f" ({col.removesuffix(' ms')})")]
        for row, name in zip(rows, names):
            row += [f"{times[name]:.3f}", f"{times[name] / times[ours]:.2f}x"] if name in times else ["-", "-"]
    return rows, headers


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
    with _fixed_draws(device):
        dense = torch.nn.Linear(in_features, out_features, device=device, dtype=dtype)
        x = torch.randn(batch, in_features, device=device, dtype=dtype)
    layer = SKLinear(in_features, out_features, num_terms, low_rank, device=device, dtype=dtype, seed=0)
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
    floor = None
    if torch.device(device).type == "cuda":
        moved = (x.numel() + batch * out_features + sum(t.numel() for t in args)) * x.element_size()
        floor = ("memory floor (read x, write y, factors)", moved / _copy_bandwidth(device, dtype, x.numel(), repeats))
    return _timed_table(candidates, "panther SKLinear", repeats=repeats, device=device, floor=floor)


@torch.no_grad()
def bench_conv2d(channels=512, size=56, batch=32, num_terms=1, low_rank=16, kernel_size=3, *, device="cpu",
                 dtype=torch.float32, repeats=20, channels_last=True):
    """Dense conv (cuDNN/oneDNN) vs SKConv2d on the same input; returns (rows, headers) for tabulate.

    On CUDA also the C++ op (one convolution to 2Lk channels, then the channel mix) and the memory floor
    (x read, the output written), and a second timing of every row: one replay of the call captured in a
    CUDA graph, i.e. GPU time without Python's per-call dispatch and launch overhead (what a model's
    layer costs once the CPU runs ahead of the GPU)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    with _fixed_draws(device):
        dense = torch.nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, device=device, dtype=dtype)
        x = torch.randn(batch, channels, size, size, device=device, dtype=dtype).to(memory_format=fmt)
    layer = SKConv2d.from_conv2d(dense, num_terms, low_rank, seed=0)
    dense, layer = dense.to(memory_format=fmt), layer.to(memory_format=fmt)
    candidates = {"nn.Conv2d (dense)": lambda: dense(x), "panther SKConv2d": lambda: layer(x)}
    cuda = torch.device(device).type == "cuda"
    if cuda:
        pad = [kernel_size // 2] * 2
        candidates["C++ op (conv to 2Lk channels + GEMM)"] = lambda: torch.ops.panther.sketched_conv2d(
            x, layer.S1s, layer.U1s, layer.bias, [1, 1], pad, [1, 1])
    floor = None
    if cuda:
        floor = ("memory floor (read x, write the output)",
                 2 * x.numel() * x.element_size() / _copy_bandwidth(device, dtype, x.numel(), repeats))
    return _timed_table(candidates, "panther SKConv2d", repeats=repeats, device=device, floor=floor, graph=True)


def graph_time_fn(fn, *, repeats=20, warmup=3):
    """Median time in ms of one replay of ``fn`` captured in a CUDA graph: the GPU time of the call without
    Python's dispatch and launch overhead. ``fn`` must be capturable (no host synchronisation)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (compile, autotune, allocate) off the capture
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return time_fn(graph.replay, repeats=repeats, warmup=warmup, device="cuda")


@torch.no_grad()
def bench_attention(seq=4096, batch=16, heads=16, head_dim=64, num_features=256, *, causal=False, device="cpu",
                    dtype=torch.float32, repeats=20, backward=False, flex=False):
    """Exact SDPA vs panther's random-feature attention (feature map included) on the same q, k, v; with
    ``flex``, also ``flex_attention`` (a causal block mask when ``causal``) compiled by Inductor and by
    ``backend="panther"`` (which rewrites it to random features)."""
    from .sketch import orthogonal_random_features

    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(batch, heads, seq, head_dim, device=device, dtype=dtype, generator=g) * 0.35
               for _ in range(3))
    proj = orthogonal_random_features(num_features, head_dim, device=device, dtype=dtype)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    candidates = {
        "SDPA (exact)": lambda: sdpa(q, k, v, is_causal=causal),
        "panther rf_attention": lambda: _attend(q)(q, k, v, proj, "softmax", causal, None, None),
    }
    if flex:
        candidates.update(_flex_candidates(q, k, v, causal, num_features))
    if backward:
        def with_backward(fn):
            def step():
                with torch.enable_grad():
                    for t in (q, k, v):
                        t.requires_grad_(True).grad = None
                    fn().backward(torch.ones(batch, heads, seq, head_dim, device=device, dtype=dtype))
            return step
        candidates = {name: with_backward(fn) for name, fn in candidates.items()}
    return _timed_table(candidates, "panther rf_attention", repeats=repeats, device=device)


def _flex_candidates(q, k, v, causal, num_features):
    """``flex_attention`` on ``q, k, v`` compiled by Inductor, and by ``backend="panther"`` with
    ``num_features`` random features (seed 0)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from .backend import panther_backend

    L = q.shape[2]
    mask = create_block_mask(lambda b, h, i, j: i >= j, None, None, L, L, device=q.device) if causal else None

    def call(q, k, v):
        return flex_attention(q, k, v, block_mask=mask)

    policy = {"attention": SketchSpec(num_random_features=num_features, seed=0)}
    compiled = {"flex_attention, torch.compile": torch.compile(call),
                'flex_attention, backend="panther"': torch.compile(call, backend=panther_backend,
                                                                  options={"policy": policy})}
    return {name: (lambda fn=fn: fn(q, k, v)) for name, fn in compiled.items()}


def _attend(q):
    """The attention kernel RandMultiHeadAttention runs for ``q``: the fused Triton op on CUDA (when
    triton is present), the C++ op elsewhere."""
    from .nn import attention as rmha

    rmha.triton_attention.load()
    return rmha.triton_attention.for_input(q, torch.ops.panther.rf_attention)


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


class _DecodeStack(torch.nn.Module):
    """Causal attention layers, each added to its input (a decoder's residual stream without the rest)."""

    def __init__(self, layers):
        super().__init__()
        self.layers = torch.nn.ModuleList(layers)

    def forward(self, x, state=None):
        for layer in self.layers:
            x = x + layer(x, x, x, state=state)[0]
        return x


@torch.no_grad()
def bench_decode(context=65536, batch=1, embed=1024, heads=16, num_features=256, layers=1, *, device="cpu",
                 dtype=torch.float32, repeats=20):
    """One generated token through ``layers`` causal attention layers (each added to its input) after a prompt of
    ``context`` tokens: exact attention over a KV cache per layer (the prompt's keys and values, the caches
    allocated up front as static caches are; SDPA) against the same layers' random-feature attention going on
    from a :class:`~panther.nn.RandAttentionState` (eager and under ``torch.compile``; on CUDA also its static
    form under ``mode="reduce-overhead"``, whose steps replay one CUDA graph), with the bytes each keeps of the
    past and the output's error against exact attention. Both compute the projections the same way."""
    from torch.nn import functional as F

    from .nn import RandAttentionState, RandMultiHeadAttention

    stack = _DecodeStack(RandMultiHeadAttention(embed, heads, num_features, iscausal=True, device=device,
                                                dtype=dtype, seed=i).eval() for i in range(layers))
    H, d = heads, embed // heads
    g = torch.Generator(device=device).manual_seed(0)
    prompt = torch.randn(batch, context + 1, embed, device=device, dtype=dtype, generator=g) * 0.35
    prompt, x = prompt[:, :context], prompt[:, context:]

    def heads_of(t, w, b):
        return F.linear(t, w, b).view(batch, t.shape[1], H, d).transpose(1, 2)

    def exact_layer(layer, cache, h, at):
        """Exact attention of ``h``'s positions from ``at`` on, their keys and values written into ``cache``."""
        for c, (w, b) in zip(cache, ((layer.Wk, layer.bk), (layer.Wv, layer.bv))):
            c[:, :, at:at + h.shape[1]] = heads_of(h, w, b)
        q = heads_of(h, layer.Wq, layer.bq)   # one query sees every key; a prompt, causally
        out = F.scaled_dot_product_attention(q, *(c[:, :, :at + h.shape[1]] for c in cache), is_causal=at == 0)
        return h + F.linear(out.transpose(1, 2).reshape(batch, h.shape[1], embed), layer.W0, layer.b0)

    caches = [[torch.empty(batch, H, context + 1, d, device=device, dtype=dtype) for _ in range(2)]
              for _ in range(layers)]
    h = prompt
    for layer, cache in zip(stack.layers, caches):   # the prompt fills every layer's cache
        h = exact_layer(layer, cache, h, 0)
    del h

    def exact():
        h = x
        for layer, cache in zip(stack.layers, caches):
            h = exact_layer(layer, cache, h, context)
        return h

    state = RandAttentionState()
    stack(prompt, state)
    seen = {layer: state[layer] for layer in stack.layers}
    compiled = torch.compile(stack)

    def step(fn):
        def call():   # every timed call goes on from the prompt's state (a step's cost does not grow)
            for layer, s in seen.items():
                state[layer] = s
            return fn(x, state)
        return call

    candidates = {"exact: KV cache + SDPA": exact,
                  "panther: RandAttentionState": step(stack),
                  "panther: RandAttentionState, torch.compile": step(compiled)}
    cuda = torch.device(device).type == "cuda"
    captured = list(candidates)
    if cuda:   # each timed call goes on from the last (its cost does not grow): the buffers stay where they are
        static, replayed = state.to_static(), torch.compile(stack, mode="reduce-overhead")
        candidates["panther: static state, reduce-overhead"] = lambda: replayed(x, static)
    reference = exact().float()
    errors = {name: ((fn().float() - reference).norm() / reference.norm()).item() for name, fn in candidates.items()}
    held = {"exact: KV cache + SDPA": _nbytes(*(c for cache in caches for c in cache))}
    held.update({name: state.nbytes for name in candidates if name.startswith("panther")})
    rows, headers = _timed_table(candidates, "panther: RandAttentionState", repeats=repeats, device=device,
                                 graph=cuda and captured)
    for row in rows:
        row += [f"{held[row[0]] / 2 ** 20:.3g}", f"{errors[row[0]]:.3g}"]
    return rows, headers + ["MiB kept of the past", "rel. error vs exact"]


class _CausalEncoder(torch.nn.Module):
    """``nn.TransformerEncoder`` as a decoder-only stack: its causal mask built in the forward, so that a compile
    of the model sees how it was made (``generate_square_subsequent_mask``), as GPT-style models do."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, x):
        mask = torch.nn.Transformer.generate_square_subsequent_mask(x.shape[1], device=x.device, dtype=x.dtype)
        return self.encoder(x, mask=mask, is_causal=True)


@torch.no_grad()
def bench_transformer(d_model=1024, heads=16, layers=4, seq=8192, batch=2, low_rank=64, num_features=256, *,
                      device="cpu", dtype=torch.float32, repeats=20, compiler="inductor", default_policy=False,
                      causal=False):
    """Inference of PyTorch's own ``nn.TransformerEncoder`` (pre-norm, GELU, feed-forward ``4·d_model``,
    eval mode, no grad; with ``causal``, under the causal mask the model builds in its forward, which the fused
    encoder kernel applies as a mask), on the same input: dense eager (torch's fused encoder kernel), dense
    under ``torch.compile``, with ``causal`` both again with the fused kernels off (the layers unfused, their
    attention SDPA's causal flash kernel: the exact baseline to beat), and ``backend="panther"`` with the
    feed-forward linears at rank ``2·low_rank`` (``init="svd"``) and random-feature attention with
    ``num_features`` features (the attention's own projections stay dense); with ``default_policy``, what
    panther's default policy picks instead (what ``torch.compile(model, backend="panther")`` does
    unconfigured). ``compiler`` is what the compiles end in (``"inductor"``; ``"aot_eager"`` for a quick check).

    Returns ``(rows, headers, report)``: the timings side by side, each with its output's relative error
    against dense eager, and panther's graph diff report. The weights are random, whose flat spectrum
    compresses far worse than a trained model's: the error column is a worst case for these ranks.
    """
    with _fixed_draws(device):
        layer = torch.nn.TransformerEncoderLayer(d_model, heads, 4 * d_model, dropout=0.0, activation="gelu",
                                                 batch_first=True, norm_first=True, device=device, dtype=dtype)
        model = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False).eval()
        model = _CausalEncoder(model) if causal else model
        x = torch.randn(batch, seq, d_model, device=device, dtype=dtype)
    policy = None if default_policy else {"linear": SketchSpec(num_terms=1, low_rank=low_rank, init="svd"),
                                          "attention": SketchSpec(num_random_features=num_features, seed=0)}
    # the fused kernel applies the causal mask as a mask (every score computed); exact attention does better
    # through SDPA's is_causal, which the layers' unfused path calls
    return _dense_against_panther(model, lambda m: m(x), policy, compiler=compiler, device=device, repeats=repeats,
                                  unfused_rows=causal)


def _unfused(call):
    """``call`` with PyTorch's fused MHA / encoder-layer fast path turned off for its duration (Dynamo guards on
    that switch: a compiled model compiles a second graph, of the unfused layers, for it)."""
    def run(model):
        enabled = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            return call(model)
        finally:
            torch.backends.mha.set_fastpath_enabled(enabled)
    return run


@torch.no_grad()
def bench_llama(hidden=2048, heads=16, kv_heads=4, layers=4, seq=8192, batch=2, low_rank=64, num_features=256,
                vocab=32000, padding=0.25, *, attention="sdpa", device="cpu", dtype=torch.float32, repeats=20,
                compiler="inductor", default_policy=False):
    """Inference of a Hugging Face ``LlamaForCausalLM`` built from a config (random weights; needs
    ``transformers``): grouped-query attention (``kv_heads`` key/value heads), SwiGLU feed-forward of
    ``2.75·hidden``, on a batch whose last sequence is left-padded over a ``padding`` fraction of its
    tokens (``attention_mask``), as a decoder's batch is. Timed as in :func:`bench_transformer`: dense eager
    (the model's SDPA attention), dense compiled, and ``backend="panther"`` with the attention and MLP
    projections at rank ``2·low_rank`` (``init="svd"``; ``lm_head`` stays dense) and random-feature attention
    with ``num_features`` features. The error is over the logits of the tokens that are not padding.
    ``attention`` is the model's ``attn_implementation``: ``"sdpa"``, ``"eager"`` (attention written out, its
    scores materialised) or ``"flex_attention"``.
    """
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(2.75 * hidden),
                                   num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                                   max_position_embeddings=seq, attn_implementation=attention)
    with _fixed_draws(device):
        model = transformers.LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()
        ids = torch.randint(0, vocab, (batch, seq), device=device)
    mask = torch.ones(batch, seq, dtype=torch.long, device=device)
    mask[-1, :int(padding * seq)] = 0
    policy = None if default_policy else {"*proj": SketchSpec(num_terms=1, low_rank=low_rank, init="svd"),
                                          "attention": SketchSpec(num_random_features=num_features, seed=0)}
    return _dense_against_panther(model, lambda m: m(ids, attention_mask=mask).logits[mask.bool()], policy,
                                  compiler=compiler, device=device, repeats=repeats)


def _dense_against_panther(model, call, policy, *, compiler, device, repeats, unfused_rows=False):
    """``call(model)`` timed dense eager, dense compiled and compiled with ``backend="panther"`` under
    ``policy`` (with ``unfused_rows``, the dense model eager and compiled with PyTorch's fused attention and
    encoder-layer kernels off too), side by side, each with its output's relative error against dense eager;
    and panther's report."""
    from .backend import panther_backend
    from .report import GraphDiffReport

    torch._dynamo.reset()
    dense_compiled = torch.compile(model, backend=compiler)
    reports = []  # one per graph: a model with graph breaks (Hugging Face's flex_attention path) has several
    ours = torch.compile(model, backend=panther_backend,
                         options={"policy": policy, "compiler": compiler, "report": reports.append})
    unfused = _unfused(call)
    candidates = {"dense, eager": lambda: call(model),
                  f"dense, torch.compile ({compiler})": lambda: call(dense_compiled),
                  **({"dense, eager, unfused layers (SDPA is_causal)": lambda: unfused(model),
                      f"dense, torch.compile ({compiler}), unfused layers": lambda: unfused(dense_compiled)}
                     if unfused_rows else {}),
                  'backend="panther"': lambda: call(ours)}
    reference = call(model).float()
    errors = {name: ((fn().float() - reference).norm() / reference.norm()).item() for name, fn in candidates.items()}
    report = GraphDiffReport(rows=[r for rep in reports for r in rep.rows], source="compile",
                             graph_id=", ".join(rep.graph_id for rep in reports if rep.graph_id) or None)
    rows, headers = _timed_table(candidates, 'backend="panther"', repeats=repeats, device=device)
    for row in rows:
        row.append(f"{errors[row[0]]:.3g}")
    return rows, headers + ["rel. error vs dense eager"], report


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


# ------------------------------------------------------------------------------------------------------
# size sweeps with a picture (`--plot`): dense vs sketched, speed and memory against size, one run

#: default sizes of each sweep, (CPU, CUDA); what a size means is in SWEEP_AXIS
DEFAULT_SWEEPS = {
    "linear": ((512, 1024, 2048, 4096), (1024, 2048, 4096, 8192, 16384)),
    "conv2d": ((64, 128, 256, 512), (128, 256, 512, 1024)),
    "attention": ((256, 512, 1024, 2048, 4096), (1024, 4096, 16384, 65536)),
}
SWEEP_AXIS = {"linear": "in_features = out_features", "conv2d": "channels (in = out)",
              "attention": "sequence length"}


def _nbytes(*tensors):
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _linear_case(size, *, device, dtype, batch, num_terms, low_rank):
    dense = torch.nn.Linear(size, size, device=device, dtype=dtype)
    layer = SKLinear(size, size, num_terms, low_rank, device=device, dtype=dtype, seed=0)
    x = torch.randn(batch, size, device=device, dtype=dtype)
    out = batch * size * x.element_size()
    return {
        "nn.Linear (dense)": (lambda: dense(x), _nbytes(x, *dense.parameters()), out),
        f"panther SKLinear (L={num_terms}, k={low_rank})": (lambda: layer(x), _nbytes(x, *layer.parameters(),
                                                                                        *layer.buffers()), out),
    }


def _conv2d_case(size, *, device, dtype, batch, num_terms, low_rank, spatial=None, kernel_size=3):
    spatial = spatial or (56 if torch.device(device).type == "cuda" else 28)
    fmt = torch.channels_last
    dense = torch.nn.Conv2d(size, size, kernel_size, padding=kernel_size // 2, device=device, dtype=dtype)
    layer = SKConv2d.from_conv2d(dense, num_terms, low_rank, seed=0).to(memory_format=fmt)
    dense = dense.to(memory_format=fmt)
    x = torch.randn(batch, size, spatial, spatial, device=device, dtype=dtype).to(memory_format=fmt)
    out = x.numel() * x.element_size()
    return {
        "nn.Conv2d (dense)": (lambda: dense(x), _nbytes(x, *dense.parameters()), out),
        f"panther SKConv2d (L={num_terms}, k={low_rank})": (lambda: layer(x), _nbytes(x, *layer.parameters(),
                                                                                        *layer.buffers()), out),
    }


def _attention_case(size, *, device, dtype, batch, heads=16, head_dim=64, num_features=256, causal=False):
    from .sketch import orthogonal_random_features

    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(batch, heads, size, head_dim, device=device, dtype=dtype, generator=g) * 0.35
               for _ in range(3))
    proj = orthogonal_random_features(num_features, head_dim, device=device, dtype=dtype)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    out = q.numel() * q.element_size()
    return {
        "SDPA (exact)": (lambda: sdpa(q, k, v, is_causal=causal), _nbytes(q, k, v), out),
        f"panther rf_attention (m={num_features})": (
            lambda: _attend(q)(q, k, v, proj, "softmax", causal, None, None),
            _nbytes(q, k, v, proj), out),
    }


_SWEEP_CASES = {"linear": _linear_case, "conv2d": _conv2d_case, "attention": _attention_case}


class _ResidentPeak:
    """Peak resident memory of this process above its level before a call (Linux only).

    ``malloc_trim`` first hands freed heap pages back to the OS, so memory an earlier call left cached is
    not silently reused uncounted; writing ``5`` to ``/proc/self/clear_refs`` resets the kernel's
    high-water mark ``VmHWM`` to the current ``VmRSS``. Checked against the output size of plain matmuls
    (exact to the page). ``available`` is False where either is missing (macOS, Windows, locked /proc).
    """

    def __init__(self):
        self._trim = None
        try:
            import ctypes
            import ctypes.util

            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            self._trim = libc.malloc_trim
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.available = self._read("VmHWM") is not None
        except (OSError, AttributeError):
            self.available = False

    @staticmethod
    def _read(key):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024  # kB
        return None

    def __call__(self, fn):
        self._trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = self._read("VmRSS")
        out = fn()  # kept alive until the peak is read: the output is part of the call's memory
        peak = self._read("VmHWM")
        del out
        return max(peak - before, 0)


def _cuda_peak(fn, device):
    """Peak bytes the CUDA caching allocator handed out during ``fn()`` above what was allocated before."""
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del out
    return peak - before


def memory_method(device) -> str:
    """How :func:`sweep` gets memory on ``device``: ``"cuda"``, ``"resident"`` (Linux CPU) or ``"estimate"``."""
    if torch.device(device).type == "cuda":
        return "cuda"
    return "resident" if _ResidentPeak().available else "estimate"


MEMORY_LABELS = {
    "cuda": "measured: parameters + inputs + peak the CUDA allocator gave the call "
            "(torch.cuda.max_memory_allocated)",
    "resident": "measured: parameters + inputs + peak resident memory the call added (Linux VmHWM)",
    "estimate": "estimated: parameters + inputs + output bytes (intermediates not counted)",
}


@torch.no_grad()
def sweep(what, sizes=None, *, device="cpu", dtype=torch.float32, repeats=5, batch=None, num_terms=1,
          low_rank=16, causal=False, progress=None):
    """Dense vs sketched forward time and memory for each size, measured in one run.

    Args:
        what: ``"linear"`` (size = in = out features), ``"conv2d"`` (size = in = out channels, 3x3,
            28x28 images on CPU / 56x56 on CUDA) or ``"attention"`` (size = sequence length; 16 heads of
            64, 256 random features).
        sizes: the sizes (default :data:`DEFAULT_SWEEPS`, per device).
        batch: rows (linear; default 2048 CPU / 16384 CUDA), images (conv2d; 4 / 32) or sequences
            (attention; 1).
        num_terms, low_rank: the sketched layers' ``L`` and ``k``; ``causal``: attention only.
        progress: a bar over the sizes (see :func:`panther._progress.progress`).

    Memory per implementation and size is the bytes of its parameters, buffers and inputs plus the
    extra peak of one call (output included), measured as :func:`memory_method` says: the CUDA
    allocator's peak; on Linux CPUs the resident-set high-water mark; elsewhere an estimate (output
    bytes only). Returns a dict: ``rows`` (one dict per size and implementation: size, impl, ms,
    mem_bytes), ``impls``, ``memory`` (the method) and ``config``.
    """
    from ._progress import progress as _progress

    if what not in _SWEEP_CASES:
        raise ValueError(f"what must be one of {tuple(_SWEEP_CASES)}, got {what!r}")
    cuda = torch.device(device).type == "cuda"
    sizes = tuple(sizes or DEFAULT_SWEEPS[what][cuda])
    if not sizes or any(not isinstance(s, int) or s <= 0 for s in sizes):
        raise ValueError(f"sizes must be positive integers, got {sizes!r}")
    if batch is None:
        batch = {"linear": 16384 if cuda else 2048, "conv2d": 32 if cuda else 4, "attention": 1}[what]
    cfg = {"batch": batch}
    if what == "attention":
        cfg["causal"] = causal
    else:
        cfg.update(num_terms=num_terms, low_rank=low_rank)
    method = memory_method(device)
    resident = _ResidentPeak() if method == "resident" else None
    rows, impls = [], []
    for size in _progress(sizes, desc=f"panther bench {what}", enabled=progress, unit="size"):
        with _fixed_draws(device):
            cases = _SWEEP_CASES[what](size, device=device, dtype=dtype, **cfg)
        for name, (fn, static, out_bytes) in cases.items():
            ms = time_fn(fn, repeats=repeats, warmup=2, device=device)
            if method == "cuda":
                extra = _cuda_peak(fn, device)
            elif method == "resident":
                extra = resident(fn)
            else:
                extra = out_bytes
            rows.append({"size": size, "impl": name, "ms": ms, "mem_bytes": static + extra})
            if name not in impls:
                impls.append(name)
        del cases
        if cuda:
            torch.cuda.empty_cache()
    return {"what": what, "rows": rows, "impls": impls, "memory": method, "config": cfg, "device": str(device),
            "dtype": dtype}


def _cuda_index(device):
    index = torch.device(device).index
    return torch.cuda.current_device() if index is None else index


@contextlib.contextmanager
def _fixed_draws(device):
    """The same random draws on every run, with the caller's RNG state as it was afterwards."""
    cuda = torch.device(device).type == "cuda"
    with torch.random.fork_rng(devices=[_cuda_index(device)] if cuda else []):
        torch.manual_seed(0)
        yield


def sweep_table(result):
    """(rows, headers) for tabulate: one line per size, dense and sketched side by side."""
    dense, ours = result["impls"][0], result["impls"][-1]
    by = {(r["size"], r["impl"]): r for r in result["rows"]}
    sizes = list(dict.fromkeys(r["size"] for r in result["rows"]))
    mib = 2.0 ** 20
    out = []
    for s in sizes:
        d, o = by[(s, dense)], by[(s, ours)]
        out.append([s, f"{d['ms']:.3f}", f"{o['ms']:.3f}", f"{d['ms'] / o['ms']:.2f}x",
                    f"{d['mem_bytes'] / mib:.1f}", f"{o['mem_bytes'] / mib:.1f}",
                    f"{d['mem_bytes'] / o['mem_bytes']:.2f}x"])
    headers = [SWEEP_AXIS[result["what"]], f"{dense} ms", f"{ours} ms", "speed-up",
               "dense MiB", "sketched MiB", "memory ratio"]
    return out, headers


def _device_name(device):
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU, {torch.get_num_threads()} threads"


def plot_sweep(result, path, *, dpi=100):
    """Draw a :func:`sweep` result to ``path`` (PNG, SVG, PDF... from the suffix): time (ms, log scale)
    against size on the left, memory against size on the right; returns the path.

    Needs matplotlib (``pip install 'panther[plot]'``)."""
    from ._plot import new_figure, save_figure

    what, impls = result["what"], result["impls"]
    fig = new_figure((12, 5), dpi=dpi)
    ax_t, ax_m = fig.subplots(1, 2)
    styles = [dict(color="#555555", marker="o", linestyle="--"), dict(color="#1f77b4", marker="s")]
    for i, name in enumerate(impls):
        pts = [r for r in result["rows"] if r["impl"] == name]
        xs = [r["size"] for r in pts]
        style = styles[min(i, len(styles) - 1)]
        ax_t.plot(xs, [r["ms"] for r in pts], label=name, **style)
        ax_m.plot(xs, [r["mem_bytes"] / 2 ** 20 for r in pts], label=name, **style)
    for ax in (ax_t, ax_m):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r["size"] for r in result["rows"]}))
        ax.set_xticklabels([str(s) for s in sorted({r["size"] for r in result["rows"]})])
        ax.set_xlabel(SWEEP_AXIS[what])
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    for ax in (ax_t, ax_m):
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax_t.set_ylabel("forward time per call (ms, median, log scale)")
    ax_t.set_title("speed", fontsize=10)
    ax_m.set_ylabel("peak memory (MiB, log scale)")
    # wrapped: the label names how memory was measured and would overflow the panel on one line
    ax_m.set_title(textwrap.fill("memory — " + MEMORY_LABELS[result["memory"]], 70), fontsize=8)
    dtype = str(result["dtype"]).replace("torch.", "")
    cfg = ", ".join(f"{k}={v}" for k, v in result["config"].items())
    fig.suptitle(f"panther {what}: dense vs sketched — {_device_name(result['device'])}, {dtype} ({cfg})",
                 fontsize=11)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.12, top=0.82, wspace=0.25)
    return save_figure(fig, path)


def write_markdown(path, command, title, rows, headers="keys", *, device="cpu"):
    """Put one benchmark table into the markdown file ``path`` (e.g. docs/benchmarks.md): a section
    that names its command, the machine, the software and the date, so every number on the page has
    a source. The section sits between ``<!-- bench: command -->`` markers: running the same command
    again replaces it in place; a new command appends its own section. Returns the section's text."""
    import datetime
    from pathlib import Path

    dev = torch.device(device)
    machine = torch.cuda.get_device_name(dev) if dev.type == "cuda" else \
        f"CPU, {torch.get_num_threads()} threads"
    try:
        import triton
        software = f"torch {torch.__version__}, triton {triton.__version__}"
    except ImportError:
        software = f"torch {torch.__version__}"
    start, end = f"<!-- bench: {command} -->", f"<!-- /bench: {command} -->"
    target = Path(path)
    text = target.read_text() if target.exists() else "# Benchmarks\n"
    replace = start in text and end in text[text.index(start):]
    head = text.split(start, 1)[0] if replace else text
    # the title one level below the heading it lands under (a skipped level breaks the docs build)
    section = "\n".join([start, "#" * _level_below(head) + f" {title}", "",
                         f"`{command}` ({machine}, {software}, {datetime.date.today().isoformat()})", "",
                         tabulate(rows, headers=headers, tablefmt="github"), end])
    if replace:
        text = head + section + text.split(start, 1)[1].split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    target.write_text(text)
    return section


def _level_below(markdown):
    """One more than the level of the last heading of ``markdown`` outside code fences and outside
    other bench sections (a section's title is its neighbour's sibling, not its parent; at most 6)."""
    level, fenced, in_bench = 1, False, False
    for line in markdown.splitlines():
        if line.startswith("<!-- bench: ") or line.startswith("<!-- /bench: "):
            in_bench = line.startswith("<!-- bench: ")
        elif line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and not in_bench and line.startswith("#"):
            hashes = len(line) - len(line.lstrip("#"))
            if hashes <= 6 and line[hashes:hashes + 1] == " ":
                level = hashes
    return min(level + 1, 6)


def command_line(prog, argv):
    """The command as a user types it, without its --markdown option (the section's key)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--markdown":
            skip = True
        elif not arg.startswith("--markdown="):
            out.append(arg)
    return " ".join([prog, *out])


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
    p.add_argument("what", choices=["linear", "conv2d", "attention", "causal-scaling", "transformer", "llama",
                                    "decode"])
    p.add_argument("--seq", type=_positive_int, default=None,
                   help="attention: sequence length; decode: the prompt's length")
    p.add_argument("--causal", action="store_true",
                   help="attention: causal; transformer: a decoder-only stack under the causal mask it builds")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--in-features", type=_positive_int, default=None)
    p.add_argument("--out-features", type=_positive_int, default=None)
    p.add_argument("--batch", type=_positive_int, default=None)
    p.add_argument("--layers", type=_positive_int, default=None,
                   help="decode: causal attention layers in the stack (default 1)")
    p.add_argument("--num-terms", type=_positive_int, default=1)
    p.add_argument("--low-rank", type=_positive_int, default=None,
                   help="k (default 16; transformer, llama: 64 on CUDA)")
    p.add_argument("--repeats", type=_positive_int, default=None,
                   help="timed calls per measurement (default 20; 5 with --plot)")
    p.add_argument("--backward", action="store_true", help="time forward+backward")
    p.add_argument("--flex", action="store_true",
                   help="attention: also flex_attention, compiled by Inductor and by backend=\"panther\"")
    p.add_argument("--attention", default="sdpa", choices=["sdpa", "eager", "flex_attention"],
                   help="llama: the model's attn_implementation (eager: attention written out)")
    p.add_argument("--default-policy", action="store_true",
                   help="transformer, llama: let panther's default policy choose ranks and features")
    p.add_argument("--no-malloc-tuning", action="store_true",
                   help="CPU: keep glibc's default of returning large freed blocks to the OS")
    p.add_argument("--plot", metavar="FILE", default=None,
                   help="linear/conv2d/attention: sweep over sizes, dense vs sketched, and draw time and memory "
                        "against size to FILE (.png, .svg, .pdf; needs matplotlib: pip install 'panther[plot]')")
    p.add_argument("--markdown", metavar="FILE", default=None,
                   help="also write the table into this markdown file (e.g. docs/benchmarks.md) in a section "
                        "named by the command, replaced when the same command runs again")
    p.add_argument("--sizes", default=None, type=_int_list,
                   help="with --plot: comma-separated sizes to sweep (linear: features, conv2d: channels, "
                        "attention: sequence length), e.g. --sizes 64,128; default: a sweep per device")
    a = p.parse_args(argv)
    transformer_rank = a.low_rank or (64 if a.device == "cuda" else 16)
    a.low_rank = a.low_rank or 16
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device available (torch.cuda.is_available() is False)")
    if a.sizes is not None and a.plot is None:
        p.error("--sizes needs --plot FILE")
    if a.layers is not None and a.what != "decode":
        p.error("--layers is for decode only")
    if a.backward and a.what not in ("linear", "attention"):
        p.error(f"--backward times linear and attention only, not {a.what}")
    for flag, path in (("--plot", a.plot), ("--markdown", a.markdown)):   # checked before the run, not after it
        folder = os.path.dirname(os.path.abspath(path)) if path else None
        if folder and not os.path.isdir(folder):
            p.error(f"{flag}: no such folder {folder!r}")
    if a.plot is not None:
        if a.what in ("causal-scaling", "transformer", "llama", "decode"):
            p.error("--plot supports linear, conv2d and attention")
        given = [f for f in ("seq", "in_features", "out_features") if getattr(a, f) is not None]
        if given or a.backward:
            p.error(f"--plot sweeps forward calls over --sizes; it does not take {given or ['--backward']}")
        from ._plot import require_matplotlib

        require_matplotlib()  # fail before the sweep, not after it
        from matplotlib.backend_bases import FigureCanvasBase

        kinds = FigureCanvasBase.get_supported_filetypes()
        if os.path.splitext(a.plot)[1].lstrip(".").lower() not in kinds:
            p.error(f"--plot: FILE must end in one of {sorted('.' + k for k in kinds)}, got {a.plot!r}")
    tuned = a.device == "cpu" and not a.no_malloc_tuning and reuse_freed_memory()
    if a.plot is not None:
        return _plot_main(a, tuned, argv)
    a.repeats = a.repeats or 20
    cuda = a.device == "cuda"
    d = 8192 if cuda else 4096
    dtype = getattr(torch, a.dtype or ("bfloat16" if cuda else "float32"))
    cfg = dict(in_features=a.in_features or d, out_features=a.out_features or d,
               batch=a.batch or (16384 if cuda else 2048), num_terms=a.num_terms, low_rank=a.low_rank)
    report = None
    if a.what == "transformer":
        cfg = dict(d_model=1024 if cuda else 256, heads=16 if cuda else 4, layers=4 if cuda else 2,
                   seq=a.seq or (8192 if cuda else 1024), batch=a.batch or 2, low_rank=transformer_rank,
                   num_features=256 if cuda else 64, causal=a.causal)
        if a.default_policy:
            cfg = {k: v for k, v in cfg.items() if k not in ("low_rank", "num_features")} | {"default_policy": True}
        rows, headers, report = bench_transformer(**cfg, device=a.device, dtype=dtype, repeats=a.repeats)
    elif a.what == "llama":
        cfg = dict(hidden=2048 if cuda else 256, heads=16 if cuda else 4, kv_heads=4 if cuda else 2,
                   layers=4 if cuda else 2, seq=a.seq or (8192 if cuda else 512), batch=a.batch or 2,
                   low_rank=transformer_rank, num_features=256 if cuda else 64, vocab=32000 if cuda else 1000,
                   attention=a.attention)
        if a.default_policy:
            cfg = {k: v for k, v in cfg.items() if k not in ("low_rank", "num_features")} | {"default_policy": True}
        rows, headers, report = bench_llama(**cfg, device=a.device, dtype=dtype, repeats=a.repeats)
    elif a.what == "decode":
        cfg = dict(context=a.seq or (65536 if cuda else 4096), batch=a.batch or 1, embed=1024 if cuda else 256,
                   heads=16 if cuda else 4, num_features=256 if cuda else 64, layers=a.layers or 1)
        rows, headers = bench_decode(**cfg, device=a.device, dtype=dtype, repeats=a.repeats)
    elif a.what == "causal-scaling":
        cfg = dict(lengths=(1024, 4096), heads=8, head_dim=64, num_features=256)
        rows, headers = bench_causal_scaling(**cfg, device=a.device, dtype=dtype, repeats=min(a.repeats, 5))
    elif a.what == "attention":
        seq = a.seq or (65536 if cuda else 2048)
        cfg = dict(seq=seq, batch=a.batch or max(1, (65536 if cuda else 4096) // seq), heads=16, head_dim=64,
                   num_features=256, causal=a.causal)
        rows, headers = bench_attention(**cfg, device=a.device, dtype=dtype, repeats=a.repeats,
                                        backward=a.backward, flex=a.flex)
    elif a.what == "conv2d":
        cfg = dict(channels=512, size=56, batch=a.batch or (32 if cuda else 4), num_terms=a.num_terms,
                   low_rank=a.low_rank)
        rows, headers = bench_conv2d(**cfg, device=a.device, dtype=dtype, repeats=a.repeats)
    else:
        rows, headers = bench_linear(**cfg, device=a.device, dtype=dtype, repeats=a.repeats, backward=a.backward)
    where = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    kind = {"transformer": "nn.TransformerEncoder inference",
            "llama": "Hugging Face LlamaForCausalLM inference, last sequence left-padded by 25%",
            "decode": "one generated token through causal attention layers"}.get(a.what, f"sketched {a.what}")
    title = (f"{kind} {'forward+backward' if a.backward else 'forward'}: "
             + ", ".join(f"{k}={v}" for k, v in cfg.items()) + f", {dtype}")
    print(f"{title}, {where}, torch {torch.__version__}")
    print(tabulate(rows, headers=headers))
    if report is not None:
        print(report)
    _markdown(a, argv, title, rows, headers)
    if tuned:
        print("(glibc set to reuse freed memory, see panther.bench.reuse_freed_memory; --no-malloc-tuning to skip)")


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        import argparse

        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _int_list(text):
    try:
        sizes = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        sizes = []
    if not sizes or any(v <= 0 for v in sizes):
        import argparse

        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, e.g. 64,128; got {text!r}")
    return sizes


def _plot_main(a, tuned, argv=None):
    cuda = a.device == "cuda"
    dtype = getattr(torch, a.dtype or ("bfloat16" if cuda else "float32"))
    result = sweep(a.what, a.sizes, device=a.device, dtype=dtype, repeats=a.repeats or 5, batch=a.batch,
                   num_terms=a.num_terms, low_rank=a.low_rank, causal=a.causal)
    rows, headers = sweep_table(result)
    cfg = ", ".join(f"{k}={v}" for k, v in result["config"].items())
    print(f"sketched {a.what} forward sweep: {cfg}, {dtype}, {_device_name(a.device)}, torch {torch.__version__}")
    print(tabulate(rows, headers=headers))
    print(f"memory {MEMORY_LABELS[result['memory']]}")
    if tuned:
        print("(glibc set to reuse freed memory, see panther.bench.reuse_freed_memory; --no-malloc-tuning to skip)")
    print(f"figure written to {plot_sweep(result, a.plot)}")
    _markdown(a, argv, f"sketched {a.what} forward sweep: {cfg}, {dtype}", rows, headers)
    return 0


def _markdown(a, argv, title, rows, headers):
    if a.markdown:
        import sys
        write_markdown(a.markdown, command_line("python -m panther bench", sys.argv[1:] if argv is None else argv),
                       title, rows, headers, device=a.device)
        print(f"(table written to {a.markdown})")
