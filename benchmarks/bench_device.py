"""Where the GPU benchmark cases run, at which sizes, and the device's measured ceilings.

The one switch of the benchmark suite: ``LAFS_GPU_DRY_RUN=1`` (set by ``benchmarks/gpu_run.sh`` in
its dry run) runs every GPU case on the CPU at toy sizes, Triton kernels under the interpreter and
``torch.compile`` with the ``eager`` backend (Dynamo traces, no C++ compile): it checks the
benchmark code and the runner's plumbing, not speed. Without it the GPU cases need CUDA (and
``TRITON_INTERPRET`` unset or 0) and skip otherwise.

Ceilings (recorded in each case's ``extra_info``, so ``render.py`` can put a figure beside them):

- ``copy_GBps``: a device-to-device copy of 1 GiB, bytes read + bytes written per second;
- ``matmul_TFLOPs``: a bf16 8192^3 matrix product on random data (2 FLOP per multiply-add);
- ``datasheet_TFLOPs``: the vendor's dense bf16 tensor-core peak of the device, where known.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable

DRY = os.environ.get("LAFS_GPU_DRY_RUN", "0") == "1"
if DRY:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any Triton kernel is defined

import pytest  # noqa: E402
import torch  # noqa: E402

__all__ = [
    "DRY",
    "CUDA",
    "DEVICE",
    "gpu",
    "size",
    "bench",
    "COMPILE_BACKEND",
    "sync",
    "timed_call",
    "ceilings",
    "datasheet_bf16_flops",
    "record_ceilings",
    "record_mfu",
]

CUDA = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"
DEVICE = torch.device("cpu" if DRY else "cuda")
gpu = pytest.mark.skipif(
    not (CUDA or DRY), reason="needs CUDA with TRITON_INTERPRET unset or 0 (or LAFS_GPU_DRY_RUN=1)"
)
COMPILE_BACKEND = "eager" if DRY else "inductor"

# Dense (no 2:4 sparsity) bf16 tensor-core peaks, FLOP/s. NVIDIA's H100 and H200 datasheets list
# "BF16 Tensor Core 1,979 teraFLOPS" for the SXM parts with sparsity; dense is half: 989.4.
# (nvidia.com/en-us/data-center/h100/ and /h200/). Other devices: no datasheet MFU, only measured.
# Keyed by torch.cuda.get_device_name() of the SXM parts (PCIe / NVL parts run lower clocks: no entry).
_DATASHEET_BF16 = {"NVIDIA H100 80GB HBM3": 989.4e12, "NVIDIA H200": 989.4e12}


def size(full: int, toy: int) -> int:
    """``toy`` in the dry run, else ``full``."""
    return toy if DRY else full


def sync() -> None:
    if DEVICE.type == "cuda" and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed_call(fn: Callable[[], object]) -> float:
    """Wall seconds of one call of ``fn``, device work included (warm-ups: compile time, first steps)."""
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def datasheet_bf16_flops() -> float | None:
    """The device's dense bf16 datasheet peak (FLOP/s), or None where not known (the CPU, other GPUs)."""
    if DEVICE.type != "cuda":
        return None
    return _DATASHEET_BF16.get(torch.cuda.get_device_name())


@functools.lru_cache(maxsize=1)
def ceilings() -> dict[str, float]:
    """Measured copy bandwidth (GB/s) and bf16 matmul rate (TFLOP/s) of DEVICE, once per process.

    Medians of timed repeats after warm-ups, on random data (zeros run faster on some GPUs).
    Dry run: a small copy and matmul on the CPU (plumbing only).
    """
    nbytes = size(2**30, 2**22)
    n = size(8192, 256)
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    a = torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16)

    def median_s(fn: Callable[[], object], reps: int, inner: int = 5) -> float:
        for _ in range(3):
            fn()
        times = sorted(timed_call(lambda: [fn() for _ in range(inner)]) / inner for _ in range(reps))
        return times[len(times) // 2]

    copy_s = median_s(lambda: dst.copy_(src), 10)  # noqa: F821 - called before the del below
    mm_s = median_s(lambda: a @ b, 10)  # noqa: F821
    del src, dst, a, b  # free the device memory before the benchmarks proper
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()
    return {"copy_GBps": round(2 * nbytes / copy_s / 1e9, 1), "matmul_TFLOPs": round(2 * n**3 / mm_s / 1e12, 1)}


def record_ceilings(benchmark) -> dict[str, float]:
    """Store the ceilings (and the datasheet peak, where known) in ``benchmark.extra_info``."""
    c = dict(ceilings())
    peak = datasheet_bf16_flops()
    if peak is not None:
        c["datasheet_TFLOPs"] = peak / 1e12
    benchmark.extra_info.update(c)
    return c


def bench(benchmark, fn: Callable[[], object], rounds: int, warmup: int = 1):
    """Time ``fn`` for ``rounds`` rounds after ``warmup`` untimed calls (one round in the dry run,
    where only the plumbing counts and an interpreted Triton call takes seconds). Returns fn's result."""
    return benchmark.pedantic(fn, rounds=size(rounds, 1), iterations=1, warmup_rounds=size(warmup, 0))


def record_mfu(benchmark, flops: float) -> None:
    """A FLOP-bound case's achieved rate (``TFLOPs``) and MFU against the measured bf16 matmul rate
    and the datasheet peak (where known), from ``flops`` per call and the median call time."""
    c = record_ceilings(benchmark)
    if not benchmark.stats:  # None under --benchmark-disable
        return
    achieved = flops / benchmark.stats.stats.median
    benchmark.extra_info.update(flops_per_call=flops, TFLOPs=round(achieved / 1e12, 2))
    benchmark.extra_info["mfu_measured"] = achieved / (c["matmul_TFLOPs"] * 1e12)
    if "datasheet_TFLOPs" in c:
        benchmark.extra_info["mfu_datasheet"] = achieved / (c["datasheet_TFLOPs"] * 1e12)
