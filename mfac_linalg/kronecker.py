r"""Kronecker-factored approximations of one layer's empirical Fisher (docs/math.md section 4).

A layer W (d_out x d_in), per-sample inputs a_n (append 1 for a bias) and output
gradients g_n; per-sample gradient DW_n = g_n a_n^T, flattened row-major as NumPy
does: vec(DW) = kron(g, a).  The layer's empirical Fisher

    F = (1/n) sum_n (g_n g_n^T) kron (a_n a_n^T)         ((d_out d_in)^2: never formed)

is approximated by K-FAC, EKFAC, the best Kronecker product (KPSVD), the best sum of
two (deflation) or K-FAC plus the best Kronecker product of its residual (K-FAC
corrected).  Every damped approximation M is inverted in the same form,

    M^{-1} vec(V) = vec( K_B [ (K_B^T V K_C) ./ S ] K_C^T ),

with K_B, K_C eigenbases (K-FAC, EKFAC, KPSVD) or generalised eigenbases (two-term
sums), so one operator class carries them all.  Costs per product with
V (d_out x d_in): O(d_out d_in (d_out + d_in)).
"""
from __future__ import annotations

import math
import time
import warnings

import numpy as np

from . import _backend as B
from ._operator import Operator, check_damping

__all__ = ["kfac", "ekfac", "kpsvd", "deflation", "kfac_corrected", "fisher_error",
           "block_diag", "KroneckerInverse", "KroneckerFisher", "BlockDiagonal",
           "rearranged_products"]


# -- inputs ---------------------------------------------------------------------------

def _layer_inputs(activations, output_grads, bias):
    A, be = B.asarray(activations, "activations")
    G, _ = B.asarray(output_grads, "output_grads", backend=be)
    for name, X in (("activations", A), ("output_grads", G)):
        if X.ndim != 2 or X.shape[0] < 1 or X.shape[1] < 1:
            raise ValueError(f"{name} must be 2-D (n, features) with n >= 1; got shape "
                             f"{tuple(X.shape)}")
        B.check_finite(X, name, be)
    if A.shape[0] != G.shape[0]:
        raise ValueError(f"activations and output_grads must have the same number of samples; "
                         f"got {A.shape[0]} and {G.shape[0]}")
    A = A.astype(np.float64)
    G = G.astype(np.float64)
    if bias:
        A = be.xp.concatenate([A, be.xp.ones((A.shape[0], 1))], axis=1)
    return A, G, be


def _factors(A, G):
    n = A.shape[0]
    return G.T @ G / n, A.T @ A / n          # Gamma (d_out^2), A (d_in^2)


# -- the rearranged Fisher, matrix-free ----------------------------------------------------

def rearranged_products(A, G):
    """(R, RT): R(F) vec(Q) and R(F)^T vec(P), matrix-free, for stacks of matrices.

    R(F) = (1/n) X Y^T with X = [vec(g g^T)], Y = [vec(a a^T)]:
    R vec(Q) = vec((1/n) sum_n (a_n^T Q a_n) g_n g_n^T),
    R^T vec(P) = vec((1/n) sum_n (g_n^T P g_n) a_n a_n^T).
    Q: (k, d_in, d_in) -> (k, d_out, d_out); P: (k, d_out, d_out) -> (k, d_in, d_in).
    O(k n (d_in^2 + d_out^2)) each.
    """
    n = A.shape[0]

    def R(Q):
        c = ((A @ Q) * A[None]).sum(axis=2)            # (k, n): a_n^T Q a_n
        return (G.T[None] * c[:, None, :]) @ G / n

    def RT(P):
        e = ((G @ P) * G[None]).sum(axis=2)            # (k, n): g_n^T P g_n
        return (A.T[None] * e[:, None, :]) @ A / n

    return R, RT


def _top_triples(R, RT, d_out, d_in, k, xp, *, tol, maxiter, init=None, deflate=None):
    """Top-k singular triples of R(F) (minus vec(P0) vec(Q0)^T if ``deflate``) by subspace
    iteration with Rayleigh-Ritz on k vectors (k = 1: alternating power iteration; each
    iteration costs one R and one R^T product, about one K-FAC factor build).  ``init``
    starts the first vector (K-FAC's A by default in :func:`kpsvd`: near the top right
    singular vector).  Stops when the singular values change by <= tol relative.
    Returns (sigma, P (k, d_out, d_out), Q (k, d_in, d_in), info)."""
    if deflate is not None:
        P0, Q0 = deflate
        R0, RT0 = R, RT
        R = lambda Q: R0(Q) - P0[None] * (Q0[None] * Q).sum(axis=(1, 2))[:, None, None]  # noqa: E731
        RT = lambda P: RT0(P) - Q0[None] * (P0[None] * P).sum(axis=(1, 2))[:, None, None]  # noqa: E731
    p = min(k, d_in * d_in, d_out * d_out)
    rng = np.random.default_rng(0)
    Q = xp.asarray(rng.standard_normal((p, d_in, d_in)))
    Q = Q + Q.transpose(0, 2, 1)
    if init is not None:
        Q[0] = init
    sig_old = None
    info = {"converged": False, "iterations": 0}
    for it in range(1, maxiter + 1):
        Qm = _orth(Q.reshape(p, -1), xp)                 # (p, d_in^2) orthonormal rows
        Pm = _orth(R(Qm.reshape(p, d_in, d_in)).reshape(p, -1), xp)
        Q = RT(Pm.reshape(p, d_out, d_out)).reshape(p, -1)   # the power step R^T P
        # Rayleigh-Ritz on the pair of subspaces: T = Pm R Qm^T = (R^T Pm) Qm^T
        u, s, vt = xp.linalg.svd(Q @ Qm.T)
        sig = s[:k]
        info["iterations"] = it
        if sig_old is not None and float(B.to_host(xp.abs(sig - sig_old).max())) <= tol * float(B.to_host(sig[0])):
            info["converged"] = True
            break
        sig_old = sig
    kk = min(k, p)          # R(F) has rank <= min(d_out^2, d_in^2): missing triples are zero
    Pk = xp.zeros((k, d_out, d_out))
    Qk = xp.zeros((k, d_in, d_in))
    Pk[:kk] = (u[:, :kk].T @ Pm).reshape(kk, d_out, d_out)
    Qk[:kk] = (vt[:kk] @ Qm).reshape(kk, d_in, d_in)
    sig = xp.concatenate([sig, xp.zeros(k - kk)]) if kk < k else sig
    # residuals ||R q - sigma p|| relative to sigma_1
    Rq = R(Qk).reshape(k, -1)
    info["residual"] = float(B.to_host(xp.linalg.norm(Rq - sig[:, None] * Pk.reshape(k, -1),
                                                         axis=1).max() / sig[0]))
    info["sigma"] = B.to_host(sig).tolist()
    return sig, Pk, Qk, info


def _orth(M, xp):
    q, _ = xp.linalg.qr(M.T)
    return q.T


def _sym(X):
    return (X + X.swapaxes(-1, -2)) * 0.5


# -- the inverse operator -------------------------------------------------------------------

class KroneckerInverse(Operator):
    r"""M^{-1} for a damped Kronecker approximation M, over vec(W) in row-major order.

    M^{-1} vec(V) = vec(K_B [(K_B^T V K_C) ./ S] K_C^T).  ``matvec`` also takes a
    (d_out, d_in) matrix and returns one.  Costs: matvec O(d_out d_in (d_out + d_in)),
    diagonal O(d_out d_in (d_out + d_in)), entry O(d_out d_in).

    Attributes: ``factors`` (the undamped Kronecker terms [(B_i, C_i)], or the EKFAC
    basis and scaling), ``method``, ``damping``, ``info`` (convergence and timing),
    ``clipped`` (how many entries of S were raised to the floor, see ``indefinite``).
    """

    def __init__(self, method, KB, KC, S, *, KBinvT, KCinvT, logdet_offset, terms=None,
                 ekfac=None, damping, backend, info=None, clipped=0):
        self._method = method
        self._KB, self._KC, self._S = KB, KC, S
        self._KBinvT, self._KCinvT = KBinvT, KCinvT
        self._logdet_offset = logdet_offset
        self._terms = terms
        self._ekfac = ekfac
        self._damping = damping
        self.d_out, self.d_in = KB.shape[0], KC.shape[0]
        self.info = info or {}
        self.clipped = clipped
        self._init_operator(self.d_out * self.d_in, np.float64, backend)

    # factors and metadata
    @property
    def method(self):
        return self._method

    @property
    def damping(self):
        return self._damping

    @property
    def factors(self):
        """Undamped approximation: list of (B_i, C_i) (F ~ sum B_i kron C_i), or for EKFAC
        the tuple (U_Gamma, U_A, S*) with F ~ (U_G kron U_A) diag(vec S*) (U_G kron U_A)^T."""
        return self._ekfac if self._ekfac is not None else list(self._terms)

    def _repr_fields(self):
        return [f"method={self._method}", f"d_out={self.d_out}", f"d_in={self.d_in}",
                f"damping={self._damping:.0e}"]

    # (d_out, d_in) matrices in matvec
    def matvec(self, x):
        arr, _ = B.asarray(x, "x", backend=self._backend)
        if arr.ndim == 2 and arr.shape == (self.d_out, self.d_in) and self.d_in != 1:
            return super().matvec(arr.reshape(-1)).reshape(self.d_out, self.d_in)
        return super().matvec(x)

    def _apply(self, X, KB, KC, S, KBt, KCt, divide):
        k = X.shape[1]
        V = X.T.reshape(k, self.d_out, self.d_in)
        T = KBt @ V @ KC
        T = T / S if divide else T * S
        Y = KB @ T @ KCt
        return Y.reshape(k, -1).T

    def _matmat(self, X):
        return self._apply(X, self._KB, self._KC, self._S, self._KB.T, self._KC.T, True)

    def _diagonal(self):
        return ((self._KB ** 2) @ (1.0 / self._S) @ (self._KC ** 2).T).reshape(-1)

    def _entry(self, i, j):
        (a, b), (c, d) = divmod(i, self.d_in), divmod(j, self.d_in)
        return B.scalar(((self._KB[a] * self._KB[c]) @ (1.0 / self._S)) @ (self._KC[b] * self._KC[d]))

    def logdet(self):
        """log det M (the damped approximation): sum log S + the basis' log-determinant."""
        return B.scalar(self._backend.xp.log(self._S).sum()) + self._logdet_offset

    def fisher(self):
        """The damped approximation M itself (same protocol); ``inverse()`` gives self."""
        return KroneckerFisher(self)


class KroneckerFisher(Operator):
    """The damped approximation M: vec(V) -> vec(K_B^{-T} [(K_B^{-1} V K_C^{-T}) .* S] K_C^{-1})."""

    def __init__(self, inv):
        self._inv = inv
        self.d_out, self.d_in = inv.d_out, inv.d_in
        self._init_operator(inv.shape[0], np.float64, inv.backend)

    def _repr_fields(self):
        return self._inv._repr_fields()

    def inverse(self):
        return self._inv

    matvec = KroneckerInverse.matvec

    def _matmat(self, X):
        i = self._inv
        return i._apply(X, i._KBinvT, i._KCinvT, i._S, i._KBinvT.T, i._KCinvT.T, False)

    def _diagonal(self):
        i = self._inv
        return ((i._KBinvT ** 2) @ i._S @ (i._KCinvT ** 2).T).reshape(-1)

    def _entry(self, r, c):
        i = self._inv
        (a, b), (p, q) = divmod(r, self.d_in), divmod(c, self.d_in)
        return B.scalar(((i._KBinvT[a] * i._KBinvT[p]) @ i._S) @ (i._KCinvT[b] * i._KCinvT[q]))

    def logdet(self):
        return self._inv.logdet()


def _eig_inverse(method, Bm, Cm, S_fn, *, terms=None, ekfac=None, damping, backend, info,
                 indefinite):
    """Inverse through the eigendecompositions of two symmetric factors."""
    xp = backend.xp
    sB, UB = xp.linalg.eigh(_sym(Bm))
    sC, UC = xp.linalg.eigh(_sym(Cm))
    S = S_fn(sB, sC)
    S, clipped = _check_S(S, indefinite, xp)
    return KroneckerInverse(method, UB, UC, S, KBinvT=UB, KCinvT=UC, logdet_offset=0.0,
                            terms=terms, ekfac=ekfac, damping=damping, backend=backend,
                            info=info, clipped=clipped)


def _check_S(S, indefinite, xp):
    """The documented handling of a non-positive spectrum: raise, or clip to a floor."""
    top = float(B.to_host(xp.abs(S).max()))
    floor = 1e-10 * top if top > 0 else 1e-300
    bad = S <= floor
    nbad = int(B.to_host(bad.sum()))
    if nbad == 0:
        return S, 0
    if indefinite == "raise":
        raise ValueError(f"the damped approximation is not positive definite: {nbad} of its "
                         f"{S.size} eigenvalues are <= {floor:.3e} (an indefinite second "
                         "Kronecker term, or too little damping); use indefinite='clip' or "
                         "more damping")
    warnings.warn(f"{nbad} eigenvalues of the damped Kronecker approximation were <= "
                  f"{floor:.3e} and were raised to it (indefinite='clip')", RuntimeWarning,
                  stacklevel=3)
    return xp.where(bad, floor, S), nbad


def _check_indefinite(indefinite):
    if indefinite not in ("clip", "raise"):
        raise ValueError(f"indefinite must be 'clip' or 'raise'; got {indefinite!r}")


def _pi(Gam, Aa):
    """pi = sqrt((tr A / d_in) / (tr Gamma / d_out)) of factored Tikhonov damping."""
    ta = float(B.to_host(Aa.trace())) / Aa.shape[0]
    tg = float(B.to_host(Gam.trace())) / Gam.shape[0]
    if ta <= 0 or tg <= 0:
        return 1.0
    return math.sqrt(ta / tg)


# -- builders ----------------------------------------------------------------------------------

def kfac(activations, output_grads, damping, *, bias=False, damping_mode="pi",
         indefinite="clip"):
    r"""K-FAC: F ~ Gamma kron A, Gamma = G^T G / n, A = A^T A / n.

    ``damping_mode="pi"``: factored Tikhonov (Gamma + sqrt(lam)/pi I) kron (A + pi sqrt(lam) I),
    pi = sqrt((tr A / d_in) / (tr Gamma / d_out)); ``"exact"``: (Gamma kron A + lam I)^{-1}
    through the eigendecompositions.  Build O(n (d_in^2 + d_out^2) + d_in^3 + d_out^3).
    """
    lam = check_damping(damping)
    _check_indefinite(indefinite)
    if damping_mode not in ("pi", "exact"):
        raise ValueError(f"damping_mode must be 'pi' or 'exact'; got {damping_mode!r}")
    t0 = time.perf_counter()
    A, G, be = _layer_inputs(activations, output_grads, bias)
    Gam, Aa = _factors(A, G)
    if damping_mode == "exact":
        S_fn = lambda sB, sC: sB[:, None] * sC[None, :] + lam  # noqa: E731
    else:
        pi = _pi(Gam, Aa)
        rl = math.sqrt(lam)
        S_fn = lambda sB, sC: (sB[:, None] + rl / pi) * (sC[None, :] + pi * rl)  # noqa: E731
    op = _eig_inverse("kfac", Gam, Aa, S_fn, terms=[(Gam, Aa)], damping=lam, backend=be,
                      info={}, indefinite=indefinite)
    op.info["build_seconds"] = time.perf_counter() - t0
    op.damping_mode = damping_mode
    return op


def ekfac(activations, output_grads, damping, *, bias=False, indefinite="clip"):
    r"""EKFAC: the K-FAC eigenbases with the optimal diagonal in that basis,
    S*_ij = (1/n) sum_n (U_G^T DW_n U_A)_ij^2 = (1/n) sum_n (U_G^T g_n)_i^2 (U_A^T a_n)_j^2;
    inverse U_G [(U_G^T V U_A) ./ (S* + lam)] U_A^T.  Build O(n (d_in^2 + d_out^2 + d_in d_out)).
    """
    lam = check_damping(damping)
    _check_indefinite(indefinite)
    t0 = time.perf_counter()
    A, G, be = _layer_inputs(activations, output_grads, bias)
    xp = be.xp
    Gam, Aa = _factors(A, G)
    _, UG = xp.linalg.eigh(_sym(Gam))
    _, UA = xp.linalg.eigh(_sym(Aa))
    Sstar = ((G @ UG) ** 2).T @ ((A @ UA) ** 2) / A.shape[0]
    S, clipped = _check_S(Sstar + lam, indefinite, xp)
    op = KroneckerInverse("ekfac", UG, UA, S, KBinvT=UG, KCinvT=UA, logdet_offset=0.0,
                          ekfac=(UG, UA, Sstar), damping=lam, backend=be, info={},
                          clipped=clipped)
    op.info["build_seconds"] = time.perf_counter() - t0
    return op


def _kpsvd_terms(A, G, k, xp, tol, maxiter, init, deflate=None):
    d_out, d_in = G.shape[1], A.shape[1]
    R, RT = rearranged_products(A, G)
    sig, P, Q, info = _top_triples(R, RT, d_out, d_in, k, xp, tol=tol, maxiter=maxiter,
                                   init=init, deflate=deflate)
    terms = []
    for i in range(k):
        s = float(B.to_host(sig[i]))
        Bi, Ci = _sym(P[i]) * math.sqrt(s), _sym(Q[i]) * math.sqrt(s)
        if float(B.to_host(Bi.trace())) < 0:        # sign convention: tr(B) > 0
            Bi, Ci = -Bi, -Ci
        terms.append((Bi, Ci))
    return terms, info


def kpsvd(activations, output_grads, damping, *, bias=False, tol=1e-8, maxiter=500,
          init=None, indefinite="clip"):
    r"""The best single Kronecker product min ||F - B kron C||_F (Van Loan-Pitsianis).

    The top singular triple of R(F) = (1/n) X Y^T by matrix-free subspace iteration
    (``rearranged_products``; F and R(F) are never formed), O(n (d_in^2 + d_out^2)) per
    iteration.  ``init``: a previous factor C (d_in x d_in) to warm-start from.
    ``info`` reports iterations, convergence, the singular values and the residual
    ||R q - sigma p|| / sigma_1.  B, C are symmetric with tr(B) > 0 (PSD for a PSD F).
    Inverse (B kron C + lam I)^{-1} through the eigendecompositions of B and C.
    """
    lam = check_damping(damping)
    _check_indefinite(indefinite)
    t0 = time.perf_counter()
    A, G, be = _layer_inputs(activations, output_grads, bias)
    xp = be.xp
    if init is not None:
        init, _ = B.asarray(init, "init", backend=be)
        if init.shape != (A.shape[1], A.shape[1]):
            raise ValueError(f"init must be a ({A.shape[1]}, {A.shape[1]}) factor C; got shape "
                             f"{tuple(init.shape)}")
        init = init.astype(np.float64)
    else:
        init = A.T @ A / A.shape[0]
    terms, info = _kpsvd_terms(A, G, 1, xp, tol, maxiter, init)
    (Bm, Cm), = terms
    op = _eig_inverse("kpsvd", Bm, Cm, lambda sB, sC: sB[:, None] * sC[None, :] + lam,
                      terms=terms, damping=lam, backend=be, info=info, indefinite=indefinite)
    op.info["build_seconds"] = time.perf_counter() - t0
    return op


def _two_term_inverse(method, B1, C1, B2, C2, lam, be, info, indefinite, terms):
    r"""(M)^{-1} for M = (B1 + lB I) kron (C1 + lC I) + B2 kron C2 (docs/math.md section 4).

    Generalised eigenproblems B2 x = s (B1 + lB I) x via the Cholesky factor of
    B1 + lB I: K_B = L^{-T} W with W the eigenvectors of L^{-1} B2 L^{-T}, so
    K_B^T (B1 + lB I) K_B = I, K_B^T B2 K_B = diag(s_B); likewise K_C.  Then
    M^{-1} vec(V) = vec(K_B [(K_B^T V K_C) ./ (1 + s_B s_C^T)] K_C^T).  The damping is
    factored as in K-FAC: lB = sqrt(lam)/pi, lC = pi sqrt(lam).
    """
    xp = be.xp
    pi = _pi(B1, C1)
    rl = math.sqrt(lam)

    def gen(Bf, Bs, shift):
        Mf = _sym(Bf) + shift * xp.eye(Bf.shape[0])
        L = xp.linalg.cholesky(Mf)
        Li = be.solve_triangular(L, xp.eye(L.shape[0]), lower=True)
        s, W = xp.linalg.eigh(_sym(Li @ _sym(Bs) @ Li.T))
        K = Li.T @ W
        KinvT = Mf @ K                       # K^{-T} = (B1 + shift I) K
        logdet_M = 2.0 * B.scalar(xp.log(xp.diagonal(L)).sum())
        return s, K, KinvT, logdet_M

    try:
        sB, KB, KBt, ldB = gen(B1, B2, rl / pi)
        sC, KC, KCt, ldC = gen(C1, C2, pi * rl)
    except np.linalg.LinAlgError:
        raise ValueError(f"{method}: the first Kronecker term plus damping is not positive "
                         "definite") from None
    S, clipped = _check_S(1.0 + sB[:, None] * sC[None, :], indefinite, xp)
    d_out, d_in = KB.shape[0], KC.shape[0]
    # M = (K_B^{-T} kron K_C^{-T}) diag(S) (K_B^{-1} kron K_C^{-1}):
    # log det M = sum log S + d_in log det(B1 + lB I) + d_out log det(C1 + lC I)
    offset = d_in * ldB + d_out * ldC
    return KroneckerInverse(method, KB, KC, S, KBinvT=KBt, KCinvT=KCt, logdet_offset=offset,
                            terms=terms, damping=lam, backend=be, info=info, clipped=clipped)


def deflation(activations, output_grads, damping, *, bias=False, tol=1e-8, maxiter=500,
              indefinite="clip"):
    r"""The best sum of two Kronecker products: the top two singular triples of R(F).

    The second term is in general indefinite.  The damped approximation
    (B1 + lB I) kron (C1 + lC I) + B2 kron C2 is inverted through generalised
    eigendecompositions; entries 1 + s_B s_C <= floor are handled per ``indefinite``
    ("clip": raised to a floor of 1e-10 times the largest, with a warning and
    ``op.clipped``; "raise": ValueError).  Never a silent division by <= 0.
    """
    lam = check_damping(damping)
    _check_indefinite(indefinite)
    t0 = time.perf_counter()
    A, G, be = _layer_inputs(activations, output_grads, bias)
    terms, info = _kpsvd_terms(A, G, 2, be.xp, tol, maxiter, A.T @ A / A.shape[0])
    (B1, C1), (B2, C2) = terms
    op = _two_term_inverse("deflation", B1, C1, B2, C2, lam, be, info, indefinite, terms)
    op.info["build_seconds"] = time.perf_counter() - t0
    return op


def kfac_corrected(activations, output_grads, damping, *, bias=False, tol=1e-8, maxiter=500,
                   indefinite="clip"):
    r"""K-FAC plus the best Kronecker product of its residual: Gamma kron A + B2 kron C2,
    (B2, C2) the top singular triple of R(F) - vec(Gamma) vec(A)^T (matrix-free).
    Inverted like :func:`deflation` (same ``indefinite`` handling)."""
    lam = check_damping(damping)
    _check_indefinite(indefinite)
    t0 = time.perf_counter()
    A, G, be = _layer_inputs(activations, output_grads, bias)
    Gam, Aa = _factors(A, G)
    res, info = _kpsvd_terms(A, G, 1, be.xp, tol, maxiter, None, deflate=(Gam, Aa))
    (B2, C2), = res
    # the residual's top term may have either sign: keep the orientation that fits
    R, _ = rearranged_products(A, G)
    fit = B.scalar((R(C2[None])[0] * B2).sum()) - B.scalar((Gam * B2).sum()) * B.scalar((Aa * C2).sum())
    if fit < 0:
        B2 = -B2
    terms = [(Gam, Aa), (B2, C2)]
    op = _two_term_inverse("kfac_corrected", Gam, Aa, B2, C2, lam, be, info, indefinite, terms)
    op.info["build_seconds"] = time.perf_counter() - t0
    return op


# -- approximation error without forming F -------------------------------------------------

def fisher_error(approx, activations, output_grads, *, bias=False):
    r"""||F - F~||_F / ||F||_F with F~ the undamped approximation of ``approx``.

    From n x n Gram identities, never forming F:
    ||F||^2 = (1/n^2) sum_{n,k} (g_n.g_k)^2 (a_n.a_k)^2;
    <F, B kron C> = (1/n) sum_n (g_n^T B g_n)(a_n^T C a_n);
    ||sum_i B_i kron C_i||^2 = sum_{ij} <B_i, B_j><C_i, C_j>;
    EKFAC: <F, F~> = (1/n) sum_n sum_pq S*_pq (U_G^T g_n)_p^2 (U_A^T a_n)_q^2, ||F~|| = ||S*||.
    O(n^2 (d_in + d_out) + n (d_in^2 + d_out^2)) per term.  The formula subtracts squares,
    ||F||^2 - 2 <F, F~> + ||F~||^2, so its absolute accuracy is about
    sqrt(eps) (||F|| + sum_i ||B_i|| ||C_i||) / ||F||: a few 1e-8 when the terms are of
    the size of F, more when large terms cancel (a 1 x 1 layer whose K-FAC term is 7 ||F||
    read 1.1e-7 for an exact approximation).
    """
    A, G, be = _layer_inputs(activations, output_grads, bias)
    n = A.shape[0]
    if not isinstance(approx, KroneckerInverse):
        raise TypeError(f"approx must be an operator from kfac/ekfac/kpsvd/deflation/"
                        f"kfac_corrected; got {type(approx).__name__}")
    if (approx.d_out, approx.d_in) != (G.shape[1], A.shape[1]):
        raise ValueError(f"approx is for a ({approx.d_out}, {approx.d_in}) layer; the data give "
                         f"({G.shape[1]}, {A.shape[1]}) (check bias=)")
    FF = B.scalar((((G @ G.T) ** 2) * ((A @ A.T) ** 2)).sum()) / n ** 2
    if approx._ekfac is not None:
        UG, UA, Sstar = approx._ekfac
        cross = B.scalar((((G @ UG) ** 2) @ Sstar * ((A @ UA) ** 2)).sum()) / n
        AA = B.scalar((Sstar ** 2).sum())
    else:
        terms = approx._terms
        cross = sum(B.scalar((((G @ Bi) * G).sum(1) * ((A @ Ci) * A).sum(1)).sum()) / n
                    for Bi, Ci in terms)
        AA = sum(B.scalar((Bi * Bj).sum()) * B.scalar((Ci * Cj).sum())
                 for Bi, Ci in terms for Bj, Cj in terms)
    err2 = max(FF - 2.0 * cross + AA, 0.0)
    return math.sqrt(err2 / FF) if FF > 0 else 0.0


# -- network-level composition ------------------------------------------------------------------

class BlockDiagonal(Operator):
    """blockdiag(op_1, op_2, ...): one operator over the concatenated parameters.

    ``matvec`` splits x by the blocks' sizes (one product per block, the k columns of
    ``matmat`` together); ``diagonal`` concatenates; ``entry`` is the block's entry or 0;
    ``logdet`` and ``fisher()`` combine the blocks' own.
    """

    def __init__(self, ops):
        ops = list(ops)
        if not ops:
            raise ValueError("block_diag needs at least one operator")
        for k, op in enumerate(ops):
            if not isinstance(op, Operator):
                raise TypeError(f"ops[{k}] must be an operator; got {type(op).__name__}")
            if op.backend != ops[0].backend:
                raise TypeError(f"ops[{k}] lives on {op.device}, ops[0] on {ops[0].device}")
        self._ops = ops
        sizes = [op.shape[0] for op in ops]
        self._offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        dtype = np.result_type(*[op.dtype for op in ops])
        self._init_operator(int(self._offsets[-1]), dtype, ops[0].backend)

    @property
    def blocks(self):
        return list(self._ops)

    def _repr_fields(self):
        return [f"blocks={len(self._ops)}"]

    def _matmat(self, X):
        xp = self._backend.xp
        return xp.concatenate([op.matmat(X[a:b]) for op, a, b in
                               zip(self._ops, self._offsets[:-1], self._offsets[1:])], axis=0)

    def _diagonal(self):
        xp = self._backend.xp
        return xp.concatenate([op.diagonal().astype(self._dtype) for op in self._ops])

    def _entry(self, i, j):
        k = int(np.searchsorted(self._offsets, i, side="right") - 1)
        a, b = self._offsets[k], self._offsets[k + 1]
        if not a <= j < b:
            return 0.0
        return self._ops[k].entry(int(i - a), int(j - a))

    def logdet(self):
        """Sum of the blocks' log-determinants (each block must have ``logdet``)."""
        return sum(op.logdet() for op in self._ops)

    def fisher(self):
        """blockdiag of the blocks' forward operators."""
        return BlockDiagonal([op.fisher() for op in self._ops])

    def inverse(self):
        return BlockDiagonal([op.inverse() for op in self._ops])


def block_diag(ops):
    """A block-diagonal operator over layers: ``block_diag([op_layer1, op_layer2, ...])``."""
    return BlockDiagonal(ops)
