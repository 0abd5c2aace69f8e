"""Checkpoints of the sliding window: the format, its validation, atomic save and load.

A checkpoint is a plain ``.npz`` archive (no pickles) of format version 2::

    format_version, dim, window, damping, normalize, dtype, refresh_every, count,
    since_refresh, engine      scalars (0-d arrays; strings as 0-d unicode arrays)
    G  (window, dim)           the ring buffer as stored (16-bit storage: raw uint16)
    K  (window, window)        the Gram matrix, slot order, float64
    F  (window, window)        the engine's state: the padded Cholesky factor in
                               arrival order ("cholesky") or C^{-1} over all slots
                               ("explicit"), float64
    logdet_C                   log det C as the engine tracks it (float64)

Loading checks everything before it allocates or trusts anything: the archive's
members and their ``.npy`` headers (shape and dtype against ``dim`` and ``window``)
before any array is read, then types, ranges and finiteness, then consistency:
rows beyond the count empty, K = G G^T (a random probe, to the accumulation's
rounding), and F consistent with K, the damping, the normalization and the count
(a random probe of L L^T or C C^{-1}; log det C by a fresh factorisation).  Version
1 files (an ``L`` and a ``stale`` flag) are read too; their engine is rebuilt from K.
"""
from __future__ import annotations

import math
import os
import tempfile
import zipfile

import numpy as np

from .. import _backend as B
from .. import _validate as V
from .._capacitance import pick_engine

__all__ = ["FORMAT_VERSION", "Checkpointing", "validate_state", "write", "read", "shift_of"]

FORMAT_VERSION = 2
NORMALIZE = ("window", "count")
DTYPES = ("float32", "float64", "float16", "bfloat16")
ENGINES = ("cholesky", "explicit")
_SCALARS = ("format_version", "dim", "window", "damping", "normalize", "dtype",
            "refresh_every", "count", "since_refresh")
_V2 = _SCALARS + ("engine", "logdet_C", "G", "K", "F")
_V1 = _SCALARS + ("stale", "G", "K", "L")
_MAX_SCALAR_BYTES = 4096


def shift_of(normalize, window, n, damping):
    """s = N * damping with N = window ("window") or max(n, 1) ("count")."""
    return (window if normalize == "window" else max(n, 1)) * damping


def _raw_dtype(dtype):
    return np.dtype(np.uint16) if dtype in ("float16", "bfloat16") else np.dtype(dtype)


def _as_float(G, dtype):
    """Stored rows as float64 values (16-bit words decoded)."""
    if dtype == "bfloat16":
        return (G.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    if dtype == "float16":
        return G.view(np.float16).astype(np.float64)
    return G.astype(np.float64)


def _text(v, name):
    if isinstance(v, np.ndarray) and v.ndim == 0 and v.dtype.kind == "U":
        v = str(v)
    if isinstance(v, np.str_):
        v = str(v)
    return v


def validate_state(state, *, trusted=False):
    """Check a state dict (see the module docstring); return a clean copy with Python
    scalars and host NumPy arrays, ``F`` None where the engine must be rebuilt.

    ``trusted``: skip the O(dim m + m^3) consistency checks (a state this library
    has just produced, e.g. for a copy).  Raises TypeError / ValueError naming the field.
    """
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict; got {type(state).__name__}")
    if "format_version" not in state:
        raise ValueError("state is missing ['format_version']")
    ver = V.integer(state["format_version"], "state: format_version")
    if ver not in (1, FORMAT_VERSION):
        raise ValueError(f"state has format version {ver}; this library reads versions "
                         f"1 and {FORMAT_VERSION}")
    keys = _V1 if ver == 1 else _V2
    missing = [k for k in keys if k not in state]
    if missing:
        raise ValueError(f"state is missing {missing}")
    st = {"format_version": FORMAT_VERSION}
    for k in ("dim", "window", "refresh_every"):
        st[k] = V.positive_int(state[k], f"state: {k}")
    for k in ("count", "since_refresh"):
        st[k] = V.integer(state[k], f"state: {k}", minimum=0)
    st["normalize"] = V.choice(_text(state["normalize"], "normalize"), "state: normalize",
                               NORMALIZE)
    st["dtype"] = V.choice(_text(state["dtype"], "dtype"), "state: dtype", DTYPES)
    compute = np.float64 if st["dtype"] == "float64" else np.float32
    st["damping"] = V.damping(state["damping"], "state: damping", dtype=compute)
    m, d = st["window"], st["dim"]
    if ver == 1:
        st["engine"] = "cholesky"
        stale = V.boolean(bool(np.asarray(state["stale"])), "state: stale")
        st["logdet_C"] = None
        fkey = None if stale else "L"
    else:
        st["engine"] = V.choice(_text(state["engine"], "engine"), "state: engine", ENGINES)
        st["logdet_C"] = V.real(state["logdet_C"], "state: logdet_C")
        fkey = "F"
    arrays = [("G", (m, d), _raw_dtype(st["dtype"])), ("K", (m, m), np.dtype(np.float64))]
    if fkey:
        arrays.append((fkey, (m, m), np.dtype(np.float64)))
    for k, shape, dt in arrays:
        a = state[k]
        if not hasattr(a, "shape") or not hasattr(a, "dtype"):
            raise TypeError(f"state: {k} must be an array; got {type(a).__name__}")
        if tuple(a.shape) != shape:
            raise ValueError(f"state: {k} must have shape {shape}; got {tuple(a.shape)}")
        if np.dtype(a.dtype) != dt:
            raise ValueError(f"state: {k} must have dtype {dt}; got {a.dtype}")
        a = np.array(B.to_host(a), copy=True)
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise ValueError(f"state: {k} holds NaN or infinity")
        st[k] = a
    st["F"] = st.pop("L", None) if ver == 1 else st["F"]
    if ver == 1:
        st["since_refresh"] = 0 if st["F"] is None else st["since_refresh"]
    if st["since_refresh"] > st["refresh_every"]:
        raise ValueError(f"state: since_refresh={st['since_refresh']} exceeds "
                         f"refresh_every={st['refresh_every']}")
    if not trusted:
        _check_consistent(st)
    return st


def _probe_tol(dtype, d):
    """Relative rounding allowed between K and G G^T: the accumulation's (float32 for
    32- and 16-bit storage, float64 else), ~ sqrt(d) eps with a margin of 16."""
    eps = 2.0 ** -24 if dtype != "float64" else 2.0 ** -53
    return 16.0 * math.sqrt(d) * eps + 1e-14


def _check_consistent(st):
    m, d = st["window"], st["dim"]
    n = min(st["count"], m)
    if n < m and np.any(st["G"][n:]):
        raise ValueError(f"state: count={st['count']} but rows beyond {n} of G are not empty")
    K = st["K"]
    if not np.array_equal(K, K.T):
        raise ValueError("state: K is not symmetric")
    if n < m and (np.any(K[n:]) or np.any(K[:, n:])):
        raise ValueError(f"state: count={st['count']} but K has entries beyond {n}")
    rng = np.random.default_rng(0)
    G = _as_float(st["G"], st["dtype"])
    norms = np.sqrt(np.einsum("ij,ij->i", G, G))
    z = rng.standard_normal(m)
    r = K @ z - G @ (G.T @ z)
    bound = _probe_tol(st["dtype"], d) * norms * (norms @ np.abs(z)) + 1e-300
    if not np.all(np.abs(r) <= bound):
        raise ValueError("state: K is not the Gram matrix G G^T of the stored gradients "
                         f"(largest probe residual {np.max(np.abs(r) / bound):.2g} x the "
                         "rounding allowed)")
    F = st["F"]
    if F is None:
        return
    shift = shift_of(st["normalize"], m, n, st["damping"])
    if st["engine"] == "cholesky":
        _check_cholesky(F, K, n, shift, (st["count"] - n) % m, rng)
    else:
        _check_inverse(F, K, shift, st["logdet_C"], rng)


def _check_cholesky(F, K, n, shift, start, rng):
    m = F.shape[0]
    ok = (np.array_equal(F, np.tril(F)) and np.all(np.diagonal(F)[:n] > 0)
          and not np.any(F[n:, :n]) and np.array_equal(F[n:, n:], np.eye(m - n)))
    if ok and n:
        q = (start + np.arange(n)) % m
        C = K[np.ix_(q, q)] + shift * np.eye(n)
        Ln = F[:n, :n]
        z = rng.standard_normal(n)
        r = Ln @ (Ln.T @ z) - C @ z
        ok = bool(np.all(np.abs(r) <= 1e-8 * (np.abs(Ln) @ (np.abs(Ln.T) @ np.abs(z)))))
    if not ok:
        raise ValueError("state: F is not the Cholesky factor of N*damping*I + K for the "
                         "gradients held (count, damping and normalize must match it)")


def _check_inverse(F, K, shift, logdet_C, rng):
    """Refuse (ValueError) an F that is not C^{-1} or a logdet_C that is not log det C
    to within the drift an inverse updated in place may carry (a probe residual of
    1e-3 |C| |F| |z|; 1e-3 (m + |log det C|)).  Within that band F is kept bit for bit:
    a loaded window equals the saved one, drift included, until its next refresh."""
    m = F.shape[0]
    C = K + shift * np.eye(m)
    z = rng.standard_normal(m)
    r = np.abs(C @ (F @ z) - z)
    scale = np.abs(C) @ (np.abs(F) @ np.abs(z))
    if not np.all(r <= 1e-3 * scale):
        raise ValueError("state: F is not the inverse of N*damping*I + K (count, damping "
                         "and normalize must match it)")
    try:
        exact = 2.0 * np.log(np.diagonal(np.linalg.cholesky(C))).sum()
    except np.linalg.LinAlgError:
        raise ValueError("state: N*damping*I + K is not positive definite") from None
    gap = abs(logdet_C - exact)
    if not gap <= 1e-3 * (m + abs(exact)):
        raise ValueError(f"state: logdet_C={logdet_C:.17g} does not match log det C = "
                         f"{exact:.17g}")


# -- files ----------------------------------------------------------------------------
def _target(path):
    """The file to read: a regular file (a directory, device or FIFO is refused before it
    is opened: reading /dev/zero or a FIFO would not end)."""
    p = V.save_target(path, "path")
    return p if os.path.exists(p) else V.path(path, "path")


def file_mode(path):
    """The mode a saved file gets: the mode of the file it replaces, else what ``open``
    would give (0666 less the umask), not ``mkstemp``'s 0600."""
    if os.path.isfile(path):
        return os.stat(path).st_mode & 0o7777
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def write(path, state):
    """Write ``state`` to exactly ``path``, atomically (a temporary file in the same
    folder, then a rename): a failed save leaves a previous file intact."""
    p = V.save_target(path, "path")     # symlinks resolved; no device/FIFO replaced
    arrays = {}
    for k, v in state.items():
        if v is None:
            continue
        arrays[k] = np.array(v) if isinstance(v, str) else np.asarray(v)
    folder = os.path.dirname(os.path.abspath(p))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(p) + ".",
                               suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode(p))
        os.replace(tmp, p)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _header(zf, info, path):
    """(shape, fortran, dtype) of one ``.npy`` member from its header alone."""
    with zf.open(info) as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            return np.lib.format.read_array_header_1_0(f)
        if version == (2, 0):
            return np.lib.format.read_array_header_2_0(f)
        raise ValueError(f"unsupported .npy version {version}")


def _member(zf, info, shape, dtype, path):
    """Read one member after its header matched ``shape`` and ``dtype`` (None: a scalar
    of any non-object dtype) and its size matches what the header declares."""
    shp, fortran, dt = _header(zf, info, path)
    name = info.filename[:-4]
    if dt.hasobject:
        raise ValueError(f"member {name} holds Python objects")
    if shape is not None and (tuple(shp) != shape or dt != dtype):
        raise ValueError(f"state: {name} must have shape {shape} and dtype {dtype}; the "
                         f"file declares shape {tuple(shp)}, dtype {dt}")
    if shape is None and tuple(shp) != ():
        raise ValueError(f"state: {name} must be a scalar; the file declares shape "
                         f"{tuple(shp)}")
    nbytes = int(np.prod(shp, dtype=np.int64)) * dt.itemsize
    if info.file_size < nbytes or info.file_size > nbytes + 65536:
        raise ValueError(f"member {name} has {info.file_size} bytes for a "
                         f"declared {nbytes}")
    with zf.open(info) as f:
        return np.lib.format.read_array(f, allow_pickle=False)


def read(path):
    """Read a checkpoint file written by :func:`write` into a raw state dict (not yet
    validated beyond the archive's structure and the declared shapes)."""
    p = _target(path)
    try:
        zf = zipfile.ZipFile(p)
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise ValueError(f"cannot read a sliding-window file from {p}: not an .npz archive "
                         f"({type(exc).__name__}: {exc})") from None
    try:
        with zf:
            return _read_members(zf, p)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"cannot read a sliding-window file from {p}: {exc}") from None
    except Exception as exc:       # a corrupted archive: zlib, struct, CRC, encryption...
        raise ValueError(f"cannot read a sliding-window file from {p}: "
                         f"{type(exc).__name__}: {exc}") from None


def _read_members(zf, p):
    infos = {}
    for info in zf.infolist():
        if not info.filename.endswith(".npy"):
            raise ValueError(f"unexpected member {info.filename!r}")
        infos[info.filename[:-4]] = info
    state = {}
    for k, info in infos.items():
        if k in _V1 + _V2 and k not in ("G", "K", "F", "L"):
            if info.file_size > _MAX_SCALAR_BYTES:
                raise ValueError(f"member {k} is too large for a scalar")
            v = _member(zf, info, None, None, p)
            state[k] = v[()] if v.dtype.kind != "U" else str(v)
        elif k not in ("G", "K", "F", "L"):
            raise ValueError(f"unexpected member {k + '.npy'!r}")
    try:
        m = V.positive_int(state.get("window"), "state: window")
        d = V.positive_int(state.get("dim"), "state: dim")
        dtype = V.choice(_text(state.get("dtype"), "dtype"), "state: dtype", DTYPES)
    except TypeError:
        raise ValueError("window, dim and dtype must be stored as an integer, an "
                         "integer and a dtype name") from None
    shapes = {"G": ((m, d), _raw_dtype(dtype)), "K": ((m, m), np.dtype(np.float64)),
              "F": ((m, m), np.dtype(np.float64)), "L": ((m, m), np.dtype(np.float64))}
    for k, (shape, dt) in shapes.items():
        if k in infos:
            state[k] = _member(zf, infos[k], shape, dt, p)
    return state


# -- the window's checkpoint methods ------------------------------------------------------
class Checkpointing:
    """``state_dict`` / ``load_state_dict`` / ``save`` / ``load`` and copying of the
    sliding window (mixed into :class:`~mfac_linalg.sliding.SlidingWindowInverseFisher`,
    whose ring buffer ``_buf``, engine ``_eng`` and lock ``_lock`` they use)."""

    def state_dict(self):
        """The whole state as host NumPy arrays and Python scalars (a copy; no side
        effects).  Format: :mod:`mfac_linalg.sliding.checkpoint`.  O(dim m + m^2)."""
        with self._lock:
            F, logdet_C = self._eng.export()
            return {"format_version": FORMAT_VERSION, "dim": self._d,
                    "window": self._m, "damping": self._damping,
                    "normalize": self._normalize, "dtype": self._buf.name,
                    "refresh_every": self._refresh_every, "count": self._count,
                    "since_refresh": self._since_refresh, "engine": self._eng.kind,
                    "logdet_C": float(logdet_C), "G": self._buf.host_rows(),
                    "K": np.array(B.to_host(self._eng.K), copy=True), "F": F}

    def load_state_dict(self, state, *, _trusted=False):
        """Restore a state from :meth:`state_dict`: validated first, nothing changes on
        error.  A change of normalization (or a checkpoint of the other engine)
        rebuilds the engine exactly, O(m^3).  Returns the window."""
        st = validate_state(state, trusted=_trusted)
        for key, mine in (("dim", self._d), ("window", self._m), ("dtype", self._buf.name)):
            if st[key] != mine:
                raise ValueError(f"state: {key}={st[key]} does not match this window's "
                                 f"{key}={mine}")
        with self._lock:
            m, n = self._m, min(st["count"], self._m)
            eng = pick_engine(self._backend, self._buf.name, st["normalize"],
                              self._engine_choice, window=m)
            shift = shift_of(st["normalize"], m, n, st["damping"])
            start = (st["count"] - n) % m
            exact = st["F"] is not None and st["engine"] == eng.kind
            if exact:
                eng.load(st["K"], st["F"], n, shift, start, st["logdet_C"])
            else:
                eng.rebuild(st["K"], n, shift, start)     # may raise: nothing changed yet
            self._buf.load(st["G"])
            self._eng, self._damping, self._normalize = eng, st["damping"], st["normalize"]
            self._refresh_every, self._count = st["refresh_every"], st["count"]
            self._since_refresh = st["since_refresh"] if exact else 0
        return self

    def save(self, path):
        """Write the state to exactly ``path`` (an ``.npz`` archive, no pickles; no suffix
        added), atomically: a failed save leaves a previous file intact.  O(dim m + m^2).

        Raises ``ValueError`` for a directory, ``TypeError`` for a non-path, ``OSError``
        from the file system (the previous file untouched).

        Examples
        --------
        >>> import os, tempfile, numpy as np
        >>> from mfac_linalg import SlidingWindowInverseFisher
        >>> w = SlidingWindowInverseFisher(6, 2, 0.5, dtype="float64").update(np.ones(6))
        >>> path = os.path.join(tempfile.mkdtemp(), "window.ckpt")
        >>> w.save(path)
        >>> os.listdir(os.path.dirname(path))
        ['window.ckpt']
        >>> SlidingWindowInverseFisher.load(path).count
        1
        """
        write(path, self.state_dict())

    @classmethod
    def load(cls, path, *, device=None, engine=None, accumulate="auto"):
        """Read a window written by :meth:`save` from exactly ``path``; every field is
        checked before anything is allocated (ValueError naming the file).  ``device``,
        ``engine`` and ``accumulate`` as the constructor's; ``engine`` defaults to the
        saved window's m x m scheme (the file holds its state: loaded as it is, bit for
        bit), ``accumulate`` to "auto" (a choice of the passes, not in the file: give the
        saved window's for bit-identical products where it was not its "auto")."""
        raw = read(path)
        try:
            st = validate_state(raw)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: {exc}") from None
        def build(choice):
            return cls(st["dim"], st["window"], st["damping"], dtype=st["dtype"],
                       device=device, normalize=st["normalize"],
                       refresh_every=st["refresh_every"], engine=choice,
                       accumulate=accumulate)
        if engine is None:
            try:
                win = build(st["engine"])
            except ValueError:           # that scheme is not offered here (another device)
                win = build("auto")
        else:
            win = build(engine)
        return win.load_state_dict(st, _trusted=True)

    def __reduce__(self):
        # copy.copy, copy.deepcopy and pickle: an independent window, bit-identical state
        return (_rebuild, (type(self), self.state_dict(), self.device, self._engine_choice,
                           self._check_finite, self._accumulate_choice))


def _rebuild(cls, state, device, engine, check_finite, accumulate="auto"):
    dev = "cpu" if device == "cpu" else "cuda:" + device.split(":")[1]
    w = cls(state["dim"], state["window"], state["damping"], dtype=state["dtype"], device=dev,
            normalize=state["normalize"], refresh_every=state["refresh_every"],
            check_finite=check_finite, engine=engine, accumulate=accumulate)
    return w.load_state_dict(state, _trusted=True)
