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
            for w in ("", "_w"):                        # the step graph's variants
                assert stem + suffix + w + "_p" in defined
    for name in ("ggms_coeffs", "chol_delete", "append_row", "gram_update", "gather_f64",
                 "window_gemv", "rank2_rows", "scatter_f32", "scatter_f64", "window_gemv_p",
                 "rank2_rows_p"):
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


class _FakeStack:
    """What ``blocks._reg_plan`` reads of a device stack: shape, itemsize, data.ptr,
    flags.c_contiguous."""

    class _Data:
        def __init__(self, ptr):
            self.ptr = ptr

    class _Flags:
        def __init__(self, c):
            self.c_contiguous = c

    def __init__(self, shape, itemsize, ptr=256, contiguous=True):
        self.shape, self.itemsize, self.data = shape, itemsize, self._Data(ptr)
        self.flags = self._Flags(contiguous)


@pytest.mark.parametrize("itemsize", [4, 8])
@pytest.mark.parametrize("max_threads", [32, 256, 1024])
@pytest.mark.parametrize("r,b", [(1, 4), (1, 8), (3, 4), (64, 128), (128, 128), (256, 128),
                                 (512, 128), (4096, 4), (100, 16), (9, 64), (7, 24), (5, 6),
                                 (64, 256), (1, 1), (0, 16), (3, 0)])
def test_register_kernel_plan_covers_every_value(monkeypatch, itemsize, max_threads, r, b):
    """The register kernel's launch: where it takes V, thread t holds 16-byte group
    t % bv of rows t / bv + k threads / bv (k < items), so every group of every row is
    held by exactly one thread within the compiled items; whole warps, a row's threads
    one aligned part of a warp, within the thread cap (never above the kernels' launch
    bound) and the shared memory; the kernel it names is defined.  Where it does not
    take V the reason is one of the documented ones."""
    monkeypatch.setattr(blocks, "REG_MAX_THREADS", max_threads)
    cap = min(max_threads, blocks.REG_LAUNCH_BOUND)
    vec = 16 // itemsize
    plan = blocks._reg_plan(_FakeStack((3, r, b), itemsize))
    bv = b // vec
    shape_ok = b % vec == 0 and 1 <= bv <= 32 and bv & (bv - 1) == 0
    if plan is None:
        assert not shape_ok or r * bv > blocks.REG_ITEMS[-1] * cap or \
            8 * (r + cap * vec) > blocks.MAX_SHARED
        return
    items, threads, shared = plan
    assert shape_ok and items in blocks.REG_ITEMS
    assert threads % 32 == 0 and 32 % bv == 0 and threads <= cap
    rows_per = threads // bv
    held = sorted((t // bv + k * rows_per, t % bv) for t in range(threads)
                  for k in range(items) if t // bv + k * rows_per < r)
    assert held == [(i, c) for i in range(r) for c in range(bv)]
    assert shared == 8 * (r + rows_per * b) <= blocks.MAX_SHARED
    # the fewest items a thread that fit: one fewer step would need more threads
    for k in (k for k in blocks.REG_ITEMS if k < items):
        t = 32 * max(1, -(-r * bv // (32 * k)))          # whole warps holding r bv groups
        assert t > cap or 8 * (r + t // bv * b) > blocks.MAX_SHARED
    defined = set(re.findall(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?"
                             r"(\w+)\s*\(", blocks.SOURCE))
    assert f"block_apply_reg_{'f32' if itemsize == 4 else 'f64'}_{items}" in defined
    assert blocks._reg_plan(_FakeStack((3, r, b), itemsize, ptr=264)) is None   # misaligned
    assert blocks._reg_plan(_FakeStack((3, r, b), itemsize, contiguous=False)) is None
    bounds = re.findall(r"__launch_bounds__\((\d+)", blocks.SOURCE)
    assert len(bounds) == 2 * len(blocks.REG_ITEMS)        # every register kernel
    assert all(int(t) == blocks.REG_LAUNCH_BOUND for t in bounds)
