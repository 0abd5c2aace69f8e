"""The shared operator battery for the module tests: a thin adapter over
:func:`mfac_linalg.testing.check_operator`, the one protocol battery (the registry of
tests/registry.py runs it on every operator kind with exact oracles).

A module test passes a dense float64 reference and a relative tolerance ``tol`` it
can justify for that reference; every method is checked against ``tol`` (the table's
constants are 1 and κ = 1 here: the caller's ``tol`` is the bound).  A tolerance
>= 0.5 is refused (such a check could not fail).
"""
import numpy as np

from mfac_linalg import testing as mt

#: what the adapter runs; pickling, read-only views and CG run in tests/test_protocol.py
_METHODS = ("structure", "matvec", "matmat", "rmatvec", "rmatmat", "matmul", "adjoint",
            "diagonal", "entry", "todense", "quad", "logdet", "to_scipy")
_ONES = {k: 1.0 for k in mt.DEFAULT_TOLERANCES}


def _oracle(dense, logdet):
    return mt.Oracle.from_dense(np.asarray(dense, dtype=np.float64), kappa=1.0, logdet=logdet,
                                exact_logdet=False)


def check_operator(op, dense, tol, rng, *, backend=None, logdet=None, forward=None,
                   forward_tol=None):
    """Check every protocol method of ``op`` against the dense matrix ``dense``.

    ``logdet``: the reference log det F (for an inverse-Fisher operator), compared with
    an absolute error of ``tol * d`` (first order: |tr(F⁻¹ δF)| <= d ||F⁻¹ δF||);
    ``forward``: the dense F, against which ``op.fisher()`` is checked the same way
    (tolerance ``forward_tol``, default ``tol``), and whose ``logdet()`` is compared
    with the reference too.  Returns the report (error / bound per check).
    """
    del backend  # the operator knows its backend
    d = np.asarray(dense).shape[0]
    orc = _oracle(dense, logdet)
    orc.logdet_scale = float(d)
    rep = mt.check_operator(op, orc, rng=rng, eps=float(tol), tolerances=_ONES,
                            methods=_METHODS)
    if forward is not None:
        f = op.fisher()
        ftol = float(forward_tol or tol)
        forc = _oracle(forward, logdet)
        forc.logdet_scale = float(d)
        mt.check_operator(f, forc, rng=rng, eps=ftol, tolerances=_ONES, methods=_METHODS)
        back = f.inverse()
        assert back is op or np.array_equal(np.asarray(back.todense()), np.asarray(op.todense()))
    return rep
