"""SciPy solvers as consumers: to_scipy() as A and as M; eigsh on fisher()."""
import numpy as np
import pytest
import scipy.sparse.linalg as spla

import mfac_linalg as ml

from oracles import dense_fisher


def _problem(rng, m=40, d=300):
    # gradients with a fast-decaying spectrum: F is ill-conditioned
    G = rng.standard_normal((m, d)) * np.logspace(0, -2, d)[None, :] * 30
    lam = 1e-3
    return G, lam


def _iters(solver, A, b, M=None, **kw):
    count = [0]
    x, info = solver(A, b, M=M, callback=lambda *_: count.__setitem__(0, count[0] + 1), **kw)
    return x, info, count[0]


@pytest.mark.parametrize("solver", [spla.cg, spla.minres, spla.gmres])
def test_preconditioner_speeds_up_solver(solver, rng):
    G, lam = _problem(rng)
    op = ml.StaticInverseFisher(G, lam)
    F = op.fisher().to_scipy()
    # a nearby system: F plus a small diagonal perturbation (what a preconditioner meets)
    Fd = dense_fisher(G, lam) + np.diag(rng.uniform(0, 1e-3, G.shape[1]))
    A = spla.aslinearoperator(Fd)
    b = rng.standard_normal(G.shape[1])
    # minres stops on the preconditioned residual: ask for a tight tolerance so that
    # every solver's true residual is checked against the same 1e-6 below
    # (restarted gmres at 1e-10 is sensitive to rounding in M at this conditioning,
    # kappa ~ 3e6: with the exact dense inverse as M it takes 20 iterations, ours 41)
    rtol = {spla.cg: 1e-10, spla.minres: 1e-13, spla.gmres: 1e-8}[solver]
    kw = {"rtol": rtol, "maxiter": 2000}
    if solver is spla.gmres:
        kw.update(restart=50, callback_type="pr_norm")
    x0, info0, it0 = _iters(solver, A, b, **kw)
    x1, info1, it1 = _iters(solver, A, b, M=op.to_scipy(), **kw)
    assert info1 == 0
    assert it1 < it0 / 5, (it0, it1)
    assert np.linalg.norm(Fd @ x1 - b) <= 1e-6 * np.linalg.norm(b)
    # the forward operator works as A
    x2, info2, _ = _iters(solver, F, b, M=op.to_scipy(), **kw)
    assert info2 == 0 and np.linalg.norm(dense_fisher(G, lam) @ x2 - b) <= 1e-6 * np.linalg.norm(b)


def test_eigsh_on_fisher_matches_dense(rng):
    G = rng.standard_normal((15, 120))
    lam = 0.05
    op = ml.StaticInverseFisher(G, lam)
    vals = spla.eigsh(op.fisher().to_scipy(), k=6, which="LA", return_eigenvectors=False)
    ref = np.linalg.eigvalsh(dense_fisher(G, lam))[-6:]
    assert np.allclose(np.sort(vals), ref, rtol=1e-9)
    # and on the inverse: its largest eigenvalue is 1/lambda (d > m)
    top = spla.eigsh(op.to_scipy(), k=1, which="LA", return_eigenvectors=False)
    assert np.isclose(top[0], 1 / lam, rtol=1e-9)


def test_scipy_adapter_matmat_and_dtype(rng):
    G = rng.standard_normal((5, 30)).astype(np.float32)
    lo = ml.StaticInverseFisher(G, 0.1).to_scipy()
    assert lo.dtype == np.float32
    X = rng.standard_normal((30, 4)).astype(np.float32)
    assert lo.matmat(X).shape == (30, 4)
    assert (lo @ X).shape == (30, 4)
    assert lo.adjoint() is lo


@pytest.mark.parametrize("solver", [spla.cg, spla.minres, spla.gmres])
def test_operators_are_scipy_operators_as_they_are(solver, rng):
    # no adapter needed: the operator itself is a LinearOperator (issue 15 item 1)
    G, lam = _problem(rng, m=20, d=120)
    op = ml.StaticInverseFisher(G, lam)
    assert isinstance(op, spla.LinearOperator) and spla.aslinearoperator(op) is op
    F = dense_fisher(G, lam)
    b = rng.standard_normal(120)
    kw = {"restart": 120} if solver is spla.gmres else {}
    x, info = solver(op.fisher(), b, M=op, rtol=1e-9, maxiter=200, **kw)
    assert info == 0
    assert np.linalg.norm(F @ x - b) <= 1e-8 * np.linalg.norm(b)
    # a lazily composed operator too: (F + F) x = b, preconditioned by op / 2
    x2, info = solver(op.fisher() + op.fisher(), b, M=op / 2, rtol=1e-9, maxiter=200, **kw)
    assert info == 0 and np.linalg.norm(2 * F @ x2 - b) <= 1e-8 * np.linalg.norm(b)


def test_adapter_of_a_non_symmetric_operator(rng):
    A = ml.StaticInverseFisher(rng.standard_normal((3, 10)), 0.2)
    Bk = ml.BlockInverseFisher(rng.standard_normal((4, 10)), 0.3, block_size=5)
    P = A @ Bk
    lo = P.to_scipy()
    D = A.todense() @ Bk.todense()
    x = rng.standard_normal(10)
    assert np.allclose(lo.matvec(x), D @ x, rtol=1e-12, atol=0)
    assert np.allclose(lo.rmatvec(x), D.T @ x, rtol=1e-12, atol=0)
    assert np.allclose(lo.H.matvec(x), D.T @ x, rtol=1e-12, atol=0)
    assert lo.H is not lo


@pytest.mark.gpu
@pytest.mark.skipif(not ml._backend.gpu_available(), reason="needs CuPy and a CUDA GPU")
def test_cupyx_solvers_with_to_cupyx(rng):
    import cupy as cp
    import cupyx.scipy.sparse.linalg as cspla
    G, lam = _problem(rng, m=20, d=120)
    op = ml.StaticInverseFisher(cp.asarray(G), lam)
    b = rng.standard_normal(120)
    A, M, bd = op.fisher().to_cupyx(), op.to_cupyx(), cp.asarray(b)
    try:
        x, info = cspla.cg(A, bd, M=M, rtol=1e-10, maxiter=200)
    except TypeError:           # CuPy versions that call it tol
        x, info = cspla.cg(A, bd, M=M, tol=1e-10, maxiter=200)
    assert info == 0
    F = dense_fisher(G, lam)
    assert np.linalg.norm(F @ cp.asnumpy(x) - b) <= 1e-8 * np.linalg.norm(b)
    with pytest.raises(TypeError, match="to_scipy\\(\\) needs a CPU operator"):
        op.to_scipy()
