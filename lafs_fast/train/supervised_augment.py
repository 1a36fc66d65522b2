"""Augmentation of the supervised stages (docs/method.md section 4): the per-sample recipe
(``cpu``: torchvision / timm / PIL, the reference semantics) and the device recipe (``gpu``: the view
kernel, vectorised RandAugment, erasing), behind :class:`FaceAugment`; Mixup with soft targets.
Every draw is keyed by the engine's per-step seed (a resumed run sees the same augmentations)."""

from __future__ import annotations

import math
import random

import numpy as np
import torch
import torch.nn.functional as F

from lafs_fast.config import Config
from lafs_fast.kernels.patch_sampling import normalise_images
from lafs_fast.train.randaugment import OPS  # the device path's op list, in timm's order: one list for both paths

__all__ = ["FaceAugment", "random_erase", "build_mixup", "apply_mixup"]


def _randaug_ops(cfg: Config) -> list:
    """timm's RandAugment ops without the Solarize ops (the face recipe): the increasing-severity
    variants (timm's ``inc1``), so that the small face magnitudes (m = 1 or 2) are mild changes
    (the original Posterize / Color / Contrast / Brightness / Sharpness are strongest at m = 0)."""
    from timm.data.auto_augment import rand_augment_ops

    from lafs_fast import _torchvision_fix  # noqa: F401 - timm imports torchvision

    f = cfg.finetune
    hparams = {"magnitude_std": f.randaug_std, "img_mean": (128, 128, 128)}
    return rand_augment_ops(magnitude=f.randaug_magnitude, prob=f.randaug_p, hparams=hparams, transforms=list(OPS))


class FaceAugment:
    """The stage-2 augmentation of a batch of source faces.

    ``__call__(images (B, H, W, 3) uint8, seed) -> (B, 3, S, S) float32 in [-1, 1]`` on the images'
    device. ``mode``: "cpu" (PIL / timm per sample, the full recipe), "gpu" (view kernel, vectorised
    RandAugment and erasing on the device), "none" (resize-free normalisation only). Reproducible from ``seed``
    without touching the global RNG streams.
    """

    def __init__(self, cfg: Config, mode: str = "cpu") -> None:
        if mode not in ("cpu", "gpu", "none"):
            raise ValueError(f"unknown augmentation mode {mode!r}; choose cpu, gpu or none")
        f = cfg.finetune
        for key in ("randaug_p", "erase_p", "crop_scale_min"):
            if not 0.0 <= getattr(f, key) <= 1.0:
                raise ValueError(f"config key 'finetune.{key}' must lie in [0, 1], got {getattr(f, key)}")
        self.cfg, self.mode, self.size = cfg, mode, cfg.model.image_size
        self._cpu = None
        if mode == "cpu":
            self._cpu = self._build_cpu()

    def describe(self) -> str:
        f = self.cfg.finetune
        if self.mode == "none":
            return "augmentation: none (normalise only)"
        common = f"RandomResizedCrop({self.size}, scale ({f.crop_scale_min}, 1)), flip, ColorJitter {f.jitter}"
        erase = f"RandomErasing p {f.erase_p}"
        ra = (
            f"RandAugment {f.randaug_ops} ops p {f.randaug_p} m ~ N({f.randaug_magnitude}, {f.randaug_std}) "
            "without Solarize"
        )
        if self.mode == "gpu":
            return f"augmentation (on the device: view kernel + vectorised RandAugment): {common}, {ra}, {erase}"
        return f"augmentation (cpu, PIL/timm per sample): {common}, {ra}, {erase}"

    def _build_cpu(self):
        from timm.data.auto_augment import RandAugment
        from timm.data.random_erasing import RandomErasing
        from torchvision import transforms as T

        from lafs_fast import _torchvision_fix  # noqa: F401

        f = self.cfg.finetune
        j = f.jitter
        pil = T.Compose(
            [
                T.RandomResizedCrop(self.size, scale=(f.crop_scale_min, 1.0)),
                T.RandomHorizontalFlip(),
                T.ColorJitter(j, j, j, j),
                RandAugment(_randaug_ops(self.cfg), num_layers=f.randaug_ops),
                T.ToTensor(),
                T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # x/255*2-1
            ]
        )
        erase = RandomErasing(f.erase_p, min_area=0.02, max_area=0.1, mode="const", device="cpu")
        return pil, erase

    def __call__(self, images: torch.Tensor, seed: int) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != 3:
            raise ValueError(f"faces must be uint8 (B, H, W, 3), got {tuple(images.shape)} {images.dtype}")
        if self.mode == "none":
            x = normalise_images(images)
            if x.shape[-1] != self.size:
                x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
            return x.contiguous()
        if self.mode == "gpu":
            return self._gpu(images, seed)
        return self._cpu_batch(images, seed)

    def _cpu_batch(self, images: torch.Tensor, seed: int) -> torch.Tensor:
        from PIL import Image

        pil, erase = self._cpu
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            # torchvision draws from torch's global RNG, timm from `random` (ops, magnitudes, erasing)
            # and numpy (RandAugment's op choice): all keyed by the step seed, then restored
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                random.seed(seed)
                np.random.seed(seed % 2**32)
                arr = images.cpu().numpy()
                out = torch.stack([erase(pil(Image.fromarray(a))) for a in arr])
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
        return out.to(images.device, non_blocking=True)

    def _gpu(self, images: torch.Tensor, seed: int) -> torch.Tensor:
        from lafs_fast.augment import augment_views
        from lafs_fast.kernels.augment import ViewSpec

        f = self.cfg.finetune
        spec = ViewSpec(
            scale=(f.crop_scale_min, 1.0),
            flip_p=0.5,
            jitter_p=1.0,
            brightness=f.jitter,
            contrast=f.jitter,
            saturation=f.jitter,
            hue=f.jitter,
            gray_p=0.0,
            blur_p=0.0,
            solarize_p=0.0,
        )
        from lafs_fast.train.randaugment import rand_augment

        gen = torch.Generator(device=images.device).manual_seed(int(seed))
        x = augment_views(images, [spec], generator=gen, out_size=self.size, interpolation="bilinear").augmented[:, 0]
        if f.randaug_ops > 0 and f.randaug_p > 0:
            x255 = rand_augment(
                (x.float() + 1) * 127.5, gen, f.randaug_magnitude, f.randaug_std, f.randaug_ops, f.randaug_p
            )
            x = x255 / 127.5 - 1
        return random_erase(x, f.erase_p, gen)


def random_erase(
    x: torch.Tensor,
    p: float,
    gen: torch.Generator,
    area: tuple[float, float] = (0.02, 0.1),
    log_ratio: tuple[float, float] = (math.log(0.3), math.log(1 / 0.3)),
) -> torch.Tensor:
    """Vectorised RandomErasing (timm's ``const`` mode: the box is set to 0) on (B, C, H, W): with
    probability ``p`` per image one box of area fraction U(area) and log-aspect U(log_ratio); a
    box that does not fit is dropped (timm retries 10 times; one try here)."""
    b, _, h, w = x.shape
    dev = x.device
    u = torch.rand((b, 5), generator=gen, device=dev)
    target = (area[0] + (area[1] - area[0]) * u[:, 0]) * h * w
    ratio = torch.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[:, 1])
    eh = torch.sqrt(target * ratio).round()
    ew = torch.sqrt(target / ratio).round()
    ok = (u[:, 2] < p) & (eh < h) & (ew < w) & (eh > 0) & (ew > 0)
    top = ((h - eh + 1) * u[:, 3]).floor()
    left = ((w - ew + 1) * u[:, 4]).floor()
    ys = torch.arange(h, device=dev)[None, :, None]
    xs = torch.arange(w, device=dev)[None, None, :]
    box = (
        (ys >= top[:, None, None])
        & (ys < (top + eh)[:, None, None])
        & (xs >= left[:, None, None])
        & (xs < (left + ew)[:, None, None])
    )
    return x.masked_fill((box & ok[:, None, None])[:, None], 0.0)


def build_mixup(cfg: Config, num_classes: int):
    """timm's Mixup (alpha ``finetune.mixup_alpha``, per-batch probability ``finetune.mixup_p``, no
    cutmix, no label smoothing) or None when off."""
    f = cfg.finetune
    if f.mixup_alpha <= 0 or f.mixup_p <= 0:
        return None
    from timm.data import Mixup

    from lafs_fast import _torchvision_fix  # noqa: F401

    return Mixup(
        mixup_alpha=f.mixup_alpha,
        cutmix_alpha=0.0,
        prob=f.mixup_p,
        mode="batch",
        label_smoothing=0.0,
        num_classes=num_classes,
    )


def apply_mixup(mixup, x: torch.Tensor, labels: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mixed images, soft targets (B, C) fp32 summing to one); timm draws from numpy's global RNG,
    keyed here by ``seed`` and restored afterwards. timm pairs the batch with its reverse and needs
    an even batch: an odd one (e.g. a corrupt image skipped by the loader) passes unmixed."""
    if x.shape[0] % 2:
        return x, F.one_hot(labels.long(), mixup.num_classes).float()
    state = np.random.get_state()
    try:
        np.random.seed(seed % 2**32)
        x, targets = mixup(x.clone(), labels)  # timm mixes in place
    finally:
        np.random.set_state(state)
    return x, targets.float()
