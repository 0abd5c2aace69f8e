"""One-shot pruning of a small MLP with Optimal Brain Surgeon and WoodFisher.

A two-layer tanh MLP is trained with NumPy on a synthetic classification task
(Gaussian clusters pushed through a random nonlinear map). Per-sample gradients
at the trained weights give a block-diagonal inverse empirical Fisher
(``BlockInverseFisher``, blocks inside layers). The weights are then pruned
to 50-90% sparsity, in 4 stages with fresh gradients between them, by magnitude, by independent OBS (summed
single-weight updates, the WoodFisher/M-FAC pruner) and by joint OBS (the exact
KKT update for the removed set), without fine-tuning; the script prints the
test loss and accuracy for each.

Run:  python examples/obs_pruning.py [--plot pruning.png] [--no-progress]
"""
import argparse

import numpy as np

import mfac_linalg as ml
from mfac_linalg._progress import progress

D_IN, HIDDEN, CLASSES = 20, 32, 4


def make_data(n, rng):
    centers = rng.standard_normal((CLASSES, D_IN)) * 1.2
    y = rng.integers(0, CLASSES, n)
    X = centers[y] + rng.standard_normal((n, D_IN))
    A = rng.standard_normal((D_IN, D_IN)) / np.sqrt(D_IN)
    return np.tanh(X @ A) + 0.3 * X, y


def unpack(w):
    i = 0
    W1 = w[i:i + HIDDEN * D_IN].reshape(HIDDEN, D_IN); i += HIDDEN * D_IN
    b1 = w[i:i + HIDDEN]; i += HIDDEN
    W2 = w[i:i + CLASSES * HIDDEN].reshape(CLASSES, HIDDEN); i += CLASSES * HIDDEN
    b2 = w[i:i + CLASSES]
    return W1, b1, W2, b2


LAYERS = [HIDDEN * D_IN, HIDDEN, CLASSES * HIDDEN, CLASSES]   # parameter blocks per layer


def forward(w, X):
    W1, b1, W2, b2 = unpack(w)
    h = np.tanh(X @ W1.T + b1)
    z = h @ W2.T + b2
    z -= z.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    return h, p


def loss_acc(w, X, y):
    _, p = forward(w, X)
    return float(-np.log(p[np.arange(len(y)), y] + 1e-12).mean()), float((p.argmax(1) == y).mean())


def per_sample_grads(w, X, y):
    """(n, d) gradients of each sample's cross-entropy: rows are gradients."""
    W1, b1, W2, b2 = unpack(w)
    h, p = forward(w, X)
    d2 = p.copy()
    d2[np.arange(len(y)), y] -= 1.0                     # (n, C)
    d1 = (d2 @ W2) * (1 - h * h)                        # (n, H)
    n = len(y)
    return np.concatenate([(d1[:, :, None] * X[:, None, :]).reshape(n, -1), d1,
                           (d2[:, :, None] * h[:, None, :]).reshape(n, -1), d2], axis=1)


def batch_grad(w, X, y):
    """The mean gradient (backpropagation without per-sample outer products)."""
    W1, b1, W2, b2 = unpack(w)
    h, p = forward(w, X)
    d2 = p.copy()
    d2[np.arange(len(y)), y] -= 1.0
    d1 = (d2 @ W2) * (1 - h * h)
    n = len(y)
    return np.concatenate([(d1.T @ X).ravel() / n, d1.mean(0), (d2.T @ h).ravel() / n,
                           d2.mean(0)])


def train(X, y, rng, steps=1500, lr=0.05):
    d = sum(LAYERS)
    w = rng.standard_normal(d) * 0.3
    v = np.zeros(d)
    for _ in range(steps):
        g = batch_grad(w, X, y)
        v = 0.9 * v + g
        w -= lr * v
    return w


def run(sparsities=(0.5, 0.6, 0.7, 0.8, 0.9), m=512, block_size=64, damping=1e-3, steps=4,
        seed=0, verbose=True, show_progress=None):
    """Train, then prune to each sparsity with each method; returns (dense, rows).

    ``steps`` stages with fresh per-sample gradients between them (the
    published recipe recomputes the Fisher between stages); each method gets
    the same gradient draws.  ``show_progress``: a bar on stderr over the sparsities
    (None: only on a terminal with tqdm installed; False: never).
    """
    rng = np.random.default_rng(seed)
    X, y = make_data(4000, rng)
    Xte, yte = X[3000:], y[3000:]
    X, y = X[:3000], y[:3000]
    w = train(X, y, rng)
    idx = rng.choice(len(y), m, replace=False)
    G = per_sample_grads(w, X[idx], y[idx])
    op = ml.BlockInverseFisher(G, damping, block_size=block_size, blocks=LAYERS)
    base = loss_acc(w, Xte, yte)
    rows = []
    for s in progress(sparsities, desc="sparsities", enabled=show_progress):
        row = {"sparsity": s}
        for method in ("magnitude", "independent", "joint"):
            draws = np.random.default_rng(seed + 1)

            def regrad(weights, mask):
                ii = draws.choice(len(y), m, replace=False)
                return per_sample_grads(weights, X[ii], y[ii]) * ~mask

            r = ml.obs.prune(w, op, sparsity=s, method=method, steps=steps, regrad=regrad)
            row[method] = loss_acc(r.weights, Xte, yte) + (r.loss,)
        rows.append(row)
    if verbose:
        print(f"MLP {D_IN}-{HIDDEN}-{CLASSES}, d={sum(LAYERS)} parameters, {op}, "
              f"{steps} stages")
        print(f"dense model: test loss {base[0]:.4f}, accuracy {base[1]:.3f}")
        print(f"{'sparsity':>8}  {'magnitude':>17}  {'independent OBS':>17}  {'joint OBS':>17}"
              "   (test loss / accuracy)")
        for row in rows:
            cells = [f"{row[k][0]:8.4f} / {row[k][1]:.3f}"
                     for k in ("magnitude", "independent", "joint")]
            print(f"{row['sparsity']:>8.0%}  " + "  ".join(cells))
    return base, rows


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    s = [r["sparsity"] for r in rows]
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
    for k in ("magnitude", "independent", "joint"):
        ax[0].plot(s, [r[k][0] for r in rows], marker="o", label=k)
        ax[1].plot(s, [r[k][1] for r in rows], marker="o", label=k)
    ax[0].set(xlabel="sparsity", ylabel="test loss", yscale="log")
    ax[1].set(xlabel="sparsity", ylabel="test accuracy")
    ax[0].legend()
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plot", help="save a plot (needs matplotlib)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = ap.parse_args()
    _, rows = run(seed=a.seed, show_progress=False if a.no_progress else None)
    if a.plot:
        plot(rows, a.plot)
