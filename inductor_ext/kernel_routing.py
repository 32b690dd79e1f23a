"""Inductor-scoped kernel choice: route panther ops to their Triton twins where those kernels serve the call.

``panther::rf_attention`` (C++/ATen kernels) and ``panther::rf_attention_triton`` (fused Triton kernels,
registered with ``triton_op`` so Inductor inlines them) compute the same function and share one autograd
formula; so do ``panther::sketched_conv2d`` and ``panther::sketched_conv2d_triton`` (one fused kernel for
channels_last inputs, the rule ``SKConv2d`` follows in eager mode too). Inductor cannot take a
decomposition that applies on some devices only (an op it falls back on must have none), so the choice
is made on the graph before it is compiled, from each node's example values: CUDA inputs the Triton
kernels cover go to the Triton op, anything else keeps the C++ op.
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
    """Retarget the ``panther.rf_attention`` and ``panther.sketched_conv2d`` nodes of ``gm`` whose inputs
    the Triton kernels serve to ``panther.rf_attention_triton`` / ``panther.sketched_conv2d_triton``.
    Returns how many nodes were retargeted (0 without CUDA or Triton)."""
    if not torch.cuda.is_available():
        return 0
    moved = _route_attention(gm) + _route_conv(gm)
    if moved:
        gm.recompile()
    return moved


def _nodes(gm, name):
    """Calls of ``panther::name``, recorded as the overload or as the packet."""
    packet = getattr(torch.ops.panther, name, None)
    if packet is None:
        return []
    ops = (packet, packet.default)
    return [n for n in gm.graph.nodes if n.op == "call_function" and any(n.target is op for op in ops)]


def _route_attention(gm):
    nodes = _nodes(gm, "rf_attention")
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
    return moved


def _route_conv(gm):
    nodes = _nodes(gm, "sketched_conv2d")
    if not nodes:
        return 0
    try:
        from .triton_conv import kernel_ok
    except ImportError:  # no triton
        return 0
    moved = 0
    for n in nodes:
        if len(n.args) != 7 or n.kwargs:
            continue
        x, S1s, U1s, bias = (_example(gm, a) for a in n.args[:4])
        if not all(isinstance(t, torch.Tensor) for t in (x, S1s, U1s)) or x.device.type != "cuda":
            continue
        if kernel_ok(x, S1s, U1s, bias, *(list(a) for a in n.args[4:])):
            n.target = torch.ops.panther.sketched_conv2d_triton.default
            moved += 1
    return moved
