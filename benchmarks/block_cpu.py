"""Block and diagonal rows on the CPU: ratios to a floor and to the published baseline.

One run, float32 gradients, medians over interleaved rounds (``_timing.compare``):

* diagonal / floor: ``op.diagonal()`` of the static and block operators over one
  multi-threaded BLAS pass over the stored factor V (``ones @ V``: a GEMV reading V
  once), and the single-threaded ``einsum`` the operators used before (the
  "before" column), all on the same V in the same rounds; "alone" times ours and the
  floor each in its own block of rounds (interleaved, the threaded pass shares the
  cores with OpenBLAS's threads, which still spin after the floor's GEMV).  Ours is
  the compiled pass of ``kernels/host.py`` where Numba is installed (the first line
  says which), else ``einsum`` threaded from 2^25 elements.
* block / baseline (d = 1e6, m = 64, B = 128 and 1024): set-up, IHVP and diagonal of
  ``BlockInverseFisher`` over a baseline written here that follows the published
  M-FAC block code: the gradients copied into (nblocks, m, B) order, then the
  rank-one Woodbury recursion over the m gradients, batched over blocks
  (H_k g_i and the m denominators), IHVP x/lambda minus one batched product pair,
  diagonal as a loop over the m rows; in PyTorch (CPU, its default threads) when
  it is installed, else NumPy.
* peak memory (whole process: its high-water RSS, VmHWM, in a fresh
  subprocess) of the set-up at d = 1e6, m = 64: ours without and with
  ``overwrite_grads=True``, and the baseline (static: the published static
  recursion, which reuses the gradients' buffer), each also as the increase over
  the process after the gradients exist.

Usage: python benchmarks/block_cpu.py [--quick] [--no-memory]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Dict, List

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import compare, table  # noqa: E402

import mfac_linalg as ml  # noqa: E402

try:
    import torch
except ImportError:  # the baseline then runs in NumPy
    torch = None


# -- the baseline: the published block recursion, in our own words ----------------------
class Baseline:
    """Rank-one Woodbury recursion per block, batched over blocks (torch or NumPy).

    For block k with gradients g_1..g_m (rows of Gb[k], (m, B)) and
    H_0 = I / lambda, it keeps u_i = H_{i-1} g_i and s_i = m + g_i . u_i, so that
    F_k^{-1} = I / lambda - sum_i u_i u_i^T / s_i.
    """

    def __init__(self, G: np.ndarray, damping: float, block_size: int):
        m, d = G.shape
        nb = d // block_size
        self.tail = d - nb * block_size          # a last smaller block, as the original
        self.lam_inv = 1.0 / damping
        lib = torch if torch is not None else np
        cols = G[:, :nb * block_size]
        if torch is not None:
            Gt = torch.from_numpy(np.ascontiguousarray(cols))
            Gb = Gt.reshape(m, nb, block_size).permute(1, 0, 2).contiguous()   # (nb, m, B)
        else:
            Gb = np.ascontiguousarray(cols.reshape(m, nb, block_size).transpose(1, 0, 2))
        U = Gb                                                         # overwritten in place
        s = lib.zeros((nb, m), dtype=Gb.dtype)
        for i in range(m):
            g = Gb[:, i, :].clone() if torch is not None else Gb[:, i, :].copy()
            u = g * self.lam_inv
            if i:
                c = (U[:, :i, :] @ g[:, :, None])[:, :, 0] / s[:, :i]        # (nb, i)
                u -= (c[:, None, :] @ U[:, :i, :])[:, 0, :]
            U[:, i, :] = u
            s[:, i] = m + (g * u).sum(-1)
        self.U, self.s, self.nb, self.B = U, s, nb, block_size
        if self.tail:   # the last block, alone (as the original does)
            self.last = Baseline(np.ascontiguousarray(G[:, nb * block_size:]), damping,
                                 self.tail)

    def _x(self, x):
        return torch.from_numpy(x) if torch is not None else x

    def mul(self, x: np.ndarray):
        X = self._x(x[:self.nb * self.B]).reshape(self.nb, self.B)
        c = (self.U @ X[:, :, None])[:, :, 0] / self.s
        res = X * self.lam_inv - (c[:, None, :] @ self.U)[:, 0, :]
        out = [res.reshape(-1)]
        if self.tail:
            out.append(self.last.mul(x[self.nb * self.B:]))
        return torch.cat(out) if torch is not None else np.concatenate(out)

    def diag(self):
        lib = torch if torch is not None else np
        res = lib.full((self.nb, self.B), self.lam_inv, dtype=self.U.dtype)
        for i in range(self.U.shape[1]):
            res -= self.U[:, i, :] ** 2 / self.s[:, i, None]
        out = [res.reshape(-1)]
        if self.tail:
            out.append(self.last.diag())
        return torch.cat(out) if torch is not None else np.concatenate(out)


# -- timings -------------------------------------------------------------------------------
def diag_rows(sizes, rounds) -> List[List[str]]:
    rows = []
    for label, d, m, B in sizes:
        rng = np.random.default_rng(0)
        G = rng.standard_normal((m, d), dtype=np.float32)
        lam = 1e-3 * float(np.einsum("ij,ij->", G, G, dtype=np.float64)) / m / d
        op = (ml.StaticInverseFisher(G, lam) if B is None
              else ml.BlockInverseFisher(G, lam, block_size=B))
        del G
        Vs = [V for *_, V in op.lowrank_batches()]
        V = max(Vs, key=lambda a: a.size)           # the big stack (the static: the one)
        V2 = V.reshape(-1, V.shape[-1])
        ones = np.ones(V2.shape[0], dtype=V.dtype)
        spec = "nrb,nrb->nb"
        t = compare({"floor": lambda: ones @ V2, "ours": op.diagonal,
                     "before": lambda: [np.einsum(spec, W, W) for W in Vs]}, rounds=rounds)
        # each alone, in blocks of rounds: interleaved, the threaded pass runs while
        # OpenBLAS's threads still spin after the floor's GEMV and share the cores with it
        alone = {k: compare({k: fn}, rounds=rounds)[k]
                 for k, fn in (("ours", op.diagonal), ("floor", lambda: ones @ V2))}
        rows.append([label, f"{d:,}", f"{m}", "-" if B is None else f"{B}",
                     f"{t['ours'] * 1e3:.2f}", f"{t['before'] * 1e3:.2f}",
                     f"{t['floor'] * 1e3:.2f}", f"{t['ours'] / t['floor']:.2f}",
                     f"{t['before'] / t['floor']:.2f}",
                     f"{alone['ours'] / alone['floor']:.2f}"])
    return rows


def block_rows(d, m, Bs, rounds) -> List[List[str]]:
    rows = []
    for B in Bs:
        rng = np.random.default_rng(1)
        G = rng.standard_normal((m, d), dtype=np.float32)
        lam = 1e-3 * float(np.einsum("ij,ij->", G, G, dtype=np.float64)) / m / d
        x = rng.standard_normal(d, dtype=np.float32)
        t_set = compare({"ours": lambda: ml.BlockInverseFisher(G, lam, block_size=B),
                         "base": lambda: Baseline(G, lam, B)}, rounds=max(3, rounds // 3))
        op = ml.BlockInverseFisher(G, lam, block_size=B)
        base = Baseline(G, lam, B)
        # the two agree (float32): a check that the baseline computes the same F^-1
        yb = np.asarray(base.mul(x))
        err = float(np.linalg.norm(op.matvec(x) - yb) / np.linalg.norm(yb))
        derr = float(np.max(np.abs(op.diagonal() - np.asarray(base.diag()))
                            / np.abs(np.asarray(base.diag()))))
        assert err < 1e-3 and derr < 1e-3, (err, derr)
        t = compare({"ours_mv": lambda: op.matvec(x), "base_mv": lambda: base.mul(x),
                     "ours_dg": op.diagonal, "base_dg": base.diag}, rounds=rounds)
        for what, o, b in [("set-up", t_set["ours"], t_set["base"]),
                           ("IHVP", t["ours_mv"], t["base_mv"]),
                           ("diagonal", t["ours_dg"], t["base_dg"])]:
            rows.append([f"{B}", what, f"{o * 1e3:.2f}", f"{b * 1e3:.2f}", f"{o / b:.2f}"])
        rows.append([f"{B}", "(ours vs baseline)", f"IHVP {err:.1e}", f"diag {derr:.1e}", ""])
        del op, base, G
    return rows


# -- peak memory (subprocesses) -------------------------------------------------------------
_MEM = r"""
import json, resource, sys
import numpy as np
kind, B, ow = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
def rss():
    # the high-water mark of this process's own memory (VmHWM: it starts afresh at
    # exec, where getrusage's maxrss keeps the parent's)
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
if kind == "base":
    sys.path.insert(0, sys.argv[4])
    import block_cpu as bc
else:
    import mfac_linalg as ml
G = np.random.default_rng(0).standard_normal((64, 1_000_000), dtype=np.float32)
before = rss()
if kind == "ours":
    op = (ml.StaticInverseFisher(G, 1e-3, overwrite_grads=ow) if B == 0
          else ml.BlockInverseFisher(G, 1e-3, block_size=B, overwrite_grads=ow))
elif B == 0:
    op = bc.static_baseline(G, 1e-3)
else:
    op = bc.Baseline(G, 1e-3, B)
print(json.dumps({"peak": rss(), "over": rss() - before}))
"""


def static_baseline(G: np.ndarray, damping: float):
    """The published static recursion (no blocks), reusing G's buffer for the u_i, in
    torch when installed (else NumPy): returns (U, s)."""
    m, _ = G.shape
    U = torch.from_numpy(G) if torch is not None else G
    s = [0.0] * m
    for i in range(m):
        g = U[i].clone() if torch is not None else U[i].copy()
        u = g / damping
        if i:
            c = (U[:i] @ g) / (torch.tensor(s[:i], dtype=U.dtype) if torch is not None
                             else np.array(s[:i]))
            u -= c.to(U.dtype) @ U[:i] if torch is not None else (c @ U[:i]).astype(U.dtype)
        U[i] = u
        s[i] = m + float((g * u).sum())
    return U, s


def memory_rows() -> List[List[str]]:
    here = os.path.dirname(os.path.abspath(__file__))
    rows = []
    for label, kind, B, ow in [("static, ours", "ours", 0, "0"),
                               ("static, ours, overwrite_grads", "ours", 0, "1"),
                               ("static, baseline", "base", 0, "0"),
                               ("block B=128, ours", "ours", 128, "0"),
                               ("block B=128, ours, overwrite_grads", "ours", 128, "1"),
                               ("block B=128, baseline", "base", 128, "0"),
                               ("block B=1024, ours", "ours", 1024, "0"),
                               ("block B=1024, ours, overwrite_grads", "ours", 1024, "1"),
                               ("block B=1024, baseline", "base", 1024, "0")]:
        out = subprocess.run([sys.executable, "-c", _MEM, kind, str(B), ow, here],
                             capture_output=True, text=True, check=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        rows.append([label, f"{r['peak']:.0f}", f"{r['over']:.0f}"])
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer sizes and rounds")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory rows")
    args = p.parse_args(argv)
    rounds = 7 if args.quick else 15
    from mfac_linalg.kernels import host
    print(f"baseline: {'torch ' + torch.__version__ if torch is not None else 'NumPy'}; "
          f"{os.cpu_count()} CPUs; float32; host diagonals: "
          f"{'compiled (Numba)' if host.available() else 'numpy.einsum'}")
    sizes = [("static", 1_000_000, 64, None), ("block", 1_000_000, 64, 128),
             ("block", 1_000_000, 64, 1024)]
    if not args.quick:
        sizes[1:1] = [("static", 1_000_000, 256, None), ("static", 100_000, 100, None)]
    print("\nDiagonal against one read of V (ones @ V) and the single-threaded einsum:")
    print(table(["operator", "d", "m", "B", "ours ms", "einsum ms", "floor ms",
                 "ours/floor", "einsum/floor", "alone: ours/floor"], diag_rows(sizes, rounds)))
    print("\nBlock operator against the baseline, d = 1e6, m = 64:")
    print(table(["B", "what", "ours ms", "baseline ms", "ours/baseline"],
                block_rows(1_000_000, 64, [128, 1024], rounds)))
    if not args.no_memory:
        print("\nPeak memory of the set-up, d = 1e6, m = 64 float32 (G itself: 244 MiB):")
        print(table(["set-up", "peak RSS MiB", "over G MiB"], memory_rows()))


if __name__ == "__main__":
    main()
