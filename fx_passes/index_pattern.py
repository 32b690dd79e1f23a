"""A mask built from index ranges and symbolic sizes, read for every length at once.

Under dynamic shapes a mask factor such as Hugging Face's ``kv_idx <= q_idx`` (``arange`` of a symbolic length)
cannot be evaluated once and stand for every length: a sliding window, say, looks causal at any length shorter
than the window. This reads such a factor symbolically instead, as a proof over all sizes the graph allows:

* an integer tensor built from ``arange`` is a :class:`Linear` form of its indices along its dimensions
  (``arange(L)[:, None] + past`` is ``i + past`` along dimension -2);
* every other tensor is a :class:`Pattern` of its last two dimensions (query ``i``, key ``j``): one value where
  ``j - i <= diagonal`` and another elsewhere, or one value everywhere (``diagonal`` None). Comparing linear forms
  gives such a pattern (``kv_idx <= q_idx`` is ``j - i <= 0``), as do ``tril`` / ``triu`` of a constant and a
  module buffer that is a triangle; elementwise ops apply to the two values, as the graph applies them, and views
  that keep the last two dimensions keep the pattern.

Anything else (an index of a third dimension, a band, a slice that shifts the diagonal) is not read: None.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple, Union

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true as known

Size = Union[int, torch.SymInt]


@dataclass(frozen=True)
class Linear:
    """An integer tensor whose value at an index is ``sum(coef * index[axis]) + const`` (axes counted from the end)."""
    coefs: Tuple[Tuple[int, int], ...]  # (axis < 0, coefficient != 0), sorted
    const: Size = 0

    def coef(self, axis: int) -> int:
        return dict(self.coefs).get(axis, 0)

    def plus(self, other: "Linear", sign: int = 1) -> "Linear":
        coefs = dict(self.coefs)
        for axis, c in other.coefs:
            coefs[axis] = coefs.get(axis, 0) + sign * c
        return Linear(_sorted(coefs), self.const + sign * other.const)

    def times(self, k: int) -> "Linear":
        return Linear(_sorted({a: c * k for a, c in self.coefs}), self.const * k)


@dataclass(frozen=True)
class Pattern:
    """A tensor that is ``hi`` where ``j - i <= diagonal`` over its last two dimensions and ``lo`` elsewhere; ``hi``
    everywhere when ``diagonal`` is None. ``hi`` and ``lo`` are 0-d tensors of the tensor's dtype."""
    diagonal: Optional[int]
    hi: torch.Tensor
    lo: torch.Tensor


Value = Union[Linear, Pattern]


def _sorted(coefs: Dict[int, int]) -> Tuple[Tuple[int, int], ...]:
    return tuple(sorted((a, c) for a, c in coefs.items() if c != 0))


def _pattern(diagonal: Optional[int], hi, lo) -> Pattern:
    hi, lo = torch.as_tensor(hi), torch.as_tensor(lo)
    same = diagonal is None or (hi.dtype == lo.dtype and torch.equal(hi, lo))
    return Pattern(None, hi, hi) if same else Pattern(diagonal, hi, lo)


def constant(value) -> Pattern:
    return _pattern(None, value, value)


def _shape(n) -> Optional[tuple]:
    v = n.meta.get("example_value") if isinstance(n, fx.Node) else None
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def _dtype(n) -> torch.dtype:
    return n.meta["example_value"].dtype


# elementwise ops: applied to a pattern's two values as the graph applies them to the tensor
_ELEMENTWISE_FUNCTIONS = {
    operator.and_, operator.or_, operator.xor, operator.invert, operator.eq, operator.ne, operator.add, operator.sub,
    operator.mul, operator.truediv, operator.neg, operator.lt, operator.le, operator.gt, operator.ge,
    torch.where, torch.logical_and, torch.logical_or, torch.logical_xor, torch.logical_not, torch.bitwise_and,
    torch.bitwise_or, torch.bitwise_not, torch.eq, torch.ne, torch.lt, torch.le, torch.gt, torch.ge, torch.add,
    torch.sub, torch.mul, torch.rsub, torch.masked_fill}
_ELEMENTWISE_METHODS = {
    "__and__", "__or__", "__xor__", "__invert__", "__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__",
    "logical_and", "logical_or", "logical_xor", "logical_not", "bitwise_and", "bitwise_or", "bitwise_not", "eq",
    "ne", "lt", "le", "gt", "ge", "add", "sub", "mul", "neg", "masked_fill", "bool", "float", "half", "bfloat16",
    "double", "long", "int", "type"}
# integer comparisons as ``form <= 0`` of ``a - b``: (sign of the difference, what is added)
_COMPARISONS = {"le": (1, 0), "lt": (1, 1), "ge": (-1, 0), "gt": (-1, 1)}
_COMPARE = {operator.le: "le", operator.lt: "lt", operator.ge: "ge", operator.gt: "gt", torch.le: "le",
            torch.lt: "lt", torch.ge: "ge", torch.gt: "gt", "le": "le", "lt": "lt", "ge": "ge", "gt": "gt",
            "__le__": "le", "__lt__": "lt", "__ge__": "ge", "__gt__": "gt"}
# shape-only ops that keep the last two dimensions where they are (``expand`` may only broadcast size-1 ones)
_SAME_VALUES = {"expand", "expand_as", "contiguous", "clone"}
# creations of one value everywhere: their fill, from (args, kwargs)
_FILLS: Dict[object, Callable] = {
    torch.ones: lambda a, k: 1, torch.zeros: lambda a, k: 0,
    torch.full: lambda a, k: a[1] if len(a) > 1 else k["fill_value"],
    torch.ones_like: lambda a, k: 1, torch.zeros_like: lambda a, k: 0,
    "new_ones": lambda a, k: 1, "new_zeros": lambda a, k: 0,
    "new_full": lambda a, k: a[2] if len(a) > 2 else k["fill_value"]}


def read(node: fx.Node, buffer_value: Callable[[fx.Node], Optional[torch.Tensor]], *,
         leaves: Optional[Dict[fx.Node, Value]] = None, grid: Optional[Tuple[Size, Size]] = None) -> Optional[Value]:
    """``node``'s value as a :class:`Linear` form or a :class:`Pattern`, for every size; None when it is neither
    or cannot be read. Its inputs may only be sizes, module buffers (``buffer_value``), constants and ``leaves``
    (nodes whose value is given). With ``grid`` ``(Lq, Lk)``, every value stands for the whole query × key grid
    (a ``flex_attention`` mask_mod, which computes one element from the scalar indices ``leaves`` stand for)."""
    env: Dict[fx.Node, object] = dict(leaves or {})

    def value(a):
        if not isinstance(a, fx.Node):
            return a
        if a not in env:
            shape = (1, 1) + tuple(grid) if grid is not None else _shape(a)
            env[a] = _checked(shape, _read(a, value, buffer_value, shape))
        return env[a]

    try:
        out = value(node)
    except Exception:  # noqa: BLE001 - an op this cannot follow on 0-d values (or on sizes) is not read
        return None
    return out if isinstance(out, (Linear, Pattern)) else None


class _Unread(Exception):
    pass


def _checked(shape: Optional[tuple], v):
    """``v`` for a node of ``shape``, once its dimensions are checked: a varying index or diagonal needs a dimension
    that is not of size 1, else broadcasting it would repeat one row instead of varying along it."""
    if isinstance(v, Linear):
        if shape is None or any(-a > len(shape) or not known(shape[a] > 1) for a, _ in v.coefs):
            raise _Unread
    elif isinstance(v, Pattern) and v.diagonal is not None:
        if shape is None or len(shape) < 2 or not (known(shape[-1] > 1) and known(shape[-2] > 1)):
            raise _Unread
    return v


def _read(n: fx.Node, value, buffer_value, shape: Optional[tuple]):
    example = n.meta.get("example_value")
    if isinstance(example, (int, torch.SymInt)):
        return example  # a size, or arithmetic on sizes
    if n.op in ("placeholder", "get_attr"):
        buffer = buffer_value(n)
        if buffer is None:
            raise _Unread
        return _triangle(buffer)
    if n.op not in ("call_function", "call_method"):
        raise _Unread
    target, args = n.target, n.args
    if target in _FILLS:
        fill = _FILLS[target](args, n.kwargs)
        fill = value(fill)
        if isinstance(fill, (Linear, Pattern)) and not (isinstance(fill, Pattern) and fill.diagonal is None):
            raise _Unread
        return constant(torch.tensor(fill.hi if isinstance(fill, Pattern) else fill, dtype=_dtype(n)))
    if target is torch.arange:
        bounds = [value(a) for a in args]  # (end), (start, end) or (start, end, step); the end is the size
        start = bounds[0] if len(bounds) > 1 else value(n.kwargs.get("start", 0))
        step = bounds[2] if len(bounds) > 2 else n.kwargs.get("step", 1)
        if not isinstance(step, int) or isinstance(start, (Linear, Pattern)):
            raise _Unread
        return Linear(_sorted({-1: step}), start)
    if target in ("tril", "triu", torch.tril, torch.triu, "tril_", "triu_"):
        x = value(args[0])
        d = args[1] if len(args) > 1 else n.kwargs.get("diagonal", 0)
        if not (isinstance(x, Pattern) and x.diagonal is None and isinstance(d, int)):
            raise _Unread
        zero = torch.zeros((), dtype=x.hi.dtype)
        lower = target in ("tril", "tril_", torch.tril)  # keeps j - i <= d; triu keeps j - i >= d
        return _pattern(d, x.hi, zero) if lower else _pattern(d - 1, zero, x.hi)
    if target in (torch.cat, torch.hstack, torch.concat, torch.concatenate):
        return _concatenation(n, value)
    if target is operator.getitem:
        return _index(n, value(args[0]), args[1])
    if target in ("unsqueeze", torch.unsqueeze):
        x, dim = value(args[0]), args[1] if len(args) > 1 else n.kwargs["dim"]
        if not (dim == -1 or dim >= 0):
            raise _Unread
        return _index(n, x, (Ellipsis, None) if dim == -1 else (slice(None),) * dim + (None,))
    if target in ("view", "reshape", torch.reshape):
        return _reshaped(n, value(args[0]))
    if target in _SAME_VALUES or target in ("to", "type_as") and not _casts(n):
        return value(args[0])  # a varying dimension is never of size 1 (_checked): only others broadcast
    if target in _COMPARE:
        a, b = value(args[0]), value(args[1])
        if isinstance(a, Linear) or isinstance(b, Linear):
            return _compare(shape, a, b, _COMPARE[target])
    if target in ("add", "sub", operator.add, operator.sub, torch.add, torch.sub, operator.mul, torch.mul, "mul",
                  operator.neg, "neg"):
        operands = [value(a) for a in args]
        if any(isinstance(a, Linear) for a in operands):
            return _arithmetic(target, operands)
    if target in _ELEMENTWISE_FUNCTIONS or target in _ELEMENTWISE_METHODS or target in ("to", "type_as"):
        return _elementwise(n, value)
    raise _Unread


def _reshaped(n: fx.Node, x) -> Value:
    """A view or reshape that keeps the last two dimensions (nn.MultiheadAttention's ``view(1, 1, L, S)`` of a
    mask) keeps every element's query and key index; one value everywhere stays so under any reshape."""
    if isinstance(x, Pattern) and x.diagonal is None:
        return x
    before, after = _shape(n.args[0]), _shape(n)
    if before is None or after is None or min(len(before), len(after)) < 2 or not (
            known(before[-1] == after[-1]) and known(before[-2] == after[-2])):
        raise _Unread
    if isinstance(x, Linear) and any(axis < -2 for axis, _ in x.coefs):
        raise _Unread
    return x


def _casts(n: fx.Node) -> bool:
    """Whether a ``to`` / ``type_as`` call changes the dtype (else it only moves the tensor)."""
    return n.meta["example_value"].dtype != n.args[0].meta["example_value"].dtype


def _triangle(buffer: torch.Tensor) -> Pattern:
    """A module buffer as a pattern: one value, or the lower or upper triangle of its last two dimensions (minGPT's
    ``bias``, whisper's ``mask``), whose top-left slices keep that pattern."""
    t = buffer.detach().cpu()
    if t.numel() and bool((t == t.reshape(-1)[0]).all()):
        return constant(t.reshape(-1)[0])
    if t.dim() < 2 or any(s != 1 for s in t.shape[:-2]):
        raise _Unread
    t = t.reshape(t.shape[-2:])
    values = t.unique()
    if len(values) != 2:
        raise _Unread
    for hi, lo in ((values[0], values[1]), (values[1], values[0])):
        for d in (-1, 0, 1):
            lower = torch.ones(t.shape, dtype=torch.bool).tril(d)
            if torch.equal(t, torch.where(lower, hi, lo)):
                return _pattern(d, hi, lo)
    raise _Unread


def _concatenation(n: fx.Node, value) -> Value:
    """``cat`` / ``hstack`` of which every part but one is empty along the joined dimension (Meta's Llama joins
    an empty ``(L, 0)`` block of cached positions)."""
    parts = n.args[0]
    shape = _shape(n)
    if n.target is torch.hstack:
        dim = 1 if shape is not None and len(shape) > 1 else 0
    else:
        dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
    kept = [p for p in parts if not (_shape(p) is not None and known(_shape(p)[dim] == 0))]
    if len(kept) != 1:
        raise _Unread
    return value(kept[0])


def _index(n: fx.Node, x, index) -> Value:
    """``x[index]`` for an index of ``None``, ``...`` and whole slices ``[:end]`` (which keep the indices of the
    elements they keep)."""
    shape, before = _shape(n), _shape(n.args[0])
    if shape is None or before is None:
        raise _Unread
    index = index if isinstance(index, tuple) else (index,)
    if isinstance(x, Pattern) and x.diagonal is None:
        if not all(i is None or i is Ellipsis or isinstance(i, (slice, int)) for i in index):
            raise _Unread
        return x
    explicit = sum(1 for i in index if i is not None and i is not Ellipsis)
    if explicit > len(before):
        raise _Unread
    axes, src, out = {}, 0, 0  # input dimension (from the start) -> output dimension
    for i in index:
        if i is None:
            out += 1
        elif i is Ellipsis:
            for _ in range(len(before) - explicit):
                axes[src] = out
                src, out = src + 1, out + 1
        elif isinstance(i, slice) and i.start in (None, 0) and i.step in (None, 1):
            axes[src] = out
            src, out = src + 1, out + 1
        else:
            raise _Unread  # an integer, a shifted slice or a tensor of indices
    while src < len(before):
        axes[src] = out
        src, out = src + 1, out + 1
    moved = {a: axes[a + len(before)] - len(shape) for a in range(-len(before), 0)}
    if isinstance(x, Pattern):
        if moved.get(-1) != -1 or moved.get(-2) != -2:
            raise _Unread
        return x
    if not isinstance(x, Linear):
        raise _Unread
    return Linear(_sorted({moved[a]: c for a, c in x.coefs}), x.const)


def _arithmetic(target, operands) -> Linear:
    """A linear form plus, minus or times (an integer) a linear form or a size."""
    def linear(a):
        if isinstance(a, Linear):
            return a
        if isinstance(a, (int, torch.SymInt)) and not isinstance(a, bool):
            return Linear((), a)
        raise _Unread

    if target in (operator.neg, "neg"):
        return linear(operands[0]).times(-1)
    if target in (operator.mul, torch.mul, "mul"):
        a, b = operands[:2]
        a, k = (a, b) if isinstance(a, Linear) else (b, a)
        if not isinstance(k, int) or isinstance(k, bool):
            raise _Unread
        return a.times(k)
    a, b = (linear(o) for o in operands[:2])
    return a.plus(b, -1 if target in ("sub", operator.sub, torch.sub) else 1)


def _compare(shape: Optional[tuple], a, b, how: str) -> Pattern:
    """A comparison of linear forms over the last two dimensions, ``alpha * i + beta * j + c <= 0``: one value
    everywhere when that holds (or fails) at every index, else ``j - i`` against a diagonal."""
    if isinstance(a, Pattern) or isinstance(b, Pattern):
        raise _Unread
    sign, add = _COMPARISONS[how]
    form = _arithmetic(operator.sub, [a, b]).times(sign)
    form = Linear(form.coefs, form.const + add)
    if any(axis < -2 for axis, _ in form.coefs):
        raise _Unread  # varies along a batch or head dimension
    alpha, beta, c = form.coef(-2), form.coef(-1), form.const
    size = {a: shape[a] if shape is not None and len(shape) >= -a else 1 for a in (-2, -1)}
    highest = c + max(alpha, 0) * (size[-2] - 1) + max(beta, 0) * (size[-1] - 1)
    lowest = c + min(alpha, 0) * (size[-2] - 1) + min(beta, 0) * (size[-1] - 1)
    true, false = torch.tensor(True), torch.tensor(False)
    if known(highest <= 0):
        return constant(true)
    if known(lowest > 0):
        return constant(false)
    if alpha != -beta or not isinstance(c, int):
        raise _Unread  # not a diagonal (a band needs two comparisons; each is read alone)
    if beta > 0:  # j - i <= -c / beta
        return _pattern((-c) // beta, true, false)
    # (-beta) * (i - j) + c <= 0: j - i >= c / -beta, i.e. not j - i <= ceil(c / -beta) - 1
    return _pattern(-((-c) // -beta) - 1, false, true)


def _elementwise(n: fx.Node, value) -> Pattern:
    """The node's own op applied to its pattern arguments' two values (0-d tensors) and its other arguments."""
    diagonals = set()

    def collect(a):
        v = value(a)
        if isinstance(v, Linear):
            raise _Unread
        if isinstance(v, Pattern) and v.diagonal is not None:
            diagonals.add(v.diagonal)

    fx.node.map_arg((n.args, n.kwargs), collect)
    if len(diagonals) > 1:
        raise _Unread  # two different diagonals: a band or a shifted triangle

    def on(which: str):
        def pick(a):
            v = value(a)
            return getattr(v, which) if isinstance(v, Pattern) else v
        args, kwargs = fx.node.map_arg((n.args, n.kwargs), pick)
        kwargs = {k: v for k, v in kwargs.items() if k not in ("device", "non_blocking", "copy")}
        if n.target in ("to", "type_as"):
            return args[0].to(n.meta["example_value"].dtype)
        if n.op == "call_method":
            return getattr(args[0], n.target)(*args[1:], **kwargs)
        return n.target(*args, **kwargs)

    diagonal = diagonals.pop() if diagonals else None
    return _pattern(diagonal, on("hi"), on("lo") if diagonal is not None else on("hi"))
