"""``python -m panther demo`` (``make demo``): the compile backend on a built-in model.

The model is a small vision transformer: a conv net stem (three Conv2d layers) turns 64x64 images into 256
tokens, then a stack of transformer blocks (fused qkv projection, ``F.scaled_dot_product_attention``,
MLP). It runs in inference mode three ways, and the demo prints

1. the graph diff report of ``torch.compile(model, backend="panther")`` with the default policy (a layer is
   sketched only where that at least halves its FLOPs) plus one per-layer override: the stem's middle
   conv stays dense (its FLOP-halving rank, 8, would lose 13% of its weight and, through the stem's
   nonlinearities and the normalisations after it, far more of the output);
2. the maximum relative error of panther's output against the dense model;
3. eager vs ``backend="inductor"`` vs ``backend="panther"``: compile time and time per call;
4. the error-budget policy (``panther.policy.ErrorBudgetPolicy``): calibrated on 16 other images, it picks
   per layer the cheapest rank whose relative output error stays within ``--budget`` (default 0.05); the demo
   converts the model with it (``panther.convert``) and prints its report, the FLOPs it removed, the
   per-layer errors measured on the demo images (not used for calibration) and its time per call against the
   dense model's, eager and compiled with Inductor.

Dense weights are drawn with a decaying singular spectrum (like trained layers; random Gaussian weights have
a flat spectrum that no low-rank method can approximate), so the error column means something.

It also draws the graph diff report of part 1 (the model's FX graph with the replaced layers marked) to
``panther-report.png`` in the current directory (``--report-png PATH`` to choose the file, ``--report-png ''``
to skip; needs matplotlib, ``pip install 'panther[plot]'``).

Options: ``--blocks N`` (default 2), ``--batch N`` (default 4), ``--repeats N`` (default 5),
``--policy default|attention`` (``attention`` also swaps exact attention for random features).
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import time

import torch
import torch.nn.functional as F
from tabulate import tabulate
from torch import nn

__all__ = ["main", "DemoViT", "build_model"]


class Block(nn.Module):
    def __init__(self, dim, heads, mlp_ratio=4):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp_ratio * dim)
        self.fc2 = nn.Linear(mlp_ratio * dim, dim)

    def forward(self, x):
        B, L, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(a.transpose(1, 2).reshape(B, L, D))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class DemoViT(nn.Module):
    """Conv stem (3 -> 32 -> 64 -> dim channels, /4 spatially) + transformer blocks + mean-pool head."""

    def __init__(self, dim=256, heads=4, blocks=2, classes=10):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(64, dim, 3, stride=2, padding=1),
        )
        self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(blocks)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, img):
        x = self.stem(img).flatten(2).transpose(1, 2)  # (B, tokens, dim)
        return self.head(self.norm(self.blocks(x)).mean(1))


@torch.no_grad()
def _decaying_spectrum_(model, generator, decay=8.0):
    """Give every Linear/Conv2d weight singular values s_i = s_0 exp(-i / decay) (same Frobenius scale as
    PyTorch's default init): trained layers are far from flat-spectrum random matrices."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            W = m.weight.reshape(m.weight.shape[0], -1)
            r = min(W.shape)
            U, _ = torch.linalg.qr(torch.randn(W.shape[0], r, generator=generator))
            V, _ = torch.linalg.qr(torch.randn(W.shape[1], r, generator=generator))
            s = torch.exp(-torch.arange(r, dtype=W.dtype) / decay)
            s *= W.norm() / s.norm()
            m.weight.copy_(((U * s) @ V.T).reshape(m.weight.shape))


def build_model(blocks=2, seed=0):
    """The demo's :class:`DemoViT` in eval mode, its weights drawn from ``seed`` with a decaying spectrum."""
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = DemoViT(blocks=blocks)
    _decaying_spectrum_(model, g)
    return model.eval()


def _compile(model, x, **compile_kwargs):
    torch._dynamo.reset()
    compiled = torch.compile(model, **compile_kwargs)
    # Collect the earlier steps' garbage first: otherwise a full collection (0.3 s on a 2-core machine,
    # measured) falls inside whichever compile happens to cross Python's threshold.
    gc.collect()
    t0 = time.perf_counter()
    y = compiled(x)  # first call: Dynamo trace + backend compile
    return compiled, y, time.perf_counter() - t0


def _interleaved_ms(fns, x, repeats):
    """Median ms per call of each fn, timed round-robin so that load changes hit all of them alike."""
    samples = {name: [] for name in fns}
    for fn in fns.values():
        fn(x)  # warm-up
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn(x)
            samples[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(v) for name, v in samples.items()}


def main(argv=None):
    """``python -m panther demo [options]`` (options in the module docstring); returns the exit code."""
    ap = argparse.ArgumentParser(prog="python -m panther demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--blocks", type=int, default=2, help="transformer blocks after the conv stem (default 2)")
    ap.add_argument("--batch", type=int, default=4, help="images of 3x64x64 per call (default 4)")
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per model, round robin (default 5)")
    ap.add_argument("--policy", choices=("default", "attention"), default="default",
                    help="part 1's policy: panther's default, or 'attention' (random features for every "
                         "attention layer as well)")
    ap.add_argument("--budget", type=float, default=0.05, help="error budget of part 4 (relative, per layer)")
    ap.add_argument("--report-png", default="panther-report.png", metavar="PATH",
                    help="draw part 1's graph diff report to PATH ('' to skip; needs matplotlib)")
    args = ap.parse_args(argv)

    import logging

    from .policy import SketchSpec, default_policy

    logging.getLogger("panther").setLevel(logging.WARNING)  # the report is printed below instead
    torch.set_grad_enabled(False)  # inference: the backend's weight rewrites need grad off
    model = build_model(blocks=args.blocks)
    x = torch.randn(args.batch, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"panther demo: conv stem + {args.blocks} transformer blocks, {n_params / 1e6:.2f}M params, "
          f"input {tuple(x.shape)}, {torch.get_num_threads()} CPU threads\n")

    policy = None
    overrides = {"stem.2": "skip"}
    if args.policy == "attention":
        def policy(info):
            if info.kind == "attention":
                return SketchSpec(num_random_features=2 * info.extra["head_dim"])
            return default_policy(info)

    reports = []
    y_dense = model(x)
    # One-time start-up costs (imports, Dynamo's first trace of these modules' code) would otherwise land on
    # whichever backend compiles first.
    _compile(model, x, backend="eager")
    # Compile times are taken with Inductor's graph caches off, so that both compiles do the work (with them
    # on, a machine that ran the demo before times two cache look-ups). An untimed Inductor compile of the
    # same model first takes Inductor's own warm-up (about 3 s on a 2-core machine, spread over its lowering
    # and scheduling code), which would otherwise land on whichever backend compiles first.
    # Each backend's time is the best of two compiles (panther, inductor, then inductor, panther): one
    # compile on a busy 2-core machine varies by a third.
    pan_kwargs = dict(backend=_panther_backend(),
                      options={"policy": policy, "overrides": overrides, "report": reports.append})
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        _compile(model, x, backend="inductor")
        c_pan, y_pan, pan_compile = _compile(model, x, **pan_kwargs)
        c_ind, y_ind, ind_compile = _compile(model, x, backend="inductor")
        ind_compile = min(ind_compile, _compile(model, x, backend="inductor")[2])
        # the last compile stays valid for the per-call timings below (each compile's Dynamo reset
        # invalidates the earlier ones, which then recompile in their warm-up call)
        c_pan, _, again = _compile(model, x, **pan_kwargs)
        pan_compile = min(pan_compile, again)
    ms = _interleaved_ms({"eager": model, "inductor": c_ind, "panther": c_pan}, x, args.repeats)
    eager_ms, ind_ms, pan_ms = ms["eager"], ms["inductor"], ms["panther"]

    print(reports[-1])
    if args.report_png:
        _write_report_picture(reports[-1], args.report_png)
    err, err_ind = _max_rel_err(y_pan, y_dense), _max_rel_err(y_ind, y_dense)
    print(f"\nmax relative output error vs dense (worst sample, L2): panther {err:.2e}   (inductor {err_ind:.1e})\n")
    rows = [
        ["eager", "-", f"{eager_ms:.1f}", "1.00x"],
        ["inductor", f"{ind_compile:.1f}", f"{ind_ms:.1f}", f"{eager_ms / ind_ms:.2f}x"],
        ["panther", f"{pan_compile:.1f}", f"{pan_ms:.1f}", f"{eager_ms / pan_ms:.2f}x"],
    ]
    print(tabulate(rows, headers=["backend", "compile s (best of 2)", "ms / call", "speed-up vs eager"]))
    _timing_note(args.repeats)
    ratio = pan_compile / ind_compile
    print(f"\npanther compile time / inductor compile time = {ratio:.2f} ({'within' if ratio <= 1.5 else 'MISSES'} the "
          "target <= 1.5; each the best of two compiles with Inductor's graph caches off, after an untimed Inductor "
          "compile of the same model)")
    _error_budget_part(model, x, args.budget, args.repeats)
    return 0


def _write_report_picture(report, path):
    """Draw ``report`` to ``path``; a missing matplotlib is a printed note, not a failed demo."""
    try:
        written = report.to_png(path)
    except ImportError as e:
        print(f"(report picture skipped: {e})")
        return None
    print(f"graph diff picture written to {os.path.abspath(written)}")
    return written


def _error_budget_part(model, x, budget, repeats):
    """Part 4: the error-budget policy through panther.convert, checked on images it was not calibrated on,
    and timed against the dense model."""
    import copy

    from .budget import ErrorBudgetPolicy, relative_output_errors
    from .conversion import convert

    calib = [torch.randn(16, *x.shape[1:], generator=torch.Generator().manual_seed(2))]
    policy = ErrorBudgetPolicy(model, calib, budget)
    sketched, report = convert(copy.deepcopy(model), policy, example_inputs=x)
    print(f"\nerror-budget policy (budget {budget:g} relative output error per layer, calibrated on 16 other images):")
    print(report)
    t = report.totals
    errs = relative_output_errors(model, sketched, x)
    worst = max(errs.items(), key=lambda kv: kv[1]) if errs else ("-", 0.0)
    print(f"linear/conv FLOPs removed: {1 - t['flops_after'] / t['flops_before']:.1%}; measured on the demo images: "
          f"worst layer {worst[0]} {worst[1]:.3g} (budget {budget:g}); model output error (errors compound "
          f"through the layers) {_max_rel_err(sketched(x), model(x)):.3g}")
    # the FLOPs removed are a count; what a user gets is time: the converted model eager (its sketched
    # modules as they run in a training loop) and compiled, timed side by side with the dense model
    compiled = _compile(sketched, x, backend="inductor")[0]
    ms = _interleaved_ms({"dense, eager": model, "converted, eager": sketched,
                          "converted, backend=inductor": compiled}, x, repeats)
    dense_ms = ms["dense, eager"]
    print()
    print(tabulate([[name, f"{t:.1f}", f"{dense_ms / t:.2f}x"] for name, t in ms.items()],
                   headers=["model", "ms / call", "speed-up vs dense eager"]))
    _timing_note(repeats)


def _timing_note(repeats):
    """How the times beside it were taken, and how busy the machine was (its other work skews CPU timings)."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"(median of {repeats} round-robin calls each; 1-min load average {load:.1f} on "
          f"{os.cpu_count()} CPUs: on a busy machine CPU timings are noisy, and two tables of the same model "
          f"taken minutes apart differ)")


def _max_rel_err(y, ref):
    """max over samples of ||y_i - ref_i|| / ||ref_i||."""
    return ((y - ref).flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1)).max().item()


def _panther_backend():
    """The backend by name when the entry point is installed, else the function itself (source checkouts)."""
    import importlib.metadata

    if any(ep.name == "panther" for ep in importlib.metadata.entry_points(group="torch_dynamo_backends")):
        return "panther"
    from .backend import panther_backend

    return panther_backend


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
