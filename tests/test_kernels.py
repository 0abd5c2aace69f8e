"""The sliding window's CUDA kernels on their own, and the rollback of the fused GPU step.

Each kernel against NumPy on random inputs: the fused first pass (slot write, saved
old row, NaN/inf flag, y = x / lambda), the explicit inverse's rank-two replacement
(against a dense inverse), and a failed step or update on the kernel path leaving the
window exactly as a twin that never saw it.
"""
import numpy as np
import pytest

import mfac_linalg as ml
from mfac_linalg import _backend as B

from oracles import bf16_bits, bf16_values

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not B.gpu_available(), reason="needs CuPy and a CUDA GPU")]


def _stored(G32, kind):
    """(raw buffer as the window holds it, its values as float64) for float32 data."""
    if kind == "float32":
        return G32.copy(), G32.astype(np.float64)
    if kind == "float16":
        h = G32.astype(np.float16)
        return h.view(np.uint16), h.astype(np.float64)
    raw = bf16_bits(G32)
    return raw, bf16_values(raw).astype(np.float64)


@pytest.mark.parametrize("kind", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("m,ld,rows,slot", [(1, 8, 1, 0), (7, 40, 7, 3), (70, 20_008, 70, 69),
                                            (70, 20_008, 33, 32), (5, 65_544, 5, -1)])
def test_rows_dot_fused_outputs(kind, m, ld, rows, slot):
    import cupy as cp
    from mfac_linalg.kernels import sliding as K
    rng = np.random.default_rng(m * ld + rows)
    raw, G = _stored(rng.standard_normal((m, ld)).astype(np.float32), kind)
    x = _stored(rng.standard_normal(ld).astype(np.float32), kind)[1].astype(np.float32)
    Gd = cp.asarray(raw)
    u = cp.zeros(m)
    backup = cp.full(ld, 7, dtype=Gd.dtype)
    flag = cp.zeros(1)
    y = cp.full(ld, np.nan, dtype=np.float32)
    K.rows_dot(Gd, kind, cp.asarray(x), u, slot=slot, rows=rows, backup=backup, flag=flag,
               y=y, inv_lam=0.25)
    Gnew = G.copy()
    if slot >= 0:
        Gnew[slot] = x
        assert np.array_equal(backup.get(), raw[slot])          # the old row, bit for bit
        assert np.array_equal(Gd.get()[slot], _stored(x, kind)[0])
    else:
        assert np.array_equal(Gd.get(), raw)
    ref = Gnew[:rows] @ x.astype(np.float64)
    scale = np.abs(Gnew[:rows]) @ np.abs(x.astype(np.float64))
    assert np.all(np.abs(u.get()[:rows] - ref) <= 1e-5 * scale)
    assert not u.get()[rows:].any()
    assert np.array_equal(y.get(), (x * np.float32(0.25)))
    assert flag.get()[0] == 0.0
    # a NaN or an infinity anywhere in x raises the flag
    for bad in (np.nan, np.inf):
        xb = x.copy()
        xb[rng.integers(ld)] = bad
        flag[...] = 0
        K.rows_dot(Gd, kind, cp.asarray(xb), cp.zeros(m), rows=rows, flag=flag)
        assert flag.get()[0] == 1.0


@pytest.mark.parametrize("m,s", [(1, 0), (2, 1), (37, 0), (37, 36), (300, 123)])
def test_window_replace_against_dense_inverse(m, s):
    import cupy as cp
    from mfac_linalg.kernels import sliding as K
    rng = np.random.default_rng(m + s)
    shift = 0.7
    A = rng.standard_normal((m, 3 * m))
    Kg = A @ A.T / m                                  # Gram matrix of the slots
    g_new = rng.standard_normal(3 * m)
    A2 = A.copy()
    A2[s] = g_new
    u = A2 @ g_new / m                                 # the new Gram row of slot s
    C = Kg + shift * np.eye(m)
    Knew = Kg.copy()
    Knew[s, :] = u
    Knew[:, s] = u
    Cnew = Knew + shift * np.eye(m)
    Ci = cp.asarray(np.linalg.inv(C))
    out = cp.full((m, m), np.nan)
    Kd = cp.asarray(Kg)
    Kold = cp.full(m, np.nan)
    x2, z, c = cp.empty(m), cp.full(m, np.nan), cp.full(m, np.nan, dtype=np.float32)
    ax, det = cp.full(m, np.nan), cp.full(2, np.nan)
    K.window_replace(Ci, out, cp.asarray(u), Kd, Kold, x2, ax, z, c, det, s)
    Cinv = np.linalg.inv(Cnew)
    tol = 1e-11 * np.linalg.cond(Cnew) * np.linalg.cond(C)
    assert np.abs(out.get() - Cinv).max() <= tol * np.abs(Cinv).max()
    zr = Cinv @ u
    assert np.abs(z.get() - zr).max() <= tol * np.abs(zr).max()
    assert np.array_equal(c.get(), z.get().astype(np.float32))
    ratio = np.exp(np.linalg.slogdet(Cnew)[1] - np.linalg.slogdet(C)[1])
    assert abs(det.get()[0] - ratio) <= tol * ratio
    assert 0 < det.get()[1] < np.inf                     # the scale of det's rounding
    assert np.array_equal(Kd.get(), Knew)
    assert np.array_equal(Kold.get(), Kg[s])
    assert np.array_equal(Ci.get(), np.linalg.inv(C))     # the old inverse is left alone
    out1, z1 = out.get(), z.get()                          # no atomics: bit-reproducible
    Kd[...] = cp.asarray(Kg)
    for _ in range(3):
        K.window_replace(Ci, out, cp.asarray(u), Kd, Kold, x2, ax, z, c, det, s)
        Kd[...] = cp.asarray(Kg)
        assert np.array_equal(out.get(), out1) and np.array_equal(z.get(), z1)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("normalize", ["window", "count"])
@pytest.mark.parametrize("held,refresh", [(3, 10**6), (5, 10**6), (9, 10**6), (9, 2)])
def test_failed_kernel_step_and_update_leave_no_trace(dtype, normalize, held, refresh):
    """A NaN (or a value that overflows the storage format) in step or update raises,
    and the window then behaves bit for bit like a twin that never saw it: the saved
    row and Gram row were put back.  Windows part-filled and full, refresh due or not."""
    import cupy as cp
    rng = np.random.default_rng(held + refresh)
    dim, window = 300, 5
    ws = [ml.SlidingWindowInverseFisher(dim, window, 0.3, dtype=dtype, device="gpu",
                                        normalize=normalize, refresh_every=refresh)
          for _ in range(2)]
    for _ in range(held):
        g = cp.asarray(rng.standard_normal(dim))
        for w in ws:
            w.update(g)
    w, twin = ws
    x = cp.asarray(rng.standard_normal(dim))
    w.matvec(x)
    twin.matvec(x)
    bads = []
    for pos in (0, dim - 1):
        b = rng.standard_normal(dim)
        b[pos] = np.nan
        bads.append(b)
    b = rng.standard_normal(dim)
    b[7] = 1e6 if dtype == "float16" else np.inf           # inf once stored as float16
    bads.append(b)
    for b in bads:
        with pytest.raises(ValueError, match="g must be finite"):
            w.step(cp.asarray(b))
        with pytest.raises(ValueError, match="g must be finite"):
            w.update(cp.asarray(b))
        with pytest.raises(ValueError, match="g must be finite"):
            w.update(cp.asarray(np.stack([rng.standard_normal(dim), b])))
    assert w.count == twin.count
    a, b = w.state_dict(), twin.state_dict()
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    for _ in range(2 * window):
        g = cp.asarray(rng.standard_normal(dim))
        assert np.array_equal(w.step(g).get(), twin.step(g).get())
    assert np.array_equal(w.matvec(x).get(), twin.matvec(x).get())


@pytest.mark.parametrize("explicit", [True, False])
def test_kernel_matvec_checks_its_input_in_its_first_pass(explicit):
    import cupy as cp
    rng = np.random.default_rng(3)
    dim = 100
    ws = [ml.SlidingWindowInverseFisher(dim, 4, 0.5, device="gpu", check_finite=check,
                                        normalize="window" if explicit else "count")
          for check in (True, False)]
    for w in ws:
        w.update(cp.asarray(rng.standard_normal((6, dim))))
    w = ws[0]
    assert w.engine == ("explicit" if explicit else "cholesky")
    x = rng.standard_normal(dim)
    x[42] = np.nan
    with pytest.raises(ValueError, match="^x must be finite"):
        w.matvec(cp.asarray(x))
    with pytest.raises(ValueError, match="^X must be finite"):
        w.matmat(cp.asarray(x[:, None]))
    assert cp.isnan(ws[1].matvec(cp.asarray(x))).all()
