"""Pass: ``flex_attention`` -> ``panther::rf_attention`` when its mask is causal or none and it keeps the scores.

Pattern (Dynamo torch IR of ``torch.nn.attention.flex_attention.flex_attention``):
    out = torch.ops.higher_order.flex_attention(q, k, v, score_mod, block_mask, scale, kernel_options,
                                                score_mod_buffers, mask_mod_buffers)[0]
with q, k, v of shape (B, H, L, d) (fewer key/value heads: ``enable_gqa``), ``score_mod`` the identity
(``flex_attention(q, k, v)`` without one), and the block mask's ``mask_mod`` (its last element) reading only
the indices: it is evaluated here on the query × key grid and must be all True or the causal triangle for
every batch and head.

Replacement: that of :mod:`.sketch_sdpa`, for the SDPA call with the same meaning. Left alone, with the
reason: a ``score_mod`` that changes the scores (ALiBi, soft-capping), masks that are neither (a sliding
window), masks that read tensors (document masks), the log-sum-exp output in use.
"""
from __future__ import annotations

import operator
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import fx

from panther.attention_error import sample
from panther.policy import SketchSpec

from . import sketch_sdpa
from .common import PassContext

KIND = sketch_sdpa.KIND
OP_BEFORE = "flex_attention"
_FLEX = getattr(torch.ops.higher_order, "flex_attention", None)
#: how many mask entries one evaluation covers (the grid is walked in blocks of query rows)
_BLOCK = 1 << 22
_PATTERNS: dict = {}  # (mask_mod code, sizes) -> mask_pattern


def _is_flex(node) -> bool:
    return _FLEX is not None and node.op == "call_function" and node.target is _FLEX


def _submodule(node, a) -> Optional[torch.nn.Module]:
    return getattr(node.graph.owning_module, a.target, None) if isinstance(a, fx.Node) and a.op == "get_attr" else None


def _keeps_scores(score_mod) -> bool:
    """Whether a traced ``score_mod(score, b, h, q_idx, kv_idx)`` returns its score unchanged."""
    if not isinstance(score_mod, fx.GraphModule):
        return False
    first = next(iter(score_mod.graph.nodes))
    out = next(n for n in score_mod.graph.nodes if n.op == "output").args[0]
    out = out[0] if isinstance(out, (tuple, list)) and len(out) == 1 else out
    return first.op == "placeholder" and out is first


def mask_pattern(mask_mod, B: int, H: int, Lq: int, Lk: int) -> Union[bool, str]:
    """``True`` when ``mask_mod(b, h, q_idx, kv_idx)`` is the causal triangle on this grid, ``False`` when it is
    all True, else why random features cannot apply it. Evaluated on the CPU on broadcast index grids, a
    block of query rows at a time (a mask that reads only the indices costs ``Lq·Lk`` booleans in all)."""
    b = torch.arange(B, dtype=torch.int32).view(B, 1, 1, 1)
    h = torch.arange(H, dtype=torch.int32).view(1, H, 1, 1)
    kv = torch.arange(Lk, dtype=torch.int32).view(1, 1, 1, Lk)
    full = causal = True
    rows = max(1, _BLOCK // Lk)
    for start in range(0, Lq, rows):
        q = torch.arange(start, min(Lq, start + rows), dtype=torch.int32).view(1, 1, -1, 1)
        try:
            with torch.no_grad():
                keep = torch.as_tensor(mask_mod(b, h, q, kv)).to("cpu", torch.bool)
            torch.broadcast_to(keep, (B, H, q.shape[2], Lk))
        except Exception:  # noqa: BLE001 - a mask_mod this cannot run on index grids is simply not read
            return "the block mask's mask_mod could not be evaluated on index grids"
        full = full and bool(keep.all())
        causal = causal and bool((keep == (kv <= q)).all())
        if not (full or causal):
            return "the block mask is neither causal nor full (a sliding window, say): random-feature attention " \
                   "supports only causal / key padding masks"
    return not full


def _mask_pattern(mask_mod: fx.GraphModule, *sizes) -> Union[bool, str]:
    """:func:`mask_pattern`, once per traced code and sizes (each layer's call carries its own copy of one
    mask_mod); a mask_mod holding tensors of its own is evaluated each time."""
    if any(n.op == "get_attr" for n in mask_mod.graph.nodes):
        return mask_pattern(mask_mod, *sizes)
    key = (mask_mod.code, sizes)
    if key not in _PATTERNS:
        if len(_PATTERNS) >= 256:  # bounded: one entry per mask and shape seen
            _PATTERNS.clear()
        _PATTERNS[key] = mask_pattern(mask_mod, *sizes)
    return _PATTERNS[key]


def parse(node) -> Optional[Tuple[tuple, Union[bool, str]]]:
    """``((q, k, v, scale, enable_gqa), causal or the reason it cannot be rewritten)`` of a flex_attention call."""
    if not _is_flex(node) or len(node.args) < 6:
        return None
    q, k, v, score_mod, block_mask, scale = node.args[:6]
    score_buffers, mask_buffers = (tuple(node.args[7:9]) + ((), ()))[:2]
    shapes = [t.meta.get("example_value").shape if isinstance(t, fx.Node) else None for t in (q, k, v)]
    gqa = all(s is not None and len(s) == 4 for s in shapes) and shapes[0][1] != shapes[1][1]
    found = (q, k, v, scale, gqa)
    if not _keeps_scores(_submodule(node, score_mod)) or score_buffers:
        return found, "a score_mod changes the scores (a bias or soft-capping): random features approximate exp(q·k) only"
    if mask_buffers:
        return found, "the block mask's mask_mod reads tensors (a document or padding mask)"
    if any(u.target is not operator.getitem or u.args[1] != 0 for u in node.users):
        return found, "the log-sum-exp output is used"
    if None in shapes or any(len(s) != 4 for s in shapes):
        return found, False  # sketch_sdpa.candidate says why
    mask_mod = _submodule(node, block_mask[-1]) if isinstance(block_mask, (tuple, list)) and block_mask else None
    if mask_mod is None:
        return found, "no block mask's mask_mod in the call"
    (B, H, Lq, _), Lk = shapes[0], shapes[1][2]
    if not all(isinstance(s, int) for s in (B, H, Lq, Lk)):
        return found, "flex_attention under dynamic shapes: its mask cannot be checked for every length"
    return found, _mask_pattern(mask_mod, B, H, Lq, Lk)


def sampler(node):
    """How ``attention_sample`` samples this node's attention, if it is a flex_attention call it can rewrite."""
    parsed = parse(node)
    if parsed is None or isinstance(parsed[1], str):
        return None
    (q, k, v, scale, gqa), causal = parsed
    return [q, k, v], lambda values: sample(values[q], values[k], values[v], None, causal, scale, gqa)


def stand_in(node):
    """For ``attention_sample``'s run: the same attention through SDPA, as ``(out,)`` (only ``[0]`` is read).
    flex_attention outside a compiled kernel computes every score, which at long sequences does not fit."""
    parsed = parse(node)
    if parsed is None or isinstance(parsed[1], str):
        return None
    (_, _, _, scale, gqa), causal = parsed

    def run(args, kwargs):  # the call's first three arguments are q, k, v
        return (F.scaled_dot_product_attention(*args[:3], is_causal=causal, scale=scale, enable_gqa=gqa),)

    return run


def match(node, ctx: PassContext):
    parsed = parse(node)
    if parsed is None:
        return None
    (q, k, v, scale, gqa), causal = parsed
    problem = causal if isinstance(causal, str) else None
    cand = sketch_sdpa.candidate(node, ctx, OP_BEFORE, q, k, v, None, 0.0, causal is True, scale, gqa,
                                 unsupported=problem)
    cand.data["outputs"] = list(node.users)  # getitem(out, 0): what the result replaces
    return cand


def rewrite(cand, spec: SketchSpec, ctx: PassContext):
    return sketch_sdpa.rewrite(cand, spec, ctx)
