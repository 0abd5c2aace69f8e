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
