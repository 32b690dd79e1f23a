"""The tap-GEMM conv against the C++ op and dense cuDNN over channel counts and ranks (CUDA).

    python -m inductor_ext.triton_conv_bench [--markdown docs/benchmarks.md]

bf16, channels_last, 3×3, 56×56, batch 32, L = 1. Every time is one replay of the call captured in a CUDA
graph (``panther.bench.graph_time_fn``): GPU time, no Python overhead. This sweep set ``TAP_MAX_RANK`` and
``TAP_MAX_GROWTH`` (``inductor_ext/triton_conv.py``).
"""
from __future__ import annotations

import argparse

import torch

import panther  # noqa: F401  (loads the native ops)
from panther.bench import graph_time_fn, write_markdown
from panther.nn import SKConv2d

from . import triton_conv as tconv

CASES = ((64, 16), (128, 16), (256, 16), (384, 16), (512, 16), (1024, 16), (128, 8), (256, 8), (512, 32),
         (512, 64))  # (channels, k): R = 2k


@torch.no_grad()
def sweep(cases=CASES, size=56, batch=32, dtype=torch.bfloat16, *, device="cuda", timer=graph_time_fn):
    """Rows: channels, k, R, U / x, dense, C++ op, tap GEMM (ms), C++ op / tap, dense / tap, tap_ok.
    (``device`` / ``timer``: the interpreter check runs it on the CPU with a stand-in timer.)"""
    rows = []
    cl = torch.channels_last
    for c, k in cases:
        dense = torch.nn.Conv2d(c, c, 3, padding=1, device=device, dtype=dtype).to(memory_format=cl)
        layer = SKConv2d.from_conv2d(dense, 1, k, seed=0).to(memory_format=cl)
        x = torch.randn(batch, c, size, size, device=device, dtype=dtype).contiguous(memory_format=cl)
        args = (x, layer.S1s, layer.U1s, layer.bias, [1, 1], [1, 1], [1, 1])
        t_dense = timer(lambda: dense(x))
        t_cpp = timer(lambda: torch.ops.panther.sketched_conv2d(*args))
        t_tap = timer(lambda: tconv.tap_conv(*args, in_op=False))
        rows.append([c, k, 2 * k, f"{9 * 2 * k / c:.2f}", f"{t_dense:.3f}", f"{t_cpp:.3f}", f"{t_tap:.3f}",
                     f"{t_cpp / t_tap:.2f}x", f"{t_dense / t_tap:.2f}x", tconv.tap_ok(x, layer.S1s, [1, 1])])
    headers = ["channels", "k", "R", "U / x", "dense ms", "C++ op ms", "tap GEMM ms", "C++ op / tap",
               "dense / tap", "tap_ok"]
    return rows, headers


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m inductor_ext.triton_conv_bench", description=__doc__)
    p.add_argument("--markdown", metavar="FILE", default=None, help="also write the table into this markdown file")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA device")
    from tabulate import tabulate

    rows, headers = sweep()
    title = "tap-GEMM conv sweep (bf16, channels_last, 3x3, 56x56, batch 32, L=1; CUDA-graph ms)"
    print(f"{title}, {torch.cuda.get_device_name()}")
    print(tabulate(rows, headers=headers))
    if a.markdown:
        write_markdown(a.markdown, "python -m inductor_ext.triton_conv_bench", title, rows, headers, device="cuda")


if __name__ == "__main__":
    main()
