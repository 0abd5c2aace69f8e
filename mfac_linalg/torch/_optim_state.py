"""Checkpoints of :class:`mfac_linalg.torch.MFAC`: ``state_dict`` / ``load_state_dict``.

A mixin of ``MFAC``: the state holds only tensors and plain Python values (the window,
the momentum, the sparse mask, the step count, the parameters' shapes and, in the
sharded mode, the rank, the number of ranks and the layout); a load is validated in full
before anything changes.
"""
from __future__ import annotations

import torch

from .. import _validate as V
from ..sliding import SlidingWindowInverseFisher
from ._optim_flat import check_group
from ._convert import _numpy_state, _tensor_state, device_spec
from ._sharded_optim import _dist


class _CheckpointMFAC:
    """``state_dict`` / ``load_state_dict`` of :class:`~mfac_linalg.torch.MFAC` (a mixin:
    it extends ``torch.optim.Optimizer``'s and uses the attributes ``MFAC._setup`` sets)."""

    def _mfac_state_dict(self):
        """``MFAC.state_dict`` (documented there)."""
        sd = super().state_dict()
        sd["mfac"] = {
            "window": _tensor_state(self._window.state_dict()),
            "v": self._v.detach().to("cpu", copy=True),
            "mask": (self._mask.to("cpu", copy=True) if self._mask is not None
                     else torch.zeros(0, dtype=torch.bool)),
            "sparse": self._mask is not None,
            "steps": self._steps,
            # per group, each parameter's shape: a load refuses other shapes of the same
            # total size (the window's dimension alone cannot tell them apart)
            "shapes": [[list(p.shape) for p in g["params"]] for g in self.param_groups],
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
        for k, g in enumerate(groups):
            check_group(g, f"state_dict['param_groups'][{k}]")
        if "shapes" in m:          # absent from states saved before the shapes were kept
            self._check_shapes(m["shapes"])
        return m, v, steps

    def _check_shapes(self, shapes):
        """Refuse a state saved for parameters of other shapes (same count per group)."""
        mine = [[tuple(p.shape) for p in g["params"]] for g in self.param_groups]
        if not isinstance(shapes, (list, tuple)) or len(shapes) != len(mine) or any(
                not isinstance(s, (list, tuple)) or len(s) != len(ms)
                for s, ms in zip(shapes, mine)):
            raise ValueError("state_dict['mfac']['shapes'] must hold, per parameter group, "
                             "the shape of each parameter")
        for k, (gs, ms) in enumerate(zip(shapes, mine)):
            for j, (got, want) in enumerate(zip(gs, ms)):
                try:
                    got = tuple(int(n) for n in got)
                except (TypeError, ValueError):
                    raise ValueError(f"state_dict['mfac']['shapes'][{k}][{j}] must be a list "
                                     f"of integers; got {got!r}") from None
                if got != want:
                    raise ValueError(f"state_dict was saved for parameters of other shapes: "
                                     f"param_groups[{k}]['params'][{j}] had shape "
                                     f"{list(got)}; this optimizer's has shape "
                                     f"{list(want)}")

    def _mfac_load_state_dict(self, state_dict):
        """``MFAC.load_state_dict`` (documented there)."""
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
