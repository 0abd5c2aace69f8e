"""Atomic updates of the sliding window under numerical failure, overflow, and threads.

Every update, step and batch either commits or raises a named error and leaves the
window bit for bit as it was (its whole ``state_dict``), on every engine and both
normalizations, while filling, with a refresh due, and in batches.
"""
import threading

import numpy as np
import pytest

import mfac_linalg as ml
from mfac_linalg import _backend as B

from oracles import dense_inverse, rel_err
from test_sliding import assert_same_state as _same, state_arrays as _state

ENGINES = ["cholesky", "explicit"]


def _dense_F(w):
    H = np.asarray(B.to_host(w.gradients()), dtype=np.float64)
    N = w.window if w.normalize == "window" else max(len(H), 1)
    return w.damping * np.eye(w.shape[0]) + H.T @ H / N


def _attempt(w, action, x):
    """Run ``action``; on an error the window must be bit-identical and still answer."""
    before = _state(w)
    y_before = B.to_host(w.matvec(x))
    try:
        action()
    except ValueError as exc:
        _same(before, _state(w))
        assert np.array_equal(B.to_host(w.matvec(x)), y_before)
        return exc
    return None


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("normalize", ["window", "count"])
def test_issue_reproducer_not_positive_definite(engine, normalize):
    """SlidingWindowInverseFisher(10, 4, 1e-8, normalize=...), g = 1e4 randn:
    update(g) then step(g) / update(g) / update([g, g]) with the same g again."""
    rng = np.random.default_rng(0)
    g = 1e4 * rng.standard_normal(10)
    x = rng.standard_normal(10)
    w = ml.SlidingWindowInverseFisher(10, 4, 1e-8, dtype="float64", normalize=normalize,
                                      engine=engine)
    w.update(g)
    for action in (lambda: w.step(g), lambda: w.update(g), lambda: w.update(np.stack([g, g]))):
        exc = _attempt(w, action, x)
        assert isinstance(exc, ml.NotPositiveDefinite), exc
        assert w.count == 1
    # the window is alive: a good gradient goes in (F is too ill-conditioned here,
    # lambda = 1e-8 against |g|^2 ~ 1e9, for a dense comparison: the state is checked)
    g2 = rng.standard_normal(10)
    w.update(g2)
    assert w.count == 2 and np.array_equal(w.gradients(), np.stack([g, g2]))
    assert np.isfinite(w.matvec(x)).all() and np.isfinite(w.logdet())


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("normalize", ["window", "count"])
@pytest.mark.parametrize("held,refresh", [(1, 100), (2, 100), (4, 100), (6, 100), (6, 1),
                                          (3, 1)])
@pytest.mark.parametrize("op", ["update", "step", "batch"])
def test_failing_updates_are_atomic_everywhere(engine, normalize, held, refresh, op):
    """Duplicates of the newest gradient at a scale where N*damping is below rounding:
    filling and full windows, refresh due or not, single and batched.  Each call either
    raises NotPositiveDefinite with the state untouched or commits a usable state."""
    rng = np.random.default_rng(held * 7 + refresh)
    d, m = 12, 4
    w = ml.SlidingWindowInverseFisher(d, m, 1e-9, dtype="float64", normalize=normalize,
                                      refresh_every=refresh, engine=engine)
    for _ in range(held):
        w.update(1e4 * rng.standard_normal(d))
    g = np.asarray(w.gradients()[-1])
    x = rng.standard_normal(d)
    act = {"update": lambda: w.update(g), "step": lambda: w.step(g),
           "batch": lambda: w.update(np.stack([rng.standard_normal(d), g, g]))}[op]
    exc = _attempt(w, act, x)
    if exc is not None:
        assert isinstance(exc, ml.NotPositiveDefinite)
    assert np.isfinite(B.to_host(w.matvec(x))).all()


@pytest.mark.parametrize("engine", ENGINES)
def test_gram_overflow_and_cast_overflow_are_refused(engine):
    rng = np.random.default_rng(1)
    d = 8
    w64 = ml.SlidingWindowInverseFisher(d, 3, 0.1, dtype="float64", engine=engine)
    w32 = ml.SlidingWindowInverseFisher(d, 3, 0.1, dtype="float32", engine=engine)
    for w in (w64, w32):
        w.update(rng.standard_normal((2, d)))
    x = rng.standard_normal(d)
    cases = [(w64, 1e155), (w32, 1e20)]          # finite, but g.g overflows
    for w, scale in cases:
        for action in (lambda: w.update(scale * rng.standard_normal(d)),
                       lambda: w.step(scale * rng.standard_normal(d)),
                       lambda: w.update(scale * rng.standard_normal((2, d)))):
            exc = _attempt(w, action, x)
            assert isinstance(exc, ValueError) and "g is too large" in str(exc), exc
    # a finite float64 gradient that overflows float32: checked after the cast
    exc = _attempt(w32, lambda: w32.update(np.full(d, 1e39)), x)
    assert exc is not None and "g must be finite" in str(exc)


@pytest.mark.parametrize("damping,dtype", [(1e-310, "float64"), (1e308, "float64"),
                                           (1e-25, "float32"), (1e30, "float32")])
def test_damping_outside_the_dtype_range_is_refused(damping, dtype):
    with pytest.raises(ValueError, match="damping must be in"):
        ml.SlidingWindowInverseFisher(5, 2, damping, dtype=dtype)


def test_bad_engine_and_types():
    S = ml.SlidingWindowInverseFisher
    with pytest.raises(ValueError, match="engine must be one of"):
        S(5, 2, 0.1, engine="qr")
    with pytest.raises(TypeError, match="window must be an integer; got float"):
        S(5, 2.0, 0.1)
    with pytest.raises(TypeError, match="check_finite must be True or False"):
        S(5, 2, 0.1, check_finite="yes")
    with pytest.raises(TypeError, match="damping must be a real number"):
        S(5, 2, "0.1")


def test_from_gradients_equals_updates_and_refuses_bad_input():
    rng = np.random.default_rng(2)
    G = rng.standard_normal((5, 9))
    w = ml.SlidingWindowInverseFisher.from_gradients(G, 0.3)
    assert (w.count, w.window, w.storage_dtype, w.engine) == (5, 5, "float64", "cholesky")
    assert np.array_equal(w.gradients(), G)
    ref = ml.SlidingWindowInverseFisher(9, 5, 0.3, dtype="float64").update(G)
    x = rng.standard_normal(9)
    F = 0.3 * np.eye(9) + G.T @ G / 5
    assert rel_err(w.matvec(x), np.linalg.solve(F, x)) < 1e-13
    assert rel_err(w.matvec(x), ref.matvec(x)) < 1e-13
    assert abs(w.logdet() - np.linalg.slogdet(F)[1]) < 1e-11
    blocks = ml.SlidingWindowInverseFisher.from_gradients(iter([G[:2], G[2:]]), 0.3, window=5)
    assert np.array_equal(blocks.matvec(x), w.matvec(x))
    with pytest.raises(ValueError, match="G must hold window=6 rows; got 5"):
        ml.SlidingWindowInverseFisher.from_gradients(iter([G[:2], G[2:]]), 0.3, window=6)
    bad = G.copy()
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="G must be finite"):
        ml.SlidingWindowInverseFisher.from_gradients(bad, 0.3)
    with pytest.raises(ValueError, match="G is too large"):
        ml.SlidingWindowInverseFisher.from_gradients(G * 1e160, 0.3)
    with pytest.raises(ValueError, match="G must be 2-D"):
        ml.SlidingWindowInverseFisher.from_gradients(G[0], 0.3)
    # an empty iterator leaked StopIteration; a later block of the wrong width or rank
    # gave NumPy's broadcast error or "got more"
    with pytest.raises(ValueError, match="at least one .* row block; got an empty"):
        ml.SlidingWindowInverseFisher.from_gradients(iter([]), 0.3, window=5)
    with pytest.raises(TypeError, match="G must be an array"):
        ml.SlidingWindowInverseFisher.from_gradients(None, 0.3)
    for block in (G[2:, :8], G[2], G[2:, :, None]):
        with pytest.raises(ValueError, match=r"G must be given as \(k, 9\) row blocks"):
            ml.SlidingWindowInverseFisher.from_gradients(iter([G[:2], block]), 0.3, window=5)


@pytest.mark.parametrize("engine", ENGINES)
def test_refresh_is_exact_and_public(engine):
    rng = np.random.default_rng(3)
    w = ml.SlidingWindowInverseFisher(20, 6, 0.05, dtype="float64", refresh_every=10**6,
                                      engine=engine)
    for _ in range(40):
        w.update(rng.standard_normal(20))
    fresh = ml.SlidingWindowInverseFisher.from_gradients(w.gradients(), 0.05)
    x = rng.standard_normal(20)
    w.refresh()
    assert w.state_dict()["since_refresh"] == 0
    assert rel_err(w.matvec(x), fresh.matvec(x)) < 1e-12


def test_threads_query_a_count_window_concurrently():
    """Issue 10: four threads calling matvec on a count-normalised window after a batch
    update; every result equals the serial one bit for bit, and later updates stay exact."""
    rng = np.random.default_rng(4)
    d, m = 300, 200
    for trial in range(3):
        w = ml.SlidingWindowInverseFisher(d, m, 0.1, dtype="float64", normalize="count")
        w.update(rng.standard_normal((150, d)))
        x = rng.standard_normal(d)
        serial = w.matvec(x)
        out, errors = [], []

        def work():
            try:
                for _ in range(10):
                    out.append(w.matvec(x))
            except Exception as exc:    # pragma: no cover - reported below
                errors.append(exc)
        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        assert len(out) == 40 and all(np.array_equal(y, serial) for y in out)
        for _ in range(10):
            w.update(rng.standard_normal(d))
        Fi = dense_inverse(_dense_F(w))
        assert rel_err(w.matvec(x), Fi @ x) < 1e-10


def test_threads_update_and_query_interleaved():
    """Updates from one thread while three threads query: every query sees a whole
    state (its result is F^{-1} x for one of the committed windows)."""
    rng = np.random.default_rng(5)
    d, m = 40, 5
    G = rng.standard_normal((30, d))
    x = rng.standard_normal(d)
    valid = []
    probe = ml.SlidingWindowInverseFisher(d, m, 0.2, dtype="float64")
    valid.append(probe.matvec(x))
    for g in G:
        valid.append(probe.update(g).matvec(x))
    w = ml.SlidingWindowInverseFisher(d, m, 0.2, dtype="float64")
    seen, stop = [], threading.Event()

    def reader():
        while not stop.is_set():
            seen.append(w.matvec(x))
    readers = [threading.Thread(target=reader) for _ in range(3)]
    for t in readers:
        t.start()
    for g in G:
        w.update(g)
    stop.set()
    for t in readers:
        t.join()
    assert seen and all(any(np.array_equal(y, v) for v in valid) for y in seen)


_gpu = [pytest.mark.gpu,
        pytest.mark.skipif(not B.gpu_available(), reason="needs CuPy and a CUDA GPU")]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("normalize", ["window", "count"])
def test_gpu_kernel_engines_are_atomic(dtype, engine, normalize):
    """The kernel path: near-singular duplicates (raise NotPositiveDefinite untouched, or
    commit), Gram products that overflow (ValueError naming g, untouched), a NaN.  With
    float32 accumulation: with float64 accumulation no Gram product of float32 values
    overflows (test_sliding_accumulate.py)."""
    import cupy as cp
    rng = np.random.default_rng(6)
    d = 200
    w = ml.SlidingWindowInverseFisher(d, 4, 1e-8, dtype=dtype, device="gpu",
                                      normalize=normalize, engine=engine,
                                      accumulate="float32")
    w.update(cp.asarray(1e4 * rng.standard_normal((2, d))))
    x = cp.asarray(rng.standard_normal(d), dtype=cp.float32)
    g = w.gradients()[-1]
    for action in (lambda: w.step(g), lambda: w.update(g), lambda: w.update(cp.stack([g, g]))):
        exc = _attempt(w, action, x)
        assert exc is None or isinstance(exc, ml.NotPositiveDefinite), exc
    big = cp.asarray(1e20 * rng.standard_normal(d), dtype=cp.float32)
    for action in (lambda: w.step(big), lambda: w.update(big)):
        exc = _attempt(w, action, x)
        assert exc is not None and "g is too large" in str(exc), exc
    nan = big.copy()
    nan[5] = cp.nan
    exc = _attempt(w, lambda: w.step(nan / 1e20), x)
    assert exc is not None and "g must be finite" in str(exc)


for _m in _gpu:
    test_gpu_kernel_engines_are_atomic = _m(test_gpu_kernel_engines_are_atomic)


@pytest.mark.gpu
@pytest.mark.skipif(not B.gpu_available(), reason="needs CuPy and a CUDA GPU")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gpu_load_of_a_count_state_into_an_explicit_window(dtype):
    """Issue 10's regression: d=64, m=6, lambda=0.5, three gradients held at load, a
    query between updates; matvec and logdet against the dense model of the values as
    stored (float32 tolerances)."""
    import cupy as cp
    from oracles import float32_tol, cond
    rng = np.random.default_rng(7)
    d, m, lam = 64, 6, 0.5
    src = ml.SlidingWindowInverseFisher(d, m, lam, dtype=dtype, device="gpu", normalize="count")
    src.update(cp.asarray(rng.standard_normal((3, d))))
    w = ml.SlidingWindowInverseFisher(d, m, lam, dtype=dtype, device="gpu")
    assert w.engine == "explicit"
    w.update(cp.asarray(rng.standard_normal((4, d))))
    w.load_state_dict(src.state_dict())
    assert w.normalize == "count" and w.engine == "cholesky"
    x = rng.standard_normal(d)
    for _ in range(5):
        H = B.to_host(w.gradients()).astype(np.float64)
        F = lam * np.eye(d) + H.T @ H / len(H)
        tol = float32_tol(cond(F), m)
        assert rel_err(w.matvec(cp.asarray(x)), np.linalg.solve(F, x)) <= tol
        assert abs(w.logdet() - np.linalg.slogdet(F)[1]) <= 1e-4 * abs(np.linalg.slogdet(F)[1])
        w.update(cp.asarray(rng.standard_normal(d)))
