"""Argument validation shared by the sketched layers: clear errors naming the argument."""
from __future__ import annotations

import operator

import torch


def as_int(value):
    """An integral value (int, numpy integer, ...) as int; None for anything else, bools included."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def positive_int(name, value):
    """``value`` as an int > 0, else TypeError/ValueError naming ``name``."""
    v = as_int(value)
    if v is None:
        raise TypeError(f"{name} must be a positive int, got {type(value).__name__} {value!r}")
    if v <= 0:
        raise ValueError(f"{name} must be a positive int, got {value}")
    return v


def make_generator(seed, generator):
    """The private generator for a layer's random draws: ``generator``, or one seeded with ``seed``.

    ``None`` (neither given) means torch's global RNG, so ``torch.manual_seed`` makes construction
    reproducible exactly like ``nn.Linear``'s init; the global RNG is never reseeded.
    """
    if seed is not None and generator is not None:
        raise ValueError("pass at most one of seed= and generator=")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        return generator
    if seed is not None:
        if as_int(seed) is None:
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        return torch.Generator().manual_seed(as_int(seed))
    return None


def input_matches(layer, name, x, param):
    """ValueError unless input ``x`` is on ``param``'s device, TypeError unless it has ``param``'s dtype
    (outside autocast: there the ops cast their inputs themselves). Without these checks the ops fail deep
    inside with a RuntimeError, or, for a meta input, not at all."""
    if x.device != param.device:
        raise ValueError(f"{layer}: {name} is on device {x.device} but the layer's parameters are on device "
                         f"{param.device}; move one to the other")
    if not x.is_floating_point():  # checked first: autocast leaves integer inputs alone
        raise TypeError(f"{layer}: {name} must be a floating-point tensor, got dtype {x.dtype}; "
                        f"cast it (x.to({param.dtype}))")
    if x.dtype != param.dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(f"{layer}: {name} has dtype {x.dtype} but the layer's parameters are {param.dtype}; "
                        f"cast the input (x.to({param.dtype})) or the layer (layer.to({x.dtype}))")
