"""The examples run and show what their docs say."""
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))


def test_sliding_optimizer_example_runs_and_mfac_wins_at_the_end():
    import sliding_optimizer
    hist = sliding_optimizer.run(steps=300, verbose=False)
    t, sgd, mfac = hist[-1]
    assert t == 300
    assert mfac < sgd
    assert mfac < hist[0][2] / 100  # and it really optimised


def test_obs_pruning_example_ordering_at_high_sparsity():
    import obs_pruning
    # 90 % only: where the methods differ most (docs/figures.md shows the whole curve)
    base, rows = obs_pruning.run(sparsities=(0.9,), verbose=False)
    (row,) = rows
    mag, ind, joint = (row[k][0] for k in ("magnitude", "independent", "joint"))
    assert joint <= ind <= mag, row
    assert row["joint"][1] > row["magnitude"][1] + 0.05      # accuracy at 90 %: 0.77 vs 0.63
    assert base[1] > 0.95                                    # the dense model is a good one


def test_kronecker_quality_example_orderings_and_cost():
    import warnings

    import kronecker_quality as kq
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        out = kq.run(checkpoints=(0, 100), n=600, verbose=False)
    for _, _, rows in out:
        for _, _, _, e, t in rows:
            assert e["deflation"] <= e["KPSVD"] + 1e-7 <= e["K-FAC"] + 2e-7
            assert e["K-FAC corr."] <= e["K-FAC"] + 1e-7
    assert len(out) == 2 and len(out[0][2]) == 4


def test_static_benchmark_script_runs_and_plots(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import static_cpu
    results = static_cpu.run([(600, 16), (1200, 8)], show_progress=False)
    out = capsys.readouterr().out
    assert "IHVP/floor" in out and "1,200" in out
    for d, m, t in results:
        assert all(t[k] > 0 for k in ("ihvp", "gemv", "setup", "gram", "trsm", "dense"))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    static_cpu.plot(results, str(tmp_path / "static.png"))
    assert (tmp_path / "static.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
