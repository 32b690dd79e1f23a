"""Argument validation shared by the sketched layers: clear errors naming the argument."""
from __future__ import annotations

import torch


def positive_int(name, value):
    """``value`` as an int > 0, else TypeError/ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a positive int, got {type(value).__name__} {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value}")
    return value


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
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        return torch.Generator().manual_seed(seed)
    return None
