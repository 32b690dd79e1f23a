"""panther's torch.library ops (the ground floor).

Importing this package loads the native library ``panther._C`` (schemas + CPU/CUDA kernels,
registered in C++) and registers, per op module, the fake kernels, autograd formulas and the
plain-torch reference each op is tested against.

The ops live in the ``torch.ops.panther`` namespace; the functions below call them with friendlier
arguments (ints for pairs, defaults) and document their shapes:

=====================================  =======================  ===================================
op                                     Python wrapper           plain-torch reference (test oracle)
=====================================  =======================  ===================================
``torch.ops.panther.sketched_linear``  :func:`sketched_linear`  :func:`sketched_linear_reference`
``torch.ops.panther.sketched_conv2d``  :func:`sketched_conv2d`  :func:`sketched_conv2d_reference`
``torch.ops.panther.rf_attention``     :func:`rf_attention`     :func:`rf_attention_reference`
``torch.ops.panther.srpe_filter``      :func:`srpe_filter`      :func:`srpe_filter_reference`
=====================================  =======================  ===================================

:func:`rf_feature_maps` gives the reference's random-feature maps phi(q), phi(k) as tensors (for
gluing them to other linear-attention kernels, as ``triton_attention_bench --peers`` does).

Generation: :func:`rf_causal_state` sums a prompt's keys into an :class:`RFState`, and
:func:`rf_attention_step` goes on from it a few positions (one token) at a time, in time and memory that do not
grow with the positions before (``panther.nn.RandAttentionState`` keeps one per layer).

Every op runs on CPU and CUDA (ATen kernels), under autocast, and has a fake kernel and an autograd
formula, so it works under ``torch.compile`` and ``torch.export``.
"""
import torch  # noqa: F401  (loads libtorch before the extension links against it)

from .. import _C  # noqa: F401  (dlopen: runs the TORCH_LIBRARY registrations)
from . import linear as _linear
from . import conv as _conv
from . import attention as _attention
from .linear import *  # noqa: F401,F403
from .conv import *  # noqa: F401,F403
from .attention import *  # noqa: F401,F403

__all__ = [*_linear.__all__, *_conv.__all__, *_attention.__all__]
