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

from dataclasses import dataclass
from typing import Any, Dict, List, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F

from .common import trace_into

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


def encoder_layer(src, embed_dim, num_heads, qkv_weight, qkv_bias, proj_weight, proj_bias, use_gelu, norm_first,
                  eps, norm_weight_1, norm_bias_1, norm_weight_2, norm_bias_2, ffn_weight_1, ffn_bias_1, ffn_weight_2,
                  ffn_bias_2, mask=None, mask_type=None):
    """What ``torch._transformer_encoder_layer_fwd`` (same arguments) computes on a dense batch-first input:
    nn.TransformerEncoderLayer's ordinary forward in eval mode. ``mask_type`` 1 is a key-padding mask
    ``(B, L)``, 0 an attention mask ``(L, L)``, 2 a merged one ``(B, H, L, L)``."""
    key_padding_mask = attn_mask = None
    if mask is not None and mask_type == 1:
        key_padding_mask = mask
    elif mask is not None:  # F.multi_head_attention_forward takes a per-head mask as (B*H, L, L)
        attn_mask = mask.flatten(0, 1) if mask_type == 2 else mask

    def self_attention(x):
        t = x.transpose(0, 1)  # (L, B, E), the functional form's layout
        out = F.multi_head_attention_forward(t, t, t, embed_dim, num_heads, qkv_weight, qkv_bias, None, None, False,
                                             0.0, proj_weight, proj_bias, training=False,
                                             key_padding_mask=key_padding_mask, need_weights=False,
                                             attn_mask=attn_mask)
        return out[0].transpose(0, 1)

    def feed_forward(x):
        h = F.linear(x, ffn_weight_1, ffn_bias_1)
        return F.linear(F.gelu(h) if use_gelu else F.relu(h), ffn_weight_2, ffn_bias_2)

    def norm(x, weight, bias):
        return F.layer_norm(x, (embed_dim,), weight, bias, eps)

    if norm_first:
        x = src + self_attention(norm(src, norm_weight_1, norm_bias_1))
        return x + feed_forward(norm(x, norm_weight_2, norm_bias_2))
    x = norm(src + self_attention(src), norm_weight_1, norm_bias_1)
    return norm(x + feed_forward(x), norm_weight_2, norm_bias_2)


def expand(gm: fx.GraphModule) -> List[Expansion]:
    """Replace every fused encoder-layer call on dense (not nested) input by its ordinary forward."""
    done = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not FUSED or not node.args:
            continue
        src = node.args[0].meta.get("example_value") if isinstance(node.args[0], fx.Node) else None
        if getattr(src, "fake_mode", None) is None or src.is_nested:
            continue
        a = dict(zip(_ARGS, node.args), **node.kwargs)
        nodes = trace_into(gm.graph, node, encoder_layer, *(a.get(k) for k in _ARGS))
        done.append(Expansion(node.args, dict(node.kwargs), dict(node.meta), nodes))
        node.replace_all_uses_with(nodes[-1])
        gm.graph.erase_node(node)  # (which clears its args: they were kept above)
    return done


def restore(gm: fx.GraphModule, expansions: List[Expansion]):
    """Put the fused call back for each expansion no rewrite changed."""
    present = set(gm.graph.nodes)
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
