"""Sine stochastic relative positional encoding (sineSPE, Liutkus et al. 2021) for
random-feature attention.

Every (head h, feature i) gets ``S`` learnable sines (frequency, phase, gain) and ``R`` fixed
Gaussian realisations ``z``. The positional codes

    qbar[n,h,i,r] = sum_j Omega_q[n,h,i,j] s[h,i,j] z[h,i,j,r] / (R d)^{1/4}
    kbar[n,h,i,r] = same with Omega_k
    Omega_q[n,h,i,:] = [cos(2 pi f n + phi), sin(2 pi f n + phi)]   (2S entries)
    Omega_k[n,h,i,:] = [cos(2 pi f n),       sin(2 pi f n)]
    f = sigmoid(freqs) / 2,  phi = phases,  s = [softplus(scales), softplus(scales)]

turn queries/keys into ``qhat[n,h,:] = sum_i q[n,h,i] qbar[n,h,i,:]`` (dimension R) with

    E_z[qhat_n . khat_m] = sqrt(R/d) sum_i q_i k_i sum_j softplus(scales_ij)^2 cos(2 pi f_ij (n-m) + phi_ij)

i.e. a learned relative (Toeplitz) positional kernel per feature, in linear time.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from ..ops.attention import sine_bases, srpe_filter_sines_chunked
from ._checks import make_generator, positive_int
from ._triton_ops import LazyTritonOp

__all__ = ["sinSRPE"]

triton_srpe = LazyTritonOp("inductor_ext.triton_srpe", "srpe_filter_sines")


class sinSRPE(nn.Module):
    """Sine SRPE positional codes.

    Args:
        num_heads: number of attention heads ``H``.
        perHead_in: per-head feature dimension ``d`` (``embed_dim // num_heads``).
        sines: number of sines ``S`` per (head, feature).
        num_realizations: number of Gaussian realisations ``R``; the attention then works on
            ``R``-dimensional queries/keys.
        device: of the parameters and buffers (default: CPU).
        dtype: of the parameters and buffers (default: ``torch.get_default_dtype()``).
        seed: an int that builds a private generator for the initial values.
        generator: a ``torch.Generator`` to draw them from (default: torch's global RNG).

    Parameters ``freqs``, ``phases``, ``scales`` ``(H, d, S)``; buffer ``z`` ``(H, d, 2S, R)``
    (fixed realisations, saved in the ``state_dict``).
    ``forward(length)`` returns ``(qbar, kbar)``, each ``(1, length, H, d, R)``; pass the module as
    ``SRPE=`` to :class:`~panther.nn.RandMultiHeadAttention`, which applies it through :meth:`filter`.

    Raises:
        TypeError: a size that is not an int.
        ValueError: a size ``<= 0``, or both ``seed`` and ``generator``.
    """

    def __init__(self, num_heads, perHead_in, sines, num_realizations=256, device=None,
                 dtype=None, *, seed=None, generator=None):
        positive_int("num_heads", num_heads)
        positive_int("perHead_in", perHead_in)
        positive_int("sines", sines)
        positive_int("num_realizations", num_realizations)
        super().__init__()
        self.num_heads = num_heads
        self.perHead_in = perHead_in
        self.sines = sines
        self.num_realizations = num_realizations
        dtype = dtype or torch.get_default_dtype()
        gen = make_generator(seed, generator)
        gdev = gen.device if gen is not None else torch.device("cpu")
        shape = (num_heads, perHead_in, sines)

        def draw(*size):
            return torch.randn(*size, generator=gen, device=gdev, dtype=torch.float32)

        freqs = draw(*shape) - 4.0  # sigmoid(-4)/2 ~ 0.009 cycles per position: slow sines
        phases = draw(*shape)
        scales = draw(*shape)
        scales = scales / (scales.norm(dim=-1, keepdim=True) / 2)  # gain vectors of norm 2
        z = draw(num_heads, perHead_in, 2 * sines, num_realizations)
        factory = dict(device=device, dtype=dtype)
        self.freqs = nn.Parameter(freqs.to(**factory))
        self.phases = nn.Parameter(phases.to(**factory))
        self.scales = nn.Parameter(scales.to(**factory))
        self.register_buffer("z", z.to(**factory))
        triton_srpe.load()

    def extra_repr(self):
        return (f"num_heads={self.num_heads}, perHead_in={self.perHead_in}, sines={self.sines}, "
                f"num_realizations={self.num_realizations}")

    def omegas(self, length):
        """Sine bases ``(Omega_q, Omega_k)``, each ``(length, H, d, 2S)``."""
        if isinstance(length, bool) or not isinstance(length, int) or length < 0:
            raise ValueError(f"length must be a non-negative int, got {length!r}")
        theta, phase = self.angles()
        omega_q = sine_bases(theta, phase, length)
        omega_k = sine_bases(theta, None, length)
        return omega_q.to(self.freqs.dtype), omega_k.to(self.freqs.dtype)

    def angles(self):
        """``(theta, phase)``, each ``(H, d, S)``: the sines' angular frequencies ``2 pi f`` and
        phases, in at least fp32 (fp16 positions stop being exact integers past 2048)."""
        wt = torch.float64 if self.freqs.dtype == torch.float64 else torch.float32
        return (2 * math.pi) * (torch.sigmoid(self.freqs.to(wt)) / 2), self.phases.to(wt)

    def mixing(self):
        """``s ⊙ z / (R d)^{1/4}``, ``(H, d, 2S, R)``: the codes are ``Omega @ mixing``."""
        s = F.softplus(self.scales)
        s = torch.cat([s, s], dim=-1).unsqueeze(-1)
        return s * self.z / (self.num_realizations * self.perHead_in) ** 0.25

    def forward(self, length):
        """Positional codes ``(qbar, kbar)``, each ``(1, length, H, d, R)`` (materialised).

        Args:
            length: number of positions (a non-negative int).

        Raises:
            ValueError: ``length`` is not a non-negative int.
        """
        omega_q, omega_k = self.omegas(length)
        w = self.mixing()
        qbar = torch.einsum("lhdj,hdjr->lhdr", omega_q, w).unsqueeze(0)
        kbar = torch.einsum("lhdj,hdjr->lhdr", omega_k, w).unsqueeze(0)
        return qbar, kbar

    def filter(self, q, k, start=0):
        """Apply the codes to ``q (B, Lq, H, d)`` and ``k (B, S, H, d)`` without materialising
        them per batch element: returns ``(qhat (B, Lq, H, R), khat (B, S, H, R))``.
        Positions are ``start..start+Lq-1`` for queries and ``start..start+S-1`` for keys (``start``: a
        decoding step's offset: an int, or a static state's 0-dim position tensor)."""
        for name, t in (("q", q), ("k", k)):
            if t.dim() != 4 or t.shape[2] != self.num_heads or t.shape[3] != self.perHead_in:
                raise ValueError(f"sinSRPE.filter: {name} must be (B, L, {self.num_heads}, "
                                 f"{self.perHead_in}), got {tuple(t.shape)}")
        w = self.mixing().to(q.dtype)
        theta, phase = self.angles()
        # the bases, (L, H, d, 2S) per queries and keys, are never built whole: on CUDA the fused
        # op builds them on chip, elsewhere a block of positions at a time (forward and backward)
        if torch.is_tensor(start) or start:   # the fused op's positions start at 0
            return (srpe_filter_sines_chunked(q, theta, phase, w, start),
                    srpe_filter_sines_chunked(k, theta, None, w, start))
        sines = triton_srpe.for_input(q, srpe_filter_sines_chunked)
        return sines(q, theta, phase, w), sines(k, theta, None, w)
