"""Fuzz round six: mfac_linalg.testing (oracles, strategies, check_operator) and the
sliding window's checkpoints.  Each test below the first section is the regression test
of a defect the round found (it fails on the code before the round)."""
import copy
import math
import os
import pickle

import mpmath
import numpy as np
import pytest
from hypothesis import given, settings

import mfac_linalg as ml
from mfac_linalg import testing as mt

EPS = np.finfo(np.float64).eps


def _mp_solve(A, X, prec=800):
    """A⁻¹ X for float64 A and X, columns solved in mpmath at ``prec`` bits, rounded."""
    with mpmath.workprec(prec):
        Am = mpmath.matrix(A.tolist())
        cols = [mpmath.lu_solve(Am, mpmath.matrix(X[:, c].tolist())) for c in range(X.shape[1])]
        return np.array([[float(v) for v in col] for col in cols]).T


def _mp_fisher(G, lam, prec=800):
    """F = λI + GᵀG/m exactly (mpmath at ``prec`` bits: every sum of these sizes exact)."""
    m, d = G.shape
    with mpmath.workprec(prec):
        Gm = mpmath.matrix(G.tolist())
        return mpmath.matrix([[mpmath.fsum(Gm[k, i] * Gm[k, j] for k in range(m)) / m
                               + (lam if i == j else 0) for j in range(d)] for i in range(d)])


# -- refined_solve: every column exact on its own scale ---------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_inverse_fisher_oracle_is_exact_per_column_next_to_a_larger_column(seed):
    # the refinement stopped when the largest correction was below 2^-60 of the largest
    # column: the column of F's top eigenvector (the check's hardest direction, whose
    # solution is kappa times smaller than a random column's) was off by up to 1e-4
    rng = np.random.default_rng(seed)
    m, d = 2, 5
    G = rng.standard_normal((m, d))
    lam = 3e-15 * np.linalg.norm(G, 2) ** 2 / m
    F64 = lam * np.eye(d) + G.T @ G / m
    X = np.column_stack([rng.standard_normal(d), np.linalg.eigh(F64)[1][:, -1]])
    Y = mt.inverse_fisher_oracle(G, lam).matmat(X)
    with mpmath.workprec(800):
        F = _mp_fisher(G, lam)
        ref = np.array([[float(v) for v in mpmath.lu_solve(F, mpmath.matrix(X[:, c].tolist()))]
                        for c in range(2)]).T
    err = np.linalg.norm(Y - ref, axis=0) / np.linalg.norm(ref, axis=0)
    assert np.linalg.norm(ref[:, 1]) < 1e-10 * np.linalg.norm(ref[:, 0])   # the premise
    assert err.max() <= EPS, err


def test_refined_solve_columns_of_different_scales_and_shapes():
    A = np.array([[1.0, 1.0], [1.0, 1.0 + 2.0 ** -40]])          # cond ~ 4e12
    X = np.array([[1.0, 1.0], [0.0, 1.0 + 2.0 ** -41]])            # second: A⁻¹x small
    solve = lambda R: np.linalg.solve(A, R)                        # noqa: E731
    Y = mt.refined_solve(lambda Y: A @ Y, solve, X)
    ref = _mp_solve(A, X)
    err = np.linalg.norm(Y - ref, axis=0) / np.linalg.norm(ref, axis=0)
    assert err.max() <= EPS, err
    assert mt.refined_solve(lambda Y: A @ Y, solve, X[:, 0]).shape == (2,)
    assert mt.refined_solve(lambda Y: A @ Y, solve, np.zeros((2, 0))).shape == (2, 0)


# -- kronecker_oracle: non-symmetric and singular matrices ------------------------------------

def _nonsym_factors():
    rng = np.random.default_rng(0)
    return (rng.standard_normal((2, 2)) + 3 * np.eye(2),
            rng.standard_normal((3, 3)) + 3 * np.eye(3))


def test_kronecker_oracle_of_non_symmetric_factors():
    # the oracle called M symmetric, took cond of its symmetric part for kappa, a Cholesky
    # of its lower triangle for logdet (8.85 for log det M = 10.89) and for the inverse's
    # corrections (ArithmeticError for a matrix of condition number 4)
    P, Q = _nonsym_factors()
    M = np.kron(P, Q) + 0.5 * np.eye(6)
    o = mt.kronecker_oracle([(P, Q)], shift=0.5)
    assert not o.symmetric and not o.fisher.symmetric and not o.positive_definite
    assert o.kappa == pytest.approx(np.linalg.cond(M), rel=1e-12)
    assert o.logdet is None
    X = np.random.default_rng(1).standard_normal((6, 2))
    ref = _mp_solve(M, X)
    assert np.linalg.norm(o.matmat(X) - ref) <= 2 * EPS * np.linalg.norm(ref)

    class Solve:                          # a correct operator of M⁻¹, and a wrong transpose
        shape, dtype = (6, 6), np.dtype(np.float64)

        def matvec(self, x):
            return np.linalg.solve(M, x)

        def rmatvec(self, x):
            return np.linalg.solve(M.T, x)

    class WrongTranspose(Solve):
        def rmatvec(self, x):
            return np.linalg.solve(M, x)

    rep = mt.check_operator(Solve(), o, skip=("pickle",))
    assert "rmatvec" in rep.ratios and not rep.failures
    with pytest.raises(mt.OperatorCheckError, match="rmatvec: error"):
        mt.check_operator(WrongTranspose(), o, skip=("pickle",))


def test_kronecker_oracle_keeps_symmetric_factors_rounded_by_floating_point():
    # a symmetric factor computed as U |s| U^T is symmetric only to rounding: still a
    # symmetric positive definite M, with its log-determinant
    rng = np.random.default_rng(2)
    U, _ = np.linalg.qr(rng.standard_normal((3, 3)))
    P = (U * np.array([1.0, 2.0, 3.0])) @ U.T
    Q = np.diag([1.0, 4.0])
    o = mt.kronecker_oracle([(P, Q)], shift=0.25)
    assert o.symmetric and o.positive_definite
    Ps = (P + P.T) / 2
    assert o.logdet == pytest.approx(np.linalg.slogdet(np.kron(Ps, Q) + 0.25 * np.eye(6))[1],
                                     rel=1e-14)


def test_kronecker_oracle_of_a_singular_forward_matrix():
    # inverse=False of a singular M: log(0) in logdet_scale, a RuntimeWarning and then
    # "logdet_scale must be finite"
    o = mt.kronecker_oracle([(np.eye(2), np.diag([1.0, 0.0]))], inverse=False)
    assert o.kappa == math.inf and o.logdet is None and o.logdet_scale == 4.0
    assert np.array_equal(o.matmat(np.ones(4)), [1.0, 0.0, 1.0, 0.0])


# -- exact positive definiteness --------------------------------------------------------------

def test_from_dense_of_a_matrix_positive_definite_only_in_float64():
    # eigvalsh said > 0, mpmath's Cholesky of the exact matrix refused it: from_dense raised
    # mpmath's "matrix is not positive-definite" instead of building the oracle
    rng = np.random.default_rng(0)
    found = 0
    for _ in range(200):
        Q, _ = np.linalg.qr(rng.standard_normal((3, 3)))
        A = (Q * np.array([-1e-17, 1.0, 2.0])) @ Q.T
        A = (A + A.T) / 2
        with mpmath.workprec(600):
            det = mpmath.det(mpmath.matrix(A.tolist()))
        if not (np.linalg.eigvalsh(A)[0] > 0 and det <= 0):
            continue
        found += 1
        o = mt.Oracle.from_dense(A)
        assert o.logdet is None and not o.positive_definite and o.symmetric
        assert np.array_equal(o.matmat(np.eye(3)[:, 0]), A[:, 0])
    assert found >= 3


def test_fisher_oracle_without_damping_of_an_exactly_rank_deficient_g():
    # the float64 SVD of a G with equal columns gives a tiny non-zero singular value:
    # kappa was finite and the exact Cholesky raised "matrix is not positive-definite"
    G = np.array([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
    o = mt.fisher_oracle(G, 0.0)
    assert o.kappa == math.inf and o.logdet is None and not o.positive_definite
    assert np.array_equal(o.matmat(np.array([1.0, -1.0])), [0.0, 0.0])
    assert mt.fisher_oracle(G, 0.5).logdet == pytest.approx(
        math.log(0.5 * (0.5 + 2 * 14 / 3)), rel=1e-15)


def test_inverse_fisher_oracle_of_a_numerically_singular_f_is_an_arithmetic_error():
    # numpy's LinAlgError "2-th leading minor of the array is not positive definite"
    with pytest.raises(ArithmeticError, match="F is singular to float64 precision"):
        mt.inverse_fisher_oracle(np.array([[1.0, 2.0], [1.0, 2.0]]), 1e-20)


# -- check_operator: complex results and reused output buffers --------------------------------

_A = np.array([[4.0, 1.0, 0.0], [1.0, 3.0, 0.5], [0.0, 0.5, 2.0]])


class _Plain:
    shape, dtype = (3, 3), np.dtype(np.float64)

    def matvec(self, x):
        return _A @ x

    def matmat(self, X):
        return _A @ X


class _Complex(_Plain):
    def matvec(self, x):
        return _A @ x + 1j * x            # the imaginary part was dropped by the float cast

    def matmat(self, X):
        return _A @ X + 1j * X


class _RealComplex(_Plain):
    def matvec(self, x):
        return (_A @ x).astype(complex)   # complex dtype, real values: right


class _SharedBuffer(_Plain):
    def matvec(self, x):
        if not hasattr(self, "_out") or self._out.shape != x.shape:
            self._out = np.empty(x.shape)
        np.matmul(_A, x, out=self._out)
        return self._out


class _no_warning:
    """Warnings as errors inside (a ComplexWarning of the old cast fails the test)."""

    def __enter__(self):
        import warnings
        self._cm = warnings.catch_warnings()
        self._cm.__enter__()
        warnings.simplefilter("error")

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)


def test_check_operator_fails_complex_results():
    with _no_warning():
        with pytest.raises(mt.OperatorCheckError, match="matvec: raised TypeError: a real "
                                                        "result was expected") as info:
            mt.check_operator(_Complex(), _A, skip=("pickle",))
    assert any(f.startswith("matmat: raised TypeError") for f in info.value.report.failures)
    rep = mt.check_operator(_RealComplex(), _A, skip=("pickle",))
    assert rep.ratios["matvec"] < 1


def test_check_operator_fails_a_matvec_that_reuses_its_output_buffer():
    with pytest.raises(mt.OperatorCheckError, match="matvec.fresh: the result of matvec"):
        mt.check_operator(_SharedBuffer(), _A, skip=("pickle",))
    rep = mt.check_operator(_Plain(), _A, skip=("pickle",))
    assert "matvec.fresh" in rep.ratios and not rep.failures


def test_library_operators_pass_with_the_new_checks():
    rng = np.random.default_rng(5)
    G = rng.standard_normal((3, 6))
    op = ml.StaticInverseFisher(G, 0.1)
    o = mt.inverse_fisher_oracle(G, 0.1)
    rep = mt.check_operator(op, o)
    assert "matvec.fresh" in rep.ratios and rep.worst[1] < 1
    w = ml.SlidingWindowInverseFisher(6, 2, 0.1, dtype="float64")
    w.update(G)
    rep = mt.check_operator(w, mt.inverse_fisher_oracle(G[1:], 0.1, N=2))
    assert "matvec.fresh" in rep.ratios and rep.worst[1] < 1
    rep = mt.check_operator(op.to_scipy(), o, skip=("pickle",))
    assert "matvec.fresh" in rep.ratios


# -- strategies ------------------------------------------------------------------------------

@pytest.mark.parametrize("r", [0.3, 5.0])
def test_fisher_problems_keeps_the_ratio_inside_its_bounds(r):
    # 10 ** log10(5.0) = 5.000000000000001 and 10 ** log10(0.3) = 0.29999999999999993:
    # a damping ratio drawn at a bound fell outside it
    seen = []

    @settings(max_examples=10, deadline=None, database=None)
    @given(mt.fisher_problems(max_m=4, max_d=4, ratio=(r, r)))
    def t(problem):
        G, lam = problem
        top = float(np.linalg.norm(G.astype(np.float64), 2) ** 2 / G.shape[0])
        seen.append(lam)
        assert lam == r * (top if top > 0 else 1.0)

    t()
    assert seen


@settings(max_examples=25, deadline=None, database=None)
@given(mt.fisher_problems(max_m=5, max_d=5, ratio=(1e-3, 2.0), dtype=np.float32,
                          kinds=("scaled", "zero_rows", "single")))
def test_fisher_problems_draws_what_it_promises(problem):
    G, lam = problem
    assert G.dtype == np.float32 and G.ndim == 2 and 1 <= G.shape[1] <= 5
    assert 1 <= G.shape[0] <= 5 and isinstance(lam, float) and lam > 0
    top = float(np.linalg.norm(G.astype(np.float64), 2) ** 2 / G.shape[0])
    if top > 0:
        assert 1e-3 * (1 - 4 * EPS) <= lam / top <= 2.0 * (1 + 4 * EPS)


# -- sliding-window checkpoints: round trips through a window's life --------------------------

S = ml.SlidingWindowInverseFisher


def _drive(w, rng, steps, d, m):
    """Random updates, steps, batches, failed updates, refreshes; returns what each did."""
    out = []
    for _ in range(steps):
        k = int(rng.integers(8))
        g = rng.standard_normal(d) * 10 ** rng.uniform(-2, 2)
        try:
            if k < 3:
                w.update(g)
                out.append("u")
            elif k < 5:
                out.append(w.step(g))
            elif k == 5:
                w.update(rng.standard_normal((int(rng.integers(1, 2 * m + 2)), d)))
                out.append("b")
            elif k == 6:
                g[int(rng.integers(d))] = [np.nan, np.inf, 1e200][int(rng.integers(3))]
                w.update(g)                                  # refused, nothing changes
                out.append("accepted a bad gradient")
            else:
                w.refresh()
                out.append("r")
        except ValueError as exc:
            out.append(str(exc)[:20])
    return out


def _state_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert (np.array_equal(sa[k], sb[k]) if isinstance(sa[k], np.ndarray)
                else sa[k] == sb[k]), k


@pytest.mark.parametrize("seed", range(12))
def test_checkpoint_round_trips_continue_bit_for_bit(seed, tmp_path):
    rng = np.random.default_rng(100 + seed)
    d, m = int(rng.integers(1, 7)), int(rng.integers(1, 5))
    dtype = ["float32", "float64"][seed % 2]
    acc = ["auto", "float64", "float32" if dtype == "float32" else "auto"][seed % 3]
    kw = dict(dtype=dtype, accumulate=acc, normalize=["window", "count"][(seed // 2) % 2],
              engine=["cholesky", "explicit", "auto"][seed % 3],
              refresh_every=[None, 1, 3][(seed // 3) % 3])
    w = S(d, m, float(10 ** rng.uniform(-2, 0)), **kw)
    _drive(w, rng, int(rng.integers(0, 4 * m + 2)), d, m)   # empty .. wrapped around
    w.save(tmp_path / "w")
    copies = [S.load(tmp_path / "w", accumulate=acc),
              S(d, m, 1.0, **kw).load_state_dict(w.state_dict()),
              copy.deepcopy(w), pickle.loads(pickle.dumps(w))]
    for c in copies:
        _state_equal(w, c)
        assert (c.engine, c.accumulate) == (w.engine, w.accumulate)
    seq = np.random.default_rng(seed).integers(2 ** 32)
    x = rng.standard_normal(d)
    ref = _drive(w, np.random.default_rng(seq), 3 * m, d, m)
    for c in copies:
        got = _drive(c, np.random.default_rng(seq), 3 * m, d, m)
        assert len(got) == len(ref)
        for a, b in zip(got, ref):
            assert np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b
        _state_equal(w, c)
        assert np.array_equal(c.matvec(x), w.matvec(x)) and c.logdet() == w.logdet()
