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
All draws come from one ``torch.Generator`` on the images' device: reproducible by seed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["OPS", "rand_augment", "apply_ops"]

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


def apply_ops(x: torch.Tensor, op: torch.Tensor, m: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """One RandAugment layer with given draws.

    Args:
        x: (B, 3, H, W) float in [0, 255].
        op: (B,) int64 index into :data:`OPS`, -1 = leave the image alone.
        m: (B,) magnitude in [0, 10]; sign: (B,) +-1 for the signed ops.
    Returns:
        (B, 3, H, W) float in [0, 255].
    """
    name = {n: i for i, n in enumerate(OPS)}
    level = m / 10.0 * sign
    factor = (1.0 + 0.9 * level).clamp(min=0.1)  # timm's _enhance_increasing_level_to_arg
    bits = (4 - (m / 10.0 * 4).floor()).clamp(min=1)
    div = torch.pow(2.0, 8 - bits).view(-1, 1, 1, 1)
    grey = _grey(x)
    cand = {
        "AutoContrast": lambda: _autocontrast(x),
        "Equalize": lambda: _equalize(x),
        "Invert": lambda: 255.0 - x,
        "PosterizeIncreasing": lambda: torch.floor(x.round() / div) * div,
        "ColorIncreasing": lambda: _blend(grey.expand_as(x), x, factor),
        "ContrastIncreasing": lambda: _blend(grey.mean(dim=(1, 2, 3), keepdim=True).round().expand_as(x), x, factor),
        "BrightnessIncreasing": lambda: _blend(torch.zeros_like(x), x, factor),
        "SharpnessIncreasing": lambda: _blend(_smooth(x), x, factor),
    }
    # Every op runs on the whole batch and a select keeps the drawn one: asking the device which
    # ops were drawn would be a host sync per op and layer, inside the training step.
    out = x
    for n, fn in cand.items():
        out = torch.where((op == name[n]).view(-1, 1, 1, 1), fn(), out)
    geo = torch.zeros_like(op, dtype=torch.bool)
    for n in _GEOMETRIC:
        geo |= op == name[n]
    return torch.where(geo.view(-1, 1, 1, 1), _affine(x, op, level), out)


def rand_augment(
    x: torch.Tensor,
    generator: torch.Generator,
    magnitude: float = 1.0,
    std: float = 0.5,
    num_layers: int = 2,
    p: float = 0.5,
) -> torch.Tensor:
    """Face RandAugment of a batch.

    Args:
        x: (B, 3, H, W) float in [0, 255] (RGB), on any device.
        generator: a torch.Generator on ``x``'s device (advanced).
        magnitude, std: per-op magnitude ~ N(magnitude, std) clipped to [0, 10].
        num_layers: ops per image; p: probability each is applied.
    Returns:
        (B, 3, H, W) float in [0, 255].
    """
    b = x.shape[0]
    dev = x.device
    for _ in range(num_layers):
        op = torch.randint(0, len(OPS), (b,), generator=generator, device=dev)
        u = torch.rand((b, 2), generator=generator, device=dev)
        m = (magnitude + std * torch.randn((b,), generator=generator, device=dev)).clamp(0, 10)
        op = torch.where(u[:, 0] < p, op, torch.full_like(op, -1))  # -1: this image skips the layer
        sign = torch.where(u[:, 1] < 0.5, -1.0, 1.0)
        x = apply_ops(x, op, m, sign)
    return x
