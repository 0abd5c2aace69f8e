r"""Optimal Brain Surgeon with inverse-Fisher operators (docs/math.md section 3).

With H = F^{-1} and weights w:

* single weight q: saliency rho_q = w_q^2 / (2 H_qq); update dw = -(w_q / H_qq) H e_q;
* joint set Q (all of Q removed at once, optimally): dw = -H E_Q (H_QQ)^{-1} w_Q,
  the KKT solution of min 1/2 dw^T F dw s.t. dw_Q = -w_Q, predicted loss
  increase 1/2 w_Q^T (H_QQ)^{-1} w_Q;
* independent (what the WoodFisher and M-FAC pruners do): the single-weight
  updates summed over Q, then w_Q set to 0;
* magnitude: w_Q set to 0, no update (the baseline);
* groups (consecutive weights inside a block): group saliency
  1/2 w_g^T (H_gg)^{-1} w_g, group update as in the joint formula.

``op`` is any inverse-Fisher operator of the library (static, block, sliding
window: they expose their blocks as F_k^{-1} = alpha I + beta V_k^T V_k) or a
dense (d, d) matrix H (finite with a positive diagonal, checked on entry; symmetric
positive definite, checked by a Cholesky factor of each block it is solved with).  For
block operators every solve stays inside a block.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import _backend as B
from . import _validate as _v
from ._operator import Operator

__all__ = ["saliency", "group_saliency", "prune", "PruneResult"]

_METHODS = ("joint", "independent", "magnitude")
_DIRECT_LIMIT = 512     # joint solves with |Q_k| above this (and > r) go through Woodbury


@dataclass
class PruneResult:
    """What :func:`prune` returns.

    Parameters
    ----------
    weights : array (d,)
        The new weights (removed ones exactly 0), in the namespace and dtype of the
        given ``w``.
    mask : boolean array (d,)
        True where a weight is removed (the given mask included).
    loss : float
        Predicted loss increase 1/2 dw^T F dw (summed over stages).
    method : str
        The method used.

    Examples
    --------
    >>> import numpy as np, mfac_linalg as ml
    >>> r = ml.obs.prune(np.array([3.0, -0.1, 2.0, 0.2]), np.eye(4), count=2,
    ...                  method="magnitude")
    >>> r.weights.tolist(), r.mask.tolist(), r.method
    ([3.0, 0.0, 2.0, 0.0], [False, True, False, True], 'magnitude')
    """
    weights: object
    mask: object
    loss: float
    method: str


class _Dense:
    """A dense (d, d) H given by the user, as a one-block structure."""

    def __init__(self, H, backend):
        self.H = H
        self.shape = H.shape
        self.backend = backend

    def solve(self, A, b, what):
        """A^{-1} b for a positive definite block A of H, refused by name otherwise: one
        Cholesky factorization (the check of :func:`_dense_spd`) and two triangular
        solves (it was factored twice, a Cholesky to check and an LU to solve)."""
        L = _dense_spd(A, self.backend.xp, what)
        be = self.backend
        return be.solve_triangular(L, be.solve_triangular(L, b), trans=True)


def _dense_spd(A, xp, what):
    """Refuse (ValueError naming op) a block of a dense H = F^-1 that is not numerically
    positive definite, before it is solved with: a singular one gave NumPy's bare
    LinAlgError 'Singular matrix', an indefinite one a meaningless update and a negative
    predicted loss.  A Cholesky of A (the lower triangle; batched for a stack), returned."""
    try:
        L = xp.linalg.cholesky(A)
        # CuPy reports a failed factorization only under cupyx.errstate(linalg="raise"):
        # its factor is then NaN or holds a pivot that is not positive
        ok = bool(xp.isfinite(L).all()) and bool(
            (xp.diagonal(L, axis1=-2, axis2=-1) > 0).all())
    except np.linalg.LinAlgError:
        ok = False
    if not ok:
        raise ValueError(f"op (a dense inverse Fisher H = F^-1) must be symmetric positive "
                         f"definite; {what} is not (numerically)")
    return L


def _structure(op, name="op"):
    """(structure, backend): an inverse-Fisher operator with ``lowrank_batches``, or a
    dense H = F^{-1} checked here (square, finite, positive diagonal)."""
    if isinstance(op, Operator):
        if not hasattr(op, "lowrank_batches"):
            raise TypeError(f"{name}: {type(op).__name__} is not an inverse-Fisher operator with "
                            "a block structure (static, block or sliding window)")
        return op, op.backend
    H, be = B.asarray(op, name)
    if H.ndim != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"{name} must be an operator or a square (d, d) matrix; got shape "
                         f"{tuple(H.shape)}")
    H = H.astype(np.float64)
    _v.finite(H, name, be)
    dmin = B.scalar(be.xp.diagonal(H).min()) if H.size else 1.0
    if not dmin > 0:
        raise ValueError(f"{name} (a dense inverse Fisher H = F^-1) must have a positive "
                         f"diagonal; got a diagonal entry {dmin:g}")
    if not np.isfinite(1.0 / dmin):     # w_q / H_qq and (H_QQ)^{-1} would overflow
        raise ValueError(f"{name} (a dense inverse Fisher H = F^-1) must have diagonal "
                         f"entries >= {1 / np.finfo(np.float64).max:.3g} (1/H_qq finite); "
                         f"got a diagonal entry {dmin:g}: rescale H (the updates do not "
                         "depend on its scale)")
    return _Dense(H, be), be


def _weights(w, d, be, name="w"):
    """(w as float64, the dtype results come back in)."""
    arr, _ = B.asarray(w, name, backend=be)
    if arr.shape != (d,):
        raise ValueError(f"{name} must have shape ({d},); got shape {tuple(arr.shape)}")
    _v.finite(arr, name, be)
    return arr.astype(np.float64), arr.dtype


def _single_scores(w, diag, xp):
    """w_q^2 / (2 H_qq) (float64): the published pruner's formula, bit for bit, where w_q^2
    and 2 H_qq are normal numbers (its choices, near-ties included, are reproduced);
    elsewhere (|w_q| / sqrt(2 H_qq))^2, which has no intermediate w_q^2 that overflows or
    underflows where the saliency itself is in range; inf only where it is not."""
    tiny = np.finfo(np.float64).tiny
    with np.errstate(over="ignore", under="ignore"):
        w2, h2 = w * w, 2.0 * diag
        plain = w2 / h2
        ok = xp.isfinite(w2) & xp.isfinite(h2) & ((w2 >= tiny) | (w == 0))
        t = xp.abs(w) / xp.sqrt(h2)
        return xp.where(ok, plain, t * t)


def _deliver(scores, out, xp):
    """Saliencies (float64) in the dtype of ``w``; a ValueError where they overflow it
    (a NumPy overflow warning and inf before)."""
    with np.errstate(over="ignore"):
        res = scores.astype(out, copy=False)
    if not bool(xp.isfinite(res).all()):
        raise ValueError(f"the saliencies overflow {np.dtype(out).name} (the dtype of w): "
                         "w is too large for op (saliencies scale as w^2 / H); rescale w")
    return res


def _op_dtype(S):
    return np.dtype(np.float64 if isinstance(S, _Dense) else S.dtype)


def _ill_conditioned(dtype, what):
    return (f"op is too ill-conditioned for its storage dtype {dtype.name}: {what} "
            "(kappa_W = lambda_max(F)/lambda near 1/eps); raise the damping, or build it "
            "from float64 gradients")


def _inverse_diagonal(S, xp):
    """diag(H) in float64.  A dense H is checked at its conversion; an operator's
    diagonal is checked here: an entry <= 0 (or so small that 1/H_qq overflows) is
    impossible for F^-1 and comes from an operator too ill-conditioned for its storage
    dtype (the dual form's 1 - ||v_q||^2 cancels when kappa_W = lambda_max/lambda nears
    1/eps, float32 first).  It gave negative saliencies, selected first, negative
    predicted losses and huge updates (a zero: a NumPy warning and an error about an
    'x' the caller never passed); now a ValueError naming op."""
    if isinstance(S, _Dense):
        return xp.diagonal(S.H).copy()
    diag = S.diagonal().astype(np.float64)
    if diag.size:
        dmin = B.scalar(diag.min())                      # one host read (NaN propagates)
        if not dmin > 0 or not np.isfinite(1.0 / dmin):
            q = int(B.to_host(xp.argmin(diag)))
            raise ValueError(_ill_conditioned(
                _op_dtype(S), f"its diagonal has an entry [F^-1]_qq = {dmin:g} (q={q}) "
                f"{'<= 0' if not dmin > 0 else 'whose reciprocal overflows'}"))
    return diag


def saliency(w, op):
    """Single-weight OBS saliencies rho_q = w_q^2 / (2 [F^{-1}]_qq) for every q.

    Parameters
    ----------
    w : array_like (d,)
        The weights (NumPy, CuPy or DLPack; finite).
    op : inverse-Fisher operator or array_like (d, d)
        F^{-1}: a static, block or sliding-window operator, or a dense H (finite,
        positive diagonal).

    Returns
    -------
    (d,) array in ``w``'s namespace and dtype.  Cost: one diagonal pass, O(dm).

    Raises
    ------
    TypeError, ValueError
        As for :func:`prune`; also a ValueError where the saliencies overflow the
        dtype of ``w`` (they are computed as (|w_q| / sqrt(2 H_qq))^2: no
        intermediate overflow where the saliency itself is in range).

    Examples
    --------
    >>> import numpy as np, mfac_linalg as ml
    >>> G = np.random.default_rng(0).standard_normal((4, 6))
    >>> op = ml.StaticInverseFisher(G, 0.5)
    >>> w = np.ones(6, dtype=np.float32)
    >>> rho = ml.obs.saliency(w, op)
    >>> rho.dtype, bool(np.allclose(rho, 1 / (2 * np.diag(op.todense()))))
    (dtype('float32'), True)
    """
    S, be = _structure(op)
    w, out = _weights(w, S.shape[0], be)
    return _deliver(_single_scores(w, _inverse_diagonal(S, be.xp), be.xp), out, be.xp)


def _group_blocks(S, g, xp):
    """Yield (cols (ng, g) host, Hgg (ng, g, g) float64) for all groups of g consecutive
    weights."""
    if isinstance(S, _Dense):
        d = S.H.shape[0]
        if d % g:
            raise ValueError(f"group_size={g} must divide d={d}")
        cols = np.arange(d).reshape(-1, g)
        c = xp.asarray(cols)
        Hgg = S.H[c[:, :, None], c[:, None, :]]
        _dense_spd(Hgg, xp, f"a diagonal block H_gg of a group of {g}")
        yield cols, Hgg
        return
    for cols, alpha, beta, V in S.lowrank_batches():
        nb, b = cols.shape
        if b % g:
            raise ValueError(f"group_size={g} must divide every block size; a block has {b}")
        r = V.shape[1]
        Vg = V.astype(np.float64).reshape(nb, r, b // g, g)
        Hgg = beta * xp.einsum("nrgi,nrgj->ngij", Vg, Vg).reshape(-1, g, g)
        Hgg += alpha * xp.eye(g)
        yield cols.reshape(-1, g), Hgg


def _check_group_size(S, op, g):
    """Refuse a group size that does not divide every block before any work (prune with
    count=0, or stages that remove nothing before the last, accepted it, the latter after
    calling regrad).  d % g is necessary for every layout; the block sizes are checked
    where the operator states them (``bounds``), else when the groups are built."""
    d = S.shape[0]
    if isinstance(S, _Dense) or not hasattr(op, "bounds"):
        if d % g:
            raise ValueError(f"group_size={g} must divide d={d}")
        return
    sizes = np.diff(B.to_host(op.bounds))
    bad = sizes[sizes % g != 0]
    if bad.size:
        raise ValueError(f"group_size={g} must divide every block size; a block has "
                         f"{int(bad[0])}")


def _group_scores(S, w, g, xp):
    """1/2 w_g^T (H_gg)^{-1} w_g for every group (the one group-saliency loop).  Each w_g
    is scaled by a power of two to a largest entry in [1/2, 1) before the solve and the
    factor is put back after (exact): no intermediate overflow or underflow where the
    saliency is in range, inf (no warning) where it is not."""
    out = xp.empty(w.shape[0] // g, dtype=np.float64)
    for cols, Hgg in _group_blocks(S, g, xp):
        wg = w[xp.asarray(cols)]
        _, e = xp.frexp(xp.abs(wg).max(axis=1))          # max |w_g| = f 2^e
        wg = xp.ldexp(wg, -e[:, None])
        try:
            t = xp.linalg.solve(Hgg, wg[..., None])[..., 0]
        except np.linalg.LinAlgError:     # exactly singular in floating point
            raise ValueError(_ill_conditioned(
                _op_dtype(S), "a group's block H_gg is singular")) from None
        with np.errstate(over="ignore", under="ignore"):
            out[xp.asarray(cols[:, 0] // g)] = xp.ldexp(0.5 * (wg * t).sum(axis=1), 2 * e)
    if out.size and not B.scalar(out.min()) >= 0:   # NaN, or H_gg numerically indefinite
        raise ValueError(_ill_conditioned(
            _op_dtype(S), "a group's block H_gg is not numerically positive definite"))
    return out


def group_saliency(w, op, group_size=4):
    """Group OBS saliencies 1/2 w_g^T (H_gg)^{-1} w_g, g = ``group_size`` consecutive weights.

    Parameters
    ----------
    w : array_like (d,)
        The weights (finite).
    op : inverse-Fisher operator or array_like (d, d)
        As for :func:`saliency`.
    group_size : int, default 4
        g; groups never cross a block (every block size, or d for a dense H, must be
        a multiple of it).

    Returns
    -------
    (d // g,) array in ``w``'s namespace and dtype: the saliencies in the order of the
    groups' first index.  Cost O(d r g) for an operator with V of r rows.

    Raises
    ------
    TypeError
        ``group_size`` not an integer; ``op`` not an inverse-Fisher operator or array.
    ValueError
        ``group_size`` < 1 or not dividing a block; bad ``w`` or dense ``op`` (a
        block H_gg of a dense ``op`` not positive definite included); saliencies
        overflowing the dtype of ``w``; an operator too ill-conditioned for its
        dtype (a block H_gg singular or giving a negative saliency).

    Examples
    --------
    >>> import numpy as np, mfac_linalg as ml
    >>> op = ml.BlockInverseFisher(np.random.default_rng(0).standard_normal((3, 8)), 0.1,
    ...                            block_size=4)
    >>> ml.obs.group_saliency(np.ones(8), op, group_size=2).shape
    (4,)
    """
    S, be = _structure(op)
    w, out = _weights(w, S.shape[0], be)
    g = _v.positive_int(group_size, "group_size")
    return _deliver(_group_scores(S, w, g, be.xp), out, be.xp)


def _fisher_quad(S, op, delta, xp):
    """1/2 delta^T F delta.  For an operator, delta (float64) is scaled by a power of two
    to a largest entry below 1 before it is cast to the operator's dtype and the factor
    is put back in float64: a float64 delta beyond float32's range (or below it) gave
    NaN/inf or 0 in the cast (a ValueError about an 'x' the caller never passed)."""
    if isinstance(S, _Dense):
        return 0.5 * B.scalar(delta @ S.solve(S.H, delta, "H"))
    top = B.scalar(xp.abs(delta).max()) if delta.size else 0.0
    if top == 0.0:
        return 0.0
    _, e = np.frexp(top)                                  # top = f 2^e, f in [1/2, 1)
    q = op.fisher().quad(xp.ldexp(delta, -int(e)).astype(op.dtype))
    with np.errstate(over="ignore", under="ignore"):   # an overflow is refused by prune
        return 0.5 * float(np.ldexp(np.float64(q), 2 * int(e)))


def _block_solve(alpha, beta, Vq, wq, xp):
    """t = (alpha I + beta Vq^T Vq)^{-1} wq: Woodbury in r dims for large |Q|, direct
    otherwise; H = alpha I alone (beta = 0: an empty window) is a division."""
    r, q = Vq.shape
    if not beta or not r:
        return wq / alpha
    if alpha and q > max(r, _DIRECT_LIMIT):
        # (aI + b Vq^T Vq)^{-1} = (I - Vq^T (a/b I + Vq Vq^T)^{-1} Vq) / a
        M = Vq @ Vq.T
        M[xp.diag_indices(r)] += alpha / beta
        return (wq - Vq.T @ xp.linalg.solve(M, Vq @ wq)) / alpha
    Hqq = beta * (Vq.T @ Vq)
    Hqq[xp.diag_indices(q)] += alpha
    return xp.linalg.solve(Hqq, wq)


def _joint(S, w, Q, xp):
    """dw and predicted loss of the joint OBS removal of the boolean set Q (per block)."""
    dw = xp.zeros(w.shape[0], dtype=np.float64)
    loss = 0.0
    Qh = B.to_host(Q)
    if isinstance(S, _Dense):
        idx = xp.asarray(np.flatnonzero(Qh))
        if len(idx):
            HQQ = S.H[idx[:, None], idx[None, :]]
            t = S.solve(HQQ, w[idx], "its submatrix H_QQ on the removed weights")
            dw = -(S.H[:, idx] @ t)
            loss = 0.5 * B.scalar(w[idx] @ t)
        return dw, loss
    for cols, alpha, beta, V in S.lowrank_batches():
        sel = Qh[cols]                                    # (nb, b) host
        for k in np.flatnonzero(sel.any(axis=1)):         # only blocks that lose weights
            loc = np.flatnonzero(sel[k])
            Vk = V[k].astype(np.float64)
            Vq = Vk[:, xp.asarray(loc)]                   # (r, q)
            wq = w[xp.asarray(cols[k, loc])]
            try:
                t = _block_solve(alpha, beta, Vq, wq, xp)
            except np.linalg.LinAlgError:     # exactly singular in floating point
                raise ValueError(_ill_conditioned(
                    _op_dtype(S), "the block H_QQ of the removed weights is singular")) \
                    from None
            # dw_block = -H[:, Q] t = -(alpha E_Q t + beta V^T (Vq t))
            blk = -beta * (Vk.T @ (Vq @ t))
            blk[xp.asarray(loc)] -= alpha * t
            dw[xp.asarray(cols[k])] += blk
            loss += 0.5 * B.scalar(wq @ t)
    if loss < 0:    # 1/2 w_Q^T (H_QQ)^{-1} w_Q >= 0 for a positive definite H_QQ
        raise ValueError(_ill_conditioned(
            _op_dtype(S), "the block H_QQ of the removed weights is not numerically positive "
            "definite"))
    return dw, loss


def _independent(S, w, Q, diag, xp):
    """Sum of the single-weight OBS updates over Q: -H s with s_q = w_q / H_qq on Q."""
    s = xp.where(Q, w / diag, 0.0)
    if isinstance(S, _Dense):
        return -(S.H @ s)
    dw = xp.zeros_like(w)
    for cols, alpha, beta, V in S.lowrank_batches():
        c = xp.asarray(cols)
        sb = s[c][..., None]                               # (nb, b, 1)
        Vd = V.astype(np.float64)
        hb = alpha * sb + beta * (Vd.transpose(0, 2, 1) @ (Vd @ sb))
        dw[c] = -hb[..., 0]
    return dw


def _select(scores, eligible, count, xp):
    """Boolean mask of the ``count`` eligible entries with the smallest scores (sorted
    among the eligible ones only: a score that overflowed to inf must not tie with the
    ineligible entries, which an inf placeholder for them would let in)."""
    idx = xp.flatnonzero(eligible)
    order = idx[xp.argsort(scores[idx])[:count]]
    sel = xp.zeros(scores.shape[0], dtype=bool)
    sel[order] = True
    return sel


def _select_groups(scores, masked, n_new, g, exact, what, xp):
    """Groups (boolean (d/g,)) removing exactly ``n_new`` more weights, smallest scores
    first; a group with p weights already masked removes g - p more.  Where no choice
    reaches ``n_new``: a ValueError (``exact``) or the largest reachable count below it."""
    free = g - B.to_host(masked).astype(np.int64)
    order = np.argsort(B.to_host(scores), kind="stable")
    order = order[free[order] > 0]
    sel = np.zeros(free.shape[0], dtype=bool)
    if (free[order] == g).all():                       # no partly masked group: vectorised
        sel[order[:n_new // g]] = True
        remaining = n_new % g
    else:
        remaining = n_new
        for k in order:
            if remaining == 0:
                break
            if free[k] <= remaining:
                sel[k] = True
                remaining -= int(free[k])
    if remaining:
        # the greedy fill by score skipped a group larger than what remained; whether a
        # choice of whole groups reaches n_new is a subset sum over their free sizes
        # (1 .. g): solved exactly, then the lowest-scored groups of each size are taken
        best, counts = _reachable(free[order], n_new)
        if best > n_new - remaining:
            sel[:] = False
            for size, k in counts.items():
                sel[order[free[order] == size][:k]] = True
            remaining = n_new - best
    if exact and remaining:
        raise ValueError(f"{what} cannot be reached by removing whole groups of {g}: "
                         f"{n_new} more weights to remove, at most {n_new - remaining} "
                         f"reachable; give a count that whole groups reach (a multiple of "
                         f"{g} when no group is partly masked)")
    return xp.asarray(sel)


def _reachable(sizes, target):
    """(the largest t <= target that a subset of ``sizes`` sums to, {size: how many of it})
    by a bounded subset sum over the distinct sizes (each at most the group size):
    O(distinct sizes x log(count) x target) boolean operations."""
    values, counts = np.unique(np.asarray(sizes, dtype=np.int64), return_counts=True)
    reach = np.zeros(target + 1, dtype=bool)
    reach[0] = True
    layers = []
    for s, c in zip(values.tolist(), counts.tolist()):
        layers.append(reach)
        new = reach.copy()
        k, rem = 1, c                        # binary splitting: 1, 2, 4, ... copies
        while rem > 0:
            take = min(k, rem)
            shift = take * s
            if shift <= target:
                new[shift:] |= new[:target + 1 - shift].copy()
            rem -= take
            k *= 2
        reach = new
    best = int(np.flatnonzero(reach)[-1])
    t, used = best, {}
    for s, c, prev in zip(values.tolist()[::-1], counts.tolist()[::-1], layers[::-1]):
        cand = prev[t::-s][:c + 1]           # prev[t - j s] for j = 0 .. c
        j = int(np.argmax(cand))             # the fewest copies of s that still reach t
        used[s] = j
        t -= j * s
    return best, used


def _choose(S, w, mask, n_new, method, g, diag, xp, exact, what):
    """The boolean set of weights removed in this stage."""
    if g:
        if method == "magnitude":
            scores = (w.reshape(-1, g) ** 2).sum(axis=1)
        else:
            scores = _group_scores(S, w, g, xp)
        selg = _select_groups(scores, mask.reshape(-1, g).sum(axis=1), n_new, g, exact, what,
                              xp)
        return xp.repeat(selg, g) & ~mask
    score = xp.abs(w) if method == "magnitude" else _single_scores(w, diag, xp)
    return _select(score, ~mask, n_new, xp)


def _one_stage(S, op, w, mask, n_new, method, g, xp, exact, what):
    if n_new == 0:
        return w.copy(), mask.copy(), 0.0
    # diag(H) only where it is read: single-weight scores of "joint"/"independent" and
    # the independent update (not for "magnitude", nor for group scores)
    diag = (_inverse_diagonal(S, xp)
            if method == "independent" or (not g and method != "magnitude") else None)
    Q = _choose(S, w, mask, n_new, method, g, diag, xp, exact, what)
    new_mask = mask | Q
    if method == "joint":
        dw, loss = _joint(S, w, new_mask, xp)     # keeps the given mask at zero too
        w_new = w + dw
        w_new[new_mask] = 0.0                     # exact in theory; remove rounding residue
        return w_new, new_mask, loss
    if method == "independent":
        w_new = w + _independent(S, w, Q, diag, xp)
    else:
        w_new = w.copy()
    w_new[new_mask] = 0.0
    return w_new, new_mask, _fisher_quad(S, op, w_new - w, xp)


def _target(sparsity, count, d):
    """(total removed after the call, exact?, its description)."""
    if (sparsity is None) == (count is None):
        raise ValueError("give exactly one of sparsity= and count=")
    if count is None:
        s = _v.fraction(sparsity, "sparsity")
        return int(round(s * d)), False, f"sparsity={s:g}"
    c = _v.integer(count, "count", minimum=0, maximum=d)
    return c, True, f"count={c}"


def prune(w, op, *, sparsity=None, count=None, method="joint", mask=None, group_size=None,
          steps=1, regrad=None):
    r"""Remove weights by Optimal Brain Surgeon (or a baseline) and update the rest.

    With H = F^{-1}: joint removal of the set Q is the KKT solution
    :math:`\delta w = -H E_Q (H_{QQ})^{-1} w_Q` of
    :math:`\min \tfrac12 \delta w^T F \delta w` s.t. :math:`\delta w_Q = -w_Q`
    (docs/math.md §3), solved per block.

    Parameters
    ----------
    w : array_like (d,)
        The weights (finite).  Results come back in its namespace and dtype.
    op : inverse-Fisher operator or array_like (d, d)
        Static, block or sliding-window operator, or a dense H = F^{-1} (finite,
        positive diagonal).
    sparsity : float in [0, 1], optional
        Target fraction removed after the call (the given ``mask`` included):
        ``round(sparsity * d)`` weights; with groups, the largest count whole
        groups reach below it.
    count : int in [0, d], optional
        Target number removed after the call, honoured exactly (with groups: a
        ValueError where whole groups cannot reach it).  Exactly one of
        ``sparsity`` and ``count``.
    method : {"joint", "independent", "magnitude"}
        "joint" (exact OBS for the removed set, solved per block), "independent"
        (summed single-weight updates, then zeroed: the WoodFisher/M-FAC pruner)
        or "magnitude" (smallest |w|, no update).  joint and independent remove
        the same set (smallest saliency), so their losses compare like for like.
    mask : boolean array (d,), optional
        True where weights are already removed; they stay zero and are never
        selected (joint keeps them in its constraint set).
    group_size : int, optional
        g: remove groups of g consecutive weights inside a block (semi-structured
        sparsity), selected by group saliency; a partly masked group removes its
        remaining weights.
    steps : int in [1, max(1, d)], default 1
        Remove in ``steps`` stages of equal size.
    regrad : callable, optional
        ``regrad(weights, mask) -> grads (m, d)`` called between stages; the
        operator is rebuilt from the new gradients (same type, damping, layout).

    Returns
    -------
    PruneResult(weights, mask, loss, method); loss is the predicted increase
    1/2 dw^T F dw (summed over stages, each under its stage's Fisher).

    Raises
    ------
    TypeError
        A wrong type: ``sparsity`` a bool or a string, ``count``, ``steps`` or
        ``group_size`` not an integer, ``method`` not a string, ``regrad`` not
        callable, ``op`` not an inverse-Fisher operator or array, ``mask`` not of
        boolean dtype.
    ValueError
        A bad value: out-of-range ``sparsity``/``count``, a target below the
        mask, a count groups cannot reach, NaN/inf in ``w`` or a dense ``op``,
        a dense ``op`` with a diagonal entry <= 0 or so small that 1/H_qq
        overflows, or whose block solved with (H_QQ, H_gg, or H itself for the
        losses of "independent" and "magnitude") is not numerically positive
        definite; an operator too ill-conditioned for its storage dtype (a
        diagonal entry <= 0, a block H_QQ or H_gg singular or giving a negative
        loss: kappa_W near 1/eps, float32 first); a ``group_size`` not dividing
        every block (refused before any work, whatever the count); wrong shapes
        (``regrad``'s grads, converted and checked after each call, included);
        pruned weights or a loss that overflow (in ``w``'s dtype) for a badly
        scaled ``op``.

    Notes
    -----
    Costs per stage: joint O(sum_k (q_k^2 r + q_k^3)) with q_k removed weights in
    block k (Woodbury O(q_k r^2 + r^3) for large q_k), independent and magnitude
    O(dm); the selection O(d log d).

    Examples
    --------
    >>> import numpy as np, mfac_linalg as ml
    >>> rng = np.random.default_rng(0)
    >>> op = ml.StaticInverseFisher(rng.standard_normal((8, 16)), 0.1)
    >>> res = ml.obs.prune(rng.standard_normal(16), op, count=6, method="joint")
    >>> int(res.mask.sum()), bool((res.weights[res.mask] == 0).all()), res.loss > 0
    (6, True, True)
    """
    method = _v.choice(method, "method", _METHODS)
    S, be = _structure(op)
    xp = be.xp
    d = S.shape[0]
    w, out_dtype = _weights(w, d, be)
    if mask is None:
        m0 = xp.zeros(d, dtype=bool)
    else:
        m0 = B.as_bool(mask, "mask", be)
        if m0.shape != (d,):
            raise ValueError(f"mask must be a boolean array of shape ({d},); got shape "
                             f"{tuple(m0.shape)}")
    total, exact, what = _target(sparsity, count, d)
    g = None if group_size is None else _v.positive_int(group_size, "group_size")
    if g is not None:
        _check_group_size(S, op, g)
    already = int(B.to_host(m0.sum()))
    if total < already:
        raise ValueError(f"the target ({total} removed) is below the {already} weights the mask "
                         "already removes")
    steps = _v.integer(steps, "steps", minimum=1, maximum=max(1, d))   # d: one per weight
    if regrad is not None and not callable(regrad):
        raise TypeError(f"regrad must be callable: regrad(weights, mask) -> grads; got "
                        f"{type(regrad).__name__}")
    if regrad is not None and not hasattr(op, "with_gradients"):
        raise TypeError("regrad needs an operator that can be rebuilt (static or block)")
    w_cur = w.copy()
    w_cur[m0] = 0.0
    mask_cur = m0.copy()
    loss = 0.0
    for stage in range(1, steps + 1):
        target = already + int(round((total - already) * stage / steps))
        n_new = target - int(B.to_host(mask_cur.sum()))
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            # an overflow here (a badly scaled op) is refused by name below
            w_cur, mask_cur, l_stage = _one_stage(S, op, w_cur, mask_cur, n_new, method, g,
                                                  xp, exact and stage == steps, what)
        loss += float(l_stage)
        if regrad is not None and stage < steps:
            # converted and checked here, whatever regrad returns (a list of the wrong
            # width reached a static operator and failed in the next stage with a NumPy
            # broadcast error, a block operator with "blocks must sum to ...")
            grads, _ = _v.gradients(regrad(w_cur.astype(out_dtype), mask_cur.copy()),
                                    "the grads returned by regrad(weights, mask)", backend=be)
            if grads.shape[1] != d:
                raise ValueError(f"regrad(weights, mask) must return grads of shape (m, {d}); "
                                 f"got shape {tuple(grads.shape)}")
            op = op.with_gradients(grads)
            S, _ = _structure(op)
    with np.errstate(over="ignore"):
        w_out = w_cur.astype(out_dtype, copy=False)
    if not bool(xp.isfinite(w_out).all()) or not np.isfinite(loss):
        raise ValueError(f"op is too badly scaled for these weights: the pruned weights "
                         f"({w_out.dtype}) or the predicted loss overflowed to inf/NaN; "
                         "rescale op or w")
    return PruneResult(weights=w_out, mask=mask_cur, loss=loss, method=method)
