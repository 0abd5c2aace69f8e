"""The collective update transaction of the sharded sliding window (docs/math.md §2, §6).

A mixin of :class:`~mfac_linalg.distributed.ShardedSlidingWindowInverseFisher`: the
slot write and pass 1, the all-reduce of the new Gram row, the engine's staged
replacement, pass 2 for ``step``, and the agreement that commits or undoes it on every
rank.  The window's state (``_buf``, ``_eng``, ``_count``, ...) is the class's.
"""
from __future__ import annotations

from .. import _backend as B
from .. import _validate as V
from ..sliding.window import push_batch
from .comm import agree

__all__: list[str] = []


class _WindowUpdates:
    """``update`` and ``step`` of the sharded window: one collective transaction per
    gradient (the class docstring's four stages), atomic on every rank."""

    def _rows(self, g, one):
        """This rank's rows (k, d_p) as stored; never raises (returns the error)."""
        try:
            arr, _ = B.asarray(g, "g", backend=self._backend)
            if one and (arr.ndim != 1 or arr.shape[0] != self._d):
                raise ValueError(f"g must have shape ({self._d},) for step on rank "
                                 f"{self._comm.rank}; got shape {tuple(arr.shape)}")
            rows = arr[None, :] if arr.ndim == 1 else arr
            if rows.ndim != 2 or rows.shape[1] != self._d:
                raise ValueError(f"g must be (local_dim,) or (k, local_dim) with local_dim="
                                 f"{self._d} on rank {self._comm.rank}; got shape "
                                 f"{tuple(arr.shape)}")
            out = self._buf.prepare(rows)
            if self._buf.fused:     # the CUDA buffer defers the check to its kernel, and
                V.finite(out, "g", self._backend)    # that flag would be read after the
            return arr.dtype, out, None              # ranks agreed: check it here
        except Exception as exc:
            return None, None, exc

    def _push(self, row, err, *, want_y=False, rebuild=False, defer=False):
        """One collective transaction (the class docstring's four stages)."""
        m = self._m
        slot, rows = self._count % m, min(self._n() + 1, m)
        buf, eng = self._buf, self._eng
        w = None
        if err is None:
            try:
                w = buf.begin(slot, row, rows, lam=self._damping, want_y=want_y, check=False)
            except Exception as exc:
                err = exc
        try:
            u = self._flagged_sum(None if w is None else w.u, m, err, "update")
        except BaseException:
            if w is not None:
                buf.undo(w)
            raise
        p, y, err = None, None, None
        try:
            w.u[...] = u
            V.gram_finite(u, "g", self._backend)     # replicated: every rank decides alike
            p = eng.replace(slot, w.u, self._shift(rows), defer=defer, status=w.status,
                            rebuild=rebuild or self._since_refresh >= self._refresh_every)
            if want_y:
                y = buf.finish_step(w, eng.coefficients(p, buf.coef_dtype), p.n, self._damping)
        except Exception as exc:
            err = exc
        try:
            agree(self._comm, err, "update")
            ok = eng.commit(p)
        except BaseException:
            if p is not None:
                eng.rollback(p)
            buf.undo(w)
            raise
        self._count += 1
        self._since_refresh = 0 if p.rebuilt else self._since_refresh + 1
        return y if ok else None, w

    def _after_update(self, before):
        ce = self._check_every
        if ce and self._count // ce != before // ce:
            self.check_replicas()

    def update(self, g):
        """Add this rank's slice of one gradient (d_p,) or of a batch (k, d_p), evicting
        the oldest.  Collective; atomic on every rank (on any error on any rank, every
        window is bit for bit as before).  O(d_p m + m²) and two all-reduces per gradient,
        after one of P numbers agreeing on the number of rows.  Returns self."""
        before = self._count
        _, rows, err = self._rows(g, False)
        tab = self._header([0 if rows is None else rows.shape[0]], err, "update")
        ks = [int(v) for v in tab[:, 0]]
        if len(set(ks)) != 1:
            raise ValueError(f"g must hold the same number of gradients on every rank; got "
                             f"{ks} (rank order)")
        k = ks[0]
        if k == 1:
            self._push(rows[0], None)
        else:
            push_batch(self, rows, lambda row, **kw: self._push(row, None, **kw))
        self._after_update(before)
        return self

    def step(self, g):
        """``update(g)`` then return this rank's slice of F⁻¹ g, fused: two passes over the
        local buffer, one all-reduce of m + P numbers and one of P flags.  Collective and
        atomic.  ``g`` is this rank's slice (d_p,); the result has its dtype."""
        before = self._count
        out_dtype, rows, err = self._rows(g, True)
        y, w = self._push(None if rows is None else rows[0], err, want_y=True)
        if y is None:           # the engine rebuilt exactly at its commit (replicated)
            x = w.x[:self._d].astype(self._dtype, copy=False)
            y = self._collective_matmat(x[:, None], 1, None, "step")[:, 0]
        self._after_update(before)
        return y.astype(out_dtype, copy=False)
