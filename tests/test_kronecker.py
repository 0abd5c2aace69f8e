"""The Kronecker family against exact oracles: np.kron, explicit dense F, the SVD of the explicit
rearranged R(F) (docs/math.md §4, §5, §8).  Never against the library's own fisher().todense()."""
import copy
import math
import pickle
import warnings

import numpy as np
import pytest
import scipy.linalg as sla
from hypothesis import given, strategies as st
from scipy.sparse.linalg import cg

import mfac_linalg as ml
import mfac_linalg.kronecker as K

from battery import check_operator
from oracles import cond, float64_tol, rel_err


# -- oracles ----------------------------------------------------------------------------------

def layer(rng, n, d_in, d_out, bias=False, T=None):
    """Random layer data; F built explicitly with np.kron from the per-sample (position) outer
    products: F = (1/n) sum_n sum_{t,s} (g_t g_s^T) kron (a_t a_s^T)."""
    shape = (n,) if T is None else (n, T)
    A = rng.standard_normal(shape + (d_in,)) * rng.uniform(0.3, 2.0, d_in)
    G = rng.standard_normal(shape + (d_out,)) * rng.uniform(0.3, 2.0, d_out)
    A3 = A[:, None] if T is None else A
    G3 = G[:, None] if T is None else G
    Ab = np.concatenate([A3, np.ones(A3.shape[:2] + (1,))], axis=2) if bias else A3
    D = d_out * Ab.shape[2]
    F = np.zeros((D, D))
    for gs, as_ in zip(G3, Ab):
        for gt, at in zip(gs, as_):
            for gu, au in zip(gs, as_):
                F += np.kron(np.outer(gt, gu), np.outer(at, au))
    return A, G, Ab, G3, F / n


def kfac_factors(Ab, G3):
    """Gamma = (1/n) sum_{n,t} g g^T, A = (1/(n T)) sum_{n,t} a a^T (the expand convention)."""
    n, T = Ab.shape[:2]
    a2, g2 = Ab.reshape(n * T, -1), G3.reshape(n * T, -1)
    return g2.T @ g2 / n, a2.T @ a2 / (n * T)


def rearranged(F, d_out, d_in):
    R = np.zeros((d_out * d_out, d_in * d_in))
    for i in range(d_out):
        for j in range(d_out):
            R[i * d_out + j] = F[i * d_in:(i + 1) * d_in, j * d_in:(j + 1) * d_in].ravel()
    return R


def sym_projector(d):
    S = np.zeros((d * d, d * d))
    for i in range(d):
        for j in range(d):
            S[i * d + j, j * d + i] = 1
    return (np.eye(d * d) + S) / 2


def svd_terms(R, d_out, d_in, k):
    """The top-k Kronecker terms of R restricted to symmetric matrices, from numpy's SVD."""
    Rs = sym_projector(d_out) @ R @ sym_projector(d_in)
    u, s, vt = np.linalg.svd(Rs)
    terms = [(math.sqrt(s[i]) * u[:, i].reshape(d_out, d_out),
              math.sqrt(s[i]) * vt[i].reshape(d_in, d_in)) for i in range(k)]
    return terms, s


def factor_error(terms, ref, s1, s=None):
    """max_i max(||B_i - B_ref||, ||C_i - C_ref||) / sqrt(sigma_1), joint sign aligned.

    A triple whose reference sigma_i is numerically zero (<= 1e-12 sigma_1: R has rank < i)
    has no defined vectors; there the term itself must vanish, ||B_i|| ||C_i|| <= 1e-12 sigma_1.
    """
    worst = 0.0
    for i, ((Bm, Cm), (Br, Cr)) in enumerate(zip(terms, ref)):
        if s is not None and s[i] <= 1e-12 * s1:
            assert np.linalg.norm(Bm) * np.linalg.norm(Cm) <= 1e-12 * s1
            continue
        sg = 1.0 if (Bm * Br).sum() + (Cm * Cr).sum() >= 0 else -1.0
        worst = max(worst, np.linalg.norm(Bm - sg * Br), np.linalg.norm(Cm - sg * Cr))
    return worst / math.sqrt(s1)


def pi_split(Bm, Cm, lam):
    tb, tc = np.trace(Bm) / len(Bm), np.trace(Cm) / len(Cm)
    pi = math.sqrt(tb / tc)
    return math.sqrt(lam) * pi, math.sqrt(lam) / pi


def damped_dense(op, lam):
    """The documented damped approximation M built with np.kron from op.factors."""
    f = op.factors
    if op.method == "ekfac":
        UG, UA, S = f
        U = np.kron(UG, UA)
        return U @ np.diag(S.ravel() + lam) @ U.T
    if len(f) == 1:
        (Bm, Cm), = f
        if getattr(op, "damping_mode", op.info.get("damping_mode")) == "pi":
            lb, lc = pi_split(Bm, Cm, lam)
            return np.kron(Bm + lb * np.eye(len(Bm)), Cm + lc * np.eye(len(Cm)))
        return np.kron(Bm, Cm) + lam * np.eye(Bm.size and len(Bm) * len(Cm))
    (B1, C1), (B2, C2) = f
    if op.info["first_term_damping"] == "split":
        lb, lc = pi_split(B1, C1, lam)
    else:
        lb = lc = lam
    return np.kron(B1 + lb * np.eye(len(B1)), C1 + lc * np.eye(len(C1))) + np.kron(B2, C2)


def abs_dense(op, lam):
    """M for indefinite='abs', from scipy's generalised eigh (a different code path):
    (K_B^{-T} kron K_C^{-T}) diag(1 + |s_B||s_C|) (K_B^{-1} kron K_C^{-1})."""
    (B1, C1), (B2, C2) = op.factors
    lb, lc = pi_split(B1, C1, lam)
    sB, KB = sla.eigh(B2, B1 + lb * np.eye(len(B1)))
    sC, KC = sla.eigh(C2, C1 + lc * np.eye(len(C1)))
    Ki = np.linalg.inv(np.kron(KB, KC))
    return Ki.T @ np.diag((1 + np.abs(sB)[:, None] * np.abs(sC)[None, :]).ravel()) @ Ki


BUILDERS = [ml.kfac, ml.ekfac, ml.kpsvd, ml.deflation, ml.lanczos, ml.kfac_corrected]
ITERATIVE = [ml.kpsvd, ml.deflation, ml.lanczos, ml.kfac_corrected]

layers = st.fixed_dictionaries({
    "n": st.integers(1, 30), "d_in": st.integers(1, 5), "d_out": st.integers(1, 4),
    "bias": st.booleans(), "seed": st.integers(0, 2**31)})


# -- inverses, forward operators and the protocol ---------------------------------------------

@given(layers, st.sampled_from([1e-3, 1e-1, 1.0]))
def test_inverses_match_np_kron(lay, lam):
    rng = np.random.default_rng(lay["seed"])
    A, G, Ab, G3, F = layer(rng, lay["n"], lay["d_in"], lay["d_out"], lay["bias"])
    for build in BUILDERS:
        kw = {"indefinite": "clip"} if build in (ml.deflation, ml.lanczos, ml.kfac_corrected) \
            else {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            op = build(A, G, lam, bias=lay["bias"], **kw)
        if op.clipped:
            continue             # M was changed where it is not positive definite: see below
        M = damped_dense(op, lam)
        if build is ml.kfac:     # the K-FAC factors themselves, from the data
            Gam, Aa = kfac_factors(Ab, G3)
            assert rel_err(np.kron(*op.factors[0]), np.kron(Gam, Aa)) < 1e-13
        check_operator(op, np.linalg.inv(M), float64_tol(cond(M)), rng,
                       logdet=np.linalg.slogdet(M)[1], forward=M, forward_tol=float64_tol(cond(M)))


def test_fisher_matvec_and_cg_for_every_builder(rng):
    """Issue 11 item 1: fisher().matvec works, and SciPy's cg solves with fisher().to_scipy()."""
    A, G, Ab, G3, F = layer(rng, 40, 4, 3, bias=True)
    b = rng.standard_normal(15)
    for build in BUILDERS:
        op = build(A, G, 0.5, bias=True)
        M = abs_dense(op, 0.5) if op.method in ("deflation", "lanczos", "kfac_corrected") \
            else damped_dense(op, 0.5)
        f = op.fisher()
        assert rel_err(f.matvec(b), M @ b) < 1e-12
        assert f.matvec(b.reshape(3, 5)).shape == (3, 5)
        x, info = cg(f.to_scipy(), b, rtol=1e-13, maxiter=500)
        assert info == 0 and rel_err(x, np.linalg.solve(M, b)) < 1e-9
        assert rel_err(op @ b, np.linalg.solve(M, b)) < 1e-11
        assert f.inverse() is op and isinstance(op.inverse(), type(f))


def test_kfac_exact_damping_vs_kron(rng):
    A, G, Ab, G3, F = layer(rng, 30, 4, 3)
    op = ml.kfac(A, G, 0.05, damping_mode="exact")
    Gam, Aa = G.T @ G / 30, A.T @ A / 30
    M = np.kron(Gam, Aa) + 0.05 * np.eye(12)
    x = rng.standard_normal(12)
    assert rel_err(op @ x, np.linalg.solve(M, x)) < 1e-12
    Y = op.matvec(x.reshape(3, 4))             # (d_out, d_in) matrices go in and come out
    assert Y.shape == (3, 4) and rel_err(Y.ravel(), np.linalg.solve(M, x)) < 1e-12
    assert rel_err(op.todense(), np.linalg.inv(M)) < 1e-12


def test_one_sample_kfac_is_exact(rng):
    A, G, Ab, G3, F = layer(rng, 1, 3, 2)
    op = ml.kfac(A, G, 0.1)
    assert rel_err(np.kron(*op.factors[0]), F) < 1e-14
    assert ml.fisher_error(op, A, G) < 1e-7
    assert ml.fisher_error(op, A, G, kind="spectrum") < 1e-13


def test_ekfac_scaling_and_error_below_kfac(rng):
    for bias in (False, True):
        A, G, Ab, G3, F = layer(rng, 25, 4, 3, bias)
        op = ml.ekfac(A, G, 0.1, bias=bias)
        UG, UA, S = op.factors
        Q = np.kron(UG, UA)
        assert rel_err(S.ravel(), np.diag(Q.T @ F @ Q)) < 1e-12     # S* = diag(Q^T F Q)
        assert ml.fisher_error(op, A, G, bias=bias) <= \
            ml.fisher_error(ml.kfac(A, G, 0.1, bias=bias), A, G, bias=bias) + 1e-12


# -- damping and indefinite second terms --------------------------------------------------

def test_kpsvd_damping_modes_vs_kron(rng):
    A, G, Ab, G3, F = layer(rng, 50, 4, 3)
    (Bm, Cm), = svd_terms(rearranged(F, 3, 4), 3, 4, 1)[0]
    if np.trace(Bm) < 0:
        Bm, Cm = -Bm, -Cm
    x = rng.standard_normal(12)
    lb, lc = pi_split(Bm, Cm, 0.01)
    for mode, M in (("exact", np.kron(Bm, Cm) + 0.01 * np.eye(12)),
                    ("pi", np.kron(Bm + lb * np.eye(3), Cm + lc * np.eye(4)))):
        op = ml.kpsvd(A, G, 0.01, damping_mode=mode)
        assert rel_err(op @ x, np.linalg.solve(M, x)) < 1e-10, mode
        assert rel_err(op.fisher() @ x, M @ x) < 1e-10, mode
    assert lb * lc == pytest.approx(0.01, rel=1e-14)


def test_two_term_first_term_damping_vs_kron(rng):
    A, G, Ab, G3, F = layer(rng, 50, 4, 3)
    x = rng.standard_normal(12)
    for ftd in ("split", "full"):
        for build in (ml.deflation, ml.lanczos, ml.kfac_corrected):
            op = build(A, G, 0.3, first_term_damping=ftd, indefinite="clip")
            assert op.clipped == 0
            M = damped_dense(op, 0.3)
            assert rel_err(op.fisher() @ x, M @ x) < 1e-12
            assert rel_err(op @ x, np.linalg.solve(M, x)) < 1e-10
            assert abs(op.logdet() - np.linalg.slogdet(M)[1]) < 1e-10 * abs(np.linalg.slogdet(M)[1])


def test_indefinite_abs_is_the_default_and_never_blows_up(rng):
    """The paper's 1 + |s_B||s_C| (>= 1): ||M^{-1}|| <= 1/(lam_B lam_C) = 1/lam; against an
    oracle from scipy's generalised eigh."""
    A, G, Ab, G3, F = layer(rng, 60, 4, 3)
    lam = 1e-4
    for build in (ml.deflation, ml.lanczos, ml.kfac_corrected):
        op = build(A, G, lam)
        M = abs_dense(op, lam)
        assert rel_err(op.todense(), np.linalg.inv(M)) < 1e-9
        assert np.linalg.norm(op.todense(), 2) <= (1 + 1e-9) / lam
        assert op.info["indefinite"] == "abs"


def test_indefinite_clip_and_raise(rng):
    """A second term that makes M indefinite: 'raise' refuses, 'clip' floors and warns,
    'abs' stays within 1/lam."""
    from mfac_linalg.kronecker.builders import _two_term_inverse
    A, G, Ab, G3, F = layer(rng, 30, 3, 3)
    Gam, Aa = G.T @ G / 30, A.T @ A / 30
    terms = [(Gam, Aa), (-10 * np.eye(3), np.eye(3))]
    with pytest.raises(ValueError, match="not positive definite"):
        _two_term_inverse("t", terms, 0.01, ml._backend.CPU, {}, "raise", "split")
    with pytest.warns(RuntimeWarning, match="raised to it"):
        op = _two_term_inverse("t", terms, 0.01, ml._backend.CPU, {}, "clip", "split")
    assert op.clipped > 0 and np.all(np.isfinite(op.todense()))
    assert np.linalg.norm(op.todense(), 2) > 1e3 / 0.01           # the blow-up 'abs' avoids
    op = _two_term_inverse("t", terms, 0.01, ml._backend.CPU, {}, "abs", "split")
    assert op.clipped > 0 and np.linalg.norm(op.todense(), 2) <= (1 + 1e-9) / 0.01


# -- fisher_error -----------------------------------------------------------------------------

def undamped(op):
    if op.method == "ekfac":
        UG, UA, S = op.factors
        U = np.kron(UG, UA)
        return U @ np.diag(S.ravel()) @ U.T
    return sum(np.kron(b, c) for b, c in op.factors)


def spectrum_error(F, Ft):
    f = np.sort(np.abs(np.linalg.eigvalsh(F)))[::-1]
    t = np.sort(np.abs(np.linalg.eigvalsh(Ft)))[::-1]
    return np.linalg.norm(f - t) / np.linalg.norm(f)


@given(layers)
def test_fisher_error_matches_dense(lay):
    rng = np.random.default_rng(lay["seed"])
    A, G, Ab, G3, F = layer(rng, lay["n"], lay["d_in"], lay["d_out"], lay["bias"])
    for build in BUILDERS:
        op = build(A, G, 0.1, bias=lay["bias"])
        Ft = undamped(op)
        ref = np.linalg.norm(F - Ft) / np.linalg.norm(F)
        # the Gram formula subtracts squares: floor sqrt(eps)(||F|| + sum ||B_i|| ||C_i||)/||F||
        size = np.linalg.norm(op.factors[2]) if op.method == "ekfac" else \
            sum(np.linalg.norm(b) * np.linalg.norm(c) for b, c in op.factors)
        floor = 10 * np.sqrt(np.finfo(float).eps) * (1 + size / np.linalg.norm(F))
        assert abs(ml.fisher_error(op, A, G, bias=lay["bias"]) - ref) <= 1e-6 * ref + floor
        sref = spectrum_error(F, Ft)
        got = ml.fisher_error(op, A, G, bias=lay["bias"], kind="spectrum")
        assert abs(got - sref) <= 1e-9 * max(sref, 1e-3), (build.__name__, got, sref)


def test_spectrum_error_arpack_path(rng, monkeypatch):
    """Two-term sums beyond the dense limit: the top n eigenvalues by ARPACK and the tail's
    energy from ||F~||_F^2 (exact because F has rank <= n)."""
    from mfac_linalg.kronecker import builders
    A, G, Ab, G3, F = layer(rng, 12, 6, 5)
    op = ml.deflation(A, G, 0.1)
    ref = spectrum_error(F, undamped(op))
    monkeypatch.setattr(builders, "DENSE_SPECTRUM", 10)
    got = ml.fisher_error(op, A, G, kind="spectrum")
    assert abs(got - ref) <= 1e-7 * ref


@given(layers)
def test_error_orderings(lay):
    rng = np.random.default_rng(lay["seed"])
    A, G, Ab, G3, F = layer(rng, lay["n"], lay["d_in"], lay["d_out"], lay["bias"])
    b = lay["bias"]
    e = {f.__name__: ml.fisher_error(f(A, G, 0.1, bias=b), A, G, bias=b) for f in BUILDERS}
    tol = 1e-7
    assert e["deflation"] <= e["kpsvd"] + tol
    assert abs(e["lanczos"] - e["deflation"]) <= tol
    assert e["kpsvd"] <= e["kfac"] + tol
    assert e["kfac_corrected"] <= e["kfac"] + tol
    assert e["ekfac"] <= e["kfac"] + tol


# -- composition, copies, read-only -----------------------------------------------------------

def test_block_diag_composition_and_inverse(rng):
    A1, G1, _, _, _ = layer(rng, 20, 3, 2)
    A2, G2, _, _, _ = layer(rng, 20, 2, 4)
    ops = [ml.kfac(A1, G1, 0.1), ml.ekfac(A2, G2, 0.1)]
    M1, M2 = damped_dense(ops[0], 0.1), damped_dense(ops[1], 0.1)
    Md = sla.block_diag(M1, M2)
    bd = ml.block_diag(ops)
    check_operator(bd, np.linalg.inv(Md), 1e-10, rng, logdet=np.linalg.slogdet(Md)[1],
                   forward=Md, forward_tol=1e-12)
    # inverse() whatever the blocks are: Kronecker, static inverse-Fisher, their forward ops
    Gs = rng.standard_normal((5, 7))
    st_op = ml.StaticInverseFisher(Gs, 0.2)
    Fs = 0.2 * np.eye(7) + Gs.T @ Gs / 5
    Fd = sla.block_diag(M1, M2, Fs)
    x = rng.standard_normal(6 + 8 + 7)
    inv = ml.block_diag([ops[0], ops[1], st_op])
    assert rel_err(inv @ x, np.linalg.solve(Fd, x)) < 1e-10
    assert rel_err(inv.inverse() @ x, Fd @ x) < 1e-12
    assert rel_err(inv.fisher() @ x, Fd @ x) < 1e-12
    mixed = ml.block_diag([ops[0].fisher(), ops[1], st_op.fisher()])
    ref = sla.block_diag(M1, np.linalg.inv(M2), Fs)
    assert rel_err(mixed @ x, ref @ x) < 1e-10
    assert rel_err(mixed.inverse() @ x, np.linalg.solve(ref, x)) < 1e-10
    with pytest.raises(TypeError, match=r"ops\[1\]"):
        ml.block_diag([ops[0], ops[1] + ops[1]]).inverse()
    with pytest.raises(TypeError, match=r"ops\[0\].*no fisher"):
        mixed.fisher()
    # logdet is log det F of every block's Fisher: one meaning for blocks of one kind only
    assert np.isclose(inv.logdet(), np.linalg.slogdet(Fd)[1], rtol=1e-12)
    fwd = ml.block_diag([ops[0].fisher(), ml.block_diag([ops[1].fisher()]), st_op.fisher()])
    assert np.isclose(fwd.logdet(), np.linalg.slogdet(Fd)[1], rtol=1e-12)
    with pytest.raises(TypeError, match=r"ops\[0\] is a forward operator.*ops\[1\] is an "
                                        r"inverse-Fisher operator"):
        mixed.logdet()
    with pytest.raises(TypeError, match=r"ops\[1\] is a block_diag of both kinds"):
        ml.block_diag([st_op, ml.block_diag([ops[0], ops[1].fisher()])]).logdet()


def test_pickle_deepcopy_and_read_only(rng):
    A, G, Ab, G3, F = layer(rng, 30, 4, 3, bias=True)
    x = rng.standard_normal(15)
    ops = [b(A, G, 0.1, bias=True) for b in BUILDERS]
    for op in ops + [ops[3].fisher(), ml.block_diag(ops[:2])]:
        x = rng.standard_normal(op.shape[0])
        y = op @ x
        for clone in (pickle.loads(pickle.dumps(op)), copy.deepcopy(op), copy.copy(op)):
            assert type(clone) is type(op) and np.array_equal(clone @ x, y)
            assert clone.device == op.device
    x = rng.standard_normal(15)
    for op in ops:
        y = op @ x
        f = op.factors
        mats = list(f) if op.method == "ekfac" else [m for pair in f for m in pair]
        for X in mats:
            with pytest.raises(ValueError, match="read-only"):
                X[0, 0] = 1e9
        assert np.array_equal(op @ x, y)


def test_matmat_on_zero_columns_and_failed_calls_change_nothing(rng):
    A, G, Ab, G3, F = layer(rng, 30, 4, 3)
    for build in BUILDERS:
        op = build(A, G, 0.1)
        for f in (op, op.fisher()):
            assert f.matmat(np.zeros((12, 0))).shape == (12, 0)
        x = rng.standard_normal(12)
        y = op @ x
        for bad in (np.full(12, np.nan), np.ones(11), np.ones((12, 2, 1))):
            with pytest.raises(ValueError, match="x"):
                op.matvec(bad)
        assert np.array_equal(op @ x, y)


# -- bad input -----------------------------------------------------------------------------

def test_kronecker_bad_input(rng):
    A, G = rng.standard_normal((5, 3)), rng.standard_normal((6, 2))
    G5 = G[:5]
    cases = [
        (lambda: ml.kfac(A, G, 0.1), ValueError, "same number of samples; got 5 and 6"),
        (lambda: ml.kfac(A, G5, 0.1, damping_mode="tikhonov"), ValueError, "damping_mode"),
        (lambda: ml.kfac(np.ones(5), G5, 0.1), ValueError, "activations must be 2-D"),
        (lambda: ml.kfac(A, G5[:, :, None, None], 0.1), ValueError, "output_grads must be"),
        (lambda: ml.kfac(A[:, None], G5, 0.1), ValueError, "both be 2-D or both 3-D"),
        (lambda: ml.kfac(A[:, None], np.ones((5, 2, 2)), 0.1), ValueError, "positions T"),
        (lambda: ml.ekfac(A, np.full((5, 2), np.nan), 0.1), ValueError, "output_grads must be finite"),
        (lambda: ml.deflation(A, G5, 0.1, indefinite="ignore"), ValueError, "indefinite"),
        (lambda: ml.deflation(A, G5, 0.1, solver="power"), ValueError, "solver"),
        (lambda: ml.lanczos(A, G5, 0.1, first_term_damping=1), TypeError, "first_term_damping"),
        (lambda: ml.kfac(A, G5, 0.1, bias=1), TypeError, "bias"),
        (lambda: ml.kfac(A, G5, -1.0), ValueError, "damping"),
        (lambda: ml.kfac(A, G5, np.nan), ValueError, "damping"),
        (lambda: ml.fisher_error(ml.kfac(A, G5, 0.1), A, G5, kind="max"), ValueError, "kind"),
        (lambda: ml.fisher_error(ml.kfac(A, G5, 0.1), A, G5, bias=True), ValueError,
         r"approx is for a \(2, 3\) layer; the data give \(2, 4\)"),
        (lambda: ml.fisher_error(ml.StaticInverseFisher(np.ones((2, 6)), 1.0), A, G5),
         TypeError, "approx must be an operator from kfac"),
        (lambda: ml.lanczos(A, G5, 0.1, k=3), ValueError, "k must be 1 or 2"),
        (lambda: ml.lanczos(A, G5, 0.1, krylov=0), ValueError, "krylov"),
        (lambda: ml.block_diag([]), ValueError, "ops"),
        (lambda: K.kronecker_terms(A, G5, tol=None), TypeError, "tol must be a real number"),
        # A (5, 3), G (5, 2): R(F) has min(6, 3) = 3 singular values (k = 10**9 allocated
        # 67 GiB of zero terms before)
        (lambda: K.kronecker_terms(A, G5, 4), ValueError, r"k must be <= 3 for a \(2, 3\) layer"),
        (lambda: K.kronecker_terms(A, G5, 10 ** 9), ValueError, "k must be <= 3"),
        (lambda: ml.block_diag([np.eye(2)]), TypeError, r"ops\[0\]"),
        (lambda: ml.block_diag(None), TypeError, "ops must be a sequence of operators"),
        (lambda: ml.block_diag(3), TypeError, r"ops must be a sequence of operators \(one per block\); got int"),
        (lambda: ml.block_diag(ml.kfac(A, G5, 0.1)), TypeError,
         "got KroneckerInverse"),
        (lambda: ml.block_diag({"a": ml.kfac(A, G5, 0.1)}), TypeError, "got dict"),
    ]
    for build in ITERATIVE:
        cases += [
            (lambda b=build: b(A, G5, 0.1, maxiter=0), ValueError, "maxiter must be >= 1"),
            (lambda b=build: b(A, G5, 0.1, maxiter=True), TypeError, "maxiter must be an integer"),
            (lambda b=build: b(A, G5, 0.1, maxiter=2.5), TypeError, "maxiter"),
            (lambda b=build: b(A, G5, 0.1, tol=np.nan), ValueError, "tol must be a number"),
            (lambda b=build: b(A, G5, 0.1, tol=-1), ValueError, "tol must be > 0"),
            (lambda b=build: b(A, G5, 0.1, tol=0.0), ValueError, "tol must be > 0"),
            (lambda b=build: b(A, G5, 0.1, tol="1e-8"), TypeError, "tol"),
            (lambda b=build: b(A, G5, 0.1, tol=None), TypeError, "tol must be a real number"),
            (lambda b=build: b(A, G5, 0.1, init=np.full((3, 3), np.nan)), ValueError,
             "init must be finite"),
            (lambda b=build: b(A, G5, 0.1, init=np.eye(4)), ValueError, r"init must be a \(3, 3\)"),
            (lambda b=build: b(A, G5, 0.1, init=[np.eye(3)]), TypeError, r"init\[0\] must be a pair"),
            (lambda b=build: b(A, G5, 0.1, init=[(np.eye(2), np.full((3, 3), np.inf))]),
             ValueError, r"init\[0\]\[1\] must be finite"),
            (lambda b=build: b(A, G5, 0.1, init=ml.ekfac(A, G5, 0.1)), TypeError, "EKFAC"),
            (lambda b=build: b(A[:, None], G5[:, None], 0.1, band=-1), ValueError, "band"),
            (lambda b=build: b(A[:, None], G5[:, None], 0.1, band=1.5), TypeError, "band"),
            (lambda b=build: b(A[:, None], G5[:, None], 0.1, positions=np.arange(1)),
             ValueError, "positions is only used with band"),
            (lambda b=build: b(A[:, None], G5[:, None], 0.1, band=1, positions=np.arange(2)),
             ValueError, r"positions must have shape \(1,\)"),
        ]
    for fn, exc, match in cases:
        with pytest.raises(exc, match=match):
            fn()


def test_pi_split_survives_factors_of_opposite_extreme_scales(rng):
    """a * s, g / s leave F = Gamma kron A unchanged; the pi split used to compute
    sqrt(tr Gamma / tr A), which underflowed to 0 here (ZeroDivisionError)."""
    A, G = rng.standard_normal((20, 4)), rng.standard_normal((20, 3))
    x = rng.standard_normal(12)
    for s in (1e150, 1e-150):
        for build in (ml.kfac, ml.kfac_corrected,
                      lambda *a: ml.kpsvd(*a, damping_mode="pi")):
            ref = build(A, G, 1e-3) @ x
            assert rel_err(build(A * s, G / s, 1e-3) @ x, ref) < 1e-13


@pytest.mark.parametrize("s", [1e100, 1e-100])
def test_extreme_but_finite_scales_give_the_scaled_answer(rng, s):
    """F(a s, g) = s^2 F(a, g): the fourth-degree R(F) products and fisher_error's Gram
    identities used to overflow (1e100: fisher_error inf/NaN, iterations unconverged,
    kfac_corrected sigma 0) or underflow (1e-100: kpsvd 'converged' to factors 5e-2 off)."""
    A, G = rng.standard_normal((20, 4)), rng.standard_normal((20, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")               # no ConvergenceWarning, no overflow
        for build in BUILDERS:
            ref, op = build(A, G, 1e-3), build(A * s, G, 1e-3)
            for kind in ("frobenius", "spectrum"):
                assert abs(ml.fisher_error(op, A * s, G, kind=kind)
                           - ml.fisher_error(ref, A, G, kind=kind)) < 1e-14
            if "sigma" in ref.info:
                assert op.info["converged"]
                assert abs(op.info["sigma"][0] / (ref.info["sigma"][0] * s * s) - 1) < 1e-14
                for (B1, C1), (B2, C2) in zip(ref.factors, op.factors):
                    assert rel_err(np.kron(B2 / s, C2 / s), np.kron(B1, C1)) < 1e-13


def test_band_positions_at_the_integer_limits(rng):
    """Position differences are exact: int64 extremes used to overflow and unsigned ones to
    wrap, so far pairs counted as neighbours (or one direction of a pair was dropped)."""
    A, G = rng.standard_normal((5, 4, 3)), rng.standard_normal((5, 4, 2))
    ref = ml.kpsvd(A, G, 0.1, band=1, positions=np.array([-1000, 0, 1, 2])).info["sigma"]
    got = ml.kpsvd(A, G, 0.1, band=1, positions=np.array([-2 ** 63, 0, 1, 2])).info["sigma"]
    assert got == ref
    ref = ml.kpsvd(A, G, 0.1, band=1).info["sigma"]
    for dt in (np.uint64, np.uint8, np.int8):
        pos = np.arange(4, dtype=dt)
        assert ml.kpsvd(A, G, 0.1, band=1, positions=pos).info["sigma"] == ref
    with pytest.raises(ValueError, match="positions must have shape"):
        ml.kpsvd(A, G, 0.1, band=1, positions=np.zeros((4, 0), dtype=int))


# -- backends -------------------------------------------------------------------------------

@pytest.mark.parametrize("build", BUILDERS, ids=lambda f: f.__name__)
def test_kronecker_on_backend(backend, build, rng):
    A, G, Ab, G3, F = layer(rng, 40, 5, 4, True)
    xp = backend.xp
    op = build(xp.asarray(A), xp.asarray(G), 0.1, bias=True)
    ref = build(A, G, 0.1, bias=True)
    assert op.device == repr(backend)
    x = rng.standard_normal(24)       # d_out (d_in + 1) with the bias column
    assert rel_err(op.matvec(xp.asarray(x)), ref @ x) < 1e-8
    assert abs(ml.fisher_error(op, xp.asarray(A), xp.asarray(G), bias=True)
               - ml.fisher_error(ref, A, G, bias=True)) < 1e-8
    M = abs_dense(ref, 0.1) if ref.method in ("deflation", "lanczos", "kfac_corrected") \
        else damped_dense(ref, 0.1)
    check_operator(op, np.linalg.inv(M), float64_tol(cond(M)), rng,
                   logdet=np.linalg.slogdet(M)[1], forward=M, forward_tol=1e-10)


@pytest.mark.parametrize("bias", [False, True])
def test_pi_kfac_cholesky_route_equals_the_eigendecomposition(rng, bias):
    """The default pi-damped K-FAC (Cholesky factors, two-GEMM products) is the same
    operator as the eigendecomposition route (taken with indefinite='clip'): products,
    forward products, diagonal, entries and log det to rounding."""
    A, G, Ab, G3, F = layer(rng, 80, 5, 4, bias)
    fast = ml.kfac(A, G, 1e-2, bias=bias)
    eig = ml.kfac(A, G, 1e-2, bias=bias, indefinite="clip")
    assert fast.info["factorization"] == "cholesky" and "factorization" not in eig.info
    X = rng.standard_normal((fast.shape[0], 3))
    assert rel_err(fast.matmat(X), eig.matmat(X)) < 1e-12
    assert rel_err(fast.fisher().matmat(X), eig.fisher().matmat(X)) < 1e-12
    assert rel_err(fast.diagonal(), eig.diagonal()) < 1e-12
    assert rel_err(fast.fisher().diagonal(), eig.fisher().diagonal()) < 1e-12
    assert abs(fast.entry(1, 3) - eig.entry(1, 3)) < 1e-12 * np.abs(eig.todense()).max()
    assert abs(fast.logdet() - eig.logdet()) < 1e-12 * abs(eig.logdet())
    M = damped_dense(eig, 1e-2)
    assert rel_err(fast.todense(), np.linalg.inv(M)) < float64_tol(cond(M))


def test_pi_kfac_falls_back_to_the_eigendecomposition_when_cholesky_fails():
    """A damped factor that is not positive definite (an eigenvalue below -lam_B): the
    eigendecomposition route and its indefinite='abs' rule, never a failure."""
    from mfac_linalg.kronecker.builders import _single_inverse
    Bm, Cm = -np.diag([1.0, 2.0]), np.eye(3)
    op = _single_inverse("kfac", Bm, Cm, 0.01, "pi", "abs", ml._backend.CPU,
                         terms=[(Bm, Cm)], info={})
    assert "factorization" not in op.info
    assert np.all(np.isfinite(op.todense()))
    assert np.linalg.norm(op.todense(), 2) <= 1.0 / 0.01 * (1 + 1e-12)
