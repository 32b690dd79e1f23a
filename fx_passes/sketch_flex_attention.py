"""Pass: ``flex_attention`` -> ``panther::rf_attention`` when its mask is causal / key padding and it keeps
the scores.

Pattern (Dynamo torch IR of ``torch.nn.attention.flex_attention.flex_attention``):
    out = torch.ops.higher_order.flex_attention(q, k, v, score_mod, block_mask, scale, kernel_options,
                                                score_mod_buffers, mask_mod_buffers)[0]
with q, k, v of shape (B, H, L, d) (fewer key/value heads: ``enable_gqa``), ``score_mod`` the identity
(``flex_attention(q, k, v)`` without one), and the block mask's ``mask_mod`` (its last element) an AND of
factors ``buffer[b, kv_idx]`` (key padding: Hugging Face's mask for a padded batch) and factors of the
indices only, which are evaluated here on the query × key grid and must be all True or the causal triangle
for every batch and head.

Replacement: that of :mod:`.sketch_sdpa`, for the SDPA call with the same meaning. Left alone, with the
reason: a ``score_mod`` that changes the scores (ALiBi, soft-capping), masks that are neither (a sliding
window), masks that read tensors otherwise (document masks), the log-sum-exp output in use.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import List, Optional, Union

import torch
import torch.nn.functional as F
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true as known

from panther.attention_error import sample
from panther.policy import SketchSpec

from . import index_pattern, sketch_sdpa
from .common import PassContext
from .sdpa_mask import UNEQUAL_LENGTHS, factors

KIND = sketch_sdpa.KIND
OP_BEFORE = "flex_attention"
_FLEX = getattr(torch.ops.higher_order, "flex_attention", None)
#: how many mask entries one evaluation covers (the grid is walked in blocks of query rows)
_BLOCK = 1 << 22
_PATTERNS: dict = {}  # (mask_mod code, sizes, buffer shapes) -> mask_pattern


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


def mask_pattern(mask_mod, B: int, H: int, Lq: int, Lk: int, buffers=()) -> Union[bool, str]:
    """``True`` when ``mask_mod(b, h, q_idx, kv_idx, *buffers)`` is the causal triangle on this grid, ``False``
    when it is all True, else why random features cannot apply it. Evaluated on the CPU on broadcast index
    grids, a block of query rows at a time (a mask that reads only the indices costs ``Lq·Lk`` booleans)."""
    b = torch.arange(B, dtype=torch.int32).view(B, 1, 1, 1)
    h = torch.arange(H, dtype=torch.int32).view(1, H, 1, 1)
    kv = torch.arange(Lk, dtype=torch.int32).view(1, 1, 1, Lk)
    full = causal = True
    rows = max(1, _BLOCK // Lk)
    for start in range(0, Lq, rows):
        q = torch.arange(start, min(Lq, start + rows), dtype=torch.int32).view(1, 1, -1, 1)
        try:
            with torch.no_grad():
                keep = torch.as_tensor(mask_mod(b, h, q, kv, *buffers)).to("cpu", torch.bool)
            torch.broadcast_to(keep, (B, H, q.shape[2], Lk))
        except Exception:  # noqa: BLE001 - a mask_mod this cannot run on index grids is simply not read
            return "the block mask's mask_mod could not be evaluated on index grids"
        full = full and bool(keep.all())
        causal = causal and bool((keep == (kv <= q)).all())
        if not (full or causal):
            return _NEITHER
    return not full


_DYNAMIC = "flex_attention under dynamic shapes: its mask cannot be read for every length"
_NEITHER = "the block mask is neither causal nor full (a sliding window, say): random-feature attention supports " \
           "only causal / key padding masks"


def _mask_pattern(mask_mod: fx.GraphModule, sizes: tuple, buffers: tuple) -> Union[bool, str]:
    """:func:`mask_pattern`, once per traced code, sizes and buffer shapes (each layer's call carries its own
    copy of one mask_mod, and each pass asks); a mask_mod holding tensors of its own is evaluated each time."""
    if any(n.op == "get_attr" for n in mask_mod.graph.nodes):
        return mask_pattern(mask_mod, *sizes, buffers)
    key = (mask_mod.code, sizes, tuple(b.shape for b in buffers))
    if key not in _PATTERNS:
        if len(_PATTERNS) >= 256:  # bounded: one entry per mask and shape seen
            _PATTERNS.clear()
        _PATTERNS[key] = mask_pattern(mask_mod, *sizes, buffers)
    return _PATTERNS[key]


def _padding_buffers(mask_mod: fx.GraphModule, buffers, B: int, Lk: int) -> Union[list, str]:
    """The graph nodes of ``buffers`` (the tensors ``mask_mod`` reads) when each enters it only as a factor
    ``buffer[b, kv_idx]`` of its AND, a boolean ``(B or 1, Lk)`` tensor: the keys each sequence keeps, as
    Hugging Face's flex_attention mask reads its padding; else the reason."""
    reason = "the block mask's mask_mod reads tensors other than as key padding (a document mask, say)"
    places = [n for n in mask_mod.graph.nodes if n.op == "placeholder"]
    if len(places) != 4 + len(buffers):
        return reason
    b_idx, kv_idx, inner = places[0], places[3], places[4:]
    out = next(n for n in mask_mod.graph.nodes if n.op == "output").args[0]
    out = out[0] if isinstance(out, (tuple, list)) and len(out) == 1 else out

    def kv(n):  # kv_idx, or kv_idx + 0 (Hugging Face adds the key offset)
        return n is kv_idx or (isinstance(n, fx.Node) and n.target is operator.add and n.args[0] is kv_idx
                               and n.args[1] == 0)

    terms = factors(out) if isinstance(out, fx.Node) else []  # the AND's factors, as SDPA masks are read
    read = {f.args[0] for f in terms if f.target is operator.getitem and f.args[0] in inner
            and isinstance(f.args[1], tuple) and len(f.args[1]) == 2 and f.args[1][0] is b_idx
            and kv(f.args[1][1]) and len(f.args[0].users) == 1}
    pads = [buffers[inner.index(p)] for p in inner if p in read]
    values = [p.meta.get("example_value") if isinstance(p, fx.Node) else None for p in buffers]
    if len(pads) != len(buffers) or not all(isinstance(v, torch.Tensor) and v.dtype == torch.bool and v.dim() == 2
                                            and (known(v.shape[0] == 1) or known(v.shape[0] == B))
                                            and known(v.shape[1] == Lk) for v in values):
        return reason
    return pads


def _pattern_for_every_length(mask_mod: fx.GraphModule, Lq, Lk) -> Union[bool, str]:
    """:func:`mask_pattern` under dynamic shapes: each factor of the mask_mod's AND other than key padding
    (``buffer[b, kv_idx]``) read for every length by ``index_pattern``, the indices as linear forms of the grid."""
    b_idx, h_idx, q_idx, kv_idx, *inner = [n for n in mask_mod.graph.nodes if n.op == "placeholder"]
    out = next(n for n in mask_mod.graph.nodes if n.op == "output").args[0]
    out = out[0] if isinstance(out, (tuple, list)) and len(out) == 1 else out
    leaves = {q_idx: index_pattern.Linear(((-2, 1),)), kv_idx: index_pattern.Linear(((-1, 1),))}
    causal = False
    for f in factors(out) if isinstance(out, fx.Node) else [out]:
        if f.target is operator.getitem and f.args[0] in inner:
            continue  # key padding (_padding_buffers)
        read = index_pattern.read(f, lambda _: None, leaves=leaves, grid=(Lq, Lk))
        if not (isinstance(read, index_pattern.Pattern) and read.hi.dtype == torch.bool):
            return _DYNAMIC
        if bool(read.hi) and (bool(read.lo) or read.diagonal is None):
            continue  # all True
        if read.diagonal == 0 and not bool(read.lo):
            if not known(Lq == Lk):
                return UNEQUAL_LENGTHS
            causal = True
            continue
        return _NEITHER
    return causal


@dataclass
class FlexCall:
    """What :func:`parse` read: SDPA's arguments, the key padding the mask carries, and what stops a rewrite."""

    q: fx.Node
    k: fx.Node
    v: fx.Node
    scale: object
    gqa: bool
    causal: bool = False
    pads: List[fx.Node] = field(default_factory=list)  # (B or 1, Lk) booleans, True = keep
    problem: Optional[str] = None

    def keep(self, values, lq: Optional[int] = None) -> Optional[torch.Tensor]:
        """The boolean mask, True = attend, from the padding's ``values`` (None: no padding): the keys kept,
        ``(B, 1, 1, Lk)``, or with ``lq`` queries and the causal triangle too, ``(B, 1, lq, Lk)``."""
        if not self.pads:
            return None
        keep = values[self.pads[0]]
        for p in self.pads[1:]:
            keep = keep & values[p]
        keep = keep[:, None, None, :]
        if self.causal and lq is not None:
            keep = keep & torch.ones(lq, keep.shape[-1], dtype=torch.bool, device=keep.device).tril()
        return keep


def parse(node) -> Optional[FlexCall]:
    """The attention a flex_attention call computes, if ``node`` is one."""
    if not _is_flex(node) or len(node.args) < 6:
        return None
    q, k, v, score_mod, block_mask, scale = node.args[:6]
    score_buffers, mask_buffers = (tuple(node.args[7:9]) + ((), ()))[:2]
    shapes = [t.meta.get("example_value").shape if isinstance(t, fx.Node) else None for t in (q, k, v)]
    four = all(s is not None and len(s) == 4 for s in shapes)
    call = FlexCall(q, k, v, scale, gqa=four and shapes[0][1] != shapes[1][1])
    mask_mod = _submodule(node, block_mask[-1]) if isinstance(block_mask, (tuple, list)) and block_mask else None
    if not _keeps_scores(_submodule(node, score_mod)) or score_buffers:
        call.problem = "a score_mod changes the scores (a bias or soft-capping): random features approximate " \
                       "exp(q·k) only"
    elif any(u.target is not operator.getitem or u.args[1] != 0 for u in node.users):
        call.problem = "the log-sum-exp output is used"
    elif not four:
        pass  # sketch_sdpa.candidate says why
    elif mask_mod is None:
        call.problem = "no block mask's mask_mod in the call"
    else:
        (B, H, Lq, _), Lk = shapes[0], shapes[1][2]
        pads = _padding_buffers(mask_mod, mask_buffers, B, Lk) if mask_buffers else []
        sizes = [n for n in mask_mod.graph.nodes if n.op == "placeholder"
                 and isinstance(n.meta.get("example_value"), torch.SymInt)]
        if isinstance(pads, str) or sizes:  # sizes: Hugging Face's mask_mod under dynamic shapes adds symbolic
            call.problem = _DYNAMIC if sizes else pads  # offsets to the indices, which cannot be proved 0
            return call
        call.pads = pads
        if all(isinstance(s, int) for s in (B, H, Lq, Lk)):
            # the padding factors set to True leave the mask's index pattern
            ones = tuple(torch.ones(p.meta["example_value"].shape, dtype=torch.bool) for p in pads)
            pattern = _mask_pattern(mask_mod, (B, H, Lq, Lk), ones)
        else:
            pattern = _pattern_for_every_length(mask_mod, Lq, Lk)
        call.causal, call.problem = (pattern, None) if isinstance(pattern, bool) else (False, pattern)
    return call


def sampler(node):
    """How ``attention_sample`` samples this node's attention, if it is a flex_attention call it can rewrite."""
    c = parse(node)
    if c is None or c.problem:
        return None
    return [c.q, c.k, c.v, *c.pads], lambda values: sample(values[c.q], values[c.k], values[c.v], c.keep(values),
                                                            c.causal, c.scale, c.gqa)  # padding and causal


#: a padded call's stand-in materialises its (B, 1, Lq, Lk) mask up to this many booleans
_STAND_IN_MASK = 1 << 30


def stand_in(node):
    """For ``attention_sample``'s run: the same attention through SDPA, as ``(out,)`` (only ``[0]`` is read).
    flex_attention outside a compiled kernel computes every score, which at long sequences does not fit."""
    c = parse(node)
    if c is None or c.problem:
        return None
    B, _, Lq, _ = c.q.meta["example_value"].shape
    if c.pads and B * Lq * c.k.meta["example_value"].shape[2] > _STAND_IN_MASK:
        return None

    def run(args, kwargs):  # the call's first three arguments are q, k, v; its mask buffers come last
        keep = c.keep(dict(zip(c.pads, args[8])), lq=args[0].shape[2]) if c.pads else None
        out = F.scaled_dot_product_attention(*args[:3], attn_mask=keep, is_causal=c.causal and keep is None,
                                             scale=c.scale, enable_gqa=c.gqa)
        # a query that sees no key: flex_attention gives 0 where SDPA gives NaN
        return (out if keep is None else out.masked_fill(~keep.any(-1, keepdim=True), 0),)

    return run


def match(node, ctx: PassContext):
    c = parse(node)
    if c is None:
        return None
    cand = sketch_sdpa.candidate(node, ctx, OP_BEFORE, c.q, c.k, c.v, [], 0.0, c.causal, c.scale, c.gqa,
                                 unsupported=c.problem)
    # outputs: getitem(out, 0), what the result replaces; the padding factors keep keys (True = attend)
    cand.data.update(outputs=list(node.users), padding=[(p, False) for p in c.pads])
    return cand


def rewrite(cand, spec: SketchSpec, ctx: PassContext):
    return sketch_sdpa.rewrite(cand, spec, ctx)
