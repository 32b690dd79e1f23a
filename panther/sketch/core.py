"""Sketching operators."""
from __future__ import annotations

import math

import torch

__all__ = ["scaled_sign_sketch"]


def scaled_sign_sketch(m, n, *, generator=None, device=None, dtype=None):
    """Dense (m, n) matrix of independent ±1/sqrt(m) entries, so that E[SᵀS] = I_n."""
    dtype = dtype or torch.get_default_dtype()
    signs = torch.randint(0, 2, (m, n), generator=generator, device=generator.device if generator else None)
    return (signs.to(dtype=dtype) * 2 - 1).mul_(1.0 / math.sqrt(m)).to(device=device)
