"""Checkpoints of the sharded sliding window, one per rank (docs/math.md §6).

A mixin of :class:`~mfac_linalg.distributed.ShardedSlidingWindowInverseFisher`:
``state_dict``/``save`` (local; an ``.npz`` without pickles, written atomically, the
column layout recorded), ``load_state_dict``/``load`` (collective: every rank validates,
the ranks agree, then load and compare digests; nothing changes on any rank if one
refuses) and ``digest``.
"""
from __future__ import annotations

import json
import os
import tempfile
import zipfile

import numpy as np

from .. import _backend as B
from .. import _validate as V
from ..sliding.checkpoint import (_as_float, _check_cholesky, _check_inverse, _header,
                                  _probe_tol, file_mode, shift_of)
from .comm import agree, state_digest
from .layout import ColumnLayout

__all__: list[str] = []

FORMAT = "mfac_linalg.sharded_window"
FORMAT_VERSION = 1
NORMALIZE = ("window", "count")


class _WindowCheckpointing:
    """Per-rank checkpoints of the sharded window: state dicts, files and digests."""

    def state_dict(self):
        """This rank's state as host arrays and plain data (a copy), the layout recorded.
        Local."""
        F, logdet_C = self._eng.export()
        return {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "rank": self._comm.rank, "size": self._comm.size,
            "layout": self._layout.to_dict(), "window": self._m, "damping": self._damping,
            "normalize": self._normalize, "dtype": self._buf.name,
            "refresh_every": self._refresh_every, "engine": self._eng.kind,
            "count": self._count, "since_refresh": self._since_refresh,
            "start": int(self._eng.start), "logdet_C": float(logdet_C),
            "G": self._buf.host_rows(), "K": np.array(B.to_host(self._eng.K), copy=True),
            "F": F,
        }

    def _validate_state(self, state):
        """Check a state against this window (layout, rank, shapes, values); a clean copy."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict; got {type(state).__name__}")
        keys = ("format", "format_version", "rank", "size", "layout", "window", "damping",
                "normalize", "dtype", "refresh_every", "engine", "count", "since_refresh",
                "start", "logdet_C", "G", "K", "F")
        missing = [k for k in keys if k not in state]
        if missing:
            raise ValueError(f"state is missing {missing}")
        if (state["format"] != FORMAT
                or V.integer(state["format_version"], "state format_version") != FORMAT_VERSION):
            raise ValueError(f"state must be a {FORMAT} checkpoint of version {FORMAT_VERSION}; "
                             f"got {state['format']!r} version {state['format_version']}")
        layout = ColumnLayout.from_dict(state["layout"])
        if layout != self._layout:
            raise ValueError(f"state was saved under another column layout ({layout!r}, "
                             f"fingerprint {layout.fingerprint()}); this window's is "
                             f"{self._layout!r} ({self._layout.fingerprint()}): load it with the "
                             "layout it was saved with")
        for key, mine in (("rank", self._comm.rank), ("size", self._comm.size),
                          ("window", self._m), ("dtype", self._buf.name),
                          ("engine", self._eng.kind)):
            if state[key] != mine:
                raise ValueError(f"state: {key}={state[key]!r} does not match this window's "
                                 f"{key}={mine!r}")
        st = dict(state)
        st["damping"] = V.damping(state["damping"], "state damping",
                                  dtype=self._buf.compute_dtype)
        st["normalize"] = V.choice(state["normalize"], "state normalize", NORMALIZE)
        st["refresh_every"] = V.positive_int(state["refresh_every"], "state refresh_every")
        m = self._m
        for k in ("count", "since_refresh", "start"):      # no float/bool/str: exact ints
            st[k] = V.integer(state[k], f"state {k}", minimum=0)
        if st["since_refresh"] > st["refresh_every"]:
            raise ValueError(f"state: since_refresh={st['since_refresh']} exceeds "
                             f"refresh_every={st['refresh_every']}")
        n = min(st["count"], m)
        if st["start"] != (st["count"] - n) % m:
            raise ValueError(f"state: start={st['start']} does not match count={st['count']}")
        raw = np.asarray(self._buf.host_rows()).dtype
        for k, shape, dt in (("G", (m, self._d), raw), ("K", (m, m), np.float64),
                             ("F", (m, m), np.float64)):
            a = np.asarray(B.to_host(state[k]))
            if a.shape != shape or a.dtype != dt:
                raise ValueError(f"state: {k} must be {np.dtype(dt).name} of shape {shape}; got "
                                 f"{a.dtype.name} of shape {a.shape}")
            if a.dtype.kind == "f" and not np.isfinite(a).all():
                raise ValueError(f"state: {k} holds NaN or infinity")
            st[k] = np.array(a, copy=True)
        st["logdet_C"] = V.real(state["logdet_C"], "state logdet_C")
        self._check_local(st)
        return st

    def _check_local(self, st):
        """The replicated state consistent with itself (rows beyond the count empty, K
        symmetric, F the factor or inverse of N lambda I + K for this count, damping and
        normalization: the single window's checks; an inverse within its drift band is
        kept bit for bit)."""
        m, K = self._m, st["K"]
        n = min(st["count"], m)
        if n < m and np.any(st["G"][n:]):
            raise ValueError(f"state: count={st['count']} but rows beyond {n} of G are not "
                             "empty")
        if not np.array_equal(K, K.T):
            raise ValueError("state: K is not symmetric")
        if n < m and (np.any(K[n:]) or np.any(K[:, n:])):
            raise ValueError(f"state: count={st['count']} but K has entries beyond {n}")
        shift = shift_of(st["normalize"], m, n, st["damping"])
        rng = np.random.default_rng(0)
        if st["engine"] == "cholesky":
            _check_cholesky(st["F"], K, n, shift, st["start"], rng)
        else:
            _check_inverse(st["F"], K, shift, st["logdet_C"], rng)

    def _check_gram(self, st):
        """Collective: K = sum_p G_p G_p^T by a random probe (one all-reduce of 2m
        numbers), to the accumulation's rounding; every rank reaches the same verdict."""
        m = self._m
        G = _as_float(st["G"], st["dtype"])
        z = np.random.default_rng(0).standard_normal(m)
        buf = np.concatenate([G @ (G.T @ z), np.einsum("ij,ij->i", G, G)])
        self._comm.allreduce_sum(buf)
        norms = np.sqrt(buf[m:])
        r = st["K"] @ z - buf[:m]
        bound = _probe_tol(st["dtype"], self._layout.dim) * norms * (norms @ np.abs(z)) + 1e-300
        if not np.all(np.abs(r) <= bound):
            return ValueError("state: K is not the Gram matrix sum_p G_p G_p^T of the stored "
                              "gradients (the ranks' G do not match K)")
        return None

    def load_state_dict(self, state):
        """Restore every rank's state (each rank passes its own).  Collective: every rank
        validates its state (a layout other than this window's is refused), the ranks
        agree, then load, then compare digests of the replicated state.  Nothing changes
        on any rank if any rank's state is refused.  Returns self."""
        err, st = None, None
        try:
            st = self._validate_state(state)
        except Exception as exc:
            err = exc
        return self._load(st, err)

    def _load(self, st, err):
        agree(self._comm, err, "load_state_dict")
        eng = self._new_engine(st["normalize"])
        n = min(st["count"], self._m)
        shift = shift_of(st["normalize"], self._m, n, st["damping"])
        eng.load(st["K"], st["F"], n, shift, st["start"], st["logdet_C"])
        old = (self._eng, self._buf.snapshot(), self._count, self._since_refresh,
               self._damping, self._normalize, self._refresh_every)
        self._eng = eng
        self._buf.load(st["G"])
        self._damping, self._normalize = st["damping"], st["normalize"]
        self._refresh_every = st["refresh_every"]
        self._count, self._since_refresh = st["count"], st["since_refresh"]
        try:
            self.check_replicas()
            agree(self._comm, self._check_gram(st), "load_state_dict")
        except BaseException:
            (self._eng, snap, self._count, self._since_refresh, self._damping,
             self._normalize, self._refresh_every) = old
            self._buf.restore(snap)
            raise
        return self

    def save(self, path):
        """Write this rank's state to ``path`` (an ``.npz``; no pickles), atomically: a
        temporary file in the same folder, then a rename.  Local.  Returns the path."""
        given = V.path(path, "path")
        path = V.save_target(path, "path")  # no directory/device/FIFO; symlinks resolved
        st = self.state_dict()
        arrays = {k: np.asarray(st[k]) for k in ("G", "K", "F")}
        meta = {k: v for k, v in st.items() if k not in arrays}
        arrays["meta"] = np.array(json.dumps(meta))
        folder = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=folder)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)
                f.flush()
                os.fsync(f.fileno())        # on disk before the rename, as the single window
            os.chmod(tmp, file_mode(path))
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return given

    @staticmethod
    def read_state(path):
        """The state dict of a file written by :meth:`save` (``allow_pickle=False``)."""
        V.save_target(path, "path")          # a directory, device or FIFO: ValueError
        path = V.path(path, "path")
        try:
            with zipfile.ZipFile(path) as zf:
                meta, raw = _read_members(zf, path)
        except FileNotFoundError:
            raise
        except Exception as exc:    # a corrupted archive: zlib, struct, CRC, JSON, types...
            raise ValueError(f"cannot read a sharded-window checkpoint from {path}: "
                             f"{type(exc).__name__}: {exc}") from None
        meta.update(raw)
        return meta

    def load(self, path):
        """Load this rank's checkpoint file into the window.  Collective (see
        :meth:`load_state_dict`); a file saved under another layout is refused.  An
        instance method (the window's layout and communicator come first), unlike the
        single-process ``SlidingWindowInverseFisher.load(path)``."""
        if not hasattr(self, "_load"):        # called on the class, as the single window's
            raise TypeError("ShardedSlidingWindowInverseFisher.load is an instance method: "
                            "build the window with its layout and communicator, then call "
                            "window.load(path) on every rank")
        err, st = None, None
        try:
            raw = self.read_state(path)
            try:
                st = self._validate_state(raw)
            except (TypeError, ValueError) as exc:     # the file's content: name the file
                raise ValueError(f"{path}: {exc}") from None
        except Exception as exc:
            err = exc
        return self._load(st, err)

    def digest(self):
        """The 64-bit digest of the replicated state (hex), the same on every rank while
        the replicas agree.  Local."""
        return state_digest(*self._replicated()).astype(np.uint16).tobytes().hex()


def _read_members(zf, path):
    """(meta, {G, K, F}) from an open archive: the metadata first (bounded), then each
    array's ``.npy`` header checked against the shape the metadata implies (window,
    this rank's columns) before it is read, so a forged header allocates nothing."""
    infos = {i.filename: i for i in zf.infolist()}
    want = {"meta.npy", "G.npy", "K.npy", "F.npy"}
    if set(infos) != want:
        raise ValueError(f"members must be {sorted(want)}; got {sorted(infos)}")
    if infos["meta.npy"].file_size > 1 << 20:
        raise ValueError("the metadata member is too large")
    with zf.open(infos["meta.npy"]) as f:
        meta = json.loads(str(np.lib.format.read_array(f, allow_pickle=False)))
    if not isinstance(meta, dict):
        raise ValueError("the metadata is not a dict")
    m = V.positive_int(meta.get("window"), "window")
    lay = ColumnLayout.from_dict(meta.get("layout"))
    rank = V.integer(meta.get("rank"), "rank", minimum=0, maximum=lay.size - 1)
    raw = {}
    for k, shape in (("G", (m, lay.local_dim(rank))), ("K", (m, m)), ("F", (m, m))):
        info = infos[k + ".npy"]
        shp, _, dt = _header(zf, info, path)
        if tuple(shp) != shape or dt.hasobject:
            raise ValueError(f"{k} must have shape {shape}; the file declares shape "
                             f"{tuple(shp)}, dtype {dt}")
        nbytes = int(np.prod(shp, dtype=np.int64)) * dt.itemsize
        if not nbytes <= info.file_size <= nbytes + 65536:
            raise ValueError(f"member {k} has {info.file_size} bytes for a declared {nbytes}")
        with zf.open(info) as f:
            raw[k] = np.lib.format.read_array(f, allow_pickle=False)
    return meta, raw
