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
