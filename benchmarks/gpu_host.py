"""Where the host's time of one small-d GPU call goes: before its one synchronisation,
waiting in it, after it, against the call's CUDA-event time.

For the static operator's matvec (checked and ``check_finite=False``), the sliding
window's step, update and matvec (d = 1e5, m = 256 and 1024, float32) and the block
operator's checked matvec (d = 1e6): CUDA events around each call and
``time.perf_counter`` around it and around the library's device-to-host reads
(``_backend.to_host``, wrapped here), medians of 200 calls after 20.  A call whose
status read does not go through ``to_host`` (the static operator's CUDA graph and the
window's kernel engines read theirs from page-locked memory) shows its host time only,
and so does one where only some calls read through it.  Last row, for scale: an empty
kernel and a one-value read.  Usage: python benchmarks/gpu_host.py
"""
import sys
import time

import numpy as np

import cupy as cp

sys.path.insert(0, __file__.rsplit("/", 1)[0] + "/..")
import mfac_linalg as ml  # noqa: E402
from mfac_linalg import _backend as B  # noqa: E402

_marks = []
_to_host = B.to_host


def _timed_to_host(a):
    if isinstance(a, np.ndarray):
        return _to_host(a)
    t0 = time.perf_counter()
    out = _to_host(a)
    _marks.append((t0, time.perf_counter()))
    return out


def timeline(name, fn, n=200, warmup=20):
    for _ in range(warmup):
        fn()
    cp.cuda.Device().synchronize()
    pre, wait, post, total, event = [], [], [], [], []
    start, end = cp.cuda.Event(), cp.cuda.Event()
    for _ in range(n):
        _marks.clear()
        start.record()
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        end.record()
        end.synchronize()
        event.append(cp.cuda.get_elapsed_time(start, end) * 1e3)
        total.append((t1 - t0) * 1e6)
        if _marks:
            a, b = _marks[0][0], _marks[-1][1]
            pre.append((a - t0) * 1e6)
            wait.append((b - a) * 1e6)
            post.append((t1 - b) * 1e6)
    med = float(np.median(event)), float(np.median(total))
    line = f"{name}: event {med[0]:.1f} us, host {med[1]:.1f} us"
    if len(pre) == n:
        line += (f" = before the read {np.median(pre):.1f} + in it {np.median(wait):.1f}"
                 f" + after {np.median(post):.1f}")
    elif pre:               # only some calls read through to_host (a refresh, say)
        line += f" ({len(pre)} of {n} calls read through to_host: no split)"
    print(line, flush=True)


def main():
    B.to_host = _timed_to_host
    try:
        print("device:", cp.cuda.runtime.getDeviceProperties(0)["name"].decode())
        d = 100_000
        for m in (256, 1024):
            G = cp.random.RandomState(2).standard_normal((m, d), dtype=cp.float32)
            x = cp.random.RandomState(1).standard_normal(d, dtype=cp.float32)
            st = ml.StaticInverseFisher(G, 1e-3 * d)
            raw = ml.StaticInverseFisher(G, 1e-3 * d, check_finite=False)
            timeline(f"static d=1e5 m={m} matvec, checked", lambda: st.matvec(x))
            timeline(f"static d=1e5 m={m} matvec, check_finite=False", lambda: raw.matvec(x))
            w = ml.SlidingWindowInverseFisher.from_gradients(G, 1e-3 * d, window=m,
                                                             dtype="float32", device="gpu")
            gs = [cp.random.RandomState(i).standard_normal(d, dtype=cp.float32)
                  for i in range(4)]
            k = [0]

            def nxt():
                k[0] += 1
                return gs[k[0] % 4]
            timeline(f"window d=1e5 m={m} step", lambda: w.step(nxt()))
            timeline(f"window d=1e5 m={m} update", lambda: w.update(nxt()))
            timeline(f"window d=1e5 m={m} matvec", lambda: w.matvec(x))
        d = 1_000_000
        for m, b in ((256, 128), (64, 1024)):
            G = cp.random.RandomState(0).standard_normal((m, d), dtype=cp.float32)
            op = ml.BlockInverseFisher(G, 1.0, block_size=b)
            x = cp.random.RandomState(1).standard_normal(d, dtype=cp.float32)
            timeline(f"block d=1e6 m={m} B={b} matvec, checked", lambda: op.matvec(x))
        nop = cp.RawKernel(r'extern "C" __global__ void nop() {}', "nop")
        one = cp.zeros(1)
        timeline("an empty kernel and a one-value read",
                 lambda: (nop((1,), (32,), ()), B.to_host(one)))
    finally:
        B.to_host = _to_host


if __name__ == "__main__":
    main()
