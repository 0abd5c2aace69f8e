"""Bad input: the right exception type, a message naming the argument, no state damaged."""
import numpy as np
import pytest

import mfac_linalg as ml
from mfac_linalg import _backend as B
from mfac_linalg._operator import NonFiniteInput, Operator


@pytest.fixture
def op(rng):
    return ml.StaticInverseFisher(rng.standard_normal((4, 10)), 0.1)


@pytest.mark.parametrize("grads,exc,msg", [
    (np.ones(5), ValueError, r"grads must be 2-D \(m, d\); got shape \(5,\)"),
    (np.ones((2, 3, 4)), ValueError, r"grads must be 2-D \(m, d\); got shape \(2, 3, 4\)"),
    (np.ones((0, 5)), ValueError, r"grads must hold at least 1 gradient.*got shape \(0, 5\)"),
    (np.ones((3, 0)), ValueError,
     r"grads must hold at least 1 gradient.*dimension >= 1; got shape \(3, 0\)"),
    (np.array([[1.0, np.nan]]), ValueError, r"grads must be finite"),
    (np.array([[1.0, np.inf]]), ValueError, r"grads must be finite"),
    (np.ones((2, 2), dtype=complex), TypeError, r"grads must be real; got complex"),
    (np.array([["a", "b"]]), TypeError, r"grads must have a real numeric dtype"),
    ("not an array", TypeError,
     r"grads must be an array \(NumPy, CuPy or a DLPack tensor\); got str"),
    (object(), TypeError, r"grads must be an array"),
])
def test_bad_grads(grads, exc, msg):
    with pytest.raises(exc, match=msg):
        ml.StaticInverseFisher(grads, 0.1)


@pytest.mark.parametrize("damping,exc,msg", [
    (0.0, ValueError, r"damping must be > 0(\.0)?; got 0\.0"),
    (-1e-3, ValueError, r"damping must be > 0(\.0)?; got -0\.001"),
    (float("nan"), ValueError, r"damping must be a number; got nan"),
    (float("inf"), ValueError, r"damping must be finite; got inf"),
    (1e-310, ValueError,
     r"damping must be in \[1.5e-154, 1.3e\+154\] for float64 results; got 1e-310"),
    (1e308, ValueError, r"damping must be in \[.*\] for float64 results; got 1e\+308"),
    ("0.1", TypeError, r"damping must be a real number; got str '0.1'"),
    (np.array([0.1, 0.2]), TypeError, r"damping must be a real number; got ndarray"),
    (True, TypeError, r"damping must be a real number; got bool True"),
    (1 + 1j, TypeError, r"damping must be a real number; got complex"),
])
def test_bad_damping(damping, exc, msg):
    with pytest.raises(exc, match=msg):
        ml.StaticInverseFisher(np.ones((2, 3)), damping)


def test_damping_accepts_numpy_scalars_and_ints():
    assert ml.StaticInverseFisher(np.ones((2, 3)), np.float32(0.5)).damping == 0.5
    assert ml.StaticInverseFisher(np.ones((2, 3)), 2).damping == 2.0
    assert ml.StaticInverseFisher(np.ones((2, 3)), np.array(0.25)).damping == 0.25


@pytest.mark.parametrize("x,msg", [
    (np.ones(9), r"x must have shape \(10,\) or \(10, k\); got shape \(9,\)"),
    (np.ones((10, 1, 1)), r"x must be 1-D \(d,\) or 2-D \(d, k\); got shape \(10, 1, 1\)"),
    (np.full(10, np.nan), r"x must be finite"),
    (np.ones((10, 2)), r"x must have shape \(10,\) or \(10, 1\); got shape \(10, 2\)"),
])
def test_bad_vectors_matvec(op, x, msg):
    with pytest.raises(ValueError, match=msg):
        op.matvec(x)


def test_bad_matmat_and_quad(op):
    with pytest.raises(ValueError, match=r"X must be 2-D with shape \(10, k\); got shape \(10,\)"):
        op.matmat(np.ones(10))
    with pytest.raises(ValueError,
                       match=r"X must have shape \(10,\) or \(10, k\); got shape \(3, 2\)"):
        op.matmat(np.ones((3, 2)))
    with pytest.raises(ValueError, match=r"x must be finite"):
        op.quad(np.full(10, np.inf))
    with pytest.raises(TypeError, match=r"x must be real; got complex"):
        op.matvec(np.ones(10, dtype=complex))


def test_check_finite_can_be_turned_off(rng):
    op = ml.StaticInverseFisher(rng.standard_normal((4, 10)), 0.1, check_finite=False)
    assert np.isnan(op.matvec(np.full(10, np.nan))).all()


@pytest.mark.parametrize("i,j,exc,msg", [
    (10, 0, IndexError, r"i must be in \[-10, 10\); got 10"),
    (0, -11, ValueError, r"j must be in \[-10, 10\); got -11"),
    (1.0, 0, TypeError, r"i must be an integer; got float"),
    (0, True, TypeError, r"j must be an integer; got bool"),
])
def test_bad_entry(op, i, j, exc, msg):
    with pytest.raises(exc, match=msg):
        op.entry(i, j)


def test_getitem_needs_a_pair(op):
    with pytest.raises(TypeError, match=r"index with a pair of integers"):
        op[3]
    with pytest.raises(TypeError, match=r"i must be an integer; got slice"):
        op[1:3, 0]
    assert op[np.int64(-1), np.int32(0)] == op.entry(9, 0)


def test_todense_size_guard(rng):
    op = ml.StaticInverseFisher(rng.standard_normal((2, 5000)), 1.0)
    with pytest.raises(ValueError,
                       match=r"todense would build a 5000 x 5000 matrix.*max_elements"):
        op.todense(max_elements=10**6)
    assert op.todense(max_elements=25 * 10**6).shape == (5000, 5000)


def test_failed_calls_leave_operator_intact(op, rng):
    x = rng.standard_normal(10)
    y0 = op.matvec(x)
    for bad in (np.ones(3), np.full(10, np.nan), np.ones((10, 2, 1))):
        with pytest.raises(ValueError):
            op.matvec(bad)
    assert np.array_equal(op.matvec(x), y0)


def test_to_cupyx_refused_on_cpu(op):
    with pytest.raises(TypeError, match=r"to_cupyx\(\) needs a GPU operator"):
        op.to_cupyx()


class _SelfChecking(Operator):
    """2 I, with a _matmat that checks single vectors for NaN/inf itself (the protocol
    the GPU sliding window uses to fold the check into its first pass)."""

    def __init__(self, d, check_finite=True):
        self._init_operator(d, np.float64, B.backend_for_device("cpu"),
                            check_finite=check_finite)

    def _checks_own_finite(self, X):
        return X.shape[1] == 1

    def _matmat(self, X):
        if X.shape[1] == 1 and self._check_finite and not np.isfinite(X).all():
            raise NonFiniteInput
        return 2 * X


def test_operators_can_check_finiteness_in_their_own_pass(monkeypatch):
    calls = []
    real = B.check_finite
    monkeypatch.setattr(B, "check_finite", lambda *a: calls.append(a[1]) or real(*a))
    op = _SelfChecking(4)
    bad = np.array([1.0, np.nan, 0.0, 0.0])
    # one vector: the operator's own check, named after the argument; no separate pass
    with pytest.raises(ValueError, match=r"^x must be finite; got NaN or infinity$"):
        op.matvec(bad)
    with pytest.raises(ValueError, match=r"^x must be finite"):
        op @ bad
    with pytest.raises(ValueError, match=r"^X must be finite"):
        op.matmat(bad[:, None])
    assert calls == []
    assert np.array_equal(op.matvec(np.ones(4)), 2 * np.ones(4))
    # several columns, and quad (not a _matmat call): the generic check runs
    with pytest.raises(ValueError, match=r"^X must be finite"):
        op.matmat(np.stack([bad, bad], axis=1))
    with pytest.raises(ValueError, match=r"^x must be finite"):
        op.quad(bad)
    assert calls == ["X", "x"]
    # check_finite=False: neither check, NaN goes through
    assert np.isnan(_SelfChecking(4, check_finite=False).matvec(bad)).any()
