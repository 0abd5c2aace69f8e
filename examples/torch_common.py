"""Shared pieces of the PyTorch examples: scikit-learn's bundled digits, two small models.

The digits (1797 images of 8 x 8 pixels, 10 classes) ship with scikit-learn: nothing is
downloaded.  A fixed split gives 1400 training and 397 test images.
"""
import torch

from mfac_linalg._progress import progress


def digits(dtype=torch.float32):
    """(X_train, y_train, X_test, y_test): images (n, 1, 8, 8) scaled to [0, 1]."""
    from sklearn.datasets import load_digits
    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X / 16.0, dtype=dtype).reshape(-1, 1, 8, 8)
    y = torch.tensor(y)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    tr, te = perm[:1400], perm[1400:]
    return X[tr], y[tr], X[te], y[te]


def cnn(seed=0):
    """Conv(1->8, 3x3) - ReLU - pool - Conv(8->16, 3x3) - ReLU - pool - Linear(64->10)."""
    torch.manual_seed(seed)
    nn = torch.nn
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(64, 10))


def mlp(seed=0, hidden=32):
    """Flatten - Linear(64->hidden) - tanh - Linear(hidden->10)."""
    torch.manual_seed(seed)
    nn = torch.nn
    return nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10))


@torch.no_grad()
def evaluate(model, X, y):
    """(mean cross-entropy, accuracy)."""
    out = model(X)
    return (float(torch.nn.functional.cross_entropy(out, y)),
            float((out.argmax(1) == y).float().mean()))


def train(model, opt, X, y, epochs, batch=50, seed=0, callback=None, show_progress=None,
          desc="epochs"):
    """Plain minibatch training; ``callback(epoch)`` after every epoch.  ``show_progress``:
    a bar labelled ``desc`` on stderr over the epochs (None: only on a terminal with tqdm
    installed; False: never)."""
    loss_fn = torch.nn.CrossEntropyLoss()
    for ep in progress(range(epochs), desc=desc, enabled=show_progress):
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed + ep))
        for i in range(0, len(perm), batch):
            b = perm[i:i + batch]
            opt.zero_grad()
            loss_fn(model(X[b]), y[b]).backward()
            opt.step()
        if callback is not None:
            callback(ep + 1)
    return model
