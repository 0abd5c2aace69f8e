"""GPU benchmark: sliding window and static operator against the memory floor (CuPy).

One table, medians of CUDA-event timings after warm-up. For each d, m and
storage (float32, bfloat16): matvec, update, step, each in milliseconds and
as a ratio to the floor 2·m·d·bytes / copy bandwidth, where the bandwidth is
that of a large device-to-device copy measured in the same run (bytes read
plus bytes written). update reads the buffer once, so its ideal ratio is 0.5.
Then the static operator: set-up over one Gram GEMM on the same data, matvec
over the floor, the diagonal over one read of V; the block operator's matvec and
diagonal over one read of its factors. Then accuracy: float32 and bfloat16 results
against float64, and float32 window steps against a float64 window for gradients
whose scales span four decades, at three dampings.

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
    """(Gram GEMM, set-up, matvec with the default check_finite, matvec unchecked, two
    cuBLAS GEMVs V^T (V x), diagonal) ms and the floor of two reads of V."""
    G = cp.random.RandomState(2).standard_normal((m, d), dtype=cp.float32)
    lam = 1e-3 * d
    t_gram = gpu_time(lambda: G @ G.T, repeat=5, warmup=1)
    t_setup = gpu_time(lambda: ml.StaticInverseFisher(G, lam), repeat=5, warmup=1)
    op = ml.StaticInverseFisher(G, lam)
    raw = ml.StaticInverseFisher(G, lam, check_finite=False)
    x = cp.random.RandomState(3).standard_normal(d, dtype=cp.float32)
    t_mv = gpu_time(lambda: op.matvec(x), repeat=50)
    t_raw = gpu_time(lambda: raw.matvec(x), repeat=50)
    t_gemv = gpu_time(lambda: G.T @ (G @ x), repeat=50)
    t_diag = gpu_time(op.diagonal, repeat=10)
    floor = 2 * m * d * 4 / bw * 1e3
    del G, op, raw
    free()
    return t_gram, t_setup, t_mv, t_raw, t_gemv, t_diag, floor


def bench_block(d, m, b, bw, rows):
    """Block operator (blocks of b columns, float32): matvec and diagonal against one
    read of the factors V (r = min(m, b) rows per block)."""
    G = cp.random.RandomState(4).standard_normal((m, d), dtype=cp.float32)
    op = ml.BlockInverseFisher(G, 1.0, block_size=b)      # default check_finite
    del G
    free()
    x = cp.random.RandomState(5).standard_normal(d, dtype=cp.float32)
    t_mv = gpu_time(lambda: op.matvec(x))
    t_diag = gpu_time(op.diagonal, repeat=10)
    read = d * min(m, b) * 4 / bw * 1e3
    rows.append([f"{d:.0e}", m, b, f"{read:.3f}", f"{t_mv:.3f}", f"{t_mv / read:.2f}",
                 f"{t_diag:.3f}", f"{t_diag / read:.2f}"])
    print("  " + " | ".join(map(str, rows[-1])), file=sys.stderr, flush=True)
    del op
    free()


def accuracy_scaled(d=100_000, m=256, steps=400, rels=(1e-5, 1e-3, 1e-1),
                    accumulates=("float64", "float32")):
    """float32 window steps against a float64 window over the same stored gradients.

    Gradients with per-coordinate scales spread over four decades (10^-2 .. 10^2, as
    across the layers of a network); lambda = rel * E|g|^2 / m for each rel; ``steps``
    steps each, for each accumulator of the passes (``accumulate``, docs/math.md §7).
    Rows: rel, accumulator, median and max relative error over the steps, the float32
    rounding of the exact result (median), max error / rounding, the engine."""
    out = []
    scales = cp.logspace(-2, 2, d, dtype=cp.float64)
    g2 = float((scales ** 2).sum())
    scales = scales.astype(cp.float32)
    for rel in rels:
        lam = rel * g2 / m
        for acc in accumulates:
            rs = cp.random.RandomState(21)
            w32 = ml.SlidingWindowInverseFisher(d, m, lam, dtype="float32", device="gpu",
                                                accumulate=acc)
            w64 = ml.SlidingWindowInverseFisher(d, m, lam, dtype="float64", device="gpu")
            errs, rnd, ratio = [], [], []
            for _ in range(steps):
                g = rs.standard_normal(d, dtype=cp.float32) * scales
                y = w32.step(g).astype(cp.float64)
                y64 = w64.step(g.astype(cp.float64))
                n64 = float(cp.linalg.norm(y64))
                e = float(cp.linalg.norm(y - y64)) / n64
                r = float(cp.linalg.norm(y64.astype(cp.float32).astype(cp.float64) - y64)) / n64
                errs.append(e)
                rnd.append(r)
                ratio.append(e / r)
            out.append((rel, acc, float(np.median(errs)), max(errs), float(np.median(rnd)),
                        max(ratio), w32.engine))
            del w32, w64
            free()
    return out


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
    acc = {dt: ml.SlidingWindowInverseFisher(8, 1, 1.0, dtype=dt, device="gpu").accumulate
           for dt in ("float32", "bfloat16")}
    lines.append("sliding window (ms; ratio = time / floor, floor = 2 m d bytes / copy bandwidth;"
                 f" the default accumulate here: {acc['float32']} for float32 storage, "
                 f"{acc['bfloat16']} for bfloat16)")
    lines.append(table(["d", "m", "storage", "floor ms", "matvec", "ratio", "update", "ratio",
                        "step", "ratio"], rows))
    key32, key16 = (dims[-1], 1024, "float32"), (dims[-1], 1024, "bfloat16")
    if steps.get(key32) and steps.get(key16):
        lines.append(f"bfloat16 step / float32 step at d={dims[-1]:.0e}, m=1024: "
                     f"{steps[key16] / steps[key32]:.2f}")
    lines.append("")
    for d, m in ((100_000, 256), (100_000, 1024), (1_000_000, 1024)):
        t_gram, t_setup, t_mv, t_raw, t_gemv, t_diag, floor = bench_static(d, m, bw)
        lines.append(f"static, d={d:.0e}, m={m}, float32: set-up {t_setup:.2f} ms, one Gram "
                     f"GEMM {t_gram:.2f} ms, set-up / Gram = {t_setup / t_gram:.2f}; matvec "
                     f"{t_mv:.3f} ms = {t_mv / floor:.2f} x floor (two reads of V) = "
                     f"{t_mv / t_gemv:.2f} x two cuBLAS GEMVs ({t_gemv:.3f} ms), unchecked "
                     f"{t_raw:.3f} ms; diagonal {t_diag:.3f} ms = {2 * t_diag / floor:.2f} x "
                     "one read of V")
    lines.append("")
    brows = []
    for d, m, b in ((1_000_000, 256, 128), (1_000_000, 64, 1024), (1_000_000, 64, 128)):
        bench_block(d, m, b, bw, brows)
    lines.append("block operator, float32, default check_finite (ms; ratio = time / one read "
                 "of V, V: d x min(m, block) values)")
    lines.append(table(["d", "m", "block", "read ms", "matvec", "ratio", "diagonal", "ratio"],
                       brows))
    lines.append("")
    acc, storage_err = accuracy()
    for dtype, err, err_round in acc:
        lines.append(f"accuracy d=1e5 m=1024 {dtype}: |y - y64| / |y64| = {err:.2e} "
                     f"(float32 rounding of the exact result: {err_round:.2e}, "
                     f"ratio {err / err_round:.1f})")
    lines.append(f"bfloat16 storage error (same data, float64 arithmetic): {storage_err:.2e}")
    lines.append("")
    lines.append("float32 window against float64 over the same stored gradients: d=1e5, m=256, "
                 "400 steps, coordinate scales over four decades, lambda = rel E|g|^2 / m")
    arows = [[f"{rel:.0e}", acc, f"{med:.2e}", f"{mx:.2e}", f"{rnd:.2e}", f"{rat:.1f}", eng]
             for rel, acc, med, mx, rnd, rat, eng in accuracy_scaled()]
    lines.append(table(["rel", "accumulate", "median error", "max error", "float32 rounding",
                        "max error / rounding", "engine"], arows))
    text = "\n".join(lines)
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    o = sys.argv[sys.argv.index("--out") + 1] if "--out" in sys.argv else None
    main(quick="--quick" in sys.argv, out=o,
         show_progress=False if "--no-progress" in sys.argv else None)
