"""NVRTC compilation of a kernel source, shared by the kernel modules.

``function(source, name)`` is the kernel ``name`` of the module compiled from
``source`` (once per source, cached by CuPy on disk as well), looked up once per
device.
"""
from __future__ import annotations

import functools

__all__ = ["function"]


def function(source, name):
    """The kernel ``name`` of ``source`` for the current CUDA device."""
    import cupy as cp
    return _function(source, name, cp.cuda.runtime.getDevice())


@functools.lru_cache(maxsize=None)
def _module(source):
    import cupy as cp
    return cp.RawModule(code=source, options=("-std=c++17",))


@functools.lru_cache(maxsize=None)
def _function(source, name, device):
    return _module(source).get_function(name)
