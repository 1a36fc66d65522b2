"""Attention, forward + backward, side by side: math (the reference's naive path) / SDPA / xformers.

Shapes of the fViT at the reference size: head dim 64, 11 heads; 197 tokens (a dense view + CLS)
and 37 tokens (a sparse view + CLS). The reference's dim**-0.5 scale is passed to every backend.
CPU cases run a small batch; GPU cases (bf16, batch 256) skip without CUDA, and the xformers case
also without a working xformers.
"""

from __future__ import annotations

import pytest
import torch

from lafs_fast.models.attention import attention, xformers_status

HEADS, HEAD_DIM, SCALE = 11, 64, 768 ** -0.5
CUDA = torch.cuda.is_available()


def _qkv(batch: int, tokens: int, device: str, dtype: torch.dtype) -> list[torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(0)
    return [torch.randn(batch, tokens, HEADS, HEAD_DIM, generator=g, device=device, dtype=dtype).requires_grad_(True)
            for _ in range(3)]


def _fwd_bwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str):
    def step() -> None:
        out = attention(q, k, v, SCALE, backend)
        out.backward(torch.ones_like(out))
        for t in (q, k, v):
            t.grad = None
        if q.is_cuda:
            torch.cuda.synchronize()
    return step


@pytest.mark.parametrize("tokens", [197, 37])
@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_attention_cpu(benchmark, backend, tokens):
    batch = 8
    q, k, v = _qkv(batch, tokens, "cpu", torch.float32)
    benchmark.group = f"attention fwd+bwd, CPU fp32, {batch} x {tokens} tokens"
    benchmark.extra_info.update(items=batch, role="reference" if backend == "math" else "")
    benchmark(_fwd_bwd(q, k, v, backend))


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("tokens", [197, 37])
@pytest.mark.parametrize("backend", ["math", "sdpa", "xformers"])
def test_attention_gpu(benchmark, backend, tokens):
    if backend == "xformers" and not xformers_status()[0]:
        pytest.skip(xformers_status()[1])
    batch = 256
    q, k, v = _qkv(batch, tokens, "cuda", torch.bfloat16)
    ref = attention(q.float(), k.float(), v.float(), SCALE, "math")
    torch.testing.assert_close(attention(q, k, v, SCALE, backend).float(), ref, rtol=3e-2, atol=3e-2)
    benchmark.group = f"attention fwd+bwd, GPU bf16, {batch} x {tokens} tokens"
    benchmark.extra_info.update(items=batch, role="reference" if backend == "math" else "")
    benchmark(_fwd_bwd(q, k, v, backend))
