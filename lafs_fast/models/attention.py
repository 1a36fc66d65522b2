"""Multi-head attention core with selectable backends that give the same numbers.

- ``xformers``: ``xformers.ops.memory_efficient_attention`` (CUDA only), layout (B, N, H, D);
- ``sdpa``: ``F.scaled_dot_product_attention`` (flash / efficient / math chosen by torch), (B, H, N, D);
- ``math``: softmax(q k^T * scale) v, the reference's naive path;
- ``auto``: xformers where it runs (CUDA + a working install), SDPA otherwise.

Every backend honours an explicit ``scale`` (the reference uses dim**-0.5, not head_dim**-0.5).

Packed sequences (``seqlens``): several sequences laid end to end in one batch row, q/k/v
(1, sum(seqlens), H, D); a token attends only to the tokens of its own segment (block-diagonal).
xformers runs it as one kernel with ``fmha.BlockDiagonalMask``. The torch twin (sdpa / math) does
NOT build the dense (T, T) mask -- at the reference multi-crop (B 82: T = 56,580 tokens) that is
3.2 G entries per head -- but splits the row into runs of equal-length segments and runs each run
as an ordinary (count, L, H, D) batch: the same numbers as the masked softmax, O(sum L_i^2) work.
"""

from __future__ import annotations

import functools
import itertools

import torch
import torch.nn.functional as F

__all__ = ["ATTENTION_BACKENDS", "attention", "resolve_attention", "seqlen_runs", "xformers_status"]

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


def seqlen_runs(seqlens: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """Runs of equal consecutive lengths: (10, 10, 4, 4, 4) -> ((10, 2), (4, 3)) as (length, count).

    Not cached: a few hundred ints per layer is noise, and torch.compile traces it plainly."""
    return tuple((n, len(list(g))) for n, g in itertools.groupby(seqlens))


@functools.lru_cache(maxsize=16)
def _block_diagonal_mask(seqlens: tuple[int, ...], device: torch.device):  # -> xformers BlockDiagonalMask
    # built once per (layout, device), not once per layer: from_seqlens copies seqstart to the device
    from xformers.ops import fmha

    return fmha.BlockDiagonalMask.from_seqlens(list(seqlens), device=device)


def _dense(qh: torch.Tensor, kh: torch.Tensor, vh: torch.Tensor, scale: float, backend: str) -> torch.Tensor:
    """(B, H, N, D) -> (B, H, N, D), no mask."""
    if backend == "sdpa":
        return F.scaled_dot_product_attention(qh, kh, vh, scale=scale)
    if backend == "math":
        attn = (qh @ kh.transpose(-2, -1)) * scale
        return attn.softmax(dim=-1) @ vh
    raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(ATTENTION_BACKENDS[1:])}")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, backend: str = "sdpa",
              seqlens: tuple[int, ...] | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v.

    q, k, v: (B, N, H, D). Returns (B, N, H, D). ``backend`` must be resolved (not "auto").
    ``seqlens``: B must be 1 and N == sum(seqlens); attention is block-diagonal over the segments
    (see the module docstring for how each backend runs it).
    """
    if seqlens is not None:
        if q.shape[0] != 1 or sum(seqlens) != q.shape[1]:
            raise ValueError(f"packed attention needs q of shape (1, sum(seqlens) = {sum(seqlens)}, H, D), got {tuple(q.shape)}")
        if backend == "xformers":
            import xformers.ops as xops

            return xops.memory_efficient_attention(q, k, v, attn_bias=_block_diagonal_mask(tuple(seqlens), q.device), scale=scale)
        runs = seqlen_runs(tuple(seqlens))
        sizes = [n * count for n, count in runs]
        # torch.split, not slicing: its backward is one cat, not a zero-filled (T, H, D) per run
        qs, ks, vs = (torch.split(t[0], sizes) for t in (q, k, v))
        outs = []
        for (n, count), qr, kr, vr in zip(runs, qs, ks, vs):
            # one run of `count` segments of n tokens is an ordinary batch of `count` sequences
            qh, kh, vh = (t.view(count, n, *t.shape[1:]).transpose(1, 2) for t in (qr, kr, vr))
            outs.append(_dense(qh, kh, vh, scale, backend).transpose(1, 2).reshape(n * count, *q.shape[2:]))
        return torch.cat(outs).unsqueeze(0)
    if backend == "xformers":
        import xformers.ops as xops

        return xops.memory_efficient_attention(q, k, v, scale=scale)
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, N, D)
    return _dense(qh, kh, vh, scale, backend).transpose(1, 2)
