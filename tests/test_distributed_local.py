"""mfac_linalg.distributed in one process: layouts, communicators and their adapters,
argument checks, and the sharded operators with P = 1 (the multi-process tests are in
test_distributed.py)."""
import math
import pickle
import sys
import types

import numpy as np
import pytest

import mfac_linalg as ml
from mfac_linalg import _backend as B
from mfac_linalg.distributed import (ColumnLayout, Communicator, MPIComm, RemoteRankError,
                                     ShardedSlidingWindowInverseFisher,
                                     ShardedStaticInverseFisher, SingleProcessComm, agree,
                                     allgather, as_comm, check_replicas, state_digest)


# -- layouts -------------------------------------------------------------------------------------

def test_contiguous_even_and_given():
    lay = ColumnLayout.contiguous(10, 3)
    assert [lay.ranges(p) for p in range(3)] == [[(0, 4)], [(4, 7)], [(7, 10)]]
    lay2 = ColumnLayout.contiguous(5, 3, local_dims=[0, 5, 0])
    assert lay2.ranges(0) == [] and lay2.local_dim(1) == 5
    assert lay2.indices(0).size == 0


def test_sharded_matches_fsdp_chunking():
    # FSDP FULL_SHARD: each flat unit padded to a multiple of P and cut into P equal chunks
    units, P = [10, 3, 7], 4
    lay = ColumnLayout.sharded(units, P)
    start = 0
    want = [[] for _ in range(P)]
    for n in units:
        flat = np.arange(start, start + n)
        c = -(-n // P)
        for p in range(P):
            want[p].extend(flat[p * c:(p + 1) * c].tolist())
        start += n
    for p in range(P):
        assert lay.indices(p).tolist() == want[p]


def test_parameter_aligned_cuts_on_parameter_boundaries():
    sizes = [4, 9, 3, 12, 2]
    bounds = set(np.cumsum([0] + sizes).tolist())
    lay = ColumnLayout.parameter_aligned(sizes, 3)
    for p in range(3):
        for a, b in lay.ranges(p):
            assert a in bounds and b in bounds
    assert sum(lay.local_dim(p) for p in range(3)) == sum(sizes)
    # a parameter larger than d / P: a rank may hold nothing, the partition still holds
    big = ColumnLayout.parameter_aligned([100, 1], 3)
    assert sorted(big.local_dim(p) for p in range(3)) == [0, 1, 100]


@pytest.mark.parametrize("lay", [ColumnLayout.contiguous(11, 3),
                                 ColumnLayout.sharded([5, 6], 2),
                                 ColumnLayout(11, [[(0, 2), (8, 11)], [(2, 8)]])])
def test_split_gather_owner_roundtrip(lay):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(11)
    X = rng.standard_normal((11, 3)).astype(np.float32)
    G = rng.standard_normal((4, 11))
    P = lay.size
    assert np.array_equal(lay.gather([lay.split(x, p) for p in range(P)]), x)
    Xg = lay.gather([lay.split(X, p) for p in range(P)])
    assert Xg.dtype == np.float32 and np.array_equal(Xg, X)
    assert np.array_equal(lay.gather([lay.split(G, p, axis=1) for p in range(P)], axis=1), G)
    for j in range(-11, 11):
        p, loc = lay.owner(j)
        assert lay.split(x, p)[loc] == x[j]
    assert ColumnLayout.from_dict(lay.to_dict()) == lay
    assert lay.fingerprint() == ColumnLayout.from_dict(lay.to_dict()).fingerprint()
    assert lay != ColumnLayout.contiguous(11, P, local_dims=[11] + [0] * (P - 1))


def test_layout_repr():
    assert repr(ColumnLayout.contiguous(5, 2)) == \
        "<ColumnLayout d=5 P=2 contiguous local_dims=[3, 2]>"
    assert repr(ColumnLayout.sharded([4, 4], 2)) == "<ColumnLayout d=8 P=2 ranges=4>"


@pytest.mark.parametrize("args,exc,msg", [
    ((4.0, [[(0, 4)]]), TypeError, "dim must be an integer"),
    ((0, [[(0, 0)]]), ValueError, "dim must be >= 1"),
    ((4, "ab"), TypeError, "ranges must be a sequence"),
    ((4, []), ValueError, "one entry per rank"),
    ((4, [[(0, 5)]]), ValueError, "stop must be <= 4"),
    ((4, [[(3, 1)]]), ValueError, "start <= stop"),
    ((4, [[(0, 3)], [(2, 4)]]), ValueError, "overlap"),
    ((4, [[(0, 1)], [(2, 4)]]), ValueError, "gap"),
    ((4, [[(0, 3)]]), ValueError, "end at 3"),
    ((4, [[(0, 1, 2)]]), TypeError, "pair"),
    ((4, [[(0, 2.5)]]), TypeError, "stop must be an integer"),
])
def test_layout_bad_arguments(args, exc, msg):
    with pytest.raises(exc, match=msg):
        ColumnLayout(*args)


def test_layout_bad_helpers():
    lay = ColumnLayout.contiguous(6, 2)
    with pytest.raises(ValueError, match="local_dims must sum to dim=6"):
        ColumnLayout.contiguous(6, 2, local_dims=[1, 2])
    with pytest.raises(ValueError, match="local_dims must have 2 entries"):
        ColumnLayout.contiguous(6, 2, local_dims=[6])
    with pytest.raises(ValueError, match="rank must be <= 1"):
        lay.local_dim(2)
    with pytest.raises(ValueError, match="x must have 6 entries along axis 0"):
        lay.split(np.ones(5), 0)
    with pytest.raises(ValueError, match=r"parts\[1\] must have shape \(3,\)"):
        lay.gather([np.ones(3), np.ones(2)])
    with pytest.raises(ValueError, match="parts must have 2 entries"):
        lay.gather([np.ones(3)])
    with pytest.raises(ValueError, match="j must be >= -6"):
        lay.owner(-7)
    with pytest.raises(TypeError, match=r"unit_sizes\[1\] must be an integer"):
        ColumnLayout.sharded([3, 2.0], 2)
    with pytest.raises(ValueError, match="layout data must be a dict"):
        ColumnLayout.from_dict({"dim": 3})


# -- communicators ------------------------------------------------------------------------------

def test_single_process_comm_and_helpers():
    comm = as_comm(None)
    assert isinstance(comm, SingleProcessComm) and (comm.rank, comm.size) == (0, 1)
    buf = np.arange(3.0)
    assert comm.allreduce_sum(buf) is buf and np.array_equal(buf, [0, 1, 2])
    assert comm.broadcast(buf) is buf
    comm.barrier()
    agree(comm, None, "nothing")                     # no failure: returns
    with pytest.raises(KeyError):
        agree(comm, KeyError("mine"), "x")           # this rank's own error comes back
    check_replicas(comm, [np.eye(3)])
    assert repr(comm) == "<SingleProcessComm rank=0 size=1>"


def test_comm_buffer_checks():
    comm = SingleProcessComm()
    with pytest.raises(TypeError, match="buf must be a float64 array; got dtype float32"):
        comm.allreduce_sum(np.ones(3, dtype=np.float32))
    with pytest.raises(TypeError, match="buf must be a float64 array"):
        comm.allreduce_sum([1.0, 2.0])
    with pytest.raises(ValueError, match="buf must be C-contiguous"):
        comm.allreduce_sum(np.ones((4, 4))[:, 1])
    with pytest.raises(ValueError, match="root must be <= 0"):
        comm.broadcast(np.ones(2), root=1)


def test_as_comm_refuses_other_objects():
    with pytest.raises(TypeError, match="comm must be None.*missing allreduce_sum"):
        as_comm(types.SimpleNamespace(rank=0, size=1, broadcast=None, barrier=None))
    with pytest.raises(TypeError, match="comm must be None"):
        as_comm("world")

    class Duck:
        rank, size = 0, 1

        def allreduce_sum(self, buf):
            return buf

        def broadcast(self, buf, root=0):
            return buf

        def barrier(self):
            pass

    duck = Duck()
    assert as_comm(duck) is duck


def test_state_digest_is_exact_bits():
    a = np.eye(3)
    b = a.copy()
    assert np.array_equal(state_digest(a), state_digest(b))
    b[1, 0] = np.nextafter(0.0, 1.0)
    assert not np.array_equal(state_digest(a), state_digest(b))
    d = state_digest(a)
    assert d.dtype == np.float64 and d.shape == (4,) and np.all(d == np.round(d))


class _FakeMPIComm:
    """The part of mpi4py's Comm API that MPIComm uses, for two ranks holding the same data
    (each collective doubles a sum), recording the calls."""

    def __init__(self, MPI):
        self.MPI, self.calls = MPI, []

    def Get_rank(self):
        return 0

    def Get_size(self):
        return 2

    def Allreduce(self, sendbuf, recvbuf, op):
        assert sendbuf is self.MPI.IN_PLACE and op is self.MPI.SUM
        self.calls.append("Allreduce")
        recvbuf *= 2

    def Reduce(self, sendbuf, recvbuf, op, root):
        assert op is self.MPI.SUM and root == 0 and sendbuf is self.MPI.IN_PLACE
        self.calls.append("Reduce")
        recvbuf *= 2

    def Bcast(self, buf, root):
        self.calls.append(f"Bcast{root}")

    def Barrier(self):
        self.calls.append("Barrier")


@pytest.fixture
def fake_mpi(monkeypatch):
    MPI = types.SimpleNamespace(IN_PLACE=object(), SUM=object())
    pkg = types.ModuleType("mpi4py")
    pkg.MPI = MPI
    monkeypatch.setitem(sys.modules, "mpi4py", pkg)
    monkeypatch.setitem(sys.modules, "mpi4py.MPI", MPI)
    MPI.COMM_WORLD = _FakeMPIComm(MPI)
    return MPI


def test_mpi_adapter_calls(fake_mpi):
    c = MPIComm()
    assert (c.rank, c.size) == (0, 2) and c.comm is fake_mpi.COMM_WORLD
    buf = np.arange(3.0)
    c.allreduce_sum(buf)
    assert np.array_equal(buf, [0.0, 2.0, 4.0])
    c2 = MPIComm(fake_mpi.COMM_WORLD, reduction="reduce_broadcast")
    c2.allreduce_sum(buf)
    c2.broadcast(buf, root=1)
    c2.barrier()
    assert np.array_equal(buf, [0.0, 4.0, 8.0])
    assert fake_mpi.COMM_WORLD.calls == ["Allreduce", "Reduce", "Bcast0", "Bcast1", "Barrier"]
    with pytest.raises(ValueError, match="reduction must be one of"):
        MPIComm(reduction="tree")


def test_mpi_adapter_needs_mpi4py(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    with pytest.raises(ImportError):
        MPIComm()


def test_torch_comm_single_rank(tmp_path):
    torch = pytest.importorskip("torch")
    import torch.distributed as dist
    from mfac_linalg.distributed import TorchComm
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(RuntimeError, match="needs torch.distributed initialised"):
        TorchComm()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        for red in ("allreduce", "reduce_broadcast"):
            c = TorchComm(reduction=red)
            buf = np.arange(4.0)
            assert c.allreduce_sum(buf) is buf and np.array_equal(buf, np.arange(4.0))
            t = torch.arange(3, dtype=torch.float64)
            c.broadcast(t.numpy())
        assert as_comm(dist.group.WORLD).size == 1
        op = ShardedStaticInverseFisher(np.eye(2, 5), 0.5, dist.group.WORLD)
        assert op.comm.size == 1
    finally:
        dist.destroy_process_group()


# -- the sharded operators with one rank --------------------------------------------------------

@pytest.fixture
def grads():
    return np.random.default_rng(1).standard_normal((5, 17))


def test_static_one_rank_equals_single_process(grads):
    op = ShardedStaticInverseFisher(grads, 0.3)
    ref = ml.StaticInverseFisher(grads, 0.3)
    x = np.random.default_rng(2).standard_normal((17, 2))
    assert np.allclose(op.matmat(x), ref.matmat(x), rtol=1e-13, atol=0)
    assert np.allclose(op.diagonal(), ref.diagonal(), rtol=1e-13, atol=0)
    assert op.todense().shape == (17, 17)
    assert np.allclose(op.todense(), ref.todense(), rtol=0, atol=1e-13 / 0.3)
    assert op.shape == (17, 17) and op.local_dim == 17 and op.num_grads == 5
    assert op.form == "dual" and op.damping == 0.3
    assert op.T is op and op.adjoint() is op
    assert np.allclose(x[:, 0] @ op, ref @ x[:, 0], rtol=1e-13, atol=0)
    L = op.factor
    with pytest.raises(ValueError):
        L[0, 0] = 1.0                                # read-only
    assert op.local_factor().shape == (5, 17)


def test_static_refusals(grads):
    op = ShardedStaticInverseFisher(grads, 0.3)
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(op)
    with pytest.raises(TypeError, match="SciPy LinearOperator"):
        op.to_scipy()
    with pytest.raises(TypeError, match="no lazy algebra"):
        op + op
    with pytest.raises(TypeError, match="no lazy algebra"):
        2.0 * op
    with pytest.raises(TypeError, match="no lazy algebra"):
        -op
    with pytest.raises(ValueError, match="todense would build a 17 x 17"):
        op.todense(max_elements=100)
    with pytest.raises(IndexError, match=r"i must be in \[-17, 17\)"):
        op.entry(17, 0)
    with pytest.raises(TypeError, match="j must be an integer"):
        op.entry(0, 1.5)
    with pytest.raises(ValueError, match=r"x must have shape \(17,\) or \(17, k\).*rank 0's "
                       r"slice: local_dim=17 of d=17"):
        op.matvec(np.ones(16))
    with pytest.raises(ValueError, match=r"x must have shape \(17,\) or \(17, 1\) on rank 0"):
        op.matvec(np.ones((17, 2)))
    with pytest.raises(ValueError, match="x must be finite"):
        op.matvec(np.full(17, np.nan))
    with pytest.raises(ValueError, match=r"X must be 2-D with shape \(17, k\)"):
        op.matmat(np.ones(17))


@pytest.mark.parametrize("args,kwargs,exc,msg", [
    ((np.ones(5), 0.1), {}, ValueError, r"local_grads must be 2-D \(m, d_p\)"),
    ((np.ones((0, 3)), 0.1), {}, ValueError, "at least one gradient"),
    ((np.full((2, 3), np.inf), 0.1), {}, ValueError, "local_grads must be finite"),
    ((np.ones((2, 3)), -1.0), {}, ValueError, "damping must be > 0"),
    ((np.ones((2, 3)), "0.1"), {}, TypeError, "damping must be a real number"),
    ((np.ones((2, 3)), 0.1), {"layout": "contiguous"}, TypeError,
     "layout must be a ColumnLayout or None"),
    ((np.ones((2, 3)), 0.1), {"layout": ColumnLayout.contiguous(3, 2)}, ValueError,
     r"layout must have one entry per rank \(1\)"),
    ((np.ones((2, 3)), 0.1), {"layout": ColumnLayout.contiguous(4, 1)}, ValueError,
     r"must have layout.local_dim\(p\) columns on rank p, \[4\]; got \[3\]"),
    ((np.ones((2, 3)), 0.1, "world"), {}, TypeError, "comm must be None"),
])
def test_static_bad_arguments(args, kwargs, exc, msg):
    with pytest.raises(exc, match=msg):
        ShardedStaticInverseFisher(*args, **kwargs)


def test_static_does_not_touch_the_gradients(grads):
    G = grads.copy()
    G.flags.writeable = False
    ShardedStaticInverseFisher(G, 0.3)
    assert np.array_equal(G, grads)


def test_window_one_rank_equals_single_process():
    rng = np.random.default_rng(3)
    w = ShardedSlidingWindowInverseFisher(9, 3, 0.4, dtype="float64")
    ref = ml.SlidingWindowInverseFisher(dim=9, window=3, damping=0.4, dtype="float64")
    for _ in range(5):
        g = rng.standard_normal(9)
        assert np.allclose(w.step(g), ref.step(g), rtol=1e-13, atol=0)
    assert w.count == 3 and w.total == 5 and w.engine == ref.engine
    assert np.array_equal(w.gradients(), ref.gradients())
    assert abs(w.logdet() - ref.logdet()) <= 1e-13 * abs(ref.logdet())
    w.reset()
    assert w.count == 0 and np.allclose(w.matvec(np.ones(9)), np.ones(9) / 0.4)
    assert "held=0" in repr(w) and repr(w).startswith("<ShardedSlidingWindowInverseFisher d=9")


@pytest.mark.parametrize("args,kwargs,exc,msg", [
    ((-1, 3, 0.1), {}, ValueError, "local_dim must be >= 0"),
    ((4, 0, 0.1), {}, ValueError, "window must be >= 1"),
    ((4, 2.0, 0.1), {}, TypeError, "window must be an integer"),
    ((4, 3, 0.0), {}, ValueError, "damping must be > 0"),
    ((4, 3, 0.1), {"dtype": "float16"}, ValueError, "float16 and bfloat16 storage need the GPU"),
    ((4, 3, 0.1), {"engine": "qr"}, ValueError, "engine must be one of"),
    ((4, 3, 0.1), {"normalize": "mean"}, ValueError, "normalize must be one of"),
    ((4, 3, 0.1), {"check_every": 0}, ValueError, "check_every must be >= 1"),
])
def test_window_bad_arguments(args, kwargs, exc, msg):
    with pytest.raises(exc, match=msg):
        ShardedSlidingWindowInverseFisher(*args, **kwargs)


def test_window_bad_updates_leave_state():
    w = ShardedSlidingWindowInverseFisher(4, 3, 0.5, dtype="float64")
    w.update(np.ones(4))
    before = w.digest()
    with pytest.raises(ValueError, match=r"g must have shape \(4,\) for step on rank 0"):
        w.step(np.ones(5))
    with pytest.raises(ValueError, match="g must be finite"):
        w.update(np.array([[1.0, 2, 3, 4], [1, np.nan, 0, 0]]))
    with pytest.raises(ValueError, match="too large"), np.errstate(over="ignore"):
        w.step(np.full(4, 1e200))
    assert w.digest() == before and w.total == 1


def test_window_checkpoint_file_checks(tmp_path):
    w = ShardedSlidingWindowInverseFisher(4, 2, 0.5, dtype="float64")
    w.step(np.arange(4.0))
    p = w.save(tmp_path / "w.npz")
    st = ShardedSlidingWindowInverseFisher.read_state(p)
    assert st["layout"] == w.layout.to_dict() and st["rank"] == 0
    w2 = ShardedSlidingWindowInverseFisher(4, 2, 0.5, dtype="float64")
    assert w2.load(p).digest() == w.digest()
    bad = dict(st)
    bad["K"] = np.full((2, 2), np.nan)
    with pytest.raises(ValueError, match="state: K holds NaN"):
        w2.load_state_dict(bad)
    bad = dict(st)
    bad["window"] = 3
    with pytest.raises(ValueError, match="state: window=3 does not match"):
        w2.load_state_dict(bad)
    with pytest.raises(TypeError, match="state must be a dict"):
        w2.load_state_dict([1])
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(ValueError, match="cannot read a sharded-window checkpoint"):
        w2.load(tmp_path / "junk.npz")
    assert w2.digest() == w.digest()
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".tmp-")]


@pytest.mark.parametrize("engine", ["cholesky", "explicit"])
def test_window_load_state_dict_refuses_inconsistent_states(engine):
    # every one of these loaded silently before (count 1.0/True, a changed damping or
    # normalization, G, K or F not matching each other, since_refresh past refresh_every)
    w = ShardedSlidingWindowInverseFisher(6, 4, 0.1, dtype="float64", engine=engine)
    w.update(np.random.default_rng(5).standard_normal((3, 6)))
    st, before = w.state_dict(), w.digest()
    x = np.arange(6.0)
    y = w.matvec(x)
    cases = [("count", 1.0, TypeError, "count must be an integer"),
             ("count", True, TypeError, "count must be an integer"),
             ("count", 2, ValueError, "rows beyond 2 of G are not empty"),
             ("damping", 0.3, ValueError, "F is not the"),
             ("normalize", "count", ValueError, "F is not the"),
             ("G", st["G"] * 1.001, ValueError, "K is not the Gram matrix"),
             ("K", st["K"] * 1.001, ValueError, "F is not the|K is not the Gram"),
             ("F", st["F"] * 1.01, ValueError, "F is not the"),
             ("since_refresh", 99, ValueError, "exceeds refresh_every"),
             ("damping", "0.1", TypeError, "damping must be a real number")]
    for key, val, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            w.load_state_dict(dict(st, **{key: val}))
        assert w.digest() == before and np.array_equal(w.matvec(x), y), key
    assert w.load_state_dict(st).digest() == before


def test_window_load_checks_headers_before_reading(tmp_path):
    # np.load read every member whatever its declared shape (a forged header could make
    # it allocate any size) and a bad field in a file came back as a TypeError
    import io
    import json
    import zipfile
    w = ShardedSlidingWindowInverseFisher(4, 2, 0.5, dtype="float64")
    w.step(np.arange(4.0))
    good = w.save(tmp_path / "w.npz")
    before = w.digest()
    with np.load(good) as f:
        raw = {k: f[k] for k in f.files}

    def write(name, members):
        p = tmp_path / name
        with zipfile.ZipFile(p, "w") as zf:
            for k, v in members.items():
                b = io.BytesIO()
                np.save(b, v)
                data = b.getvalue()
                if k == "G" and v.shape == (1,):          # forge a huge declared shape
                    data = data.replace(b"(1,)", b"(100000, 100000)".ljust(4))
                zf.writestr(k + ".npy", data)
        return p

    cases = [({**raw, "G": np.zeros(1)},
              r"G must have shape \(2, 4\); the file declares shape \(100000, 100000\)"),
             ({**raw, "X": np.zeros(1)}, "members must be"),
             ({**raw, "meta": np.array(json.dumps([1]))}, "metadata is not a dict")]
    for i, (members, msg) in enumerate(cases):
        with pytest.raises(ValueError, match=msg):
            w.load(write(f"bad{i}.npz", members))
    meta = json.loads(str(raw["meta"]))
    bad = write("str.npz", {**raw, "meta": np.array(json.dumps(dict(meta, count="1")))})
    with pytest.raises(ValueError, match="str.npz: state count must be an integer"):
        w.load(bad)
    assert w.digest() == before and w.load(good).digest() == before


def test_sharded_static_damping_range_follows_the_result_dtype():
    # float32 gradients with damping 1e48 were accepted: 1/damping underflows float32
    # and every product came back wrong by 100% (the single-process classes refuse it)
    G = np.random.default_rng(7).standard_normal((3, 6))
    with pytest.raises(ValueError, match="damping must be in .* for float32 results"):
        ShardedStaticInverseFisher((G * 1e25).astype(np.float32), 1e48)
    with pytest.raises(ValueError, match="damping must be in .* for float32 results"):
        ShardedStaticInverseFisher(G.astype(np.float32), 1e-30)
    with pytest.raises(ValueError, match="damping must be in .* for float32 results"):
        ml.StaticInverseFisher(G.astype(np.float32), 1e-30)
    op = ShardedStaticInverseFisher(G, 1e34)                 # float64: inside its range
    F = 1e34 * np.eye(6) + G.T @ G / 3
    x = np.arange(1.0, 7.0)
    assert np.allclose(op.matvec(x), np.linalg.solve(F, x), rtol=1e-13, atol=0)


def test_sharded_todense_checks_max_elements():
    # max_elements=nan compared False and bypassed the size guard
    s = ShardedStaticInverseFisher(np.random.default_rng(6).standard_normal((3, 6)), 0.1)
    for bad, exc in ((float("nan"), ValueError), (-1, ValueError), ("36", TypeError),
                     (None, TypeError), (True, TypeError)):
        with pytest.raises(exc, match="max_elements"):
            s.todense(max_elements=bad)
    with pytest.raises(ValueError, match="max_elements=35"):
        s.todense(max_elements=35)
    assert s.todense(max_elements=36).shape == (6, 6)


def test_collective_helpers_check_their_arguments():
    # comm=3 raised AttributeError; error="boom" Python's "must derive from BaseException";
    # state_digest(None) hashed an object array's addresses (differs across processes)
    c, lay = SingleProcessComm(), ColumnLayout.contiguous(4, 1)
    for call in (lambda: agree(3, None, "x"), lambda: check_replicas(3, [np.eye(2)]),
                 lambda: allgather(np.ones(4), lay, 3)):
        with pytest.raises(TypeError, match="comm must be None, a mfac_linalg"):
            call()
    with pytest.raises(TypeError, match="error must be None or an exception; got str"):
        agree(c, "boom", "x")
    with pytest.raises(TypeError, match="arrays must be a sequence of arrays"):
        check_replicas(c, None)
    with pytest.raises(TypeError, match=r"arrays\[1\] must be a numeric or string array"):
        state_digest(np.eye(2), None)
    with pytest.raises(TypeError, match="layout must be a ColumnLayout; got int"):
        allgather(np.ones(4), 3, c)
    with pytest.raises(ValueError, match="part must be at least 1-D"):
        allgather(np.array(1.0), lay, c)
    out = allgather(np.arange(4, dtype=np.float32), lay, None)
    assert out.dtype == np.float32 and np.array_equal(out, np.arange(4))
    assert agree(None, None, "x") is None


def test_from_local_gradients_refuses_empty_and_misshapen_blocks():
    G = np.random.default_rng(4).standard_normal((3, 5))
    with pytest.raises(ValueError, match="local_grads must yield at least one"):
        ShardedSlidingWindowInverseFisher.from_local_gradients(iter([]), 0.1, window=3)
    with pytest.raises(ValueError, match=r"local_grads must be given as \(k, 5\) row"):
        ShardedSlidingWindowInverseFisher.from_local_gradients(iter([G[:2], G[2:, :4]]),
                                                               0.1, window=3)
    bad = G[2:].copy()
    bad[0, 1] = np.inf
    with pytest.raises(ValueError, match="local_grads must be finite"):
        ShardedSlidingWindowInverseFisher.from_local_gradients(iter([G[:2], bad]), 0.1,
                                                               window=3)
    w = ShardedSlidingWindowInverseFisher.from_local_gradients(iter([G[:2], G[2:]]), 0.1,
                                                               window=3, dtype="float64")
    assert w.count == 3 and np.array_equal(w.gradients(), G)


def test_layout_split_gather_place_refuse_bad_arrays_before_writing():
    # 0-d arrays raised IndexError; place wrote a too-long part's head silently, took
    # lists and read-only outs to internal errors, and could write part of a multi-range
    # rank before failing
    lay = ColumnLayout(10, [[(0, 2), (8, 10)], [(2, 8)]])
    with pytest.raises(ValueError, match="x must be at least 1-D"):
        lay.split(np.array(1.0), 0)
    with pytest.raises(ValueError, match=r"parts\[0\] must be at least 1-D"):
        lay.gather([np.array(1.0)] * 2)
    out = np.arange(10.0)
    for part, o, kw, exc, msg in [
            (np.ones(7), out, {}, ValueError, r"part must have shape \(4,\)"),
            (np.array(5.0), out, {}, ValueError, r"part must have shape \(4,\)"),
            (np.ones(4), [0.0] * 10, {}, TypeError, "out must be a writable array"),
            (np.ones(4), out[:9], {}, ValueError, "out must have 10 entries"),
            (np.ones(4), out, {"axis": 1}, ValueError, "axis must be <= 0"),
            (np.ones(4), out, {"axis": 1.5}, TypeError, "axis must be an integer")]:
        with pytest.raises(exc, match=msg):
            lay.place(part, 0, o, **kw)
    assert np.array_equal(out, np.arange(10.0))
    ro = np.zeros(10)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="out must be writable"):
        lay.place(np.ones(4), 0, ro)
    full = np.zeros((2, 10))
    assert lay.place(np.ones((2, 4)), 0, full, axis=-1) is full
    assert np.array_equal(full[0], [1, 1, 0, 0, 0, 0, 0, 0, 1, 1])


@pytest.mark.skipif(not hasattr(__import__("os"), "mkfifo"), reason="needs os.mkfifo")
def test_window_checkpoint_refuses_directories_and_non_regular_files(tmp_path):
    import os
    w = ShardedSlidingWindowInverseFisher(4, 2, 0.5, dtype="float64")
    w.step(np.arange(4.0))
    before = w.digest()
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="is a directory"):
        w.save(tmp_path)
    for call in (lambda: w.save(fifo), lambda: w.load(fifo)):
        with pytest.raises(ValueError, match="not a regular file"):
            call()
    assert sorted(os.listdir(tmp_path)) == ["fifo"] and w.digest() == before
    real, link = tmp_path / "real.npz", tmp_path / "link.npz"
    w.save(real)
    os.symlink(real, link)
    w.step(np.ones(4))
    assert w.save(link) == str(link)             # through the link: the link survives
    assert os.path.islink(link)
    w2 = ShardedSlidingWindowInverseFisher(4, 2, 0.5, dtype="float64")
    assert w2.load(real).digest() == w.digest()


def test_remote_rank_error_message():
    e = RemoteRankError([2], "step")
    assert e.ranks == [2] and "rank(s) [2] failed during step" in str(e)


def test_communicator_base_is_the_protocol():
    assert isinstance(SingleProcessComm(), Communicator)


@pytest.mark.gpu
@pytest.mark.skipif(not B.gpu_available(), reason="needs CuPy and a CUDA GPU")
def test_static_one_rank_on_gpu(grads):
    import cupy as cp
    G = cp.asarray(grads)
    op = ShardedStaticInverseFisher(G, 0.3)
    ref = ml.StaticInverseFisher(grads, 0.3)
    x = np.random.default_rng(4).standard_normal(17)
    y = op.matvec(cp.asarray(x))
    assert isinstance(y, cp.ndarray)
    assert np.allclose(cp.asnumpy(y), ref.matvec(x), rtol=1e-12, atol=0)


# -- P ranks as threads of one process: random operation sequences (hypothesis) -------------

import threading  # noqa: E402

from hypothesis import given, strategies as st  # noqa: E402


class _ThreadGroup:
    def __init__(self, P):
        self.P = P
        self.barrier = threading.Barrier(P, timeout=30)
        self.slots = [None] * P


class ThreadComm(Communicator):
    """P ranks as threads: every rank sums the P buffers in rank order (the same bits
    everywhere), as an ordered all-reduce would."""

    def __init__(self, group, rank):
        self.g, self.rank, self.size = group, rank, group.P

    def _allreduce_sum(self, buf):
        g = self.g
        g.slots[self.rank] = buf.copy()
        g.barrier.wait()
        total = g.slots[0].copy()
        for p in range(1, g.P):
            total += g.slots[p]
        g.barrier.wait()
        buf[...] = total

    def _broadcast(self, buf, root):
        g = self.g
        if self.rank == root:
            g.slots[root] = buf.copy()
        g.barrier.wait()
        src = g.slots[root]
        g.barrier.wait()
        buf[...] = src

    def barrier(self):
        self.g.barrier.wait()


def run_ranks(P, fn, *args):
    """fn(comm, *args) on P threads; the per-rank results (exceptions re-raised)."""
    group = _ThreadGroup(P)
    out = [None] * P

    def body(r):
        try:
            out[r] = ("ok", fn(ThreadComm(group, r), *args))
        except BaseException as exc:          # noqa: BLE001 - reported below
            out[r] = ("raised", exc)
            group.barrier.abort()

    threads = [threading.Thread(target=body, args=(r,)) for r in range(P)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for kind, val in out:
        if kind == "raised" and not isinstance(val, threading.BrokenBarrierError):
            raise val
    return [v for _, v in out]


def _rel(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    n = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / (n if n > 0 else 1.0))


_OPS = st.sampled_from(["step", "update", "batch", "matvec", "quad", "entry", "diagonal",
                        "logdet", "fisher", "refresh", "reset"])


@st.composite
def _scenarios(draw):
    P = draw(st.integers(1, 3))
    d = draw(st.integers(P, 14))
    m = draw(st.integers(1, 5))
    kind = draw(st.sampled_from(["contiguous", "random"]))
    if kind == "random":                       # random ranges, ranks may hold nothing
        cuts = sorted(draw(st.lists(st.integers(1, d - 1), max_size=4, unique=True))) \
            if d > 1 else []
        bounds = [0, *cuts, d]
        owners = draw(st.lists(st.integers(0, P - 1), min_size=len(bounds) - 1,
                               max_size=len(bounds) - 1))
        ranges = [[] for _ in range(P)]
        for (a, b), p in zip(zip(bounds[:-1], bounds[1:]), owners):
            ranges[p].append((a, b))
        layout = ColumnLayout(d, ranges)
    else:
        layout = ColumnLayout.contiguous(d, P)
    opts = dict(normalize=draw(st.sampled_from(["window", "count"])),
                engine=draw(st.sampled_from(["cholesky", "explicit"])),
                refresh_every=draw(st.sampled_from([None, 1, 2])))
    ops = draw(st.lists(_OPS, min_size=1, max_size=12))
    return layout, m, opts, ops, draw(st.integers(0, 2 ** 31 - 1))


def _play(comm, layout, m, opts, ops, seed):
    lam = 0.7
    J = layout.indices(comm.rank)
    d = layout.dim
    w = ShardedSlidingWindowInverseFisher(layout.local_dim(comm.rank), m, lam, comm,
                                          layout=layout, dtype="float64", **opts)
    ref = ml.SlidingWindowInverseFisher(dim=d, window=m, damping=lam, dtype="float64", **opts)
    rng = np.random.default_rng(seed)          # the same draws on every rank
    worst = 0.0
    for op in ops:
        x = rng.standard_normal(d)
        if op == "step":
            worst = max(worst, _rel(w.step(x[J]), ref.step(x)[J]))
        elif op == "update":
            w.update(x[J])
            ref.update(x)
        elif op == "batch":
            Gb = rng.standard_normal((int(rng.integers(2, 5)), d))
            w.update(Gb[:, J])
            ref.update(Gb)
        elif op == "matvec":
            worst = max(worst, _rel(w.matvec(x[J]), ref.matvec(x)[J]))
        elif op == "quad":
            worst = max(worst, _rel(w.quad(x[J]), ref.quad(x)))
        elif op == "entry":
            i, j = (int(v) for v in rng.integers(0, d, 2))
            worst = max(worst, abs(w.entry(i, j) - ref.entry(i, j)) * lam)
        elif op == "diagonal":
            worst = max(worst, _rel(w.diagonal(), ref.diagonal()[J]))
        elif op == "logdet":
            worst = max(worst, _rel(w.logdet(), ref.logdet()))
        elif op == "fisher":
            F, Fr = w.fisher(), ref.fisher()
            i, j = (int(v) for v in rng.integers(0, d, 2))
            worst = max(worst, _rel(F.matvec(x[J]), Fr.matvec(x)[J]), _rel(F.quad(x[J]),
                        Fr.quad(x)), _rel(F.diagonal(), Fr.diagonal()[J]),
                        abs(F.entry(i, j) - Fr.entry(i, j)) / (1 + abs(Fr.entry(i, j))))
        elif op == "refresh":
            w.refresh()
            ref.refresh()
        else:
            w.reset()
            ref.reset()
        assert w.count == ref.count and w.total == ref.total
    worst = max(worst, _rel(w.todense(), ref.todense()))
    return worst, w.digest()


@given(_scenarios())
def test_window_random_sequences_on_thread_ranks(scenario):
    layout, m, opts, ops, seed = scenario
    outs = run_ranks(layout.size, _play, layout, m, opts, ops, seed)
    for worst, _ in outs:
        assert worst <= 1e-12, (worst, ops)
    assert len({dg for _, dg in outs}) == 1


def _static_threads(comm, layout, m, seed):
    rng = np.random.default_rng(seed)
    d = layout.dim
    G = rng.standard_normal((m, d))
    J = layout.indices(comm.rank)
    op = ShardedStaticInverseFisher(G[:, J], 0.6, comm, layout=layout)
    ref = ml.StaticInverseFisher(G, 0.6)
    X = rng.standard_normal((d, 2))
    i, j = (int(v) for v in rng.integers(0, d, 2))
    return max(_rel(op.matmat(X[J]), ref.matmat(X)[J]), _rel(op.quad(X[J]), ref.quad(X)),
               abs(op.entry(i, j) - ref.entry(i, j)) * 0.6, _rel(op.todense(), ref.todense()),
               _rel(op.diagonal(), ref.diagonal()[J]),
               # log det F = d log(lam) + log det C - r log(m lam) can cancel to near 0
               # (-7e-5 at m=4, seed=4): its error against the terms' size, not its own
               abs(op.logdet() - ref.logdet()) / max(1.0, abs(d * math.log(0.6))))


@given(st.integers(1, 3), st.integers(1, 6), st.integers(0, 2 ** 31 - 1))
def test_static_random_layouts_on_thread_ranks(P, m, seed):
    rng = np.random.default_rng(seed)
    d = m + 1 + int(rng.integers(P, 12))       # m < d: the dual form on both sides
    layout = ColumnLayout.sharded([d - 2, 2], P) if seed % 2 else ColumnLayout.contiguous(d, P)
    for worst in run_ranks(P, _static_threads, layout, m, seed):
        assert worst <= 1e-12


# -- the CUDA buffer's fused one-vector path, through a host stand-in ------------------------

def _fused_parts():
    """make_buffer / pick_engine whose buffer has the CUDA buffer's fused interface
    (start_vector, combine_vector; its prepare defers the NaN check) and whose engine has
    the kernel engines' solve_kernel, all in NumPy: the sharded window's fused control flow
    runs on the CPU."""
    from mfac_linalg._capacitance import pick_engine
    from mfac_linalg.sliding.buffer import RingBuffer

    class FusedHost(RingBuffer):
        fused = True
        coef_dtype = np.float64

        def prepare(self, rows, check=True, name="g"):
            return rows.astype(self.storage, copy=False)      # the check is deferred

        def start_vector(self, x, n, lam, check):
            u = np.zeros(self.m)
            u[:n] = self.G[:n] @ x
            return u, x / lam

        def combine_vector(self, y, c, n, lam):
            return y - (self.G[:n].T @ c[:n]) / lam

    def make(window, dim, storage, backend, accumulate="auto"):
        return FusedHost(window, dim, storage, backend)

    def pick(*args, **kwargs):
        eng = pick_engine(*args, **kwargs)
        eng.solve_kernel = lambda u, dtype=np.float64: eng.solve(u[:eng.n, None])[:, 0]
        return eng

    return make, pick


def _fused_play(comm, layout, seed):
    lam, m = 0.8, 3
    rng = np.random.default_rng(seed)
    J = layout.indices(comm.rank)
    w = ShardedSlidingWindowInverseFisher(layout.local_dim(comm.rank), m, lam, comm,
                                          layout=layout, dtype="float64")
    assert w._buf.fused
    ref = ml.SlidingWindowInverseFisher(dim=layout.dim, window=m, damping=lam, dtype="float64")
    worst = 0.0
    for _ in range(5):
        g, x = rng.standard_normal(layout.dim), rng.standard_normal(layout.dim)
        worst = max(worst, _rel(w.step(g[J]), ref.step(g)[J]),
                    _rel(w.matvec(x[J]), ref.matvec(x)[J]),
                    _rel(w.quad(x[J]), ref.quad(x)))
    bad = g[J].copy()
    if comm.rank == layout.size - 1:
        bad[...] = np.nan                      # the deferred check is done before agreeing
    before = w.digest()
    try:
        w.step(bad)
        raised = None
    except Exception as exc:
        raised = type(exc).__name__
    return worst, raised, w.digest() == before


def test_fused_vector_path_on_thread_ranks(monkeypatch):
    import mfac_linalg.distributed.window as W
    monkeypatch.setattr(W, "_parts", _fused_parts)
    lay = ColumnLayout.contiguous(11, 2)
    outs = run_ranks(2, _fused_play, lay, 5)
    for r, (worst, raised, same) in enumerate(outs):
        assert worst <= 1e-12
        assert raised == ("ValueError" if r == 1 else "RemoteRankError") and same


def _mixed_checkpoints(comm, tmp):
    """Rank 0 loads a checkpoint one step older than rank 1's: the loaded replicas
    differ, every rank raises and keeps the state it had."""
    import os
    from mfac_linalg.distributed import ReplicaDivergenceError
    lay = ColumnLayout.contiguous(9, comm.size)
    J = lay.indices(comm.rank)
    rng = np.random.default_rng(2)
    w = ShardedSlidingWindowInverseFisher(lay.local_dim(comm.rank), 3, 0.5, comm, layout=lay,
                                          dtype="float64")
    for t in range(4):
        w.step(rng.standard_normal(9)[J])
        w.save(os.path.join(tmp, f"r{comm.rank}-t{t}.npz"))
    fresh = ShardedSlidingWindowInverseFisher(lay.local_dim(comm.rank), 3, 0.5, comm,
                                              layout=lay, dtype="float64")
    d0 = fresh.digest()
    t = 2 if comm.rank == 0 else 3
    try:
        fresh.load(os.path.join(tmp, f"r{comm.rank}-t{t}.npz"))
    except ReplicaDivergenceError as exc:
        return exc.ranks, fresh.digest() == d0, fresh.total
    return None


def test_checkpoints_of_different_steps_are_refused(tmp_path):
    for res in run_ranks(2, _mixed_checkpoints, str(tmp_path)):
        assert res == ([1], True, 0)


def _mismatched_options(comm):
    try:
        ShardedSlidingWindowInverseFisher(3, 2, 0.5, comm, dtype="float64",
                                          engine="cholesky" if comm.rank else "explicit")
    except ValueError as exc:
        return str(exc)


def test_window_options_must_agree():
    for msg in run_ranks(2, _mismatched_options):
        assert "engine must be the same on every rank" in msg


def _gpu_window_play(comm, layout, dtype, seed):
    import cupy as cp
    J = layout.indices(comm.rank)
    a, b = int(J[0]), int(J[-1]) + 1             # contiguous layouts only
    w = ShardedSlidingWindowInverseFisher(layout.local_dim(comm.rank), 16, 1.0, comm,
                                          layout=layout, dtype=dtype, device="gpu")
    ref = ml.SlidingWindowInverseFisher(dim=layout.dim, window=16, damping=1.0, dtype=dtype,
                                        device="gpu")
    rs = cp.random.RandomState(seed)
    worst = 0.0
    for _ in range(20):
        g = rs.standard_normal(layout.dim, dtype=cp.float32)
        x = rs.standard_normal(layout.dim, dtype=cp.float32)
        worst = max(worst, _rel(cp.asnumpy(w.step(g[a:b])), cp.asnumpy(ref.step(g)[a:b])),
                    _rel(cp.asnumpy(w.matvec(x[a:b])), cp.asnumpy(ref.matvec(x)[a:b])),
                    _rel(w.quad(x[a:b]), ref.quad(x)))
    return worst, w.digest()


@pytest.mark.gpu
@pytest.mark.skipif(not B.gpu_available(), reason="needs CuPy and a CUDA GPU")
@pytest.mark.parametrize("dtype,tol", [("float32", 1e-4), ("bfloat16", 1e-2)])
@pytest.mark.parametrize("P", [1, 2])
def test_window_on_gpu_thread_ranks(P, dtype, tol):
    # P thread ranks on one GPU, the single-device kernels on each block; float32
    # accumulation in different orders, kappa_W = lambda_max(F)/lambda ~ 1 + d/m ~ 250
    lay = ColumnLayout.contiguous(4000, P)
    outs = run_ranks(P, _gpu_window_play, lay, dtype, 3)
    for worst, _ in outs:
        assert worst <= tol
    assert len({dg for _, dg in outs}) == 1


def test_sharded_quad_is_float64_faithful_with_float64_accumulation():
    """x.x in float64 where the passes accumulate in float64, as the single window does:
    x nearly in the span of the gradients makes x^T F^-1 x a cancellation (it was in
    float32: relative error 0.1-0.9)."""
    rng = np.random.default_rng(0)
    d, m, lam = 2000, 4, 1e-6
    G = rng.standard_normal((m, d)).astype(np.float32)
    w = ml.SlidingWindowInverseFisher(d, m, lam, accumulate="float64")
    s = ShardedSlidingWindowInverseFisher(d, m, lam, None, accumulate="float64")
    w64 = ml.SlidingWindowInverseFisher(d, m, lam, dtype="float64")
    for g in G:
        w.update(g)
        s.update(g)
        w64.update(g.astype(np.float64))
    x = (G[0] + 1e-3 * rng.standard_normal(d)).astype(np.float32)
    ref = w64.quad(x.astype(np.float64))
    for X in (x, np.stack([x, x], 1)):
        assert np.abs(s.quad(X) - ref).max() <= 1e-9 * abs(ref)
        assert np.abs(w.quad(X) - ref).max() <= 1e-9 * abs(ref)


def test_sharded_load_called_on_the_class_says_how_to_load():
    with pytest.raises(TypeError, match="is an instance method"):
        ShardedSlidingWindowInverseFisher.load("w.npz", None)


# -- a bad argument on one rank fails every rank (fuzz round five) -------------------------------

def _one_rank_bad(comm, what):
    """Rank 1 passes a bad argument, rank 0 a good one; both then run a matvec, which must
    work (the ranks still run the same collectives)."""
    rng = np.random.default_rng(4)
    lay = ColumnLayout.contiguous(6, comm.size)
    J = lay.indices(comm.rank)
    G = rng.standard_normal((3, 6))
    op = ShardedStaticInverseFisher(G[:, J], 0.5, comm, layout=lay)
    xall = rng.standard_normal(6)
    x = xall[J]
    bad = comm.rank == 1
    calls = {
        "todense": lambda: op.todense(max_elements=float("nan") if bad else 10**6),
        "todense_small": lambda: op.todense(max_elements=3 if bad else 10**6),
        "rmatmul": lambda: ("not an array" if bad else x) @ op,
        "mul_scalar": lambda: op * (2.0 if bad else x),
        "dot_operator": lambda: op.dot(op if bad else x),
        "allgather_0d": lambda: allgather(np.float64(1.0) if bad else x, lay, comm),
        "allgather_axis": lambda: allgather(x, lay, comm, axis=5 if bad else 0),
        "allgather_ndim": lambda: allgather(x[:, None] if bad else x, lay, comm),
        "mul_ragged": lambda: op * ([[1.0], [1.0, 2.0]] if bad else x),
        "getitem": lambda: op[0] if bad else op[0, 1],
    }
    try:
        calls[what]()
        first = "no error"
    except RemoteRankError:
        first = ("remote",)
    except (TypeError, ValueError) as exc:
        first = ("local", type(exc).__name__, f"{type(exc).__name__}: {exc}")
    y = op.matvec(x)                       # the next collective: both ranks, right result
    ok = np.allclose(y, ml.StaticInverseFisher(G, 0.5).matvec(xall)[J], rtol=1e-12)
    return first, y.shape, ok


@pytest.mark.parametrize("what,msg", [
    ("todense", None), ("todense_small", None), ("rmatmul", None), ("mul_scalar", None),
    ("dot_operator", None), ("allgather_0d", None), ("allgather_axis", None),
    ("allgather_ndim", None), ("mul_ragged", "ValueError: x must be a rectangular"),
    ("getitem", "TypeError: index with a pair")])
def test_a_bad_argument_on_one_rank_fails_every_rank(what, msg):
    out = run_ranks(2, _one_rank_bad, what)
    (first0, shape0, ok0), (first1, shape1, ok1) = out
    if what == "allgather_ndim":          # the header shows the mismatch to every rank
        assert first0[:2] == first1[:2] == ("local", "ValueError")
    else:
        assert first1[0] == "local" and first0 == ("remote",)
    if msg is not None:
        assert first1[2].startswith(msg)
    assert shape0 == shape1 == (3,) and ok0 and ok1   # the next collective runs on both


def _flg_bad(comm, kind):
    bad = comm.rank == 1
    G = np.random.default_rng(5).standard_normal((3, 4))
    arg = {"none": None, "str": "grads", "window": G}[kind] if bad else G
    try:
        ShardedSlidingWindowInverseFisher.from_local_gradients(
            arg, 0.5, comm, window=5 if (bad and kind == "window") else None)
        first = "no error"
    except RemoteRankError:
        first = "remote"
    except (TypeError, ValueError) as exc:
        first = type(exc).__name__
    buf = np.ones(3)
    comm.allreduce_sum(buf)                # the next collective meets the other rank's
    return first, buf.tolist()


@pytest.mark.parametrize("kind", ["none", "str", "window"])
def test_from_local_gradients_refuses_on_every_rank(kind):
    out = run_ranks(2, _flg_bad, kind)
    assert out[0] == ("remote", [2.0, 2.0, 2.0])
    assert out[1] == ("TypeError" if kind != "window" else "ValueError", [2.0, 2.0, 2.0])


def test_from_local_gradients_window_must_match_the_rows():
    G = np.random.default_rng(6).standard_normal((3, 4))
    with pytest.raises(ValueError, match=r"window must equal the number of rows of "
                                         r"local_grads \(3\).*got window=5"):
        ShardedSlidingWindowInverseFisher.from_local_gradients(G, 0.5, window=5)
    assert ShardedSlidingWindowInverseFisher.from_local_gradients(G, 0.5, window=3).window == 3


def _mixed_settings(comm, key):
    lay = ColumnLayout.contiguous(6, comm.size)
    J = lay.indices(comm.rank)
    rng = np.random.default_rng(7)
    w = ShardedSlidingWindowInverseFisher(lay.local_dim(comm.rank), 3, 0.5, comm, layout=lay,
                                          dtype="float64")
    for _ in range(4):
        w.step(rng.standard_normal(6)[J])
    st = w.state_dict()
    if comm.rank == 1:
        if key == "refresh_every":
            st["refresh_every"], st["since_refresh"] = 7, 0
        else:
            st["normalize"] = "count"
    w2 = ShardedSlidingWindowInverseFisher(lay.local_dim(comm.rank), 3, 0.5, comm, layout=lay,
                                           dtype="float64")
    before = w2.digest()
    try:
        w2.load_state_dict(st)
        res = "loaded"
    except Exception as exc:
        res = type(exc).__name__
    return res, w2.digest() == before


@pytest.mark.parametrize("key", ["refresh_every", "normalize"])
def test_load_state_dict_refuses_states_of_other_settings_on_another_rank(key):
    for res, unchanged in run_ranks(2, _mixed_settings, key):
        assert res == "ReplicaDivergenceError" and unchanged


def _dtype_mismatch(comm):
    G = np.ones((2, 3), dtype=np.float64 if comm.rank == 0 else np.float32)
    try:
        ShardedStaticInverseFisher(G, 0.5, comm)
    except ValueError as exc:
        return str(exc)


def test_setup_dtype_mismatch_names_the_dtypes():
    for msg in run_ranks(2, _dtype_mismatch):
        assert "['float64', 'float32']" in msg


@pytest.mark.parametrize("lam", [1e-2, 1e-5])
def test_sharded_static_float32_tall_is_as_accurate_as_float32_rounding(lam):
    """m >= d with float32 gradients: the Gram and V in float64 (the float32 Gram's rounding
    swamped m lambda, and x - V^T V x cancelled in float32: errors up to 1e-3 at
    kappa = 1.6e5)."""
    from mfac_linalg.testing import inverse_fisher_oracle
    rng = np.random.default_rng(0)
    G = rng.standard_normal((12, 4)).astype(np.float32)
    o = inverse_fisher_oracle(G.astype(np.float64), lam)
    x = rng.standard_normal(4).astype(np.float32)
    ex = o.matmat(x.astype(np.float64)[:, None])[:, 0]
    op = ShardedStaticInverseFisher(G, lam, None)
    y = op.matvec(x)
    assert y.dtype == np.float32
    assert np.all(np.abs(y - ex) <= np.spacing(np.abs(ex).astype(np.float32)) + 1e-12 * np.abs(ex))
    assert abs(op.logdet() - o.logdet) <= 1e-10 * max(1.0, abs(o.logdet))
    assert op.local_factor().dtype == np.float64
    assert ShardedStaticInverseFisher(G[:, :3].T.copy(), lam).local_factor().dtype == np.float32


def _overflow_play(comm, layout):
    """Rank 1's slice of x overflows float32 when cast, then its slice of the product
    overflows: every rank refuses each (the failing one by name, the others as remote),
    as the single-device window refuses them, and a good product still works after."""
    dl = layout.local_dim(comm.rank)
    w = ShardedSlidingWindowInverseFisher(dl, 2, 0.1, comm, layout=layout, dtype="float32")
    w.update(np.ones(dl))
    got = []
    for x in (np.full(dl, 1e39), np.full(dl, 3e38, np.float32)):
        if comm.rank == 0:
            x = np.ones(dl, x.dtype)
        for f in (w.matvec, w.fisher().matvec):
            try:
                f(x)
                got.append(None)
            except ValueError as exc:
                got.append(str(exc))
            except RemoteRankError:
                got.append("remote")
    ok = w.matvec(np.ones(dl))
    return got, bool(np.isfinite(ok).all())


def test_sharded_products_refuse_overflow_on_every_rank():
    lay = ColumnLayout.contiguous(10, 2)
    (got0, ok0), (got1, ok1) = run_ranks(2, _overflow_play, lay)
    assert ok0 and ok1
    assert got0[:2] == ["remote"] * 2
    # rank 1's overflow reaches rank 0's result through the all-reduced u, so rank 0
    # refuses its own (or, where its result stayed finite, as remote)
    assert all(g == "remote" or "products with the operator overflow" in g
               for g in got0[2:])
    assert "overflow when cast" in got1[0] and "overflow when cast" in got1[1]
    assert "products with the operator overflow" in got1[2]
    assert "products with the operator overflow" in got1[3]
