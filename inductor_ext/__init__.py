"""Inductor extensions for panther ops: decompositions (``.decompositions``) and Triton kernels.

Layering: this package imports ``panther.ops`` only; it never imports ``fx_passes`` or ``panther.nn``.
Submodules load on first use (``panther.nn`` imports the Triton kernels; only the backend needs the
decompositions).
"""
__all__ = ["panther_decompositions", "inductor_decompositions"]


def __getattr__(name):
    if name in __all__:
        from . import decompositions

        return getattr(decompositions, name)
    raise AttributeError(f"module 'inductor_ext' has no attribute {name!r}")
