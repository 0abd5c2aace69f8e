"""Prune a trained MLP and CNN on scikit-learn's digits with ``mfac_linalg.torch.prune``.

Both models are trained with Adam, then copies are pruned without fine-tuning to
50-95 % sparsity by joint OBS, independent OBS (the WoodFisher / M-FAC pruner),
magnitude and OBD (docs/math.md §3, §9), with one global threshold or the same
sparsity in every layer, and joint / independent also with the first-order term
(WoodTaylor).  The inverse Fisher is WoodFisher's block-diagonal one (blocks of 64
inside layers) from 128 per-sample gradients, recomputed at each of 3 gradual stages
(cubic schedule).  The first-order variants take the damping 1e-2: their update
contains the Newton step -F^-1 g, which with the damping 1e-4 of the others
overshoots far beyond where the quadratic model holds.  The script prints the test loss and accuracy of every variant and
one per-stage report; ``--plot FILE`` draws accuracy against sparsity.

Run:  python examples/torch_pruning.py [--plot pruning.png] [--no-progress]
"""
import argparse
import copy

import torch

from torch_common import cnn, digits, evaluate, mlp, train

from mfac_linalg._progress import progress
from mfac_linalg.torch import prune

SPARSITIES = (0.5, 0.7, 0.8, 0.9, 0.95)
# (method, scope, first-order term, damping)
VARIANTS = [("joint", "global", False, 1e-4), ("independent", "global", False, 1e-4),
            ("magnitude", "global", False, 1e-4), ("obd", "global", False, 1e-4),
            ("joint", "layer", False, 1e-4), ("magnitude", "layer", False, 1e-4),
            ("joint", "global", True, 1e-2), ("independent", "global", True, 1e-2)]


def trained(kind, epochs, show_progress=None):
    Xtr, ytr, Xte, yte = digits()
    model = mlp() if kind == "mlp" else cnn()
    train(model, torch.optim.Adam(model.parameters(), lr=3e-3), Xtr, ytr, epochs,
          show_progress=show_progress, desc=f"{kind} training epochs")
    return model, (Xtr, ytr, Xte, yte)


def run(models=("mlp", "cnn"), sparsities=SPARSITIES, variants=VARIANTS, epochs=15,
        steps=3, verbose=True, show_progress=None):
    """{model: (dense (loss, acc), {variant: [(sparsity, loss, acc), ...]})}, a variant
    being (method, scope, first_order, damping).  ``show_progress``: bars on stderr over
    the training epochs and the pruning variants (None: only on a terminal with tqdm
    installed; False: never)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)            # tiny models: one thread is fastest
    try:
        out = {}
        for kind in models:
            base, (Xtr, ytr, Xte, yte) = trained(kind, epochs, show_progress)
            dense = evaluate(base, Xte, yte)
            data = (Xtr[:256], ytr[:256])
            res = {}
            for method, scope, fo, lam in progress(variants, desc=f"{kind} pruning variants",
                                                   enabled=show_progress):
                rows = []
                for s in sparsities:
                    model = copy.deepcopy(base)
                    rep = prune(model, torch.nn.CrossEntropyLoss(), data, s, method=method,
                                scope=scope, first_order=fo, num_grads=128, damping=lam,
                                block_size=64, steps=steps)
                    rows.append((s,) + evaluate(model, Xte, yte))
                    if verbose and kind == "mlp" and method == "joint" and scope == "global" \
                            and not fo and s == 0.9:
                        print(rep)
                res[(method, scope, fo, lam)] = rows
            out[kind] = (dense, res)
            if verbose:
                print(f"\n{kind}: dense test loss {dense[0]:.4f} acc {dense[1]:.3f}")
                print(f"{'variant':>38} " + " ".join(f"{s:>13.2f}" for s in sparsities))
                for (m, sc, fo, lam), rows in res.items():
                    name = f"{m} {sc}{' +1st order' if fo else ''} lam={lam:g}"
                    print(f"{name:>38} " + " ".join(f"{l:6.3f}/{a:5.3f}" for _, l, a in rows))
                print("(test loss / accuracy, no fine-tuning)")
        return out
    finally:
        torch.set_num_threads(threads)


def plot(out, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(out), figsize=(5 * len(out), 3.8), squeeze=False)
    for ax, (kind, (dense, res)) in zip(axes[0], out.items()):
        for (m, sc, fo, _), rows in res.items():
            ax.plot([r[0] for r in rows], [r[2] for r in rows], marker="o",
                    label=f"{m} {sc}{' +1st' if fo else ''}")
        ax.axhline(dense[1], color="k", lw=0.8, ls="--")
        ax.set(title=kind, xlabel="sparsity", ylabel="test accuracy")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plot", default=None)
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args()
    result = run(show_progress=False if args.no_progress else None)
    if args.plot:
        plot(result, args.plot)
