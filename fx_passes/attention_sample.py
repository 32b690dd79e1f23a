"""Running a graph once on its example inputs, to sample its attention calls (``panther.attention_error``).

Before rewriting, the backend runs the graph on the real example inputs (no grad, the RNG state restored
after) and keeps a sample of each attention call's inputs (SDPA, nn.MultiheadAttention, attention written
out, flex_attention); policies and the report then see how far random features are from exact attention there.
Graphs that mutate their inputs or call collectives are not run.
"""
from __future__ import annotations

import logging
import operator
from collections import Counter
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import fx

from .common import concrete


log = logging.getLogger("panther")

# ops whose result may share memory with their first argument
_VIEWS = {"view", "reshape", "transpose", "permute", "t", "expand", "select", "narrow", "unsqueeze", "squeeze",
          "flatten", "unflatten", "as_strided", "detach", "contiguous", "view_as", "expand_as", "unbind", "split",
          "chunk", "getitem", "__getitem__", "to", "type_as", "float", "half", "bfloat16"}


def _name(n: fx.Node) -> str:
    name = n.target if n.op == "call_method" else getattr(n.target, "__name__", "") if n.op == "call_function" else ""
    return name if isinstance(name, str) else ""


def _state_behind(n) -> bool:
    """Whether ``n`` is a graph input or module state, or may be a view of one."""
    while isinstance(n, fx.Node):
        if n.op in ("placeholder", "get_attr"):
            return True
        if _name(n) not in _VIEWS or not n.args:
            return False
        n = n.args[0]
    return False


def _mutates(gm: fx.GraphModule) -> bool:
    """Whether running ``gm`` changes anything outside it: an in-place op (``x.add_(...)``, ``x[i] = ...``,
    ``x += ...``) on a graph input or module state, or on what may be a view of one. In-place ops on the
    graph's own temporaries (nn.MultiheadAttention's ``masked_fill_`` of a fresh mask) are harmless."""
    for n in gm.graph.nodes:
        if n.op not in ("call_function", "call_method") or not n.args:
            continue
        name = _name(n)
        in_place = n.target in (operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv,
                                operator.iand, operator.ior) or (
            getattr(n.target, "__module__", None) != "_operator" and name.endswith("_") and not name.endswith("__"))
        if in_place and _state_behind(n.args[0]):
            return True
    return False


def _communicates(gm: fx.GraphModule) -> bool:
    """Whether ``gm`` calls collectives (FSDP's all-gathers, say): a run that not every rank makes would hang."""
    for n in gm.graph.nodes:
        where = f"{getattr(n.target, '__module__', '')}.{getattr(n.target, '__name__', n.target)}"
        if n.op == "call_function" and ("c10d" in where or "torch.distributed" in where):
            return True
    return False


#: how to sample one attention call: the nodes whose values it reads, and ``fn({node: value}) -> sample``
Sampler = Tuple[Sequence[fx.Node], Callable[[Dict[fx.Node, object]], Dict]]


def of_call(node: fx.Node, sample_args: Callable) -> Sampler:
    """The :data:`Sampler` of a call whose own arguments are the attention's inputs (SDPA, MHA):
    ``sample_args(args, kwargs)`` on their values."""
    needed: List[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), needed.append)
    return needed, lambda values: sample_args(*fx.node.map_arg((node.args, node.kwargs), values.__getitem__))


def sample_attention(gm: fx.GraphModule, real_inputs: Optional[list], samplers: Dict[fx.Node, Sampler],
                     stand_ins: Optional[Dict[fx.Node, Callable]] = None) -> Dict[fx.Node, Dict]:
    """One run of ``gm`` on ``real_inputs``; for each attention call in ``samplers``, the sample of its
    inputs (``panther.attention_error.sample``), taken once the call has run, from the values of the nodes
    its sampler names (kept until then). ``stand_ins[node](args, kwargs)`` computes a node's value in this
    run instead of the node itself (an SDPA call for a flex_attention call, whose eager form materialises
    every score). Empty when the graph cannot be run safely (or fails to)."""
    if not samplers or real_inputs is None or _mutates(gm) or _communicates(gm):
        return {}
    samples: Dict[fx.Node, Dict] = {}
    readers = Counter(n for needed, _ in samplers.values() for n in needed)  # the samplers still to read n
    kept: Dict[fx.Node, object] = {}
    stand_ins = stand_ins or {}

    class Run(fx.Interpreter):
        def run_node(self, n):
            out = stand_ins[n](*self.fetch_args_kwargs_from_env(n)) if n in stand_ins else super().run_node(n)
            if n in readers:
                kept[n] = out
            if n in samplers:
                needed, fn = samplers[n]
                try:
                    samples[n] = fn({x: kept[x] for x in needed})
                except Exception as e:  # noqa: BLE001 - a call it cannot sample has no error; the others keep theirs
                    log.debug("panther: could not sample the attention inputs of %s: %s", n, e)
                for x in needed:
                    readers[x] -= 1
                    if not readers[x]:
                        kept.pop(x)
            return out

    devices = sorted({t.device.index or 0 for t in real_inputs if isinstance(t, torch.Tensor) and t.is_cuda})
    # a graph with dynamic shapes takes its sizes as SymInt placeholders: run it at their hints (the sizes
    # of the real example tensors beside them)
    real_inputs = [concrete(v) if isinstance(v, torch.SymInt) else v for v in real_inputs]
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            Run(gm).run(*real_inputs)
    except Exception as e:  # noqa: BLE001 - the rewrite does not depend on it; the report just has no error
        log.debug("panther: could not run the graph to sample attention inputs: %s", e)
        return {}
    return samples


