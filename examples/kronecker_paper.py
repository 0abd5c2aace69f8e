"""The KPSVD paper's experiment, redone: how well each Kronecker method fits the true Fisher.

A deep ReLU autoencoder (64-32-24-16-8-16-24-32-64, ReLU hidden layers but a linear 8-unit
code, sigmoid output, Bernoulli cross-entropy) is trained with Adam on scikit-learn's bundled
8 x 8 digits (1797 images, pixels scaled to [0, 1]).  At points of training, for every layer, the **true Fisher** is
estimated by Monte Carlo: for each of ``n_fisher`` images one target y ~ Bernoulli(sigmoid(z))
is sampled from the model and back-propagated, giving per-sample layer inputs a_n and output
gradients g_n = d(-log p(y_n | x_n)) / d(outputs); F = (1/n) sum_n (g_n g_n^T) kron (a_n a_n^T)
(bias included).  For K-FAC, EKFAC, KPSVD, deflation, Lanczos and K-FAC corrected the script
records both errors of docs/math.md §8 (``fisher_error`` kinds "frobenius" and "spectrum",
computed without forming F), the build time relative to K-FAC (CPU time of this process: wall time on a shared
machine measures the other processes), and the R(F) products the
iterative builders needed (warm-started from the previous point of training).

Needs scikit-learn (``pip install mfac_linalg[examples]``); ``--plot`` also matplotlib.
Run:  python examples/kronecker_paper.py [--plot docs/images] [--no-progress]
"""
from __future__ import annotations

import argparse
import time

import numpy as np

import mfac_linalg as ml
from mfac_linalg._progress import progress

SIZES = [64, 32, 24, 16, 8, 16, 24, 32, 64]
METHODS = [("K-FAC", ml.kfac), ("EKFAC", ml.ekfac), ("KPSVD", ml.kpsvd),
           ("deflation", ml.deflation), ("Lanczos", ml.lanczos),
           ("K-FAC corr.", ml.kfac_corrected)]
ITERATIVE = ("KPSVD", "deflation", "Lanczos", "K-FAC corr.")
CODE = 3                                   # the layer producing the linear 8-unit code


def digits():
    from sklearn.datasets import load_digits
    return load_digits().data / 16.0                   # (1797, 64) in [0, 1]


def init(rng):
    return [(rng.standard_normal((o, i)) * np.sqrt(2.0 / i), np.zeros(o))
            for i, o in zip(SIZES[:-1], SIZES[1:])]


def forward(params, X):
    acts = [X]
    for k, (W, b) in enumerate(params):
        z = acts[-1] @ W.T + b
        acts.append(z if k in (CODE, len(params) - 1) else np.maximum(z, 0.0))
    return acts                                          # acts[-1]: the logits


def backward(params, acts, dlogits):
    """Per-sample output gradients of every layer, from d loss_n / d logits."""
    grads = [None] * len(params)
    delta = dlogits
    for k in range(len(params) - 1, -1, -1):
        grads[k] = delta
        if k:
            delta = delta @ params[k][0]
            if k - 1 != CODE:
                delta = delta * (acts[k] > 0)
    return grads


def sigmoid(z):
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def bce(logits, X):
    """Mean over images of the summed Bernoulli cross-entropy."""
    return float((np.logaddexp(0.0, logits) - X * logits).sum(axis=1).mean())


class Adam:
    def __init__(self, params, lr=1e-3):
        self.lr, self.t = lr, 0
        self.m = [(np.zeros_like(W), np.zeros_like(b)) for W, b in params]
        self.v = [(np.zeros_like(W), np.zeros_like(b)) for W, b in params]

    def step(self, params, gparams):
        self.t += 1
        out = []
        for k, ((W, b), (gW, gb)) in enumerate(zip(params, gparams)):
            new = []
            for j, (p, gp) in enumerate(((W, gW), (b, gb))):
                m = 0.9 * self.m[k][j] + 0.1 * gp
                v = 0.999 * self.v[k][j] + 0.001 * gp ** 2
                self.m[k] = self.m[k][:j] + (m,) + self.m[k][j + 1:]
                self.v[k] = self.v[k][:j] + (v,) + self.v[k][j + 1:]
                mh, vh = m / (1 - 0.9 ** self.t), v / (1 - 0.999 ** self.t)
                new.append(p - self.lr * mh / (np.sqrt(vh) + 1e-8))
            out.append(tuple(new))
        return out


def train_epoch(params, opt, X, rng, batch=64):
    for idx in np.array_split(rng.permutation(len(X)), max(1, len(X) // batch)):
        xb = X[idx]
        acts = forward(params, xb)
        grads = backward(params, acts, (sigmoid(acts[-1]) - xb) / len(xb))
        gparams = [(g.T @ a, g.sum(0)) for g, a in zip(grads, acts[:-1])]
        params = opt.step(params, gparams)
    return params


def mc_fisher_data(params, X, rng):
    """Per-layer (a_n, g_n) with targets sampled from the model (the true Fisher)."""
    acts = forward(params, X)
    p = sigmoid(acts[-1])
    y = (rng.random(p.shape) < p).astype(float)
    grads = backward(params, acts, p - y)               # per-sample loss: no 1/n here
    return [(a, g) for a, g in zip(acts[:-1], grads)]


def measure(params, X, rng, previous=None, damping=1e-3, repeat=1, layers=None):
    rows, ops = [], {}
    for k, (a, g) in enumerate(mc_fisher_data(params, X, rng)):
        if layers is not None and k not in layers:
            continue
        errs, specs, times, prods = {}, {}, {}, {}
        for name, build in METHODS:
            kw = {}
            if previous is not None and name in ITERATIVE:
                kw["init"] = previous[(k, name)]             # warm start, as in training
            ts = []
            for _ in range(repeat):
                t = time.process_time()
                op = build(a, g, damping, bias=True, **kw)
                ts.append(time.process_time() - t)
            times[name] = float(np.median(ts))
            prods[name] = op.info.get("products", 0)
            errs[name] = ml.fisher_error(op, a, g, bias=True)
            specs[name] = ml.fisher_error(op, a, g, bias=True, kind="spectrum")
            ops[(k, name)] = op
        rows.append({"layer": k, "shape": (g.shape[1], a.shape[1] + 1), "frobenius": errs,
                     "spectrum": specs, "seconds": times, "products": prods})
    return rows, ops


def run(epochs=(0, 2, 10, 40, 120), n_fisher=400, seed=0, verbose=True, data=None,
        layers=None, show_progress=None):
    """Train and measure at each epoch in ``epochs`` (every layer, or those in ``layers``);
    returns [(epoch, loss, rows)].  ``show_progress``: a bar on stderr over the points of
    training (None: only on a terminal with tqdm installed; False: never)."""
    rng = np.random.default_rng(seed)
    X = digits() if data is None else data
    XF = X[rng.choice(len(X), size=min(n_fisher, len(X)), replace=False)]
    params = init(rng)
    opt = Adam(params)
    out, previous, epoch = [], None, 0
    for target in progress(epochs, desc="points of training", enabled=show_progress):
        while epoch < target:
            params = train_epoch(params, opt, X, rng)
            epoch += 1
        loss = bce(forward(params, X)[-1], X)
        rows, previous = measure(params, XF, rng, previous, layers=layers)
        out.append((target, loss, rows))
        if verbose:
            report(target, loss, rows)
    return out


def report(epoch, loss, rows):
    names = [n for n, _ in METHODS]
    print(f"\nepoch {epoch}: training loss {loss:.3f}")
    print(f"{'layer':>5} {'d_out x d_in+1':>14} | " + " ".join(f"{n:>11}" for n in names)
          + " | build / K-FAC")
    for r in rows:
        shape = f"{r['shape'][0]} x {r['shape'][1]}"
        for kind in ("frobenius", "spectrum"):
            cells = " ".join(f"{r[kind][n]:11.4f}" for n in names)
            extra = " ".join(f"{r['seconds'][n] / r['seconds']['K-FAC']:5.1f}"
                             for n in names[2:]) if kind == "frobenius" else ""
            print(f"{r['layer']:>5} {shape:>14} | {cells} | {kind[:4]} {extra}")


def plot(out, folder):
    import os

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    os.makedirs(folder, exist_ok=True)
    epochs = [e for e, _, _ in out]
    L = len(out[0][2])
    for kind in ("frobenius", "spectrum"):
        fig, axes = plt.subplots(2, (L + 1) // 2, figsize=(3.2 * ((L + 1) // 2), 6.0),
                                 sharex=True)
        for k, ax in enumerate(axes.ravel()[:L]):
            for name, _ in METHODS:
                ax.plot(epochs, [rows[k][kind][name] for _, _, rows in out], marker="o",
                        ms=3, label=name)
            d_out, d_in = out[0][2][k]["shape"]
            ax.set_title(f"layer {k} ({d_out} x {d_in})", fontsize=9)
            ax.set_xscale("symlog", linthresh=1)
            ax.set_ylim(bottom=0)
        axes.ravel()[0].legend(fontsize=7)
        fig.supxlabel("epoch")
        fig.supylabel("||F - F~||_F / ||F||_F" if kind == "frobenius" else
                      "||sv(F) - sv(F~)|| / ||sv(F)||")
        fig.tight_layout()
        fig.savefig(os.path.join(folder, f"kronecker_paper_{kind}.png"), dpi=90)
        plt.close(fig)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--plot", metavar="FOLDER", help="write the two figures there")
    p.add_argument("--quick", action="store_true", help="two points of training")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args()
    result = run(epochs=(0, 2) if args.quick else (0, 2, 10, 40, 120),
                 show_progress=False if args.no_progress else None)
    if args.plot:
        plot(result, args.plot)
