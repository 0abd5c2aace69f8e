"""The Kronecker examples run and show what docs/kronecker.md says of them."""
import pathlib
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))


def test_kronecker_paper_example_small():
    pytest.importorskip("sklearn")
    import kronecker_paper as kp
    data = kp.digits()[:200]
    out = kp.run(epochs=(0, 1), n_fisher=60, verbose=False, data=data, layers=(2, 3, 4))
    assert [e for e, _, _ in out] == [0, 1] and out[1][1] < out[0][1]     # it trains
    for _, _, rows in out:
        assert [r["layer"] for r in rows] == [2, 3, 4]
        for r in rows:
            e = r["frobenius"]
            assert e["deflation"] <= e["KPSVD"] + 1e-7 <= e["K-FAC"] + 2e-7
            assert abs(e["Lanczos"] - e["deflation"]) <= 1e-7
            assert e["K-FAC corr."] <= e["K-FAC"] + 1e-7
            assert all(0 <= r["spectrum"][n] <= 1.5 for n in r["spectrum"])
            assert np.isfinite(list(r["seconds"].values())).all()
    # warm starts from the previous point of training were used
    assert out[1][2][0]["products"]["KPSVD"] > 0


def test_kronecker_training_example_small():
    """Every optimiser lowers the loss at a tiny size; the table is well-formed."""
    pytest.importorskip("sklearn")
    import kronecker_training as kt
    data = [("digits", kt.kp.digits()[:100]), ("curves", kt.curves(n=100, size=8, seed=1))]
    res = kt.run(datasets=data, verbose=False, epochs=2, batch=50, refresh=2)
    assert list(res) == ["digits", "curves"]
    for name, per in res.items():
        assert list(per) == kt.OPTIMISERS
        for m, r in per.items():
            assert r["diverged"] is None, (name, m)
            assert len(r["loss"]) == len(r["seconds"]) == 3
            assert np.isfinite(r["loss"]).all() and r["loss"][-1] < r["loss"][0], (name, m)
            assert np.all(np.diff(r["seconds"]) > 0)
            assert (r["products"] > 0) == (m in kt.ITERATIVE)
        lines = kt.table(name, per).splitlines()
        assert len(lines) == 2 + len(kt.OPTIMISERS)
        assert all(line.startswith("| ") and line.endswith(" |") and line.count("|") == 8
                   for line in lines)
        for line, m in zip(lines[2:], kt.OPTIMISERS):
            cells = [c.strip() for c in line.strip("|").split("|")]
            assert cells[0] == m and all(np.isfinite(float(c)) for c in cells[1:6])


def test_curves_data_set():
    import kronecker_training as kt
    X = kt.curves(n=40, size=10, seed=3)
    assert X.shape == (40, 100) and X.min() >= 0 and X.max() <= 1
    # every image holds a drawn curve: some pixel on it (the pen's peak is 1 at distance 0),
    # most of the image blank; same seed, same images
    assert (X.max(axis=1) > 0.6).all() and (np.median(X, axis=1) < 0.05).all()
    assert np.array_equal(X, kt.curves(n=40, size=10, seed=3))


def test_natural_gradient_step_equals_dense_oracle():
    """One image: K-FAC with exact damping is F + lam I exactly (F = v v^T, v = kron(g, [a, 1])),
    so the script's step must be -lr (F + lam I)^{-1} vec([gW | gb]) per layer (np.kron oracle)."""
    import copy

    import kronecker_training as kt
    from functools import partial

    import mfac_linalg as ml
    kp = kt.kp
    rng = np.random.default_rng(5)
    X = kt.curves(n=1, size=4, seed=2)
    params = kt.init([16, 6, 5, 4, 3, 4, 5, 6, 16], rng)
    lr, lam = 0.3, 0.05
    opt = kt.NaturalGradient(partial(ml.kfac, damping_mode="exact"), False, lr, lam, 5, 1e-6,
                             np.random.default_rng(9))
    sample_rng = copy.deepcopy(opt.rng)
    _, gparams = kt.loss_and_grads(params, X)
    new = opt.step(params, gparams, X)
    acts = kp.forward(params, X)
    p = kp.sigmoid(acts[-1])
    y = (sample_rng.random(p.shape) < p).astype(float)
    grads = kp.backward(params, acts, p - y)
    for (W, b), (W1, b1), (gW, gb), a, g in zip(params, new, gparams, acts[:-1], grads):
        v = np.kron(g[0], np.append(a[0], 1.0))
        M = np.outer(v, v) + lam * np.eye(v.size)
        step = np.linalg.solve(M, np.column_stack([gW, gb]).ravel()).reshape(len(b), -1)
        assert np.abs(step).max() > 1e-3                 # a real step, not a vacuous match
        # a backward-stable solve of M is accurate to a small multiple of eps cond(M) |step|
        # (LAPACK builds differ in the last bits: 1.9e-12 with numpy 1.24's OpenBLAS)
        atol = 16 * np.finfo(float).eps * np.linalg.cond(M) * lr * np.abs(step).max()
        assert atol < 1e-9                               # still far below the step itself
        np.testing.assert_allclose(W1, W - lr * step[:, :-1], rtol=0, atol=atol)
        np.testing.assert_allclose(b1, b - lr * step[:, -1], rtol=0, atol=atol)
