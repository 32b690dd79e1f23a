"""Inductor-scoped kernel choice: route panther ops to their Triton twins where those kernels serve the call.

``panther::rf_attention`` / ``panther::sketched_conv2d`` (C++/ATen kernels) and
``panther::rf_attention_triton`` / ``panther::sketched_conv2d_triton`` (Triton kernels, registered with
``triton_op`` so Inductor inlines them) compute the same functions and share their autograd formulas.
Inductor cannot take a decomposition that applies on some devices only (an op it falls back on must have
none), so the choice is made on the graph before it is compiled, from each node's example values: CUDA
inputs the Triton kernels cover go to the Triton op, anything else keeps the C++ op.
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


def _attention_ok(gm, n):
    from .triton_attention import kernel_ok

    q, k, v, projection = (_example(gm, a) for a in n.args[:4])
    mask = _example(gm, n.args[7]) if len(n.args) > 7 else None
    return all(isinstance(t, torch.Tensor) for t in (q, k, v, projection)) and q.device.type == "cuda" \
        and kernel_ok(q, k, v, projection, mask)


def _conv_ok(gm, n):
    from .triton_conv import tap_ok

    x, S1s = (_example(gm, a) for a in n.args[:2])
    return isinstance(x, torch.Tensor) and isinstance(S1s, torch.Tensor) and x.device.type == "cuda" \
        and tap_ok(x, S1s, n.args[4])


# C++ op -> (its Triton twin, whether a node's example inputs are served by the twin's kernels)
_ROUTES = {"rf_attention": ("rf_attention_triton", _attention_ok),
           "sketched_conv2d": ("sketched_conv2d_triton", _conv_ok)}


def use_triton_kernels(gm: torch.fx.GraphModule) -> int:
    """Retarget the ``panther.rf_attention`` and ``panther.sketched_conv2d`` nodes of ``gm`` whose inputs
    the Triton kernels serve to their Triton twins. Returns how many nodes were retargeted (0 without
    CUDA or Triton)."""
    if not torch.cuda.is_available():
        return 0
    moved = 0
    for name, (twin, serves) in _ROUTES.items():
        op = getattr(getattr(torch.ops.panther, name, None), "default", None)
        nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is op] if op else []
        for n in nodes:
            if serves(gm, n):
                n.target = getattr(torch.ops.panther, twin).default
                moved += 1
    if moved:
        gm.recompile()
    return moved
