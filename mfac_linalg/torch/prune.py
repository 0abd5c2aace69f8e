r"""Optimal Brain Surgeon pruning of a PyTorch model (docs/math.md §3, §9).

The weights of the chosen ``nn.Linear`` / ``nn.Conv2d`` layers (biases are kept) form
one vector w in ``parameters_to_vector`` order.  At each stage the weights not yet
removed are compressed into w_c, the per-sample gradients G (num_grads × |w_c|) give
the inverse Fisher H = F⁻¹ of docs/math.md §1 (``fisher="block"``: the block-diagonal
WoodFisher of §3; ``"static"``: the full M-FAC static operator; ``"sliding"``: a full
sliding window), and a set Q is removed:

* ``"joint"``: δw = −H E_Q (H_QQ)⁻¹ w_Q, the optimal update for removing all of Q
  (solved per block), Q the smallest saliencies ρ_q = w_q² / (2 H_qq);
* ``"independent"``: the single-weight updates −(w_q / H_qq) H e_q summed over the
  same Q, then w_Q = 0 (the WoodFisher / M-FAC pruner);
* ``"magnitude"``: Q the smallest |w_q|, no update;
* ``"obd"``: Q the smallest ½ F_qq w_q², no update.

``first_order=True`` (WoodTaylor, §9) adds the mean gradient ḡ: with r = w_Q − (Hḡ)_Q,
δw = −Hḡ − H E_Q (H_QQ)⁻¹ r (joint) or −Hḡ − Σ_q (r_q / H_qq) H e_q (independent),
saliency (w_q − (Hḡ)_q)² / (2 H_qq).  ``scope="global"`` ranks all weights together;
``"layer"`` removes the same fraction of every layer.  ``steps`` > 1 prunes
gradually to the sparsity schedule s_t = s_f + (s_i − s_f)(1 − t/T)³ (``"cubic"``, Zhu &
Gupta 2017) or linearly, recomputing the gradients and H at every stage.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .. import _backend as B
from .. import _validate as V
from ..blockwise import BlockInverseFisher
from ..obs import _joint as _obs_joint
from ..sliding import SlidingWindowInverseFisher
from ..static import StaticInverseFisher
from ._convert import device_spec, to_torch
from .capture import (_batches, _buffers_restored, _check_loss, _check_model,
                      per_sample_gradients)
from .layout import select_layers

__all__ = ["prune", "PruneReport", "PruneStage", "PruneMasks"]

_METHODS = ("joint", "independent", "magnitude", "obd")
_FISHERS = ("block", "static", "sliding")


@dataclass
class PruneStage:
    """One stage of :func:`prune`, as listed in :attr:`PruneReport.stages`.

    The predicted increase is that of the quadratic model of docs/math.md §3
    (½ δwᵀ F δw for the weights removed, plus the first-order term of §9 when
    ``first_order=True``); the losses are measured on ``data``.

    Attributes
    ----------
    stage : int
        The stage's number, 1 to ``steps``.
    target_sparsity : float
        The sparsity the schedule asks for after this stage.
    removed : int
        The number of weights removed in this stage.
    loss_before, loss_after : float
        The mean loss on ``data`` before and after the stage.
    predicted_increase : float
        The loss increase the quadratic model predicts, ½ δᵀFδ (plus ḡ·δ with
        ``first_order``) for the stage's change δ of the weights (for ``"obd"``, which
        makes no update, δ zeroes the removed weights); ``nan`` for ``"magnitude"``,
        which builds no F.
    layer_sparsity : dict of str to float
        Each pruned layer's sparsity (fraction of its weights removed) afterwards.
    seconds : float
        The wall-clock time of the stage.

    Examples
    --------
    >>> import torch
    >>> from mfac_linalg.torch import prune
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    >>> x, y = torch.randn(20, 4), torch.randint(0, 2, (20,))
    >>> rep = prune(model, torch.nn.CrossEntropyLoss(), (x, y), 0.5, num_grads=16,
    ...             damping=1e-3, steps=2)
    >>> [(s.stage, s.target_sparsity) for s in rep.stages]
    [(1, 0.4375), (2, 0.5)]
    >>> sum(s.removed for s in rep.stages), sorted(rep.stages[-1].layer_sparsity)
    (9, ['0', '2'])
    """
    stage: int
    target_sparsity: float
    removed: int
    loss_before: float
    loss_after: float
    predicted_increase: float
    layer_sparsity: dict
    seconds: float


@dataclass
class PruneReport:
    """What :func:`prune` returns.  ``str(report)`` is a table, one row per stage.

    Attributes
    ----------
    method : str
        The pruning method (``"joint"``, ``"independent"``, ``"magnitude"`` or ``"obd"``).
    stages : list of PruneStage
        One :class:`PruneStage` per stage, in order.
    masks : PruneMasks
        The masks kept on the model (the removed weights stay zero under training).
    sparsity : float
        The final fraction of the pruned layers' weights that are removed.

    Examples
    --------
    >>> import torch
    >>> from mfac_linalg.torch import prune
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    >>> x, y = torch.randn(20, 4), torch.randint(0, 2, (20,))
    >>> rep = prune(model, torch.nn.CrossEntropyLoss(), (x, y), 0.5, num_grads=16,
    ...             damping=1e-3)
    >>> rep.method, rep.sparsity, len(rep.stages)
    ('joint', 0.5, 1)
    >>> print(str(rep).splitlines()[0])
    prune method=joint: final sparsity 0.5000
    """
    method: str
    stages: list = field(default_factory=list)
    masks: object = None
    sparsity: float = 0.0

    def __str__(self):
        names = list(self.stages[0].layer_sparsity) if self.stages else []
        head = (f"{'stage':>5} {'target':>7} {'removed':>8} {'loss before':>12} "
                f"{'loss after':>12} {'predicted':>10} {'seconds':>8}  layer sparsity")
        rows = [f"prune method={self.method}: final sparsity {self.sparsity:.4f}", head]
        for s in self.stages:
            per = " ".join(f"{n}={s.layer_sparsity[n]:.3f}" for n in names)
            rows.append(f"{s.stage:>5} {s.target_sparsity:>7.4f} {s.removed:>8} "
                        f"{s.loss_before:>12.6g} {s.loss_after:>12.6g} "
                        f"{s.predicted_increase:>10.4g} {s.seconds:>8.3f}  {per}")
        return "\n".join(rows)


def _mask_hook(module, inputs):
    """Forward pre-hook: removed weights to zero (a parameter only: under ``torch.func``
    the weight is a functional copy of the already masked parameter)."""
    removed = getattr(module, "_mfac_removed", None)
    if removed is not None and isinstance(module.weight, torch.nn.Parameter):
        with torch.no_grad():
            module.weight.masked_fill_(removed, 0.0)


def _hook_keys(module):
    return [k for k, h in module._forward_pre_hooks.items() if h is _mask_hook]


class PruneMasks:
    """The masks of the pruned layers, kept on the model.

    Each pruned layer holds a non-persistent buffer ``_mfac_removed`` (True where a weight is
    removed; it follows ``model.to(...)`` and ``copy.deepcopy`` and stays out of the
    ``state_dict``) and a forward pre-hook that sets the removed weights to zero before
    every forward pass, so they stay zero under further training (after each optimizer
    step).  ``removed`` maps layer names to these masks; :meth:`apply` zeroes at once,
    :meth:`remove` takes the hooks and buffers off.  :func:`prune` creates one (its
    report's ``masks``); making one directly starts with no weight removed, and keeps a
    layer's existing mask and hook if it already has them.

    Parameters
    ----------
    named_modules : mapping or iterable of (str, torch.nn.Module)
        The layers (each with a ``weight``) by name, e.g. ``model.named_children()``.

    Attributes
    ----------
    removed : dict of str to torch.Tensor
        Each layer's boolean mask, of the weight's shape, True where a weight is removed
        (the buffers themselves: setting entries marks weights as removed).

    Examples
    --------
    >>> import torch
    >>> from mfac_linalg.torch import PruneMasks
    >>> layer = torch.nn.Linear(2, 2)
    >>> masks = PruneMasks({"fc": layer})
    >>> masks.removed["fc"][0, 1] = True               # remove one weight
    >>> masks.apply()
    >>> layer.weight[0, 1].item(), masks.sparsity()
    (0.0, {'fc': 0.25})
    >>> with torch.no_grad():
    ...     _ = layer.weight.fill_(1.0)                 # e.g. an optimizer step
    ...     _ = layer(torch.ones(1, 2))                 # the forward hook zeroes it again
    >>> layer.weight[0, 1].item()
    0.0
    >>> masks.remove()
    >>> hasattr(layer, "_mfac_removed")
    False
    """

    def __init__(self, named_modules):
        self._mods = dict(named_modules)
        for m in self._mods.values():
            if getattr(m, "_mfac_removed", None) is None:
                m.register_buffer("_mfac_removed", torch.zeros_like(m.weight, dtype=torch.bool),
                                  persistent=False)
            if not _hook_keys(m):
                m.register_forward_pre_hook(_mask_hook)

    @property
    def removed(self):
        """{layer name: boolean tensor of the weight's shape, True where removed}."""
        return {n: m._mfac_removed for n, m in self._mods.items()}

    @torch.no_grad()
    def apply(self):
        """Set every removed weight to zero now."""
        for m in self._mods.values():
            m.weight.masked_fill_(m._mfac_removed, 0.0)

    def remove(self):
        """Take the hooks and masks off the model (the weights keep their values)."""
        for m in self._mods.values():
            for k in _hook_keys(m):
                del m._forward_pre_hooks[k]
            if "_mfac_removed" in m._buffers:
                del m._buffers["_mfac_removed"]

    def sparsity(self):
        """{layer name: fraction of its weights removed}."""
        return {n: float(r.float().mean()) for n, r in self.removed.items()}


def _schedule(s_i, s_f, steps, schedule):
    if schedule == "cubic":
        return [s_f + (s_i - s_f) * (1.0 - t / steps) ** 3 for t in range(1, steps + 1)]
    return [s_i + (s_f - s_i) * t / steps for t in range(1, steps + 1)]


@torch.no_grad()
def _mean_loss(model, loss_fn, batches):
    """The mean loss over ``batches``; the model's buffers (a train-mode batch norm's running
    statistics) are left as they were."""
    with _buffers_restored(model):
        return float(np.mean([float(loss_fn(model(x), y)) for x, y in batches]))


def _gradients(model, loss_fn, batches, num_grads, weight_idx):
    """The first ``num_grads`` per-sample gradients, restricted to the pruned weights,
    as a float64 (m, |w_c|) tensor on the model's device."""
    rows, got = [], 0
    for x, y in batches:
        take = min(num_grads - got, x.shape[0])
        G = per_sample_gradients(model, loss_fn, (x[:take], y[:take]))
        rows.append(G[:, weight_idx])
        got += take
        if got == num_grads:
            break
    if got < num_grads:
        raise ValueError(f"num_grads={num_grads} but data holds only {got} samples")
    # float64 for the OBS quantities: in float32, H_qq = (1 - sum_i V_iq^2) / lambda
    # cancels when lambda is small (docs/math.md §1, "Precision")
    return torch.cat(rows, 0).to(torch.float64).contiguous()


def _operator(G, fisher, damping, block_size, layer_sizes):
    if fisher == "static":
        return StaticInverseFisher(G, damping)
    if fisher == "sliding":
        win = SlidingWindowInverseFisher(G.shape[1], G.shape[0], damping,
                                         dtype=str(G.dtype).replace("torch.", ""),
                                         device=device_spec(G.device))
        win.update(G)
        return win
    return BlockInverseFisher(G, damping, block_size=min(block_size, G.shape[1]),
                              blocks=layer_sizes)


def _on(op, x):
    """A host vector in the operator's namespace (an explicit host -> device copy on the GPU)."""
    return op.backend.xp.asarray(x)


def _apply(op, x):
    """H x for a host vector x, back on the host (float64)."""
    return np.asarray(B.to_host(op.matvec(_on(op, x))), dtype=np.float64)


def _removal(op, r, Q):
    """−H E_Q (H_QQ)⁻¹ r_Q (host, float64) for the boolean host set Q, per block of
    H = αI + βVᵀV (docs/math.md §3): one q × q solve per block that loses weights, or its
    Woodbury form in r dims when q exceeds both r and 512 (:func:`mfac_linalg.obs`'s
    joint removal, whose predicted loss is not used here)."""
    dw, _ = _obs_joint(op, _on(op, r), np.asarray(Q), op.backend.xp)
    return np.asarray(B.to_host(dw), dtype=np.float64)


def _select(score, counts, groups):
    """Boolean mask of the smallest scores: ``counts[k]`` inside group k (global: one group)."""
    Q = np.zeros(score.shape[0], dtype=bool)
    for idx, c in zip(groups, counts):
        if c <= 0:
            continue
        order = np.argsort(score[idx], kind="stable")[:c]
        Q[idx[order]] = True
    return Q


def prune(model, loss_fn, data, sparsity, *, method="joint", fisher="block", block_size=128,
          num_grads=64, damping=1e-5, scope="global", first_order=False, steps=1,
          schedule="cubic", layers=None, block_layout="layer", between=None):
    r"""Prune the weights of a model's Linear / Conv2d layers by Optimal Brain Surgeon.

    See the module docstring for the formulas (docs/math.md §3, §9).  Each stage:
    per-sample gradients of the first ``num_grads`` samples of ``data`` at the current
    weights (restricted to the weights not yet removed), the inverse Fisher, the
    saliencies, the removal and the update, then the weights written back in the
    model's dtype with the removed ones exactly zero.  The masks stay on the model
    (:class:`PruneMasks`, a forward pre-hook per layer keeps removed weights at zero).
    The forward passes of the call itself (the losses, the per-sample gradients) leave
    the model's buffers as they were, bit for bit (a batch norm in training mode keeps
    its running statistics); what ``between`` does to them is kept.

    Parameters
    ----------
    model : torch.nn.Module
    loss_fn : callable, loss_fn(output, target) -> scalar
    data : (inputs, targets) or an iterable of such batches: the gradients and the
        reported losses
    sparsity : float in [0, 1)
        Target fraction of removed weights (over the pruned layers' weights; weights
        that are zero at the start count as removed and stay so).
    method : {"joint", "independent", "magnitude", "obd"}
    fisher : {"block", "static", "sliding"}
        The inverse Fisher: WoodFisher blocks of ``block_size``, the full static M-FAC
        operator, or a sliding window holding the ``num_grads`` gradients.
    block_size : int
        Block size of ``fisher="block"``.
    num_grads : int
        m, the gradients per stage.
    damping : float
        λ > 0.
    scope : {"global", "layer"}
    first_order : bool
        Include the mean gradient (WoodTaylor).  Not with magnitude / OBD.
    steps : int
        Stages (gradual pruning when > 1).
    schedule : {"cubic", "linear"}
    layers : optional module names or modules (default: every Linear / Conv2d layer; other
        trainable parameters, e.g. batch norm, are left as they are)
    block_layout : {"layer", "flat"}
        "layer": blocks never cross a layer boundary (docs/math.md §3); "flat": blocks of
        ``block_size`` over the whole compressed vector, as the published M-FAC pruner.
    between : optional callable ``between(model, stage)`` run after every stage but the
        last (e.g. a few fine-tuning steps; the masks stay applied).

    Returns
    -------
    PruneReport

    Costs
    -----
    Per stage: ``num_grads`` per-sample gradients, the operator's set-up (blocks:
    O(m² d + m³ d / b)), one diagonal pass O(m d), the update (independent: one product
    O(m d); joint: one |Q_k| × |Q_k| solve per block, or its Woodbury form).

    Raises
    ------
    TypeError, ValueError
        Bad arguments (named in the message), too few samples for ``num_grads``: checked
        before the model is touched.  Any failure after that (numerical, in any stage, or
        raised by ``between``) restores the model as it was before the call: its
        ``state_dict`` bit for bit and the pruned layers' masks and hooks.  This keeps one
        copy of the model's ``state_dict`` for the duration of the call.

    Examples
    --------
    >>> import torch
    >>> from mfac_linalg.torch import prune
    >>> torch.manual_seed(0)                                    # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    >>> x, y = torch.randn(40, 6), torch.randint(0, 3, (40,))
    >>> rep = prune(model, torch.nn.CrossEntropyLoss(), (x, y), 0.5, num_grads=32,
    ...             damping=1e-3, block_size=16)
    >>> rep.sparsity, float((model[0].weight == 0).float().mean()) > 0
    (0.5, True)
    """
    _check_model(model)
    _check_loss(loss_fn)
    batches = _batches(data)
    sparsity = V.real(sparsity, "sparsity", low=0.0, high=1.0, high_open=True)
    method = V.choice(method, "method", _METHODS)
    fisher = V.choice(fisher, "fisher", _FISHERS)
    block_size = V.positive_int(block_size, "block_size")
    num_grads = V.positive_int(num_grads, "num_grads")
    scope = V.choice(scope, "scope", ("global", "layer"))
    first_order = V.boolean(first_order, "first_order")
    steps = V.positive_int(steps, "steps")
    schedule = V.choice(schedule, "schedule", ("cubic", "linear"))
    block_layout = V.choice(block_layout, "block_layout", ("layer", "flat"))
    if first_order and method in ("magnitude", "obd"):
        raise ValueError(f"first_order=True needs method 'joint' or 'independent'; got "
                         f"{method!r}")
    if between is not None and not callable(between):
        raise TypeError(f"between must be callable as between(model, stage); got "
                        f"{type(between).__name__}")
    named = select_layers(model, layers, strict=False)     # other parameters are not pruned
    V.damping(damping)
    # positions of the pruned weights inside parameters_to_vector(trainable params)
    trainable = [p for p in model.parameters() if p.requires_grad]
    offs, o = {}, 0
    for p in trainable:
        offs[id(p)] = o
        o += p.numel()
    weight_idx = torch.cat([torch.arange(offs[id(m.weight)], offs[id(m.weight)] + m.weight.numel())
                            for _, m in named]).to(trainable[0].device)
    sizes = [m.weight.numel() for _, m in named]
    D = sum(sizes)
    layer_of = np.repeat(np.arange(len(sizes)), sizes)
    with torch.no_grad():
        removed0 = torch.cat([((m.weight == 0) | m._mfac_removed
                               if getattr(m, "_mfac_removed", None) is not None
                               else (m.weight == 0)).reshape(-1) for _, m in named])
    s_i = float(removed0.double().mean())
    if sparsity < s_i:
        raise ValueError(f"sparsity={sparsity} is below the layers' current sparsity {s_i:.4f}")
    available = sum(x.shape[0] for x, _ in batches)
    if method != "magnitude" and available < num_grads:
        raise ValueError(f"num_grads={num_grads} but data holds only {available} samples")
    snapshot = _Snapshot(model, named)
    try:
        return _prune_stages(model, loss_fn, batches, named, sizes, D, layer_of, weight_idx,
                             s_i, sparsity, method, fisher, block_size, num_grads, damping,
                             scope, first_order, steps, schedule, block_layout, between)
    except BaseException:
        snapshot.restore()
        raise


class _Snapshot:
    """The model's state before :func:`prune` touches it: a copy of its ``state_dict``
    and, per pruned layer, its mask (if it had one) and forward pre-hooks."""

    def __init__(self, model, named):
        self.model = model
        # tensors only (a module's extra state, if any, is not a tensor: left alone)
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()
                      if torch.is_tensor(v)}
        self.layers = [(m, m._mfac_removed.clone() if "_mfac_removed" in m._buffers else None,
                        set(_hook_keys(m))) for _, m in named]

    @torch.no_grad()
    def restore(self):
        live = self.model.state_dict()
        for k, v in self.state.items():
            live[k].copy_(v)
        for m, mask, hooks in self.layers:
            for k in _hook_keys(m):
                if k not in hooks:
                    del m._forward_pre_hooks[k]
            if mask is not None:
                m._mfac_removed.copy_(mask)
            elif "_mfac_removed" in m._buffers:
                del m._buffers["_mfac_removed"]


def _prune_stages(model, loss_fn, batches, named, sizes, D, layer_of, weight_idx, s_i,
                  sparsity, method, fisher, block_size, num_grads, damping, scope,
                  first_order, steps, schedule, block_layout, between):
    """The stages of :func:`prune` (arguments validated); the caller restores on error."""
    masks = PruneMasks(named)          # keeps the masks already on these layers
    with torch.no_grad():
        for _, m in named:
            m._mfac_removed |= (m.weight == 0)
    masks.apply()
    targets = _schedule(s_i, sparsity, steps, schedule)
    report = PruneReport(method=method, masks=masks)
    for stage, s_t in enumerate(targets, 1):
        t0 = time.perf_counter()
        loss_before = _mean_loss(model, loss_fn, batches)
        with torch.no_grad():
            w_full = torch.cat([m.weight.detach().reshape(-1) for _, m in named])
        removed = torch.cat([masks.removed[n].reshape(-1) for n, _ in named]).cpu().numpy()
        keep = np.flatnonzero(~removed)                          # compressed coordinates
        w = w_full.cpu().double().numpy()[keep]
        if scope == "global":
            groups = [np.arange(keep.size)]
            counts = [int(round(s_t * D)) - int(removed.sum())]
        else:
            lk = layer_of[keep]
            groups = [np.flatnonzero(lk == k) for k in range(len(sizes))]
            counts = [int(round(s_t * sizes[k])) - int(removed[layer_of == k].sum())
                      for k in range(len(sizes))]
        counts = [max(0, min(c, g.size)) for c, g in zip(counts, groups)]
        predicted = float("nan")
        gbar = None
        if method == "magnitude":
            Q = _select(np.abs(w), counts, groups)
            dw = np.zeros_like(w)
        else:
            kidx = weight_idx[torch.from_numpy(keep).to(weight_idx.device)]
            G = _gradients(model, loss_fn, batches, num_grads, kidx)
            lsz = None
            if block_layout == "layer":
                lsz = [int((layer_of[keep] == k).sum()) for k in range(len(sizes))]
                lsz = [c for c in lsz if c > 0]
            op = _operator(G, fisher, damping, block_size, lsz)
            Gn = G.detach().cpu().double().numpy()
            if method == "obd":
                Fdiag = damping + (Gn ** 2).mean(axis=0)
                Q = _select(0.5 * Fdiag * w * w, counts, groups)
                dw = np.zeros_like(w)
            else:
                Hdiag = np.asarray(B.to_host(op.diagonal()), dtype=np.float64)
                r, Hg = w, 0.0
                if first_order:
                    gbar = Gn.mean(axis=0)
                    Hg = _apply(op, gbar)
                    r = w - Hg
                Q = _select(r * r / (2.0 * Hdiag), counts, groups)
                if method == "joint":
                    dw = _removal(op, r, Q)
                else:
                    s = np.where(Q, r / Hdiag, 0.0)
                    dw = -_apply(op, s)
                dw = dw - Hg
        w_new = w + dw
        w_new[Q] = 0.0
        if method != "magnitude":
            # the quadratic model of the loss change (docs/math.md §9): g.dw + 1/2 dw^T F dw
            delta = w_new - w
            predicted = 0.5 * float(op.fisher().quad(_on(op, delta)))
            if gbar is not None:
                predicted += float(gbar @ delta)
        nrem = int(Q.sum())
        full = w_full.cpu().double().numpy().copy()
        full[keep] = w_new
        full[removed] = 0.0
        newly = np.zeros(D, dtype=bool)
        newly[keep[Q]] = True
        with torch.no_grad():
            t = to_torch(full, dtype=w_full.dtype, device=w_full.device)
            a = 0
            for (n, m), sz in zip(named, sizes):
                m.weight.copy_(t[a:a + sz].view_as(m.weight))
                m._mfac_removed |= torch.from_numpy(newly[a:a + sz]).to(
                    m.weight.device).view_as(m.weight)
                a += sz
        masks.apply()
        loss_after = _mean_loss(model, loss_fn, batches)
        report.stages.append(PruneStage(stage, float(s_t), nrem, loss_before, loss_after,
                                        float(predicted), masks.sparsity(),
                                        time.perf_counter() - t0))
        if between is not None and stage < steps:
            between(model, stage)
            masks.apply()
    allr = torch.cat([masks.removed[n].reshape(-1) for n, _ in named])
    report.sparsity = float(allr.double().mean())
    return report
