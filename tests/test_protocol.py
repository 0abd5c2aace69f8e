"""The protocol battery: every method of the operator protocol, on every registered case
(tests/registry.py), against its exact oracle, with the per-method tolerance table of
mfac_linalg.testing.check_operator (c · κ · (ε + δ), no allowance for the oracle)."""
import copy
import inspect
import pickle

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import mfac_linalg as ml
from mfac_linalg import testing as mt

from registry import CASES, case_params

#: (case id, worst ratio, checks) of every protocol run, for the summary test at the end
RESULTS = {}


@pytest.mark.parametrize("case,device", case_params())
def test_protocol(case, device):
    op = case.build(device)
    oracle = case.oracle_for(op)
    report = mt.check_operator(op, oracle, rng=np.random.default_rng(7))
    RESULTS[f"{case.name}-{device}"] = (report.worst, len(report.ratios))
    # every numerical method of the protocol ran (nothing silently skipped)
    for name in ("matvec", "matmat", "rmatvec", "matmul.op@x", "adjoint.T", "diagonal",
                 "entry", "todense", "quad", "matmat.one_pass", "diagonal.no_dense",
                 "entry.no_dense", "deepcopy", "pickle", "readonly", "algebra.op+op",
                 "algebra.op*x", "algebra.asarray",
                 "to_cupyx" if device == "gpu" else "to_scipy.matmat"):
        assert name in report.ratios, (name, report.skipped)
    if device == "cpu":
        assert "cg.residual" in report.ratios, report.skipped
    if case.kind not in ("fisher",):
        assert "logdet" in report.ratios and "fisher().matvec" in report.ratios, report.skipped


def test_registry_covers_every_kind():
    kinds = {c.kind for c in CASES}
    assert kinds >= {"static", "sliding", "block", "kronecker", "block_diag", "fisher"}
    names = {c.name for c in CASES}
    for method in ("kfac-pi", "kfac-exact", "ekfac", "kpsvd", "deflation", "kfac_corrected"):
        assert method in names
    if hasattr(ml, "lanczos"):
        assert "lanczos" in names


def test_static_cases_cover_both_forms():
    forms = {c.build("cpu").form for c in CASES if c.kind == "static"}
    assert forms == {"dual", "primal"}, forms


def test_rank_deficient_tall_within_1e12_of_exact():
    """Issue 11 item 12: m >= d, rank(G) < d (duplicate rows), lambda = 1e-8: the
    operator must be within 1e-12 of the exact (mpmath-refined) reference."""
    rng = np.random.default_rng(0)
    G = rng.standard_normal((4, 8))[np.arange(24) % 4]           # 24 x 8, rank 4
    lam = 1e-8
    op = ml.StaticInverseFisher(G, lam)
    oracle = mt.inverse_fisher_oracle(G, lam)
    X = rng.standard_normal((8, 4))
    err = np.linalg.norm(op.matmat(X) - oracle.matmat(X), axis=0) / np.linalg.norm(
        oracle.matmat(X), axis=0)
    assert err.max() <= 1e-12, (op.form, err)
    x = X[:, 0]
    assert np.linalg.norm(op.matvec(x) - oracle.matmat(x)) <= 1e-12 * np.linalg.norm(
        oracle.matmat(x))


def test_issue_reproducer_kfac_fisher_matvec():
    a = np.random.default_rng(0).random((30, 4))
    g = np.random.default_rng(1).random((30, 3))
    f = ml.kfac(a, g, 0.1).fisher()
    y = f.matvec(np.ones(12))
    assert y.shape == (12,) and np.isfinite(y).all()


def _window(dtype="float64"):
    win = ml.SlidingWindowInverseFisher(8, 4, 1e-2, dtype=dtype)
    rng = np.random.default_rng(5)
    for g in rng.standard_normal((6, 8)):
        win.update(g)
    return win, rng


@pytest.mark.parametrize("how", ["copy", "deepcopy", "pickle"])
def test_window_copies_are_independent(how):
    win, rng = _window()
    x = rng.standard_normal(8)
    y0 = win.matvec(x)
    clone = {"copy": copy.copy, "deepcopy": copy.deepcopy,
             "pickle": lambda w: pickle.loads(pickle.dumps(w))}[how](win)
    assert np.array_equal(clone.matvec(x), y0)
    clone.update(rng.standard_normal(8) * 3)
    assert not np.array_equal(clone.matvec(x), y0)
    assert np.array_equal(win.matvec(x), y0), "updating the copy changed the original"


def test_handed_out_arrays_are_read_only_or_copies():
    rng = np.random.default_rng(2)
    x = rng.standard_normal(10)
    cases = [ml.StaticInverseFisher(rng.standard_normal((4, 10)), 0.1),
             ml.BlockInverseFisher(rng.standard_normal((4, 10)), 0.1, block_size=5)]
    for op in cases:
        y0 = op.matvec(x)
        for batch in op.lowrank_batches():
            for arr in batch:
                if isinstance(arr, np.ndarray) and arr.flags.writeable:
                    arr[...] = 7.0
        assert np.array_equal(op.matvec(x), y0), type(op).__name__
    win, _ = _window()
    y0 = win.matvec(x[:8])
    G = win.gradients()
    if G.flags.writeable:
        G[...] = 0.0
    assert np.array_equal(win.matvec(x[:8]), y0)


def test_caller_arrays_never_mutated_by_builders():
    rng = np.random.default_rng(4)
    a, g = rng.standard_normal((20, 3)), rng.standard_normal((20, 2))
    a0, g0 = a.copy(), g.copy()
    for f in (ml.kfac, ml.ekfac, ml.kpsvd, ml.deflation, ml.kfac_corrected):
        f(a, g, 1e-2)
    G = rng.standard_normal((3, 6))
    G0 = G.copy()
    ml.StaticInverseFisher(G, 0.1)
    ml.BlockInverseFisher(G, 0.1, block_size=2)
    win = ml.SlidingWindowInverseFisher.from_gradients(G, damping=0.1)
    for dtype in ("float64", "float32"):
        w = ml.SlidingWindowInverseFisher(6, 2, 0.1, dtype=dtype)
        for row in G:
            w.update(row)
            w.step(row)
        win.update(G[0])
        win.step(G[1])
    assert np.array_equal(a, a0) and np.array_equal(g, g0) and np.array_equal(G, G0)


def test_summary_worst_ratio():
    """Prints the worst error / bound ratio over the battery (run with -s to see it)."""
    if not RESULTS:
        pytest.skip("run with the protocol battery")
    worst = max(RESULTS.items(), key=lambda kv: kv[1][0][1])
    checks = sum(n for _, n in RESULTS.values())
    print(f"\nprotocol battery: {len(RESULTS)} cases, {checks} checks; worst error/bound "
          f"{worst[1][0][1]:.3g} ({worst[0]}: {worst[1][0][0]})")
    assert worst[1][0][1] <= 1.0


def test_inverse_of_a_block_diagonal_of_forward_operators():
    """Issue 11 item 8: block_diag([...]).inverse() for blocks that are not all static."""
    parts = [c for c in CASES if c.name in ("static-wide-f64", "kfac-pi", "block-woodbury")]
    bd = ml.block_diag([c.build("cpu").fisher() for c in parts])
    inv = bd.inverse()
    oracle = mt.block_diag_oracle([c.oracle() for c in parts])
    mt.check_operator(inv, oracle, methods=("matvec", "matmat", "diagonal", "entry", "logdet"))


@given(st.data())
def test_sliding_window_against_exact_oracle_property(data):
    """Any gradients fed to a window (wrapped or partial, either normalization), checked
    by the protocol's numerical methods against the exact oracle of what it holds."""
    G, lam = data.draw(mt.fisher_problems(max_m=9, max_d=7, ratio=(1e-5, 1e1)))
    window = data.draw(st.integers(1, 6))
    normalize = data.draw(st.sampled_from(["window", "count"]))
    win = ml.SlidingWindowInverseFisher(G.shape[1], window, lam, dtype="float64",
                                        normalize=normalize)
    for g in G:
        win.update(g)
    held = G[-window:]
    oracle = mt.inverse_fisher_oracle(held, lam, N=window if normalize == "window" else None)
    mt.check_operator(win, oracle, methods=("matvec", "matmat", "diagonal", "entry", "quad",
                                             "logdet", "fisher"))


def _registered_damping(case):
    return inspect.signature(case.build).parameters["damping"].default


@pytest.mark.parametrize("case", [c for c in CASES if "cpu" in c.devices
                                  and isinstance(_registered_damping(c), float)],
                         ids=lambda c: c.name)
def test_battery_detects_a_small_damping_error(case):
    """The battery can fail: the same operator with its damping changed by one part in
    10^4 (float64; 10^2 for float32 storage, whose bound 16 eps32 kappa is ~1e-4 here)
    must fail against the registered oracle."""
    rel = 1e-4 if case.dtype == "float64" else 1e-2
    op = case.build("cpu", damping=_registered_damping(case) * (1 + rel))
    with pytest.raises(mt.OperatorCheckError, match="matvec"):
        mt.check_operator(op, case.oracle_for(op), methods=("matvec", "matmat"))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_entries_beyond_the_range_are_refused_by_name_not_warned(dtype):
    """1e307 * op (and sums of such): diagonal, todense and entry let a NumPy overflow
    warning out and gave inf, where the products raise ValueError."""
    import warnings
    G = np.random.default_rng(0).standard_normal((3, 5)).astype(dtype)
    big = 1e307 if dtype == np.float64 else 1e38
    A = big * ml.StaticInverseFisher(G, 1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for op in (A, A + A, big * ml.StaticInverseFisher(G * 100, 1e-3).fisher()):
            with pytest.raises(ValueError, match="not finite"):
                op.diagonal()
            with pytest.raises(ValueError, match="not finite"):
                op.todense()
            if dtype == np.float64:     # (a float32 operator's entry is a Python float)
                with pytest.raises(ValueError, match=r"entry \(0, 0\) is not finite"):
                    op[0, 0]
    fine = 2.0 * ml.StaticInverseFisher(G, 1e-3)
    assert np.isfinite(fine.diagonal()).all() and np.isfinite(fine[1, 2])
