"""Inductor extensions for panther ops: decompositions (and, on GPU, Triton kernels).

Layering: this package imports ``panther.ops`` only; it never imports ``fx_passes`` or ``panther.nn``.
"""
from .decompositions import inductor_decompositions, panther_decompositions  # noqa: F401

__all__ = ["panther_decompositions", "inductor_decompositions"]
