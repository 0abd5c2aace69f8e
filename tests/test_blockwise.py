"""BlockInverseFisher against a dense block-diagonal float64 oracle."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

import mfac_linalg as ml
from mfac_linalg.blockwise import block_layout

from battery import check_operator
from oracles import EPS64, cond, float64_tol, gradients, rel_err


def dense_blocks(G, lam, bounds):
    m, d = G.shape
    F = np.zeros((d, d))
    for a, b in zip(bounds[:-1], bounds[1:]):
        F[a:b, a:b] = lam * np.eye(b - a) + G[:, a:b].T @ G[:, a:b] / m
    return F


@given(st.integers(1, 30), st.integers(1, 60), st.integers(1, 70),
       st.sampled_from(["normal", "duplicate", "zero", "spread"]), st.floats(-6, 1),
       st.booleans(), st.integers(0, 2**31))
def test_block_operator_matches_dense(m, d, bs, kind, log_ratio, layered, seed):
    rng = np.random.default_rng(seed)
    G = gradients(rng, m, d, kind)
    lam = 10.0 ** log_ratio * max(1.0, float((G * G).sum() / m / max(d, 1)))
    layers = None
    if layered and d > 1:
        cuts = np.sort(rng.choice(np.arange(1, d), size=min(3, d - 1), replace=False))
        layers = np.diff(np.r_[0, cuts, d]).tolist()
    op = ml.BlockInverseFisher(G, lam, block_size=bs, blocks=layers)
    bounds = op.bounds
    F = dense_blocks(G, lam, bounds)
    check_operator(op, np.linalg.inv(F), float64_tol(cond(F)), rng,
                   logdet=np.linalg.slogdet(F)[1], forward=F, forward_tol=forward_tol(F))
    # the layout: blocks never cross a layer, none larger than bs
    assert np.diff(bounds).max() <= bs
    if layers:
        assert set(np.cumsum(layers)).issubset(set(bounds.tolist()))


@pytest.mark.parametrize("m,d,bs", [(5, 37, 8), (40, 37, 8), (3, 10, 1), (6, 10, 10), (64, 300, 128)])
def test_block_cases_on_backend(backend, m, d, bs, rng):
    """d not a multiple of B, m < B and m > B, B = 1, B = d, on each backend."""
    G = rng.standard_normal((m, d))
    op = ml.BlockInverseFisher(backend.xp.asarray(G), 0.2, block_size=bs)
    F = dense_blocks(G, 0.2, op.bounds)
    check_operator(op, np.linalg.inv(F), float64_tol(cond(F)), rng,
                   logdet=np.linalg.slogdet(F)[1], forward=F, forward_tol=1e-12)


def test_block_and_block_of(rng):
    G = rng.standard_normal((4, 20))
    op = ml.BlockInverseFisher(G, 0.3, block_size=6, blocks=[8, 12])
    assert op.bounds.tolist() == [0, 6, 8, 14, 20]
    F = dense_blocks(G, 0.3, op.bounds)
    H = np.linalg.inv(F)
    for k, (a, b) in enumerate(zip(op.bounds[:-1], op.bounds[1:])):
        assert rel_err(op.block(k), H[a:b, a:b]) < 1e-12
        assert op.block_of(a) == k and op.block_of(b - 1) == k
    assert op.block_of(-1) == 3
    with pytest.raises(IndexError, match=r"k must be in \[-4, 4\)"):
        op.block(4)


def test_single_block_equals_static(rng):
    G = rng.standard_normal((7, 30))
    a = ml.BlockInverseFisher(G, 0.1)
    b = ml.StaticInverseFisher(G, 0.1)
    assert a.num_blocks == 1
    assert rel_err(a.todense(), b.todense()) < 1e-12


def test_layout_errors():
    with pytest.raises(ValueError, match="blocks must sum to 10; got sum 9"):
        block_layout(10, 4, [4, 5])
    with pytest.raises(ValueError, match="block_size must be >= 1; got 0"):
        block_layout(10, 0)
    with pytest.raises(TypeError, match="block_size must be an integer; got float"):
        block_layout(10, 2.5)
    with pytest.raises(ValueError, match=r"blocks\[0\] must be >= 1; got 0"):
        block_layout(10, 4, [0, 10])
    # issue 11 item 8: float layer sizes are refused, never truncated
    with pytest.raises(TypeError, match=r"blocks\[0\] must be an integer; got float 12.9"):
        block_layout(21, 4, [12.9, 8.2])
    with pytest.raises(TypeError, match="blocks must be a sequence"):
        block_layout(10, 4, "10")


def test_setup_is_batched_not_a_loop_over_blocks(rng, monkeypatch):
    """Thousands of blocks: the number of batched factorizations is the number of sizes."""
    G = rng.standard_normal((8, 10_001))
    from mfac_linalg import _lowrank
    calls = []
    orig = _lowrank._cholesky
    monkeypatch.setattr(_lowrank, "_cholesky", lambda a, be: calls.append(a.shape) or orig(a, be))
    op = ml.BlockInverseFisher(G, 0.1, block_size=16)
    assert op.num_blocks == 626
    # one block of 1 (m >= b: primal 1 x 1) and 625 of 16 (Woodbury, 8 x 8): two batches
    assert sorted(calls) == [(1, 1, 1), (625, 8, 8)]


def forward_tol(F):
    """The forward product through the factors (and the dense oracle F @ X itself)
    rounds G^T G X at eps ||G^T G|| ||X||: relative to ||F X|| >= lambda_min ||X|| that
    is a few eps * cond(F) when X reaches the gradients' null space."""
    return 1e-12 + 16 * EPS64 * cond(F)



def test_rank_deficient_blocks_small_damping_match_exact_reference():
    # issue 11 item 12 for blocks: m >= b in every block but the gradients span only 4
    # directions; lambda = 1e-8.  Each block takes the dual form and is exact to ~eps.
    import mpmath as mp
    rng = np.random.default_rng(7)
    m, d, bs, lam = 30, 24, 8, 1e-8
    G = rng.standard_normal((m, 4)) @ rng.standard_normal((4, d))
    op = ml.BlockInverseFisher(G, lam, block_size=bs)
    assert all(not grp.primal for grp in op._groups)
    x = rng.standard_normal(d)
    y = op.matvec(x)
    ref = np.empty(d)
    with mp.workdps(60):
        for a in range(0, d, bs):
            Gk = mp.matrix(G[:, a:a + bs].tolist())
            Fk = Gk.T * Gk / m + mp.mpf(lam) * mp.eye(bs)
            sol = mp.lu_solve(Fk, mp.matrix(x[a:a + bs].tolist()))
            ref[a:a + bs] = [float(v) for v in sol]
    assert rel_err(y, ref) < 1e-12
    # a full-rank layer beside it keeps the primal form: blocks of one size, two stacks
    G2 = np.hstack([G, rng.standard_normal((m, 8))])
    op2 = ml.BlockInverseFisher(G2, lam, block_size=bs)
    assert sorted(grp.primal for grp in op2._groups) == [False, True]
    assert rel_err(op2.matvec(np.r_[x, np.zeros(8)])[:d], ref) < 1e-12
