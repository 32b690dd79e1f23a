"""Sketched conv2d op: fake kernel, autograd, plain-torch reference (filled in by issue [B])."""
__all__ = []
