r"""The builders: K-FAC, EKFAC, KPSVD, deflation, Lanczos, K-FAC corrected (docs/math.md §4, §8).

Every builder takes one layer's ``activations`` and ``output_grads``, 2-D (n, d) for a dense
layer or 3-D (n, T, d) with T positions per sample (convolution patches, sequence tokens; see
:mod:`mfac_linalg.kronecker.conv` for the conventions and the scaling of ``output_grads``), and
returns a :class:`~mfac_linalg.kronecker.operator.KroneckerInverse` over vec(W) in row-major
order (``[W | b]`` with ``bias=True``).
"""
from __future__ import annotations

import math
import time
import warnings

import numpy as np

from .. import _backend as B
from .. import _validate as V
from .._capacitance import logdet_factor
from . import gram as G_
from .conv import layer_data
from .operator import KroneckerFisher, KroneckerInverse
from .rearranged import (Rearranged, _sym, factors_from_triples, lanczos_triples,
                         sequential_triples, subspace_triples, user_stacklevel)

__all__ = ["kfac", "ekfac", "kpsvd", "deflation", "lanczos", "kfac_corrected",
           "kronecker_terms", "fisher_error"]

INDEFINITE = ("abs", "clip", "raise")
TOL, MAXITER = 1e-12, 1000
#: two-term spectra are computed densely up to this many parameters (then ARPACK)
DENSE_SPECTRUM = 4096
#: ``_begin``'s default for the closed-form builders (no tol/maxiter): ``tol=None`` from a
#: caller of an iterative builder must be refused, not mistaken for "not iterative"
_NO_ITER = object()


# -- the shared preamble -------------------------------------------------------------------

def _begin(activations, output_grads, damping, bias, indefinite, *, tol=_NO_ITER, maxiter=None,
           band=None, positions=None, choices=()):
    """Every argument checked before any work; returns (layer, lam, tol, maxiter, t0)."""
    t0 = time.perf_counter()
    lam = V.damping(damping)
    V.choice(indefinite, "indefinite", INDEFINITE)
    for value, name, options in choices:
        V.choice(value, name, options)
    if tol is _NO_ITER:
        tol = None
    else:
        tol = V.real(tol, "tol", low=0.0, low_open=True, high=1.0, high_open=True)
        maxiter = V.integer(maxiter, "maxiter", minimum=1)
    layer = layer_data(activations, output_grads, bias, band=band, positions=positions)
    return layer, lam, tol, maxiter, t0


def _done(op, t0, **extra):
    op.info.update(extra)
    op.info["build_seconds"] = time.perf_counter() - t0
    return op


def _init_factors(init, layer, skip=0):
    """Warm start: the right factors C_i of a previous build (an operator from these builders,
    a list of (B_i, C_i) pairs, or one (d_in, d_in) matrix C), checked."""
    if init is None:
        return None
    if isinstance(init, KroneckerFisher):
        init = init.inverse()
    if isinstance(init, KroneckerInverse):
        if init.method == "ekfac":
            raise TypeError("init cannot be an EKFAC operator (it has no Kronecker terms); pass "
                            "a kfac/kpsvd/deflation/lanczos/kfac_corrected operator or factors")
        init = init.factors[skip:] if len(init.factors) > skip else init.factors
    if isinstance(init, (list, tuple)) and not _numeric_matrix(init):
        mats = []
        for i, pair in enumerate(init):
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
                raise TypeError(f"init[{i}] must be a pair (B, C); got {type(pair).__name__}")
            mats.append(_check_init(pair[1], f"init[{i}][1]", layer))
        if not mats:
            raise ValueError("init must hold at least one (B, C) pair; got an empty sequence")
    else:
        mats = [_check_init(init, "init", layer)]
    # a start is a direction: one power of two for all (exact; their sum keeps its
    # direction), so that symmetrising the largest finite factors cannot overflow
    top = max(_pow2_scale(C) for C in mats)
    return [_sym(C / top) for C in mats]


def _numeric_matrix(x):
    """A nested list of numbers of two dimensions (one matrix C, not (B, C) pairs)."""
    try:
        arr = np.asarray(x)
    except (ValueError, TypeError):
        return False
    return arr.ndim == 2 and arr.dtype.kind in "biuf"


def _check_init(C, name, layer):
    C, _ = B.asarray(C, name, backend=layer.be)
    if C.shape != (layer.d_in, layer.d_in):
        raise ValueError(f"{name} must be a ({layer.d_in}, {layer.d_in}) factor C; got shape "
                         f"{tuple(C.shape)}")
    C = C.astype(np.float64)
    V.finite(C, name, layer.be)
    return C


# -- inverses ------------------------------------------------------------------------------

def _screen(S_raw, S_abs, indefinite, xp):
    """The ``indefinite`` rule: entries of S at or below 1e-10 max|S| are never divided by.
    'abs' uses S_abs (>= the damping term, documented per builder), 'clip' raises them to the
    floor with a RuntimeWarning, 'raise' refuses.  Returns (S, count of such entries).
    Eigenvalues beyond the float range (products of the factors' eigenvalues: fourth
    powers of the data) are refused by name."""
    if not bool(B.to_host(xp.isfinite(S_abs).all())):
        raise ValueError("activations and output_grads are too large: the eigenvalues of the "
                         "Kronecker approximation (fourth powers of the data) overflow float64; "
                         "rescale them (F scales by the squares of both scales)")
    top = float(B.to_host(xp.abs(S_raw).max()))
    floor = 1e-10 * top if top > 0 else 1e-300
    nbad = int(B.to_host((S_raw <= floor).sum()))
    if nbad == 0 or indefinite == "abs":
        return (S_abs if indefinite == "abs" else S_raw), nbad
    if indefinite == "raise":
        raise ValueError(f"the damped approximation is not positive definite: {nbad} of its "
                         f"{S_raw.size} eigenvalues are <= {floor:.3e} (an indefinite "
                         "Kronecker term, or too little damping); use indefinite='abs' or "
                         "more damping")
    warnings.warn(f"{nbad} eigenvalues of the damped Kronecker approximation were <= "
                  f"{floor:.3e} and were raised to it (indefinite='clip'): the inverse is up "
                  "to 1e10 times larger there; indefinite='abs' cannot blow up",
                  RuntimeWarning, stacklevel=user_stacklevel())
    return xp.where(S_raw <= floor, floor, S_raw), nbad


def _pi_split(Bm, Cm, lam):
    """Factored Tikhonov damping (lam_B, lam_C), lam_B lam_C = lam, lam_B / lam_C =
    (tr B / d_B) / (tr C / d_C) (K-FAC's pi); 1:1 when a trace is not positive."""
    tb = float(B.to_host(Bm.trace())) / Bm.shape[0]
    tc = float(B.to_host(Cm.trace())) / Cm.shape[0]
    r = math.sqrt(lam)
    if tb <= 0 or tc <= 0:
        return r, r
    pi = math.sqrt(tb) / math.sqrt(tc)      # not sqrt(tb / tc): that ratio can under/overflow
    lb, lc = r * pi, r / pi
    if not (0.0 < lb < math.inf and 0.0 < lc < math.inf):
        raise ValueError(
            f"damping={lam:.3e} cannot be split as K-FAC's pi: the factors' mean eigenvalues "
            f"{tb:.3e} and {tc:.3e} differ by more than float64's range allows; rescale "
            "activations or output_grads towards each other (the approximation scales with "
            "their product) or use damping_mode='exact' / first_term_damping='full'")
    return lb, lc


#: K-FAC factors whose largest entry lies below this are refused: their entries a million
#: times smaller are subnormal (2^-1022 2^20, about 2.3e-302)
_FULL_PRECISION_MIN = np.finfo(np.float64).tiny * 2.0 ** 20


def _kfac_factors_in_range(layer):
    """K-FAC's (Gamma, A), refused by name where a nonzero factor lies at float64's
    subnormal range (data of about 1e-151 or less on one side: Gamma or A below 2.3e-302,
    where the entries lose digits and the inverse's factors overflow; at 1e-320 results
    were off by 0.13).  The KPSVD family, whose factors balance the two sides, takes such
    data."""
    xp = layer.xp
    Gam, Aa = layer.kfac_factors()
    for M, name in ((Gam, "output_grads"), (Aa, "activations")):
        top = float(B.to_host(xp.abs(M).max())) if M.size else 0.0
        if 0.0 < top < _FULL_PRECISION_MIN:
            raise ValueError(f"{name} are too small for K-FAC's factors: their second moments "
                             f"({top:.1e}) lie at float64's subnormal range (below 2.3e-302); "
                             f"rescale {name} (the approximation scales with the product of "
                             "both sides' scales), or use kpsvd/deflation/lanczos, whose "
                             "factors balance the two sides")
    return Gam, Aa


def _psd(M, shift, be):
    """True when the symmetric M has no eigenvalue below -shift / 2: one Cholesky of
    M + (shift / 2) I.  Under ``indefinite="abs"`` a factor failing this takes
    |M| = U |s| Uᵀ (a banded F makes factors indefinite; M + shift I may still be positive
    definite with s_min + shift arbitrarily close to 0, an inverse that blows up); one
    passing it keeps M + shift I >= (shift / 2) I, the inverse at most twice the |M|
    route's per factor, and the Cholesky route for the rounding-level negative
    eigenvalues (-1e-13 max|M|) of factors that are positive semi-definite exactly."""
    xp = be.xp
    try:
        L = be.cholesky_lower(_sym(M) + (0.5 * shift) * xp.eye(M.shape[0]))
    except np.linalg.LinAlgError:
        return False
    return bool(B.to_host(xp.isfinite(L).all()))


def _pi_cholesky(method, Bm, Cm, lam, be, *, terms, info):
    """((B + lam_B I) kron (C + lam_C I))^{-1} through the Cholesky factors of the damped
    factors (docs/math.md §4): K_B = L_B^{-T} (K_B K_B^T = (B + lam_B I)^{-1}), S = 1, and
    the explicit inverses kept for a two-GEMM apply, (B + lam_B I)^{-1} V (C + lam_C I)^{-1}.
    About d^3 per factor (Cholesky, triangular inverse, one product) against ~9 d^3 for a
    symmetric eigendecomposition.  None when a factor has an eigenvalue below -lam_B / 2
    (``_psd``; K-FAC's are Gram matrices) or a damped factor is not numerically positive
    definite: the caller takes the eigendecomposition, whose ``indefinite`` rule
    (|s| + lam_B) handles it."""
    xp = be.xp
    lb, lc = _pi_split(Bm, Cm, lam)
    if method != "kfac" and not (_psd(Bm, lb, be) and _psd(Cm, lc, be)):
        return None      # an indefinite factor: |s| + lam through the eigendecomposition
    out = []
    for M, shift in ((Bm, lb), (Cm, lc)):
        Md = _sym(M) + shift * xp.eye(M.shape[0])
        try:
            L = be.cholesky_lower(Md)
        except np.linalg.LinAlgError:
            return None
        if not bool(xp.isfinite(L).all()):
            return None
        Li = be.solve_triangular(L, xp.eye(L.shape[0]), lower=True)
        out.append((Md, L, Li.T, _sym(Li.T @ Li), logdet_factor(L, be)))
    (Bd, LB, KB, Binv, ldB), (Cd, LC, KC, Cinv, ldC) = out
    d_out, d_in = Bd.shape[0], Cd.shape[0]
    info.update(damping_mode="pi", indefinite="abs", factorization="cholesky")
    return KroneckerInverse(method, KB, KC, xp.ones((d_out, d_in)), KBinvT=LB, KCinvT=LC,
                            logdet_offset=d_in * ldB + d_out * ldC, terms=terms, damping=lam,
                            backend=be, info=info, clipped=0, direct=(Binv, Cinv, Bd, Cd))


def _single_inverse(method, Bm, Cm, lam, damping_mode, indefinite, be, *, terms, info):
    """(B kron C + lam I)^{-1} ("exact") or ((B + lam_B I) kron (C + lam_C I))^{-1} ("pi")
    through the eigendecompositions of B and C; O(d_out^3 + d_in^3).  The "pi" form with
    ``indefinite="abs"`` goes through Cholesky factors instead (:func:`_pi_cholesky`)
    where they exist: the same operator, several times cheaper to build and to apply."""
    xp = be.xp
    if damping_mode == "pi" and indefinite == "abs":
        op = _pi_cholesky(method, Bm, Cm, lam, be, terms=terms, info=info)
        if op is not None:
            return op
    sB, UB = xp.linalg.eigh(_sym(Bm))
    sC, UC = xp.linalg.eigh(_sym(Cm))
    with np.errstate(over="ignore", invalid="ignore"):     # refused in _screen
        if damping_mode == "exact":
            S_raw = sB[:, None] * sC[None, :] + lam
            S_abs = xp.abs(sB)[:, None] * xp.abs(sC)[None, :] + lam
        else:
            lb, lc = _pi_split(Bm, Cm, lam)
            S_raw = (sB[:, None] + lb) * (sC[None, :] + lc)
            S_abs = (xp.abs(sB)[:, None] + lb) * (xp.abs(sC)[None, :] + lc)
    S, nbad = _screen(S_raw, S_abs, indefinite, xp)
    info.update(damping_mode=damping_mode, indefinite=indefinite)
    return KroneckerInverse(method, UB, UC, S, KBinvT=UB, KCinvT=UC, logdet_offset=0.0,
                            terms=terms, damping=lam, backend=be, info=info, clipped=nbad)


def _two_term_inverse(method, terms, lam, be, info, indefinite, first_term_damping):
    r"""M^{-1} for M = (B1 + lB I) kron (C1 + lC I) + B2 kron C2 (docs/math.md §4, §8).

    Generalised eigenproblems B2 x = s (B1 + lB I) x through the Cholesky factor L of
    B1 + lB I: K_B = L^{-T} W, W the eigenvectors of L^{-1} B2 L^{-T}, so that
    K_B^T (B1 + lB I) K_B = I and K_B^T B2 K_B = diag(s_B); likewise K_C.  Then
    M^{-1} vec(V) = vec(K_B [(K_B^T V K_C) ./ S] K_C^T) with S = 1 + s_B s_C^T, or
    1 + |s_B| |s_C|^T (``indefinite="abs"``, always >= 1).  O(d_out^3 + d_in^3).
    """
    xp = be.xp
    (B1, C1), (B2, C2) = terms
    lb, lc = _pi_split(B1, C1, lam) if first_term_damping == "split" else (lam, lam)

    absolute = []

    def gen(Bf, Bs, shift):
        Mf = _sym(Bf) + shift * xp.eye(Bf.shape[0])
        try:
            if indefinite == "abs" and not _psd(Bf, shift, be):
                # B1 + shift I may be positive definite with s_min + shift near 0
                raise np.linalg.LinAlgError("indefinite first factor")
            L = be.cholesky_lower(Mf)
        except np.linalg.LinAlgError:
            if indefinite != "abs":
                raise
            # an indefinite first factor (a banded F is indefinite): "abs" takes its
            # absolute value |B| = U |s| U^T, as it takes |S| elsewhere; then B + shift I
            # is positive definite for every shift > 0
            sf, Uf = xp.linalg.eigh(_sym(Bf))
            Mf = (Uf * xp.abs(sf)) @ Uf.T + shift * xp.eye(Bf.shape[0])
            L = be.cholesky_lower(_sym(Mf))
            absolute.append(True)
        else:
            absolute.append(False)
        Li = be.solve_triangular(L, xp.eye(L.shape[0]), lower=True)
        s, W = xp.linalg.eigh(_sym(Li @ _sym(Bs) @ Li.T))
        K = Li.T @ W
        return s, K, Mf @ K, logdet_factor(L, be)

    try:
        sB, KB, KBt, ldB = gen(B1, B2, lb)
        sC, KC, KCt, ldC = gen(C1, C2, lc)
    except np.linalg.LinAlgError:
        raise ValueError(f"{method}: the first Kronecker term plus damping is not positive "
                         "definite (increase damping, or use indefinite='abs')") from None
    with np.errstate(over="ignore", invalid="ignore"):     # refused in _screen
        S_raw = 1.0 + sB[:, None] * sC[None, :]
        S_abs = 1.0 + xp.abs(sB)[:, None] * xp.abs(sC)[None, :]
    S, nbad = _screen(S_raw, S_abs, indefinite, xp)
    d_out, d_in = KB.shape[0], KC.shape[0]
    info.update(indefinite=indefinite, first_term_damping=first_term_damping,
                first_term_shifts=(lb, lc), first_term_absolute=tuple(absolute))
    # log det M = sum log S + d_in log det(B1 + lB I) + d_out log det(C1 + lC I)
    return KroneckerInverse(method, KB, KC, S, KBinvT=KBt, KCinvT=KCt,
                            logdet_offset=d_in * ldB + d_out * ldC, terms=terms, damping=lam,
                            backend=be, info=info, clipped=nbad)


# -- closed-form builders ------------------------------------------------------------------

def kfac(activations, output_grads, damping, *, bias=False, damping_mode="pi",
         indefinite="abs"):
    r"""K-FAC: F ~ Gamma kron A (docs/math.md §4; "expand" for T > 1, §8).

    Gamma = (1/n) sum_{n,t} g_nt g_nt^T, A = (1/(n T)) sum_{n,t} a_nt a_nt^T (T = 1 for 2-D
    input: Gamma = G^T G / n, A = A^T A / n).

    Parameters
    ----------
    activations : array (n, d_in) or (n, T, d_in)
        Layer inputs per sample (and position).
    output_grads : array (n, d_out) or (n, T, d_out)
        Gradients of each sample's own loss w.r.t. the layer's outputs (for a mean-reduced
        batch loss of N samples: PyTorch's gradients times N).
    damping : float
        lambda > 0.
    bias : bool
        Append a 1 to every input: the operator acts on vec([W | b]) (row-major).
    damping_mode : {"pi", "exact"}
        "pi": ((Gamma + lam_G I) kron (A + lam_A I))^{-1}, lam_G = sqrt(lam)/pi,
        lam_A = pi sqrt(lam), pi = sqrt((tr A / d_in) / (tr Gamma / d_out)); "exact":
        (Gamma kron A + lam I)^{-1} through the eigendecompositions.
    indefinite : {"abs", "clip", "raise"}
        Rounding can leave a factor eigenvalue slightly negative: "abs" uses |s| (never a
        blow-up), "clip" floors at 1e-10 max S with a warning, "raise" refuses.

    Returns
    -------
    KroneckerInverse
        Build O(n T (d_in^2 + d_out^2) + d_in^3 + d_out^3); products O(d_out d_in (d_out + d_in)).

    Raises
    ------
    ValueError, TypeError
        Bad shapes or values (the message names the argument).

    Examples
    --------
    >>> import numpy as np, mfac_linalg as ml
    >>> rng = np.random.default_rng(0)
    >>> a, g = rng.standard_normal((100, 4)), rng.standard_normal((100, 3))
    >>> op = ml.kfac(a, g, 1e-2, damping_mode="exact")
    >>> Gam, A = g.T @ g / 100, a.T @ a / 100
    >>> x = rng.standard_normal(12)
    >>> bool(np.allclose(op @ x, np.linalg.solve(np.kron(Gam, A) + 1e-2 * np.eye(12), x)))
    True
    """
    layer, lam, _, _, t0 = _begin(activations, output_grads, damping, bias, indefinite,
                                  choices=[(damping_mode, "damping_mode", ("pi", "exact"))])
    Gam, Aa = _kfac_factors_in_range(layer)
    op = _single_inverse("kfac", Gam, Aa, lam, damping_mode, indefinite, layer.be,
                         terms=[(Gam, Aa)], info={})
    op.damping_mode = damping_mode
    return _done(op, t0)


def ekfac(activations, output_grads, damping, *, bias=False, indefinite="abs"):
    r"""EKFAC: the K-FAC eigenbases with the optimal diagonal in that basis (docs/math.md §4).

    S*_ij = (1/n) sum_n (U_Gamma^T DW_n U_A)_ij^2 with the exact per-sample gradients
    DW_n = G_n^T A_n; inverse U_Gamma [(U_Gamma^T V U_A) ./ (S* + lam)] U_A^T.

    Parameters
    ----------
    activations, output_grads, damping, bias
        As :func:`kfac` (the bases are those of K-FAC's factors in the "expand" convention).
    indefinite : {"abs", "clip", "raise"}
        As :func:`kfac`; S* >= 0, so it never acts.

    Returns
    -------
    KroneckerInverse
        ``factors`` is (U_Gamma, U_A, S*).  Build
        O(n T (d_in^2 + d_out^2 + d_in d_out) + d_in^3 + d_out^3); products as :func:`kfac`.

    Raises
    ------
    ValueError, TypeError
        Bad shapes or values (the message names the argument).

    Examples
    --------
    >>> import numpy as np, mfac_linalg as ml
    >>> rng = np.random.default_rng(0)
    >>> a, g = rng.standard_normal((100, 4)), rng.standard_normal((100, 3))
    >>> UG, UA, S = ml.ekfac(a, g, 1e-2).factors
    >>> U = np.kron(UG, UA)
    >>> F = sum(np.outer(np.kron(gi, ai), np.kron(gi, ai)) for gi, ai in zip(g, a)) / 100
    >>> bool(np.allclose(S.ravel(), np.diag(U.T @ F @ U)))
    True
    """
    layer, lam, _, _, t0 = _begin(activations, output_grads, damping, bias, indefinite)
    xp = layer.xp
    Gam, Aa = _kfac_factors_in_range(layer)
    _, UG = xp.linalg.eigh(Gam)
    _, UA = xp.linalg.eigh(Aa)
    with np.errstate(over="ignore"):     # beyond the float range: refused in _screen
        Sstar = layer.ekfac_scaling(UG, UA)
    S, nbad = _screen(Sstar + lam, Sstar + lam, indefinite, xp)
    op = KroneckerInverse("ekfac", UG, UA, S, KBinvT=UG, KCinvT=UA, logdet_offset=0.0,
                          ekfac=(UG, UA, Sstar), damping=lam, backend=layer.be, info={},
                          clipped=nbad)
    return _done(op, t0)


# -- iterative builders ----------------------------------------------------------------------

def _terms(layer, k, solver, tol, maxiter, init, *, deflate=None, krylov=None, scale=0.0,
           centred=False):
    # R(F)'s products are of fourth degree in the data: run them on the data divided by
    # powers of two near their largest entries (exact), so that they can neither overflow
    # nor underflow, and scale back: F = c F', sigma = c sigma', (B, C) = sqrt(c) (B', C').
    sa, sg = _pow2_scale(layer.A), _pow2_scale(layer.G)
    r = sa * sg
    if sa != 1.0 or sg != 1.0:          # (r = 1 with sa = 1 / sg != 1 too: the Grams)
        layer = type(layer)(layer.A / sa, layer.G / sg, layer.be, layer.mask)
        # r and its square may lie outside the float range: divide twice (no ** 2)
        if deflate is not None:
            deflate = (deflate[0] / sg / sg, deflate[1] / sa / sa)
        scale = scale / r / r if scale > 0 else 0.0
    Rop = Rearranged(layer, deflate)
    sig = None
    space = "matrices"
    if (solver == "lanczos" and krylov is None and G_.gram_fits(layer)
            and Rop.dim > max(20, 4 * k) and max(G_.MIN_SAMPLES, 4 * k) <= layer.n <= Rop.dim
            and (deflate is None or centred) and G_.gram_cheaper(layer, k, centred)):
        # the samples' coordinates (kronecker/gram.py); a miss goes on in the matrices
        start = None if init is None else sum(init)
        # maxiter counts the matrix solver's cycles of max(20, 4k) steps: as many steps
        sig, P, Q, ginfo = G_.gram_triples(layer, k, tol=tol, start=start, scale=scale,
                                           centred=centred,
                                           max_steps=maxiter * max(20, 4 * k))
        Rop.products += ginfo.get("products", 0)
        if sig is not None:
            info = ginfo                              # its space: "samples"
        else:
            space = "matrices, after the samples' coordinates missed"
    if sig is None:
        if init is None and deflate is None:
            init = [layer.input_factor()]             # K-FAC's A
        if solver == "lanczos":
            sig, P, Q, info = lanczos_triples(Rop, k, tol=tol, maxiter=maxiter,
                                              krylov=krylov, init=init, scale=scale)
        elif solver == "sequential":
            sig, P, Q, info = sequential_triples(Rop, k, tol=tol, maxiter=maxiter, init=init)
        else:
            sig, P, Q, info = subspace_triples(Rop, k, tol=tol, maxiter=maxiter, init=init,
                                               scale=scale)
    info["band"] = None if layer.mask is None else "positions at distance <= band"
    info.setdefault("space", space)
    terms = factors_from_triples(sig, P, Q)
    if r != 1.0:
        with np.errstate(over="ignore"):
            info["sigma"] = [x * r * r for x in info["sigma"]]
        if not all(math.isfinite(x) for x in info["sigma"]):
            # F itself (fourth powers of the data) is beyond float64; data whose sides
            # are far apart but whose F is representable (a 1e160, g 1e-160) builds
            raise ValueError("activations and output_grads are too large: F (fourth powers "
                             "of the data) overflows float64, and so do its Kronecker terms; "
                             "rescale them (F scales by the squares of both scales)")
        terms = [(Bi * r, Ci * r) for Bi, Ci in terms]
    return terms, info


def _iterative(activations, output_grads, damping, bias, indefinite, k, solver, *, tol,
               maxiter, band, positions, init, choices, krylov=None, cap_k=False):
    """The iterative builders' common start: every argument checked (:func:`_begin`), the
    warm start (default K-FAC's A), then the k leading triples of R(F) by ``solver``.
    ``cap_k``: refuse k above the number of R(F)'s singular values on symmetric factors.
    Returns (layer, lam, t0, terms, info)."""
    layer, lam, tol, maxiter, t0 = _begin(
        activations, output_grads, damping, bias, indefinite, tol=tol, maxiter=maxiter,
        band=band, positions=positions, choices=choices)
    if cap_k:
        kmax = min(layer.d_in * (layer.d_in + 1) // 2, layer.d_out * (layer.d_out + 1) // 2)
        if k > kmax:
            raise ValueError(f"k must be <= {kmax} for a ({layer.d_out}, {layer.d_in}) layer "
                             "(R(F) has no more singular values on symmetric factors: "
                             f"min(d_in (d_in + 1), d_out (d_out + 1)) / 2); got {k}")
    start = _init_factors(init, layer)        # None: K-FAC's A (in _terms)
    terms, info = _terms(layer, k, solver, tol, maxiter, start, krylov=krylov)
    return layer, lam, t0, terms, info


_ITER_DOC = """
    tol : float in (0, 1)
        Stop when every triple's two-sided residual
        max(||R q_i - sigma_i p_i||, ||R^T p_i - sigma_i q_i||) / sigma_1 <= tol
        (docs/math.md §8): the factors are then accurate to about tol / gap.
    maxiter : int >= 1
        Iteration cap; reaching it issues a :class:`ConvergenceWarning` (``info["converged"]``
        is False) and builds from the last iterate.
    init : operator, list of (B, C) pairs, or (d_in, d_in) array, optional
        Warm start from previous factors (as in training): their C factors start the
        iteration.  Default: K-FAC's A (close to the top right singular vector).
    band, positions : int >= 0 and (T,) or (T, p) integer array, optional
        For T > 1 only the position pairs at Chebyshev distance <= band enter R(F) (the
        paper's approximation); default: every pair (the exact products of docs/math.md §8).
"""


_TWO_DOC = """
    indefinite : {"abs", "clip", "raise"}
        The second term is in general indefinite, so 1 + s_B s_C can be <= 0.  "abs" (the
        default, the paper's) inverts with 1 + |s_B| |s_C| >= 1: ||M^{-1}|| <= 1/(lam_B lam_C)
        always (the inverse can never blow up); ``fisher()`` is then the matrix inverted,
        first term + the generalised |B2| kron |C2|.  "clip" floors at 1e-10 max S (up to
        1e10 times too large in that direction; RuntimeWarning), "raise" refuses.
        ``op.clipped`` counts the entries <= 1e-10 max S.
    first_term_damping : {"split", "full"}
        "split": (B1 + lam_B I) kron (C1 + lam_C I), lam_B lam_C = lam split as K-FAC's pi;
        "full": lam added to both factors (the paper's optimizer).
"""


def _doc(f):
    f.__doc__ = f.__doc__.replace("    %(iter)s", _ITER_DOC.strip("\n")).replace(
        "    %(iter_corrected)s", _ITER_DOC.strip("\n").replace(
            "Default: K-FAC's A (close to the top right singular vector).",
            "A previous kfac_corrected operator gives its second term;\n        default: a "
            "random start.")).replace("%(two)s", _TWO_DOC.rstrip("\n"))
    return f


@_doc
def kpsvd(activations, output_grads, damping, *, bias=False, damping_mode="exact",
          solver="lanczos", tol=TOL,
          maxiter=MAXITER, init=None, indefinite="abs", band=None, positions=None):
    r"""KPSVD: the best single Kronecker product min ||F - B kron C||_F (docs/math.md §4, §8).

    The top singular triple (sigma, p, q) of the rearranged Fisher R(F), found matrix-free by
    Golub-Kahan-Lanczos from K-FAC's A (F and R(F) are never formed; for a dense layer
    where it is cheaper, in the coordinates of the n samples, docs/math.md §8); B = sqrt(sigma) p,
    C = sqrt(sigma) q, symmetric with tr(B) > 0 (PSD for a PSD F).

    Parameters
    ----------
    activations, output_grads, damping, bias
        As :func:`kfac`.
    damping_mode : {"exact", "pi"}
        "exact": (B kron C + lam I)^{-1}; "pi": ((B + lam_B I) kron (C + lam_C I))^{-1} with
        lam_B lam_C = lam, lam_B / lam_C = (tr B / d_out) / (tr C / d_in) (K-FAC's pi).
    solver : {"lanczos", "subspace"}
        Golub-Kahan-Lanczos (the default, as :func:`lanczos`; it stops within a cycle once
        the residual reaches ``tol``) or subspace iteration on a block of 3 (one R and one
        R^T product on each vector per iteration).
    indefinite : {"abs", "clip", "raise"}
        As :func:`kfac`.
    %(iter)s

    Returns
    -------
    KroneckerInverse
        ``info``: ``sigma``, ``residual`` (the larger side), ``residual_left``,
        ``residual_right``, ``iterations``, ``products``, ``converged``, ``build_seconds``,
        ``space`` ("samples": a dense layer's triples found in the samples' coordinates,
        docs/kronecker.md; "matrices"; or "matrices, after the samples' coordinates
        missed").
        Build O(iterations n T (d_in^2 + d_out^2)) (T > 1: plus n T^2 (d_in + d_out)).

    Raises
    ------
    ValueError, TypeError
        Bad arguments (named in the message).

    Examples
    --------
    >>> import numpy as np, mfac_linalg as ml
    >>> rng = np.random.default_rng(0)
    >>> a, g = rng.standard_normal((200, 4)), rng.standard_normal((200, 3))
    >>> op = ml.kpsvd(a, g, 1e-3)
    >>> op.info["converged"], op.info["residual"] <= 1e-12
    (True, True)
    >>> (Bm, Cm), = op.factors
    >>> bool(np.trace(Bm) > 0)
    True
    """
    layer, lam, t0, terms, info = _iterative(
        activations, output_grads, damping, bias, indefinite, 1, solver, tol=tol,
        maxiter=maxiter, band=band, positions=positions, init=init,
        choices=[(damping_mode, "damping_mode", ("exact", "pi")),
                 (solver, "solver", ("subspace", "lanczos"))])
    (Bm, Cm), = terms
    op = _single_inverse("kpsvd", Bm, Cm, lam, damping_mode, indefinite, layer.be,
                         terms=terms, info=info)
    return _done(op, t0)




@_doc
def deflation(activations, output_grads, damping, *, bias=False, solver="lanczos", tol=TOL,
              maxiter=MAXITER, init=None, indefinite="abs", first_term_damping="split",
              band=None, positions=None):
    r"""Deflation: the best sum of two Kronecker products of symmetric factors, the top two
    symmetric triples of R(F) (docs/kronecker.md: with positions, T > 1, R(F) may also have
    antisymmetric triples, which a preconditioner's factors cannot be).

    F ~ B1 kron C1 + B2 kron C2 (docs/math.md §4, §8); the damped approximation
    M = (B1 + lam_B I) kron (C1 + lam_C I) + B2 kron C2 is inverted through generalised
    eigendecompositions (docs/math.md §4), O(d_out^3 + d_in^3).

    Parameters
    ----------
    activations, output_grads, damping, bias
        As :func:`kfac`.
    solver : {"lanczos", "subspace", "sequential"}
        How the two triples are found (the same target): "lanczos" (the default), both at
        once by restarted Golub-Kahan-Lanczos bidiagonalization, as :func:`lanczos` with
        k = 2: 8-20x fewer products than "subspace" (subspace iteration, which converges
        like (sigma_3/sigma_2)^(2 iterations) and crawls when sigma_3 is close to sigma_2;
        docs/kronecker.md); "sequential": the paper's deflation, the top triple, then the
        top triple of R - sigma_1 p_1 q_1^T (each by Golub-Kahan-Lanczos).
    %(iter)s%(two)s

    Returns
    -------
    KroneckerInverse
        ``info`` as :func:`kpsvd` (lists of two).

    Examples
    --------
    >>> import numpy as np, mfac_linalg as ml
    >>> rng = np.random.default_rng(0)
    >>> a, g = rng.standard_normal((200, 4)), rng.standard_normal((200, 3))
    >>> op = ml.deflation(a, g, 1e-3)
    >>> seq = ml.deflation(a, g, 1e-3, solver="sequential")
    >>> bool(np.allclose(op.fisher().todense(), seq.fisher().todense(), atol=1e-9))
    True
    """
    layer, lam, t0, terms, info = _iterative(
        activations, output_grads, damping, bias, indefinite, 2, solver, tol=tol,
        maxiter=maxiter, band=band, positions=positions, init=init,
        choices=[(solver, "solver", ("lanczos", "subspace", "sequential")),
                 (first_term_damping, "first_term_damping", ("split", "full"))])
    op = _two_term_inverse("deflation", terms, lam, layer.be, info, indefinite,
                           first_term_damping)
    return _done(op, t0)


@_doc
def lanczos(activations, output_grads, damping, *, bias=False, k=2, krylov=None, tol=TOL,
            maxiter=MAXITER, init=None, indefinite="abs", first_term_damping="split",
            band=None, positions=None):
    r"""Lanczos: the best k-term Kronecker sum from restarted Golub-Kahan bidiagonalization.

    The paper's fourth method (docs/math.md §8): the top k triples of R(F) at once from
    Golub-Kahan-Lanczos bidiagonalization with full reorthogonalization, thick-restarted
    (the paper's restart from q = sum_i q_i where ``krylov`` <= k + 1); the same target as
    :func:`deflation` (k = 2) or :func:`kpsvd` (k = 1).  A cycle costs at most ``krylov``
    products with R and with R^T on one vector, and ends early once the residual reaches
    ``tol``.

    Parameters
    ----------
    activations, output_grads, damping, bias
        As :func:`kfac`.
    k : {1, 2}
        Terms of the approximation that gets an inverse (more terms: :func:`kronecker_terms`).
    krylov : int >= 1, optional
        Steps per cycle K (default max(20, 4k), capped by the dimension); the paper's is 2.
    %(iter)s%(two)s

    Returns
    -------
    KroneckerInverse
        ``method="lanczos"``; ``info`` as :func:`kpsvd` plus ``krylov``; k = 1 is inverted as
        :func:`kpsvd` with ``damping_mode="exact"``.

    Examples
    --------
    >>> import numpy as np, mfac_linalg as ml
    >>> rng = np.random.default_rng(0)
    >>> a, g = rng.standard_normal((200, 4)), rng.standard_normal((200, 3))
    >>> lz, df = ml.lanczos(a, g, 1e-3), ml.deflation(a, g, 1e-3)
    >>> bool(np.allclose(lz.fisher().todense(), df.fisher().todense(), atol=1e-9))
    True
    """
    k = V.integer(k, "k", minimum=1)
    if k > 2:
        raise ValueError(f"k must be 1 or 2 for an inverse operator; got {k} (the terms of a "
                         "longer sum: mfac_linalg.kronecker.kronecker_terms)")
    if krylov is not None:
        krylov = V.integer(krylov, "krylov", minimum=1)
    layer, lam, t0, terms, info = _iterative(
        activations, output_grads, damping, bias, indefinite, k, "lanczos", tol=tol,
        maxiter=maxiter, band=band, positions=positions, init=init, krylov=krylov,
        choices=[(first_term_damping, "first_term_damping", ("split", "full"))])
    if k == 1:
        op = _single_inverse("lanczos", *terms[0], lam, "exact", indefinite, layer.be,
                             terms=terms, info=info)
    else:
        op = _two_term_inverse("lanczos", terms, lam, layer.be, info, indefinite,
                               first_term_damping)
    return _done(op, t0)


@_doc
def kfac_corrected(activations, output_grads, damping, *, bias=False, solver="lanczos", tol=TOL,
                   maxiter=MAXITER, init=None, indefinite="abs", first_term_damping="split",
                   band=None, positions=None):
    r"""K-FAC corrected: Gamma kron A + B2 kron C2, B2 kron C2 the best Kronecker product of the
    residual, the top triple of R(F) - vec(Gamma) vec(A)^T (docs/math.md §4, §8; matrix-free).

    Parameters
    ----------
    activations, output_grads, damping, bias
        As :func:`kfac` (Gamma, A in the "expand" convention for T > 1).
    solver : {"lanczos", "subspace"}
        How the top triple of the residual is found: Golub-Kahan-Lanczos (the default: the
        residual's singular values are often close, where a power method is slow) or subspace
        iteration.
    %(iter_corrected)s%(two)s

    Returns
    -------
    KroneckerInverse
        Inverted like :func:`deflation`.

    Examples
    --------
    >>> import numpy as np, mfac_linalg as ml
    >>> rng = np.random.default_rng(0)
    >>> a, g = rng.standard_normal((200, 4)), rng.standard_normal((200, 3))
    >>> err = {f.__name__: ml.fisher_error(f(a, g, 1e-3), a, g) for f in (ml.kfac, ml.kfac_corrected)}
    >>> err["kfac_corrected"] <= err["kfac"]
    True
    """
    layer, lam, tol, maxiter, t0 = _begin(
        activations, output_grads, damping, bias, indefinite, tol=tol, maxiter=maxiter,
        band=band, positions=positions,
        choices=[(solver, "solver", ("lanczos", "subspace")),
                 (first_term_damping, "first_term_damping", ("split", "full"))])
    start = _init_factors(init, layer, skip=1)
    xp = layer.xp
    Gam, Aa = _kfac_factors_in_range(layer)
    # residuals relative to ||vec(Gamma)|| ||vec(A)|| (about sigma_1 of R(F)), not to the
    # residual's own sigma_1, which is 0 when K-FAC is exact (one sample)
    scale = _norm(Gam, xp) * _norm(Aa, xp)
    res, info = _terms(layer, 1, solver, tol, maxiter, start, deflate=(Gam, Aa),
                       scale=scale, centred=layer.dense)
    terms = [(Gam, Aa), res[0]]
    op = _two_term_inverse("kfac_corrected", terms, lam, layer.be, info, indefinite,
                           first_term_damping)
    return _done(op, t0)


def kronecker_terms(activations, output_grads, k=2, *, bias=False, solver="lanczos", tol=TOL,
                    maxiter=MAXITER, krylov=None, init=None, band=None, positions=None):
    r"""The best k-term Kronecker sum sum_i B_i kron C_i of F (the top k triples of R(F)).

    No inverse (a sum of more than two terms has no closed-form one); for k <= 2 the
    builders give operators.

    Parameters
    ----------
    activations, output_grads, bias
        As :func:`kfac`.
    k : int, 1 <= k <= min(d_in (d_in + 1), d_out (d_out + 1)) / 2
        Number of terms (R(F) has no more singular values on symmetric factors; d_in
        counts the bias column).
    solver : {"lanczos", "subspace", "sequential"}
        As in :func:`lanczos` and :func:`deflation`.
    tol, maxiter, krylov, init, band, positions
        As :func:`lanczos`.

    Returns
    -------
    terms : list of (B_i, C_i)
    info : dict
        As :func:`kpsvd`.

    Examples
    --------
    >>> import numpy as np, mfac_linalg as ml
    >>> rng = np.random.default_rng(0)
    >>> a, g = rng.standard_normal((200, 4)), rng.standard_normal((200, 3))
    >>> terms, info = ml.kronecker.kronecker_terms(a, g, 3)
    >>> len(terms), info["converged"]
    (3, True)
    """
    k = V.integer(k, "k", minimum=1)
    if krylov is not None:
        krylov = V.integer(krylov, "krylov", minimum=1)
    _, _, _, terms, info = _iterative(
        activations, output_grads, 1.0, bias, "abs", k, solver, tol=tol, maxiter=maxiter,
        band=band, positions=positions, init=init, krylov=krylov,
        choices=[(solver, "solver", ("lanczos", "subspace", "sequential"))], cap_k=True)
    return terms, info


# -- approximation error without forming F ---------------------------------------------------

def fisher_error(approx, activations, output_grads, *, bias=False, kind="frobenius"):
    r"""How far the undamped approximation F~ of ``approx`` is from the layer's F.

    ``kind="frobenius"``: ||F - F~||_F / ||F||_F from n x n Gram identities, never forming F
    (docs/math.md §4): ||F||^2 = (1/n^2) sum_{n,k} <DW_n, DW_k>^2,
    <F, B kron C> = (1/n) sum_n <DW_n, B DW_n C^T>, ||sum B_i kron C_i||^2 =
    sum_{ij} <B_i, B_j><C_i, C_j>; EKFAC: <F, F~> = (1/n) sum_n <S*, (U_G^T DW_n U_A)^2>,
    ||F~|| = ||S*||.  It subtracts squares: its absolute accuracy is about
    sqrt(eps) (||F|| + sum_i ||B_i|| ||C_i||) / ||F||.
    O(n^2 T^2 (d_in + d_out) + n T (d_in^2 + d_out^2)).

    ``kind="spectrum"`` (the paper's second metric, docs/math.md §8):
    ||sv(F) - sv(F~)||_2 / ||sv(F)||_2, singular values sorted, zero-padded.  F's non-zero
    eigenvalues are those of the n x n matrix (1/n) <DW_n, DW_k> (O(n^3)); a single product
    B kron C has the eigenvalues s_B s_C^T, EKFAC S*; a two-term sum is dense for
    d_out d_in <= 4096, else its top n eigenvalues come from ARPACK on F~'s products and the
    tail from ||F~||_F^2 minus their squares (F has rank <= n, so this is exact).

    Parameters
    ----------
    approx : KroneckerInverse or KroneckerFisher
        From one of the builders, for this layer.
    activations, output_grads, bias
        The layer's data, as given to the builder.
    kind : {"frobenius", "spectrum"}

    Returns
    -------
    float

    Raises
    ------
    TypeError
        ``approx`` is not from the Kronecker builders.
    ValueError
        The data do not fit ``approx``'s layer (check ``bias=``), or a bad ``kind``.

    Examples
    --------
    >>> import numpy as np, mfac_linalg as ml
    >>> rng = np.random.default_rng(0)
    >>> a, g = rng.standard_normal((1, 3)), rng.standard_normal((1, 2))
    >>> op = ml.kfac(a, g, 0.1)             # one sample: F = (g g^T) kron (a a^T) exactly
    >>> ml.fisher_error(op, a, g) < 1e-7, ml.fisher_error(op, a, g, kind="spectrum") < 1e-12
    (True, True)
    """
    if isinstance(approx, KroneckerFisher):
        approx = approx.inverse()
    if not isinstance(approx, KroneckerInverse):
        raise TypeError(f"approx must be an operator from kfac/ekfac/kpsvd/deflation/lanczos/"
                        f"kfac_corrected; got {type(approx).__name__}")
    V.choice(kind, "kind", ("frobenius", "spectrum"))
    layer = layer_data(activations, output_grads, bias)
    if approx.backend != layer.be:
        raise TypeError(f"approx lives on {approx.device}, the data on {layer.be!r}")
    if (approx.d_out, approx.d_in) != (layer.d_out, layer.d_in):
        raise ValueError(f"approx is for a ({approx.d_out}, {approx.d_in}) layer; the data give "
                         f"({layer.d_out}, {layer.d_in}) (check bias=)")
    n = layer.n
    # Both errors are relative: scale the data by powers of two (exact) so that the Gram
    # identities (fourth powers of the data) cannot overflow or underflow, and the
    # approximation's terms to match (F -> F / (sa sg)^2).
    sa, sg = _pow2_scale(layer.A), _pow2_scale(layer.G)
    layer = type(layer)(layer.A / sa, layer.G / sg, layer.be, layer.mask)
    ekfac = terms = None
    if approx._ekfac is not None:
        UG, UA, Sstar = approx._ekfac
        ekfac = (UG, UA, Sstar / sa / sa / sg / sg)     # one factor at a time: sa sg may
                                                         # over- or underflow
    else:
        terms = [_rescaled_term(Bi, Ci, sg, sa, layer.be.xp) for Bi, Ci in approx._terms]
    K = layer.gram()
    if kind == "spectrum":
        return _spectrum_error(ekfac, terms, B.to_host(K) / n, n)
    FF = B.scalar((K ** 2).sum()) / n ** 2
    if ekfac is not None:
        UG, UA, Sstar = ekfac
        cross = layer.ekfac_cross(UG, UA, Sstar) / n
        AA = B.scalar((Sstar ** 2).sum())
    else:
        cross = sum(B.scalar(layer.quad_terms(Bi, Ci).sum()) / n for Bi, Ci in terms)
        AA = _norm2(terms)
    err2 = max(FF - 2.0 * cross + AA, 0.0)
    return math.sqrt(err2 / FF) if FF > 0 else 0.0


def _rescaled_term(Bm, Cm, sg, sa, xp):
    """(B', C') with B' kron C' = (B kron C) / (sg sa)^2 (sg, sa powers of two) and max|B'|,
    max|C'| balanced, by exact power-of-two scalings: B / sg^2 and C / sa^2 apart can
    overflow where the builder split sqrt(sigma) evenly between unbalanced factors (data
    at 1e-150 and 1e100)."""
    def exp2(X):
        top = float(B.to_host(abs(X).max()))
        return math.frexp(top)[1] if top > 0 else 0
    eb, ec = exp2(Bm), exp2(Cm)
    lg, la = math.frexp(sg)[1] - 1, math.frexp(sa)[1] - 1      # sg = 2^lg, sa = 2^la
    tot = (eb - 2 * lg) + (ec - 2 * la)
    half = tot // 2
    return xp.ldexp(Bm, half - eb), xp.ldexp(Cm, tot - half - ec)


def _norm2(terms):
    return sum(B.scalar((Bi * Bj).sum()) * B.scalar((Ci * Cj).sum())
               for Bi, Ci in terms for Bj, Cj in terms)


def _norm(X, xp):
    """||X||_F without overflow or underflow of its squares."""
    m = _pow2_scale(X)
    return m * B.scalar(xp.linalg.norm(X / m))


def _pow2_scale(X):
    """A power of two near max|X| (1 for an all-zero X): dividing by it is exact."""
    top = float(B.to_host(abs(X).max()))
    return math.ldexp(1.0, math.frexp(top)[1]) if top > 0 else 1.0


def _spectrum_error(ekfac, terms, Kn, n):
    f = np.sort(np.clip(np.linalg.eigvalsh((Kn + Kn.T) / 2), 0.0, None))[::-1]
    ref = float(np.linalg.norm(f))
    if ref == 0.0:
        return 0.0
    tail2 = 0.0
    if ekfac is not None:
        t = B.to_host(ekfac[2]).ravel()
    elif len(terms) == 1:
        Bm, Cm = (B.to_host(X) for X in terms[0])
        t = np.outer(np.linalg.eigvalsh(Bm), np.linalg.eigvalsh(Cm)).ravel()
    else:
        t, tail2 = _two_term_spectrum([(B.to_host(b), B.to_host(c)) for b, c in terms], n)
    t = np.sort(np.abs(t))[::-1]
    L = max(len(f), len(t))
    diff = np.zeros(L)
    diff[:len(f)] += f
    diff[:len(t)] -= t
    return math.sqrt(float((diff ** 2).sum()) + max(tail2, 0.0)) / ref


def _two_term_spectrum(terms, n):
    """Eigenvalues of sum B_i kron C_i: all (dense) or the top r >= n plus the tail's energy."""
    d_out, d_in = terms[0][0].shape[0], terms[0][1].shape[0]
    D = d_out * d_in
    if D <= DENSE_SPECTRUM or n >= D - 1:
        if D > 16384:
            raise ValueError(f"the spectrum error of a two-term sum over d = {D} > 16384 "
                             f"parameters with n = {n} >= d - 1 samples needs a dense "
                             "eigendecomposition; use fewer samples or kind='frobenius'")
        return np.linalg.eigvalsh(sum(np.kron(b, c) for b, c in terms)), 0.0
    from scipy.sparse.linalg import LinearOperator, eigsh

    def mv(x):
        X = x.reshape(d_out, d_in)
        return sum(b @ X @ c.T for b, c in terms).reshape(-1)

    r = min(n, D - 2)
    t = eigsh(LinearOperator((D, D), matvec=mv, dtype=np.float64), k=r, which="LM",
              return_eigenvectors=False, v0=np.ones(D))
    return t, _norm2(terms) - float((t ** 2).sum())
