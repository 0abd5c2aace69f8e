r"""Per-sample gradients and per-layer statistics of a PyTorch model.

* :func:`per_sample_gradients` -- the (n, d) matrix of per-sample gradients in
  ``parameters_to_vector`` order, the input of :class:`~mfac_linalg.StaticInverseFisher`,
  :class:`~mfac_linalg.BlockInverseFisher` and :class:`~mfac_linalg.SlidingWindowInverseFisher`.
* :func:`capture_statistics` -- per layer, the inputs a and the output gradients g of
  every sample (docs/math.md §4, §8), collected with hooks for ``nn.Linear`` (any
  leading dimensions) and ``nn.Conv2d`` (unfolded patches).
* :func:`kronecker_preconditioner` -- one block-diagonal Kronecker operator (K-FAC,
  EKFAC, KPSVD, deflation, K-FAC corrected) acting in ``parameters_to_vector`` order.

**Scaling for the loss's reduction.**  The Kronecker family needs the gradient of each
sample's *own* loss l_n (docs/math.md §4: DW_n = g_n a_nᵀ with g_n = ∂l_n/∂z_n).  For a
batch loss L = (1/B) Σ_n l_n (PyTorch's ``reduction="mean"``) the gradient PyTorch gives
at a layer's output is g_n / B, so the captured gradients are multiplied by the batch
size B; for ``reduction="sum"`` they are taken as they are.  A mean over further
dimensions (tokens of a sequence, the features of ``MSELoss``) stays inside l_n.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as Fn

from .. import _progress
from .. import _validate as V
from .. import kronecker as _K
from .layout import ParameterLayout, PermutedOperator, select_layers

__all__ = ["per_sample_gradients", "capture_statistics", "LayerStatistics",
           "CapturedStatistics", "kronecker_preconditioner", "KRONECKER_METHODS"]

KRONECKER_METHODS = ("kfac", "ekfac", "kpsvd", "deflation", "kfac_corrected", "lanczos")


# -- arguments ----------------------------------------------------------------------------

def _check_model(model):
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")


def _check_loss(loss_fn):
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable as loss_fn(output, target); got "
                        f"{type(loss_fn).__name__}")


def _batch(batch, name="batch"):
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise TypeError(f"{name} must be a pair (inputs, targets); got {type(batch).__name__}")
    x, y = batch
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError(f"{name} must hold two tensors (inputs, targets); got "
                        f"({type(x).__name__}, {type(y).__name__})")
    if x.ndim < 1 or y.ndim < 1:
        raise ValueError(f"{name}: inputs and targets must have a leading sample dimension; "
                         f"got shapes {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[0] != y.shape[0] or x.shape[0] < 1:
        raise ValueError(f"{name}: inputs and targets must have the same number of samples "
                         f">= 1; got {x.shape[0]} and {y.shape[0]}")
    return x, y


def _batches(data):
    """One (x, y) pair or an iterable of pairs -> a list of pairs."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(
            isinstance(t, torch.Tensor) for t in data):
        return [_batch(data, "data")]
    if not hasattr(data, "__iter__"):
        raise TypeError(f"data must be a pair (inputs, targets) or an iterable of pairs; got "
                        f"{type(data).__name__}")
    out = [_batch(b, f"data[{k}]") for k, b in enumerate(data)]
    if not out:
        raise ValueError("data must hold at least one batch; got none")
    return out


def _reduction(loss_fn, reduction):
    if reduction is None:
        reduction = getattr(loss_fn, "reduction", None)
        if reduction is None:
            raise ValueError("reduction must be given (\"mean\" or \"sum\") for a loss_fn "
                             "without a .reduction attribute")
    return V.choice(reduction, "reduction", ("mean", "sum"))


@contextlib.contextmanager
def _buffers_restored(model):
    """Put the model's buffers (BatchNorm running statistics, ``num_batches_tracked``)
    back as they were, bit for bit, when the block ends, whether it returns or raises:
    the forward passes of a measurement must not change the model.  Keeps one copy of the
    buffers meanwhile; a buffer the block replaced by another tensor is put back too."""
    saved = [(mod, name, b, b.detach().clone()) for mod in model.modules()
             for name, b in mod._buffers.items() if b is not None]
    try:
        yield
    finally:
        with torch.no_grad():
            for mod, name, b, old in saved:
                if mod._buffers.get(name) is not b:
                    mod._buffers[name] = b
                b.copy_(old)


def _trainable(model):
    ps = [p for p in model.parameters() if p.requires_grad]
    if not ps:
        raise ValueError("model has no trainable parameters")
    return ps


# -- per-sample gradients -------------------------------------------------------------------

def per_sample_gradients(model, loss_fn, batch, *, method="auto", chunk_size=None):
    r"""The gradient of every sample's own loss, as the rows of an (n, d) tensor.

    Row i is ∇_w loss_fn(model(x_i), y_i) for the batch of one (x_i, y_i), flattened in
    ``parameters_to_vector`` order over the model's trainable parameters (per parameter
    in ``model.parameters()`` order, each flattened row-major).  For a mean- or
    sum-reduced loss this is the gradient of the per-sample loss l_i, the gradients
    docs/math.md §1 stores as the rows of G.

    ``method="vmap"`` uses ``torch.func`` (``functional_call``, ``grad``, ``vmap``: one
    batched pass); ``"loop"`` one forward and backward per sample (micro-batches of one;
    any model that runs on a batch of one; batch norm in training mode does not: call
    ``model.eval()`` first); ``"auto"`` tries ``vmap`` and falls back to the loop.
    Gradients are computed also under ``torch.no_grad()``.  Cost: about n times a
    single-sample gradient; memory O(n d) for the result (``vmap`` with ``chunk_size``
    bounds the working memory).

    The model is left as it was: its buffers (e.g. the running statistics of a batch
    norm in training mode, which the per-sample forward passes update) are put back bit
    for bit when the call returns or raises, and the parameters' ``.grad`` are not
    touched.

    Parameters
    ----------
    model : torch.nn.Module
    loss_fn : callable, loss_fn(output, target) -> scalar
    batch : (inputs, targets) tensors with n samples along dimension 0
    method : {"auto", "vmap", "loop"}
    chunk_size : int, optional
        Samples per ``vmap`` chunk (default: all).

    Returns
    -------
    torch.Tensor (n, d), on the parameters' device and in their dtype, contiguous and
    detached: it goes into the library's operators through DLPack with no copy.

    Raises
    ------
    TypeError, ValueError
        Bad arguments (named in the message).

    Examples
    --------
    >>> import torch, mfac_linalg as ml
    >>> from mfac_linalg.torch import per_sample_gradients
    >>> model = torch.nn.Linear(3, 2).double()
    >>> x, y = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 2, (5,))
    >>> G = per_sample_gradients(model, torch.nn.CrossEntropyLoss(), (x, y))
    >>> G.shape
    torch.Size([5, 8])
    >>> loss = torch.nn.CrossEntropyLoss()(model(x), y)            # the mean of the rows
    >>> g = torch.autograd.grad(loss, list(model.parameters()))
    >>> torch.allclose(G.mean(0), torch.cat([t.reshape(-1) for t in g]))
    True
    >>> op = ml.StaticInverseFisher(G, damping=1e-3)               # zero-copy via DLPack
    """
    _check_model(model)
    _check_loss(loss_fn)
    x, y = _batch(batch)
    method = V.choice(method, "method", ("auto", "vmap", "loop"))
    if chunk_size is not None:
        chunk_size = V.positive_int(chunk_size, "chunk_size")
    params = _trainable(model)
    # the model is left as it was, on success and on failure: the per-sample forward
    # passes update a train-mode BatchNorm's running statistics
    with _buffers_restored(model):
        if method in ("auto", "vmap"):
            try:
                return _psg_vmap(model, loss_fn, x, y, chunk_size)
            except Exception:
                if method == "vmap":
                    raise
        return _psg_loop(model, loss_fn, x, y, params)


def _psg_vmap(model, loss_fn, x, y, chunk_size):
    from torch.func import functional_call, grad, vmap
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    buffers = dict(model.named_buffers())

    def loss_one(p, xi, yi):
        out = functional_call(model, ({**p, **frozen}, buffers), (xi.unsqueeze(0),))
        return loss_fn(out, yi.unsqueeze(0))

    g = vmap(grad(loss_one), in_dims=(None, 0, 0), chunk_size=chunk_size)(params, x, y)
    n = x.shape[0]
    return torch.cat([g[k].reshape(n, -1) for k in names], dim=1).detach().contiguous()


@torch.enable_grad()          # also when called under torch.no_grad(), as vmap works
def _psg_loop(model, loss_fn, x, y, params):
    rows = []
    for i in range(x.shape[0]):
        loss = loss_fn(model(x[i:i + 1]), y[i:i + 1])
        gs = torch.autograd.grad(loss, params, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                               for g, p in zip(gs, params)]))
    return torch.stack(rows).detach().contiguous()


# -- layer statistics -----------------------------------------------------------------------

@dataclass
class LayerStatistics:
    """One layer's per-sample data (docs/math.md §4, §8), an entry of
    :attr:`CapturedStatistics.layers`.

    Sample n's gradient of the layer's [W | b] is DW_n = g_n a_nᵀ (docs/math.md §4),
    g_n its row of ``output_grads`` and a_n its row of ``activations`` with a 1 appended
    for the bias; with T positions (``Conv2d``) it is the sum over t of g_nt a_ntᵀ.

    Attributes
    ----------
    name : str
        The module's name in the model.
    spec : LayerSpec
        Its :class:`~mfac_linalg.torch.LayerSpec`.
    activations : torch.Tensor
        Shape (n, d_in) or (n, T, d_in): the layer's inputs (no bias column;
        ``Conv2d``: the T unfolded patches, d_in = C_in kh kw).
    output_grads : torch.Tensor
        Shape (n, d_out) or (n, T, d_out): the gradients of each sample's own loss with
        respect to the layer's outputs (scaled for the reduction, see the module doc).

    Examples
    --------
    >>> import torch
    >>> from mfac_linalg.torch import capture_statistics
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 2), torch.nn.Flatten(),
    ...                             torch.nn.Linear(8, 3))
    >>> x, y = torch.randn(5, 1, 3, 3), torch.randint(0, 3, (5,))
    >>> st = capture_statistics(model, torch.nn.CrossEntropyLoss(), (x, y))
    >>> conv = st.layers[0]
    >>> conv.name, conv.spec.kind, tuple(conv.activations.shape), tuple(conv.output_grads.shape)
    ('0', 'conv2d', (5, 4, 4), (5, 4, 2))
    """
    name: str
    spec: object
    activations: torch.Tensor
    output_grads: torch.Tensor


@dataclass
class CapturedStatistics:
    """What :func:`capture_statistics` returns.

    Attributes
    ----------
    layout : ParameterLayout
        The :class:`~mfac_linalg.torch.ParameterLayout` of the captured layers.
    layers : list of LayerStatistics
        One :class:`LayerStatistics` per layer, in the layout's order.
    num_samples : int
        n, the number of data points times ``mc_samples``.
    loss : float
        The mean over batches of the batch loss with the data's labels.

    Examples
    --------
    >>> import torch
    >>> from mfac_linalg.torch import capture_statistics
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    >>> x, y = torch.randn(10, 4), torch.randint(0, 2, (10,))
    >>> loss_fn = torch.nn.CrossEntropyLoss()
    >>> st = capture_statistics(model, loss_fn, (x, y), fisher="mc", mc_samples=2)
    >>> st.layout.dim, [l.name for l in st.layers], st.num_samples
    (23, ['0', '2'], 20)
    >>> abs(st.loss - loss_fn(model(x), y).item()) < 1e-6
    True
    """
    layout: ParameterLayout
    layers: list
    num_samples: int
    loss: float


def _patches(module, x):
    """Unfolded patches (B, T, C_in kh kw) of a Conv2d's input, in the weight's order."""
    if module.padding_mode != "zeros":
        raise ValueError(f"Conv2d with padding_mode={module.padding_mode!r} is not supported "
                         "(only 'zeros')")
    pad = module.padding
    if isinstance(pad, str):
        if pad == "valid":
            pad = 0
        else:
            raise ValueError(f"Conv2d with padding={pad!r} is not supported (give the "
                             "padding as integers)")
    p = Fn.unfold(x, module.kernel_size, dilation=module.dilation, padding=pad,
                  stride=module.stride)
    return p.transpose(1, 2)


def _layer_rows(module, x, g):
    """(A, G) of one batch: (B, d_in) / (B, d_out) or (B, T, d_in) / (B, T, d_out)."""
    B = x.shape[0]
    if isinstance(module, torch.nn.Conv2d):
        A = _patches(module, x)
        G = g.reshape(B, g.shape[1], -1).transpose(1, 2)
    else:
        A = x.reshape(B, -1, x.shape[-1])
        G = g.reshape(B, -1, g.shape[-1])
    if A.shape[1] == 1:
        A, G = A[:, 0], G[:, 0]
    return A, G


_MC_LOSSES = (torch.nn.CrossEntropyLoss, torch.nn.MSELoss, torch.nn.BCEWithLogitsLoss)


def _sample_labels(loss_fn, output, gen):
    """Labels drawn from the model's predictive distribution implied by the loss."""
    out = output.detach()
    if isinstance(loss_fn, torch.nn.CrossEntropyLoss):
        if out.ndim != 2:
            raise ValueError("fisher='mc' with CrossEntropyLoss needs (B, classes) outputs; "
                             f"got shape {tuple(out.shape)}")
        probs = out.softmax(dim=1)
        return torch.multinomial(probs.cpu() if gen.device.type == "cpu" else probs, 1,
                                 generator=gen).reshape(-1).to(out.device)
    if isinstance(loss_fn, torch.nn.MSELoss):
        # l = (z - y)^2 is the Gaussian negative log-likelihood with variance 1/2
        noise = torch.randn(out.shape, generator=gen, dtype=out.dtype,
                            device=gen.device).to(out.device)
        return out + noise * (0.5 ** 0.5)
    if isinstance(loss_fn, torch.nn.BCEWithLogitsLoss):
        p = out.sigmoid()
        return torch.bernoulli(p.cpu() if gen.device.type == "cpu" else p,
                               generator=gen).to(out.device)
    raise ValueError("fisher='mc' needs loss_fn to be nn.CrossEntropyLoss, nn.MSELoss or "
                     f"nn.BCEWithLogitsLoss (the predictive distribution); got "
                     f"{type(loss_fn).__name__}")


def capture_statistics(model, loss_fn, data, *, fisher="empirical", mc_samples=1, seed=0,
                       layers=None, reduction=None):
    r"""Per-layer inputs and per-sample output gradients of ``nn.Linear`` / ``nn.Conv2d``.

    For every batch (x, y) of ``data`` one forward pass (hooks store each layer's input)
    and one backward pass per label draw (hooks on the layers' outputs store
    ∂L/∂z); the parameters' ``.grad`` are left untouched, and the model's buffers (e.g. a
    train-mode batch norm's running statistics, which the forward passes update) are put
    back bit for bit when the call returns or raises.  A layer whose output does not
    reach the loss gets zero output gradients.  The gradients are scaled
    for the reduction (times the batch size B for ``"mean"``: see the module doc), so
    that DW_n = G_nᵀ A_n is the gradient of sample n's own loss.

    * ``nn.Linear`` with input (B, d_in): 2-D rows; with input (B, *, d_in): the T =
      prod(*) positions of each sample kept as 3-D (B, T, d) (docs/math.md §8).
    * ``nn.Conv2d`` (groups=1, zero padding): the T unfolded patches of each sample
      (``torch.nn.functional.unfold``, d_in = C_in kh kw in the weight's order) and the
      output gradients at the T output positions.
    * Each layer must see the batch's samples along its input's first dimension (a
      time-major (T, B, d) or flattened (B T, d) input would mix the samples):
      ``ValueError`` naming the layer otherwise (a (T, B, d) input with T = B cannot be
      told apart).

    ``fisher="empirical"`` uses the data's labels; ``fisher="mc"`` draws ``mc_samples``
    labels per data point from the model's predictive distribution (CrossEntropyLoss:
    categorical over the softmax; MSELoss: Gaussian of variance 1/2 around the output;
    BCEWithLogitsLoss: Bernoulli), seeded by ``seed`` (reproducible); each draw counts as
    one sample (n = data points × mc_samples), the Monte-Carlo Fisher.

    Cost: one forward and ``mc_samples`` backward passes per batch; memory O(n T (d_in +
    d_out)) per layer (the statistics are kept per sample).

    Parameters
    ----------
    model : torch.nn.Module
    loss_fn : callable, loss_fn(output, target) -> scalar
    data : (inputs, targets) tensors, or an iterable of such batches
    fisher : {"empirical", "mc"}
    mc_samples : int, draws per data point for ``fisher="mc"``
    seed : int, seeds the label draws
    layers : optional module names or modules (see :meth:`ParameterLayout.from_model`)
    reduction : {"mean", "sum"}, default ``loss_fn.reduction``

    Returns
    -------
    CapturedStatistics (tensors on the model's device, in its dtype)

    Examples
    --------
    >>> import torch
    >>> from mfac_linalg.torch import capture_statistics
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    >>> x, y = torch.randn(10, 4), torch.randint(0, 2, (10,))
    >>> st = capture_statistics(model, torch.nn.CrossEntropyLoss(), (x, y))
    >>> [tuple(l.activations.shape) for l in st.layers], st.num_samples
    ([(10, 4), (10, 3)], 10)
    """
    _check_model(model)
    _check_loss(loss_fn)
    batches = _batches(data)
    fisher = V.choice(fisher, "fisher", ("empirical", "mc"))
    mc_samples = V.positive_int(mc_samples, "mc_samples")
    if fisher == "empirical" and mc_samples != 1:
        raise ValueError(f"mc_samples must be 1 for fisher='empirical'; got {mc_samples}")
    seed = V.integer(seed, "seed", minimum=-2 ** 63, maximum=2 ** 64 - 1)   # torch's range
    reduction = _reduction(loss_fn, reduction)
    if fisher == "mc" and not isinstance(loss_fn, _MC_LOSSES):
        raise ValueError("fisher='mc' needs loss_fn to be nn.CrossEntropyLoss, nn.MSELoss or "
                         f"nn.BCEWithLogitsLoss (the predictive distribution); got "
                         f"{type(loss_fn).__name__}")
    named = select_layers(model, layers)
    layout = ParameterLayout.from_model(model, [m for _, m in named])
    mods = list(layout.modules)
    weights = [m.weight for m in mods]
    dev = weights[0].device
    gen = torch.Generator(device=dev if dev.type == "cuda" else "cpu")
    gen.manual_seed(seed)
    # the model is left as it was, on success and on failure (the forward passes update a
    # train-mode BatchNorm's running statistics)
    with _buffers_restored(model):
        acts = [[] for _ in mods]
        grads = [[] for _ in mods]
        loss_sum, n_total = 0.0, 0
        for bi, (x, y) in enumerate(batches):
            inputs, outs, cur = {}, {}, {}
            calls = {}

            def fwd(module, inp, out, k, B=x.shape[0]):
                calls[k] = calls.get(k, 0) + 1
                if calls[k] > 1:
                    raise ValueError(f"layer {layout.layers[k].name!r} is called more than once "
                                     "per forward pass; that is not supported")
                # the rows of the statistics are the samples: a layer that sees (T, B, ...)
                # or (B T, ...) inputs would mix or multiply them silently
                shapes = (tuple(inp[0].shape), tuple(out.shape))
                if any(len(s) < 2 or s[0] != B for s in shapes):
                    raise ValueError(f"layer {layout.layers[k].name!r} gets an input of shape "
                                     f"{list(shapes[0])} (output {list(shapes[1])}) for a batch "
                                     f"of {B} samples: the statistics need the samples along "
                                     "the layer's first dimension (inputs (B, ..., d_in); not "
                                     "time-major (T, B, d) nor flattened (B T, d))")
                inputs[k] = inp[0].detach()
                outs[k] = (out.shape, out.dtype, out.device)   # zeros if it misses the loss
                out.register_hook(lambda g, k=k: cur.__setitem__(k, g.detach()))
                return None

            handles = [m.register_forward_hook(lambda mod, i, o, k=k: fwd(mod, i, o, k))
                       for k, m in enumerate(mods)]
            try:
                with torch.enable_grad():
                    output = model(x)
                    missing = [layout.layers[k].name for k in range(len(mods)) if k not in inputs]
                    if missing:
                        raise ValueError(f"layers {missing} were not called in the forward pass")
                    loss = loss_fn(output, y)
                    loss_sum += float(loss.detach())
                    B = x.shape[0]
                    scale = float(B) if reduction == "mean" else 1.0
                    for draw in range(mc_samples if fisher == "mc" else 1):
                        target = y if fisher == "empirical" else _sample_labels(loss_fn, output, gen)
                        l = loss if fisher == "empirical" else loss_fn(output, target)
                        cur.clear()
                        torch.autograd.grad(l, weights, retain_graph=draw < mc_samples - 1,
                                            allow_unused=True)
                        for k, m in enumerate(mods):
                            g = cur.get(k)
                            if g is None:       # the output does not reach the loss
                                shape, dtype, device = outs[k]
                                g = torch.zeros(shape, dtype=dtype, device=device)
                            A, G = _layer_rows(m, inputs[k], g * scale)
                            acts[k].append(A)
                            grads[k].append(G)
                    n_total += B * (mc_samples if fisher == "mc" else 1)
            finally:
                for h in handles:
                    h.remove()
        stats = []
        for k, spec in enumerate(layout.layers):
            shapes = sorted({tuple(a.shape[1:-1]) for a in acts[k]}
                            | {tuple(g.shape[1:-1]) for g in grads[k]})
            if len(shapes) > 1:
                # a sequence of another length, an image of another size: the statistics
                # keep the positions of each sample (docs/math.md §8), one count T for all
                raise ValueError(f"layer {spec.name!r}: the batches give different positions "
                                 f"per sample ({[list(t) for t in shapes]}); the statistics "
                                 "keep each sample's positions, which must be one shape: pad "
                                 "or crop the inputs to one length or size, or capture each "
                                 "shape separately")
            A = torch.cat(acts[k], 0)
            G = torch.cat(grads[k], 0)
            if A.ndim != G.ndim:
                raise ValueError(f"layer {spec.name!r}: inconsistent positions across batches")
            stats.append(LayerStatistics(spec.name, spec, A, G))
        return CapturedStatistics(layout, stats, n_total, loss_sum / len(batches))


# -- the Kronecker preconditioner ------------------------------------------------------------

def kronecker_preconditioner(model, loss_fn, data, method="kfac", damping=1e-3, *,
                             fisher="empirical", mc_samples=1, seed=0, layers=None,
                             reduction=None, statistics=None, progress=None, **options):
    r"""One block-diagonal Kronecker inverse-Fisher operator in ``parameters_to_vector`` order.

    Per layer (``nn.Linear``, ``nn.Conv2d``) the statistics of :func:`capture_statistics`
    go into the builder ``method`` of :mod:`mfac_linalg.kronecker` (docs/math.md §4,
    §8), with ``bias=`` the layer's; the blocks are joined by
    :func:`mfac_linalg.block_diag` and wrapped in the layout permutation
    (:class:`~mfac_linalg.torch.PermutedOperator`), so the operator acts on
    ``parameters_to_vector(layer parameters)``:

        M⁻¹ = P blockdiag(M_1⁻¹, ..., M_L⁻¹) Pᵀ.

    ``op @ v`` with a tensor gives a tensor (same device and dtype); ``op.fisher()`` is
    the damped approximation M itself.  Cost: the capture (one forward, one backward per
    batch and draw) plus each builder's (K-FAC O(n T (d_in² + d_out²) + d_in³ + d_out³)
    per layer); products O(Σ d_out d_in (d_out + d_in)).

    Parameters
    ----------
    model, loss_fn, data, fisher, mc_samples, seed, layers, reduction
        As for :func:`capture_statistics`.
    method : {"kfac", "ekfac", "kpsvd", "deflation", "kfac_corrected", "lanczos"}
    damping : float
        λ > 0, passed to every layer's builder.
    statistics : CapturedStatistics, optional
        Statistics already captured (then model, loss_fn and data only identify the
        layout and are not run).
    progress : bool or None, default None
        A tqdm bar on stderr over the layers while their blocks are built: ``None`` only
        when stderr is a terminal and tqdm is installed, ``True`` whenever tqdm is
        installed, ``False`` never (see ``mfac_linalg._progress.progress``).  It never
        changes the result.
    **options
        Passed to the builder (e.g. ``damping_mode="exact"`` for K-FAC, ``tol=`` for KPSVD).

    Returns
    -------
    PermutedOperator (``.operator`` is the block-diagonal operator in Kronecker order,
    ``.layout`` the :class:`~mfac_linalg.torch.ParameterLayout`)

    Raises
    ------
    TypeError, ValueError
        Bad arguments (named in the message), e.g. ``progress`` not None/True/False, or
        ``statistics`` not a CapturedStatistics; the builder's own errors pass through.

    Examples
    --------
    >>> import torch
    >>> from mfac_linalg.torch import kronecker_preconditioner
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    >>> x, y = torch.randn(20, 4), torch.randint(0, 2, (20,))
    >>> P = kronecker_preconditioner(model, torch.nn.CrossEntropyLoss(), (x, y), "kfac", 1e-3)
    >>> g = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    >>> (P @ g).shape, (P @ g).dtype
    (torch.Size([23]), torch.float32)
    """
    method = V.choice(method, "method", KRONECKER_METHODS)
    V.damping(damping)
    if progress is not None:
        progress = V.boolean(progress, "progress")
    if statistics is None:
        statistics = capture_statistics(model, loss_fn, data, fisher=fisher,
                                        mc_samples=mc_samples, seed=seed, layers=layers,
                                        reduction=reduction)
    elif not isinstance(statistics, CapturedStatistics):
        raise TypeError(f"statistics must be a CapturedStatistics; got "
                        f"{type(statistics).__name__}")
    build = getattr(_K, method)
    blocks = []
    for st in _progress.progress(statistics.layers, desc=f"{method} layers",
                                 enabled=progress):
        blocks.append(build(st.activations.detach(), st.output_grads.detach(), damping,
                            bias=st.spec.bias, **options))
    return PermutedOperator(_K.block_diag(blocks), statistics.layout)
