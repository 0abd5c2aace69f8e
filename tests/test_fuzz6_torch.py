"""Fuzz round six over the torch integration: a module zoo through the statistics'
capture (checked against independent float64 per-sample gradients of ``torch.func``),
the M-FAC optimizer against a dense float64 reference of docs/math.md §10, and
``prune`` over the zoo."""
import copy
import io

import numpy as np
import pytest
from hypothesis import given, strategies as st

torch = pytest.importorskip("torch")
nn = torch.nn

from mfac_linalg.torch import MFAC, capture_statistics, kronecker_preconditioner, prune  # noqa: E402


def _no_hooks(model):
    return all(not m._forward_hooks and not m._backward_hooks and not m._forward_pre_hooks
               for m in model.modules())


def _reference_psg(model, loss_fn, x, y, named):
    """Per-sample gradients of the parameters ``named`` by torch.func (float64)."""
    from torch.func import functional_call, grad, vmap
    allp = {n: p.detach() for n, p in model.named_parameters()}
    bufs = dict(model.named_buffers())

    def one(p, xi, yi):
        out = functional_call(model, ({**allp, **p}, bufs), (xi.unsqueeze(0),))
        return loss_fn(out, yi.unsqueeze(0))

    return vmap(grad(one), in_dims=(None, 0, 0))({n: p.detach() for n, p in named}, x, y)


class _Seq(nn.Module):
    """A sequence model: Linear layers on (B, T, d) inputs."""

    def __init__(self, d, bias):
        super().__init__()
        self.l1 = nn.Linear(d, 4, bias=bias)
        self.l2 = nn.Linear(4, 3)

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x))).mean(1)


def _zoo(data, kind, B, bias):
    """(model, x) in float64: a conv net (stride, dilation, padding, frozen eval-mode
    batch norm), a sequence model, or an MLP with a frozen LayerNorm."""
    if kind == "conv":
        cin = data.draw(st.integers(1, 2))
        H, W = data.draw(st.integers(5, 7)), data.draw(st.integers(5, 7))
        two = st.tuples(st.integers(1, 2), st.integers(1, 2))
        conv = nn.Conv2d(cin, 3, data.draw(two), stride=data.draw(two),
                         dilation=data.draw(two),
                         padding=data.draw(st.tuples(st.integers(0, 2), st.integers(0, 1))),
                         bias=bias).double()
        with torch.no_grad():
            n_out = conv(torch.zeros(1, cin, H, W, dtype=torch.float64)).numel()
        model = nn.Sequential(conv, nn.BatchNorm2d(3), nn.Tanh(), nn.Flatten(),
                              nn.Linear(n_out, 3)).double().eval()
        model[1].requires_grad_(False)
        return model, torch.randn(B, cin, H, W, dtype=torch.float64)
    if kind == "seq":
        d, T = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3))
        return _Seq(d, bias).double(), torch.randn(B, T, d, dtype=torch.float64)
    model = nn.Sequential(nn.Linear(3, 4, bias=bias), nn.LayerNorm(4), nn.Linear(4, 3)).double()
    model[1].requires_grad_(False)
    return model, torch.randn(B, 3, dtype=torch.float64)


@given(st.data())
def test_captured_statistics_imply_the_per_sample_gradients(data):
    torch.manual_seed(data.draw(st.integers(0, 2 ** 16)))
    kind = data.draw(st.sampled_from(["conv", "seq", "mlp"]))
    B = data.draw(st.sampled_from([1, 2, 5]))
    model, x = _zoo(data, kind, B, data.draw(st.booleans()))
    y = torch.randint(0, 3, (B,))
    loss_fn = nn.CrossEntropyLoss(reduction=data.draw(st.sampled_from(["mean", "sum"])))
    stats = capture_statistics(model, loss_fn, (x, y))
    assert _no_hooks(model) and stats.num_samples == B
    mods = dict(model.named_modules())
    named = []
    for L in stats.layers:
        named.append((L.name + ".weight", mods[L.name].weight))
        if mods[L.name].bias is not None:
            named.append((L.name + ".bias", mods[L.name].bias))
    ref = _reference_psg(model, loss_fn, x, y, named)
    for L in stats.layers:
        A, G = L.activations, L.output_grads
        assert A.shape[0] == G.shape[0] == B
        if A.ndim == 2:
            A, G = A[:, None], G[:, None]
        W = torch.einsum("nto,nti->noi", G, A)
        R = ref[L.name + ".weight"].reshape(W.shape)
        torch.testing.assert_close(W, R, atol=1e-10, rtol=1e-8)
        if mods[L.name].bias is not None:
            torch.testing.assert_close(G.sum(1), ref[L.name + ".bias"], atol=1e-10, rtol=1e-8)
    if B == 1 and all(L.activations.ndim == 2 for L in stats.layers):
        # one sample, one position: K-FAC is the exact rank-one empirical Fisher
        lam = 1e-9
        P = kronecker_preconditioner(model, loss_fn, (x, y), "kfac", lam,
                                     damping_mode="exact", statistics=stats)
        v = torch.cat([ref[n].reshape(-1) for n, _ in named]).numpy()
        F = P.fisher().todense() - lam * np.eye(P.shape[0])
        offs = 0
        for L in stats.layers:        # the diagonal blocks, layer by layer
            n = L.spec.size
            blk, vv = F[offs:offs + n, offs:offs + n], v[offs:offs + n]
            np.testing.assert_allclose(blk, np.outer(vv, vv), atol=1e-9, rtol=1e-7)
            offs += n


class _TimeMajor(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(4, 3)

    def forward(self, x):                       # x (B, T, d) -> the layer sees (T, B, d)
        return self.l(x.transpose(0, 1)).mean(0)


class _Flattened(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(4, 3)

    def forward(self, x):                       # the layer sees (B T, d)
        B, T, d = x.shape
        return self.l(x.reshape(B * T, d)).reshape(B, T, 3).mean(1)


class _Unbatched(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(4, 3)
        self.e = nn.Parameter(torch.randn(4), requires_grad=False)

    def forward(self, x):                       # the layer sees no batch dimension
        return x[:, :3] + self.l(self.e)


@pytest.mark.parametrize("cls", [_TimeMajor, _Flattened, _Unbatched])
def test_capture_refuses_a_layer_whose_rows_are_not_the_samples(cls):
    # regression: a time-major (T, B, d) or flattened (B T, d) layer input gave T or B T
    # "samples" of statistics for a batch of B, silently (num_samples B); an unbatched
    # one a RuntimeError from a reshape
    model = cls()
    x, y = torch.randn(3, 5, 4), torch.randint(0, 3, (3,))
    with pytest.raises(ValueError, match=r"layer 'l' gets an input of shape"):
        capture_statistics(model, nn.CrossEntropyLoss(), (x, y))
    assert _no_hooks(model)


@pytest.mark.parametrize("make,match", [
    (lambda: nn.Sequential(nn.Conv1d(2, 3, 3), nn.Flatten(), nn.Linear(18, 3)),
     r"outside nn.Linear / nn.Conv2d layers: \['0.weight'"),
    (lambda: nn.Sequential(nn.ConvTranspose2d(2, 3, 3), nn.Flatten(), nn.Linear(18, 3)),
     r"outside nn.Linear / nn.Conv2d layers: \['0.weight'"),
    (lambda: nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Flatten(), nn.Linear(144, 3)),
     r"layer '0': Conv2d with groups=2"),
    (lambda: nn.Sequential(nn.Conv2d(2, 3, 3, padding="same"), nn.Flatten(),
                           nn.Linear(192, 3)), r"padding='same' is not supported"),
    (lambda: nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"),
                           nn.Flatten(), nn.Linear(192, 3)), r"padding_mode='reflect'"),
    (lambda: nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular"),
                           nn.Flatten(), nn.Linear(192, 3)), r"padding_mode='circular'"),
])
def test_capture_refuses_unsupported_modules_by_name_and_leaves_no_hooks(make, match):
    model = make()
    x = torch.randn(3, 2, 8) if isinstance(model[0], nn.Conv1d) else torch.randn(3, 2, 8, 8)
    with pytest.raises(ValueError, match=match):
        capture_statistics(model, nn.CrossEntropyLoss(), (x, torch.randint(0, 3, (3,))))
    assert _no_hooks(model)


# -- the optimizer against a dense float64 reference of docs/math.md §10 ------------------

class _DenseMFAC:
    def __init__(self, groups, m, lam, normalize):
        self.groups, self.m, self.lam, self.normalize = groups, m, lam, normalize
        self.window = []
        self.v = np.zeros(sum(p.numel() for g in groups for p in g["params"]))

    def step(self, weights, grads):
        """The change of the flattened weights; None when no parameter has a gradient."""
        if all(g is None for gg in grads for g in gg):
            return None
        parts, present, lr, mu = [], [], [], []
        for grp, ws, gs in zip(self.groups, weights, grads):
            for w, g in zip(ws, gs):
                n = w.size
                parts.append(np.zeros(n) if g is None else g + grp["weight_decay"] * w)
                present.append(np.full(n, g is not None))
                lr.append(np.full(n, grp["lr"]))
                mu.append(np.full(n, grp["momentum"]))
        g, present = np.concatenate(parts), np.concatenate(present)
        lr, mu = np.concatenate(lr), np.concatenate(mu)
        self.window = (self.window + [g])[-self.m:]
        N = self.m if self.normalize == "window" else len(self.window)
        Gm = np.array(self.window)
        u = np.linalg.solve(self.lam * np.eye(g.size) + Gm.T @ Gm / N, g)
        self.v = np.where(present, np.where(mu > 0, mu * self.v + (1 - mu) * u, u), self.v)
        return np.where(present, -lr * self.v, 0.0)


def _flat(tensors):
    return np.concatenate([t.detach().double().numpy().reshape(-1) for t in tensors])


@given(st.data())
def test_optimizer_matches_dense_reference(data):
    torch.manual_seed(data.draw(st.integers(0, 2 ** 16)))
    dt = data.draw(st.sampled_from([torch.float32, torch.float64]))
    d, h = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3))
    model = nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, 2),
                          nn.Linear(2, 1, bias=data.draw(st.booleans()))).to(dt)
    ps = list(model.parameters())
    ng = data.draw(st.integers(1, 3))
    assign = data.draw(st.lists(st.integers(0, ng - 1), min_size=len(ps), max_size=len(ps)))
    hyper = st.fixed_dictionaries({"lr": st.sampled_from([0.0, 0.05, 0.3]),
                                   "momentum": st.sampled_from([0.0, 0.5, 0.9]),
                                   "weight_decay": st.sampled_from([0.0, 1e-2])})
    groups = [dict(params=[p for p, a in zip(ps, assign) if a == k], **data.draw(hyper))
              for k in range(ng)]
    groups = [g for g in groups if g["params"]]
    m, lam = data.draw(st.integers(1, 4)), data.draw(st.sampled_from([1e-2, 1e-1, 1.0]))
    normalize = data.draw(st.sampled_from(["window", "count"]))
    opt = MFAC(groups, lr=0.1, window=m, damping=lam, normalize=normalize)
    ref = _DenseMFAC(opt.param_groups, m, lam, normalize)
    x, y = torch.randn(8, d, dtype=dt), torch.randn(8, 1, dtype=dt)
    order = [p for g in opt.param_groups for p in g["params"]]
    for _ in range(data.draw(st.integers(1, 6))):
        opt.zero_grad(set_to_none=data.draw(st.booleans()))
        mode = data.draw(st.sampled_from(["backward", "backward", "some None", "none"]))
        if mode != "none":
            ((model(x) - y) ** 2).mean().backward()
        if mode == "some None":
            for p in ps:
                if data.draw(st.booleans()):
                    p.grad = None
        weights = [[p.detach().double().numpy().reshape(-1).copy() for p in g["params"]]
                   for g in opt.param_groups]
        grads = [[None if p.grad is None else p.grad.double().numpy().reshape(-1).copy()
                  for p in g["params"]] for g in opt.param_groups]
        before = [p.detach().clone() for p in order]
        opt.step()
        dw = ref.step(weights, grads)
        if dw is None:
            assert all(torch.equal(p, q) for p, q in zip(order, before))
            continue
        for p, q, gr in zip(order, before, [g for gg in grads for g in gg]):
            if gr is None:          # untouched, bit for bit
                assert torch.equal(p.detach(), q)
        tol = 1e-9 if dt == torch.float64 else 2e-3
        err = np.abs(_flat(order) - _flat(before) - dw).max() / max(1.0, np.abs(dw).max())
        assert err < tol, err


@pytest.mark.parametrize("seed", range(6))
def test_optimizer_state_dict_resumes_bit_for_bit_and_refuses_mismatches(seed):
    torch.manual_seed(seed)
    dt = (torch.float32, torch.float64)[seed % 2]
    kw = dict(lr=0.1, momentum=0.5 * (seed % 3 > 0), weight_decay=1e-3 * (seed % 2),
              window=1 + seed % 3, damping=1e-2, normalize=("window", "count")[seed % 2],
              refresh_every=(None, 1, 2)[seed % 3], sparse=seed == 5)
    x, y = torch.randn(6, 3, dtype=dt), torch.randn(6, 1, dtype=dt)

    def make(h=3, bias=True):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(3, h, bias=bias), nn.Tanh(), nn.Linear(h, 1)).to(dt)

    def run(model, opt, k, s):
        g = torch.Generator().manual_seed(s)
        for _ in range(k):
            opt.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            for p in model.parameters():
                p.grad.add_(torch.randn(p.shape, generator=g, dtype=dt), alpha=0.1)
            opt.step()

    m1 = make()
    o1 = MFAC(m1.parameters(), **kw)
    run(m1, o1, 1 + seed % 3, 1)
    buf = io.BytesIO()
    torch.save(o1.state_dict(), buf)
    saved_model = copy.deepcopy(m1.state_dict())
    run(m1, o1, 3, 2)
    m2 = make()
    m2.load_state_dict(saved_model)
    o2 = MFAC(m2.parameters(), **kw)
    buf.seek(0)
    o2.load_state_dict(torch.load(buf, weights_only=True))
    run(m2, o2, 3, 2)
    assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters()))
    assert torch.equal(o1.state_dict()["mfac"]["v"], o2.state_dict()["mfac"]["v"])
    for other, match in [(dict(h=4), "param_groups|shapes|must be a|sparse mask"),
                         (dict(bias=False), "param_groups|shapes|must be a|sparse mask")]:
        m3 = make(**other)
        o3 = MFAC(m3.parameters(), **kw)
        s0 = copy.deepcopy(o3.state_dict())
        buf.seek(0)
        with pytest.raises(ValueError, match=match):
            o3.load_state_dict(torch.load(buf, weights_only=True))
        assert torch.equal(o3.state_dict()["mfac"]["v"], s0["mfac"]["v"])
        assert o3.window_operator.count == 0
    # NaN / inf gradient: refused, nothing changes
    params = [p.detach().clone() for p in m2.parameters()]
    v0, count = o2.state_dict()["mfac"]["v"], o2.window_operator.count
    o2.zero_grad()
    ((m2(x) - y) ** 2).mean().backward()
    list(m2.parameters())[seed % 4].grad.view(-1)[0] = (float("nan"), float("inf"))[seed % 2]
    with pytest.raises(ValueError, match="NaN or infinity"):
        o2.step()
    assert all(torch.equal(p, q) for p, q in zip(m2.parameters(), params))
    assert torch.equal(o2.state_dict()["mfac"]["v"], v0) and o2.window_operator.count == count


# -- pruning over the zoo -------------------------------------------------------------------

@given(st.data())
def test_prune_over_the_zoo_keeps_parameters_and_reaches_the_target(data):
    torch.manual_seed(data.draw(st.integers(0, 2 ** 16)))
    dt = data.draw(st.sampled_from([torch.float32, torch.float64]))
    groups = data.draw(st.sampled_from([1, 2]))
    pad = data.draw(st.sampled_from([1, "same"]))
    conv = nn.Conv2d(2, 4, 3, padding=pad, groups=groups,
                     padding_mode=data.draw(st.sampled_from(["zeros", "reflect", "circular"])),
                     bias=data.draw(st.booleans()))
    model = nn.Sequential(conv, nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 36, 3)).to(dt).eval()
    if data.draw(st.booleans()):
        model[1].requires_grad_(False)
    x, y = torch.randn(10, 2, 6, 6, dtype=dt), torch.randint(0, 3, (10,))
    before = {n: (p.dtype, p.device, p.requires_grad, id(p)) for n, p in model.named_parameters()}
    sparsity = data.draw(st.sampled_from([0.0, 0.3, 0.5, 0.9]))
    rep = prune(model, nn.CrossEntropyLoss(), (x, y), sparsity, num_grads=8, damping=1e-2,
                method=data.draw(st.sampled_from(["joint", "independent", "magnitude", "obd"])),
                fisher=data.draw(st.sampled_from(["block", "static", "sliding"])),
                scope=data.draw(st.sampled_from(["global", "layer"])), block_size=16,
                steps=data.draw(st.integers(1, 2)))
    assert before == {n: (p.dtype, p.device, p.requires_grad, id(p))
                      for n, p in model.named_parameters()}
    total = removed = 0
    for m in (model[0], model[4]):
        assert bool((m.weight[m._mfac_removed] == 0).all())
        assert bool(torch.isfinite(m.weight).all())
        total += m.weight.numel()
        removed += int(m._mfac_removed.sum())
    assert rep.sparsity == removed / total
    assert abs(removed - round(sparsity * total)) <= 1


def test_an_uninitialised_lazy_layer_is_refused_by_name():
    """A lazy module before its first forward pass (torch's own RuntimeError before):
    a ValueError naming the layer; after one forward pass it is an ordinary Linear."""
    from mfac_linalg.torch import ParameterLayout
    model = torch.nn.Sequential(torch.nn.LazyLinear(3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    with pytest.raises(ValueError, match="^layer '0' \\(LazyLinear\\) has not been initialised"):
        ParameterLayout.from_model(model)
    model(torch.randn(2, 5))
    assert [(s.d_out, s.d_in) for s in ParameterLayout.from_model(model).layers] == [(3, 5), (2, 3)]
