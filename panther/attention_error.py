"""How far random features are from exact attention on a sample of real activations.

Positive random features approximate ``exp(q·k/√d)`` with a variance that grows like ``exp(‖q + k‖²/√d)``
(FAVOR+; ``../shared/notes``): with small query/key norms the error falls as ``m^-1/2``, with large ones
no feature count helps (a randomly initialised Llama with head_dim 128 got a relative output error above 1
at m = 2048). Whether a layer is in the good regime depends on its activations, so the compile backend
(``fx_passes.attention_sample``) and ``panther.convert`` (with ``example_inputs``) take a :func:`sample` of
each attention call's inputs on the example (one sequence, two heads, the first ``SAMPLE_LENGTH``
positions, fp32) and :func:`sample_error` compares random-feature with exact attention on its last
``SAMPLE_QUERIES`` queries, which see the most keys.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F

__all__ = ["SAMPLE_QUERIES", "SAMPLE_HEADS", "SAMPLE_LENGTH", "sample", "sample_error", "error_of_features",
           "layer_features", "mha_heads", "mha_sample"]

#: how many queries of the sample are compared (the last ones of its prefix, which see the most keys)
SAMPLE_QUERIES = 256
#: how many heads the sample keeps (0 and H/2)
SAMPLE_HEADS = 2
#: the sample's positions: a prefix of the sequence this long
SAMPLE_LENGTH = 4096


def fold_heads(t, ndim: int):
    """Attention inputs of rank ``ndim`` as SDPA's 4-D ``(B, H, L, d)``: ``(B, L, d)`` is one head, and
    ``(*batch, H, L, d)`` has its batch dimensions folded into one (SDPA batches over all of them)."""
    return t.unsqueeze(1) if ndim == 3 else t.flatten(0, ndim - 4) if ndim > 4 else t


def sample(q, k, v, attn_mask, is_causal, scale, enable_gqa) -> Dict:
    """The part of an attention call's inputs (SDPA's terms: ``(B, H, L, d)``, a boolean ``attn_mask`` with
    True = attend, which may come with ``is_causal``; other ranks without a mask are folded by
    :func:`fold_heads`) that :func:`sample_error` reads: one sequence (the first, or under a mask the one whose
    sampled queries see the most keys), ``SAMPLE_HEADS`` heads, and the first ``SAMPLE_LENGTH`` positions,
    whose last ``SAMPLE_QUERIES`` queries are compared (a prefix is exact causal attention; for a longer
    non-causal call it stands for the whole). In fp32: a few MiB per call."""
    if q.dim() != 4:  # without a mask, the only such calls the backend rewrites
        if attn_mask is not None or enable_gqa:
            raise ValueError("only 4-D attention is sampled with a mask or grouped-query heads")
        q, k, v = (fold_heads(t, t.dim()) for t in (q, k, v))
    B, H, Lq, Lk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    heads = sorted({0, H // 2})[:SAMPLE_HEADS]
    groups = H // k.shape[1]  # grouped-query heads, or one key/value head that broadcasts
    kv_heads = [h // groups for h in heads]
    nq, nk = min(Lq, SAMPLE_LENGTH), min(Lk, SAMPLE_LENGTH)
    rows = torch.arange(max(0, nq - SAMPLE_QUERIES), nq, device=q.device)
    b = 0
    causal = (torch.arange(nk, device=q.device) <= rows[:, None]) if is_causal else None
    if isinstance(attn_mask, torch.Tensor):  # with is_causal too: both apply (key padding of a causal call)
        mask = attn_mask.expand(B, H, Lq, Lk)[:, heads][:, :, rows, :nk]
        mask = mask if causal is None else mask & causal
        b = int(mask.flatten(1).sum(1).argmax())
        mask = mask[b:b + 1]
    else:
        mask = None if causal is None else causal.expand(1, len(heads), -1, -1)

    def pick(t, hs, n):
        return t[b:b + 1, hs, :n].float()

    return {"q": pick(q, heads, nq), "k": pick(k, kv_heads, nk), "v": pick(v, kv_heads, nk), "rows": rows,
            "mask": mask, "scale": scale}


def layer_features(name: str, m: int, head_dim: int, seed: Optional[int], *, dtype=None, device=None
                   ) -> torch.Tensor:
    """The ``(m, head_dim)`` random features the attention layer ``name`` gets for a spec's ``seed``: the first
    draw of its per-layer seed (:func:`panther.policy.layer_seed`), else a draw of the global RNG. The compile
    backend and ``panther.convert`` both draw them here, so a seeded layer gets the same features on both."""
    from panther.policy import layer_seed
    from panther.sketch import orthogonal_random_features

    s = layer_seed(seed, name)
    gen = None if s is None else torch.Generator().manual_seed(s)
    return orthogonal_random_features(m, head_dim, generator=gen, dtype=dtype, device=device)


def error_of_features(sample: Dict, draw: Callable[[int, Optional[int]], torch.Tensor], causal: bool
                      ) -> Callable[..., float]:
    """``LayerInfo.extra["output_error"]``: ``(m, kernel_fn="softmax", seed=None) -> sample_error`` with the
    random features ``draw(m, seed)`` gives: the ones the layer gets for ``m`` features and a spec's
    ``seed``. The callers memoise ``draw`` and build the layer from the same draw, so what a policy weighs is
    exactly the error the report then shows."""

    def output_error(m: int, kernel_fn: str = "softmax", seed: Optional[int] = None) -> float:
        return sample_error(sample, draw(m, seed), kernel_fn, causal)

    return output_error


def sample_error(sample: Dict, projection: torch.Tensor, kernel_fn: str, causal: bool) -> float:
    """Relative Frobenius error of ``panther.rf_attention`` (``causal``, and the sample's key padding)
    against exact attention, over the sample's queries that see at least one key."""
    q, k, v, rows, mask = sample["q"], sample["k"], sample["v"], sample["rows"], sample["mask"]
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    kpm = None if mask is None else ~mask[:, 0].any(dim=-2)  # keys no sampled query sees: padding
    with torch.autocast(q.device.type, enabled=False):  # the backend may run under the caller's autocast
        # causal: each compared query's output needs the whole prefix; otherwise the compared queries suffice
        approx = torch.ops.panther.rf_attention(q if causal else q[:, :, rows], k, v, projection.to(q), kernel_fn,
                                                causal, sample["scale"], kpm)
        exact = F.scaled_dot_product_attention(q[:, :, rows], k, v, attn_mask=mask, scale=sample["scale"])
    if causal:
        approx = approx[:, :, rows]
    seen = slice(None) if mask is None else mask.any(-1)
    approx, exact = approx[seen], exact[seen]
    return ((approx - exact).norm() / exact.norm().clamp_min(1e-30)).item()


def mha_heads(query, key, value, num_heads, in_proj_weight, in_proj_bias, q_proj_weight=None,
              k_proj_weight=None, v_proj_weight=None):
    """nn.MultiheadAttention's q, k, v projections of (L, B, E) inputs, split into heads: (B, H, L, d) each."""
    if q_proj_weight is None:
        q_proj_weight, k_proj_weight, v_proj_weight = in_proj_weight.chunk(3)
    bq = bk = bv = None
    if in_proj_bias is not None:
        bq, bk, bv = in_proj_bias.chunk(3)
    d = query.shape[-1] // num_heads

    def heads(t, w, b):  # (L, B, E) -> (B, H, L, d)
        t = F.linear(t, w, b)
        return t.reshape(t.shape[0], t.shape[1], num_heads, d).permute(1, 2, 0, 3)

    return heads(query, q_proj_weight, bq), heads(key, k_proj_weight, bk), heads(value, v_proj_weight, bv)


def mha_sample(query, key, value, num_heads, in_proj_weight, in_proj_bias, q_proj_weight=None, k_proj_weight=None,
               v_proj_weight=None, key_padding_mask=None, is_causal=False, attn_mask=None) -> Dict:
    """:func:`sample` of an nn.MultiheadAttention call, inputs (L, B, E): the heads projected, the key padding
    (bool, True = ignore, or the additive form nn.MultiheadAttention makes of one), causality and ``attn_mask``
    (bool, True = ignore; ``(Lq, Lk)`` or ``(B·H, Lq, Lk)``) as one mask."""
    q, k, v = mha_heads(query, key, value, num_heads, in_proj_weight, in_proj_bias, q_proj_weight, k_proj_weight,
                        v_proj_weight)
    keep = torch.ones(q.shape[0], 1, 1, k.shape[2], dtype=torch.bool, device=q.device)
    if key_padding_mask is not None:
        kpm = key_padding_mask
        keep = keep & ~(kpm if kpm.dtype == torch.bool else kpm == float("-inf"))[:, None, None, :]
    if is_causal:
        keep = keep & torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
    if attn_mask is not None:
        keep = keep & ~attn_mask.reshape(-1 if attn_mask.dim() == 3 else 1, q.shape[1] if attn_mask.dim() == 3
                                         else 1, q.shape[2], k.shape[2])
    return sample(q, k, v, keep, False, None, False)
