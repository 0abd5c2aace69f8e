"""mfac_linalg.torch.layout: torch order <-> Kronecker order, and the permuted operator."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import mfac_linalg as ml  # noqa: E402
from mfac_linalg.torch import ParameterLayout, PermutedOperator, kronecker_index  # noqa: E402


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(2, 3, 2), torch.nn.Flatten(),
                               torch.nn.Linear(12, 4, bias=False), torch.nn.Tanh(),
                               torch.nn.Linear(4, 2)).double()


@pytest.mark.parametrize("d_out,d_in,bias", [(1, 1, True), (2, 3, True), (4, 1, False),
                                             (3, 5, False), (5, 2, True)])
def test_kronecker_index_matches_augmented_matrix(d_out, d_in, bias):
    W = np.arange(d_out * d_in).reshape(d_out, d_in) + 100
    b = np.arange(d_out) + 1000
    torch_vec = np.concatenate([W.reshape(-1)] + ([b] if bias else []))
    aug = np.concatenate([W, b[:, None]], axis=1) if bias else W
    np.testing.assert_array_equal(torch_vec[kronecker_index(d_out, d_in, bias)], aug.reshape(-1))


def test_layout_from_model_round_trip_and_per_layer_order():
    model = _model()
    lay = ParameterLayout.from_model(model)
    assert [s.kind for s in lay.layers] == ["conv2d", "linear", "linear"]
    assert [(s.d_out, s.d_in, s.bias) for s in lay.layers] == [(3, 8, True), (4, 12, False),
                                                               (2, 4, True)]
    x = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    assert lay.dim == x.numel()
    k = lay.to_kronecker(x)
    assert torch.equal(lay.to_torch(k), x)
    # each layer's block of the Kronecker vector is [W | b] (W as a matrix) flattened row-major
    mods = [model[0], model[2], model[4]]
    for m, a, c in zip(mods, lay.offsets[:-1], lay.offsets[1:]):
        W = m.weight.reshape(m.weight.shape[0], -1)
        aug = torch.cat([W, m.bias[:, None]], 1) if m.bias is not None else W
        assert torch.equal(k[a:c], aug.reshape(-1))
    # along another dim, and NumPy in -> NumPy out
    X = torch.stack([x, 2 * x], 0)
    assert torch.equal(lay.to_kronecker(X, dim=1)[1], 2 * k)
    assert np.array_equal(lay.to_kronecker(x.numpy()), k.numpy())
    with pytest.raises(ValueError, match="read-only"):
        lay.perm[0] = 1
    ws = lay.split(x)
    assert torch.equal(ws[0][0].reshape(-1), model[0].weight.reshape(-1)) and ws[1][1] is None
    # W_k comes shaped (d_out, d_in) as documented (it was flat), along any dim, NumPy too
    for m, (w, b) in zip(mods, ws):
        W = m.weight.detach().reshape(m.weight.shape[0], -1)
        assert w.shape == W.shape and torch.equal(w, W)
        assert (b is None) == (m.bias is None) and (b is None or torch.equal(b, m.bias))
    Xn = X.t().contiguous().numpy()                   # (d, 2): the layers along dim 0
    for (w, _), (wn, _), m in zip(lay.split(X, dim=1), lay.split(Xn, dim=-2), mods):
        W = m.weight.detach().reshape(m.weight.shape[0], -1)
        assert w.shape == (2,) + tuple(W.shape) and torch.equal(w[1], 2 * W)
        assert wn.shape == tuple(W.shape) + (2,) and np.array_equal(wn[..., 1], 2 * W.numpy())


def test_layout_errors_name_the_argument():
    model = _model()
    lay = ParameterLayout.from_model(model)
    with pytest.raises(ValueError, match="x must have size"):
        lay.to_kronecker(torch.zeros(lay.dim + 1))
    with pytest.raises(ValueError, match="dim must be in"):
        lay.to_kronecker(torch.zeros(lay.dim), dim=2)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        lay.to_kronecker([0.0] * lay.dim)
    # split checks its arguments as the conversions do (it leaked AttributeError/IndexError)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        lay.split([0.0] * lay.dim)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        lay.split(None)
    with pytest.raises(ValueError, match="dim must be in"):
        lay.split(torch.zeros(lay.dim), dim=1)
    with pytest.raises(ValueError, match="dim must be in"):
        lay.split(torch.tensor(1.0))
    with pytest.raises(TypeError, match="dim must be an integer"):
        lay.split(torch.zeros(lay.dim), dim=0.0)
    with pytest.raises(ValueError, match="x must have size"):
        lay.split(torch.zeros(lay.dim + 1))
    with pytest.raises(TypeError, match="layers must be a sequence"):
        ParameterLayout(None)
    bn = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    with pytest.raises(ValueError, match="outside nn.Linear"):
        ParameterLayout.from_model(bn)
    assert ParameterLayout.from_model(bn, layers=["0"]).dim == 12
    with pytest.raises(ValueError, match="no module named 'x'"):
        ParameterLayout.from_model(bn, layers=["x"])
    with pytest.raises(TypeError, match=r"layers\[0\] \('1'\) must be nn.Linear"):
        ParameterLayout.from_model(bn, layers=["1"])
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        ParameterLayout.from_model("model")
    with pytest.raises(TypeError, match=r"layers\[0\]"):
        ParameterLayout([(2, 3)])
    with pytest.raises(ValueError, match="d_out"):
        ParameterLayout([(0, 3, True)])
    with pytest.raises(ValueError, match="groups=2"):
        ParameterLayout.from_model(torch.nn.Conv2d(2, 2, 1, groups=2))


def test_permuted_operator_equals_P_A_Pt():
    rng = np.random.default_rng(1)
    lay = ParameterLayout([(3, 2, True), (2, 3, False)])
    ops = []
    for s in lay.layers:
        a, g = rng.standard_normal((30, s.d_in)), rng.standard_normal((30, s.d_out))
        ops.append(ml.kfac(a, g, 1e-2, bias=s.bias, damping_mode="exact"))
    inner = ml.block_diag(ops)
    op = PermutedOperator(inner, lay)
    Dk = inner.todense()
    P = np.eye(lay.dim)[lay.perm]                 # x_kron = P x_torch
    D = P.T @ Dk @ P
    np.testing.assert_allclose(op.todense(), D, rtol=0, atol=1e-13 * np.abs(D).max())
    np.testing.assert_allclose(op.diagonal(), np.diag(D), rtol=1e-14)
    assert op.entry(0, 8) == pytest.approx(D[0, 8], rel=1e-13)
    x = torch.tensor(rng.standard_normal(lay.dim))
    y = op.matvec(x)
    assert isinstance(y, torch.Tensor) and y.dtype == torch.float64
    np.testing.assert_allclose(y.numpy(), D @ x.numpy(), rtol=1e-12)
    y32 = op @ x.float()
    assert y32.dtype == torch.float32
    Y = op.matmat(torch.stack([x, -x], 1))
    assert Y.shape == (lay.dim, 2) and torch.allclose(Y[:, 1], -y)
    assert isinstance(op.matvec(x.numpy()), np.ndarray)
    assert op.logdet() == pytest.approx(-np.linalg.slogdet(D)[1], rel=1e-12)   # log det M
    Df = op.fisher().todense()
    np.testing.assert_allclose(Df @ D, np.eye(lay.dim), atol=1e-9)
    with pytest.raises(ValueError, match="dimension"):
        PermutedOperator(inner, ParameterLayout([(1, 1, False)]))
    # tensors in, tensors out through the lazy algebra as well; arrays stay arrays
    X2 = torch.stack([x, 2 * x], 1)
    for expr, dense in [(2 * op, 2 * D), (op + op.fisher(), D + Df), (op @ op, D @ D),
                        (-op, -D), (op / 4, D / 4)]:
        yv = expr.matvec(x)
        assert isinstance(yv, torch.Tensor) and yv.dtype == torch.float64
        np.testing.assert_allclose(yv.numpy(), dense @ x.numpy(), rtol=1e-9,
                                   atol=1e-12 * np.abs(dense @ x.numpy()).max())
        assert isinstance(expr @ X2, torch.Tensor) and (expr @ X2).shape == X2.shape
        assert isinstance(expr.rmatvec(x.float()), torch.Tensor)
        assert (expr.rmatvec(x.float())).dtype == torch.float32
        assert isinstance(x @ expr, torch.Tensor)
        assert isinstance(expr.quad(X2), torch.Tensor) and isinstance(expr.quad(x), float)
        assert (expr @ torch.ones(lay.dim, dtype=torch.int64)).dtype == torch.float64
        assert isinstance(expr.matvec(x.numpy()), np.ndarray)
    assert isinstance((2 * inner).matvec(x), np.ndarray)     # no torch operator: arrays
    assert isinstance(ml.block_diag([op, op.fisher()]) @ torch.cat([X2, X2]), torch.Tensor)
    # what block_diag's logdet classifies is the wrapped operator, not the adapter
    with pytest.raises(TypeError, match="one kind"):
        ml.block_diag([op, op.fisher()]).logdet()
    assert ml.block_diag([op, op]).logdet() == pytest.approx(2 * op.logdet(), rel=1e-12)
    # a non-symmetric wrapped operator: its adjoint, in torch order
    ns = PermutedOperator(inner @ (inner + inner.fisher()), lay)
    Dn = P.T @ (Dk @ (Dk + np.linalg.inv(Dk))) @ P
    assert not ns.symmetric
    xn = x.numpy()
    np.testing.assert_allclose(ns.rmatvec(xn), Dn.T @ xn, rtol=1e-9)
    np.testing.assert_allclose((xn @ ns), Dn.T @ xn, rtol=1e-9)
    np.testing.assert_allclose(ns.T.todense(), Dn.T, rtol=1e-9, atol=1e-12 * np.abs(Dn).max())
    assert isinstance(ns.rmatvec(x), torch.Tensor)
