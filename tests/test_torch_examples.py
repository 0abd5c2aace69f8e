"""The PyTorch examples run and show what their docs say (small settings)."""
import pathlib
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "examples"))


def test_digits_training_example_mfac_learns():
    import torch_digits_training as ex
    hist, secs = ex.run(epochs=3, verbose=False)
    assert set(hist) == {"MFAC", "SGD", "Adam"}
    e0, l0, _ = hist["MFAC"][0]
    e3, l3, acc = hist["MFAC"][-1]
    assert (e0, e3) == (0, 3)
    assert l3 < l0 / 3 and acc > 0.8


def test_pruning_example_ordering_on_the_mlp():
    import torch_pruning as ex
    variants = [("joint", "global", False, 1e-4), ("independent", "global", False, 1e-4),
                ("magnitude", "global", False, 1e-4)]
    out = ex.run(models=("mlp",), sparsities=(0.7, 0.8, 0.9), variants=variants,
                 verbose=False)
    dense, res = out["mlp"]
    for k in range(3):
        joint, ind, mag = (res[v][k][1] for v in variants)
        assert joint <= ind <= mag, (k, joint, ind, mag)
    assert res[variants[0]][0][2] > 0.9          # 70 %: accuracy kept without fine-tuning


def test_kfac_loop_example_beats_sgd_after_one_epoch():
    import torch_kfac_loop as ex
    out = ex.run(epochs=1, methods=("kfac", "sgd"), verbose=False)
    assert out["kfac"][0] < out["sgd"][0]
