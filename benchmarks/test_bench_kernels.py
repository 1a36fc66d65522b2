"""Kernel benchmarks: patch sampling and view augmentation, fast paths beside reference-style ones.

    pytest benchmarks/test_bench_kernels.py            # CPU cases (tiny); GPU cases skip without CUDA

GPU cases run at pre-training scale (issue 3): B = 256 images, 10 views (2 dense views of 196
landmarks, 8 sparse views of 36 drawn landmarks), and record GB/s on the bytes that must move next
to the measured device-to-device copy bandwidth (``extra_info``). No number here is asserted: the
results are recorded with their command, device and versions (benchmarks/gpu_run.sh, render.py).

``LAFS_GPU_DRY_RUN=1`` runs the GPU cases' code on the CPU at toy scale (B = 1, Triton under the
interpreter, torch.compile with the eager backend; ``benchmarks/bench_device.py``): it checks the
benchmark code itself, not speed. Timed rounds never include a compilation: every case calls its
step before timing (the compiled twin twice), and the compile / first-call time is recorded apart
(``extra_info["first_call_s"]``).
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.baselines import reference_patch_loop, synced, torchvision_views_per_sample
from benchmarks.bench_device import COMPILE_BACKEND, DEVICE, bench, gpu, record_ceilings, size, timed_call
from benchmarks.perf_model import view_read_px
from lafs_fast.augment import augment_views
from lafs_fast.kernels.augment import lafs_view_specs
from lafs_fast.kernels.patch_sampling import sample_patches_torch

B_GPU, V_DENSE, V_SPARSE, K, L_SPARSE, S = size(256, 1), 2, 8, 196, 36, 112
B_TV = size(32, 1)
# torchvision per (image, view) is Python-bound: a smaller batch, compared per image (B_TV above);
# views: side and local views (toy in the dry run: interpreted Triton)
S_VIEW, N_LOCAL = size(112, 24), size(8, 1)


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
    """Bytes that must move: the pixels each view's patches read (``perf_model.view_read_px``: a
    sparse view's 36 footprints touch 2,916 of its 12,544 pixels; counting the sparse views whole,
    before issue 21, put 1.78 MB per image where 0.86 MB move, the GB/s 2.1x too high), every token
    written once, the coordinates, indices and noise the tokens read (fp32 / int64)."""
    px = V_DENSE * view_read_px(K) + V_SPARSE * view_read_px(L_SPARSE)
    images = B_GPU * px * 3 * img_elem_bytes
    coords = B_GPU * (V_DENSE * K * 2 * 4 * 2 + V_SPARSE * L_SPARSE * (2 * 4 * 2 + 8))  # xy + noise (+ index)
    return images + TOKENS * 192 * out_elem_bytes + coords


def _record_bw(benchmark, nbytes: int) -> None:
    """GB/s on the bytes that must move (median time) beside the measured copy bandwidth."""
    benchmark.extra_info["bytes"] = nbytes
    c = record_ceilings(benchmark)
    if benchmark.stats is not None:
        gbps = nbytes / benchmark.stats.stats.median / 1e9
        benchmark.extra_info["GBps"] = round(gbps, 1)
        benchmark.extra_info["pct_copy_bw"] = round(100 * gbps / c["copy_GBps"], 1)


def _step_twin(inp, out_dtype, fn=sample_patches_torch):
    dense_img, sparse_img, dense_xy, sparse_xy, idx, noise_d, noise_s = inp
    a = fn(dense_img, dense_xy, 8, noise=noise_d, out_dtype=out_dtype)
    b = fn(sparse_img, sparse_xy, 8, indices=idx, noise=noise_s, out_dtype=out_dtype)
    return a, b


@gpu
def test_patch_fwd_reference_loop_gpu(benchmark, gpu_patch_inputs):
    dense_img, sparse_img, dense_xy, sparse_xy, idx, noise_d, noise_s = gpu_patch_inputs
    benchmark.group = f"patch sampling forward, {B_GPU} images x 10 views (pre-training scale: 256)"
    benchmark.extra_info.update(role="reference", items=TOKENS)
    sparse_pts = torch.gather(sparse_xy, 1, idx[..., None].expand(-1, -1, 2)) + noise_s

    def step():
        return reference_patch_loop(dense_img, dense_xy + noise_d), reference_patch_loop(sparse_img, sparse_pts)

    bench(benchmark, synced(step), rounds=3)


@gpu
def test_patch_fwd_twin_gpu(benchmark, gpu_patch_inputs):
    benchmark.group = f"patch sampling forward, {B_GPU} images x 10 views (pre-training scale: 256)"
    benchmark.extra_info.update(items=TOKENS)
    run = synced(lambda: _step_twin(gpu_patch_inputs, torch.bfloat16))
    benchmark.extra_info["first_call_s"] = timed_call(run)
    bench(benchmark, run, rounds=30)
    _record_bw(benchmark, _patch_bytes(4, 2))


@gpu
def test_patch_fwd_twin_compiled_gpu(benchmark, gpu_patch_inputs):
    benchmark.group = f"patch sampling forward, {B_GPU} images x 10 views (pre-training scale: 256)"
    benchmark.extra_info.update(items=TOKENS)
    compiled = torch.compile(sample_patches_torch, dynamic=False, backend=COMPILE_BACKEND)
    run = synced(lambda: _step_twin(gpu_patch_inputs, torch.bfloat16, compiled))
    benchmark.extra_info["first_call_s"] = timed_call(run)  # the compile (two graphs: dense, sparse)
    run()
    bench(benchmark, run, rounds=30)
    _record_bw(benchmark, _patch_bytes(4, 2))


@gpu
@pytest.mark.parametrize("draw", [False, True], ids=["given-draws", "in-kernel-draws"])
def test_patch_fwd_triton_gpu(benchmark, gpu_patch_inputs, draw):
    from lafs_fast.kernels.patch_sampling_triton import sample_patches_triton

    dense_img, sparse_img, dense_xy, sparse_xy, idx, noise_d, noise_s = gpu_patch_inputs
    benchmark.group = f"patch sampling forward, {B_GPU} images x 10 views (pre-training scale: 256)"
    benchmark.extra_info.update(items=TOKENS)
    if draw:

        def step():
            a = sample_patches_triton(dense_img, dense_xy, sigma=5.0, seed=1, out_dtype=torch.bfloat16)
            b = sample_patches_triton(
                sparse_img, sparse_xy, num_tokens=L_SPARSE, sigma=5.0, seed=2, out_dtype=torch.bfloat16
            )
            return a, b
    else:

        def step():
            return _step_twin(gpu_patch_inputs, torch.bfloat16, sample_patches_triton)

    run = synced(step)
    benchmark.extra_info["first_call_s"] = timed_call(run)  # Triton's compile of this variant
    got = run()
    if not draw:  # parity at scale before timing
        ref = _step_twin(gpu_patch_inputs, torch.float32)
        for g_, r_ in zip(got, ref):
            torch.testing.assert_close(g_.float(), r_, rtol=1e-2, atol=1e-2)
    bench(benchmark, run, rounds=30)
    _record_bw(benchmark, _patch_bytes(4, 2))


@gpu
@pytest.mark.parametrize("impl", ["reference-autograd-grid_sample", "triton"])
def test_patch_fwd_bwd_gpu(benchmark, gpu_patch_inputs, impl):
    """Forward + coordinate backward of the dense views (the stage 0/2 training path)."""
    from lafs_fast.kernels.patch_sampling_triton import sample_patches_triton

    dense_img, _, dense_xy, _, _, noise_d, _ = gpu_patch_inputs
    benchmark.group = f"patch sampling forward+backward (coords), {B_GPU * V_DENSE} x 196 tokens"
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
    benchmark.extra_info["first_call_s"] = timed_call(run)
    bench(benchmark, run, rounds=30)


@pytest.fixture(scope="module")
def gpu_view_images():
    g = torch.Generator(device=DEVICE).manual_seed(0)
    return torch.randint(0, 256, (B_GPU, S_VIEW, S_VIEW, 3), dtype=torch.uint8, device=DEVICE, generator=g)


@gpu
def test_views_torchvision_per_sample_gpu(benchmark, gpu_view_images):
    benchmark.group = f"views, {B_GPU} images x {2 + N_LOCAL} views of {S_VIEW} px, clean + augmented"
    # items = views made per call: the throughput compares with the 256-image cases
    benchmark.extra_info.update(role="reference", items=B_TV * (2 + N_LOCAL), batch=B_TV)
    specs = lafs_view_specs(N_LOCAL)
    bench(benchmark, synced(lambda: torchvision_views_per_sample(gpu_view_images[:B_TV], specs, S_VIEW)), rounds=2)


@gpu
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_views_gpu(benchmark, gpu_view_images, backend):
    benchmark.group = f"views, {B_GPU} images x {2 + N_LOCAL} views of {S_VIEW} px, clean + augmented"
    benchmark.extra_info.update(items=B_GPU * (2 + N_LOCAL))
    specs = lafs_view_specs(N_LOCAL)
    run = synced(
        lambda: augment_views(
            gpu_view_images, specs, seed=0, out_size=S_VIEW, backend=backend, out_dtype=torch.bfloat16
        )
    )
    out = run()
    assert out.backend == backend
    benchmark.extra_info["first_call_s"] = timed_call(run)
    bench(benchmark, run, rounds=30)
    n = B_GPU * len(specs)
    n_blur = int((out.params.blur_sigma > 0).sum())
    # bytes: sources read once per view, clean + augmented written in bf16, plus the fp32 scratch
    # of the blurred views (written by the view kernel, read + written by the horizontal pass, read
    # by the vertical one)
    nbytes = n * S_VIEW**2 * 3 * (1 + 2 + 2) + n_blur * S_VIEW**2 * 3 * 4 * 4
    _record_bw(benchmark, nbytes)
