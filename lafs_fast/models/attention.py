"""Multi-head attention core with selectable backends that give the same numbers.

- ``xformers``: ``xformers.ops.memory_efficient_attention`` (CUDA only), layout (B, N, H, D);
- ``sdpa``: ``F.scaled_dot_product_attention`` (flash / efficient / math chosen by torch), (B, H, N, D);
- ``math``: softmax(q k^T * scale) v, the reference's naive path;
- ``auto``: xformers where it runs (CUDA + a working install), SDPA otherwise.

Every backend honours an explicit ``scale`` (the reference uses dim**-0.5, not head_dim**-0.5).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

__all__ = ["ATTENTION_BACKENDS", "attention", "resolve_attention", "xformers_status"]

ATTENTION_BACKENDS = ("auto", "xformers", "sdpa", "math")


@functools.lru_cache(maxsize=1)
def xformers_status() -> tuple[bool, str]:
    """Whether xformers' memory-efficient attention can run here (needs CUDA), and why not."""
    if not torch.cuda.is_available():
        # Do not even import it: on a CPU torch it logs a long warning about its CUDA build.
        return False, "xformers needs CUDA (memory_efficient_attention has no CPU kernel)"
    try:
        import xformers.ops as xops
    except Exception as exc:  # not installed, or a broken build
        return False, f"xformers not importable ({type(exc).__name__})"
    try:
        q = torch.zeros(1, 4, 1, 64, device="cuda", dtype=torch.bfloat16)
        xops.memory_efficient_attention(q, q, q)
    except Exception as exc:
        return False, f"xformers installed but its CUDA kernels do not run here ({type(exc).__name__})"
    return True, "xformers memory_efficient_attention"


def resolve_attention(backend: str, device: torch.device) -> tuple[str, str]:
    """The backend that will run for ``backend`` on ``device``, and why."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(ATTENTION_BACKENDS)}")
    if backend != "auto":
        return backend, "forced"
    if device.type == "cuda":
        ok, why = xformers_status()
        if ok:
            return "xformers", why
        return "sdpa", f"{why}; using SDPA"
    return "sdpa", "CPU: torch scaled_dot_product_attention"


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, backend: str = "sdpa") -> torch.Tensor:
    """softmax(q k^T * scale) v.

    q, k, v: (B, N, H, D). Returns (B, N, H, D). ``backend`` must be resolved (not "auto").
    """
    if backend == "xformers":
        import xformers.ops as xops

        return xops.memory_efficient_attention(q, k, v, scale=scale)
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, N, D)
    if backend == "sdpa":
        out = F.scaled_dot_product_attention(qh, kh, vh, scale=scale)
    elif backend == "math":
        attn = (qh @ kh.transpose(-2, -1)) * scale
        out = attn.softmax(dim=-1) @ vh
    else:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(ATTENTION_BACKENDS[1:])}")
    return out.transpose(1, 2)
