"""Kronecker builders: fuzz round five (indefinite='abs' with band=, fisher_error at
unbalanced scales, the paper's restart and warm-started subspace iteration settling on a
lower triple, warm starts of huge entries or given as nested lists)."""
import warnings

import numpy as np
import pytest

import mfac_linalg as ml


def _rearranged_sym_svd(a, g, bias=False):
    """Singular values of R(F) restricted to symmetric factors, dense float64."""
    a = np.asarray(a, float)
    g = np.asarray(g, float)
    if a.ndim == 2:
        a, g = a[:, None], g[:, None]
    if bias:
        a = np.concatenate([a, np.ones(a.shape[:2] + (1,))], axis=2)
    n, T, di = a.shape
    do = g.shape[2]
    D = np.einsum("nto,nti->noi", g, a).reshape(n, -1)
    F = D.T @ D / n
    R = F.reshape(do, di, do, di).transpose(0, 2, 1, 3).reshape(do * do, di * di)

    def sym(d):
        basis = []
        for i in range(d):
            for j in range(i, d):
                E = np.zeros((d, d))
                E[i, j] = E[j, i] = 1.0 if i == j else 2 ** -0.5
                basis.append(E.ravel())
        return np.array(basis).T
    Su, Sv = sym(do), sym(di)
    return np.linalg.svd(Su.T @ R @ Sv, compute_uv=False)


def _banded_indefinite():
    T = 6
    g = np.ones((2, T, 2)) * np.array([1.0, 0.5])
    a = np.zeros((2, T, 2))
    a[0, :, 0] = 1.0
    a[1, :, 1] = 0.6 * (-1.0) ** np.arange(T)
    return a, g


@pytest.mark.parametrize("eps", [1e-1, 1e-3, 1e-6, -1e-3])
def test_abs_never_blows_up_with_an_indefinite_banded_factor(eps):
    """band= makes a factor indefinite; with the damping just above its negative
    eigenvalue, B + lam_B I stayed positive definite and the Cholesky route used
    s + lam_B instead of |s| + lam_B: ||M^-1|| lambda reached 1e6."""
    a, g = _banded_indefinite()
    Bm, Cm = ml.kpsvd(a, g, 1.0, band=1, damping_mode="pi").factors[0]
    sC = np.linalg.eigvalsh(Cm)
    assert sC[0] < 0
    lam_c = -sC[0] * (1 + eps)
    lam = lam_c ** 2 * (np.trace(Bm) / 2) / (np.trace(Cm) / 2)
    op = ml.kpsvd(a, g, lam, band=1, damping_mode="pi")
    assert np.linalg.norm(op.todense(), 2) * lam <= 1.0 + 1e-9
    for build in (ml.deflation, ml.lanczos):
        (B1, C1), _ = build(a, g, 1.0, band=1).factors
        s1 = np.linalg.eigvalsh(C1)
        lam2 = (-s1[0] * (1 + eps)) ** 2 * (np.trace(B1) / 2) / (np.trace(C1) / 2)
        op2 = build(a, g, lam2, band=1)
        assert np.linalg.norm(op2.todense(), 2) * lam2 <= 1.0 + 1e-9
        assert op2.info["first_term_absolute"] == (False, True)


@pytest.mark.parametrize("name", ["kpsvd", "deflation", "lanczos", "kfac_corrected", "kfac"])
@pytest.mark.parametrize("sa,sg", [(1e-150, 1e100), (1e100, 1e-100), (1.0, 1.0)])
def test_fisher_error_is_scale_free(name, sa, sg):
    """The relative errors at unit scale, also where the factors' split of sqrt(sigma)
    made B / sg^2 or C / sa^2 overflow (NaN and a RuntimeWarning before)."""
    rng = np.random.default_rng(1)
    a, g = rng.standard_normal((20, 4)), rng.standard_normal((20, 3))
    build = getattr(ml, name)
    ref = ml.fisher_error(build(a, g, 1e-3), a, g)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        got = ml.fisher_error(build(a * sa, g * sg, 1e-3 * (sa * sg) ** 2), a * sa, g * sg)
    assert got == pytest.approx(ref, rel=1e-10, abs=1e-14)


def test_paper_restart_confirms_a_converged_cycle():
    """krylov=2 (the paper's restart) reported converged=True with (sigma_1, sigma_3)."""
    rng = np.random.default_rng(19)
    n = int(rng.choice([1, 2, 3, 5, 20]))
    T = int(rng.choice([1, 1, 2, 3, 5]))
    di, do = int(rng.integers(2, 9)), int(rng.integers(2, 9))
    bias = bool(rng.random() < .5)
    a, g = rng.standard_normal((n, T, di)), rng.standard_normal((n, T, do))
    if rng.random() < 0.3:
        a[:, :, -1] = a[:, :, 0]
    s = _rearranged_sym_svd(a, g, bias)
    assert s[1] / s[2] > 1.4                      # sigma_2 is well separated
    for K in (1, 2, 3, None):
        op = ml.lanczos(a, g, 1e-3, bias=bias, krylov=K, tol=1e-6)
        assert op.info["converged"]
        np.testing.assert_allclose(op.info["sigma"], s[:2], rtol=1e-9)


def test_subspace_warm_start_at_a_lower_triple_finds_the_top_one():
    rng = np.random.default_rng(0)
    for n, di, do in [(200, 8, 3), (3, 8, 6), (50, 6, 6)]:
        a, g = rng.standard_normal((n, di)), rng.standard_normal((n, do))
        s = _rearranged_sym_svd(a, g)
        C2 = ml.deflation(a, g, 1e-2).factors[1][1]
        for noise in (0.0, 1e-9):
            init = C2 + noise * rng.standard_normal(C2.shape)
            for solver in ("subspace", "lanczos"):
                op = ml.kpsvd(a, g, 1e-2, solver=solver, init=init, tol=1e-6)
                assert op.info["converged"]
                assert op.info["sigma"][0] == pytest.approx(s[0], rel=1e-9)


def test_warm_starts_are_directions():
    """Finite init factors near the float range (the symmetrisation overflowed) and a
    (d_in, d_in) matrix given as a nested list (read as (B, C) pairs) are accepted; the
    result does not depend on the start's scale."""
    rng = np.random.default_rng(2)
    a, g = rng.standard_normal((30, 2)), rng.standard_normal((30, 3))
    C = ml.kpsvd(a, g, 1e-2).factors[0][1]
    ref = ml.kpsvd(a, g, 1e-2, init=C, solver="subspace").info["sigma"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for solver in ("subspace", "lanczos"):
            op = ml.kpsvd(a, g, 1e-2, init=C / np.abs(C).max() * 8e307, solver=solver)
            assert op.info["converged"]
            assert op.info["sigma"][0] == pytest.approx(ref[0], rel=1e-12)
    nested = ml.kpsvd(a, g, 1e-2, init=C.tolist())
    assert nested.info["sigma"][0] == pytest.approx(ref[0], rel=1e-12)
    pairs = ml.deflation(a, g, 1e-2)
    big = [(B, Cm * 7.5e307 / np.abs(Cm).max()) for B, Cm in pairs.factors]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        op = ml.deflation(a, g, 1e-2, init=big, solver="subspace")
    assert op.info["converged"]


@pytest.mark.parametrize("name", ["kfac", "ekfac", "kfac_corrected"])
def test_kfac_factors_below_full_precision_are_refused_by_name(name):
    """Data near 1e-160 on one side put K-FAC's A near 1e-320 (subnormal): the results
    were off by up to 0.13 without a word, the pi inverse overflowed.  Refused; the KPSVD
    family, whose factors balance the sides, stays exact."""
    rng = np.random.default_rng(3)
    a, g = rng.standard_normal((20, 3)), rng.standard_normal((20, 2))
    sa, sg = 1e-160, 1e150
    lam = 1e-3 * (sa * sg) ** 2
    with pytest.raises(ValueError, match="activations are too small for K-FAC's factors"):
        getattr(ml, name)(a * sa, g * sg, lam)
    op = ml.kpsvd(a * sa, g * sg, lam)
    ref = ml.kpsvd(a, g, 1e-3)
    x = rng.standard_normal(6)
    np.testing.assert_allclose(op @ x * (sa * sg) ** 2, ref @ x, rtol=1e-10)
    getattr(ml, name)(a * 1e-150, g * 1e100, 1e-103)   # A near 1e-300: normal, accepted
