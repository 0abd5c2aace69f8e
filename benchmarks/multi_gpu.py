"""Multi-GPU benchmark: the column-sharded sliding window over NCCL, one process per GPU.

Run it under torchrun, one process per GPU:

    torchrun --nproc-per-node 2 benchmarks/multi_gpu.py [--quick] [--check] [--out FILE.md]

For m = 1024 and d = 5e7 (float32 and bfloat16) and d = 1e8 (bfloat16; 205 GB, more
than one GPU holds), each rank holds d_p = d / P columns.  Printed per configuration
(rank 0 prints; times are the slowest rank's medians):

* ``step`` and ``matvec`` in ms per GPU;
* ``/floor``: against the per-GPU floor 2·m·d_p·bytes / copy bandwidth, the bandwidth of
  a large device-to-device copy measured in the same run (bytes read plus written);
* ``/alone``: against one GPU holding the same m x d_p columns alone (the single-device
  window with dim = d_p: the same passes without the all-reduces).

Target (issue 14): step <= 1.10x the per-GPU floor at d·m >= 5e10.

``--cpu`` runs the same code on CPUs over gloo with NumPy buffers and small sizes: a dry
run of the script itself (``torchrun --nproc-per-node 2 benchmarks/multi_gpu.py --cpu``).

``--check`` first compares, in float32 at a small size, every rank's slice of step and
matvec with a float64 window fed the concatenated gradients, next to the single-device
float32 window's own error and the sharded - single-device difference (max relative
errors over steps and ranks, relative to the float64 result; damping 1, so that the
Woodbury amplification kappa_W = lambda_max(F)/lambda is about d/m, docs/math.md §7).

NCCL's NVLink multicast (NVLS) and the symmetric-memory multicast stay off: this script
sets NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1 and NVSHMEM_DISABLE_NVLS=1
before NCCL starts.
"""
import os

os.environ["NCCL_NVLS_ENABLE"] = "0"
os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
os.environ["NVSHMEM_DISABLE_NVLS"] = "1"

import argparse  # noqa: E402
import sys  # noqa: E402

import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import mfac_linalg as ml  # noqa: E402
from mfac_linalg.distributed import (ColumnLayout, ShardedSlidingWindowInverseFisher,  # noqa: E402
                                     TorchComm)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import table  # noqa: E402

CONFIGS = [(int(5e7), 1024, "float32"), (int(5e7), 1024, "bfloat16"),
           (int(1e8), 1024, "bfloat16")]
QUICK = [(int(4e6), 256, "float32"), (int(4e6), 256, "bfloat16")]
CPU = [(200_000, 64, "float32"), (200_000, 64, "float64")]
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}
LAM = 1e-3


class Device:
    """The array namespace, timer and allocator of the run: CuPy on the GPU (CUDA-event
    timings) or NumPy on the CPU (``--cpu``: wall-clock timings)."""

    def __init__(self, cpu):
        self.cpu = cpu
        if cpu:
            self.xp, self.name = np, "cpu"
        else:
            import cupy  # noqa: PLC0415
            self.xp, self.name = cupy, "gpu"

    def sync(self):
        if not self.cpu:
            self.xp.cuda.Device().synchronize()

    def time(self, fn, *, repeat=10, warmup=2, comm=None):
        """Median ms of fn(); with ``comm``, a barrier before each run."""
        for _ in range(warmup):
            fn()
        self.sync()
        times = []
        for _ in range(repeat):
            if comm is not None:
                comm.barrier()
            if self.cpu:
                t = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t) * 1e3)
                continue
            start, stop = self.xp.cuda.Event(), self.xp.cuda.Event()
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times.append(self.xp.cuda.get_elapsed_time(start, stop))
        return float(np.median(times))

    def free(self):
        if not self.cpu:
            self.xp.get_default_memory_pool().free_all_blocks()

    def copy_bandwidth(self, nbytes=4 << 30):
        """Bytes read plus written per second by a large copy."""
        xp = self.xp
        nbytes = min(nbytes, 256 << 20) if self.cpu else nbytes
        a = xp.empty(nbytes // 4, dtype=np.float32)
        a[...] = 1.0
        b = xp.empty_like(a)
        ms = self.time(lambda: xp.copyto(b, a), repeat=10)
        a = b = None
        self.free()
        return 2 * nbytes / (ms * 1e-3)

    def randn(self, seed, shape):
        if self.cpu:
            return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
        return self.xp.random.RandomState(seed).standard_normal(shape, dtype=np.float32)

    def blocks(self, rows, cols, seed, chunk_bytes=1 << 30):
        """float32 row blocks of at most ``chunk_bytes`` (16-bit windows round them)."""
        chunk = max(1, chunk_bytes // (4 * max(cols, 1)))
        for i, r0 in enumerate(range(0, rows, chunk)):
            yield self.randn(seed * 1000 + i, (min(chunk, rows - r0), cols))

    def norm(self, a):
        return float(self.xp.linalg.norm(a))


def slowest(comm, value):
    """The largest value over the ranks (one all-reduce of P numbers)."""
    buf = np.zeros(comm.size)
    buf[comm.rank] = value
    comm.allreduce_sum(buf)
    return float(buf.max())


def bench_one(dev, comm, d, m, dtype, bw, repeat):
    P, rank = comm.size, comm.rank
    lay = ColumnLayout.contiguous(d, P)
    d_p = lay.local_dim(rank)
    floor_ms = 2 * m * d_p * BYTES[dtype] / bw * 1e3
    x = dev.randn(1000 + rank, d_p).astype(np.float64 if dtype == "float64" else np.float32)
    g = dev.randn(2000 + rank, d_p).astype(x.dtype)
    # one device alone with the same columns: the single-device window, no communication
    alone = ml.SlidingWindowInverseFisher.from_gradients(
        dev.blocks(m, d_p, 7 + rank), LAM, window=m, dtype=dtype, device=dev.name)
    a_mv = dev.time(lambda: alone.matvec(x), repeat=repeat)
    a_st = dev.time(lambda: alone.step(g), repeat=repeat)
    alone = None
    dev.free()
    win = ShardedSlidingWindowInverseFisher.from_local_gradients(
        dev.blocks(m, d_p, 7 + rank), LAM, comm, layout=lay, window=m, dtype=dtype,
        device=dev.name)
    s_mv = dev.time(lambda: win.matvec(x), repeat=repeat, comm=comm)
    s_st = dev.time(lambda: win.step(g), repeat=repeat, comm=comm)
    win = None
    dev.free()
    s_mv, s_st, a_mv, a_st = (slowest(comm, v) for v in (s_mv, s_st, a_mv, a_st))
    return [f"{d:.0e}", str(m), dtype, str(d_p), f"{d * m:.1e}", f"{floor_ms:.2f}",
            f"{s_st:.2f}", f"{s_st / floor_ms:.2f}", f"{s_st / a_st:.2f}",
            f"{s_mv:.2f}", f"{s_mv / floor_ms:.2f}", f"{s_mv / a_mv:.2f}"]


def check(dev, comm, d=200_000, m=64, steps=70, lam=1.0):
    """Sharded float32 against the single-device float32 window on the concatenated
    gradients, relative to a float64 window's result (max over steps and ranks)."""
    lay = ColumnLayout.contiguous(d, comm.size)
    J = slice(*lay.ranges(comm.rank)[0])
    win = ShardedSlidingWindowInverseFisher(lay.local_dim(comm.rank), m, lam, comm,
                                            layout=lay, dtype="float32", device=dev.name)
    ref32 = ml.SlidingWindowInverseFisher(dim=d, window=m, damping=lam, dtype="float32",
                                          device=dev.name)
    ref64 = ml.SlidingWindowInverseFisher(dim=d, window=m, damping=lam, dtype="float64",
                                          device=dev.name)
    worst = {"step": 0.0, "matvec": 0.0, "single-device step": 0.0,
             "sharded - single-device step": 0.0}
    for t in range(steps):
        g = dev.randn(5 + t, d)                  # the same gradients on every rank
        y, y32, y64 = win.step(g[J]), ref32.step(g), ref64.step(g.astype(np.float64))
        scale = dev.norm(y64[J]) or 1.0
        worst["step"] = max(worst["step"], dev.norm(y - y64[J]) / scale)
        worst["single-device step"] = max(worst["single-device step"],
                                          dev.norm(y32[J] - y64[J]) / scale)
        worst["sharded - single-device step"] = max(worst["sharded - single-device step"],
                                                    dev.norm(y - y32[J]) / scale)
    x = dev.randn(4, d)
    y64 = ref64.matvec(x.astype(np.float64))[J]
    worst["matvec"] = dev.norm(win.matvec(x[J]) - y64) / dev.norm(y64)
    return {k: slowest(comm, v) for k, v in worst.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke test)")
    ap.add_argument("--check", action="store_true", help="float32 equality check first")
    ap.add_argument("--out", help="also write the table (markdown) to this file (rank 0)")
    ap.add_argument("--cpu", action="store_true", help="a dry run on CPUs over gloo")
    ap.add_argument("--repeat", type=int, default=10)
    args = ap.parse_args()

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = Device(args.cpu)
    if args.cpu:
        dist.init_process_group("gloo")
        what = f"CPU processes over gloo ({os.cpu_count()} cores)"
    else:
        dev.xp.cuda.Device(local_rank).use()
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl")
        what = (f"{torch.cuda.get_device_name(local_rank)}, NCCL "
                f"{'.'.join(map(str, torch.cuda.nccl.version()))}, NCCL_NVLS_ENABLE="
                f"{os.environ['NCCL_NVLS_ENABLE']}")
    comm = TorchComm()
    say = print if comm.rank == 0 else (lambda *a, **k: None)
    say(f"# {comm.size} x {what}")
    if args.check:
        errs = check(dev, comm, d=20_000 if args.cpu else 200_000)
        say("float32 check (relative to a float64 window, max over ranks): " +
            ", ".join(f"{k} {v:.1e}" for k, v in errs.items()))
    bw = -slowest(comm, -dev.copy_bandwidth())      # the slowest device's bandwidth
    say(f"copy bandwidth (slowest device): {bw / 1e9:.0f} GB/s")
    header = ["d", "m", "dtype", "d_p", "d*m", "floor ms", "step ms", "/floor", "/alone",
              "matvec ms", "/floor", "/alone"]
    rows = []
    for d, m, dtype in (CPU if args.cpu else QUICK if args.quick else CONFIGS):
        rows.append(bench_one(dev, comm, d, m, dtype, bw, args.repeat))
        say("  ".join(rows[-1]))
    say()
    say(table(header, rows))
    if args.out and comm.rank == 0:
        with open(args.out, "w") as f:
            f.write("| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n")
            for r in rows:
                f.write("| " + " | ".join(r) + " |\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
