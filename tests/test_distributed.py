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
import torch.distributed as dist  # noqa: E402

TOL = 1e-12
TIMEOUT = 120


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
        for p in self.procs:
            p.start()
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
    out = {"err": err, "shape": op.shape, "local_dim": op.local_dim,
           "dtype": str(op.matvec(x[J]).dtype),
           "digest": state_digest(op.factor).tolist()}
    op.check_replicas()
    return out


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


@pytest.mark.parametrize("what", ["m", "damping", "nan", "layout", "neg"])
def test_static_bad_setup_raises_everywhere(cluster, what):
    outs = cluster.ok(_static_bad_setup, what)
    for r, seen in enumerate(outs):
        assert seen is not None, f"rank {r} built an operator"
        if what in ("nan", "neg"):
            assert seen[0] == ("ValueError" if r == 1 else "RemoteRankError"), seen
        else:
            assert seen[0] == "ValueError" and "every rank" in seen[1], seen


def test_static_divergence_detected(cluster):
    outs = cluster.ok(_static_divergence)
    P = cluster.size
    for res in outs:
        assert res is not None
        ranks, msg = res
        assert ranks == [P - 1] and "differs" in msg
