r"""The top singular triples of R(F) of a dense layer in the samples' coordinates (docs/math.md §8).

For a dense layer (T = 1) R(F) = (1/n) Phi_G Phi_A^T, where the columns of Phi_A are
vec(a_n a_n^T) and those of Phi_G vec(g_n g_n^T).  Every right vector the bidiagonalization
produces after its start is R^T applied to something, q = Phi_A w, and every left vector
p = Phi_G v: both live in the span of the n samples.  With the n x n Gram matrices

    H_A = Phi_A^T Phi_A = (A A^T) .* (A A^T),      H_G = (G G^T) .* (G G^T)

(entries (a_n . a_m)^2 >= 0), everything the iteration needs is a product with H_A or H_G:

    R q = Phi_G (H_A w / n),   R^T p = Phi_A (H_G v / n),   <q, q'> = w^T H_A w',
    <p, p'> = v^T H_G v'.

A product then costs 2 n^2 flops instead of about 2 n (d_in^2 + d_out^2), after the two
Grams (n^2 (d_in + d_out) flops, once): cheaper when the iteration needs more products than
about n / d, which the two-term builders (close sigma_2, sigma_3) nearly always do.  The
factors are formed once at the end, B = Gᵀ diag(v) G and C = Aᵀ diag(w) A.

The coordinates' inner products are weighted by H, so rounding in them can exceed that of the
matrices' own: the result is checked with explicit products of the formed factors, R C
through the quadratic forms c_n = a_n^T C a_n (the residual R C - sigma B is then
Phi_G (c / n - sigma v), whose norm is e^T H_G e of that small vector), and a result that
misses ``tol`` goes back to the matrix-space solver.
"""
from __future__ import annotations

import math

import numpy as np

from .conv import _quad_rows, _weighted_gram

__all__ = ["gram_fits", "gram_cheaper", "gram_triples"]

#: fewer samples than this (or than 4k) keep the matrix space (a Krylov space of the few
#: coordinates would break down before the tolerance; their products are cheap anyway)
MIN_SAMPLES = 32
#: the two n x n Gram matrices may take this many bytes (2 n^2 float64: n <= 5792)
GRAM_BYTES = 1 << 29
#: products the matrix-space solver is taken to need for k = 1 and for k >= 2 (the median
#: of the benchmark layers: 10-12 and 76-136), in the cost model of :func:`gram_cheaper`
EXPECTED_PRODUCTS = {1: 12, 2: 100}
#: steps of one bidiagonalization in the samples' coordinates taken in the cost model
EXPECTED_STEPS = {1: 6, 2: 50}
#: the cost of a symmetric n x n product (memory-bound) in syrk flops per n^2 entry
SYMV_COST = 7.0
#: a step whose new vector's H-norm is below this fraction of the largest is a breakdown
#: (an H-norm of a vector that cancelled to rounding is about sqrt(eps) of the scale)
BREAKDOWN = 1e-7
#: steps one bidiagonalization may take in the samples' coordinates (then the matrix-space
#: solver starts as it would have; ``maxiter`` caps them too)
MAX_STEPS = 400


def gram_fits(layer):
    """The coordinates apply: a dense layer on the host in float64, Grams within
    :data:`GRAM_BYTES`, no band mask."""
    return (layer.dense and layer.be.is_host and layer.mask is None
            and layer.A.dtype == np.float64 and 16 * layer.n * layer.n <= GRAM_BYTES)


def gram_cheaper(layer, k, close=False):
    """The cost model, in syrk flops: two Grams (n^2 (d_in + d_out)), the expected steps
    (two memory-bound symmetric products of n^2 each, :data:`SYMV_COST`) and k formed factor
    pairs with their checks (2 k n (d_in^2 + d_out^2)), against the matrix-space solver's
    expected products, n (d_in^2 + d_out^2) each (a trmm and a syrk).  ``close``: the
    triples sought have close singular values (K-FAC corrected's residual), which takes
    as many products as k = 2."""
    n, di, do = layer.n, layer.d_in, layer.d_out
    kk = 2 if close else min(k, 2)
    grams = (n * n * (di + do + 2.0 * SYMV_COST * EXPECTED_STEPS[kk])
             + 2.0 * k * n * (di * di + do * do))
    matrix = EXPECTED_PRODUCTS[kk] * n * (di * di + do * do)
    return grams < matrix


def _hadamard_gram(X):
    """H = (X X^T) .* (X X^T), its upper triangle in Fortran order (BLAS syrk: n^2 d flops,
    half a GEMM's), or None when it overflows."""
    from scipy.linalg import blas
    with np.errstate(over="ignore", invalid="ignore"):
        H = blas.dsyrk(1.0, X.T, trans=1)       # (X^T)^T X^T: X^T is X's memory, no copy
        np.multiply(H, H, out=H)
    return H if np.isfinite(H).all() else None


def _symv(H, x):
    """H x from the upper triangle of H (BLAS symv: reads half of H, the time it takes)."""
    from scipy.linalg import blas
    return blas.dsymv(1.0, H, x, lower=0)


def _hnorm(x, hx):
    """sqrt(x^T H x) from x and H x; 0 where rounding makes it negative."""
    v = float(x @ hx)
    return math.sqrt(v) if v > 0.0 else 0.0


def _orth(x, hx, basis, hbasis, j):
    """x (and its image H x) minus its H-projection on basis[:j] (twice): coefficients
    summed over both passes."""
    if j == 0:
        return x, hx, np.zeros(0)
    Bj, Hj = basis[:j], hbasis[:j]
    h = Hj @ x
    x = x - Bj.T @ h
    hx = hx - Hj.T @ h
    h2 = Hj @ x
    return x - Bj.T @ h2, hx - Hj.T @ h2, h + h2


def gram_triples(layer, k, *, tol, start=None, scale=0.0, centred=False, max_steps=None):
    r"""Top-k singular triples of R(F) by Golub-Kahan-Lanczos in the samples' coordinates.

    ``layer``: a dense :class:`~mfac_linalg.kronecker.conv.LayerData` (already scaled by
    powers of two).  ``start``: an explicit right start matrix (d_in x d_in), or None for
    K-FAC's A = Phi_A 1 / n (w = 1 / n, no product; random coordinates when
    ``centred``).  ``centred``: the triples of
    R(F) - vec(Gamma) vec(A)^T (K-FAC corrected's residual, Gamma = Phi_G 1 / n and
    A = Phi_A 1 / n) = Phi_G M Phi_A^T with M = (I - 1 1^T / n) / n, every R product then
    taking M x = (x - mean(x)) / n instead of x / n.  One bidiagonalization, without
    restarts, with full reorthogonalization in the H inner products (twice); after every
    step j >= k + 1 the Ritz triples of B_j and their right residuals beta_j |u_{j,i}| /
    sigma_1 decide the stop, as in the matrix-space solver (checked after every step up to
    40, then every fourth).

    Returns ``(sigma, P, Q, info)`` with P (k, d_out, d_out) and Q (k, d_in, d_in) formed
    and their two-sided residuals checked by explicit products (module docstring), or
    ``(None, None, None, info)`` when a Gram overflowed, the start is zero in these
    coordinates, the iteration broke down, ran out of steps, found a repeated sigma
    among the top k or its formed factors missed ``tol`` in the check (the rounding of
    the coordinates, which the H inner products can amplify; not seen on 400 random
    layers): the matrix-space solver then starts as it would have (a near-exact start
    would look like a breakdown to it and cost it confirmation cycles).
    """
    A2, G2 = layer.A[:, 0, :], layer.G[:, 0, :]
    n = layer.n
    info = {"solver": "lanczos", "space": "samples", "iterations": 1}
    HA, HG = _hadamard_gram(A2), _hadamard_gram(G2)
    if HA is None or HG is None:
        return None, None, None, info
    if centred:
        def mul(x):
            return (x - x.mean()) / n
    else:
        def mul(x):
            return x / n
    products = 0
    if start is None and centred:                       # K-FAC's A is deflated: random
        w0 = np.random.default_rng(0).standard_normal(n)
    elif start is None:
        w0 = np.full(n, 1.0 / n)                       # Phi_A 1 / n = K-FAC's A
    else:                                               # R^T R start: in the span
        w0 = mul(_symv(HG, mul(_quad_rows(A2, start))))
        products += 2
    z0 = _symv(HA, w0)                                  # (R q_0 = Phi_G mul(z0))
    products += 1
    b0 = _hnorm(w0, z0)
    if b0 == 0.0:
        info["products"] = products
        return None, None, None, info
    steps = min(MAX_STEPS, n) if max_steps is None else min(MAX_STEPS, n, max_steps)
    W = np.zeros((steps + 1, n))          # right coordinates w_j (q_j = Phi_A w_j)
    ZA = np.zeros((steps + 1, n))         # H_A w_j
    Vc = np.zeros((steps, n))             # left coordinates v_j (p_j = Phi_G v_j)
    ZG = np.zeros((steps, n))             # H_G v_j
    Bm = np.zeros((steps, steps))
    W[0], ZA[0] = w0 / b0, z0 / b0
    beta = 0.0
    nrm = scale
    kk = min(k, steps)
    done = broke = False
    J = 0
    for j in range(steps):
        v = mul(ZA[j])                                   # R q_j
        if j > 0:
            v = v - beta * Vc[j - 1]
        y = _symv(HG, v)
        products += 1
        v, y, h = _orth(v, y, Vc, ZG, j)
        if j > 0:
            Bm[:j, j] += h
        a = _hnorm(v, y)
        nrm = max(nrm, a)
        if a <= BREAKDOWN * nrm:          # an invariant subspace (H-norms resolve only
            J, broke = j, True            # about sqrt(eps)): on in the matrix space
            break
        Bm[j, j] = a
        Vc[j], ZG[j] = v / a, y / a
        w = mul(ZG[j]) - a * W[j]                        # R^T p_j - alpha q_j
        z = _symv(HA, w)
        products += 1
        w, z, _ = _orth(w, z, W, ZA, j + 1)
        beta = _hnorm(w, z)
        nrm = max(nrm, beta)
        if beta <= BREAKDOWN * nrm:
            J, broke = j + 1, True
            break
        W[j + 1], ZA[j + 1] = w / beta, z / beta
        if j + 1 < steps:
            Bm[j, j + 1] = beta
        J = j + 1                                        # steps done
        if J >= kk + 1 and (J <= 40 or J % 4 == 0 or J == steps):
            # (every step at first, then every fourth: the SVD of B_J grows as J^3 and
            # a step here costs little)
            u, s, vt = np.linalg.svd(Bm[:J, :J])     # kept: the triples when done
            s1 = max(float(s[0]), scale)
            if s1 > 0.0 and (beta * np.abs(u[j, :kk]) / s1).max() <= tol:
                done = True
                break
    info["krylov"] = J
    if broke or not done or J < kk:
        info["products"] = products
        return None, None, None, info
    if kk > 1 and float(np.min(s[:kk - 1] - s[1:kk])) <= max(0.1 * tol, 1e-15) * s[0]:
        # a repeated sigma among the top k: the matrix-space solver aligns its cluster
        # (rearranged._align_clusters); this single-vector space may hold one copy only
        info["products"] = products
        return None, None, None, info
    v_coef = u[:, :kk].T @ Vc[:J]                     # p_i = Phi_G v_i
    w_coef = vt[:kk] @ W[:J]                           # q_i = Phi_A w_i
    P = np.stack([_weighted_gram(G2, v_coef[i]) for i in range(kk)])
    Q = np.stack([_weighted_gram(A2, w_coef[i]) for i in range(kk)])
    P = (P + P.transpose(0, 2, 1)) * 0.5
    Q = (Q + Q.transpose(0, 2, 1)) * 0.5
    sig = s[:kk].copy()
    # the check: R Q_i - sigma_i P_i = Phi_G (c_i / n - sigma_i v_i), c = quadratic forms
    # of the formed Q_i; likewise on the right
    left, right = [], []
    for i in range(kk):
        e = mul(_quad_rows(A2, Q[i])) - sig[i] * v_coef[i]
        left.append(_hnorm(e, _symv(HG, e)))
        e = mul(_quad_rows(G2, P[i])) - sig[i] * w_coef[i]
        right.append(_hnorm(e, _symv(HA, e)))
    products += 2 * kk
    s1 = max(float(sig[0]), scale)
    s1 = s1 if s1 > 0 else 1.0
    info["residual_left"] = [x / s1 for x in left]
    info["residual_right"] = [x / s1 for x in right]
    info["residual"] = max(info["residual_left"] + info["residual_right"])
    info["sigma"] = sig.tolist()
    info["products"] = products
    info["converged"] = bool(info["residual"] <= tol)
    if not info["converged"]:
        return None, None, None, info
    return sig, P, Q, info
