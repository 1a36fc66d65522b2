"""Attention, forward + backward, side by side: math (the reference's naive path) / SDPA / xformers.

Shapes of the fViT at the reference size: head dim 64, 11 heads; 197 tokens (a dense view + CLS)
and 37 tokens (a sparse view + CLS). The reference's dim**-0.5 scale is passed to every backend.
CPU cases run a small batch; GPU cases (bf16, batch 256; TFLOP/s and MFU recorded, from
:func:`fwd_bwd_flops`) skip without CUDA, and the xformers case
also without a working xformers (its CUDA kernels loaded, not the fallback). ``LAFS_GPU_DRY_RUN=1``:
the GPU cases on the CPU at batch 2 (plumbing only). Each case is called before timing (kernel
loads, cuBLAS / flash handles outside the timed rounds).
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.bench_device import DEVICE, bench, gpu, record_mfu, size
from lafs_fast.models.attention import attention, xformers_status

HEADS, HEAD_DIM, SCALE = 11, 64, 768**-0.5


def _qkv(batch: int, tokens: int, device: str, dtype: torch.dtype) -> list[torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(0)
    return [
        torch.randn(batch, tokens, HEADS, HEAD_DIM, generator=g, device=device, dtype=dtype).requires_grad_(True)
        for _ in range(3)
    ]


def fwd_bwd_flops(batch: int, tokens: int) -> float:
    """Attention forward + backward FLOPs: the two products (q k^T, then x v), 4 B H N^2 Dh forward,
    backward 2x forward (as benchmarks/perf_model.py counts; a flash backward also recomputes the
    scores, not counted: model FLOPs)."""
    return 3.0 * 4 * batch * HEADS * tokens * tokens * HEAD_DIM


def _fwd_bwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str):
    def step() -> None:
        out = attention(q, k, v, SCALE, backend)
        out.backward(torch.ones_like(out))
        for t in (q, k, v):
            t.grad = None
        if q.is_cuda:
            torch.cuda.synchronize()

    step()  # warm: kernel load / handle creation stay out of the timed rounds
    return step


@pytest.mark.parametrize("tokens", [197, 37])
@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_attention_cpu(benchmark, backend, tokens):
    batch = 8
    q, k, v = _qkv(batch, tokens, "cpu", torch.float32)
    benchmark.group = f"attention fwd+bwd, CPU fp32, {batch} x {tokens} tokens"
    benchmark.extra_info.update(items=batch, role="reference" if backend == "math" else "")
    benchmark(_fwd_bwd(q, k, v, backend))


@gpu
@pytest.mark.parametrize("tokens", [197, 37])
@pytest.mark.parametrize("backend", ["math", "sdpa", "xformers"])
def test_attention_gpu(benchmark, backend, tokens):
    if backend == "xformers" and not xformers_status()[0]:
        pytest.skip(xformers_status()[1])
    batch = size(256, 2)
    q, k, v = _qkv(batch, tokens, DEVICE.type, torch.bfloat16)
    ref = attention(q.float(), k.float(), v.float(), SCALE, "math")
    torch.testing.assert_close(attention(q, k, v, SCALE, backend).float(), ref, rtol=3e-2, atol=3e-2)
    benchmark.group = f"attention fwd+bwd, {DEVICE.type.upper()} bf16, {batch} x {tokens} tokens"
    benchmark.extra_info.update(items=batch, role="reference" if backend == "math" else "")
    bench(benchmark, _fwd_bwd(q, k, v, backend), rounds=20)
    record_mfu(benchmark, fwd_bwd_flops(batch, tokens))


# -- multi-crop: one student step's attention over 2 dense + 8 sparse views per image, either one
#    call per token length (views of equal length batched) or every view packed in one row
#    (block-diagonal: xformers' BlockDiagonalMask on CUDA, the per-run torch twin elsewhere)


def _multicrop_step(images: int, device: str, dtype: torch.dtype, backend: str, packed: bool):
    lengths = [(2 * images, 197), (8 * images, 37)]
    if packed:
        seqlens = tuple(n for count, n in lengths for _ in range(count))
        qkv = [_qkv(1, sum(seqlens), device, dtype)]
    else:
        seqlens = None
        qkv = [_qkv(count, n, device, dtype) for count, n in lengths]

    def step() -> None:
        for q, k, v in qkv:
            out = attention(q, k, v, SCALE, backend, seqlens)
            out.backward(torch.ones_like(out))
            for t in (q, k, v):
                t.grad = None
        if device == "cuda":
            torch.cuda.synchronize()

    step()  # warm: kernel load / handle creation stay out of the timed rounds
    return step


@pytest.mark.parametrize("packed", [False, True], ids=["per-length", "packed"])
def test_multicrop_attention_cpu(benchmark, packed):
    images = 2
    benchmark.group = f"multi-crop attention fwd+bwd, CPU fp32 sdpa, {images} images x (2 x 197 + 8 x 37)"
    benchmark.extra_info.update(items=images, role="" if packed else "reference")
    benchmark(_multicrop_step(images, "cpu", torch.float32, "sdpa", packed))


@gpu
@pytest.mark.parametrize(
    "backend,packed",
    [("sdpa", False), ("xformers", False), ("xformers", True)],
    ids=["sdpa-per-length", "xformers-per-length", "xformers-packed"],
)
def test_multicrop_attention_gpu(benchmark, backend, packed):
    if backend == "xformers" and not xformers_status()[0]:
        pytest.skip(xformers_status()[1])
    images = size(64, 1)
    benchmark.group = f"multi-crop attention fwd+bwd, {DEVICE.type.upper()} bf16, {images} images x (2 x 197 + 8 x 37)"
    # one reference per group: SDPA per length (what runs where xformers cannot)
    benchmark.extra_info.update(items=images, role="reference" if (backend, packed) == ("sdpa", False) else "")
    bench(benchmark, _multicrop_step(images, DEVICE.type, torch.bfloat16, backend, packed), rounds=20)
    record_mfu(benchmark, fwd_bwd_flops(2 * images, 197) + fwd_bwd_flops(8 * images, 37))
