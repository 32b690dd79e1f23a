"""Sketched layers: drop-in, cheaper versions of nn.Linear, nn.Conv2d and nn.MultiheadAttention."""
from .linear import SKLinear, SKLinear_triton
from .conv import SKConv2d
from .attention import RandAttentionState, RandMultiHeadAttention
from .srpe import sinSRPE

__all__ = ["SKLinear", "SKLinear_triton", "SKConv2d", "RandMultiHeadAttention", "RandAttentionState", "sinSRPE"]
