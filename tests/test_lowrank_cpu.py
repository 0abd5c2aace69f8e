"""The host fast paths of _lowrank: threaded column norms, and the caller's buffer reused."""
import numpy as np
import pytest

from mfac_linalg import _backend as B
from mfac_linalg import _lowrank as LR


@pytest.fixture
def host():
    return B.asarray(np.zeros(1), "x")[1]


@pytest.fixture
def no_numba(monkeypatch):
    """The NumPy (einsum) path, with Numba installed or not."""
    monkeypatch.setenv("MFAC_LINALG_NUMBA", "0")


@pytest.mark.parametrize("shape", [(7, 1001), (3, 5, 37), (1, 9, 2000), (40, 2, 3), (2, 3, 50)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_row_sumsq_threaded_is_bitwise_einsum(monkeypatch, no_numba, host, shape, dtype):
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
    # alpha + beta * sums, scaled by each thread in place: the same values as after the pass
    alpha, beta = dtype(0.25), dtype(-1.5)
    want = ref * beta
    want += alpha
    for path_min in (1, 1 << 40):                      # threaded, and one einsum
        monkeypatch.setattr(LR, "PARALLEL_MIN", path_min)
        assert np.array_equal(LR.row_sumsq(V, host, alpha, beta), want)


def test_row_sumsq_default_threads(monkeypatch, no_numba, host):
    monkeypatch.setattr(LR, "PARALLEL_MIN", 1 << 16)     # the machine's own thread count
    V = np.random.default_rng(2).standard_normal((8, 1 << 15), dtype=np.float32)
    assert np.array_equal(LR.row_sumsq(V, host), np.einsum("ij,ij->j", V, V))
    V3 = V.reshape(64, 8, 512)
    assert np.array_equal(LR.row_sumsq(V3, host), np.einsum("nij,nij->nj", V3, V3))


# -- overwrite_grads=True: the caller's buffer holds V ----------------------------------
import pickle  # noqa: E402

import mfac_linalg as ml  # noqa: E402
from mfac_linalg import NotPositiveDefinite  # noqa: E402


def _grads(m, d, dtype, seed=0):
    return np.random.default_rng(seed).standard_normal((m, d)).astype(dtype)


def _same_operator(a, b, d, dtype):
    x = np.random.default_rng(5).standard_normal((d, 3)).astype(dtype)
    assert np.array_equal(a @ x, b @ x)
    assert np.array_equal(a.diagonal(), b.diagonal())
    # (a sum over stacks: the block operator may group them differently)
    assert abs(a.logdet() - b.logdet()) <= 1e-14 * abs(b.logdet())
    assert np.array_equal(a.fisher() @ x, b.fisher() @ x)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("m,d", [(6, 50), (30, 20)])
def test_static_overwrite_same_operator(dtype, m, d):
    G = _grads(m, d, dtype)
    ref = ml.StaticInverseFisher(G, 1e-2)
    G2 = G.copy()
    op = ml.StaticInverseFisher(G2, 1e-2, overwrite_grads=True)
    _same_operator(op, ref, d, dtype)
    if m < d:       # V lives in the caller's buffer, now read-only
        assert not G2.flags.writeable
        (_, _, _, V), = op.lowrank_batches()
        assert np.shares_memory(V, G2) and np.array_equal(V[0], G2)
    else:           # V is d x d: grads only read
        assert G2.flags.writeable and np.array_equal(G2, G)
    op2 = pickle.loads(pickle.dumps(op))
    _same_operator(op2, ref, d, dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kw", [dict(block_size=16),                  # uniform, last block 4
                                dict(block_size=16, blocks=[40, 40]),  # runs per layer
                                dict(block_size=8, blocks=[30, 50]),   # m >= b blocks too
                                dict()])                               # one block
def test_block_overwrite_same_operator(dtype, kw):
    m, d = 6, 80
    G = _grads(m, d, dtype)
    ref = ml.BlockInverseFisher(G, 1e-2, **kw)
    G2 = G.copy()
    op = ml.BlockInverseFisher(G2, 1e-2, overwrite_grads=True, **kw)
    assert op.num_blocks == ref.num_blocks
    _same_operator(op, ref, d, dtype)
    for k in range(op.num_blocks):
        assert np.allclose(op.block(k), ref.block(k), rtol=0, atol=1e-12 if dtype == np.float64
                           else 1e-4)
    assert not G2.flags.writeable
    F = 1e-2 * np.eye(d) + 0 * G.T @ G
    for k, (s, e) in enumerate(zip(op.bounds[:-1], op.bounds[1:])):
        Gk = G[:, s:e].astype(np.float64)
        F[s:e, s:e] += Gk.T @ Gk / m
    x = np.random.default_rng(3).standard_normal(d)
    Fi_x = np.zeros(d)
    for s, e in zip(op.bounds[:-1], op.bounds[1:]):
        Fi_x[s:e] = np.linalg.solve(F[s:e, s:e], x[s:e])
    tol = 1e-10 if dtype == np.float64 else 1e-3
    assert np.linalg.norm(op @ x.astype(dtype) - Fi_x) <= tol * np.linalg.norm(Fi_x)


@pytest.mark.parametrize("cls", [ml.StaticInverseFisher, ml.BlockInverseFisher])
def test_overwrite_refuses_what_it_cannot_reuse(cls):
    G = _grads(4, 20, np.float64)
    ro = G.copy()
    ro.flags.writeable = False
    for bad, msg in [(ro, "read-only"), (np.asfortranarray(G), "non-contiguous"),
                     (G[:, ::2], "non-contiguous"), (G.astype(np.int64), "dtype int64")]:
        with pytest.raises(ValueError, match=f"grads cannot be reused.*{msg}"):
            cls(bad, 0.1, overwrite_grads=True)
    with pytest.raises(TypeError, match="grads cannot be reused"):
        cls(G.tolist(), 0.1, overwrite_grads=True)
    with pytest.raises(TypeError, match="overwrite_grads"):
        cls(G, 0.1, overwrite_grads="yes")
    assert G.flags.writeable


def test_block_overwrite_failure_leaves_grads_unchanged(monkeypatch):
    G = _grads(6, 80, np.float32)
    G0 = G.copy()
    calls = {"n": 0}
    real = LR._cholesky

    def flaky(C, backend):      # the second stack's factor fails
        calls["n"] += 1
        return None if calls["n"] >= 2 else real(C, backend)

    monkeypatch.setattr(LR, "_cholesky", flaky)
    with pytest.raises(NotPositiveDefinite):
        ml.BlockInverseFisher(G, 1e-2, block_size=16, blocks=[40, 40], overwrite_grads=True)
    assert np.array_equal(G, G0) and G.flags.writeable


@pytest.mark.parametrize("nb", [2, 5, 7])
def test_chunked_set_up_is_bitwise_one_batch(monkeypatch, nb):
    """The host set-up in chunks of blocks (bounded temporaries) gives the very factors
    of one batched call, also where a chunk of one block would be left over."""
    G = _grads(5, 12 * nb, np.float32, seed=nb)
    ref = ml.BlockInverseFisher(G, 1e-2, block_size=12)
    monkeypatch.setattr(LR, "INPLACE_CHUNK", 2 * 5 * 12)    # two blocks a chunk
    op = ml.BlockInverseFisher(G, 1e-2, block_size=12)
    (_, _, _, V0), = ref.lowrank_batches()
    (_, _, _, V1), = op.lowrank_batches()
    assert np.array_equal(V0, V1)
    _same_operator(op, ref, 12 * nb, np.float32)


@pytest.mark.parametrize("r", [6, 20])
def test_inv_lower_host_blocks(host, r):
    """The host's triangular inverse (LAPACK trtri block by block from r = 16, a batched
    solve below): L^{-1} of every block to rounding, the strict upper triangle exactly
    zero, a zero pivot refused."""
    rng = np.random.default_rng(9)
    X = rng.standard_normal((5, r, r + 3))
    L = np.linalg.cholesky(X @ np.swapaxes(X, 1, 2) + 0.1 * np.eye(r))
    Li = LR._inv_lower(L, host)
    assert Li.shape == L.shape and Li.dtype == np.float64
    assert np.max(np.abs(Li @ L - np.eye(r))) < 1e-11
    assert np.array_equal(np.triu(Li, 1), np.zeros_like(Li))
    L[3, 2, 2] = 0.0
    with pytest.raises(np.linalg.LinAlgError, match="block 3" if r >= 16 else "Singular"):
        LR._inv_lower(L, host)
