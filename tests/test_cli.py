"""The mfac-linalg command."""
import io
import subprocess
import sys

import numpy as np
import pytest

import mfac_linalg as ml
from mfac_linalg import cli


def test_demo_small_runs_and_is_correct():
    buf = io.StringIO()
    res = cli.run_demo(dim=400, grads=100, device="cpu", out=buf)
    text = buf.getvalue()
    assert "relative error vs dense Cholesky solve" in text and "Newton-CG" in text
    assert res["error"] < 1e-10
    assert res["cg_info"] == {"none": 0, "M-FAC": 0}
    assert res["cg_iters"]["M-FAC"] < res["cg_iters"]["none"]


def test_ihvp_and_diag_files(tmp_path, rng):
    G = rng.standard_normal((7, 30))
    x = rng.standard_normal(30)
    X = rng.standard_normal((30, 2))
    np.save(tmp_path / "G.npy", G)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "X.npy", X)
    op = ml.StaticInverseFisher(G, 0.2)
    assert cli.main(["ihvp", "--grads", str(tmp_path / "G.npy"), "--vec", str(tmp_path / "x.npy"),
                     "--damping", "0.2", "--out", str(tmp_path / "y.npy")]) == 0
    assert np.allclose(np.load(tmp_path / "y.npy"), op.matvec(x), rtol=1e-13, atol=0)
    assert cli.main(["ihvp", "--grads", str(tmp_path / "G.npy"), "--vec", str(tmp_path / "X.npy"),
                     "--damping", "0.2", "--out", str(tmp_path / "Y.npy")]) == 0
    assert np.allclose(np.load(tmp_path / "Y.npy"), op.matmat(X), rtol=1e-13, atol=0)
    assert cli.main(["diag", "--grads", str(tmp_path / "G.npy"), "--damping", "0.2",
                     "--out", str(tmp_path / "d.npy")]) == 0
    assert np.allclose(np.load(tmp_path / "d.npy"), op.diagonal(), rtol=1e-13, atol=0)


def _run(*args):
    return subprocess.run([sys.executable, "-m", "mfac_linalg.cli", *args],
                          capture_output=True, text=True)


@pytest.mark.parametrize("setup,args,msg", [
    (None, ["diag", "--grads", "missing.npy", "--damping", "1", "--out", "o.npy"],
     "--grads: no such file: missing.npy"),
    ("notnpy", ["diag", "--grads", "bad.npy", "--damping", "1", "--out", "o.npy"],
     "--grads: cannot read bad.npy as a .npy array"),
    ("nan", ["diag", "--grads", "G.npy", "--damping", "1", "--out", "o.npy"],
     "grads must be finite"),
    ("ok", ["diag", "--grads", "G.npy", "--damping", "-1", "--out", "o.npy"],
     "damping must be > 0; got -1.0"),
    ("ok", ["ihvp", "--grads", "G.npy", "--vec", "v.npy", "--damping", "1", "--out", "o.npy"],
     "x must have shape (4,) or (4, k); got shape (3,)"),
    ("1d", ["diag", "--grads", "G.npy", "--damping", "1", "--out", "o.npy"],
     "grads must be 2-D (m, d); got shape (4,)"),
    ("ok", ["diag", "--grads", "G.npy", "--damping", "1", "--out", "nodir/o.npy"],
     "--out: cannot write nodir/o.npy"),
])
def test_bad_input_one_line_exit_2(tmp_path, monkeypatch, setup, args, msg):
    monkeypatch.chdir(tmp_path)
    if setup == "notnpy":
        (tmp_path / "bad.npy").write_text("hello")
    elif setup == "nan":
        np.save("G.npy", np.array([[1.0, np.nan]]))
    elif setup == "ok":
        np.save("G.npy", np.ones((2, 4)))
        np.save("v.npy", np.ones(3))
    elif setup == "1d":
        np.save("G.npy", np.ones(4))
    r = _run(*args)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and msg in lines[0], r.stderr


def test_demo_bad_option_exit_2():
    r = _run("demo", "--dim", "1")
    assert r.returncode == 2 and "--dim must be >= 2" in r.stderr and "Traceback" not in r.stderr
    r = _run("demo", "--device", "tpu")
    assert r.returncode == 2 and "invalid choice" in r.stderr


def test_console_script_entry_point_declared():
    from importlib.metadata import entry_points
    eps = [e for e in entry_points(group="console_scripts") if e.name == "mfac-linalg"]
    assert eps and eps[0].value == "mfac_linalg.cli:main"
