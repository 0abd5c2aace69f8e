"""The bad-input battery (issue 11): every input class over every registered case.

Each bad call must raise TypeError (a wrong type) or ValueError (a bad value) whose
message names the argument, and leave the operator bit-identical (its pickled state
and its products).  Failures are collected per case and reported together.
"""
import pickle

import numpy as np
import pytest

import mfac_linalg as ml
from mfac_linalg import testing as mt

from registry import CASES, case_params

BAD_DAMPINGS = [(0.0, ValueError), (-1.0, ValueError), (float("nan"), ValueError),
                (float("inf"), ValueError), (1e-310, ValueError), (1e308, ValueError),
                ("0.1", TypeError), (True, TypeError)]


def _xp(device):
    if device == "cpu":
        return np
    import cupy
    return cupy


def _host(a):
    return a.get() if hasattr(a, "get") else np.asarray(a)


def fingerprint(op, device):
    """The operator's state, bit for bit: its pickle (where it pickles) and its products."""
    d = op.shape[0]
    xp = _xp(device)
    x = xp.asarray(np.linspace(-1.0, 1.0, d).astype(op.dtype))
    parts = [_host(op.matvec(x)).tobytes(), _host(op.diagonal()).tobytes()]
    if hasattr(op, "logdet"):
        parts.append(repr(op.logdet()))
    if hasattr(op, "count"):
        parts.append(repr(op.count))
    if hasattr(op, "gradients"):
        parts.append(_host(op.gradients()).tobytes())
    try:
        parts.append(pickle.dumps(op))
    except Exception:
        pass
    return parts


class Battery:
    """Runs bad calls, collecting what went wrong instead of stopping at the first."""

    def __init__(self, op, device):
        self.op, self.device = op, device
        self.before = fingerprint(op, device)
        self.failures = []

    def expect(self, label, fn, exc, name, *, allow_result=None):
        """``fn()`` must raise ``exc`` (a type or tuple) with ``name`` in the message;
        ``allow_result(r)`` may accept a returned value instead (a correct answer)."""
        try:
            r = fn()
        except exc as e:
            if name is not None and name not in str(e):
                self.failures.append(f"{label}: {type(e).__name__} does not name "
                                     f"{name!r}: {e}")
        except Exception as e:   # noqa: BLE001 - any other exception is the defect
            self.failures.append(f"{label}: raised {type(e).__name__} (expected "
                                 f"{getattr(exc, '__name__', exc)}): {e}")
        else:
            if allow_result is None or not allow_result(r):
                self.failures.append(f"{label}: no exception (expected "
                                     f"{getattr(exc, '__name__', exc)})")
        after = fingerprint(self.op, self.device)
        if after != self.before:
            self.failures.append(f"{label}: the operator changed after the failed call")
            self.before = after

    def check(self):
        assert not self.failures, (f"{len(self.failures)} bad-input failure(s):\n  "
                                   + "\n  ".join(self.failures))


def _vector_inputs(d, dtype, xp):
    """(label, value, exception, argument name) for a vector argument named x."""
    good = np.linspace(-1.0, 1.0, d)
    nan, inf = good.copy(), good.copy()
    nan[d // 2], inf[0] = np.nan, -np.inf
    return [
        ("str", "abc", TypeError),
        ("None", None, TypeError),
        ("object", object(), TypeError),
        ("dict", {"a": 1}, TypeError),
        ("complex", xp.asarray(good.astype(complex)), TypeError),
        ("ragged", [[1.0, 2.0], [3.0]], (TypeError, ValueError)),
        ("too long", xp.asarray(np.ones(d + 1, dtype)), ValueError),
        ("3-D", xp.asarray(np.ones((d, 1, 1), dtype)), ValueError),
        ("0-D", xp.asarray(np.float64(1.0)), ValueError),
        ("NaN", xp.asarray(nan.astype(dtype)), ValueError),
        ("inf", xp.asarray(inf.astype(dtype)), ValueError),
    ] + ([("masked NaN", np.ma.masked_invalid(nan), (TypeError, ValueError)),
          ("masked", np.ma.array(good, mask=good > 0), (TypeError, ValueError))]
         if xp is np else [])


@pytest.mark.parametrize("case,device", case_params())
def test_bad_products_indices_and_guards(case, device):
    op = case.build(device)
    d = op.shape[0]
    xp = _xp(device)
    bat = Battery(op, device)
    for label, v, exc in _vector_inputs(d, op.dtype, xp):
        bat.expect(f"matvec({label})", lambda: op.matvec(v), exc, "x")
        bat.expect(f"op @ ({label})", lambda: op @ v,
                   (TypeError, ValueError) if label == "0-D" else exc,
                   None if label == "0-D" else "x")
        bat.expect(f"quad({label})", lambda: op.quad(v), exc, "x")
        if label not in ("too long", "0-D"):     # (d,) is a bad shape only for matmat
            bat.expect(f"matmat({label})", lambda: op.matmat(v), exc, "X")
    bat.expect("matvec((d, 2))", lambda: op.matvec(xp.ones((d, 2), op.dtype)), ValueError, "x")
    bat.expect("matmat((d,))", lambda: op.matmat(xp.ones(d, op.dtype)), ValueError, "X")
    bat.expect("matmat((d+1, 2))", lambda: op.matmat(xp.ones((d + 1, 2), op.dtype)),
               ValueError, "X")
    # k = 0 columns: an empty result or a clean ValueError
    bat.expect("matmat((d, 0))", lambda: op.matmat(xp.ones((d, 0), op.dtype)), ValueError,
               "X", allow_result=lambda r: tuple(r.shape) == (d, 0))

    # finite values that overflow: in the cast to a float32 operator (1e39), or in the
    # intermediate products of a float64 one (1e300; F^-1 x itself is representable):
    # a ValueError naming x, or the right (finite) answer
    big = 1e39 if op.dtype == np.float32 else 1e300
    xbig = np.full(d, big)
    oracle = case.oracle_for(op)
    bound = 16 * oracle.kappa * (np.finfo(op.dtype).eps + oracle.model_error)

    def right(r):
        r = _host(r).astype(np.float64)
        ref = oracle.matmat(np.ones(d))            # F^-1 (big 1) = big F^-1 1: compare r / big
        return bool(np.isfinite(r).all()
                    and np.linalg.norm(r / big - ref) <= bound * np.linalg.norm(ref))

    bat.expect("matvec(overflowing)", lambda: op.matvec(xp.asarray(xbig)), ValueError, "x",
               allow_result=right)

    bad_index = [((d, 0), IndexError, "i"), ((0, -d - 1), ValueError, "j"),
                 ((1.0, 0), TypeError, "i"), ((0, True), TypeError, "j"),
                 (("0", 0), TypeError, "i"), ((None, 0), TypeError, "i")]
    for (i, j), exc, name in bad_index:
        bat.expect(f"entry({i!r}, {j!r})", lambda: op.entry(i, j), exc, name)
    bat.expect("op[3]", lambda: op[3], TypeError, "index")
    bat.expect("op[1:3, 0]", lambda: op[1:3, 0], TypeError, "i")
    bat.expect("op[0, 0, 0]", lambda: op[0, 0, 0], TypeError, "index")
    for v, exc in [(float("nan"), (TypeError, ValueError)), (-1, ValueError),
                   ("many", TypeError), (True, TypeError), (1, ValueError)]:
        bat.expect(f"todense(max_elements={v!r})", lambda: op.todense(max_elements=v), exc,
                   "max_elements")
    bat.check()


@pytest.mark.parametrize("case,device", case_params())
def test_bad_dampings(case, device):
    failures = []
    for value, exc in BAD_DAMPINGS:
        try:
            case.build(device, damping=value)
        except exc as e:
            if "damping" not in str(e):
                failures.append(f"damping={value!r}: message does not name damping: {e}")
        except Exception as e:   # noqa: BLE001
            failures.append(f"damping={value!r}: {type(e).__name__} instead of "
                            f"{exc.__name__}: {e}")
        else:
            failures.append(f"damping={value!r}: accepted")
    assert not failures, "\n".join(failures)


# -- gradient inputs of the constructors ---------------------------------------------------

def _grad_inputs(m, d):
    G = np.random.default_rng(0).standard_normal((m, d))
    nan = G.copy()
    nan[0, 0] = np.nan
    return [
        ("str", "abc", TypeError),
        ("None", None, TypeError),
        ("ragged", [[1.0, 2.0], [3.0]], (TypeError, ValueError)),
        ("1-D", G[0], ValueError),
        ("3-D", G[None], ValueError),
        ("empty", np.ones((0, d)), ValueError),
        ("complex", G.astype(complex), TypeError),
        ("NaN", nan, ValueError),
        ("masked NaN", np.ma.masked_invalid(nan), (TypeError, ValueError)),
        ("masked", np.ma.array(G, mask=G > 0), (TypeError, ValueError)),
    ]


def _expect(failures, label, fn, exc, name):
    try:
        fn()
    except exc as e:
        if name not in str(e):
            failures.append(f"{label}: message does not name {name!r}: {e}")
    except Exception as e:   # noqa: BLE001
        failures.append(f"{label}: {type(e).__name__}: {e}")
    else:
        failures.append(f"{label}: accepted")


@pytest.mark.parametrize("ctor", ["static", "block"])
def test_bad_gradients(ctor):
    make = {"static": lambda G: ml.StaticInverseFisher(G, 0.1),
            "block": lambda G: ml.BlockInverseFisher(G, 0.1, block_size=2)}[ctor]
    failures = []
    for label, G, exc in _grad_inputs(4, 6):
        _expect(failures, label, lambda: make(G), exc, "grads")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("ctor", ["static", "block"])
@pytest.mark.parametrize("dtype,scale", [("float64", 1e155), ("float32", 1e20)])
def test_gradients_whose_gram_overflows(ctor, dtype, scale):
    """Finite gradients whose Gram products overflow: a ValueError naming grads, or the
    right answer (checked against the exact Woodbury form in mpmath)."""
    import mpmath
    rng = np.random.default_rng(1)
    G = (rng.standard_normal((3, 6)) * scale).astype(dtype)
    make = {"static": lambda: ml.StaticInverseFisher(G, 0.1),
            "block": lambda: ml.BlockInverseFisher(G, 0.1, blocks=[6])}[ctor]
    try:
        op = make()
    except ValueError as e:
        assert "grads" in str(e)
        return
    x = np.ones(6, dtype=dtype)
    y = op.matvec(x).astype(np.float64)
    with mpmath.workprec(300):
        Gm = mpmath.matrix(G.astype(np.float64).tolist())
        C = Gm * Gm.T + 3 * mpmath.mpf(0.1) * mpmath.eye(3)
        xm = mpmath.matrix([1.0] * 6)
        ref = (xm - Gm.T * mpmath.lu_solve(C, Gm * xm)) / mpmath.mpf(0.1)
        ref = np.array([float(v) for v in ref])
    eps = np.finfo(dtype).eps
    assert np.linalg.norm(y - ref) <= 16 * eps * np.linalg.norm(ref), (y, ref)


def test_bad_block_layouts():
    G = np.ones((2, 10))
    failures = []
    for blocks, exc, name in [([12.9, 8.2], TypeError, "blocks"), ([3, 3], ValueError, "blocks"),
                              ([0, 10], ValueError, "blocks"), ("abc", TypeError, "blocks")]:
        _expect(failures, f"blocks={blocks!r}", lambda: ml.BlockInverseFisher(
            G, 0.1, blocks=blocks), exc, name)
    for bs, exc in [(0, ValueError), (2.5, TypeError), (True, TypeError)]:
        _expect(failures, f"block_size={bs!r}", lambda: ml.BlockInverseFisher(
            G, 0.1, block_size=bs), exc, "block_size")
    assert not failures, "\n".join(failures)


KRON = ["kfac", "ekfac", "kpsvd", "deflation", "kfac_corrected", "lanczos"]


@pytest.mark.parametrize("method", KRON)
def test_bad_kronecker_inputs(method):
    if not hasattr(ml, method):
        pytest.skip(f"no ml.{method}")
    f = getattr(ml, method)
    rng = np.random.default_rng(0)
    a, g = rng.standard_normal((20, 3)), rng.standard_normal((20, 2))
    failures = []
    for label, A, exc in _grad_inputs(20, 3):
        if label == "empty":
            continue
        _expect(failures, f"activations {label}", lambda: f(A, g, 0.1), exc, "activations")
        _expect(failures, f"output_grads {label}", lambda: f(a, A[:, :2] if getattr(
            A, "ndim", 0) == 2 else A, 0.1), exc, "output_grads")
    _expect(failures, "mismatched samples", lambda: f(a, g[:10], 0.1), ValueError,
            "output_grads")
    if method in ("kpsvd", "deflation", "kfac_corrected", "lanczos"):
        for tol, exc in [(float("nan"), ValueError), (-1.0, ValueError), (0.0, ValueError),
                         ("1e-8", TypeError)]:
            _expect(failures, f"tol={tol!r}", lambda: f(a, g, 0.1, tol=tol), exc, "tol")
        for mi, exc in [(0, ValueError), (True, TypeError), (2.5, TypeError)]:
            _expect(failures, f"maxiter={mi!r}", lambda: f(a, g, 0.1, maxiter=mi), exc,
                    "maxiter")
    assert not failures, "\n".join(failures)


def test_bad_block_diag():
    op = ml.StaticInverseFisher(np.ones((2, 3)), 0.1)
    failures = []
    _expect(failures, "empty", lambda: ml.block_diag([]), ValueError, "")
    _expect(failures, "not an operator", lambda: ml.block_diag([op, "x"]), TypeError, "ops[1]")
    assert not failures, "\n".join(failures)


# -- the sliding window's own inputs ---------------------------------------------------------

@pytest.mark.parametrize("case,device", case_params(kinds=("sliding",)))
def test_bad_updates_leave_the_window_intact(case, device):
    win = case.build(device)
    d = win.shape[0]
    xp = _xp(device)
    bat = Battery(win, device)
    storage = np.dtype(np.float32 if case.dtype != "float64" else np.float64)
    big = 1e39 if storage == np.float32 else 1e300      # finite in float64, not in storage
    gram = 1e20 if storage == np.float32 else 1e155     # finite, but g.g overflows
    cases = _vector_inputs(d, np.float64, xp) + [
        ("overflows storage", xp.asarray(np.full(d, big)), ValueError)]
    if win.accumulate == "float32" or storage == np.float64:
        # float64 accumulation over float32 storage cannot overflow: such a g is taken
        # (test_sliding_accumulate.py::test_float64_accumulation_takes_huge_float32_gradients)
        cases.append(("Gram overflows", xp.asarray(np.full(d, gram, dtype=storage)), ValueError))
    for label, g, exc in cases:
        bat.expect(f"update({label})", lambda: win.update(g), exc, "g")
        bat.expect(f"step({label})", lambda: win.step(g), exc, "g")
    bat.check()


def test_bad_window_construction():
    failures = []
    W = ml.SlidingWindowInverseFisher
    for kw, exc, name in [({"dim": 0}, ValueError, "dim"), ({"dim": 4.7}, TypeError, "dim"),
                          ({"dim": True}, TypeError, "dim"), ({"window": 0}, ValueError, "window"),
                          ({"window": "3"}, TypeError, "window"),
                          ({"dtype": "int8"}, (TypeError, ValueError), "dtype"),
                          ({"normalize": "foo"}, ValueError, "normalize"),
                          ({"normalize": 1}, TypeError, "normalize"),
                          ({"refresh_every": 0}, ValueError, "refresh_every")]:
        args = {"dim": 4, "window": 3, "damping": 0.1}
        args.update(kw)
        _expect(failures, repr(kw), lambda: W(**args), exc, name)
    assert not failures, "\n".join(failures)


def test_oracle_of_the_registry_is_exact():
    """The bad-input battery's 'right answer' path relies on the registry's oracles; they
    are exact: F times the oracle's F^-1 x gives x back to rounding (static case)."""
    case = next(c for c in CASES if c.name == "static-tall-duplicates-f64")
    o = case.oracle()
    x = np.linspace(-1, 1, o.d)
    y = o.matmat(x)
    back = o.fisher.matmat(y)
    assert np.linalg.norm(back - x) <= 4 * np.finfo(float).eps * o.kappa * np.linalg.norm(x)
    assert isinstance(o, mt.Oracle)


@pytest.mark.parametrize("method", ["kpsvd", "deflation", "lanczos"])
def test_kronecker_init_with_nan_is_refused(method):
    if not hasattr(ml, method):
        pytest.skip(f"no ml.{method}")
    rng = np.random.default_rng(0)
    a, g = rng.standard_normal((20, 3)), rng.standard_normal((20, 2))
    init = np.full((3, 3), np.nan)
    with pytest.raises(ValueError, match="init"):
        getattr(ml, method)(a, g, 0.1, init=init)


def test_dlpack_tensors_from_torch():
    """Issue 11 item 10: a bfloat16 CPU tensor follows the dtype policy (promoted), a tensor
    that requires grad is read without error; results come back as arrays, right."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    G = rng.standard_normal((3, 6))
    op = ml.StaticInverseFisher(G, 0.1)
    oracle = mt.inverse_fisher_oracle(G, 0.1)
    x = torch.linspace(-1, 1, 6, dtype=torch.float64, requires_grad=True)
    y = np.asarray(op.matvec(x))
    ref = oracle.matmat(np.linspace(-1, 1, 6))
    assert np.linalg.norm(y - ref) <= 16 * oracle.kappa * np.finfo(float).eps * np.linalg.norm(ref)
    xb = torch.linspace(-1, 1, 6, dtype=torch.bfloat16)
    yb = np.asarray(op.matvec(xb), dtype=np.float64)
    xr = xb.to(torch.float64).numpy()
    ref = oracle.matmat(xr)
    eps32 = np.finfo(np.float32).eps
    assert np.linalg.norm(yb - ref) <= 16 * oracle.kappa * eps32 * np.linalg.norm(ref)
    Gb = torch.tensor(G, dtype=torch.bfloat16)
    opb = ml.StaticInverseFisher(Gb, 0.1)
    held = Gb.to(torch.float64).numpy()
    ob = mt.inverse_fisher_oracle(held, 0.1)
    z = np.linspace(-1, 1, 6).astype(opb.dtype)
    assert np.linalg.norm(opb.matvec(z) - ob.matmat(z)) <= 16 * ob.kappa * np.finfo(
        opb.dtype).eps * np.linalg.norm(ob.matmat(z))


def test_from_gradients_window_disagreeing_with_an_array():
    """from_gradients(G, window=k) with an (m, dim) array and k != m: a ValueError naming
    window, or a window of k slots holding the last k rows; never an argument ignored."""
    G = np.random.default_rng(0).standard_normal((8, 10))
    try:
        w = ml.SlidingWindowInverseFisher.from_gradients(G, 0.1, window=6)
    except ValueError as e:
        assert "window" in str(e)
        return
    assert w.window == 6 and np.array_equal(np.asarray(w.gradients()), G[-6:]), (
        f"window=6 ignored: window {w.window}, count {w.count}")


def test_results_that_overflow_are_refused_by_name_on_the_cpu():
    """Finite x whose product with the operator is finite in every intermediate but whose
    result overflows float32 once scaled by 1/lambda: refused like products that overflow
    (it came back as inf with a RuntimeWarning from the window and the static operator)."""
    import warnings
    rng = np.random.default_rng(0)
    G = (1e-3 * rng.standard_normal((4, 8))).astype(np.float32)
    x = np.full(16, 1e30, dtype=np.float32)
    ops = [ml.SlidingWindowInverseFisher.from_gradients(G, 1e-10),
           ml.StaticInverseFisher(G, 1e-10),
           ml.BlockInverseFisher(G, 1e-10, block_size=8),
           # rank-deficient factors (2 samples, 5 inputs): x has a part that F^-1 scales by
           # about 1/lambda
           ml.kfac((1e-3 * rng.standard_normal((2, 5))).astype(np.float32),
                   rng.standard_normal((2, 2)).astype(np.float32), 1e-10)]
    for op in ops:
        xx = x[:op.shape[0]]
        before = op.matvec(np.ones(op.shape[0], dtype=np.float32))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for call in (op.matvec, lambda v: op.matmat(v[:, None]), op.rmatvec):
                with pytest.raises(ValueError, match="[xX] is too large: its products with the "
                                                     "operator overflow"):
                    call(xx)
        assert np.array_equal(op.matvec(np.ones(op.shape[0], dtype=np.float32)), before)
    # without the check the inf comes back (the caller opted out)
    quiet = ml.StaticInverseFisher(G, 1e-10, check_finite=False)
    with np.errstate(over="ignore", invalid="ignore"):
        assert not np.isfinite(quiet.matvec(x[:8])).all()


def test_quad_of_an_operator_whose_entries_overflow_is_refused():
    """quad scales x to unit size first, so a finite x whose form overflows gives inf;
    an operator whose own entries overflow (1e400) gives NaN inside the form: refused
    by name, as matvec refuses it (it returned NaN)."""
    op = ml.StaticInverseFisher(np.random.default_rng(0).standard_normal((3, 5)), 0.5)
    P = (1e200 * op) @ (1e200 * op)
    x = np.array([1.0, -1.0, 0.5, 0.0, 2.0])
    for call in (P.matvec, P.quad, lambda v: P.quad(np.stack([v, v], 1))):
        with pytest.raises(ValueError, match="x is too large"):
            call(x)
    assert op.quad(np.full(5, 1e200)) == np.inf


def test_todense_takes_any_nonnegative_integer_limit():
    op = ml.StaticInverseFisher(np.random.default_rng(0).standard_normal((3, 6)), 0.5)
    assert op.todense(max_elements=2**64).shape == (6, 6)        # beyond float64's ints
    with pytest.raises(ValueError, match="max_elements"):
        op.todense(max_elements=-(2**64))
    with pytest.raises(TypeError, match="max_elements"):
        op.todense(max_elements=True)
