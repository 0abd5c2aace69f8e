"""The mfac-linalg command: the demo's story and checks, the file commands, and input
errors (one line naming the flag, exit 2) kept apart from the library's own bugs."""
import io
import os
import subprocess
import sys

import numpy as np
import pytest

import mfac_linalg as ml
from mfac_linalg import cli


# -- the demo ------------------------------------------------------------------------

def test_demo_tells_the_story_and_checks_against_dense():
    buf = io.StringIO()
    res = cli.run_demo(dim=400, grads=100, device="cpu", out=buf)
    text = buf.getvalue()
    for phase in ("[1/4]", "[2/4]", "[3/4]", "[4/4]"):
        assert phase in text
    assert "F = λI + GᵀG/m" in text and "Woodbury" in text          # what F and M-FAC are
    assert "checks against dense float64" in text and "1e-06" in text  # CG tolerance stated
    assert text.rstrip().splitlines()[-1].startswith("verdict: M-FAC agrees")
    assert "note:" in text                     # d = 400 is too small for timings to mean much
    assert res["ok"] and not res["meaningful"]
    assert res["error"] < 1e-12 and res["error_matmat"] < 1e-12 and res["error_diag"] < 1e-12
    assert res["error"] <= res["bound"]
    assert res["cg_info"] == {"none": 0, "M-FAC": 0}
    assert res["cg_iters"]["M-FAC"] < res["cg_iters"]["none"]


def test_demo_float32_states_its_dtype_and_meets_the_float32_bound():
    buf = io.StringIO()
    res = cli.run_demo(dim=300, grads=50, device="cpu", dtype="float32", out=buf)
    assert res["ok"] and res["dtype"] == "float32"
    assert "float32 gradients" in buf.getvalue()
    # float32 storage: the result is rounded to float32, so the error is at least eps32/2
    assert 1e-8 < res["error"] <= res["bound"] < 1e-2


def test_demo_at_a_meaningful_size_has_no_note():
    buf = io.StringIO()
    res = cli.run_demo(dim=1000, grads=32, device="cpu", out=buf)
    assert res["meaningful"] and "note:" not in buf.getvalue()
    last = buf.getvalue().splitlines()[-1]
    assert "faster than a dense solve" in last or "slower than a dense solve" in last


@pytest.mark.parametrize("kwargs,msg", [
    ({"l2": float("nan")}, "--l2 must be a number; got nan"),
    ({"l2": -1.0}, "--l2 must be >= 0.0; got -1.0"),
    ({"damping": 0.0}, "--damping must be > 0.0"),
    ({"damping": float("inf")}, "--damping must be finite"),
    ({"damping": 1e-310}, "--damping must be in ["),
    ({"dim": 1}, "--dim must be >= 2; got 1"),
    ({"grads": 0}, "--grads must be >= 1; got 0"),
    ({"dim": 200_000}, "--dim 200000 is too large for the demo's dense comparison"),
    ({"cg_rtol": 0.0}, "--cg-rtol must be > 0.0"),
    ({"seed": -1}, "--seed must be >= 0; got -1"),          # was a traceback from NumPy
    ({"seed": 1.5}, "--seed must be an integer; got float 1.5"),
    ({"l2": 1e308}, "--l2 must be <= 1e+50"),               # was a traceback from CG
    ({"progress": "yes"}, "--progress must be True or False"),  # was half a story first
    ({"out": 3}, "out must be a text stream"),                # was an AttributeError
])
def test_demo_bad_options_are_cli_errors(kwargs, msg):
    with pytest.raises(cli.CLIError) as exc:
        cli.run_demo(**{"device": "cpu", "out": io.StringIO(), **kwargs})
    assert msg in str(exc.value)


def test_demo_largest_l2_runs_and_seed_from_the_command_line(capsys):
    assert cli.main(["demo", "--device", "cpu", "--dim", "10", "--grads", "5",
                     "--l2", "1e50", "--no-progress"]) == 0
    assert cli.main(["demo", "--device", "cpu", "--dim", "10", "--seed", "-1"]) == 2
    assert capsys.readouterr().err.strip() == "mfac-linalg demo: error: --seed must be >= 0; got -1"


def test_long_double_gradients_file(tmp_path, rng):
    # the overflow pre-check on a float128 (longdouble) file raised a casting TypeError
    G = rng.standard_normal((5, 4))
    np.save(tmp_path / "G.npy", G.astype(np.longdouble))
    assert cli.main(["diag", "--grads", str(tmp_path / "G.npy"), "--damping", "0.5",
                     "--out", str(tmp_path / "d.npy")]) == 0
    F = 0.5 * np.eye(4) + G.T @ G / 5
    assert np.allclose(np.load(tmp_path / "d.npy"), np.diag(np.linalg.inv(F)), rtol=1e-12, atol=0)


def test_demo_too_large_suggests_the_limit(capsys):
    assert cli.main(["demo", "--dim", "200000"]) == 2
    err = capsys.readouterr().err
    assert f"use --dim <= {cli.demo_max_dim(256)}" in err and len(err.strip().splitlines()) == 1
    assert 2 <= cli.demo_max_dim(256) <= cli.DEMO_MAX_DIM


# -- file commands -----------------------------------------------------------------

def _files(tmp_path, rng):
    G = rng.standard_normal((7, 30))
    np.save(tmp_path / "G.npy", G)
    np.save(tmp_path / "x.npy", rng.standard_normal(30))
    np.save(tmp_path / "X.npy", rng.standard_normal((30, 2)))
    return G


def test_ihvp_and_diag_files_match_dense(tmp_path, rng):
    G = _files(tmp_path, rng)
    F = 0.2 * np.eye(30) + G.T @ G / 7
    x, X = np.load(tmp_path / "x.npy"), np.load(tmp_path / "X.npy")
    t = str(tmp_path)
    assert cli.main(["ihvp", "--grads", f"{t}/G.npy", "--vec", f"{t}/x.npy",
                     "--damping", "0.2", "--out", f"{t}/y.npy"]) == 0
    assert np.allclose(np.load(tmp_path / "y.npy"), np.linalg.solve(F, x), rtol=1e-12, atol=0)
    assert cli.main(["ihvp", "--grads", f"{t}/G.npy", "--vec", f"{t}/X.npy",
                     "--damping", "0.2", "--out", f"{t}/Y.npy"]) == 0
    assert np.allclose(np.load(tmp_path / "Y.npy"), np.linalg.solve(F, X), rtol=1e-12, atol=0)
    assert cli.main(["diag", "--grads", f"{t}/G.npy", "--damping", "0.2",
                     "--out", f"{t}/d.npy"]) == 0
    assert np.allclose(np.load(tmp_path / "d.npy"), np.diag(np.linalg.inv(F)), rtol=1e-12, atol=0)


def test_out_is_written_exactly_as_given(tmp_path, rng):
    _files(tmp_path, rng)
    out = tmp_path / "result"                       # no .npy suffix: none is added
    assert cli.main(["diag", "--grads", str(tmp_path / "G.npy"), "--damping", "0.2",
                     "--out", str(out)]) == 0
    assert out.is_file() and not (tmp_path / "result.npy").exists()
    assert np.load(out).shape == (30,)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".mfac-linalg-")]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs POSIX FIFOs")
def test_out_never_replaces_a_device_or_pipe_and_writes_through_links(tmp_path, rng, capsys):
    # --out /dev/null used to replace the device node by a regular file (os.replace)
    _files(tmp_path, rng)
    g = str(tmp_path / "G.npy")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert cli.main(["diag", "--grads", g, "--damping", "0.2", "--out", str(fifo)]) == 2
    assert "is not a regular file" in capsys.readouterr().err
    assert not fifo.is_file() and fifo.exists()                 # still the FIFO
    target, link = tmp_path / "target.npy", tmp_path / "link.npy"
    target.write_bytes(b"old")
    os.chmod(target, 0o640)
    link.symlink_to(target)
    assert cli.main(["diag", "--grads", g, "--damping", "0.2", "--out", str(link)]) == 0
    assert link.is_symlink() and np.load(target).shape == (30,)   # written through
    assert (os.stat(target).st_mode & 0o777) == 0o640             # its mode kept


def test_out_gets_the_umask_mode_not_mkstemp_s_0600(tmp_path, rng):
    _files(tmp_path, rng)
    mask = os.umask(0o022)
    try:
        assert cli.main(["diag", "--grads", str(tmp_path / "G.npy"), "--damping", "0.2",
                         "--out", str(tmp_path / "d.npy")]) == 0
    finally:
        os.umask(mask)
    assert (os.stat(tmp_path / "d.npy").st_mode & 0o777) == 0o644


def test_a_failed_command_leaves_the_previous_output_alone(tmp_path, rng, capsys):
    _files(tmp_path, rng)
    out = tmp_path / "y.npy"
    np.save(out, np.arange(3.0))
    np.save(tmp_path / "bad.npy", np.ones(5))
    assert cli.main(["ihvp", "--grads", str(tmp_path / "G.npy"), "--vec",
                     str(tmp_path / "bad.npy"), "--damping", "0.2", "--out", str(out)]) == 2
    assert np.array_equal(np.load(out), np.arange(3.0))


def _write_bad(kind):
    if kind == "text":
        with open("bad.npy", "w") as f:
            f.write("1 2 3\n4 5 6\n")
    elif kind == "npz":
        with open("bad.npy", "wb") as f:        # a file object: savez adds no suffix
            np.savez(f, a=np.ones(3))
    elif kind == "object":
        np.save("bad.npy", np.array([None, 1], dtype=object), allow_pickle=True)
    elif kind == "complex":
        np.save("bad.npy", np.ones((2, 4)) + 1j)
    elif kind == "huge-header":     # header declares (1e5, 1e5) float64; 16 bytes of data
        with open("bad.npy", "wb") as f:
            np.lib.format.write_array_header_1_0(
                f, {"descr": "<f8", "fortran_order": False, "shape": (100_000, 100_000)})
            f.write(b"\0" * 16)
    elif kind == "nan":
        np.save("bad.npy", np.array([[1.0, np.nan]]))
    elif kind == "1d":
        np.save("bad.npy", np.ones(4))
    elif kind == "overflow":        # finite, but the Gram products overflow float64
        np.save("bad.npy", np.full((2, 4), 1e155))
    elif kind == "dir":
        os.mkdir("bad.npy")


@pytest.mark.parametrize("kind,msg", [
    ("missing", "--grads: no such file: bad.npy"),
    ("text", "--grads: bad.npy is not a .npy file"),
    ("npz", "--grads: bad.npy is a .npz archive, not a .npy file"),
    ("object", "--grads: bad.npy must hold real numbers; got dtype object"),
    ("complex", "--grads: bad.npy must hold real numbers; got dtype complex128"),
    ("huge-header", "--grads: bad.npy is truncated or corrupt: its header declares shape "
                    "(100000, 100000) float64 (74.5 GiB) but it holds 16 bytes"),
    ("nan", "--grads must be finite"),
    ("1d", "--grads must be 2-D (m, d); got shape (4,)"),
    ("overflow", "--grads is too large"),
    ("dir", "--grads: bad.npy is a directory, not a .npy file"),
])
def test_bad_grads_file_one_line_exit_2(tmp_path, monkeypatch, capsys, kind, msg):
    monkeypatch.chdir(tmp_path)
    _write_bad(kind)
    assert cli.main(["diag", "--grads", "bad.npy", "--damping", "1", "--out", "o.npy"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mfac-linalg diag: error: ") and msg in err[0], err
    assert not os.path.exists("o.npy")


@pytest.mark.parametrize("args,msg", [
    (["diag", "--damping", "nan"], "--damping must be a number; got nan"),
    (["diag", "--damping", "-1"], "--damping must be > 0.0; got -1.0"),
    (["diag", "--damping", "1e-310"], "--damping must be in [1.5e-154, 1.3e+154]"),
    (["ihvp", "--vec", "v3.npy", "--damping", "1"],
     "--vec must have shape (4,) or (4, k) (d = the columns of --grads); got shape (3,)"),
    (["ihvp", "--vec", "vnan.npy", "--damping", "1"], "--vec must be finite"),
    # a result that overflows is refused by the operator itself (CPU), like big products
    (["ihvp", "--vec", "vbig.npy", "--damping", "1e-3"],
     "--vec is too large: its products with the operator overflow"),
    (["ihvp", "--vec", "vhuge.npy", "--damping", "1e-3"],
     "--vec is too large: its products with the operator overflow"),
    (["diag", "--damping", "1", "--out", "outdir"], "--out: outdir is a directory"),
    (["diag", "--damping", "1", "--out", "nodir/o.npy"],
     "--out: cannot write nodir/o.npy (no such directory: nodir)"),
])
def test_bad_options_one_line_exit_2(tmp_path, monkeypatch, capsys, args, msg):
    monkeypatch.chdir(tmp_path)
    np.save("G.npy", np.ones((2, 4)))
    np.save("v3.npy", np.ones(3))
    np.save("vnan.npy", np.array([1.0, np.nan, 0, 0]))
    np.save("vbig.npy", 1e306 * np.array([1.0, -1.0, 0.0, 0.0]))   # F^-1 x = x / 1e-3
    np.save("vhuge.npy", np.full(4, 1e308))                         # G x overflows
    os.mkdir("outdir")
    full = [args[0], "--grads", "G.npy", *args[1:]]
    if "--out" not in full:
        full += ["--out", "o.npy"]
    assert cli.main(full) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and msg in err[0], err


def test_library_input_errors_are_renamed_to_the_flag(monkeypatch, tmp_path, capsys):
    np.save(tmp_path / "G.npy", np.ones((2, 4)))

    def refuse(self):
        raise ValueError("grads is too large: its Gram products overflow")
    monkeypatch.setattr(ml.StaticInverseFisher, "diagonal", refuse)
    # raised outside the operator's construction: not an input error of the command
    with pytest.raises(ValueError, match="grads is too large"):
        cli.main(["diag", "--grads", str(tmp_path / "G.npy"), "--damping", "1",
                  "--out", str(tmp_path / "o.npy")])

    def bad_init(self, grads, damping, **kw):
        raise ValueError("grads is too large: its Gram products overflow")
    monkeypatch.setattr(ml.StaticInverseFisher, "__init__", bad_init)
    assert cli.main(["diag", "--grads", str(tmp_path / "G.npy"), "--damping", "1",
                     "--out", str(tmp_path / "o.npy")]) == 2
    assert "error: --grads is too large" in capsys.readouterr().err


def test_the_library_s_own_bugs_are_not_swallowed(monkeypatch, tmp_path):
    np.save(tmp_path / "G.npy", np.ones((2, 4)))

    def broken(self, grads, damping, **kw):
        raise TypeError("unsupported operand type(s) for +: 'NoneType' and 'int'")
    monkeypatch.setattr(ml.StaticInverseFisher, "__init__", broken)
    with pytest.raises(TypeError, match="NoneType"):
        cli.main(["diag", "--grads", str(tmp_path / "G.npy"), "--damping", "1",
                  "--out", str(tmp_path / "o.npy")])


# -- the installed command ---------------------------------------------------------------

def _run(*args):
    return subprocess.run([sys.executable, "-m", "mfac_linalg.cli", *args],
                          capture_output=True, text=True)


def test_version_and_a_clean_exit_2_in_a_real_process():
    r = _run("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"mfac-linalg {ml.__version__}"
    r = _run("demo", "--dim", "200000")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "too large for the demo's dense comparison" in r.stderr
    r = _run("demo", "--device", "tpu")
    assert r.returncode == 2 and "invalid choice" in r.stderr


def test_console_script_entry_point_declared():
    from importlib.metadata import entry_points
    eps = [e for e in entry_points(group="console_scripts") if e.name == "mfac-linalg"]
    assert eps and eps[0].value == "mfac_linalg.cli:main"


@pytest.mark.parametrize("ok,meaningful,speedup,iters,expect", [
    (True, True, 4.0, {"none": (76, 0), "M-FAC": (28, 0)},
     "verdict: M-FAC agrees with dense float64 to 4e-15, is 4.0x faster than a dense solve "
     "(set-up + one product) and cuts CG iterations 2.7x (76 → 28)."),
    (True, False, 0.25, {"none": (76, 0), "M-FAC": (80, 0)},
     "verdict: M-FAC agrees with dense float64 to 4e-15 and does not reduce CG iterations on "
     "this problem (76 → 80)."),
    (True, True, 0.5, {"none": (3000, 3000), "M-FAC": (40, 0)},
     "verdict: M-FAC agrees with dense float64 to 4e-15, is 2.0x slower than a dense solve "
     "(set-up + one product) and CG converges in 40 iterations with it (without it: not in "
     "3000)."),
    (False, True, 4.0, {"none": (76, 0), "M-FAC": (28, 0)},
     "verdict: FAILED: M-FAC differs from dense float64 by 4.0e-15 (accepted: 1.0e-16); "
     "please report this"),
])
def test_verdict_says_what_was_measured(ok, meaningful, speedup, iters, expect):
    bound = 1e-12 if ok else 1e-16
    assert cli._verdict(ok, 4e-15, bound, meaningful, speedup, iters) == expect


def test_demo_names_grads_when_even_the_smallest_dim_does_not_fit():
    from mfac_linalg import cli
    mem = cli._available_memory()
    if mem is None:
        pytest.skip("no /proc/meminfo")
    grads = int(mem)                       # 8 bytes x 4 values a gradient at d = 2: > mem
    r = subprocess.run([sys.executable, "-m", "mfac_linalg.cli", "demo", "--dim", "2",
                        "--grads", str(grads)], capture_output=True, text=True)
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and f"--grads {grads} is too large for the demo" in lines[0]


@pytest.mark.parametrize("argv,msg", [
    (["demo", "--dim", "abc"], "argument --dim: invalid int value: 'abc'"),
    (["demo", "--damping", "1e-400"], "argument --damping: 1e-400 underflows to 0 in float64"),
    (["demo", "--l2", "1e999"], "argument --l2: 1e999 overflows float64"),
    (["ihvp", "--grads", "g.npy", "--vec", "v.npy", "--damping", "1e-400", "--out", "o.npy"],
     "argument --damping: 1e-400 underflows to 0 in float64"),
    ([], "the following arguments are required: command")])
def test_parser_errors_are_one_line_naming_the_flag(capsys, argv, msg):
    """argparse's own errors too: one line, status 2 (no usage block), and a float typed
    with non-zero digits that rounds to 0 or inf is refused as typed."""
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and msg in err[0], err


def test_demo_damping_too_small_for_the_dense_reference_is_one_line(capsys):
    """An accepted --damping (1e-18 is inside float64's range) whose dense reference F is
    numerically singular: one line naming --damping, status 2 (it was a LinAlgError)."""
    rc = cli.main(["demo", "--dim", "50", "--grads", "5", "--damping", "1e-18",
                   "--device", "cpu", "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--damping 1e-18 is too small for the demo's dense" in err[0]


def test_float16_gradients_are_checked_in_the_dtype_they_are_computed_in(tmp_path,
                                                                         monkeypatch):
    """float16 --grads whose squared norms exceed float16 but not float32 (the library
    computes in float32): accepted, and the result is the library's."""
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(1)
    G = (rng.standard_normal((4, 6)) * 300).astype(np.float16)
    np.save("g16.npy", G)
    assert cli.main(["diag", "--grads", "g16.npy", "--damping", "1", "--out", "d.npy"]) == 0
    assert np.array_equal(np.load("d.npy"), ml.StaticInverseFisher(G, 1.0).diagonal())
