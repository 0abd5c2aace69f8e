"""How well do Kronecker-factored approximations fit a layer's empirical Fisher?

A small tanh autoencoder (20-32-8-32-20) is trained with NumPy on data it
generates (points near a 4-dimensional nonlinear manifold). At several points of
training, for every layer, the script builds K-FAC, EKFAC, KPSVD, deflation, Lanczos and
K-FAC corrected from the per-sample layer inputs and output gradients, and prints
``fisher_error`` = ||F - F~||_F / ||F||_F (computed without forming F) and the time
each build takes relative to K-FAC.  This is the *empirical* Fisher of a small tanh network
over all layers; the KPSVD paper's own setting (the true, Monte-Carlo Fisher of deep ReLU
autoencoders over training) is examples/kronecker_paper.py.

Run:  python examples/kronecker_quality.py [--no-progress]
"""
import argparse
import time
import warnings

import numpy as np

import mfac_linalg as ml
from mfac_linalg._progress import progress

SIZES = [20, 32, 8, 32, 20]
METHODS = [("K-FAC", ml.kfac), ("EKFAC", ml.ekfac), ("KPSVD", ml.kpsvd),
           ("deflation", ml.deflation), ("Lanczos", ml.lanczos),
           ("K-FAC corr.", ml.kfac_corrected)]


def make_data(n, rng):
    z = rng.standard_normal((n, 4))
    M1 = rng.standard_normal((4, 12))
    M2 = rng.standard_normal((12, SIZES[0])) / np.sqrt(12)
    return np.tanh(z @ M1) @ M2 + 0.05 * rng.standard_normal((n, SIZES[0]))


def init(rng):
    return [(rng.standard_normal((o, i)) / np.sqrt(i), np.zeros(o))
            for i, o in zip(SIZES[:-1], SIZES[1:])]


def forward_backward(params, X):
    """Per-sample layer inputs a (n, d_in) and output gradients g (n, d_out) of the
    per-sample loss 1/2 ||x_hat - x||^2, for every layer; and the mean loss."""
    acts = [X]
    for k, (W, b) in enumerate(params):
        z = acts[-1] @ W.T + b
        acts.append(z if k == len(params) - 1 else np.tanh(z))
    delta = acts[-1] - X                              # d loss_n / d z_last
    grads = [None] * len(params)
    for k in range(len(params) - 1, -1, -1):
        grads[k] = delta
        if k:
            delta = (delta @ params[k][0]) * (1 - acts[k] ** 2)
    loss = 0.5 * float(((acts[-1] - X) ** 2).sum(axis=1).mean())
    return acts[:-1], grads, loss


def train_step(params, X, vel, lr=0.02):
    acts, grads, loss = forward_backward(params, X)
    n = len(X)
    for k, (W, b) in enumerate(params):
        gW, gb = grads[k].T @ acts[k] / n, grads[k].mean(0)
        vel[k] = (0.9 * vel[k][0] + gW, 0.9 * vel[k][1] + gb)
        params[k] = (W - lr * vel[k][0], b - lr * vel[k][1])
    return loss


def measure(params, X, damping=1e-3):
    acts, grads, loss = forward_backward(params, X)
    rows = []
    for k in range(len(params)):
        a, g = acts[k], grads[k]
        errs, times = {}, {}
        for name, build in METHODS:
            ts = []
            for _ in range(5):                  # builds take milliseconds: median of 5
                t = time.perf_counter()
                op = build(a, g, damping, bias=True)
                ts.append(time.perf_counter() - t)
            times[name] = float(np.median(ts))
            errs[name] = ml.fisher_error(op, a, g, bias=True)
        rows.append((k, a.shape[1] + 1, g.shape[1], errs, times))
    return loss, rows


def run(checkpoints=(0, 300, 3000), n=2000, seed=0, verbose=True, show_progress=None):
    """Train and measure at each checkpoint; returns [(step, loss, rows)] with rows
    (layer, d_in + 1, d_out, errors by method, median build seconds by method).
    ``show_progress``: a bar on stderr over the checkpoints (None: only on a terminal
    with tqdm installed; False: never)."""
    rng = np.random.default_rng(seed)
    X = make_data(n, rng)
    params = init(rng)
    vel = [(np.zeros_like(W), np.zeros_like(b)) for W, b in params]
    out = []
    step = 0
    for cp in progress(checkpoints, desc="checkpoints", enabled=show_progress):
        while step < cp:
            train_step(params, X, vel)
            step += 1
        loss, rows = measure(params, X)
        out.append((cp, loss, rows))
        if verbose:
            print(f"\nafter {cp} steps: reconstruction loss {loss:.4f}")
            head = "".join(f"{name:>13}" for name, _ in METHODS)
            print(f"{'layer':>5} {'d_in+1 x d_out':>15}{head}   build time / K-FAC")
            for k, din, dout, errs, times in rows:
                cells = "".join(f"{errs[name]:13.4f}" for name, _ in METHODS)
                ratios = " ".join(f"{times[name] / times['K-FAC']:5.1f}" for name, _ in METHODS[1:])
                print(f"{k:>5} {f'{din} x {dout}':>15}{cells}   {ratios}")
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = ap.parse_args()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ml.ConvergenceWarning)   # every build converges
        run(show_progress=False if a.no_progress else None)
