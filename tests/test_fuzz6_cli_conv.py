"""Fuzz round six: the ``mfac-linalg`` command line and the convolution-layer inputs of the
Kronecker builders (docs/math.md §4, §8), against dense float64 oracles built from the
per-sample gradients DW_n = G_n^T A_n."""

import io
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, strategies as st

import mfac_linalg as ml
from mfac_linalg import cli
from mfac_linalg.kronecker import conv

EPS = np.finfo(np.float64).eps
BUILDERS = [ml.kfac, ml.ekfac, ml.kpsvd, ml.deflation, ml.lanczos, ml.kfac_corrected]
BANDED = [ml.kpsvd, ml.deflation, ml.lanczos, ml.kfac_corrected]


def run_main(argv, capsys):
    try:
        code = cli.main(argv)
    except KeyboardInterrupt:            # would end the whole pytest session
        pytest.fail("KeyboardInterrupt escaped cli.main")
    out, err = capsys.readouterr()
    return code, out, err


# -- the command line -----------------------------------------------------------------

def test_damping_too_small_for_the_grads_file_is_one_line_naming_damping(tmp_path, capsys):
    """Identical gradients of scale 1e10 with --damping 0.1: the library's
    NotPositiveDefinite (a user error: raise the damping) used to escape as a traceback."""
    g = tmp_path / "g.npy"
    np.save(g, np.full((3, 4), 1e10))
    np.save(tmp_path / "v.npy", np.ones(4))
    for cmd in (["diag"], ["ihvp", "--vec", str(tmp_path / "v.npy")]):
        code, _, err = run_main(cmd + ["--grads", str(g), "--damping", "0.1",
                                       "--out", str(tmp_path / "o.npy")], capsys)
        assert code == 2
        assert err.count("\n") == 1 and "Traceback" not in err
        assert f"mfac-linalg {cmd[0]}: error: --damping 0.1 is too small" in err
        assert not (tmp_path / "o.npy").exists()
    # the same file with enough damping works
    code, _, _ = run_main(["diag", "--grads", str(g), "--damping", "1e10",
                           "--out", str(tmp_path / "o.npy")], capsys)
    assert code == 0 and np.isfinite(np.load(tmp_path / "o.npy")).all()


@pytest.mark.parametrize("dim,l2", [(3, 1e36), (6, 1e50)])
def test_demo_float32_with_a_large_l2_runs(dim, l2):
    """--l2 is accepted up to 1e50; with float32 gradients CG's residuals (about l2 |w|) used
    to overflow the float32 operator's input (a ValueError traceback).  The preconditioner
    now sees r / 2^k: the same F^-1 r, in range."""
    res = cli.run_demo(dim=dim, grads=3, l2=l2, dtype="float32", device="cpu",
                       out=io.StringIO())
    assert res["ok"] and res["cg_info"]["M-FAC"] == 0


@pytest.mark.parametrize("scale", [1e-200, 1e-7, 1.0, 3e5, 1e250])
def test_demo_preconditioner_scaling_changes_nothing_in_float64(scale):
    """The power-of-two scaling of the demo's preconditioner is exact: for a float64
    operator its products are op.matvec's bit for bit, at any scale of the residual."""
    rng = np.random.default_rng(3)
    op = ml.StaticInverseFisher(rng.standard_normal((7, 20)), 0.3)
    apply = cli._scaled(op, np)
    r = scale * rng.standard_normal(20)
    assert np.array_equal(apply(r), op.matvec(r))
    assert np.array_equal(apply(np.zeros(20)), np.zeros(20))


def _report(text):
    """The demo's printed numbers: the bound, kappa, the four error rows, the iterations."""
    m = re.search(r"accepted up to (\S+) = (.*), κ = λ_max\(F\)/λ = (\S+):", text)
    rows = dict(re.findall(r"^  (F⁻¹x \(matvec\)|F⁻¹X \(matmat.*?\)|diag\(F⁻¹\) \(\d+ "
                           r"entries\)|log det F)\s+(\S+)$", text, re.M))
    its = re.findall(r"^  (?:no preconditioner|M-FAC preconditioner)\s+(\d+)\s", text, re.M)
    return float(m.group(1)), m.group(2), float(m.group(3)), rows, [int(i) for i in its]


@pytest.mark.parametrize("kw", [
    dict(dim=5, grads=3),                           # fewer than 16 diagonal entries
    dict(dim=10, grads=200, damping=1e3),           # kappa ~ 1: the 100 eps floor applies
    dict(dim=40, grads=8, dtype="float32", seed=3),
    dict(dim=120, grads=30, damping=1e-6, seed=7)])
def test_demo_prints_what_it_measured(kw):
    """Every number of the report is the measured one (the returned dict), the bound's
    formula is the one applied (it said 10 eps kappa where the 100 eps floor was used), and
    the diagonal row counts the entries it checked (it said 16 for d < 16)."""
    buf = io.StringIO()
    res = cli.run_demo(device="cpu", out=buf, **kw)
    bound, rule, kappa, rows, its = _report(buf.getvalue())
    eps = float(np.finfo(res["dtype"]).eps)
    assert bound == float(f"{res['bound']:.1e}") and kappa == float(f"{res['kappa']:.1e}")
    if 10 * eps * res["kappa"] >= 100 * eps:
        assert rule == f"10·eps({res['dtype']})·κ"
        assert res["bound"] == pytest.approx(10 * eps * res["kappa"], rel=1e-12)
    else:
        assert rule.startswith(f"100·eps({res['dtype']})")
        assert res["bound"] == 100 * eps
    n_diag = min(16, kw["dim"])
    assert set(rows) == {"F⁻¹x (matvec)", "F⁻¹X (matmat, 8 columns, one pass)",
                         f"diag(F⁻¹) ({n_diag} entries)", "log det F"}
    for key, label in (("error", "F⁻¹x (matvec)"), ("error_diag", f"diag(F⁻¹) ({n_diag} entries)"),
                       ("error_logdet", "log det F")):
        assert float(rows[label]) == float(f"{res[key]:.1e}")
    assert its == [res["cg_iters"]["none"], res["cg_iters"]["M-FAC"]]
    assert res["ok"] == (max(res["error"], res["error_matmat"], res["error_diag"],
                             res["error_logdet"]) <= res["bound"])


@pytest.mark.parametrize("argv,msg", [
    (["demo", "--damping", "-1e-3"], "--damping must be > 0"),
    (["demo", "--damping", "-inf"], "--damping must be finite"),
    (["demo", "--l2", "-.5e2"], "--l2 must be >= 0"),
    (["demo", "--cg-rtol", "-1E-3"], "--cg-rtol must be > 0"),
    (["diag", "--grads", "g.npy", "--damping", "-2e-1", "--out", "o.npy"],
     "--damping must be > 0")])
def test_negative_values_in_scientific_notation_are_refused_by_name(
        argv, msg, tmp_path, monkeypatch, capsys):
    """argparse took "-1e-3" and "-inf" for options: "--damping -1e-3" said "expected one
    argument" although one was given."""
    monkeypatch.chdir(tmp_path)
    np.save("g.npy", np.ones((2, 3)))
    code, _, err = run_main(argv + (["--device", "cpu"] if argv[0] == "demo" else []), capsys)
    assert code == 2 and err.count("\n") == 1
    assert msg in err and "expected one argument" not in err


def test_interrupt_is_one_line_with_status_130(monkeypatch, capsys):
    """Ctrl-C during the demo: one line, status 130 (128 + SIGINT), no traceback."""
    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "logistic_problem", interrupted)
    code, _, err = run_main(["demo", "--device", "cpu", "--dim", "10", "--grads", "2"], capsys)
    assert code == 130
    assert err.strip() == "mfac-linalg demo: interrupted"


def test_interrupt_while_writing_leaves_the_previous_output(tmp_path, monkeypatch, capsys):
    g, v, o = tmp_path / "g.npy", tmp_path / "v.npy", tmp_path / "o.npy"
    np.save(g, np.eye(3))
    np.save(v, np.ones(3))
    np.save(o, np.arange(5.0))
    real = np.save

    def save(f, arr, **k):
        real(f, arr[:1], **k)            # part of the data is written, then Ctrl-C
        raise KeyboardInterrupt
    monkeypatch.setattr(np, "save", save)
    code, _, err = run_main(["ihvp", "--grads", str(g), "--vec", str(v), "--damping", "1",
                             "--out", str(o)], capsys)
    monkeypatch.undo()
    assert code == 130 and "interrupted" in err
    assert np.array_equal(np.load(o), np.arange(5.0))
    assert sorted(os.listdir(tmp_path)) == ["g.npy", "o.npy", "v.npy"]    # no temp file


def test_empty_out_path_is_named(tmp_path, capsys):
    np.save(tmp_path / "g.npy", np.eye(2))
    code, _, err = run_main(["diag", "--grads", str(tmp_path / "g.npy"), "--damping", "1",
                             "--out", ""], capsys)
    assert code == 2 and "--out must be a file path; got an empty string" in err


def test_negative_damping_in_a_real_process_is_one_line():
    p = subprocess.run([sys.executable, "-m", "mfac_linalg.cli", "demo", "--damping", "-1e-3"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr == "mfac-linalg demo: error: --damping must be > 0.0; got -0.001\n"


# -- convolution layers against dense oracles --------------------------------------------

def dense_oracle(A, G, bias, band=None, pos=None):
    """F = (1/n) sum_n sum_{t,s in band} (g_t g_s^T) kron (a_t a_s^T) with np.kron, and the
    same sum over |A|, |G| (the magnitudes that bound the rounding of every product)."""
    n, T = A.shape[:2]
    if bias:
        A = np.concatenate([A, np.ones((n, T, 1))], axis=2)
    pos = np.arange(T)[:, None] if pos is None else np.asarray(pos).reshape(T, -1)
    keep = np.ones((T, T), bool) if band is None else \
        np.abs(pos[:, None] - pos[None]).max(axis=2) <= band
    D = A.shape[2] * G.shape[2]
    F, Fabs = np.zeros((D, D)), np.zeros((D, D))
    for a, g in zip(A, G):
        for t in range(T):
            for s in range(T):
                if keep[t, s]:
                    F += np.kron(np.outer(g[t], g[s]), np.outer(a[t], a[s]))
                    Fabs += np.kron(np.outer(abs(g[t]), abs(g[s])), np.outer(abs(a[t]), abs(a[s])))
    return F / n, Fabs / n, A


def rearr(F, d_out, d_in):
    """R(F): row (i, j) holds the (i, j) block of F, flattened (docs/math.md §4)."""
    return F.reshape(d_out, d_in, d_out, d_in).transpose(0, 2, 1, 3).reshape(
        d_out * d_out, d_in * d_in)


KINDS = ["plain", "n1", "zero_patches", "zero_grads", "duplicates", "rank", "decades",
         "float32"]


def awkward(kind, n, T, d_in, d_out, seed):
    rng = np.random.default_rng(seed)
    n = 1 if kind == "n1" else n
    A, G = rng.standard_normal((n, T, d_in)), rng.standard_normal((n, T, d_out))
    if kind == "zero_patches":
        A[rng.integers(n)] = 0
        A[:, rng.integers(T)] = 0
    elif kind == "zero_grads":
        G[rng.integers(n)] = 0
    elif kind == "duplicates":
        A, G = np.concatenate([A, A]), np.concatenate([G, G])
    elif kind == "rank":
        A[..., -1] = 2 * A[..., 0]
        G[:, :, 0] = 0
    elif kind == "decades":
        A = A * 10.0 ** rng.integers(-6, 7, d_in)
        G = G * 10.0 ** rng.integers(-6, 7, d_out)
    elif kind == "float32":
        A, G = A.astype(np.float32), G.astype(np.float32)
    return A, G


cases = st.fixed_dictionaries({
    "kind": st.sampled_from(KINDS), "n": st.integers(1, 4), "T": st.integers(1, 4),
    "d_in": st.integers(1, 3), "d_out": st.integers(1, 3), "bias": st.booleans(),
    "band": st.one_of(st.none(), st.integers(0, 5)), "seed": st.integers(0, 2**31)})


@given(cases)
def test_layer_products_match_the_dense_oracle(c):
    """R vec(Q), R^T vec(P) (banded or not), K-FAC's factors, the Gram of the DW_n and the
    quadratic terms against np.kron.  Each entry is a sum of N = n T^2 (d_in + d_out) products
    or so: its rounding is below c N eps times the same sum over magnitudes (|A|, |G|, |Q|),
    and c = 4 leaves a margin over the bound (the observed error is far below it)."""
    A, G = awkward(c["kind"], c["n"], c["T"], c["d_in"], c["d_out"], c["seed"])
    A0, G0 = A.copy(), G.copy()
    F, Fabs, Ab = dense_oracle(A.astype(np.float64), G.astype(np.float64), c["bias"], c["band"])
    n, T, di = Ab.shape
    do = G.shape[2]
    gamma = 4 * (n * T * T * (di + do) + di * di + do * do) * EPS
    lay = conv.layer_data(A, G, c["bias"], band=c["band"])
    rng = np.random.default_rng(c["seed"] + 1)
    Q, P = rng.standard_normal((2, di, di)), rng.standard_normal((2, do, do))
    R, Rabs = rearr(F, do, di), rearr(Fabs, do, di)
    for got, ref, bound in (
            (lay.r_product(Q).reshape(2, -1), Q.reshape(2, -1) @ R.T,
             abs(Q.reshape(2, -1)) @ Rabs.T),
            (lay.rt_product(P).reshape(2, -1), P.reshape(2, -1) @ R,
             abs(P.reshape(2, -1)) @ Rabs)):
        assert (abs(got - ref) <= gamma * bound).all()
    if c["band"] is None:
        a2, g2 = Ab.reshape(n * T, di), G.astype(np.float64).reshape(n * T, do)
        Gam, Aa = lay.kfac_factors()
        assert (abs(Gam - g2.T @ g2 / n) <= gamma * (abs(g2).T @ abs(g2)) / n).all()
        assert (abs(Aa - a2.T @ a2 / (n * T)) <= gamma * (abs(a2).T @ abs(a2)) / (n * T)).all()
        DW = np.einsum("ntj,nti->nji", G.astype(np.float64), Ab).reshape(n, -1)
        DWabs = np.einsum("ntj,nti->nji", abs(G.astype(np.float64)), abs(Ab)).reshape(n, -1)
        assert (abs(lay.gram() - DW @ DW.T) <= gamma * (DWabs @ DWabs.T)).all()
        Bm, Cm = rng.standard_normal((do, do)), rng.standard_normal((di, di))
        K, Kabs = np.kron(Bm, Cm), np.kron(abs(Bm), abs(Cm))
        q_ref = np.einsum("ni,ij,nj->n", DW, K, DW)
        q_bound = np.einsum("ni,ij,nj->n", DWabs, Kabs, DWabs)
        assert (abs(lay.quad_terms(Bm, Cm) - q_ref) <= gamma * q_bound).all()
    assert np.array_equal(A, A0) and np.array_equal(G, G0)          # inputs untouched


@given(cases)
def test_kfac_ekfac_kpsvd_on_awkward_layers_match_the_oracle(c):
    """K-FAC's damped inverse, EKFAC's S* = diag(U^T F U) and KPSVD's top term (banded R(F)
    where band is given) against the dense oracle.  K-FAC: backward-stable solves, error
    <= c eps cond(M).  KPSVD: a unit-norm term off by r / gap (docs/math.md §8; tol=1e-12),
    checked where the gap is at least 1e-3 (else the top term is not determined)."""
    A, G = awkward(c["kind"], c["n"], c["T"], c["d_in"], c["d_out"], c["seed"])
    F, _, Ab = dense_oracle(A.astype(np.float64), G.astype(np.float64), c["bias"], c["band"])
    n, T, di = Ab.shape
    do = G.shape[2]
    D = do * di
    lam = 0.1 * max(float(abs(F).max()), 1e-3)
    x = np.random.default_rng(c["seed"]).standard_normal(D)
    if c["band"] is None:
        a2, g2 = Ab.reshape(n * T, di), G.astype(np.float64).reshape(n * T, do)
        M = np.kron(g2.T @ g2 / n, a2.T @ a2 / (n * T)) + lam * np.eye(D)
        y = ml.kfac(A, G, lam, bias=c["bias"], damping_mode="exact") @ x
        ref = np.linalg.solve(M, x)
        assert np.linalg.norm(y - ref) <= 100 * EPS * np.linalg.cond(M) * np.linalg.norm(ref)
        UG, UA, S = ml.ekfac(A, G, lam, bias=c["bias"]).factors
        U = np.kron(UG, UA)
        assert np.allclose(S.ravel(), np.diag(U.T @ F @ U), rtol=0,
                           atol=1e3 * EPS * np.abs(F).sum(axis=0).max())
    R = rearr(F, do, di)
    Sd = (np.eye(do * do) + np.eye(do * do).reshape(do, do, do, do).transpose(0, 1, 3, 2)
          .reshape(do * do, -1)) / 2
    Si = (np.eye(di * di) + np.eye(di * di).reshape(di, di, di, di).transpose(0, 1, 3, 2)
          .reshape(di * di, -1)) / 2
    u, s, vt = np.linalg.svd(Sd @ R @ Si)
    (Bm, Cm), = ml.kpsvd(A, G, lam, bias=c["bias"], band=c["band"]).factors
    if s[0] == 0:
        assert not np.kron(Bm, Cm).any()
        return
    gap = (s[0] - (s[1] if len(s) > 1 else 0.0)) / s[0]
    if gap >= 1e-3:
        top = s[0] * np.kron(u[:, 0].reshape(do, do), vt[0].reshape(di, di))
        err = min(np.linalg.norm(np.kron(Bm, Cm) - top), np.linalg.norm(np.kron(Bm, Cm) + top))
        assert err <= 1e-9 / gap * s[0]


@pytest.mark.parametrize("kind", KINDS)
def test_T1_equals_the_dense_layer_and_a_covering_band_changes_nothing(kind):
    """T = 1 (3-D input) gives the 2-D dense layer's operator for every builder; band=0 at
    T = 1, and band >= T - 1 at any T, keep every position pair: the unbanded operator."""
    A, G = awkward(kind, 4, 1, 3, 2, 11)
    x = np.random.default_rng(0).standard_normal(8)
    lam = 0.1 * max(float(abs(A).max() * abs(G).max()) ** 2, 1e-3)
    for build in BUILDERS:
        ref = build(A[:, 0], G[:, 0], lam, bias=True) @ x
        np.testing.assert_allclose(build(A, G, lam, bias=True) @ x, ref, rtol=1e-13, atol=0)
        if build in BANDED:
            np.testing.assert_allclose(build(A, G, lam, bias=True, band=0) @ x, ref,
                                       rtol=1e-13, atol=0)
    A, G = awkward(kind, 3, 4, 2, 2, 12)
    x = x[:4]
    for build in BANDED:
        ref = build(A, G, lam) @ x
        for band in (3, 4, 10**30):
            np.testing.assert_allclose(build(A, G, lam, band=band) @ x, ref, rtol=1e-13, atol=0)


@pytest.mark.parametrize("k", [-400, -60, 60, 400])
def test_builders_are_invariant_under_exact_rescaling(k):
    """F(A 2^k, G 2^-k) = F(A, G) exactly: every builder gives the same operator, scales over
    hundreds of decades included (the iterative builders rescale before their iterations)."""
    rng = np.random.default_rng(k + 1000)
    A, G = rng.standard_normal((3, 4, 3)), rng.standard_normal((3, 4, 2))
    x = rng.standard_normal(6)
    s = 2.0 ** k
    for build in BUILDERS:
        for band in ((None, 1) if build in BANDED else (None,)):
            kw = {} if band is None else {"band": band}
            ref = build(A, G, 0.1, **kw) @ x
            np.testing.assert_allclose(build(A * s, G / s, 0.1, **kw) @ x, ref, rtol=1e-12)


@pytest.mark.parametrize("acts,grads,kw,exc,msg", [
    ([np.ones((3, 2)), np.ones((2, 2))], np.ones((2, 3, 2)), {}, ValueError,
     "activations must be a rectangular array"),
    (np.ones((2, 2)), np.ones((2, 3, 2)), {}, ValueError,
     "activations and output_grads must both be 2-D or both 3-D"),
    (np.ones((2, 3, 2)), np.ones((3, 3, 2)), {}, ValueError,
     "activations and output_grads must have the same number of samples"),
    (np.ones((2, 3, 2)), np.ones((2, 2, 2)), {}, ValueError,
     "activations and output_grads must have the same number of positions T"),
    (np.ones((2, 0, 2)), np.ones((2, 0, 2)), {}, ValueError, "activations must be 2-D"),
    (np.full((2, 3, 2), np.nan), np.ones((2, 3, 2)), {}, ValueError,
     "activations must be finite"),
    (np.ones((2, 3, 2)), np.full((2, 3, 2), -np.inf), {}, ValueError,
     "output_grads must be finite"),
    (np.ones((2, 3, 2)) + 0j, np.ones((2, 3, 2)), {}, TypeError, "activations must be real"),
    (np.ones((2, 3, 2)), np.ones((2, 3, 2)), {"band": -1}, ValueError, "band must be >= 0"),
    (np.ones((2, 3, 2)), np.ones((2, 3, 2)), {"band": 1.0}, TypeError,
     "band must be an integer"),
    (np.ones((2, 3, 2)), np.ones((2, 3, 2)), {"positions": [0, 1, 2]}, ValueError,
     "positions is only used with band="),
    (np.ones((2, 3, 2)), np.ones((2, 3, 2)), {"band": 1, "positions": [0.0, 1.0, 2.0]},
     TypeError, "positions must hold integers"),
    # the shape given, not the (T, 1) it was reshaped to (it said "got shape (2, 1)")
    (np.ones((2, 3, 2)), np.ones((2, 3, 2)), {"band": 1, "positions": [0, 1]}, ValueError,
     re.escape("positions must have shape (3,) or (3, p) (one coordinate row per position); "
               "got shape (2,)")),
])
def test_bad_conv_inputs_are_refused_by_name(acts, grads, kw, exc, msg):
    for build in BANDED:
        with pytest.raises(exc, match="^" + msg):
            build(acts, grads, 0.1, **kw)
