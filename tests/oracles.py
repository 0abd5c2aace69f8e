"""References for the module tests (docs/math.md §5) and helpers to compare with them.

Dense float64 references (``dense_fisher``, ``dense_inverse``) are exact only for
well-conditioned F: a dense inverse is itself off by about eps·cond(F).  Where that
matters use the exact oracles (``exact_inverse``, or mfac_linalg.testing directly,
as tests/registry.py does): iterative refinement with residuals computed exactly in
mpmath, exact to one rounding whatever cond(F).
"""
import numpy as np
import scipy.linalg as sla

from mfac_linalg import _backend as B

EPS64 = np.finfo(np.float64).eps
EPS32 = np.finfo(np.float32).eps


def bf16_bits(g32):
    """The raw bfloat16 words of a float32 NumPy array, rounded to nearest even (as the
    GPU stores them)."""
    bits = np.asarray(g32, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def bf16_values(raw):
    """float32 values of raw bfloat16 words."""
    return (raw.astype(np.uint32) << 16).view(np.float32)


def dense_fisher(G, damping, N=None):
    """F = damping I + G^T G / N in float64 (N = number of rows by default)."""
    G = np.asarray(B.to_host(G), dtype=np.float64)
    N = G.shape[0] if N is None else N
    return damping * np.eye(G.shape[1]) + G.T @ G / N


def dense_inverse(F):
    """F^{-1} through scipy.linalg (Cholesky-based inverse of an SPD matrix).

    Not exact: its error is about eps·cond(F) (use ``exact_inverse`` for ill-conditioned F).
    """
    c = sla.cho_factor(F, lower=True)
    return sla.cho_solve(c, np.eye(F.shape[0]))


def exact_inverse(G, damping, N=None):
    """F^{-1} for F = damping I + G^T G / N, exact to one rounding (mpmath-refined; see
    mfac_linalg.testing.inverse_fisher_oracle), as a read-only dense float64 array."""
    from mfac_linalg.testing import inverse_fisher_oracle
    return inverse_fisher_oracle(np.asarray(B.to_host(G), dtype=np.float64), damping,
                                 N=N).dense()


def kappa_w(G, damping, N=None):
    """kappa_W = lambda_max(F) / lambda, the Woodbury form's error factor
    (docs/math.md §1, §7)."""
    G = np.asarray(B.to_host(G), dtype=np.float64)
    N = G.shape[0] if N is None else N
    return 1.0 + (np.linalg.norm(G, 2) ** 2 / N if G.size else 0.0) / damping


def cond(F):
    w = np.linalg.eigvalsh(F)
    return float(w[-1] / w[0])


def rel_err(got, ref):
    """Norm-wise relative error ||got - ref|| / ||ref|| (float64, on the host)."""
    got = np.asarray(B.to_host(got), dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    den = np.linalg.norm(ref)
    return float(np.linalg.norm(got - ref) / (den if den > 0 else 1.0))


def float64_tol(kappa):
    """Tolerance for float64 results against a *dense* float64 reference: 1e-10 plus
    100 eps kappa, kappa = cond(F) (docs/static.md, "Accuracy").

    The allowance covers the dense reference's own error; against an exact oracle
    (``exact_inverse``) the bound is a small multiple of eps·kappa_W (``kappa_w``)."""
    return 1e-10 + 100 * EPS64 * kappa


def float32_tol(kappa, m=1):
    """Tolerance for float32-stored operators against the float64 oracle (docs/static.md)."""
    return 50 * EPS32 * kappa * np.sqrt(max(m, 1))


def gradients(rng, m, d, kind="normal", scale=1.0):
    """Random gradient matrices, including the awkward kinds."""
    G = rng.standard_normal((m, d))
    if kind == "duplicate" and m > 1:
        G[1::2] = G[0]
    elif kind == "zero":
        G[rng.random(m) < 0.5] = 0.0
    elif kind == "lowrank" and m > 1:
        r = max(1, min(m, d) // 3)
        G = rng.standard_normal((m, r)) @ rng.standard_normal((r, d))
    elif kind == "spread":
        G *= np.logspace(-3, 1, d)[None, :]
    return G * scale


def damping_for(G, ratio, N=None):
    """A damping that is ``ratio`` times the largest eigenvalue of G^T G / N (or 1 if G = 0)."""
    N = G.shape[0] if N is None else N
    top = np.linalg.norm(G, 2) ** 2 / N if G.size else 0.0
    return ratio * (top if top > 0 else 1.0)
