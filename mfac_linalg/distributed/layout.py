"""Column layouts: which of the d global coordinates each rank holds (docs/math.md §6).

Rank p of P holds the columns J_p of the gradient matrix G (a partition of 0..d-1)
and the matching entries x_p = x[J_p] of every vector.  Inside a rank the local
coordinates follow the global order (J_p sorted), so a layout is, per rank, a
sorted list of half-open ranges ``[start, stop)`` of the global vector.
"""
from __future__ import annotations

import hashlib
import json

import numpy as np

from .. import _backend as B
from .. import _validate as V

__all__ = ["ColumnLayout"]


class ColumnLayout:
    r"""A partition of the d global columns over P ranks, as ranges per rank.

    Rank p holds the global columns :math:`J_p`, the union of its ranges, in
    increasing order; local column ``k`` of rank p is global column
    ``indices(p)[k]``.  Every rank builds the same layout from the same
    arguments (a layout is plain data: no communication).

    Parameters
    ----------
    dim : int
        d, the number of global columns.
    ranges : sequence of sequences of (int, int)
        ``ranges[p]`` lists the half-open ranges ``[start, stop)`` of rank p.
        Together they must cover ``0 .. dim-1`` exactly once; a rank may hold
        nothing (an empty list).  Empty ranges are dropped; adjacent ones merged.

    Raises
    ------
    TypeError
        ``dim`` not an integer, ``ranges`` not a sequence of pairs of integers.
    ValueError
        ``dim < 1``, a range outside ``[0, dim]`` or reversed, or ranges that
        overlap or leave a column out.

    Notes
    -----
    Three constructors cover the usual cases: :meth:`contiguous` (one block per
    rank), :meth:`parameter_aligned` (whole parameters per rank, balanced) and
    :meth:`sharded` (each flat parameter group split evenly over the ranks, the
    FSDP ``FULL_SHARD`` / ZeRO layout, so that a rank's gradient shard *is* its
    slice of the gradient).

    Costs: building O(P r log r) for r ranges; :meth:`split` and :meth:`gather`
    O(size of the data); :meth:`owner` O(log r).

    Examples
    --------
    >>> import numpy as np
    >>> from mfac_linalg.distributed import ColumnLayout
    >>> lay = ColumnLayout.contiguous(10, 3)
    >>> [lay.local_dim(p) for p in range(3)]
    [4, 3, 3]
    >>> x = np.arange(10.0)
    >>> lay.split(x, 1)
    array([4., 5., 6.])
    >>> fs = ColumnLayout.sharded([5, 3], 2)        # two FSDP units of 5 and 3 numbers
    >>> fs.ranges(0), fs.ranges(1)
    ([(0, 3), (5, 7)], [(3, 5), (7, 8)])
    >>> np.array_equal(fs.gather([fs.split(x[:8], p) for p in range(2)]), x[:8])
    True
    """

    def __init__(self, dim, ranges):
        dim = V.integer(dim, "dim", minimum=1)
        per_rank, flat = _checked_ranges(dim, ranges)
        self._dim = dim
        self._ranges = tuple(tuple(r) for r in per_rank)
        self._starts = np.array([a for a, _, _ in flat], dtype=np.int64)
        self._owners = [(p, a) for a, _, p in flat]
        # local offset of each range inside its rank
        self._local_off = {}
        for p, rr in enumerate(self._ranges):
            off = 0
            for a, b in rr:
                self._local_off[(p, a)] = off
                off += b - a

    # -- constructors ----------------------------------------------------------
    @classmethod
    def contiguous(cls, dim, size, *, local_dims=None):
        """One block per rank, in rank order: rank p holds ``[o_p, o_{p+1})``.

        ``local_dims`` (P integers >= 0 summing to ``dim``) gives the block sizes;
        by default they are as even as possible (the first ``dim % P`` ranks hold
        one more column).
        """
        dim = V.integer(dim, "dim", minimum=1)
        size = V.integer(size, "size", minimum=1)
        if local_dims is None:
            q, r = divmod(dim, size)
            local_dims = [q + (1 if p < r else 0) for p in range(size)]
        else:
            if isinstance(local_dims, (str, bytes)) or not hasattr(local_dims, "__len__"):
                raise TypeError(f"local_dims must be a sequence of {size} integers; got "
                                f"{type(local_dims).__name__}")
            if len(local_dims) != size:
                raise ValueError(f"local_dims must have {size} entries (one per rank); got "
                                 f"{len(local_dims)}")
            local_dims = [V.integer(v, f"local_dims[{p}]", minimum=0)
                          for p, v in enumerate(local_dims)]
            if sum(local_dims) != dim:
                raise ValueError(f"local_dims must sum to dim={dim}; got sum {sum(local_dims)}")
        off = np.concatenate([[0], np.cumsum(local_dims)]).astype(int)
        return cls(dim, [[(int(off[p]), int(off[p + 1]))] for p in range(size)])

    @classmethod
    def parameter_aligned(cls, param_sizes, size):
        """Whole parameters per rank, contiguous in parameter order, balanced.

        ``param_sizes`` lists the numel of every parameter in the order of the
        flat gradient (``parameters_to_vector`` order).  Rank boundaries fall
        on parameter boundaries: the boundary of rank p is the parameter
        boundary closest to ``p * d / P`` (a rank may hold nothing when one
        parameter is larger than d / P).  O(number of parameters).
        """
        sizes_ = V.sizes(param_sizes, "param_sizes")
        size = V.integer(size, "size", minimum=1)
        dim = sum(sizes_)
        bounds = np.concatenate([[0], np.cumsum(sizes_)])
        cuts = [0]
        for p in range(1, size):
            target = p * dim / size
            k = int(np.argmin(np.abs(bounds - target)))
            cuts.append(max(int(bounds[k]), cuts[-1]))
        cuts.append(dim)
        return cls(dim, [[(cuts[p], cuts[p + 1])] for p in range(size)])

    @classmethod
    def sharded(cls, unit_sizes, size):
        """Each flat unit split evenly over the ranks (FSDP ``FULL_SHARD``, ZeRO 1-3).

        ``unit_sizes`` lists the numel of each flat parameter group (an FSDP
        unit, a ZeRO bucket), in flat-gradient order.  Like FSDP, a unit of n
        numbers is cut into chunks of ``ceil(n / P)``; rank p holds chunk p of
        every unit (the padding FSDP adds to the last chunk is not a column).
        A rank's local gradient is then the concatenation of its shards of the
        units, in unit order: exactly what FSDP hands each rank.
        """
        sizes_ = V.sizes(unit_sizes, "unit_sizes")
        size = V.integer(size, "size", minimum=1)
        ranges = [[] for _ in range(size)]
        start = 0
        for n in sizes_:
            c = -(-n // size)
            for p in range(size):
                a, b = start + min(n, p * c), start + min(n, (p + 1) * c)
                ranges[p].append((a, b))
            start += n
        return cls(start, ranges)

    # -- queries ------------------------------------------------------------------
    @property
    def dim(self):
        """d, the number of global columns."""
        return self._dim

    @property
    def size(self):
        """P, the number of ranks."""
        return len(self._ranges)

    def _rank(self, rank):
        return V.integer(rank, "rank", minimum=0, maximum=self.size - 1)

    def ranges(self, rank):
        """The ranges ``[(start, stop), ...]`` of ``rank`` (sorted, merged)."""
        return list(self._ranges[self._rank(rank)])

    def local_dim(self, rank):
        """d_p, the number of columns ``rank`` holds."""
        return sum(b - a for a, b in self._ranges[self._rank(rank)])

    def indices(self, rank):
        """The global columns J_p of ``rank``, increasing (an int64 NumPy array)."""
        rr = self._ranges[self._rank(rank)]
        if not rr:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in rr])

    def owner(self, j):
        """``(rank, local index)`` of global column ``j`` (negative j counts from the end)."""
        j = V.integer(j, "j", minimum=-self._dim, maximum=self._dim - 1)
        j = j + self._dim if j < 0 else j
        k = int(np.searchsorted(self._starts, j, side="right")) - 1
        p, a = self._owners[k]
        return p, self._local_off[(p, a)] + (j - a)

    # -- data movement ---------------------------------------------------------------
    def split(self, x, rank, *, axis=0):
        """The slice of ``x`` that ``rank`` holds, along ``axis``.

        ``axis=0`` for vectors (d,) and blocks (d, k); ``axis=1`` (or -1) for a
        gradient matrix (m, d).  A single range gives a view of ``x``'s array; several
        give a copy.  NumPy or CuPy in, the same out (DLPack tensors come back as the
        array of their device).  O(d_p).
        """
        arr, be = B.asarray(x, "x")
        axis = self._axis(arr, axis)
        if arr.shape[axis] != self._dim:
            raise ValueError(f"x must have {self._dim} entries along axis {axis}; got shape "
                             f"{tuple(arr.shape)}")
        rr = self._ranges[self._rank(rank)]
        xp = be.xp
        take = [(slice(None),) * axis + (slice(a, b),) for a, b in rr]
        if len(take) == 1:
            return arr[take[0]]
        if not take:
            shape = list(arr.shape)
            shape[axis] = 0
            return xp.zeros(tuple(shape), dtype=arr.dtype)
        return xp.concatenate([arr[t] for t in take], axis=axis)

    def gather(self, parts, *, axis=0):
        """The full array from every rank's slice (``parts[p]`` from rank p), one process.

        The inverse of :meth:`split`; for the parts spread over processes use
        :func:`mfac_linalg.distributed.allgather`.  O(d).
        """
        if isinstance(parts, (str, bytes)) or not hasattr(parts, "__len__"):
            raise TypeError(f"parts must be a sequence of {self.size} arrays; got "
                            f"{type(parts).__name__}")
        if len(parts) != self.size:
            raise ValueError(f"parts must have {self.size} entries (one per rank); got "
                             f"{len(parts)}")
        arrs = []
        be = None
        for p, part in enumerate(parts):
            a, be_p = B.asarray(part, f"parts[{p}]", backend=be)
            be = be_p
            arrs.append(a)
        axis = self._axis(arrs[0], axis, "parts[0]")
        shape = list(arrs[0].shape)
        shape[axis] = self._dim
        dtype = np.result_type(*[a.dtype for a in arrs])
        out = be.xp.empty(tuple(shape), dtype=dtype)
        for p, a in enumerate(arrs):
            want = list(shape)
            want[axis] = self.local_dim(p)
            if list(a.shape) != want:
                raise ValueError(f"parts[{p}] must have shape {tuple(want)}; got {tuple(a.shape)}")
            self._place(a, p, out, axis)
        return out

    def place(self, part, rank, out, *, axis=0):
        """Write ``rank``'s slice ``part`` into its columns of the full array ``out``
        (in place; returns ``out``).  ``out`` has d entries along ``axis``, ``part`` the
        same shape with d_p there; everything is checked before anything is written.  O(d_p).
        """
        p = self._rank(rank)
        if (isinstance(out, (str, bytes)) or not hasattr(out, "shape")
                or not hasattr(out, "__setitem__") or not hasattr(out, "ndim")):
            raise TypeError(f"out must be a writable array (NumPy or CuPy); got "
                            f"{type(out).__name__}")
        flags = getattr(out, "flags", None)
        if flags is not None and not getattr(flags, "writeable", True):
            raise ValueError("out must be writable; got a read-only array")
        axis = self._axis(out, axis, "out")
        if out.shape[axis] != self._dim:
            raise ValueError(f"out must have {self._dim} entries along axis {axis}; got "
                             f"shape {tuple(out.shape)}")
        part, _ = B.asarray(part, "part")
        want = list(out.shape)
        want[axis] = self.local_dim(p)
        if tuple(part.shape) != tuple(want):
            raise ValueError(f"part must have shape {tuple(want)} (rank {p}'s columns of "
                             f"out); got {tuple(part.shape)}")
        return self._place(part, p, out, axis)

    def _place(self, part, rank, out, axis):
        off = 0
        for a, b in self._ranges[self._rank(rank)]:
            idx = (slice(None),) * axis + (slice(a, b),)
            src = (slice(None),) * axis + (slice(off, off + b - a),)
            out[idx] = part[src]
            off += b - a
        return out

    @staticmethod
    def _axis(arr, axis, name="x"):
        if arr.ndim == 0:
            raise ValueError(f"{name} must be at least 1-D (the columns lie along axis); "
                             "got a 0-d array")
        axis = V.integer(axis, "axis", minimum=-arr.ndim, maximum=arr.ndim - 1)
        return axis + arr.ndim if axis < 0 else axis

    # -- identity -----------------------------------------------------------------------
    def to_dict(self):
        """Plain data: ``{"dim": d, "ranges": [[[a, b], ...], ...]}``."""
        return {"dim": self._dim, "ranges": [[list(r) for r in rr] for rr in self._ranges]}

    @classmethod
    def from_dict(cls, data):
        """The layout of :meth:`to_dict` (validated like the constructor)."""
        if not isinstance(data, dict) or set(data) != {"dim", "ranges"}:
            raise ValueError(f"layout data must be a dict with keys 'dim' and 'ranges'; got "
                             f"{data!r:.80}")
        return cls(data["dim"], data["ranges"])

    def fingerprint(self):
        """A short hex digest of the layout (equal layouts, equal fingerprints)."""
        blob = json.dumps(self.to_dict(), separators=(",", ":")).encode()
        return hashlib.blake2b(blob, digest_size=8).hexdigest()

    def __eq__(self, other):
        return (isinstance(other, ColumnLayout) and self._dim == other._dim
                and self._ranges == other._ranges)

    def __hash__(self):
        return hash((self._dim, self._ranges))

    def __repr__(self):
        if all(len(rr) <= 1 for rr in self._ranges):
            dims = [self.local_dim(p) for p in range(self.size)]
            return f"<ColumnLayout d={self._dim} P={self.size} contiguous local_dims={dims}>"
        nr = sum(len(rr) for rr in self._ranges)
        return f"<ColumnLayout d={self._dim} P={self.size} ranges={nr}>"


def _checked_ranges(dim, ranges):
    """The ranges of :class:`ColumnLayout` checked, empty ones dropped and adjacent ones
    merged: (per_rank, flat) with ``per_rank[p]`` rank p's sorted ranges and ``flat`` every
    (start, stop, rank) in column order.  O(P r log r)."""
    if isinstance(ranges, (str, bytes)) or not hasattr(ranges, "__len__"):
        raise TypeError(f"ranges must be a sequence (one entry per rank) of sequences of "
                        f"(start, stop) pairs; got {type(ranges).__name__}")
    if len(ranges) < 1:
        raise ValueError("ranges must have one entry per rank (at least one); got none")
    per_rank = []
    flat = []
    for p, rr in enumerate(ranges):
        if isinstance(rr, (str, bytes)) or not hasattr(rr, "__iter__"):
            raise TypeError(f"ranges[{p}] must be a sequence of (start, stop) pairs; got "
                            f"{type(rr).__name__}")
        clean = []
        for q, pair in enumerate(rr):
            if isinstance(pair, (str, bytes)) or not hasattr(pair, "__len__") or len(pair) != 2:
                raise TypeError(f"ranges[{p}][{q}] must be a pair (start, stop); got {pair!r}")
            a = V.integer(pair[0], f"ranges[{p}][{q}] start", minimum=0, maximum=dim)
            b = V.integer(pair[1], f"ranges[{p}][{q}] stop", minimum=0, maximum=dim)
            if b < a:
                raise ValueError(f"ranges[{p}][{q}] must have start <= stop; got ({a}, {b})")
            if b > a:
                clean.append((a, b))
        clean.sort()
        merged = []
        for a, b in clean:
            if merged and merged[-1][1] == a:
                merged[-1] = (merged[-1][0], b)
            else:
                merged.append((a, b))
        per_rank.append(merged)
        flat.extend((a, b, p) for a, b in merged)
    flat.sort()
    pos = 0
    for a, b, p in flat:
        if a != pos:
            what = "overlap" if a < pos else "leave a gap"
            raise ValueError(f"ranges must cover 0..{dim - 1} exactly once; they {what} at "
                             f"column {min(a, pos)} (rank {p}'s range ({a}, {b}))")
        pos = b
    if pos != dim:
        raise ValueError(f"ranges must cover 0..{dim - 1} exactly once; they end at {pos}")
    return per_rank, flat
