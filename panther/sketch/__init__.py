"""Random sketching operators and the factor formulas of the sketched layers.

* Operators, all scaled so that ``E[SᵀS] = I``: dense (:func:`scaled_sign_sketch`, :func:`gaussian_skop`,
  :func:`dense_sketch_operator`), sparse (:func:`count_skop`, :func:`sjlt_skop`,
  :func:`sparse_sketch_operator`) and structured (:func:`srht`); :func:`sketch_tensor` applies one along
  an axis of a tensor.
* Factors: :func:`linear_factors` / :func:`conv2d_factors` compute the factors of ``SKLinear`` /
  ``SKConv2d`` from a dense weight (``init="sketch"`` or ``"svd"``); ``panther.nn``, ``panther.convert``
  and the compile backend all build their layers through them; :func:`linear_weight` /
  :func:`conv2d_weight` give the dense weight factors apply, and :func:`relative_error` how far it is from
  the original (the reports' ``err``).
* :func:`orthogonal_random_features`: the random features of ``RandMultiHeadAttention``.

Every random draw takes ``generator=`` (default: torch's global RNG) and never reseeds the global RNG.
"""
from . import core as _core
from .core import *  # noqa: F401,F403
from .factors import conv2d_factors, conv2d_weight, linear_factors, linear_weight, relative_error  # noqa: F401
from .random_features import orthogonal_random_features  # noqa: F401

__all__ = [*_core.__all__, "conv2d_factors", "linear_factors", "conv2d_weight", "linear_weight", "relative_error",
           "orthogonal_random_features"]
