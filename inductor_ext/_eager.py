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


def grad_needed(*tensors) -> bool:
    """Whether autograd records a call on these arguments: grad mode on and some tensor among them
    requiring a gradient (non-tensors, e.g. None, are skipped). Eager calls that need none launch
    their kernels without an ``autograd.Function``, whose Python costs CPU time per call."""
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)
