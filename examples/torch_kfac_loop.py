"""A K-FAC-family natural-gradient loop with ``kronecker_preconditioner``.

Every ``refresh`` steps the layer statistics of the current batch are captured
(hooks on the Linear / Conv2d layers, the Monte-Carlo Fisher by default) and turned into
one block-diagonal Kronecker inverse M⁻¹ acting in ``parameters_to_vector`` order; each
step then moves w ← w − lr · M⁻¹ ∇L (docs/math.md §4).  The script trains the small CNN
on scikit-learn's digits with K-FAC, EKFAC and KPSVD preconditioners and with plain SGD,
and prints the training loss and test accuracy.

Run:  python examples/torch_kfac_loop.py [--epochs 5] [--no-progress]
"""
import argparse

import torch
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from torch_common import cnn, digits, evaluate

from mfac_linalg._progress import progress
from mfac_linalg.torch import kronecker_preconditioner


def natural_gradient(model, X, y, epochs, method, lr=0.1, damping=1e-1, refresh=10,
                     batch=50, fisher="mc", show_progress=None):
    """Train ``model`` in place (``method="sgd"``: the plain gradient); returns it.
    ``show_progress``: a bar on stderr over the epochs (None: only on a terminal with tqdm
    installed; False: never); the per-refresh builds draw none."""
    loss_fn = torch.nn.CrossEntropyLoss()
    params = list(model.parameters())
    P, step = None, 0
    for ep in progress(range(epochs), desc=f"{method} epochs", enabled=show_progress):
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(ep))
        for i in range(0, len(perm), batch):
            b = perm[i:i + batch]
            if method == "sgd":
                direction = None
            elif step % refresh == 0:
                P = kronecker_preconditioner(model, loss_fn, (X[b], y[b]), method, damping,
                                             fisher=fisher, seed=step, progress=False)
            loss = loss_fn(model(X[b]), y[b])
            grads = torch.autograd.grad(loss, params)
            g = torch.cat([t.reshape(-1) for t in grads])
            direction = g if method == "sgd" else P @ g         # a tensor, g's dtype
            with torch.no_grad():
                vector_to_parameters(parameters_to_vector(params) - lr * direction, params)
            step += 1
    return model


def run(epochs=5, methods=("kfac", "ekfac", "kpsvd", "sgd"), verbose=True, show_progress=None):
    """{method: (train loss, test accuracy)} after ``epochs`` epochs; ``show_progress``
    as for :func:`natural_gradient`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)            # tiny model: one thread is fastest
    try:
        Xtr, ytr, Xte, yte = digits()
        out = {}
        for method in methods:
            model = cnn(seed=0)
            lr = 0.2 if method == "sgd" else 0.1
            natural_gradient(model, Xtr, ytr, epochs, method, lr=lr,
                             show_progress=show_progress)
            out[method] = (evaluate(model, Xtr, ytr)[0], evaluate(model, Xte, yte)[1])
            if verbose:
                print(f"{method:>6}: train loss {out[method][0]:.4f}  test accuracy "
                      f"{out[method][1]:.3f}")
        return out
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args()
    run(args.epochs, show_progress=False if args.no_progress else None)
