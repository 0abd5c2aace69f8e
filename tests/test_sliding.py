"""SlidingWindowInverseFisher against a dense float64 model."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, precondition,
                                 rule)

import mfac_linalg as ml
from mfac_linalg import _backend as B

from battery import check_operator
from oracles import (EPS32, EPS64, bf16_bits, bf16_values, cond, dense_inverse, float32_tol,
                     float64_tol, rel_err)


def round_storage(g, dtype):
    """g as the window stores it: rounded to float32 / float16 / bfloat16 (round to nearest even)."""
    g = np.asarray(B.to_host(g), dtype=np.float64)
    if dtype == "float64":
        return g
    g32 = g.astype(np.float32)
    if dtype == "float16":
        return g32.astype(np.float16).astype(np.float64)
    if dtype == "bfloat16":
        return bf16_values(bf16_bits(g32)).astype(np.float64)
    return g32.astype(np.float64)


class DenseWindow:
    """The reference: a list of float64 gradients (as stored) and dense linear algebra."""

    def __init__(self, dim, window, damping, normalize, dtype="float64"):
        self.dim, self.window, self.damping, self.normalize = dim, window, damping, normalize
        self.dtype = dtype
        self.held = []

    def add(self, g):
        self.held.append(round_storage(g, self.dtype))
        self.held = self.held[-self.window:]

    def F(self):
        F = self.damping * np.eye(self.dim)
        if self.held:
            H = np.array(self.held)
            N = self.window if self.normalize == "window" else len(self.held)
            F += H.T @ H / N
        return F


def state_arrays(w):
    return {k: np.array(v, copy=True) if isinstance(v, np.ndarray) else v
            for k, v in w.state_dict().items()}


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], np.ndarray):
            assert np.array_equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


class WindowMachine(RuleBasedStateMachine):
    """Interleaves every operation against the dense model (float64, exact to 1e-9).

    Subclasses run it on the GPU and with float32 / 16-bit storage, against the
    dense model of the gradients as stored, with float32 tolerances.
    """

    DEVICE = "cpu"
    DTYPE = "float64"
    ACCUMULATE = "auto"

    @initialize(window=st.integers(1, 24), dim=st.integers(1, 30),
                normalize=st.sampled_from(["window", "count"]),
                log_damping=st.floats(-3, 1), refresh=st.sampled_from([None, 1, 3, 50]),
                seed=st.integers(0, 2**31),
                engine=st.sampled_from(["auto", "cholesky", "explicit"]))
    def setup(self, window, dim, normalize, log_damping, refresh, seed, engine):
        self.rng = np.random.default_rng(seed)
        lam = 10.0 ** log_damping
        self.be = B.backend_for_device(self.DEVICE)
        self.w = ml.SlidingWindowInverseFisher(dim, window, lam, dtype=self.DTYPE,
                                               device=self.DEVICE, normalize=normalize,
                                               refresh_every=refresh, engine=engine,
                                               accumulate=self.ACCUMULATE)
        self.ref = DenseWindow(dim, window, lam, normalize, self.DTYPE)

    def dev(self, a):
        return self.be.xp.asarray(a)

    def _grad(self, kind):
        g = self.rng.standard_normal(self.ref.dim)
        if kind == "zero":
            g[:] = 0
        elif kind == "dup" and self.ref.held:
            g = self.ref.held[-1].copy()
        elif kind == "big":
            g *= 1e3
        return g

    def _tol(self):
        # the window is a Woodbury (dual) method: rounding is amplified by
        # lambda_max(F) / lambda, which is cond(F) while fewer gradients than dim are
        # held and more once they span the space (docs/sliding.md, "Accuracy")
        F = self.ref.F()
        kappa = float(np.linalg.eigvalsh(F)[-1] / self.ref.damping)
        if self.DTYPE == "float64":
            tol = max(1e-9, float64_tol(kappa))
        elif self.w.accumulate == "float64":
            # float64-faithful passes (docs/math.md §7): the float32 rounding of the
            # result plus the float64 error
            tol = 10 * EPS32 + float64_tol(kappa)
        else:
            tol = float32_tol(kappa, self.ref.window)
        if self.w.engine == "explicit":
            # an explicit C^{-1} updated in place adds about eps cond(C)^2 kappa_W between
            # exact refreshes (docs/sliding.md, "Accuracy")
            N = self.ref.window if self.ref.normalize == "window" else max(len(self.ref.held), 1)
            s = N * self.ref.damping
            H = np.array(self.ref.held) if self.ref.held else np.zeros((0, self.ref.dim))
            cond_C = (np.linalg.eigvalsh(H @ H.T)[-1] + s) / s if len(H) else 1.0
            tol += 100 * self.ref.window * EPS64 * cond_C ** 2 * kappa
        return tol

    @rule(kind=st.sampled_from(["normal", "zero", "dup", "big"]))
    def update(self, kind):
        g = self._grad(kind)
        self.w.update(self.dev(g))
        self.ref.add(g)

    @rule(k=st.integers(1, 30))
    def update_batch(self, k):
        Gk = self.rng.standard_normal((k, self.ref.dim))
        self.w.update(self.dev(Gk))
        for g in Gk:
            self.ref.add(g)

    @rule(kind=st.sampled_from(["normal", "zero", "dup"]))
    def step(self, kind):
        g = self._grad(kind)
        y = self.w.step(self.dev(g))
        self.ref.add(g)
        ref = np.linalg.solve(self.ref.F(), self.ref.held[-1])  # F^{-1} g as stored
        assert rel_err(y, ref) <= self._tol()

    @rule()
    def bad_update_changes_nothing(self):
        before = state_arrays(self.w)
        bad = self.rng.standard_normal((3, self.ref.dim))
        bad[1, 0] = np.nan
        with pytest.raises(ValueError, match="g must be finite"):
            self.w.update(self.dev(bad))
        with pytest.raises(ValueError, match="g must be"):
            self.w.update(self.dev(np.ones(self.ref.dim + 1)))
        assert_same_state(before, state_arrays(self.w))

    @rule()
    def matvec_and_matmat(self):
        Fi = dense_inverse(self.ref.F())
        x = self.rng.standard_normal(self.ref.dim)
        X = self.rng.standard_normal((self.ref.dim, 3))
        assert rel_err(self.w.matvec(self.dev(x)), Fi @ x) <= self._tol()
        assert rel_err(self.w.matmat(self.dev(X)), Fi @ X) <= self._tol()

    @rule()
    def diagonal_entry_quad(self):
        Fi = dense_inverse(self.ref.F())
        assert rel_err(self.w.diagonal(), np.diag(Fi)) <= self._tol()
        i, j = self.rng.integers(0, self.ref.dim, 2)
        assert abs(self.w.entry(i, j) - Fi[i, j]) <= self._tol() * np.abs(Fi).max()
        x = self.rng.standard_normal(self.ref.dim)
        q = x @ Fi @ x
        assert abs(self.w.quad(self.dev(x)) - q) <= self._tol() * abs(q)
        F = self.ref.F()
        ld = np.linalg.slogdet(F)[1]
        assert abs(self.w.logdet() - ld) <= max(1e-9, self._tol()) * max(1, abs(ld))

    @rule()
    def save_load_bit_exact(self):
        import tempfile, os
        x = self.dev(self.rng.standard_normal(self.ref.dim))
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "w.npz")
            self.w.save(path)
            w2 = ml.SlidingWindowInverseFisher.load(path, device=self.DEVICE,
                                                    engine=self.w.engine,
                                                    accumulate=self.w.accumulate)
        g = self.rng.standard_normal(self.ref.dim)
        assert np.array_equal(B.to_host(w2.matvec(x)), B.to_host(self.w.matvec(x)))
        assert np.array_equal(B.to_host(w2.step(self.dev(g))), B.to_host(self.w.step(self.dev(g))))
        self.ref.add(g)
        assert_same_state(state_arrays(w2), state_arrays(self.w))

    @rule(engine=st.sampled_from(["auto", "cholesky", "explicit"]))
    def load_into_twin_of_the_other_normalization(self, engine):
        """Issue 10: a window of the other normalization (so, on the GPU, possibly the
        other engine) holding gradients of its own loads this state; the rules that
        follow query it between updates."""
        other = "count" if self.ref.normalize == "window" else "window"
        twin = ml.SlidingWindowInverseFisher(self.ref.dim, self.ref.window,
                                             2 * self.ref.damping, dtype=self.DTYPE,
                                             device=self.DEVICE, normalize=other,
                                             engine=engine, accumulate=self.ACCUMULATE)
        twin.update(self.dev(self.rng.standard_normal((2, self.ref.dim))))
        twin.load_state_dict(self.w.state_dict())
        assert twin.normalize == self.ref.normalize and twin.damping == self.ref.damping
        self.w = twin

    @precondition(lambda self: self.ref.held)
    @rule()
    def reset(self):
        self.w.reset()
        self.ref.held = []

    @invariant()
    def held_gradients(self):
        if not hasattr(self, "w"):
            return
        assert self.w.count == len(self.ref.held)
        got = B.to_host(self.w.gradients())
        assert got.shape == (len(self.ref.held), self.ref.dim)
        if self.ref.held:
            assert np.array_equal(got.astype(np.float64), np.array(self.ref.held))


TestWindowMachine = WindowMachine.TestCase
TestWindowMachine.settings = settings(stateful_step_count=25)


class WindowMachine32Wide(WindowMachine):
    """float32 storage with float64-faithful passes on the CPU: float32 results within
    a few float32 roundings of the dense model of the stored gradients."""
    DTYPE = "float32"
    ACCUMULATE = "float64"


TestWindowMachine32Wide = WindowMachine32Wide.TestCase
TestWindowMachine32Wide.settings = settings(stateful_step_count=20)

_needs_gpu = [pytest.mark.gpu,
              pytest.mark.skipif(not B.gpu_available(), reason="needs CuPy and a CUDA GPU")]


def _gpu_machine(dtype, accumulate="auto"):
    machine = type(f"WindowMachineGPU_{dtype}_{accumulate}", (WindowMachine,),
                   {"DEVICE": "gpu", "DTYPE": dtype, "ACCUMULATE": accumulate})
    case = machine.TestCase
    case.settings = settings(stateful_step_count=20)
    for mark in _needs_gpu:
        case = mark(case)
    return case


TestWindowMachineGPU64 = _gpu_machine("float64")
TestWindowMachineGPU32 = _gpu_machine("float32")
TestWindowMachineGPUbf16 = _gpu_machine("bfloat16")
TestWindowMachineGPUf16 = _gpu_machine("float16")
TestWindowMachineGPU32Wide = _gpu_machine("float32", "float64")      # the float64 kernels
TestWindowMachineGPUbf16Wide = _gpu_machine("bfloat16", "float64")


@pytest.mark.parametrize("normalize", ["window", "count"])
def test_battery_partly_and_fully_filled(backend, normalize, rng):
    d, m, lam = 40, 6, 0.05
    for n_added in (3, 6, 17):
        w = ml.SlidingWindowInverseFisher(d, m, lam, dtype="float64", normalize=normalize,
                                          device=backend.name)
        ref = DenseWindow(d, m, lam, normalize)
        for _ in range(n_added):
            g = rng.standard_normal(d)
            w.update(backend.xp.asarray(g))
            ref.add(g)
        F = ref.F()
        check_operator(w, dense_inverse(F), float64_tol(cond(F)), rng,
                       logdet=np.linalg.slogdet(F)[1], forward=F, forward_tol=1e-12)


def test_empty_window_is_identity_over_damping(rng):
    w = ml.SlidingWindowInverseFisher(12, 4, 0.5, dtype="float64")
    check_operator(w, np.eye(12) / 0.5, 1e-14, rng, logdet=12 * np.log(0.5),
                   forward=0.5 * np.eye(12))


@given(st.integers(1, 40), st.integers(0, 2**31), st.sampled_from(["window", "count"]))
def test_float32_storage_against_float64_reference(window, seed, normalize):
    rng = np.random.default_rng(seed)
    d = 50
    w = ml.SlidingWindowInverseFisher(d, window, 0.1, dtype="float32", normalize=normalize)
    ref = DenseWindow(d, window, 0.1, normalize)
    for _ in range(window + 7):
        g = rng.standard_normal(d)
        y = w.step(g)
        ref.add(g.astype(np.float32))
    F = ref.F()
    assert y.dtype == np.float64 and w.storage_dtype == "float32"
    assert rel_err(y, np.linalg.solve(F, g)) <= float32_tol(cond(F), window)


def test_long_run_drift_stays_at_rounding(rng):
    """>= 20 m updates with no refresh before the end, then the dense oracle."""
    d, m, lam = 60, 16, 1e-2
    w = ml.SlidingWindowInverseFisher(d, m, lam, dtype="float64", refresh_every=10**9)
    ref = DenseWindow(d, m, lam, "window")
    scales = np.logspace(-2, 2, 25 * m)
    for t in range(25 * m):
        g = rng.standard_normal(d) * scales[t]
        w.update(g)
        ref.add(g)
    st = w.state_dict()
    assert st["since_refresh"] == 25 * m  # every update was incremental
    F = ref.F()
    x = rng.standard_normal(d)
    assert rel_err(w.matvec(x), np.linalg.solve(F, x)) <= float64_tol(cond(F))
    # the incrementally updated factor (arrival order) matches a fresh one closely
    p = (st["count"] + np.arange(m)) % m
    Lfresh = np.linalg.cholesky(st["K"][np.ix_(p, p)] + m * lam * np.eye(m))
    assert rel_err(st["F"], Lfresh) < 1e-11


def test_default_refresh_bounds_drift(rng):
    d, m = 30, 8
    w = ml.SlidingWindowInverseFisher(d, m, 1e-3, dtype="float64")
    assert w.refresh_every == m
    ref = DenseWindow(d, m, 1e-3, "window")
    for _ in range(20 * m):
        g = rng.standard_normal(d)
        y = w.step(g)
        ref.add(g)
    F = ref.F()
    assert rel_err(y, np.linalg.solve(F, g)) <= float64_tol(cond(F))


def test_update_is_incremental_not_refactor(rng, monkeypatch):
    """Once full, updates never call the O(m^3) refactorization (until a refresh is due)."""
    from mfac_linalg import _capacitance as cap
    d, m = 20, 10
    w = ml.SlidingWindowInverseFisher(d, m, 0.1, dtype="float64", refresh_every=1000)
    calls = []
    orig = cap.cholesky_shifted
    monkeypatch.setattr(cap, "cholesky_shifted", lambda *a, **k: calls.append(1) or orig(*a, **k))
    for _ in range(5 * m):
        w.step(rng.standard_normal(d))
    assert calls == []


def test_step_equals_update_then_matvec(rng):
    d, m = 25, 7
    a = ml.SlidingWindowInverseFisher(d, m, 0.3, dtype="float64")
    b = ml.SlidingWindowInverseFisher(d, m, 0.3, dtype="float64")
    for _ in range(3 * m):
        g = rng.standard_normal(d)
        ya = a.step(g)
        b.update(g)
        yb = b.matvec(g)
        assert rel_err(ya, yb) < 1e-12


def test_step_two_passes_over_buffer(rng, monkeypatch):
    """The fused step reads the buffer twice (pass 1: write g and G g; pass 2: G^T c),
    no more: the ring buffer's passes are counted."""
    from mfac_linalg.sliding.buffer import RingBuffer
    d, m = 40, 8
    w = ml.SlidingWindowInverseFisher(d, m, 0.1, dtype="float64", refresh_every=1000)
    for _ in range(m + 2):
        w.update(rng.standard_normal(d))
    reads = []
    for name in ("begin", "project", "combine", "fisher_product", "held"):
        orig = getattr(RingBuffer, name)
        monkeypatch.setattr(RingBuffer, name,
                            lambda self, *a, _o=orig, _n=name, **k: reads.append(_n) or _o(
                                self, *a, **k))
    w.step(rng.standard_normal(d))
    # held() is the view both passes read through: once by combine (pass 2)
    assert reads == ["begin", "combine", "held"]


def test_window_larger_than_1024_and_not_multiple_of_32(rng):
    d, m = 8, 1100
    w = ml.SlidingWindowInverseFisher(d, m, 1.0, dtype="float64")
    ref = DenseWindow(d, m, 1.0, "window")
    Gk = rng.standard_normal((m + 5, d))
    w.update(Gk)
    for g in Gk:
        ref.add(g)
    x = rng.standard_normal(d)
    F = ref.F()
    assert rel_err(w.matvec(x), np.linalg.solve(F, x)) < 1e-10


def test_failed_batch_restores_everything_bit_exact(rng, monkeypatch):
    from mfac_linalg import _capacitance as cap
    d, m = 12, 5
    w = ml.SlidingWindowInverseFisher(d, m, 0.1, dtype="float64", refresh_every=1000)
    w.update(rng.standard_normal((7, d)))
    before = state_arrays(w)
    # a factor failure in the middle of a batch (after two rows went in)
    orig = cap.append
    n = [0]

    def failing(*a, **k):
        n[0] += 1
        if n[0] == 3:
            raise cap.NotPositiveDefinite("boom")
        return orig(*a, **k)
    monkeypatch.setattr(cap, "append", failing)
    monkeypatch.setattr(cap, "cholesky_shifted",
                        lambda *a, **k: (_ for _ in ()).throw(cap.NotPositiveDefinite("boom")))
    with pytest.raises(ValueError, match="boom"):
        w.update(rng.standard_normal((4, d)))
    assert_same_state(before, state_arrays(w))


def test_save_load_refuses_bad_files(tmp_path, rng):
    w = ml.SlidingWindowInverseFisher(10, 4, 0.1, refresh_every=100)
    w.update(rng.standard_normal((6, 10)))
    path = tmp_path / "w.npz"
    w.save(path)
    data = path.read_bytes()
    (tmp_path / "trunc.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cannot read a sliding-window file"):
        ml.SlidingWindowInverseFisher.load(tmp_path / "trunc.npz")
    st = dict(np.load(path, allow_pickle=False))
    for change, msg in [
        ({"format_version": np.array(99)}, "format version 99"),
        ({"G": st["G"][:, :5]}, r"G must have shape \(4, 10\)"),
        ({"count": np.array(-1)}, "count must be >= 0"),
        ({"K": st["K"].astype(np.float32)}, "K must have shape .* and dtype float64"),
        ({"normalize": np.array("bogus")}, "normalize must be"),
        ({"F": np.zeros((4, 4))}, "F is not the Cholesky factor"),
        ({"G": np.full((4, 10), np.nan, dtype=np.float32)}, "G holds NaN"),
    ]:
        bad = dict(st, **change)
        np.savez(tmp_path / "bad.npz", **bad)
        with pytest.raises(ValueError, match=msg):
            ml.SlidingWindowInverseFisher.load(tmp_path / "bad.npz")
    missing = {k: v for k, v in st.items() if k != "K"}
    np.savez(tmp_path / "missing.npz", **missing)
    with pytest.raises(ValueError, match=r"state is missing \['K'\]"):
        ml.SlidingWindowInverseFisher.load(tmp_path / "missing.npz")
    # a window with less held than capacity but junk rows beyond count
    w2 = ml.SlidingWindowInverseFisher(10, 4, 0.1)
    w2.update(rng.standard_normal((2, 10)))
    st2 = w2.state_dict()
    st2["G"][3] = 1.0
    with pytest.raises(ValueError, match="rows beyond 2 of G are not empty"):
        w2.load_state_dict(st2)
    # mismatched dimensions on load_state_dict
    with pytest.raises(ValueError, match="dim=10 does not match"):
        ml.SlidingWindowInverseFisher(11, 4, 0.1).load_state_dict(w.state_dict())


def test_bad_constructor_arguments():
    S = ml.SlidingWindowInverseFisher
    with pytest.raises(ValueError, match="window must be >= 1; got 0"):
        S(10, 0, 0.1)
    with pytest.raises(TypeError, match="dim must be an integer; got float"):
        S(10.0, 3, 0.1)
    with pytest.raises(ValueError, match="damping must be > 0"):
        S(10, 3, 0.0)
    with pytest.raises(ValueError, match=r"normalize must be one of \('window', 'count'\); "
                                         "got 'mean'"):
        S(10, 3, 0.1, normalize="mean")
    with pytest.raises(ValueError, match="dtype must be one of"):
        S(10, 3, 0.1, dtype="int8")
    with pytest.raises(ValueError, match="float16 and bfloat16 storage need the GPU"):
        S(10, 3, 0.1, dtype="bfloat16")
    with pytest.raises(ValueError, match="refresh_every must be >= 1"):
        S(10, 3, 0.1, refresh_every=0)


def test_bad_step_input_changes_nothing(rng):
    w = ml.SlidingWindowInverseFisher(6, 3, 0.1, dtype="float64")
    w.update(rng.standard_normal((2, 6)))
    before = state_arrays(w)
    with pytest.raises(ValueError, match=r"g must have shape \(6,\) for step"):
        w.step(np.ones((2, 6)))
    with pytest.raises(ValueError, match="g must be finite"):
        w.step(np.array([1, 2, 3, np.inf, 5, 6.0]))
    with pytest.raises(TypeError, match="g must be real"):
        w.update(np.ones(6, dtype=complex))
    assert_same_state(before, state_arrays(w))


def test_gradients_are_a_copy_in_arrival_order(rng):
    w = ml.SlidingWindowInverseFisher(3, 2, 1.0, dtype="float64")
    a, b, c = (rng.standard_normal(3) for _ in range(3))
    w.update(a).update(b).update(c)
    got = w.gradients()
    assert np.array_equal(got, np.array([b, c]))
    got[:] = 0
    assert np.array_equal(w.gradients(), np.array([b, c]))


def test_fisher_view_follows_updates(rng):
    w = ml.SlidingWindowInverseFisher(5, 2, 1.0, dtype="float64")
    f = w.fisher()
    assert np.allclose(f.todense(), np.eye(5))
    g = rng.standard_normal(5)
    w.update(g)
    assert np.allclose(f.todense(), np.eye(5) + np.outer(g, g) / 2)
    assert f.inverse() is w


@pytest.mark.gpu
@pytest.mark.skipif(not B.gpu_available(), reason="needs CuPy and a CUDA GPU")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("dim,window", [(1, 1), (13, 3), (1000, 37), (4099, 130)])
def test_gpu_kernel_path_step_and_matvec(dtype, dim, window):
    """The kernel path (odd dims: padding; windows below and above the 32/128 sizes)."""
    import cupy as cp
    rng = np.random.default_rng(dim + window)
    lam = 0.5
    w = ml.SlidingWindowInverseFisher(dim, window, lam, dtype=dtype, device="gpu",
                                      refresh_every=10**6)
    ref = DenseWindow(dim, window, lam, "window", dtype)
    for t in range(2 * window + 3):
        g = rng.standard_normal(dim)
        y = w.step(cp.asarray(g))
        ref.add(g)
    F = ref.F()
    assert isinstance(y, cp.ndarray) and y.dtype == np.float64
    assert rel_err(y, np.linalg.solve(F, ref.held[-1])) <= float32_tol(cond(F), window)
    x = rng.standard_normal(dim).astype(np.float32)
    yx = w.matvec(cp.asarray(x))
    assert yx.dtype == np.float32
    assert rel_err(yx, np.linalg.solve(F, x)) <= float32_tol(cond(F), window)


@pytest.mark.gpu
@pytest.mark.skipif(not B.gpu_available(), reason="needs CuPy and a CUDA GPU")
def test_gpu_bfloat16_error_bound_against_unrounded_reference():
    """bfloat16 storage against the float64 reference of the *unrounded* gradients.

    The documented bound (docs/sliding.md): relative error <= 2 * 2^-8 * cond(F)."""
    import cupy as cp
    rng = np.random.default_rng(7)
    dim, window, lam = 2000, 64, 1.0
    w = ml.SlidingWindowInverseFisher(dim, window, lam, dtype="bfloat16", device="gpu")
    ref = DenseWindow(dim, window, lam, "window", "float64")
    for _ in range(window + 10):
        g = rng.standard_normal(dim)
        w.update(cp.asarray(g))
        ref.add(g)
    F = ref.F()
    x = rng.standard_normal(dim)
    err = rel_err(w.matvec(cp.asarray(x)), np.linalg.solve(F, x))
    assert err <= 2 * 2.0 ** -8 * cond(F), (err, cond(F))
