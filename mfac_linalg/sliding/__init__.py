"""The M-FAC sliding window: a façade (:mod:`.window`) over a ring buffer (:mod:`.buffer`,
its CUDA subclass :mod:`.cuda_buffer`) and the m x m engines of
:mod:`mfac_linalg._capacitance`; checkpoints in :mod:`.checkpoint`."""
from .window import SlidingWindowInverseFisher

__all__ = ["SlidingWindowInverseFisher"]
