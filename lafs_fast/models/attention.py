"""Multi-head attention core with selectable backends that give the same numbers.

- ``xformers``: ``xformers.ops.memory_efficient_attention`` (CUDA only), layout (B, N, H, D);
- ``sdpa``: ``F.scaled_dot_product_attention`` (flash / efficient / math chosen by torch), (B, H, N, D);
- ``math``: softmax(q k^T * scale) v, the reference's naive path;
- ``auto``: xformers where its own kernels run (CUDA + its compiled extension loaded), SDPA otherwise.

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

from lafs_fast.config import ATTENTION_BACKENDS  # model.attention's choices: the one list

__all__ = [
    "attention",
    "resolve_attention",
    "seqlen_runs",
    "xformers_extension",
    "xformers_status",
]


def xformers_extension() -> tuple[bool, str]:
    """Whether xformers' own compiled extension (``xformers/_C.so``: its cutlass / FA3 kernels)
    loaded, and why not. Without it xformers still imports and ``memory_efficient_attention`` still
    runs -- on torch's own flash kernel, the one SDPA calls -- so only this tells the two apart.
    The PyPI wheel's ``_C.so`` is built for CUDA 12: on a CUDA 13 image it needs ``libcudart.so.12``
    (the nvidia-cuda-runtime-cu12 wheel on ``LD_LIBRARY_PATH``)."""
    try:
        import xformers
    except Exception as exc:  # not installed, or a broken build
        return False, f"xformers not importable ({type(exc).__name__})"
    if getattr(xformers, "_has_cpp_library", False):
        return True, "xformers C++/CUDA extension loaded"
    exc = getattr(getattr(xformers, "_cpp_lib", None), "_cpp_library_load_exception", None)
    detail = str(exc).strip().splitlines()[0][:160] if exc is not None and str(exc).strip() else "unknown reason"
    return False, (
        f"xformers' C++/CUDA extension did not load ({detail}); its attention would be torch's own "
        "flash kernel (for a CUDA 13 image: nvidia-cuda-runtime-cu12 on LD_LIBRARY_PATH, see docs/gpu.md)"
    )


@functools.lru_cache(maxsize=1)
def xformers_status() -> tuple[bool, str]:
    """Whether xformers' OWN memory-efficient attention kernels run here (needs CUDA and its
    compiled extension, :func:`xformers_extension`), and why not."""
    if not torch.cuda.is_available():
        # Do not even import it: on a CPU torch it logs a long warning about its CUDA build.
        return False, "xformers needs CUDA (memory_efficient_attention has no CPU kernel)"
    ok, why = xformers_extension()
    if not ok:
        return False, why
    try:
        import xformers.ops as xops

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


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    backend: str = "sdpa",
    seqlens: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale) v.

    q, k, v: (B, N, H, D). Returns (B, N, H, D). ``backend`` must be resolved (not "auto").
    ``seqlens``: B must be 1 and N == sum(seqlens); attention is block-diagonal over the segments
    (see the module docstring for how each backend runs it).
    """
    if seqlens is not None:
        if q.shape[0] != 1 or sum(seqlens) != q.shape[1]:
            raise ValueError(
                f"packed attention needs q of shape (1, sum(seqlens) = {sum(seqlens)}, H, D), got {tuple(q.shape)}"
            )
        if backend == "xformers":
            import xformers.ops as xops

            return xops.memory_efficient_attention(
                q, k, v, attn_bias=_block_diagonal_mask(tuple(seqlens), q.device), scale=scale
            )
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
