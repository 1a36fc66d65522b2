"""Landmark patch sampling: the vectorised torch twin (the oracle for every fast path).

The reference (Part fViT / LAFS) samples one 8x8 patch per landmark with a Python loop of
``F.grid_sample`` calls. This twin computes the same numbers with ONE grid_sample call over a
(B, L, P*P) grid. Conventions (docs/method.md section 2):

- patch element (a, b), a, b in 0..P-1, has offsets o = a - P/2, q = b - P/2 (-4..3 for P = 8);
- normalised grid point ``u = (x + o) / (H / 2) - 1``, ``v = (y + q) / (H / 2) - 1`` (the reference
  divides both axes by H/2; images are square), bilinear, ``align_corners=False``, zero padding;
- token layout: the FIRST patch axis is the x offset; token i flattens as (a, b, c), channel fastest.

Everything here runs on any device; gradients flow into ``coords`` through grid_sample.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["patch_offsets", "normalise_images", "gather_landmarks", "sample_patches_torch"]


def patch_offsets(patch_size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Per-element pixel offsets of a patch, exactly as the reference builds them.

    Returns: (P, P, 2) float32, ``[a, b] = (a - P/2, b - P/2)``: the first axis moves x.
    """
    half = patch_size / 2
    r = torch.arange(-half, half, dtype=torch.float32, device=device)
    ga, gb = torch.meshgrid(r, r, indexing="ij")
    return torch.stack((ga, gb), dim=-1)


def normalise_images(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 NHWC (decoder output) -> float NCHW in [-1, 1] (``x / 255 * 2 - 1``); float passes through.

    images: (B, H, W, 3) uint8 or (B, 3, H, W) float. Returns (B, 3, H, W) ``dtype``.
    """
    if images.dtype == torch.uint8:
        return (images.permute(0, 3, 1, 2).to(dtype) / 255.0 * 2 - 1).contiguous()
    return images.to(dtype)


def gather_landmarks(coords: torch.Tensor, indices: torch.Tensor | None) -> torch.Tensor:
    """Select landmarks per sample: coords (B, K, 2), indices (B, L) int -> (B, L, 2).

    ``indices=None`` keeps all K in order. Differentiable w.r.t. coords (index_select's gradient
    scatters back, so a landmark drawn twice receives both contributions).
    """
    if indices is None:
        return coords
    idx = indices.long().unsqueeze(-1).expand(-1, -1, 2)
    return torch.gather(coords, 1, idx)


def sample_patches_torch(
    images: torch.Tensor,
    coords: torch.Tensor,
    patch_size: int = 8,
    *,
    indices: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Sample one P x P patch around each landmark: the reference's numbers, one grid_sample call.

    Args:
        images: (B, 3, H, W) float, already in the network's range, or (B, H, W, 3) uint8 (then
            normalised with ``x / 255 * 2 - 1`` first). Square: H == W.
        coords: (B, K, 2) float px, (x, y) = (column, row), 0..H-1 inside the image.
        indices: optional (B, L) int landmark indices (the "shuffle": token j carries landmark
            indices[:, j]); default all K in order.
        noise: optional (B, L, 2) px added to the selected coordinates (the "perturbation").
        out_dtype: output dtype; default the float dtype of ``images`` (float32 for uint8 input).

    Returns:
        tokens: (B, L, 3 * P * P), element (a, b, c) of token i at ``(a * P + b) * 3 + c``.
    """
    x = normalise_images(images) if images.dtype == torch.uint8 else images
    b, c, h, _ = x.shape
    pts = gather_landmarks(coords, indices)
    if noise is not None:
        pts = pts + noise
    pts = pts.to(x.dtype)
    n = pts.shape[1]
    p = patch_size
    off = patch_offsets(p, x.device).to(x.dtype).reshape(1, 1, p * p, 2)
    # Same expression as the reference ((offset + landmark) / (H * 0.5) - 1) so rounding matches.
    grid = (off + pts[:, :, None, :]) / (h * 0.5) - 1  # (B, L, P*P, 2), rows a-major
    # Laid out as (B, L*P, P): grid_sample's CPU kernel runs about 2x faster on short output rows
    # than on (B, L, P*P) at B = 64 (same points, same numbers).
    out = F.grid_sample(x, grid.reshape(b, n * p, p, 2), mode="bilinear", padding_mode="zeros", align_corners=False)
    # out: (B, C, L*P, P) = (B, C, L, P*P) -> (B, L, P*P, C): channel fastest
    tokens = out.reshape(b, c, n, p * p).permute(0, 2, 3, 1).reshape(b, n, p * p * c)
    return tokens.to(out_dtype) if out_dtype is not None else tokens
