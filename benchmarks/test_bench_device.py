"""The device's two ceilings as benchmark rows: a device-to-device copy (GB/s, bytes read + written)
and a bf16 matrix product (TFLOP/s), the denominators of "% of copy bandwidth" and measured MFU.

    pytest benchmarks/test_bench_device.py             # skipped without CUDA (or LAFS_GPU_DRY_RUN=1)
"""

from __future__ import annotations

import torch

from benchmarks.bench_device import DEVICE, bench, gpu, record_ceilings, size, sync

GROUP = "device ceilings"


@gpu
def test_device_copy(benchmark):
    nbytes = size(2**30, 2**22)
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    benchmark.group = GROUP
    benchmark.extra_info.update(items=2 * nbytes, unit="bytes (read + written)")

    def run():
        dst.copy_(src)
        sync()

    bench(benchmark, run, rounds=20, warmup=3)
    record_ceilings(benchmark)
    if benchmark.stats:  # None under --benchmark-disable
        benchmark.extra_info["GBps"] = round(2 * nbytes / benchmark.stats.stats.median / 1e9, 1)


@gpu
def test_device_matmul_bf16(benchmark):
    n = size(8192, 256)
    a, b = (torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
    benchmark.group = GROUP
    benchmark.extra_info.update(items=2 * n**3, unit="FLOP")

    def run():
        a @ b
        sync()

    bench(benchmark, run, rounds=20, warmup=3)
    record_ceilings(benchmark)
    if benchmark.stats:  # None under --benchmark-disable
        benchmark.extra_info["TFLOPs"] = round(2 * n**3 / benchmark.stats.stats.median / 1e12, 1)
