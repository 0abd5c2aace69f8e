"""Every argument check of the library, written once.

One rule everywhere: ``TypeError`` for a wrong type (a float or a string where an
integer is needed, a bool where a number is needed), ``ValueError`` for a bad
value.  Every message names the argument, says what was expected and what came::

    window must be an integer; got float 4.7
    damping must be in [1.5e-154, 1.3e+154] for float64 results; got 1e-310

Array arguments are converted by :mod:`mfac_linalg._backend` (which knows NumPy
from CuPy); the checks on their shape and values live here.
"""
from __future__ import annotations

import math
import numbers
import os
from collections.abc import Mapping, Set

import numpy as np

from . import _backend as B

__all__ = [
    "integer", "positive_int", "real", "damping", "choice", "boolean", "fraction",
    "sizes", "path", "gradients", "finite", "gram_finite", "damping_range", "plain_array",
]


def _type_name(v):
    return type(v).__name__


def _got(v):
    """``'float 4.7'`` / ``"str '3'"`` for a message."""
    r = repr(v)
    if len(r) > 60:
        r = r[:57] + "..."
    return f"{_type_name(v)} {r}"


def _is_bool(v):
    return isinstance(v, (bool, np.bool_))


def _host_scalar(v):
    """A 0-d NumPy view of a scalar-like (NumPy/CuPy 0-d array, numpy scalar), or None."""
    if isinstance(v, (numbers.Number, np.generic)):
        return np.asarray(v)
    if hasattr(v, "ndim") and getattr(v, "ndim", None) == 0 and hasattr(v, "dtype"):
        try:
            return np.asarray(B.to_host(v))
        except Exception:
            return None
    return None


def integer(value, name, *, minimum=None, maximum=None):
    """An integer argument (Python or NumPy integer; not bool, float or str).

    Raises ``TypeError`` for another type and ``ValueError`` outside
    ``[minimum, maximum]``.  Returns a Python ``int``.
    """
    if _is_bool(value) or not isinstance(value, (numbers.Integral, np.integer)):
        arr = None if _is_bool(value) else _host_scalar(value)
        if arr is None or arr.dtype.kind not in "iu":
            raise TypeError(f"{name} must be an integer; got {_got(value)}")
        value = int(arr)
    v = int(value)
    if minimum is not None and v < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {v}")
    if maximum is not None and v > maximum:
        raise ValueError(f"{name} must be <= {maximum}; got {v}")
    return v


def positive_int(value, name):
    """An integer >= 1."""
    return integer(value, name, minimum=1)


def count_limit(value, name):
    """A limit on a count: an integer >= 0, or +inf for none.  TypeError for a finite
    float (1.5 or 81.0: a count is an integer), a string or a bool; ValueError for NaN
    or a negative value.  Returns an ``int`` or ``math.inf``."""
    if isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_)):
        return integer(value, name, minimum=0)      # any size (2**64 has no float64 twin)
    v = real(value, name, allow_inf=True, low=0)
    if math.isinf(v):
        return v
    return integer(value, name, minimum=0)


def real(value, name, *, allow_nan=False, allow_inf=False, low=None, high=None,
         low_open=False, high_open=False):
    """A real scalar (int, float, NumPy/CuPy 0-d real array; not bool, str or complex).

    Finite unless ``allow_inf`` / ``allow_nan``; within ``low`` .. ``high`` (closed
    unless ``low_open`` / ``high_open``).  Returns a Python ``float``.
    """
    arr = None if _is_bool(value) else _host_scalar(value)
    if arr is None or arr.ndim != 0 or arr.dtype.kind not in "fiu":
        raise TypeError(f"{name} must be a real number; got {_got(value)}")
    v = float(arr)
    if math.isnan(v):
        if not allow_nan:
            raise ValueError(f"{name} must be a number; got nan")
        return v
    if math.isinf(v) and not allow_inf:
        raise ValueError(f"{name} must be finite; got {v}")
    if low is not None and (v < low or (low_open and v == low)):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}; got {v}")
    if high is not None and (v > high or (high_open and v == high)):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}; got {v}")
    return v


def plain_array(x):
    """``x`` as a plain ``numpy.ndarray`` view where it is an instance of a subclass
    (``numpy.matrix``, a user subclass), so that no subclass semantics (``*`` as a
    matrix product, rows that stay 2-D, overridden methods) reach the computations;
    anything else (a masked array, refused by the conversion with its own message, a
    CuPy array, a list, a tensor) is returned as it is.  A view: nothing is copied."""
    if isinstance(x, np.ndarray) and type(x) is not np.ndarray and \
            not isinstance(x, np.ma.MaskedArray):
        return x.view(np.ndarray)
    return x


def _native_dtype(dtype):
    """``dtype`` in the machine's byte order (a dtype given as such, e.g. that of a loaded
    file: arrays are made native by the dtype policy, ``_backend.asarray``)."""
    dtype = np.dtype(dtype)
    return dtype if dtype.isnative else dtype.newbyteorder("=")


def damping_range(dtype=np.float64):
    """The dampings accepted for results in ``dtype``: ``[sqrt(tiny), sqrt(max)]``.

    Inside it, 1/lambda, N lambda and lambda times any value of moderate size stay
    finite and normal (float64: about [1.5e-154, 1.3e154]; float32: about
    [1.1e-19, 1.8e19]).  Outside it the products overflow or lose every digit;
    rescale the problem instead (F / s has damping lambda / s).
    """
    fi = np.finfo(np.float32 if _native_dtype(dtype) == np.float32 else np.float64)
    return math.sqrt(float(fi.tiny)), math.sqrt(float(fi.max))


def damping(value, name="damping", *, dtype=np.float64):
    """A damping lambda: a real number, finite, > 0 and inside :func:`damping_range`."""
    v = real(value, name, low=0.0, low_open=True)
    lo, hi = damping_range(dtype)
    if not lo <= v <= hi:
        raise ValueError(f"{name} must be in [{lo:.2g}, {hi:.2g}] for "
                         f"{_native_dtype(dtype).name} results; got {v:g} (rescale the "
                         "problem: F/s has damping lambda/s)")
    return v


def choice(value, name, options):
    """One of the strings ``options`` (a non-string is a TypeError)."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be one of {tuple(options)}; got {_got(value)}")
    if value not in options:
        raise ValueError(f"{name} must be one of {tuple(options)}; got {value!r}")
    return value


def boolean(value, name):
    """A bool (Python or NumPy); anything else is a TypeError."""
    if not _is_bool(value):
        raise TypeError(f"{name} must be True or False; got {_got(value)}")
    return bool(value)


def fraction(value, name, *, low_open=False, high_open=False):
    """A real number in [0, 1] (ends open as asked)."""
    return real(value, name, low=0.0, high=1.0, low_open=low_open, high_open=high_open)


def sizes(value, name, *, total=None):
    """A non-empty sequence of positive integers (e.g. layer sizes); optionally summing
    to ``total``.  Returns a list of ``int``."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise TypeError(f"{name} must be a sequence of positive integers; got {_got(value)}")
    if isinstance(value, (Mapping, Set)):   # keys, or an order that is not the caller's
        raise TypeError(f"{name} must be an ordered sequence (a list, tuple or 1-D array) of "
                        f"positive integers; got {type(value).__name__}")
    if hasattr(value, "ndim") and getattr(value, "ndim") != 1:
        raise ValueError(f"{name} must be 1-D; got shape {tuple(value.shape)}")
    out = []
    for i, v in enumerate(list(B.to_host(value)) if hasattr(value, "dtype") else list(value)):
        out.append(integer(v, f"{name}[{i}]", minimum=1))
    if not out:
        raise ValueError(f"{name} must not be empty")
    if total is not None and sum(out) != total:
        raise ValueError(f"{name} must sum to {total}; got sum {sum(out)}")
    return out


def path(value, name):
    """A file-system path (str or os.PathLike); returns a ``str``."""
    if isinstance(value, bytes) or not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name} must be a path (str or os.PathLike); got {_got(value)}")
    p = os.fspath(value)
    if not p:
        raise ValueError(f"{name} must not be empty")
    return p


def save_target(value, name):
    """The file a save writes for a path argument: a ``str`` with symbolic links resolved
    (an atomic save renames a temporary file onto it; a link keeps pointing at the new
    file).  ``ValueError`` for a directory or an existing non-regular file (a device such
    as ``/dev/null``, a FIFO, a socket), which a rename would replace."""
    p = path(value, name)
    real = os.path.realpath(p)
    if os.path.isdir(real):
        raise ValueError(f"{name} {p!r} is a directory; give a file name (it is written "
                         "exactly as given, no suffix added)")
    if os.path.exists(real) and not os.path.isfile(real):
        raise ValueError(f"{name} {p!r} exists and is not a regular file (a device, FIFO "
                         "or socket); give the name of a regular file")
    return real


def finite(arr, name, backend):
    """Raise ``ValueError`` if ``arr`` holds NaN or infinity (run it after any cast)."""
    B.check_finite(arr, name, backend)


def gram_finite(K, name, backend):
    """Raise ``ValueError`` if a Gram-type product of the input (``G Gᵀ``, ``G g``)
    overflowed: finite input whose squares exceed the dtype's range."""
    if not bool(backend.xp.isfinite(K).all()):
        raise ValueError(f"{name} is too large: its Gram products overflow; rescale it "
                         "(and the damping by the square of the scale)")


def gradients(grads, name="grads", *, backend=None, dtype=None, allow_half=False,
              min_rows=1):
    """A gradient matrix: 2-D (m, d) with m >= ``min_rows``, d >= 1, finite after the
    cast to its storage dtype (``dtype``, or the dtype policy's).  Returns (G, backend):
    G is a plain ndarray (a ``numpy.matrix`` or other subclass is viewed as one) in the
    machine's byte order (big-endian input is converted: results and the damping range
    follow its float type, not its byte order).
    """
    G, be = B.asarray(plain_array(grads), name, backend=backend, dtype=dtype,
                      allow_half=allow_half)
    if G.ndim != 2:
        raise ValueError(f"{name} must be 2-D (m, d); got shape {tuple(G.shape)}")
    if G.shape[0] < min_rows or G.shape[1] < 1:
        raise ValueError(f"{name} must hold at least {min_rows} gradient(s) of dimension "
                         f">= 1; got shape {tuple(G.shape)}")
    finite(G, name, be)
    return G, be


def reusable_buffer(raw, G, name, backend):
    """For ``overwrite_grads=True``: ``G`` (validated from the caller's ``raw``) must be
    the caller's own buffer, a writable C-contiguous float32/float64 NumPy array on the
    CPU, so that the set-up can write its factor into it.  Otherwise ``ValueError``
    (``TypeError`` for something that is not a NumPy array), naming ``name``."""
    need = (f"{name} cannot be reused (overwrite_grads=True): it must be a writable, "
            "C-contiguous float32 or float64 NumPy array on the CPU")
    if not backend.is_host:
        raise ValueError(f"{need}; got an array on the GPU (overwrite_grads is CPU-only)")
    if not isinstance(raw, np.ndarray):
        raise TypeError(f"{need}; got {_got(raw)}")
    if raw.dtype not in (np.float32, np.float64):
        raise ValueError(f"{need}; got dtype {raw.dtype}")
    if not raw.flags.c_contiguous:
        raise ValueError(f"{need}; got a non-contiguous array (strides {raw.strides})")
    if not raw.flags.writeable:
        raise ValueError(f"{need}; got a read-only array")
    if G.__array_interface__["data"][0] != raw.__array_interface__["data"][0] or \
            G.shape != raw.shape or G.dtype != raw.dtype:   # pragma: no cover - defensive
        raise ValueError(f"{need}; got an array that had to be converted")
    return G
