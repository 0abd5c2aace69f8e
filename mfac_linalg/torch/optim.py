r"""The M-FAC optimizer (docs/math.md §10) as a ``torch.optim.Optimizer``.

Over all parameters flattened in order (``parameters_to_vector`` order, the groups
one after the other):

    g = ∇L + wd · w                       (wd: the group's weight decay; only the
                                           stored weights in the sparse mode)
    u = F⁻¹ g                             after g has entered the sliding window
                                          (docs/math.md §2), F = λ I + (1/N) Σ g_i g_iᵀ
    v ← μ v + (1 − μ) u  if μ > 0, else v = u        (μ: the group's momentum)
    w ← w − lr · v                        (lr: the group's learning rate)

A parameter without a gradient (``p.grad is None``: frozen, or unused by the loss)
counts as zero in g (no weight decay), and its coordinates of v and w are left as they
are (the ``torch.optim`` convention); a step in which no parameter has a gradient
does nothing.

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
from . import _optim_flat as F
from ._convert import device_spec, tensor_dtype_name, to_torch
from ._optim_state import _CheckpointMFAC
from ._sharded_optim import _ShardedMFAC


__all__ = ["MFAC"]

_STORAGE = ("float32", "float64", "float16", "bfloat16")


class MFAC(_ShardedMFAC, _CheckpointMFAC, torch.optim.Optimizer):
    r"""M-FAC: preconditioned steps with the inverse empirical Fisher of the last m gradients.

    Each ``step()`` gathers the gradient g (plus weight decay) of all parameters into
    one vector, adds it to a :class:`mfac_linalg.SlidingWindowInverseFisher` and
    applies u = F⁻¹ g (docs/math.md §10):

    .. math::

        F = \lambda I + \frac{1}{N} \sum_{i \in \text{window}} g_i g_i^T, \qquad
        v \leftarrow \mu v + (1 - \mu) F^{-1} g, \qquad w \leftarrow w - \text{lr}\, v.

    As in ``torch.optim``, a parameter whose ``.grad`` is None (frozen, or not reached
    by the loss) is left exactly as it is: no update, no weight decay, its momentum
    unchanged.  Its coordinates of g are zero when other parameters have gradients (the
    window holds full-length gradients; F⁻¹ couples the coordinates, so the parameters
    that are updated see those zeros), and a step in which no parameter has a gradient
    (e.g. right after ``zero_grad()`` with no backward pass) changes nothing: not the
    parameters, not the momentum, not the window.

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

    *Identical gradients are expected on every rank*, and the same parameters without
    a gradient (as DDP leaves them).  Each rank's update is built from the columns that
    each rank owns, so gradients that differ between ranks give a patchwork, not a
    divergence.  A step with no gradient at all returns on each rank before any
    collective, so it must be such a step on every rank (a rank that has gradients
    would wait for the others in the window's all-reduce).  :meth:`check_consistency`
    hashes the gradient (with which parameters have one), the parameters (O(d), exact
    integer sums of their bits) and the window's m × m state, and compares the hashes
    in one all-reduce of 13 P numbers; ``step`` runs it on its first call and every
    ``check_every`` steps, before it changes anything, and raises
    :class:`~mfac_linalg.distributed.ReplicaDivergenceError` on every rank naming what
    differs.  A gradient holding NaN or infinity anywhere on
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

        def setup():
            self._setup(params, lr, momentum, weight_decay, window, damping, normalize, dtype,
                        sparse, refresh_every)

        if sharded:     # the collective construction (``_sharded_optim``)
            self._init_sharded(setup, process_group, layout, check_every)
            self._frozen = True
            return
        for name, val in (("process_group", process_group), ("layout", layout),
                          ("check_every", check_every)):
            if val is not None:
                raise ValueError(f"{name} is used only with sharded=True; got "
                                 f"{type(val).__name__} with sharded=False")
        setup()
        self._comm = None
        self._layout = None
        self._window = SlidingWindowInverseFisher(
            self._dim, self._m, self._lam, dtype=self._storage,
            device=device_spec(self._device), normalize=self._normalize,
            refresh_every=self._refresh_every)
        self._local = [(0, self._dim)]
        self._segments = F.segments(self._local, self._ranges)
        self._v = torch.zeros(self._dim, dtype=self._cdt, device=self._device)
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
        self._device, pdt = F.check_params(params)
        # gradients are gathered in float32 / float64 (16-bit parameters: float32)
        self._cdt = pdt if pdt in (torch.float32, torch.float64) else torch.float32
        if dtype is None:
            dtype = tensor_dtype_name(self._cdt)
        self._storage = V.choice(tensor_dtype_name(dtype) if isinstance(dtype, torch.dtype)
                                 else dtype, "dtype", _STORAGE)
        self._sizes = [p.numel() for p in params]
        self._total = sum(self._sizes)
        self._mask, self._idx = F.sparse_index(params, sparse)
        self._dim = self._total if self._mask is None else int(self._idx.numel())
        if self._m * max(self._dim, 1) * 8 > np.iinfo(np.int64).max:
            raise ValueError(f"window must be small enough for an m x d window of d = "
                             f"{self._dim} parameters to be addressable; got {self._m}")
        self._ranges = F.group_ranges(self.param_groups, self._mask)
        self._steps = 0

    # -- construction helpers --------------------------------------------------------
    def add_param_group(self, param_group):
        """Add a group (during construction only: the window's dimension is fixed)."""
        if getattr(self, "_frozen", False):
            raise RuntimeError("MFAC cannot take parameter groups after construction: the "
                               "window's dimension is fixed; build a new optimizer")
        k = len(self.param_groups)
        if not isinstance(param_group, dict):
            raise TypeError(f"param_groups[{k}] must be a dict (a parameter group); got "
                            f"{type(param_group).__name__}")
        if "params" not in param_group:
            raise ValueError(f"param_groups[{k}] must have a 'params' entry; got keys "
                             f"{sorted(map(str, param_group))}")
        super().add_param_group(param_group)
        try:
            F.check_group(self.param_groups[-1], f"param_groups[{k}]")
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise

    def _params(self):
        return [p for g in self.param_groups for p in g["params"]]

    # -- views ------------------------------------------------------------------------
    @property
    def window_operator(self):
        """The window behind the steps: a :class:`~mfac_linalg.SlidingWindowInverseFisher`
        (its dimension is the number of stored weights) or, with ``sharded=True``, this
        rank's :class:`~mfac_linalg.distributed.ShardedSlidingWindowInverseFisher`.

        This is the optimizer's own window, not a copy (a copy would cost the whole m x d
        buffer): use it for queries (``matvec``, ``diagonal``, ``quad``, ``logdet``,
        ``fisher()``), which never change it.  Calling ``update``, ``step``, ``reset``,
        ``refresh`` or ``load_state_dict`` on it changes the optimizer's curvature state;
        to experiment, take ``copy.deepcopy(opt.window_operator)``."""
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
        return F.gradient(self.param_groups, self._idx, self._cdt, self._device)

    @torch.no_grad()
    def step(self, closure=None):
        """One M-FAC step (docs/math.md §10); returns the closure's loss if one is given.

        O(d m + m²) (sharded: O(d_p m + m² + d) per rank, see the class notes).  The
        parameters whose ``.grad`` is None are not changed (their gradient counts as zero
        in the window); with no gradient at all the step does nothing and returns (the
        closure's loss, if any).  Raises ``ValueError`` (nothing changed) if the gradient
        holds NaN or infinity; with ``sharded=True`` every rank raises (the others
        :class:`~mfac_linalg.distributed.RemoteRankError`) and nothing changes on any rank.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        present = F.present(self.param_groups)
        if not any(present):             # no gradient at all: nothing to do
            return loss
        keep = None                      # the stored coordinates that get the update
        if not all(present):
            keep = self._slice(F.present_mask(present, self._sizes, self._idx, self._device))
        else:
            present = None
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
            if keep is not None:             # only where the parameter has a gradient
                new = v[a:b].mul(mu).add_(u[a:b], alpha=1.0 - mu) if mu > 0 else u[a:b]
                v[a:b] = torch.where(keep[a:b], new, v[a:b])
            elif mu > 0:                     # v <- mu v + (1 - mu) u
                v[a:b].mul_(mu).add_(u[a:b], alpha=1.0 - mu)
            else:                            # v = u
                v[a:b].copy_(u[a:b])
        upd = v if self._comm is None else self._allgather(v)
        F.apply_update(self.param_groups, upd, self._idx, self._total, present)
        self._steps += 1
        return loss

    # -- the sharded mode (``_sharded_optim``) and checkpoints (``_optim_state``) ----
    def check_consistency(self, *, _gradient=None):
        """Check that every rank holds the same gradient, parameters and window state.

        Collective (sharded mode only; every rank calls it).  Each rank hashes its
        (compressed) gradient with weight decay, which parameters have a gradient, and
        its parameters (exact integer sums of their bits, O(d) on their device,
        order-independent), and the window's replicated m x m state (O(m²) on the host);
        one all-reduce of P x 13 float64 numbers compares them.  ``step`` runs it on its
        first call and every ``check_every`` steps, before anything changes.

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
        self._check_consistency(_gradient)

    def state_dict(self):
        """The optimizer's state: ``torch.optim`` 's (param groups) plus the window, the
        momentum, the sparse mask and the parameters' shapes, as CPU tensors and plain
        Python values (loadable with ``torch.load(..., weights_only=True)``).

        With ``sharded=True`` this is this rank's state (its columns of the window and
        of the momentum, the replicated m x m state) with the rank, the number of ranks
        and the layout recorded; save one file per rank.  Local."""
        return self._mfac_state_dict()

    def load_state_dict(self, state_dict):
        """Restore a state from :meth:`state_dict` (any device); validated first, nothing
        changes on error.  A state saved for parameters of other shapes is refused
        (``ValueError`` naming the group and the parameter), also when the number of
        parameters per group is the same; a state saved without the shapes (by an
        earlier version) is checked on the number of parameters only.

        With ``sharded=True`` it is collective: every rank passes its own state; a state
        of another rank, of another number of ranks or saved under another layout is
        refused, on every rank, before anything changes on any rank."""
        self._mfac_load_state_dict(state_dict)
