"""Products and queries of the sharded sliding window (docs/math.md §2, §6).

A mixin of :class:`~mfac_linalg.distributed.ShardedSlidingWindowInverseFisher`: the
collective hooks of :class:`~mfac_linalg.distributed._base.ShardedOperator` for F⁻¹
(pass 1 all-reduced, the replicated m x m solve, pass 2 local), the local diagonal and
log-determinant, and the forward F = λI + G_hᵀG_h/N behind ``fisher()``.
"""
from __future__ import annotations

import math

import numpy as np

from .. import _backend as B
from ..sliding.window import SlidingWindowInverseFisher as _Single
from ._base import ShardedFisherOperator

__all__: list[str] = []


class _WindowQueries:
    """F⁻¹ and F on this rank's columns: the collective hooks and the local queries."""

    # -- collective hooks ----------------------------------------------------------------------
    def _project(self, X, k, err, extra=None):
        """U = G_h X summed over ranks (n x k float64), optionally with one extra row."""
        n = self._n()
        rows = n + (0 if extra is None else 1)
        payload = None
        if err is None:
            try:
                xp = self._backend.xp
                U = self._buf.project(X, n) if n else xp.zeros((0, k), dtype=np.float64)
                payload = U if extra is None else xp.concatenate([U, extra(X)])
            except Exception as exc:
                err = exc
        return self._flagged_sum(payload, rows * k, err, "ShardedSlidingWindowInverseFisher")\
            .reshape(rows, k)

    def _fused_vector(self, X, err):
        """The CUDA buffer's fused pass 1 for one vector (no float32 copy of a 16-bit
        buffer): u = G_h x all-reduced into the workspace.  Returns (u, t), t for
        ``combine_vector``."""
        n, m = self._n(), self._m
        u = y = None
        if err is None:
            try:
                u, y = self._buf.start_vector(X[:, 0], n, self._damping, False)
            except Exception as exc:
                err = exc
        us = self._flagged_sum(u, m, err, "ShardedSlidingWindowInverseFisher")
        u[...] = us
        return u, y

    def _collective_matmat(self, X, k, err, what):
        n = self._n()
        if self._buf.fused and k == 1 and n:
            u, y = self._fused_vector(X, err)
            y = self._buf.combine_vector(
                y, self._eng.solve_kernel(u, self._buf.coef_dtype), n, self._damping)
            return y[:, None].astype(X.dtype, copy=False)
        U = self._project(X, k, err)
        if n == 0:
            return X * (1.0 / self._damping)
        return self._buf.combine(X, self._eng.solve(U), n, self._damping)

    def _collective_quad(self, X, k, err):
        xp = self._backend.xp
        n = self._n()

        def xx_of(X_):          # float64 x.x where the passes are float64 (docs/math.md §7)
            X64 = X_.astype(np.float64) if self._buf.wide else X_
            return xp.einsum("ij,ij->j", X64, X64).astype(np.float64)

        if self._buf.fused and k == 1 and n:
            xx = self._flagged_sum(None if err else xx_of(X), 1, err, "quad")
            u, _ = self._fused_vector(X, None)
            return (xx - self._eng.inner(u[:n, None])) / self._damping
        S = self._project(X, k, err, extra=lambda X_: xx_of(X_)[None, :])
        U, xx = S[:-1], S[-1]
        if n:
            xx = xx - self._eng.inner(U)
        return xx / self._damping

    def _collective_entry(self, i, j, err):
        n = self._n()
        gi, gj = self._pair_columns(lambda c: self._buf.columns([c], n)[:, 0], i, j, err, n)
        val = 1.0 if i == j else 0.0
        if n:
            val -= B.scalar(gi @ self._eng.solve(gj[:, None])[:, 0])
        return val / self._damping

    def _collective_todense(self):
        xp = self._backend.xp
        n, d = self._n(), self._dglobal
        Gh = self._gather_rows(self._buf.columns(slice(0, self._d), n), n, "todense")
        A = -(Gh.T @ self._eng.solve(Gh)) if n else xp.zeros((d, d))
        A[xp.diag_indices(d)] += 1.0
        A *= 1.0 / self._damping
        return A.astype(self._dtype, copy=False)

    # -- local ---------------------------------------------------------------------------------
    # the single-device window's code on the local columns (its lock: the class's no-op)
    _diagonal = _Single._diagonal

    def logdet(self):
        r"""log det F = d log λ + log det C − n log(N λ) (determinant lemma).  O(n), local."""
        n = self._n()
        ld = self._dglobal * math.log(self._damping)
        return ld + (self._eng.logdet() - n * math.log(self._shift(n)) if n else 0.0)

    # -- the forward F -------------------------------------------------------------------------
    def fisher(self):
        """The forward F = λI + G_hᵀG_h/N on the same shards, a live view that follows later
        updates (a :class:`~mfac_linalg.distributed.ShardedFisherOperator`)."""
        return ShardedFisherOperator(self)

    def inverse(self):
        """F, the inverse of this F⁻¹ (``fisher()``)."""
        return self.fisher()

    def _fisher_matmat(self, X, k, err):
        """F X = λX + G_hᵀ (G_h X) / N: pass 1 all-reduced, pass 2 local."""
        n, lam = self._n(), self._damping
        U = self._project(X, k, err)
        if n == 0:
            return X * lam
        # combine(X, C, n, l) is (X - G_hᵀ C) / l:
        # l = 1/λ and C = -U/(Nλ) give λX + G_hᵀU/N
        return self._buf.combine(X, U * (-1.0 / (self._N(n) * lam)), n, 1.0 / lam)

    def _fisher_quad(self, X, k, err):
        xp = self._backend.xp
        S = self._project(X, k, err, extra=lambda X_: xp.einsum(
            "ij,ij->j", X_, X_).astype(np.float64)[None, :])
        U = S[:-1]
        return self._damping * S[-1] + xp.einsum("ij,ij->j", U, U) / self._N(self._n())

    def _fisher_entry(self, i, j, err):
        n = self._n()
        gi, gj = self._pair_columns(lambda c: self._buf.columns([c], n)[:, 0], i, j, err, n)
        return B.scalar(gi @ gj) / self._N(n) + (self._damping if i == j else 0.0)

    _fisher_diagonal = _Single._fisher_diagonal

    def _fisher_todense(self):
        xp = self._backend.xp
        n, d = self._n(), self._dglobal
        Gh = self._gather_rows(self._buf.columns(slice(0, self._d), n), n, "todense")
        A = Gh.T @ Gh * (1.0 / self._N(n)) if n else xp.zeros((d, d))
        A[xp.diag_indices(d)] += self._damping
        return A.astype(self._dtype, copy=False)
