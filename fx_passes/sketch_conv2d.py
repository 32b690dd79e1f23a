"""Pass: dense conv2d -> ``panther::sketched_conv2d`` with factors of the real weight (inference only).

Pattern (Dynamo torch IR; ``F.conv2d is torch.conv2d``, nn.Conv2d with zero padding calls it directly,
other padding modes call ``F.pad`` first and then conv2d with padding 0):
    torch.conv2d(x, W, b?, stride, padding, dilation, groups=1)      x: (B, C_in, H, W) or (C_in, H, W)

Replacement:
    torch.ops.panther.sketched_conv2d(x, S1s, U1s, b, stride, padding, dilation)
with ``(S1s, U1s) = panther.sketch.conv2d_factors(W, L, k, init=...)``: a conv to 2Lk channels followed by
a 1x1 channel mix. Grouped convolutions and string paddings other than "valid"/odd-kernel "same" stay dense.
"""
from __future__ import annotations

import torch

from panther.policy import LayerInfo, SketchSpec, seed_for
from panther.sketch import conv2d_factors, conv2d_weight, relative_error

from .common import Candidate, PassContext, generator_for, single_threaded, shape_of, spec_key

KIND = "conv2d"
OP_AFTER = "panther.sketched_conv2d"
_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_DEFAULTS = (None, None, None, 1, 0, 1, 1)


def _pair(v):
    if isinstance(v, int):
        return (v, v)
    v = tuple(v)
    return (v[0], v[0]) if len(v) == 1 else v


def _padding(padding, kernel, dilation, stride):
    """Explicit (ph, pw) for an int/tuple/'valid'/'same' padding, or None when it has no explicit form."""
    if padding == "valid":
        return (0, 0)
    if padding == "same":
        if stride != (1, 1):
            return None
        total = [d * (k - 1) for d, k in zip(dilation, kernel)]
        if any(t % 2 for t in total):
            return None  # asymmetric padding: not expressible as (ph, pw)
        return tuple(t // 2 for t in total)
    return _pair(padding)


def match(node, ctx: PassContext):
    if node.op != "call_function" or node.target is not torch.conv2d:
        return None
    vals = list(node.args) + list(_DEFAULTS[len(node.args):])
    for i, k in enumerate(_ARGS):
        if k in node.kwargs:
            vals[i] = node.kwargs[k]
    x, w, b, stride, padding, dilation, groups = vals
    W, fqn, why = ctx.weight(w)
    wv = W if W is not None else (w.meta.get("example_value") if isinstance(w, torch.fx.Node) else None)
    xv = x.meta.get("example_value") if isinstance(x, torch.fx.Node) else None
    w_shape, x_shape, out_shape = shape_of(wv), shape_of(xv), shape_of(node.meta.get("example_value"))
    base_name = ctx.layer_name(node, fqn, lambda cls: issubclass(cls, torch.nn.Conv2d))
    name = ctx.unique_layer_name(base_name)
    node.meta["panther_layer"] = name
    op_before = "torch.conv2d"
    if w_shape is None or len(w_shape) != 4 or x_shape is None or out_shape is None:
        info = LayerInfo(name=name, kind=KIND, op=op_before, grad_enabled=ctx.grad_enabled,
                         extra={"in_channels": 0, "out_channels": 0, "kernel_size": (1, 1)})
        return Candidate(node, info, op_before, needs_weights=True, unsupported="shapes unknown")
    C_out, C_in_g, kh, kw = w_shape
    groups = groups if isinstance(groups, int) else 1
    stride, dilation = _pair(stride), _pair(dilation)
    pad = _padding(padding, (kh, kw), dilation, stride)
    batch = x_shape[0] if len(x_shape) == 4 else 1
    positions = batch * out_shape[-2] * out_shape[-1]
    info = LayerInfo(
        name=name,
        kind=KIND,
        shapes={"input": x_shape, "weight": w_shape, "output": out_shape},
        dtype=getattr(xv, "dtype", None),
        device=getattr(xv, "device", None),
        params=C_out * C_in_g * kh * kw + (C_out if b is not None else 0),
        flops=2 * positions * C_out * C_in_g * kh * kw,
        has_bias=b is not None,
        grad_enabled=ctx.grad_enabled,
        op=op_before,
        extra={"in_channels": C_in_g * groups, "out_channels": C_out, "kernel_size": (kh, kw), "groups": groups,
               "stride": stride, "padding": pad if pad is not None else padding, "dilation": dilation},
    )
    cand = Candidate(node, info, op_before, needs_weights=True,
                     data={"x": x, "b": b, "W": W, "stride": stride, "padding": pad, "dilation": dilation,
                           "base_name": base_name})
    if W is None:
        cand.unsupported = why
    elif groups != 1:
        cand.unsupported = f"grouped convolution (groups={groups}) is not supported by sketched_conv2d"
    elif pad is None:
        cand.unsupported = f"padding={padding!r} has no symmetric explicit form"
    elif mismatch := ctx.dtype_mismatch(node, W, xv):
        cand.unsupported = mismatch
    elif not hasattr(torch.ops.panther, "sketched_conv2d"):
        cand.unsupported = "panther::sketched_conv2d is not available in this build"
    return cand


def _factorise(W, spec: SketchSpec, base_name: str):
    with torch.no_grad(), single_threaded():
        gen = generator_for(seed_for(spec, base_name))
        S1s, U1s = conv2d_factors(W.detach(), spec.num_terms, spec.low_rank, init=spec.init, generator=gen,
                                   act_gram=spec.act_gram)
        err = relative_error(conv2d_weight(S1s, U1s), W)
    return (S1s, U1s), err


def rewrite(cand: Candidate, spec: SketchSpec, ctx: PassContext):
    node, d = cand.node, cand.data
    W = d["W"]
    key = ("conv2d", d["base_name"], spec_key(spec), W._version)
    # Across processes: keyed by the weight's bytes instead of its identity/version (deterministic specs only).
    persist = (W, key[:3] + key[4:]) if spec.init == "svd" or spec.seed is not None else None
    (S1s, U1s), err = ctx.cache.get(W, key, lambda: _factorise(W, spec, d["base_name"]), persist=persist)
    s1 = ctx.add_constant(f"{d['base_name']}_S1s", S1s, node)
    u1 = ctx.add_constant(f"{d['base_name']}_U1s", U1s, node)
    with ctx.graph.inserting_before(node):
        new = ctx.graph.call_function(
            torch.ops.panther.sketched_conv2d.default,
            (d["x"], s1, u1, d["b"], list(d["stride"]), list(d["padding"]), list(d["dilation"])),
        )
    new.meta.update(node.meta)
    node.replace_all_uses_with(new)
    ctx.graph.erase_node(node)
    return OP_AFTER, err
