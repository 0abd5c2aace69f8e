"""Checkpoints, copies and handed-out arrays of the sliding window (issue 11 classes)."""
import copy
import io
import os
import pickle
import zipfile

import numpy as np
import pytest

import mfac_linalg as ml
from mfac_linalg import _backend as B

S = ml.SlidingWindowInverseFisher


def _window(engine="cholesky", normalize="window", n=6, m=4, d=10, seed=0, **kw):
    rng = np.random.default_rng(seed)
    w = S(d, m, 0.1, dtype="float64", normalize=normalize, engine=engine, **kw)
    w.update(rng.standard_normal((n, d)))
    return w


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert np.array_equal(sa[k], sb[k]) if isinstance(sa[k], np.ndarray) else sa[k] == sb[k], k


def test_save_writes_exactly_the_path_and_load_reads_it(tmp_path):
    w = _window()
    p = tmp_path / "ckpt"
    w.save(p)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]          # no suffix, no temporary left
    w2 = S.load(p)
    _same_state(w, w2)
    w.save(str(p))                                            # overwrite in place
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_save_refuses_a_directory_and_a_bad_path_type(tmp_path):
    w = _window()
    with pytest.raises(ValueError, match="is a directory"):
        w.save(tmp_path)
    assert os.listdir(tmp_path) == []
    with pytest.raises(TypeError, match="path must be a path"):
        w.save(3)
    with pytest.raises(ValueError, match="is a directory"):
        S.load(tmp_path)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")
def test_save_and_load_refuse_non_regular_files_and_write_through_links(tmp_path):
    # a rename onto a device or FIFO replaced it (save("/dev/null") turned the device
    # into a regular file); load on a FIFO blocked forever
    w = _window()
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for call in (lambda: w.save(fifo), lambda: S.load(fifo)):
        with pytest.raises(ValueError, match="not a regular file"):
            call()
    assert sorted(os.listdir(tmp_path)) == ["fifo"] and not os.path.isfile(fifo)
    real, link = tmp_path / "real", tmp_path / "link"
    S(10, 4, 0.1, dtype="float64").save(real)
    os.symlink(real, link)
    w.save(link)                                 # through the link: the link survives
    assert os.path.islink(link)
    _same_state(w, S.load(real))


def test_saved_files_get_the_umask_mode_or_the_replaced_files(tmp_path):
    # mkstemp's 0600 was kept: a checkpoint was unreadable to the group, and a replaced
    # file lost its mode
    w = _window()
    mask = os.umask(0o022)
    try:
        w.save(tmp_path / "a")
        assert os.stat(tmp_path / "a").st_mode & 0o777 == 0o644
        os.chmod(tmp_path / "a", 0o640)
        w.save(tmp_path / "a")
        assert os.stat(tmp_path / "a").st_mode & 0o777 == 0o640
        from mfac_linalg.distributed import ShardedSlidingWindowInverseFisher
        p = ShardedSlidingWindowInverseFisher(3, 2, 0.5, dtype="float64").save(tmp_path / "s")
        assert os.stat(p).st_mode & 0o777 == 0o644
    finally:
        os.umask(mask)


def test_failed_save_leaves_the_previous_file_intact(tmp_path, monkeypatch):
    w = _window()
    p = tmp_path / "ckpt.npz"
    w.save(p)
    good = p.read_bytes()
    w.update(np.ones(10))

    def broken(f, **arrays):
        f.write(b"partial data")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(np, "savez", broken)
    with pytest.raises(OSError, match="No space left"):
        w.save(p)
    assert p.read_bytes() == good
    assert os.listdir(tmp_path) == ["ckpt.npz"]


def test_unreadable_files_give_value_errors_naming_the_file(tmp_path):
    w = _window()
    p = tmp_path / "w.npz"
    w.save(p)
    data = p.read_bytes()
    npy = tmp_path / "x.npy"
    np.save(npy, np.arange(3))
    corrupt_cd = tmp_path / "cd.npz"
    corrupt_cd.write_bytes(data[:-30] + b"\xff" * 30)        # central directory damaged
    trunc = tmp_path / "trunc.npz"
    trunc.write_bytes(data[: len(data) // 2])
    text = tmp_path / "text.npz"
    text.write_text("not an archive")
    for bad in (npy, corrupt_cd, trunc, text):
        with pytest.raises(ValueError, match=str(bad.name)):
            S.load(bad)
    with pytest.raises(FileNotFoundError):
        S.load(tmp_path / "missing.npz")


def _rewrite(src, dst, members):
    """Copy the archive ``src`` to ``dst`` with some members replaced (raw bytes)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            name = info.filename
            zout.writestr(name, members.pop(name, zin.read(name)))
        for name, raw in members.items():
            zout.writestr(name, raw)


def _npy_bytes(a):
    f = io.BytesIO()
    np.lib.format.write_array(f, np.asarray(a), allow_pickle=False)
    return f.getvalue()


def test_members_are_checked_before_anything_is_read(tmp_path):
    w = _window()
    p = tmp_path / "w.npz"
    w.save(p)
    # a header declaring a (1e5, 1e5) float64 K (74.5 GiB) with no data behind it
    f = io.BytesIO()
    np.lib.format.write_array_header_1_0(f, {"descr": "<f8", "fortran_order": False,
                                             "shape": (100_000, 100_000)})
    _rewrite(p, tmp_path / "huge.npz", {"K.npy": f.getvalue()})
    with pytest.raises(ValueError, match=r"huge.npz.*K must have shape \(4, 4\).*"
                                         r"declares shape \(100000, 100000\)"):
        S.load(tmp_path / "huge.npz")
    _rewrite(p, tmp_path / "extra.npz", {"notes.txt": b"hello"})
    with pytest.raises(ValueError, match="extra.npz.*unexpected member 'notes.txt'"):
        S.load(tmp_path / "extra.npz")
    obj = io.BytesIO()
    np.lib.format.write_array(obj, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    _rewrite(p, tmp_path / "obj.npz", {"K.npy": obj.getvalue()})
    with pytest.raises(ValueError, match="obj.npz.*K holds Python objects"):
        S.load(tmp_path / "obj.npz")
    _rewrite(p, tmp_path / "short.npz", {"G.npy": _npy_bytes(np.zeros((4, 10)))[:-40]})
    with pytest.raises(ValueError, match="short.npz"):
        S.load(tmp_path / "short.npz")


@pytest.mark.parametrize("engine", ["cholesky", "explicit"])
def test_inconsistent_states_are_refused(engine, tmp_path):
    w = _window(engine=engine, normalize="count", n=3)
    st = w.state_dict()

    def tweak(**change):
        bad = dict(st)
        bad.update(change)
        return bad
    K = st["K"].copy()
    K[0, 1] += 0.05 * abs(K[0, 1]) + 1e-3
    K[1, 0] = K[0, 1]
    F = st["F"].copy()
    F[1, 0] += np.abs(F).max()
    G = st["G"].copy()
    G[0, 3] += 0.01
    cases = [
        (tweak(K=K), "K is not the Gram matrix"),
        (tweak(G=G), "K is not the Gram matrix"),
        (tweak(F=F), "F is not the"),
        (tweak(damping=0.2), "F is not the"),
        (tweak(normalize="window"), "F is not the"),
        (tweak(count=2), "rows beyond 2 of G are not empty"),
        (tweak(since_refresh=st["refresh_every"] + 1), "exceeds refresh_every"),
        (tweak(K=st["K"] * np.where(np.eye(4) > 0, 1, 1 + 1e-9)), "K is not the Gram"),
        (tweak(K=st["K"] + np.triu(np.full((4, 4), 1e-3), 1)), "K is not symmetric"),
    ]
    if engine == "explicit":
        cases.append((tweak(logdet_C=st["logdet_C"] + 1.0), "logdet_C="))
    target = _window(engine=engine, normalize="count", n=0)
    before = target.state_dict()
    for bad, msg in cases:
        with pytest.raises(ValueError, match=msg):
            target.load_state_dict(bad)
        after = target.state_dict()
        assert all(np.array_equal(before[k], after[k]) for k in before)
        p = tmp_path / "bad.npz"
        np.savez(p, **{k: np.asarray(v) for k, v in bad.items()})
        with pytest.raises(ValueError, match="bad.npz"):
            S.load(p)


def test_a_drifted_explicit_inverse_loads_bit_for_bit(tmp_path):
    """An explicit C^{-1} updated in place drifts (here a probe residual of 2e-8 after
    large and repeated gradients); the loaded window must still equal the saved one bit
    for bit (it was rebuilt, so results changed, when the residual exceeded 1e-8)."""
    from mfac_linalg.sliding.checkpoint import shift_of
    rng = np.random.default_rng(16)
    d, m = int(rng.integers(5, 30)), int(rng.integers(2, 8))
    lam = 10 ** rng.uniform(-3, 0)
    w = ml.SlidingWindowInverseFisher(d, m, lam, dtype="float64", engine="explicit",
                                      refresh_every=50)
    last = rng.standard_normal(d)
    for _ in range(int(rng.integers(2, 12))):
        k = rng.integers(4)
        last = [rng.standard_normal(d), 1e3 * rng.standard_normal(d), last, np.zeros(d)][k]
        w.update(last)
    st = w.state_dict()
    C = st["K"] + shift_of("window", m, min(st["count"], m), lam) * np.eye(m)
    z = np.random.default_rng(0).standard_normal(m)
    r = np.abs(C @ (st["F"] @ z) - z) / (np.abs(C) @ (np.abs(st["F"]) @ np.abs(z)))
    assert r.max() > 1e-8                       # the instance drifted past the old band
    path = tmp_path / "w.npz"
    w.save(path)
    w2 = ml.SlidingWindowInverseFisher.load(path, engine="explicit")
    x = rng.standard_normal(d)
    assert np.array_equal(w2.matvec(x), w.matvec(x))
    assert np.array_equal(w2.state_dict()["F"], st["F"])
    assert w2.state_dict()["since_refresh"] == st["since_refresh"]


def test_state_dict_has_no_side_effects():
    for engine in ("cholesky", "explicit"):
        w = _window(engine=engine, n=9)
        x = np.random.default_rng(2).standard_normal(10)
        y0 = w.matvec(x)
        s1 = w.state_dict()
        s2 = w.state_dict()
        assert all(np.array_equal(s1[k], s2[k]) for k in s1)
        assert np.array_equal(w.matvec(x), y0)
        g = np.ones(10)
        twin = _window(engine=engine, n=9)
        assert np.array_equal(w.step(g), twin.step(g))


@pytest.mark.parametrize("engine", ["cholesky", "explicit"])
def test_load_that_changes_normalization_rebuilds_the_engine(engine):
    """Issue 10: a normalize="window" window (explicit engine) loading a partly filled
    normalize="count" state must answer for the count normalization at once, also with
    queries between later updates."""
    rng = np.random.default_rng(3)
    d, m, lam = 64, 6, 0.5
    src = S(d, m, lam, dtype="float64", normalize="count")
    src.update(rng.standard_normal((3, d)))
    w = S(d, m, lam, dtype="float64", normalize="window", engine=engine)
    w.update(rng.standard_normal((5, d)))
    w.load_state_dict(src.state_dict())
    assert w.normalize == "count"
    x = rng.standard_normal(d)
    for t in range(5):
        H = w.gradients()
        F = lam * np.eye(d) + H.T @ H / len(H)
        assert np.linalg.norm(w.matvec(x) - np.linalg.solve(F, x)) <= 1e-12 * np.linalg.norm(
            np.linalg.solve(F, x))
        assert abs(w.logdet() - np.linalg.slogdet(F)[1]) < 1e-10
        w.update(rng.standard_normal(d))


def test_version_1_checkpoints_load():
    w = _window(n=3)
    st = w.state_dict()
    v1 = {k: st[k] for k in ("dim", "window", "damping", "normalize", "dtype",
                             "refresh_every", "count", "since_refresh", "G", "K")}
    v1.update(format_version=1, stale=True, L=np.eye(4))
    w1 = S(10, 4, 0.1, dtype="float64").load_state_dict(v1)
    x = np.arange(10.0)
    assert np.linalg.norm(w1.matvec(x) - w.matvec(x)) < 1e-12 * np.linalg.norm(w.matvec(x))


@pytest.mark.parametrize("how", ["copy", "deepcopy", "pickle"])
@pytest.mark.parametrize("engine", ["cholesky", "explicit"])
def test_copies_are_independent_and_identical(how, engine):
    w = _window(engine=engine, n=7)
    c = {"copy": copy.copy, "deepcopy": copy.deepcopy,
         "pickle": lambda o: pickle.loads(pickle.dumps(o))}[how](w)
    _same_state(w, c)
    rng = np.random.default_rng(4)
    g, x = rng.standard_normal(10), rng.standard_normal(10)
    y0 = w.matvec(x)
    assert np.array_equal(c.step(g), w.step(g))              # identical results
    c.update(rng.standard_normal(10))                        # the copy moves on alone
    assert w.count == c.count and not np.array_equal(w.matvec(x), c.matvec(x))
    w2 = _window(engine=engine, n=7)
    w2.step(g)
    _same_state(w, w2)
    assert not np.array_equal(w.matvec(x), y0)


def test_handed_out_arrays_do_not_alias_the_state():
    w = _window(n=5)
    x = np.random.default_rng(5).standard_normal(10)
    y0 = w.matvec(x)
    G = w.gradients()
    G[:] = 0
    for cols, a, b, V in w.lowrank_batches():
        if V.flags.writeable:
            V[...] = 0
        else:
            with pytest.raises(ValueError):
                V[...] = 0
    st = w.state_dict()
    st["G"][:] = 0
    st["K"][:] = 0
    assert np.array_equal(w.matvec(x), y0)


def test_lowrank_batches_reproduce_the_inverse():
    w = _window(n=5, engine="explicit")
    (cols, a, b, V), = list(w.lowrank_batches())
    dense = a * np.eye(10) + b * V[0].T @ V[0]
    assert np.abs(dense - w.todense()).max() < 1e-12 * np.abs(dense).max()
