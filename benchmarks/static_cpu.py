"""Static inverse Fisher on the CPU: ratios against the memory floor and a dense solve.

For each (d, m), float32 gradients, one run, medians after warm-up:

* IHVP / floor: ``op.matvec(x)`` over the time of two raw GEMVs on the same
  (m, d) matrix (``V @ x`` then ``V.T @ u``), measured in the same run: the
  memory floor of any method that reads the gradients twice.
* set-up / (Gram + trsm): building the operator over the time of the Gram
  product ``G @ G.T`` plus one BLAS triangular solve with the same shapes.
* speed-up over dense: (form F + Cholesky + one solve) over (set-up + one
  IHVP), where d allows a dense d x d matrix.

Usage: python benchmarks/static_cpu.py [--quick]
"""
import sys

import numpy as np
import scipy.linalg as sla
from scipy.linalg import blas

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _timing import compare, median_time, table  # noqa: E402

import mfac_linalg as ml  # noqa: E402

SIZES = [(2_000, 256), (5_000, 512), (100_000, 100), (10_000, 1_024), (1_000_000, 64),
         (1_000_000, 256), (300_000, 1_024)]
QUICK = [(2_000, 256), (100_000, 100), (10_000, 1_024)]


def run(sizes):
    rng = np.random.default_rng(0)
    rows = []
    for d, m in sizes:
        G = rng.standard_normal((m, d), dtype=np.float32)
        lam = 1e-3 * float((G * G).sum()) / m / d
        x = rng.standard_normal(d, dtype=np.float32)
        rep = 3 if d * m >= 1e8 else 7
        op = ml.StaticInverseFisher(G, lam)
        V = op._V
        t = compare({"gemv": lambda: V.T @ (V @ x), "ihvp": lambda: op.matvec(x)},
                    rounds=max(rep * 3, 21))
        t_gemv, t_ihvp = t["gemv"], t["ihvp"]
        L32 = np.linalg.cholesky(G @ G.T + m * lam * np.eye(m, dtype=np.float32))
        t = compare({"gram": lambda: G @ G.T,
                     "trsm": lambda: blas.strsm(1.0, L32, G.T, side=1, lower=1, trans_a=1),
                     "setup": lambda: ml.StaticInverseFisher(G, lam)}, rounds=rep)
        t_gram, t_trsm, t_setup = t["gram"], t["trsm"], t["setup"]
        dense = "-"
        if d <= 5_000:
            def dense_solve():
                F = G.T @ G / m
                F[np.diag_indices(d)] += lam
                return sla.cho_solve(sla.cho_factor(F, lower=True), x)
            t_dense = median_time(dense_solve, repeat=3)
            dense = f"{t_dense / (t_setup + t_ihvp):.1f}x"
        rows.append([f"{d:,}", f"{m:,}", f"{d * m:.1e}", f"{t_ihvp * 1e3:.3f}",
                     f"{t_gemv * 1e3:.3f}", f"{t_ihvp / t_gemv:.2f}", f"{t_setup * 1e3:.1f}",
                     f"{(t_gram + t_trsm) * 1e3:.1f}", f"{t_setup / (t_gram + t_trsm):.2f}", dense])
        print(f"  done d={d} m={m}", file=sys.stderr, flush=True)
    print(table(["d", "m", "d*m", "IHVP ms", "2 GEMV ms", "IHVP/floor", "set-up ms",
                 "Gram+trsm ms", "set-up/(Gram+trsm)", "vs dense"], rows))


if __name__ == "__main__":
    run(QUICK if "--quick" in sys.argv else SIZES)
