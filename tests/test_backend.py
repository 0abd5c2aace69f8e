"""The backend layer: namespaces, DLPack, device mixing, dtype policy."""
import numpy as np
import pytest

import mfac_linalg as ml
from mfac_linalg import _backend as B


class DLPackOnly:
    """A foreign tensor that speaks only DLPack (like a PyTorch/JAX CPU tensor)."""

    def __init__(self, arr):
        self._arr = arr

    def __dlpack__(self, **kwargs):
        return self._arr.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._arr.__dlpack_device__()


def test_dlpack_input_is_zero_copy_on_cpu(rng):
    G = rng.standard_normal((5, 12))
    arr, be = B.asarray(DLPackOnly(G), "grads")
    assert be.name == "cpu" and np.shares_memory(arr, G)
    op = ml.StaticInverseFisher(DLPackOnly(G), 0.3)
    ref = ml.StaticInverseFisher(G, 0.3)
    x = rng.standard_normal(12)
    assert np.array_equal(op.matvec(DLPackOnly(x)), ref.matvec(x))


def test_dlpack_unknown_device_refused():
    class Weird:
        def __dlpack__(self, **kw):
            raise AssertionError("never called")

        def __dlpack_device__(self):
            return (14, 0)  # e.g. a Metal device

    with pytest.raises(TypeError, match=r"grads: DLPack device type 14 is not supported"):
        ml.StaticInverseFisher(Weird(), 0.1)


@pytest.mark.parametrize("dtype,expected", [
    (np.float64, np.float64), (np.float32, np.float32), (np.float16, np.float32),
    (np.int32, np.float64), (np.int64, np.float64), (np.uint8, np.float64), (bool, np.float64),
])
def test_dtype_policy_cpu(dtype, expected):
    arr, _ = B.asarray(np.ones((2, 2), dtype=dtype), "grads")
    assert arr.dtype == expected


def test_lists_are_accepted():
    op = ml.StaticInverseFisher([[1.0, 2.0], [3.0, 4.0]], 1.0)
    assert op.dtype == np.float64
    y = op.matvec([1, 1])
    assert isinstance(y, np.ndarray) and y.dtype == np.float64


def test_output_dtype_follows_input(rng):
    op32 = ml.StaticInverseFisher(rng.standard_normal((3, 8)).astype(np.float32), 0.1)
    op64 = ml.StaticInverseFisher(rng.standard_normal((3, 8)), 0.1)
    x = rng.standard_normal(8)
    assert op32.matvec(x).dtype == np.float64
    assert op32.matvec(x.astype(np.float32)).dtype == np.float32
    assert op64.matvec(x.astype(np.float32)).dtype == np.float32
    assert op64.matvec(np.arange(8)).dtype == np.float64


def test_backend_for_device_errors():
    with pytest.raises(ValueError, match=r"device must be 'cpu', 'gpu' or 'cuda:N'; got 'tpu'"):
        B.backend_for_device("tpu")
    if not B.gpu_available():
        with pytest.raises(ValueError, match=r"asks for a GPU"):
            B.backend_for_device("gpu")


def test_library_imports_without_cupy():
    # the package never imports cupy at import time
    import subprocess
    import sys
    code = ("import sys; sys.modules['cupy'] = None; import mfac_linalg as ml, numpy as np; "
            "op = ml.StaticInverseFisher(np.eye(3), 1.0); print(op.device)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "cpu"


@pytest.mark.gpu
@pytest.mark.skipif(not B.gpu_available(), reason="needs CuPy and a CUDA GPU")
def test_mixing_cpu_and_gpu_is_a_type_error(rng):
    import cupy as cp
    op = ml.StaticInverseFisher(cp.asarray(rng.standard_normal((3, 8))), 0.1)
    with pytest.raises(TypeError, match=r"x lives on cpu but the operator lives on gpu"):
        op.matvec(np.ones(8))
    y = op.matvec(cp.ones(8))
    assert isinstance(y, cp.ndarray)


@pytest.mark.gpu
@pytest.mark.skipif(not B.gpu_available(), reason="needs CuPy and a CUDA GPU")
def test_torch_cuda_tensor_in_result_on_same_device(rng):
    torch = pytest.importorskip("torch")
    import cupy as cp
    G = torch.randn(6, 40, device="cuda", dtype=torch.float32)
    op = ml.StaticInverseFisher(G, 0.2)
    assert op.device == f"gpu:{G.device.index}"
    x = torch.randn(40, device="cuda", dtype=torch.float32)
    y = op.matvec(x)
    assert isinstance(y, cp.ndarray) and y.device.id == G.device.index
    ref = ml.StaticInverseFisher(G.cpu().numpy(), 0.2).matvec(x.cpu().numpy())
    assert np.allclose(cp.asnumpy(y), ref, rtol=1e-4, atol=1e-5)
    back = torch.from_dlpack(y)  # and back into torch, zero-copy
    assert back.device == G.device


# -- issue 11 item 10: DLPack and array edge cases -------------------------------------------

def test_masked_array_refused_naming_argument(rng):
    G = np.ma.masked_invalid(np.array([[1.0, np.nan, 2.0], [0.5, 1.0, 3.0]]))
    with pytest.raises(TypeError, match="grads must not be a masked array"):
        ml.StaticInverseFisher(G, 0.1)
    op = ml.StaticInverseFisher(rng.standard_normal((2, 3)), 0.1)
    with pytest.raises(TypeError, match="x must not be a masked array"):
        op.matvec(np.ma.masked_array(np.ones(3), mask=[0, 1, 0]))


def test_ragged_list_named():
    with pytest.raises(ValueError, match="grads must be a rectangular array of numbers"):
        ml.StaticInverseFisher([[1.0, 2.0], [3.0]], 0.1)
    with pytest.raises(TypeError, match="grads must be an array of numbers"):
        ml.StaticInverseFisher([[1.0, "a"], [object(), 2.0]], 0.1)


def test_torch_tensors_requires_grad_and_bfloat16():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    g = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    op = ml.StaticInverseFisher(g, 0.3)                 # detached, zero-copy
    G = g.detach().numpy()
    F = 0.3 * np.eye(7) + G.T @ G / 5
    x = torch.randn(7, dtype=torch.float64, requires_grad=True)
    y = op.matvec(x)
    assert isinstance(y, np.ndarray) and y.dtype == np.float64
    assert np.allclose(y, np.linalg.solve(F, x.detach().numpy()), rtol=1e-12, atol=0)
    assert g.grad is None                                # nothing attached to the graph
    # bfloat16 CPU tensors: NumPy has no bfloat16; the dtype policy promotes to float32
    gb = g.detach().to(torch.bfloat16)
    opb = ml.StaticInverseFisher(gb, 0.3)
    assert opb.dtype == np.float32
    Gb = gb.float().numpy().astype(np.float64)
    Fb = 0.3 * np.eye(7) + Gb.T @ Gb / 5
    xb = torch.ones(7, dtype=torch.bfloat16)
    yb = opb.matvec(xb)
    assert yb.dtype == np.float32
    # float32 results: normwise within 16 eps32 kappa_W (kappa_W = lambda_max(F) / lambda)
    ref = np.linalg.solve(Fb, np.ones(7))
    kappa = np.linalg.eigvalsh(Fb)[-1] / 0.3
    err = np.linalg.norm(yb - ref) / np.linalg.norm(ref)
    assert err <= 16 * np.finfo(np.float32).eps * kappa, (err, kappa)
    # float16 CPU tensors likewise; an integer tensor becomes float64
    assert ml.StaticInverseFisher(g.detach().half(), 0.3).dtype == np.float32
    assert ml.StaticInverseFisher(torch.ones(3, 4, dtype=torch.int32), 0.3).dtype == np.float64
    # a tensor with NaN is refused by name, after the conversion
    bad = torch.randn(3, 4)
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="grads must be finite"):
        ml.StaticInverseFisher(bad, 0.3)


def test_backend_pickles_by_name():
    import copy
    import pickle
    from mfac_linalg import _backend as B
    assert pickle.loads(pickle.dumps(B.CPU)) is B.CPU
    assert copy.deepcopy(B.CPU) is B.CPU
    assert b"numpy" not in pickle.dumps(B.CPU)          # the module never travels


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("mfac_linalg")._backend.gpu_available(),
                    reason="needs CuPy and a CUDA GPU")
def test_gpu_backend_pickles_by_device_id():
    import pickle
    from mfac_linalg import _backend as B
    be = B.backend_for_device("cuda:0")
    twin = pickle.loads(pickle.dumps(be))
    assert twin == be and twin.device_id == 0 and twin.xp is be.xp


@pytest.mark.skipif(np.finfo(np.longdouble).max <= np.finfo(np.float64).max,
                    reason="long double is float64 on this platform")
def test_long_double_beyond_float64_is_named_as_too_large_not_as_nonfinite():
    """A finite long-double input beyond float64's range became inf under the dtype
    policy and was then reported as "must be finite; got NaN or infinity"."""
    import mfac_linalg as ml
    big = np.longdouble("1e400")
    G = np.random.default_rng(0).standard_normal((5, 4))
    op = ml.StaticInverseFisher(G, 0.1)
    for call, name in ((lambda: op.matvec(np.ones(4, np.longdouble) * big), "x"),
                       (lambda: ml.StaticInverseFisher(G.astype(np.longdouble) * big, 0.1),
                        "grads"),
                       (lambda: ml.obs.saliency(np.ones(4, np.longdouble) * big, op), "w")):
        with pytest.raises(ValueError, match=f"{name} is too large for float64: its "
                                             f"{np.dtype(np.longdouble).name} entries overflow"):
            call()
    with pytest.raises(ValueError, match="x must be finite"):
        op.matvec(np.full(4, np.longdouble(np.inf)))
    np.testing.assert_array_equal(op.matvec(np.ones(4, np.longdouble)), op.matvec(np.ones(4)))
