"""The ``mfac-linalg`` command: ``demo``, ``ihvp``, ``diag``.

Errors in the user's input (missing or unreadable files, wrong shapes, non-finite or
overflowing values, bad options) print one line naming the flag to stderr and exit
with status 2, no traceback; an interrupt (Ctrl-C) prints one line and exits with status
130.  Anything else is a bug of the library and is *not* hidden: it ends in a traceback
(exit status 1).

The library's own input errors are recognised by its contract: a ``ValueError`` or
``TypeError`` whose message starts with the name of the argument the command passed
(``grads must be finite...``); the name is replaced by the flag (``--grads must be
finite...``).  Any other exception propagates.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys
import tempfile
import time
from typing import Callable, Dict, Mapping, Optional, Sequence, TextIO, TypeVar

import numpy as np

from . import __version__
from . import _backend as B
from . import _progress
from . import _validate as V
from ._capacitance import NotPositiveDefinite
from .static import StaticInverseFisher

__all__ = ["main", "run_demo", "build_parser", "CLIError", "demo_max_dim"]

EXIT_USAGE = 2
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130     # 128 + SIGINT, as shells report an interrupted command

#: The demo forms d x d matrices for its dense reference (O(d^3) time) and an n x d data
#: matrix (n = 2d) that every CG iteration reads twice: above this d it refuses.
DEMO_MAX_DIM = 10_000

T = TypeVar("T")


class CLIError(Exception):
    """An error in the user's input: reported in one line, exit status 2."""


def _input_errors(fn: Callable[[], T], names: Mapping[str, str]) -> T:
    """Run ``fn()``; a ValueError/TypeError whose message starts with one of ``names``
    (the library's argument names) becomes a CLIError naming the flag instead."""
    try:
        return fn()
    except (ValueError, TypeError) as exc:
        msg = str(exc)
        for name, flag in names.items():
            if msg.startswith(name) and msg[len(name):len(name) + 1] in (" ", ":", "=", "["):
                raise CLIError(flag + msg[len(name):]) from None
        raise


def _check(fn: Callable[[], T]) -> T:
    """Run a :mod:`mfac_linalg._validate` check on a user value (its message already
    names the flag): its ValueError/TypeError becomes a CLIError."""
    try:
        return fn()
    except (ValueError, TypeError) as exc:
        raise CLIError(str(exc)) from None


# -- files ------------------------------------------------------------------------

_NPY_MAGIC = b"\x93NUMPY"


def _load(path: str, flag: str) -> np.ndarray:
    """Read one real numeric array from a .npy file, refusing anything else in one line.

    The header is checked against the file size before any data is allocated.
    """
    if not os.path.exists(path):
        raise CLIError(f"{flag}: no such file: {path}")
    if os.path.isdir(path):
        raise CLIError(f"{flag}: {path} is a directory, not a .npy file")
    try:
        with open(path, "rb") as f:
            head = f.read(6)
            if head[:4] == b"PK\x03\x04":
                raise CLIError(f"{flag}: {path} is a .npz archive, not a .npy file (save one "
                               "array with numpy.save)")
            if head != _NPY_MAGIC:
                raise CLIError(f"{flag}: {path} is not a .npy file (no .npy header; save the "
                               "array with numpy.save)")
            f.seek(0)
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            offset = f.tell()
    except CLIError:
        raise
    except (OSError, ValueError, EOFError) as exc:
        raise CLIError(f"{flag}: cannot read {path} as a .npy file ({exc})") from None
    if dtype.hasobject or dtype.kind not in "biuf" or dtype.fields is not None:
        raise CLIError(f"{flag}: {path} must hold real numbers; got dtype {dtype}")
    need = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
    have = os.path.getsize(path) - offset
    if need != have:
        raise CLIError(f"{flag}: {path} is truncated or corrupt: its header declares shape "
                       f"{tuple(shape)} {dtype} ({_bytes(need)}) but it holds {_bytes(have)} "
                       "of data")
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise CLIError(f"{flag}: cannot read {path} as a .npy file ({exc})") from None


def _bytes(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def _save(path: str, arr: np.ndarray) -> None:
    """Write ``arr`` to exactly ``path`` (no suffix added), atomically.

    A symbolic link is written through (its target is replaced, the link kept); an
    existing path that is not a regular file (a device such as /dev/null, a FIFO) is
    refused: replacing it by a file would destroy it."""
    if not path:
        raise CLIError("--out must be a file path; got an empty string")
    if os.path.isdir(path):
        raise CLIError(f"--out: {path} is a directory; give a file path such as "
                       f"{os.path.join(path, 'out.npy')}")
    if os.path.islink(path):
        path = os.path.realpath(path)
    if os.path.exists(path) and not os.path.isfile(path):
        raise CLIError(f"--out: {path} exists and is not a regular file (a device or a "
                       "pipe); give a file path")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise CLIError(f"--out: cannot write {path} (no such directory: "
                       f"{os.path.dirname(path) or folder})")
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=".mfac-linalg-", suffix=".npy.tmp", dir=folder)
        # mkstemp makes the file 0600: give it the mode open() would (the umask's), or
        # the mode of the file it replaces
        if os.path.isfile(path):
            mode = os.stat(path).st_mode & 0o7777
        else:
            mask = os.umask(0)
            os.umask(mask)
            mode = 0o666 & ~mask
        os.chmod(tmp, mode)
        with os.fdopen(fd, "wb") as f:
            np.save(f, arr, allow_pickle=False)
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        raise CLIError(f"--out: cannot write {path} ({exc.strerror or exc})") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def _check_no_overflow(G: np.ndarray, flag: str) -> None:
    """Refuse finite gradients whose squared norms (the Gram diagonal) overflow their dtype."""
    if G.size == 0 or G.dtype.kind not in "f":
        return
    s = float(np.max(np.abs(G)))
    if s == 0.0 or not math.isfinite(s):
        return
    Gs = (G / s).astype(np.float64, copy=False)    # |entries| <= 1: exact enough in float64
    sq = float(np.max(np.einsum("ij,ij->i", Gs, Gs))) * s * s
    store = np.result_type(G.dtype, np.float32)     # what the library computes in
    if not sq <= float(np.finfo(store).max):
        raise CLIError(f"{flag} is too large: the squared norm of a gradient ({sq:.3g}) "
                       f"overflows {store}; rescale the gradients (and the damping by the "
                       "square of the scale)")


def _operator_from_file(args) -> StaticInverseFisher:
    G = _load(args.grads, "--grads")
    if G.ndim != 2:
        raise CLIError(f"--grads must be 2-D (m, d); got shape {G.shape}")
    damping = _check(lambda: V.damping(args.damping, "--damping",
                                       dtype=np.result_type(G.dtype, np.float32)))
    if G.dtype.kind == "f" and not np.isfinite(G).all():
        raise CLIError("--grads must be finite; got NaN or infinity")
    _check_no_overflow(G, "--grads")
    try:
        return _input_errors(lambda: StaticInverseFisher(G, damping),
                             {"grads": "--grads", "damping": "--damping"})
    except NotPositiveDefinite:
        # a user error (the damping too small for the gradients' scale), not a bug
        raise CLIError(f"--damping {damping:g} is too small for the gradients in --grads: "
                       "lambda I + G^T G / m is numerically singular (the capacitance matrix "
                       "of docs/math.md §1 fails its Cholesky factorization); use a larger "
                       "--damping or rescale the gradients") from None


def _finite_result(y, what: str, hint: str) -> np.ndarray:
    y = B.to_host(y)
    if not np.isfinite(y).all():
        raise CLIError(f"the result {what} overflows {y.dtype} (finite input, infinite "
                       f"output); {hint}")
    return y


def cmd_ihvp(args) -> int:
    op = _operator_from_file(args)
    x = _load(args.vec, "--vec")
    d = op.shape[0]
    if x.ndim not in (1, 2) or x.shape[0] != d:
        raise CLIError(f"--vec must have shape ({d},) or ({d}, k) (d = the columns of --grads); "
                       f"got shape {x.shape}")
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        raise CLIError("--vec must be finite; got NaN or infinity")
    with np.errstate(over="ignore", invalid="ignore"):     # an overflow is refused below
        y = _input_errors(lambda: op.matvec(x) if x.ndim == 1 else op.matmat(x),
                          {"x": "--vec", "X": "--vec"})
    y = _finite_result(y, "F^-1 x", "rescale --vec or use a larger --damping")
    _save(args.out, y)
    return 0


def cmd_diag(args) -> int:
    op = _operator_from_file(args)
    with np.errstate(over="ignore", invalid="ignore"):     # an overflow is refused below
        diag = op.diagonal()
    _save(args.out, _finite_result(diag, "diag(F^-1)", "use a larger --damping"))
    return 0


# -- demo ---------------------------------------------------------------------------

def _sync(be) -> None:
    """Wait for the device's queued work: a device-to-host copy of one number does."""
    if be.is_gpu:
        B.to_host(be.xp.zeros(1))


def _timed(fn, be, repeat: int = 3, warmup: bool = True):
    """Median wall time of ``fn()`` over ``repeat`` runs (after one warm-up), and its result."""
    out = None
    if warmup:
        out = fn()
        _sync(be)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        _sync(be)
        times.append(time.perf_counter() - t)
    return float(np.median(times)), out


def _demo_bytes(dim: int, grads: int) -> float:
    """Memory the demo needs (float64): data X (n x d), G, and three d x d matrices."""
    n = max(2 * dim, 2 * grads)
    return 8.0 * (n * dim + 2 * grads * dim + 3 * dim * dim)


def _available_memory() -> Optional[float]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def demo_max_dim(grads: int = 256) -> int:
    """The largest ``--dim`` the demo accepts here: at most ``DEMO_MAX_DIM`` (its dense
    d x d reference takes O(d^3) time) and what fits in half the available memory."""
    mem = _available_memory()
    if mem is None:
        return DEMO_MAX_DIM
    lo, hi = 2, DEMO_MAX_DIM
    if _demo_bytes(hi, grads) <= 0.5 * mem:
        return hi
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _demo_bytes(mid, grads) <= 0.5 * mem:
            lo = mid
        else:
            hi = mid - 1
    return lo


def logistic_problem(n: int, d: int, seed: int, xp=np):
    """Synthetic logistic regression with a decaying feature spectrum (ill-conditioned).

    Returns X (n, d), labels y (n,), and weights w after a few gradient steps:
    per-sample gradients are then those of a model in training, not at random.
    """
    rng = np.random.default_rng(seed)
    scales = (1.0 + np.arange(d)) ** -0.75
    X = rng.standard_normal((n, d)) * scales
    w_true = rng.standard_normal(d) / scales.sum() * 8
    y = (rng.random(n) < 1.0 / (1.0 + np.exp(-X @ w_true))).astype(np.float64)
    w = np.zeros(d)
    for _ in range(20):
        p = 1.0 / (1.0 + np.exp(-X @ w))
        w -= 5.0 * X.T @ (p - y) / n
    return xp.asarray(X), xp.asarray(y), xp.asarray(w)


class _Story:
    """Prints the demo: numbered phase lines with their time, then sections."""

    def __init__(self, out: TextIO, phases: int):
        self.out, self.phases, self.k, self.t0 = out, phases, 0, 0.0

    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def begin(self, text: str, live: bool = False) -> None:
        """Start a phase; ``live``: a progress bar will draw on stderr meanwhile, so the
        line is ended now and the time goes on a line of its own."""
        self.k += 1
        self.t0 = time.perf_counter()
        self.live = live
        print(f"[{self.k}/{self.phases}] {text} ...", end="\n" if live else "", file=self.out,
              flush=True)

    def end(self, extra: str = "") -> None:
        dt = time.perf_counter() - self.t0
        lead = "      done in" if getattr(self, "live", False) else ""
        print(f"{lead} {dt:.1f} s{(' (' + extra + ')') if extra else ''}", file=self.out,
              flush=True)


def _ms(t: float) -> str:
    return f"{t * 1e3:.2f} ms" if t < 1 else f"{t:.2f} s"


def _faster(speedup: float) -> str:
    return f"{speedup:.1f}x faster" if speedup >= 1 else f"{1 / speedup:.1f}x slower"


def _verdict(ok: bool, worst: float, bound: float, meaningful: bool, speedup: float,
             iters: Mapping[str, tuple]) -> str:
    """The demo's last line, from its measurements."""
    if not ok:
        return (f"verdict: FAILED: M-FAC differs from dense float64 by {worst:.1e} (accepted: "
                f"{bound:.1e}); please report this")
    parts = [f"M-FAC agrees with dense float64 to {worst:.0e}"]
    if meaningful:
        parts.append(f"is {_faster(speedup)} than a dense solve (set-up + one product)")
    (it0, info0), (it1, info1) = iters["none"], iters["M-FAC"]
    if info1 != 0:
        parts.append(f"CG with it did not converge in {it1} iterations")
    elif info0 != 0:
        parts.append(f"CG converges in {it1} iterations with it (without it: not in {it0})")
    elif it1 < it0:
        parts.append(f"cuts CG iterations {it0 / it1:.1f}x ({it0} → {it1})")
    else:
        parts.append(f"does not reduce CG iterations on this problem ({it0} → {it1})")
    return "verdict: " + (", ".join(parts[:-1]) + " and " if len(parts) > 1 else "") \
        + parts[-1] + "."


def _scaled(op, xp):
    """x -> F^-1 x for CG's preconditioner, applied to x / s with s a power of two near
    max|x| and multiplied back (exact): residuals of any size (``--l2`` up to 1e50) reach
    a float32 operator in range; float64 results are those of ``op.matvec(x)``."""
    def apply(r):
        r = r.reshape(-1)
        top = float(B.to_host(xp.abs(r).max())) if r.size else 0.0
        if not (top > 0.0 and math.isfinite(top)):
            return op.matvec(r)
        s = math.ldexp(1.0, math.frexp(top)[1])
        return op.matvec(r / s).astype(np.float64) * s
    return apply


def run_demo(dim: int = 2000, grads: int = 256, damping: float = 3e-4, l2: float = 1e-4,
             device: str = "auto", seed: int = 0, dtype: str = "float64",
             cg_rtol: float = 1e-6, out: Optional[TextIO] = None,
             progress: Optional[bool] = None) -> Dict[str, object]:
    """The README's main job: M-FAC on per-sample logistic-regression gradients, as a story.

    Builds F^{-1} for F = damping I + G^T G / m (docs/math.md §1) from m per-sample
    gradients of an L2-regularised logistic regression in training, checks it against a
    dense float64 Cholesky solve, times both in ``dtype``, and uses it as the
    preconditioner of conjugate gradients on one Newton system H p = grad (H the exact
    Hessian, matrix-free), stopping at ||r|| <= cg_rtol ||grad||.

    Parameters
    ----------
    dim, grads : int
        d parameters (2 <= d <= :func:`demo_max_dim`) and m gradients (>= 1).
    damping : float
        lambda > 0.
    l2 : float
        L2 regularisation (0 <= l2 <= 1e50) of the logistic loss, in the Hessian.
    device : {"auto", "cpu", "gpu"}
    seed : int
        >= 0 (NumPy's ``default_rng`` seed).
    dtype : {"float64", "float32"}
        Storage dtype of the gradients for the timings (the accuracy checks are always
        against dense float64).
    cg_rtol : float
        CG's relative residual tolerance.
    out : text stream, optional
        Where the story goes (default: stdout).
    progress : bool or None, default None
        A tqdm bar on stderr over CG's iterations: None, only when stderr is a terminal
        and tqdm is installed; True/False force it on/off.

    Returns
    -------
    dict
        ``error`` (relative, F^{-1}x against dense float64), ``error_matmat``,
        ``error_diag``, ``error_logdet``, ``bound`` (the accuracy the check demands),
        ``ok`` (every check passed), timings ``t_setup``, ``t_ihvp``, ``t_dense_setup``,
        ``t_dense_solve``, ``speedup``, ``meaningful`` (whether the size makes the
        timing comparison mean something), ``cg_iters`` and ``cg_info`` per
        preconditioner (``"none"``, ``"M-FAC"``), ``cg_rtol``.

    Raises
    ------
    CLIError
        For bad arguments (each names its flag) and sizes too large for the dense check.

    Examples
    --------
    >>> import io
    >>> from mfac_linalg.cli import run_demo
    >>> res = run_demo(dim=300, grads=40, device="cpu", out=io.StringIO())
    >>> res["ok"], res["cg_info"]
    (True, {'none': 0, 'M-FAC': 0})
    """
    out = sys.stdout if out is None else out
    if not callable(getattr(out, "write", None)):
        raise CLIError(f"out must be a text stream with a write method; got "
                       f"{type(out).__name__}")
    if progress is not None:
        progress = _check(lambda: V.boolean(progress, "--progress"))
    dim = _check(lambda: V.integer(dim, "--dim", minimum=2))
    grads = _check(lambda: V.integer(grads, "--grads", minimum=1))
    dtype = _check(lambda: V.choice(dtype, "--dtype", ("float64", "float32")))
    lam = _check(lambda: V.damping(damping, "--damping", dtype=np.dtype(dtype)))
    # the gradient grows like l2 and CG's inner products like l2^3: beyond 1e50 they overflow
    l2 = _check(lambda: V.real(l2, "--l2", low=0.0, high=1e50))
    seed = _check(lambda: V.integer(seed, "--seed", minimum=0))
    cg_rtol = _check(lambda: V.real(cg_rtol, "--cg-rtol", low=0.0, high=1.0,
                                    low_open=True, high_open=True))
    device = _check(lambda: V.choice(device, "--device", ("auto", "cpu", "gpu")))
    limit = demo_max_dim(grads)
    mem = _available_memory()
    if mem is not None and _demo_bytes(min(dim, 2), grads) > 0.5 * mem:
        # even d = 2 does not fit: the gradients' count is what is too large
        raise CLIError(
            f"--grads {grads} is too large for the demo: its per-sample gradients and data "
            f"take {_bytes(_demo_bytes(2, grads))} at d = 2, over half the available memory "
            f"({_bytes(mem)}); use fewer --grads")
    if dim > limit:
        raise CLIError(
            f"--dim {dim} is too large for the demo's dense comparison (with --grads "
            f"{grads}: the data, the gradients and three d x d matrices take "
            f"{_bytes(_demo_bytes(dim, grads))}, and O(d^3) time at d = {dim}); "
            f"use --dim <= {limit} (or fewer --grads). M-FAC itself needs O(dm) memory: "
            "for large d use mfac_linalg.StaticInverseFisher directly")
    if device == "auto":
        device = B.default_device()
    be = _input_errors(lambda: B.backend_for_device(device), {"device": "--device"})
    xp = be.xp
    sdt = np.dtype(dtype)
    n = max(2 * dim, 2 * grads)
    story = _Story(out, 4)

    story.say("mfac-linalg demo: M-FAC on the per-sample gradients of a logistic regression")
    story.say("  F = λI + GᵀG/m is the damped empirical Fisher of m gradients (the rows of G, "
              "m × d).")
    story.say("  M-FAC applies F⁻¹ through an m × m matrix (Woodbury): set-up O(dm²), each "
              "product O(dm);")
    story.say("  a dense solve needs O(d³) to factor F and O(d²) per product.")
    story.say(f"  problem: n={n} samples, d={dim} parameters, m={grads} gradients, "
              f"λ={lam:.1e}, L2={l2:.1e}, {dtype} gradients, {be!r}")
    story.say()

    # 1. the problem
    story.begin("building the problem and its per-sample gradients")
    X, y, w = logistic_problem(n, dim, seed, xp)
    rng = np.random.default_rng(seed + 1)
    idx = xp.asarray(rng.choice(n, size=grads, replace=grads > n))
    Xi = X[idx]
    p = 1.0 / (1.0 + xp.exp(-(Xi @ w)))
    G64 = (p - y[idx])[:, None] * Xi                       # (m, d) per-sample gradients
    G = G64.astype(sdt)
    v = xp.asarray(rng.standard_normal(dim)).astype(sdt)
    Vk = xp.asarray(rng.standard_normal((dim, 8))).astype(sdt)
    story.end()

    # 2. M-FAC
    story.begin("M-FAC: set-up, products, diagonal, log det")
    t_setup, op = _timed(lambda: StaticInverseFisher(G, lam), be)
    t_ihvp, yv = _timed(lambda: op.matvec(v), be, repeat=20)
    Yk = op.matmat(Vk)
    diag = op.diagonal()
    logdet = float(op.logdet())
    story.end(f"{op.form} form")

    # 3. dense reference (float64) and dense timings (in the demo's dtype)
    story.begin(f"dense reference: form F ({dim} × {dim}), Cholesky, solves")

    def dense_factor(Gd):
        F = Gd.T @ Gd / grads
        F[xp.diag_indices(Gd.shape[1])] += lam
        try:
            return be.cholesky_lower(F)                   # F = L Lᵀ
        except np.linalg.LinAlgError:
            raise CLIError(f"--damping {lam:g} is too small for the demo's dense reference: "
                           f"F = lambda I + G^T G / m is numerically singular in "
                           f"{Gd.dtype} (its Cholesky factorization fails); use a larger "
                           "--damping") from None

    def dense_solve(L, b):
        return be.solve_triangular(L, be.solve_triangular(L, b, lower=True), lower=True,
                                   trans=True)

    big = dim > 4000
    if big:   # one large factorisation is timed once: warm the solver libraries first
        dense_solve(dense_factor(G[:, :8]), v[:8])
    t_dsetup, fac = _timed(lambda: dense_factor(G), be, repeat=1, warmup=not big)
    t_dsolve, _ = _timed(lambda: dense_solve(fac, v), be, repeat=5 if big else 20)
    fac64 = fac if sdt == np.float64 else dense_factor(G.astype(np.float64))
    v64, Vk64 = v.astype(np.float64), Vk.astype(np.float64)
    ref = dense_solve(fac64, v64)
    refk = dense_solve(fac64, Vk64)
    cols = xp.asarray(rng.choice(dim, size=min(16, dim), replace=False))
    E = xp.zeros((dim, cols.size))
    E[cols, xp.arange(cols.size)] = 1.0
    ref_diag = dense_solve(fac64, E)[cols, xp.arange(cols.size)]
    ref_logdet = float(B.to_host(2.0 * xp.log(xp.abs(xp.diagonal(fac64))).sum()))
    story.end()

    def rel(a, b):
        return float(B.to_host(xp.linalg.norm(a.astype(np.float64) - b) / xp.linalg.norm(b)))

    err = rel(yv, ref)
    err_k = rel(Yk, refk)
    err_diag = rel(diag[cols], ref_diag)
    err_logdet = abs(logdet - ref_logdet) / abs(ref_logdet)
    # the accuracy to expect: eps * kappa_W, kappa_W = lambda_max(F) / lambda (docs/math.md §7)
    gram = B.to_host(G64 @ G64.T) / grads
    kappa = (lam + float(np.linalg.eigvalsh(gram)[-1])) / lam
    eps = float(np.finfo(sdt).eps)
    bound = max(10.0 * eps * kappa, 100.0 * eps)
    ok = max(err, err_k, err_diag, err_logdet) <= bound

    # 4. CG on the Newton system
    pa = 1.0 / (1.0 + xp.exp(-(X @ w)))
    wts = pa * (1 - pa)
    grad = X.T @ (pa - y) / n + l2 * w

    def hess(u):
        u = u.reshape(-1)
        return X.T @ (wts * (X @ u)) / n + l2 * u

    spla = B.sparse_linalg(be)                 # scipy.sparse.linalg or its cupyx twin
    cg = spla.cg
    M = spla.LinearOperator((dim, dim), matvec=_scaled(op, xp), dtype=np.float64)
    H = spla.LinearOperator((dim, dim), matvec=hess, dtype=np.float64)
    maxiter = min(5 * dim, 3000)
    story.begin(f"CG on the Newton system H p = ∇L (stops at ‖r‖ ≤ {cg_rtol:.0e}·‖∇L‖, "
                f"at most {maxiter} iterations)", live=_progress.will_draw(progress))
    iters = {}
    for name, pre in (("none", None), ("M-FAC", M)):
        count = [0]
        with _progress.counter(total=maxiter, desc=f"CG, preconditioner: {name}",
                               enabled=progress) as bar:
            def cb(_xk, count=count, bar=bar):
                count[0] += 1
                bar.update(1)
            _, info = cg(H, grad, M=pre, rtol=cg_rtol, maxiter=maxiter, callback=cb)
        iters[name] = (count[0], int(info))
    story.end()

    # the report
    speedup = (t_dsetup + t_dsolve) / (t_setup + t_ihvp)
    meaningful = dim >= 1000 and 4 * grads <= dim
    story.say()
    rule = (f"10·eps({dtype})·κ" if 10.0 * eps * kappa >= 100.0 * eps else
            f"100·eps({dtype}), the floor: 10·eps·κ is smaller")
    story.say(f"checks against dense float64 (relative errors; accepted up to {bound:.1e} = "
              f"{rule}, κ = λ_max(F)/λ = {kappa:.1e}: docs/math.md §7)")
    rows = [("F⁻¹x (matvec)", err), ("F⁻¹X (matmat, 8 columns, one pass)", err_k),
            (f"diag(F⁻¹) ({int(cols.size)} entries)", err_diag), ("log det F", err_logdet)]
    wid = max(len(r[0]) for r in rows)
    for label, e in rows:
        story.say(f"  {label:<{wid}}  {e:.1e}")
    story.say()
    story.say(f"timings ({be.name}, {dtype} gradients, medians)")
    story.say(f"  set-up     M-FAC {_ms(t_setup):>10}   dense (form F + Cholesky) "
              f"{_ms(t_dsetup):>10}")
    story.say(f"  F⁻¹x       M-FAC {_ms(t_ihvp):>10}   dense (two triangular solves) "
              f"{_ms(t_dsolve):>10}")
    story.say(f"  set-up + one product: M-FAC is {_faster(speedup)} than dense")
    if not meaningful:
        why = (f"m = {grads} is not small next to d = {dim}" if 4 * grads > dim else
               f"d = {dim} is small: a dense solve is cheap")
        story.say(f"  note: {why}, so this comparison says little; M-FAC's advantage grows "
                  "like d²/m² (try --dim 5000 --grads 256)")
    if sdt == np.float64:
        story.say("  (docs/benchmarks.md times float32 gradients, where M-FAC gains more: "
                  "run with --dtype float32 to compare)")
    story.say()
    story.say(f"CG iterations to ‖r‖ ≤ {cg_rtol:.0e}·‖∇L‖ on the Newton system "
              "(exact Hessian, matrix-free)")
    for name, label in (("none", "no preconditioner"), ("M-FAC", "M-FAC preconditioner")):
        k, info = iters[name]
        state = "converged" if info == 0 else f"NOT converged (info={info})"
        story.say(f"  {label:<22} {k:>6}   {state}")
    story.say()
    story.say(_verdict(ok, max(err, err_k, err_diag, err_logdet), bound, meaningful, speedup,
                       iters))
    return {"error": err, "error_matmat": err_k, "error_diag": err_diag,
            "error_logdet": err_logdet, "bound": bound, "ok": ok, "kappa": kappa,
            "t_setup": t_setup, "t_ihvp": t_ihvp, "t_dense_setup": t_dsetup,
            "t_dense_solve": t_dsolve, "speedup": speedup, "meaningful": meaningful,
            "cg_iters": {k: v[0] for k, v in iters.items()},
            "cg_info": {k: v[1] for k, v in iters.items()}, "cg_rtol": cg_rtol,
            "form": op.form, "dtype": dtype}


def cmd_demo(args) -> int:
    res = run_demo(dim=args.dim, grads=args.grads, damping=args.damping, l2=args.l2,
                   device=args.device, seed=args.seed, dtype=args.dtype, cg_rtol=args.cg_rtol,
                   progress=args.progress)
    return 0 if res["ok"] else EXIT_FAILED


# -- the parser ----------------------------------------------------------------------

def _float_arg(text: str) -> float:
    """A float option as typed: one whose digits are not zero but that rounds to 0 (or to
    inf) in float64 is refused as typed, not reported later as the 0.0 it became."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {text!r}") from None
    mant = text.strip().lower().lstrip("+-").split("e")[0]
    if v == 0.0 and any(c in "123456789" for c in mant):
        raise argparse.ArgumentTypeError(f"{text} underflows to 0 in float64")
    if math.isinf(v) and "inf" not in text.lower():
        raise argparse.ArgumentTypeError(f"{text} overflows float64")
    return v


class _Parser(argparse.ArgumentParser):
    """argparse's parser whose errors are one line naming the flag (no usage block), exit
    status 2, as every other input error of the command line (``--help`` has the usage)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # argparse takes "-1e-3", "-inf" for options (its pattern knows only -1 and -1.5),
        # so "--damping -1e-3" said "expected one argument"; none of our options looks
        # like a number, so these are values, refused by name with their value
        self._negative_number_matcher = re.compile(
            r"^-(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$|^-(inf|infinity|nan)$", re.IGNORECASE)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="mfac-linalg",
                                description="Inverse empirical Fisher operators (M-FAC).")
    p.add_argument("--version", action="version", version=f"mfac-linalg {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="M-FAC on a logistic-regression problem, checked and "
                       "timed against a dense solve, then as a CG preconditioner")
    d.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto",
                   help="where to run (auto: the GPU when CuPy and a GPU are there)")
    d.add_argument("--dim", type=int, default=2000,
                   help=f"number of parameters d (2 .. {DEMO_MAX_DIM}, memory permitting)")
    d.add_argument("--grads", type=int, default=256, help="number of gradients m")
    d.add_argument("--damping", type=_float_arg, default=3e-4,
                   help="damping lambda of F (> 0)")
    d.add_argument("--l2", type=_float_arg, default=1e-4,
                   help="L2 regularisation (0 .. 1e50) of the logistic loss (in the Hessian)")
    d.add_argument("--dtype", choices=["float64", "float32"], default="float64",
                   help="storage dtype of the gradients for the timings")
    d.add_argument("--cg-rtol", type=_float_arg, default=1e-6, dest="cg_rtol",
                   help="CG's relative residual tolerance")
    d.add_argument("--seed", type=int, default=0, help="random seed (>= 0)")
    d.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="a progress bar over CG's iterations (default: on a terminal, with "
                        "tqdm installed)")
    d.set_defaults(func=cmd_demo)
    for name, func, helptext in (("ihvp", cmd_ihvp, "write F^{-1} x"),
                                 ("diag", cmd_diag, "write diag(F^{-1})")):
        c = sub.add_parser(name, help=helptext)
        c.add_argument("--grads", required=True, help=".npy file with gradients (m, d)")
        if name == "ihvp":
            c.add_argument("--vec", required=True, help=".npy file with x, (d,) or (d, k)")
        c.add_argument("--damping", type=_float_arg, required=True, help="damping lambda > 0")
        c.add_argument("--out", required=True,
                       help="output file, written as given (atomically; no suffix added)")
        c.set_defaults(func=func)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit status (0, 1 for a failed demo check, 2 for
    an input error, 130 when interrupted by Ctrl-C).  A bug of the library propagates as
    its exception."""
    args = build_parser().parse_args(argv)
    for stream in (sys.stdout, sys.stderr):   # λ, ᵀ, ⁻¹ on a console that cannot show them
        enc = (getattr(stream, "encoding", None) or "").lower().replace("-", "")
        if enc != "utf8" and hasattr(stream, "reconfigure"):
            try:
                stream.reconfigure(errors="replace")
            except (ValueError, OSError):
                pass
    try:
        return args.func(args)
    except CLIError as exc:
        print(f"mfac-linalg {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:         # Ctrl-C: one line, no traceback (--out is untouched)
        print(f"\nmfac-linalg {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:           # `mfac-linalg demo | head`: stop quietly
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return EXIT_FAILED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
