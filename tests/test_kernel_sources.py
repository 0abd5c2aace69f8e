"""The CUDA kernel sources compile, on machines without a GPU too.

Compiling to PTX needs no GPU: with ``nvcc`` on the PATH (the CI machines have it), or
else NVRTC (the runtime compiler CuPy uses) through the CUDA Python bindings with the
CUDA headers (a CUDA build of torch brings them), every kernel module of the package is
compiled for the architectures it runs on, so a kernel that does not compile fails in
CPU-only CI instead of at first use on a GPU.  Every kernel the launchers name must be
defined in the source.
"""
import glob
import os
import re
import shutil
import site
import subprocess

import pytest

from mfac_linalg.kernels import blocks, reduce, sliding

try:
    from cuda.bindings import nvrtc
except ImportError:
    nvrtc = None


def _include_dirs():
    """Folders holding cuda_fp16.h (the NVIDIA wheels' include folders)."""
    roots = site.getsitepackages() + [site.getusersitepackages()]
    found = set()
    for root in roots:
        for h in glob.glob(os.path.join(root, "nvidia", "**", "cuda_fp16.h"), recursive=True):
            found.add(os.path.dirname(h))
    return sorted(found)


def _nvcc(source, arch, tmp):
    """(ok, log) of ``nvcc --ptx`` on ``source`` (as CuPy compiles it: -std=c++17)."""
    src = tmp / "kernels.cu"
    src.write_text(source)
    r = subprocess.run(["nvcc", "-std=c++17", f"-arch=compute_{arch}", "--ptx", "-x", "cu",
                        str(src), "-o", str(tmp / "kernels.ptx")],
                       capture_output=True, text=True, timeout=300)
    return r.returncode == 0, r.stdout + r.stderr


def _nvrtc(source, arch, tmp=None):
    """(ok, log) of compiling ``source`` for ``arch`` with NVRTC, as CuPy does."""
    err, prog = nvrtc.nvrtcCreateProgram(source.encode(), b"kernels.cu", 0, [], [])
    assert err == nvrtc.nvrtcResult.NVRTC_SUCCESS
    try:
        opts = [b"-std=c++17", f"--gpu-architecture=compute_{arch}".encode()]
        opts += [b"-I" + d.encode() for d in _include_dirs()]
        (res,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        _, n = nvrtc.nvrtcGetProgramLogSize(prog)
        log = b" " * n
        nvrtc.nvrtcGetProgramLog(prog, log)
        return res == nvrtc.nvrtcResult.NVRTC_SUCCESS, log.decode(errors="replace")
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


@pytest.fixture(scope="module")
def compile_source():
    """nvcc where it is installed, else NVRTC with the CUDA headers, else skip."""
    if shutil.which("nvcc"):
        return _nvcc
    if nvrtc is not None and _include_dirs():
        return _nvrtc
    pytest.skip("needs nvcc, or NVRTC's Python bindings and the CUDA headers")


@pytest.mark.parametrize("arch", ["75", "80", "90"])      # CUDA 13 starts at 7.5
@pytest.mark.parametrize("module", [sliding, blocks, reduce], ids=lambda m: m.__name__)
def test_kernel_source_compiles(compile_source, module, arch, tmp_path):
    ok, log = compile_source(module.SOURCE, arch, tmp_path)
    assert ok, log


def test_every_launched_sliding_kernel_is_defined():
    """The names the launchers build (prefix + storage suffix [+ "_w"]) exist in the source."""
    defined = set(re.findall(r"__global__\s+void\s+(\w+)\s*\(", sliding.SOURCE))
    for suffix in sliding.SUFFIX.values():
        for stem in ("rows_dot_", "combine_"):
            assert stem + suffix in defined
        if suffix != "f32":
            assert "round_" + suffix in defined
        for stem in ("rows_dot_", "combine_"):
            assert stem + suffix + "_w" in defined
    for name in ("ggms_coeffs", "chol_delete", "append_row", "gram_update", "gather_f64",
                 "window_gemv", "rank2_rows", "scatter_f32", "scatter_f64"):
        assert name in defined


@pytest.mark.parametrize("sms", [1, 16, 132, 1000])
@pytest.mark.parametrize("kind", ["float32", "bfloat16"])
@pytest.mark.parametrize("m,ld", [(1, 8), (64, 100_000), (300, 30_000), (4096, 100_000),
                                  (1024, 1_000_000), (20_000, 8)])
def test_combine_grid_covers_rows_within_the_scratch_bound(monkeypatch, sms, kind, m, ld):
    """Pass 2's grid: every row in exactly one split, and for every n <= m no more splits
    than ``combine_max_splits(m)`` (the size of the window's scratch)."""
    monkeypatch.setattr(sliding, "_sm_count", lambda: sms)
    cap = sliding.combine_max_splits(m, ld, kind)
    for n in sorted({0, 1, 2, m // 3, m - 1, m}):
        bx, splits, rows_per = sliding.combine_grid(n, ld, kind)
        assert bx * 256 * (16 // sliding.ITEMSIZE[kind]) >= ld
        assert 1 <= splits <= cap
        if n:
            assert (splits - 1) * rows_per < n <= splits * rows_per
            assert splits <= -(-n // sliding.MIN_SPLIT_ROWS)
