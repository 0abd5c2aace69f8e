"""mfac_linalg: cheap inverse (empirical) Fisher operators for NumPy and CuPy.

See README.md and docs/ for the mathematics and the API.
"""
from . import distributed, obs, testing
from ._operator import Operator, OutOfRangeError, ProductOperator, ScaledOperator, SumOperator
from .blockwise import BlockInverseFisher
from .kronecker import (ConvergenceWarning, block_diag, deflation, ekfac, fisher_error, kfac,
                        kfac_corrected, kpsvd, lanczos)
from ._capacitance import NotPositiveDefinite
from .sliding import SlidingWindowInverseFisher
from .static import FisherOperator, StaticInverseFisher

__version__ = "0.1.0"

__all__ = [
    "Operator", "OutOfRangeError", "FisherOperator", "SumOperator", "ScaledOperator",
    "ProductOperator",
    "StaticInverseFisher", "SlidingWindowInverseFisher", "BlockInverseFisher", "obs",
    "testing", "distributed",
    "kfac", "ekfac", "kpsvd", "deflation", "kfac_corrected", "fisher_error", "block_diag",
    "lanczos", "ConvergenceWarning", "NotPositiveDefinite",
    "__version__",
]
