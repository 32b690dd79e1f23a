"""The layers' CUDA kernels: the Triton ops of ``inductor_ext``, imported lazily."""
from __future__ import annotations

import importlib

import torch


def triton_op_or_none(module, name):
    """``module.name`` where CUDA exists and the module imports (it needs triton), else None.

    Registering a ``triton_op`` loads ``torch._inductor``: the layers call this at construction, and
    only where CUDA exists, so that CPU-only use never pays for that import.
    """
    if not torch.cuda.is_available():
        return None
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError:  # no triton: the C++ ops serve CUDA too
        return None
