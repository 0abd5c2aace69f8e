"""K-FAC and EKFAC of convolution and dense layers against curvlinops (float64, empirical
Fisher, "expand"): the torch front end's conventions (docs/kronecker.md, "Layouts")."""
import numpy as np
import pytest

import mfac_linalg as ml

torch = pytest.importorskip("torch")
curvlinops = pytest.importorskip("curvlinops")


def _capture(model, layer, X, y, loss_func):
    """Inputs and output gradients of ``layer`` for one batch (mean-reduced loss)."""
    cap = {}

    def hook(mod, inp, out):
        cap["x"] = inp[0].detach()
        out.register_hook(lambda g: cap.__setitem__("g", g.detach()))

    h = layer.register_forward_hook(hook)
    model.zero_grad()
    loss_func(model(X), y).backward()
    h.remove()
    return cap["x"], cap["g"]


def _curvlinops_dense(cls, model, loss_func, params, X, y, D):
    K = cls(model, loss_func, params, [(X, y)], fisher_type="empirical",
            separate_weight_and_bias=False, check_deterministic=False)
    return K.to_scipy() @ np.eye(D)


def _torch_order(d_out, d_in_b):
    """Our vec([W | b]) row-major -> PyTorch's [W.flatten(), b] (parameters_to_vector)."""
    idx = np.arange(d_out * d_in_b).reshape(d_out, d_in_b)
    return np.concatenate([idx[:, :-1].ravel(), idx[:, -1]])


@pytest.fixture
def f64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(old)


def test_conv2d_kfac_ekfac_equal_curvlinops(f64):
    from curvlinops import EKFACLinearOperator, KFACLinearOperator
    N, Cin, Cout, H = 6, 2, 3, 5
    conv = torch.nn.Conv2d(Cin, Cout, 3, padding=1, stride=1)
    model = torch.nn.Sequential(conv, torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(Cout * H * H, 4))
    X, y = torch.randn(N, Cin, H, H), torch.randint(0, 4, (N,))
    loss_func = torch.nn.CrossEntropyLoss(reduction="mean")
    x, g = _capture(model, conv, X, y, loss_func)
    A = torch.nn.functional.unfold(x, 3, padding=1).transpose(1, 2).numpy()  # (N, T, Cin*9)
    G = (g.flatten(2).transpose(1, 2) * N).numpy()        # per-sample losses: times N (mean)
    D = Cout * (Cin * 9 + 1)
    perm = _torch_order(Cout, Cin * 9 + 1)
    for cls in (KFACLinearOperator, EKFACLinearOperator):
        ref = _curvlinops_dense(cls, model, loss_func, [conv.weight, conv.bias], X, y, D)
        if cls is KFACLinearOperator:
            (Gam, Aa), = ml.kfac(A, G, 1e-3, bias=True).factors
            ours = np.kron(Gam, Aa)
        else:
            UG, UA, S = ml.ekfac(A, G, 1e-3, bias=True).factors
            U = np.kron(UG, UA)
            ours = U @ np.diag(S.ravel()) @ U.T
        err = np.abs(ours[np.ix_(perm, perm)] - ref).max() / np.abs(ref).max()
        assert err < 1e-12, (cls.__name__, err)


def test_linear_kfac_ekfac_equal_curvlinops(f64):
    from curvlinops import EKFACLinearOperator, KFACLinearOperator
    N, d_in, d_out = 9, 4, 3
    lin = torch.nn.Linear(d_in, d_out)
    model = torch.nn.Sequential(lin, torch.nn.Tanh(), torch.nn.Linear(d_out, 5))
    X, y = torch.randn(N, d_in), torch.randint(0, 5, (N,))
    loss_func = torch.nn.CrossEntropyLoss(reduction="mean")
    x, g = _capture(model, lin, X, y, loss_func)
    A, G = x.numpy(), (g * N).numpy()
    D = d_out * (d_in + 1)
    perm = _torch_order(d_out, d_in + 1)
    ref = _curvlinops_dense(KFACLinearOperator, model, loss_func, [lin.weight, lin.bias], X, y, D)
    (Gam, Aa), = ml.kfac(A, G, 1e-3, bias=True).factors
    assert np.abs(np.kron(Gam, Aa)[np.ix_(perm, perm)] - ref).max() < 1e-12 * np.abs(ref).max()
    ref = _curvlinops_dense(EKFACLinearOperator, model, loss_func, [lin.weight, lin.bias], X, y, D)
    UG, UA, S = ml.ekfac(A, G, 1e-3, bias=True).factors
    U = np.kron(UG, UA)
    ours = (U @ np.diag(S.ravel()) @ U.T)[np.ix_(perm, perm)]
    assert np.abs(ours - ref).max() < 1e-12 * np.abs(ref).max()


def test_linear_on_sequences_kfac_ekfac_equal_curvlinops(f64):
    """nn.Linear applied to (N, S, d_in): the S positions share the weight ("expand")."""
    from curvlinops import EKFACLinearOperator, KFACLinearOperator
    N, S, d_in, d_out = 7, 5, 4, 3
    lin = torch.nn.Linear(d_in, d_out)
    model = torch.nn.Sequential(lin, torch.nn.Tanh(), torch.nn.Flatten(),
                                torch.nn.Linear(S * d_out, 4))
    X, y = torch.randn(N, S, d_in), torch.randint(0, 4, (N,))
    loss_func = torch.nn.CrossEntropyLoss(reduction="mean")
    x, g = _capture(model, lin, X, y, loss_func)
    A, G = x.numpy(), (g * N).numpy()                       # (N, S, d_in), (N, S, d_out)
    D = d_out * (d_in + 1)
    perm = _torch_order(d_out, d_in + 1)
    ref = _curvlinops_dense(KFACLinearOperator, model, loss_func, [lin.weight, lin.bias], X, y, D)
    (Gam, Aa), = ml.kfac(A, G, 1e-3, bias=True).factors
    assert np.abs(np.kron(Gam, Aa)[np.ix_(perm, perm)] - ref).max() < 1e-12 * np.abs(ref).max()
    ref = _curvlinops_dense(EKFACLinearOperator, model, loss_func, [lin.weight, lin.bias], X, y, D)
    UG, UA, S_ = ml.ekfac(A, G, 1e-3, bias=True).factors
    U = np.kron(UG, UA)
    ours = (U @ np.diag(S_.ravel()) @ U.T)[np.ix_(perm, perm)]
    assert np.abs(ours - ref).max() < 1e-12 * np.abs(ref).max()
