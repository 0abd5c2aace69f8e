"""Issue 12 acceptance: at the default tolerance every factor of every method is within 1e-9 of
the SVD of the explicit R(F); Lanczos and deflation agree; the residual is two-sided; the
ConvergenceWarning fires at maxiter; warm starts help (docs/math.md §8)."""
import warnings
from functools import partial

import numpy as np
import pytest

import mfac_linalg as ml
from mfac_linalg import kronecker as kr

from test_kronecker import factor_error, kfac_factors, layer, rearranged, svd_terms

#: the test layers: (n, d_in, d_out, bias, T, seed); T = None is a dense layer
LAYERS = [(60, 5, 4, False, None, 0), (200, 8, 6, True, None, 1), (1, 3, 2, False, None, 2),
          (2, 3, 3, True, None, 3), (400, 12, 10, True, None, 4), (30, 4, 3, False, 3, 5),
          (20, 3, 4, True, 4, 6)]


def _ids(lay):
    n, d_in, d_out, bias, T, _ = lay
    return f"n{n}-{d_in}x{d_out}{'-b' if bias else ''}{'-T%d' % T if T else ''}"


def _method_terms(A, G, bias):
    """(name, terms, how many leading terms are the target's, info) for every method."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", ml.ConvergenceWarning)
        out = [("kpsvd", ml.kpsvd(A, G, 0.1, bias=bias)),
               ("kpsvd-subspace", ml.kpsvd(A, G, 0.1, bias=bias, solver="subspace")),
               ("deflation", ml.deflation(A, G, 0.1, bias=bias)),
               ("deflation-sequential", ml.deflation(A, G, 0.1, bias=bias, solver="sequential")),
               ("deflation-subspace", ml.deflation(A, G, 0.1, bias=bias, solver="subspace")),
               ("lanczos", ml.lanczos(A, G, 0.1, bias=bias)),
               ("lanczos-K2", ml.lanczos(A, G, 0.1, bias=bias, krylov=2)),
               # thick restarts (3 Ritz pairs kept, 2 new steps a cycle): many cycles
               ("lanczos-K5", ml.lanczos(A, G, 0.1, bias=bias, krylov=5)),
               # the default cycle spans the small layers' sides (formed exactly): K = 8
               # keeps the Lanczos path on them
               ("lanczos-K8", ml.lanczos(A, G, 0.1, bias=bias, krylov=8))]
        rows = [(name, op.factors, op.info) for name, op in out]
        terms, info = kr.kronecker_terms(A, G, 3, bias=bias)
        rows.append(("terms-3", terms, info))
        corr = ml.kfac_corrected(A, G, 0.1, bias=bias)
    return rows, corr


WORST = {}


@pytest.mark.parametrize("lay", LAYERS, ids=_ids)
def test_every_factor_within_1e9_of_the_svd(lay):
    n, d_in, d_out, bias, T, seed = lay
    rng = np.random.default_rng(seed)
    A, G, Ab, G3, F = layer(rng, n, d_in, d_out, bias, T)
    di = Ab.shape[2]
    R = rearranged(F, d_out, di)
    ref, s = svd_terms(R, d_out, di, 3)
    rows, corr = _method_terms(A, G, bias)
    for name, terms, info in rows:
        k = len(terms)
        if k < 3 and len(s) > k and s[k - 1] > 1e-10 * s[0]:
            # a fair case: the target is well separated (else any basis of the cluster is right)
            assert (s[k - 1] - s[k]) / s[0] > 1e-3, (name, s[:4])
        err = factor_error(terms, ref[:k], s[0], s)
        WORST[name] = max(WORST.get(name, 0.0), err)
        assert err <= 1e-9, (name, err, info["residual"])
        assert info["converged"] and info["residual"] <= 1e-12
        assert len(info["residual_left"]) == len(info["residual_right"]) == k
        assert info["residual"] == max(info["residual_left"] + info["residual_right"])
        for Bm, _ in terms:
            assert np.trace(Bm) >= -1e-12 * np.linalg.norm(Bm)          # the sign convention
    # K-FAC corrected: the top triple of R - vec(Gamma) vec(A)^T, explicit
    Gam, Aa = kfac_factors(Ab, G3)
    refc, sc = svd_terms(R - np.outer(Gam.ravel(), Aa.ravel()), d_out, di, 1)
    (Gc, Ac), (B2, C2) = corr.factors
    assert np.allclose(Gc, Gam, rtol=1e-13, atol=1e-15) and np.allclose(Ac, Aa, rtol=1e-13)
    err = factor_error([(B2, C2)], refc, s[0], sc)
    WORST["kfac_corrected"] = max(WORST.get("kfac_corrected", 0.0), err)
    assert err <= 1e-9, err
    assert corr.info["converged"]


def test_report_worst_factor_error():
    """Prints the worst factor error per method over the test layers (run with -s)."""
    if not WORST:
        pytest.skip("run with the layer tests")
    print("\nworst factor error / sqrt(sigma_1) over the test layers:")
    for name, err in sorted(WORST.items()):
        print(f"  {name:22s} {err:.2e}")
    assert max(WORST.values()) <= 1e-9


@pytest.mark.parametrize("lay", LAYERS[:2] + LAYERS[5:6], ids=_ids)
def test_lanczos_and_deflation_give_the_same_sum(lay):
    n, d_in, d_out, bias, T, seed = lay
    rng = np.random.default_rng(seed)
    A, G, Ab, G3, F = layer(rng, n, d_in, d_out, bias, T)
    sums = [sum(np.kron(b, c) for b, c in op.factors) for op in
            (ml.lanczos(A, G, 0.1, bias=bias), ml.deflation(A, G, 0.1, bias=bias),
             ml.deflation(A, G, 0.1, bias=bias, solver="sequential"))]
    nF = np.linalg.norm(F)
    assert np.linalg.norm(sums[0] - sums[1]) <= 1e-9 * nF
    assert np.linalg.norm(sums[0] - sums[2]) <= 1e-9 * nF


def test_residuals_are_the_two_sided_ones(rng):
    """info's residuals equal ||R q - sigma p|| and ||R^T p - sigma q|| of the explicit R."""
    A, G, Ab, G3, F = layer(rng, 80, 5, 4)
    R = rearranged(F, 4, 5)
    op = ml.deflation(A, G, 0.1, tol=1e-6)
    sig = np.array(op.info["sigma"])
    for i, (Bm, Cm) in enumerate(op.factors):
        p, q = Bm.ravel() / np.sqrt(sig[i]), Cm.ravel() / np.sqrt(sig[i])
        left = np.linalg.norm(R @ q - sig[i] * p) / sig[0]
        right = np.linalg.norm(R.T @ p - sig[i] * q) / sig[0]
        assert abs(left - op.info["residual_left"][i]) <= 1e-14 + 1e-6 * left
        assert abs(right - op.info["residual_right"][i]) <= 1e-14 + 1e-6 * right
    assert op.info["residual"] <= 1e-6


def test_lanczos_ends_its_cycle_at_tol():
    """A cycle stops at the first step whose residual (from the bidiagonal) reaches tol: on a
    layer with a clear gap KPSVD needs far fewer than a whole cycle of K = 20 steps (40
    products, plus 2 for the explicit residual), and the explicit residual holds."""
    rng = np.random.default_rng(7)
    a = rng.standard_normal((2000, 16)) * np.linspace(0.2, 2.0, 16) ** 2
    g = rng.standard_normal((2000, 12)) * np.linspace(0.1, 1.5, 12) ** 2
    for tol in (1e-6, 1e-12):
        op = ml.kpsvd(a, g, 1e-3, tol=tol)
        assert op.info["converged"] and op.info["residual"] <= tol
        assert op.info["iterations"] == 1 and op.info["products"] <= 14, op.info["products"]
    loose, tight = (ml.kpsvd(a, g, 1e-3, tol=t).info["products"] for t in (1e-4, 1e-12))
    assert loose < tight
    # subspace iteration reaches the same factors
    sub = ml.kpsvd(a, g, 1e-3, solver="subspace")
    for (B1, C1), (B2, C2) in zip(op.factors, sub.factors):
        assert np.linalg.norm(np.kron(B1, C1) - np.kron(B2, C2)) <= 1e-10 * np.linalg.norm(
            np.kron(B2, C2))


@pytest.mark.parametrize("build", [ml.kpsvd, ml.deflation, ml.lanczos, ml.kfac_corrected],
                         ids=lambda f: f.__name__)
def test_convergence_warning_at_maxiter(build, rng):
    A, G, Ab, G3, F = layer(rng, 300, 12, 9)
    with pytest.warns(ml.ConvergenceWarning, match=r"after 1 iteration \(maxiter=1\)"):
        op = build(A, G, 0.1, maxiter=1, tol=1e-17)   # below rounding: cannot converge
    assert op.info["converged"] is False and op.info["residual"] > 1e-17
    assert op.info["iterations"] == 1
    x = rng.standard_normal(108)
    assert np.all(np.isfinite(op @ x))                     # still a usable operator
    assert issubclass(ml.ConvergenceWarning, RuntimeWarning)


@pytest.mark.parametrize("build", [ml.kpsvd, ml.deflation, ml.lanczos, ml.kfac_corrected],
                         ids=lambda f: f.__name__)
def test_warm_start_from_previous_factors(build, rng):
    """As in training: the previous step's operator starts the next build; a small change of
    the data needs fewer products."""
    A, G, Ab, G3, F = layer(rng, 300, 12, 9)
    cold = build(A, G, 0.1)
    A2 = A + 0.01 * rng.standard_normal(A.shape)
    again = build(A2, G, 0.1)
    warm = build(A2, G, 0.1, init=cold)
    assert warm.info["converged"]
    assert warm.info["products"] < again.info["products"], (warm.info["products"],
                                                            again.info["products"])
    x = rng.standard_normal(108)
    assert np.linalg.norm(warm @ x - again @ x) <= 1e-8 * np.linalg.norm(again @ x)
    # factors as a list of pairs work the same way
    assert build(A2, G, 0.1, init=list(cold.factors)).info["converged"]


def test_lanczos_finds_repeated_singular_values():
    """A singular value repeated among the top k: a Krylov space from one vector holds one
    copy and breaks down; the cycle must not stop there on its (exact, but not top) triples.
    Inputs along the 3 axes and the 4 cube diagonals, orthogonal output gradients: the
    top singular values of R(F) are 0.3132 and 0.2276 three times."""
    A = np.array([np.eye(3)[i] for i in range(3)]
                 + [np.array([1, a, b]) / np.sqrt(3) for a in (1, -1) for b in (1, -1)])
    G = np.eye(7) * np.array([1, 1, 1, 1.3, 1.3, 1.3, 1.3])[:, None]
    F = sum(np.kron(np.outer(g, g), np.outer(a, a)) for a, g in zip(A, G)) / 7
    s = np.linalg.svd(rearranged(F, 7, 3), compute_uv=False)
    assert abs(s[1] - s[3]) < 1e-12 * s[0] and s[3] - s[4] > 0.05    # the case it tests
    terms, info = kr.kronecker_terms(A, G, 3)
    assert info["converged"]
    assert np.allclose(info["sigma"], s[:3], rtol=0, atol=1e-10 * s[0]), (info["sigma"], s[:4])
    for seed in range(3):
        Rop = kr.rearranged.Rearranged(kr.conv.layer_data(A, G, False))
        sig, _, _, inf = kr.rearranged.lanczos_triples(Rop, 3, tol=1e-12, maxiter=50, seed=seed)
        assert np.allclose(np.asarray(sig), s[:3], rtol=0, atol=1e-10 * s[0]), (seed, sig)


# -- found by fuzzing the builders ---------------------------------------------------------

def _sym_sigma(a, g, bias=False):
    """The singular values of R(F) on symmetric matrices, from the explicit R."""
    Ab = np.hstack([a, np.ones((a.shape[0], 1))]) if bias else a
    n, di, do = a.shape[0], Ab.shape[1], g.shape[1]
    F = sum(np.kron(np.outer(gg, gg), np.outer(aa, aa)) for aa, gg in zip(Ab, g)) / n
    return svd_terms(rearranged(F, do, di), do, di, 1)[1]


def test_small_sides_are_formed_exactly():
    """d_out = 2: the default cycle (K capped at 3) spanned the P side, a breakdown hid
    sigma_2 and the builder reported converged on sigma = [1.34, 0.31]; R(F) is now formed
    on the 3 basis matrices of that side."""
    a = np.array([[1., 0, -1, 1], [0, 0, 0, -1], [0, 1, 1, 1]])
    g = np.array([[-1., 0], [-1, 1], [0, -1]])
    s = _sym_sigma(a, g)
    for solver in ("lanczos", "subspace", "sequential"):
        op = ml.deflation(a, g, 1e-3, solver=solver)
        assert op.info["converged"]
        assert np.allclose(op.info["sigma"], s[:2], rtol=1e-12), (solver, op.info["sigma"])
    assert ml.deflation(a, g, 1e-3).info["dense"]


@pytest.mark.parametrize("krylov", [1, 2, 3])
def test_paper_restart_finds_a_repeated_and_a_hidden_triple(krylov):
    """K <= k + 1 (the paper's restart) from the sum of the Ritz vectors stays in its
    invariant subspace: after a breakdown it goes on with thick restarts."""
    a, g = np.diag(np.sqrt([3.0, 3, 1, 1])), np.eye(4)            # sigma = .75, .75, .25, .25
    op = ml.lanczos(a, g, 1e-3, krylov=krylov)
    assert op.info["converged"]
    assert np.allclose(op.info["sigma"], [0.75, 0.75], rtol=1e-12)
    rng = np.random.default_rng(2372)
    n, di, do = rng.integers(2, 30), rng.integers(2, 5), rng.integers(2, 5)
    a, g = rng.standard_normal((n, di)), rng.standard_normal((n, do))
    op = ml.lanczos(a, g, 1e-3, krylov=krylov)
    assert np.allclose(op.info["sigma"], _sym_sigma(a, g)[:2], rtol=1e-10)


@pytest.mark.parametrize("solver", ["lanczos", "subspace", "sequential"])
def test_a_repeated_top_sigma_gives_semidefinite_factors(solver):
    """sigma_1 = sigma_2: any basis of the pair is a top triple; the trace-maximal one is
    taken, so that the first factor is semidefinite and the two-term inverses build."""
    t, u = 0.3, 1.1
    a = 2 * np.array([[np.cos(t), np.sin(t)], [np.sin(t), -np.cos(t)]])
    g = np.array([[np.cos(u), np.sin(u)], [np.sin(u), -np.cos(u)]])
    if solver != "sequential":
        (Bm, Cm), = ml.kpsvd(a, g, 1e-3, solver=solver).factors
        assert np.linalg.eigvalsh(Bm).min() >= -1e-12 and np.linalg.eigvalsh(Cm).min() >= -1e-12
    op = ml.deflation(a, g, 1e-3, solver=solver)
    Bm = op.factors[0][0]
    assert np.linalg.eigvalsh(Bm).min() >= -1e-12 * np.abs(Bm).max()
    F = op.fisher().todense()
    assert np.allclose(F @ op.todense(), np.eye(F.shape[0]), atol=1e-10)


def test_a_warm_start_near_the_second_triple_finds_the_first():
    """From C_2 + 1e-9 C_1 the first step's Ritz triple is sigma_2's to 1e-7: a cycle may
    stop only from step k + 1 on, which brings in C_1 (d_out = 6: 21 > K, Lanczos)."""
    rng = np.random.default_rng(0)
    a, g = rng.standard_normal((300, 8)), rng.standard_normal((300, 6))
    (B1, C1), (B2, C2) = kr.kronecker_terms(a, g, 2)[0]
    s = _sym_sigma(a, g)
    op = ml.kpsvd(a, g, 1e-3, init=C2 + 1e-9 * C1, tol=1e-6)
    assert "dense" not in op.info
    assert op.info["converged"] and abs(op.info["sigma"][0] - s[0]) <= 1e-6 * s[0]


@pytest.mark.parametrize("build", [ml.kpsvd, ml.deflation, ml.lanczos, ml.kfac_corrected,
                                   ml.ekfac, ml.kfac])
def test_extreme_scales_build_or_are_refused_by_name(build):
    """Data scaled by 2^-272 or 1e78: the powers of two the builders divide by (and their
    squares) lie outside the float range; neither a ZeroDivisionError nor an OverflowError,
    no RuntimeWarning; where F's eigenvalues overflow float64 a ValueError names the data."""
    rng = np.random.default_rng(0)
    a, g = rng.standard_normal((30, 4)), rng.standard_normal((30, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tiny = build(a * 1e-82, g * 1e-82, 1e-3)
        assert tiny.info.get("converged", True)
        x = rng.standard_normal(tiny.shape[0])
        assert np.allclose(tiny.matvec(x), x / 1e-3, rtol=1e-12)     # F is below rounding
        try:
            big = build(a * 1e78, g * 1e78, 1e-3)
        except ValueError as exc:
            assert "activations and output_grads are too large" in str(exc)
        else:
            assert big.info.get("converged", True)
            assert np.isfinite(big.matvec(x)).all()


def test_convergence_warnings_point_at_the_caller():
    rng = np.random.default_rng(0)
    a, g = rng.standard_normal((100, 20)), rng.standard_normal((100, 15))
    for build in (partial(ml.kpsvd, solver="subspace"), ml.deflation, ml.lanczos,
                  partial(ml.deflation, solver="sequential")):
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            build(a, g, 1e-2, maxiter=1)
        caught = [x for x in w if issubclass(x.category, ml.ConvergenceWarning)]
        assert caught and all(x.filename == __file__ for x in caught), \
            [(x.filename, x.lineno) for x in caught]


def test_sequential_warm_start_with_reordered_factors():
    """A start vector in the span of the triples already found is replaced by a random one
    (its projection on the complement would be rounding noise)."""
    rng = np.random.default_rng(1)
    # R(F) of rank one (d = 4: formed exactly; d = 7: Lanczos, whose start vectors go
    # through the complement), and a generic 8 x 8 layer (Lanczos)
    for n, d in ((1, 4), (1, 7), (50, 8)):
        a, g = rng.standard_normal((n, d)), rng.standard_normal((n, d))
        op = ml.deflation(a, g, 1e-3, solver="sequential")
        for init in (op.factors[::-1], [op.factors[0]] * 2):
            with warnings.catch_warnings():
                warnings.simplefilter("error", ml.ConvergenceWarning)
                op2 = ml.deflation(a, g, 1e-3, solver="sequential", init=init)
            assert op2.info["converged"]
            assert np.allclose(op2.info["sigma"], op.info["sigma"], rtol=1e-10,
                               atol=1e-12 * op.info["sigma"][0])
            C1, C2 = op2.factors[0][1], op2.factors[1][1]
            assert abs((C1 * C2).sum()) <= 1e-10 * np.linalg.norm(C1) * np.linalg.norm(C2) \
                or np.linalg.norm(C2) <= 1e-8 * np.linalg.norm(C1)


@pytest.mark.parametrize("krylov", [1, 2, 3, 4, 6])
def test_a_repeated_sigma_behind_a_breakdown_is_found(krylov):
    """levels 3, 2, 3, 2, 1 (sigma 3/5 twice): a cycle breaks down holding one copy; its
    triples count only when a whole cycle from a fresh continuation finds the same top-k
    (short cycles go on at the default length): found for every K (before: [3, 2] for
    K <= 4, reported converged)."""
    op = ml.lanczos(np.diag(np.sqrt([3.0, 2, 3, 2, 1])), np.eye(5), 1e-3, krylov=krylov)
    assert op.info["converged"]
    assert np.allclose(np.array(op.info["sigma"]) * 5, [3, 3], rtol=1e-12)
    terms, info = kr.kronecker_terms(np.diag(np.sqrt([3.0, 3, 3, 2, 2, 1])), np.eye(6), 4,
                                     krylov=krylov + 2)
    assert np.allclose(np.array(info["sigma"]) * 6, [3, 3, 3, 2], rtol=1e-12)


def test_nearly_equal_sigmas_are_not_mixed():
    """sigma_1 - sigma_2 = 2.5e-12 sigma_1, above tol / 10: the triples stay as they are
    (rotated together, each would carry a residual of the difference: converged=False)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", ml.ConvergenceWarning)
        op = ml.kpsvd(np.diag([1.0, np.sqrt(1 - 5e-12)]), np.eye(2), 1e-3)
    assert op.info["converged"] and op.info["residual"] <= 1e-15
    Bm = op.factors[0][0]
    assert abs(Bm[1, 1]) <= 1e-6 * abs(Bm[0, 0])            # diag(.707, 0), not I/2


def test_one_small_side_forms_only_its_own_basis():
    """d_out = 2, d_in = 256: R(F) is formed from 3 products with R^T (a basis of the
    large side, 32896 x 256 x 256, would not fit in memory)."""
    rng = np.random.default_rng(0)
    a, g = rng.standard_normal((256, 256)), rng.standard_normal((256, 2))
    op = ml.kpsvd(a, g, 1e-3)
    assert op.info["dense"] and op.info["converged"]
    assert op.info["products"] == 3 + 2                   # the basis, then the residuals
    R3 = np.stack([(g[:, i] * g[:, j] * (a.T * 1.0)) @ a / 256 for i, j in
                   ((0, 0), (0, 1), (1, 1))])           # blocks F_ij = E[g_i g_j a a^T]
    assert op.info["sigma"][0] >= np.linalg.norm(R3[0]) * 0.999


def test_an_indefinite_first_term_under_abs_builds_a_positive_definite_inverse():
    """band=1 on a 3-position layer: F is indefinite, so is B_1, and B_1 + lambda_B I had
    no Cholesky factor (deflation and lanczos refused 125 of 300 such layers): "abs" uses
    |B_1|; the other rules still refuse."""
    built = 0
    for seed in range(40):
        r = np.random.default_rng(seed)
        a, g = r.standard_normal((1, 3, 3)), r.standard_normal((1, 3, 1))
        for build in (ml.deflation, ml.lanczos):
            op = build(a, g, 1e-2, band=1)
            F, Minv = op.fisher().todense(), op.todense()
            assert np.linalg.eigvalsh(F).min() > 0
            assert np.abs(F @ Minv - np.eye(F.shape[0])).max() <= 1e-9
            assert np.linalg.norm(Minv, 2) <= 1 / 1e-2 * (1 + 1e-9)
            built += any(op.info["first_term_absolute"])
    assert built >= 10
    r = np.random.default_rng(9)                  # C_1 + lambda_C I is indefinite here
    a, g = r.standard_normal((1, 3, 3)), r.standard_normal((1, 3, 1))
    assert ml.deflation(a, g, 1e-2, band=1).info["first_term_absolute"] == (False, True)
    for rule in ("clip", "raise"):
        with pytest.raises(ValueError, match="not positive definite"):
            ml.deflation(a, g, 1e-2, band=1, indefinite=rule)


def test_ragged_positions_and_huge_activations_are_refused_by_name():
    rng = np.random.default_rng(0)
    a, g = rng.standard_normal((4, 5, 3)), rng.standard_normal((4, 5, 2))
    with pytest.raises(ValueError, match="positions must be an integer array"):
        ml.kpsvd(a, g, 1e-2, band=1, positions=[[0], [1, 2], [3], [4], [5]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")               # no NumPy overflow warning first
        for build in (ml.kfac, ml.ekfac):
            with pytest.raises(ValueError, match="activations is too large"):
                build(a * 1e160, g, 1e-2)
        for build in (ml.kpsvd, ml.deflation, ml.lanczos):       # F itself overflows
            with pytest.raises(ValueError,
                               match="activations and output_grads are too large"):
                build(a * 1e160, g, 1e-2)
