"""mfac_linalg.torch.capture: per-sample gradients, layer statistics, and the Kronecker
preconditioner against curvlinops and dense oracles."""
import copy
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import mfac_linalg as ml  # noqa: E402
from mfac_linalg.torch import (ParameterLayout, capture_statistics,  # noqa: E402
                               kronecker_preconditioner, per_sample_gradients)


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(),
                               torch.nn.Linear(4, 3)).double()


def _cnn():
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv2d(3, 2, 2, stride=2), torch.nn.Flatten(),
                               torch.nn.Linear(2 * 2 * 2, 3)).double()


def _data(shape, n=12, batches=2, classes=3, seed=2):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n // batches, *shape, generator=g, dtype=torch.float64),
             torch.randint(0, classes, (n // batches,), generator=g)) for _ in range(batches)]


def _dense_torch_order_grads(model, loss_fn, data):
    """Per-sample gradients (n, d) by one autograd call per sample (the oracle)."""
    ps = [p for p in model.parameters()]
    rows = []
    for x, y in data:
        for i in range(x.shape[0]):
            g = torch.autograd.grad(loss_fn(model(x[i:i + 1]), y[i:i + 1]), ps)
            rows.append(torch.cat([t.reshape(-1) for t in g]))
    return torch.stack(rows)


# -- per-sample gradients --------------------------------------------------------------------

@pytest.mark.parametrize("method", ["vmap", "loop", "auto"])
def test_per_sample_gradients_match_autograd(method):
    model, loss = _cnn(), torch.nn.CrossEntropyLoss()
    (x, y), = _data((2, 4, 4), n=5, batches=1)
    G = per_sample_gradients(model, loss, (x, y), method=method)
    ref = _dense_torch_order_grads(model, loss, [(x, y)])
    assert G.shape == ref.shape and G.dtype == torch.float64 and not G.requires_grad
    assert float((G - ref).abs().max()) <= 1e-14 * float(ref.abs().max())
    # into the library through DLPack (no host copy of G), the operator equals the dense F^-1
    op = ml.StaticInverseFisher(G, damping=1e-3)
    x0 = torch.randn(G.shape[1], dtype=torch.float64)
    Gn = ref.numpy()
    F = 1e-3 * np.eye(G.shape[1]) + Gn.T @ Gn / Gn.shape[0]
    np.testing.assert_allclose(op.matvec(x0), np.linalg.solve(F, x0.numpy()), rtol=1e-9)


def test_per_sample_gradients_fall_back_for_batchnorm_and_check_arguments():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4),
                                torch.nn.Linear(4, 2)).double().eval()
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.randint(0, 2, (4,))
    loss = torch.nn.CrossEntropyLoss()
    G = per_sample_gradients(model, loss, (x, y), method="loop")
    ref = _dense_torch_order_grads(model, loss, [(x, y)])
    assert torch.allclose(G, ref, rtol=0, atol=1e-14)
    with pytest.raises(TypeError, match="batch must be a pair"):
        per_sample_gradients(model, loss, x)
    with pytest.raises(ValueError, match="same number of samples"):
        per_sample_gradients(model, loss, (x, y[:2]))
    with pytest.raises(ValueError, match="method must be one of"):
        per_sample_gradients(model, loss, (x, y), method="fast")
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        per_sample_gradients(lambda t: t, loss, (x, y))
    # a train-mode BatchNorm cannot see one sample: the call fails, and the running
    # statistics the loop had already updated are restored (they were left changed)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        per_sample_gradients(model, loss, (x, y))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # the same for capture_statistics / kronecker_preconditioner failing on a later batch
    # (the first batch's forward pass had updated the running statistics)
    for fn in (capture_statistics, kronecker_preconditioner):
        with pytest.raises(RuntimeError, match="cannot be multiplied"):
            fn(model, loss, [(x, y), (x[:, :2], y)], layers=["0", "2"])
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    model.eval()
    # 0-d targets / 1-d inputs (one sample without its batch dimension): was an IndexError
    with pytest.raises(ValueError, match="batch: inputs and targets must have a leading sample"):
        per_sample_gradients(model, loss, (x[0], y[0]))
    with pytest.raises(ValueError, match="data: inputs and targets must have a leading sample"):
        capture_statistics(model, loss, (x[0], y[0]))
    # a seed outside torch's range: was "Overflow when unpacking long long" without a name
    with pytest.raises(ValueError, match="seed must be <= 18446744073709551615"):
        capture_statistics(model, loss, (x, y), fisher="mc", seed=2 ** 64)
    with pytest.raises(ValueError, match="seed must be >= -9223372036854775808"):
        capture_statistics(model, loss, (x, y), fisher="mc", seed=-2 ** 63 - 1)


# -- captured statistics -------------------------------------------------------------------

def _per_sample_from_stats(st):
    """vec(DW_n) in torch order from captured (A, G): DW_n = G_n^T [A_n | 1]."""
    rows = []
    for L in st.layers:
        A, G = L.activations, L.output_grads
        if A.ndim == 2:
            A, G = A[:, None], G[:, None]
        W = G.transpose(1, 2) @ A                    # (n, d_out, d_in)
        parts = [W.reshape(W.shape[0], -1)]
        if L.spec.bias:
            parts.append(G.sum(1))
        rows.append(torch.cat(parts, 1))
    return torch.cat(rows, 1)


@pytest.mark.parametrize("net", ["mlp", "cnn"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_captured_statistics_rebuild_the_per_sample_gradients(net, reduction):
    model = _mlp() if net == "mlp" else _cnn()
    data = _data((5,) if net == "mlp" else (2, 4, 4))
    loss = torch.nn.CrossEntropyLoss(reduction=reduction)
    st = capture_statistics(model, loss, data)
    assert st.num_samples == 12
    # per-sample loss gradients: for "sum" the batch gradient is their sum, so the oracle
    # is the same for both reductions (mean is scaled back by the batch size)
    ref = _dense_torch_order_grads(model, torch.nn.CrossEntropyLoss(), data)
    got = _per_sample_from_stats(st)
    assert float((got - ref).abs().max()) <= 1e-13 * float(ref.abs().max())
    if net == "cnn":
        assert st.layers[0].activations.shape == (12, 16, 18)       # T = 4 x 4, d_in = 2*3*3
        assert st.layers[1].output_grads.shape == (12, 4, 2)
    for p in model.parameters():
        assert p.grad is None                                       # .grad untouched


def test_linear_with_sequence_inputs_keeps_positions():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2),
                                torch.nn.Flatten()).double()
    x = torch.randn(6, 5, 3, dtype=torch.float64)
    y = torch.randn(6, 10, dtype=torch.float64)
    loss = torch.nn.MSELoss(reduction="sum")
    st = capture_statistics(model, loss, (x, y))
    assert st.layers[0].activations.shape == (6, 5, 3)
    ref = _dense_torch_order_grads(model, loss, [(x, y)])
    assert torch.allclose(_per_sample_from_stats(st), ref, rtol=0, atol=1e-13)


def test_mc_fisher_is_seeded_and_counts_draws():
    model, loss = _mlp(), torch.nn.CrossEntropyLoss()
    data = _data((5,))
    a = capture_statistics(model, loss, data, fisher="mc", mc_samples=3, seed=5)
    b = capture_statistics(model, loss, data, fisher="mc", mc_samples=3, seed=5)
    c = capture_statistics(model, loss, data, fisher="mc", mc_samples=3, seed=6)
    assert a.num_samples == 36
    assert torch.equal(a.layers[1].output_grads, b.layers[1].output_grads)
    assert not torch.equal(a.layers[1].output_grads, c.layers[1].output_grads)
    # each draw is a valid gradient of the cross-entropy at a sampled label: the output
    # gradient of a sample is softmax(z) - e_label, so its entries sum to 0
    assert float(a.layers[1].output_grads.sum(1).abs().max()) < 1e-13
    with pytest.raises(ValueError, match="mc_samples must be 1"):
        capture_statistics(model, loss, data, mc_samples=2)
    with pytest.raises(ValueError, match="fisher='mc' needs loss_fn"):
        capture_statistics(model, torch.nn.L1Loss(), data, fisher="mc")
    with pytest.raises(ValueError, match="reduction must be given"):
        capture_statistics(model, lambda o, t: o.sum(), data)
    with pytest.raises(ValueError, match="fisher must be one of"):
        capture_statistics(model, loss, data, fisher="true")


# -- against curvlinops ------------------------------------------------------------------------

def _curvlinops_dense(cls, model, loss, data):
    curvlinops = pytest.importorskip("curvlinops")
    params = [p for p in model.parameters()]
    op = getattr(curvlinops, cls)(model, loss, params, data, fisher_type="empirical",
                                  separate_weight_and_bias=False, check_deterministic=False)
    D = sum(p.numel() for p in params)
    return (op @ torch.eye(D, dtype=torch.float64)).detach().numpy()


@pytest.mark.parametrize("net", ["mlp", "cnn"])
@pytest.mark.parametrize("method,cls", [("kfac", "KFACLinearOperator"),
                                        ("ekfac", "EKFACLinearOperator")])
def test_kfac_and_ekfac_equal_curvlinops(net, method, cls):
    model = _mlp() if net == "mlp" else _cnn()
    data = _data((5,) if net == "mlp" else (2, 4, 4))
    loss = torch.nn.CrossEntropyLoss()
    ref = _curvlinops_dense(cls, model, loss, data)
    lam = 1e-9
    kw = {"damping_mode": "exact"} if method == "kfac" else {}
    P = kronecker_preconditioner(model, loss, data, method, lam, **kw)
    ours = P.fisher().todense() - lam * np.eye(P.shape[0])
    err = np.abs(ours - ref).max() / np.abs(ref).max()
    assert err <= 1e-12, err
    # without the permutation the two differ (the layers have biases)
    inner = P.operator.fisher().todense() - lam * np.eye(P.shape[0])
    assert np.abs(inner - ref).max() / np.abs(ref).max() > 1e-2


def test_preconditioner_products_are_tensors_and_match_dense_inverse():
    model, loss = _mlp(), torch.nn.CrossEntropyLoss()
    data = _data((5,))
    P = kronecker_preconditioner(model, loss, data, "kfac", 1e-2, damping_mode="exact")
    D = P.todense()
    v = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    y = P @ v
    assert isinstance(y, torch.Tensor) and y.dtype == torch.float64
    np.testing.assert_allclose(y.numpy(), D @ v.numpy(), rtol=1e-12)
    y32 = P @ v.float()
    assert y32.dtype == torch.float32
    np.testing.assert_allclose(y32.numpy(), D @ v.float().numpy(), rtol=1e-5)
    st = capture_statistics(model, loss, data)
    P2 = kronecker_preconditioner(None, None, None, "kpsvd", 1e-2, statistics=st)
    assert isinstance(P2.layout, ParameterLayout) and len(P2.blocks) == 2
    with pytest.raises(ValueError, match="method must be one of"):
        kronecker_preconditioner(model, loss, data, "shampoo", 1e-2)
    with pytest.raises(ValueError, match="damping"):
        kronecker_preconditioner(model, loss, data, "kfac", -1.0)


@pytest.mark.gpu
@pytest.mark.skipif(not ml._backend.gpu_available() or not torch.cuda.is_available(),
                    reason="needs CuPy, a CUDA GPU and a CUDA build of torch")
def test_gpu_preconditioner_and_per_sample_gradients_match_cpu():
    model, loss = _cnn(), torch.nn.CrossEntropyLoss()
    data = _data((2, 4, 4))
    P = kronecker_preconditioner(model, loss, data, "ekfac", 1e-3)
    G = per_sample_gradients(model, loss, data[0])
    model_g = _cnn().cuda()
    data_g = [(x.cuda(), y.cuda()) for x, y in data]
    Pg = kronecker_preconditioner(model_g, loss, data_g, "ekfac", 1e-3)
    Gg = per_sample_gradients(model_g, loss, data_g[0])
    assert Gg.device.type == "cuda" and torch.allclose(Gg.cpu(), G, rtol=1e-12, atol=1e-14)
    v = torch.randn(P.shape[0], dtype=torch.float64)
    yg = Pg @ v.cuda()
    assert yg.device.type == "cuda" and yg.dtype == torch.float64
    assert torch.allclose(yg.cpu(), P @ v, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("method", ["kfac", "ekfac", "kpsvd", "deflation", "kfac_corrected",
                                    "lanczos"])
def test_every_method_gives_the_inverse_of_its_fisher_in_torch_order(method):
    import warnings
    model, loss = _cnn(), torch.nn.CrossEntropyLoss()
    data = _data((2, 4, 4))
    st = capture_statistics(model, loss, data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        P = kronecker_preconditioner(None, None, None, method, 1e-2, statistics=st)
        # each block is the library's builder on the captured data, permuted per layer
        for blk, L in zip(P.blocks, st.layers):
            ref = getattr(ml, method)(L.activations, L.output_grads, 1e-2, bias=L.spec.bias)
            assert blk.method == ref.method
        D, Df = P.todense(), P.fisher().todense()
    np.testing.assert_allclose(D, D.T, atol=1e-12 * np.abs(D).max())
    np.testing.assert_allclose(Df @ D, np.eye(D.shape[0]), atol=1e-8)
    v = torch.randn(D.shape[0], dtype=torch.float64)
    np.testing.assert_allclose((P @ v).numpy(), D @ v.numpy(), rtol=1e-10, atol=1e-12)


def test_per_sample_gradients_in_chunks_and_float32():
    model, loss = _mlp().float(), torch.nn.CrossEntropyLoss()
    (x, y), = _data((5,), n=7, batches=1)
    G = per_sample_gradients(model, loss, (x.float(), y), method="vmap", chunk_size=3)
    Gl = per_sample_gradients(model, loss, (x.float(), y), method="loop")
    assert G.dtype == torch.float32 and G.shape == (7, 39)
    assert torch.allclose(G, Gl, rtol=1e-5, atol=1e-6)


def test_capture_refuses_what_it_cannot_represent():
    loss = torch.nn.CrossEntropyLoss()
    x, y = torch.randn(4, 2, 5, 5, dtype=torch.float64), torch.randint(0, 3, (4,))
    torch.manual_seed(0)
    reflect = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"),
                                  torch.nn.Flatten(), torch.nn.Linear(75, 3)).double()
    with pytest.raises(ValueError, match="padding_mode='reflect' is not supported"):
        capture_statistics(reflect, loss, (x, y))
    lin = torch.nn.Linear(3, 3).double()
    twice = torch.nn.Sequential(lin, torch.nn.Tanh(), lin)       # registered twice
    with pytest.raises(ValueError, match="called more than once"):
        capture_statistics(twice, loss, (torch.randn(4, 3, dtype=torch.float64), y))
    # one module under two names, called once: its parameters counted once
    alias = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Tanh(), lin).double()
    alias.head = alias[2]
    assert ParameterLayout.from_model(alias).dim == 24

    class Again(torch.nn.Module):                                # registered once, called twice
        def __init__(self):
            super().__init__()
            self.lin = lin

        def forward(self, z):
            return self.lin(torch.tanh(self.lin(z)))

    with pytest.raises(ValueError, match="called more than once"):
        capture_statistics(Again(), loss, (torch.randn(4, 3, dtype=torch.float64), y))
    assert not lin._forward_hooks                       # the hooks came off
    with pytest.raises(TypeError, match="statistics must be a CapturedStatistics"):
        kronecker_preconditioner(None, None, None, "kfac", 1e-2, statistics={})
    with pytest.raises(TypeError, match=r"data\[0\] must be a pair"):
        capture_statistics(lin, loss, [x])


# -- layers off the loss, no_grad, buffers -----------------------------------------------------

class _AuxNet(torch.nn.Module):
    """A layer (aux) whose output does not reach the loss."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.head = torch.nn.Linear(4, 3).double()
        self.aux = torch.nn.Linear(4, 2).double()

    def forward(self, z):
        self.aux(z)
        return self.head(z)


def test_layer_whose_output_misses_the_loss_gets_zero_gradients():
    """Was "layer 'aux' is called more than once per forward pass": the zero gradient was
    built by running the layer again under the counting hook."""
    model, loss = _AuxNet(), torch.nn.CrossEntropyLoss()
    data = _data((4,))
    calls = []
    model.aux.register_forward_hook(lambda *a: calls.append(1))
    st = capture_statistics(model, loss, data)
    assert len(calls) == len(data)                      # one forward per batch, no re-run
    head, aux = st.layers
    assert (head.name, aux.name) == ("head", "aux")
    assert aux.output_grads.shape == (12, 2) and aux.output_grads.dtype == torch.float64
    assert torch.equal(aux.output_grads, torch.zeros(12, 2, dtype=torch.float64))
    assert torch.equal(aux.activations, torch.cat([x for x, _ in data]))
    ref = _dense_torch_order_grads(model.head, loss, data)
    got = _per_sample_from_stats(SimpleNamespace(layers=[head]))
    assert float((got - ref).abs().max()) <= 1e-13 * float(ref.abs().max())
    P = kronecker_preconditioner(model, loss, data, "kfac", 1e-2)
    assert P.shape == (15 + 10, 15 + 10)


@pytest.mark.parametrize("method", ["vmap", "loop", "auto"])
def test_per_sample_gradients_under_no_grad(method):
    """The loop used to fail under torch.no_grad() ("element 0 of tensors does not require
    grad") while vmap worked."""
    model, loss = _cnn(), torch.nn.CrossEntropyLoss()
    (x, y), = _data((2, 4, 4), n=5, batches=1)
    ref = _dense_torch_order_grads(model, loss, [(x, y)])
    with torch.no_grad():
        G = per_sample_gradients(model, loss, (x, y), method=method)
        assert not torch.is_grad_enabled()
    assert float((G - ref).abs().max()) <= 1e-14 * float(ref.abs().max())


def _bn_cnn():
    torch.manual_seed(5)
    return torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3, padding=1), torch.nn.BatchNorm2d(3),
                               torch.nn.ReLU(), torch.nn.Flatten(),
                               torch.nn.Linear(3 * 4 * 4, 3)).double().train()


def _buffers(model):
    return {k: v.clone() for k, v in model.named_buffers()}


def _same_buffers(model, saved):
    now = dict(model.named_buffers())
    return now.keys() == saved.keys() and all(
        v.dtype == saved[k].dtype and torch.equal(v, saved[k]) for k, v in now.items())


@pytest.mark.parametrize("call", ["psg_auto", "psg_loop", "capture", "kronecker"])
def test_train_mode_batchnorm_statistics_are_left_as_they_were(call):
    """A Conv2d + BatchNorm2d model in training mode: the running statistics (running_mean,
    running_var, num_batches_tracked) were changed by every successful call."""
    model, loss = _bn_cnn(), torch.nn.CrossEntropyLoss()
    data = _data((2, 4, 4))
    with torch.no_grad():                           # running statistics not at their init
        model(data[0][0] * 2.0 + 1.0)
    before = _buffers(model)
    if call.startswith("psg"):
        ref = _dense_torch_order_grads(copy.deepcopy(model), loss, data[:1])
        G = per_sample_gradients(model, loss, data[0], method=call[4:])
        assert G.shape == (6, 57 + 6 + 147)
        assert float((G - ref).abs().max()) <= 1e-14 * float(ref.abs().max())
    elif call == "capture":
        capture_statistics(model, loss, data, layers=["0", "4"])
    else:
        kronecker_preconditioner(model, loss, data, "kfac", 1e-2, layers=["0", "4"])
    assert model.training
    assert _same_buffers(model, before)
    assert int(model[1].num_batches_tracked) == 1


def test_preconditioner_of_integer_or_bool_tensors_is_floating():
    """An integer or bool tensor gets the floating result (as a NumPy array does); it was
    cast back to the input's dtype, truncated (int) or all True (bool)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    x, y = torch.randn(20, 4), torch.randint(0, 2, (20,))
    P = kronecker_preconditioner(model, torch.nn.CrossEntropyLoss(), (x, y), "kfac", 1e-1)
    g = torch.tensor([1, 0, 0, 0] * 5 + [1, 0, 0])
    ref = P @ g.double()
    for v in (g, g.bool()):
        out = P @ v
        assert out.dtype == torch.float64 and torch.equal(out, ref)
    assert (P @ g.float()).dtype == torch.float32                # floating stays as it is
    q = P.quad(torch.ones(23, 2, dtype=torch.int64))
    assert q.dtype == torch.float64
    assert torch.allclose(q, P.quad(torch.ones(23, 2, dtype=torch.float64)), rtol=1e-15)


class _Tied(torch.nn.Module):
    """Two Linear layers sharing a weight (or an Embedding tied to the output layer)."""

    def __init__(self, kind, emb_first=True):
        super().__init__()
        if kind == "linear":
            self.a = torch.nn.Linear(3, 3)
            self.b = torch.nn.Linear(3, 3)
            self.b.weight = self.a.weight
            self.out = torch.nn.Linear(3, 2)
        else:
            if emb_first:
                self.emb = torch.nn.Embedding(5, 3)
                self.out = torch.nn.Linear(3, 5, bias=False)
            else:
                self.out = torch.nn.Linear(3, 5, bias=False)
                self.emb = torch.nn.Embedding(5, 3)
            self.out.weight = self.emb.weight
        self.kind = kind

    def forward(self, x):
        if self.kind == "linear":
            return self.out(torch.tanh(self.b(torch.tanh(self.a(x)))))
        return self.out(self.emb(x))


@pytest.mark.parametrize("kind,emb_first", [("linear", True), ("embedding", True),
                                            ("embedding", False)])
def test_shared_parameters_are_refused_by_name(kind, emb_first):
    """A weight held by two modules was counted twice (a layout longer than the
    parameter vector), or the Embedding's use of a tied output weight was dropped."""
    model = _Tied(kind, emb_first)
    if kind == "linear":
        data = [(torch.randn(4, 3), torch.randint(0, 2, (4,)))]
    else:
        data = [(torch.randint(0, 5, (4,)), torch.randint(0, 5, (4,)))]
    for call in (lambda: ParameterLayout.from_model(model),
                 lambda: capture_statistics(model, torch.nn.CrossEntropyLoss(), data),
                 lambda: kronecker_preconditioner(model, torch.nn.CrossEntropyLoss(), data)):
        with pytest.raises(ValueError, match="shared between modules.*tied"):
            call()
    if kind == "linear":       # layers without the shared weight, or it frozen: fine
        assert ParameterLayout.from_model(model, layers=["out"]).dim == 8
        model.a.weight.requires_grad_(False)
        model.a.bias.requires_grad_(False)
        model.b.bias.requires_grad_(False)
        assert ParameterLayout.from_model(model).dim == 8


def test_batches_with_other_positions_are_refused_by_name():
    """Sequences of other lengths gave a raw torch.cat error."""
    lin = torch.nn.Linear(3, 2)
    seq = [(torch.randn(2, 5, 3), torch.randn(2, 5, 2)), (torch.randn(2, 7, 3),
                                                            torch.randn(2, 7, 2))]
    with pytest.raises(ValueError, match=r"layer '0'.*different positions.*\[\[5\], \[7\]\]"):
        capture_statistics(torch.nn.Sequential(lin), torch.nn.MSELoss(), seq)
