"""The main job, on built-in models (extended by the compile backend work)."""
from __future__ import annotations

import torch
from tabulate import tabulate

from .bench import time_fn
from .nn import SKLinear


def main(argv=None):
    torch.manual_seed(0)
    d_in = d_out = 2048
    dense = torch.nn.Linear(d_in, d_out)
    x = torch.randn(512, d_in)
    rows = []
    with torch.no_grad():
        y = dense(x)
        t_dense = time_fn(lambda: dense(x), repeats=10)
        for init in ("sketch", "svd"):
            for k in (16, 64):
                layer = SKLinear.from_linear(dense, num_terms=1, low_rank=k, init=init)
                err = ((layer(x) - y).norm() / y.norm()).item()
                t = time_fn(lambda: layer(x), repeats=10)
                params = sum(p.numel() for p in layer.parameters())
                rows.append([init, k, params, f"{err:.3f}", f"{t:.2f}", f"{t_dense / t:.1f}x"])
    print(f"nn.Linear({d_in}, {d_out}): {sum(p.numel() for p in dense.parameters())} params, {t_dense:.2f} ms "
          f"for a batch of {x.shape[0]} on CPU")
    print(tabulate(rows, headers=["init", "low_rank", "params", "rel. error vs dense", "ms", "speed-up"]))
    return 0
