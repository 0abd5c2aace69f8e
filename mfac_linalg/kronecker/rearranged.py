r"""The rearranged Fisher R(F), matrix-free, and its top singular triples (docs/math.md §4, §8).

R(F) has the row (i, j) = vec of the block F_ij, so that
``||F - B kron C||_F = ||R(F) - vec(B) vec(C)^T||_F`` (Van Loan-Pitsianis).  With per-sample
position matrices A_n (T x d_in) and G_n (T x d_out) (T = 1 for a dense layer)

    R vec(Q)   = vec((1/n) sum_n G_n^T (A_n Q A_n^T) G_n)
    R^T vec(P) = vec((1/n) sum_n A_n^T (G_n P G_n^T) A_n)

(for T = 1: ``(1/n) sum_n (a_n^T Q a_n) g_n g_n^T``).  R maps symmetric matrices to symmetric
matrices; every vector here is a symmetric matrix, so the triples found are those of R on the
symmetric matrices (all of R(F) for a dense layer, whose antisymmetric part is zero).

Two solvers, both stopping on the two-sided residual of docs/math.md §8,

    r_i = max(||R q_i - sigma_i p_i||, ||R^T p_i - sigma_i q_i||) / sigma_1 <= tol,

which bounds the error of the factors by about r / gap (a change of sigma of tol sigma_1 would
bound it by only sqrt(tol)):

* :func:`subspace_triples`: subspace (block power) iteration with Rayleigh-Ritz; one R and one
  R^T product on a block of k + 2 vectors per iteration.
* :func:`lanczos_triples`: restarted Golub-Kahan-Lanczos bidiagonalization with full
  reorthogonalization; the right residual is beta_j |u_{j,i}| for free after every step j,
  and a cycle ends at the first step where it reaches tol.

Both report the final residuals from two explicit products (not from the recurrences).
"""
from __future__ import annotations

import math
import os
import sys
import warnings

import numpy as np

from .. import _backend as B

__all__ = ["ConvergenceWarning", "Rearranged", "subspace_triples", "lanczos_triples",
           "sequential_triples"]


class ConvergenceWarning(RuntimeWarning):
    """An iterative builder stopped at ``maxiter`` before its residual reached ``tol``.

    The operator is still built from the last iterate; ``op.info`` holds the residual reached.

    Examples
    --------
    >>> import warnings, numpy as np, mfac_linalg as ml
    >>> rng = np.random.default_rng(0)
    >>> a, g = rng.standard_normal((100, 20)), rng.standard_normal((100, 15))
    >>> with warnings.catch_warnings(record=True) as w:
    ...     warnings.simplefilter("always")
    ...     op = ml.deflation(a, g, 1e-2, maxiter=1)
    >>> w[0].category is ml.ConvergenceWarning, op.info["converged"]
    (True, False)
    """


_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


def user_stacklevel():
    """The ``stacklevel`` that points a warning at the first frame outside mfac_linalg
    (the builders reach the warning through different depths of library frames)."""
    level, f = 1, sys._getframe(1)
    while f is not None and os.path.abspath(f.f_code.co_filename).startswith(_PACKAGE):
        f, level = f.f_back, level + 1
    return level


def _sym(X):
    return (X + X.swapaxes(-1, -2)) * 0.5


class Rearranged:
    """R = R(F) (minus ``vec(P0) vec(Q0)^T`` when ``deflate=(P0, Q0)``), on stacks of matrices.

    ``layer`` is a :class:`~mfac_linalg.kronecker.conv.LayerData`.  ``R(Q)`` maps
    (k, d_in, d_in) to (k, d_out, d_out), ``RT(P)`` the other way; each costs
    O(k n T (d_in^2 + d_out^2) + k n T^2 (d_in + d_out)) (T = 1: O(k n (d_in^2 + d_out^2))).
    ``products`` counts the matrices multiplied so far.
    """

    def __init__(self, layer, deflate=None):
        self.layer = layer
        self.d_out, self.d_in = layer.d_out, layer.d_in
        self.xp = layer.xp
        self.deflate = deflate
        self.products = 0
        self.dim = min(self.d_in * (self.d_in + 1) // 2, self.d_out * (self.d_out + 1) // 2)

    def _apply(self, X, product, side):
        """``product`` on the rows of X, less the deflated triple's part: with
        (P0, Q0) = ``deflate`` and (out, inp) = (P0, Q0) for R (side 0) or (Q0, P0) for
        Rᵀ (side 1), Y_i - out <inp, X_i>; then symmetrised."""
        self.products += X.shape[0]
        Y = product(X)
        if self.deflate is not None:
            out, inp = self.deflate if side == 0 else self.deflate[::-1]
            Y = Y - out[None] * (inp[None] * X).sum(axis=(1, 2))[:, None, None]
        return _sym(Y)

    def R(self, Q):
        return self._apply(Q, self.layer.r_product, 0)

    def complement(self, X, side):
        """X (rows) restricted to where the triples are sought (all of it here)."""
        return X

    def complement_basis(self, E, side):
        """An orthonormal basis (rows) of where the triples are sought, from the orthonormal
        basis E of all symmetric matrices of that side: E itself here."""
        return E

    def RT(self, P):
        return self._apply(P, self.layer.rt_product, 1)


def _orth(M, xp):
    """Orthonormal rows spanning the rows of M (k, D) (Householder QR: always orthonormal)."""
    q, _ = xp.linalg.qr(M.T)
    return q.T


def _random_sym(rng, k, d, xp):
    X = rng.standard_normal((k, d, d))
    return xp.asarray(X + X.transpose(0, 2, 1))


def _start_block(Rop, p, init, rng):
    """p orthonormal symmetric (d_in x d_in) start vectors: ``init`` first, then random."""
    xp, d = Rop.xp, Rop.d_in
    blocks = [] if init is None else [X[None] for X in init]
    blocks.append(_random_sym(rng, p, d, xp))
    V = xp.concatenate(blocks, axis=0)[:p].reshape(p, -1)
    return _orth(V, xp)


def _final(Rop, sig, P, Q, k, info, tol, maxiter, what, scale=0.0):
    """Residuals from two explicit products, ``info`` filled, the warning on non-convergence."""
    xp = Rop.xp
    d_out, d_in = Rop.d_out, Rop.d_in
    kk = min(k, P.shape[0])
    Pk = xp.zeros((k, d_out, d_out))
    Qk = xp.zeros((k, d_in, d_in))
    sk = xp.zeros(k)
    Pk[:kk] = P[:kk].reshape(kk, d_out, d_out)
    Qk[:kk] = Q[:kk].reshape(kk, d_in, d_in)
    sk[:kk] = sig[:kk]
    s1 = float(B.to_host(sk[0]))
    left = xp.linalg.norm((Rop.R(Qk) - sk[:, None, None] * Pk).reshape(k, -1), axis=1)
    right = xp.linalg.norm((Rop.RT(Pk) - sk[:, None, None] * Qk).reshape(k, -1), axis=1)
    scale = max(s1, scale)
    scale = scale if scale > 0 else 1.0
    info["residual_left"] = (B.to_host(left) / scale).tolist()
    info["residual_right"] = (B.to_host(right) / scale).tolist()
    info["residual"] = max(info["residual_left"] + info["residual_right"])
    info["sigma"] = B.to_host(sk).tolist()
    info["converged"] = bool(info["residual"] <= tol)
    info["products"] = Rop.products
    if not info["converged"]:
        its = info.get("iterations", maxiter)
        why = ("R was formed and its SVD taken, so the residual is the rounding of the "
               "products: tol is below what this data allows" if info.get("dense")
               else f"maxiter={maxiter}")
        warnings.warn(f"{what} stopped after {its} iteration{'s' if its != 1 else ''} "
                      f"({why}) with the two-sided residual {info['residual']:.2e} > "
                      f"tol={tol:.1e}; the factors are accurate to about residual / gap "
                      "(see op.info)", ConvergenceWarning, stacklevel=user_stacklevel())
    return sk, Pk, Qk, info


def _align_clusters(s, P, Q, converged, tol, Rop):
    """Within each cluster of (numerically) equal singular values among the leading
    converged triples (``converged``: a host boolean per triple, or None for all), rotate
    the triples (the same orthogonal H on both sides, which keeps R q_i = sigma p_i) so
    that the first one is the cluster's projection of vec(I): with a repeated sigma every
    basis of the cluster is a valid answer, and an arbitrary one gives indefinite factors
    (tr P = 0) where the trace-maximal one keeps them semidefinite for a semidefinite F.
    Sums over a whole cluster do not change."""
    xp = Rop.xp
    n = int(s.shape[0])
    if converged is not None and not converged.all():
        n = int(converged.argmin())          # the leading run of converged triples
    sh = np.asarray(B.to_host(s[:n]), dtype=float)
    if n < 2 or sh[0] <= 0:
        return P, Q
    # the whole spread of a cluster within tol / 10: rotating triples whose sigma differ
    # by delta adds about delta to their residuals (sigma is not rotated with them)
    gap = max(0.1 * tol, 1e-15) * sh[0]
    i = 0
    while i < n:
        j = i + 1
        while j < n and sh[i] - sh[j] <= gap:
            j += 1
        if j - i > 1:
            for side, d in ((P, Rop.d_out), (Q, Rop.d_in)):
                t = np.asarray(B.to_host(side[i:j].reshape(j - i, d, d).trace(axis1=1, axis2=2)))
                nt = float(np.linalg.norm(t))
                if nt > 1e-8 * math.sqrt(d):
                    break
            else:
                i = j
                continue
            c = t / nt
            e1 = np.zeros(j - i)
            e1[0] = 1.0
            v = c - e1
            nv = float(np.linalg.norm(v))
            if nv > 1e-15:
                v /= nv
                H = xp.asarray(np.eye(j - i) - 2.0 * np.outer(v, v))   # H e_1 = c, H = H^T
                P = P.copy()
                Q = Q.copy()
                P[i:j] = H @ P[i:j]
                Q[i:j] = H @ Q[i:j]
        i = j
    return P, Q


def _sym_basis(d, xp):
    """An orthonormal basis (Frobenius) of the symmetric d x d matrices, (d(d+1)/2, d, d)."""
    E = np.zeros((d * (d + 1) // 2, d, d))
    r = 0
    for i in range(d):
        E[r, i, i] = 1.0
        r += 1
        for j in range(i + 1, d):
            E[r, i, j] = E[r, j, i] = math.sqrt(0.5)
            r += 1
    return xp.asarray(E)


def dense_triples(Rop, k, *, tol, maxiter, info, scale=0.0, seed=0):
    """All triples of ``Rop`` from its matrix on an orthonormal basis of the symmetric
    matrices of the smaller side (restricted to the operator's ``complement``): one
    product per basis matrix, then an SVD; O(products + dim_small^2 d_big^2), no basis of
    the larger side.  Exact; for operators whose smaller side has no more dimensions than
    a Krylov cycle would take steps (a cycle that spans a whole side leaves nothing to
    restart from, and breakdowns hide the triples a fresh vector missed).  The larger
    side's vectors of zero singular values (the SVD leaves them unconstrained) are random
    symmetric ones in the complement, orthogonal to the others: R q = 0 there, as the
    small side's basis holds all of R's range."""
    xp = Rop.xp
    rng = np.random.default_rng(seed)
    d_out, d_in = Rop.d_out, Rop.d_in
    if d_out * (d_out + 1) <= d_in * (d_in + 1):     # R = E^T W, rows of W = R^T e_i
        E = Rop.complement_basis(_sym_basis(d_out, xp).reshape(-1, d_out * d_out), "left")
        W = Rop.RT(E.reshape(-1, d_out, d_out)).reshape(E.shape[0], -1)
        u, s, vt = xp.linalg.svd(W, full_matrices=False)        # R = (E^T u) s vt
        P, Q = u.T @ E, vt
        big, side, d = Q, "right", d_in
    else:                                            # R = Z^T E, rows of Z = R e_i
        E = Rop.complement_basis(_sym_basis(d_in, xp).reshape(-1, d_in * d_in), "right")
        Z = Rop.R(E.reshape(-1, d_in, d_in)).reshape(E.shape[0], -1)
        u, s, vt = xp.linalg.svd(Z, full_matrices=False)        # R = vt^T s (u^T E)
        P, Q = vt, u.T @ E
        big, side, d = P, "left", d_out
    # zero: below rounding of R's scale (a deflated R's own "singular values" are noise
    # whose vectors need not lie in the complement)
    sh = np.asarray(B.to_host(s), dtype=float)
    zero = np.flatnonzero(sh <= 1e-14 * max(float(sh[0]) if sh.size else 0.0, scale))
    if zero.size:
        big = big.copy()
        proj = lambda X: Rop.complement(X.reshape(1, -1), side)     # noqa: E731
        for i in zero:
            big[i] = _fresh(rng, big, int(i), d, xp, proj)
        if side == "right":
            Q = big
        else:
            P = big
    info["iterations"] = 1
    info["dense"] = True
    P, Q = _align_clusters(s, P, Q, None, tol, Rop)
    return _final(Rop, s, P, Q, k, info, tol, maxiter, info["solver"] + " (R formed)", scale)


def subspace_triples(Rop, k, *, tol, maxiter, init=None, oversample=2, seed=0, scale=0.0):
    """Top-k singular triples of ``Rop`` by subspace iteration with Rayleigh-Ritz.

    Block of p = k + ``oversample`` vectors (capped by the dimension); the triples i < k
    converge like (sigma_{p+1} / sigma_i)^(2 iterations).  The right residual of each Ritz
    triple costs nothing (R^T U is the next power step); the left one is ~eps by construction.
    Residuals are relative to max(sigma_1, ``scale``).  A stop needs the residuals <= tol
    and the top-k sigma of two iterations in a row to agree to tol sigma_1 (a warm start at
    a lower triple has a zero residual at once).  Returns
    ``(sigma (k,), P (k, d_out, d_out), Q (k, d_in, d_in), info)`` with unit-norm P, Q.
    """
    xp = Rop.xp
    rng = np.random.default_rng(seed)
    kk = min(k, Rop.dim)
    p = min(kk + oversample, Rop.dim)
    info = {"solver": "subspace", "iterations": 0}
    if Rop.dim <= p:                     # the block would span a whole side: exact instead
        return dense_triples(Rop, k, tol=tol, maxiter=maxiter, info=info, scale=scale)
    V = Rop.complement(_start_block(Rop, p, init, rng), "right")
    d_out, d_in = Rop.d_out, Rop.d_in
    prev = None
    for it in range(1, maxiter + 1):
        U = Rop.complement(_orth(Rop.R(V.reshape(p, d_in, d_in)).reshape(p, -1), xp), "left")
        W = Rop.RT(U.reshape(p, d_out, d_out)).reshape(p, -1)       # rows R^T u_j
        u, s, vt = xp.linalg.svd(W @ V.T)                              # U^T R V^T... = u s vt
        P = u.T @ U                                                    # left Ritz vectors
        Q = vt @ V                                                     # right Ritz vectors
        RtP = u.T @ W
        info["iterations"] = it
        s1 = max(float(B.to_host(s[0])), scale)
        if s1 == 0.0:
            break
        res = xp.linalg.norm(RtP - s[:, None] * Q, axis=1) / s1
        top = np.asarray(B.to_host(s[:kk]), dtype=float)
        # a stop needs the top-k sigma of two iterations in a row to agree: a start at a
        # lower triple (a warm start from another term's factor) has a zero residual at
        # once, while the block's other vectors have not yet grown the larger one
        if (float(B.to_host(res[:kk].max())) <= tol and prev is not None
                and float(np.abs(top - prev).max()) <= tol * s1):
            break
        prev = top
        V = Rop.complement(_orth(W, xp), "right")
    if s1 > 0:
        P, Q = _align_clusters(s, P, Q, np.asarray(B.to_host(res)) <= tol, tol, Rop)
    return _final(Rop, s, P, Q, k, info, tol, maxiter, "subspace iteration", scale)


def sequential_triples(Rop, k, *, tol, maxiter, init=None, seed=0):
    """The top-k triples one after the other (the paper's deflation, §3.2): triple i is the top
    triple of ``R - sum_{j<i} sigma_j p_j q_j^T``, each found by :func:`lanczos_triples` to
    tol / 10 (an earlier triple's error enters the later ones' residuals), its start and
    restart vectors restricted to the complement of the triples found."""
    xp = Rop.xp
    base = Rop.deflate
    sig, Ps, Qs = [], [], []
    info = {"solver": "sequential", "iterations": 0}
    products = 0
    for i in range(k):
        if i >= Rop.dim:                      # R has rank <= dim: the remaining triples are 0
            sig.append(xp.zeros(()))
            Ps.append(xp.zeros((Rop.d_out, Rop.d_out)))
            Qs.append(xp.zeros((Rop.d_in, Rop.d_in)))
            continue
        defl = list(zip(sig, Ps, Qs))
        sub = _SumDeflated(Rop.layer, base, defl)
        start = None if init is None or i >= len(init) else [init[i]]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            s, P, Q, sub_info = lanczos_triples(sub, 1, tol=tol / 10, maxiter=maxiter,
                                                init=start, seed=seed + i,
                                                scale=float(B.to_host(sig[0])) if sig else 0.0)
        products += sub.products
        info["iterations"] += sub_info["iterations"]
        sig.append(s[0])
        Ps.append(P[0])
        Qs.append(Q[0])
    Rop.products += products
    return _final(Rop, xp.stack(sig), xp.stack(Ps).reshape(k, -1), xp.stack(Qs).reshape(k, -1),
                  k, info, tol, maxiter, "sequential deflation")


class _SumDeflated(Rearranged):
    """R (minus a base term) restricted to the complement of the triples found so far:
    (I - P_j P_j^T) R (I - Q_j Q_j^T).  For exact triples this is R - sum_j sigma_j p_j q_j^T
    (the paper's deflation); the projections also keep later triples orthogonal to earlier
    ones when the deflated matrix is (numerically) zero."""

    def __init__(self, layer, base, terms):
        super().__init__(layer, base)
        xp = self.xp
        self._P = xp.stack([P.reshape(-1) for _, P, _ in terms]) if terms else None
        self._Q = xp.stack([Q.reshape(-1) for _, _, Q in terms]) if terms else None
        self.dim -= len(terms)

    def complement(self, X, side):
        """Orthonormal rows spanning X's rows projected on the complement (twice); a row
        that lay in the span of the triples found (a warm start of reordered factors) is
        replaced by a random one, whose projection is not rounding noise."""
        xp = self.xp
        Bm = self._P if side == "left" else self._Q
        Y = self._project2(X, Bm)
        k = X.shape[0]
        before = xp.linalg.norm(X.reshape(k, -1), axis=1)
        after = B.to_host(xp.linalg.norm(Y.reshape(k, -1), axis=1))
        small = np.asarray(after) <= 1e-8 * np.asarray(B.to_host(before))
        if small.any():
            rng = np.random.default_rng(int(small.sum()))
            d = self.d_out if side == "left" else self.d_in
            Y = Y.copy()
            for i in np.flatnonzero(small):
                r = _random_sym(rng, 1, d, xp).reshape((1,) + X.shape[1:])
                Y[i] = self._project2(r, Bm)[0]
        return _orth(Y.reshape(k, -1), xp).reshape(X.shape)

    def complement_basis(self, E, side):
        """The complement of the triples found (span of E projected: the right singular
        vectors of the projected E whose singular value is 1, not 0)."""
        Bm = self._P if side == "left" else self._Q
        if Bm is None:
            return E
        Y = self._project2(E, Bm)
        _, s, vt = self.xp.linalg.svd(Y, full_matrices=False)
        return vt[np.asarray(B.to_host(s)) > 0.5]

    @classmethod
    def _project2(cls, X, Bm):
        """X projected on the complement of Bm's rows twice ('twice is enough')."""
        return cls._project(cls._project(X, Bm), Bm)

    @staticmethod
    def _project(X, Bm):
        if Bm is None:
            return X
        k = X.shape[0]
        Xf = X.reshape(k, -1)
        return (Xf - (Xf @ Bm.T) @ Bm).reshape(X.shape)

    def R(self, Q):
        return self._project(super().R(self._project(Q, self._Q)), self._P)

    def RT(self, P):
        return self._project(super().RT(self._project(P, self._P)), self._Q)


def _project_out(x, basis, j):
    """(x minus its projection on basis[:j], the coefficients basis[:j] x): twice, 'twice is
    enough', the coefficients of both passes summed."""
    Bj = basis[:j]
    h = Bj @ x
    x = x - Bj.T @ h
    h2 = Bj @ x
    return x - Bj.T @ h2, h + h2


def _reorth(x, basis, j, xp):
    """x minus its projection on basis[:j] (twice: 'twice is enough')."""
    return x if j == 0 else _project_out(x, basis, j)[0]


def _fresh(rng, basis, j, d, xp, proj=None):
    """A random unit symmetric vector orthogonal to basis[:j] (after a breakdown), first
    restricted by ``proj`` (the operator's ``complement`` of that side) when given."""
    x = _random_sym(rng, 1, d, xp)
    if proj is not None:
        x = proj(x)
    x = _reorth(x.reshape(-1), basis, j, xp)
    return x / xp.linalg.norm(x)


def lanczos_triples(Rop, k, *, tol, maxiter, krylov=None, init=None, seed=0, scale=0.0):
    r"""Top-k singular triples by restarted Golub-Kahan-Lanczos bidiagonalization.

    One cycle of K steps from a unit q_1 (docs/math.md §8):
    ``p_j = R q_j - beta_{j-1} p_{j-1}``, ``alpha_j = ||p_j||``;
    ``q_{j+1} = R^T p_j - alpha_j q_j``, ``beta_j = ||q_{j+1}||``, each vector
    reorthogonalized against its predecessors (twice).  Then R Q_K = P_K B_K and
    R^T P_K = Q_K B_K^T + beta_K q_{K+1} e_K^T; the SVD B_K = u diag(s) v^T gives the Ritz
    triples (s_i, P_K u_i, Q_K v_i) with ``||R^T p_i - s_i q_i|| = beta_K |u_{K,i}|``.
    After every step j >= k + 1 the Ritz triples of the j steps so far are formed (the SVD
    of the j x j matrix B_j) and the cycle ends once their right residuals
    beta_j |u_{j,i}| / sigma_1 are <= tol.  After a (near) breakdown (alpha or beta <= 1e-8
    of the largest seen: an invariant subspace, which holds one copy of a repeated singular
    value, or a fresh vector that has not yet grown a larger one) the cycle runs to its end
    and its triples count only when the next whole cycle, from a fresh continuation, finds
    the same top-k sigma; cycles shorter than the default go on at the default length
    after such a cycle.  The paper's restart (K <= k + 1) can settle on a lower triple
    (sigma_1, sigma_3 with sigma_2 never in its Krylov space): its converged cycle is
    confirmed the same way, by a cycle of the default length.  Where the smaller side's
    symmetric dimension is <= K (a cycle
    would span it) R is formed instead (:func:`dense_triples`).

    Restarts are thick where the cycle has room (K >= k + 2): the l = k + (K - k) // 2
    leading Ritz pairs are kept, R Q~ = P~ S and R^T P~ = Q~ S + q_{K+1} rho^T
    (rho_i = beta_K u_{K,i}), and the next cycle continues from q_{K+1}, whose p gets the
    coefficients rho against P~ (B becomes upper triangular: S, the column rho, then
    bidiagonal); the coefficients of p against the earlier p's are taken from its
    reorthogonalization, so the relations hold with B upper triangular.  With K <= k + 1
    (the paper's K = 2) a cycle restarts from q_1 = sum_{i<k} q_i, each Ritz vector first
    improved by the power step it gets for free,
    R^T p_i / s_i = q_i + (beta_K u_{K,i} / s_i) q_{K+1}.  A breakdown (an invariant
    subspace) continues from a random vector orthogonal to the basis.  ``maxiter`` counts
    cycles; each costs at most K - l products with R and as many with R^T on single
    vectors (K the first).  ``krylov`` K defaults to max(20, 4k) (capped by the dimension).
    Residuals are relative to max(sigma_1, ``scale``).
    """
    xp = Rop.xp
    rng = np.random.default_rng(seed)
    d_out, d_in = Rop.d_out, Rop.d_in
    kk = min(k, Rop.dim)
    K = min(krylov if krylov is not None else max(20, 4 * k), Rop.dim)
    K = max(K, kk)
    keep = kk + (K - kk) // 2 if K >= kk + 2 else 0      # Ritz pairs a thick restart keeps

    def left(X):
        return Rop.complement(X.reshape(1, -1), "left")

    def right(X):
        return Rop.complement(X.reshape(1, -1), "right")

    info = {"solver": "lanczos", "iterations": 0, "krylov": K}
    if Rop.dim <= K:                  # a cycle would span a whole side: exact instead
        return dense_triples(Rop, k, tol=tol, maxiter=maxiter, info=info, scale=scale,
                             seed=seed)
    q = right(_start_block(Rop, 1, None if init is None else [sum(init)], rng))[0]
    first = min(kk + 1, K)            # steps before a cycle may stop: one past the k
    k_default = max(20, 4 * k)
    pending = None                    # top-k sigma of the last cycle with a breakdown
    Qb = xp.zeros((K + 1, d_in * d_in))
    Pb = xp.zeros((K, d_out * d_out))
    Bm = np.zeros((K, K))
    Qb[0] = q / xp.linalg.norm(q)
    start = 0                                # the kept Ritz pairs: rows [0, start)
    nrm = scale
    for cycle in range(1, maxiter + 1):
        # a (near) breakdown means the Krylov space ran out of new directions: with a
        # repeated singular value among the top k it holds one copy only, and the triples
        # found are exact but not the top ones; such a cycle runs to its end (and restarts)
        broke = False
        for j in range(start, K):
            p = Rop.R(Qb[j].reshape(1, d_in, d_in)).reshape(-1)
            if j > 0:                        # B[:j, j] = P_j^T R q_j
                p, h = _project_out(p, Pb, j)
                Bm[:j, j] = B.to_host(h)
            a = float(B.to_host(xp.linalg.norm(p)))
            nrm = max(nrm, a)
            if a <= 1e-13 * nrm or a == 0.0:
                Bm[j, j], Pb[j] = 0.0, _fresh(rng, Pb, j, d_out, xp, left)
            else:
                Bm[j, j], Pb[j] = a, p / a
            qn = Rop.RT(Pb[j].reshape(1, d_out, d_out)).reshape(-1) - Bm[j, j] * Qb[j]
            qn = _reorth(qn, Qb, j + 1, xp)
            b = float(B.to_host(xp.linalg.norm(qn)))
            nrm = max(nrm, b)
            if b <= 1e-13 * nrm or b == 0.0:
                b = 0.0                      # converged (residuals 0) if j + 1 = K
                # a fresh continuation (also at the cycle's end: a thick restart goes on
                # from q_{K+1}, which must be orthogonal to the basis)
                Qb[j + 1] = _fresh(rng, Qb, j + 1, d_in, xp, right)
            else:
                Qb[j + 1] = qn / b
            broke = broke or min(a, b) <= 1e-8 * nrm
            if j + 1 >= first and ((not broke and pending is None) or j + 1 == K):
                # the Ritz triples of the j + 1 steps so far (a small SVD): stop the cycle
                # once their right residuals b |u_{j,i}| reach tol
                u, s, vt = np.linalg.svd(Bm[:j + 1, :j + 1])
                s1 = max(float(s[0]), scale)
                if s1 == 0.0 or (b * np.abs(u[j, :kk]) / s1).max() <= tol:
                    break
        J = j + 1                            # the steps so far (K, or fewer at tol)
        info["iterations"] = cycle
        res = b * np.abs(u[J - 1, :kk]) / max(s1, 1e-300)
        rho = b * u[J - 1]                   # R^T p~_i = s_i q~_i + rho_i q_{J+1}
        ud, vtd = xp.asarray(u), xp.asarray(vt)
        P = ud.T @ Pb[:J]
        Q = vtd @ Qb[:J]
        done = s1 == 0.0 or res.max() <= tol
        # the paper's restart (K <= k + 1: one vector, the sum of the Ritz vectors) can
        # settle on a lower triple, (sigma_1, sigma_3) with sigma_2 never in its Krylov
        # space; like a breakdown, its verdict needs a whole cycle of the default length
        if (broke or (keep == 0 and done)) and s1 > 0.0:
            # a breakdown (an invariant subspace, or the fresh vectors after one) may hide
            # a top triple: a single-vector Krylov space holds one direction per distinct
            # singular value, and a fresh vector's part may not have grown by the cycle's
            # end.  Its triples count only when the next whole cycle, which explores from
            # a fresh continuation, finds the same top-k sigma.
            top = np.asarray(s[:kk], dtype=float)
            done = (done and pending is not None and top.size == pending.size
                    and float(np.abs(top - pending).max()) <= tol * s1)
            pending = top
            if not done and K < k_default and cycle < maxiter:
                # short cycles (the paper's restart, or thick ones of few steps) explore
                # too little: go on with thick restarts of the default length (the matrix
                # itself where that would span a side)
                if k_default >= Rop.dim:     # as the default cycle would have been
                    info["krylov"] = Rop.dim
                    return dense_triples(Rop, k, tol=tol, maxiter=maxiter, info=info,
                                         scale=scale, seed=seed)
                K = k_default
                keep = kk + (K - kk) // 2
                info["krylov"] = K
                Qb2, Pb2 = xp.zeros((K + 1, d_in * d_in)), xp.zeros((K, d_out * d_out))
                Qb2[J] = Qb[J]
                Qb, Pb, Bm = Qb2, Pb2, np.zeros((K, K))
        elif done:
            pending = None
        if done or cycle == maxiter:
            break
        if keep:
            l = min(keep, J - 1)
            nxt = Qb[J].copy()
            Pb[:l], Qb[:l] = P[:l], Q[:l]
            Qb[l] = nxt
            Bm[...] = 0.0
            Bm[:l, :l] = np.diag(s[:l])
            start = l
        else:
            w = rho[:kk] / np.maximum(s[:kk], 1e-300)
            step = Q[:kk] + xp.asarray(w)[:, None] * Qb[J][None]       # R^T p_i / s_i
            q = step.sum(axis=0)
            if float(B.to_host(xp.linalg.norm(q))) < 1e-8:      # cancellation: the first
                q = step[0]
            Bm[...] = 0.0
            Qb[0] = q / xp.linalg.norm(q)
            start = 0
    if s1 > 0.0:                         # the converged leading pairs: clusters aligned
        P, Q = _align_clusters(s, P, Q, b * np.abs(u[J - 1, :J]) / s1 <= tol, tol, Rop)
    return _final(Rop, xp.asarray(s), P, Q, k, info, tol, maxiter, "Lanczos bidiagonalization",
                  scale)


def factors_from_triples(sig, P, Q):
    """Kronecker terms (B_i, C_i) = (sqrt(sigma_i) P_i, sqrt(sigma_i) Q_i), symmetric, with the
    sign fixed so that tr(B_i) >= 0 (B_i kron C_i = sigma_i P_i kron Q_i either way)."""
    terms = []
    for i in range(P.shape[0]):
        r = math.sqrt(max(float(B.to_host(sig[i])), 0.0))
        Bi, Ci = _sym(P[i]) * r, _sym(Q[i]) * r
        if float(B.to_host(Bi.trace())) < 0:
            Bi, Ci = -Bi, -Ci
        terms.append((Bi, Ci))
    return terms
