"""WoodFisher: the block-diagonal inverse empirical Fisher."""
from __future__ import annotations

import numpy as np

from . import _backend as B
from . import _lowrank as LR
from . import _validate as _v
from ._operator import NonFiniteInput, _index
from .static import _LowRankInverseFisher

__all__ = ["BlockInverseFisher", "block_layout"]


def block_layout(d, block_size=None, blocks=None):
    """Block boundaries: a (nblocks + 1,) array of column offsets.

    ``blocks`` (layer sizes, summing to d) are each cut into blocks of at most
    ``block_size``; without ``blocks`` the whole of d is one layer.  Blocks never
    cross a layer boundary; the last block of a layer may be smaller.  O(nblocks).

    Parameters
    ----------
    d : int
    block_size : int, optional
        The largest block; default: each layer is one block.
    blocks : sequence of int, optional
        Layer sizes, positive integers summing to d.

    Returns
    -------
    numpy.ndarray of int64, shape (nblocks + 1,)

    Raises
    ------
    TypeError
        A layer size or ``block_size`` that is not an integer (``12.9`` is refused,
        never truncated).
    ValueError
        Sizes < 1, or layer sizes not summing to d.

    Examples
    --------
    >>> from mfac_linalg.blockwise import block_layout
    >>> block_layout(10, block_size=4, blocks=[6, 4]).tolist()
    [0, 4, 6, 10]
    """
    layers = [d] if blocks is None else _v.sizes(blocks, "blocks", total=d)
    B_ = max(layers) if block_size is None else _v.positive_int(block_size, "block_size")
    bounds = [0]
    for size in layers:
        start = bounds[-1]
        for off in range(0, size, B_):
            bounds.append(start + min(size, off + B_))
    return np.asarray(bounds, dtype=np.int64)


class BlockInverseFisher(_LowRankInverseFisher):
    r"""Block-diagonal inverse of the damped empirical Fisher (WoodFisher).

    Represents :math:`\mathrm{blockdiag}_k(F_k^{-1})` with
    :math:`F_k = \lambda I + G_k^T G_k / m`, G_k the columns of G (m x d) in
    block k (docs/math.md §3).  Each block's inverse is held as
    :math:`\alpha I + \beta V_k^T V_k` in the dual (Woodbury) or primal form,
    chosen per block by accuracy exactly as for
    :class:`~mfac_linalg.StaticInverseFisher` (dual when m < b, or when
    :math:`\lambda_{min}(F_k) \le 4\lambda`; primal otherwise).

    Blocks of equal size and form are stacked and processed as one batch
    (batched matrix products, a batched Cholesky, a batched triangular
    inverse): no Python loop over blocks, only over the (at most a few)
    distinct sizes.

    Parameters
    ----------
    grads : array_like, shape (m, d)
        Gradients as rows (NumPy, CuPy or a DLPack tensor); never modified.
    damping : float
        lambda, inside ``[sqrt(tiny), sqrt(max)]`` of the gradients' dtype.
    block_size : int, optional
        B, the largest block.  Default: each layer (or all of d) is one block.
    blocks : sequence of int, optional
        Layer sizes (summing to d); every layer is cut into blocks of at most B
        that never cross a layer boundary.
    check_finite : bool, default True
        Check vectors given to the products for NaN/inf.
    overwrite_grads : bool, default False
        Reuse the caller's array for the factors of the blocks with m < b
        (their V_k is m x b, written over G_k's own columns): no (m, d) copy of
        the gradients in block order and no second (m, d) array for V.
        ``grads`` must be a writable, C-contiguous float32 or float64 NumPy
        array (CPU); anything else is refused with a ValueError (TypeError for
        a non-array) before any work.  The operator then keeps ``grads`` and
        makes it read-only (where some block has m < b).  Blocks with m >= b
        (V_k b x b) are built from copies, as without the option.  A set-up
        that raises in the checks, the Gram products or the Cholesky leaves
        ``grads`` unchanged; one that raises after the solves (a factor
        overflowing its dtype) leaves it holding undefined values.

    Raises
    ------
    TypeError, ValueError
        As :class:`~mfac_linalg.StaticInverseFisher`, and for ``block_size`` /
        ``blocks`` as :func:`block_layout`.

    Notes
    -----
    Costs (r_k = min(m, b_k)).  Set-up O(sum_k m b_k r_k); ``matvec``
    O(sum_k b_k r_k) (<= O(dm)); ``entry`` O(r); ``diagonal`` O(sum_k b_k r_k)
    (one read of the factors, on all host threads); ``block(k)`` O(b^2 r);
    memory sum_k r_k b_k (<= dm), in the caller's array with
    ``overwrite_grads=True`` where m < b.

    Examples
    --------
    >>> import numpy as np, mfac_linalg as ml
    >>> G = np.random.default_rng(0).standard_normal((4, 12))
    >>> op = ml.BlockInverseFisher(G, 0.1, block_size=5)
    >>> op.bounds.tolist()
    [0, 5, 10, 12]
    >>> F0 = 0.1 * np.eye(5) + G[:, :5].T @ G[:, :5] / 4
    >>> bool(np.allclose(op.block(0), np.linalg.inv(F0)))
    True
    >>> G2 = G.copy()
    >>> op2 = ml.BlockInverseFisher(G2, 0.1, block_size=5, overwrite_grads=True)
    >>> bool(np.allclose(op2.block(0), op.block(0), rtol=1e-14)), G2.flags.writeable
    (True, False)
    """

    def __init__(self, grads, damping, *, block_size=None, blocks=None, check_finite=True,
                 overwrite_grads=False):
        G, be = _v.gradients(grads, "grads")
        lam = _v.damping(damping, "damping", dtype=G.dtype)
        check_finite = _v.boolean(check_finite, "check_finite")
        overwrite = _v.boolean(overwrite_grads, "overwrite_grads")
        m, d = G.shape
        xp = be.xp
        bounds = block_layout(d, block_size, blocks)
        if overwrite:
            _v.reusable_buffer(grads, G, "grads", be)
        sizes = np.diff(bounds)
        groups = []
        with be.device_context():
            colsq = LR.column_sumsq(G, be)
            for b in np.unique(sizes):
                if overwrite and m < b:
                    continue                # built in place above
                starts = bounds[:-1][sizes == b]
                idx = xp.asarray(starts[:, None] + np.arange(b)[None, :])
                Gb = xp.ascontiguousarray(G[:, idx].transpose(1, 0, 2))   # (nb, m, b)
                stacks = LR.build(Gb, starts, lam, m, be, name="grads")
                groups.extend(g.with_index() for g in stacks)
            if overwrite:    # last: a failure above leaves grads untouched
                groups.extend(self._build_in_place(G, bounds, lam, be))
        if overwrite and (sizes > m).any():
            grads.flags.writeable = False   # it holds the factors now; the operator keeps it
        self._bounds = bounds
        self._m = m
        self._damping = lam
        self._groups = groups
        self._colsq = colsq
        self._logdet = float(sum(g.logdet for g in groups))
        self._init_operator(d, G.dtype, be, check_finite=check_finite)

    @staticmethod
    def _build_in_place(G, bounds, lam, be):
        """The stacks of the blocks with m < b, their V_k written over G's own columns.

        Blocks of one size whose starts are equally spaced (every block of a uniform
        layout; per layer otherwise) are one stack, seen as the strided view
        (nb, m, b) of G (strides: the spacing, a row of G, one element): no copy."""
        m, d = G.shape
        sizes = np.diff(bounds)
        starts_all = bounds[:-1]
        views, run_starts = [], []
        for b in np.unique(sizes):
            if m >= b:
                continue
            starts = starts_all[sizes == b]
            runs, i = [], 0
            while i < len(starts):           # maximal runs of equally spaced starts
                j = i + 1
                if j < len(starts):
                    step = starts[j] - starts[i]
                    while j + 1 < len(starts) and starts[j + 1] - starts[j] == step:
                        j += 1
                    j += 1
                runs.append(starts[i:j])
                i = j
            for run in runs:
                step = int(run[1] - run[0]) if len(run) > 1 else int(b)
                isz = G.itemsize
                view = np.lib.stride_tricks.as_strided(
                    G[:, int(run[0]):], shape=(len(run), m, int(b)),
                    strides=(step * isz, d * isz, isz), writeable=True)
                views.append(view)
                run_starts.append(run)
        # every factor before any solve: a Cholesky failure leaves G unchanged
        return [lr.with_index()
                for lr in LR.build_dual_inplace(views, run_starts, lam, m, be, name="grads")]

    # -- layout ------------------------------------------------------------------
    @property
    def num_blocks(self):
        """The number of blocks."""
        return len(self._bounds) - 1

    @property
    def bounds(self):
        """Block boundaries (nblocks + 1,): block k is columns bounds[k]:bounds[k+1]."""
        return self._bounds.copy()

    def block_of(self, q):
        """The index k of the block holding coordinate q.  O(log nblocks)."""
        q = _index(q, "q", self._d)
        return int(np.searchsorted(self._bounds, q, side="right") - 1)

    def _locate(self, k):
        """(group, position in group) of block k."""
        start = self._bounds[k]
        b = int(self._bounds[k + 1] - start)
        for grp in self._groups:
            if grp.b == b:
                pos = grp.locate(start)
                if pos is not None:
                    return grp, pos
        raise AssertionError("block not found")  # pragma: no cover

    def block(self, k):
        """The dense inverse of block k: (alpha I + beta V_k^T V_k), b x b, O(b^2 r)."""
        k = _index(k, "k", self.num_blocks)
        grp, pos = self._locate(k)
        return grp.dense(pos)

    def lowrank_batches(self):
        """Yield (columns (nb, b), alpha, beta, V (nb, r, b) read-only) per stack of
        blocks: block k of a stack is F_k^{-1} = alpha I + beta V_k^T V_k on those columns."""
        for grp in self._groups:
            yield grp.cols(), grp.alpha, grp.beta, B.readonly(grp.V)

    def with_gradients(self, grads):
        """A new operator of the same layout and damping for new gradients (m', d).

        Raises ValueError naming ``grads`` when it does not have the operator's d
        columns (the layout's message "blocks must sum to ..." named an argument the
        caller never gave), and as the constructor otherwise."""
        return BlockInverseFisher(self._gradients_like(grads), self._damping,
                                  blocks=np.diff(self._bounds).tolist(),
                                  check_finite=self._check_finite)

    def _repr_fields(self):
        return [f"m={self._m}", f"blocks={self.num_blocks}",
                f"max_block={int(np.diff(self._bounds).max())}", f"damping={self._damping:.0e}"]

    # -- products ------------------------------------------------------------------
    def _blockwise(self, X, fn):
        Y = self._backend.xp.empty_like(X)
        for grp in self._groups:
            grp.scatter(Y, fn(grp, grp.gather(X)))
        return Y

    def _checks_own_finite(self, X):
        """On the GPU, for one vector whose every stack runs kernels with a flag
        (``LowRank.kernel_checks``): X's NaN/inf check, and that of an overflowing
        result, is one flag the kernels raise, read once after the last stack, instead
        of a separate pass over X and its synchronisation."""
        if not (self._check_finite and self._backend.is_gpu and X.shape[1] == 1):
            return False
        return all(g.kernel_checks(X.dtype) for g in self._groups)

    def _matmat(self, X):
        if self._checks_own_finite(X):
            flag = self._backend.xp.zeros(1, dtype=np.float64)
            Y = self._backend.xp.empty_like(X)
            # the largest stack first: the small ones' launches (a ragged last block)
            # then overlap its kernel instead of delaying its start
            for grp in sorted(self._groups, key=lambda g: -g.V.size):
                # the block kernel writes into Y where the stack's blocks are a range of it
                dst = grp.view(Y)
                res = grp.matmat(grp.gather(X), check=True, flag=flag, out=dst)
                if dst is None or res.data.ptr != dst.data.ptr:
                    grp.scatter(Y, res)
            if B.scalar(flag[0]):                       # the one host synchronisation
                raise NonFiniteInput
            return Y
        return self._blockwise(X, LR.LowRank.matmat)

    def _diagonal(self):
        out = self._backend.xp.empty(self._d, dtype=self._dtype)
        for grp in self._groups:
            grp.scatter(out, grp.diagonal())
        return out

    def _in_block(self, i, j, entry):
        """``entry(group, position, local i, local j)`` for the block holding both i and
        j, or 0 when they lie in different blocks."""
        k = self.block_of(i)
        if self.block_of(j) != k:
            return 0.0
        grp, pos = self._locate(k)
        s = int(self._bounds[k])
        return entry(grp, pos, i - s, j - s)

    def _entry(self, i, j):
        return self._in_block(i, j, LR.LowRank.entry)

    def _quad(self, X):
        q = self._backend.xp.zeros(X.shape[1], dtype=np.float64)
        for grp in self._groups:
            q += grp.quad(grp.gather(X))
        return q

    # -- inverse-Fisher extras -------------------------------------------------------
    def logdet(self):
        """log det F = sum_k log det F_k (determinant lemma per Woodbury block).  O(1)."""
        return self._logdet

    def _fisher_matmat(self, X):
        """F X per block: lambda X + V^T L^T L V X / m (dual) or L (L^T X) (primal)."""
        return self._blockwise(X, LR.LowRank.fisher_matmat)

    def _fisher_entry(self, i, j):
        return self._in_block(i, j, LR.LowRank.fisher_entry)
