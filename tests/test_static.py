"""StaticInverseFisher against dense float64 oracles (scipy.linalg)."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

import mfac_linalg as ml

from battery import check_operator
from oracles import (EPS32, EPS64, cond, damping_for, dense_fisher, dense_inverse, float32_tol,
                     float64_tol, gradients, rel_err)

KINDS = ["normal", "duplicate", "zero", "lowrank", "spread"]

instances = st.fixed_dictionaries({
    "m": st.integers(1, 40),
    "d": st.integers(1, 40),
    "kind": st.sampled_from(KINDS),
    "log_ratio": st.floats(-8, 2),
    "log_scale": st.floats(-3, 3),
    "seed": st.integers(0, 2**32 - 1),
})


def build(inst, dtype=np.float64):
    rng = np.random.default_rng(inst["seed"])
    G = gradients(rng, inst["m"], inst["d"], inst["kind"], 10.0 ** inst["log_scale"])
    lam = damping_for(G, 10.0 ** inst["log_ratio"])
    return G, lam, rng


@given(instances)
def test_static_matches_dense_oracle_float64(inst):
    G, lam, rng = build(inst)
    F = dense_fisher(G, lam)
    tol = float64_tol(cond(F))
    op = ml.StaticInverseFisher(G, lam)
    check_operator(op, dense_inverse(F), tol, rng, logdet=np.linalg.slogdet(F)[1],
                   forward=F, forward_tol=forward_tol(F))


@given(instances)
def test_static_float32_against_float64_reference(inst):
    G, lam, rng = build(inst)
    F = dense_fisher(G, lam)
    Fi = dense_inverse(F)
    kappa = cond(F)
    op = ml.StaticInverseFisher(G.astype(np.float32), lam)
    assert op.dtype == np.float32
    x = rng.standard_normal(inst["d"]).astype(np.float32)
    ref = Fi @ x.astype(np.float64)
    err = rel_err(op.matvec(x), ref)
    assert err <= float32_tol(kappa, inst["m"]), (err, kappa)
    # and the operator is a float32 operator, not a float64 one in disguise
    assert all(V.dtype == np.float32 for _, _, _, V in op.lowrank_batches())
    assert rel_err(op.diagonal(), np.diag(Fi)) <= float32_tol(kappa, inst["m"])


@pytest.mark.parametrize("m,d", [(1, 1), (1, 30), (30, 1), (50, 7), (7, 50), (64, 64)])
def test_static_shapes_on_backend(backend, m, d, rng):
    G = rng.standard_normal((m, d))
    lam = 0.1
    F = dense_fisher(G, lam)
    op = ml.StaticInverseFisher(backend.xp.asarray(G), lam)
    assert op.device == repr(backend)
    check_operator(op, dense_inverse(F), float64_tol(cond(F)), rng,
                   logdet=np.linalg.slogdet(F)[1], forward=F, forward_tol=1e-12)


def test_float64_accuracy_at_moderate_conditioning(rng):
    # the acceptance figure: 1e-10 relative for well-posed damping, m > d included
    for m, d in [(20, 200), (200, 20), (64, 64)]:
        G = rng.standard_normal((m, d))
        lam = damping_for(G, 1e-3)
        F = dense_fisher(G, lam)
        op = ml.StaticInverseFisher(G, lam)
        X = rng.standard_normal((d, 4))
        assert rel_err(op.matmat(X), np.linalg.solve(F, X)) < 1e-10
        assert rel_err(op.diagonal(), np.diag(np.linalg.inv(F))) < 1e-10


def test_grads_not_modified_and_not_referenced(rng):
    G = rng.standard_normal((8, 20)).astype(np.float32)
    G0 = G.copy()
    op = ml.StaticInverseFisher(G, 0.5)
    assert np.array_equal(G, G0)
    assert not np.shares_memory(op._lr.V, G)
    y0 = op.matvec(np.ones(20, np.float32))
    G[:] = 7.0  # mutating the caller's array afterwards changes nothing
    assert np.array_equal(op.matvec(np.ones(20, np.float32)), y0)


def test_integer_grads_promoted_to_float64():
    G = np.arange(12).reshape(3, 4)
    op = ml.StaticInverseFisher(G, 1)
    assert op.dtype == np.float64
    F = dense_fisher(G.astype(float), 1.0)
    assert rel_err(op.todense(), np.linalg.inv(F)) < 1e-12


def test_float32_tiny_damping_falls_back_to_float64_gram(rng):
    # m > d: G G^T is singular; in float32 its computed eigenvalues go negative,
    # far below m * damping, so the float32 Gram cannot be factored
    G = (rng.standard_normal((60, 5)) * 100).astype(np.float32)
    lam = 1e-9
    op = ml.StaticInverseFisher(G, lam)
    F = dense_fisher(G, lam)
    x = rng.standard_normal(5)
    err = rel_err(op.matvec(x), np.linalg.solve(F, x))
    assert err <= float32_tol(cond(F), 60)
    assert np.isfinite(op.logdet())


def test_matmat_is_one_pass(rng):
    G = rng.standard_normal((6, 30))
    op = ml.StaticInverseFisher(G, 1.0)
    calls = []

    class Spy(np.ndarray):
        def __matmul__(self, other):
            calls.append(np.shape(other))
            return np.asarray(self) @ other

    op._lr.V = op._lr.V.view(Spy)
    op.matmat(rng.standard_normal((30, 9)))
    # two products (pass 1: V X, pass 2: V^T U), each over all 9 columns at once
    assert calls == [(30, 9), (6, 9)]


def test_logdet_matches_slogdet_over_damping_range(rng):
    G = rng.standard_normal((10, 25))
    for ratio in [1e-8, 1e-4, 1.0, 1e2]:
        lam = damping_for(G, ratio)
        F = dense_fisher(G, lam)
        op = ml.StaticInverseFisher(G, lam)
        assert abs(op.logdet() - np.linalg.slogdet(F)[1]) < 1e-9 * abs(np.linalg.slogdet(F)[1])


def test_float32_tolerance_documented_bound_is_not_vacuous(rng):
    # at moderate conditioning the float32 error is small in absolute terms
    G = rng.standard_normal((32, 500))
    lam = damping_for(G, 1e-2)
    F = dense_fisher(G, lam)
    op = ml.StaticInverseFisher(G.astype(np.float32), lam)
    x = rng.standard_normal(500)
    err = rel_err(op.matvec(x), np.linalg.solve(F, x))
    assert err < 1e-4
    assert err > EPS32 / 10  # really computed in float32


# -- issue 11 item 12: the form is chosen by accuracy, not on m >= d alone ---------------------

def _exact_solve(G, lam, X):
    """F^{-1} X with F = lam I + G^T G / m, solved in 60-digit arithmetic from the exact
    float64 values of G and lam (the reference every float64 method is measured against)."""
    import mpmath as mp
    with mp.workdps(60):
        m, d = G.shape
        Gm = mp.matrix(G.tolist())
        F = mp.matrix(d, d)
        GtG = Gm.T * Gm
        for i in range(d):
            for j in range(d):
                F[i, j] = GtG[i, j] / m + (mp.mpf(lam) if i == j else 0)
        X2 = X.reshape(d, -1)
        cols = [mp.lu_solve(F, mp.matrix(X2[:, k].tolist())) for k in range(X2.shape[1])]
        Y = np.array([[float(c[i]) for c in cols] for i in range(d)])
        return Y.reshape(X.shape)


@pytest.mark.parametrize("kind", ["duplicate", "lowrank"])
def test_rank_deficient_m_ge_d_small_damping_matches_exact_reference(kind):
    # m >= d but rank(G) < d (duplicate rows of a short G, or a rank-3 product) and
    # lambda = 1e-8: the primal form loses eps * cond(F) ~ 1e-8, the dual form keeps ~eps
    rng = np.random.default_rng(11)
    d = 12
    if kind == "duplicate":
        G = np.vstack([rng.standard_normal((6, d))] * 4)          # m = 24, rank 6
    else:
        G = rng.standard_normal((30, 3)) @ rng.standard_normal((3, d))   # m = 30, rank 3
    lam = 1e-8
    x = rng.standard_normal(d)
    ref = _exact_solve(G, lam, x)
    op = ml.StaticInverseFisher(G, lam)
    assert op.form == "dual"
    assert rel_err(op.matvec(x), ref) < 1e-12
    X = rng.standard_normal((d, 3))
    assert rel_err(op.matmat(X), _exact_solve(G, lam, X)) < 1e-12
    # the forced primal form is the inaccurate one the old rule (m >= d) chose
    primal = ml.StaticInverseFisher(G, lam, form="primal")
    assert rel_err(primal.matvec(x), ref) > 1e-10
    # the dual form's forward operator and log-determinant stay exact too
    F = dense_fisher(G, lam)
    assert rel_err(op.fisher().matvec(x), F @ x) < 1e-12
    assert abs(op.logdet() - primal.logdet()) < 1e-8 * abs(primal.logdet())


def test_full_rank_m_ge_d_keeps_primal_form(rng):
    # full column rank with lambda far below sigma_min^2 / m: the primal form is exact to
    # eps * cond(F), the dual form would lose lambda_max / lambda
    G = rng.standard_normal((200, 20))
    lam = 1e-9
    op = ml.StaticInverseFisher(G, lam)
    assert op.form == "primal"
    x = rng.standard_normal(20)
    ref = _exact_solve(G, lam, x)
    assert rel_err(op.matvec(x), ref) < 1e-13
    dual = ml.StaticInverseFisher(G, lam, form="dual")
    assert rel_err(dual.matvec(x), ref) > 1e-11


def test_forced_form_validation(rng):
    G = rng.standard_normal((3, 8))
    with pytest.raises(ValueError, match="form='primal' needs m >= d"):
        ml.StaticInverseFisher(G, 0.1, form="primal")
    with pytest.raises(ValueError, match="form must be one of"):
        ml.StaticInverseFisher(G, 0.1, form="woodbury")
    with pytest.raises(TypeError, match="form must be one of"):
        ml.StaticInverseFisher(G, 0.1, form=1)


def forward_tol(F):
    """The forward product through the factors (and the dense oracle F @ X itself)
    rounds G^T G X at eps ||G^T G|| ||X||: relative to ||F X|| >= lambda_min ||X|| that
    is a few eps * cond(F) when X reaches the gradients' null space."""
    return 1e-12 + 16 * EPS64 * cond(F)



# -- issue 11 items 3 and 9: overflow, damping range, copies, read-only views ------------------

@pytest.mark.parametrize("m,d", [(5, 12), (12, 5)])
def test_float64_gram_overflow_refused_naming_grads(rng, m, d):
    G = rng.standard_normal((m, d)) * 1e155        # finite; G G^T overflows float64
    with pytest.raises(ValueError, match="grads is too large"):
        ml.StaticInverseFisher(G, 0.1)
    with pytest.raises(ValueError, match="grads is too large"):
        ml.BlockInverseFisher(G, 0.1, block_size=4)


def test_float32_gram_overflow_redone_in_float64(rng):
    # ||g||^2 ~ 9e38 overflows a float32 Gram product (F's entries, ~1e36, do not): the
    # float64 accumulation gives the float64 operator's answer to float32 accuracy
    G = (rng.standard_normal((2, 400)) * 1.5e18).astype(np.float32)
    with np.errstate(over="ignore"):
        assert not np.isfinite(G @ G.T).all()
    op = ml.StaticInverseFisher(G, 1e17)
    ref = ml.StaticInverseFisher(G.astype(np.float64), 1e17)
    x = rng.standard_normal(400).astype(np.float32)
    assert rel_err(op.matvec(x), ref.matvec(x.astype(np.float64))) < 1e-6
    assert abs(op.logdet() - ref.logdet()) < 1e-9 * abs(ref.logdet())
    # where F's own diagonal overflows float32, the input is refused
    with pytest.raises(ValueError, match="grads is too large"):
        ml.StaticInverseFisher(np.full((4, 3), 3e19, np.float32), 1e17)


@pytest.mark.parametrize("damping,dtype", [(1e-310, np.float64), (1e-160, np.float64),
                                           (1e308, np.float64), (1e-25, np.float32),
                                           (1e20, np.float32)])
def test_damping_outside_range_refused(rng, damping, dtype):
    G = rng.standard_normal((3, 6)).astype(dtype)
    with pytest.raises(ValueError, match=r"damping must be in \[.*\] for " + np.dtype(dtype).name):
        ml.StaticInverseFisher(G, damping)
    with pytest.raises(ValueError, match="damping must be in"):
        ml.BlockInverseFisher(G, damping, block_size=2)


def test_damping_at_range_ends_gives_finite_results(rng):
    from mfac_linalg._validate import damping_range
    lo, hi = damping_range(np.float64)
    G = rng.standard_normal((3, 6))
    for lam in (lo, hi):
        op = ml.StaticInverseFisher(G, lam)
        assert np.isfinite(op.logdet()) and np.isfinite(op.matvec(np.ones(6))).all()


def test_copies_and_pickles_behave_like_the_original(rng):
    import copy
    import pickle
    G = rng.standard_normal((6, 15))
    x = rng.standard_normal(15)
    for op in (ml.StaticInverseFisher(G, 0.3), ml.StaticInverseFisher(G.T[:, :6], 1e-8),
               ml.BlockInverseFisher(G, 0.3, block_size=4),
               ml.StaticInverseFisher(G, 0.3).fisher()):
        for twin in (pickle.loads(pickle.dumps(op)), copy.deepcopy(op), copy.copy(op)):
            assert type(twin) is type(op) and repr(twin) == repr(op)
            assert np.array_equal(twin @ x[:op.shape[0]], op @ x[:op.shape[0]])
            assert twin.logdet() == op.logdet()


def test_handed_out_arrays_are_read_only(rng):
    G = rng.standard_normal((6, 15))
    op = ml.StaticInverseFisher(G, 0.3)
    x = rng.standard_normal(15)
    y0 = op @ x
    L = op.factor
    with pytest.raises(ValueError, match="read-only"):
        L[0, 0] = 5.0
    for cols, alpha, beta, V in op.lowrank_batches():
        with pytest.raises(ValueError, match="read-only"):
            V[...] = 0.0
        cols[...] = 0                                  # a fresh array: harmless
    blk = ml.BlockInverseFisher(G, 0.3, block_size=4)
    yb = blk @ x
    for cols, alpha, beta, V in blk.lowrank_batches():
        with pytest.raises(ValueError, match="read-only"):
            V[0, 0, 0] = 1.0
    b = blk.bounds
    b[:] = 0
    assert np.array_equal(op @ x, y0) and np.array_equal(blk @ x, yb)


def test_not_positive_definite_is_the_public_error(rng):
    # duplicate gradients (G G^T singular) and a damping far below eps * ||G||^2: the
    # capacitance cannot be factored; the error is ml.NotPositiveDefinite (a ValueError)
    G = np.vstack([rng.standard_normal((2, 50))] * 3) * 1e7
    for build in (lambda: ml.StaticInverseFisher(G, 2e-154),
                  lambda: ml.BlockInverseFisher(G, 2e-154, block_size=25)):
        with pytest.raises(ml.NotPositiveDefinite, match="damping is too small"):
            build()
        assert issubclass(ml.NotPositiveDefinite, ValueError)


@pytest.mark.parametrize("bad", [None, 3, np.eye(3), "op"])
def test_fisher_operator_constructor_refuses_non_inverse_fisher_operators(rng, bad):
    """``ml.FisherOperator(x)`` is public: anything but an inverse-Fisher operator gave an
    AttributeError (at once, or at the first product for ``2 * op``, ``op.fisher()``,
    ``block_diag``); now a TypeError naming ``inverse_op``."""
    op = ml.StaticInverseFisher(rng.standard_normal((5, 12)), 0.1)
    for arg in (bad, op.fisher(), 2 * op, ml.block_diag([op, op])):
        with pytest.raises(TypeError, match="inverse_op must be an inverse-Fisher operator"):
            ml.FisherOperator(arg)
    F = ml.FisherOperator(op)
    x = rng.standard_normal(12)
    assert np.array_equal(F.matvec(x), op.fisher().matvec(x)) and F.inverse() is op


@pytest.mark.parametrize("m,d", [(3, 8), (12, 5)])          # dual and primal forms
def test_matvec_checks_x_through_its_own_product(m, d, rng, monkeypatch):
    """The finiteness of x is read from V x (r values) in the product: no separate pass
    over x, and the same errors: NaN/inf, a cast that overflows, products that overflow."""
    from mfac_linalg import _backend as B
    op = ml.StaticInverseFisher(rng.standard_normal((m, d)), 0.3)
    calls = []
    real = B.check_finite
    monkeypatch.setattr(B, "check_finite", lambda *a: calls.append(a[1]) or real(*a))
    x = rng.standard_normal(d)
    np.testing.assert_array_equal(op.matvec(x), op.matmat(x[:, None])[:, 0])
    for bad in (np.nan, np.inf, -np.inf):
        xb = x.copy()
        xb[d // 2] = bad
        with pytest.raises(ValueError, match=r"^x must be finite; got NaN or infinity$"):
            op.matvec(xb)
        with pytest.raises(ValueError, match=r"^X must be finite"):
            op.matmat(np.stack([x, xb], axis=1))
    assert calls == []
    ones = ml.StaticInverseFisher(np.ones((3, 8)), 0.3)     # V x ~ sqrt(8) 1e308: overflows
    with pytest.raises(ValueError, match="x is too large: its products with the operator "
                                         "overflow"):
        ones.matvec(np.full(8, 1e308))
    op32 = ml.StaticInverseFisher(rng.standard_normal((m, d)).astype(np.float32), 0.3)
    with pytest.raises(ValueError, match="x is too large for the operator's dtype float32"):
        op32.matvec(np.full(d, 1e39))
    off = ml.StaticInverseFisher(rng.standard_normal((m, d)), 0.3, check_finite=False)
    with np.errstate(invalid="ignore"):
        assert np.isnan(off.matvec(np.full(d, np.nan))).all()   # unchecked: NaN out
