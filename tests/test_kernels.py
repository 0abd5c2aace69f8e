"""The sliding window's CUDA kernels on their own, and the rollback of the fused GPU step.

Each kernel against NumPy on random inputs: the fused first pass (slot write, saved
old row, NaN/inf flag, y = x / lambda), the explicit inverse's slot replacement
(against a dense inverse, and its cancellation guard), and a failed step or update on the kernel path leaving the
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


def _replace_case(m, s, rng, shift=0.7, near=None):
    """C = shift I + K and the Gram row u of a new gradient in slot s (a near-copy of
    slot ``near``'s gradient, when given)."""
    A = rng.standard_normal((m, 3 * m))
    Kg = A @ A.T / m                                  # Gram matrix of the slots
    g_new = rng.standard_normal(3 * m) if near is None else A[near] * (1 + 1e-9)
    A2 = A.copy()
    A2[s] = g_new
    u = A2 @ g_new / m                                 # the new Gram row of slot s
    Knew = Kg.copy()
    Knew[s, :] = u
    Knew[:, s] = u
    return Kg, u, Kg + shift * np.eye(m), Knew + shift * np.eye(m), Knew


def _run_replace(Ci, Kg, u, s, shift, rows=None):
    import cupy as cp
    from mfac_linalg.kernels import sliding as K
    m = Kg.shape[0]
    out = cp.full((m, m), np.nan)
    Kd = cp.asarray(Kg)
    Kold = cp.full(m, np.nan)
    x, z, c = cp.full(m, np.nan), cp.full(m, np.nan), cp.full(m, np.nan, dtype=np.float32)
    ax, dg, status = cp.full(m, np.nan), cp.full(m, np.nan), cp.full(2, np.nan)
    K.window_replace(Ci, out, cp.asarray(u), Kd, Kold, x, ax, dg, z, c, status, s, shift,
                     rows=rows)
    return out, z, c, status, Kd, Kold


@pytest.mark.parametrize("m,s", [(1, 0), (5, 4), (37, 0), (300, 123), (2051, 2050)])
def test_window_replace_rows_per_block_change_no_bit(m, s):
    """One to four rows of the inverse per thread block (``replace_rows``: four from m =
    4096): every output the same bits, the ragged last block (m not a multiple of the
    rows) included."""
    import cupy as cp
    from mfac_linalg.kernels import sliding as K
    rng = np.random.default_rng(m + 7 * s)
    Kg, u, C, _, _ = _replace_case(m, s, rng)
    Ci = cp.asarray(np.linalg.inv(C))
    ref = [a.get() for a in _run_replace(Ci, Kg, u, s, 0.7, rows=1)]
    assert ref[3][1] == 1.0 and np.isfinite(ref[0]).all()
    for rows in (2, 3, 4, None):
        got = [a.get() for a in _run_replace(Ci, Kg, u, s, 0.7, rows=rows)]
        for a, b in zip(ref, got):
            assert np.array_equal(a, b)
    assert K.replace_rows(4095) == 1 and K.replace_rows(4096) == K.REPLACE_ROWS == 4
    with pytest.raises(ValueError, match="rows must be in"):
        _run_replace(Ci, Kg, u, s, 0.7, rows=5)


@pytest.mark.parametrize("m,s", [(1, 0), (2, 1), (37, 0), (37, 36), (300, 123)])
def test_window_replace_against_dense_inverse(m, s):
    import cupy as cp
    rng = np.random.default_rng(m + s)
    shift = 0.7
    Kg, u, C, Cnew, Knew = _replace_case(m, s, rng, shift)
    Ci = cp.asarray(np.linalg.inv(C))
    out, z, c, status, Kd, Kold = _run_replace(Ci, Kg, u, s, shift)
    Cinv = np.linalg.inv(Cnew)
    tol = 1e-11 * np.linalg.cond(Cnew) * np.linalg.cond(C)
    assert np.abs(out.get() - Cinv).max() <= tol * np.abs(Cinv).max()
    zr = Cinv @ u
    assert np.abs(z.get() - zr).max() <= tol * np.abs(zr).max()
    assert np.array_equal(c.get(), z.get().astype(np.float32))
    ratio = np.exp(np.linalg.slogdet(Cnew)[1] - np.linalg.slogdet(C)[1])
    assert abs(status.get()[0] - ratio) <= tol * ratio
    assert status.get()[1] == 1.0                        # the guards trust it
    assert np.array_equal(Kd.get(), Knew)
    assert np.array_equal(Kold.get(), Kg[s])
    assert np.array_equal(Ci.get(), np.linalg.inv(C))     # the old inverse is left alone
    out1, z1 = out.get(), z.get()                          # no atomics: bit-reproducible
    for _ in range(3):
        o, zz = _run_replace(Ci, Kg, u, s, shift)[:2]
        assert np.array_equal(o.get(), out1) and np.array_equal(zz.get(), z1)


def test_window_replace_guard_flags_a_cancelling_pivot():
    """A new gradient that nearly repeats a held one with a tiny shift: the insertion
    pivot keeps fewer than 1e-6 of its diagonal, and the kernel says so (status[1] = 0:
    the engine rebuilds exactly)."""
    import cupy as cp
    rng = np.random.default_rng(3)
    m, s, shift = 12, 4, 1e-9
    Kg, u, C, _, _ = _replace_case(m, s, rng, shift, near=7)
    status = _run_replace(cp.asarray(np.linalg.inv(C)), Kg, u, s, shift)[3]
    assert status.get()[1] == 0.0


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


@pytest.mark.parametrize("shape,view", [
    ((5, 7), "c"), ((1, 1), "c"), ((0, 4), "c"), ((3, 0), "c"),
    ((2000, 3), "c"),             # few columns, many rows: cut into runs of rows
    ((1_100_000, 1), "c"),        # more runs than the grid's y extent allows
    ((64, 40_000), "c"),          # enough columns: one run
    ((3, 33, 129), "c"), ((4, 50, 10), "f"), ((4, 60, 30), "strided"),
    ((40, 64, 128), "c"),         # blocks of a block operator (block diagonal)
    ((2, 17, 300), "c"),          # two thread blocks a matrix, an odd number of rows
])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_sumsq_columns_against_float64(shape, view, dtype):
    """alpha + beta * sum_i V[.., i, j]^2 with float64 sums, rounded once: equal to the
    float64 result rounded to the dtype (to one unit), for C- and F-ordered and strided
    stacks; bit-reproducible."""
    import cupy as cp
    from mfac_linalg.kernels import reduce as R
    rng = np.random.default_rng(sum(shape))
    A = rng.standard_normal(shape) * np.logspace(-2, 2, shape[-1]) if shape[-1] else \
        np.zeros(shape)
    A = A.astype(dtype)
    V = cp.asarray(A)
    if view == "f":
        V = cp.asfortranarray(V)
    elif view == "strided":                 # every other column of a wider array
        W = np.full(shape[:-1] + (2 * shape[-1],), np.nan, dtype=dtype)
        W[..., ::2] = A
        V = cp.asarray(W)[..., ::2]
    alpha, beta = 0.25, -0.5
    out = R.sumsq_columns(V, alpha, beta)
    s = np.einsum("...ij,...ij->...j", A.astype(np.float64), A.astype(np.float64))
    ref = alpha + beta * s
    assert out.shape == ref.shape and out.dtype == np.dtype(dtype)
    got = out.get().astype(np.float64)
    # one rounding to the dtype, plus the float64 sums' own rounding (another order)
    tol = (np.spacing(np.abs(ref).astype(dtype)).astype(np.float64)
           + 2 * max(shape[-2], 1) * 2.0 ** -53 * (abs(alpha) + abs(beta) * s))
    assert np.all(np.abs(got - ref) <= tol)
    assert np.array_equal(R.sumsq_columns(V, alpha, beta).get(), out.get())


def test_sumsq_columns_slices_a_stack_beyond_the_grid(monkeypatch):
    import cupy as cp
    from mfac_linalg.kernels import reduce as R
    V = cp.asarray(np.random.default_rng(0).standard_normal((7, 5, 3)))
    whole = R.sumsq_columns(V).get()
    monkeypatch.setattr(R, "MAX_GRID", 2)
    assert np.array_equal(R.sumsq_columns(V).get(), whole)
    assert np.allclose(whole, (V.get() ** 2).sum(axis=1), rtol=1e-15, atol=0)


def test_sumsq_columns_float32_is_float64_faithful():
    """Sums that cancel in float32 (a large alpha, beta < 0): the kernel rounds once."""
    import cupy as cp
    from mfac_linalg.kernels import reduce as R
    rng = np.random.default_rng(1)
    A = (rng.standard_normal((1024, 1000)) / 32).astype(np.float32)
    s = (A.astype(np.float64) ** 2).sum(axis=0)
    alpha = float(s.max()) * 1.0001
    out = R.sumsq_columns(cp.asarray(A), alpha, -1.0).get().astype(np.float64)
    ref = alpha - s
    assert np.all(np.abs(out - ref) <= np.spacing(ref.astype(np.float32)).astype(np.float64))


#: stacks (nb, r, b) of the comparison below: both kernels, every register kernel
BLOCK_SHAPES = [(1, 1, 1), (3, 5, 7), (40, 64, 128), (7, 256, 128), (5, 33, 1000), (2, 700, 40),
                (6, 128, 128), (3, 20, 32), (5, 9, 64), (4, 100, 16), (2, 3, 4), (3, 1, 8),
                (3, 64, 64), (3, 128, 64), (2, 0, 16)]


def test_block_shapes_cover_every_register_kernel():
    """The comparison below runs every compiled register kernel (float32 and float64,
    each number of groups a thread) with the default cap, and the general kernel."""
    import cupy as cp
    from mfac_linalg.kernels import blocks as KB
    plans = {(dt, KB._reg_plan(cp.zeros(shape, dtype=dt)))
             for shape in BLOCK_SHAPES for dt in ("float32", "float64")}
    assert {(dt, p[0]) for dt, p in plans if p is not None} == {
        (dt, k) for dt in ("float32", "float64") for k in KB.REG_ITEMS}
    assert any(p is None for _, p in plans)


@pytest.mark.parametrize("nb,r,b", BLOCK_SHAPES)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("alpha,beta", [(2.0, -0.5), (0.0, 1.5)])
@pytest.mark.parametrize("max_threads", [0, 128, 256])
def test_block_apply_against_float64(nb, r, b, dtype, alpha, beta, max_threads, monkeypatch):
    """alpha x + beta V^T (V x) per block, float64 sums rounded once: within the float64
    product's own rounding plus one unit of the dtype; bit-reproducible.  Both kernels:
    the register kernel for small blocks (``max_threads`` its thread cap, in float32
    and float64) and, where it does not take V (or with the cap 0), the general one."""
    import cupy as cp
    from mfac_linalg.kernels import blocks as KB
    monkeypatch.setattr(KB, "REG_MAX_THREADS", max_threads)
    rng = np.random.default_rng(nb * r + b)
    V = rng.standard_normal((nb, r, b)).astype(dtype)
    X = rng.standard_normal((nb, b)).astype(dtype)
    Vd = cp.asarray(V)
    assert KB.fits(Vd)
    vec = 16 // V.itemsize                 # values of a 16-byte group
    bv = b // vec
    takes = (b % vec == 0 and bv <= 32 and bv & (bv - 1) == 0 and max_threads >= 32
             and r * bv <= KB.REG_ITEMS[-1] * max_threads)    # every value a register
    assert (KB._reg_plan(Vd) is not None) == takes
    Y = KB.apply(Vd, cp.asarray(X), alpha, beta)
    V64, X64 = V.astype(np.float64), X.astype(np.float64)
    U = np.einsum("nij,nj->ni", V64, X64)
    ref = alpha * X64 + beta * np.einsum("nij,ni->nj", V64, U)
    # float64 rounding of the two sums (another order) and one rounding to the dtype
    mag = abs(alpha) * np.abs(X64) + abs(beta) * np.einsum(
        "nij,ni->nj", np.abs(V64), np.einsum("nij,nj->ni", np.abs(V64), np.abs(X64)))
    tol = 4 * (r + b) * 2.0 ** -53 * mag + np.spacing(np.abs(ref).astype(dtype))
    assert Y.dtype == np.dtype(dtype) and Y.shape == (nb, b)
    assert np.all(np.abs(Y.get().astype(np.float64) - ref) <= tol)
    assert np.array_equal(KB.apply(Vd, cp.asarray(X), alpha, beta).get(), Y.get())


def test_block_apply_misaligned_stack_takes_the_general_kernel():
    """A stack whose memory starts off a 16-byte boundary (a view 8 bytes in) is not
    read with 16-byte loads: the general kernel runs, with the same result to rounding."""
    import cupy as cp
    from mfac_linalg.kernels import blocks as KB
    rng = np.random.default_rng(5)
    nb, r, b = 5, 32, 64
    base = cp.asarray(rng.standard_normal(nb * r * b + 2).astype(np.float32))
    V = base[2:].reshape(nb, r, b)
    assert V.data.ptr % 16 == 8 and KB.fits(V) and KB._reg_plan(V) is None
    aligned = V.copy()
    assert KB._reg_plan(aligned) is not None
    X = cp.asarray(rng.standard_normal((nb, b)).astype(np.float32))
    got, ref = KB.apply(V, X, 1.5, -0.25).get(), KB.apply(aligned, X, 1.5, -0.25).get()
    assert np.allclose(got, ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())


@pytest.mark.parametrize("what", ["clean", "nan", "inf", "overflow", "overflow in V^T V x"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("alpha", [2.0, 0.0])
@pytest.mark.parametrize("r,b", [(64, 128), (32, 64)])
def test_block_apply_flags_non_finite_results(what, dtype, alpha, r, b):
    """The stack kernel's check (the block operator's default check_finite): the flag is
    raised exactly when an entry of Y is not finite, from NaN/inf in one block's x (also
    in the primal form, alpha = 0: through u) or a result beyond the dtype's range with
    finite input (from alpha x or from beta V^T V x); Y is the unchecked kernel's.  Both
    kernels: (32, 64) is the register kernel's in either dtype, (64, 128) the general's."""
    import cupy as cp
    from mfac_linalg.kernels import blocks as KB
    rng = np.random.default_rng(11)
    nb = 9
    V = cp.asarray(rng.standard_normal((nb, r, b)).astype(dtype))
    X = rng.standard_normal((nb, b)).astype(dtype)
    beta = -1e-3
    if what == "overflow" and alpha == 0.0:
        pytest.skip("alpha x is 0 in the primal form")
    if what == "nan":
        X[5, b - 51] = np.nan
    elif what == "inf":
        X[nb - 1, 0] = -np.inf
    elif what == "overflow":
        X[3, 1] = 0.9 * np.finfo(dtype).max      # finite x, alpha x beyond the range
    elif what == "overflow in V^T V x":
        beta = 0.5 * float(np.finfo(dtype).max)  # |V^T V x| >= 2 somewhere: beyond
    assert (KB._reg_plan(V) is not None) == (b == 64)
    Y, flag = KB.apply(V, cp.asarray(X), alpha, beta, check=True)
    finite = bool(cp.isfinite(Y).all())
    assert finite == (what == "clean")
    assert float(flag[0]) == (0.0 if what == "clean" else 1.0)
    assert np.array_equal(Y.get(), KB.apply(V, cp.asarray(X), alpha, beta).get(), equal_nan=True)


@pytest.mark.parametrize("d,block", [(4096, 128), (10_000, 1024), (1000, 64), (1000, 16),
                                     (40_000, 40_000)])
def test_block_operator_checked_matvec_through_the_kernels(d, block):
    """The default check_finite matvec of a block operator on the GPU is the kernels'
    flag, read once for every stack (a ragged last block included; m > b the primal
    form; one large block the two float64-faithful passes): no separate pass over x.
    Agrees with the CPU operator and with the unchecked product bit for bit, refuses NaN
    in any block and an overflowing result by name, and keeps working after a refusal."""
    import cupy as cp
    rng = np.random.default_rng(d + block)
    G = rng.standard_normal((40, d)).astype(np.float32)
    cpu = ml.BlockInverseFisher(G.astype(np.float64), 0.3, block_size=block)
    gpu = ml.BlockInverseFisher(cp.asarray(G), 0.3, block_size=block)
    x = rng.standard_normal(d).astype(np.float32)
    assert gpu._checks_own_finite(cp.asarray(x)[:, None])
    checks = []
    real = B.check_finite
    try:       # the separate pass over x is skipped
        B.check_finite = lambda *a, **k: checks.append(a) or real(*a, **k)
        out = B.to_host(gpu.matvec(cp.asarray(x))).astype(np.float64)
    finally:
        B.check_finite = real
    assert checks == []
    ref = cpu.matvec(x.astype(np.float64))
    assert np.allclose(out, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    unchecked = ml.BlockInverseFisher(cp.asarray(G), 0.3, block_size=block,
                                      check_finite=False)
    loose = B.to_host(unchecked.matvec(cp.asarray(x)))
    if d != block:              # the block kernel: deterministic
        assert np.array_equal(out, loose)
    else:                       # one large block: the same passes, unchecked as a graph
        _ulp1(out.astype(np.float32), loose)
    for j in (0, d // 2, d - 1):              # first block, a middle one, the last
        bad = x.copy()
        bad[j] = np.nan
        with pytest.raises(ValueError, match="^x must be finite"):
            gpu.matvec(cp.asarray(bad))
    if block > 40:     # the dual form (m < b): y = (x - V^T V x) / lambda overflows
        tiny = ml.BlockInverseFisher(cp.asarray(G), 1e-18, block_size=block)
        with pytest.raises(ValueError, match="overflow"):
            tiny.matvec(cp.full(d, 1e21, dtype=cp.float32))
    again = B.to_host(gpu.matvec(cp.asarray(x)))
    if d != block:
        assert np.array_equal(again.astype(np.float64), out)
    else:                       # pass 1's float64 atomics: one float32 rounding
        _ulp1(again, out.astype(np.float32))


def test_block_apply_refuses_what_it_cannot_take():
    import cupy as cp
    from mfac_linalg.kernels import blocks as KB
    assert not KB.fits(cp.zeros((2, 3, 4), dtype=cp.float16))
    assert not KB.fits(cp.zeros((2, 3, 8))[:, :, ::2])            # not contiguous
    assert not KB.fits(cp.zeros((1, 8, 8192)))                     # shared memory
    assert KB.fits(cp.zeros((1, 8, 4000)))
    f32 = cp.float32
    assert KB.wide_fits(cp.zeros((1, 8, 8192), dtype=f32), 1.0)
    assert not KB.wide_fits(cp.zeros((1, 8, 64), dtype=f32), 1.0)     # small: apply/cuBLAS
    assert not KB.wide_fits(cp.zeros((2, 8, 8192), dtype=f32), 1.0)   # a stack
    assert not KB.wide_fits(cp.zeros((1, 8, 8190), dtype=f32), 1.0)   # rows not 16-byte
    assert not KB.wide_fits(cp.zeros((1, 8, 8192)), 1.0)              # float64
    assert not KB.wide_fits(cp.zeros((1, 8, 8192), dtype=f32), 0.0)   # primal form
    big = cp.zeros((1, 8, 8192), dtype=f32)
    assert KB.wide_fits(big, 1.0)
    saved = KB.WIDE_MAX_ELEMENTS, KB.GRAPH_MAX_ELEMENTS
    try:
        KB.WIDE_MAX_ELEMENTS = 8 * 8192 - 1
        assert not KB.wide_fits(big, 1.0)                   # large: cuBLAS is as fast
        assert KB.graph_fits(big, 1.0)                      # ... but not as one graph
        KB.GRAPH_MAX_ELEMENTS = 8 * 8192 - 1
        assert not KB.graph_fits(big, 1.0)
    finally:
        KB.WIDE_MAX_ELEMENTS, KB.GRAPH_MAX_ELEMENTS = saved
    # few rows over many columns: the graph's copies of x and y would cost more than
    # the launches it saves
    few = cp.zeros((1, 8, KB.GRAPH_SMALL // 8 + 4), dtype=f32)
    assert KB.wide_fits(few, 1.0) and not KB.graph_fits(few, 1.0)
    rows = KB.GRAPH_MIN_ROWS
    assert KB.graph_fits(cp.zeros((1, rows, KB.GRAPH_SMALL // rows + 4), dtype=f32), 1.0)
    assert not KB.graph_fits(cp.zeros((1, rows - 1, KB.GRAPH_SMALL // (rows - 1) + 4),
                                      dtype=f32), 1.0)
    assert not KB.graph_fits(cp.zeros((1, 8, 8192), dtype=f32), 0.0)   # primal form


@pytest.mark.parametrize("r,b", [(1, 8192), (3, 8200), (63, 10_000), (64, 40_000),
                                 (65, 40_000), (300, 100_000), (1500, 4096)])
@pytest.mark.parametrize("alpha,beta", [(2.0, -0.5), (1e-3, -1e-3)])
def test_apply_wide_against_float64(r, b, alpha, beta):
    """One large block through the sliding window's two float64-faithful passes (the
    static operator's GPU matvec): one rounding of a float64 result, deterministic, and
    across the row splits of pass 2 (r from 1 to 1500)."""
    import cupy as cp
    from mfac_linalg.kernels import blocks as KB
    rng = np.random.default_rng(r + b)
    V = rng.standard_normal((1, r, b)).astype(np.float32)
    x = rng.standard_normal(b).astype(np.float32)
    Vd = cp.asarray(V)
    assert KB.wide_fits(Vd, alpha)
    y, flag = KB.apply_wide(Vd, cp.asarray(x), alpha, beta, check=True)
    V64, x64 = V[0].astype(np.float64), x.astype(np.float64)
    ref = alpha * x64 + beta * (V64.T @ (V64 @ x64))
    mag = abs(alpha) * np.abs(x64) + abs(beta) * (np.abs(V64).T @ (np.abs(V64) @ np.abs(x64)))
    tol = 4 * (r + b) * 2.0 ** -53 * mag + 0.5 * np.spacing(np.abs(ref).astype(np.float32))
    assert y.dtype == np.float32 and y.shape == (b,)
    assert np.all(np.abs(y.get().astype(np.float64) - ref) <= tol)
    assert float(flag[0]) == 0.0
    y2, none = KB.apply_wide(Vd, cp.asarray(x), alpha, beta)
    # pass 1's float64 atomics: the same y up to one float32 rounding of another u
    one_ulp = np.spacing(np.abs(y.get()))
    assert none is None and np.all(np.abs(y2.get() - y.get()) <= one_ulp)


@pytest.mark.parametrize("what", ["nan", "inf", "overflow"])
@pytest.mark.parametrize("r,b", [(3, 8192), (200, 40_000)])
def test_apply_wide_flags_non_finite_results(what, r, b):
    """The kernel's flag (the static operator's check_finite, read once): raised exactly
    when an entry of the result is not finite, from a NaN/inf input or a result that
    overflows float32 only in the final scaling."""
    import cupy as cp
    from mfac_linalg.kernels import blocks as KB
    rng = np.random.default_rng(7)
    V = cp.asarray(rng.standard_normal((1, r, b)).astype(np.float32))
    x = rng.standard_normal(b).astype(np.float32)
    alpha, beta = 1.0, -1e-3
    clean = x.copy()
    if what == "nan":
        x[b // 2] = np.nan
    elif what == "inf":
        x[0] = np.inf
    else:
        x[1] = clean[1] = 3e37
        alpha = 100.0                                  # alpha x overflows, x is finite
    y, flag = KB.apply_wide(V, cp.asarray(x), alpha, beta, check=True)
    assert not bool(cp.isfinite(y).all())
    assert float(flag[0]) == 1.0
    if what == "overflow":
        clean[1] = 0.0
    y, flag = KB.apply_wide(V, cp.asarray(clean), alpha, beta, check=True)
    assert bool(cp.isfinite(y).all()) and float(flag[0]) == 0.0


def _ulp1(a, b):
    """a and b within one float32 unit in the last place: the float64 sums of pass 1
    (``rows_dot``) are atomic across column chunks, so their order, and a float64
    rounding of the result before its one float32 rounding, varies from run to run."""
    np.testing.assert_array_max_ulp(np.asarray(a), np.asarray(b), maxulp=1)


@pytest.mark.parametrize("m, d, graph", [(64, 40_000, True), (4, 1_100_000, False)])
def test_static_matvec_per_stream_state(m, d, graph):
    """The static operator's kernel matvec keeps its state per thread and stream: a
    ``WideGraph`` (r >= 16 or r d small) or an ``apply_wide`` workspace (zeroed by each
    product).  Products after a refusal, queued on two streams of one thread, from
    several threads at once, of a strided x, unchecked, and of a pickled copy (which
    makes its own) equal ``apply_wide`` with a fresh workspace."""
    import pickle
    import threading
    import cupy as cp
    from mfac_linalg.kernels import blocks as KB
    rng = np.random.default_rng(3)
    G = cp.asarray(rng.standard_normal((m, d)).astype(np.float32))
    op = ml.StaticInverseFisher(G, 0.5)
    lr = op._lr
    assert lr._gpu_paths()[:2] == (True, graph)      # the kernels' path (apply_wide)
    kind = "graph" if graph else "work"
    xs = [cp.asarray(rng.standard_normal(d).astype(np.float32)) for _ in range(4)]
    ref = [KB.apply_wide(lr.V, x, lr.alpha, lr.beta, True)[0].get() for x in xs]
    _ulp1(op.matvec(xs[0]).get(), ref[0])
    _ulp1(op.matvec(xs[0][:, None]).get()[:, 0], ref[0])       # (d, 1): through matmat
    assert lr._per_stream(kind) is lr._per_stream(kind)
    streams = [cp.cuda.Stream(non_blocking=True) for _ in range(2)]
    with streams[0]:
        w0 = lr._per_stream(kind)
    with streams[1]:
        assert lr._per_stream(kind) is not w0         # one a stream
    # one thread, products queued on two streams without waiting between them
    queued = []
    for k in range(8):
        with streams[k % 2]:
            queued.append(op.matvec(xs[k % 4]))
    for k, y in enumerate(queued):
        _ulp1(y.get(), ref[k % 4])
    bad = xs[0].copy()
    bad[7] = cp.nan
    with pytest.raises(ValueError, match="^x must be finite"):
        op.matvec(bad)
    _ulp1(op.matvec(xs[0]).get(), ref[0])                       # the flag was cleared
    wide = cp.stack([xs[3], xs[3]], axis=1).reshape(-1)[::2]    # strided
    _ulp1(op.matvec(wide).get(), ref[3])
    # unchecked: the same passes (as a graph without its flag where the graph takes V,
    # else cuBLAS), no refusal
    loose = ml.StaticInverseFisher(G, 0.5, check_finite=False)
    y = loose.matvec(xs[1])
    if graph:
        _ulp1(y.get(), ref[1])
    else:
        np.testing.assert_allclose(y.get(), ref[1], rtol=1e-4, atol=1e-4 * np.abs(ref[1]).max())
    assert not bool(cp.isfinite(loose.matvec(bad)).all())
    # a flag given by the caller (a block operator's stack): the workspace, the flag
    # raised there and not read
    flag = cp.zeros(1, dtype=np.float64)
    y = lr.matmat(bad[None, :, None], check=True, flag=flag)
    assert float(flag[0]) == 1.0 and y.shape == (1, d, 1)
    flag[:] = 0
    y = lr.matmat(xs[2][None, :, None], check=True, flag=flag)
    assert float(flag[0]) == 0.0
    _ulp1(y[0, :, 0].get(), ref[2])
    out, errors = {}, []

    def worker(t):
        try:
            with cp.cuda.Stream(non_blocking=True):
                out[t] = [op.matvec(xs[(t + k) % 4]).get() for k in range(12)]
        except Exception as exc:          # pragma: no cover - reported below
            errors.append(exc)
    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for t in range(4):
        for k in range(12):
            _ulp1(out[t][k], ref[(t + k) % 4])
    copy = pickle.loads(pickle.dumps(op))
    _ulp1(copy.matvec(xs[1]).get(), ref[1])


def test_static_matvec_graph_build_failure_falls_back(monkeypatch):
    """A CUDA error while building the graph (no memory, a spoiled capture) is not the
    caller's: that thread and stream take the kernels one by one (r d <= 5e7) or
    cuBLAS, with the same checks, and do not try again."""
    import cupy as cp
    from mfac_linalg.kernels import blocks as KB
    tries = []

    def broken(*args):
        tries.append(args)
        raise cp.cuda.runtime.CUDARuntimeError(2)          # cudaErrorMemoryAllocation
    monkeypatch.setattr(KB, "WideGraph", broken)
    rng = np.random.default_rng(5)
    G = cp.asarray(rng.standard_normal((64, 40_000)).astype(np.float32))
    op = ml.StaticInverseFisher(G, 0.5)
    lr = op._lr
    assert lr._gpu_paths()[:2] == (True, True)
    x = cp.asarray(rng.standard_normal(40_000).astype(np.float32))
    ref = KB.apply_wide(lr.V, x, lr.alpha, lr.beta, True)[0].get()
    _ulp1(op.matvec(x).get(), ref)
    _ulp1(op.matvec(x).get(), ref)
    assert len(tries) == 1 and lr._per_stream("graph") is None
    bad = x.copy()
    bad[3] = cp.inf
    with pytest.raises(ValueError, match="^x must be finite"):
        op.matvec(bad)
    loose = ml.StaticInverseFisher(G, 0.5, check_finite=False)
    np.testing.assert_allclose(loose.matvec(x).get(), ref, rtol=1e-4,
                               atol=1e-4 * np.abs(ref).max())        # cuBLAS
    assert len(tries) == 2


def test_static_matvec_one_cupy_vector_skips_the_general_path(monkeypatch):
    """``matvec``, ``rmatvec``, ``dot`` and ``@`` of a CuPy vector (d,) of the operator's
    dtype go to the graph straight (``_fast_vector``): the general validation is not
    run.  A float64 vector, or (d, 1), takes the general path and agrees."""
    import cupy as cp
    from mfac_linalg import _operator as OP
    rng = np.random.default_rng(6)
    G = cp.asarray(rng.standard_normal((64, 40_000)).astype(np.float32))
    op = ml.StaticInverseFisher(G, 0.5)
    x = cp.asarray(rng.standard_normal(40_000).astype(np.float32))
    ref = op.matvec(x).get()
    x64 = x.astype(np.float64)
    general = op.matvec(x64)
    assert general.dtype == np.float64
    _ulp1(general.get().astype(np.float32), ref)           # the same float32 product
    _ulp1(op.matvec(x[:, None]).get()[:, 0], ref)

    def refuse(*args, **kwargs):
        raise AssertionError("the general path ran")
    monkeypatch.setattr(OP.Operator, "_prepare", refuse)
    for y in (op.matvec(x), op.rmatvec(x), op.dot(x), op @ x):
        assert y.shape == (40_000,) and y.dtype == np.float32
        _ulp1(y.get(), ref)
    with pytest.raises(AssertionError, match="general path"):
        op.matvec(x64)
    with pytest.raises(AssertionError, match="general path"):
        op.matmat(x[:, None])


def test_per_stream_state_keeps_the_latest_streams(monkeypatch):
    """At most ``STREAMS_KEPT`` streams a thread keep their state; the least recently
    used goes first, and a stream used again keeps its own."""
    import cupy as cp
    from mfac_linalg.kernels import blocks as KB
    monkeypatch.setattr(KB, "STREAMS_KEPT", 2)
    G = cp.asarray(np.random.default_rng(0).standard_normal((32, 40_000)).astype(np.float32))
    lr = ml.StaticInverseFisher(G, 0.5)._lr
    s = [cp.cuda.Stream(non_blocking=True) for _ in range(3)]
    got = []
    for k in (0, 1, 0, 2, 0):
        with s[k]:
            got.append(lr._per_stream("graph"))
    assert got[2] is got[0] and got[4] is got[0]       # s0 kept: used most recently
    assert lr._streams["graph"].streams() == [s[2].ptr, s[0].ptr]


@pytest.mark.parametrize("op", ["static", "one block"])
@pytest.mark.parametrize("d", [16, 40_000, 40_003])
def test_gpu_matvec_check_finite_through_the_kernels(op, d):
    """The default check_finite GPU matvec of one large block (the kernels' flag, one
    host read; d = 40_003 takes the cuBLAS path, and d = 16 too for the static operator)
    agrees with the CPU operator, refuses NaN
    input and an overflowing result by name, and keeps working after a refusal."""
    import cupy as cp
    rng = np.random.default_rng(d)
    G = rng.standard_normal((12, d)).astype(np.float32)
    if op == "static":
        make = lambda g, lam: ml.StaticInverseFisher(g, lam)
    else:
        make = lambda g, lam: ml.BlockInverseFisher(g, lam, block_size=d)
    cpu, gpu = make(G.astype(np.float64), 0.5), make(cp.asarray(G), 0.5)
    x = rng.standard_normal(d).astype(np.float32)
    ref = cpu.matvec(x.astype(np.float64))
    out = B.to_host(gpu.matvec(cp.asarray(x))).astype(np.float64)
    assert np.allclose(out, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    bad = x.copy()
    bad[d // 3] = np.nan
    with pytest.raises(ValueError, match="^x must be finite"):
        gpu.matvec(cp.asarray(bad))
    # the block operator checks its result where kernels run (d = 16: the stack kernel;
    # 40_000: the two passes); through cuBLAS (40_003) it returns inf on the GPU
    if op == "static" or d != 40_003:
        tiny = make(cp.asarray(G), 1e-18)             # about the smallest float32 damping
        with pytest.raises(ValueError, match="overflow"):
            tiny.matvec(cp.full(d, 1e21, dtype=cp.float32))  # x / lambda overflows float32
    again = B.to_host(gpu.matvec(cp.asarray(x)))
    assert np.allclose(again.astype(np.float64), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("m", [2049, 4100, 13_000])
def test_combine_float32_one_split_over_many_coefficient_tiles(monkeypatch, m):
    """Pass 2 (float32 accumulation) with every row in one split: the coefficients go
    through shared memory in tiles of 2048 (the old kernel asked for m * 4 bytes of
    dynamic shared memory and could not launch beyond 12288 rows)."""
    import cupy as cp
    from mfac_linalg.kernels import sliding as K
    monkeypatch.setattr(K, "_sm_count", lambda: 1)
    ld = 3080                      # 4 column blocks: one split with one multiprocessor
    assert K.combine_grid(m, ld, "float32")[1] == 1
    rng = np.random.default_rng(m)
    G = rng.standard_normal((m, ld)).astype(np.float32)
    c = (rng.standard_normal(m) / m).astype(np.float32)
    y0 = rng.standard_normal(ld).astype(np.float32)
    y = cp.asarray(y0)
    K.combine(cp.asarray(G), "float32", cp.asarray(c), y, -0.5, rows=m)
    G64, c64 = G.astype(np.float64), c.astype(np.float64)
    ref = y0 - 0.5 * (G64.T @ c64)
    bound = 4 * m * 2.0 ** -24 * (np.abs(y0) + 0.5 * (np.abs(G64).T @ np.abs(c64)))
    assert np.all(np.abs(y.get() - ref) <= bound)


def test_pinned_read_equals_get():
    """The page-locked reader of the engines' status and the buffer's flag: the values
    of ``.get()`` for up to n float64 values; anything else through ``to_host``."""
    import cupy as cp
    from mfac_linalg.kernels import sliding as K
    read = K.PinnedRead(4)
    for n in (1, 2, 4):
        a = cp.asarray(np.array([1.5, -np.inf, np.nan, 3e300])[:n])
        assert np.array_equal(read(a), a.get(), equal_nan=True)
    first = read(cp.asarray([7.0, 8.0]))
    read(cp.asarray([9.0, 10.0]))
    assert first.tolist() == [7.0, 8.0]              # a copy, not the page-locked memory
    for a in (cp.arange(5, dtype=cp.float64), cp.arange(8, dtype=cp.float64)[::2],
              cp.arange(3, dtype=cp.float32)):
        assert np.array_equal(read(a), a.get()) and read(a).dtype == a.dtype


def test_static_unchecked_graphs_evicted_with_launches_queued():
    """More streams than a thread keeps (``STREAMS_KEPT``), unchecked products queued on
    each without waiting: the ``WideGraph`` of a dropped stream goes with launches still
    queued, and every product equals ``apply_wide``'s."""
    import cupy as cp
    from mfac_linalg.kernels import blocks as KB
    rng = np.random.default_rng(9)
    G = cp.asarray(rng.standard_normal((64, 40_000)).astype(np.float32))
    loose = ml.StaticInverseFisher(G, 0.5, check_finite=False)
    lr = loose._lr
    assert lr._gpu_paths()[1]
    xs = [cp.asarray(rng.standard_normal(40_000).astype(np.float32)) for _ in range(4)]
    ref = [KB.apply_wide(lr.V, x, lr.alpha, lr.beta, True)[0].get() for x in xs]
    streams = [cp.cuda.Stream(non_blocking=True) for _ in range(KB.STREAMS_KEPT + 2)]
    ys = []
    for rep in range(3):
        for k, s in enumerate(streams):
            with s:
                ys.append((k + rep, loose.matvec(xs[(k + rep) % 4])))
    cp.cuda.Device().synchronize()
    for k, y in ys:
        _ulp1(y.get(), ref[k % 4])
