"""Fuzz round six: Optimal Brain Surgeon (mfac_linalg.obs) and the block-diagonal
WoodFisher operator against float64 / mpmath oracles, with awkward inputs.

Tolerances: an inverse Fisher held as alpha I + beta V^T V is accurate to a small
multiple of eps * kappa_W (kappa_W = lambda_max(F) / lambda, docs/math.md §1, the
oracle's ``kappa``); OBS quantities are built from its diagonal and its blocks, so they
inherit that relative error, plus the rounding of results to the dtype of ``w``.
"""
import warnings

import numpy as np
import pytest
from hypothesis import given, strategies as st

import mfac_linalg as ml
from mfac_linalg import obs
from mfac_linalg.testing import block_diag_oracle, check_operator, inverse_fisher_oracle

from oracles import gradients

EPS64 = np.finfo(np.float64).eps


def exact_inverse_blocks(G, lam, bounds):
    """The exact (mpmath-refined) dense block-diagonal F^-1 and the largest block kappa_W."""
    G = np.asarray(G, dtype=np.float64)
    d = G.shape[1]
    H = np.zeros((d, d))
    kappa = 1.0
    for a, b in zip(bounds[:-1], bounds[1:]):
        o = inverse_fisher_oracle(G[:, a:b], lam)
        H[a:b, a:b] = o.dense()
        kappa = max(kappa, o.kappa)
    return H, kappa


def joint_reference(H, w, Q):
    """dw = -H E_Q (H_QQ)^-1 w_Q and 1/2 w_Q^T (H_QQ)^-1 w_Q (one step of refinement)."""
    if len(Q) == 0:
        return np.zeros_like(w), 0.0
    HQQ = H[np.ix_(Q, Q)]
    t = np.linalg.solve(HQQ, w[Q])
    t += np.linalg.solve(HQQ, w[Q] - HQQ @ t)
    return -(H[:, Q] @ t), 0.5 * w[Q] @ t


def _make(kind, G, lam, bs, rng):
    """(operator or dense H, block bounds, the gradients F is built from (window: with its
    empty slots as zero rows))."""
    m, d = G.shape
    if kind == "static":
        return ml.StaticInverseFisher(G, lam), np.array([0, d]), G
    if kind == "block":
        op = ml.BlockInverseFisher(G, lam, block_size=bs)
        return op, op.bounds, G
    if kind == "window":
        slots = m + int(rng.integers(0, 3))
        op = ml.SlidingWindowInverseFisher(d, slots, lam, dtype=G.dtype.name)
        op.update(G)
        return op, np.array([0, d]), np.vstack([G, np.zeros((slots - m, d), G.dtype)])
    return None, np.array([0, d]), G                    # dense H, filled in by the caller


# -- OBS against the oracle ---------------------------------------------------------------

@given(st.integers(0, 2**32 - 1), st.sampled_from(["static", "block", "window", "dense"]),
       st.sampled_from(["joint", "independent", "magnitude"]),
       st.sampled_from([np.float64, np.float32]), st.sampled_from([np.float64, np.float32]))
def test_obs_matches_the_exact_oracle(seed, kind, method, op_dtype, w_dtype):
    """saliency, group_saliency and one-stage prune (with and without a mask) against the
    exact inverse: m > d, m = 1, duplicate/zero/low-rank gradients, ties and zeros in w."""
    rng = np.random.default_rng(seed)
    m, d = int(rng.choice([1, 2, 3, 5, 13])), int(rng.integers(1, 13))
    G = gradients(rng, m, d, str(rng.choice(["normal", "duplicate", "zero", "lowrank"])))
    top = float((G ** 2).sum(axis=1).max()) / m
    lam = 10.0 ** rng.uniform(-3, 3) * (top if top > 0 else 1.0)
    if kind == "dense":
        op_dtype = np.float64
    Gs = G.astype(op_dtype)
    lam = float(op_dtype(lam))
    op, bounds, Gf = _make(kind, Gs, lam, int(rng.integers(1, d + 2)), rng)
    H, kappa = exact_inverse_blocks(Gf, lam, bounds if kind == "block" else [0, d])
    if op is None:
        op = H.copy()
    w = rng.standard_normal(d)
    w[rng.random(d) < 0.2] = 0.0
    if rng.random() < 0.3:
        w = np.round(w)                                  # ties
    w = w.astype(w_dtype)
    w64, w0 = w.astype(np.float64), w.copy()
    eps_op, eps_w = np.finfo(op_dtype).eps, np.finfo(w_dtype).eps
    tol = 64 * (eps_op * kappa + eps_w)
    # saliency: relative, entry by entry (H_qq >= 1/lambda_max: the bound is relative)
    rho = obs.saliency(w, op)
    assert rho.dtype == w_dtype
    ref = w64 ** 2 / (2 * np.diag(H))
    assert np.all(np.abs(rho - ref) <= tol * ref)
    # group saliency where the group size divides every block
    g = int(rng.choice([1, 2, 3]))
    if all((b - a) % g == 0 for a, b in zip(bounds[:-1], bounds[1:])):
        gs = obs.group_saliency(w, op, group_size=g)
        gref = np.array([0.5 * w64[i:i + g] @ np.linalg.solve(H[i:i + g, i:i + g], w64[i:i + g])
                         for i in range(0, d, g)])
        assert gs.dtype == w_dtype
        assert np.all(np.abs(gs - gref) <= g * tol * gref + 1e-300)
    # prune
    mask = rng.random(d) < 0.25 if rng.random() < 0.5 else None
    mask0 = None if mask is None else mask.copy()
    already = 0 if mask is None else int(mask.sum())
    count = int(rng.integers(already, d + 1))
    r = obs.prune(w, op, count=count, method=method, mask=mask)
    assert np.array_equal(w, w0) and (mask is None or np.array_equal(mask, mask0))
    assert r.weights.dtype == w_dtype and int(r.mask.sum()) == count
    assert np.all(r.weights[r.mask] == 0)
    start = w64.copy()
    elig = np.ones(d, bool)
    if mask is not None:
        assert r.mask[mask].all()
        start[mask] = 0.0
        elig = ~mask
    new = r.mask & elig
    score = np.abs(start) if method == "magnitude" else start ** 2 / (2 * np.diag(H))
    if new.any() and (elig & ~new).any():                # the smallest scores were taken
        assert score[new].max() <= score[elig & ~new].min() * (1 + tol)
    Q = np.flatnonzero(r.mask)
    if method == "joint":
        dw, loss = joint_reference(H, start, Q)
        wref = start + dw
    else:
        s = np.where(new, start / np.diag(H), 0.0) if method == "independent" else 0 * start
        wref = start - H @ s
        wref[Q] = 0.0
        delta = wref - start
        loss = 0.5 * delta @ np.linalg.solve(H, delta)
    wref[Q] = 0.0
    scale = max(np.linalg.norm(start), 1e-300)
    assert np.linalg.norm(r.weights - wref) <= tol * scale
    # the loss: relative to the part of 1/2 ||w_Q||^2 lambda_max(F) that could be lost
    lmax = 1.0 / np.linalg.eigvalsh(H)[0]
    assert abs(r.loss - loss) <= tol * (loss + 0.5 * np.sum(start[Q] ** 2) * lmax * eps_op)


# -- defects found in this round (each failed before its fix) -----------------------------

def test_fisher_loss_of_a_float32_operator_for_float64_weights_beyond_float32():
    """independent/magnitude losses went through op.fisher().quad(delta cast to float32):
    weights of 1e50 overflowed the cast ("x must be finite; got NaN or infinity", an
    argument prune does not have) and weights of 1e-50 underflowed it (loss 0)."""
    rng = np.random.default_rng(0)
    G = rng.standard_normal((5, 12)).astype(np.float32)
    op = ml.BlockInverseFisher(G, 0.5, block_size=4)
    F = np.zeros((12, 12))
    for a in range(0, 12, 4):
        Gk = G[:, a:a + 4].astype(np.float64)
        F[a:a + 4, a:a + 4] = 0.5 * np.eye(4) + Gk.T @ Gk / 5
    w = rng.standard_normal(12)
    for scale in (1e50, 1e-50, 1.0):
        for method in ("independent", "magnitude"):
            r = obs.prune(w * scale, op, count=5, method=method)
            delta = r.weights - w * scale
            ref = 0.5 * delta @ F @ delta
            assert ref > 0 and abs(r.loss - ref) <= 1e-5 * ref


def test_saliencies_without_intermediate_overflow_and_named_overflow():
    """w_q^2 overflowed for |w| ~ 1e160 although w^2/(2 H_qq) ~ 1e220 is in range: a
    RuntimeWarning and inf saliencies, and prune's selection tied every weight at inf and
    took the first ones.  Saliencies truly beyond the dtype of w are a ValueError."""
    H = 1e100 * np.eye(4)
    w = np.array([1e160, 3e160, 2e160, 5e155])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rho = obs.saliency(w, H)
        np.testing.assert_allclose(rho, [5e219, 4.5e220, 2e220, 1.25e211], rtol=1e-14)
        for method in ("joint", "independent"):
            assert obs.prune(w, H, count=2, method=method).mask.tolist() == \
                [True, False, False, True]
        with pytest.raises(ValueError, match=r"saliencies overflow float64 \(the dtype of w\)"):
            obs.saliency(np.full(4, 1e200), np.eye(4))
        with pytest.raises(ValueError, match=r"saliencies overflow float32"):
            obs.saliency(np.full(4, 1e30, np.float32), np.eye(4))
        with pytest.raises(ValueError, match=r"saliencies overflow float32"):
            obs.group_saliency(np.full(4, 1e30, np.float32), np.eye(4), group_size=2)
        # a tiny group: scaled before the solve, no underflow to 0
        gs = obs.group_saliency(np.full(4, 1e-170), 1e-20 * np.eye(4), group_size=2)
        np.testing.assert_allclose(gs, [1e-320, 1e-320], rtol=1e-3)


@pytest.mark.parametrize("H,what", [
    (np.ones((4, 4)), "singular"),
    (np.array([[1, 2, 0, 0], [2, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]]), "indefinite"),
])
def test_dense_H_that_is_not_positive_definite_is_refused_by_name(H, what):
    """A singular dense H gave NumPy's bare "Singular matrix"; an indefinite one (positive
    diagonal) a meaningless update with a negative predicted loss (-1 for w = [1, -1, ..])."""
    w = np.array([1.0, -1.0, 3.0, 4.0])
    msg = r"op \(a dense inverse Fisher H = F\^-1\) must be symmetric positive definite"
    for call in (lambda: obs.prune(w, H, count=2, method="joint"),
                 lambda: obs.prune(w, H, count=2, method="independent"),
                 lambda: obs.prune(w, H, count=2, method="magnitude"),
                 lambda: obs.group_saliency(w, H, group_size=2)):
        with pytest.raises(ValueError, match=msg):
            call()
    assert np.array_equal(w, [1.0, -1.0, 3.0, 4.0])
    obs.saliency(w, H)                     # the diagonal alone is positive: still defined


@pytest.mark.parametrize("kind", ["static", "block"])
def test_regrad_grads_of_the_wrong_width_are_named_whatever_their_type(kind):
    """regrad returning a list of the wrong width: a static operator took it and the next
    stage failed with a NumPy broadcast error; a block operator said "blocks must sum to
    5" (an argument nobody gave)."""
    rng = np.random.default_rng(1)
    G = rng.standard_normal((3, 10))
    op = ml.StaticInverseFisher(G, 0.1) if kind == "static" else \
        ml.BlockInverseFisher(G, 0.1, block_size=4)
    w = rng.standard_normal(10)
    with pytest.raises(ValueError, match=r"regrad\(weights, mask\) must return grads of shape "
                                         r"\(m, 10\); got shape \(3, 5\)"):
        obs.prune(w, op, count=4, steps=2, regrad=lambda w_, m_: G[:, :5].tolist())
    with pytest.raises(ValueError, match=r"the grads returned by regrad\(weights, mask\) must "
                                         r"be 2-D"):
        obs.prune(w, op, count=4, steps=2, regrad=lambda w_, m_: G[0])
    r = obs.prune(w, op, count=4, steps=2, regrad=lambda w_, m_: G.tolist())
    assert r.mask.sum() == 4
    if kind == "block":
        with pytest.raises(ValueError, match=r"grads must have shape \(m, 10\)"):
            op.with_gradients(G[:, :5])


def test_group_size_that_does_not_divide_a_block_is_refused_before_any_work():
    """count=0 (or a first stage removing nothing) accepted group_size=3 on blocks of 4;
    with steps the error came only after regrad had been called."""
    rng = np.random.default_rng(2)
    G = rng.standard_normal((3, 8))
    op = ml.BlockInverseFisher(G, 0.1, block_size=4)
    w = rng.standard_normal(8)
    calls = []
    with pytest.raises(ValueError, match="group_size=3 must divide every block size"):
        obs.prune(w, op, count=0, group_size=3)
    with pytest.raises(ValueError, match="group_size=3 must divide every block size"):
        obs.prune(w, op, count=1, steps=2, group_size=3,
                  regrad=lambda w_, m_: calls.append(1) or G)
    assert calls == []
    with pytest.raises(ValueError, match="group_size=3 must divide d=8"):
        obs.prune(w, np.eye(8), count=0, group_size=3)


def test_operator_with_a_zero_diagonal_entry_is_refused_by_name():
    """A float32 dual-form operator whose 1 - ||v_q||^2 cancels exactly (v = 1e4 / sqrt(1e8 +
    1e-3) rounds to 1.0 in float32): saliency divided by zero (a RuntimeWarning, inf) and
    the independent update failed on an 'x' the caller never passed."""
    G = np.array([[1e4, 1.0, 0.5]], np.float32)
    op = ml.StaticInverseFisher(G, 1e-3)
    assert op.diagonal()[0] == 0
    w = np.array([1.0, 2.0, 3.0])
    msg = r"op is too ill-conditioned for its storage dtype float32: its diagonal has an entry"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for call in (lambda: obs.saliency(w, op),
                     lambda: obs.prune(w, op, count=1, method="joint"),
                     lambda: obs.prune(w, op, count=1, method="independent")):
            with pytest.raises(ValueError, match=msg):
                call()
        # the same problem in float64 is fine and matches the exact inverse
        op64 = ml.StaticInverseFisher(G.astype(np.float64), 1e-3)
        H, _ = exact_inverse_blocks(G, 1e-3, [0, 3])
        np.testing.assert_allclose(obs.saliency(w, op64), w ** 2 / (2 * np.diag(H)),
                                   rtol=1e-4)


def test_ill_conditioned_float32_operators_never_give_negative_saliencies_or_losses():
    """Float32 operators with kappa_W near 1/eps32 have diagonal entries and blocks H_QQ
    that are not positive definite after rounding: negative saliencies (pruned first),
    negative joint losses and negative group saliencies came back silently.  Now each call
    either gives non-negative values or a ValueError naming op."""
    rng = np.random.default_rng(3)
    refused = neg_before = 0
    for _ in range(400):
        m, d = int(rng.integers(1, 6)), int(rng.integers(2, 10))
        G = rng.standard_normal((m, d)) * np.logspace(0, rng.uniform(0, 6), d)
        lam = 10.0 ** rng.uniform(-18, -4) * float((G ** 2).sum())
        try:
            op = ml.BlockInverseFisher(G.astype(np.float32), lam,
                                       block_size=int(rng.integers(1, d + 1)))
        except ValueError as exc:                   # damping below float32's range
            assert "damping must be in" in str(exc)
            continue
        neg_before += bool((op.diagonal() <= 0).any())
        w = rng.standard_normal(d)
        for call in (lambda: obs.saliency(w, op), lambda: obs.group_saliency(w, op, 1),
                     lambda: obs.prune(w, op, count=int(rng.integers(1, d + 1))).loss,
                     lambda: obs.prune(w, op, count=1, method="independent").loss):
            try:
                out = call()
            except ValueError as exc:
                assert str(exc).startswith("op is too ill-conditioned for its storage dtype")
                refused += 1
            else:
                assert np.all(np.asarray(out) >= 0)
    assert neg_before >= 3 and refused > neg_before       # the cases are really there


# -- argument checks: clear errors, nothing damaged ----------------------------------------

def _bad_calls(op, w, d):
    ro = np.zeros(d, bool)
    ro.flags.writeable = False
    return [
        (lambda: obs.saliency(w.astype(complex), op), TypeError, "w must be real"),
        (lambda: obs.saliency(w[:-1], op), ValueError, rf"w must have shape \({d},\)"),
        (lambda: obs.saliency(np.float64(1.0), op), ValueError, "w must have shape"),
        (lambda: obs.saliency(np.r_[w[:-1], np.nan], op), ValueError, "w must be finite"),
        (lambda: obs.saliency("w", op), TypeError, "w must be an array"),
        (lambda: obs.saliency(w, 2 * op), TypeError, "op: ScaledOperator is not"),
        (lambda: obs.saliency(w, np.ones((d, d + 1))), ValueError, "op must be an operator or"),
        (lambda: obs.group_saliency(w, op, group_size=0), ValueError, "group_size must be >= 1"),
        (lambda: obs.group_saliency(w, op, group_size=2.0), TypeError, "group_size must be an"),
        (lambda: obs.prune(w, op, count=d + 1), ValueError, f"count must be <= {d}"),
        (lambda: obs.prune(w, op, count=1, sparsity=0.1), ValueError, "give exactly one"),
        (lambda: obs.prune(w, op, sparsity=np.nan), ValueError, "sparsity must be a number"),
        (lambda: obs.prune(w, op, count=1, method="obd"), ValueError, "method must be one of"),
        (lambda: obs.prune(w, op, count=1, mask=ro.astype(int)), TypeError,
         "mask must be a boolean array"),
        (lambda: obs.prune(w, op, count=1, mask=ro[:-1]), ValueError, "mask must be a boolean"),
        (lambda: obs.prune(w, op, count=0, mask=~ro), ValueError, "below the"),
        (lambda: obs.prune(w, op, count=2, steps=0), ValueError, "steps must be >= 1"),
        (lambda: obs.prune(w, op, count=2, group_size=d + 1), ValueError,
         f"group_size={d + 1} must divide"),
        (lambda: obs.prune(w, op, count=2, steps=2, regrad=lambda a, b: None), TypeError,
         r"the grads returned by regrad\(weights, mask\) must be an array"),
    ]


@pytest.mark.parametrize("kind", ["static", "block", "window", "dense"])
def test_failed_calls_leave_inputs_and_operator_untouched(kind):
    rng = np.random.default_rng(4)
    d = 8
    G = rng.standard_normal((3, d))
    op, bounds, Gf = _make(kind, G, 0.2, 4, rng)
    if op is None:
        op = np.linalg.inv(0.2 * np.eye(d) + G.T @ G / 3)
    w = rng.standard_normal(d)
    w.flags.writeable = False                           # read-only weights are fine
    before = obs.prune(w, op, count=3)
    dense_before = None if isinstance(op, np.ndarray) else op.todense().copy()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for call, exc, msg in _bad_calls(op, w, d):
            if (kind in ("window", "dense") and "regrad" in msg) or \
                    (kind == "dense" and "ScaledOperator" in msg):
                continue       # not rebuildable (a TypeError earlier) / 2 * H is an array
            with pytest.raises(exc, match=msg):
                call()
    after = obs.prune(w, op, count=3)
    assert np.array_equal(before.weights, after.weights) and before.loss == after.loss
    if dense_before is not None:
        assert np.array_equal(op.todense(), dense_before)
    # non-contiguous weights and a read-only mask give the same results
    wn = np.repeat(np.asarray(w), 2)[::2]
    assert np.array_equal(obs.prune(wn, op, count=3).weights, before.weights)
    m = np.zeros(d, bool)
    m[0] = True
    m.flags.writeable = False
    r = obs.prune(w, op, count=3, mask=m)
    assert r.mask[0] and r.mask.flags.writeable and not np.shares_memory(r.mask, m)


def test_count_extremes_and_float_dtypes():
    """count 0 and d, sparsity 0 and 1, a fully masked start, int/bool weights."""
    rng = np.random.default_rng(5)
    G = rng.standard_normal((6, 10))
    op = ml.BlockInverseFisher(G, 0.3, block_size=4)
    w = rng.standard_normal(10)
    F = np.linalg.inv(op.todense())
    for method in ("joint", "independent", "magnitude"):
        r0 = obs.prune(w, op, count=0, method=method)
        assert r0.loss == 0.0 and np.array_equal(r0.weights, w) and not r0.mask.any()
        rd = obs.prune(w, op, sparsity=1.0, method=method)
        assert rd.mask.all() and not rd.weights.any()
        assert abs(rd.loss - 0.5 * w @ F @ w) <= 1e-12 * rd.loss
        rm = obs.prune(w, op, count=10, mask=np.ones(10, bool), method=method)
        assert rm.loss == 0.0 and rm.mask.all()
    assert obs.saliency(np.arange(10), op).dtype == np.float64
    assert obs.prune(np.arange(10) > 4, op, count=2).weights.dtype == np.float64


# -- the block operator ------------------------------------------------------------------

@given(st.integers(0, 2**32 - 1), st.sampled_from([np.float64, np.float32]))
def test_block_operator_against_exact_block_oracle(seed, dtype):
    """Every protocol method of BlockInverseFisher (check_operator) against the exact
    block-diagonal oracle: layers, block sizes not dividing d, m = 1, m > b, duplicate,
    zero and low-rank gradients, dampings 1e-6 .. 1e3 times ||g||^2/m."""
    rng = np.random.default_rng(seed)
    m, d = int(rng.choice([1, 2, 5, 13])), int(rng.integers(1, 16))
    G = gradients(rng, m, d, str(rng.choice(["normal", "duplicate", "zero", "lowrank"])))
    G = G.astype(dtype)
    layers = None
    if d > 1 and rng.random() < 0.5:
        cuts = np.sort(rng.choice(np.arange(1, d), size=min(2, d - 1), replace=False))
        layers = np.diff(np.r_[0, cuts, d]).tolist()
    G64 = G.astype(np.float64)
    top = float((G64 ** 2).sum(axis=1).max()) / m
    lam = float(dtype(10.0 ** rng.uniform(-6 if dtype == np.float64 else -3, 3)
                      * (top if top > 0 else 1.0)))
    G0 = G.copy()
    op = ml.BlockInverseFisher(G, lam, block_size=int(rng.integers(1, d + 2)), blocks=layers)
    assert np.array_equal(G, G0)
    b = op.bounds
    orc = block_diag_oracle([inverse_fisher_oracle(G64[:, i:j], lam)
                             for i, j in zip(b[:-1], b[1:])])
    check_operator(op, orc, rng=rng, skip=("pickle", "cg"), strict=False)


@pytest.mark.parametrize("e2", [-500, -250, 250, 500])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_block_operator_is_scale_equivariant_far_from_one(e2, dtype):
    """G s and lambda s^2 (s a power of two, 1e-150 .. 1e150 for float64) give F^-1 / s^2
    exactly where nothing under- or overflows: products, diagonal, entries, logdet."""
    if dtype == np.float32:
        e2 //= 10                                  # float32: s up to 2^50
    s = 2.0 ** e2
    rng = np.random.default_rng(6)
    G = rng.standard_normal((5, 11)).astype(dtype)
    ref = ml.BlockInverseFisher(G, 0.7, block_size=4, blocks=[7, 4])
    try:
        op = ml.BlockInverseFisher((G * dtype(s)).astype(dtype), 0.7 * s * s, block_size=4,
                                   blocks=[7, 4])
    except ValueError as exc:                       # lambda s^2 outside the documented range
        assert "damping must be in" in str(exc)
        from mfac_linalg._validate import damping_range
        lo, hi = damping_range(dtype)
        assert not lo <= 0.7 * s * s <= hi
        return
    x = rng.standard_normal(11).astype(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y, yr = op.matvec(x).astype(np.float64), ref.matvec(x).astype(np.float64)
        np.testing.assert_array_equal(y * s * s, yr)
        np.testing.assert_array_equal(op.diagonal().astype(np.float64) * s * s,
                                      ref.diagonal().astype(np.float64))
        assert op.entry(1, 5) * s * s == ref.entry(1, 5)
        assert op.entry(1, 9) == 0.0
        assert abs(op.logdet() - (ref.logdet() + 11 * np.log(s * s))) <= 1e-10 * abs(
            op.logdet())
        f, fr = op.fisher().matvec(x).astype(np.float64), ref.fisher().matvec(x)
        np.testing.assert_allclose(f / (s * s), fr, rtol=2 * np.finfo(dtype).eps * 10)


@pytest.mark.parametrize("kw", [dict(method="magnitude"), dict(method="magnitude", group_size=1),
                                dict(method="magnitude", group_size=3)])
def test_methods_that_do_not_read_the_diagonal_take_an_operator_whose_diagonal_cancels(kw):
    """diag(F^-1) is read only by the single-weight scores and the independent update:
    magnitude pruning, single and in groups, of an operator whose float32 diagonal rounds
    to 0 works as before (the loss through F, which does not cancel)."""
    G = np.array([[1e4, 1.0, 0.5]], np.float32)
    op = ml.StaticInverseFisher(G, 1e-3)
    assert np.min(op.diagonal()) <= 0          # the cancelling entry
    if kw.get("group_size") == 3:
        res = ml.obs.prune(np.array([1.0, 2.0, 3.0]), op, count=3, **kw)
        assert np.array_equal(res.weights, np.zeros(3))
        return
    res = ml.obs.prune(np.array([1.0, 2.0, 3.0]), op, count=1, **kw)
    assert np.array_equal(res.mask, [True, False, False])
    F = 1e-3 * np.eye(3) + G.T.astype(np.float64) @ G.astype(np.float64)
    assert res.loss == pytest.approx(0.5 * F[0, 0], rel=1e-6)


def test_saliencies_in_range_are_the_published_formula_bit_for_bit():
    """Where w^2 and 2 H_qq are normal numbers the saliency is w^2 / (2 H_qq) exactly as
    the published pruner computes it (the overflow-free form rounds differently, which
    could flip its near-ties); outside, the overflow-free form."""
    rng = np.random.default_rng(21)
    G = rng.standard_normal((6, 50))
    op = ml.StaticInverseFisher(G, 0.05)
    diag = op.diagonal()
    w = rng.standard_normal(50) * np.logspace(-100, 100, 50)
    got = ml.obs.saliency(w, op)
    assert np.array_equal(got, w * w / (2.0 * diag))
    big = np.array([1e160, 3e160])
    assert np.allclose(ml.obs.saliency(big, 1e100 * np.eye(2)), [5e219, 4.5e220], rtol=1e-15)
