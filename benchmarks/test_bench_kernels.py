"""Kernel benchmarks: patch sampling and view augmentation, fast paths beside reference-style ones.

    pytest benchmarks/test_bench_kernels.py            # CPU cases (tiny); GPU cases skip without CUDA

GPU cases run at pre-training scale (issue 3): B = 256 images, 10 views (2 dense views of 196
landmarks, 8 sparse views of 36 drawn landmarks), and record GB/s on the bytes that must move next
to the measured device-to-device copy bandwidth (``extra_info``). No number here is asserted: the
results are recorded with their command, device and versions (benchmarks/gpu_run.sh, render.py).

``LAFS_BENCH_DRY_RUN=1`` runs the GPU cases' code on the CPU at toy scale (B = 1, Triton under the
interpreter, no torch.compile case): it checks the benchmark code itself, not speed.
"""

from __future__ import annotations

import functools
import os

DRY = os.environ.get("LAFS_BENCH_DRY_RUN", "0") == "1"
if DRY:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel is defined

import pytest  # noqa: E402
import torch  # noqa: E402

try:
    from benchmarks.baselines import reference_patch_loop, synced, torchvision_views_per_sample
except ImportError:  # run as `pytest benchmarks/...` without the repo root on sys.path
    from baselines import reference_patch_loop, synced, torchvision_views_per_sample
from lafs_fast.augment import augment_views
from lafs_fast.kernels.patch_sampling import sample_patches_torch
from lafs_fast.kernels.views import lafs_view_specs

CUDA = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"
gpu = pytest.mark.skipif(not (CUDA or DRY), reason="needs CUDA (and TRITON_INTERPRET unset)")
DEVICE = "cpu" if DRY else "cuda"

B_GPU, V_DENSE, V_SPARSE, K, L_SPARSE, S = (1 if DRY else 256), 2, 8, 196, 36, 112


# --------------------------------------------------------------------------------------------- CPU


@pytest.fixture(scope="module")
def cpu_patch_inputs():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, S, S, generator=g) * 2 - 1
    coords = torch.rand(2, K, 2, generator=g) * (S - 1)
    return images, coords


def test_patch_reference_loop_cpu(benchmark, cpu_patch_inputs):
    images, coords = cpu_patch_inputs
    benchmark.group = "patch sampling, CPU, 2 x 196 tokens"
    benchmark.extra_info.update(role="reference", items=2 * K)
    out = benchmark(reference_patch_loop, images, coords)
    torch.testing.assert_close(out, sample_patches_torch(images, coords))  # same numbers as the twin


def test_patch_twin_cpu(benchmark, cpu_patch_inputs):
    images, coords = cpu_patch_inputs
    benchmark.group = "patch sampling, CPU, 2 x 196 tokens"
    benchmark.extra_info.update(items=2 * K)
    benchmark(sample_patches_torch, images, coords)


@pytest.fixture(scope="module")
def cpu_patch_inputs_b64():
    """The foundation issue's CPU comparison: B = 64 faces, 196 landmarks each."""
    g = torch.Generator().manual_seed(0)
    return torch.rand(64, 3, S, S, generator=g) * 2 - 1, torch.rand(64, K, 2, generator=g) * (S - 1)


def test_patch_reference_loop_cpu_b64(benchmark, cpu_patch_inputs_b64):
    images, coords = cpu_patch_inputs_b64
    benchmark.group = "patch sampling, CPU, 64 x 196 tokens"
    benchmark.extra_info.update(role="reference", items=64 * K)
    out = benchmark(reference_patch_loop, images, coords)
    assert torch.equal(out, sample_patches_torch(images, coords))  # bit-identical to the twin


def test_patch_twin_cpu_b64(benchmark, cpu_patch_inputs_b64):
    images, coords = cpu_patch_inputs_b64
    benchmark.group = "patch sampling, CPU, 64 x 196 tokens"
    benchmark.extra_info.update(items=64 * K)
    benchmark(sample_patches_torch, images, coords)


@pytest.fixture(scope="module")
def cpu_view_images():
    return torch.randint(0, 256, (1, S, S, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def test_views_torchvision_per_sample_cpu(benchmark, cpu_view_images):
    benchmark.group = "views, CPU, 1 image x 10 views"
    benchmark.extra_info.update(role="reference", items=10)
    clean, aug = benchmark.pedantic(torchvision_views_per_sample, args=(cpu_view_images, lafs_view_specs()), rounds=3)
    assert clean.shape == aug.shape == (1, 10, 3, S, S)


def test_views_twin_cpu(benchmark, cpu_view_images):
    benchmark.group = "views, CPU, 1 image x 10 views"
    benchmark.extra_info.update(items=10)
    out = benchmark.pedantic(augment_views, args=(cpu_view_images,), kwargs=dict(seed=0, backend="torch"), rounds=3)
    assert out.augmented.shape == (1, 10, 3, S, S)


# --------------------------------------------------------------------------------------------- GPU


@functools.lru_cache(maxsize=1)
def copy_bandwidth_gbs() -> float:
    """Measured device-to-device copy bandwidth (read + write bytes / s), 1 GiB buffers."""
    if DEVICE != "cuda":
        return 0.0
    src = torch.empty(2**30, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    return 2 * 10 * src.numel() / (start.elapsed_time(end) / 1e3) / 1e9


@pytest.fixture(scope="module")
def gpu_patch_inputs():
    """Pre-training scale: dense views (512 images x 196) and sparse views (2048 images x 196 coords)."""
    g = torch.Generator(device=DEVICE).manual_seed(0)
    dense_img = torch.rand(B_GPU * V_DENSE, 3, S, S, device=DEVICE, generator=g) * 2 - 1
    sparse_img = torch.rand(B_GPU * V_SPARSE, 3, S, S, device=DEVICE, generator=g) * 2 - 1
    dense_xy = torch.rand(B_GPU * V_DENSE, K, 2, device=DEVICE, generator=g) * (S - 1)
    sparse_xy = torch.rand(B_GPU * V_SPARSE, K, 2, device=DEVICE, generator=g) * (S - 1)
    idx = torch.randint(0, K, (B_GPU * V_SPARSE, L_SPARSE), device=DEVICE, generator=g)
    noise_d = torch.randn(B_GPU * V_DENSE, K, 2, device=DEVICE, generator=g) * 5
    noise_s = torch.randn(B_GPU * V_SPARSE, L_SPARSE, 2, device=DEVICE, generator=g) * 5
    return dense_img, sparse_img, dense_xy, sparse_xy, idx, noise_d, noise_s


TOKENS = B_GPU * (V_DENSE * K + V_SPARSE * L_SPARSE)


def _patch_bytes(img_elem_bytes: int, out_elem_bytes: int) -> int:
    """Bytes that must move: every view image read once, every token written once, coords read."""
    images = B_GPU * (V_DENSE + V_SPARSE) * 3 * S * S * img_elem_bytes
    return images + TOKENS * 192 * out_elem_bytes + B_GPU * (V_DENSE + V_SPARSE) * K * 8


def _record_bw(benchmark, nbytes: int) -> None:
    benchmark.extra_info["bytes"] = nbytes
    benchmark.extra_info["copy_GBps"] = round(copy_bandwidth_gbs(), 1)
    if benchmark.stats is not None:
        mean = benchmark.stats.stats.mean
        benchmark.extra_info["GBps"] = round(nbytes / mean / 1e9, 1)


def _step_twin(inp, out_dtype, fn=sample_patches_torch):
    dense_img, sparse_img, dense_xy, sparse_xy, idx, noise_d, noise_s = inp
    a = fn(dense_img, dense_xy, 8, noise=noise_d, out_dtype=out_dtype)
    b = fn(sparse_img, sparse_xy, 8, indices=idx, noise=noise_s, out_dtype=out_dtype)
    return a, b


@gpu
def test_patch_fwd_reference_loop_gpu(benchmark, gpu_patch_inputs):
    dense_img, sparse_img, dense_xy, sparse_xy, idx, noise_d, noise_s = gpu_patch_inputs
    benchmark.group = "patch sampling forward, H100 scale (256 x 10 views)"
    benchmark.extra_info.update(role="reference", items=TOKENS)
    sparse_pts = torch.gather(sparse_xy, 1, idx[..., None].expand(-1, -1, 2)) + noise_s

    def step():
        return reference_patch_loop(dense_img, dense_xy + noise_d), reference_patch_loop(sparse_img, sparse_pts)

    benchmark.pedantic(synced(step), rounds=3, iterations=1, warmup_rounds=1)


@gpu
def test_patch_fwd_twin_gpu(benchmark, gpu_patch_inputs):
    benchmark.group = "patch sampling forward, H100 scale (256 x 10 views)"
    benchmark.extra_info.update(items=TOKENS)
    run = synced(lambda: _step_twin(gpu_patch_inputs, torch.bfloat16))
    run()
    benchmark(run)
    _record_bw(benchmark, _patch_bytes(4, 2))


@gpu
def test_patch_fwd_twin_compiled_gpu(benchmark, gpu_patch_inputs):
    benchmark.group = "patch sampling forward, H100 scale (256 x 10 views)"
    benchmark.extra_info.update(items=TOKENS)
    if DRY:
        pytest.skip("torch.compile case skipped in the dry run (30-40 s of CPU compile)")
    compiled = torch.compile(sample_patches_torch, dynamic=False)
    run = synced(lambda: _step_twin(gpu_patch_inputs, torch.bfloat16, compiled))
    run()
    run()
    benchmark(run)
    _record_bw(benchmark, _patch_bytes(4, 2))


@gpu
@pytest.mark.parametrize("draw", [False, True], ids=["given-draws", "in-kernel-draws"])
def test_patch_fwd_triton_gpu(benchmark, gpu_patch_inputs, draw):
    from lafs_fast.kernels.patch_sampling_triton import sample_patches_triton

    dense_img, sparse_img, dense_xy, sparse_xy, idx, noise_d, noise_s = gpu_patch_inputs
    benchmark.group = "patch sampling forward, H100 scale (256 x 10 views)"
    benchmark.extra_info.update(items=TOKENS)
    if draw:
        def step():
            a = sample_patches_triton(dense_img, dense_xy, sigma=5.0, seed=1, out_dtype=torch.bfloat16)
            b = sample_patches_triton(sparse_img, sparse_xy, num_tokens=L_SPARSE, sigma=5.0, seed=2, out_dtype=torch.bfloat16)
            return a, b
    else:
        def step():
            return _step_twin(gpu_patch_inputs, torch.bfloat16, sample_patches_triton)
    run = synced(step)
    got = run()
    if not draw:  # parity at scale before timing
        ref = _step_twin(gpu_patch_inputs, torch.float32)
        for g_, r_ in zip(got, ref):
            torch.testing.assert_close(g_.float(), r_, rtol=1e-2, atol=1e-2)
    benchmark(run)
    _record_bw(benchmark, _patch_bytes(4, 2))


@gpu
@pytest.mark.parametrize("impl", ["reference-autograd-grid_sample", "triton"])
def test_patch_fwd_bwd_gpu(benchmark, gpu_patch_inputs, impl):
    """Forward + coordinate backward of the dense views (the stage 0/2 training path)."""
    from lafs_fast.kernels.patch_sampling_triton import sample_patches_triton

    dense_img, _, dense_xy, _, _, noise_d, _ = gpu_patch_inputs
    benchmark.group = "patch sampling forward+backward (coords), 512 x 196 tokens"
    benchmark.extra_info.update(items=B_GPU * V_DENSE * K)
    if impl.startswith("reference"):
        benchmark.extra_info["role"] = "reference"
    fn = sample_patches_torch if impl.startswith("reference") else sample_patches_triton
    coords = dense_xy.clone().requires_grad_()
    grad = torch.randn(B_GPU * V_DENSE, K, 192, device=DEVICE)

    def step():
        coords.grad = None
        fn(dense_img, coords, 8, noise=noise_d).backward(grad)
        return coords.grad

    run = synced(step)
    run()
    benchmark(run)


@pytest.fixture(scope="module")
def gpu_view_images():
    g = torch.Generator(device=DEVICE).manual_seed(0)
    return torch.randint(0, 256, (B_GPU, S, S, 3), dtype=torch.uint8, device=DEVICE, generator=g)


@gpu
def test_views_torchvision_per_sample_gpu(benchmark, gpu_view_images):
    benchmark.group = "views, H100 scale (256 images x 10 views, clean + augmented)"
    benchmark.extra_info.update(role="reference", items=B_GPU * 10)
    benchmark.pedantic(synced(torchvision_views_per_sample), args=(gpu_view_images, lafs_view_specs()),
                       rounds=2, iterations=1, warmup_rounds=1)


@gpu
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_views_gpu(benchmark, gpu_view_images, backend):
    benchmark.group = "views, H100 scale (256 images x 10 views, clean + augmented)"
    benchmark.extra_info.update(items=B_GPU * 10)
    run = synced(lambda: augment_views(gpu_view_images, seed=0, backend=backend, out_dtype=torch.bfloat16))
    out = run()
    assert out.backend == backend
    benchmark(run)
    n = B_GPU * 10
    n_blur = int((out.params.blur_sigma > 0).sum())
    # bytes: sources read once per view, clean + augmented written in bf16, plus the fp32 scratch
    # of the blurred views (written by the view kernel, read + written by the horizontal pass, read
    # by the vertical one)
    nbytes = n * S * S * 3 * (1 + 2 + 2) + n_blur * S * S * 3 * 4 * 4
    _record_bw(benchmark, nbytes)
