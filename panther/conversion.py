"""``panther.convert``: the eager module swap, panther's training path.

``convert(model, policy)`` replaces, in place, each ``nn.Linear`` / ``nn.Conv2d`` / ``nn.MultiheadAttention``
the policy accepts by ``SKLinear`` / ``SKConv2d`` / ``RandMultiHeadAttention`` whose factors are built
from the dense weights (``SketchSpec.init``: ``"sketch"`` or ``"svd"``). The new modules own real
``nn.Parameter`` objects, so optimizers, ``state_dict``, ``torch.export`` and ``torch.compile`` (with
``backend="panther"`` or any other) all see them.

Call it **before** building the optimizer: an optimizer built earlier holds the old dense parameters and
would never update the new factors.

Nothing the policy did not ask for changes: other modules, their parameters (same objects), training
flags and RNG-free state stay as they were. A layer registered under several names (one module used in
several places) is swapped for one new module at all of them, so it stays shared; swapping a layer whose
weight is tied to another module's warns that the tie is broken. Without ``example_inputs`` nothing is
run; with them, one forward under ``no_grad`` in eval mode records input shapes so that FLOPs (and the
default policy's attention decisions) use real sizes; training flags are restored afterwards.

When converting takes more than a second, a progress bar is shown on an interactive terminal (never in
logs, pipes, CI or pytest; ``PANTHER_PROGRESS=0/1`` forces it off/on, see ``panther._progress``).
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, Dict, List, Optional

import torch
from torch import nn
from torch.nn.utils import parametrize

from .policy import LayerInfo, Policy, SketchSpec, decide, dense_attention_flops, resolve_policy, seed_for, \
    sketched_cost, unmatched_entries, with_overrides
from .attention_error import error_of_features, layer_features, mha_sample, sample_error
from .nn import RandMultiHeadAttention as _RandMHA
from .nn import SKConv2d, SKLinear
from .sketch import relative_error
from ._progress import progress as _progress
from .report import GraphDiffReport, ReportRow, _set_last, warn_inaccurate_attention

__all__ = ["convert", "MHACompatibleRandAttention", "is_conv1d"]


def _is_plain(module, cls) -> bool:
    """An instance of ``cls`` whose forward is ``cls.forward`` (subclasses with their own math are left alone)."""
    return isinstance(module, cls) and type(module).forward is cls.forward


def is_conv1d(m: nn.Module) -> bool:
    """Hugging Face ``Conv1D`` (GPT-2's projections): a linear layer whose weight is stored (in, out) and
    applied as ``addmm(bias, x, weight)``. Recognised by name and shape, so panther never imports
    transformers."""
    if type(m).__name__ != "Conv1D":
        return False  # before reading .weight: a parametrized weight would be computed (and may update state)
    w = getattr(m, "weight", None)
    return (isinstance(w, torch.Tensor) and w.dim() == 2 and getattr(m, "nf", None) == w.shape[1]
            and type(m).forward is not nn.Module.forward)


def _candidates(model: nn.Module):
    """(name, module, kind) for every swappable layer, in registration order.

    Linears owned by an nn.MultiheadAttention (its out_proj) are part of that layer: the attention reads
    ``out_proj.weight`` directly, so swapping them alone would be wrong.
    """
    mha_children = set()
    for m in model.modules():
        if isinstance(m, nn.MultiheadAttention):
            mha_children.update(id(c) for c in m.modules() if c is not m)
    out = []
    for name, m in model.named_modules():
        if id(m) in mha_children:
            continue
        if _is_plain(m, nn.Linear) or is_conv1d(m):
            out.append((name, m, "linear"))
        elif _is_plain(m, nn.Conv2d):
            out.append((name, m, "conv2d"))
        elif _is_plain(m, nn.MultiheadAttention):
            out.append((name, m, "attention"))
    return out


def _aliases(model: nn.Module) -> Dict[int, List[str]]:
    """Every name each module is registered under: a module used in several places (weight sharing) is
    swapped at all of them, so that it stays one shared module."""
    out: Dict[int, List[str]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        out.setdefault(id(m), []).append(name)
    return out


def _parameter_holders(model: nn.Module) -> Dict[int, List[str]]:
    """Every name each parameter is registered under (a tied weight has several)."""
    out: Dict[int, List[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        out.setdefault(id(p), []).append(name)
    return out


def _untie(m: nn.Module, names: List[str], holders: Dict[int, List[str]]) -> List[str]:
    """Swapping ``m`` (registered under ``names``): drop its own names from ``holders`` and return the names
    under which other modules still hold one of its parameters (a tie the swap breaks, e.g. a language
    model head sharing the token embedding's weight)."""
    own = {f"{a}.{p}" if a else p for a in names for p, _ in m.named_parameters(remove_duplicate=False)}
    tied = []
    for p in m.parameters():
        others = [n for n in holders.get(id(p), ()) if n not in own]
        holders[id(p)] = others
        tied += [n for n in others if n not in tied]
    return tied


def call_with(model: nn.Module, inputs):
    """``model`` run on example or calibration inputs: a mapping is keyword arguments (e.g. a tokenizer's
    output), a tuple or list positional arguments, anything else the one argument."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def _record_shapes(model, cands, example_inputs) -> Dict[int, Any]:
    """Run one eval-mode, no-grad forward and record each candidate's (args, kwargs, output) shapes."""
    seen: Dict[int, Any] = {}
    hooks = []

    def shape(t):
        # nested tensors (nn.TransformerEncoder packs padded batches in eval mode) have no one shape
        return tuple(t.shape) if isinstance(t, torch.Tensor) and not t.is_nested else None

    for _, m, kind in cands:
        def hook(mod, args, kwargs, output, _id=id(m), _kind=kind):
            out = output[0] if isinstance(output, tuple) else output
            sample = _attention_sample(mod, args, kwargs) if _kind == "attention" else None
            seen.setdefault(_id, ([shape(a) for a in args], {k: v for k, v in kwargs.items()}, shape(out), sample))

        hooks.append(m.register_forward_hook(hook, with_kwargs=True))
    modes = {m: m.training for m in model.modules()}
    # Without torch's fused transformer path, nn.TransformerEncoder keeps padded batches dense (not nested
    # tensors), so every layer sees the (B, L, E) shapes its converted self will compute on.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    try:
        model.eval()
        torch.backends.mha.set_fastpath_enabled(False)
        with torch.no_grad():
            call_with(model, example_inputs)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for h in hooks:
            h.remove()
        for m, t in modes.items():
            m.training = t
    return seen


def _attention_sample(m: nn.MultiheadAttention, args, kwargs):
    """The ``panther.attention_error`` sample of one nn.MultiheadAttention call, or None where random
    features could not express it (an attention mask other than causal, unbatched inputs)."""
    import inspect

    call = inspect.signature(nn.MultiheadAttention.forward).bind(m, *args, **kwargs)
    call.apply_defaults()
    a = call.arguments
    q, k, v = a["query"], a["key"], a["value"]
    if (a["attn_mask"] is not None and not a["is_causal"]) or not all(
            isinstance(t, torch.Tensor) and t.dim() == 3 and not t.is_nested for t in (q, k, v)):
        return None
    if m.batch_first:
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))
    separate = () if m._qkv_same_embed_dim else (m.q_proj_weight, m.k_proj_weight, m.v_proj_weight)
    return mha_sample(q, k, v, m.num_heads, m.in_proj_weight, m.in_proj_bias, *separate,
                      key_padding_mask=a["key_padding_mask"], is_causal=bool(a["is_causal"]))


def _numel(*ts):
    return sum(t.numel() for t in ts if t is not None)


def _weight_facts(m: nn.Module):
    """(dtype, device, parameter count) of a linear or conv layer, without computing a parametrized weight
    (``weight_norm``, ``spectral_norm``: in training mode a read runs a power iteration)."""
    if parametrize.is_parametrized(m, "weight"):
        p = next(m.parameters())
        return p.dtype, p.device, _numel(*m.parameters())
    return m.weight.dtype, m.weight.device, _numel(m.weight, m.bias)


def _linear_info(name, m: nn.Linear, rec, grad_enabled):
    conv1d = is_conv1d(m)
    d_in, d_out = m.weight.shape if conv1d else (m.in_features, m.out_features)
    x_shape = rec[0][0] if rec and rec[0] else None
    flops = None
    if x_shape is not None:
        n = 1
        for s in x_shape[:-1]:
            n *= s
        flops = 2 * n * d_in * d_out
    dtype, device, params = _weight_facts(m)
    return LayerInfo(
        name=name, kind="linear",
        shapes={"input": x_shape, "weight": (d_out, d_in), "output": rec[2] if rec else None},
        dtype=dtype, device=device, params=params, flops=flops,
        has_bias=m.bias is not None, grad_enabled=grad_enabled, op="Conv1D" if conv1d else "nn.Linear",
        extra={"in_features": d_in, "out_features": d_out},
    )


def _conv_info(name, m: nn.Conv2d, rec, grad_enabled):
    C_out, C_in_g, (kh, kw) = m.out_channels, m.in_channels // m.groups, m.kernel_size
    out_shape = rec[2] if rec else None
    flops = None
    if out_shape is not None:
        positions = (out_shape[0] if len(out_shape) == 4 else 1) * out_shape[-2] * out_shape[-1]
        flops = 2 * positions * C_out * C_in_g * kh * kw
    dtype, device, params = _weight_facts(m)
    return LayerInfo(
        name=name, kind="conv2d",
        shapes={"input": rec[0][0] if rec and rec[0] else None, "weight": (C_out, C_in_g, kh, kw), "output": out_shape},
        dtype=dtype, device=device, params=params, flops=flops,
        has_bias=m.bias is not None, grad_enabled=grad_enabled, op="nn.Conv2d",
        extra={"in_channels": m.in_channels, "out_channels": C_out, "kernel_size": (kh, kw), "groups": m.groups,
               "stride": m.stride, "padding": m.padding, "dilation": m.dilation},
    )


def _mha_info(name, m: nn.MultiheadAttention, rec, grad_enabled, drawn=None):
    """``drawn``: a dict that keeps, by ``(m, seed)``, the random features the policy's accuracy measurement
    drew, for :func:`_swap_mha` to build the layer with."""
    E, H = m.embed_dim, m.num_heads
    d = E // H
    params = sum(p.numel() for p in m.parameters())
    extra = {"head_dim": d, "num_heads": H, "embed_dim": E, "causal": False}
    flops = None
    shapes = {}
    if rec and len(rec[0]) >= 3 and all(s is not None and len(s) == 3 for s in rec[0][:3]):
        qs, ks, vs = rec[0][:3]
        if m.batch_first:
            (B, Lq, _), Lk = qs, ks[1]
        else:
            (Lq, B, _), Lk = qs, ks[0]
        proj = 2 * B * (Lq * E * E + Lk * E * m.kdim + Lk * E * m.vdim + Lq * E * E)
        causal = bool(rec[1].get("is_causal", False))
        flops = proj + dense_attention_flops(B * H, Lq, Lk, d, d, causal)
        extra.update(batch_heads=B * H, len_q=Lq, len_k=Lk, head_dim_v=d, projection_flops=proj, causal=causal)
        shapes = {"query": qs, "key": ks, "value": vs}
        if rec[3] is not None:  # measured on example_inputs, as the compile backend measures it
            extra["output_error"] = error_of_features(rec[3], _feature_draw(name, d, m.out_proj.weight, drawn), causal)
    return LayerInfo(name=name, kind="attention", shapes=shapes, dtype=m.out_proj.weight.dtype,
                     device=m.out_proj.weight.device, params=params, flops=flops,
                     has_bias=m.in_proj_bias is not None, grad_enabled=grad_enabled,
                     op="nn.MultiheadAttention", extra=extra)


def _weight_error(old: nn.Module, new: nn.Module) -> Optional[float]:
    """The report's ``err`` for a swapped linear or conv: how far the weight the sketched layer applies is
    from the dense one (relative Frobenius norm), as the compile backend reports it."""
    if not isinstance(new, (SKLinear, SKConv2d)) or old.weight.is_meta:
        return None
    return relative_error(new.effective_weight(), old.weight.mT if is_conv1d(old) else old.weight)


def _attention_error(new: _RandMHA, rec) -> Optional[float]:
    """The report's error for a swapped attention: its output against exact attention on the sample of
    ``example_inputs`` (None without one)."""
    if not rec or rec[3] is None:
        return None
    return sample_error(rec[3], new.projection_matrix, new.kernel_fn, new.causal)


def _match_grad_flags(new: nn.Module, old: nn.Module):
    """Frozen dense layers give frozen sketched layers; training flags carry over."""
    frozen = all(not p.requires_grad for p in old.parameters())
    if frozen:
        for p in new.parameters():
            p.requires_grad_(False)
    new.train(old.training)


def _swap_linear(name, m, spec: SketchSpec):
    if is_conv1d(m):  # weight (in, out): the same layer as an nn.Linear with weight.T
        d_in, d_out = m.weight.shape
        new = SKLinear(d_in, d_out, spec.num_terms, spec.low_rank, W_init=m.weight.detach().mT,
                       bias=m.bias is not None, dtype=m.weight.dtype, device=m.weight.device,
                       seed=seed_for(spec, name), init=spec.init)
        if m.bias is not None:
            with torch.no_grad():
                new.bias.copy_(m.bias)
        return new, "panther.nn.SKLinear"
    new = SKLinear.from_linear(m, spec.num_terms, spec.low_rank, init=spec.init, seed=seed_for(spec, name))
    return new, "panther.nn.SKLinear"


def _swap_conv(name, m, spec: SketchSpec):
    new = SKConv2d.from_conv2d(m, spec.num_terms, spec.low_rank, init=spec.init, seed=seed_for(spec, name))
    return new, "panther.nn.SKConv2d"


def _feature_draw(name, head_dim, like: torch.Tensor, drawn: Optional[dict]):
    """``draw(m, seed)``: the random features :func:`_swap_mha` gives the layer ``name`` (as the compile pass
    draws them: the first draw of the per-layer seed, else of the global RNG), kept in ``drawn``."""
    drawn = {} if drawn is None else drawn

    def draw(m, seed):
        if (m, seed) not in drawn:
            drawn[m, seed] = layer_features(name, m, head_dim, seed, dtype=like.dtype, device=like.device)
        return drawn[m, seed]

    return draw


def _swap_mha(name, m, spec: SketchSpec, drawn=None):
    """``drawn``: the features :func:`_feature_draw` drew for the policy to measure, by ``(m, seed)``."""
    seed = seed_for(spec, name)
    # unseeded: the constructor draws from a throwaway generator (its draws are all replaced below), so the
    # global RNG serves the features alone, once per layer, as in the compile pass
    new = MHACompatibleRandAttention.from_mha(m, spec.num_random_features, kernel_fn=spec.kernel_fn,
                                              iscausal=spec.causal, seed=seed,
                                              generator=None if seed is not None else torch.Generator())
    draw = _feature_draw(name, new.head_dim, m.out_proj.weight, drawn)
    with torch.no_grad():
        new.projection_matrix.copy_(draw(spec.num_random_features, spec.seed))
    new.batch_first = m.batch_first
    return new, "panther.nn.RandMultiHeadAttention"


def _unsupported(kind, m) -> Optional[str]:
    """Why a module of a supported class still cannot be swapped (None if it can)."""
    if kind in ("linear", "conv2d") and parametrize.is_parametrized(m, "weight"):
        names = ", ".join(type(p).__name__ for p in m.parametrizations.weight)
        return (f"its weight is parametrized ({names}, torch.nn.utils.parametrize): a sketched layer would "
                f"drop the parametrization")
    if kind == "conv2d":
        if m.groups != 1:
            return f"grouped convolution (groups={m.groups}) is not supported by SKConv2d"
    if kind == "attention":
        if not m._qkv_same_embed_dim:
            return "kdim/vdim different from embed_dim are not supported by RandMultiHeadAttention"
        if m.bias_k is not None or m.add_zero_attn:
            return "bias_k/bias_v/add_zero_attn are not supported by RandMultiHeadAttention"
        if (m.in_proj_bias is None) != (m.out_proj.bias is None):
            return "input and output projections must both have biases or neither"
    return None


class MHACompatibleRandAttention(_RandMHA):
    """A RandMultiHeadAttention called like the nn.MultiheadAttention it replaced.

    ``forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
    average_attn_weights=True, is_causal=False)`` honours the original ``batch_first`` and returns
    ``(output, None)``: random-feature attention never forms attention weights. ``attn_mask`` is only
    accepted together with ``is_causal=True`` on a layer converted with ``SketchSpec(causal=True)``.
    Parameters, buffers and state_dict keys are RandMultiHeadAttention's.
    """

    batch_first = True
    _qkv_same_embed_dim = True  # nn.MultiheadAttention's attributes that torch's transformer layers read

    @property
    def in_proj_weight(self):
        """The q, k, v projections packed as nn.MultiheadAttention's ``in_proj_weight`` (a new tensor)."""
        return torch.cat([self.Wq, self.Wk, self.Wv])

    @property
    def in_proj_bias(self):
        """The q, k, v biases packed as nn.MultiheadAttention's ``in_proj_bias``, or None without biases."""
        return None if self.bq is None else torch.cat([self.bq, self.bk, self.bv])

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if attn_mask is not None and not (is_causal and self.causal):
            raise ValueError(
                "attn_mask is not supported by random-feature attention (only key_padding_mask, and "
                "causal masks on a layer converted with SketchSpec(causal=True))"
            )
        if is_causal and not self.causal:
            raise ValueError("is_causal=True on a layer converted with SketchSpec(causal=False)")
        if torch.is_tensor(key_padding_mask) and key_padding_mask.is_floating_point():
            key_padding_mask = _padding_from_additive(key_padding_mask)
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        out, _ = super().forward(query, key, value, key_padding_mask)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, None


def _padding_from_additive(mask: torch.Tensor) -> torch.Tensor:
    """A float key-padding mask in nn.MultiheadAttention's additive form (0 = keep, -inf = ignore; the
    form nn.TransformerEncoder/Decoder hand their layers) as the bool mask random features can apply."""
    ignore = torch.isneginf(mask)
    if not torch.compiler.is_compiling() and not bool((ignore | (mask == 0)).all()):
        raise ValueError("a float key_padding_mask must hold only 0 (keep) and -inf (ignore): random-feature "
                         "attention cannot add other values to the attention scores")
    return ignore


def _fast_paths_off(model: nn.Module):
    """Keep torch's fused transformer kernels away from sketched layers.

    In eval mode ``nn.TransformerEncoderLayer`` runs one native kernel over its children's dense weights
    (``torch._transformer_encoder_layer_fwd``), and ``nn.TransformerEncoder`` first packs padded batches
    into nested tensors for it. Once a child is sketched, that kernel would read weights that no longer
    exist; its ordinary forward calls the children, sketched ones included. ``activation_relu_or_gelu``
    and ``use_nested_tensor`` are the flags torch consults to decide whether the kernel can compute the
    layer; they are cleared only where a child was swapped.
    """
    def changed(layer) -> bool:
        return not (_is_plain(layer.self_attn, nn.MultiheadAttention) and _is_plain(layer.linear1, nn.Linear)
                    and _is_plain(layer.linear2, nn.Linear))

    for m in model.modules():
        if isinstance(m, nn.TransformerEncoderLayer) and changed(m):
            m.activation_relu_or_gelu = 0
        elif isinstance(m, nn.TransformerEncoder) and any(changed(layer) for layer in m.layers):
            m.use_nested_tensor = False


def _apply_act_gram(name, m, new, spec: SketchSpec):
    """Overwrite an svd-initialised layer's factors with the activation-weighted ones (spec.act_gram)."""
    from .sketch import conv2d_factors, linear_factors

    with torch.no_grad():
        if isinstance(new, SKLinear):
            W = m.weight.detach().mT if is_conv1d(m) else m.weight.detach()
            factors = linear_factors(W, spec.num_terms, spec.low_rank, init="svd", act_gram=spec.act_gram)
            for t, f in zip((new.S1s, new.S2s, new.U1s, new.U2s), factors):
                t.copy_(f)
        else:
            S1s, U1s = conv2d_factors(m.weight.detach(), spec.num_terms, spec.low_rank, init="svd",
                                      act_gram=spec.act_gram)
            new.S1s.copy_(S1s)
            new.U1s.copy_(U1s)


_SWAP = {"linear": _swap_linear, "conv2d": _swap_conv, "attention": _swap_mha}
_INFO = {"linear": _linear_info, "conv2d": _conv_info, "attention": _mha_info}


def _set_submodule(model: nn.Module, name: str, new: nn.Module):
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _module_tree(model: nn.Module, cands, rows):
    """The candidate layers and their parent modules as a networkx tree (parent -> child), for the
    report's picture: node = dotted module name ("" for the model), ``label`` = class name before the
    swap, ``layer`` = report row name on candidates."""
    import networkx as nx

    G = nx.DiGraph(kind="modules")
    G.add_node("", label=type(model).__name__, role="module")
    modules = dict(model.named_modules())
    for (name, m, _), row in zip(cands, rows):
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            child, parent = ".".join(parts[:i]), ".".join(parts[:i - 1])
            if child not in G:
                G.add_node(child, label=type(modules.get(child, m)).__name__, role="module")
            G.add_edge(parent, child)
        G.nodes[name].update(label=type(m).__name__, layer=row.name)
    return G


def convert(model: nn.Module, policy: Policy = None, *, example_inputs=None, overrides=None):
    """Swap the layers ``policy`` selects for sketched ones, in place; return ``(model, report)``.

    Args:
        model: any nn.Module (modified in place and returned).
        policy: None (the default policy), a callable ``LayerInfo -> SketchSpec | None`` or a dict of
            fnmatch patterns (layer name or kind) -> ``SketchSpec`` | ``"skip"`` (see ``panther.policy``).
        example_inputs: optional input for one recording forward pass (a tensor, a tuple or list of positional
            arguments, or a mapping of keyword arguments such as a tokenizer's output), so the report
            has FLOPs and policies see input shapes.
        overrides: per-layer dict consulted before ``policy``.

    Build the optimizer *after* this call. ``model`` itself is returned so ``model, report =
    panther.convert(model, policy)`` reads naturally; the report is also ``panther.last_report()``.

    Returns:
        ``(model, report)``: the same ``model`` object, and a :class:`~panther.report.GraphDiffReport`
        (``source="convert"``) with one row per candidate layer.

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` or is a bare layer (wrap it in a container), a
            ``policy`` of an unsupported type, ``overrides`` not a dict.
        ValueError: a lazy layer (``nn.LazyLinear``...) not yet initialised and no ``example_inputs``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if overrides is not None and not isinstance(overrides, dict):
        raise TypeError(f"overrides must be a dict of name/kind patterns -> SketchSpec (or a dict of its fields) | 'skip', got {type(overrides).__name__}")
    policy_fn = with_overrides(policy, overrides) if overrides else resolve_policy(policy)
    if isinstance(model, (nn.Linear, nn.Conv2d, nn.MultiheadAttention)):
        raise TypeError("convert() swaps submodules in place; wrap a bare layer in a container (e.g. nn.Sequential)")
    cands = _candidates(model)
    for table in (policy, overrides):
        unmatched = unmatched_entries(table, [(name, kind) for name, _, kind in cands]) if isinstance(table, Mapping) else []
        if unmatched and cands:
            warnings.warn(f"panther.convert: policy entries that match no layer: {unmatched}; entries match a "
                          f"layer's module path (e.g. {cands[0][0]!r}) or kind ('linear', 'conv2d', 'attention')",
                          stacklevel=2)
    aliases, holders = _aliases(model), _parameter_holders(model)
    recorded = _record_shapes(model, cands, example_inputs) if example_inputs is not None else {}
    for name, m, _ in cands:  # the recording forward above initialises lazy layers
        if any(nn.parameter.is_lazy(p) for p in m.parameters(recurse=False)):
            raise ValueError(f"{name} is a lazy layer whose parameters are not initialised yet: run one forward "
                             f"pass first, or pass example_inputs= so that convert runs it")
    grad_enabled = torch.is_grad_enabled()
    rows = []
    # factorising many / large layers takes seconds: a bar on a terminal once it has taken more than 1 s
    for name, m, kind in _progress(cands, desc="panther convert", unit="layer", delay=1.0):
        drawn = {} if kind == "attention" else None  # its random features, by (m, seed), once measured
        with_drawn = {} if drawn is None else {"drawn": drawn}
        info = _INFO[kind](name, m, recorded.get(id(m)), grad_enabled, **with_drawn)
        op_before = info.op
        problem = _unsupported(kind, m)  # first, as the compile backend does: the policy never sees such layers
        spec, reason = (None, problem) if problem else decide(policy_fn, info)
        if spec is not None and kind == "attention" and info.extra["causal"] and not spec.causal:
            spec = spec.replace(causal=True)  # called causally on the example: a layer that accepts that
        if spec is None:
            rows.append(ReportRow(name, kind, op_before, op_before, False, reason or "policy declined",
                                  info.params, info.params, info.flops, info.flops))
            continue
        new, op_after = _SWAP[kind](name, m, spec, **with_drawn)
        if getattr(spec, "act_gram", None) is not None:
            _apply_act_gram(name, m, new, spec)
        err = _weight_error(m, new) if kind != "attention" else _attention_error(new, recorded.get(id(m)))
        _match_grad_flags(new, m)
        tied = _untie(m, aliases[id(m)], holders)
        for alias in aliases[id(m)]:
            _set_submodule(model, alias, new)
        untied = ""
        if tied:
            untied = f"untied from {', '.join(tied)}"
            warnings.warn(f"panther.convert: {name} shared a parameter with {', '.join(tied)}; its sketched "
                          f"replacement has its own factors, so that tie is broken (the other module keeps the "
                          f"dense tensor and no longer trains with {name}). Skip it with overrides={{{name!r}: "
                          f"'skip'}} to keep the tie.", stacklevel=2)
        params_after, flops_after = sketched_cost(info, spec)
        rows.append(ReportRow(name, kind, op_before, op_after, True, untied, info.params, params_after, info.flops,
                              flops_after, spec=spec, est_error=err))
    _fast_paths_off(model)
    warn_inaccurate_attention(rows, "panther.convert")
    report = GraphDiffReport(rows=rows, source="convert", graph=_module_tree(model, cands, rows))
    _set_last(report)
    return model, report
