"""A small communicator protocol and its adapters (docs/math.md §6).

The sharded operators move only small float64 data between ranks: the m x m Gram
matrix once, m numbers (times k right-hand sides) per product or step, a few
flags.  They need five things of a communicator, and nothing else:

``rank``, ``size``
    This process's rank and the number of ranks P.
``allreduce_sum(buf)``
    Sum a contiguous float64 array over the ranks, in place; every rank gets
    the *same bits* (see "Bitwise-identical results" below).  Returns ``buf``.
``broadcast(buf, root=0)``
    Copy ``root``'s contiguous float64 array into every rank's ``buf``, in place.
``barrier()``
    Wait for every rank.

Adapters: :class:`SingleProcessComm` (P = 1, for tests and code that runs both
ways), :class:`TorchComm` (a ``torch.distributed`` process group: NCCL on GPUs,
gloo on CPUs) and :class:`MPIComm` (an ``mpi4py`` communicator).  Any object with
the five members above works too; :func:`as_comm` picks the adapter.

Bitwise-identical results
-------------------------
The replicated m x m state stays bitwise identical on every rank only if every
rank receives the same bits from each all-reduce.  The usual algorithms give that
(ring and tree all-reduces reduce each element once and send that one value to
everyone), but no library promises it in general.  ``reduction="reduce_broadcast"``
makes it true by construction (sum onto rank 0, then broadcast: two collectives
instead of one); the default ``"allreduce"`` trusts the library, and
:func:`check_replicas` detects a divergence cheaply at the interval you choose.
"""
from __future__ import annotations

import hashlib

import numpy as np

from .. import _backend as B
from .. import _validate as V

__all__ = ["Communicator", "SingleProcessComm", "TorchComm", "MPIComm", "as_comm",
           "RemoteRankError", "ReplicaDivergenceError", "agree", "check_replicas",
           "state_digest", "allgather"]

_REDUCTIONS = ("allreduce", "reduce_broadcast")


class RemoteRankError(RuntimeError):
    """Another rank failed during a collective call; this rank's state is unchanged.

    The failing rank raises its own exception; every other rank raises this one,
    so that no rank goes on alone (see :func:`agree`).  A subclass of ``RuntimeError``.

    Parameters
    ----------
    ranks : iterable of int
        The ranks that failed.
    what : str
        The name of the abandoned operation, for the message.

    Attributes
    ----------
    ranks : list of int
        The ranks that failed.

    Examples
    --------
    Rank 0 of two, whose partner (simulated here) reports a failure in :func:`agree`:

    >>> import numpy as np
    >>> from mfac_linalg.distributed import Communicator, RemoteRankError, agree
    >>> class PartnerFails(Communicator):
    ...     rank, size = 0, 2
    ...     def _allreduce_sum(self, buf):
    ...         buf[1] += 1.0                       # rank 1's failure flag
    ...     def _broadcast(self, buf, root):
    ...         pass
    >>> try:
    ...     agree(PartnerFails(), None, "step")
    ... except RemoteRankError as err:
    ...     print(err.ranks)
    [1]
    """

    def __init__(self, ranks, what):
        self.ranks = list(ranks)
        super().__init__(f"rank(s) {self.ranks} failed during {what} (see the error on "
                         "that rank); the call was abandoned on every rank and the "
                         "state left as it was")


class ReplicaDivergenceError(RuntimeError):
    """The replicated m x m state differs between ranks (raised on every rank).

    Raised by :func:`check_replicas` (and the sharded operators' ``check_replicas``)
    when a rank's state digest differs from rank 0's.  A subclass of ``RuntimeError``;
    the remedy is to rebuild the state (``refresh()``) or reload a checkpoint on every
    rank.

    Parameters
    ----------
    digests : mapping of int to str
        Each rank's 64-bit state digest (hex).
    ranks : iterable of int
        The ranks whose state differs from rank 0's.
    what : str
        The name of the checked state, for the message.

    Attributes
    ----------
    digests : dict of int to str
        Each rank's state digest (hex).
    ranks : list of int
        The ranks whose state differs from rank 0's.

    Examples
    --------
    Rank 0 of two, whose partner (simulated here) holds a different state:

    >>> import numpy as np
    >>> from mfac_linalg.distributed import (Communicator, ReplicaDivergenceError,
    ...                                      check_replicas)
    >>> class PartnerDiffers(Communicator):
    ...     rank, size = 0, 2
    ...     def _allreduce_sum(self, buf):
    ...         buf[1] = buf[0] + 1.0               # rank 1's digest differs
    ...     def _broadcast(self, buf, root):
    ...         pass
    >>> try:
    ...     check_replicas(PartnerDiffers(), [np.eye(2)])
    ... except ReplicaDivergenceError as err:
    ...     print(err.ranks, sorted(err.digests))
    [1] [0, 1]
    """

    def __init__(self, digests, ranks, what):
        self.digests = dict(digests)
        self.ranks = list(ranks)
        super().__init__(f"{what}: the replicated state of rank(s) {self.ranks} differs from "
                         f"rank 0's (digests {self.digests}); rebuild it (refresh()) or reload "
                         "a checkpoint on every rank")


class Communicator:
    """Base class of the adapters; documents the protocol (see the module docstring).

    Subclasses set ``rank`` and ``size`` and implement ``_allreduce_sum``,
    ``_broadcast`` and ``barrier``; the public methods check the buffer once.  The
    base class itself is the one-process communicator (every collective the identity).

    Examples
    --------
    A communicator over anything that can sum float64 buffers:

    >>> import numpy as np
    >>> from mfac_linalg.distributed import Communicator
    >>> class Doubling(Communicator):          # two ranks holding the same data
    ...     rank, size = 0, 2
    ...     def _allreduce_sum(self, buf):
    ...         buf *= 2
    ...     def _broadcast(self, buf, root):
    ...         pass
    >>> Doubling().allreduce_sum(np.array([1.0, 3.0]))
    array([2., 6.])
    """

    rank = 0
    size = 1

    def __init__(self):
        pass

    def allreduce_sum(self, buf):
        """Sum ``buf`` (contiguous float64, NumPy or CuPy) over the ranks in place.

        Every rank must call it with a buffer of the same shape.  Returns ``buf``.
        Cost: one all-reduce of ``buf.size`` float64 numbers.
        """
        self._check_buffer(buf, "buf")
        if self.size > 1:
            self._allreduce_sum(buf)
        return buf

    def broadcast(self, buf, root=0):
        """Overwrite ``buf`` on every rank with ``root``'s ``buf`` (contiguous float64)."""
        self._check_buffer(buf, "buf")
        root = V.integer(root, "root", minimum=0, maximum=self.size - 1)
        if self.size > 1:
            self._broadcast(buf, root)
        return buf

    def barrier(self):
        """Wait until every rank has called it."""

    @staticmethod
    def _check_buffer(buf, name):
        dtype = getattr(buf, "dtype", None)
        if dtype is None or not hasattr(buf, "shape"):
            raise TypeError(f"{name} must be a float64 array (NumPy or CuPy); got "
                            f"{type(buf).__name__}")
        if np.dtype(dtype) != np.float64:
            raise TypeError(f"{name} must be a float64 array; got dtype {dtype}")
        flags = getattr(buf, "flags", None)
        if flags is not None and not flags.c_contiguous:
            raise ValueError(f"{name} must be C-contiguous (reduced in place); got strides "
                             f"{getattr(buf, 'strides', '?')}")

    def __repr__(self):
        return f"<{type(self).__name__} rank={self.rank} size={self.size}>"


class SingleProcessComm(Communicator):
    """P = 1: every collective is the identity.

    Examples
    --------
    >>> import numpy as np
    >>> from mfac_linalg.distributed import SingleProcessComm
    >>> comm = SingleProcessComm()
    >>> comm.allreduce_sum(np.array([1.0, 2.0]))
    array([1., 2.])
    >>> comm.rank, comm.size
    (0, 1)
    """

    rank = 0
    size = 1

    def _allreduce_sum(self, buf):  # pragma: no cover - size is 1
        return buf

    def _broadcast(self, buf, root):  # pragma: no cover - size is 1
        return buf


class TorchComm(Communicator):
    """A ``torch.distributed`` process group (NCCL on GPUs, gloo on CPUs).

    Parameters
    ----------
    group : torch.distributed.ProcessGroup, optional
        The group (default: the default group, ``torch.distributed.init_process_group``
        must have run).
    reduction : {"allreduce", "reduce_broadcast"}
        ``all_reduce`` (one collective; the default) or ``reduce`` onto the group's
        rank 0 then ``broadcast`` (identical bits on every rank by construction).

    Raises
    ------
    RuntimeError
        ``torch.distributed`` is not initialised.
    ValueError
        ``reduction`` is not one of the two names.

    Notes
    -----
    Buffers cross zero-copy: a NumPy buffer through ``torch.from_numpy``, a CuPy (or
    any DLPack) buffer through ``torch.from_dlpack``, whose stream hand-shake orders
    the collective after the producer's work.  A CUDA collective is followed by a
    synchronisation of PyTorch's current stream, so that the result is there for the
    next user of the buffer whatever stream it runs on (the buffers are m-sized: the
    collective is latency-bound).  Under NCCL a host (NumPy) buffer is staged through
    the current CUDA device (an m-sized copy each way).

    Examples
    --------
    Under ``torchrun`` (every rank runs this; docs/distributed.md):

    >>> from mfac_linalg.distributed import TorchComm
    >>> import torch.distributed as dist                       # doctest: +SKIP
    >>> dist.init_process_group("nccl")                        # doctest: +SKIP
    >>> comm = TorchComm(reduction="reduce_broadcast")         # doctest: +SKIP
    """

    def __init__(self, group=None, *, reduction="allreduce"):
        import torch.distributed as dist  # noqa: PLC0415  (optional dependency)
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("TorchComm needs torch.distributed initialised "
                               "(torch.distributed.init_process_group, or torchrun)")
        self._dist = dist
        self._group = group
        self.reduction = V.choice(reduction, "reduction", _REDUCTIONS)
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self._backend_name = str(dist.get_backend(group))
        self._root0 = 0 if group is None else dist.get_global_rank(group, 0)

    @property
    def group(self):
        """The process group (None: the default group)."""
        return self._group

    def _global(self, root):
        return root if self._group is None else self._dist.get_global_rank(self._group, root)

    def _tensor(self, buf):
        import torch  # noqa: PLC0415
        if isinstance(buf, np.ndarray):
            t = torch.from_numpy(buf)
        elif isinstance(buf, torch.Tensor):
            t = buf
        else:
            t = torch.from_dlpack(buf)
        if self._backend_name == "nccl" and not t.is_cuda:
            dev = torch.device("cuda", torch.cuda.current_device())
            return t, t.to(dev)
        return t, t

    def _finish(self, t, staged):
        import torch  # noqa: PLC0415
        if staged is not t:
            t.copy_(staged.cpu())
        elif t.is_cuda:
            torch.cuda.current_stream(t.device).synchronize()

    def _allreduce_sum(self, buf):
        dist = self._dist
        t, s = self._tensor(buf)
        if self.reduction == "allreduce":
            dist.all_reduce(s, op=dist.ReduceOp.SUM, group=self._group)
        else:
            dist.reduce(s, dst=self._root0, op=dist.ReduceOp.SUM, group=self._group)
            dist.broadcast(s, src=self._root0, group=self._group)
        self._finish(t, s)
        return buf

    def _broadcast(self, buf, root):
        t, s = self._tensor(buf)
        self._dist.broadcast(s, src=self._global(root), group=self._group)
        self._finish(t, s)
        return buf

    def barrier(self):
        """``torch.distributed.barrier`` on the group."""
        self._dist.barrier(group=self._group)


class MPIComm(Communicator):
    """An ``mpi4py`` communicator (optional; ``mpi4py`` is imported lazily).

    Parameters
    ----------
    comm : mpi4py.MPI.Comm, optional
        Default ``MPI.COMM_WORLD``.
    reduction : {"allreduce", "reduce_broadcast"}
        ``Allreduce`` in place (the default) or ``Reduce`` onto rank 0 then ``Bcast``.

    Raises
    ------
    ImportError
        mpi4py is not installed.

    Notes
    -----
    Host buffers go to MPI as they are (``MPI.IN_PLACE``); device (CuPy) buffers
    are staged through the host (an m-sized copy each way, which also orders the
    collective after the device's work).

    Examples
    --------
    Under ``mpirun -n P python script.py``:

    >>> from mfac_linalg.distributed import MPIComm
    >>> from mpi4py import MPI                                 # doctest: +SKIP
    >>> comm = MPIComm(MPI.COMM_WORLD)                         # doctest: +SKIP
    """

    def __init__(self, comm=None, *, reduction="allreduce"):
        from mpi4py import MPI  # noqa: PLC0415  (optional dependency)
        self._MPI = MPI
        self._comm = MPI.COMM_WORLD if comm is None else comm
        self.reduction = V.choice(reduction, "reduction", _REDUCTIONS)
        self.rank = int(self._comm.Get_rank())
        self.size = int(self._comm.Get_size())

    @property
    def comm(self):
        """The mpi4py communicator."""
        return self._comm

    def _host(self, buf):
        if isinstance(buf, np.ndarray):
            return buf
        return np.ascontiguousarray(B.to_host(buf))

    def _allreduce_sum(self, buf):
        MPI, c = self._MPI, self._comm
        h = self._host(buf)
        if self.reduction == "allreduce":
            c.Allreduce(MPI.IN_PLACE, h, op=MPI.SUM)
        else:
            if self.rank == 0:
                c.Reduce(MPI.IN_PLACE, h, op=MPI.SUM, root=0)
            else:
                c.Reduce(h, None, op=MPI.SUM, root=0)
            c.Bcast(h, root=0)
        if h is not buf:
            buf[...] = _to_like(h, buf)
        return buf

    def _broadcast(self, buf, root):
        h = self._host(buf)
        self._comm.Bcast(h, root=root)
        if h is not buf:
            buf[...] = _to_like(h, buf)
        return buf

    def barrier(self):
        """``Barrier()`` on the communicator."""
        self._comm.Barrier()


def _to_like(host, like):
    """``host`` (NumPy) as an array of ``like``'s namespace (an m-sized explicit copy)."""
    _, be = B.asarray(like, "buf")
    return be.xp.asarray(host)


def as_comm(comm):
    """The :class:`Communicator` for ``comm``.

    Parameters
    ----------
    comm : None, Communicator, torch.distributed.ProcessGroup, mpi4py.MPI.Comm or a duck
        ``None`` gives :class:`SingleProcessComm`; a ``torch.distributed`` process group
        gives :class:`TorchComm`; an ``mpi4py`` communicator gives :class:`MPIComm`; an
        object with ``rank``, ``size``, ``allreduce_sum``, ``broadcast`` and ``barrier``
        is used as it is.

    Returns
    -------
    Communicator or the duck itself

    Raises
    ------
    TypeError
        Anything else (the message lists what is accepted).

    Examples
    --------
    >>> from mfac_linalg.distributed import as_comm
    >>> as_comm(None)
    <SingleProcessComm rank=0 size=1>
    """
    if comm is None:
        return SingleProcessComm()
    if isinstance(comm, Communicator):
        return comm
    mod = type(comm).__module__ or ""
    if mod.startswith("torch") and "ProcessGroup" in type(comm).__name__:
        return TorchComm(comm)
    if mod.startswith("mpi4py"):
        return MPIComm(comm)
    members = ("rank", "size", "allreduce_sum", "broadcast", "barrier")
    missing = [k for k in members if not hasattr(comm, k)]
    if missing:
        raise TypeError("comm must be None, a mfac_linalg.distributed Communicator, a "
                        "torch.distributed ProcessGroup, an mpi4py communicator or an object "
                        f"with {', '.join(members)}; got {type(comm).__name__} (missing "
                        f"{', '.join(missing)})")
    rank = V.integer(comm.rank, "comm.rank", minimum=0)
    V.integer(comm.size, "comm.size", minimum=rank + 1)
    return comm


# -- collective helpers used by the sharded operators -------------------------------------

def agree(comm, error, what):
    """Agree on success: one all-reduce of P flags.  Collective.

    Parameters
    ----------
    comm : Communicator
    error : BaseException or None
        The exception this rank met (None: success).
    what : str
        The name of the operation, for the message.

    Returns
    -------
    None
        When every rank succeeded.  If any rank failed, every rank raises: the failing
        ranks their own exception, the others :class:`RemoteRankError` naming the
        failing ranks.  Cost: one all-reduce of P float64 numbers.

    Examples
    --------
    >>> from mfac_linalg.distributed import SingleProcessComm, agree
    >>> agree(SingleProcessComm(), None, "my step")         # every rank succeeded
    """
    comm = as_comm(comm)
    if error is not None and not isinstance(error, BaseException):
        raise TypeError(f"error must be None or an exception; got {type(error).__name__}")
    flags = np.zeros(comm.size, dtype=np.float64)
    if error is not None:
        flags[comm.rank] = 1.0
    comm.allreduce_sum(flags)
    raise_failed(flags, error, what)


def raise_failed(flags, error, what):
    """Raise after a collective whose buffer carried one failure flag per rank."""
    bad = [int(p) for p in np.flatnonzero(np.asarray(B.to_host(flags)) != 0)]
    if error is not None:
        raise error
    if bad:
        raise RemoteRankError(bad, what)


def state_digest(*arrays):
    """A 64-bit digest (BLAKE2b) of the bytes of ``arrays``, as 4 float64 numbers.

    Parameters
    ----------
    *arrays : array_like
        NumPy or CuPy arrays (device arrays are copied to the host: meant for m x m
        state); their dtypes and shapes enter the digest too.

    Returns
    -------
    numpy.ndarray, shape (4,), float64
        16-bit pieces of the digest (integers, exact in float64 and in sums of a few
        thousand of them).  O(size of the arrays).

    Examples
    --------
    >>> import numpy as np
    >>> from mfac_linalg.distributed import state_digest
    >>> a = np.eye(2)
    >>> bool((state_digest(a) == state_digest(a.copy())).all())
    True
    """
    h = hashlib.blake2b(digest_size=8)
    for i, a in enumerate(arrays):
        host = np.ascontiguousarray(B.to_host(a))
        if host.dtype.hasobject:        # the bytes of an object array are addresses
            raise TypeError(f"arrays[{i}] must be a numeric or string array; got "
                            f"{type(a).__name__} (object dtype)")
        h.update(str(host.dtype).encode() + str(host.shape).encode())
        h.update(host.tobytes())
    return np.frombuffer(h.digest(), dtype=np.uint16).astype(np.float64)


def check_replicas(comm, arrays, what="state"):
    """Check that ``arrays`` (the replicated state) are bitwise equal on every rank.

    Collective: one all-reduce of a P x 4 table of digests (each rank fills its row),
    so every rank sees every digest and reaches the same verdict.  O(state size) for
    the digest.

    Parameters
    ----------
    comm : Communicator
    arrays : sequence of arrays
        This rank's copy of the replicated state.
    what : str
        A name for the message.

    Returns
    -------
    None
        When every rank holds the same bits.

    Raises
    ------
    ReplicaDivergenceError
        On every rank, when any rank differs from rank 0 (``.ranks`` lists them).

    Examples
    --------
    >>> import numpy as np
    >>> from mfac_linalg.distributed import SingleProcessComm, check_replicas
    >>> check_replicas(SingleProcessComm(), [np.eye(3)])
    """
    comm = as_comm(comm)
    if isinstance(arrays, (str, bytes)) or not hasattr(arrays, "__iter__"):
        raise TypeError(f"arrays must be a sequence of arrays; got {type(arrays).__name__}")
    table = np.zeros((comm.size, 4), dtype=np.float64)
    table[comm.rank] = state_digest(*arrays)
    comm.allreduce_sum(table)
    ranks = [p for p in range(comm.size) if not np.array_equal(table[p], table[0])]
    if ranks:
        digests = {p: table[p].astype(np.uint16).tobytes().hex() for p in range(comm.size)}
        raise ReplicaDivergenceError(digests, ranks, what)


#: most dimensions :func:`allgather` takes (its shape header has room for this many)
_GATHER_MAX_NDIM = 8


def allgather(part, layout, comm, *, axis=0):
    """The full array on every rank from each rank's slice ``part``.  Collective.

    One all-reduce of the whole (d along ``axis``) array in float64, each rank
    contributing its columns and zeros elsewhere: exact (a sum with zeros), and meant
    for checking and set-up, not the hot path (O(d) communication).

    Parameters
    ----------
    part : array_like
        This rank's slice: ``layout.local_dim(rank)`` entries along ``axis``.
    layout : ColumnLayout
    comm : Communicator
    axis : int
        0 for vectors (d,) and blocks (d, k), 1 for gradients (m, d).

    Returns
    -------
    array
        The full array, in ``part``'s dtype and namespace.

    Raises
    ------
    TypeError, ValueError
        On every rank, when any rank's ``part``, ``layout`` or ``axis`` is wrong (that
        rank its own error, the others :class:`RemoteRankError`), or when the ranks'
        parts differ in their number of dimensions, axis or sizes along the other axes
        (a header all-reduce of P x 11 numbers comes first).

    Examples
    --------
    >>> import numpy as np
    >>> from mfac_linalg.distributed import ColumnLayout, SingleProcessComm, allgather
    >>> lay = ColumnLayout.contiguous(3, 1)
    >>> allgather(np.array([1.0, 2.0, 3.0]), lay, SingleProcessComm())
    array([1., 2., 3.])
    """
    from .layout import ColumnLayout
    comm = as_comm(comm)
    P, rank = comm.size, comm.rank
    # every check first, its verdict in a flagged header (with the shape each rank
    # holds), so a bad argument on one rank fails every rank, never a lone one
    head = np.zeros(2 + _GATHER_MAX_NDIM, dtype=np.float64)   # ndim, axis, other sizes
    err = arr = None
    try:
        if not isinstance(layout, ColumnLayout):
            raise TypeError(f"layout must be a ColumnLayout; got {type(layout).__name__}")
        if layout.size != P:
            raise ValueError(f"layout has {layout.size} ranks but comm has {P}")
        arr, be = B.asarray(part, "part")
        ax = layout._axis(arr, axis, "part")
        if arr.ndim > _GATHER_MAX_NDIM:
            raise ValueError(f"part must have at most {_GATHER_MAX_NDIM} dimensions; got "
                             f"{arr.ndim}")
        want = list(arr.shape)
        want[ax] = layout.local_dim(rank)
        if list(arr.shape) != want:
            raise ValueError(f"part must have shape {tuple(want)} on rank {rank}; got "
                             f"{tuple(arr.shape)}")
        head[0], head[1] = arr.ndim, ax
        head[2:2 + arr.ndim] = arr.shape
        head[2 + ax] = -1                    # the sharded axis: sizes differ by design
    except Exception as exc:
        err = exc
    tab = np.zeros((P, 1 + head.size), dtype=np.float64)
    tab[rank, 0] = 0.0 if err is None else 1.0
    tab[rank, 1:] = head
    comm.allreduce_sum(tab)
    raise_failed(tab[:, 0], err, "allgather")
    if not (tab[:, 1:] == tab[0, 1:]).all():
        shapes = [tuple(int(v) for v in row[2:2 + int(row[0])]) for row in tab[:, 1:]]
        raise ValueError("part must have the same number of dimensions, axis and sizes "
                         "along the other axes on every rank; got shapes (the sharded axis "
                         f"as -1) {shapes} and axes {[int(v) for v in tab[:, 2]]} (rank "
                         "order)")
    return _gather_data(arr, be, layout, comm, ax)


def _gather_data(arr, be, layout, comm, ax):
    """The data all-reduce of :func:`allgather` for a part whose shape every rank shares
    (checked there by the header; internal callers that build the parts themselves,
    such as the sharded optimizer's step, skip the header): zeros elsewhere, exact."""
    P, rank = comm.size, comm.rank
    shape = list(arr.shape)
    shape[ax] = layout.dim
    n = int(np.prod(shape))
    err = flat = None
    try:
        full = be.xp.zeros(tuple(shape), dtype=np.float64)
        layout.place(arr.astype(np.float64), rank, full, axis=ax)
        flat = be.xp.concatenate([full.ravel(), be.xp.zeros(P)])
    except Exception as exc:                 # e.g. out of memory: still take part
        err = exc
        flat = be.xp.zeros(n + P)
        flat[n + rank] = 1.0
    comm.allreduce_sum(flat)
    raise_failed(flat[n:], err, "allgather")
    return flat[:n].reshape(tuple(shape)).astype(arr.dtype)
