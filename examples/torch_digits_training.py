"""Train a small CNN on scikit-learn's digits with MFAC, SGD and Adam.

MFAC is ``mfac_linalg.torch.MFAC``: the M-FAC optimizer (docs/math.md §10), each step
u = F⁻¹ g with F the damped empirical Fisher of the last ``window`` gradients,
momentum on u.  The script prints the training loss and the test accuracy after every
epoch for the three optimizers, and with ``--plot FILE`` draws the curves.

Run:  python examples/torch_digits_training.py [--epochs 10] [--plot digits.png] [--no-progress]
"""
import argparse
import time

import torch

from torch_common import cnn, digits, evaluate, train

from mfac_linalg.torch import MFAC

OPTIMIZERS = {
    "MFAC": lambda p: MFAC(p, lr=0.1, momentum=0.9, window=64, damping=0.3),
    "SGD": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    "Adam": lambda p: torch.optim.Adam(p, lr=3e-3),
}


def run(epochs=10, verbose=True, show_progress=None):
    """{name: [(epoch, train loss, test accuracy), ...]} and {name: seconds}.
    ``show_progress``: a bar on stderr over each optimizer's epochs (None: only on a
    terminal with tqdm installed; False: never)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)            # the model is tiny: one thread is fastest
    try:
        return _run(epochs, verbose, show_progress)
    finally:
        torch.set_num_threads(threads)


def _run(epochs, verbose, show_progress=None):
    Xtr, ytr, Xte, yte = digits()
    hist, secs = {}, {}
    for name, make in OPTIMIZERS.items():
        model = cnn(seed=0)
        rows = [(0, evaluate(model, Xtr, ytr)[0], evaluate(model, Xte, yte)[1])]
        t0 = time.perf_counter()
        train(model, make(model.parameters()), Xtr, ytr, epochs,
              callback=lambda ep: rows.append((ep, evaluate(model, Xtr, ytr)[0],
                                               evaluate(model, Xte, yte)[1])),
              show_progress=show_progress, desc=f"{name} epochs")
        secs[name] = time.perf_counter() - t0
        hist[name] = rows
        if verbose:
            print(f"{name:>5}: " + "  ".join(f"ep{e} loss {l:.3f} acc {a:.3f}"
                                             for e, l, a in rows[1::max(1, epochs // 5)]))
    if verbose:
        print("final   " + "  ".join(f"{n}: loss {h[-1][1]:.4f} acc {h[-1][2]:.3f} "
                                     f"({secs[n]:.1f} s)" for n, h in hist.items()))
    return hist, secs


def plot(hist, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
    for name, rows in hist.items():
        e = [r[0] for r in rows]
        ax[0].semilogy(e, [r[1] for r in rows], label=name)
        ax[1].plot(e, [r[2] for r in rows], label=name)
    ax[0].set(xlabel="epoch", ylabel="training loss")
    ax[1].set(xlabel="epoch", ylabel="test accuracy")
    ax[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--plot", default=None)
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args()
    h, _ = run(args.epochs, show_progress=False if args.no_progress else None)
    if args.plot:
        plot(h, args.plot)
