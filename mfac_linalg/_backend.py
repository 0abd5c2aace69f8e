"""Backend layer: the only module that knows NumPy from CuPy.

It picks the array namespace from the inputs (NumPy arrays -> CPU, CuPy arrays
-> GPU), imports CuPy lazily and optionally, accepts any object exporting
``__dlpack__`` (PyTorch, JAX, ...) zero-copy on its own device, maps
``scipy.linalg`` to ``cupyx.scipy.linalg`` and owns the dtype policy:

* big data (gradients, d-sized vectors) keeps float32 or float64; float16 and
  bfloat16 are storage formats of the GPU kernels only and are promoted to
  float32 on entry elsewhere; integers and booleans become float64;
* every small matrix (m x m capacitance, Cholesky factors) is float64;
* complex input is refused with a ``TypeError``.
"""
from __future__ import annotations

import functools
import numbers
import re

import numpy as np

__all__ = [
    "Backend", "CPU", "backend_for_device", "asarray", "as_bool", "as_vector_block",
    "gpu_available", "default_device", "check_finite", "to_host", "SMALL_DTYPE",
]

SMALL_DTYPE = np.float64

_KDL_CPU = 1
_KDL_CUDA = 2
_KDL_CUDA_MANAGED = 13


@functools.lru_cache(maxsize=None)
def _cupy():
    """Return the ``cupy`` module, or ``None`` when it cannot be imported."""
    try:
        import cupy  # noqa: PLC0415  (optional dependency, imported lazily)
    except Exception:  # ImportError, or a broken CUDA installation
        return None
    return cupy


@functools.lru_cache(maxsize=None)
def gpu_available() -> bool:
    """True when CuPy imports and sees at least one CUDA device that works."""
    cp = _cupy()
    if cp is None:
        return False
    try:
        if cp.cuda.runtime.getDeviceCount() < 1:
            return False
        cp.zeros(1).sum().item()  # forces context creation and a kernel launch
        return True
    except Exception:
        return False


#: compute capabilities with float64 at half the float32 rate
FAST_FLOAT64 = ("60", "70", "80", "90", "100")
#: parts of those compute capabilities whose float64 rate was cut (export variants)
SLOW_FLOAT64_NAMES = re.compile(r"\b(H800|H20)\b")


@functools.lru_cache(maxsize=None)
def _device_traits(device_id):
    """(compute capability as CuPy spells it, "90"; name, "NVIDIA H100 80GB HBM3") of a
    CUDA device; ("", "") if unknown."""
    cp = _cupy()
    dev = 0 if device_id is None else device_id
    try:
        name = cp.cuda.runtime.getDeviceProperties(dev).get("name", b"")
        return (str(cp.cuda.Device(dev).compute_capability),
                name.decode() if isinstance(name, bytes) else str(name))
    except Exception:
        return "", ""


def has_fast_float64(capability: str, name: str) -> bool:
    """float64 at half the float32 rate: compute capability 6.0, 7.0, 8.0, 9.0 or 10.0,
    except the parts whose float64 was cut (H800, H20)."""
    return capability in FAST_FLOAT64 and not SLOW_FLOAT64_NAMES.search(name)


def default_device() -> str:
    """``"gpu"`` when a usable GPU is there, else ``"cpu"``."""
    return "gpu" if gpu_available() else "cpu"


class Backend:
    """An array namespace plus the matching dense linear algebra.

    Attributes
    ----------
    xp : module
        ``numpy`` or ``cupy``.
    name : str
        ``"cpu"`` or ``"gpu"``.
    device_id : int or None
        The CUDA device ordinal (GPU) or None (CPU).
    """

    def __init__(self, xp, name, device_id=None):
        self.xp = xp
        self.name = name
        self.device_id = device_id

    def __reduce__(self):
        # pickled by name and device ordinal, never by module (modules do not pickle);
        # unpickling on a machine without that GPU raises the ValueError of
        # backend_for_device
        return (_backend_from_spec, (self.name, self.device_id))

    @property
    def is_host(self):
        """True for the CPU backend (NumPy arrays in host memory)."""
        return self.name == "cpu"

    @property
    def is_gpu(self):
        """True for a CUDA backend (CuPy arrays; the kernels can run).  Modules outside
        ``_backend`` switch on this, never on ``name`` (the boundary test checks)."""
        return self.name == "gpu"

    @property
    def fast_float64(self):
        """True on a GPU whose float64 rate is half its float32 rate (compute capability
        6.0, 7.0, 8.0, 9.0, 10.0: P100, V100, A100, H100/H200, B200; not the H800 and
        H20, whose float64 was cut), where float64 accumulation in a memory-bound pass
        costs little; False elsewhere (the CPU, and GPUs with 1/32 or 1/64 of the float32
        rate)."""
        return self.is_gpu and has_fast_float64(*_device_traits(self.device_id))

    # -- dense linear algebra on small float64 matrices -------------------
    @property
    def linalg(self):
        """``scipy.linalg`` or ``cupyx.scipy.linalg``."""
        if self.name == "cpu":
            import scipy.linalg as sla
            return sla
        import cupyx.scipy.linalg as csla
        return csla

    def cholesky_lower(self, a):
        """Lower Cholesky factor of a symmetric positive-definite float64 matrix.

        Raises ``numpy.linalg.LinAlgError`` when ``a`` is not numerically
        positive definite (CuPy returns NaNs instead of raising: we check).
        """
        if self.name == "cpu":
            import scipy.linalg as sla
            return sla.cholesky(a, lower=True, check_finite=False)
        L = self.xp.linalg.cholesky(a)
        if not bool(self.xp.isfinite(L).all()):         # one host read
            raise np.linalg.LinAlgError("matrix is not positive definite")
        return L

    def solve_triangular(self, L, b, *, trans=False, lower=True, overwrite_b=False):
        """Solve ``L x = b`` (``trans=False``) or ``L^T x = b`` (``trans=True``)."""
        return self.linalg.solve_triangular(
            L, b, trans=1 if trans else 0, lower=lower, overwrite_b=overwrite_b,
            check_finite=False)

    def device_context(self):
        """Context manager making this backend's device current (no-op on CPU)."""
        if self.name == "cpu":
            import contextlib
            return contextlib.nullcontext()
        return _cupy().cuda.Device(self.device_id)

    def __eq__(self, other):
        return (isinstance(other, Backend) and self.name == other.name
                and self.device_id == other.device_id)

    def __hash__(self):
        return hash((self.name, self.device_id))

    def __repr__(self):
        return "cpu" if self.name == "cpu" else f"gpu:{self.device_id}"


CPU = Backend(np, "cpu")


def _backend_from_spec(name, device_id):
    """Rebuild a Backend from its pickled spec (see ``Backend.__reduce__``)."""
    return CPU if name == "cpu" else backend_for_device(f"cuda:{int(device_id)}")


def _gpu_backend(device_id: int) -> Backend:
    return Backend(_cupy(), "gpu", int(device_id))


def backend_for_device(device) -> Backend:
    """Backend for a device spec: None/"cpu"/"numpy", "gpu"/"cuda"/"cupy" or "cuda:N"."""
    if device is None or device in ("cpu", "numpy"):
        return CPU
    if isinstance(device, Backend):
        return device
    if isinstance(device, str) and device.split(":")[0] in ("gpu", "cuda", "cupy"):
        if not gpu_available():
            raise ValueError(f"device={device!r} asks for a GPU, but CuPy or a usable CUDA "
                             "device is not available")
        parts = device.split(":")
        dev = int(parts[1]) if len(parts) > 1 else _cupy().cuda.runtime.getDevice()
        return _gpu_backend(dev)
    raise ValueError(f"device must be 'cpu', 'gpu' or 'cuda:N'; got {device!r}")


def _is_cupy_array(x) -> bool:
    cp = _cupy() if "cupy" in type(x).__module__ else None
    return cp is not None and isinstance(x, cp.ndarray)


def _from_foreign(x, name):
    """Import a non-NumPy, non-CuPy array through DLPack, zero-copy."""
    try:
        dev_type, dev_id = x.__dlpack_device__()
    except Exception as exc:  # pragma: no cover - malformed producer
        raise TypeError(f"{name}: object of type {type(x).__name__} has __dlpack__ but "
                        f"no usable __dlpack_device__ ({exc})") from None
    if dev_type == _KDL_CPU:
        return np.from_dlpack(x), CPU
    if dev_type in (_KDL_CUDA, _KDL_CUDA_MANAGED):
        cp = _cupy()
        if cp is None:
            raise TypeError(f"{name} lives on a CUDA device but CuPy is not installed; "
                            "install the 'cuda12' or 'cuda13' extra")
        with cp.cuda.Device(dev_id):
            return cp.from_dlpack(x), _gpu_backend(dev_id)
    raise TypeError(f"{name}: DLPack device type {dev_type} is not supported "
                    "(only CPU and CUDA)")


def _host_from_sequence(x, name):
    """np.asarray of a list/tuple/scalar; a ragged or non-numeric sequence is an error
    that names the argument."""
    try:
        arr = np.asarray(x)
    except ValueError as exc:
        raise ValueError(f"{name} must be a rectangular array of numbers; got a "
                         f"{type(x).__name__} that NumPy cannot make one of ({exc})") from None
    except TypeError as exc:   # e.g. an operator, whose __array__ refuses
        raise TypeError(f"{name} must be an array of numbers; got {type(x).__name__} "
                        f"({exc})") from None
    if arr.dtype == object:
        raise TypeError(f"{name} must be an array of numbers; got a {type(x).__name__} of "
                        "objects")
    return arr


def _untrack(x):
    """A PyTorch-like tensor that requires grad is detached (zero-copy) before DLPack;
    a bfloat16 CPU tensor (NumPy has no bfloat16) is promoted to float32, which the dtype
    policy would do anyway."""
    if getattr(x, "requires_grad", False) and hasattr(x, "detach"):
        x = x.detach()
    dt = str(getattr(x, "dtype", ""))
    if dt.endswith("bfloat16") and hasattr(x, "float"):
        try:
            dev_type, _ = x.__dlpack_device__()
        except Exception:
            dev_type = None
        if dev_type == _KDL_CPU:
            x = x.float()
    return x


def _raw(x, name):
    """Return ``(array, backend)`` for one input without dtype changes."""
    if isinstance(x, np.ma.MaskedArray):
        raise TypeError(f"{name} must not be a masked array (its masked entries would be "
                        f"used as they are); pass {name}.filled(value) or a plain array")
    if isinstance(x, np.ndarray):
        # a subclass (numpy.matrix, a user's) as a plain view: none of its own
        # arithmetic (``*`` as a matrix product, rows that stay 2-D) reaches the maths
        return (x if type(x) is np.ndarray else x.view(np.ndarray)), CPU
    if _is_cupy_array(x):
        return x, _gpu_backend(x.device.id)
    if isinstance(x, (str, bytes)):
        raise TypeError(f"{name} must be an array (NumPy, CuPy or a DLPack tensor); got "
                        f"{type(x).__name__}")
    if isinstance(x, (numbers.Number, list, tuple, np.generic)):
        return _host_from_sequence(x, name), CPU
    if hasattr(x, "__dlpack__"):
        return _from_foreign(_untrack(x), name)
    if hasattr(x, "__array__"):
        return _host_from_sequence(x, name), CPU
    raise TypeError(f"{name} must be an array (NumPy, CuPy or a DLPack tensor); "
                    f"got {type(x).__name__}")


_NATIVE_FLOATS = frozenset((np.dtype(np.float32), np.dtype(np.float64)))


def _storage_dtype(dtype, name, backend):
    """Apply the dtype policy to the dtype of big data."""
    dtype = np.dtype(dtype) if not _is_bfloat16(dtype) else dtype
    if _is_bfloat16(dtype):
        return dtype if backend.name == "gpu" else np.dtype(np.float32)
    kind = dtype.kind
    if kind == "c":
        raise TypeError(f"{name} must be real; got complex dtype {dtype}")
    if kind in "biu":
        return np.dtype(np.float64)
    if kind != "f":
        raise TypeError(f"{name} must have a real numeric dtype; got {dtype}")
    if dtype == np.float16:
        return dtype if backend.name == "gpu" else np.dtype(np.float32)
    if dtype.itemsize > 8:  # long double: nothing below computes in it
        return np.dtype(np.float64)
    return dtype if dtype.isnative else dtype.newbyteorder("=")   # big-endian: native


def _is_bfloat16(dtype) -> bool:
    return getattr(dtype, "name", str(dtype)) == "bfloat16"


def asarray(x, name, *, backend=None, dtype=None, allow_half=False):
    """Convert one input to an array of ``backend`` under the dtype policy.

    Parameters
    ----------
    x : array_like, cupy.ndarray or DLPack tensor
    name : str
        The argument name, used in error messages.
    backend : Backend, optional
        The backend the array must live on.  Mixing CPU and GPU, or two GPUs,
        raises ``TypeError`` (nothing is copied between devices silently).
    dtype : numpy dtype, optional
        Force this floating dtype (after the policy checks).
    allow_half : bool
        Keep float16/bfloat16 (GPU storage); else they become float32.

    Returns
    -------
    (array, Backend)
    """
    arr, be = _raw(x, name)
    if backend is not None and be != backend:
        raise TypeError(f"{name} lives on {be!r} but the operator lives on {backend!r}; "
                        "move it explicitly (no silent host/device copies)")
    # float32 / float64, the common case, pass the policy as they are (a fast path: this
    # runs before the first launch of every GPU call)
    target = arr.dtype if arr.dtype in _NATIVE_FLOATS else _storage_dtype(arr.dtype, name, be)
    if not allow_half and target not in _NATIVE_FLOATS and (
            target == np.float16 or _is_bfloat16(target)):
        target = np.dtype(np.float32)
    if dtype is not None:
        target = dtype
    if arr.dtype != target:
        src = arr
        with np.errstate(over="ignore"):
            arr = arr.astype(target)
        if dtype is None and src.dtype.kind == "f" and src.dtype.itemsize > arr.dtype.itemsize:
            # the policy narrowed a wider float (long double): a finite entry beyond
            # the target's range would pass as an infinity "found in the input"
            xp = be.xp
            if not bool(xp.isfinite(arr).all()) and bool(xp.isfinite(src).all()):
                raise ValueError(f"{name} is too large for {np.dtype(target).name}: its "
                                 f"{src.dtype.name} entries overflow when cast; rescale it")
    return arr, be


def as_bool(x, name, backend):
    """A boolean array on ``backend`` (no dtype policy: only real booleans pass)."""
    arr, be = _raw(x, name)
    if be != backend:
        raise TypeError(f"{name} lives on {be!r} but the operator lives on {backend!r}; "
                        "move it explicitly (no silent host/device copies)")
    if arr.dtype != np.bool_:
        raise TypeError(f"{name} must be a boolean array; got dtype {arr.dtype}")
    return arr


def check_finite(arr, name, backend):
    """Raise ``ValueError`` if ``arr`` holds NaN or infinity.

    On the host a float array is checked through its minimum and maximum (NaN propagates
    through both, an infinity is one of them): two reductions and no boolean temporary of
    the array's size (the whole gradient matrix, for a set-up)."""
    xp = backend.xp
    if backend.is_host and arr.dtype.kind == "f" and arr.size:
        with np.errstate(invalid="ignore"):
            ok = bool(np.isfinite(arr.min())) and bool(np.isfinite(arr.max()))
    else:
        ok = bool(xp.isfinite(arr).all())
    if not ok:
        raise ValueError(f"{name} must be finite; got NaN or infinity")


def as_vector_block(x, name, d, backend, *, finite=True):
    """Validate a right-hand side: (d,) or (d, k).  Returns ``(X2d, was_1d)``."""
    arr, _ = asarray(x, name, backend=backend)
    if arr.ndim == 1:
        if arr.shape[0] != d:
            raise ValueError(f"{name} must have shape ({d},) or ({d}, k); got shape {arr.shape}")
        was_1d = True
        arr = arr[:, None]
    elif arr.ndim == 2:
        if arr.shape[0] != d:
            raise ValueError(f"{name} must have shape ({d},) or ({d}, k); got shape {arr.shape}")
        was_1d = False
    else:
        raise ValueError(f"{name} must be 1-D (d,) or 2-D (d, k); got shape {arr.shape}")
    if finite:
        check_finite(arr, name, backend)
    return arr, was_1d


def to_host(a):
    """Copy to a NumPy array (explicit; only used for small m x m quantities or I/O)."""
    if isinstance(a, np.ndarray):
        return a
    if _is_cupy_array(a):
        return a.get()
    return np.asarray(a)


def scalar(v):
    """Python float from a 0-d array on either backend."""
    return float(to_host(v))


def readonly(a):
    """An internal array for handing out: a read-only NumPy view, or a copy on the GPU
    (CuPy arrays have no read-only flag).  The operator's own array is never exposed."""
    if isinstance(a, np.ndarray):
        v = a.view()
        v.flags.writeable = False
        return v
    return a.copy()


def trsm_rows(L, G, backend):
    """V = L^{-1} G for lower-triangular float64 L (m x m) and G (m x d), in G's dtype.

    On the CPU this is one BLAS ``trsm`` solving X L^T = G^T from the right on the
    C-ordered G (seen by BLAS as the Fortran-ordered G^T), so no transposed copy of G
    is made; the factor is rounded to G's dtype for the solve.  On the GPU it is one
    GEMM with the explicit inverse of L (float64, rounded to G's dtype): cuBLAS trsm
    with a d-column right-hand side is far slower than a GEMM (and cupyx would first
    copy G to Fortran order).
    """
    if backend.is_host:
        from scipy.linalg import blas
        trsm = blas.strsm if G.dtype == np.float32 else blas.dtrsm
        X = trsm(1.0, L.astype(G.dtype, copy=False), G.T, side=1, lower=1, trans_a=1)
        return X.T
    xp = backend.xp
    Linv = backend.solve_triangular(L, xp.eye(L.shape[0], dtype=np.float64), lower=True)
    return Linv.astype(G.dtype) @ G


def linear_operator_base(backend):
    """The ``LinearOperator`` class matching ``backend``: SciPy's on the CPU, cupyx's on
    the GPU (imported lazily; the one place outside the kernels that imports cupyx)."""
    if backend.is_host:
        from scipy.sparse.linalg import LinearOperator
    else:
        from cupyx.scipy.sparse.linalg import LinearOperator
    return LinearOperator



def kernel_module(name):
    """The GPU kernels' module ``mfac_linalg.kernels.<name>``, imported lazily: code
    outside ``_backend``, ``kernels/`` and the CUDA ring buffer reaches kernels only
    through here."""
    mod = _KERNEL_MODULES.get(name)
    if mod is None:             # asked on every GPU product: imported once, then looked up
        import importlib
        mod = _KERNEL_MODULES[name] = importlib.import_module(f"{__package__}.kernels.{name}")
    return mod


_KERNEL_MODULES = {}


def storage_dtype_names(backend):
    """The storage dtypes big data may keep on ``backend``: float32 and float64
    everywhere, float16 and bfloat16 on the GPU (the kernels' formats)."""
    return ("float32", "float64") + (("float16", "bfloat16") if backend.is_gpu else ())


def sparse_linalg(backend):
    """``scipy.sparse.linalg`` (CPU) or ``cupyx.scipy.sparse.linalg`` (GPU): the
    iterative solvers matching ``backend``."""
    if backend.is_host:
        import scipy.sparse.linalg as spla
        return spla
    import cupyx.scipy.sparse.linalg as cspla
    return cspla


def scipy_namespace(backend):
    """The array namespace SciPy's ``LinearOperator`` records for arrays of ``backend``
    (SciPy >= 1.18 compares it when operators are combined); ``backend.xp`` where SciPy
    has no such notion."""
    try:
        from scipy._lib._array_api import array_namespace
        return array_namespace(backend.xp.empty(0))
    except Exception:   # an older SciPy, or one that refuses this array type
        return backend.xp

