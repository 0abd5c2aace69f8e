"""Optimal Brain Surgeon against dense KKT solves."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

import mfac_linalg as ml
from mfac_linalg import obs

from oracles import rel_err


def dense_F(op, G, lam):
    bounds = op.bounds if hasattr(op, "bounds") else np.array([0, G.shape[1]])
    m, d = G.shape
    F = np.zeros((d, d))
    for a, b in zip(bounds[:-1], bounds[1:]):
        F[a:b, a:b] = lam * np.eye(b - a) + G[:, a:b].T @ G[:, a:b] / m
    return F


def kkt(F, w, Q):
    """min 1/2 dw^T F dw s.t. dw_Q = -w_Q, by the full KKT system."""
    d = len(w)
    q = len(Q)
    E = np.zeros((d, q))
    E[Q, np.arange(q)] = 1
    K = np.block([[F, E], [E.T, np.zeros((q, q))]])
    sol = np.linalg.solve(K, np.r_[np.zeros(d), -w[Q]])
    dw = sol[:d]
    return dw, 0.5 * dw @ F @ dw


def make_ops(G, lam):
    return [ml.StaticInverseFisher(G, lam), ml.BlockInverseFisher(G, lam, block_size=8),
            ml.BlockInverseFisher(G, lam, block_size=16, blocks=[12, 20])]


@given(st.integers(1, 25), st.integers(0, 2**31), st.floats(0.05, 0.95),
       st.sampled_from([0, 1, 2]))
def test_joint_is_the_kkt_solution_and_beats_independent(m, seed, sparsity, which):
    rng = np.random.default_rng(seed)
    d, lam = 32, 0.05
    G = rng.standard_normal((m, d))
    op = make_ops(G, lam)[which]
    F = dense_F(op, G, lam)
    w = rng.standard_normal(d)
    rj = obs.prune(w, op, sparsity=sparsity, method="joint")
    ri = obs.prune(w, op, sparsity=sparsity, method="independent")
    Q = np.flatnonzero(rj.mask)
    assert np.array_equal(rj.mask, ri.mask)            # same set, like for like
    assert np.all(rj.weights[Q] == 0) and np.all(ri.weights[Q] == 0)
    dw_ref, loss_ref = kkt(F, w, Q)
    dw = rj.weights - w
    assert rel_err(dw, dw_ref) < 1e-8
    assert abs(rj.loss - loss_ref) <= 1e-9 * max(1, loss_ref)
    assert abs(rj.loss - 0.5 * dw @ F @ dw) <= 1e-9 * max(1, loss_ref)
    dwi = ri.weights - w
    assert abs(ri.loss - 0.5 * dwi @ F @ dwi) <= 1e-9 * max(1, ri.loss)
    assert rj.loss <= ri.loss * (1 + 1e-9) + 1e-12


def test_saliency_and_single_weight_agree(rng):
    d, lam = 20, 0.1
    G = rng.standard_normal((6, d))
    op = ml.StaticInverseFisher(G, lam)
    H = np.linalg.inv(dense_F(op, G, lam))
    w = rng.standard_normal(d)
    rho = obs.saliency(w, op)
    assert rel_err(rho, w ** 2 / (2 * np.diag(H))) < 1e-12
    assert rel_err(obs.saliency(w, H), rho) < 1e-12      # dense H as the operator
    q = int(np.argmin(rho))
    for method in ("joint", "independent"):
        r = obs.prune(w, op, count=1, method=method)
        assert np.flatnonzero(r.mask).tolist() == [q]
        expected = w - (w[q] / H[q, q]) * H[:, q]
        assert rel_err(r.weights, np.where(r.mask, 0, expected)) < 1e-10
        assert abs(r.loss - rho[q]) < 1e-10 * rho[q]


def test_magnitude_baseline_and_ordering(rng):
    d, lam = 24, 0.05
    G = rng.standard_normal((30, d)) * np.logspace(0, 1, d)
    op = ml.BlockInverseFisher(G, lam, block_size=8)
    w = rng.standard_normal(d)
    rm = obs.prune(w, op, sparsity=0.5, method="magnitude")
    Q = np.flatnonzero(rm.mask)
    assert set(Q) == set(np.argsort(np.abs(w))[:12])
    assert np.array_equal(rm.weights, np.where(rm.mask, 0, w))
    F = dense_F(op, G, lam)
    assert abs(rm.loss - 0.5 * w[Q] @ F[np.ix_(Q, Q)] @ w[Q]) < 1e-10 * rm.loss


def test_mask_stays_zero_and_is_excluded(rng):
    d, lam = 16, 0.1
    G = rng.standard_normal((5, d))
    op = ml.StaticInverseFisher(G, lam)
    F = dense_F(op, G, lam)
    w = rng.standard_normal(d)
    mask = np.zeros(d, bool)
    mask[[1, 5]] = True
    for method in ("joint", "independent", "magnitude"):
        r = obs.prune(w, op, count=6, mask=mask, method=method)
        assert r.mask.sum() == 6 and r.mask[[1, 5]].all()
        assert np.all(r.weights[r.mask] == 0)
    # joint with a mask: the KKT solution keeping the masked weights at zero
    r = obs.prune(w, op, count=6, mask=mask, method="joint")
    w0 = np.where(mask, 0, w)
    dw_ref, _ = kkt(F, w0, np.flatnonzero(r.mask))
    assert rel_err(r.weights - w0, dw_ref) < 1e-8


def test_group_saliency_and_group_prune_vs_dense(rng):
    d, lam, g = 32, 0.1, 4
    G = rng.standard_normal((10, d))
    op = ml.BlockInverseFisher(G, lam, block_size=8)
    H = np.linalg.inv(dense_F(op, G, lam))
    w = rng.standard_normal(d)
    gs = obs.group_saliency(w, op, group_size=g)
    ref = [0.5 * w[i:i + g] @ np.linalg.solve(H[i:i + g, i:i + g], w[i:i + g])
           for i in range(0, d, g)]
    assert rel_err(gs, ref) < 1e-10
    r = obs.prune(w, op, sparsity=0.5, group_size=g, method="joint")
    removed = r.mask.reshape(-1, g)
    assert np.all(removed.all(axis=1) | ~removed.any(axis=1))       # whole groups
    chosen = np.flatnonzero(removed.all(axis=1))
    assert set(chosen) == set(np.argsort(ref)[:len(chosen)])
    Q = np.flatnonzero(r.mask)
    dw_ref, loss_ref = kkt(dense_F(op, G, lam), w, Q)
    assert rel_err(r.weights - w, dw_ref) < 1e-8 and abs(r.loss - loss_ref) < 1e-9


def test_woodbury_branch_of_joint_for_large_sets(rng):
    """|Q| above the direct limit on the static dual form: Woodbury in m dims."""
    d, lam = 1200, 0.05
    G = rng.standard_normal((12, d))
    op = ml.StaticInverseFisher(G, lam)
    w = rng.standard_normal(d)
    r = obs.prune(w, op, sparsity=0.6, method="joint")
    Q = np.flatnonzero(r.mask)
    H = op.todense()
    t = np.linalg.solve(H[np.ix_(Q, Q)], w[Q])
    assert abs(r.loss - 0.5 * w[Q] @ t) < 1e-8 * r.loss
    assert rel_err(r.weights - w, np.where(r.mask, -w, -(H[:, Q] @ t))) < 1e-8


def test_steps_with_regrad_rebuilds_the_operator(rng):
    d, lam = 24, 0.1
    G = rng.standard_normal((8, d))
    op = ml.BlockInverseFisher(G, lam, block_size=8)
    w = rng.standard_normal(d)
    seen = []

    def regrad(weights, mask):
        seen.append(int(mask.sum()))
        return rng.standard_normal((8, d)) * ~mask          # gradients of remaining weights

    r = obs.prune(w, op, sparsity=0.75, steps=3, regrad=regrad)
    assert seen == [6, 12] and r.mask.sum() == 18
    assert np.all(r.weights[r.mask] == 0)
    r1 = obs.prune(w, op, sparsity=0.75, steps=3)            # without regrad: same operator
    assert r1.mask.sum() == 18


def test_sliding_window_works_with_obs(rng):
    d, lam = 20, 0.2
    win = ml.SlidingWindowInverseFisher(d, 6, lam, dtype="float64")
    Gs = rng.standard_normal((9, d))
    win.update(Gs)
    F = lam * np.eye(d) + Gs[-6:].T @ Gs[-6:] / 6
    w = rng.standard_normal(d)
    r = obs.prune(w, win, sparsity=0.5, method="joint")
    dw_ref, loss_ref = kkt(F, w, np.flatnonzero(r.mask))
    assert rel_err(r.weights - w, dw_ref) < 1e-8 and abs(r.loss - loss_ref) < 1e-9 * loss_ref


def test_obs_bad_input(rng):
    op = ml.StaticInverseFisher(rng.standard_normal((3, 8)), 0.1)
    w = rng.standard_normal(8)
    with pytest.raises(ValueError, match="give exactly one of sparsity= and count="):
        obs.prune(w, op)
    with pytest.raises(ValueError, match="method must be one of"):
        obs.prune(w, op, count=2, method="random")
    with pytest.raises(ValueError, match=r"w must have shape \(8,\)"):
        obs.prune(np.ones(7), op, count=2)
    with pytest.raises(ValueError, match="sparsity must be <= 1.0; got 1.5"):
        obs.prune(w, op, sparsity=1.5)
    with pytest.raises(ValueError, match="group_size=3 must divide"):
        obs.group_saliency(w, op, group_size=3)
    with pytest.raises(ValueError, match="below the 3 weights the mask already removes"):
        obs.prune(w, op, count=2, mask=np.array([1, 1, 1, 0, 0, 0, 0, 0], bool))
    with pytest.raises(TypeError, match="mask must be a boolean array; got dtype float64"):
        obs.prune(w, op, count=2, mask=np.zeros(8))
    with pytest.raises(ValueError, match="w must be finite"):
        obs.saliency(np.full(8, np.nan), op)
    with pytest.raises(TypeError, match="not an inverse-Fisher operator"):
        obs.saliency(w, op.fisher())


@pytest.mark.parametrize("kind", ["static", "block"])
def test_obs_on_backend_matches_cpu(backend, kind, rng):
    """The same pruning on the backend under test as on the CPU (GPU: cupy arrays in and out)."""
    d, lam = 48, 0.05
    G = rng.standard_normal((20, d))
    w = rng.standard_normal(d)
    mk = (lambda A: ml.StaticInverseFisher(A, lam)) if kind == "static" else \
        (lambda A: ml.BlockInverseFisher(A, lam, block_size=16))
    op_cpu, op = mk(G), mk(backend.xp.asarray(G))
    wd = backend.xp.asarray(w)
    for method in ("joint", "independent", "magnitude"):
        a = obs.prune(w, op_cpu, sparsity=0.6, method=method)
        b = obs.prune(wd, op, sparsity=0.6, method=method)
        assert isinstance(b.weights, type(wd))
        assert np.array_equal(B_host(b.mask), a.mask)
        assert rel_err(B_host(b.weights), a.weights) < 1e-10
        assert abs(b.loss - a.loss) < 1e-10 * max(1, a.loss)
    assert rel_err(B_host(obs.group_saliency(wd, op, group_size=4)),
                   obs.group_saliency(w, op_cpu, group_size=4)) < 1e-10
    assert rel_err(B_host(obs.saliency(wd, op)), obs.saliency(w, op_cpu)) < 1e-12


def B_host(a):
    from mfac_linalg import _backend
    return _backend.to_host(a)


# -- issue 11 item 6 ---------------------------------------------------------------------------

def test_joint_prune_on_an_empty_window_removing_many(rng):
    # no gradients: F = lambda I, H = I / lambda; > 512 removals took the Woodbury branch
    # and divided by beta = 0
    d, lam = 1200, 0.5
    win = ml.SlidingWindowInverseFisher(d, 4, lam, dtype="float64")
    w = rng.standard_normal(d)
    r = obs.prune(w, win, count=700, method="joint")
    assert r.mask.sum() == 700 and np.all(r.weights[r.mask] == 0)
    # H diagonal: removing Q changes nothing else; loss = 1/2 lambda ||w_Q||^2
    assert np.array_equal(r.weights[~r.mask], w[~r.mask])
    assert abs(r.loss - 0.5 * lam * (w[r.mask] ** 2).sum()) < 1e-12 * r.loss
    assert set(np.flatnonzero(r.mask)) == set(np.argsort(np.abs(w))[:700])


def test_group_prune_honours_count_exactly(rng):
    d, lam, g = 32, 0.1, 4
    G = rng.standard_normal((10, d))
    op = ml.BlockInverseFisher(G, lam, block_size=8)
    w = rng.standard_normal(d)
    mask = np.zeros(d, bool)
    mask[5] = True                                   # one weight of group 1 pre-masked
    for method in ("joint", "independent", "magnitude"):
        r = obs.prune(w, op, count=8, mask=mask, group_size=g, method=method)
        assert r.mask.sum() == 8 and r.mask[5]
        groups = r.mask.reshape(-1, g)
        assert np.all(groups.all(axis=1) | ~groups.any(axis=1))     # whole groups only
        assert groups[1].all()                       # the partly masked group was completed
        assert np.all(r.weights[r.mask] == 0)
    # the joint update is the KKT solution for the removed set
    r = obs.prune(w, op, count=8, mask=mask, group_size=g, method="joint")
    w0 = np.where(mask, 0, w)
    dw_ref, _ = kkt(dense_F(op, G, lam), w0, np.flatnonzero(r.mask))
    assert rel_err(r.weights - w0, dw_ref) < 1e-8
    # without a mask every count is a multiple of g or refused
    assert obs.prune(w, op, count=12, group_size=g).mask.sum() == 12
    with pytest.raises(ValueError, match="count=6 cannot be reached by removing whole groups"):
        obs.prune(w, op, count=6, group_size=g)
    # staged: the final stage still lands on the count
    assert obs.prune(w, op, count=16, group_size=g, steps=3).mask.sum() == 16


@pytest.mark.parametrize("kw,exc,msg", [
    (dict(sparsity=True), TypeError, "sparsity must be a real number; got bool"),
    (dict(sparsity="0.5"), TypeError, "sparsity must be a real number; got str"),
    (dict(sparsity=float("nan")), ValueError, "sparsity must be a number; got nan"),
    (dict(sparsity=-0.1), ValueError, r"sparsity must be >= 0.0; got -0.1"),
    (dict(count=2.0), TypeError, "count must be an integer; got float"),
    (dict(count=True), TypeError, "count must be an integer; got bool"),
    (dict(count=9), ValueError, "count must be <= 8; got 9"),
    (dict(count=2, steps=1.5), TypeError, "steps must be an integer; got float"),
    (dict(count=2, steps=0), ValueError, "steps must be >= 1; got 0"),
    (dict(count=2, steps=2 ** 70), ValueError, "steps must be <= 8; got 1180591620717411303424"),
    (dict(count=2, group_size=2.0), TypeError, "group_size must be an integer; got float"),
    (dict(count=2, method=1), TypeError, "method must be one of"),
    (dict(count=2, regrad=3), TypeError, "regrad must be callable"),
])
def test_prune_argument_types_and_ranges(rng, kw, exc, msg):
    op = ml.StaticInverseFisher(rng.standard_normal((4, 8)), 0.1)
    w = rng.standard_normal(8)
    w0 = w.copy()
    with pytest.raises(exc, match=msg):
        obs.prune(w, op, **kw)
    assert np.array_equal(w, w0)


@pytest.mark.parametrize("bad,msg", [("nan", "op must be finite"), ("inf", "op must be finite"),
                                     ("zero", "positive diagonal"), ("neg", "positive diagonal"),
                                     ("subnormal", r"diagonal entries >= 5.56e-309")])
def test_dense_H_with_bad_entries_refused(rng, bad, msg):
    G = rng.standard_normal((4, 6))
    H = np.linalg.inv(0.1 * np.eye(6) + G.T @ G / 4)
    H[2, 2] = {"nan": np.nan, "inf": np.inf, "zero": 0.0, "neg": -1.0, "subnormal": 1e-320}[bad]
    w = rng.standard_normal(6)
    for call in (lambda: obs.saliency(w, H), lambda: obs.prune(w, H, count=2),
                 lambda: obs.group_saliency(w, H, group_size=2)):
        with pytest.raises(ValueError, match=msg):
            call()


def test_results_in_the_input_dtype(rng):
    G = rng.standard_normal((6, 16))
    w32 = rng.standard_normal(16).astype(np.float32)
    for op in (ml.StaticInverseFisher(G, 0.1), ml.StaticInverseFisher(G.astype(np.float32), 0.1),
               np.linalg.inv(0.1 * np.eye(16) + G.T @ G / 6)):
        assert obs.saliency(w32, op).dtype == np.float32
        assert obs.group_saliency(w32, op, group_size=4).dtype == np.float32
        for method in ("joint", "independent", "magnitude"):
            r = obs.prune(w32, op, sparsity=0.5, method=method)
            assert r.weights.dtype == np.float32 and isinstance(r.loss, float)
            r64 = obs.prune(w32.astype(np.float64), op, sparsity=0.5, method=method)
            assert r64.weights.dtype == np.float64
            assert np.array_equal(r.mask, r64.mask)
            assert rel_err(r.weights, r64.weights) < 1e-6


def test_prune_never_returns_nonfinite_weights(rng):
    """A dense H = 1e-320 I gave NaN weights and a NaN loss with no error (1/H_qq
    overflows; now refused by name); float32 weights whose update overflows float32 are
    refused instead of coming back as inf; w is untouched."""
    w = rng.standard_normal(6)
    w0 = w.copy()
    for method in ("joint", "independent", "magnitude"):
        with pytest.raises(ValueError, match="op .*diagonal entries >= "):
            obs.prune(w, 1e-320 * np.eye(6), count=2, method=method)
    # H with strong positive coupling: removing w_1 moves w_0 by -0.999 * (-3e38)
    H = np.eye(4)
    H[0, 1] = H[1, 0] = 0.999
    w32 = np.array([3e38, -2e38, 3e38, 3e38], np.float32)      # w_1: the least salient
    w32c = w32.copy()
    r = obs.prune(w32.astype(np.float64), H, count=1, method="joint")
    assert r.mask.tolist() == [False, True, False, False]
    assert np.isfinite(r.weights).all() and r.weights[0] > 3.5e38   # beyond float32's max
    with pytest.raises(ValueError, match=r"pruned weights \(float32\) or the predicted loss "
                       "overflowed"):
        obs.prune(w32, H, count=1, method="joint")
    assert np.array_equal(w32, w32c) and np.array_equal(w, w0)


def test_regrad_returning_the_wrong_width_is_named(rng):
    G = rng.standard_normal((4, 8))
    op = ml.StaticInverseFisher(G, 0.1)
    w = rng.standard_normal(8)
    with pytest.raises(ValueError, match=r"regrad\(weights, mask\) must return grads of shape "
                       r"\(m, 8\); got shape \(4, 5\)"):
        obs.prune(w, op, count=4, steps=2, regrad=lambda w_, m_: G[:, :5])


def test_overflowing_saliencies_neither_tie_with_pruned_weights_nor_pass_silently():
    """Saliencies w^2 / (2 H_qq) that overflow to inf tied with the inf placeholder of
    the already-pruned weights, and count= took pruned ones (4 removed for 5); the loss
    then overflows, which is refused by name (it came back as inf with RuntimeWarnings)."""
    import warnings
    from mfac_linalg.obs import _select
    sel = _select(np.array([np.inf, np.inf, 1.0, np.inf]),
                  np.array([True, False, True, True]), 3, np)
    assert sel.tolist() == [True, False, True, True]
    H = 1e-300 * np.eye(6)
    w = np.array([1e5, 1e5, 1e5, 1e5, 1.0, 1e5])
    mask = np.array([True, True, True, False, False, False])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for method in ("joint", "independent", "magnitude"):
            with pytest.raises(ValueError, match="too badly scaled"):
                ml.obs.prune(w, H, count=5, mask=mask, method=method)


def test_group_counts_reachable_by_some_choice_of_whole_groups_are_reached():
    """Free sizes 3, 2, 2 (partly masked groups of 4): 4 more weights are reachable (2 + 2)
    although the lowest-scored group frees 3; the greedy fill refused count=9 ("3
    reachable") and sparsity=0.75 stopped at 8."""
    import itertools
    from mfac_linalg.obs import _reachable
    w = np.array([.01, .01, .01, 0, 5, 5, 0, 0, 6, 6, 0, 0])
    mask = np.array([0, 0, 0, 1, 0, 0, 1, 1, 0, 0, 1, 1], bool)
    r = ml.obs.prune(w, np.eye(12), count=9, mask=mask, group_size=4)
    assert r.mask.sum() == 9 and r.mask[4:].all() and not r.mask[:3].any()
    assert ml.obs.prune(w, np.eye(12), sparsity=0.75, mask=mask, group_size=4).mask.sum() == 9
    with pytest.raises(ValueError, match="at most 3 reachable"):
        ml.obs.prune(np.arange(1.0, 9.0), np.eye(8), count=6,
                     mask=np.array([0, 0, 0, 1, 0, 0, 0, 1], bool), group_size=4)
    rng = np.random.default_rng(0)
    for _ in range(300):                                   # the subset sum against brute force
        sizes = rng.integers(1, 5, size=int(rng.integers(1, 7)))
        target = int(rng.integers(0, sizes.sum() + 3))
        sums = {int(sizes[list(c)].sum()) for k in range(len(sizes) + 1)
                for c in itertools.combinations(range(len(sizes)), k)}
        best, used = _reachable(sizes, target)
        assert best == max(t for t in sums if t <= target)
        assert sum(s * k for s, k in used.items()) == best
