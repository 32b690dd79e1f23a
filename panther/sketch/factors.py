"""Factors of sketched layers computed from a dense weight: the one home of these formulas.

Both the eager layers (``panther.nn``) and the compile backend's weight rewrite (``fx_passes``) build
their factors here, so a converted module and a rewritten graph compute the same function.

Two initialisations:

* ``"sketch"`` — the seed library's unbiased estimator: the fixed ``U`` factors are random
  ±1/sqrt(k) sign sketches and the learnable factors are the weight projected onto them, so that
  E[layer(x)] = dense(x) over the draw.
* ``"svd"`` — the ``U`` factors hold singular vectors of the weight, which makes the layer the best
  approximation its rank allows: the truncation to rank ``2*num_terms*low_rank`` (each of the 2L
  branches holds its own block of ``low_rank`` singular triplets; a conv keeps that many left
  singular directions of its reshaped kernel).

  With ``act_gram=G`` (the Gram matrix ``XᵀX`` of calibration inputs, d_in × d_in; for a conv, of the
  unfolded patches) the singular vectors are those of ``W·G^{1/2}`` instead: the layer becomes
  ``Ŵ = P_r W`` with ``P_r`` the projection on the top-r left singular vectors of ``W·G^{1/2}``, the rank-r
  map with the smallest output error ``‖X(W − Ŵ)ᵀ‖`` on those inputs (panther.budget uses it).
"""
from __future__ import annotations

import torch

from .core import scaled_sign_sketch

__all__ = ["linear_factors", "conv2d_factors", "linear_weight", "conv2d_weight", "relative_error", "INITS"]

INITS = ("sketch", "svd")


def _check_init(init):
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")


def _signs(num, k, n, generator, like):
    """``num`` independent (k, n) ±1/sqrt(k) sketches stacked to (num, k, n)."""
    return torch.stack([scaled_sign_sketch(k, n, generator=generator, dtype=like.dtype) for _ in range(num)]).to(
        like.device
    )


def _top_singular(W, rank):
    """(U_r, S_r, V_r) of the rank-``rank`` truncated SVD of a 2-D ``W``, computed in float64 for accuracy.

    ``rank`` larger than min(W.shape) is padded with zero singular values and orthonormal completions,
    so callers can ask for any rank.
    """
    W64 = W.detach().to(torch.float64)
    # The orthonormal completions are only needed past min(W.shape); the thin SVD is up to ~2x cheaper.
    U, S, Vh = torch.linalg.svd(W64, full_matrices=rank > min(W64.shape))
    r_full = S.numel()
    if rank > r_full:
        S = torch.cat([S, S.new_zeros(rank - r_full)])
    # Column counts may still be short of ``rank`` when rank > max(W.shape): pad with zeros.
    U = _pad_cols(U, rank)
    V = _pad_cols(Vh.mT, rank)
    return U[:, :rank], S[:rank], V[:, :rank]


def _pad_cols(M, n):
    if M.shape[1] >= n:
        return M
    return torch.cat([M, M.new_zeros(M.shape[0], n - M.shape[1])], dim=1)


def _act_weighted_left(W2, rank, act_gram):
    """Top-``rank`` left singular vectors (float64, zero-padded) of ``W2 · G^{1/2}``."""
    G = act_gram.detach().to(device=W2.device, dtype=torch.float64)
    if G.shape != (W2.shape[1], W2.shape[1]):
        raise ValueError(f"act_gram must be ({W2.shape[1]}, {W2.shape[1]}) for this weight, got {tuple(G.shape)}")
    evals, evecs = torch.linalg.eigh(G)
    root = (evecs * evals.clamp_min(0).sqrt()) @ evecs.mT
    U, _, _ = _top_singular(W2.to(torch.float64) @ root, rank)
    return U


def linear_factors(W, num_terms, low_rank, *, init="sketch", generator=None, act_gram=None):
    """Factors ``(S1s, S2s, U1s, U2s)`` of an SKLinear layer equal (in expectation or best-rank) to ``W``.

    ``W`` is in ``nn.Linear`` layout (out_features, in_features). Shapes returned:
    S1s (L, d_in, k), S2s (L, k, d_out), U1s (L, k, d_out), U2s (L, d_in, k) in W's dtype and device.
    The layer computes ``y = 1/(2L) Σ_i [(x S1_i) U1_i + (x U2_i) S2_i]``. ``act_gram`` (only with
    ``init="svd"``): weight the factorisation by the inputs' Gram matrix (module docstring).

    Raises:
        ValueError: an unknown ``init``, ``act_gram`` without ``init="svd"`` or of the wrong shape.
    """
    _check_init(init)
    if act_gram is not None and init != "svd":
        raise ValueError(f"act_gram is only used with init='svd', got init={init!r}")
    L, k = num_terms, low_rank
    d_out, d_in = W.shape
    Wt = W.detach().mT  # (d_in, d_out): the row-vector map x -> x Wᵀ
    if init == "sketch":
        U1s = _signs(L, k, d_out, generator, W)  # (L, k, d_out)
        U2s = _signs(L, k, d_in, generator, W).mT.contiguous()  # (L, d_in, k)
        # Each branch is an unbiased estimate of x Wᵀ because E[UᵀU] = I.
        S1s = Wt @ U1s.mT  # (L, d_in, k)
        S2s = U2s.mT @ Wt  # (L, k, d_out)
        return S1s.contiguous(), S2s.contiguous(), U1s.contiguous(), U2s
    # "svd": the 2L branches hold the 2L blocks of k singular triplets of the rank-2Lk truncation
    # (term i: branch 1 block 2i, branch 2 block 2i+1), scaled by 2L against the layer's 1/(2L).
    r = 2 * L * k
    W64 = W.detach().to(torch.float64)
    if act_gram is not None:
        # Ŵ = P W with P the projection on the top-2Lk left singular vectors of W·G^{1/2}: a block b
        # (columns U_b) is the map x -> x Wᵀ U_b U_bᵀ; branch 2 takes it as (x Q_b)(R_b U_bᵀ) with
        # Wᵀ U_b = Q_b R_b, so its fixed factor is orthonormal.
        blocks = _act_weighted_left(W, r, act_gram).mT.reshape(L, 2, k, d_out)  # U_bᵀ
        U1s, U2t = blocks[:, 0], blocks[:, 1]
        S1s = 2 * L * (W64.mT @ U1s.mT)                                        # (L, d_in, k)
        U2s, R = torch.linalg.qr(W64.mT @ U2t.mT)
        S2s = 2 * L * (R @ U2t)                                                # (L, k, d_out)
    else:
        U, S, V = _top_singular(W, r)  # W ≈ U diag(S) Vᵀ, so x Wᵀ = Σ_b x V_b S_b U_bᵀ
        Ub = U.mT.reshape(L, 2, k, d_out)           # U_bᵀ: rows are left singular vectors
        Vb = V.reshape(d_in, L, 2, k).permute(1, 2, 0, 3)  # V_b (d_in, k) columns
        Sb = S.reshape(L, 2, k)
        U1s, U2s = Ub[:, 0], Vb[:, 1]
        S1s = 2 * L * Vb[:, 0] * Sb[:, 0, None, :]  # V_b S_b
        S2s = 2 * L * Sb[:, 1, :, None] * Ub[:, 1]  # S_b U_bᵀ
    return tuple(t.to(dtype=W.dtype, device=W.device).contiguous() for t in (S1s, S2s, U1s, U2s))


def conv2d_factors(W, num_terms, low_rank, *, init="sketch", generator=None, act_gram=None):
    """Factors ``(S1s, U1s)`` of an SKConv2d layer from a conv weight ``W`` (C_out, C_in, kh, kw).

    S1s (2Lk, C_in, kh, kw) is an ordinary conv weight, U1s (2L, k, C_out) the fixed channel mix; the layer
    computes ``out = 1/(2L) Σ_{i<2L} U1_iᵀ conv(x, S1_i)`` with ``S1_i = c · U1_i W`` (c = 1 for "sketch",
    2L for "svd", where the U1_i are blocks of left singular vectors of W reshaped to (C_out, C_in·kh·kw);
    with ``act_gram``, the Gram matrix of the unfolded input patches, of W·G^{1/2}).

    Raises:
        ValueError: an unknown ``init``, ``act_gram`` without ``init="svd"`` or of the wrong shape.
    """
    _check_init(init)
    if act_gram is not None and init != "svd":
        raise ValueError(f"act_gram is only used with init='svd', got init={init!r}")
    terms, k = 2 * num_terms, low_rank
    C_out = W.shape[0]
    W2 = W.detach().reshape(C_out, -1)  # (C_out, C_in*kh*kw)
    if init == "sketch":
        U1s = _signs(terms, k, C_out, generator, W)  # (2L, k, C_out)
        S1 = U1s @ W2  # (2L, k, C_in*kh*kw): unbiased because E[U1ᵢᵀ U1ᵢ] = I
    else:
        U = _top_singular(W2, terms * k)[0] if act_gram is None else _act_weighted_left(W2, terms * k, act_gram)
        U1s = U.mT.reshape(terms, k, C_out).to(W.dtype)
        S1 = terms * (U1s.to(torch.float64) @ W2.to(torch.float64))
    S1s = S1.reshape(terms * k, *W.shape[1:])
    return S1s.to(dtype=W.dtype, device=W.device).contiguous(), U1s.to(device=W.device).contiguous()


def linear_weight(S1s, S2s, U1s, U2s):
    """The dense (out_features, in_features) weight that an SKLinear layer with these factors applies:
    ``Ŵᵀ = 1/(2L) Σ_i (S1_i U1_i + U2_i S2_i)``."""
    return ((S1s @ U1s + U2s @ S2s).sum(0) / (2 * S1s.shape[0])).mT


def conv2d_weight(S1s, U1s):
    """The dense (C_out, C_in, kh, kw) kernel that an SKConv2d layer with these factors applies:
    ``Ŵ = 1/(2L) Σ_{i,r} U1s[i, r]ᵀ S1s[i·k + r]`` (the channel mix folded into the conv)."""
    terms, C_out = U1s.shape[0], U1s.shape[-1]
    mixed = U1s.reshape(-1, C_out).mT @ S1s.reshape(S1s.shape[0], -1)
    return mixed.reshape(C_out, *S1s.shape[1:]) / terms


def relative_error(approx, W) -> float:
    """``‖Ŵ − W‖_F / ‖W‖_F``, in the wider of the two dtypes (the report's ``err`` column)."""
    with torch.no_grad():
        dtype = torch.promote_types(approx.dtype, W.dtype)
        approx, W = approx.detach().to(dtype), W.detach().to(dtype=dtype, device=approx.device)
        return (torch.linalg.norm(approx - W) / torch.linalg.norm(W).clamp_min(1e-30)).item()
