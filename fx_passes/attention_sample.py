"""How far random features are from exact attention on the inputs a graph really sees.

Positive random features approximate ``exp(q·k)`` with a variance that grows like ``exp(‖q + k‖²/√d)``
(``../shared/notes``, FAVOR+ §5.1): with small query/key norms the error falls as ``m^-1/2``, with large
ones no feature count helps (a randomly initialised Llama with head_dim 128 got a relative output error
above 1 at m = 2048). Whether a layer is in the good regime is a property of its activations, so the
backend measures it: before rewriting, it runs the graph once on the real example inputs (no grad, the
RNG state restored after) and keeps, for each SDPA call, a small sample (the first sequence, two heads,
in fp32). :func:`sample_error` then compares random-feature attention with exact attention on the sample's
last ``SAMPLE_QUERIES`` queries, which see the most keys. Graphs that mutate their inputs or call
collectives are not run.
"""
from __future__ import annotations

import logging
import operator
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import fx

log = logging.getLogger("panther")

SAMPLE_QUERIES = 256
SAMPLE_HEADS = 2


# ops whose result may share memory with their first argument
_VIEWS = {"view", "reshape", "transpose", "permute", "t", "expand", "select", "narrow", "unsqueeze", "squeeze",
          "flatten", "unflatten", "as_strided", "detach", "contiguous", "view_as", "expand_as", "unbind", "split",
          "chunk", "getitem", "__getitem__", "to", "type_as", "float", "half", "bfloat16"}


def _name(n: fx.Node) -> str:
    name = n.target if n.op == "call_method" else getattr(n.target, "__name__", "") if n.op == "call_function" else ""
    return name if isinstance(name, str) else ""


def _state_behind(n) -> bool:
    """Whether ``n`` is a graph input or module state, or may be a view of one."""
    while isinstance(n, fx.Node):
        if n.op in ("placeholder", "get_attr"):
            return True
        if _name(n) not in _VIEWS or not n.args:
            return False
        n = n.args[0]
    return False


def _mutates(gm: fx.GraphModule) -> bool:
    """Whether running ``gm`` changes anything outside it: an in-place op (``x.add_(...)``, ``x[i] = ...``,
    ``x += ...``) on a graph input or module state, or on what may be a view of one. In-place ops on the
    graph's own temporaries (nn.MultiheadAttention's ``masked_fill_`` of a fresh mask) are harmless."""
    for n in gm.graph.nodes:
        if n.op not in ("call_function", "call_method") or not n.args:
            continue
        name = _name(n)
        in_place = n.target in (operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv,
                                operator.iand, operator.ior) or (
            getattr(n.target, "__module__", None) != "_operator" and name.endswith("_") and not name.endswith("__"))
        if in_place and _state_behind(n.args[0]):
            return True
    return False


def _communicates(gm: fx.GraphModule) -> bool:
    """Whether ``gm`` calls collectives (FSDP's all-gathers, say): a run that not every rank makes would hang."""
    for n in gm.graph.nodes:
        where = f"{getattr(n.target, '__module__', '')}.{getattr(n.target, '__name__', n.target)}"
        if n.op == "call_function" and ("c10d" in where or "torch.distributed" in where):
            return True
    return False


def _sample(q, k, v, attn_mask, is_causal, scale, enable_gqa) -> Dict:
    H, Hk, Lq = q.shape[1], k.shape[1], q.shape[2]
    heads = sorted({0, H // 2})[:SAMPLE_HEADS]
    groups = H // Hk if enable_gqa else 1
    kv_heads = [h // groups for h in heads]
    rows = torch.arange(max(0, Lq - SAMPLE_QUERIES), Lq, device=q.device)
    if isinstance(attn_mask, torch.Tensor):
        mask = attn_mask.expand(q.shape[0], H, Lq, k.shape[2])[:1, heads][:, :, rows]
    elif is_causal:
        mask = (torch.arange(k.shape[2], device=q.device) <= rows[:, None]).expand(1, len(heads), -1, -1)
    else:
        mask = None
    return {"q": q[:1, heads].float(), "k": k[:1, kv_heads].float(), "v": v[:1, kv_heads].float(), "rows": rows,
            "mask": mask, "scale": scale}


def sample_attention(gm: fx.GraphModule, real_inputs: Optional[list], args_of: Dict[fx.Node, Callable]
                     ) -> Dict[fx.Node, Dict]:
    """One run of ``gm`` on ``real_inputs``; for each attention call in ``args_of``, the sample of its
    inputs. ``args_of[node](args, kwargs)`` gives ``(q, k, v, attn_mask, is_causal, scale, enable_gqa)`` in
    SDPA's terms (``(B, H, L, d)``, a boolean mask) from the node's evaluated arguments. Empty when the
    graph cannot be run safely (or fails to)."""
    if not args_of or real_inputs is None or _mutates(gm) or _communicates(gm):
        return {}
    samples: Dict[fx.Node, Dict] = {}

    class Sampler(fx.Interpreter):
        def run_node(self, n):
            if n in args_of:
                args, kwargs = self.fetch_args_kwargs_from_env(n)
                samples[n] = _sample(*args_of[n](args, kwargs))
            return super().run_node(n)

    devices = sorted({t.device.index or 0 for t in real_inputs if isinstance(t, torch.Tensor) and t.is_cuda})
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            Sampler(gm).run(*real_inputs)
    except Exception as e:  # noqa: BLE001 - the rewrite does not depend on it; the report just has no error
        log.debug("panther: could not run the graph to sample attention inputs: %s", e)
        return {}
    return samples


def error_of_features(sample: Dict, head_dim: int, causal: bool) -> Callable[..., float]:
    """``LayerInfo.extra["output_error"]``: ``(m, kernel_fn) -> sample_error`` with ``m`` features of a
    fixed draw (a local generator: the global RNG is not touched)."""
    from panther.sketch import orthogonal_random_features

    def output_error(m: int, kernel_fn: str = "softmax") -> float:
        P = orthogonal_random_features(m, head_dim, generator=torch.Generator().manual_seed(0))
        return sample_error(sample, P, kernel_fn, causal)

    return output_error


def sample_error(sample: Dict, projection: torch.Tensor, kernel_fn: str, causal: bool) -> float:
    """Relative Frobenius error of ``panther.rf_attention`` (``causal``, and the sample's key padding)
    against exact attention, over the sample's queries that see at least one key."""
    q, k, v, rows, mask = sample["q"], sample["k"], sample["v"], sample["rows"], sample["mask"]
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    kpm = None if mask is None else ~mask[:, 0].any(dim=-2)  # keys no sampled query sees: padding
    with torch.autocast(q.device.type, enabled=False):  # the backend may run under the caller's autocast
        approx = torch.ops.panther.rf_attention(q, k, v, projection.to(q), kernel_fn, causal, sample["scale"], kpm)
        exact = F.scaled_dot_product_attention(q[:, :, rows], k, v, attn_mask=mask, scale=sample["scale"])
    seen = slice(None) if mask is None else mask.any(-1)
    approx, exact = approx[:, :, rows][seen], exact[seen]
    return ((approx - exact).norm() / exact.norm().clamp_min(1e-30)).item()
