"""Pass: attention written out, ``softmax(q @ kᵀ · c + mask) @ v`` -> ``panther::rf_attention``.

Pattern (Dynamo torch IR), read backwards from the product with the values:
    s = matmul(q, k.transpose(-2, -1))          # or q.matmul(...), q @ ...; transpose(2, 3), k.mT;
                                                # baddbmm(x, q, kᵀ, beta=0, alpha=c) (diffusers);
                                                # einsum("bhid,bhjd->bhij", q, k); or keys the model
                                                # keeps transposed: q @ kt, einsum("bhid,bhdj->bhij")
    s = s * c, s / c                            # scalar factors: SDPA's ``scale`` is their product
    s = s.view(B, H, L, L)                      # views that regroup only the batch and head dimensions
                                                # (BLOOM), here and on the probabilities
    s = s + where(keep, 0, -inf)                # Hugging Face's eager mask (or where(ignore, -inf, 0)), then
                                                # perhaps max(s, finfo.min) (XGLM); or
    s = s.masked_fill(ignore, -inf)             # any fill of at most -1e4; or where(keep, s, -inf)
    p = softmax(s, dim=-1)                      # F.softmax / torch.softmax / .softmax, with dtype= or not
    p = p.to(dtype), dropout(p, rate)            # casts, and dropout (SDPA's dropout_p in training)
    o = matmul(p, v)                            # or p.matmul(v), p @ v, einsum("bhij,bhjd->bhid", p, v)
with q, k, v of shape (B, H, L, d). This is how ``attn_implementation="eager"`` Hugging Face models, timm's
unfused attention and many research codebases compute attention.

Replacement: that of :mod:`.sketch_sdpa` (same candidate, report row, accuracy guard and features), then the
scores and probabilities, now unused, are erased. Left alone, with the reason: scores or probabilities used
elsewhere (a model returning its attention weights), dropout whose rate is not a constant (a constant one
becomes SDPA's ``dropout_p``), scores scaled by a tensor, masks
other than key padding / causal (see ``sdpa_mask``), float biases, other steps between ``q @ kᵀ`` and the
softmax (tanh soft-capping, reshapes), mixed dtypes.
"""
from __future__ import annotations

import builtins
import dataclasses
import operator
from dataclasses import dataclass, field
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import fx

from panther.attention_error import sample
from panther.policy import SketchSpec

from . import sketch_sdpa
from .common import MATMUL_FUNCTIONS, MATMUL_METHODS, PassContext, is_call, same_sizes
from .sdpa_mask import CASTS, MASKED, additive_mask, is_masked, is_zero, uncast, value_of

KIND = sketch_sdpa.KIND
OP_BEFORE = "softmax(q @ k^T) @ v"
_SOFTMAX = {F.softmax, torch.softmax, torch.Tensor.softmax}
_DROPOUT = {F.dropout, torch.dropout}
#: how far back from the softmax an unfollowed step (Gemma 2's tanh soft-capping, Swin's reshapes around
#: its window mask) may be from ``q @ kᵀ`` for the pattern to count as attention, left alone with the reason
_UNFOLLOWED_DEPTH = 8
# in place too: Falcon's eager attention divides its scores with ``/=``
_MUL = {operator.mul, torch.mul, operator.imul}
_DIV = {operator.truediv, torch.div, operator.itruediv}
_ADD = {operator.add, torch.add, operator.iadd}


@dataclass
class WrittenAttention:
    """What :func:`parse` read: SDPA's arguments, the nodes to erase after a rewrite, and what stops one."""

    q: fx.Node
    k: fx.Node
    v: fx.Node
    scale: Optional[float] = 1.0  # the constant factors' product; None once a factor is a tensor
    # scalars of the graph among the factors (a float attribute under dynamic=True, √d of a symbolic size):
    # (node, 1) multiplies, (node, -1) divides
    symbolic: List[tuple] = field(default_factory=list)
    masks: List[tuple] = field(default_factory=list)  # (boolean node, ignores) or the reason one is unreadable
    # tensors the scores are multiplied by: fine where each is the 0/1 keep of a mask term (GPT-1's
    # ``w * b + -1e4 * (1 - b)``: the product only zeroes scores that the term masks anyway)
    multipliers: List[fx.Node] = field(default_factory=list)
    unfollowed: Optional[str] = None  # a step between q @ kᵀ and the softmax that random features cannot take
    dropout_p: object = 0.0
    chain: List[fx.Node] = field(default_factory=list)  # scores to probabilities, consumers before producers
    kt: Optional[fx.Node] = None  # the transposed keys of ``q @ kᵀ`` (may serve other products too)
    keys_transposed: bool = False  # ``k`` holds the keys transposed (GPT-1's and openai/whisper's (B, H, d, L))
    heads: Optional[int] = None  # (B·heads, Lq, Lk) scores viewed as (B, heads, Lq, Lk) (fairseq's masks)
    # (perm, out_perm): q, k, v permuted by ``perm`` are (B, H, L, d), the result of those permuted by
    # ``out_perm`` is the model's (an einsum of flash-attn's (B, L, H, d) layout); None where that is so already
    layout: Optional[tuple] = None
    problem: Optional[str] = None


def _fold(n) -> Optional[fx.Node]:
    """``x`` when ``n`` reshapes ``x`` only in its leading (batch, head) dimensions: BLOOM views its
    ``(B·H, Lq, Lk)`` scores as ``(B, H, Lq, Lk)`` to add the mask, and its probabilities back."""
    if not is_call(n, (torch.reshape, torch.flatten, torch.unflatten), ("view", "reshape", "flatten", "unflatten")):
        return None
    x = n.args[0]
    shapes = [getattr(value_of(t), "shape", None) for t in (n, x)]
    ok = all(s is not None and len(s) >= 2 for s in shapes) and same_sizes(shapes[0][-2:], shapes[1][-2:])
    return x if ok else None


def _heads_view(n, x) -> Optional[int]:
    """``H`` when ``n`` views 3-D ``x``, ``(B·H, Lq, Lk)``, as ``(B, H, Lq, Lk)``."""
    a, b = value_of(n), value_of(x)
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dim() == 4 and b.dim() == 3):
        return None
    return a.shape[1] if all(isinstance(d, int) for d in a.shape[:2] + b.shape[:1]) else None


def _floored(n) -> Optional[fx.Node]:
    """``s`` when ``n`` is ``max(s, c)`` / ``s.clamp(min=c)`` with a constant ``c`` that masks (XGLM and old
    BART-style code floor masked scores at ``finfo.min``): it changes only scores that are masked anyway."""
    if is_call(n, (torch.max, torch.maximum), ("max", "maximum")) and len(n.args) == 2 and not n.kwargs:
        s, c = n.args
    elif is_call(n, (torch.clamp, torch.clamp_min), ("clamp", "clamp_min")) and _arg(n, 2, "max") is None:
        s, c = n.args[0], _arg(n, 1, "min")
    else:
        return None
    return s if isinstance(s, fx.Node) and is_masked(c) else None


def _arg(n: fx.Node, i: int, name: str, default=None):
    """Argument ``i`` / ``name`` of a call (a method's ``self`` is argument 0)."""
    return n.kwargs[name] if name in n.kwargs else n.args[i] if len(n.args) > i else default


def _ndim(n) -> Optional[int]:
    v = value_of(n)
    return v.dim() if isinstance(v, torch.Tensor) else None


def _untransposed(n) -> Optional[fx.Node]:
    """``k`` when ``n`` is ``k`` with its last two dimensions swapped."""
    if is_call(n, (builtins.getattr,)) and n.args[1] == "mT":
        return n.args[0]
    nd = _ndim(n)
    if nd is None:
        return None
    if is_call(n, (torch.transpose,), ("transpose",)) and len(n.args) == 3:
        dims = {d % nd for d in n.args[1:] if isinstance(d, int)}
        return n.args[0] if dims == {nd - 2, nd - 1} else None
    if is_call(n, (torch.permute,), ("permute",)):
        dims = n.args[1] if len(n.args) == 2 and isinstance(n.args[1], (tuple, list)) else n.args[1:]
        expect = list(range(nd - 2)) + [nd - 1, nd - 2]
        return n.args[0] if [d % nd for d in dims if isinstance(d, int)] == expect else None
    return None


def _einsum(n):
    """``(a, b, out, operands)``: the letters and operands of a two-operand ``einsum`` call, else None."""
    if not is_call(n, (torch.functional.einsum, torch.einsum)) or n.kwargs or len(n.args) < 2:
        return None
    operands = n.args[1:] if len(n.args) > 2 else n.args[1]
    if not isinstance(n.args[0], str) or not isinstance(operands, (list, tuple)) or len(operands) != 2:
        return None
    inputs, _, out = n.args[0].replace(" ", "").partition("->")
    a, _, b = inputs.partition(",")
    return a, b, out, tuple(operands)


def _einsum_operands(n, contracts_last: bool):
    """``(a, b)`` when ``n`` is ``einsum`` of two operands that share their batch letters and contract
    ``a``'s last letter with ``b``'s last (``"...id,...jd->...ij"``, ``contracts_last``) or second last
    (``"...ij,...jd->...id"``) letter."""
    if _einsum(n) is None:
        return None
    a, b, out, operands = _einsum(n)
    if not (len(a) == len(b) == len(out) >= 3 and a[:-2] == b[:-2] == out[:-2] and len(set(a + b)) == len(a) + 1):
        return None
    (i, x), (y, z) = a[-2:], b[-2:]
    shape_ok = (x == z and out[-2:] == i + y) if contracts_last else (x == y and out[-2:] == i + z)
    return operands if shape_ok else None


def _einsum_layout(n, scores: bool):
    """``(a, b, perm, out_perm)`` when ``n`` is an ``einsum`` of attention whose operands order their
    dimensions otherwise than ``(..., L, d)``, as flash-attn's ``(B, L, H, d)`` reference does with
    ``"bthd,bshd->bhts"`` (``scores``: the scores ``(..., Lq, Lk)``, q and k in one order) and
    ``"bhts,bshd->bthd"`` (the values; the probabilities as the scores are): ``perm`` puts the operands
    (q and k, or v) in ``(..., L, d)`` order, ``out_perm`` (values only) the result back in its own."""
    spec = _einsum(n)
    if spec is None or min(map(len, spec[:3])) < 3 or any(len(set(t)) != len(t) for t in spec[:3]):
        return None
    a, b, out, operands = spec
    if scores:  # a: q, b: k, out: batch + i + j
        batch, i, j = out[:-2], out[-2], out[-1]
        contracted = (set(a) & set(b)) - set(out)
        if len(contracted) != 1 or set(a) != set(batch) | {i} | contracted or set(b) != set(batch) | {j} | contracted:
            return None
        (x,) = contracted
        perm = tuple(a.index(c) for c in batch + i + x)
        return (*operands, perm, None) if perm == tuple(b.index(c) for c in batch + j + x) else None
    batch, i, j = a[:-2], a[-2], a[-1]  # a: the probabilities, b: v
    own = set(b) - set(a)
    if len(own) != 1 or set(b) != set(batch) | {j} | own or set(out) != set(batch) | {i} | own:
        return None
    (y,) = own
    return (*operands, tuple(b.index(c) for c in batch + j + y), tuple((batch + i + y).index(c) for c in out))


def _product(n, with_transposed: bool):
    """``(a, b)`` when ``n`` is the batched product ``a @ b``, or with ``with_transposed`` ``a @ bᵀ`` (b is
    then the untransposed operand: the keys); matmul or einsum."""
    if is_call(n, MATMUL_FUNCTIONS, MATMUL_METHODS) and len(n.args) == 2 and not n.kwargs:
        a, b = n.args
        return (a, _untransposed(b) if with_transposed else b) if isinstance(a, fx.Node) else None
    return _einsum_operands(n, with_transposed)


def _score_product(n):
    """``(q, k, keys_transposed)`` when ``n`` is ``q @ kᵀ``: ``k`` untransposed where the graph transposes it,
    else the right operand as it is, of the queries' rank (keys that the model keeps transposed; a product
    with a weight matrix is not attention)."""
    found = _product(n, with_transposed=True)
    if found is not None and found[1] is not None:
        return found[0], found[1], False
    q_kt = _product(n, with_transposed=False)
    ranks = {_ndim(t) for t in q_kt} if q_kt is not None else {None}
    return (*q_kt, True) if None not in ranks and len(ranks) == 1 and min(ranks) >= 3 else None


def _scale_by(found: "WrittenAttention", factor, power: int):
    if isinstance(factor, fx.Node):
        found.symbolic.append((factor, power))
    elif factor is None or found.scale is None or factor == 0:
        found.scale = None
    else:
        found.scale *= factor ** power


def _scores(s, found: WrittenAttention) -> bool:
    """Read ``s = q @ kᵀ`` with constant factors and masks into ``found``; False if it is not that."""
    while True:
        if not isinstance(s, fx.Node):
            return False
        found.chain.append(s)
        if is_call(s, (), CASTS):
            s = s.args[0]
        elif (inner := _fold(s)) is not None or (inner := _floored(s)) is not None:
            found.heads = found.heads or _heads_view(s, inner)
            s = inner
        elif is_call(s, _MUL, ("mul",)) and len(s.args) == 2:
            a, b = s.args
            first = sketch_sdpa.scalar_factor(a)  # each side read once: a constant side is evaluated
            s, c, factor = (b, a, first) if first is not None else (a, b, sketch_sdpa.scalar_factor(b))
            if factor is None and isinstance(c, fx.Node):
                found.multipliers.append(c)
            else:
                _scale_by(found, factor, 1)
        elif is_call(s, _DIV, ("div",)) and len(s.args) == 2 and not s.kwargs:
            s, c = s.args
            _scale_by(found, sketch_sdpa.scalar_factor(c), -1)
        elif is_call(s, _ADD, ("add",)) and len(s.args) == 2 and not s.kwargs and any(map(is_zero, s.args)):
            s = s.args[1] if is_zero(s.args[0]) else s.args[0]  # T5 adds a zero position bias where it has none
        elif is_call(s, _ADD, ("add",)) and len(s.args) == 2 and not s.kwargs:
            for scores, term in (s.args, s.args[::-1]):
                trial = dataclasses.replace(found, chain=list(found.chain), masks=list(found.masks),
                                            multipliers=list(found.multipliers))
                if _scores(scores, trial):
                    trial.masks.append(additive_mask(term))
                    found.__dict__.update(trial.__dict__)
                    return True
            return False
        elif is_call(s, (torch.masked_fill,), ("masked_fill",)):
            cond, fill = _arg(s, 1, "mask"), _arg(s, 2, "value")
            s = _arg(s, 0, "input")
            found.masks.append((cond, True) if is_masked(fill) else
                               f"masked_fill with {fill!r}: only fills of -inf (at most {MASKED:g}) mask keys")
        elif is_call(s, (torch.where,)) and len(s.args) == 3 and (is_masked(s.args[1]) or is_masked(s.args[2])):
            cond, a, b = s.args  # where(keep, s, -inf) / where(ignore, -inf, s)
            ignores = is_masked(a)
            s = b if ignores else a
            found.masks.append((cond, ignores))
        elif _is_baddbmm(s):
            # beta·input + alpha·(q @ kᵀ): diffusers' classic processor, with beta 0 (input unread) or a mask
            # (BLOOM's ALiBi bias, unreadable)
            beta, alpha = s.kwargs.get("beta", 1), s.kwargs.get("alpha", 1)
            _scale_by(found, sketch_sdpa.scalar_factor(alpha), 1)
            if beta != 0:
                found.masks.append(additive_mask(s.args[0]) if beta == 1 else f"baddbmm with beta={beta!r}")
            found.q, found.kt = _arg(s, 1, "batch1"), _arg(s, 2, "batch2")
            found.k = _untransposed(found.kt)
            if found.k is None:
                found.k, found.keys_transposed = found.kt, True
            return isinstance(found.q, fx.Node) and isinstance(found.kt, fx.Node)
        elif (product := _score_product(s)) is not None:
            found.q, found.k, found.keys_transposed = product
            if is_call(s, MATMUL_FUNCTIONS, MATMUL_METHODS) and not found.keys_transposed:
                found.kt = s.args[1]
            return True
        elif (product := _einsum_layout(s, scores=True)) is not None:
            found.q, found.k, found.layout = product[0], product[1], (product[2], None)
            return True
        elif (inner := _towards_product(s, _UNFOLLOWED_DEPTH)) is not None:
            name = s.target if isinstance(s.target, str) else getattr(s.target, "__name__", str(s.target))
            found.unfollowed = found.unfollowed or f"the scores pass through {name} before the softmax: random " \
                "features take only scalar factors, casts and key padding / causal masks there"
            s = inner
        else:
            return False


def _is_baddbmm(n) -> bool:
    return is_call(n, (torch.baddbmm,), ("baddbmm",)) and len(n.args) + len(
        {"batch1", "batch2"} & set(n.kwargs)) == 3


def _towards_product(n: fx.Node, depth: int) -> Optional[fx.Node]:
    """The input of ``n`` through which a product ``q @ kᵀ`` is at most ``depth`` steps back, if any."""
    for a in n.all_input_nodes:
        frontier, seen = {a}, {a}
        for _ in range(depth):
            if any(_is_baddbmm(x) or (p := _product(x, with_transposed=True)) and p[1] is not None
                   for x in frontier):
                return a
            frontier = {i for x in frontier for i in x.all_input_nodes} - seen
            seen |= frontier
    return None


def parse(node) -> Optional[WrittenAttention]:
    """The attention ``node`` computes, if it is the value product of attention written out."""
    p, v = _product(node, with_transposed=False) or (None, None)
    value_layout = None
    if p is None and (product := _einsum_layout(node, scores=False)) is not None:
        p, v, *value_layout = product
    if p is None:
        return None
    probabilities = p
    chain, dropout_p = [], 0.0
    while is_call(p, _DROPOUT, CASTS) or _fold(p) is not None:
        chain.append(p)
        if _fold(p) is not None:
            p = _fold(p)
            continue
        if p.target in _DROPOUT:
            rate, training = _arg(p, 1, "p", 0.5), _arg(p, 2, "training" if p.target is F.dropout else "train", True)
            if training is not False and rate != 0:
                dropout_p = rate if training is True and dropout_p == 0.0 else \
                    f"{rate!r} with training={training!r}" if dropout_p == 0.0 else "several dropouts"
        p = p.args[0]
    nd = _ndim(p)
    if not (is_call(p, _SOFTMAX, ("softmax",)) and nd is not None and isinstance(_arg(p, 1, "dim"), int)
            and _arg(p, 1, "dim") % nd == nd - 1):
        return None
    chain.append(p)
    found = WrittenAttention(None, None, v, dropout_p=dropout_p, chain=chain)
    if not _scores(_arg(p, 0, "input"), found):
        return None
    found.chain = [n for n in found.chain if isinstance(n, fx.Node)]
    # reshaped between the products: the probabilities must come back as q @ kᵀ has them
    folded = any(_fold(n) is not None for n in found.chain)
    if folded and not same_sizes(value_of(probabilities).shape, value_of(found.chain[-1]).shape):
        found.unfollowed = found.unfollowed or "the scores are reshaped across the softmax into other batch " \
            "dimensions than the product with the values takes"
    identity = tuple(range(_ndim(v) or 0))
    v_perm, out_perm = value_layout or (identity, identity)
    qk_perm = found.layout[0] if found.layout else identity
    if v_perm != qk_perm:  # one order for q, k and v
        return None
    found.layout = None if qk_perm == out_perm == identity else (qk_perm, out_perm)
    values = [n.meta.get("example_value") for n in (found.q, found.k, found.v, node)]
    unreadable = [m for m in found.masks if isinstance(m, str)]
    keeps = [m for m, ignores in (t for t in found.masks if not isinstance(t, str)) if not ignores]
    if any(uncast(m) not in keeps for m in found.multipliers):
        found.scale = None
    if any(len(n.users) > 1 for n in found.chain):
        found.problem = "the attention weights are used elsewhere (e.g. returned with output_attentions=True)"
    elif found.unfollowed:
        found.problem = found.unfollowed
    elif unreadable:
        found.problem = unreadable[0]
    elif found.scale is None:
        found.problem = "the scores are scaled by a tensor: random-feature attention takes a scalar scale"
    elif len({getattr(t, "dtype", None) for t in values}) > 1:
        found.problem = "queries, keys, values and output differ in dtype"
    return found


def sampler(node):
    """How ``attention_sample`` samples this node's attention, if it is attention written out."""
    w = parse(node)
    if w is None or w.problem:
        return None
    scalars = [n for n, _ in w.symbolic]
    needed = [w.q, w.k, w.v] + [mask for mask, _ in w.masks] + scalars

    def take(values):
        keep = None
        for mask, ignores in w.masks:  # boolean, or 0/1 integers (sdpa_mask.additive_mask)
            term = values[mask].logical_not() if ignores else values[mask].bool()
            keep = term if keep is None else keep & term
        scale = sketch_sdpa.scale_of(w.scale, tuple(p for _, p in w.symbolic), *(float(values[n]) for n in scalars))
        q, k, v = values[w.q], values[w.k].transpose(-2, -1) if w.keys_transposed else values[w.k], values[w.v]
        if w.heads and q.dim() == 3:
            q, k, v = (t.unflatten(0, (-1, w.heads)) for t in (q, k, v))
        if w.layout:
            q, k, v = (t.permute(w.layout[0]) for t in (q, k, v))
        return sample(q, k, v, keep, False, scale, False)

    return needed, take


def match(node, ctx: PassContext):
    w = parse(node)
    if w is None:
        return None
    cand = sketch_sdpa.candidate(node, ctx, OP_BEFORE, w.q, w.k, w.v, [] if w.problem else w.masks, w.dropout_p,
                                 False, w.scale, False, unsupported=w.problem, keys_transposed=w.keys_transposed,
                                 heads=w.heads, layout=w.layout, symbolic=w.symbolic)
    cand.data.update(chain=w.chain + ([w.kt] if w.kt is not None else []))
    return cand


def rewrite(cand, spec: SketchSpec, ctx: PassContext):
    chain = cand.data["chain"]
    masks = [a for n in chain for a in n.all_input_nodes if a not in chain]  # what built the mask, say
    op_after, err = sketch_sdpa.rewrite(cand, spec, ctx)
    for n in chain + masks:
        _erase_if_unused(ctx.graph, n)
    return op_after, err


def _erase_if_unused(graph: fx.Graph, n: fx.Node):
    """Erase ``n`` and then its inputs while the rewrite has left them unused (pure calls only)."""
    if n._erased or n.users or n.op not in ("call_function", "call_method") or (
            n.op == "call_method" and n.target.endswith("_")):
        return
    inputs: List[fx.Node] = []
    fx.node.map_arg((n.args, n.kwargs), inputs.append)
    graph.erase_node(n)
    for a in inputs:
        _erase_if_unused(graph, a)

