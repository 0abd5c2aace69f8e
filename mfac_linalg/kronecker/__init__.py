r"""Kronecker-factored approximations of one layer's empirical Fisher (docs/math.md §4, §8).

A layer W (d_out x d_in), per-sample inputs and output gradients (2-D (n, d) for a dense
layer, 3-D (n, T, d) for T positions per sample: convolution patches, sequence tokens).  The
per-sample gradient DW_n = G_n^T A_n is flattened row-major (vec(DW) = kron(g, a) for T = 1;
``[W | b]`` with ``bias=True``) and

    F = (1/n) sum_n vec(DW_n) vec(DW_n)^T          ((d_out d_in)^2: never formed)

is approximated by K-FAC, EKFAC, the best Kronecker product (KPSVD), the best sum of two
(deflation; Lanczos, the same target by bidiagonalization) or K-FAC plus the best Kronecker
product of its residual (K-FAC corrected).  Every inverse has the form
M^{-1} vec(V) = vec(K_B [(K_B^T V K_C) ./ S] K_C^T), one operator class for them all.

Modules: :mod:`.operator` (the operators), :mod:`.builders`, :mod:`.rearranged` (R(F)
matrix-free, subspace iteration, Golub-Kahan-Lanczos), :mod:`.conv` (per-sample positions).
"""
from .builders import (deflation, ekfac, fisher_error, kfac, kfac_corrected, kpsvd,
                       kronecker_terms, lanczos)
from .conv import LayerData, layer_data
from .operator import BlockDiagonal, KroneckerFisher, KroneckerInverse, block_diag
from .rearranged import ConvergenceWarning


def rearranged_products(A, G):
    """(R, RT): R(F) vec(Q) and R(F)^T vec(P), matrix-free, for stacks of matrices.

    ``A`` (n, d_in) or (n, T, d_in) and ``G`` (n, d_out) or (n, T, d_out), float64 NumPy or
    CuPy arrays.  ``R(Q)``: (k, d_in, d_in) -> (k, d_out, d_out); ``RT(P)`` the other way;
    O(k n T (d_in^2 + d_out^2) + k n T^2 (d_in + d_out)) each (docs/math.md §8).
    """
    layer = layer_data(A, G, False)
    return layer.r_product, layer.rt_product


__all__ = ["kfac", "ekfac", "kpsvd", "deflation", "lanczos", "kfac_corrected",
           "kronecker_terms", "fisher_error", "block_diag", "KroneckerInverse",
           "KroneckerFisher", "BlockDiagonal", "ConvergenceWarning", "LayerData", "layer_data",
           "rearranged_products"]
