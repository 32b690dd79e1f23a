"""SKLinear: a sketched drop-in for nn.Linear."""
from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from ..sketch.factors import INITS, linear_factors, linear_weight
from ._checks import input_matches, make_generator, positive_int

__all__ = ["SKLinear", "SKLinear_triton"]


class SKLinear(nn.Module):
    r"""Sketched linear layer: ``y = 1/(2L) Σ_i [(x S1_i) U1_i + (x U2_i) S2_i] + b``.

    ``S1s`` (L, in, k) and ``S2s`` (L, k, out) are learnable; ``U1s`` (L, k, out) and ``U2s`` (L, in, k)
    are fixed buffers (random ±1/sqrt(k) signs, or singular vectors of ``W_init`` with ``init="svd"``).
    At initialisation each branch is an unbiased estimate of ``x Wᵀ`` for the seed weight ``W`` (``W_init``
    in ``nn.Linear`` layout (out, in), or drawn like ``nn.Linear``'s default init).
    The whole layer is two GEMMs (``panther::sketched_linear``), forward ``4·N·L·k·(in+out)`` FLOPs.

    Args:
        in_features: size of each input sample.
        out_features: size of each output sample.
        num_terms: ``L``, the number of sketch terms.
        low_rank: ``k``, the rank of each term; the layer has rank ``2·L·k``.
        W_init: optional (out_features, in_features) weight to approximate.
        bias: learnable bias (drawn like ``nn.Linear``'s unless copied by :meth:`from_linear`).
        dtype: of the parameters and buffers (default: ``W_init``'s if given, else torch's default dtype).
        device: of the parameters and buffers (default: ``W_init``'s if given, else CPU).
        seed: an int that builds a private ``torch.Generator`` for the random draws.
        generator: a ``torch.Generator`` to draw from. With neither ``seed`` nor ``generator``, torch's
            global RNG is used (so ``torch.manual_seed`` makes construction reproducible); it is never
            reseeded.
        init: ``"sketch"`` (random signs, unbiased) or ``"svd"`` (best rank-``2·L·k`` approximation of W).

    Raises:
        TypeError: a size that is not an int, ``bias`` not a bool, ``W_init`` not a floating-point tensor,
            ``generator`` not a ``torch.Generator``.
        ValueError: a size ``<= 0``, an unknown ``init``, ``W_init`` of the wrong shape, both ``seed`` and
            ``generator``.

    Warns:
        UserWarning: when ``2·L·k·(in + out) > in·out``: the sketch holds more numbers than the dense weight.

    Shape:
        input ``(..., in_features)``, output ``(..., out_features)``.
    """

    __constants__ = ["in_features", "out_features", "num_terms", "low_rank"]

    def __init__(self, in_features, out_features, num_terms, low_rank, W_init=None, bias=True, dtype=None,
                 device=None, *, seed=None, generator=None, init="sketch"):
        positive_int("in_features", in_features)
        positive_int("out_features", out_features)
        positive_int("num_terms", num_terms)
        positive_int("low_rank", low_rank)
        if not isinstance(bias, bool):
            raise TypeError(f"bias must be a bool, got {type(bias).__name__}")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        if W_init is not None:
            _check_weight(W_init, in_features, out_features)
            dtype = dtype or (W_init.dtype if W_init.is_floating_point() else None)
            device = device if device is not None else W_init.device
        if 2 * num_terms * low_rank * (in_features + out_features) > in_features * out_features:
            warnings.warn(
                f"SKLinear({in_features}, {out_features}, num_terms={num_terms}, low_rank={low_rank}) has more "
                "parameters than the dense layer it replaces (2·num_terms·low_rank·(in+out) > in·out); "
                "consider a smaller num_terms or low_rank.",
                UserWarning,
                stacklevel=2,
            )
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.num_terms, self.low_rank = num_terms, low_rank
        self.init = init
        self._generator = make_generator(seed, generator)
        factory = {"dtype": dtype or torch.get_default_dtype(), "device": device}
        L, k = num_terms, low_rank
        self.S1s = nn.Parameter(torch.empty(L, in_features, k, **factory))
        self.S2s = nn.Parameter(torch.empty(L, k, out_features, **factory))
        self.register_buffer("U1s", torch.empty(L, k, out_features, **factory))
        self.register_buffer("U2s", torch.empty(L, in_features, k, **factory))
        self.register_parameter("bias", nn.Parameter(torch.empty(out_features, **factory)) if bias else None)
        self.reset_parameters(W_init)

    @torch.no_grad()
    def reset_parameters(self, W_init=None):
        """Redraw the sketches (and, without ``W_init``, the seed weight and bias) from the layer's RNG.

        Args:
            W_init: optional (out_features, in_features) weight to approximate; ``None`` draws one like
                ``nn.Linear``'s default init. The bias is redrawn either way.
        """
        bound = 1.0 / math.sqrt(self.in_features)  # nn.Linear: kaiming_uniform(a=sqrt(5)) == U(±1/sqrt(fan_in))
        if W_init is None:
            W = self._uniform((self.out_features, self.in_features), bound)
        else:
            _check_weight(W_init, self.in_features, self.out_features)
            W = W_init.detach()
        W = W.to(dtype=self.S1s.dtype, device=self.S1s.device)
        factors = linear_factors(W, self.num_terms, self.low_rank, init=self.init, generator=self._generator)
        for dst, src in zip((self.S1s, self.S2s, self.U1s, self.U2s), factors):
            dst.copy_(src)
        if self.bias is not None:
            self.bias.copy_(self._uniform((self.out_features,), bound))

    def _uniform(self, shape, bound):
        device = self._generator.device if self._generator is not None else "cpu"
        return torch.empty(shape, dtype=self.S1s.dtype, device=device).uniform_(-bound, bound, generator=self._generator)

    @classmethod
    def from_linear(cls, linear, num_terms, low_rank, *, init="sketch", seed=None, generator=None):
        """A sketched layer approximating ``linear`` (weights and bias copied, same dtype and device).

        Args:
            linear: the ``nn.Linear`` to approximate (not modified).
            num_terms: ``L``, as in the constructor.
            low_rank: ``k``, as in the constructor.
            init: ``"sketch"`` (unbiased random sketch, for training) or ``"svd"`` (the best approximation
                of rank ``2·num_terms·low_rank``: the truncated SVD of that rank).
            seed: private generator seed, as in the constructor.
            generator: generator to draw from, as in the constructor.

        Returns:
            A new layer of this class (``SKLinear`` or ``SKLinear_triton``).

        Raises:
            TypeError: ``linear`` is not an ``nn.Linear``.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        layer = cls(linear.in_features, linear.out_features, num_terms, low_rank, W_init=linear.weight,
                    bias=linear.bias is not None, dtype=linear.weight.dtype, device=linear.weight.device,
                    seed=seed, generator=generator, init=init)
        if linear.bias is not None:
            with torch.no_grad():
                layer.bias.copy_(linear.bias)
        return layer

    def forward(self, x):
        """Apply the layer: ``torch.ops.panther.sketched_linear(x, S1s, S2s, U1s, U2s, bias)``.

        Args:
            x: input of shape ``(..., in_features)``, on the layer's device.

        Returns:
            Tensor of shape ``(..., out_features)``.

        Raises:
            TypeError: ``x`` is not a tensor, or (outside autocast) its dtype is not the layer's.
            ValueError: the last dimension of ``x`` is not ``in_features``, or ``x`` is on another device.
        """
        self._check_input(x)
        return torch.ops.panther.sketched_linear(x, self.S1s, self.S2s, self.U1s, self.U2s, self.bias)

    def _check_input(self, x):
        name = type(self).__name__
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}: input must be a torch.Tensor, got {type(x).__name__}")
        if x.shape[-1:] != (self.in_features,):
            raise ValueError(f"{name} expects input of shape (..., in_features={self.in_features}), "
                             f"got {tuple(x.shape)}")
        input_matches(name, "input", x, self.S1s)

    def effective_weight(self):
        """The dense (out_features, in_features) weight this layer applies, in ``nn.Linear`` layout (for
        inspection, or to fold the layer into one ``F.linear`` for inference)."""
        return linear_weight(self.S1s, self.S2s, self.U1s, self.U2s)

    @property
    def weight(self):
        """:meth:`effective_weight`, read-only: code written for ``nn.Linear`` reads ``layer.weight`` (often
        only its dtype or device, as Hugging Face's T5 and vision embeddings do) and keeps working. Each
        read builds the dense matrix (``2·L·k·in·out`` FLOPs, differentiable); under ``torch.compile`` an
        unused product is dropped."""
        return self.effective_weight()

    def register_parameter(self, name, param):
        # assigning a Parameter as ``weight`` (weight tying: Hugging Face's tie_weights) lands here
        if name == "weight":
            raise TypeError(f"{type(self).__name__} has no dense weight to set or tie: its weight is the product of "
                            f"its factors. To keep a tied layer (an lm_head sharing the embedding's weight), leave "
                            f"it dense: a policy entry such as {{'lm_head': 'skip'}}")
        super().register_parameter(name, param)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, num_terms={self.num_terms}, "
                f"low_rank={self.low_rank}, bias={self.bias is not None}, init={self.init!r}")


class SKLinear_triton(SKLinear):
    """SKLinear whose CUDA forward and backward are panther's fused Triton kernels.

    ``panther::sketched_linear_triton_fwd`` (``inductor_ext/triton_linear.py``) reads x once and writes
    y once, keeping the rank-2Lk intermediate on chip; the backward's
    ``panther::sketched_linear_triton_grads`` reads the upstream gradient once. They are ``triton_op``
    kernels, so Inductor inlines them under ``torch.compile``. CPU tensors take the same ops' two-GEMM
    torch branch, so results match SKLinear's. Unlike the public library's version, ``U2s`` has the
    same ±1/sqrt(k) scale as SKLinear's, so the init is unbiased. Same constructor arguments as
    :class:`SKLinear`; needs ``triton``.
    """

    def __init__(self, in_features, out_features, num_terms, low_rank, W_init=None, bias=True, dtype=None,
                 device=None, *, seed=None, generator=None, init="sketch"):
        super().__init__(in_features, out_features, num_terms, low_rank, W_init, bias, dtype, device, seed=seed,
                         generator=generator, init=init)
        # Imported on first construction: registering the triton_ops loads torch._inductor, which a plain
        # `import panther` should not pay for.
        global _sketched_linear_triton
        from inductor_ext.triton_linear import sketched_linear_triton as _sketched_linear_triton

    def forward(self, x):
        """Apply the layer through the Triton ops (CUDA) or their two-GEMM torch branch (CPU).

        Args:
            x: input of shape ``(..., in_features)``.

        Returns:
            Tensor of shape ``(..., out_features)``.

        Raises:
            TypeError: ``x`` is not a tensor, or (outside autocast) its dtype is not the layer's.
            ValueError: the last dimension of ``x`` is not ``in_features``, or ``x`` is on another device.
        """
        self._check_input(x)
        return _sketched_linear_triton(x, self.S1s, self.S2s, self.U1s, self.U2s, self.bias)


_sketched_linear_triton = None  # set by SKLinear_triton.__init__


def _check_weight(W, in_features, out_features):
    if not isinstance(W, torch.Tensor):
        raise TypeError(f"W_init must be a torch.Tensor, got {type(W).__name__}")
    if tuple(W.shape) != (out_features, in_features):
        hint = " (it looks transposed)" if tuple(W.shape) == (in_features, out_features) else ""
        raise ValueError(f"W_init must have nn.Linear layout (out_features, in_features) = "
                         f"({out_features}, {in_features}), got {tuple(W.shape)}{hint}")
    if not W.is_floating_point():
        raise TypeError(f"W_init must be a floating-point tensor, got {W.dtype}")
