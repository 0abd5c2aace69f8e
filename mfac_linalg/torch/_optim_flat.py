"""The flattened parameter vector of :class:`mfac_linalg.torch.MFAC`.

All parameters flattened in ``parameters_to_vector`` order, the groups one after the
other (d = ``total`` numbers); in the sparse mode the window stores only the weights
that were non-zero at construction (``idx``: their positions, ``dim`` = their number).
These helpers check the parameters, build that index, gather the gradient into the
(compressed) vector and scatter an update back onto the parameters.
"""
from __future__ import annotations

import numpy as np
import torch

from .. import _validate as V


#: MFAC's settings that one shared window fixes for all groups (a group's own is refused)
_SHARED_SETTINGS = ("window", "damping", "normalize", "dtype", "sparse", "refresh_every",
                    "sharded", "process_group", "layout", "check_every")


def check_group(g, name):
    """A parameter group's hyperparameters: lr >= 0, momentum in [0, 1), weight_decay >= 0
    (at construction and in a loaded state dict)."""
    for key in _SHARED_SETTINGS:
        if key in g:
            raise ValueError(f"{name}[{key!r}]: {key} is a setting of the whole optimizer "
                             "(one window of gradients serves every group), not of a group; "
                             "pass it to MFAC(...)")
    for key in ("lr", "momentum", "weight_decay"):
        if key not in g:
            raise ValueError(f"{name} is missing {key!r}")
    V.real(g["lr"], f"{name}['lr']", low=0.0)
    V.real(g["momentum"], f"{name}['momentum']", low=0.0, high=1.0, high_open=True)
    V.real(g["weight_decay"], f"{name}['weight_decay']", low=0.0)


def check_params(params):
    """(device, dtype) shared by all ``params``; raises naming the first that differs or
    is not a dense floating-point tensor."""
    if not params:
        raise ValueError("params must hold at least one tensor; got parameter groups with "
                         "no parameters")
    dev, pdt = params[0].device, params[0].dtype
    for k, p in enumerate(params):
        if not p.dtype.is_floating_point:
            raise TypeError(f"params[{k}] must be a floating-point tensor; got {p.dtype}")
        if p.is_sparse:
            raise TypeError(f"params[{k}] must be a dense tensor; got a sparse one")
        if p.device != dev:
            raise ValueError(f"params must all live on one device; params[0] is on {dev}, "
                             f"params[{k}] on {p.device}")
        if p.dtype != pdt:
            raise ValueError(f"params must all have one dtype; params[0] is {pdt}, "
                             f"params[{k}] is {p.dtype}")
    return dev, pdt


def sparse_index(params, sparse):
    """(mask, idx): the boolean mask of the non-zero weights in torch order and their
    positions (sparse mode), else (None, None)."""
    if not sparse:
        return None, None
    with torch.no_grad():
        mask = torch.cat([(p.detach() != 0).reshape(-1) for p in params])
        idx = torch.nonzero(mask).reshape(-1)
    if idx.numel() == 0:
        raise ValueError("sparse=True but every parameter is zero: nothing to train")
    return mask, idx


def group_ranges(param_groups, mask):
    """The range [start, stop) of each group in the (compressed) vector."""
    ranges = []
    start = off = 0
    for g in param_groups:
        n = sum(p.numel() for p in g["params"])
        kept = n if mask is None else int(mask[off:off + n].sum())
        ranges.append((start, start + kept))
        start += kept
        off += n
    return ranges


def segments(local, ranges):
    """Momentum segments (local start, local stop, group) over the columns ``local`` (a
    list of global ranges, concatenated in order) of the (compressed) vector."""
    segs, off = [], 0
    for a, b in local:
        for k, (ga, gb) in enumerate(ranges):
            lo, hi = max(a, ga), min(b, gb)
            if lo < hi:
                segs.append((off + lo - a, off + hi - a, k))
        off += b - a
    return segs


def compressed_ranges(idx, ranges):
    """Ranges over the flattened parameters mapped to ranges over the stored weights
    (sorted positions ``idx``): each holds the stored weights inside its range."""
    idx = idx.cpu().numpy()
    return [(int(np.searchsorted(idx, a)), int(np.searchsorted(idx, b))) for a, b in ranges]


def present(param_groups):
    """Per parameter (in order, the groups one after the other): whether it has a
    gradient (``p.grad is not None``, the ``torch.optim`` convention)."""
    return [p.grad is not None for g in param_groups for p in g["params"]]


def present_mask(present, sizes, idx, device):
    """The boolean vector over the (compressed) coordinates: True where the parameter
    has a gradient.  O(d)."""
    flags = torch.tensor(present, dtype=torch.bool, device=device)
    # output_size given: no device-to-host read of the repeats' sum on a GPU
    mask = torch.repeat_interleave(flags, torch.tensor(sizes, device=device),
                                   output_size=int(sum(sizes)))
    return mask if idx is None else mask[idx]


def gradient(param_groups, idx, dtype, device):
    """g = ∇L + wd · w over all parameters, in ``dtype``, compressed to the stored weights
    when ``idx`` is given.  A parameter without a gradient (``p.grad is None``) counts
    as zero, with no weight decay.  O(d)."""
    parts = []
    for g in param_groups:
        wd = g["weight_decay"]
        for p in g["params"]:
            if p.grad is None:
                parts.append(torch.zeros(p.numel(), dtype=dtype, device=device))
                continue
            if p.grad.is_sparse:
                raise TypeError("MFAC does not take sparse gradients")
            gr = p.grad.reshape(-1).to(dtype)
            if wd:
                gr = gr + wd * p.detach().reshape(-1).to(dtype)
            parts.append(gr)
    g = parts[0] if len(parts) == 1 else torch.cat(parts)
    return g if idx is None else g[idx]


def apply_update(param_groups, upd, idx, total, present=None):
    """w ← w − lr · upd for each group (``upd`` over the stored weights; zero elsewhere in
    the sparse mode), skipping the parameters whose ``present`` flag is False (they stay
    as they are, bit for bit).  O(d), in place on the parameters."""
    if idx is not None:
        full = torch.zeros(total, dtype=upd.dtype, device=upd.device)
        full[idx] = upd
        upd = full
    off = k = 0
    for grp in param_groups:
        lr = grp["lr"]
        for p in grp["params"]:
            n = p.numel()
            if present is None or present[k]:
                p.add_(upd[off:off + n].view_as(p).to(p.dtype), alpha=-lr)
            off += n
            k += 1
