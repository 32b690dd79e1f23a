"""Autocast for the Triton ops, which have no autocast kernel of their own."""
from __future__ import annotations

import torch
from torch import Tensor


def autocast_call(fn, *args):
    """``fn(*args)`` as autocast's lower-precision policy runs an op: when autocast is on for the
    first argument's device, every floating-point tensor argument is cast to autocast's dtype and
    ``fn`` runs with autocast off; otherwise ``fn(*args)`` as is."""
    first = args[0]
    if not (isinstance(first, Tensor) and torch.is_autocast_enabled(first.device.type)):
        return fn(*args)
    dtype = torch.get_autocast_dtype(first.device.type)
    cast = [a.to(dtype) if isinstance(a, Tensor) and a.is_floating_point() else a for a in args]
    with torch.autocast(first.device.type, enabled=False):
        return fn(*cast)
