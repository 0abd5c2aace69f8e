"""The registry of operator cases: each operator kind once, with a build function and an
exact oracle (mfac_linalg.testing), for each backend.

A :class:`Case` builds its operator on a device (``"cpu"``, or ``"gpu"`` under
``pytest -m gpu``) from fixed data, through the public API only, and gives the exact
oracle of the matrix the operator represents (never computed by the library):

* static: F⁻¹ of its gradients (inverse_fisher_oracle: mpmath-refined);
* sliding window: F⁻¹ of the gradients held, rounded to the storage dtype, with
  N = window or the count;
* block (WoodFisher): the block diagonal of the blocks' F⁻¹;
* Kronecker builders: the damped approximation M of docs/math.md §4 built with np.kron
  from factors computed here (Γ, A from the inputs; KPSVD-type factors from the SVD
  of the explicitly rearranged R(F)); the oracle is M⁻¹ and ``fisher`` is M;
* block_diag: the block diagonal of its blocks' oracles;
* FisherOperator: F itself.

``protocol_cases(device)`` / ``bad_input_cases`` feed tests/test_protocol.py and
tests/test_bad_input.py.
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
import math
from typing import Callable

import numpy as np
import pytest
import scipy.linalg as sla

import mfac_linalg as ml
from mfac_linalg import testing as mt
from mfac_linalg._backend import gpu_available

EPS64 = np.finfo(np.float64).eps


@dataclasses.dataclass(frozen=True)
class Case:
    """One operator kind: ``build(device, damping=...)`` (the registered damping by
    default; the bad-damping battery passes others) and ``oracle()`` (cached)."""
    name: str
    kind: str
    build: Callable
    oracle_fn: Callable
    dtype: str = "float64"
    devices: tuple = ("cpu", "gpu")

    def oracle(self):
        return _cached_oracle(self.name)

    def oracle_for(self, op):
        """The oracle with the κ of the operator's documented bound: κ_W = λ_max/λ for
        the Woodbury (dual) form, cond(F) for the static operator's primal form."""
        o = self.oracle()
        if getattr(op, "form", None) == "primal":
            o = copy.copy(o)
            o.kappa = getattr(o, "cond", o.kappa)
        return o


_ORACLES = {}


def _cached_oracle(name):
    if name not in _ORACLES:
        _ORACLES[name] = _BY_NAME[name].oracle_fn()
    return _ORACLES[name]


def _on(device, a):
    """Host array -> the device's namespace."""
    if device == "cpu":
        return np.asarray(a)
    import cupy
    return cupy.asarray(a)


def _with_cond(o, G, lam, N=None):
    """Attach cond(F) (the primal form's κ) to an inverse-Fisher oracle."""
    G = np.asarray(G, dtype=np.float64)
    N = G.shape[0] if N is None else N
    s = np.linalg.svd(G, compute_uv=False) ** 2 / N
    low = lam + (s.min() if G.shape[0] >= G.shape[1] else 0.0)
    o.cond = (lam + s.max()) / low
    return o


# -- data ---------------------------------------------------------------------------------

def _grads(seed, m, d, kind="normal"):
    rng = np.random.default_rng(seed)
    G = rng.standard_normal((m, d))
    if kind == "duplicates":
        G = G[np.arange(m) % max(1, d // 2)]          # rank d // 2 < d <= m
    elif kind == "zero_rows":
        G[::2] = 0.0
    elif kind == "scaled":
        G *= 10.0 ** np.linspace(-3, 3, m)[:, None]
    return G


def _top(G, N=None):
    N = G.shape[0] if N is None else N
    return float(np.linalg.norm(G, 2) ** 2 / N)


def _static(name, m, d, kind, ratio, dtype="float64", seed=1, absolute=None):
    G = _grads(seed, m, d, kind).astype(dtype)
    lam = absolute if absolute is not None else ratio * _top(G.astype(np.float64))

    def build(device, damping=lam):
        return ml.StaticInverseFisher(_on(device, G), damping)

    def oracle():
        return _with_cond(mt.inverse_fisher_oracle(G.astype(np.float64), lam), G, lam)

    return Case(name, "static", build, oracle, dtype)


# -- sliding window --------------------------------------------------------------------------

def _engines():
    params = inspect.signature(ml.SlidingWindowInverseFisher).parameters
    return ("cholesky", "explicit") if "engine" in params else (None,)


def _round_to(G, dtype):
    if dtype == "bfloat16":
        from oracles import bf16_bits, bf16_values
        return bf16_values(bf16_bits(G.astype(np.float32))).astype(np.float64)
    return G.astype(dtype).astype(np.float64)


def _sliding(name, dtype, normalize, engine, devices=("cpu", "gpu")):
    dim, window = 10, 6
    n_fed = window + 3 if normalize == "window" else window - 2
    G = _grads(7, n_fed, dim) * np.linspace(0.5, 2.0, n_fed)[:, None]
    lam = 1e-3 * _top(G)

    def build(device, damping=lam):
        kw = {} if engine is None else {"engine": engine}
        win = ml.SlidingWindowInverseFisher(dim, window, damping, dtype=dtype, device=device,
                                            normalize=normalize, **kw)
        for g in G:
            win.update(_on(device, g))
        return win

    def oracle():
        held = _round_to(G[-window:], dtype)
        N = window if normalize == "window" else held.shape[0]
        o = mt.inverse_fisher_oracle(held, lam, N=N)
        if engine == "explicit":
            # docs/sliding.md, Accuracy: the explicit inverse carries a relative error of
            # about eps64 cond(C)^2 between refreshes, amplified by kappa_W;
            # C = N lam I + G_h G_h^T over the window's m slots (empty ones are zero)
            s = np.linalg.eigvalsh(held @ held.T)
            s = np.concatenate([s, np.zeros(window - held.shape[0])])
            condC = (N * lam + s.max()) / (N * lam + max(s.min(), 0.0))
            o.model_error = EPS64 * condC ** 2
        return o

    return Case(name, "sliding", build, oracle, dtype, devices)


def _sliding_from_gradients(name, dtype, window):
    """A window set up in one call (``from_gradients``): a full window of G's rows."""
    G = _grads(9, 8, 10) * np.linspace(0.5, 2.0, 8)[:, None]
    window = window or G.shape[0]
    lam = 1e-3 * _top(G)

    def build(device, damping=lam):
        return ml.SlidingWindowInverseFisher.from_gradients(_on(device, G), damping,
                                                            window=window, dtype=dtype)

    def oracle():
        return mt.inverse_fisher_oracle(_round_to(G[-window:], dtype), lam, N=window)

    return Case(name, "sliding", build, oracle, dtype)


# -- block (WoodFisher) --------------------------------------------------------------------

def _block(name, m, d, sizes, ratio):
    G = _grads(3, m, d)
    lam = ratio * _top(G)

    def build(device, damping=lam):
        return ml.BlockInverseFisher(_on(device, G), damping, blocks=list(sizes))

    def oracle():
        offs = np.concatenate([[0], np.cumsum(sizes)])
        return mt.block_diag_oracle([mt.inverse_fisher_oracle(G[:, a:b], lam, N=m)
                                     for a, b in zip(offs[:-1], offs[1:])])

    return Case(name, "block", build, oracle)


# -- Kronecker builders ---------------------------------------------------------------------

_N_SAMPLES, _D_IN, _D_OUT = 40, 4, 3


def _layer(bias=False):
    rng = np.random.default_rng(11)
    a = rng.standard_normal((_N_SAMPLES, _D_IN)) * np.array([1.0, 0.7, 1.6, 0.4])
    g = rng.standard_normal((_N_SAMPLES, _D_OUT)) * np.array([1.2, 0.5, 0.9])
    # a little correlation between a and g makes F far from a single Kronecker product
    g[:, 0] += 0.8 * a[:, 1] * a[:, 2]
    A = np.concatenate([a, np.ones((_N_SAMPLES, 1))], axis=1) if bias else a
    return a, g, A


def _pi_split(Bm, Cm, lam):
    """lam_B lam_C = lam, lam_B / lam_C = (tr B / d_B) / (tr C / d_C) (docs of the builders)."""
    tb, tc = np.trace(Bm) / Bm.shape[0], np.trace(Cm) / Cm.shape[0]
    r = math.sqrt(lam)
    if tb <= 0 or tc <= 0:
        return r, r
    pi = math.sqrt(tb / tc)
    return r * pi, r / pi


def _abs_sym(M):
    """|M| for symmetric M (the 'abs' screening of factor eigenvalues)."""
    s, U = np.linalg.eigh((M + M.T) / 2)
    return (U * np.abs(s)) @ U.T


def _rearranged(A, g):
    """R(F) = (1/n) X^T Y, X rows vec(g g^T), Y rows vec(a a^T) (docs/math.md §4), dense."""
    n = A.shape[0]
    X = np.einsum("ni,nj->nij", g, g).reshape(n, -1)
    Y = np.einsum("ni,nj->nij", A, A).reshape(n, -1)
    return X.T @ Y / n


def _triples(R, k, d_out, d_in):
    """Top k triples of R by LAPACK SVD as symmetric factors (B_i, C_i), tr(B_i) >= 0,
    and the relative gap that bounds their accuracy."""
    U, s, Vt = np.linalg.svd(R)
    terms = []
    for i in range(k):
        Bm = U[:, i].reshape(d_out, d_out) * math.sqrt(s[i])
        Cm = Vt[i].reshape(d_in, d_in) * math.sqrt(s[i])
        Bm, Cm = (Bm + Bm.T) / 2, (Cm + Cm.T) / 2
        if np.trace(Bm) < 0:
            Bm, Cm = -Bm, -Cm
        terms.append((Bm, Cm))
    s = np.concatenate([s, [0.0]])
    gap = min(s[i] - s[i + 1] for i in range(k)) / s[0]
    if k > 1:
        gap = min(gap, min(s[i - 1] - s[i] for i in range(1, k)) / s[0])
    return terms, gap, s[0]


def _two_term_abs(B1, C1, B2, C2, lam):
    """The matrix the two-term builders invert (indefinite="abs", split damping):
    (B1 + lB I) kron (C1 + lC I) + |B2|_{B1'} kron |C2|_{C1'}, where |B2|_{B1'} keeps B2's
    generalized eigenvectors w.r.t. B1' = B1 + lB I and takes |s| of its generalized
    eigenvalues (scipy.linalg.eigh(B2, B1'))."""
    lb, lc = _pi_split(B1, C1, lam)
    out = []
    for F1, F2, sh in ((B1, B2, lb), (C1, C2, lc)):
        F1s = F1 + sh * np.eye(F1.shape[0])
        s, K = sla.eigh(F2, F1s)                 # K^T F1s K = I, K^T F2 K = diag(s)
        out.append((F1s, F1s @ (K * np.abs(s)) @ K.T @ F1s))
    (B1s, B2a), (C1s, C2a) = out
    return [(B1s, C1s), (B2a, C2a)]


def _kron_case(name, method, *, bias=False, **kw):
    a, g, A = _layer(bias)
    lam = 1e-2
    d_out, d_in = g.shape[1], A.shape[1]
    builder = getattr(ml, method.split("-")[0])
    if method == "lanczos" and not hasattr(ml, "lanczos"):
        return None

    def build(device, damping=lam):
        return builder(_on(device, a), _on(device, g), damping, bias=bias, **kw)

    def oracle():
        n = A.shape[0]
        Gam, Aa = g.T @ g / n, A.T @ A / n
        model = 0.0
        if method == "kfac":
            if kw.get("damping_mode", "pi") == "exact":
                return mt.kronecker_oracle([(Gam, Aa)], shift=lam)
            lg, la = _pi_split(Gam, Aa, lam)
            return mt.kronecker_oracle([(Gam + lg * np.eye(d_out), Aa + la * np.eye(d_in))])
        if method == "ekfac":
            sG, UG = sla.eigh(Gam)
            sA, UA = sla.eigh(Aa)
            S = ((g @ UG) ** 2).T @ ((A @ UA) ** 2) / n
            gaps = [np.diff(sG).min() / sG.max(), np.diff(sA).min() / sA.max()]
            o = mt.kronecker_oracle(basis=(UG, UA, S), shift=lam)
            o.model_error = o.fisher.model_error = EPS64 / min(gaps)
            return o
        R = _rearranged(A, g)
        tol = 1e-12                              # the builders' default tolerance
        if method == "kpsvd":
            (Bm, Cm), = _triples(R, 1, d_out, d_in)[0]
            gap = _triples(R, 1, d_out, d_in)[1]
            Bm, Cm = _abs_sym(Bm), _abs_sym(Cm)
            if kw.get("damping_mode", "exact") == "exact":
                o = mt.kronecker_oracle([(Bm, Cm)], shift=lam)
            else:
                lb, lc = _pi_split(Bm, Cm, lam)
                o = mt.kronecker_oracle([(Bm + lb * np.eye(d_out), Cm + lc * np.eye(d_in))])
        else:
            if method == "kfac_corrected":
                Rres = R - np.outer(Gam.reshape(-1), Aa.reshape(-1))
                (B2, C2), = _triples(Rres, 1, d_out, d_in)[0]
                gap = _triples(Rres, 1, d_out, d_in)[1]
                terms = [(Gam, Aa), (B2, C2)]
            else:                                  # deflation, lanczos: top two triples
                terms, gap, _ = _triples(R, 2, d_out, d_in)
            o = mt.kronecker_oracle(_two_term_abs(*terms[0], *terms[1], lam))
        # the documented accuracy of iterated factors: about tol / gap of sigma_1
        sig1 = np.linalg.svd(R, compute_uv=False)[0]
        model = tol / gap * sig1 / np.linalg.norm(o.fisher.dense(), 2)
        o.model_error = o.fisher.model_error = model
        return o

    return Case(name, "kronecker", build, oracle)


# -- compositions ------------------------------------------------------------------------

def _block_diag_case():
    parts = [_BY_NAME["static-wide-f64"], _BY_NAME["kfac-pi"]]

    def build(device, damping=None):
        ops = [p.build(device) if damping is None else p.build(device, damping=damping)
               for p in parts]
        return ml.block_diag(ops)

    def oracle():
        return mt.block_diag_oracle([p.oracle() for p in parts])

    return Case("block_diag", "block_diag", build, oracle)


def _fisher_case():
    base = _BY_NAME["static-wide-f64"]

    def build(device, damping=None):
        op = base.build(device) if damping is None else base.build(device, damping=damping)
        return op.fisher()

    return Case("fisher-static", "fisher", build, lambda: base.oracle().fisher)


def _all_cases():
    cases = [
        _static("static-wide-f64", 5, 14, "normal", 1e-3),
        _static("static-wide-f32", 5, 14, "normal", 1e-2, dtype="float32"),
        _static("static-tall-f64", 24, 8, "normal", 1e-2),
        _static("static-tall-f32", 24, 8, "normal", 1e-1, dtype="float32"),
        _static("static-tall-duplicates-f64", 24, 8, "duplicates", None, absolute=1e-8),
        _static("static-single-f64", 1, 7, "normal", 1e-2),
        _static("static-zero-rows-f64", 6, 9, "zero_rows", 1e-3),
        _static("static-scaled-f64", 6, 10, "scaled", 1e-6),
    ]
    for dtype in ("float64", "float32", "float16", "bfloat16"):
        devices = ("cpu", "gpu") if dtype in ("float64", "float32") else ("gpu",)
        for normalize in ("window", "count"):
            for engine in _engines():
                suffix = "" if engine is None else f"-{engine}"
                cases.append(_sliding(f"sliding-{dtype}-{normalize}{suffix}", dtype, normalize,
                                      engine, devices))
    cases += [
        _sliding_from_gradients("sliding-from_gradients-float64", "float64", 8),
        _sliding_from_gradients("sliding-from_gradients-float32", "float32", None),
        _block("block-woodbury", 5, 10, (4, 4, 2), 1e-3),
        _block("block-explicit", 8, 10, (3, 7), 1e-3),
    ]
    kron = [
        _kron_case("kfac-pi", "kfac"),
        _kron_case("kfac-exact", "kfac", damping_mode="exact"),
        _kron_case("kfac-bias", "kfac", bias=True),
        _kron_case("ekfac", "ekfac"),
        _kron_case("kpsvd", "kpsvd"),
        _kron_case("kpsvd-pi", "kpsvd", damping_mode="pi"),
        _kron_case("deflation", "deflation"),
        _kron_case("kfac_corrected", "kfac_corrected"),
        _kron_case("lanczos", "lanczos"),
    ]
    cases += [c for c in kron if c is not None]
    return cases


_BY_NAME = {}
for _c in _all_cases():
    _BY_NAME[_c.name] = _c
for _c in (_block_diag_case(), _fisher_case()):
    _BY_NAME[_c.name] = _c

CASES = list(_BY_NAME.values())


def _device_param(case, device):
    marks = []
    if device == "gpu":
        marks = [pytest.mark.gpu,
                 pytest.mark.skipif(not gpu_available(), reason="needs CuPy and a CUDA GPU")]
    return pytest.param(case, device, id=f"{case.name}-{device}", marks=marks)


def case_params(kinds=None):
    """pytest params (case, device) for every case and device (GPU ones marked)."""
    return [_device_param(c, dev) for c in CASES for dev in ("cpu", "gpu")
            if dev in c.devices and (kinds is None or c.kind in kinds)]
