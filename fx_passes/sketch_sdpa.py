"""Pass: exact attention -> ``panther::rf_attention`` (random-feature attention; weight-free).

Pattern (Dynamo torch IR; ``F.scaled_dot_product_attention`` is this builtin):
    torch._C._nn.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=?, scale=?)
    with q, k, v of shape (B, H, L, d)

Replacement:
    torch.ops.panther.rf_attention(q, k, v, P, kernel_fn, is_causal, scale, None)
(under ``enable_gqa``, k and v are first repeated to the query heads, as SDPA does) with ``P`` an (m, d)
orthogonal random-feature matrix registered as a gm buffer. Nothing is derived from weights, so the
rewrite is valid with grad enabled too (gradients flow to q, k, v as usual). The draw is cached per layer,
so recompiles keep the same features. The other attention passes (written out, flex_attention) read their
calls as SDPA's arguments and share :func:`candidate` and :func:`rewrite`.

A boolean ``attn_mask`` that is key padding and/or the causal triangle (as Hugging Face models build
theirs; see ``sdpa_mask``) becomes rf_attention's ``key_padding_mask`` and ``causal``; ``dropout_p`` (training)
drops whole keys per head, the attention dropout random features can apply. Left alone: other masks (random
features cannot apply an arbitrary one), masks of calls that are not 4-D (``(B, L, d)`` and
``(*batch, H, L, d)`` calls are folded to 4-D), causal with different query/key lengths.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from panther.attention_error import error_of_features, fold_heads, layer_features, sample, sample_error
from panther.ops.attention import dropped_keys
from panther.policy import LayerInfo, SketchSpec, dense_attention_flops
from panther.report import module_of

from .attention_sample import of_call
from .common import Candidate, PassContext, common_prefix, concrete, is_call, replace_call, trace_into
from .sdpa_mask import CAUSAL_HINT, MASKED, additive_mask, constant_value, float_term, key_padding_mask, read_masks, value_of

KIND = "attention"
OP_AFTER = "panther.rf_attention"
_SDPA = torch._C._nn.scaled_dot_product_attention
_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_DEFAULTS = (None, None, None, None, 0.0, False, None, False)


# shape-only steps that a scalar factor of the queries or keys passes through (OPT scales its queries, then splits
# their heads)
_SHAPE_FUNCTIONS = {torch.reshape, torch.transpose, torch.permute, torch.flatten, torch.unflatten, torch.unsqueeze,
                    torch.squeeze}
_SHAPE_METHODS = {"view", "reshape", "transpose", "permute", "contiguous", "unflatten", "flatten", "unsqueeze", "squeeze"}
_MUL, _DIV = {operator.mul, torch.mul}, {operator.truediv, torch.div}


def scalar_factor(n):
    """A scalar factor: a number, a one-element node that reads no input (GPT-2's ``torch.full([], √d)``),
    evaluated now, or a scalar node of the graph (a ``SymFloat``), kept; else None."""
    if isinstance(n, fx.Node) and isinstance(n.meta.get("example_value"), (torch.SymInt, torch.SymFloat, int, float)):
        return n
    value = constant_value(n)
    return float(value) if value is not None and value.numel() == 1 else None


def is_positive(c) -> bool:
    """Whether a :func:`scalar_factor` is known to be positive (a number, or a scalar of the graph such as
    ``d ** -0.5`` of a symbolic head size under ``dynamic=True``)."""
    if is_call(c, (operator.pow, math.pow)) and len(c.args) == 2:
        return is_positive(c.args[0])  # a positive number to any power (the shapes' reasoning misses d ** -0.5)
    value = value_of(c) if isinstance(c, fx.Node) else c
    return value is not None and statically_known_true(value > 0)


def signed_queries(q, scale):
    """``q`` times the sign of ``scale`` (a scalar of the graph), traced by ``trace_into``: random features take the
    square root of the scale, so :func:`rewrite` gives them ``|scale|`` and the sign goes onto the queries,
    q·k·c = (sign(c)·q)·k·|c| (a zero scale zeroes both sides: uniform weights either way)."""
    return q * torch.sign(torch.scalar_tensor(scale))


def scale_of(number: float, powers: tuple, *scalars):
    """The scale: ``number`` times each of ``scalars`` to its power (±1); traced by ``trace_into``."""
    for x, p in zip(scalars, powers):
        number = number * x if p > 0 else number / x
    return number


@dataclass(frozen=True)
class Peeled:
    """An attention operand that is ``chain(base)`` times positive scalar ``factors`` (``(factor, ±1)``): random
    features split the scale evenly between queries and keys, and approximate far less accurately when the
    queries carry all of it, so the factors go into the scale and ``chain`` (shape-only steps, outermost first)
    is applied to ``base`` again by the rewrite."""
    base: fx.Node
    chain: Tuple[fx.Node, ...]
    factors: Tuple[tuple, ...]


def peel(x) -> Optional[Peeled]:
    """``x``'s scalar factors, also those under shape-only steps, if any: numbers other than 0, and scalars of the
    graph (the rewrite puts the scale's sign onto the queries: :func:`signed_queries`). In-place products are kept:
    they change their input itself."""
    n, steps, found = x, [], None
    factors = []
    while isinstance(n, fx.Node) and n.args:
        if is_call(n, _MUL | _DIV, ("mul", "div")) and len(n.args) == 2 and not n.kwargs:
            divides = n.target in _DIV or n.target == "div"
            a, b = n.args
            first = None if divides else scalar_factor(a)
            inner, c = (b, first) if first is not None else (a, scalar_factor(b))
            if c is None or not isinstance(inner, fx.Node) or not (isinstance(c, fx.Node) or c != 0):
                break
            factors.append((c, -1 if divides else 1))
            n = inner
            found = Peeled(n, tuple(steps), tuple(factors))
        elif is_call(n, _SHAPE_FUNCTIONS, _SHAPE_METHODS) and isinstance(n.args[0], fx.Node):
            steps.append(n)
            n = n.args[0]
        else:
            break
    return found


def _replay(graph: fx.Graph, before: fx.Node, peeled: Peeled) -> fx.Node:
    """The operand without its factors, placed just before ``before``: ``peeled.chain`` applied to its base."""
    x = peeled.base
    with graph.inserting_before(before):
        for step in reversed(peeled.chain):
            x = graph.node_copy(step, lambda a, step=step, x=x: x if a is step.args[0] else a)
    return x


def _hint(c) -> Optional[float]:
    """A factor's value where the graph's example runs (a scalar of the graph at its size hints), or None."""
    v = value_of(c) if isinstance(c, fx.Node) else c
    if isinstance(v, (torch.SymInt, torch.SymFloat)):
        v = v.node.hint
    return None if v is None else float(v)


def _rescaled(sample: dict, peeled: dict) -> Optional[dict]:
    """The accuracy sample of a call as the rewrite computes it: its operands' factors in the scale, and a negative
    scale's sign on the queries."""
    scale = sample["scale"] if sample["scale"] is not None else sample["q"].shape[-1] ** -0.5
    out = dict(sample)
    for r, p in peeled.items():
        hints = [_hint(c) for c, _ in p.factors]
        if None in hints or not isinstance(scale, (int, float)):
            return None
        c = math.prod(h ** power for h, (_, power) in zip(hints, p.factors))
        out[r], scale = sample[r] / c, scale * c
    if isinstance(scale, (int, float)) and scale < 0:  # as the rewrite does it (signed_queries)
        out["q"], scale = -out["q"], -scale
    out["scale"] = scale
    return out


def is_projection(n) -> bool:
    """A dense or already-sketched linear node (what typically produces q, k, v)."""
    if n.op != "call_function":
        return False
    if n.target is torch._C._nn.linear:
        return True
    sk = getattr(getattr(torch.ops, "panther", None), "sketched_linear", None)
    return sk is not None and n.target is sk.default


def is_attention(node) -> bool:
    return node.op == "call_function" and node.target is _SDPA


def sdpa_args(args, kwargs) -> tuple:
    """SDPA's ``(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)`` from a call's
    positional and keyword arguments (nodes, or their values)."""
    vals = list(args) + list(_DEFAULTS[len(args):])
    for i, k in enumerate(_ARGS):
        if k in kwargs:
            vals[i] = kwargs[k]
    return tuple(vals)


def sample_args(args, kwargs) -> dict:
    """The ``panther.attention_error`` sample of an SDPA call, from its argument values (a float mask as the
    keys it keeps: where it does not add at most ``MASKED``)."""
    q, k, v, attn_mask, _, is_causal, scale, enable_gqa = sdpa_args(args, kwargs)
    if isinstance(attn_mask, torch.Tensor) and attn_mask.is_floating_point():
        attn_mask = attn_mask > MASKED
    return sample(q, k, v, attn_mask, is_causal, scale, enable_gqa)


def sampler(node):
    """How ``attention_sample`` samples this node's attention, if it is an SDPA call."""
    return of_call(node, sample_args) if is_attention(node) else None


def match(node, ctx: PassContext):
    if not is_attention(node):
        return None
    q, k, v, attn_mask, *rest = sdpa_args(node.args, node.kwargs)
    value = attn_mask.meta.get("example_value") if isinstance(attn_mask, torch.fx.Node) else None
    if not (isinstance(value, torch.Tensor) and value.is_floating_point()):
        masks = [] if attn_mask is None else [(attn_mask, False)]
        return candidate(node, ctx, "scaled_dot_product_attention", q, k, v, masks, *rest)
    # a float mask, which SDPA adds to the scores, as the 0/1 mask it applies, or why it is not one
    read = additive_mask(attn_mask, ctx.buffer_value)
    return candidate(node, ctx, "scaled_dot_product_attention", q, k, v, [] if isinstance(read, str) else [read],
                     *rest, unsupported=read if isinstance(read, str) else None)


def dropout_rate(p) -> Optional[float]:
    """An attention dropout rate random features can apply (whole keys per head, ``dropped_keys``): a constant in
    [0, 1); else None."""
    return float(p) if isinstance(p, (int, float)) and not isinstance(p, bool) and 0 <= p < 1 else None


def dropout_reason(p) -> str:
    """Why attention whose dropout is ``p`` (no :func:`dropout_rate`) stays exact."""
    return f"dropout_p={p!r}: random-feature attention applies attention dropout at a constant rate in [0, 1) only " \
           "(whole keys per head)"


def keep(cand: Candidate):
    """Run an SDPA call left exact with ``is_causal=True`` and no mask when its ``attn_mask`` was read as the
    causal triangle alone (no key padding) over as many queries as keys: the same attention, through SDPA's causal
    kernel rather than a masked one (``sketch_mha.keep`` does so for nn.MultiheadAttention). Returns the report's
    note, or None when nothing changed."""
    node = cand.node
    if not (is_attention(node) and cand.data["causal"] and not cand.data["padding"] and cand.data["ndim"] == 4):
        return None
    q, k, _, attn_mask, _, is_causal, *_ = sdpa_args(node.args, node.kwargs)
    shapes = [t.meta.get("example_value") for t in (q, k)]
    if attn_mask is None or is_causal is not False or not all(isinstance(t, torch.Tensor) for t in shapes) \
            or not statically_known_true(shapes[0].shape[-2] == shapes[1].shape[-2]):
        return None
    replace_call(node, _ARGS, attn_mask=None, is_causal=True)
    return CAUSAL_HINT


def candidate(node, ctx: PassContext, op_before: str, q, k, v, masks, dropout_p, is_causal, scale, enable_gqa,
              *, unsupported: Optional[str] = None, keys_transposed: bool = False,
              heads: Optional[int] = None, layout: Optional[tuple] = None, symbolic=()) -> Candidate:
    """The candidate of an attention call with SDPA's arguments (nodes or constants) that ``rewrite`` turns
    into ``panther::rf_attention``: its LayerInfo, and what stops the rewrite (``unsupported`` first, from the
    caller's own pattern). ``masks`` stand for ``attn_mask``: ``(mask, ignores)`` terms that all apply, each
    boolean, True = attend (with ``ignores``: True = ignore), or 0/1 valued (``sdpa_mask.additive_mask``).
    ``keys_transposed``: ``k`` holds the keys with their last two dimensions swapped (a model that stores
    them so). ``heads``: q, k, v are ``(B·heads, L, d)`` and the masks apply to the scores viewed as
    ``(B, heads, Lq, Lk)`` (fairseq's layout): the call is read, and rewritten, as that 4-D one. ``layout``:
    ``(perm, out_perm)``, q, k, v permuted by ``perm`` are the call's ``(B, H, L, d)`` (flash-attn's
    ``(B, L, H, d)`` layout), the result is permuted by ``out_perm`` back. ``symbolic``: scalars of the graph the
    scale is multiplied by, ``(node, ±1)``. Positive scalar factors of q and k (:func:`peel`) go into the scale."""
    # the shapes of the call as SDPA takes them, as the graph has them (symbolic under dynamic shapes)
    sym = {r: tuple(t.meta["example_value"].shape) if isinstance(t, torch.fx.Node) and isinstance(
        t.meta.get("example_value"), torch.Tensor) else None for r, t in (("query", q), ("key", k), ("value", v))}
    if layout and all(s is not None and len(s) == len(layout[0]) for s in sym.values()):
        sym = {r: tuple(s[i] for i in layout[0]) for r, s in sym.items()}
    else:
        layout = None
    if keys_transposed and sym["key"] is not None and len(sym["key"]) >= 2:
        sym["key"] = sym["key"][:-2] + sym["key"][:-3:-1]
    if heads and all(s is not None and len(s) == 3 and isinstance(s[0], int) and s[0] % heads == 0
                     for s in sym.values()) and len({s[0] for s in sym.values()}) == 1:  # one B·heads for q, k, v
        sym = {r: (s[0] // heads, heads) + s[1:] for r, s in sym.items()}
    else:
        heads = None
    shapes = {r: None if s is None else tuple(concrete(d) for d in s) for r, s in sym.items()}
    # the operands' factors go into the scale: a number (SDPA's default scale needs a known head size)
    head = sym["query"][-1] if sym["query"] else None
    if scale is None:
        number = head ** -0.5 if isinstance(head, int) else None
    else:
        number = scale if isinstance(scale, (int, float)) and not isinstance(scale, bool) else None
    peeled = {r: p for r, p in (("q", peel(q)), ("k", peel(k))) if p is not None} if number is not None else {}
    symbolic = list(symbolic)
    for c, power in (f for p in peeled.values() for f in p.factors):
        if isinstance(c, fx.Node):
            symbolic.append((c, power))
        else:
            number *= c ** power
    scale = number if peeled else scale
    qv = q.meta.get("example_value") if isinstance(q, torch.fx.Node) else None
    projections = []
    for t in (q, k, v):
        if isinstance(t, torch.fx.Node):
            projections += [p for p in ctx.producers(t, is_projection) if p not in projections]
    proj_names = [p.meta.get("panther_layer", p.name) for p in projections]
    base_name = ctx.module_path(node) or common_prefix([module_of(n) for n in proj_names]) or node.name
    name = ctx.unique_layer_name(base_name)
    node.meta["panther_layer"] = name
    ranks = {len(s) if s is not None else 0 for s in shapes.values()}
    ndim = ranks.pop() if len(ranks) == 1 and min(ranks) >= 3 else None  # q, k, v of one rank, 3 or more
    # (B, H, L, d) as rf_attention takes them: 3-D and 5-D+ calls are folded (attention_error.fold_heads)
    qs, ks, vs = (tuple(fold_heads(torch.empty(shapes[r], device="meta"), ndim).shape) if ndim else shapes[r]
                  for r in ("query", "key", "value"))
    ok4 = ndim == 4
    causal = is_causal is True
    # the masks' key padding factors, (node, ignores), and whether one is the causal triangle; else a reason
    masking = read_masks(masks, (sym["query"][0], sym["query"][2], sym["key"][2]), ctx.buffer_value) if ok4 \
        else ([], False)
    masking = (masking[0], causal or masking[1]) if isinstance(masking, tuple) else masking
    extra = {"head_dim": qs[-1] if qs else 1, "projections": proj_names,
             "causal": masking[1] if isinstance(masking, tuple) else causal}
    sample = ctx.attention_samples.get(node)
    if sample is not None:
        sample = _rescaled(sample, peeled)
    owner = _owner(ctx, projections)
    if sample is not None and isinstance(masking, tuple):  # what the policy may weigh
        draw = features_of(ctx, owner, base_name, qs[-1], getattr(qv, "dtype", None), getattr(qv, "device", None))
        extra["output_error"] = error_of_features(sample, draw, extra["causal"])
    flops = None
    if ndim:
        B, H, Lq, d = qs
        Lk, dv = ks[2], vs[3]
        extra.update(batch_heads=B * H, num_heads=H, len_q=Lq, len_k=Lk, head_dim=d, head_dim_v=dv)
        flops = dense_attention_flops(B * H, Lq, Lk, d, dv, causal)  # what SDPA computes: masked, it skips nothing
    info = LayerInfo(name=name, kind=KIND, shapes=shapes, dtype=getattr(qv, "dtype", None),
                     device=getattr(qv, "device", None), params=0, flops=flops, has_bias=False,
                     grad_enabled=ctx.grad_enabled, op=op_before, extra=extra)
    cand = Candidate(node, info, op_before, needs_weights=False,
                     data={"q": q, "k": k, "v": v, "ndim": ndim, "causal": extra["causal"], "scale": scale,
                           "base_name": base_name, "owner": owner, "groups": 1, "sample": sample,
                           "padding": masking[0] if isinstance(masking, tuple) else [],
                           "keys_transposed": keys_transposed, "heads": heads, "layout": layout,
                           "peeled": peeled, "symbolic": symbolic, "dropout_p": dropout_p})
    float_terms = [] if ok4 else [r for r in (float_term(m, ctx.buffer_value) for m, _ in masks) if r]
    if unsupported:
        cand.unsupported = unsupported
    elif not ndim:
        cand.unsupported = "query/key/value differ in rank or have fewer than 3 dimensions"
    elif float_terms:  # BLOOM's ALiBi on its (B·H, L, L) scores
        cand.unsupported = float_terms[0]
    elif not ok4 and (masks or enable_gqa is not False):
        cand.unsupported = "attn_mask or enable_gqa on attention that is not 4-D (B, H, L, d): only 4-D masks are read"
    elif isinstance(masking, str):
        cand.unsupported = masking
    elif dropout_rate(dropout_p) is None:
        cand.unsupported = dropout_reason(dropout_p)
    elif enable_gqa not in (False, True):
        cand.unsupported = "enable_gqa is not a constant"
    elif (qs[1] % ks[1] if enable_gqa or ks[1] == 1 else qs[1] != ks[1]) or ks[:3] != vs[:3] or qs[0] != ks[0] \
            or shapes["query"][:-3] != shapes["key"][:-3]:
        cand.unsupported = "query/key/value batch or head counts differ"
    elif not isinstance(is_causal, bool):
        cand.unsupported = "is_causal is not a constant"
    elif extra["causal"] and qs[2] != ks[2]:
        cand.unsupported = "causal attention with different query and key lengths"
    elif not hasattr(torch.ops.panther, "rf_attention"):
        cand.unsupported = "panther::rf_attention is not available in this build"
    elif qs[1] != ks[1]:  # grouped-query heads, or one key/value head that broadcasts (Falcon's multi-query)
        cand.data["groups"] = qs[1] // ks[1]
    return cand


def _owner(ctx, projections):
    """A weight tying the random features to the model they were drawn for (cache lifetime)."""
    for p in projections:
        w = ctx.owners.get(p)
        if w is not None:
            return w
        if p.target is torch._C._nn.linear and len(p.args) > 1:
            W, _, _ = ctx.weight(p.args[1])
            if W is not None:
                return W
    return None


def projection_for(ctx: PassContext, owner, base_name: str, m: int, seed: Optional[int], d: int, dtype, device):
    """The ``m`` random features of the layer ``base_name`` for a spec's ``seed``, drawn once per model: the
    accuracy guard's measurement (``features_of``) and the rewrite use the same draw."""
    key = ("rf_projection", base_name, m, seed, d, dtype, str(device))

    return ctx.cache.get(owner, key, lambda: layer_features(base_name, m, d, seed, dtype=dtype, device=device))


def features_of(ctx: PassContext, owner, base_name: str, d: int, dtype, device):
    """``draw(m, seed)`` for :func:`panther.attention_error.error_of_features`: :func:`projection_for`."""
    return lambda m, seed: projection_for(ctx, owner, base_name, m, seed, d, dtype, device)


def rewrite(cand: Candidate, spec: SketchSpec, ctx: PassContext):
    """Replace the attention call by :func:`rf_sdpa`: the node's uses, or those of ``data["outputs"]``
    (the ``[0]`` of a call that returns a tuple), which go too."""
    node, d = cand.node, cand.data
    info = cand.info
    P = projection_for(ctx, d["owner"], d["base_name"], spec.num_random_features, spec.seed, info.extra["head_dim"],
                       info.dtype, info.device)
    p_node = ctx.add_constant(f"{d['base_name']}_rf_projection", P, node)
    q, k = (_replay(ctx.graph, node, d["peeled"][r]) if r in d["peeled"] else d[r] for r in ("q", "k"))
    scale = d["scale"]
    negative = isinstance(scale, (int, float)) and scale < 0  # a negative factor of the queries or keys
    if d["symbolic"]:  # the scale is computed in the graph, from its scalars
        nodes, powers = zip(*d["symbolic"])
        scale = trace_into(ctx.graph, node, scale_of, scale, powers, *nodes)[-1]
        if negative or not all(is_positive(n) for n in nodes):  # OPT's float `scaling` under dynamic=True, say
            q = trace_into(ctx.graph, node, signed_queries, q, scale)[-1]
            scale = trace_into(ctx.graph, node, abs, scale)[-1]
    elif negative:
        q, scale = trace_into(ctx.graph, node, operator.neg, q)[-1], -scale
    new = trace_into(ctx.graph, node, rf_sdpa, q, k, d["v"], p_node, spec.kernel_fn, d["causal"],
                     scale, d["groups"], d["ndim"], d["heads"], d["layout"], d["keys_transposed"],
                     dropout_rate(d["dropout_p"]),
                     tuple(ignores for _, ignores in d["padding"]), *(p for p, _ in d["padding"]))[-1]
    for out in d.get("outputs", [node]):
        new.meta.update(out.meta)
        out.replace_all_uses_with(new)
        if out is not node:
            ctx.graph.erase_node(out)
    ctx.graph.erase_node(node)
    err = None if d["sample"] is None else sample_error(d["sample"], P, spec.kernel_fn, d["causal"])
    return OP_AFTER, err


def rf_sdpa(q, k, v, P, kernel_fn: str, causal: bool, scale, groups: int, ndim: int, heads: Optional[int],
            layout: Optional[tuple], keys_transposed: bool, dropout_p: float, ignores: tuple, *padding):
    """SDPA's meaning in random features, for q, k, v of rank ``ndim`` (3-D and 5-D+ folded to 4-D as
    ``attention_error.fold_heads`` says, and back; with ``heads``, 3-D ``(B·heads, L, d)`` unflattened to
    ``(B, heads, L, d)`` and back): ``groups`` query heads share each key/value head (``enable_gqa``); ``k``
    holds the keys transposed with ``keys_transposed``; ``dropout_p`` drops whole keys per head
    (``panther.ops.attention.dropped_keys``); ``padding`` are the masks' key padding factors
    (True = attend, or where ``ignores`` says so True = ignore; see ``sdpa_mask``); ``layout``: ``(perm,
    out_perm)``, the permutations of q, k, v into that order and of the result back."""
    if layout:
        perm, out_perm = layout
        return rf_sdpa(*(t.permute(perm) for t in (q, k, v)), P, kernel_fn, causal, scale, groups, ndim, heads,
                       None, keys_transposed, dropout_p, ignores, *padding).permute(out_perm)
    k = k.transpose(-2, -1) if keys_transposed else k
    if heads:
        return rf_sdpa(*(t.unflatten(0, (-1, heads)) for t in (q, k, v)), P, kernel_fn, causal, scale, groups, 4,
                       None, None, False, dropout_p, ignores, *padding).flatten(0, 1)
    unfolded = q
    q, k, v = (fold_heads(t, ndim) for t in (q, k, v))
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=-3), v.repeat_interleave(groups, dim=-3)
    if dropout_p:  # SDPA's attention dropout, as random features can apply it: whole keys per head
        v = dropped_keys(v, dropout_p)
    kpm = key_padding_mask(list(padding), q.shape[0], k.shape[2], ignores) if padding else None
    out = torch.ops.panther.rf_attention(q, k, v, P, kernel_fn, causal, scale, kpm)
    return out.squeeze(1) if ndim == 3 else out.unflatten(0, unfolded.shape[:-3]) if ndim > 4 else out
