"""The sharded operators over torch.distributed (gloo) with 2 and 3 processes.

One group of worker processes is spawned per world size and per module (the
``cluster`` fixture); each test sends one task (a module-level function of this
file) to every rank and gets every rank's result back.  The oracle is the
single-process operator on the concatenated gradients, built inside each worker:
every method must agree to 1e-12 (float64).
"""
import multiprocessing as mp
import os
import queue
import tempfile
import traceback

import numpy as np
import pytest

torch = pytest.importorskip("torch")

TOL = 1e-12
TIMEOUT = 120
_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


# -- the worker side -----------------------------------------------------------------------

def _worker(rank, size, store, tasks, results):
    os.environ["OMP_NUM_THREADS"] = "1"
    import datetime

    import torch as t
    import torch.distributed as d
    t.set_num_threads(1)
    from mfac_linalg.distributed import TorchComm
    try:
        d.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                             world_size=size, timeout=datetime.timedelta(seconds=60))
        comm = TorchComm()
        results.put((rank, ("ready", None)))
    except BaseException as exc:  # pragma: no cover - environment trouble
        results.put((rank, ("err", (type(exc).__name__, repr(exc)))))
        return
    while True:
        item = tasks.get()
        if item is None:
            break
        fn, args = item
        try:
            out = ("ok", fn(comm, *args))
        except BaseException as exc:
            out = ("raised", (type(exc).__name__, str(exc), traceback.format_exc()))
        results.put((rank, out))
    d.destroy_process_group()


class Cluster:
    """P worker processes in one gloo group; ``run(fn, *args)`` runs fn(comm, *args) on
    every rank and returns the list of per-rank outcomes ``(kind, value)``."""

    def __init__(self, size):
        # a fork server that imported torch and the library once: each worker starts
        # in milliseconds instead of importing torch again (and no fork of pytest itself)
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["torch", "torch.distributed", "scipy.linalg",
                                    "mfac_linalg", "mfac_linalg.distributed"])
        self.size = size
        fd, self.store = tempfile.mkstemp(prefix="mfac_dist_")
        os.close(fd)
        os.unlink(self.store)
        self.results = ctx.Queue()
        self.tasks = [ctx.Queue() for _ in range(size)]
        self.procs = [ctx.Process(target=_worker, args=(r, size, self.store, self.tasks[r],
                                                        self.results), daemon=True)
                      for r in range(size)]
        # one BLAS thread per worker (set before the fork server starts: OpenBLAS reads it
        # when it loads): P workers spinning two BLAS threads each on two cores crawl
        saved = {k: os.environ.get(k) for k in _THREAD_VARS}
        os.environ.update({k: "1" for k in _THREAD_VARS})
        try:
            for p in self.procs:
                p.start()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        ready = self._collect()
        bad = [r for r in ready if r[0] != "ready"]
        if bad:
            self.close()
            pytest.skip(f"gloo process group could not start: {bad}")

    def _collect(self):
        out = [None] * self.size
        for _ in range(self.size):
            try:
                rank, res = self.results.get(timeout=TIMEOUT)
            except queue.Empty:
                self.close()
                raise AssertionError("a distributed task timed out (a rank hung?)") from None
            out[rank] = res
        return out

    def run(self, fn, *args):
        for q in self.tasks:
            q.put((fn, args))
        return self._collect()

    def ok(self, fn, *args):
        """Run and insist that every rank returned; the per-rank values."""
        out = self.run(fn, *args)
        for r, (kind, val) in enumerate(out):
            assert kind == "ok", f"rank {r}: {val[0]}: {val[1]}\n{val[2]}"
        return [v for _, v in out]

    def close(self):
        for q in self.tasks:
            try:
                q.put(None)
            except Exception:
                pass
        for p in self.procs:
            p.join(timeout=2)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        if os.path.exists(self.store):
            os.unlink(self.store)


@pytest.fixture(scope="module", params=[2, 3], ids=["P2", "P3"])
def cluster(request):
    c = Cluster(request.param)
    yield c
    c.close()


# -- helpers run inside the workers ----------------------------------------------------------

def _rel(got, ref):
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    den = np.linalg.norm(ref)
    return float(np.linalg.norm(got - ref) / (den if den > 0 else 1.0))


def _layout(kind, d, P):
    from mfac_linalg.distributed import ColumnLayout
    if kind == "contiguous":
        return ColumnLayout.contiguous(d, P)
    if kind == "uneven":       # rank 0 holds nothing when P > 2
        dims = [0] * (P - 2) + [3, d - 3]
        return ColumnLayout.contiguous(d, P, local_dims=dims)
    if kind == "sharded":
        return ColumnLayout.sharded([7, d - 12, 5], P)
    return ColumnLayout.parameter_aligned([4, 9, d - 20, 7], P)


def _static_methods(comm, layout_kind, dtype, seed):
    import mfac_linalg as ml
    from mfac_linalg.distributed import ShardedStaticInverseFisher, state_digest
    rng = np.random.default_rng(seed)
    m, d, lam = 6, 29, 0.05
    G = rng.standard_normal((m, d)).astype(dtype)
    lay = _layout(layout_kind, d, comm.size)
    J = lay.indices(comm.rank)
    ref = ml.StaticInverseFisher(G, lam)
    op = ShardedStaticInverseFisher(lay.split(G, comm.rank, axis=1), lam, comm, layout=lay)
    x = rng.standard_normal(d).astype(dtype)
    X = rng.standard_normal((d, 3)).astype(dtype)
    err = {}
    err["matvec"] = _rel(op.matvec(x[J]), ref.matvec(x)[J])
    err["matvec(d,1)"] = _rel(op.matvec(x[J][:, None])[:, 0], ref.matvec(x)[J])
    err["matmat"] = _rel(op.matmat(X[J]), ref.matmat(X)[J])
    err["dot"] = _rel(op @ X[J], (ref @ X)[J])
    err["rmatvec"] = _rel(op.rmatvec(x[J]), ref.rmatvec(x)[J])
    err["diagonal"] = _rel(op.diagonal(), ref.diagonal()[J])
    err["quad"] = abs(op.quad(x[J]) - ref.quad(x)) / abs(ref.quad(x))
    err["quad(k)"] = _rel(op.quad(X[J]), ref.quad(X))
    scale = 1.0 / lam
    ents = [(0, 0), (d - 1, 0), (3, d - 2), (d // 2, d // 3), (-1, -1), (5, 20)]
    err["entry"] = max(abs(op.entry(i, j) - ref.entry(i, j)) / scale for i, j in ents)
    err["getitem"] = abs(op[2, 7] - ref[2, 7]) / scale
    err["logdet"] = abs(op.logdet() - ref.logdet()) / abs(ref.logdet())
    err["todense"] = _rel(op.todense(), ref.todense())
    err.update(_fisher_errors(op, ref, lay, comm.rank, x, X))
    out = {"err": err, "shape": op.shape, "local_dim": op.local_dim,
           "dtype": str(op.matvec(x[J]).dtype),
           "digest": state_digest(op.factor).tolist()}
    op.check_replicas()
    return out


def _fisher_errors(op, ref, lay, rank, x, X):
    """The forward F of a sharded operator against the single-process one's."""
    F, Fr = op.fisher(), ref.fisher()
    J, d = lay.indices(rank), lay.dim
    assert F.inverse() is op and op.inverse().inverse() is op
    e = {"F.matvec": _rel(F.matvec(x[J]), Fr.matvec(x)[J]),
         "F.matmat": _rel(F.matmat(X[J]), Fr.matmat(X)[J]),
         "F.quad": _rel(F.quad(X[J]), Fr.quad(X)),
         "F.diagonal": _rel(F.diagonal(), Fr.diagonal()[J]),
         "F.todense": _rel(F.todense(), Fr.todense()),
         "F.logdet": _rel(F.logdet(), Fr.logdet())}
    scale = np.abs(Fr.todense()).max()
    e["F.entry"] = max(abs(F.entry(i, j) - Fr.entry(i, j)) / scale
                       for i, j in [(0, 0), (d - 1, 1), (4, 9), (-1, -1)])
    return e


def _static_bad_x(comm, bad_rank, what):
    """Every rank calls matvec; ``bad_rank`` passes a bad slice.  Then a good call."""
    from mfac_linalg.distributed import ShardedStaticInverseFisher
    rng = np.random.default_rng(3)
    m, d, lam = 4, 13, 0.1
    G = rng.standard_normal((m, d))
    from mfac_linalg.distributed import ColumnLayout
    lay = ColumnLayout.contiguous(d, comm.size)
    op = ShardedStaticInverseFisher(lay.split(G, comm.rank, axis=1), lam, comm, layout=lay)
    x = rng.standard_normal(d)
    xp_ = lay.split(x, comm.rank).copy()
    if comm.rank == bad_rank:
        if what == "nan":
            xp_[0] = np.nan
        elif what == "shape":
            xp_ = np.ones(op.local_dim + 1)
    seen = None
    try:
        if what == "k":
            op.matmat(np.ones((op.local_dim, 2 if comm.rank == bad_rank else 1)))
        elif what == "entry":
            op.entry(1, 2 if comm.rank == bad_rank else 3)
        else:
            op.matvec(xp_)
    except Exception as exc:
        seen = (type(exc).__name__, str(exc))
    after = op.matvec(lay.split(x, comm.rank))     # the ranks are still in step
    import mfac_linalg as ml
    ok = _rel(after, lay.split(ml.StaticInverseFisher(G, lam).matvec(x), comm.rank))
    return seen, ok


def _static_bad_setup(comm, what):
    from mfac_linalg.distributed import ColumnLayout, ShardedStaticInverseFisher
    rng = np.random.default_rng(4)
    m, d = 4, 11
    G = rng.standard_normal((m, d))
    lay = ColumnLayout.contiguous(d, comm.size)
    Gp = lay.split(G, comm.rank, axis=1)
    lam = 0.1
    layout = lay
    if comm.rank == 1:
        if what == "m":
            Gp = Gp[:3]
        elif what == "damping":
            lam = 0.2
        elif what == "nan":
            Gp = Gp.copy()
            Gp[0, 0] = np.inf
        elif what == "layout":
            layout = ColumnLayout.contiguous(d, comm.size, local_dims=[d] + [0] * (comm.size - 1))
        elif what == "neg":
            lam = -1.0
    if what == "overflow" and comm.rank == 0:
        Gp = Gp * 1e200                        # finite, but its Gram products overflow
    try:
        ShardedStaticInverseFisher(Gp, lam, comm, layout=layout)
    except Exception as exc:
        return type(exc).__name__, str(exc)
    return None


def _static_divergence(comm):
    from mfac_linalg.distributed import ColumnLayout, ReplicaDivergenceError, \
        ShardedStaticInverseFisher
    rng = np.random.default_rng(5)
    G = rng.standard_normal((3, 10))
    lay = ColumnLayout.contiguous(10, comm.size)
    op = ShardedStaticInverseFisher(lay.split(G, comm.rank, axis=1), 0.1, comm, layout=lay)
    op.check_replicas()                       # identical after set-up
    if comm.rank == comm.size - 1:
        op._L[1, 0] = np.nextafter(op._L[1, 0], np.inf)     # one ulp on one rank
    try:
        op.check_replicas()
    except ReplicaDivergenceError as exc:
        return exc.ranks, str(exc)
    return None


def _allgather_roundtrip(comm):
    from mfac_linalg.distributed import ColumnLayout, allgather
    x = np.arange(17.0) - 5.5
    lay = ColumnLayout.sharded([10, 7], comm.size)
    full = allgather(lay.split(x, comm.rank), lay, comm)
    X = np.arange(34.0).reshape(17, 2).astype(np.float32)
    fullX = allgather(lay.split(X, comm.rank), lay, comm)
    return bool(np.array_equal(full, x)), bool(np.array_equal(fullX, X)), str(fullX.dtype)


def _comm_basics(comm):
    buf = np.full(3, float(comm.rank + 1))
    comm.allreduce_sum(buf)
    b = np.array([float(comm.rank)] * 2)
    comm.broadcast(b, root=comm.size - 1)
    comm.barrier()
    return buf.tolist(), b.tolist()


# -- the tests -------------------------------------------------------------------------------

def test_comm_collectives(cluster):
    P = cluster.size
    for sums, bc in cluster.ok(_comm_basics):
        assert sums == [P * (P + 1) / 2] * 3
        assert bc == [float(P - 1)] * 2


def test_allgather_exact(cluster):
    for a, b, dt in cluster.ok(_allgather_roundtrip):
        assert a and b and dt == "float32"


@pytest.mark.parametrize("layout_kind", ["contiguous", "uneven", "sharded", "aligned"])
def test_static_equals_single_process(cluster, layout_kind):
    outs = cluster.ok(_static_methods, layout_kind, np.float64, 11)
    for r, o in enumerate(outs):
        bad = {k: v for k, v in o["err"].items() if not v <= TOL}
        assert not bad, (r, bad)
        assert o["shape"] == (29, 29) and o["dtype"] == "float64"
    # the replicated factor is bitwise identical on every rank
    assert all(o["digest"] == outs[0]["digest"] for o in outs)
    assert sum(o["local_dim"] for o in outs) == 29


def test_static_float32(cluster):
    outs = cluster.ok(_static_methods, "contiguous", np.float32, 12)
    for o in outs:
        assert o["dtype"] == "float32"
        assert max(o["err"].values()) <= 2e-5, o["err"]


@pytest.mark.parametrize("what", ["nan", "shape", "k", "entry"])
def test_static_bad_slice_raises_everywhere(cluster, what):
    bad_rank = 1
    outs = cluster.ok(_static_bad_x, bad_rank, what)
    for r, (seen, after) in enumerate(outs):
        assert seen is not None, f"rank {r} did not raise"
        if what in ("k", "entry"):             # a disagreement: every rank says why
            assert seen[0] == "ValueError" and "every rank" in seen[1]
        elif r == bad_rank:
            assert seen[0] == "ValueError" and "x must" in seen[1]
        else:
            assert seen[0] == "RemoteRankError" and f"[{bad_rank}]" in seen[1]
        assert after <= TOL


@pytest.mark.parametrize("what", ["m", "damping", "nan", "layout", "neg", "overflow"])
def test_static_bad_setup_raises_everywhere(cluster, what):
    outs = cluster.ok(_static_bad_setup, what)
    for r, seen in enumerate(outs):
        assert seen is not None, f"rank {r} built an operator"
        if what in ("nan", "neg"):
            assert seen[0] == ("ValueError" if r == 1 else "RemoteRankError"), seen
        elif what == "overflow":               # found on the all-reduced Gram: everywhere
            assert seen[0] == "ValueError" and "too large" in seen[1], seen
        else:
            assert seen[0] == "ValueError" and "every rank" in seen[1], seen


def test_static_divergence_detected(cluster):
    outs = cluster.ok(_static_divergence)
    P = cluster.size
    for res in outs:
        assert res is not None
        ranks, msg = res
        assert ranks == [P - 1] and "differs" in msg


# -- the sliding window ------------------------------------------------------------------------

def _window_pair(comm, layout_kind, dtype, normalize="window", engine="auto", refresh_every=None,
                 d=23, m=4, lam=0.5, **kw):
    import mfac_linalg as ml
    from mfac_linalg.distributed import ShardedSlidingWindowInverseFisher
    lay = _layout(layout_kind, d, comm.size)
    ref = ml.SlidingWindowInverseFisher(dim=d, window=m, damping=lam, dtype=dtype,
                                        normalize=normalize, engine=engine,
                                        refresh_every=refresh_every)
    w = ShardedSlidingWindowInverseFisher(lay.local_dim(comm.rank), m, lam, comm, layout=lay,
                                          dtype=dtype, normalize=normalize, engine=engine,
                                          refresh_every=refresh_every, **kw)
    return lay, ref, w


def _window_compare(w, ref, lay, rank, rng, dtype):
    """Every method of the sharded window against the single-process one."""
    J = lay.indices(rank)
    d = lay.dim
    x = rng.standard_normal(d).astype(dtype)
    X = rng.standard_normal((d, 3)).astype(dtype)
    lam = ref.damping
    e = {}
    e["matvec"] = _rel(w.matvec(x[J]), ref.matvec(x)[J])
    e["matmat"] = _rel(w.matmat(X[J]), ref.matmat(X)[J])
    e["dot"] = _rel(w @ X[J], (ref @ X)[J])
    e["quad"] = abs(w.quad(x[J]) - ref.quad(x)) / abs(ref.quad(x))
    e["quad(k)"] = _rel(w.quad(X[J]), ref.quad(X))
    e["diagonal"] = _rel(w.diagonal(), ref.diagonal()[J])
    e["entry"] = max(abs(w.entry(i, j) - ref.entry(i, j)) * lam
                     for i, j in [(0, 0), (d - 1, 2), (5, 17), (-1, -1), (11, 3)])
    e["logdet"] = abs(w.logdet() - ref.logdet()) / abs(ref.logdet())
    e["todense"] = _rel(w.todense(), ref.todense())
    e["gradients"] = _rel(w.gradients(), ref.gradients()[:, J]) if J.size else 0.0
    e.update(_fisher_errors(w, ref, lay, rank, x, X))
    assert w.count == ref.count and w.total == ref.total
    return e


def _window_sequence(comm, layout_kind, dtype, normalize, engine, refresh_every, seed):
    lay, ref, w = _window_pair(comm, layout_kind, dtype, normalize, engine, refresh_every)
    rng = np.random.default_rng(seed)
    d, J = lay.dim, lay.indices(comm.rank)
    worst = {}

    def note(errs):
        for k, v in errs.items():
            worst[k] = max(worst.get(k, 0.0), v)

    note(_window_compare(w, ref, lay, comm.rank, rng, dtype))          # empty window
    # steps, single updates and batches (the deferred-rebuild path), past a full turn
    for t, kind in enumerate(["step", "step", "update", "batch2", "step", "batch3", "step",
                              "update", "step", "step", "batch2", "step"]):
        scale = 10.0 ** rng.uniform(-0.5, 0.25)    # kappa_W = lambda_max(F)/lambda ~ 10-30
        if kind == "step":
            g = (scale * rng.standard_normal(d)).astype(dtype)
            note({"step": _rel(w.step(g[J]), ref.step(g)[J])})
        elif kind == "update":
            g = (scale * rng.standard_normal(d)).astype(dtype)
            w.update(g[J])
            ref.update(g)
        else:
            Gb = (scale * rng.standard_normal((int(kind[-1]), d))).astype(dtype)
            w.update(Gb[:, J])
            ref.update(Gb)
        if t % 3 == 2:
            note(_window_compare(w, ref, lay, comm.rank, rng, dtype))
    w.refresh()
    ref.refresh()
    note(_window_compare(w, ref, lay, comm.rank, rng, dtype))
    w.check_replicas()
    Gh = ref.gradients().astype(np.float64)
    kappa = 1.0 + np.linalg.norm(Gh, 2) ** 2 / (ref.damping * (ref.window if normalize ==
                                                                "window" else len(Gh)))
    return worst, w.digest(), w.engine, float(kappa)


@pytest.mark.parametrize("layout_kind,normalize,engine,refresh_every", [
    ("contiguous", "window", "auto", None),
    ("sharded", "window", "explicit", None),
    ("uneven", "count", "auto", None),
    ("aligned", "window", "cholesky", 3),
])
def test_window_equals_single_process(cluster, layout_kind, normalize, engine, refresh_every):
    outs = cluster.ok(_window_sequence, layout_kind, np.float64, normalize, engine,
                      refresh_every, 21)
    for r, (worst, _, _, kappa) in enumerate(outs):
        assert kappa > 5, kappa        # not a trivially conditioned window
        bad = {k: v for k, v in worst.items() if not v <= TOL}
        assert not bad, (r, bad)
        assert set(worst) >= {"matvec", "matmat", "quad", "entry", "diagonal", "logdet",
                              "todense", "step", "gradients"}
    assert len({o[1] for o in outs}) == 1       # replicated state: one digest
    if engine != "auto":
        assert all(o[2] == engine for o in outs)


def test_window_float32(cluster):
    outs = cluster.ok(_window_sequence, "contiguous", np.float32, "window", "auto", None, 22)
    for worst, _, _, _ in outs:
        assert max(worst.values()) <= 1e-4, worst
    assert len({o[1] for o in outs}) == 1


def _window_failures(comm, what, tmp):
    """A failure on rank 1 in the middle of a sequence: every rank raises, every state
    is as before, and the ranks go on in step."""
    lay, ref, w = _window_pair(comm, "contiguous", np.float64)
    rng = np.random.default_rng(7)
    d, J = lay.dim, lay.indices(comm.rank)
    for _ in range(5):
        g = rng.standard_normal(d)
        w.step(g[J])
        ref.step(g)
    before = (w.digest(), w.gradients().copy(), w.total)
    g = rng.standard_normal(d)
    gp = g[J].copy()
    seen = None
    try:
        if what == "nan":
            if comm.rank == 1:
                gp[0] = np.nan
            w.step(gp)
        elif what == "shape":
            w.step(gp if comm.rank != 1 else np.ones(gp.size + 2))
        elif what == "pass2":                  # a failure after the all-reduce of u
            if comm.rank == 1:
                def boom(*a, **k):
                    raise MemoryError("injected")
                w._buf.finish_step = boom
            w.step(gp)
        elif what == "batch":                  # one bad row of a batch on rank 1
            Gb = rng.standard_normal((3, d))[:, J]
            if comm.rank == 1:
                Gb[2, 0] = np.inf
            w.update(Gb)
        elif what == "k":
            w.update(rng.standard_normal((2 if comm.rank == 1 else 3, d))[:, J])
        elif what == "matvec":
            w.matvec(gp if comm.rank != 1 else np.full(gp.size, np.nan))
    except BaseException as exc:
        seen = (type(exc).__name__, str(exc))
    if what == "pass2" and comm.rank == 1:
        del w._buf.finish_step
    after = (w.digest(), w.gradients(), w.total)
    same = before[0] == after[0] and np.array_equal(before[1], after[1]) and \
        before[2] == after[2]
    y = w.step(g[J])                           # the ranks are still in step
    return seen, same, _rel(y, ref.step(g)[J])


@pytest.mark.parametrize("what", ["nan", "shape", "pass2", "batch", "k", "matvec"])
def test_window_failure_raises_everywhere_state_unchanged(cluster, what, tmp_path):
    outs = cluster.ok(_window_failures, what, str(tmp_path))
    for r, (seen, same, err) in enumerate(outs):
        assert seen is not None, f"rank {r} did not raise"
        if what == "k":
            assert seen[0] == "ValueError" and "every rank" in seen[1]
        elif r == 1:
            assert seen[0] == ("MemoryError" if what == "pass2" else "ValueError"), seen
        else:
            assert seen[0] == "RemoteRankError" and "[1]" in seen[1], seen
        assert same, f"rank {r}: the state changed"
        assert err <= TOL


def _window_divergence(comm, check_every):
    lay, ref, w = _window_pair(comm, "contiguous", np.float64, check_every=check_every)
    rng = np.random.default_rng(8)
    J = lay.indices(comm.rank)
    for _ in range(2):
        w.step(rng.standard_normal(lay.dim)[J])
    if comm.rank == 0:
        w._eng.K[0, 0] *= 1 + 1e-15            # a silent divergence on rank 0
    seen = []
    for t in range(4):
        try:
            w.step(rng.standard_normal(lay.dim)[J])
        except BaseException as exc:
            seen.append((w.total, type(exc).__name__, getattr(exc, "ranks", None)))
            break
    return seen


def test_window_divergence_detected_at_interval(cluster):
    outs = cluster.ok(_window_divergence, 4)
    P = cluster.size
    for seen in outs:
        # the check runs when total reaches 4 (the second step after the damage): every
        # rank differs from rank 0
        assert seen == [(4, "ReplicaDivergenceError", list(range(1, P)))], seen


def _window_checkpoint(comm, tmp, what):
    from mfac_linalg.distributed import ColumnLayout, ShardedSlidingWindowInverseFisher
    lay, _, w = _window_pair(comm, "sharded", np.float64)
    rng = np.random.default_rng(9)
    d, J = lay.dim, lay.indices(comm.rank)
    for _ in range(6):
        w.step(rng.standard_normal(d)[J])
    path = os.path.join(tmp, f"win-{what}-{comm.rank}.npz")
    assert w.save(path) == path
    comm.barrier()
    if what == "same":
        w2 = ShardedSlidingWindowInverseFisher(lay.local_dim(comm.rank), 4, 0.5, comm,
                                               layout=lay, dtype="float64")
        w2.load(path)
        g = rng.standard_normal(d)[J]
        same = w2.digest() == w.digest()
        return same, bool(np.array_equal(w2.step(g), w.step(g)))
    if what == "layout":
        other = ColumnLayout.contiguous(d, comm.size)
        w2 = ShardedSlidingWindowInverseFisher(other.local_dim(comm.rank), 4, 0.5, comm,
                                               layout=other, dtype="float64")
        d0 = w2.digest()
        try:
            w2.load(path)
        except Exception as exc:
            return type(exc).__name__, str(exc), w2.digest() == d0
        return None
    if what == "corrupt":
        if comm.rank == 1:
            with open(path, "wb") as f:
                f.write(b"not a checkpoint")
        w2 = ShardedSlidingWindowInverseFisher(lay.local_dim(comm.rank), 4, 0.5, comm,
                                               layout=lay, dtype="float64")
        d0 = w2.digest()
        try:
            w2.load(path)
        except Exception as exc:
            return type(exc).__name__, str(exc), w2.digest() == d0
        return None
    if what == "swapped":                       # rank p loads rank q's file
        q = (comm.rank + 1) % comm.size
        w2 = ShardedSlidingWindowInverseFisher(lay.local_dim(comm.rank), 4, 0.5, comm,
                                               layout=lay, dtype="float64")
        try:
            w2.load(os.path.join(tmp, f"win-{what}-{q}.npz"))
        except Exception as exc:
            return type(exc).__name__, str(exc)
        return None


def test_window_checkpoint_roundtrip(cluster, tmp_path):
    for same, same_step in cluster.ok(_window_checkpoint, str(tmp_path), "same"):
        assert same and same_step


def test_window_checkpoint_refused_under_another_layout(cluster, tmp_path):
    for res in cluster.ok(_window_checkpoint, str(tmp_path), "layout"):
        assert res is not None
        kind, msg, unchanged = res
        assert kind == "ValueError" and "another column layout" in msg and unchanged


def test_window_checkpoint_bad_file_on_one_rank(cluster, tmp_path):
    for r, res in enumerate(cluster.ok(_window_checkpoint, str(tmp_path), "corrupt")):
        kind, msg, unchanged = res
        assert kind == ("ValueError" if r == 1 else "RemoteRankError"), res
        assert unchanged


def test_window_checkpoint_of_another_rank_refused(cluster, tmp_path):
    for res in cluster.ok(_window_checkpoint, str(tmp_path), "swapped"):
        assert res is not None and res[0] in ("ValueError", "RemoteRankError")


def _window_from_gradients(comm, blocks, bad):
    import mfac_linalg as ml
    from mfac_linalg.distributed import ShardedSlidingWindowInverseFisher as SW
    rng = np.random.default_rng(10)
    m, d, lam = 5, 19, 0.5
    G = rng.standard_normal((m, d))
    lay = _layout("sharded", d, comm.size)
    Gp = lay.split(G, comm.rank, axis=1)
    if bad and comm.rank == 1:
        Gp = Gp.copy()
        Gp[2, 0] = np.nan
    src = iter([Gp[:2], Gp[2:]]) if blocks else Gp
    try:
        w = SW.from_local_gradients(src, lam, comm, layout=lay, window=m if blocks else None)
    except Exception as exc:
        return type(exc).__name__, str(exc)
    ref = ml.SlidingWindowInverseFisher.from_gradients(G, lam)
    J = lay.indices(comm.rank)
    x = rng.standard_normal(d)
    g = rng.standard_normal(d)
    return {"matvec": _rel(w.matvec(x[J]), ref.matvec(x)[J]),
            "logdet": abs(w.logdet() - ref.logdet()) / abs(ref.logdet()),
            "step": _rel(w.step(g[J]), ref.step(g)[J]),
            "count": float(w.count == m and w.total == m + 1)}


@pytest.mark.parametrize("blocks", [False, True], ids=["array", "blocks"])
def test_window_from_local_gradients(cluster, blocks):
    for errs in cluster.ok(_window_from_gradients, blocks, False):
        assert errs.pop("count") == 1.0
        assert max(errs.values()) <= TOL, errs


def test_window_from_local_gradients_bad_rank(cluster):
    for r, res in enumerate(cluster.ok(_window_from_gradients, True, True)):
        assert res[0] == ("ValueError" if r == 1 else "RemoteRankError"), res
