"""Timing helpers shared by the benchmark scripts: medians after warm-up."""
from __future__ import annotations

import time
from typing import Callable, Dict, Optional, Sequence

import numpy as np


def median_time(fn: Callable[[], object], *, repeat: int = 7, warmup: int = 1,
                sync: Optional[Callable[[], object]] = None) -> float:
    """Median seconds of ``fn()`` over ``repeat`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def compare(fns: Dict[str, Callable[[], object]], *, rounds: int = 15, warmup: int = 1,
            sync: Optional[Callable[[], object]] = None) -> Dict[str, float]:
    """Median seconds of each function in ``fns`` (a dict), timed in interleaved rounds.

    Each round times every function once, so slow drifts of a shared machine
    (other processes, clock changes) hit all of them alike.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            if sync:
                sync()
            t = time.perf_counter()
            fn()
            if sync:
                sync()
            times[k].append(time.perf_counter() - t)
    return {k: float(np.median(v)) for k, v in times.items()}


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Format rows (lists of strings) under a header as an aligned text table."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).rjust(w) for c, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])
