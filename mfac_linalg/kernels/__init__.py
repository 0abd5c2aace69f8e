"""CuPy kernels (CUDA sources and thin launchers), used only through the backend layer."""
