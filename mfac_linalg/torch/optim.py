r"""The M-FAC optimizer (docs/math.md §10) as a ``torch.optim.Optimizer``.

Over all parameters flattened in order (``parameters_to_vector`` order, the groups
one after the other):

    g = ∇L + wd · w                       (wd: the group's weight decay; only the
                                           stored weights in the sparse mode)
    u = F⁻¹ g                             after g has entered the sliding window
                                          (docs/math.md §2), F = λ I + (1/N) Σ g_i g_iᵀ
    v ← μ v + (1 − μ) u  if μ > 0, else v = u        (μ: the group's momentum)
    w ← w − lr · v                        (lr: the group's learning rate)

N = ``window`` (``normalize="window"``, the published convention: the window starts
as m zero gradients) or the number of gradients held (``normalize="count"``, no
warm-up damping by empty slots).
"""
from __future__ import annotations

import torch

from .. import _validate as V
from ..sliding import SlidingWindowInverseFisher
from ._convert import _numpy_state, _tensor_state, device_spec, tensor_dtype_name, to_torch


__all__ = ["MFAC"]

_STORAGE = ("float32", "float64", "float16", "bfloat16")


class MFAC(torch.optim.Optimizer):
    r"""M-FAC: preconditioned steps with the inverse empirical Fisher of the last m gradients.

    Each ``step()`` gathers the gradient g (plus weight decay) of all parameters into
    one vector, adds it to a :class:`mfac_linalg.SlidingWindowInverseFisher` and
    applies u = F⁻¹ g (docs/math.md §10):

    .. math::

        F = \lambda I + \frac{1}{N} \sum_{i \in \text{window}} g_i g_i^T, \qquad
        v \leftarrow \mu v + (1 - \mu) F^{-1} g, \qquad w \leftarrow w - \text{lr}\, v.

    The window lives on the parameters' device (CUDA tensors go in through DLPack,
    no copies to the host).  Cost per step: O(d m + m²) time (two passes over the
    m × d window) and m d values of storage plus three m × m float64 matrices.

    Parameters
    ----------
    params : iterable of tensors or of dicts (parameter groups)
        All on one device, all of one floating dtype.  A group may set its own
        ``lr``, ``momentum`` and ``weight_decay``; the window is shared by all groups.
    lr : float
        Learning rate (>= 0).
    momentum : float
        μ in [0, 1); 0 (default) applies u itself.
    weight_decay : float
        wd >= 0, added to the gradient before it enters the window (as published).
    window : int
        m >= 1, the number of gradients kept (any size; the published code wants
        a multiple of its block size).
    damping : float
        λ > 0.
    normalize : {"window", "count"}
        N = m (the published convention) or N = the number of gradients held.
    dtype : str, optional
        Storage dtype of the window: "float32", "float64" (default: the parameters'
        dtype, float32 for 16-bit parameters), or "float16" / "bfloat16" on the GPU.
        The m × m work is float64 whatever the storage.
    sparse : bool
        Sparse mode: the weights that are exactly zero at construction stay zero and
        are not stored (the window's dimension is the number of non-zero weights);
        their gradients are ignored.
    refresh_every : int, optional
        Passed to the window: refactor its capacitance matrix exactly every so many
        updates (default: the window size).

    Raises
    ------
    TypeError, ValueError
        For a wrong argument (named in the message); parameters on several devices
        or of several dtypes; a non-floating or sparse parameter.

    Notes
    -----
    ``state_dict()`` holds only tensors and plain Python values, so it goes through
    ``torch.save`` and ``torch.load(..., weights_only=True)``; ``load_state_dict``
    resumes bit-exactly, also on another device (the window is rebuilt on this
    optimizer's device).  A step whose gradient holds NaN or infinity raises
    ``ValueError`` and leaves the parameters, the momentum and the window as they were.
    Parameter groups cannot be added after construction (the window's dimension is
    fixed).

    Examples
    --------
    >>> import torch
    >>> from mfac_linalg.torch import MFAC
    >>> torch.manual_seed(0)                                    # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = torch.nn.Linear(4, 1)
    >>> opt = MFAC(model.parameters(), lr=0.1, window=8, damping=1e-2)
    >>> x, y = torch.randn(32, 4), torch.randn(32, 1)
    >>> for _ in range(5):
    ...     opt.zero_grad()
    ...     loss = torch.nn.functional.mse_loss(model(x), y)
    ...     loss.backward()
    ...     opt.step()
    >>> opt.window_operator.count
    5
    """

    def __init__(self, params, lr, momentum=0.0, weight_decay=0.0, window=1024, damping=1e-5,
                 *, normalize="window", dtype=None, sparse=False, refresh_every=None):
        lr = V.real(lr, "lr", low=0.0)
        momentum = V.real(momentum, "momentum", low=0.0, high=1.0, high_open=True)
        weight_decay = V.real(weight_decay, "weight_decay", low=0.0)
        window = V.positive_int(window, "window")
        damping = V.damping(damping)
        normalize = V.choice(normalize, "normalize", ("window", "count"))
        sparse = V.boolean(sparse, "sparse")
        if refresh_every is not None:
            refresh_every = V.positive_int(refresh_every, "refresh_every")
        self._frozen = False
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))
        params = self._params()
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
        self._device = dev
        # gradients are gathered in float32 / float64 (16-bit parameters: float32)
        self._cdt = pdt if pdt in (torch.float32, torch.float64) else torch.float32
        if dtype is None:
            dtype = tensor_dtype_name(self._cdt)
        dtype = V.choice(tensor_dtype_name(dtype) if isinstance(dtype, torch.dtype) else dtype,
                         "dtype", _STORAGE)
        self._sizes = [p.numel() for p in params]
        self._total = sum(self._sizes)
        with torch.no_grad():
            if sparse:
                mask = torch.cat([(p.detach() != 0).reshape(-1) for p in params])
                self._idx = torch.nonzero(mask).reshape(-1)
                if self._idx.numel() == 0:
                    raise ValueError("sparse=True but every parameter is zero: nothing to train")
            else:
                mask, self._idx = None, None
        self._mask = mask
        dim = self._total if mask is None else int(self._idx.numel())
        # the range of each group in the (compressed) vector
        self._ranges = []
        start = off = 0
        for g in self.param_groups:
            n = sum(p.numel() for p in g["params"])
            kept = n if mask is None else int(mask[off:off + n].sum())
            self._ranges.append((start, start + kept))
            start += kept
            off += n
        self._window = SlidingWindowInverseFisher(
            dim, window, damping, dtype=dtype, device=device_spec(dev), normalize=normalize,
            refresh_every=refresh_every)
        self._v = torch.zeros(dim, dtype=self._cdt, device=dev)
        self._steps = 0
        self._frozen = True

    # -- construction helpers --------------------------------------------------------
    def add_param_group(self, param_group):
        """Add a group (during construction only: the window's dimension is fixed)."""
        if getattr(self, "_frozen", False):
            raise RuntimeError("MFAC cannot take parameter groups after construction: the "
                               "window's dimension is fixed; build a new optimizer")
        super().add_param_group(param_group)
        g = self.param_groups[-1]
        k = len(self.param_groups) - 1
        try:
            V.real(g["lr"], f"param_groups[{k}]['lr']", low=0.0)
            V.real(g["momentum"], f"param_groups[{k}]['momentum']", low=0.0, high=1.0,
                   high_open=True)
            V.real(g["weight_decay"], f"param_groups[{k}]['weight_decay']", low=0.0)
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise

    def _params(self):
        return [p for g in self.param_groups for p in g["params"]]

    # -- read-only views ----------------------------------------------------------
    @property
    def window_operator(self):
        """The :class:`~mfac_linalg.SlidingWindowInverseFisher` behind the steps (its
        dimension is the number of stored weights)."""
        return self._window

    @property
    def dim(self):
        """The window's dimension: all parameters, or the non-zero ones (sparse mode)."""
        return self._v.numel()

    @property
    def mask(self):
        """The stored weights (sparse mode) as a boolean copy in torch order, else None."""
        return None if self._mask is None else self._mask.clone()

    # -- the step -----------------------------------------------------------------
    def _gradient(self):
        parts = []
        for g in self.param_groups:
            wd = g["weight_decay"]
            for p in g["params"]:
                if p.grad is None:
                    gr = torch.zeros(p.numel(), dtype=self._cdt, device=self._device)
                else:
                    if p.grad.is_sparse:
                        raise TypeError("MFAC does not take sparse gradients")
                    gr = p.grad.reshape(-1).to(self._cdt)
                if wd:
                    gr = gr + wd * p.detach().reshape(-1).to(self._cdt)
                parts.append(gr)
        g = parts[0] if len(parts) == 1 else torch.cat(parts)
        return g if self._idx is None else g[self._idx]

    @torch.no_grad()
    def step(self, closure=None):
        """One M-FAC step (docs/math.md §10); returns the closure's loss if one is given.

        O(d m + m²).  Raises ``ValueError`` (nothing changed) if the gradient holds NaN
        or infinity.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        g = self._gradient()
        try:
            u = self._window.step(g)
        except ValueError as exc:
            if "finite" in str(exc):
                raise ValueError("the gradient (with weight decay) holds NaN or infinity; "
                                 "nothing was changed") from None
            raise
        u = to_torch(u, dtype=self._cdt, device=self._device)
        for grp, (a, b) in zip(self.param_groups, self._ranges):
            mu = grp["momentum"]
            if mu > 0:                       # v <- mu v + (1 - mu) u
                self._v[a:b].mul_(mu).add_(u[a:b], alpha=1.0 - mu)
            else:                            # v = u
                self._v[a:b].copy_(u[a:b])
        upd = self._v
        if self._idx is not None:
            full = torch.zeros(self._total, dtype=self._cdt, device=self._device)
            full[self._idx] = upd
            upd = full
        off = 0
        for grp in self.param_groups:
            lr = grp["lr"]
            for p in grp["params"]:
                n = p.numel()
                p.add_(upd[off:off + n].view_as(p).to(p.dtype), alpha=-lr)
                off += n
        self._steps += 1
        return loss

    # -- checkpoints -------------------------------------------------------------
    def state_dict(self):
        """The optimizer's state: ``torch.optim`` 's (param groups) plus the window, the
        momentum and the sparse mask, as CPU tensors and plain Python values (loadable
        with ``torch.load(..., weights_only=True)``)."""
        sd = super().state_dict()
        sd["mfac"] = {
            "window": _tensor_state(self._window.state_dict()),
            "v": self._v.detach().to("cpu", copy=True),
            "mask": (self._mask.to("cpu", copy=True) if self._mask is not None
                     else torch.zeros(0, dtype=torch.bool)),
            "sparse": self._mask is not None,
            "steps": self._steps,
        }
        return sd

    def load_state_dict(self, state_dict):
        """Restore a state from :meth:`state_dict` (any device); validated first, nothing
        changes on error."""
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict; got {type(state_dict).__name__}")
        m = state_dict.get("mfac")
        if not isinstance(m, dict):
            raise ValueError("state_dict has no 'mfac' entry: not a state of MFAC")
        for key in ("window", "v", "mask", "sparse", "steps"):
            if key not in m:
                raise ValueError(f"state_dict['mfac'] is missing {key!r}")
        sparse = bool(m["sparse"])
        if sparse != (self._mask is not None):
            raise ValueError(f"state_dict was written with sparse={sparse}; this optimizer has "
                             f"sparse={self._mask is not None}")
        if sparse:
            mk = m["mask"]
            if not isinstance(mk, torch.Tensor) or mk.shape != self._mask.shape or \
                    not torch.equal(mk.to(self._device), self._mask):
                raise ValueError("state_dict's sparse mask differs from this optimizer's (the "
                                 "weights that were zero at construction)")
        v = m["v"]
        if not isinstance(v, torch.Tensor) or v.shape != self._v.shape or v.dtype != self._v.dtype:
            raise ValueError(f"state_dict['mfac']['v'] must be a {self._v.dtype} tensor of shape "
                             f"{tuple(self._v.shape)}; got "
                             f"{getattr(v, 'dtype', type(v).__name__)} {tuple(getattr(v, 'shape', ()))}")
        if not bool(torch.isfinite(v).all()):
            raise ValueError("state_dict['mfac']['v'] holds NaN or infinity")
        old = self._window
        win = SlidingWindowInverseFisher(old.shape[0], old.window, old.damping,
                                         dtype=old.storage_dtype, device=device_spec(self._device),
                                         normalize=old.normalize)
        win.load_state_dict(_numpy_state(m["window"]))
        rest = {k: val for k, val in state_dict.items() if k != "mfac"}
        super().load_state_dict(rest)
        self._window = win
        self._v = v.to(self._device, copy=True)
        self._steps = int(m["steps"])
