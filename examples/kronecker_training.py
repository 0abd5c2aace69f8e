"""Natural-gradient training with each Kronecker method, against Adam and SGD.

The optimisation comparison of the KPSVD paper, redone at a size a 2-core CPU runs in minutes,
on two data sets: scikit-learn's bundled 8 x 8 digits (1797 images, pixels in [0, 1]) and a
synthetic CURVES-like set generated here (:func:`curves`: images of random smooth curves
through a few control points, like Hinton & Salakhutdinov's CURVES, at 12 x 12).  The model is
the deep ReLU autoencoder of ``examples/kronecker_paper.py`` (a linear 8-unit code, a sigmoid
output, Bernoulli cross-entropy summed over pixels, averaged over images).

Natural-gradient step, per mini-batch (docs/math.md §4, §8)::

    theta <- theta - lr * blockdiag(M_1^{-1}, ..., M_L^{-1}) grad

M_l the damped approximation (damping lam) of layer l's Fisher over vec([W_l | b_l]), built by
K-FAC, EKFAC, KPSVD, deflation, Lanczos or K-FAC corrected from the **true** Fisher's
Monte-Carlo estimate: for every image of the current mini-batch one target
y ~ Bernoulli(sigmoid(z)) is drawn from the model and back-propagated, giving the per-sample
(a_n, g_n) of every layer.  The factors are rebuilt every ``refresh`` steps, the iterative
builders warm-started from the previous ones (``init=``) with a tolerance ``tol``.  Adam and
plain SGD use the same mini-batches.  Time is the CPU time of this process (the machine is
shared: wall time would measure the other jobs), the loss the full training set's, once per
epoch.

Needs scikit-learn for the digits (``pip install mfac_linalg[examples]``); ``--plot`` also
matplotlib.  Run:  python examples/kronecker_training.py [--controls] [--plot docs/images]
[--no-progress]
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from functools import partial
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kronecker_paper as kp  # noqa: E402  (forward, backward, bce, Adam, digits)

import mfac_linalg as ml  # noqa: E402
from mfac_linalg._progress import progress  # noqa: E402

KRONECKER = kp.METHODS
OPTIMISERS = [n for n, _ in KRONECKER] + ["Adam", "SGD"]
# controls (``--controls``): the damping form swapped.  K-FAC's default damps each factor
# ((Gamma + lam_G I) kron (A + lam_A I), "pi"), as do the two-term builders' first term
# ("split"); KPSVD's default damps the product (B kron C + lam I, "exact"), as EKFAC does.
CONTROLS = [("K-FAC, exact damping", partial(ml.kfac, damping_mode="exact")),
            ("KPSVD, pi damping", partial(ml.kpsvd, damping_mode="pi"))]
ITERATIVE = kp.ITERATIVE + ("KPSVD, pi damping",)
# the autoencoders' hidden widths (input = output = the pixels); the linear code is always
# layer 3 (kp.CODE), as kp.forward / kp.backward expect
HIDDEN = {"digits": [32, 24, 16, 8, 16, 24, 32], "curves": [48, 24, 16, 8, 16, 24, 48]}
# the baselines' learning rates are tuned: the best final loss over these grids
GRID = {"Adam": (1e-3, 3e-3, 1e-2), "SGD": (0.01, 0.03, 0.1)}


def curves(n=2000, size=12, points=3, seed=0):
    """A CURVES-like data set: n images (size x size, pixels in [0, 1]) of random smooth curves.

    Each image is the Bezier curve of ``points`` control points drawn uniformly in the
    image's central 80 %, rasterised with an anti-aliased pen: a pixel's intensity is
    exp(-d^2 / (2 s^2)), d its distance to the curve (sampled at 64 points) in pixels,
    s = 0.5.  O(n size^2 64).  Returns an (n, size^2) float64 array.

    Examples
    --------
    >>> X = curves(n=5, size=10, seed=1)
    >>> X.shape, bool(X.min() >= 0 and X.max() <= 1)
    ((5, 100), True)
    """
    rng = np.random.default_rng(seed)
    t = np.linspace(0.0, 1.0, 64)[:, None]
    deg = points - 1
    from math import comb
    bern = np.stack([comb(deg, i) * t[:, 0] ** i * (1 - t[:, 0]) ** (deg - i)
                     for i in range(points)], axis=1)                 # (64, points)
    ctrl = (0.1 + 0.8 * rng.random((n, points, 2))) * (size - 1)       # pixel coordinates
    path = np.einsum("mp,npc->nmc", bern, ctrl)                        # (n, 64, 2)
    yy, xx = np.mgrid[0:size, 0:size]
    pix = np.stack([yy.ravel(), xx.ravel()], axis=1).astype(float)     # (size^2, 2)
    d2 = ((pix[None, :, None, :] - path[:, None, :, :]) ** 2).sum(-1).min(axis=2)
    return np.exp(-d2 / (2 * 0.5 ** 2))


def init(sizes, rng):
    return [(rng.standard_normal((o, i)) * np.sqrt(2.0 / i), np.zeros(o))
            for i, o in zip(sizes[:-1], sizes[1:])]


def loss_and_grads(params, X):
    """The mean loss's gradients as [(gW, gb)] and the forward activations."""
    acts = kp.forward(params, X)
    grads = kp.backward(params, acts, (kp.sigmoid(acts[-1]) - X) / len(X))
    return acts, [(g.T @ a, g.sum(0)) for g, a in zip(grads, acts[:-1])]


class SGD:
    def __init__(self, lr):
        self.lr = lr

    def step(self, params, gparams):
        return [(W - self.lr * gW, b - self.lr * gb) for (W, b), (gW, gb) in zip(params, gparams)]


class NaturalGradient:
    """theta <- theta - lr blockdiag(M_l^{-1}) grad, M_l rebuilt every ``refresh`` steps."""

    def __init__(self, build, iterative, lr, damping, refresh, tol, rng):
        self.build, self.lr, self.damping, self.refresh = build, lr, damping, refresh
        self.iterative = iterative
        self.tol, self.rng, self.t = tol, rng, 0
        self.ops, self.products, self.unconverged = None, 0, 0

    def rebuild(self, params, X):
        acts = kp.forward(params, X)
        p = kp.sigmoid(acts[-1])
        y = (self.rng.random(p.shape) < p).astype(float)        # targets from the model
        grads = kp.backward(params, acts, p - y)                 # per-sample loss gradients
        ops = []
        for k, (a, g) in enumerate(zip(acts[:-1], grads)):
            kw = {}
            if self.iterative:
                kw["tol"] = self.tol
                if self.ops is not None:
                    kw["init"] = self.ops[k]                      # warm start
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ml.ConvergenceWarning)
                op = self.build(a, g, self.damping, bias=True, **kw)
            self.unconverged += sum(issubclass(w.category, ml.ConvergenceWarning)
                                    for w in caught)
            self.products += op.info.get("products", 0)
            ops.append(op)
        self.ops = ops
        self.precond = ml.block_diag(ops)

    def step(self, params, gparams, X):
        if self.t % self.refresh == 0:
            self.rebuild(params, X)
        self.t += 1
        vec = np.concatenate([np.column_stack([gW, gb]).ravel() for gW, gb in gparams])
        nat = self.precond @ vec
        out, at = [], 0
        for (W, b) in params:
            d_out, d_in = W.shape
            V = nat[at:at + d_out * (d_in + 1)].reshape(d_out, d_in + 1)
            at += d_out * (d_in + 1)
            out.append((W - self.lr * V[:, :-1], b - self.lr * V[:, -1]))
        return out


def train(data, method, *, epochs=8, batch=100, lr=None, damping=1.0, refresh=5, tol=1e-6,
          seed=0):
    """Train one autoencoder on ``data`` (name, X) with ``method`` (in OPTIMISERS or CONTROLS).

    Returns a dict: ``loss`` (epochs + 1 full-set losses, the first at initialisation),
    ``seconds`` (cumulative CPU seconds at each), ``products`` and ``unconverged`` (R(F)
    products and builds that hit ``maxiter``, iterative builders only), ``lr`` and ``diverged`` (the
    epoch in which the weights or a build became non-finite, else None: the curves stop
    there).  Every method starts from the same weights and sees the same mini-batches.
    ``lr=None``: 0.1 for the natural-gradient methods; for Adam and SGD the best (lowest
    final loss) of ``GRID[method]``.
    """
    name, X = data
    if lr is None and method in GRID:
        runs = [train(data, method, epochs=epochs, batch=batch, lr=r, seed=seed)
                for r in GRID[method]]
        return min(runs, key=lambda r: (r["diverged"] is not None, r["loss"][-1]))
    rng = np.random.default_rng(seed)
    params = init([X.shape[1]] + HIDDEN[name] + [X.shape[1]], rng)
    batches = np.random.default_rng(seed + 1)
    if method == "Adam":
        opt = kp.Adam(params, lr=lr)
    elif method == "SGD":
        opt = SGD(lr)
    else:
        lr = 0.1 if lr is None else lr
        build = dict(KRONECKER + CONTROLS)[method]
        opt = NaturalGradient(build, method in ITERATIVE, lr, damping, refresh, tol,
                              np.random.default_rng(seed + 2))
    losses, seconds, spent = [kp.bce(kp.forward(params, X)[-1], X)], [0.0], 0.0
    diverged = None
    for epoch in range(1, epochs + 1):
        try:
            with np.errstate(over="raise", invalid="raise"):
                for idx in np.array_split(batches.permutation(len(X)), max(1, len(X) // batch)):
                    xb = X[idx]
                    t0 = time.process_time()
                    _, gparams = loss_and_grads(params, xb)
                    if isinstance(opt, NaturalGradient):
                        params = opt.step(params, gparams, xb)
                    else:
                        params = opt.step(params, gparams)
                    spent += time.process_time() - t0
                loss = kp.bce(kp.forward(params, X)[-1], X)
        except (FloatingPointError, ValueError):     # overflow, or a build refused non-finite
            diverged = epoch
            break
        losses.append(loss)
        seconds.append(spent)
    out = {"loss": losses, "seconds": seconds, "products": 0, "unconverged": 0,
           "diverged": diverged, "lr": lr}
    if isinstance(opt, NaturalGradient):
        out["products"], out["unconverged"] = opt.products, opt.unconverged
    return out


def run(datasets=None, methods=OPTIMISERS, verbose=True, show_progress=None, **kw):
    """Train with every method on every data set; returns {dataset: {method: result}}.
    ``show_progress``: a bar on stderr over the methods of each data set (None: only on a
    terminal with tqdm installed; False: never)."""
    if datasets is None:
        datasets = [("digits", kp.digits()), ("curves", curves())]
    results = {}
    for data in datasets:
        results[data[0]] = {}
        for m in progress(methods, desc=f"{data[0]}: optimisers", enabled=show_progress):
            results[data[0]][m] = train(data, m, **kw)
        if verbose:
            print(table(data[0], results[data[0]]))
    return results


def table(name, res):
    """A markdown table: method, the loss at epochs 0, E/2 and E, CPU seconds, R(F) products."""
    E = max(len(r["loss"]) for r in res.values()) - 1
    lines = [f"| {name} | lr | loss, epoch 0 | epoch {E // 2} | epoch {E} | CPU s "
             "| R(F) products |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for m, r in res.items():
        L = r["loss"]
        half = f"{L[E // 2]:.2f}" if len(L) > E // 2 else "–"
        final = f"{L[-1]:.2f}" if r["diverged"] is None else f"diverged (epoch {r['diverged']})"
        lines.append(f"| {m} | {r['lr']:g} | {L[0]:.2f} | {half} | {final} "
                     f"| {r['seconds'][-1]:.1f} | {r['products'] or '–'} |")
    return "\n".join(lines)


def plot(results, folder):
    import os

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    os.makedirs(folder, exist_ok=True)
    fig, axes = plt.subplots(len(results), 2, figsize=(10, 3.6 * len(results)), squeeze=False)
    for row, (name, res) in zip(axes, results.items()):
        for m, r in res.items():
            style = "--" if m in GRID else ":" if m in dict(CONTROLS) else "-"
            row[0].plot(range(len(r["loss"])), r["loss"], style, marker="o", ms=2, label=m)
            row[1].plot(r["seconds"], r["loss"], style, marker="o", ms=2, label=m)
        row[0].set_xlabel("epoch")
        row[1].set_xlabel("CPU seconds")
        for ax in row:
            ax.set_ylabel(f"{name}: training loss")
            ax.set_yscale("log")
        row[1].set_xscale("symlog", linthresh=1)
        row[1].set_xlim(left=0)
    axes[0, 0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "kronecker_training.png"), dpi=90)
    plt.close(fig)
    X = curves()[:24]
    size = int(round(np.sqrt(X.shape[1])))
    fig, axes = plt.subplots(2, 12, figsize=(9, 1.7))
    for ax, x in zip(axes.ravel(), X):
        ax.imshow(x.reshape(size, size), cmap="gray_r", vmin=0, vmax=1)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "kronecker_curves.png"), dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--plot", metavar="FOLDER", help="write the two figures there")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--save", metavar="FILE", help="write the results there (JSON)")
    p.add_argument("--controls", action="store_true",
                   help="also K-FAC with exact damping and KPSVD with pi damping")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args()
    methods = OPTIMISERS + ([n for n, _ in CONTROLS] if args.controls else [])
    result = run(methods=methods, epochs=args.epochs,
                 show_progress=False if args.no_progress else None)
    if args.save:
        import json
        with open(args.save, "w") as f:
            json.dump(result, f, indent=1)
    if args.plot:
        plot(result, args.plot)
