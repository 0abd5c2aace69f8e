"""The host fast paths of _lowrank: threaded column norms, and the caller's buffer reused."""
import numpy as np
import pytest

from mfac_linalg import _backend as B
from mfac_linalg import _lowrank as LR


@pytest.fixture
def host():
    return B.asarray(np.zeros(1), "x")[1]


@pytest.mark.parametrize("shape", [(7, 1001), (3, 5, 37), (1, 9, 2000), (40, 2, 3)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_row_sumsq_threaded_is_bitwise_einsum(monkeypatch, host, shape, dtype):
    V = np.random.default_rng(1).standard_normal(shape).astype(dtype)
    spec = "ij,ij->j" if V.ndim == 2 else "nij,nij->nj"
    ref = np.einsum(spec, V, V)
    monkeypatch.setattr(LR, "PARALLEL_MIN", 1)         # force the threaded path
    monkeypatch.setattr(LR, "host_threads", lambda: 3)
    out = LR.row_sumsq(V, host)
    assert out.dtype == dtype and out.shape == ref.shape
    assert np.array_equal(out, ref)
    # and against float64 sums
    V64 = V.astype(np.float64)
    assert np.max(np.abs(out - np.einsum(spec, V64, V64)) / np.einsum(spec, V64, V64)) \
        <= 4 * shape[-2] * np.finfo(dtype).eps


def test_row_sumsq_large_default_path(host):
    V = np.random.default_rng(2).standard_normal((8, LR.PARALLEL_MIN // 4), dtype=np.float32)
    assert np.array_equal(LR.row_sumsq(V, host), np.einsum("ij,ij->j", V, V))
