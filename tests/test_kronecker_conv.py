"""Convolution (weight-sharing) layers: per-sample position matrices (n, T, d) against dense
oracles built with np.kron from the explicit per-sample gradients (docs/math.md §8)."""

import numpy as np
import pytest
from hypothesis import given, strategies as st

import mfac_linalg as ml
from mfac_linalg import kronecker as kr

from test_kronecker import (BUILDERS, abs_dense, damped_dense, factor_error, kfac_factors,
                            layer, rearranged, spectrum_error, svd_terms, undamped)
from oracles import rel_err

conv_layers = st.fixed_dictionaries({
    "n": st.integers(1, 8), "T": st.integers(1, 4), "d_in": st.integers(1, 4),
    "d_out": st.integers(1, 3), "bias": st.booleans(), "seed": st.integers(0, 2**31)})


def test_conv_fisher_is_the_per_sample_gradient_covariance(rng):
    """The oracle itself: F = (1/n) sum_n vec(DW_n) vec(DW_n)^T with DW_n = G_n^T A_n."""
    A, G, Ab, G3, F = layer(rng, 5, 3, 2, True, T=4)
    DW = np.stack([g.T @ a for g, a in zip(G3, Ab)])
    Z = DW.reshape(5, -1)
    assert rel_err(F, Z.T @ Z / 5) < 1e-14


@given(conv_layers, st.sampled_from([1e-2, 1.0]))
def test_conv_kfac_ekfac_vs_dense(lay, lam):
    rng = np.random.default_rng(lay["seed"])
    A, G, Ab, G3, F = layer(rng, lay["n"], lay["d_in"], lay["d_out"], lay["bias"], T=lay["T"])
    Gam, Aa = kfac_factors(Ab, G3)
    D = F.shape[0]
    x = rng.standard_normal(D)
    for mode, M in (("exact", np.kron(Gam, Aa) + lam * np.eye(D)),
                    ("pi", None)):
        op = ml.kfac(A, G, lam, bias=lay["bias"], damping_mode=mode)
        (Gm, Am), = op.factors
        assert rel_err(Gm, Gam) < 1e-13 and rel_err(Am, Aa) < 1e-13
        if M is None:
            M = damped_dense(op, lam)
        assert rel_err(op @ x, np.linalg.solve(M, x)) <= 1e-12 * np.linalg.cond(M)
        assert rel_err(op.fisher() @ x, M @ x) <= 1e-12
    op = ml.ekfac(A, G, lam, bias=lay["bias"])
    UG, UA, S = op.factors
    U = np.kron(UG, UA)
    assert rel_err(S.ravel(), np.diag(U.T @ F @ U)) < 1e-12          # S* = diag(U^T F U)
    M = U @ np.diag(S.ravel() + lam) @ U.T
    assert rel_err(op @ x, np.linalg.solve(M, x)) <= 1e-12 * np.linalg.cond(M)
    assert rel_err(op.fisher() @ x, M @ x) <= 1e-12


@given(conv_layers)
def test_conv_rearranged_products_are_exact(lay):
    rng = np.random.default_rng(lay["seed"])
    A, G, Ab, G3, F = layer(rng, lay["n"], lay["d_in"], lay["d_out"], False, T=lay["T"])
    d_in, d_out = A.shape[2], G.shape[2]
    R = rearranged(F, d_out, d_in)
    Rf, RTf = kr.rearranged_products(A, G)
    Q = rng.standard_normal((3, d_in, d_in))            # any matrices, symmetric or not
    P = rng.standard_normal((3, d_out, d_out))
    assert rel_err(Rf(Q).reshape(3, -1), Q.reshape(3, -1) @ R.T) < 1e-12
    assert rel_err(RTf(P).reshape(3, -1), P.reshape(3, -1) @ R) < 1e-12


def test_conv_kpsvd_family_vs_svd_of_explicit_R(rng):
    for bias in (False, True):
        A, G, Ab, G3, F = layer(rng, 12, 3, 3, bias, T=5)
        di = Ab.shape[2]
        ref, s = svd_terms(rearranged(F, 3, di), 3, di, 2)
        for build in (ml.kpsvd, ml.deflation, ml.lanczos):
            op = build(A, G, 0.1, bias=bias)
            assert factor_error(op.factors, ref, s[0], s) <= 1e-9, build.__name__
        op = ml.deflation(A, G, 0.1, bias=bias, indefinite="clip")
        if not op.clipped:
            M = damped_dense(op, 0.1)
            x = rng.standard_normal(M.shape[0])
            assert rel_err(op @ x, np.linalg.solve(M, x)) <= 1e-12 * np.linalg.cond(M)
        op = ml.deflation(A, G, 0.1, bias=bias)
        M = abs_dense(op, 0.1)
        x = rng.standard_normal(M.shape[0])
        assert rel_err(op @ x, np.linalg.solve(M, x)) <= 1e-12 * np.linalg.cond(M)


def banded_fisher(Ab, G3, r, pos):
    n, T = Ab.shape[:2]
    D = G3.shape[2] * Ab.shape[2]
    F = np.zeros((D, D))
    for gs, as_ in zip(G3, Ab):
        for t in range(T):
            for u in range(T):
                if np.abs(pos[t] - pos[u]).max() <= r:
                    F += np.kron(np.outer(gs[t], gs[u]), np.outer(as_[t], as_[u]))
    return F / n


def test_conv_band_option(rng):
    """band=r: only position pairs at Chebyshev distance <= r (the paper's approximation);
    the factors are the top triples of the explicitly banded R; band >= T-1 is exact."""
    A, G, Ab, G3, F = layer(rng, 10, 3, 3, False, T=6)
    pos = np.array([[i // 3, i % 3] for i in range(6)])          # a 2 x 3 grid of positions
    for r, p in ((0, None), (1, None), (1, pos)):
        Fr = banded_fisher(Ab, G3, r, np.arange(6)[:, None] if p is None else p)
        ref, s = svd_terms(rearranged(Fr, 3, 3), 3, 3, 2)
        op = ml.deflation(A, G, 0.1, band=r, positions=p)
        assert factor_error(op.factors, ref, s[0], s) <= 1e-9
        assert op.info["band"] is not None
    full = ml.kpsvd(A, G, 0.1)
    same = ml.kpsvd(A, G, 0.1, band=5)
    assert rel_err(np.kron(*same.factors[0]), np.kron(*full.factors[0])) < 1e-10


def test_conv_T1_equals_dense_layer(rng):
    A, G, Ab, G3, F = layer(rng, 20, 4, 3, True)
    x = rng.standard_normal(15)
    for build in BUILDERS:
        a = build(A, G, 0.1, bias=True)
        b = build(A[:, None], G[:, None], 0.1, bias=True)
        assert rel_err(b @ x, a @ x) < 1e-12, build.__name__


@given(conv_layers)
def test_conv_fisher_error_vs_dense(lay):
    rng = np.random.default_rng(lay["seed"])
    A, G, Ab, G3, F = layer(rng, lay["n"], lay["d_in"], lay["d_out"], lay["bias"], T=lay["T"])
    for build in BUILDERS:
        op = build(A, G, 0.1, bias=lay["bias"])
        Ft = undamped(op)
        ref = np.linalg.norm(F - Ft) / np.linalg.norm(F)
        size = np.linalg.norm(op.factors[2]) if op.method == "ekfac" else \
            sum(np.linalg.norm(b) * np.linalg.norm(c) for b, c in op.factors)
        floor = 10 * np.sqrt(np.finfo(float).eps) * (1 + size / np.linalg.norm(F))
        assert abs(ml.fisher_error(op, A, G, bias=lay["bias"]) - ref) <= 1e-6 * ref + floor
        sref = spectrum_error(F, Ft)
        got = ml.fisher_error(op, A, G, bias=lay["bias"], kind="spectrum")
        assert abs(got - sref) <= 1e-9 * max(sref, 1e-3)


@pytest.mark.parametrize("signs", ["mixed", "positive", "negative", "zero"])
def test_dense_products_half_flop_forms(signs):
    """The host float64 dense products (trmm for x^T Q x, two syrks for sum c y y^T) equal the
    plain GEMM forms to rounding, for Q of any symmetry and weights of any sign."""
    from mfac_linalg.kronecker.conv import _quad_rows, _weighted_gram
    rng = np.random.default_rng(3)
    X, Y = rng.standard_normal((300, 17)), rng.standard_normal((300, 9))
    Q = rng.standard_normal((17, 17))
    X0, Q0 = X.copy(), Q.copy()
    c_ref = np.einsum("ni,ij,nj->n", X, Q, X)
    assert rel_err(_quad_rows(X, Q), c_ref) < 1e-13
    assert np.array_equal(X, X0) and np.array_equal(Q, Q0)   # the inputs are not overwritten
    c = {"mixed": rng.standard_normal(300), "positive": rng.random(300),
         "negative": -rng.random(300), "zero": np.zeros(300)}[signs]
    ref = (Y * c[:, None]).T @ Y
    out = _weighted_gram(Y, c)
    if signs == "zero":
        assert np.array_equal(out, np.zeros((9, 9)))
    else:
        assert rel_err(out, ref) < 1e-13
    assert np.array_equal(out, out.T)


def test_dense_products_past_the_half_flop_widths():
    """R and R^T of a dense layer wide enough for the trmm / syrk forms against the GEMM
    forms (the same layer below the thresholds)."""
    from mfac_linalg.kronecker import conv
    rng = np.random.default_rng(4)
    A, G = rng.standard_normal((50, 12)), rng.standard_normal((50, 10))
    Q, P = rng.standard_normal((2, 12, 12)), rng.standard_normal((2, 10, 10))
    lay = conv.layer_data(A, G, False)
    ref = lay.r_product(Q), lay.rt_product(P)
    old = conv.TRMM_MIN, conv.SYRK_MIN
    try:
        conv.TRMM_MIN = conv.SYRK_MIN = 1
        assert rel_err(lay.r_product(Q), ref[0]) < 1e-13
        assert rel_err(lay.rt_product(P), ref[1]) < 1e-13
    finally:
        conv.TRMM_MIN, conv.SYRK_MIN = old
