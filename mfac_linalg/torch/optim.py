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

With ``sharded=True`` (docs/math.md §6, docs/distributed.md) each of P ranks stores
the columns J_p of the window, computes (F⁻¹ g)[J_p] and v[J_p], and the ranks
all-gather v so that every rank applies the same update.
"""
from __future__ import annotations

import numpy as np
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
    sharded : bool
        Column-shard the window over the ranks of ``process_group`` (data-parallel
        training under ``torch.distributed``; see Notes).  Default False.
    process_group : torch.distributed.ProcessGroup or Communicator, optional
        ``sharded=True`` only.  None: ``torch.distributed``'s default group (which must
        be initialised); a process group; or any
        :mod:`mfac_linalg.distributed` communicator (``SingleProcessComm()`` runs the
        sharded code in one process, ``MPIComm``).
    layout : mfac_linalg.distributed.ColumnLayout, optional
        ``sharded=True`` only: which of the flattened parameters (``parameters_to_vector``
        order, the groups one after the other; ``layout.dim`` = their number) each rank
        stores.  Default: ``ColumnLayout.contiguous(dim, P)`` over the window's
        coordinates.  In the sparse mode a rank stores the non-zero weights inside its
        ranges.  ``ColumnLayout.sharded(unit_sizes, P)`` gives the FSDP/ZeRO layout.
    check_every : int, optional
        ``sharded=True`` only: compare the ranks' gradients, parameters and replicated
        window state (:meth:`check_consistency`) on the first step and every this many
        steps; 0 never.  Default 100.

    Raises
    ------
    TypeError, ValueError
        For a wrong argument (named in the message); parameters on several devices
        or of several dtypes; a non-floating or sparse parameter; ``process_group``,
        ``layout`` or ``check_every`` without ``sharded=True``; a layout whose ``dim``
        is not the number of parameters or whose size is not the number of ranks.
        With ``sharded=True`` the ranks agree before any other collective: a rank that
        fails raises its error, every other rank
        :class:`~mfac_linalg.distributed.RemoteRankError`.
    RuntimeError
        ``sharded=True`` with ``process_group=None`` and ``torch.distributed`` not
        initialised.

    Notes
    -----
    ``state_dict()`` holds only tensors and plain Python values, so it goes through
    ``torch.save`` and ``torch.load(..., weights_only=True)``; ``load_state_dict``
    resumes bit-exactly, also on another device (the window is rebuilt on this
    optimizer's device).  A step whose gradient holds NaN or infinity raises
    ``ValueError`` and leaves the parameters, the momentum and the window as they were.
    Parameter groups cannot be added after construction (the window's dimension is
    fixed).

    **Sharded mode** (``sharded=True``).  Under data-parallel training every rank
    holds the same gradient (the mean over the ranks, as DDP leaves it); rank p keeps
    only the columns J_p of the window (m × d_p with d_p ≈ d / P) and of the momentum.
    A step costs, per rank: O(d) to gather the gradient and check it for NaN,
    O(d_p m + m²) for the window's step (one all-reduce of m + P float64 numbers and
    one of P flags: ``ShardedSlidingWindowInverseFisher.step``), O(d_p) for the
    momentum, one all-gather of P × max_p d_p numbers of the parameters' compute
    dtype (``torch.distributed``; another communicator: an exact float64 all-reduce
    of d numbers) and O(d) to apply the update.  Every rank ends the step with
    bitwise identical parameters.

    *Identical gradients are expected on every rank.*  Each rank's update is built
    from the columns that each rank owns, so gradients that differ between ranks
    give a patchwork, not a divergence.  :meth:`check_consistency` hashes the
    gradient, the parameters (O(d), exact integer sums of their bits) and the
    window's m × m state, and compares the hashes in one all-reduce of 13 P numbers;
    ``step`` runs it on its first call and every ``check_every`` steps, before it
    changes anything, and raises :class:`~mfac_linalg.distributed.ReplicaDivergenceError`
    on every rank naming what differs.  A gradient holding NaN or infinity anywhere on
    any rank is caught at every step (no extra collective: the rank's flag travels in
    the window's own all-reduce): that rank raises ``ValueError``, the others
    ``RemoteRankError``, and nothing changes on any rank.  A failure of the
    communication itself during the final all-gather (a lost rank) is not recoverable:
    the window has then taken the gradient already.

    ``state_dict()`` is per rank (its columns, the replicated m × m state, the rank,
    the number of ranks and the layout); ``load_state_dict`` is collective and refuses,
    on every rank before anything changes, another rank's state, another number of
    ranks or another layout.  Under FSDP (each rank holding only its shard of the
    parameters) this optimizer does not apply: it updates full parameters.

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

    The sharded mode runs in one process with ``SingleProcessComm`` (under
    ``torchrun``, leave ``process_group=None``): the same steps, bit for bit.

    >>> from mfac_linalg.distributed import SingleProcessComm
    >>> torch.manual_seed(0)                                    # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model2 = torch.nn.Linear(4, 1)
    >>> opt2 = MFAC(model2.parameters(), lr=0.1, window=8, damping=1e-2, sharded=True,
    ...             process_group=SingleProcessComm())
    >>> for _ in range(5):
    ...     opt2.zero_grad()
    ...     torch.nn.functional.mse_loss(model2(x), y).backward()
    ...     opt2.step()
    >>> opt2.layout
    <ColumnLayout d=5 P=1 contiguous local_dims=[5]>
    >>> all(torch.equal(p, q) for p, q in zip(model.parameters(), model2.parameters()))
    True
    """

    def __init__(self, params, lr, momentum=0.0, weight_decay=0.0, window=1024, damping=1e-5,
                 *, normalize="window", dtype=None, sparse=False, refresh_every=None,
                 sharded=False, process_group=None, layout=None, check_every=None):
        self._frozen = False
        sharded = V.boolean(sharded, "sharded")
        if not sharded:
            for name, val in (("process_group", process_group), ("layout", layout),
                              ("check_every", check_every)):
                if val is not None:
                    raise ValueError(f"{name} is used only with sharded=True; got "
                                     f"{type(val).__name__} with sharded=False")
            self._setup(params, lr, momentum, weight_decay, window, damping, normalize, dtype,
                        sparse, refresh_every)
            self._comm = None
            self._layout = None
            self._window = SlidingWindowInverseFisher(
                self._dim, self._m, self._lam, dtype=self._storage,
                device=device_spec(self._device), normalize=self._normalize,
                refresh_every=self._refresh_every)
            self._local = [(0, self._dim)]
            self._segments = [(a, b, k) for k, (a, b) in enumerate(self._ranges)]
            self._v = torch.zeros(self._dim, dtype=self._cdt, device=self._device)
            self._frozen = True
            return
        # sharded: every rank validates locally, then the ranks agree before any other
        # collective (a rank that raised alone would leave the others waiting)
        comm = _as_comm(process_group)
        err = None
        try:
            self._setup(params, lr, momentum, weight_decay, window, damping, normalize, dtype,
                        sparse, refresh_every)
            self._check_every = (_CHECK_EVERY if check_every is None
                                 else V.integer(check_every, "check_every", minimum=0))
            wlayout = self._window_layout(layout, comm)
        except Exception as exc:
            err = exc
        _dist().agree(comm, err, "MFAC set-up")
        self._comm, self._layout = comm, wlayout
        rank = comm.rank
        self._local = wlayout.ranges(rank)
        d_p = wlayout.local_dim(rank)
        self._window = _dist().ShardedSlidingWindowInverseFisher(
            d_p, self._m, self._lam, comm, layout=wlayout, dtype=self._storage,
            device=device_spec(self._device), normalize=self._normalize,
            refresh_every=self._refresh_every)
        # momentum segments: (local start, local stop, group) over this rank's columns
        segs, off = [], 0
        for a, b in self._local:
            for k, (ga, gb) in enumerate(self._ranges):
                lo, hi = max(a, ga), min(b, gb)
                if lo < hi:
                    segs.append((off + lo - a, off + hi - a, k))
            off += b - a
        self._segments = segs
        self._v = torch.zeros(d_p, dtype=self._cdt, device=self._device)
        self._gather_plan(wlayout)
        self._frozen = True

    def _setup(self, params, lr, momentum, weight_decay, window, damping, normalize, dtype,
               sparse, refresh_every):
        """Everything of the construction that needs no communication."""
        lr = V.real(lr, "lr", low=0.0)
        momentum = V.real(momentum, "momentum", low=0.0, high=1.0, high_open=True)
        weight_decay = V.real(weight_decay, "weight_decay", low=0.0)
        self._m = V.positive_int(window, "window")
        self._lam = V.damping(damping)
        self._normalize = V.choice(normalize, "normalize", ("window", "count"))
        sparse = V.boolean(sparse, "sparse")
        self._refresh_every = (None if refresh_every is None
                               else V.positive_int(refresh_every, "refresh_every"))
        self._check_every = 0
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
        self._storage = V.choice(tensor_dtype_name(dtype) if isinstance(dtype, torch.dtype)
                                 else dtype, "dtype", _STORAGE)
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
        self._dim = self._total if mask is None else int(self._idx.numel())
        # the range of each group in the (compressed) vector
        self._ranges = []
        start = off = 0
        for g in self.param_groups:
            n = sum(p.numel() for p in g["params"])
            kept = n if mask is None else int(mask[off:off + n].sum())
            self._ranges.append((start, start + kept))
            start += kept
            off += n
        self._steps = 0

    def _window_layout(self, layout, comm):
        """The window's ColumnLayout (over the stored coordinates) from ``layout`` (over the
        flattened parameters) or the default contiguous one."""
        CL = _dist().ColumnLayout
        if layout is None:
            return CL.contiguous(self._dim, comm.size)
        if not isinstance(layout, CL):
            raise TypeError(f"layout must be a mfac_linalg.distributed.ColumnLayout or None; "
                            f"got {type(layout).__name__}")
        if layout.dim != self._total:
            raise ValueError(f"layout must cover the {self._total} flattened parameters "
                             f"(parameters_to_vector order, the groups one after the other); "
                             f"got a layout of dim={layout.dim}")
        if layout.size != comm.size:
            raise ValueError(f"layout must have one entry per rank ({comm.size}); got "
                             f"{layout.size}")
        if self._idx is None:
            return layout
        # sparse mode: each rank holds the stored weights inside its ranges
        idx = self._idx.cpu().numpy()
        return CL(self._dim, [[(int(np.searchsorted(idx, a)), int(np.searchsorted(idx, b)))
                               for a, b in layout.ranges(p)] for p in range(comm.size)])

    def _gather_plan(self, wlayout):
        """How the all-gathered (padded) slices map onto the window's coordinates."""
        P = self._comm.size
        dims = [wlayout.local_dim(p) for p in range(P)]
        self._pad = max(max(dims), 1)
        pos = np.empty(self._dim, dtype=np.int64)
        for p in range(P):
            off = 0
            for a, b in wlayout.ranges(p):
                pos[a:b] = p * self._pad + off + np.arange(b - a)
                off += b - a
        self._gather_pos = (None if np.array_equal(pos, np.arange(self._dim)) else
                            torch.from_numpy(pos).to(self._device))

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
        """The window behind the steps: a :class:`~mfac_linalg.SlidingWindowInverseFisher`
        (its dimension is the number of stored weights) or, with ``sharded=True``, this
        rank's :class:`~mfac_linalg.distributed.ShardedSlidingWindowInverseFisher`."""
        return self._window

    @property
    def dim(self):
        """The window's (global) dimension: all parameters, or the non-zero ones (sparse
        mode)."""
        return self._dim

    @property
    def mask(self):
        """The stored weights (sparse mode) as a boolean copy in torch order, else None."""
        return None if self._mask is None else self._mask.clone()

    @property
    def sharded(self):
        """Whether the window is column-sharded over the ranks (``sharded=True``)."""
        return self._comm is not None

    @property
    def layout(self):
        """The window's :class:`~mfac_linalg.distributed.ColumnLayout` over its ``dim``
        coordinates (the flattened parameters, or the stored weights in the sparse mode);
        None unless sharded."""
        return self._layout

    @property
    def comm(self):
        """The communicator of the sharded mode (None unless sharded)."""
        return self._comm

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

    def _slice(self, g):
        """This rank's columns of the (compressed) vector g."""
        rr = self._local
        if len(rr) == 1:
            return g[rr[0][0]:rr[0][1]]
        if not rr:
            return g[:0]
        return torch.cat([g[a:b] for a, b in rr])

    @torch.no_grad()
    def step(self, closure=None):
        """One M-FAC step (docs/math.md §10); returns the closure's loss if one is given.

        O(d m + m²) (sharded: O(d_p m + m² + d) per rank, see the class notes).  Raises
        ``ValueError`` (nothing changed) if the gradient holds NaN or infinity; with
        ``sharded=True`` every rank raises (the others
        :class:`~mfac_linalg.distributed.RemoteRankError`) and nothing changes on any rank.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._comm is None:
            g = self._gradient()
            try:
                u = self._window.step(g)
            except ValueError as exc:
                if "finite" in str(exc):
                    raise ValueError("the gradient (with weight decay) holds NaN or infinity; "
                                     "nothing was changed") from None
                raise
        else:
            u = self._sharded_window_step()
        u = to_torch(u, dtype=self._cdt, device=self._device)
        v = self._v
        for a, b, k in self._segments:
            mu = self.param_groups[k]["momentum"]
            if mu > 0:                       # v <- mu v + (1 - mu) u
                v[a:b].mul_(mu).add_(u[a:b], alpha=1.0 - mu)
            else:                            # v = u
                v[a:b].copy_(u[a:b])
        upd = v if self._comm is None else self._allgather(v)
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

    # -- the sharded step ------------------------------------------------------------
    def _sharded_window_step(self):
        """The window's collective step on this rank's slice of the gradient g; every rank
        raises, and nothing changes anywhere, if any rank's (full) g is not finite or
        could not be formed."""
        try:
            g, own = self._gradient(), None
            if not bool(torch.isfinite(g).all()):
                own = ValueError(f"the gradient (with weight decay) holds NaN or infinity on "
                                 f"rank {self._comm.rank}; nothing was changed on any rank")
        except Exception as exc:          # e.g. a sparse gradient on this rank
            g, own = None, exc
        if self._check_every and self._steps % self._check_every == 0:
            self.check_consistency(_gradient=g)     # raises on every rank if any failed
        if own is None:
            g_p = self._slice(g)
        else:
            # hand the window a poisoned slice, so that its own flagged all-reduce carries
            # this rank's failure to every rank (the window refuses it before it changes
            # anything): no collective of ours
            g_p = torch.full((max(self._v.numel(), 1),), float("nan"), dtype=self._cdt,
                             device=self._device)
        try:
            return self._window.step(g_p)
        except ValueError as exc:
            if own is not None:
                raise own from None
            if "finite" in str(exc):
                raise ValueError(f"the gradient (with weight decay) holds NaN or infinity on "
                                 f"rank {self._comm.rank}; nothing was changed on any rank") \
                    from None
            raise

    def _allgather(self, v_p):
        """The full (compressed) update from every rank's slice: one all-gather of
        P x max d_p numbers (torch.distributed), or an exact float64 all-reduce of d
        numbers for another communicator."""
        comm = self._comm
        if comm.size == 1:
            return v_p
        D = _dist()
        if isinstance(comm, D.TorchComm):
            import torch.distributed as dist  # noqa: PLC0415
            send = v_p
            if send.numel() != self._pad:
                send = torch.zeros(self._pad, dtype=v_p.dtype, device=v_p.device)
                send[:v_p.numel()] = v_p
            out = torch.empty(comm.size * self._pad, dtype=v_p.dtype, device=v_p.device)
            gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
            gather(out, send.contiguous(), group=comm.group)
            return out[:self._dim] if self._gather_pos is None else out[self._gather_pos]
        full = D.allgather(v_p, self._layout, comm)
        return to_torch(full, dtype=self._cdt, device=self._device)

    def check_consistency(self, *, _gradient=None):
        """Check that every rank holds the same gradient, parameters and window state.

        Collective (sharded mode only; every rank calls it).  Each rank hashes its
        (compressed) gradient with weight decay and its parameters (exact integer sums
        of their bits, O(d) on their device, order-independent), and the window's
        replicated m x m state (O(m²) on the host); one all-reduce of P x 13 float64
        numbers compares them.  ``step`` runs it on its first call and every
        ``check_every`` steps, before anything changes.

        Raises
        ------
        ValueError
            This rank's gradient holds NaN or infinity (the other ranks raise
            :class:`~mfac_linalg.distributed.RemoteRankError`).
        mfac_linalg.distributed.ReplicaDivergenceError
            On every rank, naming what differs (gradients, parameters or the window's
            state) and the ranks that differ from rank 0.
        RuntimeError
            The optimizer is not sharded.

        Examples
        --------
        >>> import torch
        >>> from mfac_linalg.distributed import SingleProcessComm
        >>> from mfac_linalg.torch import MFAC
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = MFAC(model.parameters(), lr=0.1, window=4, sharded=True,
        ...            process_group=SingleProcessComm(), check_every=0)
        >>> model(torch.ones(2, 3)).sum().backward()
        >>> opt.check_consistency()          # one rank: always consistent; returns None
        """
        if self._comm is None:
            raise RuntimeError("check_consistency needs MFAC(..., sharded=True)")
        D = _dist()
        comm = self._comm
        P, r = comm.size, comm.rank
        tab = np.zeros((P, 13), dtype=np.float64)
        err = None
        try:
            g = self._gradient() if _gradient is None else _gradient
            if not bool(torch.isfinite(g).all()):
                raise ValueError(f"the gradient (with weight decay) holds NaN or infinity on "
                                 f"rank {r}; nothing was changed on any rank")
            tab[r, 1:5] = _bits_digest([g])
            tab[r, 5:9] = _bits_digest(self._params())
            tab[r, 9:13] = np.frombuffer(bytes.fromhex(self._window.digest()),
                                         dtype=np.uint16).astype(np.float64)
        except Exception as exc:
            err = exc
        if err is not None:
            tab[r] = 0.0
            tab[r, 0] = 1.0
        comm.allreduce_sum(tab)
        failed = [p for p in range(P) if tab[p, 0] != 0]
        if err is not None:
            raise err
        if failed:
            raise D.RemoteRankError(failed, "MFAC.check_consistency")
        # the parameters first: weight decay makes different parameters different gradients
        for cols, what, hint in (
                (slice(5, 9), "the parameters", "start every rank from the same parameters "
                 "(broadcast them from rank 0, as DDP does at construction)"),
                (slice(9, 13), "the window's replicated m x m state", "call "
                 "window_operator.refresh() on every rank, or reload a checkpoint"),
                (slice(1, 5), "the gradients", "MFAC(sharded=True) expects the same gradient "
                 "on every rank: average the gradients over the ranks first (as DDP does)")):
            ranks = [p for p in range(P) if not np.array_equal(tab[p, cols], tab[0, cols])]
            if ranks:
                digests = {p: tab[p, cols].astype(np.uint16).tobytes().hex() for p in range(P)}
                exc = D.ReplicaDivergenceError(digests, ranks, "MFAC")
                exc.args = (f"MFAC: {what} of rank(s) {ranks} differ from rank 0's (digests "
                            f"{digests}); nothing was changed. {hint}",)
                raise exc

    # -- checkpoints -------------------------------------------------------------
    def state_dict(self):
        """The optimizer's state: ``torch.optim`` 's (param groups) plus the window, the
        momentum and the sparse mask, as CPU tensors and plain Python values (loadable
        with ``torch.load(..., weights_only=True)``).

        With ``sharded=True`` this is this rank's state (its columns of the window and
        of the momentum, the replicated m x m state) with the rank, the number of ranks
        and the layout recorded; save one file per rank.  Local."""
        sd = super().state_dict()
        sd["mfac"] = {
            "window": _tensor_state(self._window.state_dict()),
            "v": self._v.detach().to("cpu", copy=True),
            "mask": (self._mask.to("cpu", copy=True) if self._mask is not None
                     else torch.zeros(0, dtype=torch.bool)),
            "sparse": self._mask is not None,
            "steps": self._steps,
        }
        if self._comm is not None:
            sd["mfac"]["sharded"] = {"rank": self._comm.rank, "size": self._comm.size,
                                     "layout": self._layout.to_dict(),
                                     "check_every": self._check_every}
        return sd

    def _validate_mfac(self, state_dict):
        """Check the MFAC part of a state dict; returns it (raises on any mismatch)."""
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict; got {type(state_dict).__name__}")
        m = state_dict.get("mfac")
        if not isinstance(m, dict):
            raise ValueError("state_dict has no 'mfac' entry: not a state of MFAC")
        for key in ("window", "v", "mask", "sparse", "steps"):
            if key not in m:
                raise ValueError(f"state_dict['mfac'] is missing {key!r}")
        sh = m.get("sharded")
        if (sh is not None) != (self._comm is not None):
            raise ValueError(f"state_dict was written with sharded={sh is not None}; this "
                             f"optimizer has sharded={self._comm is not None}")
        if sh is not None:
            if not isinstance(sh, dict) or not {"rank", "size", "layout"} <= set(sh):
                raise ValueError("state_dict['mfac']['sharded'] must hold rank, size and layout")
            if (sh["rank"], sh["size"]) != (self._comm.rank, self._comm.size):
                raise ValueError(f"state_dict is rank {sh['rank']}'s of {sh['size']}; this is "
                                 f"rank {self._comm.rank} of {self._comm.size} (load each "
                                 "rank's own file)")
            lay = _dist().ColumnLayout.from_dict(sh["layout"])
            if lay != self._layout:
                raise ValueError(f"state_dict was saved under another column layout ({lay!r}, "
                                 f"fingerprint {lay.fingerprint()}); this optimizer's is "
                                 f"{self._layout!r} ({self._layout.fingerprint()}): build the "
                                 "optimizer with the layout it was saved with")
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
            got = f"{getattr(v, 'dtype', type(v).__name__)} {tuple(getattr(v, 'shape', ()))}"
            raise ValueError(f"state_dict['mfac']['v'] must be a {self._v.dtype} tensor of shape "
                             f"{tuple(self._v.shape)}; got {got}")
        if not bool(torch.isfinite(v).all()):
            raise ValueError("state_dict['mfac']['v'] holds NaN or infinity")
        steps = V.integer(m["steps"], "state_dict['mfac']['steps']", minimum=0)
        if "state" not in state_dict:
            raise ValueError("state_dict is missing 'state' (torch.optim's part)")
        groups = state_dict.get("param_groups")
        if not isinstance(groups, list) or len(groups) != len(self.param_groups) or any(
                not isinstance(g, dict) or len(g.get("params", ())) != len(mine["params"])
                for g, mine in zip(groups, self.param_groups)):
            raise ValueError("state_dict's param_groups do not match this optimizer's (the "
                             "number of groups or of parameters per group differs)")
        return m, v, steps

    def load_state_dict(self, state_dict):
        """Restore a state from :meth:`state_dict` (any device); validated first, nothing
        changes on error.

        With ``sharded=True`` it is collective: every rank passes its own state; a state
        of another rank, of another number of ranks or saved under another layout is
        refused, on every rank, before anything changes on any rank."""
        if self._comm is None:
            m, v, steps = self._validate_mfac(state_dict)
            old = self._window
            win = SlidingWindowInverseFisher(old.shape[0], old.window, old.damping,
                                             dtype=old.storage_dtype,
                                             device=device_spec(self._device),
                                             normalize=old.normalize)
            win.load_state_dict(_numpy_state(m["window"]))
        else:
            D = _dist()
            err = m = None
            try:
                m, v, steps = self._validate_mfac(state_dict)
                wstate = _numpy_state(m["window"])
            except Exception as exc:
                err = exc
            D.agree(self._comm, err, "MFAC.load_state_dict")
            old = self._window
            win = D.ShardedSlidingWindowInverseFisher(
                old.local_dim, old.window, old.damping, self._comm, layout=self._layout,
                dtype=old.storage_dtype, device=device_spec(self._device),
                normalize=old.normalize, refresh_every=old.refresh_every)
            win.load_state_dict(wstate)        # collective; refuses on every rank
        rest = {k: val for k, val in state_dict.items() if k != "mfac"}
        super().load_state_dict(rest)
        self._window = win
        self._v = v.to(self._device, copy=True)
        self._steps = steps


_CHECK_EVERY = 100


def _dist():
    from .. import distributed  # noqa: PLC0415  (imported when sharded=True is used)
    return distributed


def _as_comm(process_group):
    """The communicator for ``process_group``: None is torch.distributed's default group."""
    D = _dist()
    if process_group is None:
        import torch.distributed as dist  # noqa: PLC0415
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("MFAC(sharded=True) needs torch.distributed initialised "
                               "(torch.distributed.init_process_group, or torchrun), or a "
                               "communicator as process_group (e.g. "
                               "mfac_linalg.distributed.SingleProcessComm())")
        return D.TorchComm()
    return D.as_comm(process_group)


def _bits_digest(tensors, chunk=1 << 22):
    """A 64-bit digest (4 float64 numbers) of the bits of ``tensors``: the exact int64 sums
    of their 16-bit pieces and of the pieces' squares (order-independent, so the same on
    every rank for the same bits), computed on the tensors' device in chunks."""
    s1 = s2 = n = 0
    for t in tensors:
        flat = t.detach().reshape(-1)
        for a in range(0, flat.numel(), chunk):
            c = flat[a:a + chunk].contiguous().view(torch.int16).to(torch.int64) & 0xFFFF
            s1 += int(c.sum())
            s2 += int((c * c).sum())
        n += flat.numel()
    return _dist().state_digest(np.array([s1 % (1 << 63), s2 % (1 << 63), n], dtype=np.int64))
