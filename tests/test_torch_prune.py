"""mfac_linalg.torch.prune against dense OBS oracles and the published M-FAC pruner."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from mfac_linalg.torch import per_sample_gradients, prune  # noqa: E402

LAM = 1e-3


def _mlp(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(),
                               torch.nn.Linear(5, 4)).to(dtype)


def _data(n=40, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(n, 6, generator=g, dtype=dtype), torch.randint(0, 4, (n,), generator=g))


def _weights(model):
    return torch.cat([model[0].weight.detach().reshape(-1), model[2].weight.detach().reshape(-1)])


def _weight_grads(model, data, m):
    G = per_sample_gradients(model, torch.nn.CrossEntropyLoss(), (data[0][:m], data[1][:m]))
    # trainable order: W0 (30), b0 (5), W2 (20), b2 (4) -> the weights' columns
    return torch.cat([G[:, :30], G[:, 35:55]], 1).numpy()


def _dense_H(G, blocks=None):
    d = G.shape[1]
    if blocks is None:
        blocks = [(0, d)]
    H = np.zeros((d, d))
    for a, b in blocks:
        Gb = G[:, a:b]
        H[a:b, a:b] = np.linalg.inv(LAM * np.eye(b - a) + Gb.T @ Gb / G.shape[0])
    return H


def _layer_blocks(sizes, bs):
    out, start = [], 0
    for s in sizes:
        for off in range(0, s, bs):
            out.append((start + off, start + min(s, off + bs)))
        start += s
    return out


@pytest.mark.parametrize("fisher,blocks", [("static", None), ("block", 8), ("sliding", None)])
@pytest.mark.parametrize("first_order", [False, True])
def test_joint_equals_dense_kkt_oracle(fisher, blocks, first_order):
    model, data = _mlp(), _data()
    m = 30
    G = _weight_grads(model, data, m)
    w = _weights(model).numpy()
    H = _dense_H(G, None if blocks is None else _layer_blocks([30, 20], blocks))
    gbar = G.mean(0) if first_order else np.zeros(50)
    Hg = H @ gbar
    r = w - Hg
    count = 20
    Q = np.argsort(r * r / (2 * np.diag(H)), kind="stable")[:count]
    # KKT: min g.dw + 1/2 dw^T F dw  s.t.  dw_Q = -w_Q
    dw = -Hg - H[:, Q] @ np.linalg.solve(H[np.ix_(Q, Q)], r[Q])
    ref = w + dw
    ref[Q] = 0.0
    rep = prune(model, torch.nn.CrossEntropyLoss(), data, count / 50, method="joint",
                fisher=fisher, block_size=blocks or 128, num_grads=m, damping=LAM,
                first_order=first_order)
    got = _weights(model).numpy()
    assert np.abs(got - ref).max() <= 1e-10 * np.abs(ref).max()
    assert set(np.flatnonzero(got == 0)) == set(Q)
    F = np.linalg.inv(H)
    pred = gbar @ (ref - w) + 0.5 * (ref - w) @ F @ (ref - w)
    assert rep.stages[0].predicted_increase == pytest.approx(pred, rel=1e-8, abs=1e-12)


def _published_mfac_prune(w, G, count, blocksize, lam):
    """The published M-FAC pruner's one pruning step on the compressed (non-zero) weights:
    blocks of ``blocksize`` over the flat vector (the last one smaller), F_k = lam I +
    G_k^T G_k / m per block, saliency w^2 / (2 diag F^-1), the ``count`` smallest dropped,
    the single-weight updates summed, then the dropped weights zeroed."""
    w = torch.tensor(w)
    G = torch.tensor(G)
    d, m = w.numel(), G.shape[0]
    Hinv = torch.zeros(d, d, dtype=torch.float64)
    for a in range(0, d, blocksize):
        b = min(d, a + blocksize)
        Gb = G[:, a:b]
        Hinv[a:b, a:b] = torch.linalg.inv(lam * torch.eye(b - a, dtype=torch.float64)
                                          + Gb.T @ Gb / m)
    diag = torch.diagonal(Hinv)
    p = w ** 2 / (2.0 * diag)
    drop = torch.argsort(p)[:count]
    tmp = torch.zeros(d, dtype=torch.float64)
    tmp[drop] = -w[drop] / diag[drop]
    w = w + Hinv @ tmp
    w[drop] = 0.0
    return w.numpy(), set(drop.tolist())


def test_independent_removes_exactly_what_the_published_pruner_removes():
    model, data = _mlp(seed=4), _data()
    m, bs = 24, 16
    # two stages, the second on a model that already has zeros (the compressed vector)
    for stage, (s, count) in enumerate([(0.4, 20), (0.7, 15)]):
        w_full = _weights(model).numpy()
        keep = np.flatnonzero(w_full != 0)
        G = _weight_grads(model, data, m)[:, keep]
        ref_c, drop = _published_mfac_prune(w_full[keep], G, count, bs, LAM)
        prune(model, torch.nn.CrossEntropyLoss(), data, s, method="independent",
              fisher="block", block_size=bs, block_layout="flat", num_grads=m, damping=LAM)
        got = _weights(model).numpy()
        assert set(np.flatnonzero((got == 0) & (w_full != 0))) == {int(keep[i]) for i in drop}
        assert np.abs(got[keep] - ref_c).max() <= 1e-10 * np.abs(ref_c).max()


def test_magnitude_obd_layer_scope_masks_and_report():
    model, data = _mlp(dtype=torch.float32), _data(dtype=torch.float32)
    w0 = _weights(model).numpy()
    rep = prune(model, torch.nn.CrossEntropyLoss(), data, 0.5, method="magnitude",
                scope="layer")
    w1 = _weights(model).numpy()
    assert model[0].weight.dtype == torch.float32
    for a, b in [(0, 30), (30, 50)]:
        z = np.flatnonzero(w1[a:b] == 0)
        assert len(z) == (b - a) // 2
        assert np.abs(w0[a:b][z]).max() <= np.abs(np.delete(w0[a:b], z)).min()
        assert np.array_equal(np.delete(w1[a:b], z), np.delete(w0[a:b], z))   # no update
    assert rep.stages[0].layer_sparsity == {"0": 0.5, "2": 0.5}
    assert "stage" in str(rep) and "loss before" in str(rep)
    # the masks stay on the model: a training step cannot revive removed weights
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    loss = torch.nn.CrossEntropyLoss()(model(data[0]), data[1])
    loss.backward()
    opt.step()
    model(data[0])
    assert np.array_equal(_weights(model).numpy() == 0, w1 == 0)
    # OBD on a fresh model: the smallest 1/2 F_qq w_q^2, no update
    model, m = _mlp(), 20
    G = _weight_grads(model, data=_data(), m=m)
    w = _weights(model).numpy()
    score = 0.5 * (LAM + (G ** 2).mean(0)) * w * w
    prune(model, torch.nn.CrossEntropyLoss(), _data(), 0.3, method="obd", num_grads=m,
          damping=LAM)
    got = _weights(model).numpy()
    assert set(np.flatnonzero(got == 0)) == set(np.argsort(score)[:15])


def test_gradual_cubic_schedule_and_predicted_ordering():
    model, data = _mlp(seed=2), _data()
    rep = prune(model, torch.nn.CrossEntropyLoss(), data, 0.8, method="joint", steps=3,
                num_grads=30, damping=LAM, block_size=10)
    t = [s.target_sparsity for s in rep.stages]
    np.testing.assert_allclose(t, [0.8 * (1 - (1 - k / 3) ** 3) for k in (1, 2, 3)])
    cum = [int(round(0.8 * (1 - (1 - k / 3) ** 3) * 50)) for k in (1, 2, 3)]
    assert cum == [28, 39, 40]
    assert [s.removed for s in rep.stages] == [28, 11, 1]
    assert rep.sparsity == pytest.approx(0.8)
    # same set Q: joint's predicted increase is the minimum of the quadratic model
    a, b = _mlp(seed=3), _mlp(seed=3)
    ra = prune(a, torch.nn.CrossEntropyLoss(), data, 0.6, method="joint", num_grads=30,
               damping=LAM)
    rb = prune(b, torch.nn.CrossEntropyLoss(), data, 0.6, method="independent", num_grads=30,
               damping=LAM)
    assert torch.equal(_weights(a) == 0, _weights(b) == 0)
    assert ra.stages[0].predicted_increase <= rb.stages[0].predicted_increase * (1 + 1e-12)


def test_prune_arguments_are_checked():
    model, data = _mlp(), _data()
    loss = torch.nn.CrossEntropyLoss()
    with pytest.raises(ValueError, match="sparsity must be < 1"):
        prune(model, loss, data, 1.0)
    with pytest.raises(ValueError, match="method must be one of"):
        prune(model, loss, data, 0.5, method="random")
    with pytest.raises(ValueError, match="first_order=True needs method"):
        prune(model, loss, data, 0.5, method="magnitude", first_order=True)
    with pytest.raises(ValueError, match="num_grads=100 but data holds only 40"):
        prune(model, loss, data, 0.5, num_grads=100)
    with pytest.raises(TypeError, match="steps must be an integer"):
        prune(model, loss, data, 0.5, steps=2.0)
    assert bool((_weights(model) != 0).all())          # nothing changed by a refused call
    assert not hasattr(model[0], "_mfac_removed") and not model[0]._forward_pre_hooks
    prune(model, loss, data, 0.5, method="magnitude")
    with pytest.raises(ValueError, match="below the layers' current sparsity"):
        prune(model, loss, data, 0.2, method="magnitude")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA build of torch")
@pytest.mark.parametrize("fisher", ["block", "static", "sliding"])
def test_gpu_prune_matches_cpu(fisher):
    from mfac_linalg import _backend as B
    if not B.gpu_available():
        pytest.skip("needs CuPy and a CUDA GPU")
    data = _data()
    a, b = _mlp(), _mlp().cuda()
    kw = dict(method="joint", fisher=fisher, num_grads=30, damping=LAM, block_size=8,
              first_order=True)
    prune(a, torch.nn.CrossEntropyLoss(), data, 0.5, **kw)
    prune(b, torch.nn.CrossEntropyLoss(), (data[0].cuda(), data[1].cuda()), 0.5, **kw)
    wa, wb = _weights(a), _weights(b).cpu()
    assert torch.equal(wa == 0, wb == 0)
    assert float((wa - wb).abs().max()) <= 1e-9 * float(wa.abs().max())


def test_masks_follow_copies_stay_out_of_state_dict_and_come_off():
    import copy
    model, data = _mlp(), _data()
    keys = set(model.state_dict())
    rep = prune(model, torch.nn.CrossEntropyLoss(), data, 0.5, method="magnitude")
    assert set(model.state_dict()) == keys
    twin = copy.deepcopy(model)
    prune(twin, torch.nn.CrossEntropyLoss(), data, 0.8, method="magnitude")
    assert float((_weights(model) == 0).double().mean()) == 0.5     # the original untouched
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    model(data[0])                                # the hook re-applies the original's mask
    assert int((model[0].weight == 0).sum()) == int(rep.masks.removed["0"].sum())
    rep.masks.remove()
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    model(data[0])
    assert bool((model[0].weight == 1.0).all()) and not hasattr(model[0], "_mfac_removed")


def test_prune_leaves_other_parameters_alone():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5),
                                torch.nn.Linear(5, 4)).double()
    ln = [p.detach().clone() for p in model[1].parameters()]
    rep = prune(model, torch.nn.CrossEntropyLoss(), _data(), 0.5, method="independent",
                num_grads=20, damping=LAM)
    assert set(rep.masks.removed) == {"0", "2"} and rep.sparsity == 0.5
    assert all(torch.equal(a, b) for a, b in zip(ln, model[1].parameters()))


@pytest.mark.parametrize("where", ["between", "numerical"])
@pytest.mark.parametrize("masked_before", [False, True])
def test_a_failed_prune_restores_the_model(where, masked_before, monkeypatch):
    """A failure in stage 2 of 3 (raised by ``between``, or a numerical failure of the
    operator) leaves the model as before the call: its state_dict bit for bit, no new
    hooks or mask buffers, an existing mask unchanged."""
    import importlib
    import mfac_linalg as ml
    from mfac_linalg.torch import PruneMasks
    P = importlib.import_module("mfac_linalg.torch.prune")     # the module, not the function
    model = _mlp()
    x, y = _data()
    if masked_before:
        masks = PruneMasks([("0", model[0]), ("2", model[2])])
        masks.removed["0"][0, :3] = True
        masks.apply()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mask_before = (model[0]._mfac_removed.clone() if masked_before else None)
    hooks_before = {n: len(m._forward_pre_hooks) for n, m in model.named_children()}
    calls = []
    between = None
    if where == "between":
        def between(model, stage):
            with torch.no_grad():
                model[0].weight.add_(1.0)          # a training step, say
            raise RuntimeError("interrupted")
        exc = RuntimeError
    else:
        real = P._operator

        def failing(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                raise ml.NotPositiveDefinite("the damping is too small (test)")
            return real(*args, **kwargs)
        monkeypatch.setattr(P, "_operator", failing)
        exc = ml.NotPositiveDefinite
    with pytest.raises(exc):
        P.prune(model, torch.nn.CrossEntropyLoss(), (x, y), 0.8, num_grads=32, damping=1e-3,
                block_size=16, steps=3, between=between)
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert {n: len(m._forward_pre_hooks) for n, m in model.named_children()} == hooks_before
    if masked_before:
        assert torch.equal(model[0]._mfac_removed, mask_before)
    else:
        assert not any(hasattr(m, "_mfac_removed") for m in model.children())


def _bn_cnn():
    torch.manual_seed(5)
    return torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3, padding=1), torch.nn.BatchNorm2d(3),
                               torch.nn.ReLU(), torch.nn.Flatten(),
                               torch.nn.Linear(3 * 4 * 4, 3)).double().train()


@pytest.mark.parametrize("with_between", [False, True])
def test_prune_leaves_train_mode_batchnorm_statistics_as_they_were(with_between):
    """A Conv2d + BatchNorm2d model in training mode: a successful prune used to change
    the running statistics (its loss evaluations and per-sample gradients run forward
    passes).  What ``between`` (fine-tuning) does to them is kept."""
    model = _bn_cnn()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(24, 2, 4, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (24,), generator=g)
    with torch.no_grad():
        model(x * 2.0 + 1.0)                          # running statistics not at their init
    bn = model[1]
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    seen = []

    def between(model, stage):
        with torch.no_grad():
            model(x[:8])                              # a training forward pass
        seen.append({k: v.clone() for k, v in model[1].state_dict().items()})

    rep = prune(model, torch.nn.CrossEntropyLoss(), (x, y), 0.5, num_grads=16, damping=LAM,
                block_size=16, steps=2, between=between if with_between else None)
    assert rep.sparsity == 0.5 and model.training
    want = seen[-1] if with_between else before
    assert set(bn.state_dict()) == set(want)
    assert all(torch.equal(v, want[k]) for k, v in bn.state_dict().items())
    assert int(bn.num_batches_tracked) == (2 if with_between else 1)
    if with_between:
        assert not torch.equal(want["running_mean"], before["running_mean"])


def test_obd_predicts_the_quadratic_model_of_its_removal():
    """OBD makes no update; its predicted increase is 1/2 d^T F d for d the removed
    weights' negatives (a number, as documented; nan only for magnitude)."""
    model, data = _mlp(), _data()
    rep = prune(model, torch.nn.CrossEntropyLoss(), data, 0.3, method="obd", num_grads=20,
                damping=LAM)
    assert np.isfinite(rep.stages[0].predicted_increase)
    assert rep.stages[0].predicted_increase > 0
    rep = prune(_mlp(), torch.nn.CrossEntropyLoss(), data, 0.3, method="magnitude")
    assert np.isnan(rep.stages[0].predicted_increase)


def test_prune_refuses_shared_weights():
    lin = torch.nn.Linear(4, 4)
    model = torch.nn.Sequential(lin, torch.nn.Tanh(), torch.nn.Linear(4, 4), torch.nn.Tanh(),
                                torch.nn.Linear(4, 2))
    model[2].weight = lin.weight
    data = [(torch.randn(6, 4), torch.randint(0, 2, (6,)))]
    w = lin.weight.detach().clone()
    with pytest.raises(ValueError, match="shared between modules"):
        prune(model, torch.nn.CrossEntropyLoss(), data, 0.5, num_grads=4)
    assert torch.equal(lin.weight, w)
