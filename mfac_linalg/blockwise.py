"""WoodFisher: the block-diagonal inverse empirical Fisher."""
from __future__ import annotations

import math
import numbers

import numpy as np

from . import _backend as B
from ._operator import Operator, check_damping
from .static import FisherOperator, as_gradients

__all__ = ["BlockInverseFisher", "block_layout"]


def block_layout(d, block_size=None, blocks=None):
    """Block boundaries: a (nblocks + 1,) array of column offsets.

    ``blocks`` (layer sizes, summing to d) are each cut into blocks of at most
    ``block_size``; without ``blocks`` the whole of d is one layer.  Blocks never
    cross a layer boundary; the last block of a layer may be smaller.
    """
    if blocks is None:
        layers = [d]
    else:
        layers = [int(b) for b in blocks]
        if any(isinstance(b, (bool, np.bool_)) for b in blocks) or any(b < 1 for b in layers):
            raise ValueError(f"blocks must be positive integers (layer sizes); got {list(blocks)}")
        if sum(layers) != d:
            raise ValueError(f"blocks must sum to d={d}; got sum {sum(layers)}")
    if block_size is None:
        B_ = max(layers)
    else:
        if isinstance(block_size, (bool, np.bool_)) or not isinstance(block_size, numbers.Integral):
            raise TypeError(f"block_size must be an integer; got {type(block_size).__name__}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1; got {block_size}")
        B_ = int(block_size)
    bounds = [0]
    for size in layers:
        start = bounds[-1]
        for off in range(0, size, B_):
            bounds.append(start + min(size, off + B_))
    return np.asarray(bounds, dtype=np.int64)


class _Group:
    """All blocks of one size b, stacked: the batched unit of computation."""

    def __init__(self, starts, b, xp):
        self.b = b
        self.starts = starts                            # host (nb,)
        self.nb = len(starts)
        self.idx = xp.asarray(starts[:, None] + np.arange(b)[None, :])   # (nb, b) columns


class BlockInverseFisher(Operator):
    r"""Block-diagonal inverse of the damped empirical Fisher (WoodFisher).

    Represents :math:`\mathrm{blockdiag}_k(F_k^{-1})` with
    :math:`F_k = \lambda I + G_k^T G_k / m`, G_k the columns of G (m x d) in
    block k (docs/math.md section 3).  Each block's inverse is held as
    :math:`\alpha I + \beta V_k^T V_k`:

    * m < b (Woodbury): C_k = m lambda I + G_k G_k^T = L_k L_k^T,
      V_k = L_k^{-1} G_k (m x b), alpha = 1/lambda, beta = -1/lambda;
    * m >= b (explicit): F_k = L_k L_k^T, V_k = L_k^{-1} (b x b), alpha = 0,
      beta = 1, i.e. the explicit b x b inverse as V_k^T V_k.

    Blocks of equal size are stacked and processed as one batch (batched
    matrix products, a batched Cholesky, a batched triangular inverse): no
    Python loop over blocks, only over the (at most a few) distinct sizes.

    Parameters
    ----------
    grads : array_like, shape (m, d)
    damping : float
    block_size : int, optional
        B, the largest block.  Default: each layer (or all of d) is one block.
    blocks : sequence of int, optional
        Layer sizes (summing to d); every layer is cut into blocks of at most B
        that never cross a layer boundary.

    Costs (r_k = min(m, b_k))
    -----
    Set-up O(sum_k m b_k r_k); ``matvec`` O(sum_k b_k r_k) (<= O(dm)); ``entry``
    O(r); ``diagonal`` O(sum_k b_k r_k); ``block(k)`` O(b^2 r); memory
    sum_k r_k b_k (<= dm).
    """

    def __init__(self, grads, damping, *, block_size=None, blocks=None, check_finite=True):
        lam = check_damping(damping)
        G, be = as_gradients(grads)
        m, d = G.shape
        xp = be.xp
        bounds = block_layout(d, block_size, blocks)
        sizes = np.diff(bounds)
        self._bounds = bounds
        self._m = m
        self._damping = lam
        self._groups = []
        logdet = 0.0
        with be.device_context():
            self._colsq = xp.einsum("ij,ij->j", G, G)
            for b in np.unique(sizes):
                grp = _Group(bounds[:-1][sizes == b], int(b), xp)
                Gb = xp.ascontiguousarray(G[:, grp.idx].transpose(1, 0, 2))   # (nb, m, b)
                if m < b:       # Woodbury: C_k = m lam I + G_k G_k^T
                    C = (Gb @ Gb.transpose(0, 2, 1)).astype(np.float64)
                    C[:, np.arange(m), np.arange(m)] += m * lam
                    grp.alpha, grp.beta = 1.0 / lam, -1.0 / lam
                else:           # explicit: F_k = lam I + G_k^T G_k / m
                    C = (Gb.transpose(0, 2, 1) @ Gb).astype(np.float64) / m
                    C[:, np.arange(b), np.arange(b)] += lam
                    grp.alpha, grp.beta = 0.0, 1.0
                try:
                    L = xp.linalg.cholesky(C)
                except np.linalg.LinAlgError:
                    L = None
                if L is None or not bool(xp.isfinite(L).all()):
                    raise ValueError("a block's capacitance matrix is not numerically positive "
                                     "definite: the damping is too small for the gradients' "
                                     "scale")
                r = L.shape[-1]
                Linv = xp.linalg.solve(L, xp.broadcast_to(xp.eye(r), L.shape))
                Linv = xp.tril(Linv)
                grp.L = L
                grp.V = (Linv.astype(G.dtype) @ Gb) if m < b else Linv.astype(G.dtype)
                grp.primal = m >= b
                ld = 2.0 * float(B.to_host(xp.log(xp.diagonal(L, axis1=1, axis2=2)).sum()))
                if m < b:
                    ld += grp.nb * (b * math.log(lam) - m * math.log(m * lam))
                logdet += ld
                self._groups.append(grp)
        self._logdet = logdet
        self._init_operator(d, G.dtype, be, check_finite=check_finite)

    # -- layout ------------------------------------------------------------------
    @property
    def num_blocks(self):
        return len(self._bounds) - 1

    @property
    def bounds(self):
        """Block boundaries (nblocks + 1,): block k is columns bounds[k]:bounds[k+1]."""
        return self._bounds.copy()

    @property
    def damping(self):
        return self._damping

    @property
    def num_grads(self):
        return self._m

    def block_of(self, q):
        """The index k of the block holding coordinate q."""
        from ._operator import _index
        q = _index(q, "q", self._d)
        return int(np.searchsorted(self._bounds, q, side="right") - 1)

    def _locate(self, k):
        """(group, position in group) of block k."""
        start = self._bounds[k]
        b = int(self._bounds[k + 1] - start)
        for grp in self._groups:
            if grp.b == b:
                pos = int(np.searchsorted(grp.starts, start))
                if pos < grp.nb and grp.starts[pos] == start:
                    return grp, pos
        raise AssertionError("block not found")  # pragma: no cover

    def block(self, k):
        """The dense inverse of block k: (alpha I + beta V_k^T V_k), b x b, O(b^2 r)."""
        from ._operator import _index
        k = _index(k, "k", self.num_blocks)
        grp, pos = self._locate(k)
        V = grp.V[pos]
        H = grp.beta * (V.T @ V)
        H[self._backend.xp.diag_indices(grp.b)] += grp.alpha
        return H

    def lowrank_batches(self):
        """Yield (columns (nb, b), alpha, beta, V (nb, r, b)) per block size:
        block k of a batch is F_k^{-1} = alpha I + beta V_k^T V_k on those columns."""
        for grp in self._groups:
            yield grp.starts[:, None] + np.arange(grp.b)[None, :], grp.alpha, grp.beta, grp.V

    def with_gradients(self, grads):
        """A new operator of the same layout and damping for new gradients."""
        return BlockInverseFisher(grads, self._damping, blocks=np.diff(self._bounds).tolist(),
                                  check_finite=self._check_finite)

    def _repr_fields(self):
        return [f"m={self._m}", f"blocks={self.num_blocks}",
                f"max_block={int(np.diff(self._bounds).max())}", f"damping={self._damping:.0e}"]

    # -- products ------------------------------------------------------------------
    def _matmat(self, X):
        xp = self._backend.xp
        Y = xp.empty_like(X)
        for grp in self._groups:
            Xb = X[grp.idx]                                  # (nb, b, k)
            U = grp.V @ Xb                                   # (nb, r, k)
            Yb = grp.V.transpose(0, 2, 1) @ U
            Yb *= grp.beta
            if grp.alpha:
                Yb += grp.alpha * Xb
            Y[grp.idx] = Yb
        return Y

    def _diagonal(self):
        xp = self._backend.xp
        out = xp.empty(self._d, dtype=self._dtype)
        for grp in self._groups:
            out[grp.idx] = grp.alpha + grp.beta * (grp.V * grp.V).sum(axis=1)
        return out

    def _common_block(self, i, j):
        """(group, position, first column) of the block holding both i and j, or None."""
        k = self.block_of(i)
        if self.block_of(j) != k:
            return None
        grp, pos = self._locate(k)
        return grp, pos, int(self._bounds[k])

    def _entry(self, i, j):
        blk = self._common_block(i, j)
        if blk is None:
            return 0.0
        grp, pos, s = blk
        V = grp.V[pos]
        val = B.scalar(V[:, i - s].astype(np.float64) @ V[:, j - s].astype(np.float64))
        return (grp.alpha if i == j else 0.0) + grp.beta * val

    def _quad(self, X):
        xp = self._backend.xp
        q = xp.zeros(X.shape[1], dtype=np.float64)
        for grp in self._groups:
            Xb = X[grp.idx]
            U = grp.V @ Xb
            q += grp.alpha * (Xb * Xb).sum(axis=(0, 1)) + grp.beta * (U * U).sum(axis=(0, 1))
        return q

    # -- inverse-Fisher extras -------------------------------------------------------
    def logdet(self):
        """log det F = sum_k log det F_k (determinant lemma per Woodbury block).  O(1)."""
        return self._logdet

    def fisher(self):
        """The block-diagonal forward F (same protocol); ``.inverse()`` gives self."""
        return FisherOperator(self)

    def _fisher_matmat(self, X):
        """F X per block: lambda X + V^T L^T L V X / m (Woodbury) or L (L^T X) (explicit)."""
        xp = self._backend.xp
        Y = xp.empty_like(X)
        for grp in self._groups:
            Xb = X[grp.idx].astype(np.float64)
            if grp.primal:
                Yb = grp.L @ (grp.L.transpose(0, 2, 1) @ Xb)
            else:
                V = grp.V.astype(np.float64)
                W = grp.L.transpose(0, 2, 1) @ (grp.L @ (V @ Xb))
                Yb = V.transpose(0, 2, 1) @ W / self._m + self._damping * Xb
            Y[grp.idx] = Yb.astype(X.dtype)
        return Y

    def _fisher_diagonal(self):
        return (self._damping + self._colsq / self._m).astype(self._dtype)

    def _fisher_entry(self, i, j):
        blk = self._common_block(i, j)
        if blk is None:
            return 0.0
        grp, pos, s = blk
        L = grp.L[pos]
        if grp.primal:
            return B.scalar(L[i - s] @ L[j - s])
        V = grp.V[pos].astype(np.float64)
        gi, gj = L @ V[:, i - s], L @ V[:, j - s]
        return B.scalar(gi @ gj) / self._m + (self._damping if i == j else 0.0)
