"""View augmentation: Triton kernels vs the torch twin, and the twin vs its definitions.

Interpreter grids stay small (a few views of 24-40 px); the statistical tests draw parameters only
(pure torch, thousands of views in milliseconds).
"""

from __future__ import annotations

import math

import pytest
import torch

from lafs_fast.augment import augment_views
from lafs_fast.kernels.augment import (
    ViewSpec,
    apply_views_torch,
    draw_view_params,
    lafs_view_specs,
    map_to_views,
    resample_tables,
)
from lafs_fast.kernels.augment_triton import apply_views_triton
from tests.devices import needs_interpreter, triton_devices

DEVICES = triton_devices()
THR = 128 / 255


def _images(b: int, side: int, gen: torch.Generator, device: str) -> torch.Tensor:
    return torch.randint(0, 256, (b, side, side, 3), generator=gen, dtype=torch.uint8).to(device)


def _all_on_params(b: int, side: int, gen: torch.Generator, device: str, num_views: int = 3):
    """Parameters that exercise every op: jitter everywhere (random orders), grey, blur, solarize mixed."""
    specs = [ViewSpec(jitter_p=1.0, gray_p=0.3, blur_p=0.7, solarize_p=0.5, scale=(0.3, 1.0))] * num_views
    p = draw_view_params(b, specs, (side, side), gen)
    n = b * num_views
    p.gray = torch.arange(n) % 3 == 2  # a deterministic mix: some grey, some not
    p.solarize = torch.arange(n) % 2 == 1
    p.blur_sigma[0] = 2.0  # the widest kernel at least once
    p.blur_sigma[1] = 0.0  # and a solarized view without blur (finished by the view kernel)
    p.flip[:2] = torch.tensor([True, False])
    return p.to(device)


def _assert_views_close(got: torch.Tensor, ref: torch.Tensor, solarized: torch.Tensor, tol: float) -> None:
    """Elementwise close; a pixel within float rounding of the solarize threshold may land on either
    side (a jump of ~2 * (1 - 2 * thr)), so such pixels of solarized views are excused."""
    bad = (got.float() - ref.float()).abs() > tol * (1 + ref.float().abs())
    near_thr = (ref.float().abs() - abs(2 * THR - 1)).abs() < 1e-3
    excused = bad & near_thr & solarized.reshape(solarized.shape[0], solarized.shape[1], 1, 1, 1)
    real_bad = bad & ~excused
    assert not real_bad.any(), f"{int(real_bad.sum())} elements differ; max {(got.float() - ref.float()).abs().max()}"
    assert int(excused.sum()) <= 4


@pytest.mark.parametrize("device", DEVICES)
def test_triton_matches_twin_fp32_nan_poisoned(device, gen):
    b, v, src, s = 2, 3, 40, 40  # 1600 px: one full and one partial 1024-px tile
    images = _images(b, src, gen, device)
    params = _all_on_params(b, src, gen, device, v)
    clean = torch.full((b, v, 3, s, s), float("nan"), device=device)
    aug = torch.full_like(clean, float("nan"))
    apply_views_triton(images, params, s, out=(clean, aug))
    assert torch.isfinite(clean).all() and torch.isfinite(aug).all(), "unwritten elements"
    ref_clean, ref_aug = apply_views_torch(images, params, s)
    torch.testing.assert_close(clean, ref_clean, atol=1e-5, rtol=1e-5)
    _assert_views_close(aug, ref_aug, params.solarize.reshape(b, v), 1e-5)
    # the photometric path really changed the colours (the comparison is not of two copies)
    assert (aug - clean).abs().mean() > 0.05


@pytest.mark.parametrize("device", DEVICES)
def test_triton_bicubic_bf16_and_odd_sizes(device, gen):
    b, v, src, s = 1, 3, 37, 24  # non-square output grid of tiles, source size != view size
    images = _images(b, src, gen, device)
    params = _all_on_params(b, src, gen, device, v)
    clean, aug = apply_views_triton(images, params, s, interpolation="bicubic", out_dtype=torch.bfloat16)
    assert clean.dtype == torch.bfloat16 and aug.dtype == torch.bfloat16
    ref_clean, ref_aug = apply_views_torch(images, params, s, interpolation="bicubic")
    torch.testing.assert_close(clean.float(), ref_clean, rtol=1e-2, atol=1e-2)
    _assert_views_close(aug, ref_aug, params.solarize.reshape(b, v), 1e-2)


@needs_interpreter
def test_clean_view_has_no_colour_change_and_identity_crop_is_the_source(gen):
    b, side = 2, 32
    images = _images(b, side, gen, "cpu")
    params = _all_on_params(b, side, gen, "cpu", 2)
    # full-image crops, no flip: the clean view IS the normalised source on both backends
    params.crop[:] = torch.tensor([0, 0, side, side])
    params.flip[:] = False
    expect = (images.permute(0, 3, 1, 2).float() / 255 * 2 - 1)[:, None].expand(b, 2, 3, side, side)
    for fn in (apply_views_torch, apply_views_triton):
        clean, aug = fn(images, params, side)
        torch.testing.assert_close(clean, expect, atol=1e-6, rtol=0)
        assert (aug - clean).abs().max() > 0.1  # while the augmented copy did change colour
    # and with the photometric draws all switched on vs all off, clean views are identical
    off = params.to("cpu")
    off.jitter = torch.zeros_like(off.jitter)
    off.gray = torch.zeros_like(off.gray)
    off.solarize = torch.zeros_like(off.solarize)
    off.blur_sigma = torch.zeros_like(off.blur_sigma)
    params.crop = torch.tensor([[3, 5, 20, 24], [0, 0, 32, 32], [10, 1, 22, 18], [4, 2, 9, 30]])
    off.crop = params.crop
    c_on, _ = apply_views_torch(images, params, 28)
    c_off, a_off = apply_views_torch(images, off, 28)
    assert torch.equal(c_on, c_off)
    torch.testing.assert_close(a_off, c_off, atol=1e-6, rtol=0)  # nothing on: augmented == clean


@needs_interpreter
def test_seed_determinism_and_public_dispatch(gen):
    images = _images(2, 24, gen, "cpu")
    specs = lafs_view_specs(1)
    a = augment_views(images, specs, seed=5, out_size=24, backend="torch")
    b = augment_views(images, specs, seed=5, out_size=24, backend="torch")
    c = augment_views(images, specs, seed=6, out_size=24, backend="torch")
    assert a.backend == "torch" and a.clean.shape == (2, 3, 3, 24, 24) and a.affine.shape == (2, 3, 2, 3)
    assert torch.equal(a.clean, b.clean) and torch.equal(a.augmented, b.augmented)
    assert torch.equal(a.params.crop, b.params.crop) and torch.equal(a.params.factors, b.params.factors)
    assert not torch.equal(a.params.crop, c.params.crop) or not torch.equal(a.params.factors, c.params.factors)
    assert not torch.equal(a.augmented, c.augmented)
    t = augment_views(images, specs, seed=5, out_size=24, backend="triton")
    assert t.backend == "triton" and torch.equal(t.params.crop, a.params.crop)
    torch.testing.assert_close(t.clean, a.clean, atol=1e-5, rtol=1e-5)
    _assert_views_close(t.augmented, a.augmented, a.params.solarize.reshape(2, 3), 1e-5)
    assert augment_views(images, specs, seed=5, out_size=24).backend == "torch"  # auto on CPU
    bad = a.params.to("cpu")
    bad.crop = bad.crop.clone()
    bad.crop[1] = torch.tensor([20, 0, 10, 10])  # rows 20..29 of a 24-row source
    with pytest.raises(ValueError, match="leaves the 24x24 source"):
        augment_views(images, params=bad, out_size=24)
    with pytest.raises(ValueError, match="uint8"):
        augment_views(images.float(), specs)


def test_triton_views_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    images = torch.zeros(1, 8, 8, 3, dtype=torch.uint8)
    params = draw_view_params(1, [ViewSpec()], (8, 8), torch.Generator().manual_seed(0))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        apply_views_triton(images, params, 8)


def test_crop_boxes_respect_bounds_and_match_torchvision_distribution():
    torch.manual_seed(0)
    side, n = 112, 4000
    spec = ViewSpec()
    gen = torch.Generator().manual_seed(1)
    p = draw_view_params(n, [spec], (side, side), gen)
    top, left, h, w = p.crop.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= side).all() and (left + w <= side).all()
    assert (h > 0).all() and (w > 0).all()
    # area and aspect within the requested ranges, up to the integer rounding of the sides
    area_hi = ((w + 0.5) * (h + 0.5)) / side**2
    area_lo = ((w - 0.5) * (h - 0.5)) / side**2
    assert (area_hi >= spec.scale[0]).all() and (area_lo <= spec.scale[1]).all()
    ratio_hi = (w + 0.5) / (h - 0.5)
    ratio_lo = (w - 0.5) / (h + 0.5)
    assert (ratio_hi >= spec.ratio[0]).all() and (ratio_lo <= spec.ratio[1]).all()
    # torchvision's own sampler gives the same distribution of boxes
    from torchvision.transforms import RandomResizedCrop

    import lafs_fast  # noqa: F401  (makes torchvision importable on a CPU torch)

    ref = torch.tensor(
        [
            RandomResizedCrop.get_params(torch.empty(1, side, side), list(spec.scale), list(spec.ratio))
            for _ in range(n)
        ],
        dtype=torch.float64,
    )
    ours = p.crop.to(torch.float64)
    for col in range(4):
        se = math.sqrt(ref[:, col].var() / n + ours[:, col].var() / n)
        assert abs(ref[:, col].mean() - ours[:, col].mean()) < 4.5 * se + 1e-9, col
    full_ref = ((ref[:, 2] == side) & (ref[:, 3] == side)).double().mean()
    full_ours = ((ours[:, 2] == side) & (ours[:, 3] == side)).double().mean()
    assert abs(full_ref - full_ours) < 0.02


def test_fallback_is_torchvisions_centre_crop():
    # an impossible scale forces the fallback: whole image clipped to the ratio range, centred
    gen = torch.Generator().manual_seed(0)
    p = draw_view_params(50, [ViewSpec(scale=(2.0, 3.0), ratio=(2.0, 3.0))], (40, 40), gen)
    # in_ratio 1 < min ratio 2: w = W = 40, h = round(40 / 2) = 20, centred
    assert (p.crop == torch.tensor([10, 0, 20, 40])).all()


def test_probabilities_per_view_statistically():
    b = 3000
    gen = torch.Generator().manual_seed(2)
    specs = lafs_view_specs(2) + [ViewSpec(flip_p=0.2)]
    p = draw_view_params(b, specs, (112, 112), gen)
    v = len(specs)

    def rate(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(b, v).double().mean(0)

    def close(got: torch.Tensor, want: list[float]) -> None:
        want_t = torch.tensor(want, dtype=torch.float64)
        tol = 5 * torch.sqrt(want_t * (1 - want_t) / b) + 1e-9
        assert ((got - want_t).abs() <= tol).all(), (got, want_t)

    close(rate(p.flip), [0.5, 0.5, 0.5, 0.5, 0.2])
    close(rate(p.jitter), [0.8] * v)
    close(rate(p.gray), [0.2] * v)
    close(rate(p.blur_sigma > 0), [1.0, 0.1, 0.5, 0.5, 0.0])
    close(rate(p.solarize), [0.0, 0.2, 0.0, 0.0, 0.0])
    s = p.blur_sigma[p.blur_sigma > 0]
    assert s.min() >= 0.1 and s.max() <= 2.0 and abs(float(s.mean()) - 1.05) < 0.03
    f = p.factors
    assert f[:, 0].min() >= 0.6 and f[:, 0].max() <= 1.4 and f[:, 2].min() >= 0.8 and f[:, 2].max() <= 1.2
    assert f[:, 3].abs().max() <= 0.1 and abs(float(f[:, 3].mean())) < 0.005
    # random order: every op is first about a quarter of the time, and each row is a permutation
    assert torch.equal(p.order.sort(1).values, torch.arange(4).expand_as(p.order))
    first = torch.bincount(p.order[:, 0], minlength=4).double() / p.order.shape[0]
    assert (first - 0.25).abs().max() < 0.02


def test_affine_maps_source_points_into_views():
    """A linear ramp survives bilinear resampling exactly, so a view pixel's value names the
    source x it came from: the affine must send that source x to the view pixel."""
    side, s = 64, 48
    ramp = (torch.arange(side, dtype=torch.float32) * 3).clamp(max=255)  # value = 3 * x
    images = ramp[None, None, :, None].expand(1, side, side, 3).to(torch.uint8).contiguous()
    gen = torch.Generator().manual_seed(3)
    specs = [ViewSpec(flip_p=0.5, jitter_p=0.0, gray_p=0.0)] * 8
    out = augment_views(images, specs, generator=gen, out_size=s, backend="torch")
    p = out.params
    assert p.flip.any() and not p.flip.all()
    a = out.affine[0]  # (V, 2, 3)
    for v in range(8):
        top, left, h, w = p.crop[v].tolist()
        view_val = (out.clean[0, v, 0] + 1) / 2 * 255  # (s, s)
        src_x = view_val / 3
        # the affine of those source points gives back each pixel's own column (interior columns)
        vx = a[v, 0, 0] * src_x + a[v, 0, 1] * 0 + a[v, 0, 2]
        cols = torch.arange(s, dtype=torch.float32).expand(s, s)
        inner = (src_x > left + 0.5) & (src_x < left + w - 1.5)
        assert inner.sum() > s * s // 2
        torch.testing.assert_close(vx[inner], cols[inner], atol=2e-3, rtol=0)
        # map_to_views agrees with the matrix for any source point
        pts = torch.tensor([[[left + 1.25, top + 2.5], [left + w - 2.0, top + h / 2]]])
        mapped = map_to_views(pts, out.affine[:, v : v + 1])[0, 0]
        expect = pts[0] @ a[v, :, :2].T + a[v, :, 2]
        torch.testing.assert_close(mapped, expect)
        # y: the point at the view's vertical centre maps back inside the crop
        yc = (s - 1) / 2
        src_y = (yc - a[v, 1, 2]) / a[v, 1, 1]
        assert top - 0.5 <= float(src_y) <= top + h - 0.5


def test_resample_tables_match_torch_interpolate():
    """The twin's separable taps are PyTorch's interpolate(align_corners=False) on the crop."""
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(4)
    img = torch.rand(1, 1, 30, 30, generator=gen) * 255
    top, left, h, w, s = 4, 7, 17, 21, 26
    for mode in ("bilinear", "bicubic"):
        ref = F.interpolate(img[:, :, top : top + h, left : left + w], size=(s, s), mode=mode, align_corners=False)[
            0, 0
        ]
        iy, wy = resample_tables(torch.tensor([top]), torch.tensor([h]), s, mode)
        ix, wx = resample_tables(torch.tensor([left]), torch.tensor([w]), s, mode)
        x = img[0, 0]
        out = torch.einsum("yi,xj,yixj->yx", wy[0], wx[0], x[iy[0][:, :, None, None], ix[0][None, None, :, :]])
        torch.testing.assert_close(out, ref, atol=1e-3, rtol=1e-5)


def test_photometric_ops_match_torchvision_functional(gen):
    import torchvision.transforms.functional as TF

    import lafs_fast  # noqa: F401
    from lafs_fast.kernels import augment as V

    x = torch.rand(3, 3, 16, 16, generator=gen)
    f = torch.tensor([0.7, 1.3, 1.1])
    h = torch.tensor([-0.08, 0.03, 0.1])
    for i in range(3):
        fi = float(f[i])
        xi = x[i : i + 1]
        torch.testing.assert_close(
            V._jitter_op(0, xi, f[i : i + 1])[0], TF.adjust_brightness(x[i], fi), atol=1e-6, rtol=0
        )
        torch.testing.assert_close(
            V._jitter_op(1, xi, f[i : i + 1])[0], TF.adjust_contrast(x[i], fi), atol=1e-6, rtol=0
        )
        torch.testing.assert_close(
            V._jitter_op(2, xi, f[i : i + 1])[0], TF.adjust_saturation(x[i], fi), atol=1e-6, rtol=0
        )
        torch.testing.assert_close(
            V._jitter_op(3, xi, h[i : i + 1])[0], TF.adjust_hue(x[i], float(h[i])), atol=1e-5, rtol=0
        )
        torch.testing.assert_close(V.rgb_to_gray(xi)[0], TF.rgb_to_grayscale(x[i]), atol=1e-6, rtol=0)
    # blur: our separable taps equal torchvision's gaussian_blur with the same kernel size
    sigma = 1.3
    p = V.draw_view_params(
        1,
        [ViewSpec(jitter_p=0.0, gray_p=0.0, blur_p=1.0, blur_radius=(sigma, sigma))],
        (16, 16),
        torch.Generator().manual_seed(0),
    )
    p.crop[:] = torch.tensor([0, 0, 16, 16])
    p.flip[:] = False
    img8 = (x[0] * 255).round().to(torch.uint8).permute(1, 2, 0)[None].contiguous()
    _, aug = V.apply_views_torch(img8, p, 16)
    k = 2 * p.blur_halfwidth + 1
    ref = TF.gaussian_blur(img8[0].permute(2, 0, 1).float() / 255, [k, k], [sigma, sigma])
    torch.testing.assert_close((aug[0, 0] + 1) / 2, ref, atol=1e-5, rtol=0)


def test_twin_pixels_stay_fp32_under_bf16_autocast(gen):
    """The twin's resampling and blur are matmuls; under the training step's bf16 autocast they must
    still run in fp32 (bf16 would round pixels to 3 significant digits, and broke the jitter's index put)."""
    images = torch.randint(0, 256, (2, 40, 36, 3), dtype=torch.uint8, generator=gen)
    specs = [ViewSpec(blur_p=1.0), ViewSpec(blur_p=0.5, solarize_p=0.5)]
    ref = augment_views(images, specs, seed=3, out_size=24, interpolation="bicubic", backend="torch")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = augment_views(images, specs, seed=3, out_size=24, interpolation="bicubic", backend="torch")
    assert got.clean.dtype == got.augmented.dtype == torch.float32
    torch.testing.assert_close(got.clean, ref.clean, atol=0, rtol=0)
    torch.testing.assert_close(got.augmented, ref.augmented, atol=0, rtol=0)
