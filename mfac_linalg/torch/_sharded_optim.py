"""The sharded mode of :class:`mfac_linalg.torch.MFAC` (docs/math.md §6, docs/distributed.md).

Each of P ranks stores the columns J_p of the window, computes (F⁻¹ g)[J_p] and v[J_p],
and the ranks all-gather v so that every rank applies the same update.  This module
holds that machinery as a mixin of ``MFAC``: the collective set-up, the window's
collective step, the all-gather and the replica check.
"""
from __future__ import annotations

import numpy as np
import torch

from .. import _backend as B
from .. import _validate as V
from . import _optim_flat as F
from ._convert import device_spec, to_torch


class _ShardedMFAC:
    """The sharded mode's methods of :class:`~mfac_linalg.torch.MFAC` (a mixin: it uses
    the attributes that ``MFAC._setup`` sets)."""

    def _init_sharded(self, setup, process_group, layout, check_every):
        """The sharded construction: every rank runs ``setup()`` and checks its arguments
        locally, then the ranks agree before any other collective (a rank that raised
        alone would leave the others waiting); then this rank's window, momentum and
        all-gather plan."""
        comm = _as_comm(process_group)
        err = None
        try:
            setup()
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
        self._segments = F.segments(self._local, self._ranges)
        self._v = torch.zeros(d_p, dtype=self._cdt, device=self._device)
        self._gather_plan(wlayout)

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
        return CL(self._dim, [F.compressed_ranges(self._idx, layout.ranges(p))
                              for p in range(comm.size)])

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

    def _slice(self, g):
        """This rank's columns of the (compressed) vector g."""
        rr = self._local
        if len(rr) == 1:
            return g[rr[0][0]:rr[0][1]]
        if not rr:
            return g[:0]
        return torch.cat([g[a:b] for a, b in rr])

    def _sharded_window_step(self):
        """The window's collective step on this rank's slice of the gradient g; every rank
        raises, and nothing changes anywhere, if any rank's (full) g is not finite or
        could not be formed."""
        try:
            g, own = self._gradient(), None
            if not bool(torch.isfinite(g).all()):
                own = _not_finite(self._comm.rank)
        except Exception as exc:          # e.g. a sparse gradient on this rank
            g, own = None, exc
        if self._check_every and self._steps % self._check_every == 0:
            self._check_consistency(g)     # raises on every rank if any failed
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
                raise _not_finite(self._comm.rank) from None
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
        # one all-reduce of d numbers: the parts are this optimizer's own, of one shape
        # on every rank (no shape header, as allgather's for user parts)
        arr, be = B.asarray(v_p, "part")
        full = D.comm._gather_data(arr, be, self._layout, comm, 0)
        return to_torch(full, dtype=self._cdt, device=self._device)

    def _check_consistency(self, gradient=None):
        """``MFAC.check_consistency`` (documented there); ``gradient``: the one ``step``
        has already formed, else formed here."""
        if self._comm is None:
            raise RuntimeError("check_consistency needs MFAC(..., sharded=True)")
        D = _dist()
        comm = self._comm
        P, r = comm.size, comm.rank
        tab = np.zeros((P, 13), dtype=np.float64)
        err = None
        try:
            g = self._gradient() if gradient is None else gradient
            if not bool(torch.isfinite(g).all()):
                raise _not_finite(r)
            # which parameters have a gradient, too: a missing gradient is zero in g, but
            # its parameter is not updated; their positions (1-based), not a 0/1 vector,
            # whose order-independent digest would see only how many there are
            has = torch.tensor([i + 1.0 for i, f in enumerate(F.present(self.param_groups))
                                if f], dtype=torch.float64)
            tab[r, 1:5] = _bits_digest([g, has])
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


_CHECK_EVERY = 100


def _not_finite(rank):
    """The error of a rank whose gradient (with weight decay) is not finite."""
    return ValueError(f"the gradient (with weight decay) holds NaN or infinity on rank "
                      f"{rank}; nothing was changed on any rank")


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
