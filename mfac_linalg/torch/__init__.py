"""mfac_linalg.torch: the PyTorch front end (optional; needs the ``torch`` extra).

* :class:`MFAC` -- a ``torch.optim.Optimizer`` with the M-FAC update (docs/math.md §10);
* :func:`per_sample_gradients` -- an (n, d) tensor in ``parameters_to_vector`` order;
* :func:`capture_statistics`, :func:`kronecker_preconditioner` -- per-layer inputs and
  output gradients of ``nn.Linear`` / ``nn.Conv2d`` and the Kronecker family built
  from them, acting in ``parameters_to_vector`` order;
* :func:`prune` -- Optimal Brain Surgeon pruning of a model (docs/math.md §3, §9);
* :class:`ParameterLayout` -- converters between PyTorch's ``parameters_to_vector``
  order (per layer: weight flattened, then bias) and the Kronecker operators' internal
  order ([W | b] row-major, bias entries interleaved).

Tensors in, tensors out: results come back on the caller's device and in its dtype.
"""
try:
    import torch as _torch  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised only without torch
    raise ImportError(
        "mfac_linalg.torch needs PyTorch, which is not installed; install the 'torch' "
        "extra: pip install 'mfac-linalg[torch]'") from exc

from .layout import LayerSpec, ParameterLayout, PermutedOperator, kronecker_index
from .optim import MFAC
from .capture import (CapturedStatistics, LayerStatistics, capture_statistics,
                      kronecker_preconditioner, per_sample_gradients)
from .prune import PruneMasks, PruneReport, PruneStage, prune

__all__ = ["LayerSpec", "ParameterLayout", "PermutedOperator", "kronecker_index", "MFAC",
           "per_sample_gradients", "capture_statistics", "kronecker_preconditioner",
           "CapturedStatistics", "LayerStatistics", "prune", "PruneReport", "PruneStage",
           "PruneMasks"]
