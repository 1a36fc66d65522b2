"""`augment_views`: LAFS multi-view augmentation on every device (the one public entry).

Dispatch at the edge, like ``lafs_fast.sampling``: ``backend="auto"`` runs the Triton kernels on
CUDA when they import, the torch twin otherwise; ``"torch"`` / ``"triton"`` force either (under
``TRITON_INTERPRET=1`` an explicit ``"triton"`` also runs on CPU tensors). Both render the same
parameters, drawn once on the images' device from ``seed`` (``kernels.augment.draw_view_params``), so
a seed reproduces the views on either backend up to float rounding.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from lafs_fast.dispatch import TRITON_BACKENDS, resolve_triton_backend, triton_entry
from lafs_fast.kernels.augment import ViewParams, ViewSpec, apply_views_torch, draw_view_params, lafs_view_specs

__all__ = ["augment_views", "AugmentedViews", "resolve_view_backend", "triton_views", "BACKENDS"]

BACKENDS = TRITON_BACKENDS


@dataclass
class AugmentedViews:
    """The views of one batch.

    clean: (B, V, 3, S, S) normalised crops (no colour change), for the landmark CNN.
    augmented: (B, V, 3, S, S) the same crops after jitter / grayscale / blur / solarize.
    affine: (B, V, 2, 3) fp32, source pixel (x, y, 1) -> view pixel (x, y) (crop box + flip).
    params: the drawn ViewParams (flat over B * V).
    backend: "triton" or "torch", the one that ran.
    """

    clean: torch.Tensor
    augmented: torch.Tensor
    affine: torch.Tensor
    params: ViewParams
    backend: str


def triton_views() -> tuple[Callable | None, str]:
    """The Triton view renderer if it imports here, else (None, why)."""
    return triton_entry("lafs_fast.kernels.augment_triton", "apply_views_triton", "Triton view kernel")


def resolve_view_backend(backend: str, device: torch.device) -> tuple[str, str]:
    """Which backend renders views for ``backend`` on ``device``, and why."""
    return resolve_triton_backend(backend, device, triton_views, "view", "torch twin")


def _check_params(params: ViewParams, batch: int, h: int, w: int) -> None:
    """Explicit parameters must describe B * V crops inside the source (the kernels do not bound-check)."""
    n = batch * params.num_views
    if params.crop.shape != (n, 4):
        raise ValueError(f"params.crop must be (B * V, 4) = ({n}, 4), got {tuple(params.crop.shape)}")
    top, left, ch, cw = params.crop.unbind(1)
    inside = (top >= 0) & (left >= 0) & (ch > 0) & (cw > 0) & (top + ch <= h) & (left + cw <= w)
    if not bool(inside.all()):
        bad = int(torch.nonzero(~inside)[0, 0])
        raise ValueError(
            f"crop box {params.crop[bad].tolist()} (top, left, height, width) of view {bad} leaves the {h}x{w} source"
        )


def augment_views(
    images: torch.Tensor,
    specs: list[ViewSpec] | None = None,
    *,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    params: ViewParams | None = None,
    out_size: int = 112,
    interpolation: str = "bilinear",
    out_dtype: torch.dtype = torch.float32,
    backend: str = "auto",
    attempts: int = 10,
) -> AugmentedViews:
    """Render V clean + augmented views of each source face.

    Args:
        images: (B, H, W, 3) uint8 source faces (decoder output), on any device.
        specs: V view recipes; default ``lafs_view_specs()`` (2 global + 8 local, spec section 3).
        seed: seeds a generator on the images' device (ignored when ``generator`` or ``params``
            is given); default: drawn from torch's global RNG.
        generator: a torch.Generator on the images' device to draw from (advances it).
        params: render these parameters instead of drawing.
        out_size: S, view side (112).
        interpolation: "bilinear" or "bicubic" (the reference uses bicubic).
        out_dtype: fp32 / bf16 / fp16.
        backend: "auto", "torch" or "triton".
        attempts: RandomResizedCrop tries before the centre fallback.

    Returns:
        AugmentedViews with (B, V, 3, S, S) clean and augmented views and (B, V, 2, 3) affines.
    """
    if (
        not isinstance(images, torch.Tensor)
        or images.dtype != torch.uint8
        or images.dim() != 4
        or images.shape[-1] != 3
    ):
        got = f"{tuple(images.shape)} {images.dtype}" if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be (B, H, W, 3) uint8 source faces, got {got}")
    if out_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"out_dtype must be float32, bfloat16 or float16, got {out_dtype}")
    b = images.shape[0]
    if params is None:
        specs = specs if specs is not None else lafs_view_specs()
        if generator is None:
            if seed is None:
                seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
            generator = torch.Generator(device=images.device).manual_seed(int(seed))
        params = draw_view_params(b, specs, (images.shape[1], images.shape[2]), generator, attempts=attempts)
    else:
        params = params.to(images.device)
        _check_params(params, b, images.shape[1], images.shape[2])
    chosen, _ = resolve_view_backend(backend, images.device)
    if chosen == "triton":
        fn, why = triton_views()
        if fn is None:
            raise ValueError(f"backend='triton' requested but {why}")
    else:
        fn = apply_views_torch
    clean, aug = fn(images, params, out_size, interpolation=interpolation, out_dtype=out_dtype)
    affine = params.affine(out_size).reshape(b, params.num_views, 2, 3)
    return AugmentedViews(clean=clean, augmented=aug, affine=affine, params=params, backend=chosen)
