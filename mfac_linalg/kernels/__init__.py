"""Kernels, used only through the backend layer: CuPy (CUDA sources and thin launchers)
and, in ``host.py``, Numba-compiled host passes where Numba is installed."""
