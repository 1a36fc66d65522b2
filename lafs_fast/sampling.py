"""`sample_patches`: the one public entry to landmark patch sampling, on every device.

Dispatch at the edge: ``backend="auto"`` picks the Triton kernel on CUDA when it is importable,
the vectorised torch twin otherwise; ``"torch"`` / ``"triton"`` force either (under
``TRITON_INTERPRET=1`` an explicit ``"triton"`` also runs on CPU tensors). All backends give the reference's
numbers in the reference token layout (see ``lafs_fast.kernels.patch_sampling``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lafs_fast.dispatch import TRITON_BACKENDS, resolve_triton_backend, triton_entry
from lafs_fast.kernels.patch_sampling import sample_patches_torch

__all__ = [
    "grid_landmarks",
    "sample_patches",
    "BACKENDS",
    "resolve_backend",
    "triton_sampler",
    "validate_inputs",
    "draw_landmark_randomness",
]

BACKENDS = TRITON_BACKENDS


def triton_sampler() -> tuple[Callable | None, str]:
    """The Triton sampler entry point if it can be imported here, else (None, why)."""
    return triton_entry("lafs_fast.kernels.patch_sampling_triton", "sample_patches_triton", "Triton patch kernel")


def resolve_backend(backend: str, device: torch.device) -> tuple[str, str]:
    """Which backend samples patches for ``backend`` on ``device``, and why."""
    return resolve_triton_backend(backend, device, triton_sampler, "sampler", "vectorised torch twin")


def validate_inputs(
    images: torch.Tensor,
    coords: torch.Tensor,
    patch_size: int,
    indices: torch.Tensor | None,
    check_finite: bool,
) -> None:
    """Raise ValueError naming the problem for any input the sampler cannot take."""
    b = _validate_images(images)
    if patch_size <= 0 or patch_size % 2:
        raise ValueError(f"patch_size must be a positive even number, got {patch_size}")
    if not isinstance(coords, torch.Tensor) or coords.dim() != 3 or coords.shape[-1] != 2:
        shape = tuple(coords.shape) if isinstance(coords, torch.Tensor) else type(coords).__name__
        raise ValueError(f"coords must be (B, K, 2) pixel (x, y) pairs, got {shape}")
    if coords.shape[0] != b:
        raise ValueError(f"coords batch {coords.shape[0]} does not match images batch {b}")
    if not coords.is_floating_point():
        raise ValueError(f"coords must be floating point pixels, got {coords.dtype}")
    if check_finite:
        # A device-side assertion, not a host read: no sync on a GPU (the error surfaces at the next
        # sync, e.g. the engine's loss read); on the CPU it raises here (RuntimeError).
        torch._assert_async(
            torch.isfinite(coords).all(), "coords contain NaN or inf: check the landmark network's output"
        )
    if indices is not None:
        if indices.dim() != 2 or indices.shape[0] != b or indices.dtype.is_floating_point:
            raise ValueError(
                f"indices must be (B, L) integers with B = {b}, got {tuple(indices.shape)} {indices.dtype}"
            )
        k = coords.shape[1]
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= k):
            raise ValueError(f"indices must lie in [0, {k}) (the number of landmarks)")


def _validate_images(images: torch.Tensor) -> int:
    """The batch size of square 3-channel ``images`` (B, H, W, 3) uint8 or (B, 3, H, W) float."""
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
    return b


def draw_landmark_randomness(
    batch: int,
    num_landmarks: int,
    num_tokens: int | None,
    sigma: float,
    seed: int,
    device: torch.device,
    length: int | None = None,
    offset: int = 0,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The twin's draws of the LAFS shuffle and perturbation, from a generator seeded with ``seed``.

    Returns:
        indices: (B, num_tokens) int64 uniform with replacement in [0, K), or None when
            ``num_tokens`` is None; noise: (B, L, 2) fp32 N(0, sigma^2) px, or None when sigma == 0
            (L = num_tokens, else ``length``, else K).
    The Triton kernel draws from Philox instead: same distributions, not the same numbers.
    ``offset`` selects an independent stream under the same seed (0: the generator seeded with
    ``seed`` itself).
    """
    # A fixed (Python-version-independent) mix of (seed, offset); offset 0 keeps the plain seed.
    key = int(seed) if offset == 0 else (int(seed) * 0x9E3779B97F4A7C15 + int(offset) * 0xBF58476D1CE4E5B9) % 2**63
    gen = torch.Generator(device=device).manual_seed(key)
    indices = noise = None
    if num_tokens is not None:
        indices = torch.randint(0, num_landmarks, (batch, num_tokens), generator=gen, device=device)
    if sigma > 0:
        n = num_tokens if num_tokens is not None else (length if length is not None else num_landmarks)
        noise = torch.randn((batch, n, 2), generator=gen, device=device, dtype=torch.float32) * sigma
    return indices, noise


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
    num_tokens: int | None = None,
    sigma: float = 0.0,
    seed: int | None = None,
    offset: int = 0,
    return_draws: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
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
        check_finite: reject NaN/inf coords with a device-side assertion (no host sync; on a GPU
            a failure poisons the CUDA context and surfaces at the next sync; RuntimeError on the
            CPU). Hot loops that already guard the loss may pass False.
        num_tokens: draw L = num_tokens landmark indices per sample, uniformly with replacement
            (the LAFS shuffle of local views); exclusive with ``indices``.
        sigma: draw N(0, sigma^2) px perturbation per token and axis (LAFS: 5); exclusive with
            ``noise``. 0 = no perturbation.
        seed: seed of those draws (Triton: the Philox key, drawn in-kernel; torch: a
            torch.Generator on the image device). Default: one drawn from torch's global RNG.
            A seed reproduces the draws of one backend; the two backends draw different numbers.
        offset: independent stream under ``seed`` (the Philox counter's second word; e.g.
            step * views + view), 0 <= offset < 2**62.
        return_draws: also return the indices and noise used, so any draw can be replayed
            (e.g. through the twin with ``backend="torch", indices=..., noise=...``).

    Returns:
        tokens: (B, L, 3 * P * P), differentiable w.r.t. ``coords`` (and ``noise``); with
        ``return_draws``: ``(tokens, indices (B, L) int64 or None, noise (B, L, 2) fp32 or None)``
        (None: all K landmarks in order / no perturbation).
    """
    validate_inputs(images, coords, patch_size, indices, check_finite)
    if indices is not None and num_tokens is not None:
        raise ValueError("pass either indices or num_tokens (to draw indices in the sampler), not both")
    if noise is not None and sigma > 0:
        raise ValueError("pass either noise or sigma > 0 (to draw noise in the sampler), not both")
    if sigma < 0 or (num_tokens is not None and num_tokens < 0):
        raise ValueError(f"sigma and num_tokens must be >= 0, got sigma={sigma}, num_tokens={num_tokens}")
    if noise is not None:
        n_l = indices.shape[1] if indices is not None else coords.shape[1]
        if tuple(noise.shape) != (coords.shape[0], n_l, 2):
            raise ValueError(f"noise must be (B, L, 2) = ({coords.shape[0]}, {n_l}, 2), got {tuple(noise.shape)}")
    if seed is None and (num_tokens is not None or sigma > 0):
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
    chosen, _ = resolve_backend(backend, images.device)
    if chosen == "triton":
        fn, why = triton_sampler()
        if fn is None:
            raise ValueError(f"backend='triton' requested but {why}")
        return fn(
            images,
            coords,
            patch_size,
            indices=indices,
            noise=noise,
            out_dtype=out_dtype,
            num_tokens=num_tokens,
            sigma=sigma,
            seed=seed,
            offset=offset,
            return_draws=return_draws,
        )
    if num_tokens is not None or sigma > 0:
        drawn_idx, drawn_noise = draw_landmark_randomness(
            coords.shape[0],
            coords.shape[1],
            num_tokens,
            sigma,
            seed,
            images.device,
            length=indices.shape[1] if indices is not None else None,
            offset=offset,
        )
        indices = drawn_idx if drawn_idx is not None else indices
        noise = drawn_noise if drawn_noise is not None else noise
    tokens = sample_patches_torch(images, coords, patch_size, indices=indices, noise=noise, out_dtype=out_dtype)
    return (tokens, indices, noise) if return_draws else tokens


def grid_landmarks(image_size: int = 112, patch_size: int = 8, device: torch.device | str = "cpu") -> torch.Tensor:
    """(G*G, 2) fp32 px: the regular grid of patch centres, row-major (landmark i = row i // G,
    column i % G), G = image_size // patch_size.

    A landmark at ``P*c + P/2 + 0.5`` makes the sampler (which reads pixel-centre coordinate
    ``x + o - 0.5`` for offsets o in -P/2..P/2-1) read exactly pixels ``P*c .. P*c + P - 1``: no
    interpolation, the image's own P x P blocks.
    """
    g = image_size // patch_size
    centres = torch.arange(g, dtype=torch.float32, device=device) * patch_size + patch_size / 2 + 0.5
    yy, xx = torch.meshgrid(centres, centres, indexing="ij")
    return torch.stack((xx.flatten(), yy.flatten()), dim=1)
