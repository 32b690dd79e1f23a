"""panther: sketched (randomized numerical linear algebra) layers for PyTorch.

Eager use needs only ``panther.nn`` / ``panther.sketch``; the ``torch.compile`` backend
(``backend="panther"``) is found through its entry point and imported lazily.
"""
from . import ops  # noqa: F401  (loads panther._C and registers fake/autograd kernels)
from . import nn, sketch  # noqa: F401
from .conversion import convert  # noqa: F401  (eager module swap: the training path)
from .report import last_report  # noqa: F401

__version__ = "0.1.0"
