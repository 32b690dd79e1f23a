"""panther's graph passes over Dynamo FX graphs.

One pass per file, each with its pattern and its replacement side by side:

* :mod:`.sketch_linear` — ``linear`` / ``x @ W.t()`` -> ``panther::sketched_linear`` (weight factors)
* :mod:`.sketch_conv2d` — ``conv2d`` -> ``panther::sketched_conv2d`` (weight factors)
* :mod:`.sketch_sdpa` — ``scaled_dot_product_attention`` -> ``panther::rf_attention`` (weight-free)
* :mod:`.sketch_mha` — ``F.multi_head_attention_forward`` -> projections + ``panther::rf_attention``
* :mod:`.sketch_softmax_attention` — ``softmax(q @ kᵀ · c + mask) @ v`` written out -> ``panther::rf_attention``
* :mod:`.sketch_flex_attention` — ``flex_attention`` with a causal / key padding mask -> ``panther::rf_attention``
* :mod:`.expand_encoder_layer` — first, nn.TransformerEncoderLayer's fused eval kernel -> the ops of its
  ordinary forward, so the passes above see its layers; put back where none of them was rewritten

:func:`run_passes` walks the graph once in order, lets each pass recognise its nodes, asks the policy,
applies the accepted rewrites and returns a :class:`panther.report.GraphDiffReport` with one row per
candidate node, including the reason for every node left alone.

Layering: this package imports ``panther.ops``, ``panther.policy``, ``panther.report``,
``panther.sketch`` and ``panther.attention_error`` only (graphs, never modules).
"""
from __future__ import annotations

import dataclasses
import logging
import warnings
from typing import Optional

import torch

from panther._progress import progress
from panther.policy import Policy, decide, resolve_policy, sketched_cost
from panther.report import GraphDiffReport, ReportRow, module_of, warn_inaccurate_attention

from . import (attention_sample, expand_encoder_layer, sketch_conv2d, sketch_flex_attention, sketch_linear,
               sketch_mha, sketch_sdpa, sketch_softmax_attention)
from .common import FactorCache, PassContext, factor_cache
from .graph_view import graph_view, mark_layers

__all__ = ["run_passes", "PASSES", "factor_cache", "TRAINING_REASON"]

log = logging.getLogger("panther")

ATTENTION_PASSES = (sketch_sdpa, sketch_mha, sketch_softmax_attention, sketch_flex_attention)
PASSES = (sketch_linear, sketch_conv2d) + ATTENTION_PASSES

# eval() does not turn autograd off: an inference call outside torch.no_grad() lands here too
TRAINING_REASON = "gradients enabled: for inference call under torch.no_grad(); to train, use panther.convert"


def run_passes(
    gm: torch.fx.GraphModule,
    example_inputs,
    *,
    policy: Policy = None,
    grad_enabled: Optional[bool] = None,
    cache: Optional[FactorCache] = None,
    measure_attention: bool = True,
) -> GraphDiffReport:
    """Rewrite ``gm`` in place as ``policy`` decides; return the graph diff report.

    Weight-bearing rewrites (linear, conv2d) happen only when ``grad_enabled`` is False (default: the
    current grad mode); otherwise those nodes stay dense with the reason :data:`TRAINING_REASON`.
    Weight-free rewrites (attention) happen in both modes. With ``measure_attention``, the graph is first
    run once on the example inputs to sample its attention calls (``attention_sample``).
    """
    grad_enabled = torch.is_grad_enabled() if grad_enabled is None else grad_enabled
    expansions = expand_encoder_layer.expand(gm)  # fused nn.TransformerEncoderLayer calls -> their ops
    ctx = PassContext(gm, example_inputs, grad_enabled=grad_enabled, cache=cache or factor_cache)
    if measure_attention and ctx.real:  # ctx.real holds every placeholder's example, in graph order, or nothing
        samplers = {n: s for n in gm.graph.nodes for p in ATTENTION_PASSES for s in [p.sampler(n)] if s is not None}
        # a pass may compute its calls another way in that run (flex_attention through SDPA)
        stand_ins = {n: s for n in samplers for p in ATTENTION_PASSES if hasattr(p, "stand_in")
                     for s in [p.stand_in(n)] if s is not None}
        ctx.attention_samples = attention_sample.sample_attention(gm, list(ctx.real.values()), samplers, stand_ins)
    policy_fn = resolve_policy(policy)
    view = graph_view(gm, lambda n: ctx.weight(n)[1])  # before any rewrite: the graph the report describes
    changed = False
    # factorising the weights of many / large layers takes seconds: a bar on a terminal once past 1 s
    for node in progress(list(gm.graph.nodes), desc="panther: sketching graph", unit="node", delay=1.0):
        if node._erased or node.op not in ("call_function", "call_method"):
            continue  # already erased by an earlier rewrite
        for p in PASSES:
            cand = p.match(node, ctx)
            if cand is None:
                continue
            changed |= _apply(p, cand, ctx, policy_fn)
            break
    if expansions:
        expand_encoder_layer.restore(gm, expansions)
        changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()
    rows = [row for _, row in sorted(ctx.rows, key=lambda t: t[0])]
    warn_inaccurate_attention(rows, "panther backend")
    mark_layers(view, ctx.row_nodes)
    return GraphDiffReport(rows=rows, source="compile", graph_id=_graph_id(gm), graph=view)


def _graph_id(gm):
    cid = gm.meta.get("dynamo_compile_id") if hasattr(gm, "meta") else None
    return None if cid is None else f"graph {cid}"


def _row(cand, *, replaced, reason="", op_after=None, params_after=None, flops_after=None, spec=None, err=None):
    info = cand.info
    return ReportRow(
        name=info.name,
        kind=info.kind,
        op_before=cand.op_before,
        op_after=op_after if replaced else cand.op_before,
        replaced=replaced,
        reason=reason,
        params_before=info.params,
        params_after=params_after if replaced else info.params,
        flops_before=info.flops,
        flops_after=flops_after if replaced else info.flops,
        spec=spec,
        est_error=err,
    )


def _apply(p, cand, ctx: PassContext, policy_fn) -> bool:
    if cand.unsupported:
        return _keep(p, cand, ctx, reason=cand.unsupported)
    info = cand.info
    if "#" in info.name:  # a module called again: the policy judges the module path, the row keeps the suffix
        info = dataclasses.replace(info, name=module_of(info.name))
    # a rewrite in a graph is never trained (see TRAINING_REASON), so the best approximation is the default
    spec, reason = decide(policy_fn, info, default_init="svd")
    if spec is None:
        return _keep(p, cand, ctx, reason=reason or "policy declined")
    if cand.needs_weights and ctx.grad_enabled:
        warnings.warn("panther: the linears and convolutions the policy sketches stay dense while gradients are "
                      "enabled (model.eval() does not disable them): call the compiled model under torch.no_grad() "
                      "or torch.inference_mode() for inference; to train sketched layers, use panther.convert",
                      UserWarning, stacklevel=2)
        return _keep(p, cand, ctx, reason=TRAINING_REASON, spec=spec)
    problem = getattr(p, "check", lambda c, s: None)(cand, spec)
    if problem:
        return _keep(p, cand, ctx, reason=problem, spec=spec)
    params_after, flops_after = sketched_cost(cand.info, spec)
    larger = ""
    if cand.needs_weights and params_after > info.params:   # asked for, so done; said, as SKLinear says it
        larger = (f"holds more parameters than the dense layer ({params_after} > {info.params}): a smaller rank "
                  f"would be cheaper")
        warnings.warn(f"panther: {info.name} {larger}", UserWarning, stacklevel=2)
    op_after, err = p.rewrite(cand, spec, ctx)
    ctx.graph_changed()
    ctx.record(cand, _row(cand, replaced=True, op_after=op_after, params_after=params_after,
                          flops_after=flops_after, spec=spec, err=err, reason=larger))
    return True


def _keep(p, cand, ctx: PassContext, *, reason, spec=None) -> bool:
    """Record ``cand`` as left as it is, after the pass's ``keep`` hook (a pass may restore a hint the exact call
    lost, and says so in the reason). Returns whether the graph changed."""
    note = getattr(p, "keep", lambda c: None)(cand)
    ctx.record(cand, _row(cand, replaced=False, reason=f"{reason}; {note}" if note else reason, spec=spec))
    return note is not None
