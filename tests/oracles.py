"""Dense float64 references (MATH.md section 5) and helpers to compare against them."""
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
    """F^{-1} through scipy.linalg (Cholesky-based inverse of an SPD matrix)."""
    c = sla.cho_factor(F, lower=True)
    return sla.cho_solve(c, np.eye(F.shape[0]))


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
    """Tolerance for float64 results: 1e-10 plus the conditioning floor 100 eps kappa.

    kappa is cond(F) (docs/static.md, "Accuracy")."""
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
