"""Pre-pass: nn.TransformerEncoderLayer's fused eval kernel -> the ops of its ordinary forward.

In eval mode without gradients, ``nn.TransformerEncoderLayer`` computes itself in one native kernel,
``torch._transformer_encoder_layer_fwd``, over all its weights, so Dynamo's graph has no linear or attention
node for the other passes to see. :func:`expand` replaces each such call by what the layer's ordinary
forward (the one training mode runs) computes:

    norm_first=False:  x = norm1(x + sa(x));   x = norm2(x + ff(x))
    norm_first=True:   x = x + sa(norm1(x));   x = x + ff(norm2(x))
    sa(x) = F.multi_head_attention_forward(x.T, x.T, x.T, ...)[0].T      (batch-first <-> (L, B, E))
    ff(x) = linear2(gelu or relu(linear1(x)))

:func:`restore` puts the fused call back wherever no rewrite touched the expansion, so a layer the policy
left dense keeps its kernel and the compiled program is the one Dynamo captured.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Dict, List, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F

FUSED = torch._transformer_encoder_layer_fwd
_ARGS = ("src", "embed_dim", "num_heads", "qkv_weight", "qkv_bias", "proj_weight", "proj_bias", "use_gelu",
         "norm_first", "eps", "norm_weight_1", "norm_bias_1", "norm_weight_2", "norm_bias_2", "ffn_weight_1",
         "ffn_bias_1", "ffn_weight_2", "ffn_bias_2", "mask", "mask_type")


@dataclass
class Expansion:
    """One expanded call: what re-creates it, and the nodes that replaced it (the last is its output)."""

    args: Tuple[Any, ...]
    kwargs: Dict[str, Any]
    meta: Dict[str, Any]
    nodes: List[fx.Node]


class _Emitter:
    """Adds call_function nodes before ``anchor`` with the fused node's module stack and fake values, the
    ``example_value`` metadata the passes read shapes and dtypes from."""

    def __init__(self, graph: fx.Graph, anchor: fx.Node, fake_mode):
        self.graph, self.anchor, self.fake_mode, self.nodes = graph, anchor, fake_mode, []

    def __call__(self, target, *args, **kwargs) -> fx.Node:
        with self.graph.inserting_before(self.anchor):
            node = self.graph.call_function(target, args, kwargs)
        vargs, vkwargs = fx.node.map_arg((args, kwargs), lambda n: n.meta["example_value"])
        with self.fake_mode:
            node.meta["example_value"] = target(*vargs, **vkwargs)
        if "nn_module_stack" in self.anchor.meta:
            node.meta["nn_module_stack"] = self.anchor.meta["nn_module_stack"]
        self.nodes.append(node)
        return node


def _fake_mode(node: fx.Node):
    value = node.meta.get("example_value")
    return getattr(value, "fake_mode", None)


def _expand_one(graph: fx.Graph, node: fx.Node, fake_mode) -> Expansion:
    a = dict(zip(_ARGS, node.args))
    a.update(node.kwargs)
    a.setdefault("mask", None)
    a.setdefault("mask_type", None)
    emit = _Emitter(graph, node, fake_mode)
    E, H = a["embed_dim"], a["num_heads"]
    mask, mask_type = a["mask"], a["mask_type"]
    key_padding_mask = attn_mask = None
    if mask is not None and mask_type == 1:
        key_padding_mask = mask  # (B, L)
    elif mask is not None:
        # (L, L); mask_type 2 is (B, H, L, L), which F.multi_head_attention_forward takes as (B*H, L, L)
        attn_mask = emit(torch.flatten, mask, 0, 1) if mask_type == 2 else mask

    def norm(x, i):
        return emit(F.layer_norm, x, (E,), a[f"norm_weight_{i}"], a[f"norm_bias_{i}"], a["eps"])

    def self_attention(x):
        t = emit(torch.transpose, x, 0, 1)
        out = emit(F.multi_head_attention_forward, t, t, t, E, H, a["qkv_weight"], a["qkv_bias"], None, None, False,
                   0.0, a["proj_weight"], a["proj_bias"], training=False, key_padding_mask=key_padding_mask,
                   need_weights=False, attn_mask=attn_mask)
        return emit(torch.transpose, emit(operator.getitem, out, 0), 0, 1)

    def feed_forward(x):
        h = emit(F.linear, x, a["ffn_weight_1"], a["ffn_bias_1"])
        h = emit(F.gelu if a["use_gelu"] else F.relu, h)
        return emit(F.linear, h, a["ffn_weight_2"], a["ffn_bias_2"])

    x = a["src"]
    if a["norm_first"]:
        x = emit(operator.add, x, self_attention(norm(x, 1)))
        x = emit(operator.add, x, feed_forward(norm(x, 2)))
    else:
        x = norm(emit(operator.add, x, self_attention(x)), 1)
        x = norm(emit(operator.add, x, feed_forward(x)), 2)
    return Expansion(node.args, dict(node.kwargs), dict(node.meta), emit.nodes)


def expand(gm: fx.GraphModule) -> List[Expansion]:
    """Replace every fused encoder-layer call on dense (not nested) input by its ordinary forward."""
    done = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not FUSED or not node.args:
            continue
        src = node.args[0]
        fake_mode = _fake_mode(src) if isinstance(src, fx.Node) else None
        if fake_mode is None or src.meta["example_value"].is_nested:
            continue
        exp = _expand_one(gm.graph, node, fake_mode)
        node.replace_all_uses_with(exp.nodes[-1])
        gm.graph.erase_node(node)
        done.append(exp)
    return done


def restore(gm: fx.GraphModule, expansions: List[Expansion]) -> bool:
    """Put the fused call back for each expansion no rewrite changed; True if any was put back."""
    present = set(gm.graph.nodes)
    restored = False
    # Last first: a later layer's saved arguments may name an earlier expansion's output, which putting the
    # earlier call back then redirects to it.
    for exp in reversed(expansions):
        if not all(n in present for n in exp.nodes):
            continue  # a rewrite replaced some of its nodes: the expansion is what runs
        out = exp.nodes[-1]
        with gm.graph.inserting_before(out):
            fused = gm.graph.call_function(FUSED, exp.args, exp.kwargs)
        fused.meta.update(exp.meta)
        out.replace_all_uses_with(fused)
        for n in reversed(exp.nodes):
            gm.graph.erase_node(n)
        restored = True
    return restored
