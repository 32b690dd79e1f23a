"""Random-feature attention ops: fake kernels, autograd, plain-torch references (issue [B])."""
__all__ = []
