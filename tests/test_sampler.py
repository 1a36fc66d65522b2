"""The torch twin of the patch sampler against the reference algorithm (a per-landmark loop)."""

import math

import pytest
import torch
import torch.nn.functional as F

from lafs_fast import sample_patches
from lafs_fast.compat import extract_patches_pytorch_gridsample


def reference_loop_mosaic(imgs: torch.Tensor, landmarks: torch.Tensor, p: int = 8) -> torch.Tensor:
    """The reference's algorithm, written from the spec: one grid_sample per landmark, then the
    mosaic (B, C, row*p, row*p)."""
    h = imgs.shape[2]
    half = p / 2
    r = torch.arange(-half, half, dtype=imgs.dtype)
    sampling_grid = torch.stack(torch.meshgrid(r, r, indexing="ij"), dim=0)  # (2, p, p)
    sampling_grid = sampling_grid.transpose(0, 2).transpose(0, 1)  # (p, p, 2): [a, b] = (a-4, b-4)
    patches = []
    for i in range(landmarks.shape[1]):
        grid = (sampling_grid[None] + landmarks[:, i, None, None, :]) / (h * 0.5) - 1
        patches.append(F.grid_sample(imgs, grid, align_corners=False))
    x = torch.stack(patches, dim=2)  # (B, C, L, p, p)
    b, c, n, w, hh = x.shape
    row = int(math.sqrt(n))
    x = x.reshape(b, c, row, row, w, hh).permute(0, 1, 2, 4, 3, 5)
    return x.reshape(b, c, w * row, hh * row)


def mosaic_to_tokens(x: torch.Tensor, p: int = 8) -> torch.Tensor:
    """rearrange 'b c (h p1) (w p2) -> b (h w) (p1 p2 c)' as the reference ViT does."""
    b, c, hh, ww = x.shape
    x = x.reshape(b, c, hh // p, p, ww // p, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, (hh // p) * (ww // p), p * p * c)


def random_coords(b: int, n: int, gen: torch.Generator, dtype=torch.float32) -> torch.Tensor:
    """Fractional coords over [-10, 121], plus exact borders and integers."""
    c = torch.rand(b, n, 2, generator=gen, dtype=dtype) * 131 - 10
    c[:, 0] = 0.0
    c[:, 1] = 111.0
    c[:, 2] = torch.tensor([-4.0, 115.5], dtype=dtype)
    c[:, 3] = torch.tensor([56.0, 3.0], dtype=dtype)
    return c


@pytest.mark.parametrize("n", [36, 196])
def test_twin_matches_reference_loop(n, gen):
    imgs = torch.rand(3, 3, 112, 112, generator=gen) * 2 - 1
    coords = random_coords(3, n, gen)
    expected = mosaic_to_tokens(reference_loop_mosaic(imgs, coords))
    got = sample_patches(imgs, coords, 8, backend="torch")
    assert got.shape == (3, n, 192)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6, msg=f"seed {gen.initial_seed()}")


def test_layout_x_offset_first_channel_fastest():
    """A ramp image in x makes token element (a, b, c) depend only on a: x offset is the first axis."""
    xs = torch.arange(112, dtype=torch.float32)
    imgs = torch.stack([xs.expand(112, 112), 1000 + xs[:, None].expand(112, 112), torch.full((112, 112), 7.0)])[None]
    coords = torch.tensor([[[40.5, 60.5]]])  # pixel-centre aligned: x + o - 0.5 is an integer
    tok = sample_patches(imgs, coords, 8).reshape(8, 8, 3)
    a = torch.arange(8, dtype=torch.float32)
    torch.testing.assert_close(tok[:, 0, 0], 40 + a - 4)  # channel 0 = x ramp varies along axis a
    torch.testing.assert_close(tok[0, :, 1], 1000 + 60 + a - 4)  # channel 1 = y ramp along axis b
    assert torch.all(tok[..., 2] == 7.0)


def test_outside_reads_zero():
    imgs = torch.ones(1, 3, 112, 112)
    tok = sample_patches(imgs, torch.tensor([[[-50.0, -50.0], [300.0, 20.0]]]), 8)
    assert torch.all(tok == 0)


def test_uint8_nhwc_is_normalised(gen):
    u8 = torch.randint(0, 256, (2, 112, 112, 3), generator=gen, dtype=torch.uint8)
    f = u8.permute(0, 3, 1, 2).float() / 255 * 2 - 1
    coords = random_coords(2, 36, gen)
    torch.testing.assert_close(sample_patches(u8, coords), sample_patches(f, coords))


def test_indices_and_noise(gen):
    imgs = torch.rand(2, 3, 112, 112, generator=gen)
    coords = random_coords(2, 196, gen)
    idx = torch.randint(0, 196, (2, 36), generator=gen)
    noise = torch.randn(2, 36, 2, generator=gen) * 5
    picked = torch.gather(coords, 1, idx[..., None].expand(-1, -1, 2)) + noise
    torch.testing.assert_close(sample_patches(imgs, coords, indices=idx, noise=noise), sample_patches(imgs, picked))


def test_out_dtype(gen):
    imgs = torch.rand(1, 3, 112, 112, generator=gen)
    out = sample_patches(imgs, random_coords(1, 36, gen), out_dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16


def test_gradcheck_wrt_coords(gen):
    imgs = torch.rand(1, 3, 20, 20, generator=gen, dtype=torch.float64)
    # keep away from integer+0.5 pixel centres where bilinear weights have kinks
    coords = (torch.rand(1, 4, 2, generator=gen, dtype=torch.float64) * 14 + 3).floor() + 0.23
    coords.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda c: sample_patches(imgs, c, 4), (coords,), eps=1e-6, atol=1e-6)


def test_compat_mosaic_matches_reference(gen):
    imgs = torch.rand(2, 3, 112, 112, generator=gen) * 255
    coords = random_coords(2, 196, gen)
    got = extract_patches_pytorch_gridsample(imgs, coords, torch.tensor([8, 8]), num_landm=196)
    assert got.shape == (2, 3, 112, 112)
    torch.testing.assert_close(got, reference_loop_mosaic(imgs, coords), rtol=0, atol=1e-4)
    got36 = extract_patches_pytorch_gridsample(imgs, coords, torch.tensor([8, 8]), num_landm=36)
    torch.testing.assert_close(got36, reference_loop_mosaic(imgs, coords[:, :36]), rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    "images, coords, kw, match",
    [
        (torch.zeros(2, 4, 112, 112), torch.zeros(2, 3, 2), {}, "3 channels"),
        (torch.zeros(2, 3, 112, 100), torch.zeros(2, 3, 2), {}, "square"),
        (torch.zeros(3, 112, 112), torch.zeros(2, 3, 2), {}, "4-D"),
        (torch.zeros(2, 3, 112, 112), torch.zeros(2, 3, 3), {}, r"\(B, K, 2\)"),
        (torch.zeros(2, 3, 112, 112), torch.zeros(3, 3, 2), {}, "batch"),
        (torch.zeros(2, 3, 112, 112), torch.zeros(2, 3, 2), {"backend": "cuda-magic"}, "unknown sampler backend"),
        (torch.zeros(2, 3, 112, 112), torch.zeros(2, 3, 2), {"indices": torch.full((2, 4), 3)}, r"\[0, 3\)"),
        (torch.zeros(2, 112, 112, 3, dtype=torch.int32), torch.zeros(2, 3, 2), {}, "dtype"),
    ],
)
def test_bad_input_names_the_problem(images, coords, kw, match):
    with pytest.raises(ValueError, match=match):
        sample_patches(images, coords, **kw)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_coords_fail_a_device_assertion(bad):
    # a device-side assertion (no host sync on a GPU); on the CPU it raises at once
    coords = torch.zeros(2, 3, 2)
    coords[1, 2, 0] = bad
    with pytest.raises(RuntimeError, match="NaN or inf"):
        sample_patches(torch.zeros(2, 3, 112, 112), coords)
    sample_patches(torch.zeros(2, 3, 112, 112), coords, check_finite=False)  # opted out: samples (zeros there)
