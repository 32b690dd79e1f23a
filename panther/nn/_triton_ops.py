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


class LazyTritonOp:
    """One Triton op of ``inductor_ext`` for a layer: ``load()`` imports it (``triton_op_or_none``; the
    layer calls it at construction), ``for_input`` picks it for CUDA inputs."""

    def __init__(self, module, name):
        self.module, self.name = module, name
        self.op = None   # set by load() where CUDA and triton exist

    def load(self):
        if self.op is None:
            self.op = triton_op_or_none(self.module, self.name)
        return self.op

    def for_input(self, x, otherwise):
        """The Triton op for a CUDA tensor ``x`` once loaded, else ``otherwise``."""
        return self.op if x.is_cuda and self.op is not None else otherwise
