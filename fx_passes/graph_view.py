"""A light, picture-ready copy of a Dynamo FX graph for the graph diff report.

:func:`graph_view` copies node names, kinds and edges into a ``networkx.DiGraph`` of plain strings (it
holds no fx.Node, tensor or GraphModule, so a kept report keeps nothing alive). It is taken *before* the
passes rewrite the graph, so the picture shows the graph the report talks about; :func:`mark_layers`
then tags each candidate node with its report row name. ``GraphDiffReport.to_png`` draws it.

Node attributes: ``label`` (short text: the function / method / module name, or the parameter's
dotted name), ``role`` (``"input"``, ``"output"``, ``"param"`` for module parameters and constants,
``"shape"`` for shape-only ops and symbolic sizes, which a picture may hide, ``"op"`` for the rest) and,
for candidates, ``layer`` (the report row name).
"""
from __future__ import annotations

import operator
from typing import Iterable, Tuple

import networkx as nx
import torch
import torch.fx as fx

__all__ = ["graph_view", "mark_layers"]

# ops that only move, view or describe data: hidden by the picture (contracted into their neighbours)
_SHAPE_ONLY = {
    "view", "reshape", "transpose", "permute", "contiguous", "unflatten", "flatten", "split", "chunk",
    "unbind", "getitem", "size", "dim", "numel", "getattr", "unsqueeze", "squeeze", "expand", "expand_as",
    "t", "to", "type_as", "float", "half", "bfloat16", "clone", "detach", "sym_size", "sym_numel",
    "_set_grad_enabled", "_assert", "movedim", "narrow", "select", "slice",
}


def _target_name(node: fx.Node) -> str:
    t = node.target
    if node.op in ("call_method", "call_module", "get_attr"):
        return str(t)
    if t is operator.getitem:
        return "getitem"
    name = getattr(t, "__name__", None) or str(t)
    return name.split(".")[-1]


def _role_and_label(node: fx.Node, weight_name) -> Tuple[str, str]:
    if node.op == "output":
        return "output", "output"
    if node.op == "placeholder":
        value = node.meta.get("example_value")
        if isinstance(value, torch.SymInt) or not isinstance(value, (torch.Tensor, type(None))):
            return "shape", node.name
        fqn = weight_name(node)
        if fqn is not None:
            return "param", fqn
        return "input", f"input {node.name}"
    if node.op == "get_attr":
        return "param", str(node.target)
    name = _target_name(node)
    if name in _SHAPE_ONLY or isinstance(node.meta.get("example_value"), torch.SymInt):
        return "shape", name
    return "op", name


def graph_view(gm: fx.GraphModule, weight_name=None) -> nx.DiGraph:
    """A ``networkx.DiGraph`` over the node names of ``gm`` (see the module docstring).

    ``weight_name(placeholder) -> str | None`` names module parameters (the passes' ``PassContext``
    knows them from Dynamo's graph args); without it no placeholder counts as a parameter.
    """
    weight_name = weight_name or (lambda node: None)
    G = nx.DiGraph(kind="fx")
    for node in gm.graph.nodes:
        role, label = _role_and_label(node, weight_name)
        G.add_node(node.name, label=label, role=role, op=node.op)
        for inp in node.all_input_nodes:
            G.add_edge(inp.name, node.name)
    return G


def mark_layers(G: nx.DiGraph, node_to_row: Iterable[Tuple[str, str]]) -> nx.DiGraph:
    """Tag each node ``name`` with ``layer=row_name`` for the given (node name, row name) pairs."""
    for node_name, row_name in node_to_row:
        if node_name in G:
            G.nodes[node_name]["layer"] = row_name
    return G
