"""Face RandAugment on the device, vectorised over the batch (the ``gpu`` augmentation path).

The same recipe as timm's ``RandAugment`` built by ``lafs_fast.train.supervised`` for the CPU path:
``num_layers`` layers; in each, every image draws one op uniformly (with replacement across layers)
from timm's increasing-severity op set without the Solarize ops, applies it with probability ``p``,
at magnitude ``m ~ N(magnitude, std)`` clipped to [0, 10], with a random sign for signed ops. Op
arguments follow timm's level functions (``_LEVEL_DENOM = 10``):

=================  =========================================================================
AutoContrast       per-channel min-max stretch to [0, 255] (PIL ``autocontrast``, cutoff 0)
Equalize           per-channel histogram equalisation (PIL's ``equalize`` lookup table)
Invert             255 - x
Rotate             +-30 m/10 degrees about the centre
PosterizeInc       keep ``4 - int(4 m/10)`` bits (at least 1)
ColorInc           blend with grey, factor 1 +- 0.9 m/10
ContrastInc        blend with the grey mean, factor 1 +- 0.9 m/10
BrightnessInc      blend with black, factor 1 +- 0.9 m/10
SharpnessInc       blend with PIL's SMOOTH-filtered image (border kept), factor 1 +- 0.9 m/10
ShearX / ShearY    +-0.3 m/10
TranslateXRel/YRel +-0.45 m/10 of the side
=================  =========================================================================

Geometric ops use bilinear resampling with fill 128 (timm's default fill). Differences from PIL,
documented rather than hidden: values stay float between ops (PIL rounds to uint8 after each), and
the geometric ops resample bilinearly where timm picks bilinear or bicubic at random.
All draws are reproducible by seed; they are made on the host (:func:`rand_augment`) so that each op
runs only on the images that drew it (:func:`apply_drawn_ops`; :func:`apply_ops`, every op on every
image and a select, is its oracle).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["OPS", "rand_augment", "apply_ops", "apply_drawn_ops"]

OPS = (
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "PosterizeIncreasing",
    "ColorIncreasing",
    "ContrastIncreasing",
    "BrightnessIncreasing",
    "SharpnessIncreasing",
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
)
_GEOMETRIC = {"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"}
_FILL = 128.0


def _grey(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1, H, W), PIL's L conversion weights."""
    return 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


def _blend(degenerate: torch.Tensor, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL ImageEnhance: degenerate + factor * (x - degenerate), clipped to [0, 255]."""
    return (degenerate + factor.view(-1, 1, 1, 1) * (x - degenerate)).clamp(0, 255)


def _autocontrast(x: torch.Tensor) -> torch.Tensor:
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    scale = 255.0 / (hi - lo).clamp(min=1e-6)
    return torch.where(hi > lo, ((x - lo) * scale).clamp(0, 255), x)


def _equalize(x: torch.Tensor) -> torch.Tensor:
    """PIL ``ImageOps.equalize`` per channel: lut[i] = (n_before_i + step // 2) // step, step = (N -
    count of the last non-empty bin) // 255; channels with step 0 are left alone."""
    b, c, h, w = x.shape
    q = x.round().clamp(0, 255).long().reshape(b * c, h * w)
    hist = torch.zeros(b * c, 256, device=x.device, dtype=torch.long).scatter_add_(1, q, torch.ones_like(q))
    last = 255 - torch.argmax((hist.flip(1) > 0).long(), dim=1)  # index of the last non-empty bin
    step = (h * w - hist.gather(1, last[:, None]).squeeze(1)) // 255
    before = torch.cumsum(hist, dim=1) - hist  # pixels in lower bins
    lut = ((before + (step // 2)[:, None]) // step.clamp(min=1)[:, None]).clamp(max=255)
    out = lut.gather(1, q).to(x.dtype)
    out = torch.where((step > 0)[:, None], out, x.reshape(b * c, h * w))
    return out.view(b, c, h, w)


def _smooth(x: torch.Tensor) -> torch.Tensor:
    """PIL's SMOOTH filter (3x3, centre 5, the rest 1, / 13); the one-pixel border is kept."""
    k = torch.ones(3, 3, device=x.device, dtype=x.dtype)
    k[1, 1] = 5.0
    k = (k / 13.0).expand(x.shape[1], 1, 3, 3)
    inner = F.conv2d(x, k, groups=x.shape[1])
    out = x.clone()
    out[:, :, 1:-1, 1:-1] = inner
    return out


def _affine(x: torch.Tensor, op: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    """Rotate / shear / translate each image by its own op (others: identity), fill 128.

    op: (B,) index into OPS; level: (B,) signed magnitude / 10."""
    b, _, h, w = x.shape
    dev = x.device
    name = {n: i for i, n in enumerate(OPS)}
    # output pixel (u, v) reads input pixel A @ (u, v, 1) (PIL's inverse-affine convention), in px
    a = torch.zeros(b, 2, 3, device=dev, dtype=torch.float32)
    a[:, 0, 0] = 1
    a[:, 1, 1] = 1
    rot = op == name["Rotate"]
    ang = torch.deg2rad(30.0 * level) * rot
    cx, cy = w * 0.5, h * 0.5  # PIL's rotation centre, in continuous (pixel-centre + 0.5) coordinates
    cos, sin = torch.cos(ang), torch.sin(ang)
    # PIL rotate(angle) turns the picture counter-clockwise: output (u, v) reads input R(angle) (u, v)
    # about the centre, with y pointing down (PIL's own matrix)
    ra = torch.stack(
        [torch.stack([cos, -sin, cx - cos * cx + sin * cy], 1), torch.stack([sin, cos, cy - sin * cx - cos * cy], 1)], 1
    )
    a = torch.where(rot[:, None, None], ra, a)
    shx = (op == name["ShearX"]).float() * 0.3 * level
    shy = (op == name["ShearY"]).float() * 0.3 * level
    a[:, 0, 1] += shx
    a[:, 1, 0] += shy
    a[:, 0, 2] += (op == name["TranslateXRel"]).float() * 0.45 * level * w
    a[:, 1, 2] += (op == name["TranslateYRel"]).float() * 0.45 * level * h
    # pixel-centre coordinates -> normalised grid (align_corners=False)
    ys, xs = torch.meshgrid(
        torch.arange(h, device=dev, dtype=torch.float32),
        torch.arange(w, device=dev, dtype=torch.float32),
        indexing="ij",
    )
    pts = torch.stack([xs + 0.5, ys + 0.5, torch.ones_like(xs)], -1).view(1, h * w, 3)  # PIL samples at pixel centres
    src = pts @ a.transpose(1, 2)  # (B, HW, 2) in PIL's continuous coordinates
    grid = torch.stack([src[..., 0] / w * 2 - 1, src[..., 1] / h * 2 - 1], -1).view(b, h, w, 2)
    shifted = x - _FILL  # zero padding of (x - fill) = fill outside the image
    out = F.grid_sample(shifted.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False) + _FILL
    return out.to(x.dtype)


def _args(m: torch.Tensor, sign: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(level, factor, posterize divisor (B, 1, 1, 1)) of magnitudes m and signs: timm's level functions."""
    level = m / 10.0 * sign
    factor = (1.0 + 0.9 * level).clamp(min=0.1)  # timm's _enhance_increasing_level_to_arg
    bits = (4 - (m / 10.0 * 4).floor()).clamp(min=1)
    return level, factor, torch.pow(2.0, 8 - bits).view(-1, 1, 1, 1)


def _pointwise_ops(x: torch.Tensor, factor: torch.Tensor, div: torch.Tensor) -> dict:
    """The non-geometric ops of :data:`OPS` on every image of x, each a thunk (run when called)."""
    grey = _grey(x)
    return {
        "AutoContrast": lambda: _autocontrast(x),
        "Equalize": lambda: _equalize(x),
        "Invert": lambda: 255.0 - x,
        "PosterizeIncreasing": lambda: torch.floor(x.round() / div) * div,
        "ColorIncreasing": lambda: _blend(grey.expand_as(x), x, factor),
        "ContrastIncreasing": lambda: _blend(grey.mean(dim=(1, 2, 3), keepdim=True).round().expand_as(x), x, factor),
        "BrightnessIncreasing": lambda: _blend(torch.zeros_like(x), x, factor),
        "SharpnessIncreasing": lambda: _blend(_smooth(x), x, factor),
    }


def apply_ops(x: torch.Tensor, op: torch.Tensor, m: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """One RandAugment layer with given draws, every op evaluated on every image and a select keeping
    the drawn one (the oracle of :func:`apply_drawn_ops`, which computes only what was drawn).

    Args:
        x: (B, 3, H, W) float in [0, 255].
        op: (B,) int64 index into :data:`OPS`, -1 = leave the image alone.
        m: (B,) magnitude in [0, 10]; sign: (B,) +-1 for the signed ops.
    Returns:
        (B, 3, H, W) float in [0, 255].
    """
    name = {n: i for i, n in enumerate(OPS)}
    level, factor, div = _args(m, sign)
    out = x
    for n, fn in _pointwise_ops(x, factor, div).items():
        out = torch.where((op == name[n]).view(-1, 1, 1, 1), fn(), out)
    geo = torch.zeros_like(op, dtype=torch.bool)
    for n in _GEOMETRIC:
        geo |= op == name[n]
    return torch.where(geo.view(-1, 1, 1, 1), _affine(x, op, level), out)


def apply_drawn_ops(x: torch.Tensor, op: np.ndarray, m: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """:func:`apply_ops` computing only what was drawn: each op runs on the images that drew it
    (gathered, transformed, scattered back), the images that skip the layer are copied once.
    The op draws are on the host (``op``), so the sub-batches' sizes are known without a host sync;
    each image's arithmetic is :func:`apply_ops`' (every op acts per image), so the output is the same
    (tests/test_supervised_randaug.py). About 1/13 of the all-ops work at the reference's p = 0.5.

    Args:
        x: (B, 3, H, W) float in [0, 255] on any device.
        op: (B,) int64 numpy array, index into :data:`OPS` or -1.
        m, sign: (B,) float on x's device.
    """
    out = x.clone()
    geo = np.isin(op, [OPS.index(n) for n in _GEOMETRIC])
    groups = [(n, op == i) for i, n in enumerate(OPS) if n not in _GEOMETRIC] + [("geometric", geo)]
    for n, sel in groups:
        if not sel.any():
            continue
        idx = _to_device(torch.from_numpy(np.flatnonzero(sel)), x.device)
        xs, ms, ss = x.index_select(0, idx), m.index_select(0, idx), sign.index_select(0, idx)
        level, factor, div = _args(ms, ss)
        if n == "geometric":
            y = _affine(xs, _to_device(torch.from_numpy(op[sel]), x.device), level)
        else:
            y = _pointwise_ops(xs, factor, div)[n]()
        out.index_copy_(0, idx, y)
    return out


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on ``device`` without a host sync (pinned, non-blocking on CUDA)."""
    if device.type == "cpu":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def rand_augment(
    x: torch.Tensor,
    generator: torch.Generator,
    magnitude: float = 1.0,
    std: float = 0.5,
    num_layers: int = 2,
    p: float = 0.5,
    all_ops: bool = False,
) -> torch.Tensor:
    """Face RandAugment of a batch.

    Args:
        x: (B, 3, H, W) float in [0, 255] (RGB), on any device.
        generator: a torch.Generator (advanced). The draws (op, apply, magnitude, sign) are made on
            the host so that each op runs only on the images that drew it: from ``generator`` itself
            when it is a CPU generator (the CPU path: the same numbers as before issue 21), else
            from a CPU generator seeded with ``generator.initial_seed()`` (one small pinned copy to
            the device per layer, no host sync).
        magnitude, std: per-op magnitude ~ N(magnitude, std) clipped to [0, 10].
        num_layers: ops per image; p: probability each is applied.
        all_ops: every op on every image and a select (:func:`apply_ops`, the oracle).
    Returns:
        (B, 3, H, W) float in [0, 255].
    """
    b = x.shape[0]
    dev = x.device
    host = generator if generator.device.type == "cpu" else torch.Generator().manual_seed(generator.initial_seed())
    for _ in range(num_layers):
        op = torch.randint(0, len(OPS), (b,), generator=host)
        u = torch.rand((b, 2), generator=host)
        m = (magnitude + std * torch.randn((b,), generator=host)).clamp(0, 10)
        op = torch.where(u[:, 0] < p, op, torch.full_like(op, -1))  # -1: this image skips the layer
        sign = torch.where(u[:, 1] < 0.5, -1.0, 1.0)
        if all_ops:
            x = apply_ops(x, op.to(dev), m.to(dev), sign.to(dev))
        else:
            ms = _to_device(torch.stack((m, sign)), dev)
            x = apply_drawn_ops(x, op.numpy(), ms[0], ms[1])
    return x
