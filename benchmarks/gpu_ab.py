"""GPU A/B: this checkout's package against another version of it, in one process.

Same data for both, interleaved rounds (the order alternating), each figure the median
of the per-round medians of CUDA-event timings (15 calls after 2 warm-up calls); the
ratio is new / old (< 1: this checkout is faster).  Rows: the sliding window's matvec,
update and step (float32, bfloat16; d up to 1e7, m up to 4096), the static operator's
set-up, matvec (checked and unchecked) and diagonal, the block operator's matvec and diagonal, and how far the
two versions' results differ.

The other version is a folder holding its ``mfac_linalg`` package, e.g.
``mkdir before && git archive <commit> mfac_linalg | tar -x -C before``; it is copied
under another name (its imports are relative) so both load side by side.

Usage: python benchmarks/gpu_ab.py --before DIR [--rounds N] [--out FILE.md] [--quick]
       [--accumulate auto|float32|float64]
"""
import argparse
import os
import shutil
import sys
import tempfile

import numpy as np

import cupy as cp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import mfac_linalg as new  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu import free, gpu_time as _gpu_time  # noqa: E402

old = None
ROUNDS = 7
ACCUMULATE = "auto"     # the new windows' accumulate (the old version may not have it)


def gpu_time(fn, repeat=15, warmup=2):
    """gpu.py's CUDA-event median, with this script's default counts."""
    return _gpu_time(fn, repeat=repeat, warmup=warmup)


def load_before(folder):
    """Import ``folder/mfac_linalg`` as the package ``mfac_before``."""
    src = os.path.join(folder, "mfac_linalg")
    if not os.path.isdir(src):
        raise SystemExit(f"--before: {folder} holds no mfac_linalg package")
    tmp = tempfile.mkdtemp(prefix="mfac_ab_")
    shutil.copytree(src, os.path.join(tmp, "mfac_before"))
    sys.path.insert(0, tmp)
    import importlib
    return importlib.import_module("mfac_before")



def chunks(d, m, seed):
    rs = cp.random.RandomState(seed)
    c = max(1, (1 << 27) // d)
    for r0 in range(0, m, c):
        yield rs.standard_normal((min(c, m - r0), d), dtype=cp.float32)


def windows(d, m, dtype, lam):
    wn = new.SlidingWindowInverseFisher(d, m, lam, dtype=dtype, device="gpu",
                                        refresh_every=10**9, accumulate=ACCUMULATE)
    wo = old.SlidingWindowInverseFisher(d, m, lam, dtype=dtype, device="gpu",
                                        refresh_every=10**9)
    for blk in chunks(d, m, 0):
        wn.update(blk)
        for r in blk:
            wo.update(r)
    free()
    return wo, wn


def bench(d, m, dtype, lines):
    itemsize = 4 if dtype == "float32" else 2
    if 2.2 * m * d * itemsize > cp.cuda.Device().mem_info[1]:
        return
    lam = 1e-3 * d
    wo, wn = windows(d, m, dtype, lam)
    rs = cp.random.RandomState(1)
    gs = [rs.standard_normal(d, dtype=cp.float32) for _ in range(4)]
    x = gs[0]
    # same state after the same updates: how far old and new agree (float64 reference is
    # not formed here; the accuracy rows of gpu.py do that)
    dmv = float(cp.linalg.norm(wn.matvec(x) - wo.matvec(x)) / cp.linalg.norm(wo.matvec(x)))
    res = {("old", k): [] for k in ("matvec", "update", "step")}
    res.update({("new", k): [] for k in ("matvec", "update", "step")})
    for r in range(ROUNDS):
        order = (("old", wo), ("new", wn)) if r % 2 == 0 else (("new", wn), ("old", wo))
        for name, w in order:
            k = [0]
            def nxt():
                k[0] += 1
                return gs[k[0] % 4]
            res[(name, "matvec")].append(gpu_time(lambda: w.matvec(x)))
            res[(name, "update")].append(gpu_time(lambda: w.update(nxt())))
            res[(name, "step")].append(gpu_time(lambda: w.step(nxt())))
    cells = []
    for k in ("matvec", "update", "step"):
        o, n = np.median(res[("old", k)]), np.median(res[("new", k)])
        cells += [f"{o:.3f}", f"{n:.3f}", f"{n / o:.3f}"]
    line = f"| {d:.0e} | {m} | {dtype} | " + " | ".join(cells) + f" | {dmv:.1e} |"
    lines.append(line)
    print(line, flush=True)


def bench_static(d, m, lines):
    G = cp.random.RandomState(2).standard_normal((m, d), dtype=cp.float32)
    lam = 1e-3 * d
    x = cp.random.RandomState(3).standard_normal(d, dtype=cp.float32)
    res = {k: [] for k in ("os", "ns", "om", "nm", "ou", "nu", "od", "nd")}
    oo = old.StaticInverseFisher(G, lam)
    nn = new.StaticInverseFisher(G, lam)
    ou = old.StaticInverseFisher(G, lam, check_finite=False)
    nu = new.StaticInverseFisher(G, lam, check_finite=False)
    for r in range(ROUNDS):
        pairs = [("o", old, oo, ou), ("n", new, nn, nu)]
        if r % 2:
            pairs.reverse()
        for t, lib, op, raw in pairs:
            res[t + "s"].append(gpu_time(lambda: lib.StaticInverseFisher(G, lam), 5, 1))
            res[t + "m"].append(gpu_time(lambda: op.matvec(x)))
            res[t + "u"].append(gpu_time(lambda: raw.matvec(x)))
            res[t + "d"].append(gpu_time(op.diagonal, 5, 1))
    ref = nn.matvec(x)
    diff = float(cp.abs(oo.matvec(x) - ref).max() / cp.abs(ref).max())
    med = {k: float(np.median(v)) for k, v in res.items()}
    line = (f"| static {d:.0e} | {m} | float32 | set-up {med['os']:.3f} → {med['ns']:.3f} "
            f"({med['ns'] / med['os']:.3f}) | matvec {med['om']:.3f} → {med['nm']:.3f} "
            f"({med['nm'] / med['om']:.3f}) | unchecked {med['ou']:.3f} → {med['nu']:.3f} "
            f"({med['nu'] / med['ou']:.3f}) | diagonal {med['od']:.3f} → {med['nd']:.3f} "
            f"({med['nd'] / med['od']:.3f}) | matvec rel. diff {diff:.1e} |")
    lines.append(line)
    print(line, flush=True)


def bench_block(d, m, b, lines, check=False):
    G = cp.random.RandomState(4).standard_normal((m, d), dtype=cp.float32)
    oo = old.BlockInverseFisher(G, 1.0, block_size=b, check_finite=check)
    nn = new.BlockInverseFisher(G, 1.0, block_size=b, check_finite=check)
    x = cp.random.RandomState(5).standard_normal(d, dtype=cp.float32)
    diff = float(cp.linalg.norm(nn.matvec(x) - oo.matvec(x)) / cp.linalg.norm(oo.matvec(x)))
    res = {k: [] for k in ("om", "nm", "od", "nd")}
    for r in range(ROUNDS):
        pairs = [("o", oo), ("n", nn)]
        if r % 2:
            pairs.reverse()
        for t, op in pairs:
            res[t + "m"].append(gpu_time(lambda: op.matvec(x)))
            res[t + "d"].append(gpu_time(op.diagonal, 5, 1))
    med = {k: float(np.median(v)) for k, v in res.items()}
    line = (f"| block {d:.0e} | m={m} b={b} | float32, check_finite={check} | matvec {med['om']:.3f} → {med['nm']:.3f}"
            f" ({med['nm'] / med['om']:.3f}) | diagonal {med['od']:.3f} → {med['nd']:.3f} "
            f"({med['nd'] / med['od']:.3f}) | rel. diff {diff:.1e} |")
    lines.append(line)
    print(line, flush=True)


def main():
    global old, ROUNDS, ACCUMULATE
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", required=True, help="folder holding the other mfac_linalg")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--out", help="also write the table to this Markdown file")
    p.add_argument("--quick", action="store_true", help="d <= 1e6, m <= 1024")
    p.add_argument("--accumulate", default="auto", choices=("auto", "float32", "float64"),
                   help="the new windows' accumulate (default auto)")
    args = p.parse_args()
    old, ROUNDS, ACCUMULATE = load_before(args.before), args.rounds, args.accumulate
    lines = [f"device: {cp.cuda.runtime.getDeviceProperties(0)['name'].decode()}, "
             f"rounds {ROUNDS}, each a median of 15 calls after 2 warm-up calls; new windows: "
             f"accumulate={ACCUMULATE}",
             "", "| d | m | storage | matvec old | new | new/old | update old | new | new/old "
             "| step old | new | new/old | matvec old vs new rel. diff |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    dims = (100_000, 1_000_000) if args.quick else (100_000, 1_000_000, 10_000_000)
    cases = [(d, m) for d in dims for m in (256, 1024)]
    if not args.quick:
        cases += [(100_000, 4096), (1_000_000, 4096)]
    for d, m in cases:
        for dtype in ("float32", "bfloat16"):
            bench(d, m, dtype, lines)
            free()
    lines.append("")
    for d, m in ((100_000, 256), (100_000, 1024), (1_000_000, 1024)):
        bench_static(d, m, lines)
        free()
    for d, m, b in ((1_000_000, 256, 128), (1_000_000, 64, 1024)):
        for check in (False, True):
            bench_block(d, m, b, lines, check)
            free()
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
