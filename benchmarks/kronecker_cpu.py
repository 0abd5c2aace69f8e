"""Build cost of the Kronecker approximations relative to K-FAC (CPU, float64).

For dense layers of several sizes (n samples, d_in = d_out = d) and one convolution-shaped
layer (T positions per sample), time every builder at its default tolerance and print the
median build time / K-FAC's, with the number of R(F) products (single matrices) the
iterative ones needed.  Data: rows with a decaying spectrum (the shape of real activations),
so the singular values of R(F) are not artificially close.  Times are CPU seconds of this
process (``time.process_time``, medians of interleaved rounds) with single-threaded BLAS: on a
shared machine wall time mostly measures the other processes, and idle BLAS threads that
spin would be counted as CPU time.

Then, where curvlinops and torch are installed, K-FAC with pi damping against curvlinops'
``KFACInverseLinearOperator`` (build and one product; ``vs_curvlinops``).

Run:  python benchmarks/kronecker_cpu.py [--quick] [--no-progress]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")      # before NumPy loads BLAS: see the docstring

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from _timing import table  # noqa: E402

import mfac_linalg as ml  # noqa: E402
from mfac_linalg._progress import progress  # noqa: E402

BUILDERS = [("EKFAC", ml.ekfac, {}), ("KPSVD", ml.kpsvd, {}),
            ("deflation", ml.deflation, {}),
            ("deflation seq.", ml.deflation, {"solver": "sequential"}),
            ("Lanczos", ml.lanczos, {}), ("K-FAC corr.", ml.kfac_corrected, {})]


def layer(rng, n, d_in, d_out, T=None):
    shape = (n,) if T is None else (n, T)
    a = rng.standard_normal(shape + (d_in,)) * np.linspace(0.2, 2.0, d_in) ** 2
    g = rng.standard_normal(shape + (d_out,)) * np.linspace(0.1, 1.5, d_out) ** 2
    return a, g


def cpu_compare(fns, rounds):
    """Median CPU seconds of each function, timed in interleaved rounds after one warm-up."""
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t = time.process_time()
            fn()
            times[k].append(time.process_time() - t)
    return {k: float(np.median(v)) for k, v in times.items()}


def run(sizes, rounds, seed=0, show_progress=None):
    """The table's rows, one per size; ``show_progress``: a bar on stderr over the sizes
    (None: only on a terminal with tqdm installed; False: never)."""
    rng = np.random.default_rng(seed)
    rows = []
    for n, d, T in progress(sizes, desc="Kronecker CPU sizes", enabled=show_progress):
        a, g = layer(rng, n, d, d, T)
        fns = {"K-FAC": lambda: ml.kfac(a, g, 1e-3, bias=True)}
        for name, build, kw in BUILDERS:
            fns[name] = (lambda b=build, k=kw: b(a, g, 1e-3, bias=True, **k))
        t = cpu_compare(fns, rounds)
        prods = {name: build(a, g, 1e-3, bias=True, **kw).info.get("products", 0)
                 for name, build, kw in BUILDERS}
        rows.append([f"{n}", f"{d + 1}x{d}", "-" if T is None else str(T),
                     f"{t['K-FAC'] * 1e3:.2f}"]
                    + [f"{t[name] / t['K-FAC']:.1f} ({prods[name]})" for name, _, _ in BUILDERS])
    return rows


LARGE = [("KPSVD", ml.kpsvd, {}), ("deflation", ml.deflation, {}), ("Lanczos", ml.lanczos, {}),
         ("K-FAC corr.", ml.kfac_corrected, {})]
#: the same builders forced into the matrix space (the solver before the samples'
#: coordinates), on the first large layer only (at d = 1024 one two-term build takes a minute)
MATRICES = [("KPSVD", ml.kpsvd), ("deflation", ml.deflation)]


@contextlib.contextmanager
def space(where):
    """Force the KPSVD family's choice of space ("samples" or "matrices"; None: the cost
    model's) for the builds inside."""
    from mfac_linalg.kronecker import gram
    saved = gram.gram_cheaper
    if where is not None:
        gram.gram_cheaper = lambda layer, k, close=False: where == "samples"
    try:
        yield
    finally:
        gram.gram_cheaper = saved


def large(sizes, rounds, seed=1, show_progress=None):
    """The default iterative builders on the issue's layers (n = 4096, D = 512 / 1024):
    build time / K-FAC's (R products and the space the solver ran in, "s" for the
    samples' coordinates and "m" for the matrices, in brackets), as :func:`run` without the
    slow sequential and subspace variants; on the first layer also KPSVD and deflation
    forced into the matrix space, timed in the same rounds."""
    rng = np.random.default_rng(seed)
    rows = []
    for i, (n, d) in enumerate(progress(sizes, desc="large layers", enabled=show_progress)):
        a, g = layer(rng, n, d, d)
        fns = {"K-FAC": lambda: ml.kfac(a, g, 1e-3, bias=True)}
        for name, build, kw in LARGE:
            fns[name] = (lambda b=build, k=kw: b(a, g, 1e-3, bias=True, **k))
        if i == 0:
            for name, build in MATRICES:
                def forced(b=build):
                    with space("matrices"):
                        return b(a, g, 1e-3, bias=True)
                fns[name + ", matrices"] = forced
        t = cpu_compare(fns, rounds)
        ops = {name: fns[name]() for name in fns if name != "K-FAC"}
        cells = [f"{n}", f"{d + 1}x{d}", f"{t['K-FAC'] * 1e3:.1f}"]
        for name, _, _ in LARGE:
            info = ops[name].info
            cells.append(f"{t[name] / t['K-FAC']:.1f} ({info['products']}, "
                         f"{info['space'][0]})")
        for name, _ in MATRICES:
            key = name + ", matrices"
            cells.append(f"{t[key] / t['K-FAC']:.1f} ({ops[key].info['products']})"
                         if key in t else "-")
        rows.append(cells)
    return rows


def vs_curvlinops(sizes, rounds, lam=1e-3):
    """K-FAC against curvlinops' ``KFACInverseLinearOperator`` on one ``nn.Linear(D, D)``
    with bias, float64, single-threaded torch and BLAS, for both damping modes: pi
    (``use_heuristic_damping=True``: the same split) and exact (``use_exact_damping=True``).

    Build: ours ``kfac(activations, output_grads, lam, bias=True, damping_mode=...)`` from
    the captured inputs and per-sample output gradients; theirs ``KFACLinearOperator`` on
    the model and data (its forward and backward pass included: that is how its factors
    are obtained) plus the inverse and its first product (which computes the cached
    inverse).  Apply: one vector of D (D + 1) entries.  "before" (pi rows) is our
    eigendecomposition route, the pi form before this release (still taken with
    ``indefinite="clip"``).  Rows: mode, D, n, median CPU ms of each and ours / theirs.
    None if curvlinops or torch is missing."""
    try:
        import torch
        from curvlinops import KFACInverseLinearOperator, KFACLinearOperator
    except ImportError:
        return None
    torch.set_num_threads(1)
    rows = []
    for mode in ("pi", "exact"):
        for D, n in sizes:
            torch.manual_seed(0)
            lin = torch.nn.Linear(D, D).double()
            X = torch.randn(n, D, dtype=torch.float64)
            Y = torch.randn(n, D, dtype=torch.float64)
            loss = torch.nn.MSELoss(reduction="sum")
            with torch.no_grad():
                g = 2.0 * (lin(X) - Y)              # per-sample output gradients of the sum
            a, gn = X.numpy(), g.numpy()
            v = torch.randn(D * (D + 1), dtype=torch.float64)
            V = v.numpy().reshape(D, D + 1)
            kw = ({"use_heuristic_damping": True} if mode == "pi"
                  else {"use_exact_damping": True})

            def theirs(kw=kw, lin=lin, loss=loss, X=X, Y=Y, v=v):
                K = KFACLinearOperator(lin, loss, [lin.weight, lin.bias], [(X, Y)],
                                       fisher_type="empirical", separate_weight_and_bias=False,
                                       check_deterministic=False)
                inv = KFACInverseLinearOperator(K, damping=lam, **kw)
                inv @ v
                return inv

            def ours(a=a, gn=gn, mode=mode):
                return ml.kfac(a, gn, lam, bias=True, damping_mode=mode)

            def before(a=a, gn=gn):
                return ml.kfac(a, gn, lam, bias=True, indefinite="clip")
            ops = {"ours": ours(), "theirs": theirs(), "before": before()}
            fns = {"build ours": ours, "build theirs": theirs,
                   "apply ours": lambda: ops["ours"].matvec(V),
                   "apply theirs": lambda: ops["theirs"] @ v}
            if mode == "pi":
                fns.update({"build before": before,
                            "apply before": lambda: ops["before"].matvec(V)})
            t = cpu_compare(fns, rounds)
            row = [mode, str(D), str(n)]
            for what in ("build", "apply"):
                o, th = t[f"{what} ours"], t[f"{what} theirs"]
                b = t.get(f"{what} before")
                row += [f"{o * 1e3:.1f}", "-" if b is None else f"{b * 1e3:.1f}",
                        f"{th * 1e3:.1f}", f"{o / th:.2f}"]
            rows.append(row)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes, few rounds")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args()
    if args.quick:
        sizes, rounds = [(500, 16, None), (200, 8, 9)], 3
    else:
        sizes, rounds = [(1000, 32, None), (1000, 64, None), (256, 16, 16)], 3
    header = ["n", "(d_in+1)xd_out", "T", "K-FAC CPU ms"] + [f"{name} /K-FAC (R prods)"
                                                        for name, _, _ in BUILDERS]
    print(table(header, run(sizes, rounds,
                            show_progress=False if args.no_progress else None)))
    big = [(1000, 128)] if args.quick else [(4096, 512), (4096, 1024)]
    print("\nDefault iterative builders on larger layers (build / K-FAC; R products, space: "
          "s = samples' coordinates, m = matrices)")
    print(table(["n", "(d_in+1)xd_out", "K-FAC CPU ms"]
                + [f"{name} /K-FAC" for name, _, _ in LARGE]
                + [f"{name}, matrices /K-FAC" for name, _ in MATRICES],
                large(big, rounds, show_progress=False if args.no_progress else None)))
    cl = vs_curvlinops([(256, 1024)] if args.quick else [(512, 4096), (1024, 4096)],
                       3 if args.quick else 5)
    if cl is None:
        print("\ncurvlinops or torch not installed: no comparison with it")
    else:
        print("\nK-FAC against curvlinops (CPU ms, single-threaded; ours / theirs)")
        print(table(["damping", "D", "n", "build ours", "before", "curvlinops", "ours/theirs",
                     "apply ours", "before", "curvlinops", "ours/theirs"], cl))


if __name__ == "__main__":
    main()
