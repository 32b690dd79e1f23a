"""SKConv2d: a sketched, cheaper drop-in for ``nn.Conv2d`` (groups=1)."""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ..sketch.factors import INITS, conv2d_factors, conv2d_weight
from ._checks import as_int as _as_int
from ._checks import input_matches, make_generator, positive_int

__all__ = ["SKConv2d"]


_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def _positive_int(value, name):
    try:
        return positive_int(name, value)
    except (TypeError, ValueError) as e:
        raise type(e)(f"SKConv2d: {e}") from None


def _int_pair(value, name, minimum):
    what = "positive" if minimum == 1 else "non-negative"
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"SKConv2d: {name} must be an int or a pair of {what} ints, got {value!r}")
        items = tuple(value)
    else:
        items = (value, value)
    out = tuple(_as_int(v) for v in items)
    if any(v is None for v in out):
        raise TypeError(f"SKConv2d: {name} must be an int or a pair of {what} ints, got {value!r}")
    if any(v < minimum for v in out):
        raise ValueError(f"SKConv2d: {name} must be an int or a pair of {what} ints, got {value!r}")
    return out


class SKConv2d(nn.Module):
    r"""Sketched 2-D convolution.

    .. math::
        \mathrm{out}[b, o] = \frac{1}{2L} \sum_{i<2L,\, r<k} U1s[i, r, o]\;
        (x \star S1s)[b,\, i k + r] + \mathrm{bias}[o]

    ``S1s`` (2Lk, C_in, kh, kw) is learnable, ``U1s`` (2L, k, C_out) is a fixed buffer of independent
    ±1/sqrt(k) signs (``L = num_terms``, ``k = low_rank``). The layer is initialised from a dense kernel
    ``W`` (``W_init`` in ``nn.Conv2d`` layout, or ``nn.Conv2d``'s default init) as
    ``S1s[i·k+r] = Σ_o W[o]·U1s[i, r, o]``, so at init the output is an unbiased estimate of
    ``conv2d(x, W) + bias``. Cost: ``4·P·L·k·(C_in·kh·kw + C_out)`` FLOPs for ``P`` output pixels versus
    ``2·P·C_out·C_in·kh·kw`` for the dense conv.

    Args:
        in_channels: ``C_in``, as in ``nn.Conv2d``.
        out_channels: ``C_out``, as in ``nn.Conv2d``.
        kernel_size: int or pair ``(kh, kw)``.
        stride: int or pair (default 1).
        padding: int, pair, ``"valid"`` or ``"same"`` with ``nn.Conv2d``'s meaning (``"same"`` pads even
            kernels asymmetrically, extra on the right/bottom, and needs ``stride=1``).
        bias: learnable bias (drawn like ``nn.Conv2d``'s unless copied by :meth:`from_conv2d`).
        num_terms: ``L``, the number of sketch terms.
        low_rank: ``k``, the rank of each term; the sketch convolves to ``2·L·k`` channels.
        W_init: optional dense kernel ``(C_out, C_in, kh, kw)`` to approximate (default: drawn like
            ``nn.Conv2d``'s default init).
        dtype: of the parameters and buffers (default: torch's default dtype).
        device: of the parameters and buffers (default: CPU).
        dilation: int or pair (default 1).
        padding_mode: ``"zeros"`` (default), ``"reflect"``, ``"replicate"`` or ``"circular"``, as in
            ``nn.Conv2d``.
        groups: 1 only; taken so that ``nn.Conv2d``'s keyword arguments carry over.
        seed: an int that builds a private ``torch.Generator`` for the random draws.
        generator: a ``torch.Generator`` to draw from. With neither, torch's global RNG is used (never
            reseeded).
        init: ``"sketch"`` (random signs, unbiased) or ``"svd"`` (``U1s`` holds left singular vectors of
            the kernel reshaped to ``(C_out, C_in·kh·kw)``: the best approximation of rank ``2·L·k``).

    Raises:
        TypeError: a size that is not an int, ``bias`` not a bool, a non-floating ``dtype`` or ``W_init``.
        ValueError: a size ``<= 0``, ``groups != 1``, a bad ``padding`` string or ``padding_mode``,
            ``padding="same"`` with a stride, ``W_init`` of the wrong shape, an unknown ``init``, both ``seed``
            and ``generator``.

    Warns:
        UserWarning: when ``2·L·k·(C_in·kh·kw + C_out) >= C_out·C_in·kh·kw``, i.e. the sketch is not
            cheaper than the dense kernel (in numbers stored and in forward FLOPs).

    Shape:
        input ``(B, C_in, H, W)`` or unbatched ``(C_in, H, W)``; output ``(B, C_out, H_out, W_out)`` (or
        ``(C_out, H_out, W_out)``) with ``nn.Conv2d``'s output size. channels_last inputs give
        channels_last outputs.
    """

    __constants__ = ["in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "padding_mode",
                     "num_terms", "low_rank"]

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True, num_terms=1,
                 low_rank=64, W_init=None, dtype=None, device=None, *, dilation=1, seed=None, generator=None,
                 init="sketch", padding_mode="zeros", groups=1):
        super().__init__()
        if isinstance(groups, bool) or groups != 1:
            raise ValueError(f"SKConv2d: groups must be 1 (a grouped convolution has no sketched form here), "
                             f"got {groups!r}")
        self.in_channels = _positive_int(in_channels, "in_channels")
        self.out_channels = _positive_int(out_channels, "out_channels")
        self.num_terms = _positive_int(num_terms, "num_terms")
        self.low_rank = _positive_int(low_rank, "low_rank")
        self.kernel_size = _int_pair(kernel_size, "kernel_size", 1)
        self.stride = _int_pair(stride, "stride", 1)
        self.dilation = _int_pair(dilation, "dilation", 1)
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(f"SKConv2d: padding must be 'same', 'valid', an int or a pair of "
                                 f"non-negative ints, got {padding!r}")
            if padding == "same" and self.stride != (1, 1):
                raise ValueError("SKConv2d: padding='same' is not supported for strided convolutions "
                                 f"(stride={self.stride}); use an explicit padding")
            self.padding = padding
        else:
            self.padding = _int_pair(padding, "padding", 0)
        if padding_mode not in _PADDING_MODES:
            raise ValueError(f"SKConv2d: padding_mode must be one of {_PADDING_MODES}, got {padding_mode!r}")
        self.padding_mode = padding_mode
        if not isinstance(bias, bool):
            raise TypeError(f"SKConv2d: bias must be a bool, got {bias!r}")
        try:
            generator = make_generator(seed, generator)
        except (TypeError, ValueError) as e:
            raise type(e)(f"SKConv2d: {e}") from None
        if init not in INITS:
            raise ValueError(f"SKConv2d: init must be one of {INITS}, got {init!r}")
        self.init = init
        self._generator = generator
        dtype = dtype if dtype is not None else torch.get_default_dtype()
        if not dtype.is_floating_point:
            raise TypeError(f"SKConv2d: dtype must be a floating-point dtype, got {dtype}")
        device = torch.device(device) if device is not None else torch.device("cpu")

        kh, kw = self.kernel_size
        fan_in = self.in_channels * kh * kw
        rank = 2 * self.num_terms * self.low_rank
        dense = self.out_channels * fan_in
        if rank * (fan_in + self.out_channels) >= dense:
            warnings.warn(
                f"SKConv2d: the sketch holds 2*num_terms*low_rank*(C_in*kh*kw + C_out) = "
                f"{rank * (fan_in + self.out_channels)} values (learnable + fixed), not fewer than the "
                f"{dense} of the dense kernel, so it is not cheaper (forward FLOPs scale the same way); "
                f"use a smaller num_terms or low_rank",
                UserWarning, stacklevel=2,
            )
        if W_init is not None:
            if not isinstance(W_init, torch.Tensor):
                raise TypeError(f"SKConv2d: W_init must be a torch.Tensor or None, got {type(W_init).__name__}")
            expected = (self.out_channels, self.in_channels, kh, kw)
            if tuple(W_init.shape) != expected:
                raise ValueError(f"SKConv2d: W_init must have nn.Conv2d weight shape (out_channels, in_channels, "
                                 f"kh, kw) = {expected}, got {tuple(W_init.shape)}")
            if not W_init.is_floating_point():
                raise TypeError(f"SKConv2d: W_init must be a floating-point tensor, got {W_init.dtype}")

        self._work_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        self.register_buffer("U1s", torch.empty((2 * self.num_terms, self.low_rank, self.out_channels),
                                                dtype=dtype, device=device))
        self.S1s = nn.Parameter(torch.empty((rank, self.in_channels, kh, kw), dtype=dtype, device=device))
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_channels, dtype=dtype, device=device))
        else:
            self.register_parameter("bias", None)
        self._init_from(W_init, None, generator)

    # ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _init_from(self, weight, bias_value, generator):
        """Set U1s and S1s from a dense (C_out, C_in, kh, kw) kernel (drawn like nn.Conv2d when None)
        through :func:`panther.sketch.conv2d_factors`, and the bias (drawn like nn.Conv2d's when None).

        Everything random is drawn on the generator's device (CPU by default), so a seed gives the same
        layer on every device; the products are formed in >= fp32 and cast once at the end.
        """
        kh, kw = self.kernel_size
        fan_in = self.in_channels * kh * kw
        gen_device = generator.device if generator is not None else torch.device("cpu")
        if weight is None:
            # nn.Conv2d's default: kaiming_uniform_(a=sqrt(5)) on fan_in = C_in*kh*kw -> U(±1/sqrt(fan_in)).
            weight = torch.empty((self.out_channels, self.in_channels, kh, kw), dtype=self._work_dtype,
                                 device=gen_device)
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)
        weight = weight.detach().to(device=gen_device, dtype=self._work_dtype)
        S1s, U1s = conv2d_factors(weight, self.num_terms, self.low_rank, init=self.init, generator=generator)
        self.S1s.copy_(S1s)
        self.U1s.copy_(U1s)
        if self.bias is not None:
            if bias_value is None:
                bound = 1.0 / math.sqrt(fan_in)
                bias_value = torch.empty(self.out_channels, dtype=self._work_dtype, device=gen_device)
                bias_value.uniform_(-bound, bound, generator=generator)
            self.bias.copy_(bias_value.detach())

    def reset_parameters(self, W_init=None, generator=None):
        """Redraw the sketch (and, without ``W_init``, the seed kernel like ``nn.Conv2d``'s).

        Args:
            W_init: optional dense kernel ``(C_out, C_in, kh, kw)`` to approximate. The bias is redrawn
                like ``nn.Conv2d``'s either way.
            generator: source of the draws (default: the layer's own, else torch's global RNG).
        """
        self._init_from(W_init, None, generator if generator is not None else self._generator)

    @classmethod
    def from_conv2d(cls, conv, num_terms=1, low_rank=64, *, init="sketch", seed=None, generator=None):
        """Sketch an existing ``nn.Conv2d`` (its weight seeds ``S1s``; bias, stride, padding, dilation,
        dtype and device are copied).

        Args:
            conv: the ``nn.Conv2d`` to approximate (not modified).
            num_terms: ``L``, as in the constructor.
            low_rank: ``k``, as in the constructor.
            init: ``"sketch"`` or ``"svd"``, as in the constructor.
            seed: private generator seed, as in the constructor.
            generator: generator to draw from, as in the constructor.

        Returns:
            A new ``SKConv2d``.

        Raises:
            TypeError: ``conv`` is not an ``nn.Conv2d``.
            ValueError: ``conv`` has ``groups != 1``.
        """
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"SKConv2d.from_conv2d: conv must be an nn.Conv2d, got {type(conv).__name__}")
        if conv.groups != 1:
            raise ValueError(f"SKConv2d.from_conv2d: only groups=1 is supported, got groups={conv.groups}")
        weight = conv.weight
        layer = cls(conv.in_channels, conv.out_channels, tuple(conv.kernel_size), stride=tuple(conv.stride),
                    padding=conv.padding if isinstance(conv.padding, str) else tuple(conv.padding),
                    bias=conv.bias is not None, num_terms=num_terms, low_rank=low_rank, W_init=weight,
                    dtype=weight.dtype, device=weight.device, dilation=tuple(conv.dilation), seed=seed,
                    generator=generator, init=init, padding_mode=conv.padding_mode)
        if conv.bias is not None:
            with torch.no_grad():
                layer.bias.copy_(conv.bias.detach())
        return layer

    # ------------------------------------------------------------------------------------------------
    def _explicit_padding(self):
        """(op padding pair, F.pad tuple or None) reproducing nn.Conv2d's padding semantics: symmetric zero
        padding goes to the op; asymmetric ('same' on even kernels) or non-zero modes to an F.pad first."""
        if self.padding == "valid":
            return (0, 0), None
        if self.padding == "same":
            # total = d*(k-1); PyTorch puts total//2 on the left and the rest on the right.
            totals = [d * (k - 1) for d, k in zip(self.dilation, self.kernel_size)]
            (th, tw), (lh, lw) = totals, [t // 2 for t in totals]
            pad = (lw, tw - lw, lh, th - lh)
        else:
            (ph, pw) = self.padding
            pad = (pw, pw, ph, ph)
        if self.padding_mode == "zeros" and pad[0] == pad[1] and pad[2] == pad[3]:
            return (pad[2], pad[0]), None
        return (0, 0), pad

    def forward(self, x):
        """Apply the layer: ``torch.ops.panther.sketched_conv2d`` (one convolution to ``2·L·k`` channels and
        one channel mix); on CUDA ``panther::sketched_conv2d_triton`` (``inductor_ext.triton_conv``), which
        takes the tap GEMM for the calls it serves and is the same op otherwise.

        Args:
            x: ``(B, C_in, H, W)`` or unbatched ``(C_in, H, W)``.

        Returns:
            ``(B, C_out, H_out, W_out)`` (or ``(C_out, H_out, W_out)``), sized as ``nn.Conv2d``'s output.

        Raises:
            TypeError: ``x`` is not a tensor, or (outside autocast) its dtype is not the layer's.
            ValueError: ``x`` is not 3-D or 4-D, its channel count is not ``in_channels``, or it is on another
                device.
        """
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"SKConv2d: input must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() not in (3, 4):
            raise ValueError(f"SKConv2d: input must be (B, C_in, H, W) or (C_in, H, W), got shape {tuple(x.shape)}")
        if x.shape[-3] != self.in_channels:
            raise ValueError(f"SKConv2d: input has {x.shape[-3]} channels (dim {x.dim() - 3}) but in_channels="
                             f"{self.in_channels}")
        input_matches("SKConv2d", "input", x, self.S1s)
        padding, pad = self._explicit_padding()
        if pad is not None:
            x = F.pad(x, pad, mode="constant" if self.padding_mode == "zeros" else self.padding_mode)
        args = (x, self.S1s, self.U1s, self.bias, list(self.stride), list(padding), list(self.dilation))
        if x.is_cuda:
            # the Triton tap GEMM where it serves the call, else the same C++ op; imported here
            # because registering its triton_op loads torch._inductor
            from inductor_ext.triton_conv import sketched_conv2d_triton
            return sketched_conv2d_triton(*args)
        return torch.ops.panther.sketched_conv2d(*args)

    def effective_weight(self):
        """The dense (C_out, C_in, kh, kw) kernel this layer applies: ``Σ_{i,r} U1s[i,r,o]·S1s[i·k+r] / (2L)``
        (for inspection, or to fold the layer into one ``F.conv2d`` for inference)."""
        return conv2d_weight(self.S1s, self.U1s)

    @property
    def weight(self):
        """:meth:`effective_weight`, read-only, for code written for ``nn.Conv2d`` that reads
        ``layer.weight`` (Hugging Face's CLIP, ViT-style patch embeddings read its dtype). Each read builds
        the dense kernel; under ``torch.compile`` an unused one is dropped."""
        return self.effective_weight()

    def extra_repr(self):
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
             f"padding={self.padding!r}")
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode!r}"
        return s + (f", num_terms={self.num_terms}, low_rank={self.low_rank}, bias={self.bias is not None}, "
                    f"init={self.init!r}")
