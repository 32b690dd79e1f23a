"""Reading an SDPA ``attn_mask`` as what random-feature attention can apply: key padding, and causality.

Hugging Face models build their boolean masks in the graph as an AND of factors, e.g. BERT's
``padding[:, None, None, :] & (q_idx >= 0)`` and Llama's ``padding[:, None, None, :] & (kv_idx <= q_idx)``,
expanded to ``(B, 1, Lq, Lk)``. A factor is

* a **key padding** factor when it is ``(B, 1, 1, Lk)`` (any values: it masks keys per sequence), or
* an **index** factor when its value reads no graph input, only sizes, index ranges and module buffers
  (minGPT's causal triangle ``bias``): it is then evaluated once, here (buffers as they are now, as the
  weights of a rewrite are read), and must be all True (no mask) or the causal triangle.

Attention written out as ``softmax(q @ kᵀ + M) @ v`` (``sketch_softmax_attention``) masks with the opposite
sense, True = ignore (``scores.masked_fill(ignore, -inf)``, ``torch.where(ignore, -inf, 0)``): such a mask is
read as an OR of factors, each one keys to ignore per sequence or an index pattern whose negation is kept.

A float mask added to the scores is read by :func:`additive_mask` when it is one of these written as
``where(keep, 0, -inf)`` or BERT's ``(1 - keep) * min`` with ``keep`` 0 or 1.

Anything else (a float bias, a sliding window, a factor that reads the inputs per query, sizes that are
symbolic so the index factor could differ at another length) is left to exact attention.
"""
from __future__ import annotations

import operator
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from . import index_pattern
from .common import is_call

#: the value of a module buffer placeholder, or None (``PassContext.buffer_value``)
State = Optional[Callable[[fx.Node], Optional[torch.Tensor]]]
# how a mask combines its factors: AND when True = attend, OR when True = ignore
_COMBINE_FUNCTIONS = {False: {operator.and_, torch.logical_and, torch.bitwise_and},
                      True: {operator.or_, torch.logical_or, torch.bitwise_or}}
_COMBINE_METHODS = {False: {"__and__", "logical_and", "bitwise_and"}, True: {"__or__", "logical_or", "bitwise_or"}}
#: an additive mask value or fill at most this is "never attend" (finfo.min, -1e9, -inf; -1e4 in fp16 code)
MASKED = -1e4
#: methods that change a tensor's dtype or layout, not its values' meaning
CASTS = {"to", "type", "type_as", "float", "half", "bfloat16", "double", "contiguous"}
# methods whose result does not depend on the values of ``self`` (only its size, dtype and device)
_SIZE_ONLY_METHODS = {"new_ones", "new_zeros", "new_full", "new_empty", "size", "dim"}


def value_of(n):
    """A node's example value (its fake tensor or symbolic size), or None."""
    return n.meta.get("example_value") if isinstance(n, fx.Node) else None


def is_bool(n) -> bool:
    v = value_of(n)
    return isinstance(v, torch.Tensor) and v.dtype == torch.bool


def factors(n: fx.Node, ignore: bool = False) -> List[fx.Node]:
    """Boolean nodes whose broadcast AND (OR, for an ``ignore`` mask) is ``n``, looking through those, ``expand``
    and casts to bool."""
    if n.op == "call_function" and n.target in _COMBINE_FUNCTIONS[ignore] or (
            n.op == "call_method" and n.target in _COMBINE_METHODS[ignore]):
        a, b = n.args[:2]
        if isinstance(a, fx.Node) and isinstance(b, fx.Node) and is_bool(a) and is_bool(b):
            return factors(a, ignore) + factors(b, ignore)
    if n.op == "call_method" and n.target in ("expand", "expand_as", "to", "bool", "contiguous") and is_bool(n.args[0]):
        return factors(n.args[0], ignore)
    return [n]


def reads_no_input(n: fx.Node, state: State = None, seen=None, sizes_too: bool = False) -> bool:
    """Whether ``n``'s value is fixed by the graph: no placeholder (input, parameter or symbolic size) or
    module attribute reaches it, except module buffers ``state`` knows and the ``self`` of a method that reads
    only sizes (``new_ones``...); with ``sizes_too``, whether it is fixed by the graph's sizes."""
    seen = set() if seen is None else seen
    if n in seen:
        return True
    seen.add(n)
    if n.op in ("placeholder", "get_attr"):
        size = sizes_too and isinstance(value_of(n), (torch.SymInt, int))
        return size or state is not None and state(n) is not None
    args = (n.args[1:], n.kwargs) if n.op == "call_method" and n.target in _SIZE_ONLY_METHODS else (n.args, n.kwargs)
    inputs: List[fx.Node] = []
    fx.node.map_arg(args, inputs.append)
    return all(reads_no_input(a, state, seen, sizes_too) for a in inputs)


def evaluate(node: fx.Node, state: State = None) -> Optional[torch.Tensor]:
    """The value of a node that reads no input (see :func:`reads_no_input`), computed now. The ``self``
    of a size-only method that does read inputs is stood in for by an uninitialised tensor of its size,
    dtype and device."""
    env = {}

    def visit(n: fx.Node):
        if n in env:
            return
        if n.op in ("placeholder", "get_attr"):
            env[n] = state(n)
            return
        size_only = n.op == "call_method" and n.target in _SIZE_ONLY_METHODS
        rest = (n.args[1:], n.kwargs) if size_only else (n.args, n.kwargs)
        fx.node.map_arg(rest, visit)
        args, kwargs = fx.node.map_arg(rest, env.__getitem__)
        if not size_only:
            env[n] = getattr(args[0], n.target)(*args[1:], **kwargs) if n.op == "call_method" else n.target(*args, **kwargs)
            return
        this = n.args[0]
        if reads_no_input(this, state):
            visit(this)
            this = env[this]
        else:
            v = value_of(this)
            this = torch.empty(v.shape, dtype=v.dtype, device=v.device)
        env[n] = getattr(this, n.target)(*args, **kwargs)

    try:
        visit(node)
    except Exception:  # noqa: BLE001 - anything this cannot compute is simply not an index factor
        return None
    out = env[node]
    return out if isinstance(out, torch.Tensor) else None


def constant_value(n) -> Optional[torch.Tensor]:
    """The floating value of a number, or of a node that reads no input, computed now; else None."""
    if isinstance(n, (int, float)) and not isinstance(n, bool):
        return torch.tensor(float(n))
    value = evaluate(n) if isinstance(n, fx.Node) and reads_no_input(n) else None
    return value if value is not None and value.is_floating_point() else None


def _constant(n, test) -> bool:
    """Whether ``n`` is a constant (:func:`constant_value`), or under dynamic shapes one of the sizes (T5's zero
    position bias ``zeros(1, H, Lq, Lk)``, read by ``index_pattern``), for which ``test`` holds everywhere."""
    value = constant_value(n)
    if value is None and isinstance(n, fx.Node) and reads_no_input(n, sizes_too=True):
        read = index_pattern.read(n, lambda _: None)
        value = torch.stack([read.hi, read.lo]) if isinstance(read, index_pattern.Pattern) else None
    return value is not None and bool(test(value).all())


def is_zero(n) -> bool:
    """Whether ``n`` is a constant that is 0 everywhere (T5's position bias of a layer without one)."""
    return _constant(n, lambda t: t == 0)


def is_masked(n) -> bool:
    """Whether ``n`` is a constant that masks where it is added: at most :data:`MASKED` everywhere."""
    return _constant(n, lambda t: t <= MASKED)


def uncast(n):
    """``n`` without the casts (:data:`CASTS`) on top."""
    while isinstance(n, fx.Node) and n.op == "call_method" and n.target in CASTS:
        n = n.args[0]
    return n


def additive_mask(term, state: State = None) -> Union[Tuple[fx.Node, bool], str]:
    """``(mask, ignores)`` of a float mask added to attention scores, as models write it: ``where(keep, 0, -inf)``
    / ``where(ignore, -inf, 0)`` (Hugging Face's eager masks), or ``(1 - keep) * c`` / ``ignore * c`` with a
    constant ``c`` at most :data:`MASKED` (BERT's ``extended_attention_mask``) and ``keep`` / ``ignore`` 0 or 1:
    boolean or integer, or a constant (:func:`padding_and_causal` checks its values). Looks through casts,
    ``expand`` and slices that keep its shape; else the reason it cannot be read."""
    while is_call(term, (operator.getitem,), {"expand", "expand_as"} | CASTS):
        v, inner = value_of(term), term.args[0]
        iv = value_of(inner)
        if term.target is operator.getitem and not (isinstance(v, torch.Tensor) and isinstance(iv, torch.Tensor)
                                                     and v.shape == iv.shape):
            break  # a slice that cuts the mask
        term = inner
    if is_call(term, (torch.where,)) and len(term.args) == 3:
        cond, a, b = term.args
        if is_zero(a) and is_masked(b):
            return cond, False
        if is_masked(a) and is_zero(b):
            return cond, True
    factor = [a for a in term.args if not is_masked(a)] if is_call(term, (operator.mul, torch.mul), ("mul",)) \
        and len(term.args) == 2 else []
    if len(factor) == 1:  # (1 - keep) * c, or ignore * c
        m = factor[0]
        ignores = not (is_call(m, (operator.sub, torch.sub), ("sub",)) and _constant(m.args[0], lambda t: t == 1))
        return uncast(m if ignores else m.args[1]), ignores
    v = value_of(term)
    if isinstance(v, torch.Tensor) and v.is_floating_point():
        return term, True  # the mask itself, nonzero where it ignores (Meta's Llama: triu(full(-inf), 1))
    return FLOAT_TERM


#: why a mask whose pattern depends on the sequence length stays exact under dynamic shapes
DYNAMIC_MASK = "attn_mask under dynamic shapes: its causal / padding pattern cannot be checked for every length"
#: why a float term added to the scores stays exact attention
FLOAT_TERM = "a float term is added to the scores (a position bias such as Swin's or ALiBi, or a mask not written " \
             "as where(mask, 0, -inf), (1 - mask) * min or a constant of 0 and -inf): random-feature attention " \
             "supports only causal / key padding masks"


#: methods that move a mask's values around without changing them
_VIEWS = {"view", "reshape", "expand", "expand_as", "unsqueeze", "flatten"} | CASTS


def _unviewed(n):
    """``n`` without the views, expands and casts (:data:`_VIEWS`) on top."""
    while is_call(n, (operator.getitem, torch.flatten, torch.unsqueeze, torch.reshape), _VIEWS):
        n = n.args[0]
    return n


def _filled_zeros(n) -> Optional[tuple]:
    """``(where, fill)`` when ``n`` is ``zeros_like(x).masked_fill(where, fill)`` seen through views, expands and
    casts (how nn.MultiheadAttention and nn.Transformer turn a boolean mask into an additive one), else None."""
    n = _unviewed(n)
    if is_call(n, (torch.masked_fill,), ("masked_fill", "masked_fill_")) and len(n.args) == 3 and is_call(
            n.args[0], (torch.zeros_like,), ("new_zeros",)):
        return n.args[1], n.args[2]
    return None


def zero_or_masked(n) -> bool:
    """Whether a float mask's values are only 0 and masked (at most :data:`MASKED`) whatever the inputs: a
    boolean mask made additive (:func:`_filled_zeros`) with a masked fill."""
    filled = _filled_zeros(n)
    return filled is not None and is_bool(filled[0]) and is_masked(filled[1])


def float_term(mask, state: State = None) -> Optional[str]:
    """Why a float ``mask`` that is not a constant stays exact: it reads the inputs, so its values could be
    other than 0 / 1 or 0 / -inf (a position bias such as ALiBi), or it is built from symbolic sizes."""
    value = value_of(mask)
    if not (isinstance(value, torch.Tensor) and value.is_floating_point()) or reads_no_input(mask, state) \
            or zero_or_masked(mask):
        return None
    return DYNAMIC_MASK if reads_no_input(mask, state, sizes_too=True) else FLOAT_TERM


def _per_key(shape: tuple, batch, keys) -> bool:
    """Whether a mask of this 4-D ``shape`` masks each sequence's keys alike for every head and query."""
    known = statically_known_true
    return shape[1] == 1 and shape[2] == 1 and (shape[0] == 1 or known(shape[0] == batch)) and (
        shape[3] == 1 or known(shape[3] == keys))


def padding_and_causal(mask, sizes: tuple, ignore: bool = False, state: State = None
                       ) -> Union[Tuple[List[fx.Node], bool], str]:
    """``(padding factors, causal)`` when ``mask`` (SDPA's boolean ``attn_mask``, True = attend, or with
    ``ignore`` True = ignore) of attention of ``sizes`` ``(B, Lq, Lk)`` (possibly symbolic) is a key padding
    mask, the causal mask, both, or neither (an all-attend mask); else the reason it is not. Each padding
    factor is a ``(B or 1, 1, 1, Lk or 1)`` node; their AND is the keys to keep (with ``ignore``: their OR, the keys
    to ignore). ``state`` gives the values of module buffers, which an index factor may read. An index factor of
    symbolic sizes (dynamic shapes) is read for every length by ``index_pattern``."""
    if not isinstance(mask, fx.Node) or not isinstance(value_of(mask), torch.Tensor):
        return "explicit attn_mask that is not a tensor of the graph"
    if float_term(mask, state) == FLOAT_TERM:
        return FLOAT_TERM
    B, Lq, Lk = sizes
    # a decoding step: the mask of one query, whatever it reads, only says which keys that query sees
    one_query = isinstance(Lq, int) and Lq == 1
    pads, index, causal = [], None, False
    for f in factors(mask, ignore):
        v = value_of(f)
        if not isinstance(v, torch.Tensor) or v.dim() > 4:
            return "explicit attn_mask of more than 4 dimensions"
        shape = (1,) * (4 - v.dim()) + tuple(v.shape)
        per_key = _per_key(shape, B, Lk)
        if one_query and per_key and not v.is_floating_point():
            pads.append(f)
            continue
        if not reads_no_input(f, state, sizes_too=True):  # reads the inputs: key padding, or not readable
            if not per_key:
                return GRAPH_INPUT if per_query_input(f) else "explicit attn_mask that varies per query with " \
                    "the inputs: random-feature attention supports only causal / key padding masks"
            pads.append(f)
            continue
        if not (reads_no_input(f, state) and all(isinstance(s, int) for s in shape + (Lq, Lk))):
            read = _read_for_every_length(f, shape, Lq, Lk, ignore, state)
            if isinstance(read, str):
                return read
            causal = causal or read
            continue
        value = evaluate(f, state)
        if value is None or shape[:2] != (1, 1):
            return "attn_mask built from indices that do not reduce to a causal / padding pattern"
        if not _mask_values(value, ignore):
            return MASK_VALUES
        if one_query and per_key:  # a constant of 0 / 1 or 0 / -inf: padding as any other
            pads.append(f)
            continue
        value = (value != 0).reshape(shape[2:]).expand(Lq, Lk).cpu()
        value = value.logical_not() if ignore else value
        index = value if index is None else index & value
    if index is None or bool(index.all()):
        return pads, causal
    if Lq == Lk and torch.equal(index, torch.ones(Lq, Lk, dtype=torch.bool).tril()):
        return pads, True
    return NEITHER


def per_query_input(n) -> bool:
    """Whether mask ``n`` is an input of the graph (seen through views, casts and MHA's additive form of a bool
    mask) of more than one query row: a mask whose values the compiler cannot see."""
    shape = value_of(n).shape if isinstance(value_of(n), torch.Tensor) else ()
    if not (len(shape) >= 2 and statically_known_true(shape[-2] > 1)):
        return False
    filled = _filled_zeros(n)
    n = _unviewed(n) if filled is None else filled[0]
    return isinstance(n, fx.Node) and n.op == "placeholder"


def read_masks(masks, sizes: tuple, state: State = None) -> Union[Tuple[List[Tuple[fx.Node, bool]], bool], str]:
    """:func:`padding_and_causal` of masks that all apply, ``(mask, ignores)`` each: ``(padding, causal)`` with
    each key padding factor paired with its ``ignores``, and whether one mask is the causal triangle; else the
    first reason one cannot be read."""
    padding, causal = [], False
    for mask, ignores in masks:
        read = padding_and_causal(mask, sizes, ignores, state)
        if isinstance(read, str):
            return read
        padding += [(p, ignores) for p in read[0]]
        causal = causal or read[1]
    return padding, causal


#: why a mask the compiled graph takes as an input stays exact
GRAPH_INPUT = "attn_mask is an input of the compiled graph, so its pattern is unknown when compiling: build the " \
              "mask inside the compiled model (e.g. nn.Transformer.generate_square_subsequent_mask in its forward), " \
              "or pass is_causal=True to the attention call instead of a mask"
#: the report's note on exact attention whose mask was read as the causal triangle alone, now flagged is_causal
CAUSAL_HINT = "its attn_mask, read as the causal triangle, runs as is_causal=True (PyTorch's causal kernel)"
#: why a mask of another index pattern stays exact
NEITHER = "attn_mask is neither causal nor key padding (e.g. a sliding window or a prefix pattern)"
#: why a causal mask of symbolic sizes stays exact when the lengths may differ
UNEQUAL_LENGTHS = "causal attn_mask whose query and key lengths are separate symbolic sizes, not known to be equal: " \
                  "random-feature attention's causal mode needs equal lengths"
#: why a constant mask of other values stays exact
MASK_VALUES = "a constant mask or term added to the scores with values other than 0 / 1 or 0 / -inf (a bias such " \
              "as ALiBi): random-feature attention supports only causal / key padding masks"


def _mask_values(value: torch.Tensor, ignore: bool) -> bool:
    """Whether a mask factor's values say only attend or not: 0 / 1, or where True = ignore also a constant added
    (0 / -inf)."""
    binary, added = ((value == 0) | (value == 1)).all(), ((value == 0) | (value <= MASKED)).all()
    return bool(binary or ignore and added)


def _read_for_every_length(f: fx.Node, shape: tuple, Lq, Lk, ignore: bool, state: State) -> Union[bool, str]:
    """Whether an index factor of symbolic sizes keeps the causal triangle (True) or every key (False), proved for
    every length (:func:`index_pattern.read`); else the reason it stays exact."""
    read = index_pattern.read(f, state or (lambda n: None))
    if not isinstance(read, index_pattern.Pattern):
        return DYNAMIC_MASK
    values = torch.stack([read.hi.double(), read.lo.double()])
    if not _mask_values(values, ignore):
        return MASK_VALUES
    keep_hi, keep_lo = (bool(x != 0) != ignore for x in values)
    if keep_hi and (keep_lo or read.diagonal is None):
        return False
    known = statically_known_true
    if read.diagonal == 0 and keep_hi and not keep_lo and known(shape[2] == Lq) and known(shape[3] == Lk):
        return True if known(Lq == Lk) else UNEQUAL_LENGTHS
    return NEITHER


def key_padding_mask(pads: List[fx.Node], batch, keys, ignores: Sequence[bool]):
    """rf_attention's ``key_padding_mask`` (True = ignore), ``(batch, keys)``, from padding factors, each
    True = keep, or where ``ignores`` says so True = ignore: a key is ignored where any factor ignores it.
    Traced by ``trace_into``, so ``pads`` are proxies there (and the sizes symbolic under dynamic shapes)."""
    mask = None
    for p, ignore in zip(pads, ignores):
        p = torch.atleast_1d(p)  # (B or 1, 1, 1, Lk or 1), flex_attention's (B, Lk), or one scalar
        p = p.reshape(-1, p.shape[-1]).bool()  # a 0/1 integer mask (additive_mask) as well
        p = p if ignore else p.logical_not()
        mask = p if mask is None else mask | p
    return mask.expand(batch, keys)
