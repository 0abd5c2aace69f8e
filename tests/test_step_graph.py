"""A full GPU window's update and step as one CUDA graph (``mfac_linalg.kernels.step_graph``).

The graph runs the kernels the window otherwise launches one by one, with the slot and
the addresses that change from call to call read from the device: every result and the
whole state must be bit for bit those of a twin whose buffer launches one by one
(``CudaRingBuffer.graphs``: on for the first window, off for its twin), through
filling, refreshes, exact rebuilds, failed updates and batches, a reset, a loaded
checkpoint and another stream.  d stays within one column chunk of pass 1 (8192 float32
values) on purpose: beyond it pass 1's float64 atomics make u, and everything after it,
differ from run to run in the last bits.
"""
import numpy as np
import pytest

import mfac_linalg as ml
from mfac_linalg import _backend as B

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not B.gpu_available(), reason="needs CuPy and a CUDA GPU")]


def _twins(dim, window, lam, **kw):
    """(graph window, twin launching one by one)."""
    a = ml.SlidingWindowInverseFisher(dim, window, lam, device="gpu", **kw)
    b = ml.SlidingWindowInverseFisher(dim, window, lam, device="gpu", **kw)
    a._buf.graphs, b._buf.graphs = True, False
    return a, b


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert np.array_equal(sa[k], sb[k]), k


@pytest.fixture
def launches(monkeypatch):
    """The pushes a StepGraph ran, as (window full, since_refresh) of its engine."""
    from mfac_linalg.kernels import step_graph as SG
    seen = []
    real = SG.StepGraph.launch

    def spy(self, slot, x, y):
        seen.append((self.eng.n, slot))
        return real(self, slot, x, y)
    monkeypatch.setattr(SG.StepGraph, "launch", spy)
    return seen


def _expect_graph(w):
    """Whether the window's next single update or step should run as the graph."""
    return (w.count == w.window and w._since_refresh < w.refresh_every
            and w.engine == "explicit")


def _graph(w, want_y):
    kept = w._buf._graphs.get(want_y)
    return None if kept is None else kept[3]


def _gradients(rng, dim, k):
    """k gradients with the awkward ones among them: scales over decades, a duplicate, a
    zero gradient."""
    gs = []
    for i in range(k):
        g = rng.standard_normal(dim) * 10.0 ** rng.integers(-2, 3)
        if i % 7 == 3 and gs:
            g = gs[-1].copy()
        if i % 11 == 5:
            g = np.zeros(dim)
        gs.append(g.astype(np.float32))
    return gs


@pytest.mark.parametrize("dtype,accumulate", [("float32", "auto"), ("float32", "float32"),
                                              ("bfloat16", "auto"), ("bfloat16", "float64"),
                                              ("float16", "auto")])
@pytest.mark.parametrize("dim", [1000, 1003])
@pytest.mark.parametrize("window,refresh", [(1, None), (5, None), (5, 10**6), (37, None)])
def test_graph_steps_equal_launches_bit_for_bit(dtype, accumulate, dim, window, refresh,
                                                launches):
    import cupy as cp
    rng = np.random.default_rng(dim + 7 * window)
    lam = 1e-2
    a, b = _twins(dim, window, lam, dtype=dtype, accumulate=accumulate,
                  refresh_every=refresh)
    gs = _gradients(rng, dim, 3 * window + 9)
    for i, g in enumerate(gs):
        g = cp.asarray(g)
        before = len(launches)
        expect = _expect_graph(a)
        if i % 3 == 2:
            a.update(g)
            b.update(g)
        else:
            ya, yb = a.step(g), b.step(g)
            assert ya.dtype == yb.dtype and ya.shape == (dim,)
            assert np.array_equal(ya.get(), yb.get()), i
        assert len(launches) == before + expect, i      # the graph ran, and only where due
        if i in (2 * window, 2 * window + 1):   # a NaN: refused, nothing changed
            bad = cp.asarray(rng.standard_normal(dim).astype(np.float32))
            bad[dim // 2] = cp.nan
            before, expect = len(launches), _expect_graph(a)
            for w in (a, b):
                with pytest.raises(ValueError, match="g must be finite"):
                    w.step(bad)
                with pytest.raises(ValueError, match="g must be finite"):
                    w.update(bad)
            assert len(launches) == before + 2 * expect
            _same_state(a, b)
    _same_state(a, b)
    assert a.logdet() == b.logdet()
    x = cp.asarray(rng.standard_normal(dim).astype(np.float32))
    assert np.array_equal(a.matvec(x).get(), b.matvec(x).get())
    assert _graph(a, True) is not None and _graph(a, False) is not None
    assert _graph(b, True) is None and not b._buf._graphs


def test_graph_results_are_fresh_and_follow_reset_and_checkpoints():
    """A step's result is the caller's (the next step does not overwrite it); a reset
    (a new engine) and a loaded checkpoint (new C^{-1}, K and damping) give a new
    graph; steps on another stream equal the twin's."""
    import cupy as cp
    rng = np.random.default_rng(11)
    dim, window = 4000, 6
    a, b = _twins(dim, window, 0.1)
    gs = [cp.asarray(g) for g in _gradients(rng, dim, 40)]
    for g in gs[:window + 2]:
        a.step(g)
        b.step(g)
    first = a.step(gs[10])
    kept = first.copy()
    b.step(gs[10])
    a.step(gs[11])
    b.step(gs[11])
    assert cp.array_equal(first, kept)
    old = _graph(a, True)
    assert old is not None
    other = ml.SlidingWindowInverseFisher(dim, window, 0.25, device="gpu")
    for g in gs[:window + 2]:
        other.update(g)
    state = other.state_dict()
    for w in (a, b):
        w.load_state_dict(state)
    assert not a._buf._graphs
    for g in gs[12:16]:
        assert np.array_equal(a.step(g).get(), b.step(g).get())
    assert _graph(a, True) is not old and _graph(a, True).lam == 0.25
    for w in (a, b):
        w.reset()
    assert not a._buf._graphs                   # the old engine's graphs let go
    for g in gs[16:16 + window + 3]:
        assert np.array_equal(a.step(g).get(), b.step(g).get())
    assert _graph(a, True).eng is a._eng
    with cp.cuda.Stream(non_blocking=True):
        for g in gs[30:36]:
            ya, yb = a.step(g), b.step(g)
            assert np.array_equal(ya.get(), yb.get())
            a.update(g)
            b.update(g)
    _same_state(a, b)


def test_graph_is_taken_only_where_it_runs_the_same_kernels():
    """Cholesky windows, windows still filling and count-normalised filling windows
    launch one by one; a full explicit window takes the graph."""
    import cupy as cp
    rng = np.random.default_rng(2)
    dim = 500
    chol = ml.SlidingWindowInverseFisher(dim, 3, 0.5, device="gpu", engine="cholesky")
    expl = ml.SlidingWindowInverseFisher(dim, 3, 0.5, device="gpu")
    chol._buf.graphs = expl._buf.graphs = True
    for k in range(3):
        g = cp.asarray(rng.standard_normal(dim).astype(np.float32))
        chol.step(g)
        expl.step(g)
        assert not expl._buf._graphs, k          # filling: C's shift and size change
    g = cp.asarray(rng.standard_normal(dim).astype(np.float32))
    chol.step(g)
    expl.step(g)
    assert not chol._buf._graphs
    assert _graph(expl, True) is not None


def test_graph_build_failure_falls_back(monkeypatch):
    """A CUDA error while building the graph is not the caller's: the window launches
    the kernels one by one, with the same results, and does not try again for the same
    engine, damping and shift."""
    import cupy as cp
    from mfac_linalg.kernels import step_graph as SG
    tries = []

    def broken(*args):
        tries.append(args)
        raise cp.cuda.runtime.CUDARuntimeError(2)          # cudaErrorMemoryAllocation
    monkeypatch.setattr(SG, "StepGraph", broken)
    rng = np.random.default_rng(4)
    a, b = _twins(300, 4, 0.2)
    for g in _gradients(rng, 300, 20):
        g = cp.asarray(g)
        assert np.array_equal(a.step(g).get(), b.step(g).get())
    assert len(tries) == 1
    assert a._buf._graphs[True][3] is None
    _same_state(a, b)


@pytest.mark.parametrize("normalize,engine", [("window", "auto"), ("count", "auto"),
                                              ("count", "explicit")])
def test_graph_through_refresh_batches_and_overflow(normalize, engine, launches):
    """``refresh()`` (which reallocates K) between graph steps; count-normalised windows
    (the Cholesky engine by default: no graph; the explicit one once full); short
    batches on a full window (their rows take the graph) with a NaN in the second row
    (all refused, the state restored); a gradient whose float32 Gram products overflow
    ("g is too large", nothing changed): all as the twin, bit for bit."""
    import cupy as cp
    rng = np.random.default_rng(21)
    dim, window = 700, 10
    a, b = _twins(dim, window, 0.05, normalize=normalize, engine=engine,
                  accumulate="float32", refresh_every=10**6)
    gs = [cp.asarray(g) for g in _gradients(rng, dim, 32)]
    explicit = a.engine == "explicit"
    for k, g in enumerate(gs[:20]):
        assert np.array_equal(a.step(g).get(), b.step(g).get())
        if k == 14:
            a.refresh()
            b.refresh()
    ran = len(launches)
    assert ran == (20 - window if explicit else 0)
    for w in (a, b):
        w.update(cp.stack(gs[20:22]))           # 4 k <= m: row by row, not deferred
    assert len(launches) == ran + (2 if explicit else 0)
    bad = cp.stack(gs[22:24]).copy()
    bad[1, 3] = cp.nan
    huge = gs[24] * np.float32(1e20)
    for w in (a, b):
        with pytest.raises(ValueError, match="g must be finite"):
            w.update(bad)
        with pytest.raises(ValueError, match="g is too large"):
            w.step(huge)
    _same_state(a, b)
    for g in gs[25:32]:
        assert np.array_equal(a.step(g).get(), b.step(g).get())
    _same_state(a, b)


def test_graph_replacement_failing_its_guards_rebuilds(monkeypatch, launches):
    """A duplicate gradient at tiny damping cancels the insertion pivot: the graph's
    replacement fails the guards, the commit rebuilds C^{-1} exactly and the step is
    recomputed, as on the launches, bit for bit."""
    import cupy as cp
    rng = np.random.default_rng(8)
    dim, window = 1000, 5
    a, b = _twins(dim, window, 1e-7, refresh_every=10**6)
    gs = [cp.asarray(rng.standard_normal(dim).astype(np.float32)) for _ in range(window + 2)]
    for g in gs:
        assert np.array_equal(a.step(g).get(), b.step(g).get())
    rebuilt = []
    real = type(a._eng)._exact

    def spy(self, p):
        rebuilt.append(p.slot)
        return real(self, p)
    monkeypatch.setattr(type(a._eng), "_exact", spy)
    ran = len(launches)
    dup = gs[-1].copy()
    ya = a.step(dup)
    assert len(launches) == ran + 1 and len(rebuilt) == 1      # the graph, then a rebuild
    yb = b.step(dup)
    assert len(rebuilt) == 2
    assert np.array_equal(ya.get(), yb.get())
    _same_state(a, b)
