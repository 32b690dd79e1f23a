"""Random sketching operators (seedable with ``generator=``; never touch the global RNG state)."""
from . import core as _core
from .core import *  # noqa: F401,F403
from .factors import conv2d_factors, linear_factors  # noqa: F401
from .random_features import orthogonal_random_features  # noqa: F401

__all__ = [*_core.__all__, "conv2d_factors", "linear_factors", "orthogonal_random_features"]
