"""Pass: nn.MultiheadAttention -> dense projections + ``panther::rf_attention`` (weight-free).

Pattern (Dynamo torch IR: nn.MultiheadAttention is one opaque call, inputs already in (L, B, E) layout):
    out = F.multi_head_attention_forward(q, k, v, E, H, in_proj_weight, in_proj_bias, bias_k, bias_v,
                                         add_zero_attn, dropout_p, out_proj_weight, out_proj_bias, ...)
    attn = out[0]                       # out[1] (attention weights) must be unused

Replacement, recorded in the graph as the torch calls it makes (so the CUDA kernel routing sees its
``panther.rf_attention`` node):
    attn = rf_multi_head_attention(q, k, v, H, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias,
                                   P, kernel_fn, causal, key_padding_mask, q_w, k_w, v_w)
which projects with the layer's own weights, runs random-feature attention per head with an (m, d_head)
feature matrix ``P`` and applies the output projection, the same computation as
``panther.nn.RandMultiHeadAttention.from_mha(mha, m)`` (the projection weights stay the module's
parameters, so training through this rewrite updates them). Causality comes from ``is_causal``, or from an
``attn_mask`` built in the graph that ``sdpa_mask`` reads as the causal triangle (and key padding), such as
``nn.Transformer.generate_square_subsequent_mask`` in the model's forward, merged with the key padding mask as
nn.TransformerEncoderLayer's fused path does.

Attention dropout in training becomes what random features can apply, whole keys dropped per head
(``panther.ops.attention.dropped_keys``, as ``RandMultiHeadAttention`` does). Left alone: ``bias_k``/``bias_v``,
``add_zero_attn``, other ``attn_mask`` patterns (and masks that are inputs of the graph, whose values are unknown),
float key padding masks, unbatched inputs, and uses of the attention weights.
"""
from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.nn.functional as F

from panther.attention_error import error_of_features, mha_heads, mha_sample, sample_error
from panther.ops.attention import dropped_keys
from panther.policy import LayerInfo, SketchSpec, dense_attention_flops

from .attention_sample import of_call
from . import sdpa_mask
from .common import Candidate, PassContext, is_call, replace_call, shape_of, trace_into
from .sdpa_mask import CAUSAL_HINT, GRAPH_INPUT, MASKED, additive_mask, is_bool, key_padding_mask, per_query_input, zero_or_masked
from .sketch_sdpa import dropout_rate, dropout_reason, features_of, projection_for

KIND = "attention"
OP_AFTER = "panther.rf_attention"
OP_BEFORE = "F.multi_head_attention_forward"
_ARGS = ("query", "key", "value", "embed_dim_to_check", "num_heads", "in_proj_weight", "in_proj_bias", "bias_k",
         "bias_v", "add_zero_attn", "dropout_p", "out_proj_weight", "out_proj_bias", "training",
         "key_padding_mask", "need_weights", "attn_mask", "use_separate_proj_weight", "q_proj_weight",
         "k_proj_weight", "v_proj_weight", "static_k", "static_v", "average_attn_weights", "is_causal")
_DEFAULTS = {"training": True, "key_padding_mask": None, "need_weights": True, "attn_mask": None,
             "use_separate_proj_weight": False, "q_proj_weight": None, "k_proj_weight": None,
             "v_proj_weight": None, "static_k": None, "static_v": None, "average_attn_weights": True,
             "is_causal": False}


def rf_multi_head_attention(query, key, value, num_heads, in_proj_weight, in_proj_bias, out_proj_weight,
                            out_proj_bias, projection, kernel_fn, causal, dropout_p=0.0, q_proj_weight=None,
                            k_proj_weight=None, v_proj_weight=None, ignores=(), *padding):
    """Multi-head attention with random-feature attention per head; inputs and output in (L, B, E).
    ``dropout_p``: attention dropout as random features apply it, whole keys per head (as
    ``RandMultiHeadAttention``). ``padding``: key padding masks, True = attend or where ``ignores`` says so True =
    ignore (``sdpa_mask.key_padding_mask``)."""
    E = query.shape[-1]
    q, k, v = mha_heads(query, key, value, num_heads, in_proj_weight, in_proj_bias, q_proj_weight,
                        k_proj_weight, v_proj_weight)
    if dropout_p:
        v = dropped_keys(v, dropout_p)
    kpm = key_padding_mask(list(padding), q.shape[0], k.shape[2], ignores) if padding else None
    o = torch.ops.panther.rf_attention(q, k, v, projection, kernel_fn, causal, None, kpm)
    o = o.permute(2, 0, 1, 3).reshape(query.shape[0], query.shape[1], E)
    return F.linear(o, out_proj_weight, out_proj_bias)


def _flattened_heads(mask):
    """The ``(B, H, Lq, Lk)`` mask a ``(B·H, Lq, Lk)`` one was flattened from (nn.TransformerEncoderLayer merges
    its masks so, ``expand_encoder_layer`` flattens them), else None."""
    if is_call(mask, (torch.flatten,), ("flatten",)) and tuple(mask.args[1:]) == (0, 1):
        source = mask.args[0]
        value = source.meta.get("example_value") if isinstance(source, torch.fx.Node) else None
        return source if isinstance(value, torch.Tensor) and value.dim() == 4 else None
    return None


def _added_terms(n):
    """The float terms whose sum is ``n`` (nn.MultiheadAttention's merged ``attn_mask + key_padding_mask``)."""
    if is_call(n, (operator.add, torch.add), ("add",)) and len(n.args) == 2 and not n.kwargs:
        return _added_terms(n.args[0]) + _added_terms(n.args[1])
    return [n]


def read_masks(a, sizes, state):
    """``(padding, causal)`` that an MHA call's masks apply, as ``sdpa_mask.read_masks`` gives them, or why they
    cannot be read. ``attn_mask`` is boolean (True = ignore) or added to the scores, ``(Lq, Lk)`` or a merged
    ``(B·H, Lq, Lk)``; an ``is_causal`` flag is trusted as the promise it is (without a key padding mask
    PyTorch's MHA drops the mask then). ``key_padding_mask`` is boolean (True = ignore) or
    nn.MultiheadAttention's additive form of one."""
    padding = []
    kpm = a["key_padding_mask"]
    if kpm is not None:  # (B, S), so not read as a 4-D mask is
        if not (is_bool(kpm) or zero_or_masked(kpm)):
            return "key_padding_mask is an additive float mask (only bool masks are supported)"
        padding.append((kpm, True))
    mask = a["attn_mask"]
    if mask is None or a["is_causal"]:
        return padding, bool(a["is_causal"])
    value = mask.meta.get("example_value") if isinstance(mask, torch.fx.Node) else None
    if isinstance(value, torch.Tensor) and value.dim() == 3:
        mask = _flattened_heads(mask)
        if mask is None:
            return "attn_mask of shape (B·num_heads, L, S) not flattened from (B, num_heads, L, S)"
    added = _added_terms(mask)
    if any(per_query_input(t) for t in added):
        return GRAPH_INPUT  # a bool mask, or a float one (a mask by nn.MultiheadAttention's contract)
    terms = [(mask, True)] if is_bool(mask) else [additive_mask(t, state) for t in added]
    read = next((t for t in terms if isinstance(t, str)), None) or sdpa_mask.read_masks(terms, sizes, state)
    return read if isinstance(read, str) else (padding + read[0], read[1])


def _dropout(a) -> Optional[float]:
    """The call's attention dropout rate (0 outside training), or None if random features cannot apply it."""
    return 0.0 if a["training"] is False else dropout_rate(a["dropout_p"]) if a["training"] is True else None


def is_attention(node) -> bool:
    return node.op == "call_function" and node.target is F.multi_head_attention_forward


def _arguments(args, kwargs) -> dict:
    a = dict(_DEFAULTS)
    a.update(zip(_ARGS, args))
    a.update(kwargs)
    return a


def sample_args(args, kwargs) -> dict:
    """The ``panther.attention_error`` sample of an MHA call, from its argument values."""
    a = _arguments(args, kwargs)
    separate = (a["q_proj_weight"], a["k_proj_weight"], a["v_proj_weight"]) if a["use_separate_proj_weight"] else ()
    kpm, mask = (None if m is None else m if m.dtype == torch.bool else m <= MASKED  # True = ignore
                 for m in (a["key_padding_mask"], a["attn_mask"]))
    return mha_sample(a["query"], a["key"], a["value"], a["num_heads"], a["in_proj_weight"], a["in_proj_bias"],
                      *separate, key_padding_mask=kpm, is_causal=bool(a["is_causal"]), attn_mask=mask)


def sampler(node):
    """How ``attention_sample`` samples this node's attention, if it is an nn.MultiheadAttention call."""
    return of_call(node, sample_args) if is_attention(node) else None


def match(node, ctx: PassContext):
    if not is_attention(node):
        return None
    a = _arguments(node.args, node.kwargs)
    q, k, v = a["query"], a["key"], a["value"]
    H = a["num_heads"]
    qs, ks, vs = (shape_of(t.meta.get("example_value")) if isinstance(t, torch.fx.Node) else None for t in (q, k, v))
    qv = q.meta.get("example_value") if isinstance(q, torch.fx.Node) else None
    in_w = a["q_proj_weight"] if a["use_separate_proj_weight"] else a["in_proj_weight"]
    W, fqn, _ = ctx.weight(in_w)
    if fqn is not None and "." in fqn:
        base_name = fqn.rsplit(".", 1)[0]
    else:
        base_name = ctx.module_path(node) or node.name
    name = ctx.unique_layer_name(base_name)
    node.meta["panther_layer"] = name
    ok = qs is not None and ks is not None and vs is not None and len(qs) == 3 and isinstance(H, int)
    # the key padding masks, and whether attention is causal; else why the masks cannot be read
    masking = read_masks(a, (qv.shape[1], qv.shape[0], k.meta["example_value"].shape[0]), ctx.buffer_value) \
        if ok else ([], False)
    extra = {"head_dim": 1, "causal": masking[1] if isinstance(masking, tuple) else bool(a["is_causal"])}
    flops = None
    params = 0
    if ok:
        Lq, B, E = qs
        Lk = ks[0]
        d = E // H
        kdim, vdim = ks[-1], vs[-1]
        params = E * (E + kdim + vdim) + E * E
        params += (3 * E if a["in_proj_bias"] is not None else 0) + (E if a["out_proj_bias"] is not None else 0)
        proj = 2 * B * (Lq * E * E + Lk * E * kdim + Lk * E * vdim + Lq * E * E)
        flops = proj + dense_attention_flops(B * H, Lq, Lk, d, d, bool(a["is_causal"]))  # a mask skips nothing
        extra.update(batch_heads=B * H, num_heads=H, len_q=Lq, len_k=Lk, head_dim=d, head_dim_v=d,
                     embed_dim=E, projection_flops=proj)
    info = LayerInfo(name=name, kind=KIND, shapes={"query": qs, "key": ks, "value": vs},
                     dtype=getattr(qv, "dtype", None), device=getattr(qv, "device", None), params=params,
                     flops=flops, has_bias=a["in_proj_bias"] is not None, grad_enabled=ctx.grad_enabled,
                     op=OP_BEFORE, extra=extra)
    sample = ctx.attention_samples.get(node)
    if sample is not None:  # what the policy may weigh
        draw = features_of(ctx, W, base_name, extra["head_dim"], info.dtype, info.device)
        extra["output_error"] = error_of_features(sample, draw, extra["causal"])
    cand = Candidate(node, info, OP_BEFORE, needs_weights=False,
                     data={"a": a, "base_name": base_name, "owner": W, "sample": sample, "causal": extra["causal"],
                           "padding": masking[0] if isinstance(masking, tuple) else []})
    uses = [u for u in node.users]
    if not ok:
        cand.unsupported = "unbatched or unknown input shapes"
    elif any(u.target is not operator.getitem or u.args[1] != 0 for u in uses):
        cand.unsupported = "the attention weights (output 1) are used"
    elif a["bias_k"] is not None or a["bias_v"] is not None or a["add_zero_attn"]:
        cand.unsupported = "bias_k/bias_v/add_zero_attn are not supported"
    elif a["static_k"] is not None or a["static_v"] is not None:
        cand.unsupported = "static_k/static_v are not supported"
    elif isinstance(masking, str):
        cand.unsupported = masking
    elif _dropout(a) is None:
        cand.unsupported = dropout_reason(a["dropout_p"] if a["training"] is True else
                                          f"{a['dropout_p']!r} with training={a['training']!r}")
    elif extra["causal"] and Lq != Lk:
        cand.unsupported = "causal attention with different query and key lengths"
    elif E % H:
        cand.unsupported = "embed_dim is not divisible by num_heads"
    elif not hasattr(torch.ops.panther, "rf_attention"):
        cand.unsupported = "panther::rf_attention is not available in this build"
    return cand


def keep(cand: Candidate):
    """Flag a call left exact ``is_causal`` when its ``attn_mask`` was read as the causal triangle alone (no key
    padding, no attention weights asked for): PyTorch's MHA then drops the mask and runs SDPA's causal kernel,
    as it does when the model passes ``is_causal=True`` (the panther backend tells nn.TransformerEncoder a mask
    is not known causal rather than compare its values: ``panther.backend``). A fused encoder layer so flagged
    runs its ordinary forward: the fused kernel applies a mask as a mask.
    Returns the report's note, or None when nothing changed."""
    a = cand.data.get("a")
    if not (a and cand.data["causal"] and not cand.data["padding"] and a["attn_mask"] is not None
            and not a["is_causal"] and a["need_weights"] is False):
        return None
    replace_call(cand.node, _ARGS, is_causal=True)
    return CAUSAL_HINT


def rewrite(cand: Candidate, spec: SketchSpec, ctx: PassContext):
    node, a, info = cand.node, cand.data["a"], cand.info
    base_name = cand.data["base_name"]
    P = projection_for(ctx, cand.data["owner"], base_name, spec.num_random_features, spec.seed,
                       info.extra["head_dim"], info.dtype, info.device)
    p_node = ctx.add_constant(f"{base_name}_rf_projection", P, node)
    sep = bool(a["use_separate_proj_weight"])
    padding, causal = cand.data["padding"], cand.data["causal"]
    new = trace_into(ctx.graph, node, rf_multi_head_attention, a["query"], a["key"], a["value"], a["num_heads"],
                     a["in_proj_weight"], a["in_proj_bias"], a["out_proj_weight"], a["out_proj_bias"], p_node,
                     spec.kernel_fn, causal, _dropout(a),
                     *((a[f"{r}_proj_weight"] if sep else None) for r in "qkv"),
                     tuple(ignores for _, ignores in padding), *(p for p, _ in padding))[-1]
    for user in list(node.users):  # every user is out[0] (checked in match)
        user.replace_all_uses_with(new)
        ctx.graph.erase_node(user)
    ctx.graph.erase_node(node)
    sample = cand.data["sample"]
    return OP_AFTER, None if sample is None else sample_error(sample, P, spec.kernel_fn, causal)
