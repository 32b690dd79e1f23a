"""Random features for random-feature (FAVOR+) attention."""
from __future__ import annotations

import torch

__all__ = ["orthogonal_random_features"]


def orthogonal_random_features(num_features, dim, *, generator=None, device=None, dtype=None):
    """``(num_features, dim)`` orthogonal random features for FAVOR+.

    Stacks ``ceil(num_features / dim)`` Haar-orthogonal ``dim x dim`` blocks (QR of a Gaussian
    matrix, signs fixed by ``diag(R)``), keeps the first ``num_features`` rows and gives every
    row the norm of an independent Gaussian vector (chi-distributed), so each row is marginally
    ``N(0, I)`` (unbiased features) while rows within a block are orthogonal (lower variance).
    Draws from ``generator`` (default: torch's global RNG); never reseeds anything.

    Raises:
        ValueError: ``num_features`` or ``dim`` not a positive int.
    """
    if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
        raise ValueError(f"num_features must be a positive int, got {num_features!r}")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be a positive int, got {dim!r}")
    dtype = dtype or torch.get_default_dtype()
    gdev = generator.device if generator is not None else torch.device("cpu")
    blocks = -(-num_features // dim)
    g = torch.randn(blocks, dim, dim, generator=generator, device=gdev, dtype=torch.float64)
    Q, R = torch.linalg.qr(g)
    sign = torch.where(torch.diagonal(R, dim1=-2, dim2=-1) < 0, -1.0, 1.0).to(Q.dtype)
    Q = Q * sign.unsqueeze(-2)
    rows = Q.transpose(-2, -1).reshape(blocks * dim, dim)[:num_features]
    norms = torch.randn(num_features, dim, generator=generator, device=gdev,
                        dtype=torch.float64).norm(dim=-1)
    return (rows * norms[:, None]).to(device=device, dtype=dtype)
