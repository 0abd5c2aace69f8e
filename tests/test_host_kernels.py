"""The Numba-compiled host pass (kernels/host.py) behind the CPU diagonals: float64 sums,
one rounding, one read of V, the same result on any number of threads, and the
operators' diagonals through it against dense oracles.  Skipped without Numba."""
import contextlib
import os

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import mfac_linalg as ml
from mfac_linalg import _backend as B
from mfac_linalg import _lowrank as LR
from mfac_linalg.kernels import host as H

from oracles import (EPS32, EPS64, cond, dense_fisher, dense_inverse, float32_tol, float64_tol,
                     rel_err)

pytest.importorskip("numba")


@pytest.fixture
def cpu():
    return B.backend_for_device("cpu")


@contextlib.contextmanager
def _through_the_kernel():
    """Every host column-norm pass through the kernel, on three threads; yields the
    list of the kernel's calls (their block and column ranges)."""
    calls = []
    real = H.sumsq_columns

    def counted(*a):
        calls.append(a[4:])
        return real(*a)
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MFAC_LINALG_NUMBA", raising=False)
        mp.setattr(LR, "COMPILED_MIN", 0)
        mp.setattr(LR, "PARALLEL_MIN_COMPILED", 0)
        mp.setattr(LR, "host_threads", lambda: 3)
        mp.setattr(H, "sumsq_columns", counted)
        yield calls


@pytest.fixture
def compiled():
    with _through_the_kernel() as calls:
        yield calls


def _exact(V, alpha, beta):
    """alpha + beta * sum_i V[..., i, :]**2 in float64 (squares of float32 are exact)."""
    V64 = V.astype(np.float64)
    return alpha + beta * np.einsum("...ij,...ij->...j", V64, V64)


SHAPES = [(5, 7), (9, 3000), (1, 8, 20000), (3, 17, 2049), (40, 16, 128), (2, 1, 5),
          (6, 0, 9), (0, 4, 4), (12, 8193), (33, 130)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_kernel_is_float64_sums_rounded_once(compiled, cpu, shape, dtype):
    V = np.random.default_rng(3).standard_normal(shape).astype(dtype)
    alpha, beta = 0.3, -1.7
    out = LR.row_sumsq(V, cpu, alpha, beta)
    assert out.dtype == dtype and out.shape == shape[:-2] + shape[-1:]
    assert compiled or V.size == 0 or 0 in out.shape
    ref = _exact(V, alpha, beta)
    r = max(1, shape[-2])
    # float64 sums of r terms, then one rounding to dtype
    bound = np.abs(ref) * np.finfo(dtype).eps / 2 + r * np.finfo(np.float64).eps * (
        abs(alpha) + abs(beta) * _exact(np.abs(V), 0.0, 1.0))
    assert np.all(np.abs(out - ref) <= bound)
    plain = LR.row_sumsq(V, cpu)
    assert np.all(np.abs(plain - _exact(V, 0.0, 1.0))
                  <= np.abs(_exact(V, 0.0, 1.0)) * (np.finfo(dtype).eps / 2
                                                     + r * np.finfo(np.float64).eps))


@pytest.mark.parametrize("shape", [(7, 40000), (2, 9, 30000), (64, 5, 300), (3, 16, 2048)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_kernel_result_does_not_depend_on_the_threads(monkeypatch, compiled, cpu, shape, dtype):
    V = (np.random.default_rng(4).standard_normal(shape)
         * np.logspace(-3, 3, shape[-1])).astype(dtype)
    outs = []
    for n in (1, 2, 3, 8):
        monkeypatch.setattr(LR, "host_threads", lambda n=n: n)
        outs.append(LR.row_sumsq(V, cpu, 0.5, 2.0))
    assert len(compiled) > 4            # several pieces were made
    for o in outs[1:]:
        assert np.array_equal(o, outs[0])


def test_kernel_non_finite_and_overflow(compiled, cpu):
    V = np.ones((4, 40), np.float32)
    V[1, 3], V[2, 5] = np.nan, np.inf
    out = LR.row_sumsq(V, cpu)
    assert np.isnan(out[3]) and np.isinf(out[5]) and np.all(out[[0, 1, 2, 4]] == 4)
    big = np.full((3, 8), 3e19, np.float32)        # squares overflow float32, not float64
    assert np.all(np.isinf(LR.row_sumsq(big, cpu)))
    assert np.allclose(LR.row_sumsq(big, cpu, 0.0, 1e-39), 3 * 9e38 * 1e-39, rtol=1e-6)
    huge = np.full((2, 8), 1e200)
    assert np.all(np.isinf(LR.row_sumsq(huge, cpu)))


def test_kernel_is_skipped_for_what_it_does_not_take(compiled, cpu):
    V = np.random.default_rng(5).standard_normal((2, 6, 300)).astype(np.float32)
    assert H.supports(V) and H.supports(V[:, ::2]) and H.supports(V[:, :, 10:200])
    assert H.supports(np.ascontiguousarray(V.transpose(0, 2, 1)).transpose(0, 2, 1))
    row = V[0, 0]
    for S in (V[:, :, ::2], V[:, ::-1], V.astype(np.float16), V.astype(">f4"),
              np.broadcast_to(row[::2], (2, 6, 150)),        # strides (0, 0, 8)
              np.broadcast_to(V[:, :, :1], (2, 6, 300))):    # a broadcast column axis
        assert not H.supports(S)
    # a broadcast row axis over contiguous rows is read correctly
    Bc = np.broadcast_to(row, (2, 6, 300))
    assert H.supports(Bc)
    assert np.allclose(LR.row_sumsq(Bc, cpu), _exact(Bc, 0.0, 1.0), rtol=1e-6, atol=0)
    del compiled[:]
    S = V[:, :, ::2]                              # no contiguous rows nor columns
    out = LR.row_sumsq(S, cpu)
    assert not compiled                             # einsum on the strided view
    assert np.array_equal(out, np.einsum("nij,nij->nj", S, S))


def test_broadcast_gradients_give_the_fisher_diagonal(compiled):
    """Gradient arrays with a broadcast (stride 0) axis, as the compiled pass sees
    them through StaticInverseFisher(...).fisher().diagonal()."""
    rng = np.random.default_rng(17)
    m, d = 64, 512
    Bm = rng.standard_normal((3, 2 * d))
    for G in (np.broadcast_to(Bm[0, ::2], (m, d)), np.broadcast_to(Bm[0, :d], (m, d)),
              np.broadcast_to(np.ascontiguousarray(rng.standard_normal((m, 3)))[:, :1],
                              (m, d))):
        want = 0.1 + np.einsum("ij,ij->j", G, G) / m
        got = ml.StaticInverseFisher(G, 0.1).fisher().diagonal()
        assert np.max(np.abs(got - want) / want) <= 1e-13


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_column_ranges_of_a_matrix_go_through_the_kernel(compiled, cpu, dtype):
    """Blocks left in the caller's gradient array by overwrite_grads=True are column
    ranges of a C-ordered matrix: summed by the kernel in place, rounded once."""
    G = np.random.default_rng(15).standard_normal((64, 12000)).astype(dtype)
    for V in (G[None, :, 100:5000], G[:, :6000].reshape(64, 2, 3000).transpose(1, 0, 2),
              G[None, 3:40, 7:9000]):
        del compiled[:]
        out = LR.row_sumsq(V, cpu, 0.5, 2.0)
        assert compiled
        ref = _exact(V, 0.5, 2.0)
        bound = np.abs(ref) * np.finfo(dtype).eps / 2 + V.shape[1] * EPS64 * ref
        assert np.all(np.abs(out - ref) <= bound)
    rng = np.random.default_rng(16)
    G = (rng.standard_normal((64, 12000)) * np.logspace(-2, 2, 12000)).astype(np.float32)
    lam = 0.1 * float(np.mean(G.astype(np.float64) ** 2))
    op = ml.BlockInverseFisher(G, lam, blocks=[4000, 6000, 2000], overwrite_grads=True)
    del compiled[:]
    d = op.diagonal().astype(np.float64)
    assert len(compiled) >= 3
    for cols, a, b, V in op.lowrank_batches():
        want = _exact(np.asarray(V), a, b)
        scale = abs(a) + abs(b) * _exact(np.abs(np.asarray(V)), 0.0, 1.0)
        assert np.all(np.abs(d[np.asarray(cols)] - want) <= np.abs(want) * EPS32 / 2
                      + V.shape[-2] * EPS64 * scale)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(3, 7, 5), (1, 64, 33), (50, 16, 16), (2, 3, 9000)])
def test_transposed_stacks_are_summed_along_their_rows(compiled, cpu, shape, dtype):
    """A stack stored as the transpose of a C-ordered one (primal-form factors)."""
    nb, r, c = shape
    W = np.random.default_rng(7).standard_normal((nb, c, r)).astype(dtype)
    V = W.transpose(0, 2, 1)
    out = LR.row_sumsq(V, cpu, 0.5, 3.0)
    assert compiled
    ref = _exact(V, 0.5, 3.0)
    bound = np.abs(ref) * np.finfo(dtype).eps / 2 + r * np.finfo(np.float64).eps * ref
    assert np.all(np.abs(out - ref) <= bound)


def test_environment_variable_turns_it_off(monkeypatch, compiled, cpu):
    monkeypatch.setenv("MFAC_LINALG_NUMBA", "0")
    assert not H.available()
    V = np.random.default_rng(6).standard_normal((5, 100)).astype(np.float32)
    assert np.array_equal(LR.row_sumsq(V, cpu), np.einsum("ij,ij->j", V, V))
    assert not compiled
    monkeypatch.setenv("MFAC_LINALG_NUMBA", "1")
    LR.row_sumsq(V, cpu)
    assert compiled


def test_kernel_errors_reach_the_caller(monkeypatch, compiled, cpu):
    def broken(*a):
        raise MemoryError("from a piece")
    monkeypatch.setattr(H, "sumsq_columns", broken)
    with pytest.raises(MemoryError, match="from a piece"):
        LR.row_sumsq(np.ones((4, 50000), np.float32), cpu)


@settings(max_examples=20)
@given(m=st.integers(1, 12), d=st.integers(1, 60), block=st.integers(1, 40),
       ratio=st.sampled_from([1e-4, 1e-2, 1.0, 1e3]), f32=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_operator_diagonals_through_the_kernel(m, d, block, ratio, f32, seed):
    """Static and block diag(F^-1) and diag(F) through the kernel: each entry the stored
    factor's alpha + beta * sum V^2 rounded once, and against dense float64 oracles."""
    with _through_the_kernel() as compiled:
        _operator_diagonals(compiled, m, d, block, ratio, f32, seed)


def _operator_diagonals(compiled, m, d, block, ratio, f32, seed):
    rng = np.random.default_rng(seed)
    G = rng.standard_normal((m, d)) * np.logspace(-1, 1, d)
    lam = ratio * float(np.sum(G * G)) / (m * d)
    dt = np.float32 if f32 else np.float64
    G = G.astype(dt)
    G64 = G.astype(np.float64)
    sizes = [min(block, d - s) for s in range(0, d, block)]
    for op, blocks in ((ml.StaticInverseFisher(G, lam), [d]),
                       (ml.BlockInverseFisher(G, lam, blocks=sizes), sizes)):
        del compiled[:]
        got = op.diagonal()
        assert got.dtype == dt and compiled
        # the kernel's part: one rounding of the stored factor's exact diagonal
        for cols, alpha, beta, V in op.lowrank_batches():
            want = _exact(np.asarray(V), alpha, beta)
            scale = abs(alpha) + abs(beta) * _exact(np.abs(np.asarray(V)), 0.0, 1.0)
            err = np.abs(got[np.asarray(cols)] - want)
            assert np.all(err <= np.abs(want) * np.finfo(dt).eps / 2
                          + V.shape[-2] * np.finfo(np.float64).eps * scale)
        # the operator's: against F^-1 of dense float64 (block-diagonal F)
        F = np.zeros((d, d))
        s = 0
        for b in blocks:
            F[s:s + b, s:s + b] = dense_fisher(G64[:, s:s + b], lam)
            s += b
        kappa = cond(F)
        tol = float32_tol(kappa, m) if f32 else float64_tol(kappa)
        assert rel_err(got, np.diag(dense_inverse(F))) <= tol
        del compiled[:]
        fd = op.fisher().diagonal()
        assert np.max(np.abs(fd - np.diag(F)) / np.diag(F)) <= 4 * m * np.finfo(dt).eps


def test_no_writable_cache_compiles_in_memory(monkeypatch):
    """Numba raises at decoration where it finds no cache directory: compiled anyway."""
    seen = []
    real = H._compile

    def compile_(cache):
        seen.append(cache)
        if cache:
            raise RuntimeError("cannot cache function 'kernel': no locator available")
        return real(cache)
    monkeypatch.setattr(H, "_compile", compile_)
    monkeypatch.setattr(H, "_kernel", None)
    V = np.random.default_rng(8).standard_normal((1, 9, 70))
    out = np.empty((1, 70))
    H.sumsq_columns(V, 1.0, 2.0, out, 0, 1, 0, 70)
    assert seen == [True, False]
    assert np.allclose(out, _exact(V, 1.0, 2.0), rtol=1e-15, atol=0)


def test_a_busy_pool_does_not_hold_the_caller(monkeypatch, compiled, cpu):
    """The caller does every piece itself while the pool's threads are taken."""
    import threading
    gate = threading.Event()
    from mfac_linalg import _threads
    pool = _threads._pool()
    busy = [pool.submit(gate.wait) for _ in range(pool._max_workers)]
    try:
        V = np.random.default_rng(9).standard_normal((4, 30000)).astype(np.float32)
        out = LR.row_sumsq(V, cpu)                   # returns although no helper runs
        assert np.allclose(out, _exact(V, 0.0, 1.0), rtol=1e-7, atol=0)
        assert len(compiled) > 1
    finally:
        gate.set()
        for b in busy:
            b.result()


# -- the sliding window's float64-faithful passes (accumulate="float64", float32 buffer) --
from mfac_linalg import _threads  # noqa: E402
from mfac_linalg.sliding import buffer as SB  # noqa: E402


@contextlib.contextmanager
def _passes_through_the_kernels(threads=3):
    calls = {"project": 0, "combine": 0}
    real_p, real_c = H.project, H.combine

    def p(*a):
        calls["project"] += 1
        return real_p(*a)

    def c(*a):
        calls["combine"] += 1
        return real_c(*a)
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MFAC_LINALG_NUMBA", raising=False)
        mp.setattr(SB, "COMPILED_MIN", 0)
        mp.setattr(SB, "PARALLEL_MIN", 0)
        mp.setattr(_threads, "host_threads", lambda: threads)
        mp.setattr(H, "project", p)
        mp.setattr(H, "combine", c)
        yield calls


@pytest.mark.parametrize("m,d,n", [(1, 5, 1), (7, 300, 5), (9, 20000, 9), (5, 8193, 3),
                                   (12, 40000, 12)])
def test_passes_are_float64_sums_rounded_once(m, d, n):
    rng = np.random.default_rng(10)
    buf = SB.RingBuffer(m, d, "float32", B.backend_for_device("cpu"), wide=True)
    buf.G[...] = (rng.standard_normal((m, d)) * np.logspace(-3, 3, d)).astype(np.float32)
    x = rng.standard_normal((d, 1)).astype(np.float32)
    c = rng.standard_normal((n, 1))
    G64, x64 = buf.G[:n].astype(np.float64), x[:, 0].astype(np.float64)
    with _passes_through_the_kernels() as calls:
        u = buf.project(x, n)
        y = buf.combine(x, c, n, 0.37)
    assert calls["project"] >= 1 and calls["combine"] >= 1
    assert u.shape == (n, 1) and u.dtype == np.float64
    # products of float32 values are exact in float64: only the float64 sums round
    assert np.all(np.abs(u[:, 0] - G64 @ x64) <= d * EPS64 * (np.abs(G64) @ np.abs(x64)))
    ref = (x64 - G64.T @ c[:, 0]) / 0.37
    scale = (np.abs(x64) + np.abs(G64.T) @ np.abs(c[:, 0])) / 0.37
    assert y.dtype == np.float32 and y.shape == (d, 1)
    assert np.all(np.abs(y[:, 0] - ref) <= np.abs(ref) * EPS32 / 2 + (n + 2) * EPS64 * scale)


@pytest.mark.parametrize("m,d", [(16, 50000), (3, 100000), (40, 9000)])
def test_passes_do_not_depend_on_the_threads(m, d):
    rng = np.random.default_rng(11)
    buf = SB.RingBuffer(m, d, "float32", B.backend_for_device("cpu"), wide=True)
    buf.G[...] = rng.standard_normal((m, d)).astype(np.float32)
    x = rng.standard_normal((d, 1)).astype(np.float32)
    c = rng.standard_normal((m, 1))
    outs = []
    for t in (1, 2, 3, 8):
        with _passes_through_the_kernels(threads=t):
            outs.append((buf.project(x, m), buf.combine(x, c, m, 2.0)))
    for u, y in outs[1:]:
        assert np.array_equal(u, outs[0][0]) and np.array_equal(y, outs[0][1])


@pytest.mark.parametrize("engine", ["cholesky", "explicit"])
def test_window_through_the_compiled_passes_is_faithful(engine):
    """A float32 window with accumulate="float64" whose passes are the compiled
    kernels: within 10x the float32 rounding of a float64 window's results (small
    damping, coordinate scales over four decades), and a refused gradient leaves it
    as it was."""
    rs = np.random.default_rng(12)
    d, m = 3000, 24
    scales = np.logspace(-2, 2, d)
    lam = 1e-5 * float((scales ** 2).sum()) / m
    with _passes_through_the_kernels() as calls:
        w = ml.SlidingWindowInverseFisher(d, m, lam, engine=engine, accumulate="float64")
        w64 = ml.SlidingWindowInverseFisher(d, m, lam, dtype="float64")
        worst = 0.0
        for _ in range(40):
            g = (rs.standard_normal(d) * scales).astype(np.float32)
            y = w.step(g).astype(np.float64)
            y64 = w64.step(g.astype(np.float64))
            rnd = np.linalg.norm(y64.astype(np.float32) - y64)
            worst = max(worst, np.linalg.norm(y - y64) / rnd)
        x = rs.standard_normal(d).astype(np.float32)
        y, y64 = w.matvec(x).astype(np.float64), w64.matvec(x.astype(np.float64))
        assert np.linalg.norm(y - y64) <= 10 * np.linalg.norm(y64.astype(np.float32) - y64)
        before = (w.gradients().copy(), w.matvec(x).copy())
        bad = g.copy()
        bad[7] = np.inf
        with pytest.raises(ValueError, match="g"):
            w.step(bad)
        assert np.array_equal(w.gradients(), before[0])
        assert np.array_equal(w.matvec(x), before[1])
    assert worst <= 10.0, worst
    assert calls["project"] > 40 and calls["combine"] > 40


# -- review findings: shutdown, atomicity, NUMBA_DISABLE_JIT, fork ----------------------

def test_no_helpers_at_shutdown_the_caller_does_every_job(monkeypatch):
    """While the interpreter shuts down a pool takes no work (RuntimeError from submit):
    the caller then runs every job itself."""
    class Closed:
        def submit(self, fn):
            raise RuntimeError("cannot schedule new futures after shutdown")
    monkeypatch.setattr(_threads, "_pool", lambda: Closed())
    done = []
    _threads.run([(i,) for i in range(9)], 4, done.append)
    assert sorted(done) == list(range(9))


@pytest.mark.parametrize("compiled_passes", [True, False])
def test_failed_pass_one_leaves_the_window_as_it_was(monkeypatch, compiled_passes):
    """An error inside an update's pass 1 (after g is written into its slot) puts the
    slot back: gradients and products bit for bit as before."""
    rng = np.random.default_rng(13)
    d, m = 500, 6
    w = ml.SlidingWindowInverseFisher(d, m, 0.1, accumulate="float64")
    for g in rng.standard_normal((m + 2, d)).astype(np.float32):
        w.update(g)
    x = rng.standard_normal(d).astype(np.float32)
    before = (w.gradients().copy(), w.matvec(x).copy(), w.count, w.total)

    def broken(*a, **k):
        raise MemoryError("in pass 1")
    if compiled_passes:
        monkeypatch.delenv("MFAC_LINALG_NUMBA", raising=False)
        monkeypatch.setattr(SB, "COMPILED_MIN", 0)
        monkeypatch.setattr(H, "project", broken)
    else:
        monkeypatch.setattr(SB.RingBuffer, "project", broken)
    for call in (w.update, w.step):
        with pytest.raises(MemoryError, match="in pass 1"):
            call(np.full(d, 7.0, np.float32))
        assert np.array_equal(w.gradients(), before[0])
        assert (w.count, w.total) == before[2:]
    monkeypatch.undo()
    assert np.array_equal(w.matvec(x), before[1])


def test_disabled_jit_is_not_used(monkeypatch):
    """NUMBA_DISABLE_JIT=1 turns njit into plain Python (thousands of times slower than
    einsum): the library keeps NumPy then."""
    import numba
    monkeypatch.setattr(numba.config, "DISABLE_JIT", True)
    monkeypatch.setattr(H, "_state", None)
    assert not H.available()
    monkeypatch.setattr(numba.config, "DISABLE_JIT", False)
    monkeypatch.setattr(H, "_state", None)
    assert H.available()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_the_forked_child_makes_its_own_pool_and_computes(compiled, cpu):
    import threading
    V = np.random.default_rng(14).standard_normal((5, 40000)).astype(np.float32)
    want = LR.row_sumsq(V, cpu)                      # makes the pool and uses it
    assert _threads._POOL is not None
    r, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:                                    # the child: no threads of ours, works
        try:
            ok = (not any(t.name.startswith("mfac_linalg-host")
                          for t in threading.enumerate())
                  and np.array_equal(LR.row_sumsq(V, cpu), want))
            os.write(wfd, b"1" if ok else b"0")
        finally:
            os._exit(0)
    os.close(wfd)
    got = os.read(r, 1)
    os.close(r)
    os.waitpid(pid, 0)
    assert got == b"1"
    assert np.array_equal(LR.row_sumsq(V, cpu), want)   # and the parent still works


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_fork_while_another_thread_runs_passes_does_not_hang():
    """Forks while another thread keeps submitting threaded passes (a before-fork
    shutdown of the pool deadlocked against concurrent.futures' fork hook)."""
    import subprocess
    import sys
    code = """
import faulthandler, os, threading
faulthandler.dump_traceback_later(60, exit=True)
import numpy as np
import mfac_linalg as ml
op = ml.StaticInverseFisher(np.random.default_rng(0).standard_normal((64, 40000)).astype(np.float32), 0.1)
op.diagonal()
def busy():
    while True:
        op.diagonal()
threading.Thread(target=busy, daemon=True).start()
for _ in range(100):
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
print("ok")
"""
    out = subprocess.run([sys.executable, "-W", "ignore::DeprecationWarning", "-c", code],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
