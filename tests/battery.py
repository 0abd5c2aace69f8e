"""The shared operator battery: every operator of the library passes it.

A test builds the operator and a dense float64 oracle of the matrix it
represents, and calls :func:`check_operator` with a tolerance; the battery
checks every method of the protocol against the oracle.
"""
import numpy as np
import scipy.sparse.linalg as spla

from mfac_linalg import _backend as B

from oracles import rel_err


def _to(backend, a, dtype=None):
    a = np.asarray(a) if dtype is None else np.asarray(a, dtype=dtype)
    return a if backend.name == "cpu" else backend.xp.asarray(a)


def check_operator(op, dense, tol, rng, *, backend=None, logdet=None, forward=None,
                   forward_tol=None):
    """Check every protocol method of ``op`` against the dense matrix ``dense``.

    ``logdet``: the oracle log det F (inverse-Fisher operators); ``forward``:
    the dense F, checked against ``op.fisher()`` by the same battery.
    """
    backend = backend or op.backend
    d = dense.shape[0]
    assert op.shape == (d, d) and op.ndim == 2
    dtype = op.dtype
    nx = _to(backend, rng.standard_normal(d), dtype)
    X = _to(backend, rng.standard_normal((d, 3)), dtype)
    xh, Xh = B.to_host(nx).astype(np.float64), B.to_host(X).astype(np.float64)

    y = op.matvec(nx)
    assert y.shape == (d,) and y.dtype == dtype and isinstance(y, type(nx))
    assert rel_err(y, dense @ xh) <= tol, ("matvec", rel_err(y, dense @ xh), tol)
    y1 = op.matvec(nx[:, None])
    assert y1.shape == (d, 1)
    assert rel_err(y1[:, 0], dense @ xh) <= tol
    Y = op.matmat(X)
    assert Y.shape == (d, 3) and Y.dtype == dtype
    assert rel_err(Y, dense @ Xh) <= tol, ("matmat", rel_err(Y, dense @ Xh), tol)
    assert rel_err(op @ nx, dense @ xh) <= tol
    assert rel_err(op @ X, dense @ Xh) <= tol
    assert rel_err(nx @ op, xh @ dense) <= tol
    assert rel_err(op.rmatvec(nx), dense.T @ xh) <= tol
    assert rel_err(op.rmatmat(X), dense.T @ Xh) <= tol
    assert op.T is op and op.H is op and op.adjoint() is op
    # input dtype is kept: float64 in gives float64 out, whatever the storage
    y64 = op.matvec(_to(backend, xh))
    assert y64.dtype == np.float64 and rel_err(y64, dense @ xh) <= tol

    diag = op.diagonal()
    assert diag.shape == (d,)
    assert rel_err(diag, np.diag(dense)) <= tol, ("diagonal", rel_err(diag, np.diag(dense)))
    scale = np.abs(dense).max()
    for i, j in [(0, 0), (d - 1, 0), (0, d - 1), (d // 2, d // 3), (-1, -1)]:
        e = op.entry(i, j)
        assert isinstance(e, float)
        assert abs(e - dense[i, j]) <= tol * scale, ("entry", i, j, e, dense[i, j])
        assert op[i, j] == e

    q = op.quad(nx)
    qref = xh @ dense @ xh
    assert abs(q - qref) <= tol * np.linalg.norm(dense, 2) * (xh @ xh), ("quad", q, qref)
    qs = op.quad(X)
    assert qs.shape == (3,)
    assert rel_err(qs, np.einsum("ij,ij->j", Xh, dense @ Xh)) <= tol * np.linalg.cond(dense)

    T = op.todense()
    assert T.shape == (d, d) and rel_err(T, dense) <= tol

    if backend.name == "cpu":
        lo = op.to_scipy()
        assert isinstance(lo, spla.LinearOperator) and lo.shape == (d, d)
        assert rel_err(lo.matvec(xh.astype(dtype)), dense @ xh) <= tol
        assert rel_err(lo.matmat(Xh.astype(dtype)), dense @ Xh) <= tol
        assert rel_err(lo.H.matvec(xh.astype(dtype)), dense @ xh) <= tol
        # matmat is passed through explicitly: one call, not a loop over columns
        calls = []
        orig = op._matmat
        op._matmat = lambda Z: calls.append(Z.shape) or orig(Z)
        try:
            lo.matmat(Xh.astype(dtype))
        finally:
            del op._matmat
        assert calls == [(d, 3)]
    else:
        lo = op.to_cupyx()
        assert rel_err(lo.matvec(nx), dense @ xh) <= tol

    r = repr(op)
    assert r.startswith(f"<{type(op).__name__} d={d}") and dtype.name in r and op.device in r

    if logdet is not None:
        assert abs(op.logdet() - logdet) <= tol * max(1.0, abs(logdet)) * 10, (op.logdet(), logdet)
    if forward is not None:
        f = op.fisher()
        check_operator(f, forward, forward_tol or tol, rng, backend=backend,
                       logdet=None, forward=None)
        assert f.inverse() is op
        assert abs(f.logdet() - op.logdet()) == 0.0
