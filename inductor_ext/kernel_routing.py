"""Inductor-scoped kernel choice: route panther ops to their Triton twins where those kernels serve the call.

``panther::rf_attention`` (C++/ATen kernels) and ``panther::rf_attention_triton`` (fused Triton kernels,
registered with ``triton_op`` so Inductor inlines them) compute the same function and share one autograd
formula. Inductor cannot take a decomposition that applies on some devices only (an op it falls back on
must have none), so the choice is made on the graph before it is compiled, from each node's example
values: CUDA inputs the Triton kernels cover go to the Triton op, anything else keeps the C++ op.
"""
from __future__ import annotations

import torch

__all__ = ["use_triton_kernels"]


def _example(gm, arg):
    if not isinstance(arg, torch.fx.Node):
        return arg
    if arg.op == "get_attr":
        obj = gm
        for part in arg.target.split("."):
            obj = getattr(obj, part, None)
        return obj
    return arg.meta.get("example_value", arg.meta.get("val"))


def use_triton_kernels(gm: torch.fx.GraphModule) -> int:
    """Retarget the ``panther.rf_attention`` nodes of ``gm`` whose inputs the Triton kernels serve to
    ``panther.rf_attention_triton``. Returns how many nodes were retargeted (0 without CUDA or Triton)."""
    if not torch.cuda.is_available():
        return 0
    op = getattr(getattr(torch.ops.panther, "rf_attention", None), "default", None)
    nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is op] if op else []
    if not nodes:
        return 0
    try:
        from .triton_attention import kernel_ok
    except ImportError:  # no triton
        return 0
    moved = 0
    for n in nodes:
        q, k, v, projection = (_example(gm, a) for a in n.args[:4])
        mask = _example(gm, n.args[7]) if len(n.args) > 7 else None
        tensors = (q, k, v, projection)
        if not all(isinstance(t, torch.Tensor) for t in tensors) or q.device.type != "cuda":
            continue
        if kernel_ok(q, k, v, projection, mask):
            n.target = torch.ops.panther.rf_attention_triton.default
            moved += 1
    if moved:
        gm.recompile()
    return moved
