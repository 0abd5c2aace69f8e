"""Column-sharded operators over a communicator (docs/math.md §6, docs/distributed.md).

Rank p of P holds the columns J_p of the gradients and the matching slices of every
vector; only m-sized float64 data moves between ranks.

* :class:`ColumnLayout`: which global columns each rank holds (contiguous,
  parameter-aligned, or FSDP/ZeRO-sharded), with ``split`` / ``gather``.
* Communicators: :class:`SingleProcessComm`, :class:`TorchComm`
  (``torch.distributed``: NCCL, gloo), :class:`MPIComm` (``mpi4py``), :func:`as_comm`.
* :class:`ShardedStaticInverseFisher` and :class:`ShardedSlidingWindowInverseFisher`;
  their ``fisher()`` is a :class:`ShardedFisherOperator`.
* Failure behaviour: :class:`RemoteRankError`, :class:`ReplicaDivergenceError`.
"""
from .comm import (Communicator, MPIComm, RemoteRankError, ReplicaDivergenceError,
                   SingleProcessComm, TorchComm, agree, allgather, as_comm, check_replicas,
                   state_digest)
from ._base import ShardedFisherOperator
from .layout import ColumnLayout
from .sharded import NotPositiveDefinite, ShardedStaticInverseFisher
from .window import ShardedSlidingWindowInverseFisher

__all__ = [
    "ColumnLayout", "Communicator", "SingleProcessComm", "TorchComm", "MPIComm", "as_comm",
    "RemoteRankError", "ReplicaDivergenceError", "agree", "allgather", "check_replicas",
    "state_digest", "ShardedStaticInverseFisher", "ShardedSlidingWindowInverseFisher",
    "ShardedFisherOperator", "NotPositiveDefinite",
]
