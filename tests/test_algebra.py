"""The lazy operator algebra of the protocol (issue 15 item 1), against dense float64."""
import copy
import pickle

import numpy as np
import pytest
import scipy.sparse.linalg as spla
from hypothesis import given, settings, strategies as st

import mfac_linalg as ml
from mfac_linalg._operator import ProductOperator, ScaledOperator, SumOperator

from oracles import dense_fisher, dense_inverse, rel_err

TOL = 1e-11     # every operand here has cond(F) < 1e3: float64 products agree to ~1e-14


def _ops(backend, rng, d=9):
    """Three operators on one backend with their dense matrices (float64)."""
    xp = backend.xp
    G1 = rng.standard_normal((4, d))
    G2 = rng.standard_normal((6, d))
    A = ml.StaticInverseFisher(xp.asarray(G1), 0.7)
    Bk = ml.BlockInverseFisher(xp.asarray(G2), 0.4, block_size=4)
    F2 = np.zeros((d, d))
    for a, b in zip(Bk.bounds[:-1], Bk.bounds[1:]):
        F2[a:b, a:b] = 0.4 * np.eye(b - a) + G2[:, a:b].T @ G2[:, a:b] / 6
    C = A.fisher()
    return (A, dense_inverse(dense_fisher(G1, 0.7))), (Bk, np.linalg.inv(F2)), \
        (C, dense_fisher(G1, 0.7))


def _check(op, D, backend, rng, symmetric):
    """Every product of op against the dense D (host float64)."""
    xp = backend.xp
    d = D.shape[0]
    x = rng.standard_normal(d)
    X = rng.standard_normal((d, 3))
    assert op.shape == (d, d) and op.symmetric is symmetric
    assert rel_err(op.matvec(xp.asarray(x)), D @ x) < TOL
    assert rel_err(op.matmat(xp.asarray(X)), D @ X) < TOL
    assert rel_err(op.rmatvec(xp.asarray(x)), D.T @ x) < TOL
    assert rel_err(op.rmatmat(xp.asarray(X)), D.T @ X) < TOL
    assert rel_err(op @ xp.asarray(X), D @ X) < TOL
    assert rel_err(xp.asarray(x) @ op, x @ D) < TOL
    assert rel_err(xp.asarray(X.T) @ op, X.T @ D) < TOL
    assert rel_err(op.T @ xp.asarray(x), D.T @ x) < TOL
    assert rel_err(op.H.matmat(xp.asarray(X)), D.T @ X) < TOL
    assert rel_err(op.diagonal(), np.diag(D)) < TOL
    assert abs(op[2, 5] - D[2, 5]) < TOL * np.abs(D).max()
    assert abs(op.quad(xp.asarray(x)) - x @ D @ x) < TOL * np.abs(D).sum() * (x @ x)
    assert rel_err(op.todense(), D) < TOL
    if symmetric:
        assert op.adjoint() is op
    else:
        assert rel_err(op.adjoint().todense(), D.T) < TOL


def test_sums_scalings_products_against_dense(backend, rng):
    (A, DA), (Bk, DB), (C, DC) = _ops(backend, rng)
    _check(A + Bk, DA + DB, backend, rng, True)
    _check(2.5 * A, 2.5 * DA, backend, rng, True)
    _check(A * -0.5, -0.5 * DA, backend, rng, True)
    _check(-Bk, -DB, backend, rng, True)
    _check(A - Bk + C, DA - DB + DC, backend, rng, True)
    _check(Bk / 4, DB / 4, backend, rng, True)
    _check(A @ Bk, DA @ DB, backend, rng, False)
    _check(A * C, DA @ DC, backend, rng, False)          # SciPy's convention: * of operators
    _check(A @ Bk @ C, DA @ DB @ DC, backend, rng, False)
    _check(A @ A, DA @ DA, backend, rng, True)           # a power of a symmetric operator
    _check(A ** 3, DA @ DA @ DA, backend, rng, True)
    _check(2 * (A @ Bk) + Bk @ A, 2 * DA @ DB + DB @ DA, backend, rng, False)
    # sums and scalings of a non-symmetric operator stay non-symmetric
    _check(A @ Bk - C, DA @ DB - DC, backend, rng, False)


def test_adjoint_of_product_is_reversed_product_of_adjoints(rng):
    (A, DA), (Bk, DB), (C, DC) = _ops(ml._backend.CPU, rng)
    P = A @ Bk @ C
    adj = P.adjoint()
    assert isinstance(adj, ProductOperator)
    assert adj.factors == [C, Bk, A]
    assert P.T.factors == [C, Bk, A] and P.H.factors == [C, Bk, A]
    assert rel_err(adj.todense(), (DA @ DB @ DC).T) < TOL
    # a scaled non-symmetric operator: adjoint is the scaled adjoint
    S = 3.0 * P
    assert not S.symmetric and rel_err(S.adjoint().todense(), 3.0 * (DA @ DB @ DC).T) < TOL


def test_op_times_array_is_matvec_and_flattening(rng):
    (A, DA), (Bk, DB), _ = _ops(ml._backend.CPU, rng)
    x = rng.standard_normal(9)
    X = rng.standard_normal((9, 2))
    assert np.array_equal(A * x, A.matvec(x))
    assert np.array_equal(A * X, A.matmat(X))
    assert rel_err(x * A, x @ DA) < TOL                  # x * op: the row-vector product
    assert np.array_equal(A(x), A.matvec(x))
    # nested nodes flatten; scalars fold
    S = (A + Bk) + A
    assert isinstance(S, SumOperator) and len(S.terms) == 3
    k = 2 * (3 * A)
    assert isinstance(k, ScaledOperator) and k.scalar == 6.0 and k.operator is A
    P = (A @ Bk) @ (Bk @ A)
    assert isinstance(P, ProductOperator) and len(P.factors) == 4


def test_input_dtype_and_mixed_operator_dtypes(rng):
    G = rng.standard_normal((3, 7))
    A32 = ml.StaticInverseFisher(G.astype(np.float32), 0.5)
    A64 = ml.StaticInverseFisher(G, 0.5)
    S = A32 + A64
    assert S.dtype == np.float64
    x = rng.standard_normal(7)
    D = dense_inverse(dense_fisher(G, 0.5))
    y = S @ x
    assert y.dtype == np.float64 and rel_err(y, 2 * D @ x) < 1e-5
    y32 = (2 * A32) @ x.astype(np.float32)
    assert y32.dtype == np.float32 and rel_err(y32, 2 * D @ x) < 1e-5


def test_aslinearoperator_keeps_matmat_one_pass(rng):
    (A, DA), (Bk, DB), _ = _ops(ml._backend.CPU, rng)
    calls = []
    orig = type(A)._matmat
    A._matmat = lambda Z: calls.append(Z.shape) or orig(A, Z)
    try:
        lo = spla.aslinearoperator(A)
        X = rng.standard_normal((9, 5))
        Y = lo.matmat(X)
        assert calls == [(9, 5)]          # one pass for 5 columns, not 5 matvecs
        assert rel_err(Y, DA @ X) < TOL
        calls.clear()
        lo.H.matmat(X)
        assert calls == [(9, 5)]
        calls.clear()
        spla.aslinearoperator(A + Bk).matmat(X)
        assert calls == [(9, 5)]
    finally:
        del A._matmat
    # an operator is accepted by SciPy's solvers as it is
    b = rng.standard_normal(9)
    F = A.fisher()
    x, info = spla.cg(F, b, rtol=1e-13, atol=0.0)
    assert info == 0 and rel_err(x, DA @ b) < 1e-10
    # and composes with SciPy's own operators through SciPy
    M = spla.aslinearoperator(np.eye(9) * 2.0)
    assert rel_err((A + M).matvec(b), DA @ b + 2 * b) < TOL
    assert rel_err((A @ M).matvec(b), DA @ (2 * b)) < TOL
    assert rel_err((M @ A).matvec(b), 2 * DA @ b) < TOL


def test_asarray_points_at_todense(rng):
    (A, _), _, _ = _ops(ml._backend.CPU, rng)
    with pytest.raises(TypeError, match=r"todense\(\)"):
        np.asarray(A)
    with pytest.raises(TypeError, match=r"todense\(\)"):
        np.asarray(A + A)
    with pytest.raises(TypeError):
        np.add(A, 1.0)


def test_algebra_errors(rng):
    (A, _), (Bk, _), _ = _ops(ml._backend.CPU, rng)
    other = ml.StaticInverseFisher(rng.standard_normal((2, 5)), 1.0)
    with pytest.raises(ValueError, match=r"different shapes: \(9, 9\) and \(5, 5\)"):
        A + other
    with pytest.raises(ValueError, match="different shapes"):
        A @ other
    with pytest.raises(TypeError, match="scalar factor must be a real number; got bool"):
        True * A
    with pytest.raises(TypeError, match="scalar factor must be a real number; got complex"):
        A * 1j
    with pytest.raises(ValueError, match="scalar factor must be finite"):
        A * np.inf
    with pytest.raises(TypeError, match="op @ scalar is not defined"):
        A @ 2.0
    with pytest.raises(TypeError):
        A + 1.0
    with pytest.raises(TypeError):
        A + np.eye(9)
    with pytest.raises(TypeError, match="no inverse available"):
        (A + Bk).inverse()
    with pytest.raises(TypeError, match="exponent must be an integer"):
        A ** 0.5
    with pytest.raises(ValueError, match="exponent must be >= 1"):
        A ** 0
    with pytest.raises(ZeroDivisionError):
        A / 0


def test_inverse_is_part_of_the_protocol(rng):
    (A, DA), (Bk, DB), (C, DC) = _ops(ml._backend.CPU, rng)
    # inverse-Fisher operators answer their fisher(), and F its inverse operator
    assert rel_err(A.inverse().todense(), np.linalg.inv(DA)) < 1e-10
    assert rel_err(Bk.inverse().todense(), np.linalg.inv(DB)) < 1e-10
    assert C.inverse() is A
    assert rel_err((2 * A).inverse().todense(), np.linalg.inv(2 * DA)) < 1e-10
    assert rel_err((A @ Bk).inverse().todense(), np.linalg.inv(DA @ DB)) < 1e-9
    # block_diag(...).inverse() over every kind of block
    kinv = ml.kfac(rng.standard_normal((20, 3)), rng.standard_normal((20, 2)), 0.3)
    kf = kinv.fisher()
    assert rel_err(kinv.inverse().todense(), kf.todense()) < 1e-12
    blocks = [A, Bk, C, kf, kinv, 2 * A, A @ Bk]
    dense = [DA, DB, DC, kf.todense(), kinv.todense(), 2 * DA, DA @ DB]
    bd = ml.block_diag(blocks)
    inv = bd.inverse()
    import scipy.linalg as sla
    assert rel_err(inv.todense(), np.linalg.inv(sla.block_diag(*dense))) < 1e-9


def test_algebra_pickles_and_deepcopies(rng):
    (A, DA), (Bk, DB), (C, DC) = _ops(ml._backend.CPU, rng)
    expr = 2 * (A @ Bk) - C
    x = rng.standard_normal(9)
    for twin in (pickle.loads(pickle.dumps(expr)), copy.deepcopy(expr)):
        assert np.array_equal(twin @ x, expr @ x)
        assert twin.symmetric is False


@pytest.mark.parametrize("shape", [(9,), (9, 1), (9, 4)])
def test_node_validation_names_argument(rng, shape):
    (A, _), (Bk, _), _ = _ops(ml._backend.CPU, rng)
    P = A @ Bk
    x = rng.standard_normal(shape)
    x[0] = np.nan
    with pytest.raises(ValueError, match="must be finite"):
        P.dot(x)
    with pytest.raises(ValueError, match=r"x must have shape \(9,\) or \(9, k\)"):
        P.matvec(np.ones(4))


def test_todense_size_guard_validates_max_elements(rng):
    (A, DA), _, _ = _ops(ml._backend.CPU, rng)
    with pytest.raises(ValueError, match="max_elements must be a number; got nan"):
        A.todense(max_elements=float("nan"))
    with pytest.raises(TypeError, match="max_elements must be a real number; got str"):
        A.todense(max_elements="1e9")
    with pytest.raises(TypeError, match="max_elements must be a real number; got bool"):
        A.todense(max_elements=True)
    with pytest.raises(ValueError, match="max_elements must be >= 0"):
        A.todense(max_elements=-1)
    for frac in (1.5, 81.0, np.float64(100.0)):       # a count: an integer, or inf
        with pytest.raises(TypeError, match="max_elements must be an integer"):
            A.todense(max_elements=frac)
    assert A.todense(max_elements=np.int64(81)).shape == (9, 9)
    with pytest.raises(ValueError, match="todense would build a 9 x 9 matrix"):
        A.todense(max_elements=80)
    assert np.array_equal(A.todense(max_elements=81), A.todense(max_elements=float("inf")))


_exprs = st.deferred(lambda: st.one_of(
    st.sampled_from(["A", "B", "C"]),
    st.tuples(st.sampled_from(["+", "-", "@"]), _exprs, _exprs),
    st.tuples(st.just("*"), st.floats(-3, 3).filter(lambda a: abs(a) > 1e-3), _exprs),
    st.tuples(st.just("neg"), _exprs),
))


def _eval(e, ops, dense):
    """The expression on operators and, alongside, on dense matrices."""
    if isinstance(e, str):
        return ops[e], dense[e]
    if e[0] == "neg":
        o, d = _eval(e[1], ops, dense)
        return -o, -d
    if e[0] == "*":
        o, d = _eval(e[2], ops, dense)
        return e[1] * o, e[1] * d
    (o1, d1), (o2, d2) = _eval(e[1], ops, dense), _eval(e[2], ops, dense)
    if e[0] == "+":
        return o1 + o2, d1 + d2
    if e[0] == "-":
        return o1 - o2, d1 - d2
    return o1 @ o2, d1 @ d2


@settings(max_examples=40)
@given(_exprs, st.integers(0, 2**31))
def test_random_expressions_against_dense(expr, seed):
    rng = np.random.default_rng(seed)
    (A, DA), (Bk, DB), (C, DC) = _ops(ml._backend.CPU, rng)
    op, D = _eval(expr, {"A": A, "B": Bk, "C": C}, {"A": DA, "B": DB, "C": DC})
    X = rng.standard_normal((9, 2))
    scale = np.linalg.norm(D, 2) * np.linalg.norm(X) + 1e-300
    # each node adds at most a few roundings of its operands' products
    tol = 1e-13 * 4 ** _depth(expr)
    assert np.linalg.norm(op.matmat(X) - D @ X) <= tol * scale
    assert np.linalg.norm(op.rmatmat(X) - D.T @ X) <= tol * scale
    assert op.symmetric == _symmetric(expr)
    if op.symmetric:
        assert np.allclose(D, D.T, rtol=0, atol=1e-12 * np.abs(D).max())


def _depth(e):
    if isinstance(e, str):
        return 1
    return 1 + max(_depth(x) for x in e[1:] if not isinstance(x, float))


def _symmetric(e):
    """What the algebra promises: sums and scalings keep symmetry; a product is
    symmetric only as a power of one operator."""
    if isinstance(e, str):
        return True
    if e[0] == "neg":
        return _symmetric(e[1])
    if e[0] == "*":
        return _symmetric(e[2])
    if e[0] in "+-":
        return _symmetric(e[1]) and _symmetric(e[2])
    leaves = _product_factors(e)
    return all(f == leaves[0] for f in leaves) and isinstance(leaves[0], str)


def _product_factors(e):
    if isinstance(e, tuple) and e[0] == "@":
        return _product_factors(e[1]) + _product_factors(e[2])
    return [e]


def test_finite_input_overflowing_the_operator_dtype_is_refused(rng):
    op = ml.StaticInverseFisher(rng.standard_normal((3, 6)).astype(np.float32), 0.5)
    x = np.full(6, 1e39)                   # finite in float64, inf in float32
    for call in (op.matvec, op.dot, op.rmatvec, (2 * op).matvec, op.quad):
        with pytest.raises(ValueError, match="x is too large for the operator's dtype float32"):
            call(x)
    with pytest.raises(ValueError, match="x must be finite"):
        op.matvec(np.full(6, np.inf))


def test_quad_of_a_finite_vector_that_overflows_is_inf_not_nan(rng):
    """A finite x whose form overflows float64 gave NaN (inf - inf inside the factored
    Woodbury form); now +-inf, and the scaled evaluation keeps tiny and ordinary x exact
    (powers of two: bit-identical to the unscaled form in the normal range)."""
    (A, DA), (Bk, DB), (C, DC) = _ops(ml._backend.CPU, rng)
    for op, D in ((A, DA), (Bk, DB), (C, DC), (-A, -DA), (A + C, DA + DC)):
        u = rng.standard_normal(9)
        exact = u @ D @ u
        assert op.quad(np.full(9, 1e155)) == np.sign(np.ones(9) @ D @ np.ones(9)) * np.inf
        q = op.quad(np.stack([u * 2.0 ** 500, u, u * 2.0 ** -500, np.zeros(9)], axis=1))
        assert np.all(np.isfinite(q))
        np.testing.assert_allclose(q[:3], exact * 2.0 ** np.array([1000, 0, -1000]),
                                   rtol=1e-12)
        assert q[3] == 0.0
        assert op.quad(u) == op.quad(u * 2.0 ** 500) * 2.0 ** -1000
        assert op.quad(u) * 2.0 ** 40 == op.quad(u * 2.0 ** 20)


def test_scalars_that_overflow_or_vanish_are_refused_by_name_or_kept_exact(rng):
    """``A * 1e300 * 1e-300`` was merged to one scalar (fine), but ``A * 1e-300 *
    1e-300 * 1e300 * 1e300`` merged through 0 (every product 0) and ``A / 1e-310``
    said "scalar factor must be finite; got inf"; ``A / 0`` was a bare ZeroDivisionError.
    Products whose scalars over/underflow when merged are now kept nested (exact)."""
    (A, DA), _, _ = _ops(ml._backend.CPU, rng)
    x = rng.standard_normal(9)
    y = A.matvec(x)
    for op in (A * 1e-300 * 1e-300 * 1e300 * 1e300, A * 1e300 * 1e300 * 1e-300 * 1e-300):
        np.testing.assert_allclose(op.matvec(x), y, rtol=1e-14)
    assert (A * 2 * 3).scalar == 6.0 and (A * 2 * 3).operator is A
    for bad in (0, 0.0, np.float16(0), np.array(0.0)):
        with pytest.raises(ZeroDivisionError, match="divisor must be nonzero"):
            A / bad
        with pytest.raises(ValueError, match="divisor must be nonzero"):
            A / bad
    with pytest.raises(ValueError, match="divisor must have a finite reciprocal.*1e-310"):
        A / 1e-310
    with pytest.raises(ValueError, match="scalar factor must be nonzero"):
        (A * 0).inverse()
    with pytest.raises(ValueError, match=r"x must have shape \(9,\) or \(k, 9\) for x @ op; "
                       r"got shape \(9, 2\)"):
        np.ones((9, 2)) @ A
    np.testing.assert_allclose(np.ones((2, 9)) @ A, np.ones((2, 9)) @ DA, rtol=1e-11)


@pytest.mark.parametrize("cls", [SumOperator, ProductOperator])
def test_public_node_constructors_name_bad_operands(rng, cls):
    """``SumOperator([])`` raised IndexError, ``SumOperator(None)`` "'NoneType' object is
    not iterable", ``SumOperator(op)`` a message about op[i, j]; ``ScaledOperator(2, None)``
    an AttributeError."""
    (A, DA), _, _ = _ops(ml._backend.CPU, rng)
    with pytest.raises(ValueError, match="ops must hold at least one operator"):
        cls([])
    for bad in (None, A, "ab", 5):
        with pytest.raises(TypeError, match="ops must be a sequence of operators"):
            cls(bad)
    with pytest.raises(TypeError, match="operand 1 must be an operator; got ndarray"):
        cls([A, np.eye(9)])
    x = rng.standard_normal(9)
    np.testing.assert_allclose(cls(iter([A, A])).matvec(x),
                               (DA + DA if cls is SumOperator else DA @ DA) @ x, rtol=TOL)
    for bad in (None, np.eye(9), A.to_scipy()):
        with pytest.raises(TypeError, match="op must be an operator; got"):
            ScaledOperator(2.0, bad)


def test_power_exponent_is_bounded(rng):
    """``op ** 2**70`` leaked OverflowError from ``[op] * p`` (and ``op ** 10**10`` tried
    to allocate 80 GB of references); now a ValueError naming the exponent."""
    (A, DA), _, _ = _ops(ml._backend.CPU, rng)
    with pytest.raises(ValueError, match="exponent must be <= 1048576; got 1048577"):
        A ** (2 ** 20 + 1)
    with pytest.raises(ValueError, match="exponent must be <= 1048576"):
        A ** 2 ** 70
    x = rng.standard_normal(9)
    np.testing.assert_allclose((A ** np.int64(3)).matvec(x), DA @ DA @ DA @ x, rtol=TOL)
