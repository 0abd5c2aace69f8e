"""M-FAC as an optimizer: SGD preconditioned by the sliding-window inverse Fisher.

An ill-conditioned linear least-squares problem (feature scales spread over two
orders of magnitude), mini-batch gradients in NumPy. Plain SGD takes the
largest stable step for the steepest direction and crawls along the flat
ones; M-FAC multiplies each gradient by F^{-1} of the last m gradients
(``window.step(g)``: add g, return F^{-1} g, two passes over the buffer).

The settings (damping 1e-2 of the largest curvature, learning rate 0.03)
come from a small grid (damping 1e-4..1e-1, rate 3e-3..0.3); SGD uses the
standard safe step 1/L, L the largest curvature.  The empirical Fisher of
mini-batch gradients is not the Hessian, and a window must span the space to
precondition all of it (m >= dim here): with m = 32 < dim = 200 plain SGD
won in our grid.  docs/sliding.md has the measured table.

Run:  python examples/sliding_optimizer.py [--steps 300] [--dim 50] [--window 64] [--no-progress]
"""
import argparse

import numpy as np

import mfac_linalg as ml
from mfac_linalg._progress import progress


def make_problem(n, dim, rng):
    scales = np.logspace(0, -2, dim)
    X = rng.standard_normal((n, dim)) * scales
    w_true = rng.standard_normal(dim)
    y = X @ w_true + 0.01 * rng.standard_normal(n)
    return X, y


def loss(X, y, w):
    r = X @ w - y
    return 0.5 * float(r @ r) / len(y)


def run(steps=300, dim=50, window=64, batch=64, seed=0, verbose=True, show_progress=None):
    """Run SGD and M-FAC side by side; returns [(step, SGD loss, M-FAC loss)].
    ``show_progress``: a bar on stderr over the steps (None: only on a terminal with tqdm
    installed; False: never)."""
    rng = np.random.default_rng(seed)
    X, y = make_problem(20 * dim, dim, rng)
    n = len(y)
    lmax = np.linalg.eigvalsh(X.T @ X / n)[-1]

    def grad(w, idx):
        Xi = X[idx]
        return Xi.T @ (Xi @ w - y[idx]) / len(idx)

    w_sgd = np.zeros(dim)
    w_mfac = np.zeros(dim)
    win = ml.SlidingWindowInverseFisher(dim, window, damping=1e-2 * lmax, dtype="float64")
    lr_sgd = 1.0 / lmax          # the largest stable step size for plain SGD
    lr_mfac = 0.03
    history = []
    for t in progress(range(1, steps + 1), desc="steps", enabled=show_progress):
        idx = rng.choice(n, batch, replace=False)
        w_sgd -= lr_sgd * grad(w_sgd, idx)
        w_mfac -= lr_mfac * win.step(grad(w_mfac, idx))
        if t % (steps // 10) == 0 or t == 1:
            history.append((t, loss(X, y, w_sgd), loss(X, y, w_mfac)))
    if verbose:
        print(f"least squares: n={n}, dim={dim}, M-FAC window m={window}, batch={batch}")
        print(f"{'step':>6}  {'SGD loss':>12}  {'M-FAC loss':>12}")
        for t, a, b in history:
            print(f"{t:>6}  {a:>12.5f}  {b:>12.5f}")
    return history


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--dim", type=int, default=50)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = ap.parse_args()
    run(steps=a.steps, dim=a.dim, window=a.window, seed=a.seed,
        show_progress=False if a.no_progress else None)
