"""Compatibility path: the public Panther library exposed sinSRPE as panther.nn.pawXimpl.sinSRPE."""
from .srpe import sinSRPE  # noqa: F401
