"""Random sketching operators and the factor formulas of the sketched layers.

* Operators, all scaled so that ``E[SᵀS] = I``: dense (:func:`scaled_sign_sketch`, :func:`gaussian_skop`,
  :func:`dense_sketch_operator`), sparse (:func:`count_skop`, :func:`sjlt_skop`,
  :func:`sparse_sketch_operator`) and structured (:func:`srht`); :func:`sketch_tensor` applies one along
  an axis of a tensor.
* Factors: :func:`linear_factors` / :func:`conv2d_factors` compute the factors of ``SKLinear`` /
  ``SKConv2d`` from a dense weight (``init="sketch"`` or ``"svd"``); ``panther.nn``, ``panther.convert``
  and the compile backend all build their layers through them.
* :func:`orthogonal_random_features`: the random features of ``RandMultiHeadAttention``.

Every random draw takes ``generator=`` (default: torch's global RNG) and never reseeds the global RNG.
"""
from . import core as _core
from .core import *  # noqa: F401,F403
from .factors import conv2d_factors, linear_factors  # noqa: F401
from .random_features import orthogonal_random_features  # noqa: F401

__all__ = [*_core.__all__, "conv2d_factors", "linear_factors", "orthogonal_random_features"]
