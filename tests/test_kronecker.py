"""The Kronecker family against dense oracles (small layers)."""
import warnings

import numpy as np
import pytest
from hypothesis import given, strategies as st

import mfac_linalg as ml
from mfac_linalg import kronecker as kr

from battery import check_operator
from oracles import cond, float64_tol, rel_err


def layer(rng, n, d_in, d_out, bias=False):
    A = rng.standard_normal((n, d_in)) * rng.uniform(0.3, 2.0, d_in)
    G = rng.standard_normal((n, d_out)) * rng.uniform(0.3, 2.0, d_out)
    Ab = np.c_[A, np.ones(n)] if bias else A
    F = sum(np.kron(np.outer(g, g), np.outer(a, a)) for g, a in zip(G, Ab)) / n
    return A, G, Ab, F


def rearranged(F, d_out, d_in):
    R = np.zeros((d_out * d_out, d_in * d_in))
    for i in range(d_out):
        for j in range(d_out):
            R[i * d_out + j] = F[i * d_in:(i + 1) * d_in, j * d_in:(j + 1) * d_in].ravel()
    return R


def undamped(op):
    if op.method == "ekfac":
        UG, UA, S = op.factors
        U = np.kron(UG, UA)
        return U @ np.diag(S.ravel()) @ U.T
    return sum(np.kron(b, c) for b, c in op.factors)


BUILDERS = [ml.kfac, ml.ekfac, ml.kpsvd, ml.deflation, ml.kfac_corrected]

layers = st.fixed_dictionaries({
    "n": st.integers(1, 40), "d_in": st.integers(1, 5), "d_out": st.integers(1, 4),
    "bias": st.booleans(), "seed": st.integers(0, 2**31)})


@given(layers, st.sampled_from([1e-3, 1e-1, 1.0]))
def test_inverses_match_dense_solves(lay, lam):
    rng = np.random.default_rng(lay["seed"])
    A, G, Ab, F = layer(rng, lay["n"], lay["d_in"], lay["d_out"], lay["bias"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for build in BUILDERS:
            op = build(A, G, lam, bias=lay["bias"])
            M = op.fisher().todense()
            # the damped approximation is the documented one
            if build is ml.kfac:
                Gam, Aa = G.T @ G / len(G), Ab.T @ Ab / len(G)
                pi = np.sqrt((np.trace(Aa) / Aa.shape[0]) / (np.trace(Gam) / Gam.shape[0]))
                ref = np.kron(Gam + np.sqrt(lam) / pi * np.eye(len(Gam)),
                              Aa + pi * np.sqrt(lam) * np.eye(len(Aa)))
                assert rel_err(M, ref) < 1e-10
            if op.clipped:
                continue     # clipped spectra: M is the clipped matrix, checked below
            check_operator(op, np.linalg.inv(M), float64_tol(cond(M)), rng,
                           logdet=np.linalg.slogdet(M)[1])


def test_kfac_exact_damping_vs_kron(rng):
    A, G, Ab, F = layer(rng, 30, 4, 3)
    lam = 0.05
    op = ml.kfac(A, G, lam, damping_mode="exact")
    Gam, Aa = G.T @ G / 30, A.T @ A / 30
    M = np.kron(Gam, Aa) + lam * np.eye(12)
    x = rng.standard_normal(12)
    assert rel_err(op @ x, np.linalg.solve(M, x)) < 1e-12
    V = x.reshape(3, 4)                       # (d_out, d_in) matrices go in and come out
    Y = op.matvec(V)
    assert Y.shape == (3, 4) and rel_err(Y.ravel(), np.linalg.solve(M, x)) < 1e-12
    assert rel_err(op.todense(), np.linalg.inv(M)) < 1e-12


def test_one_sample_kfac_is_exact(rng):
    A, G, Ab, F = layer(rng, 1, 3, 2)
    op = ml.kfac(A, G, 0.1)
    assert rel_err(np.kron(*op.factors[0]), F) < 1e-14
    assert ml.fisher_error(op, A, G) < 1e-7


def test_ekfac_scaling_and_error_below_kfac(rng):
    for bias in (False, True):
        A, G, Ab, F = layer(rng, 25, 4, 3, bias)
        op = ml.ekfac(A, G, 0.1, bias=bias)
        UG, UA, S = op.factors
        Q = np.kron(UG, UA)
        assert rel_err(S.ravel(), np.diag(Q.T @ F @ Q)) < 1e-12     # S* = diag(Q^T F Q)
        assert ml.fisher_error(op, A, G, bias=bias) <= \
            ml.fisher_error(ml.kfac(A, G, 0.1, bias=bias), A, G, bias=bias) + 1e-12


@given(layers)
def test_kpsvd_singular_values_and_optimality(lay):
    rng = np.random.default_rng(lay["seed"])
    A, G, Ab, F = layer(rng, lay["n"], lay["d_in"], lay["d_out"], lay["bias"])
    d_in, d_out = Ab.shape[1], G.shape[1]
    s = np.linalg.svd(rearranged(F, d_out, d_in), compute_uv=False)
    # the algorithm, converged tightly: the oracle's singular value to 1e-9
    op = ml.kpsvd(A, G, 0.1, bias=lay["bias"], tol=1e-14, maxiter=20000)
    assert op.info["converged"]
    assert abs(op.info["sigma"][0] - s[0]) <= 1e-9 * s[0]
    # the default tolerance (1e-8 on the change of sigma) is close to it
    assert abs(ml.kpsvd(A, G, 0.1, bias=lay["bias"]).info["sigma"][0] - s[0]) <= 1e-6 * s[0]
    (Bm, Cm), = op.factors
    # ||F - B kron C||^2 = sum_{k>=2} sigma_k^2
    err2 = np.linalg.norm(F - np.kron(Bm, Cm)) ** 2
    assert abs(err2 - (s[1:] ** 2).sum()) <= 1e-8 * (s ** 2).sum()
    # symmetric PSD factors with tr(B) > 0
    for X in (Bm, Cm):
        assert np.allclose(X, X.T, atol=1e-12 * np.abs(X).max())
        assert np.linalg.eigvalsh(X).min() >= -1e-9 * np.abs(X).max()
    assert np.trace(Bm) > 0
    if min(d_in, d_out) >= 2 and lay["n"] >= 2:
        dop = ml.deflation(A, G, 0.1, bias=lay["bias"], tol=1e-14, maxiter=20000)
        assert abs(dop.info["sigma"][1] - s[1]) <= 1e-7 * s[0]


@given(layers)
def test_error_orderings(lay):
    rng = np.random.default_rng(lay["seed"])
    A, G, Ab, F = layer(rng, lay["n"], lay["d_in"], lay["d_out"], lay["bias"])
    b = lay["bias"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        e = {f.__name__: ml.fisher_error(f(A, G, 0.1, bias=b), A, G, bias=b) for f in BUILDERS}
    tol = 1e-7
    assert e["deflation"] <= e["kpsvd"] + tol
    assert e["kpsvd"] <= e["kfac"] + tol
    assert e["kfac_corrected"] <= e["kfac"] + tol
    assert e["ekfac"] <= e["kfac"] + tol


@given(layers)
def test_fisher_error_matches_dense(lay):
    rng = np.random.default_rng(lay["seed"])
    A, G, Ab, F = layer(rng, lay["n"], lay["d_in"], lay["d_out"], lay["bias"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for build in BUILDERS:
            op = build(A, G, 0.1, bias=lay["bias"])
            ref = np.linalg.norm(F - undamped(op)) / np.linalg.norm(F)
            # the Gram formula subtracts squares: its absolute floor is about
            # sqrt(eps) (||F|| + sum_i ||B_i|| ||C_i||) / ||F|| (documented)
            if op.method == "ekfac":
                size = np.linalg.norm(op.factors[2])
            else:
                size = sum(np.linalg.norm(b) * np.linalg.norm(c) for b, c in op.factors)
            floor = 10 * np.sqrt(np.finfo(float).eps) * (1 + size / np.linalg.norm(F))
            assert abs(ml.fisher_error(op, A, G, bias=lay["bias"]) - ref) <= 1e-6 * ref + floor


def test_two_term_inverse_vs_dense(rng):
    A, G, Ab, F = layer(rng, 30, 4, 3)
    for build in (ml.deflation, ml.kfac_corrected):
        op = build(A, G, 0.2)
        (B1, C1), (B2, C2) = op.factors
        pi = np.sqrt((np.trace(C1) / 4) / (np.trace(B1) / 3))
        M = np.kron(B1 + np.sqrt(0.2) / pi * np.eye(3), C1 + pi * np.sqrt(0.2) * np.eye(4)) \
            + np.kron(B2, C2)
        assert rel_err(op.fisher().todense(), M) < 1e-10
        x = rng.standard_normal(12)
        assert rel_err(op @ x, np.linalg.solve(M, x)) < 1e-9
        assert abs(op.logdet() - np.linalg.slogdet(M)[1]) < 1e-9 * abs(np.linalg.slogdet(M)[1])


def test_indefinite_second_term_is_detected(rng):
    """A second term that makes M indefinite: 'raise' refuses, 'clip' floors and reports."""
    A, G, Ab, F = layer(rng, 30, 3, 3)
    Gam, Aa = G.T @ G / 30, A.T @ A / 30
    big = -10 * np.eye(3)
    with pytest.raises(ValueError, match="not positive definite"):
        kr._two_term_inverse("test", Gam, Aa, big, np.eye(3), 0.01, ml._backend.CPU, {},
                             "raise", [(Gam, Aa), (big, np.eye(3))])
    with pytest.warns(RuntimeWarning, match="raised to it"):
        op = kr._two_term_inverse("test", Gam, Aa, big, np.eye(3), 0.01, ml._backend.CPU, {},
                                  "clip", [(Gam, Aa), (big, np.eye(3))])
    assert op.clipped > 0
    assert np.all(np.isfinite(op.todense()))
    assert np.linalg.eigvalsh(op.todense()).min() > 0


def test_warm_start_converges_faster(rng):
    A, G, Ab, F = layer(rng, 200, 20, 12)
    cold = ml.kpsvd(A, G, 0.1, tol=1e-12)
    warm = ml.kpsvd(A + 0.01 * rng.standard_normal(A.shape), G, 0.1, tol=1e-12,
                    init=cold.factors[0][1])
    assert warm.info["converged"] and warm.info["iterations"] <= cold.info["iterations"]


def test_block_diag_composition(rng):
    A1, G1, _, _ = layer(rng, 20, 3, 2)
    A2, G2, _, _ = layer(rng, 20, 2, 4)
    ops = [ml.kfac(A1, G1, 0.1), ml.ekfac(A2, G2, 0.1)]
    bd = ml.block_diag(ops)
    D = np.zeros((14, 14))
    D[:6, :6] = ops[0].todense()
    D[6:, 6:] = ops[1].todense()
    check_operator(bd, D, 1e-10, rng, logdet=ops[0].logdet() + ops[1].logdet())
    Fd = np.zeros((14, 14))
    Fd[:6, :6] = ops[0].fisher().todense()
    Fd[6:, 6:] = ops[1].fisher().todense()
    assert rel_err(bd.fisher().todense(), Fd) < 1e-12


def test_kronecker_bad_input(rng):
    A, G = rng.standard_normal((5, 3)), rng.standard_normal((6, 2))
    with pytest.raises(ValueError, match="same number of samples; got 5 and 6"):
        ml.kfac(A, G, 0.1)
    with pytest.raises(ValueError, match="damping_mode must be 'pi' or 'exact'"):
        ml.kfac(A, G[:5], 0.1, damping_mode="tikhonov")
    with pytest.raises(ValueError, match="activations must be 2-D"):
        ml.kfac(np.ones(5), G[:5], 0.1)
    with pytest.raises(ValueError, match="output_grads must be finite"):
        ml.ekfac(A, np.full((5, 2), np.nan), 0.1)
    with pytest.raises(ValueError, match="indefinite must be 'clip' or 'raise'"):
        ml.deflation(A, G[:5], 0.1, indefinite="ignore")
    op = ml.kfac(A, G[:5], 0.1)
    with pytest.raises(ValueError, match=r"approx is for a \(2, 3\) layer; the data give \(2, 4\)"):
        ml.fisher_error(op, A, G[:5], bias=True)
    with pytest.raises(TypeError, match="approx must be an operator from kfac"):
        ml.fisher_error(ml.StaticInverseFisher(np.ones((2, 6)), 1.0), A, G[:5])


@pytest.mark.parametrize("build", BUILDERS, ids=lambda f: f.__name__)
def test_kronecker_on_backend(backend, build, rng):
    A, G, Ab, F = layer(rng, 40, 5, 4, True)
    xp = backend.xp
    op = build(xp.asarray(A), xp.asarray(G), 0.1, bias=True)
    ref = build(A, G, 0.1, bias=True)
    assert op.device == repr(backend)
    x = rng.standard_normal(24)       # d_out (d_in + 1) with the bias column
    assert rel_err(op.matvec(xp.asarray(x)), ref @ x) < 1e-8
    assert abs(ml.fisher_error(op, xp.asarray(A), xp.asarray(G), bias=True)
               - ml.fisher_error(ref, A, G, bias=True)) < 1e-8
    M = ref.fisher().todense()
    check_operator(op, np.linalg.inv(M), float64_tol(cond(M)), rng, logdet=np.linalg.slogdet(M)[1])
