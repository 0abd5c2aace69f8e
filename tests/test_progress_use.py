"""Progress bars where the library and its scripts use them (issue 15 item 6).

A bar is drawn on stderr when asked for and tqdm is installed; results are bit-identical
with and without it; with the default (``None``) and a non-terminal stderr nothing is
written.
"""
import numpy as np
import pytest

from mfac_linalg import _progress

torch = pytest.importorskip("torch")

from mfac_linalg.torch import kronecker_preconditioner  # noqa: E402


def _problem():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(),
                                torch.nn.Linear(4, 3), torch.nn.Tanh(),
                                torch.nn.Linear(3, 2)).double()
    x = torch.randn(16, 5, dtype=torch.float64)
    y = torch.randint(0, 2, (16,))
    return model, torch.nn.CrossEntropyLoss(), (x, y)


def _apply(P, model):
    n = sum(p.numel() for p in model.parameters())
    V = torch.linspace(-1.0, 1.0, 3 * n, dtype=torch.float64).reshape(n, 3)
    return np.stack([(P @ V[:, j].contiguous()).numpy() for j in range(3)], axis=1)


@pytest.mark.parametrize("method", ["kfac", "kpsvd"])
def test_kronecker_preconditioner_bar_on_stderr_and_identical_results(capsys, method):
    pytest.importorskip("tqdm")
    model, loss, data = _problem()
    P_off = kronecker_preconditioner(model, loss, data, method, 1e-2, progress=False)
    out = capsys.readouterr()
    assert out.err == "" and out.out == ""
    P_on = kronecker_preconditioner(model, loss, data, method, 1e-2, progress=True)
    out = capsys.readouterr()
    assert f"{method} layers" in out.err          # the bar, with its label
    assert "3/3" in out.err                        # one step per layer, three layers
    assert out.out == ""
    a, b = _apply(P_off, model), _apply(P_on, model)
    assert np.array_equal(a, b)                    # bit-identical, not merely close
    assert np.array_equal(np.asarray(P_off.todense()), np.asarray(P_on.todense()))
    assert np.array_equal(np.asarray(P_off.fisher().todense()),
                          np.asarray(P_on.fisher().todense()))


def test_kronecker_preconditioner_default_is_silent_off_a_terminal(capsys):
    model, loss, data = _problem()
    assert not _progress._stderr_is_tty()          # pytest's captured stderr is no tty
    P = kronecker_preconditioner(model, loss, data, "kfac", 1e-2)
    out = capsys.readouterr()
    assert out.err == "" and out.out == ""
    P_off = kronecker_preconditioner(model, loss, data, "kfac", 1e-2, progress=False)
    assert np.array_equal(_apply(P, model), _apply(P_off, model))


@pytest.mark.parametrize("bad, exc", [("yes", TypeError), (1.0, TypeError), (2, TypeError)])
def test_kronecker_preconditioner_rejects_bad_progress(bad, exc):
    model, loss, data = _problem()
    with pytest.raises(exc, match="progress"):
        kronecker_preconditioner(model, loss, data, "kfac", 1e-2, progress=bad)


# --- the example scripts: a bar when asked for, the same numbers either way -------------

import pathlib  # noqa: E402
import sys  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "examples"))


def test_sliding_optimizer_example_bar_and_identical_history(capsys):
    pytest.importorskip("tqdm")
    import sliding_optimizer
    off = sliding_optimizer.run(steps=60, dim=12, window=16, verbose=False,
                                show_progress=False)
    assert capsys.readouterr().err == ""
    on = sliding_optimizer.run(steps=60, dim=12, window=16, verbose=False,
                               show_progress=True)
    err = capsys.readouterr().err
    assert "steps" in err and "60/60" in err
    assert on == off                               # exact float equality, every entry
    default = sliding_optimizer.run(steps=60, dim=12, window=16, verbose=False)
    assert capsys.readouterr().err == "" and default == off


def test_torch_training_loop_bar_and_identical_weights(capsys):
    pytest.importorskip("tqdm")
    pytest.importorskip("sklearn")
    import torch_common as tc
    Xtr, ytr, _, _ = tc.digits(dtype=torch.float64)
    Xtr, ytr = Xtr[:200], ytr[:200]
    weights = []
    for show in (False, True, None):
        model = tc.mlp(seed=0, hidden=8).double()
        tc.train(model, torch.optim.SGD(model.parameters(), lr=0.1), Xtr, ytr, 2,
                 show_progress=show, desc="test epochs")
        err = capsys.readouterr().err
        assert ("test epochs" in err and "2/2" in err) if show else err == ""
        weights.append(torch.nn.utils.parameters_to_vector(model.parameters()).detach())
    assert torch.equal(weights[0], weights[1]) and torch.equal(weights[0], weights[2])
