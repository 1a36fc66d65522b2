"""`sample_patches`: the one public entry to landmark patch sampling, on every device.

Dispatch at the edge: ``backend="auto"`` picks the Triton kernel on CUDA when it is importable,
the vectorised torch twin otherwise; ``"torch"`` / ``"triton"`` force either (under
``TRITON_INTERPRET=1`` an explicit ``"triton"`` also runs on CPU tensors). All backends give the reference's
numbers in the reference token layout (see ``lafs_fast.kernels.patch_sampling``).
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable

import torch

from lafs_fast.kernels.patch_sampling import sample_patches_torch

__all__ = ["sample_patches", "BACKENDS", "resolve_backend", "triton_sampler", "validate_inputs"]

BACKENDS = ("auto", "torch", "triton")


@functools.lru_cache(maxsize=1)
def triton_sampler() -> tuple[Callable | None, str]:
    """The Triton sampler entry point if it can be imported here, else (None, why)."""
    try:
        mod = importlib.import_module("lafs_fast.kernels.patch_sampling_triton")
    except Exception as exc:  # triton missing, or the kernel module absent/broken
        return None, f"Triton patch kernel unavailable ({type(exc).__name__}: {exc})"
    return mod.sample_patches_triton, "Triton patch kernel"


def resolve_backend(backend: str, device: torch.device) -> tuple[str, str]:
    """Which backend runs for ``backend`` on ``device``, and why (for logs and `lafs-fast info`)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown sampler backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend, "forced"
    if device.type != "cuda":
        # The interpreter (TRITON_INTERPRET=1) runs Triton on CPU tensors only when asked for
        # explicitly: it is a test vehicle, far slower than the twin.
        return "torch", "no CUDA device: vectorised torch twin"
    fn, why = triton_sampler()
    if fn is None:
        return "torch", why + ": vectorised torch twin"
    return "triton", why


def validate_inputs(
    images: torch.Tensor,
    coords: torch.Tensor,
    patch_size: int,
    indices: torch.Tensor | None,
    check_finite: bool,
) -> None:
    """Raise ValueError naming the problem for any input the sampler cannot take."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a 4-D tensor (B, 3, H, W) float or (B, H, W, 3) uint8, got {shape}")
    if images.dtype == torch.uint8:
        b, h, w, c = images.shape
        layout = "(B, H, W, 3) uint8"
    elif images.is_floating_point():
        b, c, h, w = images.shape
        layout = "(B, 3, H, W) float"
    else:
        raise ValueError(f"images dtype {images.dtype} is not supported: use uint8 NHWC or float NCHW")
    if c != 3:
        raise ValueError(f"images must have 3 channels in layout {layout}, got shape {tuple(images.shape)}")
    if h != w:
        raise ValueError(f"images must be square (the reference scales both axes by H/2), got {h}x{w}")
    if patch_size <= 0 or patch_size % 2:
        raise ValueError(f"patch_size must be a positive even number, got {patch_size}")
    if not isinstance(coords, torch.Tensor) or coords.dim() != 3 or coords.shape[-1] != 2:
        shape = tuple(coords.shape) if isinstance(coords, torch.Tensor) else type(coords).__name__
        raise ValueError(f"coords must be (B, K, 2) pixel (x, y) pairs, got {shape}")
    if coords.shape[0] != b:
        raise ValueError(f"coords batch {coords.shape[0]} does not match images batch {b}")
    if not coords.is_floating_point():
        raise ValueError(f"coords must be floating point pixels, got {coords.dtype}")
    if check_finite and not bool(torch.isfinite(coords).all()):
        raise ValueError("coords contain NaN or inf: check the landmark network's output")
    if indices is not None:
        if indices.dim() != 2 or indices.shape[0] != b or indices.dtype.is_floating_point:
            raise ValueError(f"indices must be (B, L) integers with B = {b}, got {tuple(indices.shape)} {indices.dtype}")
        k = coords.shape[1]
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= k):
            raise ValueError(f"indices must lie in [0, {k}) (the number of landmarks)")


def sample_patches(
    images: torch.Tensor,
    coords: torch.Tensor,
    patch_size: int = 8,
    *,
    indices: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    backend: str = "auto",
    check_finite: bool = True,
) -> torch.Tensor:
    """Landmark patches as tokens, in the reference layout.

    Args:
        images: (B, 3, H, W) float in the network's range, or (B, H, W, 3) uint8 (normalised
            ``x / 255 * 2 - 1`` on the fly). Square.
        coords: (B, K, 2) float px, (x, y); may lie outside the image (reads zeros there).
        patch_size: P; tokens have 3 * P * P values (192 for P = 8).
        indices: optional (B, L) landmark indices per token (the LAFS shuffle); default all K.
        noise: optional (B, L, 2) px added to the selected coordinates (the LAFS perturbation).
        out_dtype: output dtype (bf16 / fp16 / fp32); default the image float dtype.
        backend: "auto", "torch" or "triton".
        check_finite: reject NaN/inf coords (a host sync; hot loops that already guard the loss
            may pass False).

    Returns:
        tokens: (B, L, 3 * P * P), differentiable w.r.t. ``coords`` (and ``noise``).
    """
    validate_inputs(images, coords, patch_size, indices, check_finite)
    chosen, _ = resolve_backend(backend, images.device)
    if chosen == "triton":
        fn, why = triton_sampler()
        if fn is None:
            raise ValueError(f"backend='triton' requested but {why}")
        return fn(images, coords, patch_size, indices=indices, noise=noise, out_dtype=out_dtype)
    return sample_patches_torch(images, coords, patch_size, indices=indices, noise=noise, out_dtype=out_dtype)
