"""Random sketching operators (seedable with ``generator=``; never touch the global RNG state)."""
from .core import *  # noqa: F401,F403
from .factors import conv2d_factors, linear_factors  # noqa: F401
