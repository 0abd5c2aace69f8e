"""MFAC(sharded=True) under torch.distributed (gloo, 2 and 3 processes) against the
single-process MFAC.

Every worker emulates data-parallel training: it computes the gradient of its shard of
the batch, all-reduces it (the mean, as DDP does), and steps both the sharded optimizer
and a single-process MFAC on a copy of the model fed the same gradient (the oracle).
The worker processes come from test_distributed's fork-server ``Cluster``.
"""
import io
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from test_distributed import Cluster  # noqa: E402

M, LAM, STEPS = 4, 1e-2, 20
TOL = 1e-12
GROUPS = [dict(lr=0.05, momentum=0.9, weight_decay=1e-2),
          dict(lr=0.1, momentum=0.5, weight_decay=0.0)]


@pytest.fixture(scope="module", params=[2, 3], ids=["P2", "P3"])
def cluster(request):
    c = Cluster(request.param)
    yield c
    c.close()


# -- helpers run inside the workers ----------------------------------------------------------

def _model(sparse=False):
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(),
                                torch.nn.Linear(4, 2)).double()
    if sparse:
        with torch.no_grad():
            model[0].weight[0, :2] = 0.0
            model[0].weight[2, 1] = 0.0
            model[2].weight[1, :3] = 0.0
            model[2].bias[0] = 0.0
    return model


def _groups(model):
    return [dict(params=list(model[0].parameters()), **GROUPS[0]),
            dict(params=list(model[2].parameters()), **GROUPS[1])]


def _layout(kind, P):
    from mfac_linalg.distributed import ColumnLayout
    d = 26                                      # 3*4 + 4 + 4*2 + 2
    if kind == "default":
        return None
    if kind == "aligned":                       # whole parameters per rank
        return ColumnLayout.parameter_aligned([12, 4, 8, 2], P)
    if kind == "fsdp":                          # two units (the layers) cut over the ranks
        return ColumnLayout.sharded([16, 10], P)
    dims = [0, d] if P == 2 else [0, 9, d - 9]     # rank 0 holds nothing
    return ColumnLayout.contiguous(d, P, local_dims=dims)


def _flat(model):
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach()


def _grads(comm, model, t, corrupt=None):
    """The mean over ranks of the gradients of each rank's shard of batch t (as DDP)."""
    import torch.distributed as dist
    g = torch.Generator().manual_seed(100 + t)
    x = torch.randn(12, 3, generator=g, dtype=torch.float64)
    y = torch.randn(12, 2, generator=g, dtype=torch.float64)
    model.zero_grad()
    sl = slice(comm.rank, None, comm.size)
    torch.nn.functional.mse_loss(model(x[sl]), y[sl], reduction="sum").backward()
    for p in model.parameters():
        dist.all_reduce(p.grad)
        p.grad /= 12.0
    if corrupt is not None:
        corrupt(model)


def _copy_grads(src, dst):
    for p, q in zip(src.parameters(), dst.parameters()):
        q.grad = p.grad.clone()


class _Duck:
    """A communicator that is no TorchComm (as an MPI one would be): the optimizer then
    all-gathers the update with the exact float64 all-reduce of d numbers."""

    def __init__(self, comm):
        self._c = comm
        self.rank, self.size = comm.rank, comm.size

    def allreduce_sum(self, buf):
        return self._c.allreduce_sum(buf)

    def broadcast(self, buf, root=0):
        return self._c.broadcast(buf, root)

    def barrier(self):
        self._c.barrier()


def _pair(comm, layout_kind="default", sparse=False, normalize="window", check_every=None,
          duck=False):
    from mfac_linalg.torch import MFAC
    model, ref_model = _model(sparse), _model(sparse)
    opt = MFAC(_groups(model), lr=1.0, window=M, damping=LAM, normalize=normalize,
               sparse=sparse, sharded=True, process_group=_Duck(comm) if duck else comm,
               layout=_layout(layout_kind, comm.size), check_every=check_every)
    ref = MFAC(_groups(ref_model), lr=1.0, window=M, damping=LAM, normalize=normalize,
               sparse=sparse)
    return model, opt, ref_model, ref


def _advance(comm, model, opt, ref_model, ref, start, stop):
    for t in range(start, stop):
        _grads(comm, model, t)
        _copy_grads(model, ref_model)
        opt.step()
        ref.step()


def _train(comm, layout_kind, sparse, normalize, duck=False):
    model, opt, ref_model, ref = _pair(comm, layout_kind, sparse, normalize, duck=duck)
    assert (type(opt.comm).__name__ == "_Duck") == duck
    w0 = _flat(model).clone()
    _advance(comm, model, opt, ref_model, ref, 0, STEPS)
    w, w_ref = _flat(model), _flat(ref_model)
    lay = opt.layout
    return {"err": float((w - w_ref).abs().max()), "moved": float((w - w0).abs().max()),
            "w": w.numpy().copy(), "local_dim": opt.window_operator.local_dim,
            "dim": opt.dim, "layout_dim": lay.dim, "count": opt.window_operator.count,
            "zeros_kept": bool((w[w0 == 0] == 0).all()) if sparse else None,
            "v_local": opt.state_dict()["mfac"]["v"].numel()}


def _state(opt, model):
    sd = opt.state_dict()
    win = sd["mfac"]["window"]
    return {"w": _flat(model).numpy().copy(), "v": sd["mfac"]["v"].numpy().copy(),
            "G": win["G"].numpy().copy(), "K": win["K"].numpy().copy(),
            "F": win["F"].numpy().copy(), "count": win["count"],
            "steps": sd["mfac"]["steps"]}


def _same_state(a, b):
    return all(np.array_equal(a[k], b[k]) for k in a)


def _nan_step(comm, bad_rank, where, step_no):
    """A NaN in one rank's gradient (in its own columns, or in another rank's) at step
    ``step_no``: every rank must raise, nothing may change, and training goes on in step."""
    model, opt, ref_model, ref = _pair(comm)
    _advance(comm, model, opt, ref_model, ref, 0, step_no)
    before = _state(opt, model)
    lay = opt.layout
    owner = bad_rank if where == "own" else (bad_rank + 1) % comm.size
    col = int(lay.indices(owner)[0])

    def corrupt(m):
        if comm.rank == bad_rank and where == "sparse":     # a gradient MFAC refuses
            m[2].bias.grad = m[2].bias.grad.to_sparse()
        elif comm.rank == bad_rank:
            off = 0
            for p in m.parameters():
                if off <= col < off + p.numel():
                    p.grad.view(-1)[col - off] = float("nan")
                off += p.numel()

    _grads(comm, model, step_no, corrupt)
    seen = None
    try:
        opt.step()
    except Exception as exc:
        seen = (type(exc).__name__, str(exc))
    unchanged = _same_state(before, _state(opt, model))
    _advance(comm, model, opt, ref_model, ref, step_no, step_no + 3)   # still in step
    return {"seen": seen, "unchanged": unchanged,
            "err": float((_flat(model) - _flat(ref_model)).abs().max())}


def _mismatch(comm, what):
    """Gradients (or parameters) that differ between ranks are reported on every rank at
    a checked step, before anything changes."""
    model, opt, ref_model, ref = _pair(comm, check_every=5)
    _advance(comm, model, opt, ref_model, ref, 0, 5)      # step 0 was checked and passed

    def corrupt(m):
        if what == "presence":                 # the same g, but one rank would not update
            m[2].bias.grad = None if comm.rank == comm.size - 1 else \
                torch.zeros_like(m[2].bias)
        elif comm.rank == comm.size - 1:
            if what == "grad":
                m[2].bias.grad[1] += 1e-3              # e.g. a forgotten all-reduce
            else:
                with torch.no_grad():
                    m[0].weight[1, 1] += 1e-9

    _grads(comm, model, 5, corrupt)
    before = _state(opt, model)
    seen = None
    try:
        opt.step()                                       # step 5: checked
    except Exception as exc:
        seen = (type(exc).__name__, str(exc), getattr(exc, "ranks", None))
    return {"seen": seen, "unchanged": _same_state(before, _state(opt, model))}


def _missing(comm, layout_kind, sparse):
    """Parameters without a gradient (the same on every rank): model[0].bias at odd
    steps, model[2] at steps 3-5, none at all at step 7; against the single-process MFAC
    fed the same gradients, checked at every step."""
    model, opt, ref_model, ref = _pair(comm, layout_kind, sparse, check_every=1)
    out = {"frozen_kept": True}
    for t in range(10):
        _grads(comm, model, t)
        if t % 2:
            model[0].bias.grad = None
        if 3 <= t <= 5:
            for p in model[2].parameters():
                p.grad = None
        if t == 7:
            model.zero_grad(set_to_none=True)
        for p, q in zip(model.parameters(), ref_model.parameters()):
            q.grad = None if p.grad is None else p.grad.clone()
        before = [p.detach().clone() for p in model.parameters()]
        opt.step()
        ref.step()
        for p, q in zip(before, model.parameters()):
            if q.grad is None and not torch.equal(p, q):
                out["frozen_kept"] = False
    out["err"] = float((_flat(model) - _flat(ref_model)).abs().max())
    out["w"] = _flat(model).numpy().copy()
    out["count"] = opt.window_operator.count
    out["steps"] = opt.state_dict()["mfac"]["steps"]
    return out


def _unchecked_mismatch(comm):
    """Between checks a gradient that differs outside a rank's own columns is not seen,
    and cannot split the ranks: the update is built from each column's owner."""
    model, opt, ref_model, ref = _pair(comm, check_every=0)
    _advance(comm, model, opt, ref_model, ref, 0, 2)
    _grads(comm, model, 2)
    _copy_grads(model, ref_model)
    lay = opt.layout
    col = int(lay.indices(0)[0])                        # a column rank 0 owns
    if comm.rank != 0:
        model[0].weight.grad.view(-1)[col] += 1.0       # outside this rank's columns
    opt.step()
    ref.step()
    return {"err": float((_flat(model) - _flat(ref_model)).abs().max()),
            "w": _flat(model).numpy().copy()}


def _checkpoint(comm, folder):
    from mfac_linalg.distributed import ColumnLayout
    from mfac_linalg.torch import MFAC
    model, opt, ref_model, ref = _pair(comm, "fsdp")
    _advance(comm, model, opt, ref_model, ref, 0, 7)
    path = os.path.join(folder, f"rank{comm.rank}.pt")
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, path)
    _advance(comm, model, opt, ref_model, ref, 7, 12)
    w_cont = _flat(model).clone()
    out = {}
    # resume: a fresh model and optimizer on every rank, each loading its own file
    ck = torch.load(path, weights_only=True)
    m2 = _model()
    m2.load_state_dict(ck["model"])
    o2 = MFAC(_groups(m2), lr=1.0, window=M, damping=LAM, sharded=True, process_group=comm,
              layout=_layout("fsdp", comm.size))
    o2.load_state_dict(ck["opt"])
    for t in range(7, 12):
        _grads(comm, m2, t)
        o2.step()
    out["resume_equal"] = bool(torch.equal(_flat(m2), w_cont))
    # refused under another layout (on every rank), and nothing changes
    m3 = _model()
    m3.load_state_dict(ck["model"])
    o3 = MFAC(_groups(m3), lr=1.0, window=M, damping=LAM, sharded=True, process_group=comm,
              layout=ColumnLayout.contiguous(26, comm.size))
    before = _state(o3, m3)
    try:
        o3.load_state_dict(ck["opt"])
        out["other_layout"] = None
    except Exception as exc:
        out["other_layout"] = (type(exc).__name__, str(exc))
    out["other_layout_unchanged"] = _same_state(before, _state(o3, m3))
    # another rank's file (the ranks' files swapped): refused on every rank
    other = os.path.join(folder, f"rank{(comm.rank + 1) % comm.size}.pt")
    comm.barrier()
    try:
        opt.load_state_dict(torch.load(other, weights_only=True)["opt"])
        out["other_rank"] = None
    except Exception as exc:
        out["other_rank"] = (type(exc).__name__, str(exc))
    # one rank's file damaged: every rank refuses, nothing changes anywhere
    sd = torch.load(path, weights_only=True)["opt"]
    if comm.rank == 0:
        sd["mfac"]["v"] = sd["mfac"]["v"][:-1]
    before = _state(opt, model)
    try:
        opt.load_state_dict(sd)
        out["damaged"] = None
    except Exception as exc:
        out["damaged"] = (type(exc).__name__, str(exc))
    out["damaged_unchanged"] = _same_state(before, _state(opt, model))
    return out


def _bad_setup(comm, what):
    from mfac_linalg.distributed import ColumnLayout
    from mfac_linalg.torch import MFAC
    model = _model()
    kw = dict(lr=0.1, window=M, damping=LAM, sharded=True, process_group=comm)
    if what == "layout_dim":
        kw["layout"] = ColumnLayout.contiguous(25, comm.size)
    elif what == "layout_size":
        kw["layout"] = ColumnLayout.contiguous(26, comm.size + 1)
    elif what == "lr_one_rank":
        kw["lr"] = -1.0 if comm.rank == 1 else 0.1
    try:
        MFAC(model.parameters(), **kw)
    except Exception as exc:
        return (type(exc).__name__, str(exc))
    return None


# -- the tests ---------------------------------------------------------------------------------

@pytest.mark.parametrize("layout_kind,sparse,normalize,duck", [
    ("default", False, "window", False), ("aligned", False, "count", False),
    ("fsdp", True, "window", False), ("empty", False, "window", False),
    ("default", True, "count", False), ("fsdp", True, "count", True)])
def test_twenty_steps_equal_single_process(cluster, layout_kind, sparse, normalize, duck):
    res = cluster.ok(_train, layout_kind, sparse, normalize, duck)
    for r, o in enumerate(res):
        assert o["err"] <= TOL, (r, o["err"])
        assert o["moved"] > 1e-2
        assert o["count"] == M
        assert o["v_local"] == o["local_dim"]        # momentum: this rank's columns only
        if sparse:
            assert o["zeros_kept"]
            assert o["dim"] < 26
    # every rank ends with the same parameters, bit for bit
    for o in res[1:]:
        assert np.array_equal(o["w"], res[0]["w"])
    # the ranks' columns partition the window
    assert sum(o["local_dim"] for o in res) == res[0]["dim"] == res[0]["layout_dim"]
    if layout_kind == "empty":
        assert res[0]["local_dim"] == 0


@pytest.mark.parametrize("where,step_no", [("own", 3), ("other", 3), ("other", 0),
                                           ("sparse", 3), ("sparse", 0)])
def test_nan_gradient_on_one_rank_raises_everywhere_and_changes_nothing(cluster, where,
                                                                         step_no):
    bad = cluster.size - 1
    res = cluster.ok(_nan_step, bad, where, step_no)
    for r, o in enumerate(res):
        assert o["seen"] is not None, f"rank {r} did not raise"
        if r == bad and where == "sparse":
            assert o["seen"] == ("TypeError", "MFAC does not take sparse gradients")
        elif r == bad:
            assert o["seen"][0] == "ValueError"
            assert "NaN or infinity" in o["seen"][1] and f"rank {bad}" in o["seen"][1]
        else:
            assert o["seen"][0] == "RemoteRankError" and f"[{bad}]" in o["seen"][1]
        assert o["unchanged"], f"rank {r}: the failed step changed the state"
        assert o["err"] <= TOL                       # and the ranks went on in step


@pytest.mark.parametrize("what", ["grad", "param", "presence"])
def test_ranks_that_differ_are_reported_on_every_rank(cluster, what):
    res = cluster.ok(_mismatch, what)
    word = "parameters" if what == "param" else "gradients"
    for r, o in enumerate(res):
        assert o["seen"] is not None and o["seen"][0] == "ReplicaDivergenceError", (r, o)
        assert word in o["seen"][1]
        assert o["seen"][2] == [cluster.size - 1]
        assert o["unchanged"]


@pytest.mark.parametrize("layout_kind,sparse", [("default", False), ("fsdp", True),
                                                 ("empty", False)])
def test_parameters_without_gradient_as_single_process(cluster, layout_kind, sparse):
    res = cluster.ok(_missing, layout_kind, sparse)
    for r, o in enumerate(res):
        assert o["err"] <= TOL, (r, o["err"])
        assert o["frozen_kept"], f"rank {r}: a parameter without gradient moved"
        assert o["count"] == M and o["steps"] == 9       # step 7 had no gradient at all
    for o in res[1:]:
        assert np.array_equal(o["w"], res[0]["w"])


def test_unchecked_gradient_difference_cannot_split_the_ranks(cluster):
    res = cluster.ok(_unchecked_mismatch)
    for o in res:
        assert o["err"] <= TOL
        assert np.array_equal(o["w"], res[0]["w"])


def test_checkpoint_per_rank_round_trip_and_refusals(cluster, tmp_path):
    res = cluster.ok(_checkpoint, str(tmp_path))
    for r, o in enumerate(res):
        assert o["resume_equal"], f"rank {r}: resumed run differs"
        assert o["other_layout"][0] == "ValueError" and "another column layout" in \
            o["other_layout"][1]
        assert o["other_layout_unchanged"]
        assert o["other_rank"][0] == "ValueError" and f"this is rank {r}" in o["other_rank"][1]
        if r == 0:
            assert o["damaged"][0] == "ValueError" and "['v']" in o["damaged"][1]
        else:
            assert o["damaged"][0] == "RemoteRankError"
        assert o["damaged_unchanged"]


@pytest.mark.parametrize("what", ["layout_dim", "layout_size", "lr_one_rank"])
def test_bad_setup_raises_on_every_rank(cluster, what):
    res = cluster.ok(_bad_setup, what)
    for r, o in enumerate(res):
        assert o is not None, f"rank {r} built an optimizer"
        if what == "lr_one_rank" and r != 1:
            assert o[0] == "RemoteRankError"
        else:
            assert o[0] == "ValueError"
            assert ("layout" if what.startswith("layout") else "lr") in o[1]


# -- one process ----------------------------------------------------------------------------------

def test_single_process_comm_equals_unsharded():
    from mfac_linalg.distributed import SingleProcessComm
    from mfac_linalg.torch import MFAC
    model, ref_model = _model(), _model()
    opt = MFAC(_groups(model), lr=1.0, window=M, damping=LAM, sharded=True,
               process_group=SingleProcessComm())
    ref = MFAC(_groups(ref_model), lr=1.0, window=M, damping=LAM)
    for t in range(6):
        for mm, o in ((model, opt), (ref_model, ref)):
            g = torch.Generator().manual_seed(t)
            x, y = torch.randn(8, 3, generator=g, dtype=torch.float64), \
                torch.randn(8, 2, generator=g, dtype=torch.float64)
            o.zero_grad()
            torch.nn.functional.mse_loss(mm(x), y).backward()
            o.step()
    assert torch.equal(_flat(model), _flat(ref_model))
    assert opt.sharded and not ref.sharded
    assert opt.layout.size == 1 and ref.layout is None and ref.comm is None
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    with pytest.raises(ValueError, match="sharded=True; this optimizer has sharded=False"):
        ref.load_state_dict(torch.load(buf, weights_only=True))


def test_sharded_arguments_checked():
    from mfac_linalg.distributed import ColumnLayout
    from mfac_linalg.torch import MFAC
    params = list(_model().parameters())
    with pytest.raises(ValueError, match="process_group is used only with sharded=True"):
        MFAC(params, lr=0.1, process_group=object())
    with pytest.raises(ValueError, match="layout is used only with sharded=True"):
        MFAC(params, lr=0.1, layout=ColumnLayout.contiguous(26, 1))
    with pytest.raises(ValueError, match="check_every is used only with sharded=True"):
        MFAC(params, lr=0.1, check_every=3)
    with pytest.raises(TypeError, match="sharded must be True or False"):
        MFAC(params, lr=0.1, sharded=1)
    with pytest.raises(RuntimeError, match="torch.distributed initialised"):
        MFAC(params, lr=0.1, sharded=True)
    with pytest.raises(TypeError, match="layout must be a mfac_linalg.distributed.ColumnLayout"):
        MFAC(params, lr=0.1, sharded=True, process_group=_single(),
             layout=[[(0, 26)]])
    with pytest.raises(ValueError, match="check_every must be >= 0"):
        MFAC(params, lr=0.1, sharded=True, process_group=_single(), check_every=-1)
    with pytest.raises(TypeError, match="check_every must be an integer"):
        MFAC(params, lr=0.1, sharded=True, process_group=_single(), check_every=2.5)
    with pytest.raises(RuntimeError, match="needs MFAC"):
        MFAC(params, lr=0.1).check_consistency()


def _single():
    from mfac_linalg.distributed import SingleProcessComm
    return SingleProcessComm()


def _swapped_presence(comm):
    """The same gradient bits on every rank and as many parameters without a gradient,
    but not the same ones (no weight decay, zero gradients): the replica check must see
    which parameters have one, not only how many."""
    from mfac_linalg.torch import MFAC
    torch.manual_seed(0)
    A, B, C = (torch.nn.Parameter(torch.randn(4, dtype=torch.float64)) for _ in range(3))
    opt = MFAC([A, B, C], lr=0.1, window=4, damping=1e-2, sharded=True,
               process_group=comm, check_every=1)
    for p in (A, B, C):
        p.grad = torch.randn(4, dtype=torch.float64,
                             generator=torch.Generator().manual_seed(5))
    opt.step()
    C.grad = torch.ones(4, dtype=torch.float64)
    zero = torch.zeros(4, dtype=torch.float64)
    A.grad, B.grad = (None, zero) if comm.rank == 0 else (zero, None)
    before = [p.detach().clone() for p in (A, B, C)]
    seen = None
    try:
        opt.step()
    except Exception as exc:                  # noqa: BLE001 - reported to the test
        seen = type(exc).__name__
    return {"seen": seen,
            "unchanged": all(bool(torch.equal(p, q)) for p, q in zip((A, B, C), before))}


def test_ranks_whose_missing_gradients_differ_are_reported(cluster):
    for r, o in enumerate(cluster.ok(_swapped_presence)):
        assert o["seen"] == "ReplicaDivergenceError" and o["unchanged"], (r, o)
