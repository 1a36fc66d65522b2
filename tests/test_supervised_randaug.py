"""The device RandAugment (``finetune.augment=gpu``) against timm's PIL ops, op by op, and its draws."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lafs_fast.data import SyntheticFaces
from lafs_fast.train.randaugment import OPS, apply_ops, rand_augment

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread


def _timm_op(name: str, img: Image.Image, m: float, sign: float) -> Image.Image:
    """timm's op at magnitude m with the given sign (its level functions written out)."""
    import timm.data.auto_augment as aa

    import lafs_fast._torchvision_fix  # noqa: F401

    lvl = m / 10.0 * sign
    kw = {"fillcolor": (128, 128, 128), "resample": Image.BILINEAR}
    factor = max(0.1, 1.0 + 0.9 * lvl)
    return {
        "AutoContrast": lambda: aa.auto_contrast(img),
        "Equalize": lambda: aa.equalize(img),
        "Invert": lambda: aa.invert(img),
        "Rotate": lambda: aa.rotate(img, 30.0 * lvl, **kw),
        "PosterizeIncreasing": lambda: aa.posterize(img, 4 - int(m / 10.0 * 4)),
        "ColorIncreasing": lambda: aa.color(img, factor),
        "ContrastIncreasing": lambda: aa.contrast(img, factor),
        "BrightnessIncreasing": lambda: aa.brightness(img, factor),
        "SharpnessIncreasing": lambda: aa.sharpness(img, factor),
        "ShearX": lambda: aa.shear_x(img, 0.3 * lvl, **kw),
        "ShearY": lambda: aa.shear_y(img, 0.3 * lvl, **kw),
        "TranslateXRel": lambda: aa.translate_x_rel(img, 0.45 * lvl, **kw),
        "TranslateYRel": lambda: aa.translate_y_rel(img, 0.45 * lvl, **kw),
    }[name]()


@pytest.mark.parametrize("name", OPS)
def test_each_op_matches_timm_pil(name):
    face = SyntheticFaces(1, 1, seed=2).batch([0])[0][0]  # (112, 112, 3) uint8
    img = Image.fromarray(face.numpy())
    x = face.permute(2, 0, 1)[None].float()
    for m, sign in ((2.0, 1.0), (6.0, -1.0)):
        want = torch.from_numpy(np.array(_timm_op(name, img, m, sign))).permute(2, 0, 1).float()
        got = apply_ops(x, torch.tensor([OPS.index(name)]), torch.tensor([m]), torch.tensor([sign]))[0]
        diff = (got - want).abs()
        # float between ops vs PIL's uint8 rounding; bilinear edge pixels of the geometric ops
        assert diff.mean() < 1.5 and (diff > 8).float().mean() < 0.02, (
            name,
            m,
            float(diff.mean()),
            float((diff > 8).float().mean()),
        )


def test_skipped_images_are_untouched_and_draws_are_seeded():
    x = SyntheticFaces(6, 1, seed=3).batch(range(6))[0].permute(0, 3, 1, 2).float()
    same = apply_ops(x, torch.full((6,), -1), torch.full((6,), 5.0), torch.ones(6))
    assert torch.equal(same, x)
    a = rand_augment(x, torch.Generator().manual_seed(4), magnitude=2.0, p=1.0)
    b = rand_augment(x, torch.Generator().manual_seed(4), magnitude=2.0, p=1.0)
    assert torch.equal(a, b) and a.min() >= 0 and a.max() <= 255
    changed = (a - x).abs().flatten(1).amax(dim=1) > 0
    assert changed.sum() >= 4  # two ops at p = 1: (almost) every image changes
    assert torch.equal(rand_augment(x, torch.Generator().manual_seed(4), p=0.0), x)


@pytest.mark.parametrize("p", [0.5, 1.0])
def test_drawn_ops_equal_every_op_with_a_select(p):
    """Issue 21: each op computed on the images that drew it alone gives the same batch as every op
    on every image and a select (same draws: the same CPU generator stream), to the bit."""
    x = SyntheticFaces(16, 1, seed=5).batch(range(16))[0].permute(0, 3, 1, 2).float()
    for seed in range(4):
        fast = rand_augment(x, torch.Generator().manual_seed(seed), magnitude=3.0, p=p)
        slow = rand_augment(x, torch.Generator().manual_seed(seed), magnitude=3.0, p=p, all_ops=True)
        assert torch.equal(fast, slow), (seed, float((fast - slow).abs().max()))
