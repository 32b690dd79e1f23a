"""Which layers to sketch, and how: plain data shared by the compile backend and ``panther.convert``.

A *policy* answers one question per candidate layer: "replace this layer, and with what?". It sees a
:class:`LayerInfo` (name, kind, shapes, parameter count and FLOPs per call) and returns a
:class:`SketchSpec` to replace the layer or ``None`` to leave it alone. Three spellings are accepted
wherever a policy is expected (``options={"policy": ...}`` of the backend, ``panther.convert``):

* ``None`` — :func:`default_policy`: rewrite a layer only where the sketch at least halves its FLOPs;
* a callable ``LayerInfo -> SketchSpec | None``;
* a dict from :mod:`fnmatch` patterns to a ``SketchSpec`` (or a plain dict of its fields,
  ``{"low_rank": 32}``) or ``"skip"``. A pattern matches a layer when it
  matches its name (the module path, e.g. ``"blocks.*.mlp.fc1"``) or its kind (``"linear"``, ``"conv2d"``,
  ``"attention"``). An exact name always wins; otherwise the *last* matching entry wins, so general
  entries go first and per-layer overrides after them::

      {"linear": SketchSpec(low_rank=32), "head": "skip", "blocks.0.*": SketchSpec(low_rank=64)}

  The value ``"default"`` hands the layer to :func:`default_policy`. Layers no entry matches stay dense.

Per-layer overrides can also be layered on top of any policy with :func:`with_overrides`.

This module also holds the cost model (:func:`sketched_cost`): the parameter and FLOP counts of a layer
before and after sketching, used by the default policy and by the graph diff report.

The accuracy-driven policy :class:`panther.budget.ErrorBudgetPolicy` (and
:func:`panther.budget.error_budget_policy`) can also be imported from here:
``from panther.policy import ErrorBudgetPolicy``.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import operator
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, List, Mapping, Optional, Tuple, Union

__all__ = [
    "LayerInfo",
    "SketchSpec",
    "Policy",
    "KINDS",
    "default_policy",
    "default_spec",
    "resolve_policy",
    "with_overrides",
    "sketched_cost",
    "spec_for_layer",
    "decide",
    "seed_for",
    "layer_seed",
    "MIN_DEFAULT_RANK",
]

#: The layer kinds policies see (``LayerInfo.kind``) and dict policies can use as patterns.
KINDS = ("linear", "conv2d", "attention")
_INITS = ("sketch", "svd")
_KERNEL_FNS = ("softmax", "relu")
#: default_policy leaves linear/conv2d layers dense when the FLOP-halving rank is below this, since a
#: rank-1..7 sketch of a tiny layer saves nothing worth its error.
MIN_DEFAULT_RANK = 8


@dataclass(frozen=True)
class LayerInfo:
    """What a policy knows about one candidate layer (one graph node, or one module for ``convert``).

    ``shapes`` maps role → shape: ``"input"``, ``"weight"``, ``"output"`` for linear / conv2d;
    ``"query"``, ``"key"``, ``"value"`` (B, H, L, d) for attention. ``params`` counts the tensor elements
    the layer owns (weight and bias; for nn.MultiheadAttention its projections), ``flops`` the multiply-add
    FLOPs (2 per MAC) of one call at the traced shapes, or ``None`` when no input shape is known
    (``panther.convert`` without ``example_inputs``). ``extra`` holds kind-specific facts, e.g.
    ``in_features``/``out_features``, ``kernel_size``/``stride``/``groups``, ``num_heads``/``head_dim``/
    ``causal``. For an SDPA call the compile backend could run on its example input, ``output_error(m,
    kernel_fn="softmax", seed=None)`` is the relative error random-feature attention with ``m`` features makes on a
    sample of that input, with the features the layer gets for a spec of that ``m`` and ``seed`` (the default policy leaves attention exact above
    :data:`DEFAULT_MAX_ATTENTION_ERROR`).

    ``name`` is the module path (``"blocks.0.mlp.fc1"``; a module called again appears in compile reports
    as ``name#1``), ``kind`` one of :data:`KINDS`, ``dtype``/``device`` those of the weight, ``has_bias``
    whether the layer adds a bias, ``grad_enabled`` the grad mode at compile/convert time (the backend
    rewrites weight-bearing layers only without grad), ``op`` the op or module class before the rewrite
    (``"nn.Linear"``, ``"torch._C._nn.linear"``, ...).
    """

    name: str
    kind: str
    shapes: Mapping[str, Optional[Tuple[int, ...]]] = field(default_factory=dict)
    dtype: Any = None
    device: Any = None
    params: int = 0
    flops: Optional[int] = None
    has_bias: bool = False
    grad_enabled: bool = False
    op: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SketchSpec:
    """How to sketch one layer.

    * linear / conv2d: ``num_terms`` (L) and ``low_rank`` (k); the layer has 2L branches of rank k.
      ``init``: ``"sketch"`` (random, unbiased; the library's training init) or ``"svd"`` (the best
      approximation of rank ``2*L*k``: the truncated SVD of a linear layer's weight, the top
      singular directions of a conv's reshaped kernel). Left ``None``, it is ``"svd"`` in the compile
      backend, whose rewrites serve inference only, and ``"sketch"`` in ``panther.convert``.
    * attention: ``num_random_features`` (m) and ``kernel_fn`` (``"softmax"`` or ``"relu"``);
      ``causal`` is only read by ``panther.convert`` for nn.MultiheadAttention (the compile backend takes
      causality from the graph; ``convert`` also makes a layer causal that ``example_inputs`` show called
      with ``is_causal=True``).

    A field left ``None`` is filled by :func:`default_spec` for the layer. ``seed`` makes the random draws
    (sketch signs, random features) reproducible: each layer derives its own generator from ``seed`` and
    its name, so the compile backend and ``panther.convert`` draw the same numbers for the same layer.
    ``note`` is shown in the report's note column and ignored by comparisons.

    Raises:
        TypeError: a size or ``seed`` that is not an int, ``causal`` not a bool.
        ValueError: a size ``< 1``, an unknown ``init`` or ``kernel_fn``, ``act_gram`` without
            ``init="svd"``.
    """

    num_terms: Optional[int] = None
    low_rank: Optional[int] = None
    num_random_features: Optional[int] = None
    kernel_fn: str = "softmax"
    init: Optional[str] = None
    causal: bool = False
    seed: Optional[int] = None
    #: free text the graph diff report prints after the spec (e.g. the error-budget policy's predicted
    #: error and saving); not part of the spec's identity.
    note: str = field(default="", compare=False)
    #: with ``init="svd"``, the Gram matrix ``XᵀX`` of calibration inputs (d_in × d_in, or for a conv
    #: the Gram matrix of the unfolded patches) to factorise ``W·G^{1/2}`` instead of ``W`` (see
    #: panther.sketch.factors). Set by the error-budget policy; compared by identity.
    act_gram: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        for key in ("num_terms", "low_rank", "num_random_features"):
            v = getattr(self, key)
            if v is None:
                continue
            try:   # any integer type (numpy's, a 0-dim tensor's .item()), kept as a plain int
                n = operator.index(v)
            except TypeError:
                n = None
            if n is None or isinstance(v, bool):
                raise TypeError(f"SketchSpec.{key} must be a positive int or None, got {v!r}")
            if n < 1:
                raise ValueError(f"SketchSpec.{key} must be a positive int or None, got {v!r}")
            object.__setattr__(self, key, n)
        if self.init is not None and self.init not in _INITS:
            raise ValueError(f"SketchSpec.init must be one of {_INITS} or None, got {self.init!r}")
        if self.kernel_fn not in _KERNEL_FNS:
            raise ValueError(f"SketchSpec.kernel_fn must be one of {_KERNEL_FNS}, got {self.kernel_fn!r}")
        if not isinstance(self.causal, bool):
            raise TypeError(f"SketchSpec.causal must be a bool, got {self.causal!r}")
        if self.act_gram is not None and self.init != "svd":
            raise ValueError(f"SketchSpec.act_gram needs init='svd', got init={self.init!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise TypeError(f"SketchSpec.seed must be an int or None, got {self.seed!r}")

    def replace(self, **changes) -> "SketchSpec":
        """A copy with the given fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


#: The accepted spellings of a ``policy=`` argument are ``None`` (the default policy), a callable
#: ``LayerInfo -> SketchSpec | None``, or a dict of fnmatch patterns to ``SketchSpec`` (or a dict of its fields, ``{"low_rank": 8}``) | ``"skip"`` |
#: ``"default"`` (see the module docstring).
Policy = Union[None, Callable[[LayerInfo], Optional[SketchSpec]], Mapping[str, Union[SketchSpec, Mapping[str, Any], str]]]


# ----------------------------------------------------------------------------------------------------
# cost model (2 FLOPs per multiply-add; bias adds and softmax/feature-map nonlinearities ignored)


def _dims(info: LayerInfo):
    """(d_in, d_out, positions) of a linear or conv2d layer: the equivalent GEMM per output position."""
    e = info.extra
    if info.kind == "linear":
        return e["in_features"], e["out_features"]
    kh, kw = e["kernel_size"]
    return e["in_channels"] // e.get("groups", 1) * kh * kw, e["out_channels"]


def _positions(info: LayerInfo) -> Optional[int]:
    """Rows of the equivalent GEMM: tokens for linear, B*H_out*W_out for conv2d (None if unknown)."""
    if info.flops is None:
        return None
    d_in, d_out = _dims(info)
    return info.flops // (2 * d_in * d_out) if d_in * d_out else 0


def _attention_flops(info: LayerInfo, m: int) -> Optional[int]:
    e = info.extra
    if e.get("batch_heads") is None:
        return None
    bh, lq, lk, d, dv = e["batch_heads"], e["len_q"], e["len_k"], e["head_dim"], e.get("head_dim_v", e["head_dim"])
    # features of q and k (x·Pᵀ), the (m, dv+1) key/value state, and its read-out for every query.
    core = 2 * bh * (lq + lk) * d * m + 2 * bh * lk * m * (dv + 1) + 2 * bh * lq * m * (dv + 1)
    return core + e.get("projection_flops", 0)


def dense_attention_flops(batch_heads, len_q, len_k, head_dim, head_dim_v=None, causal=False) -> int:
    """FLOPs of exact attention: QKᵀ and PV (halved when causal: a fused kernel skips the masked half)."""
    dv = head_dim if head_dim_v is None else head_dim_v
    f = 2 * batch_heads * len_q * len_k * (head_dim + dv)
    return f // 2 if causal else f


def sketched_cost(info: LayerInfo, spec: SketchSpec) -> Tuple[int, Optional[int]]:
    """(params_after, flops_after) of ``info`` sketched as ``spec`` (fields filled by :func:`spec_for_layer`).

    linear: factors S1s, S2s, U1s, U2s hold ``2Lk(d_in+d_out)`` elements; forward = two GEMMs through
    rank 2Lk, ``4NLk(d_in+d_out)`` FLOPs. conv2d: a conv to 2Lk channels plus a 1×1 channel mix.
    attention: the projections are unchanged; the (m, d) random-feature matrix is added.
    """
    spec = spec_for_layer(info, spec)
    bias = info.extra.get("out_features", info.extra.get("out_channels", 0)) if info.has_bias else 0
    if info.kind in ("linear", "conv2d"):
        L, k = spec.num_terms, spec.low_rank
        d_in, d_out = _dims(info)
        if info.kind == "linear":
            params = 2 * L * k * (d_in + d_out) + bias
        else:  # S1s (2Lk, C_in, kh, kw) + U1s (2L, k, C_out)
            params = 2 * L * k * d_in + 2 * L * k * d_out + bias
        n = _positions(info)
        flops = None if n is None else 4 * n * L * k * (d_in + d_out)
        return params, flops
    if info.kind == "attention":
        m = spec.num_random_features
        params = info.params + m * info.extra["head_dim"]
        return params, _attention_flops(info, m)
    raise ValueError(f"LayerInfo.kind must be one of {KINDS}, got {info.kind!r}")


# ----------------------------------------------------------------------------------------------------
# default policy


def _halving_rank(d_in: int, d_out: int) -> int:
    """The largest rank k (num_terms=1) with 4k(d_in+d_out) <= d_in*d_out, i.e. FLOPs at least halved,
    rounded down to a multiple of 8 (friendlier GEMM shapes) when it is at least 8."""
    k = (d_in * d_out) // (4 * (d_in + d_out))
    return k - k % 8 if k >= 8 else k


#: the default policy's largest random-feature count: what panther's fused GPU attention kernels hold
#: (``inductor_ext.triton_attention.MAX_FEATURES``); above it a call falls back on the far slower ATen path
#: (a 4-layer Llama with head_dim 128 took 60 ms at 4·128 = 512 features against 38 ms dense on an H200)
DEFAULT_MAX_FEATURES = 256
#: the default policy leaves attention exact where random features, measured on a sample of the example
#: input (``LayerInfo.extra["output_error"]``), miss its output by more than this (relative)
DEFAULT_MAX_ATTENTION_ERROR = 0.25


def default_spec(info: LayerInfo) -> SketchSpec:
    """The spec :func:`default_policy` would use for ``info`` (ignoring its FLOP threshold).

    linear / conv2d: one term, ``init="svd"``, and the largest rank that halves the FLOPs
    (``k = d_in*d_out / (4(d_in+d_out))`` with d_in = C_in*kh*kw for conv, down to a multiple of 8).
    attention: ``num_random_features = min(4 * head_dim, DEFAULT_MAX_FEATURES)``, softmax kernel.
    """
    if info.kind in ("linear", "conv2d"):
        d_in, d_out = _dims(info)
        return SketchSpec(num_terms=1, low_rank=max(1, _halving_rank(d_in, d_out)), init="svd")
    if info.kind == "attention":
        return SketchSpec(num_random_features=min(4 * info.extra["head_dim"], DEFAULT_MAX_FEATURES), kernel_fn="softmax")
    raise ValueError(f"LayerInfo.kind must be one of {KINDS}, got {info.kind!r}")


def spec_for_layer(info: LayerInfo, spec: SketchSpec, default_init: str = "sketch") -> SketchSpec:
    """``spec`` with its ``None`` fields filled from :func:`default_spec` for this layer, and ``init`` from
    ``default_init``."""
    if info.kind in ("linear", "conv2d"):
        if spec.num_terms is None or spec.low_rank is None:
            d = default_spec(info)
            spec = spec.replace(num_terms=spec.num_terms or d.num_terms, low_rank=spec.low_rank or d.low_rank)
        return spec if spec.init is not None else spec.replace(init=default_init)
    if spec.num_random_features is not None:
        return spec
    return spec.replace(num_random_features=default_spec(info).num_random_features)


def default_policy(info: LayerInfo) -> Optional[SketchSpec]:
    """Rewrite a layer only where the sketch at least halves its FLOPs per call.

    Uses :func:`default_spec` (rank-k SVD for linear/conv2d, 4*head_dim random features, at most 256, for attention)
    and accepts it iff ``2 * flops_after <= flops_before``. Linear and conv2d layers pass when that rank is
    at least ``MIN_DEFAULT_RANK`` = 8 (a 64x64 linear gets rank 8, a 32x32 one stays dense); attention
    passes only for sequences long enough that random features pay off (roughly len >= 4 *
    num_random_features). Layers whose FLOPs are unknown (``panther.convert`` without example inputs) are
    judged per output position for linear / conv2d and left alone for attention.
    """
    spec, reason = _default_decide(info)
    # a callable policy that delegates here returns only the spec; its report row reads the reason back
    _declined_by_default.info, _declined_by_default.reason = info, reason
    return spec


_declined_by_default = threading.local()


def _default_reason_for(info: LayerInfo) -> Optional[str]:
    """The default policy's reason for declining ``info`` if it was the last layer it judged (in this thread)."""
    return getattr(_declined_by_default, "reason", None) if getattr(_declined_by_default, "info", None) is info else None


def _default_decide(info: LayerInfo):
    spec = default_spec(info)
    if info.kind in ("linear", "conv2d"):
        d_in, d_out = _dims(info)
        k = _halving_rank(d_in, d_out)
        if k < MIN_DEFAULT_RANK:
            return None, (f"default policy: too small (the FLOP-halving rank {k} is below {MIN_DEFAULT_RANK})")
        info = dataclasses.replace(info, flops=2 * d_in * d_out)  # per position: the ratio is shape-free
    if info.flops is None:
        return None, "default policy: FLOPs unknown (pass example_inputs to convert)"
    _, after = sketched_cost(info, spec)
    if after is None or 2 * after > info.flops:
        return None, f"default policy: would not halve the FLOPs ({_human(info.flops)} -> {_human(after)})"
    if info.kind == "attention" and "output_error" in info.extra:
        err = info.extra["output_error"](spec.num_random_features, spec.kernel_fn, spec.seed)
        if err > DEFAULT_MAX_ATTENTION_ERROR:
            return None, (f"default policy: random features are inaccurate here (output err {err:.3g} > "
                          f"{DEFAULT_MAX_ATTENTION_ERROR} on the example input: query/key norms too large)")
    return spec, None


def _human(v):
    if v is None:
        return "?"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if v >= scale:
            return f"{v / scale:.3g}{unit}"
    return str(v)


# ----------------------------------------------------------------------------------------------------
# resolving the accepted spellings into one function


def _spec_value(key, value):
    """A dict policy entry as used: a SketchSpec, 'skip' or 'default'; a plain dict of SketchSpec fields
    (``{"low_rank": 8}``) is read as ``SketchSpec(**value)``."""
    if isinstance(value, SketchSpec) or (isinstance(value, str) and value in ("skip", "default")):
        return value
    if isinstance(value, Mapping):
        allowed = [f.name for f in dataclasses.fields(SketchSpec) if f.name != "act_gram"]
        unknown = sorted(str(k) for k in value if k not in allowed)
        if unknown:
            raise TypeError(f"policy[{key!r}] has unknown SketchSpec field(s) {unknown}; allowed: {allowed}")
        return SketchSpec(**value)
    raise TypeError(
        f"policy[{key!r}] must be a SketchSpec, a dict of its fields, 'skip' or 'default', got {value!r} "
        f"({type(value).__name__})"
    )


def _dict_policy(table: Mapping[str, Union[SketchSpec, Mapping[str, Any], str]]):
    for key in table:
        if not isinstance(key, str):
            raise TypeError(f"policy keys must be str fnmatch patterns on layer name or kind, got {key!r}")
    table = {key: _spec_value(key, value) for key, value in table.items()}
    items = list(table.items())

    def decide(info: LayerInfo):
        if info.name in table:
            key, value = info.name, table[info.name]
        else:
            hits = [(k, v) for k, v in items if _entry_matches(k, info.name, info.kind)]
            if not hits:
                return None, "no policy entry matches this layer"
            key, value = hits[-1]
        if value == "skip":
            return None, f"policy: 'skip' (entry {key!r})"
        if value == "default":
            return _default_decide(info)
        return value, None

    return decide


def _entry_matches(key: str, name: str, kind: str) -> bool:
    """Whether a dict policy entry applies to a layer: its exact name, or an fnmatch pattern on its name or kind."""
    return key == name or fnmatch.fnmatchcase(name, key) or fnmatch.fnmatchcase(kind, key)


def unmatched_entries(table: Mapping[str, Any], layers) -> List[str]:
    """The keys of a dict policy that match none of ``layers`` (``(name, kind)`` pairs) by the rules of
    :func:`resolve_policy`: most likely a typo, which would otherwise leave layers silently dense."""
    return [k for k in table if not any(_entry_matches(k, name, kind) for name, kind in layers)]


def resolve_policy(policy: Policy):
    """Turn any accepted policy spelling into ``decide(info) -> (spec | None, reason | None)``.

    ``reason`` explains a refusal (it is ``None`` when a spec is returned). An object with a
    ``panther_decide(info) -> (spec | None, reason | None)`` method is used through that method. Raises TypeError for anything
    that is not None, a callable or a dict.
    """
    if getattr(policy, "__panther_decide__", False):
        return policy
    if callable(getattr(policy, "panther_decide", None)):
        # a policy object that can also say why it declines (e.g. panther.policy.ErrorBudgetPolicy)
        method = policy.panther_decide
        return _resolved(lambda info: method(info))
    if policy is None:
        return _resolved(_default_decide)
    if isinstance(policy, Mapping):
        return _resolved(_dict_policy(policy))
    if callable(policy):
        def decide(info):
            spec = policy(info)
            if spec is None:
                return None, _default_reason_for(info) or "policy returned None"
            if spec == "skip":
                return None, "policy: 'skip'"
            if not isinstance(spec, SketchSpec):
                raise TypeError(
                    f"policy returned {spec!r} for layer {info.name!r}; a policy must return a SketchSpec, None or 'skip'"
                )
            return spec, None

        return _resolved(decide)
    raise TypeError(
        f"policy must be None (default policy), a callable LayerInfo -> SketchSpec | None, or a dict of "
        f"fnmatch patterns to SketchSpec (or a dict of its fields) | 'skip'; got {type(policy).__name__}"
    )


def with_overrides(policy: Policy, overrides: Mapping[str, Union[SketchSpec, str]]):
    """A policy that consults ``overrides`` (dict spelling, names or kinds) first and ``policy`` otherwise."""
    base = resolve_policy(policy)
    over = _dict_policy(overrides)

    def decide(info):
        spec, reason = over(info)
        if spec is None and reason == "no policy entry matches this layer":
            return base(info)
        return spec, reason

    return _resolved(decide)


def _resolved(fn):
    fn.__panther_decide__ = True  # already in (spec, reason) form
    return fn


def decide(policy, info: LayerInfo, default_init: str = "sketch"):
    """(spec filled for the layer | None, reason | None) for ``policy`` (any spelling, or a resolved one);
    an ``init`` left ``None`` becomes ``default_init``."""
    spec, reason = resolve_policy(policy)(info)
    if spec is None:
        return None, reason
    return spec_for_layer(info, spec, default_init), None


def seed_for(spec: SketchSpec, name: str) -> Optional[int]:
    """Per-layer seed derived from ``spec.seed`` and the layer name (stable across processes)."""
    return layer_seed(spec.seed, name)


def layer_seed(seed: Optional[int], name: str) -> Optional[int]:
    """:func:`seed_for` from a spec's ``seed`` alone."""
    if seed is None:
        return None
    import zlib

    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)



def __getattr__(name):
    # The error-budget policy lives in panther.budget (it runs models and needs torch); re-exported here
    # lazily so that this module stays plain data.
    if name in ("ErrorBudgetPolicy", "error_budget_policy"):
        from . import budget

        return getattr(budget, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
