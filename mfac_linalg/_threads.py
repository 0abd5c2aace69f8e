"""Host threads for the passes over big arrays: a pool kept between calls.

``run(jobs, nthreads, piece)`` calls ``piece(*job)`` for every job on up to ``nthreads``
threads, the caller's among them: the caller takes jobs too, so they are all done even
while the pool is busy with another caller's work, and a helper that has not started
by the time the caller runs out of jobs is cancelled rather than waited for.  Jobs are
taken in turn, so a thread whose core is busy elsewhere (OpenBLAS's workers spin for a
while after each BLAS call) simply takes fewer of them.  Which thread does a job never
changes what it computes: every job writes its own part of the result.

Starting a thread costs 0.1-1.3 ms on the 2-core benchmark machine, as much as a pass
over 1e7 float32 values, hence the pool (``host_threads() - 1`` helpers, made on first
use; a forked child, whose copy of the pool has no threads, makes its own).  The
helpers stay alive between calls, so a process that forks after a threaded pass is
multi-threaded (Python 3.12 and later warn about such a fork).  While the interpreter
shuts down no thread can be started: the caller then does every job itself.
"""
from __future__ import annotations

import os
import threading

__all__ = ["host_threads", "run", "split"]


def host_threads():
    """Threads for the host passes: the CPUs this process may run on, at most 8."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        n = os.cpu_count() or 1
    return max(1, min(n, 8))


def split(n, pieces):
    """``pieces`` (at most n) contiguous ranges covering 0..n, as (start, stop) pairs."""
    pieces = max(1, min(int(n), int(pieces)))
    edges = [n * k // pieces for k in range(pieces + 1)]
    return [(s, e) for s, e in zip(edges, edges[1:]) if e > s]


def run(jobs, nthreads, piece):
    """``piece(*job)`` for each job of the list ``jobs`` on up to ``nthreads`` threads
    (the caller's among them).  The first error a piece raises is re-raised here, after
    every running piece has stopped; the jobs not yet taken are then dropped."""
    jobs = list(jobs)
    if nthreads <= 1 or len(jobs) <= 1:
        for job in jobs:
            piece(*job)
        return
    jobs.reverse()                      # popped from the end: taken in order
    lock = threading.Lock()
    errors = []

    def worker():
        while True:
            with lock:
                if not jobs or errors:
                    return
                job = jobs.pop()
            try:
                piece(*job)
            except BaseException as exc:  # re-raised by the caller below
                errors.append(exc)
                return

    helpers = []
    for _ in range(min(nthreads, len(jobs)) - 1):
        try:
            helpers.append(_pool().submit(worker))
        except RuntimeError:    # the interpreter is shutting down: no new threads
            break
    worker()
    for h in helpers:
        if not h.cancel():
            h.result()
    if errors:
        raise errors[0]


_POOL = None
_POOL_LOCK = threading.Lock()


def _pool():
    global _POOL
    if _POOL is None:
        with _POOL_LOCK:
            if _POOL is None:
                from concurrent.futures import ThreadPoolExecutor
                _POOL = ThreadPoolExecutor(max(1, host_threads() - 1),
                                           thread_name_prefix="mfac_linalg-host")
    return _POOL


def _forget_pool():  # pragma: no cover - runs in forked children
    global _POOL, _POOL_LOCK
    _POOL, _POOL_LOCK = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    # (no shutdown before a fork: waiting there for the helpers deadlocks against
    # concurrent.futures' own fork hook when another thread is submitting)
    os.register_at_fork(after_in_child=_forget_pool)
