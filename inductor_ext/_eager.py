"""When an eager call may launch a Triton kernel directly, outside its custom op."""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode


def direct_launch_ok() -> bool:
    """True for plain eager calls. Under ``torch.compile`` the custom op must appear in the graph (so
    Inductor inlines its kernel); under a dispatch mode (``FlopCounterMode``, fake tensors) the mode
    must see the op; under a ``torch.func`` transform (``vmap``) the op has a fallback that an
    ``autograd.Function`` without a vmap rule lacks."""
    return (not torch.compiler.is_compiling() and _get_current_dispatch_mode() is None
            and not torch._C._are_functorch_transforms_active())
