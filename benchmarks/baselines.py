"""Reference-style baselines the fast paths are measured against, written from docs/method.md.

Each function is self-contained (others may add baselines to this file):

- ``reference_patch_loop``: the reference's patch sampler algorithm, one ``grid_sample`` call per
  landmark in a Python loop (spec section 2), returning tokens in the reference layout.
- ``torchvision_views_per_sample``: the LAFS view recipe with torchvision v2 transforms applied one
  image and one view at a time (the only way torchvision draws per-sample parameters), producing
  the clean and augmented copy of each view with shared geometry.
- ``reference_lafs_tokens`` = the views above, then ``reference_tokens_from_views`` (per-view
  landmark draws, a ``grid_sample`` per landmark), all inside the step: the in-step strawman.
- ``WorkerAugmented`` + ``worker_loader``: the reference as it runs, the per-sample augmentation in
  DataLoader worker processes, overlapped with the training step (issue 21: the honest baseline).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

__all__ = [
    "reference_patch_loop",
    "torchvision_views_per_sample",
    "reference_lafs_tokens",
    "reference_tokens_from_views",
    "WorkerAugmented",
    "worker_loader",
    "reference_workers",
    "reference_part_fvit_forward",
    "synced",
]


def reference_patch_loop(images: torch.Tensor, coords: torch.Tensor, patch_size: int = 8) -> torch.Tensor:
    """One grid_sample per landmark, as the reference does.

    Args:
        images: (B, 3, H, W) float in the network's range, square.
        coords: (B, L, 2) px (x, y).
    Returns:
        tokens: (B, L, 3 * P * P), element (a, b, c) of token i at ``(a * P + b) * 3 + c``.
    """
    b, c, h, _ = images.shape
    half = patch_size / 2
    r = torch.arange(-half, half, dtype=images.dtype, device=images.device)
    ga, gb = torch.meshgrid(r, r, indexing="ij")
    offsets = torch.stack((ga, gb), dim=-1)  # (P, P, 2): [a, b] = (a - P/2, b - P/2), a moves x
    tokens = []
    for i in range(coords.shape[1]):
        grid = (offsets[None] + coords[:, i, None, None, :].to(images.dtype)) / (h * 0.5) - 1  # (B, P, P, 2)
        patch = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        tokens.append(patch.permute(0, 2, 3, 1).reshape(b, -1))  # (B, P, P, C) -> (a, b, c)
    return torch.stack(tokens, dim=1)


def torchvision_views_per_sample(
    images: torch.Tensor,
    specs: list,
    out_size: int = 112,
    *,
    bicubic: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The LAFS multi-crop with torchvision v2, one (image, view) at a time.

    Args:
        images: (B, H, W, 3) uint8 on any device.
        specs: V objects with the fields of ``lafs_fast.kernels.augment.ViewSpec``.
        out_size: S.
        bicubic: resample bicubically (the reference) instead of bilinearly.
    Returns:
        clean, augmented: (B, V, 3, S, S) float32 in [-1, 1].
    """
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import v2 as T

    import lafs_fast  # noqa: F401  (makes torchvision importable on a CPU-only torch)

    interp = InterpolationMode.BICUBIC if bicubic else InterpolationMode.BILINEAR
    geo, photo = [], []
    for s in specs:
        geo.append(
            T.Compose(
                [
                    T.RandomResizedCrop(out_size, scale=s.scale, ratio=s.ratio, interpolation=interp, antialias=True),
                    T.RandomHorizontalFlip(p=s.flip_p),
                ]
            )
        )
        k = 2 * max(1, int(-(-3 * s.blur_radius[1] // 1))) + 1
        ops = [
            T.RandomApply([T.ColorJitter(s.brightness, s.contrast, s.saturation, s.hue)], p=s.jitter_p),
            T.RandomGrayscale(p=s.gray_p),
            T.RandomApply([T.GaussianBlur(k, sigma=s.blur_radius)], p=s.blur_p),
        ]
        if s.solarize_p > 0:
            ops.append(T.RandomSolarize(threshold=s.solarize_threshold, p=s.solarize_p))
        photo.append(T.Compose(ops))
    b, v = images.shape[0], len(specs)
    chw = images.permute(0, 3, 1, 2)
    clean = torch.empty((b, v, 3, out_size, out_size), dtype=torch.float32, device=images.device)
    aug = torch.empty_like(clean)
    for i in range(b):
        for j in range(v):
            view = geo[j](chw[i])  # uint8 (3, S, S): crop + flip drawn for this sample
            clean[i, j] = view.float() / 255 * 2 - 1
            aug[i, j] = photo[j](view).float() / 255 * 2 - 1
    return clean, aug


def reference_lafs_tokens(
    images: torch.Tensor,
    specs: list,
    coords: torch.Tensor,
    n_global: int,
    local_tokens: int,
    sigma: float,
    generator: torch.Generator,
    device: torch.device,
    out_dtype: torch.dtype = torch.float32,
) -> list[torch.Tensor]:
    """The reference's LAFS view path for one batch (added for benchmarks/test_bench_pretrain.py):
    views made per (image, view) with torchvision on the CPU, moved to ``device``, then per view the
    perturbation and shuffle drawn with torch and patches cut with one grid_sample per landmark.

    Args:
        images: (B, H, W, 3) uint8 on the CPU.
        specs: V view recipes (``lafs_fast.kernels.augment.ViewSpec`` fields), globals first.
        coords: (K, 2) px landmarks of every view (e.g. the 14 x 14 grid).
        n_global, local_tokens: dense views (all K landmarks) and tokens of each sparse view.
        sigma: perturbation std, px.
        generator: CPU generator of the landmark draws.
    Returns:
        [global tokens (G*B, K, 3*P*P), local tokens ((V-G)*B, local_tokens, 3*P*P)] view-major.
    """
    _, aug = torchvision_views_per_sample(images, specs, images.shape[1], bicubic=True)
    return reference_tokens_from_views(aug.to(device), coords, n_global, local_tokens, sigma, generator, out_dtype)


def reference_tokens_from_views(
    aug: torch.Tensor,
    coords: torch.Tensor,
    n_global: int,
    local_tokens: int,
    sigma: float,
    generator: torch.Generator,
    out_dtype: torch.dtype = torch.float32,
) -> list[torch.Tensor]:
    """The device half of :func:`reference_lafs_tokens`: per view the perturbation and shuffle drawn
    with torch (CPU ``generator``) and patches cut with one grid_sample per landmark.

    Args:
        aug: (B, V, 3, S, S) float32 views in [-1, 1], on the step's device.
        coords, n_global, local_tokens, sigma, generator, out_dtype: as :func:`reference_lafs_tokens`.
    Returns:
        [global tokens (G*B, K, 3*P*P), local tokens ((V-G)*B, local_tokens, 3*P*P)] view-major.
    """
    device = aug.device
    b, v = aug.shape[:2]
    out_g, out_l = [], []
    for j in range(v):
        x = aug[:, j]
        if j < n_global:
            c = coords[None].expand(b, -1, -1)
        else:
            idx = torch.randint(0, coords.shape[0], (b, local_tokens), generator=generator)
            c = coords[idx]
        c = (c + torch.randn(c.shape, generator=generator) * sigma).to(device)
        (out_g if j < n_global else out_l).append(reference_patch_loop(x, c).to(out_dtype))
    return [torch.cat(out_g)] + ([torch.cat(out_l)] if out_l else [])


def reference_part_fvit_forward(landmark_cnn, backbone, head, images: torch.Tensor, targets: torch.Tensor):
    """The reference's Part fViT training forward (added for benchmarks/test_bench_finetune.py):
    landmarks from the CNN, one ``grid_sample`` per landmark (:func:`reference_patch_loop`), the fViT
    (whatever attention backend it is set to), a replicated margin head.

    Args:
        landmark_cnn: images (B, 3, S, S) -> coords (B, L, 2) px.
        backbone: tokens (B, L, 3*P*P) -> embedding (B, D).
        head: (embedding, targets) -> logits (B, C).
        images: (B, 3, S, S) float in [-1, 1]; targets: (B,) int or (B, C) soft.
    Returns:
        (logits (B, C), coords (B, L, 2)).
    """
    coords = landmark_cnn(images)
    tokens = reference_patch_loop(images, coords, backbone.patch_size)
    return head(backbone(tokens), targets), coords


def synced(fn):
    """``fn`` followed by a wait for the GPU (when CUDA is in use), so a benchmark times the work and
    not just its launch. Arguments pass through."""

    def run(*args, **kwargs):
        out = fn(*args, **kwargs)
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        return out

    return run


class WorkerAugmented(torch.utils.data.Dataset):
    """``fn(i)`` for i in [0, length): a per-sample CPU augmentation run where the reference runs it,
    in DataLoader worker processes (``fn`` reaches them by fork; no pickling)."""

    def __init__(self, fn: Callable[[int], torch.Tensor], length: int) -> None:
        self.fn, self.length = fn, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.fn(i)


def reference_workers() -> int:
    """DataLoader workers of the reference-style pipeline: 10 (DINO's default), at most the cores
    less two (the main process and the GPU's feeder), at least 1."""
    return max(1, min(10, (os.cpu_count() or 2) - 2))


def worker_loader(fn: Callable[[int], torch.Tensor], batch: int, steps: int, workers: int) -> Iterator[torch.Tensor]:
    """Batches of ``fn(i)`` from ``workers`` DataLoader processes, pinned on CUDA, prefetching 2
    batches a worker: while the step runs on the GPU the workers make the next batches (the
    reference's overlap). An endless iterator of ``steps`` batches, then again."""
    loader = torch.utils.data.DataLoader(
        WorkerAugmented(fn, batch * steps),
        batch_size=batch,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=True,
        prefetch_factor=2,
        multiprocessing_context="fork",
    )
    while True:
        yield from loader
