"""The KPSVD family's solver in the samples' coordinates (mfac_linalg/kronecker/gram.py): the
same triples as the matrix-space solver and as the SVD of the explicit R(F), on awkward layers
(fewer samples than R's dimension, duplicate and zero samples, scales over decades, sides far
apart), K-FAC corrected's centred operator, warm starts, and every way back to the matrix
space (docs/kronecker.md)."""
import warnings

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import mfac_linalg as ml
from mfac_linalg import kronecker as kr
from mfac_linalg.kronecker import gram

from test_kronecker import factor_error, kfac_factors, layer, rearranged, svd_terms


@pytest.fixture
def route(monkeypatch):
    """route("samples") / route("matrices"): force the cost model's choice."""
    def force(where):
        monkeypatch.setattr(gram, "gram_cheaper",
                            lambda layer, k, close=False: where == "samples")
    return force


def _build(route, where, build, a, g, **kw):
    route(where)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ml.ConvergenceWarning)
        return build(a, g, 0.1, **kw)


@pytest.mark.parametrize("n,d_in,d_out,bias", [(40, 14, 11, False), (50, 12, 10, True),
                                               (33, 10, 9, False), (36, 8, 8, True)])
def test_samples_and_matrices_give_the_svd_of_R(route, n, d_in, d_out, bias):
    """Layers with 32 <= n <= dim R (R's rank is n): every factor within 1e-9 sqrt(sigma_1)
    of the SVD of the explicit R(F) by both routes, residual <= 1e-12."""
    rng = np.random.default_rng(n + d_in)
    A, G, Ab, G3, F = layer(rng, n, d_in, d_out, bias)
    di = Ab.shape[2]
    R = rearranged(F, d_out, di)
    ref, s = svd_terms(R, d_out, di, 2)
    for where in ("samples", "matrices"):
        for build, k in ((ml.kpsvd, 1), (ml.deflation, 2)):
            op = _build(route, where, build, A, G, bias=bias)
            assert op.info["space"] == where
            assert op.info["converged"] and op.info["residual"] <= 1e-12
            assert factor_error(op.factors, ref[:k], s[0], s) <= 1e-9, (where, build)
            assert np.allclose(op.info["sigma"], s[:k], rtol=1e-11, atol=1e-13 * s[0])
    # K-FAC corrected: the top triple of R - vec(Gamma) vec(A)^T
    Gam, Aa = kfac_factors(Ab, G3)
    refc, sc = svd_terms(R - np.outer(Gam.ravel(), Aa.ravel()), d_out, di, 1)
    for where in ("samples", "matrices"):
        op = _build(route, where, ml.kfac_corrected, A, G, bias=bias)
        assert op.info["space"] == where and op.info["converged"]
        assert factor_error(op.factors[1:], refc, s[0], sc) <= 1e-9, where


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(32, 55), d_in=st.integers(10, 14),
       d_out=st.integers(10, 13), decades=st.integers(0, 6), dup=st.booleans(),
       zero=st.booleans())
def test_random_layers_both_routes_agree(seed, n, d_in, d_out, decades, dup, zero):
    """Hypothesis (32 <= n <= dim R: the samples' route is taken, or tried and left after a
    breakdown): per-feature scales over up to six decades, duplicated and zero samples;
    where both routes converge (the fair cases: sigma_k separated from sigma_{k+1}) they give
    the same two-term sum to 1e-9 ||F|| and the same sigma to 1e-10."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n, d_in)) * np.logspace(0, decades, d_in)
    g = rng.standard_normal((n, d_out)) * np.logspace(-decades / 2, 0, d_out)
    if dup:
        a[n // 2:], g[n // 2:] = a[:n - n // 2], g[:n - n // 2]
    if zero:
        g[0] = 0.0
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        for where in ("samples", "matrices"):
            mp.setattr(gram, "gram_cheaper", lambda layer, k, close=False, w=where: w == "samples")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ml.ConvergenceWarning)
                terms, info = kr.kronecker_terms(a, g, 3)
            out[where] = (terms, info)
    (t_s, i_s), (t_m, i_m) = out["samples"], out["matrices"]
    assert i_m["space"] == "matrices"
    assert i_s["space"] in ("samples", "matrices, after the samples' coordinates missed")
    assert i_m["converged"] and i_s["converged"]
    s = np.array(i_m["sigma"])
    assert np.allclose(i_s["sigma"], s, rtol=1e-10, atol=1e-12 * s[0])
    if (s[1] - s[2]) > 1e-3 * s[0]:                 # the top two are determined
        Fs = sum(np.kron(Bm, Cm) for Bm, Cm in t_s[:2])
        Fm = sum(np.kron(Bm, Cm) for Bm, Cm in t_m[:2])
        assert np.abs(Fs - Fm).max() <= 1e-9 * np.abs(Fm).max()


@pytest.mark.parametrize("n,d", [(400, 10), (3000, 6), (20, 12)])
def test_more_samples_than_dim_R_or_too_few_keep_the_matrices(route, n, d, rng):
    """n > dim R (the Grams are singular, and coordinates carry null-space parts whose
    rounding the formed factors would show: 8e-11 against 1e-12 on a 400-sample layer
    before this rule) or n < 32: the matrix space, whatever the cost model says."""
    a, g = rng.standard_normal((n, d)), rng.standard_normal((n, d - 1))
    op = _build(route, "samples", ml.deflation, a, g)
    assert op.info["space"] == "matrices" and op.info["converged"]


def test_warm_start_in_the_samples_coordinates(route, rng):
    a, g = rng.standard_normal((50, 12)), rng.standard_normal((50, 10))
    route("samples")
    cold = ml.deflation(a, g, 1e-2)
    a2 = a + 1e-4 * rng.standard_normal(a.shape)
    warm = ml.deflation(a2, g, 1e-2, init=cold)
    ref = ml.deflation(a2, g, 1e-2)
    assert warm.info["space"] == "samples" and warm.info["converged"]
    assert warm.info["products"] < ref.info["products"]
    assert np.allclose(warm.fisher().todense(), ref.fisher().todense(), atol=1e-9)


def test_a_miss_goes_on_in_the_matrix_space(route, monkeypatch, rng):
    """Three steps cannot reach tol: the matrix-space solver takes over from K-FAC's A, and
    converges to the same sum; the products of both count."""
    a, g = rng.standard_normal((40, 12)), rng.standard_normal((40, 10))
    ref = _build(route, "matrices", ml.deflation, a, g)
    monkeypatch.setattr(gram, "MAX_STEPS", 3)
    op = _build(route, "samples", ml.deflation, a, g)
    assert op.info["space"].startswith("matrices, after")
    assert op.info["products"] == ref.info["products"] + 1 + 2 * 3   # start, 3 steps
    assert op.info["converged"] and op.info["residual"] <= 1e-12
    assert np.allclose(op.fisher().todense(), ref.fisher().todense(), atol=1e-9)


@pytest.mark.parametrize("build", [ml.kpsvd, ml.deflation, ml.lanczos, ml.kfac_corrected])
def test_formed_factors_that_miss_the_check_go_to_the_matrices(route, monkeypatch, build):
    """The explicit check of the formed factors decides: a result whose check missed tol
    (injected here: the check's residual raised above tol) is dropped and the matrix-space
    solver runs as it would have; the products of both count."""
    orig = gram._hnorm
    state = {"check": False}

    def inflated(x, hx):                       # the check's norms only (after the loop)
        value = orig(x, hx)
        return value * 1e6 if state["check"] else value
    orig_quad = gram._quad_rows

    def quad(X, C):                            # called by the check only (no init)
        state["check"] = True
        return orig_quad(X, C)
    rng = np.random.default_rng(0)
    a, g = rng.standard_normal((60, 12)), rng.standard_normal((60, 11))
    ref = _build(route, "matrices", build, a, g)
    monkeypatch.setattr(gram, "_hnorm", inflated)
    monkeypatch.setattr(gram, "_quad_rows", quad)
    op = _build(route, "samples", build, a, g)
    assert state["check"]
    assert op.info["space"] == "matrices, after the samples' coordinates missed"
    assert op.info["converged"] and op.info["residual"] <= 1e-12
    assert op.info["products"] > ref.info["products"]
    s = np.array(ref.info["sigma"])
    assert np.allclose(op.info["sigma"], s, rtol=1e-12, atol=1e-13 * s[0])


@pytest.mark.parametrize("build", [ml.kpsvd, ml.deflation, ml.lanczos])
@pytest.mark.parametrize("where", ["samples", "matrices"])
def test_sides_far_apart_with_a_representable_F_build(route, build, where):
    """a ~ 1e160, g ~ 1e-160: K-FAC's factors overflow (and underflow), F does not; the
    KPSVD family builds from its default start and from a warm start alike, and its
    sigma are those of the data rescaled by 2^-531 / 2^531 (F unchanged)."""
    rng = np.random.default_rng(4)
    a0, g0 = rng.standard_normal((40, 8)), rng.standard_normal((40, 7))
    a, g = np.ldexp(a0, 531), np.ldexp(g0, -531)
    ref = _build(route, where, build, a0, g0)
    for kw in ({}, {"init": np.eye(8)}):
        op = _build(route, where, build, a, g, **kw)
        assert op.info["converged"]
        assert np.allclose(op.info["sigma"], ref.info["sigma"], rtol=1e-10)


@pytest.mark.parametrize("ea,eg", [(266, -200), (400, -400), (-1000, 0)])
def test_data_whose_grams_would_overflow_is_scaled_first(route, rng, ea, eg):
    """(a . a')^2 overflows float64 for a ~ 2^266 (1e80) and underflows for 2^-1000: the
    data is divided by powers of two first, also when the two sides' factors cancel
    (2^400 and 2^-400, where F needs no rescaling), so these build in the samples'
    coordinates with the matrix space's sigma (a scaled Gram has entries of at most n d:
    it cannot overflow for n <= 5792)."""
    a, g = rng.standard_normal((40, 9)), rng.standard_normal((40, 9))
    # largest entries 0.75 2^ea and 0.75 2^eg: the powers of two taken out are exactly
    # 2^ea and 2^eg, whose product is 1 for the cancelling pair
    a = np.ldexp(0.75 * a / np.abs(a).max(), ea)
    g = np.ldexp(0.75 * g / np.abs(g).max(), eg)
    op = _build(route, "samples", ml.kpsvd, a, g)
    ref = _build(route, "matrices", ml.kpsvd, a, g)
    assert op.info["space"] == "samples" and op.info["converged"]
    assert np.allclose(op.info["sigma"], ref.info["sigma"], rtol=1e-11)


def test_a_repeated_top_sigma_goes_to_the_matrix_space(route):
    """Two identical uncorrelated halves give sigma_1 = sigma_2 exactly: a Krylov space from
    one vector may hold one copy, so the samples' route hands the cluster to the matrix
    solver, which takes the trace-maximal basis (a semidefinite first term) and builds."""
    rng = np.random.default_rng(3)
    h, d = 16, 8
    a = np.zeros((2 * h, 2 * d))
    g = np.zeros((2 * h, 8))
    x = rng.standard_normal((h, d))
    a[:h, :d], a[h:, d:] = x, x
    g[:h, 0], g[h:, 1] = 1.0, 1.0
    route("samples")
    with warnings.catch_warnings():
        warnings.simplefilter("error", ml.ConvergenceWarning)
        op = ml.deflation(a, g, 1e-2)
    s = op.info["sigma"]
    assert abs(s[0] - s[1]) <= 1e-12 * s[0]
    assert op.info["space"] != "samples"
    Bm, Cm = op.factors[0]
    assert np.linalg.eigvalsh(Bm).min() >= -1e-12 * np.abs(Bm).max()
    assert np.linalg.eigvalsh(Cm).min() >= -1e-12 * np.abs(Cm).max()
    F = op.fisher().todense()
    assert np.allclose(F @ op.todense(), np.eye(F.shape[0]), atol=1e-9)


def test_the_cost_model_picks_the_samples_for_the_two_term_builders():
    """The benchmark's layers: n = 4096, d = 256 / 512 take the samples' coordinates for
    deflation (k = 2) and K-FAC corrected; KPSVD (k = 1) at d = 256 keeps the matrices
    (measured: 0.26 s there against 0.49 s), at d = 512 the samples (0.67 s against 0.84 s)."""
    class L:
        def __init__(self, n, d):
            self.n, self.d_in, self.d_out = n, d + 1, d
    assert gram.gram_cheaper(L(4096, 256), 2) and gram.gram_cheaper(L(4096, 512), 2)
    assert gram.gram_cheaper(L(4096, 256), 1, close=True)
    assert not gram.gram_cheaper(L(4096, 256), 1)
    assert gram.gram_cheaper(L(4096, 512), 1)
    assert not gram.gram_cheaper(L(100000, 64), 2)        # many samples, narrow layer


def test_only_dense_host_layers_within_the_memory_cap_take_it(rng):
    lay = kr.layer_data(rng.standard_normal((10, 3, 4)), rng.standard_normal((10, 3, 5)), False)
    assert not gram.gram_fits(lay)                       # positions: T > 1
    lay = kr.layer_data(rng.standard_normal((10, 4)), rng.standard_normal((10, 5)), False)
    assert gram.gram_fits(lay)
    n = int(np.sqrt(gram.GRAM_BYTES / 16)) + 1
    big = kr.LayerData(np.zeros((n, 1, 2)), np.zeros((n, 1, 2)), lay.be)
    assert not gram.gram_fits(big)
