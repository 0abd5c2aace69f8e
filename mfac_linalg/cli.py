"""The ``mfac-linalg`` command: ``demo``, ``ihvp``, ``diag``.

Errors in the user's input (missing files, wrong shapes, non-finite values,
bad options) print one line to stderr and exit with status 2, no traceback.
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from . import _backend as B
from .static import StaticInverseFisher

EXIT_USAGE = 2


class CLIError(Exception):
    """An error in the user's input: reported in one line, exit status 2."""


# -- demo ---------------------------------------------------------------------

def _sync(xp):
    if xp is not np:
        xp.cuda.Stream.null.synchronize()


def _timed(fn, xp, repeat=3):
    """Median wall time of ``fn()`` over ``repeat`` runs (after one warm-up), and its result."""
    out = fn()
    _sync(xp)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        _sync(xp)
        times.append(time.perf_counter() - t)
    return float(np.median(times)), out


def logistic_problem(n, d, seed, xp=np):
    """Synthetic logistic regression with a decaying feature spectrum (ill-conditioned).

    Returns X (n, d), labels y (n,), and weights w after a few gradient steps:
    per-sample gradients are then those of a model in training, not at random.
    """
    rng = np.random.default_rng(seed)
    scales = (1.0 + np.arange(d)) ** -0.75
    X = rng.standard_normal((n, d)) * scales
    w_true = rng.standard_normal(d) / scales.sum() * 8
    y = (rng.random(n) < 1.0 / (1.0 + np.exp(-X @ w_true))).astype(np.float64)
    w = np.zeros(d)
    for _ in range(20):
        p = 1.0 / (1.0 + np.exp(-X @ w))
        w -= 5.0 * X.T @ (p - y) / n
    return xp.asarray(X), xp.asarray(y), xp.asarray(w)


def run_demo(dim=2000, grads=256, damping=3e-4, l2=1e-4, device="auto", seed=0, out=sys.stdout):
    """The README's main job: M-FAC static on per-sample logistic-regression gradients.

    Builds F^{-1} for F = damping I + G^T G / m from m per-sample gradients of an
    L2-regularised logistic regression in training, checks it against a dense
    Cholesky solve, times both, and uses it as the preconditioner of the
    Newton-CG system H x = grad with the exact Hessian H (matrix-free).
    Returns the figures as a dict (and prints a table to ``out``).
    """
    if device == "auto":
        device = B.default_device()
    be = B.backend_for_device(device)
    xp = be.xp
    if dim < 2 or grads < 1:
        raise CLIError(f"--dim must be >= 2 and --grads >= 1; got dim={dim}, grads={grads}")
    n = max(4 * dim, 2 * grads)
    X, y, w = logistic_problem(n, dim, seed, xp)
    rng = np.random.default_rng(seed + 1)
    idx = xp.asarray(rng.choice(n, size=grads, replace=grads > n))
    Xi = X[idx]
    p = 1.0 / (1.0 + xp.exp(-(Xi @ w)))
    G = (p - y[idx])[:, None] * Xi                         # (m, d) per-sample gradients
    lam = float(damping)
    if not lam > 0 or not np.isfinite(lam):
        raise CLIError(f"--damping must be a finite number > 0; got {damping}")
    lines = [f"mfac-linalg demo: logistic regression, n={n} samples, d={dim} parameters, "
             f"m={grads} per-sample gradients, damping={lam:.1e}, L2={l2:.1e}, device={be!r}"]

    t_setup, op = _timed(lambda: StaticInverseFisher(G, lam), xp)
    v = xp.asarray(rng.standard_normal(dim))
    t_ihvp, yv = _timed(lambda: op.matvec(v), xp, repeat=20)

    sla = be.linalg

    def dense_setup():
        F = G.T @ G / grads
        F[xp.diag_indices(dim)] += lam
        return sla.cho_factor(F, lower=True) if be.name == "cpu" else xp.linalg.cholesky(F)

    t_dsetup, fac = _timed(dense_setup, xp, repeat=1)
    if be.name == "cpu":
        t_dsolve, yd = _timed(lambda: sla.cho_solve(fac, v), xp, repeat=20)
    else:
        def gpu_solve():
            z = sla.solve_triangular(fac, v, lower=True)
            return sla.solve_triangular(fac, z, lower=True, trans=1)
        t_dsolve, yd = _timed(gpu_solve, xp, repeat=20)
    err = float(B.to_host(xp.linalg.norm(yv - yd) / xp.linalg.norm(yd)))

    # Newton-CG on the logistic loss: H x = grad, H the exact Hessian (matrix-free)
    pa = 1.0 / (1.0 + xp.exp(-(X @ w)))
    wts = pa * (1 - pa)
    grad = X.T @ (pa - y) / n + l2 * w

    def hess(u):
        u = u.reshape(-1)
        return X.T @ (wts * (X @ u)) / n + l2 * u

    iters = {}
    if be.name == "cpu":
        from scipy.sparse.linalg import LinearOperator, cg
        H = LinearOperator((dim, dim), matvec=hess, dtype=np.float64)
        M = op.to_scipy()
    else:
        from cupyx.scipy.sparse.linalg import LinearOperator, cg
        H = LinearOperator((dim, dim), matvec=hess, dtype=np.float64)
        M = op.to_cupyx()
    for name, pre in (("none", None), ("M-FAC", M)):
        count = [0]

        def cb(_xk, count=count):
            count[0] += 1
        sol, info = cg(H, grad, M=pre, rtol=1e-6, maxiter=5 * dim, callback=cb)
        iters[name] = (count[0], info)

    rows = [
        ("relative error vs dense Cholesky solve", f"{err:.2e}", ""),
        ("set-up: M-FAC static", f"{t_setup * 1e3:.2f} ms", f"dense form + Cholesky: {t_dsetup * 1e3:.2f} ms"),
        ("IHVP: M-FAC static", f"{t_ihvp * 1e3:.3f} ms", f"dense triangular solves: {t_dsolve * 1e3:.3f} ms"),
        ("set-up + 1 IHVP speed-up", f"{(t_dsetup + t_dsolve) / (t_setup + t_ihvp):.1f}x", ""),
        ("Newton-CG iterations, no preconditioner", str(iters["none"][0]),
         "converged" if iters["none"][1] == 0 else "NOT converged"),
        ("Newton-CG iterations, M-FAC preconditioner", str(iters["M-FAC"][0]),
         "converged" if iters["M-FAC"][1] == 0 else "NOT converged"),
    ]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    lines.append("")
    for a, b_, c in rows:
        lines.append(f"  {a:<{w0}}  {b_:>{w1}}  {c}")
    print("\n".join(lines), file=out)
    return {"error": err, "t_setup": t_setup, "t_ihvp": t_ihvp, "t_dense_setup": t_dsetup,
            "t_dense_solve": t_dsolve, "cg_iters": {k: v[0] for k, v in iters.items()},
            "cg_info": {k: v[1] for k, v in iters.items()}}


# -- file commands ----------------------------------------------------------------

def _load(path, name):
    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise CLIError(f"{name}: no such file: {path}") from None
    except (OSError, ValueError, EOFError) as exc:
        raise CLIError(f"{name}: cannot read {path} as a .npy array ({exc})") from None


def _save(path, arr):
    try:
        np.save(path, arr)
    except OSError as exc:
        raise CLIError(f"--out: cannot write {path} ({exc})") from None


def _operator_from_file(args):
    G = _load(args.grads, "--grads")
    return StaticInverseFisher(G, args.damping)


def cmd_ihvp(args):
    op = _operator_from_file(args)
    x = _load(args.vec, "--vec")
    y = op.matvec(x) if x.ndim == 1 else op.matmat(x)
    _save(args.out, y)


def cmd_diag(args):
    op = _operator_from_file(args)
    _save(args.out, op.diagonal())


def cmd_demo(args):
    run_demo(dim=args.dim, grads=args.grads, damping=args.damping, l2=args.l2,
             device=args.device, seed=args.seed)


def build_parser():
    p = argparse.ArgumentParser(prog="mfac-linalg",
                                description="Inverse empirical Fisher operators (M-FAC).")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="M-FAC static on a logistic-regression problem, "
                       "checked and timed against a dense solve")
    d.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto",
                   help="where to run (auto: the GPU when CuPy and a GPU are there)")
    d.add_argument("--dim", type=int, default=2000, help="number of parameters d")
    d.add_argument("--grads", type=int, default=256, help="number of gradients m")
    d.add_argument("--damping", type=float, default=3e-4, help="damping lambda of F")
    d.add_argument("--l2", type=float, default=1e-4,
                   help="L2 regularisation of the logistic loss (in the Hessian)")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=cmd_demo)
    for name, func, helptext in (("ihvp", cmd_ihvp, "write F^{-1} x"),
                                 ("diag", cmd_diag, "write diag(F^{-1})")):
        c = sub.add_parser(name, help=helptext)
        c.add_argument("--grads", required=True, help=".npy file with gradients (m, d)")
        if name == "ihvp":
            c.add_argument("--vec", required=True, help=".npy file with x, (d,) or (d, k)")
        c.add_argument("--damping", type=float, required=True, help="damping lambda > 0")
        c.add_argument("--out", required=True, help="output .npy file")
        c.set_defaults(func=func)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (CLIError, ValueError, TypeError) as exc:
        print(f"mfac-linalg {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
