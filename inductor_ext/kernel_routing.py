"""Inductor-scoped kernel choice: route panther ops to their Triton twins where those kernels serve the call.

``panther::rf_attention`` / ``panther::sketched_conv2d`` / ``panther::sketched_linear`` (C++/ATen kernels)
and ``panther::rf_attention_triton`` / ``panther::sketched_conv2d_triton`` /
``panther::sketched_linear_triton_fwd`` (Triton kernels, registered with ``triton_op`` so Inductor inlines
them) compute the same functions with the same autograd formulas. Inductor cannot take a decomposition
that applies on some devices only (an op it falls back on must have none), so the choice is made on the
graph before it is compiled, from each node's example values: CUDA inputs the Triton kernels cover go to
the Triton op, anything else keeps the C++ op (and, for the linear, panther's GEMM decomposition).

Under autocast the C++ ops' autocast kernels cast every floating-point input to the autocast dtype; the
Triton twins have no autocast kernel. For a graph compiled inside ``torch.autocast`` the routing writes
those casts into the graph first (``x.to(dtype)``, what the autocast kernel would do), so the Triton
kernels see the inputs the C++ op would compute on. Graphs that enter autocast themselves (a
``torch.autocast`` block inside the model) keep the C++ ops.
"""
from __future__ import annotations

import operator

import torch

__all__ = ["use_triton_kernels", "linear_routed"]


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


def _linear_args(n):
    """``(x, S1s, S2s, U1s, U2s, bias)`` of a ``panther.sketched_linear`` node, bias positional or keyword."""
    return tuple(n.args) + (n.kwargs.get("bias"),) * (len(n.args) == 5)


def linear_routed(x, S1s, S2s, U1s, U2s, bias=None) -> bool:
    """Whether the backend sends a ``panther.sketched_linear`` call with these (example) arguments to the
    fused Triton op: CUDA, one device and dtype for all, where the fused kernel serves the call on a GPU
    (``triton_linear._served``: a rank up to ``CUDA_FUSED_MAX_RANK``, and the rows from which it was
    measured faster than the GEMMs: ``CUDA_FP32_FUSED_MIN_ROWS`` for fp32, a number per feature for
    wide half-precision layers)."""
    from .triton_linear import _served

    tensors = [t for t in (x, S1s, S2s, U1s, U2s, bias) if t is not None]
    if not all(isinstance(t, torch.Tensor) for t in tensors) or x.device.type != "cuda":
        return False
    if any(t.device != x.device or t.dtype != x.dtype for t in tensors):
        return False
    return _served(x, S1s, S2s)


def _linear_ok(gm, n):
    return linear_routed(*(_example(gm, a) for a in _linear_args(n)))


def _to_linear_twin(gm, n):
    """``sketched_linear(...)`` -> ``sketched_linear_triton_fwd(...)[0]`` (the twin also returns xA, which
    its backward reuses as the C++ op's does)."""
    graph = gm.graph
    with graph.inserting_before(n):
        fused = graph.call_function(torch.ops.panther.sketched_linear_triton_fwd.default, _linear_args(n))
        y = graph.call_function(operator.getitem, (fused, 0))
    y.meta.update(n.meta)
    n.replace_all_uses_with(y)
    graph.erase_node(n)


def _retarget(twin):
    def move(gm, n):
        n.target = getattr(torch.ops.panther, twin).default
    return move


# C++ op -> (whether a node's example inputs are served by its Triton twin's kernels, the rewrite)
_ROUTES = {"rf_attention": (_attention_ok, _retarget("rf_attention_triton")),
           "sketched_conv2d": (_conv_ok, _retarget("sketched_conv2d_triton")),
           "sketched_linear": (_linear_ok, _to_linear_twin)}


def _enters_autocast(gm):
    enter = getattr(torch.amp.autocast_mode, "_enter_autocast", None)
    return any(n.op == "call_function" and n.target is enter for n in gm.graph.nodes)


def _cast_as_autocast(gm, n):
    """Cast ``n``'s floating-point CUDA tensor inputs to the autocast dtype in the graph, as the C++ op's
    autocast kernel does when it runs (the Triton twin has none)."""
    if not torch.is_autocast_enabled("cuda"):
        return
    dtype = torch.get_autocast_dtype("cuda")

    def cast(arg):
        value = _example(gm, arg)
        if not (isinstance(arg, torch.fx.Node) and isinstance(value, torch.Tensor) and value.is_cuda
                and value.is_floating_point() and value.dtype != dtype):
            return arg
        with gm.graph.inserting_before(n):
            cast_node = gm.graph.call_method("to", (arg, dtype))
        cast_node.meta["example_value"] = value.to(dtype)
        return cast_node

    n.args = tuple(cast(a) for a in n.args)
    n.kwargs = {k: cast(v) for k, v in n.kwargs.items()}


def use_triton_kernels(gm: torch.fx.GraphModule) -> int:
    """Retarget the ``panther.rf_attention``, ``panther.sketched_conv2d`` and ``panther.sketched_linear``
    nodes of ``gm`` whose inputs the Triton kernels serve to their Triton twins. Returns how many nodes
    were retargeted (0 without CUDA or Triton, and in graphs that enter autocast themselves)."""
    if not torch.cuda.is_available() or _enters_autocast(gm):
        return 0
    moved = 0
    for name, (serves, move) in _ROUTES.items():
        packet = getattr(torch.ops.panther, name, None)
        targets = (packet, packet.default) if packet is not None else ()
        for n in [n for n in gm.graph.nodes if n.op == "call_function" and n.target in targets]:
            _cast_as_autocast(gm, n)
            if serves(gm, n):
                move(gm, n)
                moved += 1
    if moved:
        gm.recompile()
    return moved
