"""Random sketching operators (seedable with ``generator=``; never touch the global RNG state)."""
from .core import *  # noqa: F401,F403
from .core import __all__  # noqa: F401
