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
dense (d, d) matrix H.  For block operators every solve stays inside a block.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import _backend as B
from ._operator import Operator

__all__ = ["saliency", "group_saliency", "prune", "PruneResult"]

_METHODS = ("joint", "independent", "magnitude")
_DIRECT_LIMIT = 512     # joint solves with |Q_k| above this (and > r) go through Woodbury


@dataclass
class PruneResult:
    """What :func:`prune` returns.

    weights : the new weights (removed ones exactly 0)
    mask : boolean, True where a weight is removed (the given mask included)
    loss : predicted loss increase 1/2 dw^T F dw (summed over stages)
    method : the method used
    """
    weights: object
    mask: object
    loss: float
    method: str


class _Dense:
    """A dense (d, d) H given by the user, as a one-block structure."""

    def __init__(self, H):
        self.H = H


def _structure(op, name="op"):
    if isinstance(op, Operator):
        if not hasattr(op, "lowrank_batches"):
            raise TypeError(f"{name}: {type(op).__name__} is not an inverse-Fisher operator with "
                            "a block structure (static, block or sliding window)")
        return op, op.backend
    H, be = B.asarray(op, name)
    if H.ndim != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"{name} must be an operator or a square (d, d) matrix; got shape "
                         f"{tuple(H.shape)}")
    return _Dense(H.astype(np.float64)), be


def _weights(w, d, be, name="w"):
    arr, _ = B.asarray(w, name, backend=be)
    if arr.shape != (d,):
        raise ValueError(f"{name} must have shape ({d},); got shape {tuple(arr.shape)}")
    B.check_finite(arr, name, be)
    return arr.astype(np.float64)


def _dim(S):
    return S.H.shape[0] if isinstance(S, _Dense) else S.shape[0]


def _inverse_diagonal(S, xp):
    return xp.diagonal(S.H).copy() if isinstance(S, _Dense) else S.diagonal().astype(np.float64)


def saliency(w, op):
    """rho_q = w_q^2 / (2 [F^{-1}]_qq) for every q: one diagonal pass, O(dm)."""
    S, be = _structure(op)
    w = _weights(w, _dim(S), be)
    return w * w / (2.0 * _inverse_diagonal(S, be.xp))


def _group_blocks(S, g, xp):
    """Yield (cols (ng, g) host, Hgg (ng, g, g) float64) for all groups of g consecutive weights."""
    if isinstance(S, _Dense):
        d = S.H.shape[0]
        if d % g:
            raise ValueError(f"group_size={g} must divide d={d}")
        cols = np.arange(d).reshape(-1, g)
        c = xp.asarray(cols)
        yield cols, S.H[c[:, :, None], c[:, None, :]]
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


def group_saliency(w, op, group_size=4):
    """1/2 w_g^T (H_gg)^{-1} w_g for each group g of ``group_size`` consecutive weights.

    Groups never cross a block (every block size must be a multiple of
    ``group_size``).  Returns (d // group_size,) saliencies in the order of the
    groups' first index.  O(d r g) for an operator with V of r rows.
    """
    S, be = _structure(op)
    xp = be.xp
    d = _dim(S)
    w = _weights(w, d, be)
    g = _group_size(group_size)
    out = xp.empty(d // g, dtype=np.float64)
    for cols, Hgg in _group_blocks(S, g, xp):
        wg = w[xp.asarray(cols)]
        t = xp.linalg.solve(Hgg, wg[..., None])[..., 0]
        out[xp.asarray(cols[:, 0] // g)] = 0.5 * (wg * t).sum(axis=1)
    return out


def _group_size(g):
    if isinstance(g, (bool, np.bool_)) or not isinstance(g, (int, np.integer)) or g < 1:
        raise ValueError(f"group_size must be a positive integer; got {g!r}")
    return int(g)


def _fisher_quad(S, op, delta, xp):
    """1/2 delta^T F delta."""
    if isinstance(S, _Dense):
        return 0.5 * B.scalar(delta @ xp.linalg.solve(S.H, delta))
    f = op.fisher()
    return 0.5 * f.quad(delta.astype(op.dtype))


def _joint(S, w, Q, xp):
    """dw and predicted loss of the joint OBS removal of the boolean set Q (per block)."""
    d = w.shape[0]
    dw = xp.zeros(d, dtype=np.float64)
    loss = 0.0
    Qh = B.to_host(Q)
    if isinstance(S, _Dense):
        idx = xp.asarray(np.flatnonzero(Qh))
        if len(idx):
            t = xp.linalg.solve(S.H[idx[:, None], idx[None, :]], w[idx])
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
            q, r = len(loc), Vk.shape[0]
            if alpha and q > max(r, _DIRECT_LIMIT):
                # Woodbury in r dims: (aI + b Vq^T Vq)^{-1} = (I - Vq^T (a/b I + Vq Vq^T)^{-1} Vq) / a
                M = Vq @ Vq.T
                M[xp.diag_indices(r)] += alpha / beta
                t = (wq - Vq.T @ xp.linalg.solve(M, Vq @ wq)) / alpha
            else:
                Hqq = beta * (Vq.T @ Vq)
                Hqq[xp.diag_indices(q)] += alpha
                t = xp.linalg.solve(Hqq, wq)
            # dw_block = -H[:, Q] t = -(alpha E_Q t + beta V^T (Vq t))
            blk = -beta * (Vk.T @ (Vq @ t))
            blk[xp.asarray(loc)] -= alpha * t
            dw[xp.asarray(cols[k])] += blk
            loss += 0.5 * B.scalar(wq @ t)
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
    """Boolean mask of the ``count`` eligible entries with the smallest scores."""
    sc = xp.where(eligible, scores, xp.inf)
    order = xp.argsort(sc)[:count]
    sel = xp.zeros(scores.shape[0], dtype=bool)
    sel[order] = True
    return sel


def _one_stage(S, op, w, mask, n_new, method, g, xp):
    d = w.shape[0]
    if n_new == 0:
        return w.copy(), mask.copy(), 0.0
    diag = _inverse_diagonal(S, xp)
    if g:
        gs = xp.empty(d // g, dtype=np.float64)
        for cols, Hgg in _group_blocks(S, g, xp):
            wg = w[xp.asarray(cols)]
            t = xp.linalg.solve(Hgg, wg[..., None])[..., 0]
            gs[xp.asarray(cols[:, 0] // g)] = 0.5 * (wg * t).sum(axis=1)
        if method == "magnitude":
            gs = (w.reshape(-1, g) ** 2).sum(axis=1)
        free = ~mask.reshape(-1, g).any(axis=1)
        selg = _select(gs, free, n_new // g, xp)
        Q = xp.repeat(selg, g)
    else:
        score = xp.abs(w) if method == "magnitude" else w * w / (2.0 * diag)
        Q = _select(score, ~mask, n_new, xp)
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


def prune(w, op, *, sparsity=None, count=None, method="joint", mask=None, group_size=None,
          steps=1, regrad=None):
    """Remove weights by Optimal Brain Surgeon (or a baseline) and update the rest.

    Parameters
    ----------
    w : (d,) weights.
    op : inverse-Fisher operator (static, block, sliding) or dense (d, d) F^{-1}.
    sparsity, count : the target number of removed weights after the call (the
        given ``mask`` included): ``count``, or ``round(sparsity * d)``.  Exactly one.
    method : "joint" (exact OBS for the removed set, solved per block), "independent"
        (summed single-weight updates, then zeroed: the WoodFisher/M-FAC pruner) or
        "magnitude" (smallest |w|, no update).  joint and independent remove the
        same set (smallest saliency), so their losses compare like for like.
    mask : optional boolean (d,), True where weights are already removed; they
        stay zero and are never selected (joint keeps them in its constraint set).
    group_size : optional g: remove groups of g consecutive weights inside a block
        (semi-structured sparsity), selected by group saliency.
    steps : remove in ``steps`` stages of equal size.
    regrad : optional callable ``regrad(weights, mask) -> grads (m, d)`` called between
        stages; the operator is rebuilt from the new gradients (same type, damping,
        layout), as the published recipe recomputes the Fisher between stages.

    Returns
    -------
    PruneResult(weights, mask, loss, method); loss is the predicted increase
    1/2 dw^T F dw (summed over stages, each under its stage's Fisher).
    """
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}; got {method!r}")
    S, be = _structure(op)
    xp = be.xp
    d = _dim(S)
    w = _weights(w, d, be)
    if mask is None:
        m0 = xp.zeros(d, dtype=bool)
    else:
        m0 = B.as_bool(mask, "mask", be)
        if m0.shape != (d,):
            raise ValueError(f"mask must be a boolean array of shape ({d},); got shape "
                             f"{tuple(m0.shape)}")
    if (sparsity is None) == (count is None):
        raise ValueError("give exactly one of sparsity= and count=")
    if count is None:
        if not 0.0 <= float(sparsity) <= 1.0:
            raise ValueError(f"sparsity must be in [0, 1]; got {sparsity}")
        total = int(round(float(sparsity) * d))
    else:
        if isinstance(count, (bool, np.bool_)) or not isinstance(count, (int, np.integer)):
            raise TypeError(f"count must be an integer; got {type(count).__name__}")
        total = int(count)
        if not 0 <= total <= d:
            raise ValueError(f"count must be in [0, {d}]; got {total}")
    g = _group_size(group_size) if group_size is not None else None
    already = int(B.to_host(m0.sum()))
    if total < already:
        raise ValueError(f"the target ({total} removed) is below the {already} weights the mask "
                         "already removes")
    if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive integer; got {steps!r}")
    if regrad is not None and not callable(regrad):
        raise TypeError("regrad must be callable: regrad(weights, mask) -> grads")
    w_cur = w.copy()
    w_cur[m0] = 0.0
    mask_cur = m0.copy()
    loss = 0.0
    for stage in range(1, steps + 1):
        target = already + int(round((total - already) * stage / steps))
        n_new = target - int(B.to_host(mask_cur.sum()))
        if g:
            n_new -= n_new % g
        w_cur, mask_cur, l_stage = _one_stage(S, op, w_cur, mask_cur, n_new, method, g, xp)
        loss += float(l_stage)
        if regrad is not None and stage < steps:
            if not hasattr(op, "with_gradients"):
                raise TypeError("regrad needs an operator that can be rebuilt (static or block)")
            op = op.with_gradients(regrad(w_cur, mask_cur))
            S, _ = _structure(op)
    return PruneResult(weights=w_cur, mask=mask_cur, loss=loss, method=method)
