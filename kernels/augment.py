"""LAFS multi-view augmentation: per-view random parameters and the torch twin (CPU path, oracle).

A batch of source faces (B, H, W, 3) uint8 -> V views per image, each written twice with the same
geometry (docs/method.md section 3):

- clean view: RandomResizedCrop + horizontal flip, normalised ``x / 255 * 2 - 1`` (what the frozen
  landmark CNN sees);
- augmented view: the same pixels, then colour jitter with probability (brightness, contrast about
  the per-view grey mean, saturation, hue; torchvision's tensor definitions, in a random order per
  view), grayscale, Gaussian blur (per-view sigma, separable, reflect padding), solarize; then
  normalised.

Parameters are drawn vectorised on the images' device from one generator (``draw_view_params``):
no host round trip per sample. RandomResizedCrop follows torchvision's ``get_params`` (scale is
the area fraction, ratio the aspect w/h drawn log-uniformly, ``round`` to integer sides, up to
``attempts`` tries, then torchvision's centre-crop fallback), drawn for all attempts at once.

Deliberate differences from the PIL pipeline of the reference (documented, not bugs): every stage
works in float (no uint8 rounding between ops); the resampler is PyTorch's
``interpolate(..., align_corners=False)`` on the crop (bilinear; bicubic with A = -0.75 and the
result clamped to [0, 255], as torchvision on tensors; PIL's bicubic uses A = -0.5); the blur is a
true Gaussian of sigma = PIL's "radius", truncated at ``ceil(3 * max radius)`` pixels, with
torchvision's reflect padding.

Layouts: views are (B, V, 3, S, S) in ``out_dtype``; flat view index n = b * V + v in
``ViewParams``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, fields, replace

import torch

from lafs_fast.config import ViewsConfig

_V = ViewsConfig()  # the spec's view values (docs/method.md section 3)

__all__ = [
    "ViewSpec",
    "ViewParams",
    "lafs_view_specs",
    "draw_view_params",
    "resample_tables",
    "blur_weights",
    "apply_views_torch",
    "rgb_to_gray",
    "map_to_views",
    "INTERPOLATIONS",
]

INTERPOLATIONS = ("bilinear", "bicubic")
_BICUBIC_A = -0.75  # PyTorch / torchvision tensor bicubic


@dataclass(frozen=True)
class ViewSpec:
    """One view's recipe; defaults are the shared values of ``ViewsConfig`` (docs/method.md section 3:
    no blur, no solarize), read from the config so that the numbers live in one place.

    Probabilities in [0, 1]; jitter strengths in torchvision's ColorJitter sense (brightness 0.4
    -> factor uniform in [0.6, 1.4], hue 0.1 -> shift uniform in [-0.1, 0.1]); blur radius = the
    Gaussian sigma in px; solarize threshold in uint8 units (pixels >= 128/255 are inverted).
    """

    scale: tuple[float, float] = (_V.crop_scale_min, _V.crop_scale_max)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = _V.flip_p
    jitter_p: float = _V.jitter_p
    brightness: float = _V.brightness
    contrast: float = _V.contrast
    saturation: float = _V.saturation
    hue: float = _V.hue
    gray_p: float = _V.grayscale_p
    blur_p: float = 0.0
    blur_radius: tuple[float, float] = (_V.blur_radius_min, _V.blur_radius_max)
    solarize_p: float = 0.0
    solarize_threshold: float = float(_V.solarize_threshold)


def lafs_view_specs(num_local: int | None = None, views: ViewsConfig | None = None) -> list[ViewSpec]:
    """The pre-training views of ``views`` (default: the spec's): ``n_global`` globals alternating
    global 1 (blur p ``blur_p_global1``) and global 2 (blur p ``blur_p_global2``, solarize p
    ``solarize_p_global2``), then ``num_local`` (default ``n_local``) locals (blur p ``blur_p_local``).
    All share the crop, flip, jitter and grayscale values; LAFS locals use the global crop scale (the
    reference's; ``lafs_local_scale=local``: ``local_scale_*``), the DINO baseline's locals ``local_scale_*``."""
    v = views or _V
    base = dict(
        flip_p=v.flip_p,
        jitter_p=v.jitter_p,
        brightness=v.brightness,
        contrast=v.contrast,
        saturation=v.saturation,
        hue=v.hue,
        gray_p=v.grayscale_p,
        blur_radius=(v.blur_radius_min, v.blur_radius_max),
        solarize_threshold=float(v.solarize_threshold),
    )
    scale = (v.crop_scale_min, v.crop_scale_max)
    glob = [
        ViewSpec(scale=scale, blur_p=v.blur_p_global1, **base),
        ViewSpec(scale=scale, blur_p=v.blur_p_global2, solarize_p=v.solarize_p_global2, **base),
    ]
    lafs_global = v.mode == "lafs" and v.lafs_local_scale == "global"
    local_scale = scale if lafs_global else (v.local_scale_min, v.local_scale_max)
    n_local = v.n_local if num_local is None else num_local
    return [glob[i % 2] for i in range(v.n_global)] + [
        ViewSpec(scale=local_scale, blur_p=v.blur_p_local, **base)
    ] * n_local


@dataclass
class ViewParams:
    """Per-view random parameters, flat over views n = b * V + v (all on one device).

    crop: (N, 4) int64 (top, left, height, width) in source pixels.
    flip: (N,) bool, horizontal flip after the resize.
    jitter: (N,) bool, colour jitter applied.
    factors: (N, 4) fp32 (brightness, contrast, saturation) factors and hue shift.
    order: (N, 4) int64, a permutation of (0 brightness, 1 contrast, 2 saturation, 3 hue).
    gray: (N,) bool.
    blur_sigma: (N,) fp32 px, 0 = no blur.
    solarize: (N,) bool.
    solarize_threshold: (N,) fp32 in [0, 1] units.
    num_views: V.
    blur_halfwidth: R, the blur kernel has 2R + 1 taps (fixed for the batch).
    """

    crop: torch.Tensor
    flip: torch.Tensor
    jitter: torch.Tensor
    factors: torch.Tensor
    order: torch.Tensor
    gray: torch.Tensor
    blur_sigma: torch.Tensor
    solarize: torch.Tensor
    solarize_threshold: torch.Tensor
    num_views: int
    blur_halfwidth: int

    def to(self, device: torch.device | str) -> ViewParams:
        """A copy with every tensor on ``device``."""
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        return replace(self, **{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()})

    def affine(self, out_size: int) -> torch.Tensor:
        """(N, 2, 3) fp32 maps source pixel coordinates to view coordinates: [vx, vy] = A @ [x, y, 1].

        Convention: pixel i's centre is at coordinate i (the resampler reads source coordinate
        ``left + (ox + 0.5) * w / S - 0.5`` for output column ox; its inverse is this map), then
        the flip sends vx to S - 1 - vx.
        """
        top, left, h, w = self.crop.to(torch.float32).unbind(1)
        sx = out_size / w
        sy = out_size / h
        a = torch.zeros(self.crop.shape[0], 2, 3, dtype=torch.float32, device=self.crop.device)
        tx = sx * (0.5 - left) - 0.5
        sign = torch.where(self.flip, -1.0, 1.0)
        a[:, 0, 0] = sign * sx
        a[:, 0, 2] = torch.where(self.flip, (out_size - 1) - tx, tx)
        a[:, 1, 1] = sy
        a[:, 1, 2] = sy * (0.5 - top) - 0.5
        return a


def map_to_views(points: torch.Tensor, affine: torch.Tensor) -> torch.Tensor:
    """Map source-image points into every view.

    Args:
        points: (B, K, 2) px (x, y) on the source images (pixel i's centre at i).
        affine: (B, V, 2, 3) from ``ViewParams.affine`` reshaped (or ``AugmentedViews.affine``).

    Returns:
        (B, V, K, 2) px in each view's pixel coordinates (may fall outside the view).
    """
    lin = affine[..., :2]  # (B, V, 2, 2)
    return torch.einsum("bvij,bkj->bvki", lin, points.to(affine.dtype)) + affine[:, :, None, :, 2]


# Rows of the per-view spec table, derived from ViewSpec in its field order: a field, or (field,
# element) of each element of a tuple field.
_SPEC_ROWS: tuple[tuple[str, int | None], ...] = tuple(
    (f.name, i) for f in fields(ViewSpec) for i in (range(len(f.default)) if isinstance(f.default, tuple) else (None,))
)
_ROW = {key: i for i, key in enumerate(_SPEC_ROWS)}


@functools.lru_cache(maxsize=64)
def _spec_table(specs: tuple[ViewSpec, ...], device: torch.device) -> torch.Tensor:
    """(len(_SPEC_ROWS), V) float64 on ``device``: every per-view spec value, built once per spec
    list and device (one host-to-device copy, then cached: no copy from Python data per step)."""
    rows = [[getattr(s, name) if idx is None else getattr(s, name)[idx] for s in specs] for name, idx in _SPEC_ROWS]
    return torch.tensor(rows, dtype=torch.float64).to(device)


def _per_view(table: torch.Tensor, name: str, batch: int, idx: int | None = None) -> torch.Tensor:
    """(B * V,) float64 spec value ``name`` (element ``idx`` of a tuple), view-major inside each b."""
    return table[_ROW[(name, idx)]].repeat(batch)


def _draw_crops(table: torch.Tensor, batch: int, src_hw: tuple[int, int], attempts: int, u) -> torch.Tensor:
    """(N, 4) int64 (top, left, height, width): torchvision's RandomResizedCrop.get_params for every
    view at once, all ``attempts`` drawn together (``u(*shape)``: uniform float64 draws), the centred
    fallback where none fits."""
    h_src, w_src = src_hw
    n = table.shape[1] * batch
    area = float(h_src * w_src)
    s_lo = _per_view(table, "scale", batch, 0)[:, None]
    s_hi = _per_view(table, "scale", batch, 1)[:, None]
    r_lo = _per_view(table, "ratio", batch, 0)[:, None]
    r_hi = _per_view(table, "ratio", batch, 1)[:, None]
    target = area * (s_lo + (s_hi - s_lo) * u(n, attempts))
    log_r = torch.log(r_lo) + (torch.log(r_hi) - torch.log(r_lo)) * u(n, attempts)
    aspect = torch.exp(log_r)
    cw = torch.round(torch.sqrt(target * aspect))
    ch = torch.round(torch.sqrt(target / aspect))
    ok = (cw > 0) & (cw <= w_src) & (ch > 0) & (ch <= h_src)
    first = torch.argmax(ok.to(torch.int8), dim=1, keepdim=True)  # first successful attempt
    found = ok.any(dim=1)
    cw = cw.gather(1, first)[:, 0]
    ch = ch.gather(1, first)[:, 0]
    ui, uj = u(n), u(n)
    # torch.randint(0, H - h + 1) as a uniform draw: floor(u * (H - h + 1))
    top = torch.floor(ui * (h_src - ch + 1))
    left = torch.floor(uj * (w_src - cw + 1))
    # torchvision's fallback: whole image, clipped to the ratio range, centred.
    in_ratio = w_src / h_src
    fw = torch.full_like(cw, float(w_src))
    fh = torch.full_like(ch, float(h_src))
    lo, hi = r_lo[:, 0], r_hi[:, 0]
    fh = torch.where(in_ratio < lo, torch.round(fw / lo), fh)
    fw = torch.where(in_ratio > hi, torch.round(fh * hi), fw)
    ftop = torch.floor((h_src - fh) / 2)
    fleft = torch.floor((w_src - fw) / 2)
    return torch.stack(
        [
            torch.where(found, top, ftop),
            torch.where(found, left, fleft),
            torch.where(found, ch, fh),
            torch.where(found, cw, fw),
        ],
        dim=1,
    ).to(torch.int64)


def draw_view_params(
    batch: int,
    specs: list[ViewSpec],
    src_hw: tuple[int, int],
    generator: torch.Generator,
    *,
    attempts: int = 10,
) -> ViewParams:
    """Draw every view's parameters at once on ``generator``'s device.

    Args:
        batch: B source images.
        specs: V view recipes (view v of every image uses specs[v]).
        src_hw: (H, W) of the source images.
        generator: torch.Generator on the target device; a seed reproduces the draw.
        attempts: RandomResizedCrop tries before the centre-crop fallback (torchvision: 10).

    Returns:
        ViewParams for N = B * V views.
    """
    if not specs:
        raise ValueError("specs must name at least one view")
    device = generator.device
    n = batch * len(specs)
    f64 = torch.float64
    table = _spec_table(tuple(specs), torch.device(device))

    def u(*shape: int) -> torch.Tensor:
        return torch.rand(shape, generator=generator, device=device, dtype=f64)

    crop = _draw_crops(table, batch, src_hw, attempts, u)

    flip = u(n) < _per_view(table, "flip_p", batch)
    jitter = u(n) < _per_view(table, "jitter_p", batch)
    # ColorJitter.get_params: a random order, then the four factors.
    order = torch.argsort(u(n, 4), dim=1)
    fac = u(n, 4)
    bri = _per_view(table, "brightness", batch)
    con = _per_view(table, "contrast", batch)
    sat = _per_view(table, "saturation", batch)
    hue = _per_view(table, "hue", batch)

    def span(strength: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        lo_ = torch.clamp(1 - strength, min=0.0)
        return lo_ + (1 + strength - lo_) * x

    factors = torch.stack(
        [span(bri, fac[:, 0]), span(con, fac[:, 1]), span(sat, fac[:, 2]), -hue + 2 * hue * fac[:, 3]], dim=1
    ).to(torch.float32)
    gray = u(n) < _per_view(table, "gray_p", batch)
    blur_on = u(n) < _per_view(table, "blur_p", batch)
    rad_lo = _per_view(table, "blur_radius", batch, 0)
    rad_hi = _per_view(table, "blur_radius", batch, 1)
    sigma = torch.where(blur_on, rad_lo + (rad_hi - rad_lo) * u(n), torch.zeros((), dtype=f64, device=device))
    solarize = u(n) < _per_view(table, "solarize_p", batch)
    thr = (_per_view(table, "solarize_threshold", batch) / 255.0).to(torch.float32)
    halfwidth = max(1, math.ceil(3 * max(s.blur_radius[1] for s in specs)))
    return ViewParams(
        crop=crop,
        flip=flip,
        jitter=jitter,
        factors=factors,
        order=order,
        gray=gray,
        blur_sigma=sigma.to(torch.float32),
        solarize=solarize,
        solarize_threshold=thr,
        num_views=len(specs),
        blur_halfwidth=halfwidth,
    )


def resample_tables(
    start: torch.Tensor, length: torch.Tensor, out_size: int, interpolation: str, flip: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-view 1-D resampling taps of crop-then-resize (PyTorch interpolate, align_corners=False).

    Args:
        start, length: (N,) int crop start and length along the axis (source pixels).
        out_size: S output pixels.
        interpolation: "bilinear" (2 taps) or "bicubic" (4 taps, A = -0.75).
        flip: (N,) bool; output position d reads position S - 1 - d.

    Returns:
        index: (N, S, T) int64 absolute source positions; weight: (N, S, T) fp32.
    """
    dev = start.device
    d = torch.arange(out_size, device=dev, dtype=torch.float32)[None, :].expand(start.shape[0], -1)
    if flip is not None:
        d = torch.where(flip[:, None], (out_size - 1) - d, d)
    ln = length.to(torch.float32)[:, None]
    scale = ln / out_size
    src = scale * (d + 0.5) - 0.5
    last = length[:, None] - 1
    if interpolation == "bilinear":
        src = torch.clamp(src, min=0.0)
        i0f = torch.floor(src)
        lam = src - i0f
        i0 = i0f.to(torch.int64)
        i1 = i0 + (i0 < last).to(torch.int64)
        idx = torch.stack([i0, i1], dim=-1)
        w = torch.stack([1.0 - lam, lam], dim=-1)
    elif interpolation == "bicubic":
        i0f = torch.floor(src)
        t = src - i0f
        i0 = i0f.to(torch.int64)
        a = _BICUBIC_A

        def conv1(x: torch.Tensor) -> torch.Tensor:  # |x| <= 1
            return ((a + 2) * x - (a + 3)) * x * x + 1

        def conv2(x: torch.Tensor) -> torch.Tensor:  # 1 < |x| < 2
            return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

        t1 = 1.0 - t
        w = torch.stack([conv2(t + 1.0), conv1(t), conv1(t1), conv2(t1 + 1.0)], dim=-1)
        idx = torch.stack([i0 - 1, i0, i0 + 1, i0 + 2], dim=-1)
        idx = torch.minimum(torch.clamp(idx, min=0), last[..., None])
    else:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    return idx + start.to(torch.int64)[:, None, None], w


def blur_weights(sigma: torch.Tensor, halfwidth: int) -> torch.Tensor:
    """(N, 2R + 1) fp32 normalised Gaussian taps exp(-d^2 / (2 sigma^2)); sigma == 0 -> identity."""
    d = torch.arange(-halfwidth, halfwidth + 1, device=sigma.device, dtype=torch.float32)
    s = torch.where(sigma > 0, sigma, torch.ones_like(sigma))[:, None]
    pdf = torch.exp(-0.5 * (d[None, :] / s) ** 2)
    k = pdf / pdf.sum(dim=1, keepdim=True)
    delta = (d == 0).to(torch.float32)[None, :].expand_as(k)
    return torch.where((sigma > 0)[:, None], k, delta).contiguous()


def rgb_to_gray(x: torch.Tensor) -> torch.Tensor:
    """torchvision's luma: (..., 3, H, W) -> (..., 1, H, W), 0.2989 R + 0.587 G + 0.114 B."""
    r, g, b = x.unbind(dim=-3)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(-3)


def _rgb2hsv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """torchvision's _rgb2hsv on (N, 3, H, W) in [0, 1]."""
    r, g, b = x.unbind(dim=1)
    maxc = torch.maximum(torch.maximum(r, g), b)
    minc = torch.minimum(torch.minimum(r, g), b)
    eqc = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    s = cr / torch.where(eqc, ones, maxc)
    crd = torch.where(eqc, ones, cr)
    rc = (maxc - r) / crd
    gc = (maxc - g) / crd
    bc = (maxc - b) / crd
    zero = torch.zeros_like(maxc)
    hr = torch.where(maxc == r, bc - gc, zero)
    hg = torch.where((maxc == g) & (maxc != r), 2.0 + rc - bc, zero)
    hb = torch.where((maxc != g) & (maxc != r), 4.0 + gc - rc, zero)
    h = hr + hg + hb
    h = h / 6.0 + 1.0
    h = h - torch.floor(h)  # fmod(., 1) of a positive number, exactly
    return h, s, maxc


def _hsv2rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """torchvision's _hsv2rgb: (N, H, W) x 3 -> (N, 3, H, W)."""
    h6 = h * 6.0
    i = torch.floor(h6)
    f = h6 - i
    i = i.to(torch.int32) % 6
    p = torch.clamp(v * (1.0 - s), 0.0, 1.0)
    q = torch.clamp(v * (1.0 - s * f), 0.0, 1.0)
    t = torch.clamp(v * (1.0 - s * (1.0 - f)), 0.0, 1.0)
    table = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    out = []
    for c in range(3):
        val = table[5][c]
        for k in range(4, -1, -1):
            val = torch.where(i == k, table[k][c], val)
        out.append(val)
    return torch.stack(out, dim=1)


def _adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """torchvision adjust_hue on (N, 3, H, W), shift (N,) in [-0.5, 0.5]."""
    h, s, v = _rgb2hsv(x)
    h = h + shift[:, None, None]
    # Python-style % 1.0 for h in [-0.5, 1.5): fmod then +1 for negatives (torch's remainder).
    h = torch.where(h >= 1.0, h - 1.0, h)
    h = torch.where(h < 0.0, h + 1.0, h)
    return _hsv2rgb(h, s, v)


def _jitter_op(op: int, x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Apply jitter op ``op`` (0 brightness, 1 contrast, 2 saturation, 3 hue) with per-view f (n,)."""
    fv = f[:, None, None, None]
    if op == 0:
        return torch.clamp(fv * x, 0.0, 1.0)
    if op == 1:
        mean = rgb_to_gray(x).mean(dim=(-3, -2, -1), keepdim=True)
        return torch.clamp(fv * x + (1.0 - fv) * mean, 0.0, 1.0)
    if op == 2:
        return torch.clamp(fv * x + (1.0 - fv) * rgb_to_gray(x), 0.0, 1.0)
    return _adjust_hue(x, f)


def _tap_matrix(index: torch.Tensor, weight: torch.Tensor, size: int) -> torch.Tensor:
    """(N, S, size) fp32 matrices of 1-D taps: row d sums ``weight[n, d, t]`` at column ``index[n, d, t]``
    (taps that land on one source pixel, e.g. clamped at a border, add up). index / weight: (N, S, T)."""
    m = torch.zeros(*index.shape[:2], size, device=weight.device, dtype=torch.float32)
    return m.scatter_add_(2, index, weight.to(torch.float32))


def _reflect(i: torch.Tensor, size: int) -> torch.Tensor:
    i = torch.where(i < 0, -i, i)
    return torch.where(i > size - 1, 2 * (size - 1) - i, i)


def apply_views_torch(
    images: torch.Tensor,
    params: ViewParams,
    out_size: int = 112,
    *,
    interpolation: str = "bilinear",
    out_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Render clean and augmented views for given parameters (the oracle of the Triton kernel).

    Args:
        images: (B, H, W, 3) uint8 source faces.
        params: ViewParams for B * V views, on the images' device.
        out_size: S, the view side.
        interpolation: "bilinear" or "bicubic".
        out_dtype: fp32 / bf16 / fp16.

    Returns:
        clean: (B, V, 3, S, S) ``out_dtype`` in [-1, 1]; augmented: (B, V, 3, S, S) ``out_dtype``.
    """
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be (B, H, W, 3) uint8, got {tuple(images.shape)} {images.dtype}")
    b, h_src, w_src, _ = images.shape
    v = params.num_views
    n = b * v
    if params.crop.shape[0] != n:
        raise ValueError(f"params hold {params.crop.shape[0]} views, expected B * V = {n}")
    s = out_size
    top, left, ch, cw = params.crop.unbind(1)
    iy, wy = resample_tables(top, ch, s, interpolation)
    ix, wx = resample_tables(left, cw, s, interpolation, params.flip)
    src = images.permute(0, 3, 1, 2).to(torch.float32)  # (B, 3, H, W)
    bidx = torch.arange(n, device=images.device) // v
    # separable resampling as two batched matmuls: out[n, c] = My[n] @ src[b, c] @ Mx[n]^T, where the
    # (S, H) / (S, W) matrices hold each output pixel's taps (fast on CPUs; same sums as the taps)
    my = _tap_matrix(iy, wy, h_src)
    mx = _tap_matrix(ix, wx, w_src)
    with torch.autocast(images.device.type, enabled=False):  # pixels in fp32 whatever the caller's autocast
        val = torch.matmul(torch.matmul(my[:, None], src[bidx]), mx[:, None].transpose(-1, -2))
    val = torch.clamp(val, 0.0, 255.0)  # bicubic overshoot (a no-op for bilinear)
    clean = val / 255.0 * 2.0 - 1.0

    x = val / 255.0
    # colour jitter: op k at position `step` for the views whose permutation says so
    for step in range(4):
        for op in range(4):
            sel = torch.nonzero(params.jitter & (params.order[:, step] == op)).flatten()
            if sel.numel():
                x[sel] = _jitter_op(op, x[sel], params.factors[sel, op])
    if bool(params.gray.any()):
        x = torch.where(params.gray[:, None, None, None], rgb_to_gray(x).expand_as(x), x)
    # separable Gaussian blur, horizontal then vertical, reflect padding (identity taps: no blur)
    wts = blur_weights(params.blur_sigma, params.blur_halfwidth)
    r = params.blur_halfwidth
    pos = torch.arange(s, device=images.device)
    taps = _reflect(pos[:, None] + torch.arange(-r, r + 1, device=images.device)[None, :], s)  # (S, 2R + 1)
    blur = _tap_matrix(taps.expand(n, -1, -1), wts[:, None, :].expand(-1, s, -1), s)[:, None]  # (N, 1, S, S)
    with torch.autocast(images.device.type, enabled=False):
        x = torch.matmul(blur, torch.matmul(x, blur.transpose(-1, -2)))  # rows of x @ B^T, then B @ columns
    thr = params.solarize_threshold[:, None, None, None]
    x = torch.where(params.solarize[:, None, None, None] & (x >= thr), 1.0 - x, x)
    aug = x * 2.0 - 1.0
    shape = (b, v, 3, s, s)
    return clean.reshape(shape).to(out_dtype), aug.reshape(shape).to(out_dtype)
