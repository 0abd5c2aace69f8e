"""Float64-faithful passes over float32 and 16-bit storage (docs/math.md §7).

``accumulate="float64"``: the passes over the ring buffer accumulate in float64 and
round the result once, so a float32 window's step agrees with a float64 window over
the same stored gradients to within a few float32 roundings of the exact result, even
where y = (x - G^T c) / lambda cancels (small damping).  The instances are the
benchmark's (docs/benchmarks.md): coordinate scales over four decades, as across the
layers of a network, and lambda = rel E|g|^2 / m.  Each test also runs the float32
accumulation on the same data and asserts that it misses the bound at small damping,
so the bound is one the test can fail.
"""
import pickle

import numpy as np
import pytest

import mfac_linalg as ml
from mfac_linalg import _backend as B

from oracles import bf16_bits, bf16_values



def gpu(test):
    """Marked ``gpu``; skipped where no CUDA GPU is present."""
    return pytest.mark.gpu(pytest.mark.skipif(not B.gpu_available(),
                                              reason="needs CuPy and a CUDA GPU")(test))


def _scaled_run(xp, d, m, steps, rel, *, device, dtype="float32", seed=21, **kw):
    """Max over ``steps`` steps of |y - y64| / |y64| divided by the float32 rounding
    of y64 (|fl32(y64) - y64| / |y64|), for a window of ``dtype`` storage against a
    float64 window fed the same stored gradients."""
    rs = np.random.default_rng(seed)
    scales = np.logspace(-2, 2, d)
    lam = rel * float((scales ** 2).sum()) / m
    w = ml.SlidingWindowInverseFisher(d, m, lam, dtype=dtype, device=device, **kw)
    w64 = ml.SlidingWindowInverseFisher(d, m, lam, dtype="float64", device=device)
    worst = 0.0
    for _ in range(steps):
        g = (rs.standard_normal(d) * scales).astype(np.float32)
        if dtype == "bfloat16":
            g = bf16_values(bf16_bits(g)).astype(np.float32)   # the values as stored
        y = B.to_host(w.step(xp.asarray(g))).astype(np.float64)
        y64 = B.to_host(w64.step(xp.asarray(g.astype(np.float64))))
        n64 = np.linalg.norm(y64)
        rnd = np.linalg.norm(y64.astype(np.float32).astype(np.float64) - y64) / n64
        worst = max(worst, np.linalg.norm(y - y64) / n64 / rnd)
    return worst, w


# -- the CPU: selectable ------------------------------------------------------------------

@pytest.mark.parametrize("engine", ["cholesky", "explicit"])
def test_cpu_float64_accumulation_is_faithful(engine):
    worst, w = _scaled_run(np, 3000, 24, 60, 1e-5, device="cpu", engine=engine,
                           accumulate="float64")
    assert w.accumulate == "float64" and "accumulate=float64" in repr(w)
    assert worst <= 10.0, worst
    worst32, w32 = _scaled_run(np, 3000, 24, 60, 1e-5, device="cpu", engine=engine)
    assert w32.accumulate == "float32"             # "auto" on the CPU
    assert worst32 > 10.0 * worst                  # the bound is one float32 sums miss


@pytest.mark.parametrize("rel", [1e-3, 1e-1])
def test_cpu_float64_accumulation_at_larger_damping(rel):
    worst, _ = _scaled_run(np, 2000, 16, 40, rel, device="cpu", accumulate="float64")
    assert worst <= 10.0, worst


def test_cpu_float64_accumulation_products_and_state():
    """Every query of a float64-accumulating window against the float64 window, and its
    Gram matrix (rebuilds, refresh) accumulated in float64 too."""
    rng = np.random.default_rng(3)
    d, m = 700, 9
    G = (rng.standard_normal((m + 4, d)) * np.logspace(-2, 2, d)).astype(np.float32)
    lam = 1e-6 * float((G.astype(np.float64) ** 2).sum(1).mean()) / m
    w = ml.SlidingWindowInverseFisher(d, m, lam, accumulate="float64", refresh_every=3)
    w64 = ml.SlidingWindowInverseFisher(d, m, lam, dtype="float64", refresh_every=3)
    for g in G:
        w.update(g)
        w64.update(g.astype(np.float64))
    X = rng.standard_normal((d, 3)).astype(np.float32)
    Y, Y64 = w.matmat(X).astype(np.float64), w64.matmat(X.astype(np.float64))
    rnd = np.linalg.norm(Y64.astype(np.float32) - Y64)
    assert np.linalg.norm(Y - Y64) <= 10 * rnd
    y, y64 = w.matvec(X[:, 0]).astype(np.float64), Y64[:, 0]
    assert np.linalg.norm(y - y64) <= 10 * np.linalg.norm(y64.astype(np.float32) - y64)
    w.refresh()
    w64.refresh()
    Y = w.matmat(X).astype(np.float64)
    assert np.linalg.norm(Y - w64.matmat(X.astype(np.float64))) <= 10 * rnd


def test_accumulate_is_validated_and_kept():
    with pytest.raises(ValueError, match="accumulate"):
        ml.SlidingWindowInverseFisher(10, 2, 0.1, accumulate="double")
    with pytest.raises(ValueError, match="accumulate"):
        ml.SlidingWindowInverseFisher(10, 2, 0.1, dtype="float64", accumulate="float32")
    assert ml.SlidingWindowInverseFisher(10, 2, 0.1, dtype="float64").accumulate == "float64"
    w = ml.SlidingWindowInverseFisher(10, 2, 0.1, accumulate="float64")
    w.update(np.arange(10.0))
    c = pickle.loads(pickle.dumps(w))
    assert c.accumulate == "float64"
    assert np.array_equal(c.matvec(np.ones(10)), w.matvec(np.ones(10)))


def test_load_takes_accumulate(tmp_path):
    w = ml.SlidingWindowInverseFisher(10, 2, 0.1).update(np.arange(10.0))
    w.save(tmp_path / "w.npz")
    back = ml.SlidingWindowInverseFisher.load(tmp_path / "w.npz", accumulate="float64")
    assert back.accumulate == "float64"
    x = np.linspace(-1, 1, 10)
    assert np.allclose(back.matvec(x), w.matvec(x), rtol=1e-6, atol=0)


@gpu
# -- the GPU: the float64-accumulating kernels (opt-in) -------------------------------------

@pytest.mark.parametrize("engine", ["cholesky", "explicit"])
@pytest.mark.parametrize("rel", [1e-5, 1e-3, 1e-1])
@pytest.mark.parametrize("d,m", [(20_000, 64), (3_000_000, 8)])     # split and unsplit pass 2
def test_gpu_window_step_is_float64_faithful(engine, rel, d, m):
    import cupy as cp
    steps = 80 if d < 1e6 else 12
    worst, w = _scaled_run(cp, d, m, steps, rel, device="gpu", engine=engine,
                           accumulate="float64")
    assert w.accumulate == "float64"
    assert worst <= 10.0, worst
    if rel == 1e-5:
        worst32, _ = _scaled_run(cp, d, m, steps, rel, device="gpu", engine=engine,
                                 accumulate="float32")
        assert worst32 > 10.0 * worst


@gpu
@pytest.mark.parametrize("engine", ["cholesky", "explicit"])
def test_gpu_bfloat16_window_is_float64_faithful_over_its_stored_values(engine):
    import cupy as cp
    worst, _ = _scaled_run(cp, 20_000, 64, 60, 1e-4, device="gpu", dtype="bfloat16",
                           engine=engine, accumulate="float64")
    assert worst <= 10.0, worst


def test_fast_float64_is_false_on_the_cpu():
    assert B.backend_for_device("cpu").fast_float64 is False
    assert B.FAST_FLOAT64 == ("60", "70", "80", "90", "100")


@pytest.mark.parametrize("cc,name,fast", [
    ("90", "NVIDIA H100 80GB HBM3", True), ("90", "NVIDIA H200", True),
    ("80", "NVIDIA A100-SXM4-80GB", True), ("70", "Tesla V100-SXM2-16GB", True),
    ("90", "NVIDIA H800", False), ("90", "NVIDIA H20", False),
    ("89", "NVIDIA L40S", False), ("86", "NVIDIA GeForce RTX 3090", False),
    ("75", "Tesla T4", False), ("", "", False)])
def test_fast_float64_table(cc, name, fast):
    """By compute capability and name: the export parts of 9.0 (H800, H20) have float64
    cut to about 1 TFLOP/s; the H200 is not an H20."""
    assert B.has_fast_float64(cc, name) is fast


@gpu
def test_gpu_auto_accumulates_in_float64_where_float64_is_fast():
    """"auto" is float64 for float32 storage on H100/H200-class GPUs (compute capability
    in FAST_FLOAT64), float32 elsewhere and for 16-bit storage; float64 storage is always
    float64."""
    import cupy as cp
    be = B.backend_for_device("gpu")
    cc = str(cp.cuda.Device().compute_capability)
    assert be.fast_float64 is (cc in B.FAST_FLOAT64)
    for dtype in ("float32", "bfloat16", "float16"):
        w = ml.SlidingWindowInverseFisher(100, 4, 0.1, dtype=dtype, device="gpu")
        assert w.accumulate == ("float64" if be.fast_float64 and dtype == "float32"
                                else "float32")
        assert ml.SlidingWindowInverseFisher(100, 4, 0.1, dtype=dtype, device="gpu",
                                             accumulate="float32").accumulate == "float32"
    assert ml.SlidingWindowInverseFisher(100, 4, 0.1, dtype="float64",
                                         device="gpu").accumulate == "float64"


@gpu
def test_gpu_faithful_matvec_matmat_and_determinism():
    """matvec (kernels) and matmat (float64 chunks) of a float64-accumulating window
    against a float64 window; the kernel pass 2 adds its split partial sums in a fixed
    order, so a repeated matvec is bit for bit the same."""
    import cupy as cp
    rng = np.random.default_rng(5)
    d, m = 50_000, 40
    scales = np.logspace(-2, 2, d)
    lam = 1e-5 * float((scales ** 2).sum()) / m
    G = (rng.standard_normal((m, d)) * scales).astype(np.float32)
    w = ml.SlidingWindowInverseFisher.from_gradients(cp.asarray(G), lam, accumulate="float64")
    w64 = ml.SlidingWindowInverseFisher.from_gradients(cp.asarray(G, dtype=cp.float64), lam)
    X = cp.asarray(rng.standard_normal((d, 3)).astype(np.float32))
    Y64 = w64.matmat(X.astype(cp.float64))
    rnd = float(cp.linalg.norm(Y64.astype(cp.float32) - Y64))
    assert float(cp.linalg.norm(w.matmat(X).astype(cp.float64) - Y64)) <= 10 * rnd
    y = w.matvec(X[:, 0])
    r1 = float(cp.linalg.norm(Y64[:, 0].astype(cp.float32) - Y64[:, 0]))
    assert float(cp.linalg.norm(y.astype(cp.float64) - Y64[:, 0])) <= 10 * r1
    assert all(bool((w.matvec(X[:, 0]) == y).all()) for _ in range(5))


@gpu
@pytest.mark.parametrize("kind", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("m,ld,rows", [(1, 8, 1), (7, 40, 5), (70, 20_008, 70),
                                       (300, 100_000, 257), (5, 2_000_000, 5)])
def test_wide_kernels_against_float64(kind, m, ld, rows):
    """rows_dot with float64 accumulators and combine_wide against float64 NumPy on
    cancelling data: x = G^T c + a small remainder."""
    import cupy as cp
    from mfac_linalg.kernels import sliding as K
    from test_kernels import _stored
    rng = np.random.default_rng(m + ld + rows)
    raw, G = _stored(rng.standard_normal((m, ld)).astype(np.float32), kind)
    c = rng.standard_normal(m)
    c[rows:] = np.nan                                     # never read
    x = (G[:rows].T @ c[:rows] + 1e-4 * rng.standard_normal(ld)).astype(np.float32)
    Gd, xd = cp.asarray(raw), cp.asarray(x)
    u = cp.zeros(m)
    K.rows_dot(Gd, kind, xd, u, rows=rows, wide=True)
    x64 = x.astype(np.float64)
    ref = G[:rows] @ x64
    scale = np.abs(G[:rows]) @ np.abs(x64)
    assert np.all(np.abs(u.get()[:rows] - ref) <= 1e-13 * scale)
    bx, splits, _ = K.combine_grid(rows, ld, kind)
    part = cp.full(splits * ld, np.nan) if splits > 1 else None
    count = cp.zeros(bx, dtype=cp.uint32) if splits > 1 else None
    lam = 0.37
    outs = []
    for _ in range(3):
        y = cp.full(ld, np.nan, dtype=cp.float32)
        K.combine_wide(Gd, kind, cp.asarray(c), xd, y, lam, part, count, rows=rows)
        outs.append(y.get())
    exact = (x64 - G[:rows].T @ c[:rows]) / lam
    bound = 1e-13 * (np.abs(x64) + np.abs(G[:rows]).T @ np.abs(c[:rows])) / lam
    err = np.abs(outs[0] - exact)
    ulp = np.spacing(np.abs(exact).astype(np.float32)).astype(np.float64)
    assert np.all(err <= 0.5 * ulp + bound)                # one rounding of a float64 result
    assert all(np.array_equal(o, outs[0]) for o in outs)   # deterministic
    if count is not None:
        assert not count.get().any()                       # left zeroed for the next call


@gpu
@pytest.mark.parametrize("accumulate", ["float32", "float64"])
def test_gpu_kernel_paths_take_vectors_at_odd_offsets(accumulate):
    """A float32 view at a 4-byte offset (not 16-byte aligned) reaches the kernels' 16-byte
    vector loads only through a copy: the same results as for an aligned copy."""
    import cupy as cp
    rng = np.random.default_rng(7)
    d = 4096
    # rows of d + 4 values (a multiple of 16 bytes), each view 4 bytes in: none aligned
    big = cp.asarray(rng.standard_normal((6, d + 4)).astype(np.float32))
    views = [big[i, 1:d + 1] for i in range(6)]
    assert all(v.data.ptr % 16 for v in views)
    a = ml.SlidingWindowInverseFisher(d, 4, 0.5, device="gpu", accumulate=accumulate)
    b = ml.SlidingWindowInverseFisher(d, 4, 0.5, device="gpu", accumulate=accumulate)
    for v in views[:5]:
        assert bool((a.step(v) == b.step(v.copy())).all())
    assert bool((a.matvec(views[5]) == b.matvec(views[5].copy())).all())
    op = ml.StaticInverseFisher(big[:4, :d].copy(), 0.5)
    assert bool((op.matvec(views[5]) == op.matvec(views[5].copy())).all())


@pytest.mark.parametrize("device", ["cpu", pytest.param("gpu", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not B.gpu_available(), reason="needs CuPy and a CUDA GPU")])])
@pytest.mark.parametrize("engine", ["cholesky", "explicit"])
def test_float64_accumulation_takes_huge_float32_gradients(device, engine):
    """g of float32 values near 1e20: g.g (1e42) overflows float32 (a float32-accumulating
    window refuses g) but not float64, so a float64-accumulating window takes g and agrees
    with a float64 window fed the same values: steps, matvec, the diagonal."""
    xp = np if device == "cpu" else pytest.importorskip("cupy")
    rng = np.random.default_rng(3)
    d, m, lam = 60, 3, 1e10
    w = ml.SlidingWindowInverseFisher(d, m, lam, device=device, engine=engine,
                                      accumulate="float64")
    w64 = ml.SlidingWindowInverseFisher(d, m, lam, dtype="float64", device=device,
                                        engine=engine)
    for scale in (1.0, 1e20, 3e19, 1e20, 1.0):
        g = (scale * rng.standard_normal(d)).astype(np.float32)
        y = B.to_host(w.step(xp.asarray(g))).astype(np.float64)
        y64 = B.to_host(w64.step(xp.asarray(g.astype(np.float64))))
        assert np.isfinite(y).all()
        # a huge g is all but projected out: y is what cancellation leaves of terms of
        # size |g| / lambda, float64 rounding of those in both windows
        assert np.linalg.norm(y - y64) <= (1e-6 * np.linalg.norm(y64)
                                          + 1e-13 * np.linalg.norm(g.astype(np.float64)) / lam)
    x = rng.standard_normal(d).astype(np.float32)
    v = B.to_host(w.matvec(xp.asarray(x))).astype(np.float64)
    v64 = B.to_host(w64.matvec(xp.asarray(x.astype(np.float64))))
    assert np.linalg.norm(v - v64) <= 1e-6 * np.linalg.norm(v64)
    dg = B.to_host(w.diagonal()).astype(np.float64)
    assert np.allclose(dg, B.to_host(w64.diagonal()), rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="too large"):     # the float32 window refuses g
        w32 = ml.SlidingWindowInverseFisher(d, m, lam, device=device, accumulate="float32")
        w32.update(xp.asarray(np.full(d, 1e20, dtype=np.float32)))


@pytest.mark.parametrize("kw", [dict(dtype="float64", engine="explicit"),
                                dict(dtype="float32", accumulate="float64"),
                                dict(dtype="float32", engine="explicit", normalize="count")])
def test_load_keeps_the_saved_engine_and_is_bit_identical(tmp_path, kw):
    """load() built an "auto" engine and rebuilt the state from the Gram matrix (results
    off by 5e-12 for an explicit-engine window); it keeps the saved scheme now, and with
    the saved accumulate the products are bit-identical."""
    rng = np.random.default_rng(0)
    w = ml.SlidingWindowInverseFisher(20, 4, 1e-2, **kw)
    for _ in range(6):
        w.update(rng.standard_normal(20))
    path = str(tmp_path / "w.npz")
    w.save(path)
    same = ml.SlidingWindowInverseFisher.load(path, accumulate=w.accumulate)
    assert same.engine == w.engine
    x = rng.standard_normal(20)
    assert np.array_equal(same @ x, w @ x)
    g = rng.standard_normal(20)
    assert np.array_equal(same.step(g), w.step(g))
    assert ml.SlidingWindowInverseFisher.load(path, engine="cholesky").engine == "cholesky"
