"""An accuracy-aware policy: give an error budget, get the cheapest sketch per layer that meets it.

:class:`ErrorBudgetPolicy` runs the model on calibration inputs once, with forward hooks that keep only
the Gram matrix ``G = XᵀX`` (plus the row count and the column sums) of each linear / conv2d layer's
input ``X`` (for a conv, the unfolded patches). From one SVD of each weight it then knows the relative
output error of *every* rank at once, and picks, per layer, the smallest rank whose predicted error on
the calibration activations stays within ``budget``:

* ``init="svd"`` (rank-r truncation ``W_r``): with ``W = U diag(s) Vᵀ``,
  ``‖X(W − W_r)ᵀ‖² = Σ_{i≥r} s_i² · v_iᵀ G v_i`` — exact, because the left singular vectors are orthonormal.
* ``init="sketch"`` (the random, unbiased estimator): the *expected* squared error over the draw has a
  closed form in ``G`` and ``W`` (see :func:`_sketch_sq_error`); it falls only like ``1/rank``, so this init
  meets a tight budget only on layers where nothing is saved — the policy reports that honestly.

The relative error is ``‖Ŷ − Y‖_F / ‖Y‖_F`` over all calibration rows, ``Y = XWᵀ + b`` being the dense
layer's output (bias included). The policy is a plain callable ``LayerInfo -> SketchSpec | None`` keyed by
layer name, so it plugs into ``panther.convert(model, policy)`` and ``torch.compile(model,
backend="panther", options={"policy": policy})`` alike; every accepted spec carries a ``note`` with the
predicted error and FLOP saving, which the graph diff report prints, and every refusal a reason.

* ``init="svd_act"`` (default, activation-weighted): the best rank-r map *for these inputs* is
  ``Ŵ = P_r W``, ``P_r`` projecting on the top-r left singular vectors of ``W G^{1/2}``; its error is
  ``Σ_{i≥r} σ_i(W G^{1/2})²`` (exact). The spec carries ``act_gram=G`` and ``panther.sketch`` builds those
  factors. It never does worse than plain SVD and, on trained layers whose inputs fill only part of the
  space, far better (docs/error-budget.md has the numbers).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from ._progress import progress as _progress
from .conversion import call_with, is_conv1d
from .policy import LayerInfo, SketchSpec, _dims, sketched_cost
from .report import module_of

__all__ = ["ErrorBudgetPolicy", "error_budget_policy", "LayerStats", "LayerChoice", "collect_stats",
           "is_conv1d", "relative_output_errors"]


def _layer_kind(m: nn.Module) -> Optional[str]:
    if parametrize.is_parametrized(m, "weight"):
        return None  # convert keeps such layers; reading the weight could even update them (spectral_norm)
    if isinstance(m, nn.Linear) or is_conv1d(m):
        return "linear"
    if isinstance(m, nn.Conv2d) and m.groups == 1 and m.padding_mode == "zeros":
        return "conv2d"
    return None


def _weight2d(m: nn.Module) -> torch.Tensor:
    """The layer as a (d_out, d_in) matrix acting on rows ``x`` as ``x Wᵀ`` (conv: on unfolded patches)."""
    w = m.weight.detach()
    if is_conv1d(m):
        return w.mT
    return w.reshape(w.shape[0], -1)


@dataclass
class LayerStats:
    """Calibration statistics of one layer's input rows X (N, d_in): ``gram = XᵀX``, ``colsum = 1ᵀX``."""

    kind: str
    rows: int
    gram: torch.Tensor  # float64 (d_in, d_in)
    colsum: torch.Tensor  # float64 (d_in,)


@dataclass
class LayerChoice:
    """What the policy decided for one layer (``spec`` is None when it stays dense, then ``reason`` says why)."""

    name: str
    kind: str
    spec: Optional[SketchSpec]
    rank: Optional[int]
    predicted_error: Optional[float]
    flop_saving: Optional[float]  # 1 - flops_after / flops_before
    reason: str = ""


# ------------------------------------------------------------------------------------------------------
# calibration


def _tokens(t: torch.Tensor) -> torch.Tensor:
    """A nested tensor (nn.TransformerEncoder packs a padded batch so in eval mode) as the rows of its real
    tokens; any other tensor as it is."""
    return torch.cat([u.reshape(-1, u.shape[-1]) for u in t.unbind()]) if t.is_nested else t


@torch.no_grad()
def collect_stats(model: nn.Module, calibration, *, progress=None) -> Dict[str, LayerStats]:
    """Run ``calibration`` through ``model`` (eval mode, no grad) and return each layer's input statistics.

    ``calibration``: a tensor (one batch), an iterable of batches (tensor, tuple of positional args or
    mapping of keyword args), or a callable ``fn(model)`` that runs the model itself. Only the Gram matrix
    of each linear / conv2d layer's input is kept (``d_in²`` numbers per layer, accumulated in float64).
    """
    stats: Dict[str, LayerStats] = {}
    hooks = []

    def make_hook(name, m, kind):
        def hook(mod, args):
            x = args[0] if args else None
            if not isinstance(x, torch.Tensor):
                return
            x = _tokens(x)
            if kind == "conv2d":
                x = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)
                x = x.transpose(1, 2)  # (B, positions, C_in*kh*kw): channel-major, as weight.reshape(C_out, -1)
            x = x.reshape(-1, x.shape[-1]).to(torch.float64)
            s = stats.get(name)
            if s is None:
                d = x.shape[1]
                s = stats[name] = LayerStats(kind, 0, x.new_zeros(d, d), x.new_zeros(d))
            s.rows += x.shape[0]
            s.gram += x.mT @ x
            s.colsum += x.sum(0)

        return hook

    for name, m in model.named_modules():
        kind = _layer_kind(m)
        if kind is not None:
            hooks.append(m.register_forward_pre_hook(make_hook(name, m, kind)))
    modes = {m: m.training for m in model.modules()}
    batches = None
    is_batches = isinstance(calibration, (torch.Tensor, Mapping)) or hasattr(calibration, "__iter__")
    if not (is_batches or callable(calibration)) or isinstance(calibration, (str, bytes)):
        raise TypeError("calibration must be a tensor (one batch), an iterable of batches (tensors, tuples of "
                        f"arguments or mappings of keyword arguments) or a callable fn(model); got "
                        f"{type(calibration).__name__}")
    if not callable(calibration) or isinstance(calibration, nn.Module):
        batches = [calibration] if isinstance(calibration, (torch.Tensor, Mapping)) else calibration
    bar = _progress(total=len(batches) if hasattr(batches, "__len__") else None, desc="panther calibration",
                    enabled=progress, unit="batch")
    try:
        model.eval()
        if batches is None:
            calibration(model)
            bar.update()
        else:
            for batch in batches:
                call_with(model, batch)
                bar.update()
    finally:
        bar.close()
        for h in hooks:
            h.remove()
        for m, t in modes.items():
            m.training = t
    if not stats:
        raise ValueError("calibration ran no linear / conv2d layer of the model (check the calibration inputs)")
    return stats


# ------------------------------------------------------------------------------------------------------
# error curves (squared absolute errors; index r = the error at rank r, r = 0..min(d_out, d_in))


def _svd_curve(W: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """``e[r] = ‖X(W − W_r)ᵀ‖²`` for every rank r, from one SVD of W: Σ_{i≥r} s_i² v_iᵀ G v_i."""
    _, s, Vh = torch.linalg.svd(W, full_matrices=False)
    per = s**2 * ((Vh @ G) * Vh).sum(1)  # s_i² v_iᵀ G v_i
    tail = per.flip(0).cumsum(0).flip(0)
    return torch.cat([tail, tail.new_zeros(1)]).clamp_min(0)


def _weighted_curve(W: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """``e[r] = min over rank-r Ŵ of ‖X(W − Ŵ)ᵀ‖²`` = Σ_{i≥r} σ_i(W G^{1/2})² (the activation-weighted optimum)."""
    evals, evecs = torch.linalg.eigh(G)
    root = (evecs * evals.clamp_min(0).sqrt()) @ evecs.mT
    sig = torch.linalg.svdvals(W @ root)
    tail = (sig**2).flip(0).cumsum(0).flip(0)
    return torch.cat([tail, tail.new_zeros(1)])


def _sketch_sq_error(W: torch.Tensor, G: torch.Tensor, kind: str) -> float:
    """``c`` such that the expected squared output error of ``init="sketch"`` at rank L·k is ``c / (L·k)``.

    linear: Ŵᵀ = 1/(2L) Σ_i [Wᵀ A_i + B_i Wᵀ] with independent A_i = U1ᵢᵀU1ᵢ, B_i = U2ᵢU2ᵢᵀ (±1/√k signs,
    mean I). For a sign sketch E‖P(ssᵀ−I)Q‖² = tr(PᵀP)tr(QQᵀ) + tr(PᵀP QQᵀ) − 2 Σ_a (PᵀP)_aa (QQᵀ)_aa,
    which gives (d_out−1)‖XWᵀ‖² for the A side and tr(G)‖W‖² + tr(G WᵀW) − 2 Σ_a G_aa ‖W_{:,a}‖² for the B
    side, each divided by k and by 4L (2L branch averages of L independent terms each).
    conv2d: 2L one-sided terms of rank k: (C_out − 1)‖XWᵀ‖² / (2Lk).
    """
    d_out = W.shape[0]
    out_sq = ((W @ G) * W).sum()  # ‖XWᵀ‖² = tr(W G Wᵀ)
    if kind == "conv2d":
        return float((d_out - 1) * out_sq / 2)
    WtW = W.mT @ W
    b_side = torch.trace(G) * (W**2).sum() + (G * WtW).sum() - 2 * (torch.diagonal(G) * torch.diagonal(WtW)).sum()
    return float(((d_out - 1) * out_sq + b_side) / 4)


def _output_sq_norm(W, bias, st: LayerStats) -> float:
    """‖XWᵀ + 1bᵀ‖² from the statistics."""
    sq = ((W @ st.gram) * W).sum()
    if bias is not None:
        b = bias.detach().to(torch.float64).reshape(-1)
        sq = sq + 2 * b @ (W @ st.colsum) + st.rows * (b @ b)
    return float(sq)


# ------------------------------------------------------------------------------------------------------
# the policy


class ErrorBudgetPolicy:
    """Per layer, the cheapest ``SketchSpec`` whose relative output error on the calibration inputs is
    at most ``budget``.

    Args:
        model: the dense model (not modified; run once on ``calibration`` in eval mode under no_grad).
        calibration: a tensor, an iterable of batches (tensor / tuple of args / mapping of kwargs, e.g. a
            tokenizer's output), or a callable ``fn(model)``; see :func:`collect_stats`.
        budget: allowed relative output error ``‖Ŷ − Y‖/‖Y‖`` of each layer (0 < budget < 1), or a dict
            of fnmatch patterns on layer names -> budget (last match wins; unmatched layers stay dense).
        init: ``"svd_act"`` (default: SVD of ``W·G^{1/2}``, the best rank-r layer for the calibration
            activations; specs carry ``act_gram``), ``"svd"`` (truncated SVD of W), ``"sketch"`` (the
            random init; expected errors) or ``"auto"`` (the cheapest of the three within budget).
        min_saving: accept a layer only when the sketch removes at least this fraction of its FLOPs
            (default 0.2: smaller savings rarely pay for a second GEMM launch).
        headroom: aim for ``headroom * budget`` on the calibration inputs (default 0.9), so that the error
            on unseen inputs, which fluctuates around the calibration error, still stays within budget.
        min_rows_per_dim: ``"svd_act"`` fits the subspace the calibration rows span, so with few rows it
            overfits them (a layer fed 16 pooled vectors of width 256 gets a rank-3 map that is exact on
            those 16 and poor on the next); layers with fewer than ``min_rows_per_dim * d_in`` calibration
            rows fall back to plain ``"svd"`` (default 4).
        progress: None (a tqdm bar on an interactive terminal only; never in CI, pipes or under pytest),
            True or False (see :func:`panther._progress.progress`).
        seed: passed on to every spec (reproducible random draws for ``init="sketch"``).

    Use it wherever a policy goes: ``panther.convert(model, policy)`` or
    ``torch.compile(model, backend="panther", options={"policy": policy})``. ``policy.choices`` holds a
    :class:`LayerChoice` per calibrated layer; ``policy.curve(name)`` the relative error of every rank.

    Attention layers get the fewest random features (:data:`ATTENTION_FEATURES`) whose output error,
    measured on the example input where the compile backend (or ``convert`` with ``example_inputs``) ran
    the model, is within ``headroom * budget``; they are not calibrated.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``; ``calibration`` none of the accepted kinds.
        ValueError: a budget outside ``(0, 1)``, an unknown ``init``, ``min_saving`` outside ``[0, 1)``,
            ``headroom`` outside ``(0, 1]``, ``min_rows_per_dim`` below 0, or calibration that runs no linear /
            conv2d layer.
    """

    def __init__(self, model: nn.Module, calibration, budget=0.05, *, init: str = "svd_act",
                 min_saving: float = 0.2, headroom: float = 0.9, min_rows_per_dim: float = 4.0,
                 progress: Optional[bool] = None,
                 seed: Optional[int] = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if isinstance(budget, dict):
            for k, v in budget.items():
                _check_budget(v, f"budget[{k!r}]")
        else:
            _check_budget(budget, "budget")
        if init not in _POLICY_INITS:
            raise ValueError(f"init must be one of {_POLICY_INITS}, got {init!r}")
        if not isinstance(min_saving, (int, float)) or not 0 <= min_saving < 1:
            raise ValueError(f"min_saving must be a number in [0, 1), got {min_saving!r}")
        if isinstance(headroom, bool) or not isinstance(headroom, (int, float)) or not 0 < headroom <= 1:
            raise ValueError(f"headroom must be a number in (0, 1], got {headroom!r}")
        self.budget, self.init, self.min_saving, self.seed = budget, init, float(min_saving), seed
        self.headroom = float(headroom)
        if (isinstance(min_rows_per_dim, bool) or not isinstance(min_rows_per_dim, (int, float))
                or not min_rows_per_dim >= 0):
            raise ValueError(f"min_rows_per_dim must be a number >= 0, got {min_rows_per_dim!r}")
        self.min_rows_per_dim = float(min_rows_per_dim)
        self.stats = collect_stats(model, calibration, progress=progress)
        self._curves: Dict[str, Tuple[torch.Tensor, float, float]] = {}
        self._weighted: Dict[str, torch.Tensor] = {}
        self._layers = {}
        modules = dict(model.named_modules())
        # one float64 SVD per layer: seconds on large models, so a bar (shown only once it takes > 0.5 s)
        for name, st in _progress(self.stats.items(), total=len(self.stats), desc="panther error curves",
                                  enabled=progress, unit="layer", delay=0.5):
            m = modules[name]
            W = _weight2d(m).to(torch.float64)
            self._layers[name] = (W, st)
            out_sq = _output_sq_norm(W, getattr(m, "bias", None), st)
            self._curves[name] = (_svd_curve(W, st.gram), _sketch_sq_error(W, st.gram, st.kind), out_sq)
        self.choices: Dict[str, LayerChoice] = {}
        # The compile backend names a layer after its weight's canonical parameter name: a tied weight
        # (GPT-2's lm_head uses transformer.wte.weight) shows up under the owner's name.
        canonical = {}
        for pname, p in model.named_parameters():
            canonical.setdefault(id(p), pname.rsplit(".", 1)[0] if "." in pname else "")
        self._alias = {}
        for name in self.stats:
            owner = canonical.get(id(modules[name].weight))
            if owner is not None and owner != name and owner not in self.stats:
                self._alias[owner] = name

    # -- error predictions ----------------------------------------------------------------------------
    def curve(self, name: str) -> torch.Tensor:
        """Predicted relative output error of the rank-r truncation for r = 0..min(d_out, d_in)."""
        sq, _, out_sq = self._curves[self._key(name)]
        return (sq / max(out_sq, 1e-300)).sqrt()

    def weighted_curve(self, name: str) -> torch.Tensor:
        """Relative error of the best rank-r layer *for these activations* (factorising W·G^{1/2}): a lower
        bound for :meth:`curve`, used to measure what activation weighting could buy."""
        name = self._key(name)
        return (self._weighted_sq(name) / max(self._curves[name][2], 1e-300)).sqrt()

    def _weighted_sq(self, name):
        if name not in self._weighted:
            W, st = self._layers[name]
            self._weighted[name] = _weighted_curve(W, st.gram)
        return self._weighted[name]

    def predicted_error(self, name: str, spec: SketchSpec) -> float:
        """Predicted relative output error of ``spec`` (filled) on layer ``name``."""
        name = self._key(name)
        sq, c_sketch, out_sq = self._curves[name]
        rank = self._rank(self.stats[name].kind, spec)
        if spec.init == "svd":
            if getattr(spec, "act_gram", None) is not None:
                sq = self._weighted_sq(name)
            e = float(sq[min(rank, sq.numel() - 1)])
        else:
            e = c_sketch / rank
        return math.sqrt(max(e, 0.0) / max(out_sq, 1e-300))

    def _key(self, name):
        name = module_of(name)   # a module called twice: same weights, same statistics
        return self._alias.get(name, name)

    @staticmethod
    def _rank(kind, spec):
        # svd keeps the rank-2Lk truncation (linear) / 2Lk left singular directions (conv)
        # (panther.sketch.factors); the sketch init's error is counted per L·k (_sketch_sq_error).
        if spec.init == "svd":
            return 2 * spec.num_terms * spec.low_rank
        return spec.num_terms * spec.low_rank

    # -- the policy ------------------------------------------------------------------------------------
    def __call__(self, info: LayerInfo) -> Optional[SketchSpec]:
        return self.panther_decide(info)[0]

    def panther_decide(self, info: LayerInfo):
        """``(spec, None)`` or ``(None, reason)``: the form ``panther.policy.resolve_policy`` uses for reports."""
        choice = self._choose(info)
        self.choices[choice.name] = choice
        return choice.spec, (choice.reason or None)

    def _budget_for(self, name):
        if not isinstance(self.budget, dict):
            return self.budget
        import fnmatch

        hits = [v for k, v in self.budget.items() if fnmatch.fnmatchcase(name, k)]
        return hits[-1] if hits else None

    def _choose(self, info: LayerInfo) -> LayerChoice:
        name = module_of(info.name)
        name = self._alias.get(name, name)

        def no(reason):
            return LayerChoice(info.name, info.kind, None, None, None, None, "error budget: " + reason)

        if info.kind == "attention":
            return self._choose_attention(info, name, no)
        if info.kind not in ("linear", "conv2d"):
            return no(f"{info.kind} layers are not calibrated")
        if name not in self.stats:
            return no("no calibration statistics for this layer (not run by the calibration inputs)")
        st = self.stats[name]
        W = self._layers[name][0]
        d_in, d_out = _dims(info)
        if (d_out, d_in) != tuple(W.shape) or st.kind != info.kind:
            return no(f"calibrated layer has weight {tuple(W.shape)}, this one ({d_out}, {d_in})")
        budget = self._budget_for(name)
        if budget is None:
            return no("no budget entry matches this layer")
        dense = 2 * d_in * d_out
        per_pos = dataclasses.replace(info, flops=dense)  # the FLOP ratio does not depend on positions
        best = None
        inits = ("svd_act", "svd", "sketch") if self.init == "auto" else (self.init,)
        if st.rows < self.min_rows_per_dim * d_in:  # too few rows to trust the activation weighting
            inits = tuple(dict.fromkeys("svd" if i == "svd_act" else i for i in inits))
        for init in inits:
            spec = self._cheapest(name, info.kind, init, budget, d_in, d_out)
            if spec is None:
                continue
            flops = sketched_cost(per_pos, spec)[1]
            if best is None or flops < best[1]:
                best = (spec, flops)
        if best is None:
            k_max = _k_max(d_in, d_out)
            err = self.predicted_error(name, self._spec(name, inits[0], k_max))
            return no(f"no spec that saves FLOPs meets budget {budget:g} (at break-even k={k_max}: "
                      f"err {err:.2g})")
        spec, flops = best
        saving = 1 - flops / dense
        err = self.predicted_error(name, spec)
        if saving < self.min_saving:
            return LayerChoice(info.name, info.kind, None, self._rank(info.kind, spec), err, saving,
                               f"error budget: the cheapest spec within {budget:g} ({_short(spec)}, err {err:.2g}) "
                               f"saves {saving:.0%} of FLOPs < min_saving {self.min_saving:.0%}")
        note = f"pred output err {err:.2g} <= {budget:g}, -{saving:.0%} FLOPs"
        spec = spec.replace(seed=self.seed, note=note)  # keeps act_gram
        return LayerChoice(info.name, info.kind, spec, self._rank(info.kind, spec), err, saving)

    def _choose_attention(self, info: LayerInfo, name: str, no) -> LayerChoice:
        """The fewest random features (of :data:`ATTENTION_FEATURES`) whose output error, measured on the
        example input (``info.extra["output_error"]``), is within the budget and which still save
        ``min_saving`` of the layer's FLOPs."""
        measure = info.extra.get("output_error")
        if measure is None:
            return no("attention is judged on the example input: compile with backend='panther', or convert "
                      "with example_inputs")
        budget = self._budget_for(name)
        if budget is None:
            return no("no budget entry matches this layer")
        tried = ""
        for m in ATTENTION_FEATURES:
            spec = SketchSpec(num_random_features=m, seed=self.seed)
            flops = sketched_cost(info, spec)[1]
            saving = None if flops is None or not info.flops else 1 - flops / info.flops
            if saving is None or saving < self.min_saving:
                break  # more features only cost more
            err = measure(m, spec.kernel_fn, spec.seed)
            if err <= self.headroom * budget:
                note = f"output err {err:.2g} <= {budget:g} on the example, -{saving:.0%} FLOPs"
                return LayerChoice(info.name, info.kind, spec.replace(note=note), None, err, saving)
            tried = f" (m={m}: err {err:.2g})"
        return no(f"no feature count that saves {self.min_saving:.0%} of FLOPs meets budget {budget:g}{tried}")

    def _cheapest(self, name, kind, init, budget, d_in, d_out) -> Optional[SketchSpec]:
        """The smallest k (num_terms=1) whose predicted error is within budget, below FLOP break-even."""
        k_max = _k_max(d_in, d_out)
        sq, c_sketch, out_sq = self._curves[name]
        target = (self.headroom * budget) ** 2 * out_sq
        if init == "sketch":
            k = max(1, math.ceil(c_sketch / max(target, 1e-300)))
            return self._spec(name, init, k) if k <= k_max else None
        if init == "svd_act":
            sq = self._weighted_sq(name)
        step = 2  # rank kept per unit of k (num_terms=1: two branches of rank k)
        r_full = sq.numel() - 1
        ok = (sq <= target).nonzero()
        if ok.numel() == 0:
            return None
        r = int(ok[0])  # the error curve decreases with rank: the first rank within budget
        k = max(1, math.ceil(r / step))
        if k > k_max or (r > r_full):
            return None
        return self._spec(name, init, k)

    def _spec(self, name, init, k):
        if init == "svd_act":
            return SketchSpec(num_terms=1, low_rank=k, init="svd", act_gram=self.stats[name].gram)
        return SketchSpec(num_terms=1, low_rank=k, init=init)


_POLICY_INITS = ("svd_act", "svd", "sketch", "auto")
#: the random-feature counts the error-budget policy tries for attention, fewest first (up to what the
#: fused GPU kernels hold, ``panther.policy.DEFAULT_MAX_FEATURES``)
ATTENTION_FEATURES = (32, 64, 128, 256)


def _k_max(d_in, d_out):
    """The largest k (num_terms=1) whose sketch still costs fewer FLOPs than the dense layer:
    4k(d_in + d_out) < 2 d_in d_out."""
    return max(1, (d_in * d_out - 1) // (2 * (d_in + d_out)))


def _short(spec):
    act = "+act" if spec.act_gram is not None else ""
    return f"L={spec.num_terms}, k={spec.low_rank}, {spec.init}{act}"


def _check_budget(v, what):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1:
        raise ValueError(f"{what} must be a relative error in (0, 1), got {v!r}")


def error_budget_policy(model: nn.Module, calibration, budget=0.05, **kwargs) -> ErrorBudgetPolicy:
    """Shorthand for :class:`ErrorBudgetPolicy` ``(model, calibration, budget, **kwargs)``."""
    return ErrorBudgetPolicy(model, calibration, budget, **kwargs)


@torch.no_grad()
def relative_output_errors(dense: nn.Module, sketched: nn.Module, inputs, names=None) -> Dict[str, float]:
    """Measured per-layer relative output error ‖Ŷ − Y‖/‖Y‖ of ``sketched`` against ``dense`` on ``inputs``.

    Each sketched layer is fed the *dense* model's input to that layer (so errors do not compound and the
    number is comparable with the policy's per-layer prediction). ``names``: layers to measure (default:
    every layer of ``sketched`` whose class differs from the dense one's).
    """
    dmods, smods = dict(dense.named_modules()), dict(sketched.named_modules())
    if names is None:
        names = [n for n, m in smods.items() if n in dmods and type(m) is not type(dmods[n])
                 and _layer_kind(dmods[n]) is not None]
    acc = {n: [0.0, 0.0] for n in names}
    hooks = []
    for n in names:
        def hook(mod, args, out, _n=n):
            if args[0].is_nested:
                args, out = (_tokens(args[0]),), _tokens(out)
            y_hat = smods[_n](*args)
            acc[_n][0] += float((y_hat.double() - out.double()).pow(2).sum())
            acc[_n][1] += float(out.double().pow(2).sum())

        hooks.append(dmods[n].register_forward_hook(hook))
    modes = {m: m.training for m in list(dense.modules()) + list(sketched.modules())}
    try:
        dense.eval()
        sketched.eval()
        batches = [inputs] if isinstance(inputs, (torch.Tensor, Mapping)) else inputs
        for b in batches:
            call_with(dense, b)
    finally:
        for h in hooks:
            h.remove()
        for m, t in modes.items():
            m.training = t
    return {n: math.sqrt(a / max(b, 1e-300)) for n, (a, b) in acc.items()}
