"""Progress bars for long work: tqdm when it is installed and wanted, silent otherwise.

One function, :func:`progress`, used by the examples, the benchmark scripts, the demo
and the library's long loops (multi-layer Kronecker builds, large block set-ups).  It
never changes what is computed, only what is printed to stderr.
"""
from __future__ import annotations

import importlib.util
import sys
from typing import Iterable, Optional, TypeVar

from . import _validate as V

__all__ = ["progress", "counter", "tqdm_available"]

T = TypeVar("T")


def tqdm_available() -> bool:
    """Whether :mod:`tqdm` can be imported (the ``progress`` extra), without importing it."""
    return importlib.util.find_spec("tqdm") is not None


def _stderr_is_tty() -> bool:
    stream = sys.stderr
    try:
        return stream is not None and bool(stream.isatty())
    except (AttributeError, ValueError):      # replaced or closed stream
        return False


def _wanted(enabled: Optional[bool]) -> bool:
    if enabled is not None:
        enabled = V.boolean(enabled, "enabled")
    else:
        enabled = _stderr_is_tty()
    return enabled and tqdm_available()


class _Silent:
    """The no-op stand-in for a tqdm bar."""

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> "_Silent":
        return self

    def __exit__(self, *exc) -> None:
        pass


def counter(total: Optional[int] = None, desc: Optional[str] = None,
            enabled: Optional[bool] = None):
    """A bar advanced by hand (``update(n)``), for work reported through callbacks.

    Same rules as :func:`progress`: tqdm on stderr when installed and wanted, otherwise
    a silent object with the same ``update`` / ``close`` / context-manager interface.

    Parameters
    ----------
    total : int, optional
        The expected number of steps (>= 0), e.g. an iteration limit.
    desc : str, optional
        A short label.
    enabled : bool or None, default None
        As in :func:`progress`.

    Returns
    -------
    object
        A ``tqdm`` bar, or a silent stand-in; use it as a context manager so that it is
        closed.

    Raises
    ------
    TypeError, ValueError
        For the same bad arguments as :func:`progress`.

    Examples
    --------
    >>> from mfac_linalg._progress import counter
    >>> with counter(total=3, desc="iterations", enabled=False) as bar:
    ...     for _ in range(3):
    ...         bar.update(1)
    """
    if total is not None:
        total = V.integer(total, "total", minimum=0)
    if desc is not None and not isinstance(desc, str):
        raise TypeError(f"desc must be a string; got {type(desc).__name__} {desc!r}")
    if not _wanted(enabled):
        return _Silent()
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True, leave=False)


def will_draw(enabled: Optional[bool] = None) -> bool:
    """Whether :func:`progress` / :func:`counter` would draw a bar with ``enabled``."""
    return _wanted(enabled)


def progress(iterable: Iterable[T], total: Optional[int] = None, desc: Optional[str] = None,
             enabled: Optional[bool] = None) -> Iterable[T]:
    """Wrap ``iterable`` in a tqdm progress bar on stderr when wanted; else return it as is.

    The items, their order and their number are unchanged: the bar only reports them.

    Parameters
    ----------
    iterable : iterable
        What to loop over.
    total : int, optional
        The number of items, for iterables without ``len`` (generators); by default
        ``len(iterable)`` where it exists.  Must be >= 0.
    desc : str, optional
        A short label printed before the bar (e.g. ``"KPSVD layers"``).
    enabled : bool or None, default None
        ``None``: a bar only when stderr is a terminal and tqdm is installed (so logs,
        pipes, CI and doctests stay clean).  ``True``: a bar whenever tqdm is installed,
        terminal or not.  ``False``: never.  Without tqdm (``pip install
        "mfac-linalg[progress]"``) there is never a bar and nothing is printed.

    Returns
    -------
    iterable
        A ``tqdm`` object iterating over ``iterable``, or ``iterable`` itself (the very
        same object) when no bar is shown.

    Raises
    ------
    TypeError
        If ``enabled`` is not None/True/False, ``total`` is not an integer, ``desc`` is
        not a string, or ``iterable`` is not iterable.
    ValueError
        If ``total`` is negative.

    Notes
    -----
    Cost: O(1) per item (tqdm rate-limits its redraws to about 10 per second).

    Examples
    --------
    >>> from mfac_linalg._progress import progress
    >>> [x * x for x in progress(range(4), desc="squares", enabled=False)]
    [0, 1, 4, 9]
    >>> items = [1, 2, 3]
    >>> progress(items, enabled=False) is items
    True
    """
    if enabled is not None:
        enabled = V.boolean(enabled, "enabled")
    if total is not None:
        total = V.integer(total, "total", minimum=0)
    if desc is not None and not isinstance(desc, str):
        raise TypeError(f"desc must be a string; got {type(desc).__name__} {desc!r}")
    if not hasattr(iterable, "__iter__"):
        raise TypeError(f"iterable must be iterable; got {type(iterable).__name__}")
    if enabled is None:
        enabled = _stderr_is_tty()
    if not enabled or not tqdm_available():
        return iterable
    from tqdm.auto import tqdm
    return tqdm(iterable, total=total, desc=desc, file=sys.stderr, dynamic_ncols=True)

