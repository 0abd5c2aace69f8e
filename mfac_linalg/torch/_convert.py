"""Conversions between PyTorch tensors and the library's arrays (NumPy / CuPy).

Tensors go in through DLPack (zero-copy, on their own device, see
:mod:`mfac_linalg._backend`); results come back as tensors on the caller's device
and in the caller's dtype: ``torch.from_numpy`` / ``torch.from_dlpack`` (zero-copy),
then one cast when the dtypes differ.
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["device_spec", "to_torch", "is_tensor", "tensor_dtype_name"]


def is_tensor(x):
    return isinstance(x, torch.Tensor)


def device_spec(device):
    """The library's device string for a torch device: ``"cpu"`` or ``"cuda:N"``."""
    device = torch.device(device)
    if device.type == "cpu":
        return "cpu"
    if device.type == "cuda":
        return f"cuda:{device.index if device.index is not None else torch.cuda.current_device()}"
    raise ValueError(f"device must be a CPU or CUDA device; got {device}")


def to_torch(arr, *, dtype=None, device=None):
    """A library array (NumPy or CuPy) as a tensor, zero-copy where possible.

    ``dtype`` / ``device``: cast / move afterwards (only when they differ).  A
    read-only NumPy array is copied (PyTorch tensors are always writable).
    """
    if isinstance(arr, np.ndarray):
        if not arr.flags.writeable:
            arr = arr.copy()
        t = torch.from_numpy(np.ascontiguousarray(arr) if arr.ndim else np.array(arr))
    elif isinstance(arr, (float, int)):
        t = torch.tensor(arr)
    else:
        t = torch.from_dlpack(arr)
    if device is not None and t.device != torch.device(device):
        t = t.to(device)
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    return t


def tensor_dtype_name(dtype):
    """``torch.float32`` -> ``"float32"``."""
    return str(dtype).replace("torch.", "")


def _tensor_state(state):
    """A library state dict (NumPy arrays, NumPy and Python scalars) with every array as a
    CPU tensor and every scalar as a plain Python value: ``torch.load(weights_only=True)``
    accepts it."""
    out = {}
    for k, v in state.items():
        if isinstance(v, np.ndarray):
            out[k] = torch.from_numpy(np.array(v, copy=True))
        elif isinstance(v, np.generic):
            out[k] = v.item()
        elif isinstance(v, dict):
            out[k] = _tensor_state(v)
        else:
            out[k] = v
    return out


def _numpy_state(state):
    """The inverse of :func:`_tensor_state`: tensors back to (host) NumPy arrays."""
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict; got {type(state).__name__}")
    out = {}
    for k, v in state.items():
        if isinstance(v, torch.Tensor):
            out[k] = v.detach().cpu().numpy()
        elif isinstance(v, dict):
            out[k] = _numpy_state(v)
        else:
            out[k] = v
    return out
