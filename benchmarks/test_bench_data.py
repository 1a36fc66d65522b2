"""Loader throughput, side by side: one call = one epoch of a JPEG rec (extra_info items = images).

CPU: the PIL DataLoader (reference) vs DALI's CPU graph vs the synthetic source. GPU (skipped
without CUDA): the PIL DataLoader with 16 workers (reference) vs nvJPEG (torchvision) vs DALI mixed.
The rec is synthetic faces encoded as JPEG q95 at 112x112 (InsightFace-like records).
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from PIL import Image

from lafs_fast.data import make_loader
from lafs_fast.data.recordio_writer import write_identity_dataset
from lafs_fast.data.synthetic import SyntheticFaces

try:
    import nvidia.dali  # noqa: F401

    HAS_DALI = True
except Exception:
    HAS_DALI = False

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA")
needs_dali = pytest.mark.skipif(not HAS_DALI, reason="NVIDIA DALI not installed")


def _rec(folder: Path, ids: int, per: int) -> Path:
    ds = SyntheticFaces(ids, per, seed=0)
    out = []
    for i in range(ids):
        images, _ = ds.batch(range(i * per, (i + 1) * per))
        row = []
        for im in images:
            buf = io.BytesIO()
            Image.fromarray(im.numpy()).save(buf, format="JPEG", quality=95)
            row.append(buf.getvalue())
        out.append(row)
    write_identity_dataset(folder, out, height=112, width=112)
    return folder / "train.rec"


@pytest.fixture(scope="module")
def small_rec(tmp_path_factory) -> Path:
    return _rec(tmp_path_factory.mktemp("bench_small"), 16, 16)  # 256 images


@pytest.fixture(scope="module")
def large_rec(tmp_path_factory) -> Path:
    return _rec(tmp_path_factory.mktemp("bench_large"), 64, 64)  # 4096 images


def _epoch_fn(loader):
    def run() -> int:
        n = 0
        for images, _labels in loader:
            n += len(images)
        if images.is_cuda:
            torch.cuda.synchronize()
        return n

    return run


def _bench(benchmark, loader, role: str = "") -> None:
    benchmark.extra_info.update(items=loader.n, backend=loader.backend, **({"role": role} if role else {}))
    n = benchmark(_epoch_fn(loader))
    assert n == loader.n


@pytest.mark.benchmark(group="data-loader-cpu")
def test_cpu_pil_dataloader_reference(benchmark, small_rec: Path) -> None:
    _bench(benchmark, make_loader(small_rec, 64, backend="pil", num_workers=2), "reference")


@needs_dali
@pytest.mark.benchmark(group="data-loader-cpu")
def test_cpu_dali(benchmark, small_rec: Path) -> None:
    _bench(benchmark, make_loader(small_rec, 64, backend="dali"))


@pytest.mark.benchmark(group="data-loader-cpu")
def test_cpu_synthetic_render(benchmark) -> None:
    _bench(benchmark, make_loader("synthetic:16x16", 64))


@needs_cuda
@pytest.mark.benchmark(group="data-loader-gpu")
def test_gpu_pil_dataloader_16_workers_reference(benchmark, large_rec: Path) -> None:
    _bench(benchmark, make_loader(large_rec, 256, backend="pil", num_workers=16, device="cuda"), "reference")


@needs_cuda
@pytest.mark.benchmark(group="data-loader-gpu")
def test_gpu_nvjpeg(benchmark, large_rec: Path) -> None:
    _bench(benchmark, make_loader(large_rec, 256, backend="nvjpeg", device="cuda"))


@needs_cuda
@needs_dali
@pytest.mark.benchmark(group="data-loader-gpu")
def test_gpu_dali_mixed(benchmark, large_rec: Path) -> None:
    _bench(benchmark, make_loader(large_rec, 256, backend="dali", device="cuda"))


@needs_cuda
@needs_dali
@pytest.mark.benchmark(group="data-loader-gpu")
def test_gpu_dali_mxnet_reader(benchmark, large_rec: Path) -> None:
    _bench(benchmark, make_loader(large_rec, 256, backend="dali-mxnet", device="cuda"))


@needs_cuda
@pytest.mark.benchmark(group="data-loader-gpu")
def test_gpu_synthetic_render(benchmark) -> None:
    _bench(benchmark, make_loader("synthetic:64x64", 256, device="cuda"))
