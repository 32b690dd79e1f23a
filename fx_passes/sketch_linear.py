"""Pass: dense linear -> ``panther::sketched_linear`` with factors of the real weight (inference only).

Pattern (Dynamo torch IR):
    torch._C._nn.linear(x, W, b?)                     # nn.Linear, F.linear
    x @ W.t()                                         # also W.T, W.transpose(0, 1); torch.matmul, x.matmul, mm
    x @ P                                             # with a (d_in, d_out) parameter P
    torch.addmm(b, x, P)                              # Hugging Face Conv1D (GPT-2): P is (d_in, d_out)
where W / P is a module parameter (a placeholder whose source is ``..._parameters['...']``).

Replacement:
    torch.ops.panther.sketched_linear(x, S1s, S2s, U1s, U2s, b)
with ``(S1s, S2s, U1s, U2s) = panther.sketch.linear_factors(W, L, k, init=...)`` registered as gm buffers.
"""
from __future__ import annotations

import builtins

import torch

from panther.policy import LayerInfo, SketchSpec, seed_for
from panther.sketch import linear_factors, linear_weight, relative_error

from .common import (MATMUL_FUNCTIONS, MATMUL_METHODS, Candidate, PassContext, generator_for, is_call, numel,
                     shape_of, single_threaded, spec_key)

KIND = "linear"
OP_AFTER = "panther.sketched_linear"
_LINEAR = torch._C._nn.linear


def _transposed_weight(node):
    """The parameter node ``W`` if ``node`` is ``W.t()`` / ``W.T`` / ``W.mT`` / ``W.transpose(0, 1)``."""
    if not isinstance(node, torch.fx.Node):
        return None
    if node.op == "call_method" and node.target == "t" and len(node.args) == 1:
        return node.args[0]
    if node.op == "call_function" and node.target is torch.t and len(node.args) == 1:
        return node.args[0]
    if (node.op == "call_method" and node.target == "transpose") or (
        node.op == "call_function" and node.target is torch.transpose
    ):
        dims = tuple(node.args[1:3])
        if dims in ((0, 1), (1, 0), (-1, -2), (-2, -1)):
            return node.args[0]
    if node.op == "call_function" and node.target is builtins.getattr and node.args[1] in ("T", "mT"):
        return node.args[0]
    return None


def match(node, ctx: PassContext):
    if is_call(node, (_LINEAR,)):
        args = list(node.args) + [None] * (3 - len(node.args))
        x = node.kwargs.get("input", args[0])
        w = node.kwargs.get("weight", args[1])
        b = node.kwargs.get("bias", args[2])
        transposed, op_before, t_node = False, "torch._C._nn.linear", None
    elif (is_call(node, (torch.addmm,)) and len(node.args) == 3 and not node.kwargs
          and isinstance(node.args[2], torch.fx.Node) and node.args[2].op == "placeholder"):
        # addmm(b, x, P) = x @ P + b with beta = alpha = 1 (no kwargs): Conv1D's forward.
        b, x, w = node.args
        transposed, op_before, t_node = True, "addmm(b, x, W)", None
    elif is_call(node, MATMUL_FUNCTIONS, MATMUL_METHODS) and len(node.args) == 2 and not node.kwargs:
        x, rhs = node.args
        b = None
        w = _transposed_weight(rhs)
        if w is not None:
            transposed, t_node = False, rhs
        else:
            w, transposed, t_node = rhs, True, None
        op_before = "matmul(x, W.t())" if not transposed else "matmul(x, W)"
        if not isinstance(w, torch.fx.Node) or w.op != "placeholder":
            return None  # an activation @ activation product: not a layer
    else:
        return None

    W, fqn, why = ctx.weight(w)
    wv = w.meta.get("example_value") if isinstance(w, torch.fx.Node) else None
    xv = x.meta.get("example_value") if isinstance(x, torch.fx.Node) else None
    w_shape = shape_of(W if W is not None else wv)
    if w_shape is None or len(w_shape) != 2:
        return None if op_before.startswith(("matmul", "addmm")) else _unsupported(node, ctx, op_before, "weight is not 2-D")
    d_out, d_in = w_shape if not transposed else w_shape[::-1]
    x_shape = shape_of(xv)
    if x_shape is None or not x_shape or x_shape[-1] != d_in:
        if op_before.startswith(("matmul", "addmm")):
            return None
        return _unsupported(node, ctx, op_before, "input shape unknown")
    base_name = name = ctx.layer_name(node, fqn, _is_linear_layer)
    name = ctx.unique_layer_name(name)
    n_rows = numel(x_shape) // d_in if d_in else 0
    bias_v = b.meta.get("example_value") if isinstance(b, torch.fx.Node) else None
    info = LayerInfo(
        name=name,
        kind=KIND,
        shapes={"input": x_shape, "weight": (d_out, d_in), "output": x_shape[:-1] + (d_out,)},
        dtype=getattr(xv, "dtype", None),
        device=getattr(xv, "device", None),
        params=d_in * d_out + (d_out if b is not None else 0),
        flops=2 * n_rows * d_in * d_out,
        has_bias=b is not None,
        grad_enabled=ctx.grad_enabled,
        op=op_before,
        extra={"in_features": d_in, "out_features": d_out},
    )
    node.meta["panther_layer"] = name
    cand = Candidate(node, info, op_before, needs_weights=True,
                     data={"x": x, "w": w, "b": b, "W": W, "transposed": transposed, "t_node": t_node,
                           "base_name": base_name})
    if owner := ctx.panther_owner(node):
        cand.unsupported = f"a weight of {owner}, panther's own layer: not sketched again"
    elif W is None:
        cand.unsupported = why
    elif bias_v is not None and tuple(bias_v.shape) != (d_out,):
        cand.unsupported = "bias is not (out_features,)"
    elif mismatch := ctx.dtype_mismatch(node, W, xv):
        cand.unsupported = mismatch
    return cand


def _is_linear_layer(cls: type) -> bool:
    """A module class whose calls are linear layers: nn.Linear and Hugging Face's Conv1D (by name, as
    ``panther.convert`` recognises it)."""
    return issubclass(cls, torch.nn.Linear) or cls.__name__ == "Conv1D"


def _unsupported(node, ctx, op_before, reason):
    name = ctx.unique_layer_name(ctx.module_path(node) or node.name)
    info = LayerInfo(name=name, kind=KIND, op=op_before, grad_enabled=ctx.grad_enabled,
                     extra={"in_features": 0, "out_features": 0})
    return Candidate(node, info, op_before, needs_weights=True, unsupported=reason)


def _factorise(W_lin, spec: SketchSpec, base_name: str):
    """Factors of a (d_out, d_in) weight and the relative error ‖W - Ŵ‖_F / ‖W‖_F of the sketch."""
    with torch.no_grad(), single_threaded():
        gen = generator_for(seed_for(spec, base_name))
        S1s, S2s, U1s, U2s = linear_factors(W_lin, spec.num_terms, spec.low_rank, init=spec.init, generator=gen,
                                              act_gram=spec.act_gram)
        err = relative_error(linear_weight(S1s, S2s, U1s, U2s), W_lin)
    return (S1s, S2s, U1s, U2s), err


def rewrite(cand: Candidate, spec: SketchSpec, ctx: PassContext):
    node, d = cand.node, cand.data
    W = d["W"]
    W_lin = W.detach().mT if d["transposed"] else W.detach()
    key = ("linear", d["base_name"], spec_key(spec), W._version, d["transposed"])
    # Across processes: keyed by the weight's bytes instead of its identity/version (deterministic specs only).
    persist = (W, key[:3] + key[4:]) if spec.init == "svd" or spec.seed is not None else None
    factors, err = ctx.cache.get(W, key, lambda: _factorise(W_lin, spec, d["base_name"]), persist=persist)
    consts = [ctx.add_constant(f"{d['base_name']}_{n}", t, node) for n, t in zip(("S1s", "S2s", "U1s", "U2s"), factors)]
    with ctx.graph.inserting_before(node):
        new = ctx.graph.call_function(torch.ops.panther.sketched_linear.default, (d["x"], *consts, d["b"]))
    new.meta.update(node.meta)
    ctx.owners[new] = W
    node.replace_all_uses_with(new)
    ctx.graph.erase_node(node)
    t_node = d["t_node"]
    if t_node is not None and not t_node.users:
        ctx.graph.erase_node(t_node)
    return OP_AFTER, err
