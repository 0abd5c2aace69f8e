"""mfac_linalg._progress: tqdm when installed and wanted, silent otherwise."""
import io
import sys

import pytest

from mfac_linalg import _progress
from mfac_linalg._progress import progress


class _Stream(io.StringIO):
    def __init__(self, tty):
        super().__init__()
        self._tty = tty

    def isatty(self):
        return self._tty


def test_disabled_returns_the_same_object_and_prints_nothing(monkeypatch):
    err = _Stream(tty=True)
    monkeypatch.setattr(sys, "stderr", err)
    items = [3, 1, 2]
    assert progress(items, enabled=False) is items
    assert err.getvalue() == ""


def test_auto_is_silent_when_stderr_is_not_a_terminal(monkeypatch):
    err = _Stream(tty=False)
    monkeypatch.setattr(sys, "stderr", err)
    items = (x for x in range(5))
    assert progress(items, total=5, desc="work") is items
    assert list(items) == [0, 1, 2, 3, 4]
    assert err.getvalue() == ""


def test_auto_on_a_terminal_draws_a_bar_when_tqdm_is_installed(monkeypatch):
    pytest.importorskip("tqdm")
    err = _Stream(tty=True)
    monkeypatch.setattr(sys, "stderr", err)
    out = list(progress(range(7), desc="phase one"))
    assert out == list(range(7))
    text = err.getvalue()
    assert "phase one" in text and "7/7" in text


def test_forced_on_without_tqdm_is_silent(monkeypatch):
    monkeypatch.setattr(_progress, "tqdm_available", lambda: False)
    err = _Stream(tty=True)
    monkeypatch.setattr(sys, "stderr", err)
    items = [1, 2]
    assert progress(items, enabled=True) is items
    assert err.getvalue() == ""


def test_forced_on_off_a_terminal_draws_a_bar(monkeypatch):
    pytest.importorskip("tqdm")
    err = _Stream(tty=False)
    monkeypatch.setattr(sys, "stderr", err)
    assert sum(progress(range(4), enabled=True, desc="forced")) == 6
    assert "forced" in err.getvalue()


@pytest.mark.parametrize("kwargs,exc,msg", [
    ({"enabled": "yes"}, TypeError, "enabled must be True or False"),
    ({"enabled": 1}, TypeError, "enabled must be True or False"),
    ({"total": -1}, ValueError, "total must be >= 0"),
    ({"total": 2.5}, TypeError, "total must be an integer"),
    ({"desc": 3}, TypeError, "desc must be a string"),
])
def test_bad_arguments_name_themselves(kwargs, exc, msg):
    with pytest.raises(exc, match=msg):
        progress([1], **kwargs)


def test_not_iterable():
    with pytest.raises(TypeError, match="iterable must be iterable"):
        progress(3)


def test_counter_silent_and_drawn(monkeypatch):
    from mfac_linalg._progress import counter, will_draw
    err = _Stream(tty=False)
    monkeypatch.setattr(sys, "stderr", err)
    with counter(total=3, desc="cg") as bar:
        for _ in range(3):
            bar.update(1)
    assert err.getvalue() == "" and not will_draw(None)
    with pytest.raises(ValueError, match="total must be >= 0"):
        counter(total=-2)
    pytest.importorskip("tqdm")
    assert will_draw(True)
    with counter(total=4, desc="forced cg", enabled=True) as bar:
        bar.update(4)
    assert "forced cg" in err.getvalue() and "/4" in err.getvalue()


def test_demo_draws_a_cg_bar_only_when_asked(monkeypatch):
    pytest.importorskip("tqdm")
    from mfac_linalg import cli
    err = _Stream(tty=False)
    monkeypatch.setattr(sys, "stderr", err)
    out = io.StringIO()
    cli.run_demo(dim=200, grads=20, device="cpu", out=out, progress=True)
    assert "CG, preconditioner: M-FAC" in err.getvalue()
    assert "      done in" in out.getvalue()           # the phase's time on its own line
    err.seek(0)
    err.truncate()
    cli.run_demo(dim=200, grads=20, device="cpu", out=io.StringIO(), progress=False)
    assert err.getvalue() == ""
