"""GPU benchmark: sliding window and static operator against the memory floor (CuPy).

One table, medians of CUDA-event timings after warm-up. For each d, m and
storage (float32, bfloat16): matvec, update, step, each in milliseconds and
as a ratio to the floor 2·m·d·bytes / copy bandwidth, where the bandwidth is
that of a large device-to-device copy measured in the same run (bytes read
plus bytes written). update reads the buffer once, so its ideal ratio is 0.5.
Then the static operator: set-up over one Gram GEMM on the same data, matvec
over the floor. Then accuracy: float32 and bfloat16 results against float64.

Usage: python benchmarks/gpu.py [--quick] [--out FILE.md] [--no-progress]
"""
import itertools
import sys

import numpy as np

import cupy as cp

import mfac_linalg as ml
from mfac_linalg._progress import progress

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _timing import table  # noqa: E402


def gpu_time(fn, *, repeat=20, warmup=3):
    """Median milliseconds of fn() between CUDA events (includes host launch gaps)."""
    for _ in range(warmup):
        fn()
    cp.cuda.Device().synchronize()
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    times = []
    for _ in range(repeat):
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, stop))
    return float(np.median(times))


def copy_bandwidth(nbytes=4 << 30):
    a = cp.empty(nbytes // 4, dtype=cp.float32)
    a[...] = 1.0
    b = cp.empty_like(a)
    ms = gpu_time(lambda: cp.copyto(b, a), repeat=10)
    del a, b
    return 2 * nbytes / (ms * 1e-3)


def free():
    cp.get_default_memory_pool().free_all_blocks()


def filled_window(d, m, dtype, lam, seed=0, engine="auto", **kwargs):
    """A full window with random gradients in one set-up (from_gradients over row blocks
    of at most 1 GiB: the float32 rows of a 16-bit window need not fit at once)."""
    rs = cp.random.RandomState(seed)
    chunk = max(1, (1 << 28) // max(d, 1))
    blocks = (rs.standard_normal((min(chunk, m - r0), d), dtype=cp.float32)
              for r0 in range(0, m, chunk))
    w = ml.SlidingWindowInverseFisher.from_gradients(
        blocks, lam, window=m, dtype=dtype, device="gpu", refresh_every=10**9, engine=engine,
        **kwargs)
    free()
    return w


def bench_window(d, m, dtype, bw, rows):
    itemsize = 4 if dtype == "float32" else 2
    need = m * d * itemsize
    if need > 0.7 * cp.cuda.Device().mem_info[1]:
        rows.append([f"{d:.0e}", m, dtype, "does not fit", "-", "-", "-", "-", "-", "-"])
        print("  " + " | ".join(map(str, rows[-1])), file=sys.stderr, flush=True)
        return
    lam = 1e-3 * d
    w = filled_window(d, m, dtype, lam)
    rs = cp.random.RandomState(1)
    gs = [rs.standard_normal(d, dtype=cp.float32) for _ in range(4)]
    k = [0]

    def nxt():
        k[0] += 1
        return gs[k[0] % 4]
    x = gs[0]
    t_mv = gpu_time(lambda: w.matvec(x))
    t_up = gpu_time(lambda: w.update(nxt()))
    t_st = gpu_time(lambda: w.step(nxt()))
    floor = 2 * m * d * itemsize / bw * 1e3
    rows.append([f"{d:.0e}", m, dtype, f"{floor:.3f}", f"{t_mv:.3f}", f"{t_mv / floor:.2f}",
                 f"{t_up:.3f}", f"{t_up / floor:.2f}", f"{t_st:.3f}", f"{t_st / floor:.2f}"])
    print("  " + " | ".join(map(str, rows[-1])), file=sys.stderr, flush=True)
    del w, gs
    free()
    return t_st


def bench_static(d, m, bw):
    G = cp.random.RandomState(2).standard_normal((m, d), dtype=cp.float32)
    lam = 1e-3 * d
    t_gram = gpu_time(lambda: G @ G.T, repeat=5, warmup=1)
    t_setup = gpu_time(lambda: ml.StaticInverseFisher(G, lam), repeat=5, warmup=1)
    op = ml.StaticInverseFisher(G, lam, check_finite=False)
    x = cp.random.RandomState(3).standard_normal(d, dtype=cp.float32)
    t_mv = gpu_time(lambda: op.matvec(x))
    floor = 2 * m * d * 4 / bw * 1e3
    del G, op
    free()
    return t_gram, t_setup, t_mv, floor


def accuracy(d=100_000, m=1024):
    """float32 / bfloat16 windows against float64 computations on the same stored data."""
    out = []
    for dtype in ("float32", "bfloat16"):
        w = filled_window(d, m, dtype, 1e-3 * d, seed=5)
        G64 = w.gradients().astype(cp.float64)       # the values as stored (full: slot order)
        ref_op = ml.StaticInverseFisher(G64, 1e-3 * d)  # N = m: the same F
        x = cp.random.RandomState(9).standard_normal(d, dtype=cp.float32)
        y = w.matvec(x).astype(cp.float64)
        y64 = ref_op.matvec(x.astype(cp.float64))
        err = float(cp.linalg.norm(y - y64) / cp.linalg.norm(y64))
        # the float32 dense reference: the same float64 product, rounded to float32 at the end
        err_round = float(cp.linalg.norm(y64.astype(cp.float32).astype(cp.float64) - y64)
                          / cp.linalg.norm(y64))
        out.append((dtype, err, err_round))
        del w, G64, ref_op
        free()
    # bfloat16 storage against the unrounded float32 data: the storage error itself
    rs = cp.random.RandomState(11)
    G32 = rs.standard_normal((256, 20_000), dtype=cp.float32)
    x = rs.standard_normal(20_000).astype(cp.float64)
    lam = 1e-3 * 20_000
    Gb = ml.SlidingWindowInverseFisher.from_gradients(G32, lam, dtype="bfloat16").gradients()
    ya = ml.StaticInverseFisher(G32.astype(cp.float64), lam).matvec(x)
    yb = ml.StaticInverseFisher(Gb.astype(cp.float64), lam).matvec(x)
    storage_err = float(cp.linalg.norm(ya - yb) / cp.linalg.norm(ya))
    return out, storage_err


def main(quick=False, out=None, show_progress=None):
    """Run the benchmark, print the text (and write it to ``out``).  ``show_progress``: a
    bar on stderr over the (d, m, storage) cases (None: only on a terminal with tqdm
    installed; False: never); the printed text is the same either way."""
    dev = cp.cuda.runtime.getDeviceProperties(0)
    name = dev["name"].decode() if isinstance(dev["name"], bytes) else dev["name"]
    bw = copy_bandwidth()
    lines = [f"device: {name}, CuPy {cp.__version__}, copy bandwidth {bw / 1e12:.2f} TB/s "
             "(read + write, 4 GiB device-to-device copy)", ""]
    dims = [100_000, 1_000_000] if quick else [100_000, 1_000_000, 10_000_000]
    windows = [256, 1024] if quick else [256, 1024, 4096]
    rows, steps = [], {}
    cases = list(itertools.product(dims, windows, ("float32", "bfloat16")))   # d, m, dtype
    for d, m, dtype in progress(cases, desc="GPU sliding-window cases", enabled=show_progress):
        steps[(d, m, dtype)] = bench_window(d, m, dtype, bw, rows)
    lines.append("sliding window (ms; ratio = time / floor, floor = 2 m d bytes / copy bandwidth)")
    lines.append(table(["d", "m", "storage", "floor ms", "matvec", "ratio", "update", "ratio",
                        "step", "ratio"], rows))
    key32, key16 = (dims[-1], 1024, "float32"), (dims[-1], 1024, "bfloat16")
    if steps.get(key32) and steps.get(key16):
        lines.append(f"bfloat16 step / float32 step at d={dims[-1]:.0e}, m=1024: "
                     f"{steps[key16] / steps[key32]:.2f}")
    lines.append("")
    t_gram, t_setup, t_mv, floor = bench_static(1_000_000, 1024, bw)
    lines.append(f"static, d=1e6, m=1024, float32: set-up {t_setup:.1f} ms, one Gram GEMM "
                 f"{t_gram:.1f} ms, set-up / Gram = {t_setup / t_gram:.2f}; matvec {t_mv:.3f} ms "
                 f"= {t_mv / floor:.2f} x floor")
    acc, storage_err = accuracy()
    for dtype, err, err_round in acc:
        lines.append(f"accuracy d=1e5 m=1024 {dtype}: |y - y64| / |y64| = {err:.2e} "
                     f"(float32 rounding of the exact result: {err_round:.2e}, "
                     f"ratio {err / err_round:.1f})")
    lines.append(f"bfloat16 storage error (same data, float64 arithmetic): {storage_err:.2e}")
    text = "\n".join(lines)
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    o = sys.argv[sys.argv.index("--out") + 1] if "--out" in sys.argv else None
    main(quick="--quick" in sys.argv, out=o,
         show_progress=False if "--no-progress" in sys.argv else None)
