"""Sliding-window inverse Fisher on the CPU: update/step cost against window size and floor.

Table 1 (dim = 1e4, float32): median update and step times for
m in {128, 256, 512, 1024, 2048}, once the window is full, and the ratio of
successive update times: the O(dim m) part doubles with m, the O(m^2) part
quadruples, an O(m^3) refactorization would grow 8x per doubling.  The
acceptance ratio is update(2048) / update(512) (quadratic: 16, cubic: 64).

Table 2 (large dim): step time over two raw GEMVs on the same (m, dim)
buffer (the memory floor: any method reads the buffer twice), measured in
interleaved rounds in the same run.

Table 3 (torch installed): update and step against a baseline that follows the
published M-FAC dynamic algorithm (``HInvFastUpMulti``: write g, one GEMV for the Gram
row, then its O(m^3) ``setup``: an LU of the m x m matrix without pivoting and the
coefficient recursion, in torch), same gradients, interleaved rounds.  torch has no
LU without pivoting on the CPU; the baseline takes it from the Cholesky factor of the
same (symmetric positive definite) matrix, which is the same factorisation.

Table 4: ``accumulate="float64"`` (float64-faithful passes over the float32 buffer,
docs/math.md §7) against ``"float32"``, step and matvec, interleaved rounds; with
Numba installed the float64 passes are the compiled kernels (``kernels/host.py``) and
the table also times the NumPy route (float64 BLAS over converted chunks,
``MFAC_LINALG_NUMBA=0``); the error column is |y - y64| / |y64| over the float32
rounding of y64 for a window of the same gradients in float64.

Times are medians over incremental updates; the exact refresh (every
``window`` updates by default, O(m^3)) is reported separately, amortised.

Usage: python benchmarks/sliding_cpu.py [--quick]
"""
import sys
import time

import numpy as np

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _timing import compare, table  # noqa: E402

import mfac_linalg as ml  # noqa: E402


def filled(dim, m, rng, refresh_every=None):
    """A full window in one set-up (from_gradients: one Gram product, one factorisation)."""
    return ml.SlidingWindowInverseFisher.from_gradients(
        rng.standard_normal((m, dim), dtype=np.float32), 1e-3,
        refresh_every=refresh_every or 10**9)


def scaling(dim, windows, rng):
    rows, upd = [], {}
    for m in windows:
        w = filled(dim, m, rng)
        gs = rng.standard_normal((64, dim), dtype=np.float32)
        k = [0]

        def nxt():
            k[0] += 1
            return gs[k[0] % 64]
        reps = 31 if m <= 1024 else 15
        t = compare({"update": lambda: w.update(nxt()), "step": lambda: w.step(nxt())},
                    rounds=reps)
        t0 = time.perf_counter()
        w.refresh()
        t_ref = time.perf_counter() - t0
        upd[m] = t["update"]
        prev = upd.get(m // 2)
        rows.append([f"{m:,}", f"{t['update'] * 1e3:.2f}", f"{t['step'] * 1e3:.2f}",
                     f"{t['update'] / prev:.2f}" if prev else "-",
                     f"{t_ref * 1e3:.1f}", f"{t_ref / m * 1e3:.3f}"])
        print(f"  done m={m}", file=sys.stderr, flush=True)
    print(f"dim = {dim:,}, float32, medians of incremental updates")
    print(table(["m", "update ms", "step ms", "update(m)/update(m/2)", "refresh ms",
                 "refresh/m ms"], rows))
    if 512 in upd and 2048 in upd:
        print(f"update(2048) / update(512) = {upd[2048] / upd[512]:.1f}  "
              "(quadratic 16, cubic 64; target <= 24)")
    print()


def floor(sizes, rng):
    rows = []
    for dim, m in sizes:
        w = filled(dim, m, rng)
        G = w.gradients()               # a copy of the buffer: the same bytes, same layout
        x = rng.standard_normal(dim, dtype=np.float32)
        gs = rng.standard_normal((8, dim), dtype=np.float32)
        k = [0]

        def nxt():
            k[0] += 1
            return gs[k[0] % 8]
        t = compare({"gemv": lambda: G.T @ (G @ x), "step": lambda: w.step(nxt()),
                     "matvec": lambda: w.matvec(x)}, rounds=15)
        rows.append([f"{dim:,}", f"{m:,}", f"{dim * m:.1e}", f"{t['step'] * 1e3:.2f}",
                     f"{t['matvec'] * 1e3:.2f}", f"{t['gemv'] * 1e3:.2f}",
                     f"{t['step'] / t['gemv']:.2f}", f"{t['matvec'] / t['gemv']:.2f}"])
        print(f"  done dim={dim} m={m}", file=sys.stderr, flush=True)
    print("large dim, float32: step and matvec over two raw GEMVs on the buffer")
    print(table(["dim", "m", "dim*m", "step ms", "matvec ms", "2 GEMV ms", "step/floor",
                 "matvec/floor"], rows))


class Published:
    """The published dynamic algorithm (one device), in torch: ``update`` writes g into
    the oldest slot, takes its Gram row with one GEMV and reruns ``setup``; ``update_mul``
    also returns F^{-1} g, F = damp I + G^T G / m."""

    def __init__(self, grads, damp):
        import torch
        self.torch = torch
        self.m, self.d = grads.shape
        self.lambd = 1.0 / damp
        self.grads = grads.clone()
        self.dots = self.grads @ self.grads.T
        self.last = 0
        self.coef = self.lambd * torch.eye(self.m, dtype=grads.dtype)
        self.setup()

    def setup(self):
        torch = self.torch
        diag = torch.diag(torch.full([self.m], float(self.m), dtype=self.dots.dtype))
        A = self.lambd * self.dots + diag
        L = torch.linalg.cholesky(A)          # LU without pivoting: U = diag(L) L^T
        U = torch.diagonal(L)[:, None] * L.T
        self.giHig = torch.triu(U - diag)
        self.denom = self.m + torch.diagonal(self.giHig)
        tmp = -self.giHig.t().contiguous() / self.denom.reshape((1, -1))
        for i in range(max(self.last, 1), self.m):
            self.coef[i, :i] = tmp[i, :i].matmul(self.coef[:i, :i])

    def mul(self, x, dots=None):
        if dots is None:
            dots = self.grads @ x
        giHix = self.lambd * dots
        for i in range(1, self.m):
            giHix[i:].sub_(self.giHig[i - 1, i:], alpha=giHix[i - 1] / self.denom[i - 1])
        return self.lambd * x - (giHix / self.denom).matmul(self.coef) @ self.grads

    def _replace(self, g):
        """Write g into the oldest slot, set its Gram row and rerun ``setup``; returns
        G g (the slot index advances after the caller is done)."""
        self.grads[self.last, :] = g
        tmp = self.grads @ g
        self.dots[self.last, :] = tmp
        self.dots[:, self.last] = tmp
        self.setup()
        return tmp

    def update(self, g):
        self._replace(g)
        self.last = (self.last + 1) % self.m

    def update_mul(self, g):
        res = self.mul(g, self._replace(g))
        self.last = (self.last + 1) % self.m
        return res


def vs_published(sizes, rng, damp=1e-3):
    try:
        import torch
    except ImportError:
        print("torch is not installed: no comparison with the published algorithm")
        return
    rows = []
    for dim, m in sizes:
        G = rng.standard_normal((m, dim), dtype=np.float32)
        w = ml.SlidingWindowInverseFisher.from_gradients(G, damp)
        peer = Published(torch.from_numpy(G), damp)
        x = rng.standard_normal(dim, dtype=np.float32)
        err = float(np.linalg.norm(peer.mul(torch.from_numpy(x)).numpy() - w.matvec(x))
                    / np.linalg.norm(w.matvec(x)))
        del G
        # distinct gradients for every push of a run (32 per object): repeats would make
        # the window's Gram matrix rank-deficient, which the float32 baseline cannot factor
        gs = rng.standard_normal((64, dim), dtype=np.float32)
        gts = [torch.from_numpy(r) for r in gs]
        k = [0]

        def nxt(seq):
            k[0] += 1
            return seq[k[0] % 64]
        t = compare({"ours update": lambda: w.update(nxt(gs)),
                     "peer update": lambda: peer.update(nxt(gts)),
                     "ours step": lambda: w.step(nxt(gs)),
                     "peer step": lambda: peer.update_mul(nxt(gts))}, rounds=15)
        rows.append([f"{dim:,}", f"{m:,}", f"{t['ours update'] * 1e3:.2f}",
                     f"{t['peer update'] * 1e3:.2f}",
                     f"{t['ours update'] / t['peer update']:.2f}",
                     f"{t['ours step'] * 1e3:.2f}", f"{t['peer step'] * 1e3:.2f}",
                     f"{t['ours step'] / t['peer step']:.2f}", f"{err:.1e}"])
        print(f"  done dim={dim} m={m}", file=sys.stderr, flush=True)
        del w, peer
    print(f"against the published dynamic algorithm in torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), float32, damping {damp}")
    print(table(["dim", "m", "ours update ms", "peer update ms", "ours/peer",
                 "ours step ms", "peer step ms", "ours/peer", "matvec rel. diff"], rows))


def accumulate_rows(sizes, rng):
    """Table 4: the float64-faithful passes against float32 accumulation."""
    import os
    from mfac_linalg.kernels import host
    compiled = host.available()
    rows = []
    for dim, m in sizes:
        G = rng.standard_normal((m, dim), dtype=np.float32) * np.logspace(
            -2, 2, dim, dtype=np.float32)
        lam = 1e-5 * float(np.einsum("ij,ij->", G, G, dtype=np.float64)) / m / m
        wins = {a: ml.SlidingWindowInverseFisher.from_gradients(
            G, lam, accumulate=a, refresh_every=10**9) for a in ("float32", "float64")}
        w64 = ml.SlidingWindowInverseFisher.from_gradients(G.astype(np.float64), lam,
                                                           refresh_every=10**9)
        x = rng.standard_normal(dim, dtype=np.float32)
        y64 = w64.matvec(x.astype(np.float64))
        rnd = np.linalg.norm(y64.astype(np.float32) - y64)
        err = {a: np.linalg.norm(w.matvec(x).astype(np.float64) - y64) / rnd
               for a, w in wins.items()}          # before the steps change the windows
        gs = rng.standard_normal((8, dim), dtype=np.float32)
        k = [0]

        def nxt():
            k[0] += 1
            return gs[k[0] % 8]

        def numpy_route(fn):
            def run():
                os.environ["MFAC_LINALG_NUMBA"] = "0"
                try:
                    return fn()
                finally:
                    del os.environ["MFAC_LINALG_NUMBA"]
            return run
        fns = {"mv32": lambda: wins["float32"].matvec(x),
               "mv64": lambda: wins["float64"].matvec(x),
               "st32": lambda: wins["float32"].step(nxt()),
               "st64": lambda: wins["float64"].step(nxt())}
        if compiled:
            fns["mvnp"] = numpy_route(fns["mv64"])
            fns["stnp"] = numpy_route(fns["st64"])
        t = compare(fns, rounds=11)
        for what, a, b in (("matvec", "mv32", "mv64"), ("step", "st32", "st64")):
            npr = {"matvec": "mvnp", "step": "stnp"}[what]
            rows.append([f"{dim:,}", f"{m}", what, f"{t[a] * 1e3:.2f}", f"{t[b] * 1e3:.2f}",
                         f"{t[b] / t[a]:.2f}",
                         f"{t[npr] * 1e3:.2f}" if npr in t else "-",
                         f"{t[npr] / t[a]:.2f}" if npr in t else "-",
                         f"{err['float32']:.0f}" if what == "matvec" else "",
                         f"{err['float64']:.2f}" if what == "matvec" else ""])
        print(f"  done dim={dim} m={m}", file=sys.stderr, flush=True)
    print(f"accumulate='float64' against 'float32' (float32 buffer, lambda = 1e-5 |g|^2 / m); "
          f"float64 passes: {'compiled (Numba)' if compiled else 'NumPy (no Numba)'}")
    print(table(["dim", "m", "what", "float32 ms", "float64 ms", "ratio", "NumPy route ms",
                 "ratio", "err32 / rounding", "err64 / rounding"], rows))


if __name__ == "__main__":
    rng = np.random.default_rng(0)
    if "--quick" in sys.argv:
        scaling(10_000, [128, 256, 512], rng)
        floor([(1_000_000, 32)], rng)
        vs_published([(1_000_000, 32)], rng)
        accumulate_rows([(100_000, 64)], rng)
    else:
        scaling(10_000, [128, 256, 512, 1024, 2048], rng)
        floor([(1_000_000, 128), (400_000, 512), (200_000, 1024)], rng)
        vs_published([(1_000_000, 32), (1_000_000, 64), (1_000_000, 128), (1_000_000, 256),
                      (100_000, 1024)], rng)
        accumulate_rows([(1_000_000, 64), (100_000, 256), (100_000, 1024)], rng)
