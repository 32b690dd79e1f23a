"""panther's torch.library ops (the ground floor).

Importing this package loads the native library ``panther._C`` (schemas + CPU/CUDA kernels,
registered in C++) and registers, per op module, the fake kernels, autograd formulas and the
plain-torch reference each op is tested against.
"""
import torch  # noqa: F401  (loads libtorch before the extension links against it)

from .. import _C  # noqa: F401  (dlopen: runs the TORCH_LIBRARY registrations)
from .linear import sketched_linear, sketched_linear_reference  # noqa: F401
from .conv import *  # noqa: F401,F403
from .attention import *  # noqa: F401,F403
