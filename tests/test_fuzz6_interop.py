"""Fuzz round six: how the operators are consumed (SciPy's solvers and LinearOperator
algebra, NumPy's operators) and what inputs they accept (lists, integer and boolean
arrays, strided / Fortran / read-only / big-endian arrays, ``numpy.matrix`` and other
ndarray subclasses), against dense float64 oracles.

The regression tests at the top each failed before round six's fixes in
mfac_linalg/_operator.py and mfac_linalg/_validate.py:

* ndarray subclasses reached the operators' ``_matmat`` as they were: a
  ``numpy.matrix`` argument raised a NumPy error that did not name the argument
  (BlockInverseFisher: a matmul core-dimension mismatch; EKFAC: "shape too large to
  be a matrix"), ``quad`` of one gave a (1, k) matrix instead of a (k,) array, and a
  user subclass came back as itself from some operators and as an ndarray from
  others; ``StaticInverseFisher(np.matrix(G), lam)`` raised NotPositiveDefinite for
  well-conditioned gradients and ``BlockInverseFisher(np.matrix(G), ...)`` a NumPy
  error;
* big-endian gradients (``>f4``) gave an operator whose ``dtype`` was ``>f4``, which
  the damping check took for float64 (a float32 operator with damping 1e-30 was
  accepted), and whose ``diagonal``/``todense`` came back float64; big-endian vectors
  gave results in non-native byte order (NumPy's products give native ones).
"""
import warnings

import numpy as np
import pytest
import scipy.sparse.linalg as spla
from hypothesis import given, settings
from hypothesis import strategies as st

import mfac_linalg as ml

from registry import _BY_NAME


def _ops():
    """A small zoo: each operator type once, plus the lazy algebra's nodes."""
    rng = np.random.default_rng(6)
    A = ml.StaticInverseFisher(rng.standard_normal((4, 12)), 0.3)
    Bk = ml.BlockInverseFisher(rng.standard_normal((5, 12)), 0.2, block_size=4)
    a, g = rng.standard_normal((30, 4)), rng.standard_normal((30, 3))
    K = ml.kfac(a, g, 0.1)
    E = ml.ekfac(a, g, 0.1)
    W = ml.SlidingWindowInverseFisher(12, 6, 0.4, dtype="float64")
    for row in rng.standard_normal((8, 12)):          # wrapped around: 6 rows held
        W.update(row)
    ops = {"static": A, "fisher": A.fisher(), "block": Bk, "kfac": K, "ekfac": E,
           "window": W, "block_diag": ml.block_diag([K, E]), "scaled": -2.5 * A,
           "sum": A + Bk.fisher(), "product": A @ Bk, "product.T": (A @ Bk).T,
           "power": A ** 2, "inverse": (A @ Bk).inverse(), "kpsvd": ml.kpsvd(a, g, 0.1)}
    return ops


_OPS = _ops()
_DENSE = {k: op.todense() for k, op in _OPS.items()}


def _err(y, ref):
    y = np.asarray(y, dtype=np.float64)
    assert y.shape == ref.shape, (y.shape, ref.shape)
    return np.linalg.norm(y - ref) / max(np.linalg.norm(ref), 1e-300)


# -- regressions: ndarray subclasses ---------------------------------------------------------

@pytest.mark.parametrize("name", sorted(_OPS))
def test_numpy_matrix_arguments(name):
    op, D = _OPS[name], _DENSE[name]
    d = op.shape[0]
    rng = np.random.default_rng(1)
    X = rng.standard_normal((d, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # no PendingDeprecationWarning either
        Xm, xm = X.view(np.matrix), X[:, :1].view(np.matrix)
        for y, ref in ((op @ Xm, D @ X), (op.matmat(Xm), D @ X), (op.dot(Xm), D @ X),
                       (op.rmatmat(Xm), D.T @ X), (op.matvec(xm), D @ X[:, :1]),
                       (op.rmatvec(xm), D.T @ X[:, :1]), (Xm.T @ op, X.T @ D)):
            # SciPy's LinearOperator convention: a matrix argument gives a matrix back
            assert type(y) is np.matrix
            assert _err(y, ref) <= 1e-12
        q = op.quad(Xm)
        assert type(q) is np.ndarray and q.shape == (3,)
        assert _err(q, np.einsum("ik,ik->k", X, D @ X)) <= 1e-12
        # a matrix is 2-D: a (1, d) row is not a vector of the operator
        with pytest.raises(ValueError, match="x must have shape"):
            op.matvec(X[:, 0].reshape(1, d).view(np.matrix))


class _Hostile(np.ndarray):
    """A subclass whose arithmetic is not NumPy's: nothing of it may reach a product."""

    def __mul__(self, other):
        raise AssertionError("subclass arithmetic reached the operator")

    __rmul__ = __rmatmul__ = __add__ = __radd__ = __sub__ = __iadd__ = __mul__
    __truediv__ = __neg__ = __mul__


@pytest.mark.parametrize("name", sorted(_OPS))
def test_ndarray_subclass_arguments_give_plain_arrays(name):
    op, D = _OPS[name], _DENSE[name]
    d = op.shape[0]
    X = np.random.default_rng(2).standard_normal((d, 2))
    Xs, xs = X.view(_Hostile), X[:, 0].copy().view(_Hostile)
    for y, ref in ((op @ Xs, D @ X), (op.matmat(Xs), D @ X), (op.rmatmat(Xs), D.T @ X),
                   (op.matvec(xs), D @ X[:, 0]), (op(xs), D @ X[:, 0]),
                   (xs @ op, X[:, 0] @ D), (op.quad(Xs), np.einsum("ik,ik->k", X, D @ X))):
        assert type(y) is np.ndarray
        assert _err(y, ref) <= 1e-12
    assert isinstance(op.quad(xs), float)


@pytest.mark.parametrize("ctor", ["static", "block", "with_gradients"])
def test_matrix_and_subclass_gradients(ctor):
    G = np.random.default_rng(3).standard_normal((6, 10))
    make = {"static": lambda g: ml.StaticInverseFisher(g, 0.5),
            "block": lambda g: ml.BlockInverseFisher(g, 0.5, block_size=5),
            "with_gradients": lambda g: ml.StaticInverseFisher(G[:2], 0.5).with_gradients(g),
            }[ctor]
    ref = make(G).todense()
    for g in (G.view(np.matrix), G.copy().view(_Hostile)):
        op = make(g)
        assert np.array_equal(op.todense(), ref)
        y = op @ np.ones(10)
        assert type(y) is np.ndarray


# -- regressions: byte order -----------------------------------------------------------------

@pytest.mark.parametrize("ctor", ["static", "block"])
def test_big_endian_gradients_give_a_native_float32_operator(ctor):
    G = np.random.default_rng(4).standard_normal((6, 10))
    make = {"static": lambda g, lam: ml.StaticInverseFisher(g, lam),
            "block": lambda g, lam: ml.BlockInverseFisher(g, lam, block_size=5)}[ctor]
    native = make(G.astype(np.float32), 0.5)
    op = make(G.astype(">f4"), 0.5)
    assert op.dtype == np.float32 and op.dtype.isnative
    assert op.diagonal().dtype == np.float32 and op.todense().dtype == np.float32
    assert np.array_equal(op.todense(), native.todense())
    assert (2 * op).dtype == np.float32 and (op + op).dtype == np.float32
    # the damping range is float32's, whatever the byte order
    with pytest.raises(ValueError, match="damping must be in .* for float32 results"):
        make(G.astype(">f4"), 1e-30)
    with pytest.raises(ValueError, match="damping"):
        make(G.astype(">f4"), 1e30)


@pytest.mark.parametrize("name", ["static", "window", "sum", "product", "kfac"])
@pytest.mark.parametrize("bo", [">f8", ">f4"])
def test_big_endian_vectors_give_native_results(name, bo):
    op, D = _OPS[name], _DENSE[name]
    d = op.shape[0]
    X = np.random.default_rng(5).standard_normal((d, 2)).astype(bo)
    ref = D @ X.astype(np.float64)
    tol = 1e-12 if bo == ">f8" else 1e-6
    for y in (op @ X, op.matvec(X[:, 0]), X[:, 0] @ op, op.quad(X)):
        assert y.dtype.isnative and y.dtype == np.dtype(bo).newbyteorder("=")
    assert _err(op @ X, ref) <= tol
    assert _err(op.matvec(X[:, 0]), ref[:, 0]) <= tol


# -- fuzz: input layouts and dtypes ----------------------------------------------------------

def _layout(X, kind):
    """X (float64, (d,) or (d, k)) in another layout or type, and its float64 value."""
    if kind == "list":
        return X.tolist(), X
    if kind == "int":
        Xi = np.round(4 * X).astype(np.int32)
        return Xi, Xi.astype(np.float64)
    if kind == "bool":
        return X > 0, (X > 0).astype(np.float64)
    if kind == "float16":
        h = X.astype(np.float16)
        return h, h.astype(np.float64)
    if kind == "float32":
        return X.astype(np.float32), X.astype(np.float32).astype(np.float64)
    if kind == "strided":
        big = np.zeros(tuple(2 * s for s in X.shape))
        view = big[(slice(None, None, 2),) * X.ndim]
        view[...] = X
        return view, X
    if kind == "negative-stride":
        return X[::-1].copy()[::-1], X
    if kind == "fortran":
        return np.asfortranarray(X), X
    if kind == "readonly":
        r = X.copy()
        r.flags.writeable = False
        return r, X
    if kind == "big-endian":
        return X.astype(">f8"), X
    if kind == "longdouble":
        return X.astype(np.longdouble), X
    raise AssertionError(kind)


_KINDS = ["list", "int", "bool", "float16", "float32", "strided", "negative-stride",
          "fortran", "readonly", "big-endian", "longdouble"]
#: the result dtype for each input kind (docs: the input's float type; integers and
#: booleans float64; float16 float32 on the CPU; long double float64)
_OUT = {"float16": np.float32, "float32": np.float32}


@settings(max_examples=200)
@given(name=st.sampled_from(sorted(_OPS)), kind=st.sampled_from(_KINDS),
       k=st.sampled_from([None, 1, 3]), method=st.sampled_from(
           ["@", "dot", "matvec", "rmatvec", "matmat", "rmatmat", "call", "x@op", "quad"]),
       seed=st.integers(0, 2 ** 16))
def test_input_layouts_against_the_dense_oracle(name, kind, k, method, seed):
    op, D = _OPS[name], _DENSE[name]
    d = op.shape[0]
    if method in ("matvec", "rmatvec") and k not in (None, 1):
        k = None
    if method in ("matmat", "rmatmat") and k is None:
        k = 2
    X = np.random.default_rng(seed).standard_normal(d if k is None else (d, k))
    x, Xv = _layout(X, kind)
    before = np.array(x, copy=True)
    f = {"@": lambda: op @ x, "dot": lambda: op.dot(x), "matvec": lambda: op.matvec(x),
         "rmatvec": lambda: op.rmatvec(x), "matmat": lambda: op.matmat(x),
         "rmatmat": lambda: op.rmatmat(x), "call": lambda: op(x), "quad": lambda: op.quad(x),
         "x@op": lambda: (x @ op) if k is None else (np.asarray(x).T @ op)}[method]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = f()
    if method == "quad":
        ref = np.einsum("i...,i...->...", Xv, D @ Xv)
    elif method == "x@op":
        ref = (Xv.T @ D)
    elif method.startswith("r"):
        ref = D.T @ Xv
    else:
        ref = D @ Xv
    if method == "quad" and k is None:
        assert isinstance(y, float)
    else:
        assert type(y) is np.ndarray and y.dtype.isnative
        assert y.dtype == _OUT.get(kind, np.float64)
    tol = 1e-6 if kind in _OUT else 1e-12
    assert _err(y, np.asarray(ref)) <= tol
    # the caller's argument is untouched, flags included
    assert np.array_equal(np.asarray(x), before)
    if kind == "readonly":
        assert not x.flags.writeable


# -- SciPy consumers -------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(_OPS))
def test_scipy_protocol_shapes(name):
    op, D = _OPS[name], _DENSE[name]
    d = op.shape[0]
    assert spla.aslinearoperator(op) is op
    rng = np.random.default_rng(8)
    for shape in [(d,), (d, 1), (d, 4), (d, 0)]:
        X = rng.standard_normal(shape)
        for y, ref in ((op @ X, D @ X), (op.dot(X), D @ X), (op.H @ X, D.T @ X),
                       (op.T.dot(X), D.T @ X), (op.adjoint() @ X, D.T @ X),
                       (spla.LinearOperator.dot(op, X), D @ X)):
            assert type(y) is np.ndarray and y.ndim == len(shape) and y.dtype == np.float64
            assert y.shape == ref.shape and (X.size == 0 or _err(y, ref) <= 1e-12)
        if len(shape) == 2:
            y = op.matmat(X)
            assert y.shape == shape and (X.size == 0 or _err(y, D @ X) <= 1e-12)
            y = op.rmatmat(X)
            assert y.shape == shape and (X.size == 0 or _err(y, D.T @ X) <= 1e-12)
            q = op.quad(X)
            assert q.shape == (shape[1],)
    x = rng.standard_normal(d)
    for ref, fn in ((D @ x, op.matvec), (D.T @ x, op.rmatvec)):
        assert fn(x).shape == (d,) and _err(fn(x), ref) <= 1e-12
        assert fn(x[:, None]).shape == (d, 1) and _err(fn(x[:, None]), ref[:, None]) <= 1e-12


@pytest.mark.parametrize("name", ["static", "block", "sum", "product", "block_diag"])
def test_scipy_linear_operator_algebra(name):
    op, D = _OPS[name], _DENSE[name]
    d = op.shape[0]
    S = spla.aslinearoperator(np.diag(np.arange(1.0, d + 1)))
    Sd = np.diag(np.arange(1.0, d + 1))
    x = np.random.default_rng(9).standard_normal((d, 2))
    for M, ref in ((op + S, D + Sd), (S + op, Sd + D), (op - S, D - Sd), (S - op, Sd - D),
                   (op @ S, D @ Sd), (S @ op, Sd @ D), (op.dot(S), D @ Sd),
                   ((op @ S).H, (D @ Sd).T), (S * op, Sd @ D), (S.H @ op.T, Sd @ D.T)):
        assert isinstance(M, spla.LinearOperator) and M.shape == (d, d)
        assert _err(M @ x, ref @ x) <= 1e-12
        assert _err(M.rmatvec(x[:, 0]), ref.T @ x[:, 0]) <= 1e-12


@pytest.mark.parametrize("name", ["static", "sum", "scaled", "block_diag", "window", "kpsvd"])
def test_scipy_solvers_and_eigsh(name):
    op, D = _OPS[name], _DENSE[name]
    d = op.shape[0]
    b = np.random.default_rng(10).standard_normal(d)
    Dsym = (D + D.T) / 2
    evals = np.linalg.eigvalsh(Dsym)
    definite = evals.min() > 0
    cond = np.linalg.cond(D)
    solvers = [spla.cg, spla.minres] if definite else [spla.minres]
    for solver in solvers:
        x, info = solver(op, b, rtol=1e-12, maxiter=20 * d)
        assert info == 0 and type(x) is np.ndarray and x.shape == (d,)
        assert np.linalg.norm(D @ x - b) <= 1e-8 * cond * np.linalg.norm(b)
    x, info = spla.gmres(op, b, rtol=1e-12, restart=d, maxiter=20 * d)
    assert info == 0 and np.linalg.norm(D @ x - b) <= 1e-8 * cond * np.linalg.norm(b)
    x = spla.lsqr(op, b, atol=1e-14, btol=1e-14, iter_lim=50 * d)[0]
    assert np.linalg.norm(D @ x - b) <= 1e-7 * cond * np.linalg.norm(b)
    top = spla.eigsh(op, k=2, which="LA", return_eigenvectors=False)
    assert np.allclose(np.sort(top), evals[-2:], rtol=1e-9, atol=0)


def test_nonsymmetric_product_with_lsqr_uses_the_adjoint():
    op, D = _OPS["product"], _DENSE["product"]
    assert not op.symmetric and not np.allclose(D, D.T)
    b = np.random.default_rng(11).standard_normal(op.shape[0])
    x = spla.lsqr(op, b, atol=1e-14, btol=1e-14, iter_lim=500)[0]
    assert np.linalg.norm(D @ x - b) <= 1e-9 * np.linalg.cond(D) * np.linalg.norm(b)
    x, info = spla.gmres(op.T, b, rtol=1e-12, restart=op.shape[0])
    assert info == 0 and np.linalg.norm(D.T @ x - b) <= 1e-9 * np.linalg.cond(D) * np.linalg.norm(b)


def test_registry_operator_types_accept_matrix_and_big_endian_arguments():
    """Every operator type of the registry (CPU): a matrix and a big-endian block."""
    for case_name in ("static-tall-f32", "sliding-float32-count-cholesky", "block-explicit",
                      "kfac-bias", "deflation", "lanczos", "kfac_corrected", "block_diag",
                      "fisher-static"):
        op = _BY_NAME[case_name].build("cpu")
        d = op.shape[0]
        D = op.todense().astype(np.float64)
        X = np.random.default_rng(12).standard_normal((d, 2))
        tol = 1e-5 if op.dtype == np.float32 else 1e-12
        ym = op @ X.view(np.matrix)
        assert type(ym) is np.matrix and _err(ym, D @ X) <= tol, case_name
        yb = op @ X.astype(">f8")
        assert yb.dtype == np.float64 and yb.dtype.isnative and _err(yb, D @ X) <= tol


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")
@pytest.mark.parametrize("builder", ["kfac", "ekfac", "kpsvd", "deflation", "lanczos",
                                     "kfac_corrected"])
def test_kronecker_builders_take_matrix_and_big_endian_statistics(builder):
    """The builders read their inputs through the backend's conversion: a numpy.matrix
    of activations/gradients is a plain array there, big-endian statistics native ones
    (before: 'only 0-dimensional arrays can be converted', LinAlgError, unpack errors)."""
    rng = np.random.default_rng(13)
    a, g = rng.standard_normal((40, 5)), rng.standard_normal((40, 4))
    fn = getattr(ml, builder)
    ref = fn(a, g, 0.1)
    x = rng.standard_normal(ref.shape[1])
    for args in ((np.matrix(a), np.matrix(g)), (a.astype(">f8"), g.astype(">f8"))):
        op = fn(*args, 0.1)
        assert op.dtype == np.float64 and op.dtype.isnative
        assert np.array_equal(op @ x, ref @ x)


def test_to_scipy_adapters_pickle_and_copy():
    """op.to_scipy() (a class built at run time) pickles and deep-copies as its operator
    (before: "Can't pickle ScipyAdapter", so check_operator's pickle check failed it)."""
    import copy
    import pickle
    G = np.random.default_rng(14).standard_normal((5, 7))
    a = ml.StaticInverseFisher(G, 0.3).to_scipy()
    x = np.arange(7.0)
    for b in (pickle.loads(pickle.dumps(a)), copy.deepcopy(a)):
        assert type(b) is type(a) and b.shape == a.shape and b.dtype == a.dtype
        assert np.array_equal(b @ x, a @ x) and np.array_equal(b.H @ x, a.H @ x)


@pytest.mark.parametrize("blocks", [{4: 1, 6: 2}, {4, 6}, frozenset({4, 6})])
def test_block_sizes_refuse_unordered_containers(blocks):
    """blocks= as a dict (its keys were taken) or a set (no order of the caller's)."""
    G = np.random.default_rng(15).standard_normal((5, 10))
    with pytest.raises(TypeError, match="^blocks must be an ordered sequence"):
        ml.BlockInverseFisher(G, 0.3, blocks=blocks)


@pytest.mark.parametrize("make", ["static", "block"])
def test_with_gradients_of_another_width_is_refused_by_name(make):
    """with_gradients(grads) of another d names grads (the static operator built an
    operator of the other size)."""
    G = np.random.default_rng(16).standard_normal((5, 10))
    op = (ml.StaticInverseFisher(G, 0.3) if make == "static"
          else ml.BlockInverseFisher(G, 0.3, block_size=5))
    with pytest.raises(ValueError, match=r"^grads must have shape \(m, 10\)"):
        op.with_gradients(G[:, :6])
    new = op.with_gradients(2 * G[:3])
    assert new.shape == op.shape
