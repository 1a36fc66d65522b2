"""The pre-training views audited against the reference's own code, run side by side (docs/method.md 7.1).

The reference (../shared/reference/LAFS_CVPR2024) is imported and RUN: its ``DataAugmentation_LAFS``
and ``DataAugmentationDINO`` (torchvision + PIL) on a coordinate-coded probe and on real celeb24
faces, their random draws recorded by wrapping the library calls they make; its landmark module's
perturbation and index draw (``face_landmark_4simmin_glo_loc``, its MobileNet trunk replaced by a
stub, ``.cuda()`` an identity); its patch extraction and the training loop's token rearrange; its
student's embedding; its ``MultiCropWrapper``. Ours: ``draw_view_params`` / ``apply_views_torch``
with the specs ``LafsViews`` builds, ``LafsViews`` itself, ``DinoStage``.

Statistics are compared reference vs ours (and each vs the spec) to within sampling error: rates,
means and spreads by a two-sample z test at ``Z`` = 5 sigma, distributions by a two-sample
Kolmogorov-Smirnov test at alpha = 1e-6 (a false failure is ~1e-6 per check; every draw is seeded).
``pytest -s`` prints every statistic with its N. Skips without the reference or the faces.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import math
import random
import sys
import types
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from lafs_fast.augment import AugmentedViews
from lafs_fast.config import load_config
from lafs_fast.kernels import augment as kv
from lafs_fast.kernels.augment import ViewParams, apply_views_torch, draw_view_params
from lafs_fast.sampling import grid_landmarks, sample_patches
from lafs_fast.views import LafsViews, view_specs
from tests import SHARED, TINY_PRETRAIN

REF_DIR = SHARED / "reference" / "LAFS_CVPR2024"
CELEB = SHARED / "data" / "celeb24"
S = 112  # view side, and the side of the source faces (celeb24 and the training data are 112 x 112)
KINDS = ("global 1", "global 2", "local")
Z = 5.0
KS_ALPHA = 1e-6
N_REF_CALLS = 400  # reference DataAugmentation_LAFS calls (10 views each): half on the probe, half on faces
N_REPLAY = 6  # face calls whose views are re-rendered by ours from the reference's own draws
N_OURS = 20_000  # our images per parameter draw (200,000 views: milliseconds)
N_DINO_CALLS = 150
FIT_MARGIN = 8  # view pixels left out at each side of the probe fit (the resampler's border taps)

# the spec's rates per view kind (global 1, global 2, local): docs/method.md section 3
NOMINAL = {
    "flip": (0.5, 0.5, 0.5),
    "jitter": (0.8, 0.8, 0.8),
    "gray": (0.2, 0.2, 0.2),
    "blur": (1.0, 0.1, 0.5),
    "solarize": (0.0, 0.2, 0.0),
}


# ------------------------------------------------------------------------------------------ statistics


def _report(line: str) -> None:
    print(f"[views audit] {line}")


def _kind_of(v: int) -> int:
    """View index in an image's 10 views -> kind index into KINDS."""
    return min(v, 2)


def _same_rate(name: str, k1: int, n1: int, k2: int, n2: int, nominal: float | None = None) -> None:
    """Two binomial rates (reference k1 / n1, ours k2 / n2) agree within Z sigma, and each with ``nominal``."""
    p1, p2 = k1 / n1, k2 / n2
    pool = (k1 + k2) / (n1 + n2)
    se = math.sqrt(pool * (1 - pool) * (1 / n1 + 1 / n2))
    _report(f"{name}: reference {p1:.4f} (N {n1}) vs ours {p2:.4f} (N {n2})" + (f", spec {nominal}" if nominal else ""))
    assert abs(p1 - p2) <= Z * se + 1e-12, f"{name}: reference {p1:.4f} vs ours {p2:.4f} (se {se:.4f})"
    if nominal is not None:
        for who, p, n in (("reference", p1, n1), ("ours", p2, n2)):
            tol = Z * math.sqrt(nominal * (1 - nominal) / n) + 1e-12
            assert abs(p - nominal) <= tol, f"{name}: {who} {p:.4f} vs the spec's {nominal}"


def _same_mean(name: str, a: np.ndarray, b: np.ndarray) -> None:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    se = math.sqrt(a.var() / a.size + b.var() / b.size)
    _report(f"{name} mean: reference {a.mean():.4f} (N {a.size}) vs ours {b.mean():.4f} (N {b.size})")
    assert abs(a.mean() - b.mean()) <= Z * se + 1e-12, f"{name}: means {a.mean():.4f} vs {b.mean():.4f}"


def _same_std(name: str, a: np.ndarray, b: np.ndarray) -> None:
    """Standard deviations agree within Z sigma (se of a sample std of a normal: std / sqrt(2 N))."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    sa, sb = a.std(), b.std()
    se = math.sqrt(sa**2 / (2 * a.size) + sb**2 / (2 * b.size))
    _report(f"{name} std: reference {sa:.4f} (N {a.size}) vs ours {sb:.4f} (N {b.size})")
    assert abs(sa - sb) <= Z * se, f"{name}: std {sa:.4f} vs {sb:.4f}"


def _same_dist(name: str, a: np.ndarray, b: np.ndarray, who: tuple[str, str] = ("reference", "ours")) -> None:
    """Two-sample Kolmogorov-Smirnov at KS_ALPHA (conservative for the discrete crop sides)."""
    a, b = np.sort(np.asarray(a, np.float64)), np.sort(np.asarray(b, np.float64))
    x = np.concatenate([a, b])
    d = float(np.abs(np.searchsorted(a, x, "right") / a.size - np.searchsorted(b, x, "right") / b.size).max())
    crit = math.sqrt(-0.5 * math.log(KS_ALPHA / 2)) * math.sqrt((a.size + b.size) / (a.size * b.size))
    q = np.linspace(0.05, 0.95, 4)
    _report(
        f"{name}: KS D {d:.4f} (critical {crit:.4f}); quantiles 5/35/65/95 %: {who[0]} "
        f"{np.round(np.quantile(a, q), 3).tolist()} (N {a.size}) vs {who[1]} "
        f"{np.round(np.quantile(b, q), 3).tolist()} (N {b.size})"
    )
    assert d <= crit, f"{name}: KS D {d:.4f} > {crit:.4f}"


# ------------------------------------------------------------------------------------------ the reference


_REF_MODULES = ("lafs_train", "utils", "vision_transformer", "face_pre_pro")


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """One intra-op thread: the machine's other core runs training jobs."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ref() -> Iterator[types.SimpleNamespace]:
    """The reference's modules, imported from its folder (sys.path and sys.modules restored after)."""
    if not REF_DIR.is_dir():
        pytest.skip("../shared/reference/LAFS_CVPR2024 not present (a user's clone has no shared/)")
    pytest.importorskip("einops", reason="the reference imports einops (pip install lafs-fast[test])")
    stashed = {k: sys.modules.pop(k) for k in list(sys.modules) if k.split(".")[0] in _REF_MODULES}
    stub_ipython = importlib.util.find_spec("IPython") is None
    if stub_ipython:  # ViT_face.py imports IPython.embed and never calls it
        sys.modules["IPython"] = types.ModuleType("IPython")
        sys.modules["IPython"].embed = lambda *a, **k: None
    path, bytecode = list(sys.path), sys.dont_write_bytecode
    sys.path.insert(0, str(REF_DIR))
    sys.dont_write_bytecode = True  # leave no __pycache__ in the shared folder
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # timm.models.layers deprecation, meshgrid indexing
            mods = types.SimpleNamespace(
                train=importlib.import_module("lafs_train"),
                utils=importlib.import_module("utils"),
                vit_face=importlib.import_module("face_pre_pro.ViT_face"),
            )
    finally:
        sys.path[:] = path
        sys.dont_write_bytecode = bytecode
    yield mods
    for k in [k for k in sys.modules if k.split(".")[0] in _REF_MODULES]:
        del sys.modules[k]
    sys.modules.update(stashed)
    if stub_ipython:
        sys.modules.pop("IPython", None)


def _ref_args(ref: types.SimpleNamespace):
    """The reference's default command line (its argparse defaults: crop scales, local count)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.hub, "list", lambda *a, **k: [])  # its parser lists XCiT models from GitHub
        return ref.train.get_args_parser().parse_args([])


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's and Python's global RNGs (the reference's transforms draw from both), restore after."""
    state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        try:
            yield
        finally:
            random.setstate(state)


@dataclass
class RefView:
    """One reference view's draws, as recorded from the library calls its transforms make."""

    crop: tuple[int, int, int, int]  # (top, left, height, width): RandomResizedCrop.get_params
    scale: tuple[float, float]
    flip: bool = False
    jitter: bool = False
    order: list[int] | None = None  # ColorJitter.get_params: op applied at each step
    factors: tuple[float, float, float, float] | None = None  # brightness, contrast, saturation, hue
    gray: bool = False
    blur: float | None = None  # ImageFilter.GaussianBlur radius when the blur fired
    solarize: bool = False
    threshold: int | None = None  # ImageOps.solarize's threshold when it fired

    def no_colour_op(self) -> bool:
        return not (self.jitter or self.gray or self.blur is not None or self.solarize)


@contextlib.contextmanager
def _recording(ref: types.SimpleNamespace, views: list[RefView]) -> Iterator[None]:
    """Wrap the library calls of the reference's transforms: each RandomResizedCrop draw opens a view,
    the random transforms that fire (they return their input itself when they do not) mark it."""
    import torchvision.transforms as T
    from PIL import ImageFilter, ImageOps

    with pytest.MonkeyPatch.context() as mp:
        crop_params = T.RandomResizedCrop.get_params

        def rec_crop(img, scale, ratio):
            out = crop_params(img, scale, ratio)
            views.append(RefView(crop=tuple(int(x) for x in out), scale=tuple(scale)))
            return out

        jitter_params = T.ColorJitter.get_params

        def rec_jitter(*args):
            fn_idx, *fs = jitter_params(*args)
            views[-1].order, views[-1].factors = fn_idx.tolist(), tuple(float(f) for f in fs)
            return (fn_idx, *fs)

        def fired(cls: type, method: str, attr: str) -> None:
            inner = getattr(cls, method)

            def wrapper(self, img):
                out = inner(self, img)
                setattr(views[-1], attr, out is not img)
                return out

            mp.setattr(cls, method, wrapper)

        class RecBlur(ImageFilter.GaussianBlur):
            def __init__(self, radius, *args, **kwargs):
                views[-1].blur = float(radius)
                super().__init__(radius, *args, **kwargs)

        solarize = ImageOps.solarize

        def rec_solarize(*args, **kwargs):
            bound = inspect.signature(solarize).bind(*args, **kwargs)
            bound.apply_defaults()
            views[-1].solarize, views[-1].threshold = True, int(bound.arguments["threshold"])
            return solarize(*args, **kwargs)

        mp.setattr(T.RandomResizedCrop, "get_params", staticmethod(rec_crop))
        mp.setattr(T.ColorJitter, "get_params", staticmethod(rec_jitter))
        fired(T.RandomHorizontalFlip, "forward", "flip")
        fired(T.RandomApply, "forward", "jitter")
        fired(T.RandomGrayscale, "forward", "gray")
        mp.setattr(ImageFilter, "GaussianBlur", RecBlur)
        mp.setattr(ImageOps, "solarize", rec_solarize)
        yield


def _probe() -> np.ndarray:
    """(S, S, 3) uint8 coordinate-coded probe: R = source column, G = source row, B = 128."""
    yy, xx = np.mgrid[0:S, 0:S]
    return np.stack([xx, yy, np.full_like(xx, 128)], -1).astype(np.uint8)


def _fit_boxes(clean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Crop box and flip of views of the probe, decoded from the pixels.

    clean: (N, 3, S', S') in [-1, 1] -> ((N, 5) int64 (top, left, height, width, flipped) source px,
    (N,) the largest |view - model| in uint8 levels). In a view of the probe, R at interior column ox
    is the source column ``left + (ox + 0.5) * w / S' - 0.5`` (``S' - 1 - ox`` when flipped: both
    resamplers map pixel centres, align_corners=False, and reproduce a linear ramp) up to the uint8
    rounding of PIL's output, and G likewise the source row. A line fit gives the box to within a
    pixel (the rounding of a ramp of slope ~1 is a slow sawtooth, not noise); the integer box whose
    model stays within half a level of R and G in every interior column / row is the decoded one.
    """
    v = (clean.double() + 1) * 127.5
    s = v.shape[-1]
    m = slice(FIT_MARGIN, s - FIT_MARGIN)
    o = torch.arange(s, dtype=torch.float64)[m]
    oc = o - o.mean()
    d = torch.arange(-2, 3, dtype=torch.float64)

    def decode(profile: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        slope = (profile - profile.mean(1, keepdim=True)) @ oc / (oc @ oc)
        flip = slope < 0
        pos = torch.where(flip[:, None], (s - 1) - o, o)  # the view column each value was read for
        at = profile.mean(1) - slope * o.mean()
        a, b = at - 0.5 * slope, at + (s - 0.5) * slope  # source coordinate at the view's outer edges
        start0, len0 = (torch.minimum(a, b) + 0.5).round(), (b - a).abs().round()
        start = start0[:, None, None] + d[None, :, None]  # (N, 5, 1) candidates
        length = len0[:, None, None] + d[None, None, :]  # (N, 1, 5)
        model = start[..., None] + (pos[:, None, None, :] + 0.5) * length[..., None] / s - 0.5
        dev = (profile[:, None, None, :] - model).abs().amax(-1).flatten(1)  # (N, 25)
        best = dev.argmin(1)
        return (start0 + d[best // 5]).long(), (len0 + d[best % 5]).long(), flip, dev.min(1).values

    left, width, flip, dev_x = decode(v[:, 0, m, m].mean(1))
    top, height, _, dev_y = decode(v[:, 1, m, m].mean(2))
    return torch.stack([top, left, height, width, flip.long()], 1), torch.maximum(dev_x, dev_y)


@dataclass
class RefLafsRun:
    views: list[RefView]  # N_REF_CALLS * 10, call-major
    fitted: torch.Tensor  # (probe calls * 10, 5) int64 boxes decoded from the probe calls' clean copies
    fit_dev: torch.Tensor  # (probe calls * 10,) their largest |view - model| in uint8 levels
    probe_views: list[RefView]  # the views those boxes belong to
    replay: list[tuple[int, torch.Tensor, torch.Tensor]]  # (face index, clean (10,3,S,S), augmented)
    noop: int  # views where no colour op fired
    noop_equal: int  # ... whose augmented copy equals the clean copy


@pytest.fixture(scope="module")
def faces() -> torch.Tensor:
    """(6, S, S, 3) uint8: the first face of six celeb24 people."""
    if not CELEB.is_dir():
        pytest.skip("../shared/data/celeb24 not present (a user's clone has no shared/)")
    from PIL import Image

    people = sorted(p for p in CELEB.iterdir() if p.is_dir())[:6]
    return torch.stack(
        [torch.from_numpy(np.array(Image.open(sorted(p.glob("*.jpg"))[0]).convert("RGB"))) for p in people]
    )


@pytest.fixture(scope="module")
def ref_lafs(ref: types.SimpleNamespace, faces: torch.Tensor) -> RefLafsRun:
    """DataAugmentation_LAFS with the reference's default arguments, N_REF_CALLS calls alternating
    the probe and the faces, every draw recorded."""
    from PIL import Image

    args = _ref_args(ref)
    aug = ref.train.DataAugmentation_LAFS(args.global_crops_scale, args.local_crops_scale, args.local_crops_number)
    probe = Image.fromarray(_probe())
    pil_faces = [Image.fromarray(f.numpy()) for f in faces]
    views: list[RefView] = []
    fitted, fit_dev, probe_views, replay, noop, noop_equal = [], [], [], [], 0, 0
    with _seeded(1234), _recording(ref, views):
        for call in range(N_REF_CALLS):
            face = (call // 2) % len(pil_faces)
            crops = aug(probe if call % 2 == 0 else pil_faces[face])
            clean, augmented = torch.stack(crops[0::2]), torch.stack(crops[1::2])  # clean / augmented pairs
            mine = views[-clean.shape[0] :]
            assert len(views) == (call + 1) * clean.shape[0] == (call + 1) * 10
            for v, c, a in zip(mine, clean, augmented):
                if v.no_colour_op():
                    noop, noop_equal = noop + 1, noop_equal + int(torch.equal(c, a))
            if call % 2 == 0:
                box, dev = _fit_boxes(clean)
                fitted.append(box)
                fit_dev.append(dev)
                probe_views += mine
            elif len(replay) < N_REPLAY:
                replay.append((face, clean, augmented))
    return RefLafsRun(views, torch.cat(fitted), torch.cat(fit_dev), probe_views, replay, noop, noop_equal)


def _lafs_specs():
    cfg = load_config("reference")
    g, loc = view_specs(cfg.views)  # what LafsViews renders
    return cfg, g + loc


@pytest.fixture(scope="module")
def ours_params() -> ViewParams:
    """Our draws for N_OURS images of 10 views, as LafsViews makes them (augment_views' draw)."""
    cfg, specs = _lafs_specs()
    assert len(specs) == 10
    return draw_view_params(N_OURS, specs, (S, S), torch.Generator().manual_seed(4321))


def _per_kind(x: torch.Tensor, num_views: int = 10) -> list[torch.Tensor]:
    """Flat (B * V, ...) -> [global 1, global 2, locals] rows."""
    x = x.reshape(-1, num_views, *x.shape[1:])
    return [x[:, 0].reshape(-1, *x.shape[2:]), x[:, 1].reshape(-1, *x.shape[2:]), x[:, 2:].reshape(-1, *x.shape[2:])]


def _ref_kind(views: list[RefView], kind: int) -> list[RefView]:
    return [v for i, v in enumerate(views) if _kind_of(i % 10) == kind]


def _geometry(crop: torch.Tensor) -> dict[str, np.ndarray]:
    """(N, 4) (top, left, h, w) -> area fraction, aspect w / h, centre x and y as fractions of the side."""
    top, left, h, w = crop.double().unbind(1)
    return {
        "crop scale (area fraction)": (h * w / S**2).numpy(),
        "aspect w/h": (w / h).numpy(),
        "centre x / W": ((left + w / 2) / S).numpy(),
        "centre y / H": ((top + h / 2) / S).numpy(),
    }


# ------------------------------------------------------------------------------------------ geometry


def test_black_box_fit_recovers_each_pipelines_crop_and_flip(ref_lafs: RefLafsRun) -> None:
    """The probe's clean copies name their crop box and flip: a crop-resize of exactly that box, to
    within PIL's uint8 rounding (reference) or float rounding (ours); on the reference they are its
    recorded RandomResizedCrop / flip draws, on ours the drawn ViewParams."""
    rec = torch.tensor([v.crop + (v.flip,) for v in ref_lafs.probe_views])
    dev = ref_lafs.fit_dev.max().item()
    _report(
        f"reference probe views: decoded box = recorded draw in {int((ref_lafs.fitted == rec).all(1).sum())} of "
        f"{rec.shape[0]} views; largest |view - model| {dev:.3f} uint8 levels"
    )
    assert torch.equal(ref_lafs.fitted, rec) and dev < 0.55
    cfg, specs = _lafs_specs()
    probe = torch.from_numpy(_probe())[None].expand(6, -1, -1, -1).contiguous()
    p = draw_view_params(6, specs, (S, S), torch.Generator().manual_seed(7))
    clean, _ = apply_views_torch(probe, p, S, interpolation=cfg.views.interpolation)
    box, dev_ours = _fit_boxes(clean.reshape(-1, 3, S, S))
    # ours has no rounding, but cubic convolution with A = -0.75 reproduces a ramp only to ~0.05 levels
    _report(f"our probe views: largest |view - model| {dev_ours.max():.3f} uint8 levels over {box.shape[0]} views")
    assert torch.equal(box, torch.cat([p.crop, p.flip[:, None].long()], 1)) and dev_ours.max() < 0.1
    assert p.flip.any() and not p.flip.all()


def test_clean_and_augmented_copies_share_one_geometry(ref_lafs: RefLafsRun) -> None:
    """Both pipelines crop and flip once per view: where no colour op fires, the augmented copy IS the
    clean copy (the reference applies RandomResizedCrop + flip once and forks the image after it)."""
    _report(
        f"reference views with no colour op: {ref_lafs.noop} of {len(ref_lafs.views)}, identical copies: "
        f"{ref_lafs.noop_equal}"
    )
    assert ref_lafs.noop > 50 and ref_lafs.noop_equal == ref_lafs.noop
    cfg, specs = _lafs_specs()
    probe = torch.from_numpy(_probe())[None].expand(2, -1, -1, -1).contiguous()
    p = draw_view_params(2, specs, (S, S), torch.Generator().manual_seed(8))
    off = torch.zeros_like(p.flip)
    quiet = replace(p, jitter=off, gray=off, solarize=off, blur_sigma=torch.zeros_like(p.blur_sigma))
    clean, augmented = apply_views_torch(probe, quiet, S, interpolation=cfg.views.interpolation)
    assert torch.equal(clean, augmented)


def test_view_geometry_matches_reference(ref_lafs: RefLafsRun, ours_params: ViewParams) -> None:
    """Crop scale (area fraction), aspect ratio, position and flip rate of every view kind: the
    reference's read off its views of the probe, ours from the draws (the fit above shows ours land
    in the views exactly). LAFS locals use the global scale range 0.4-1 (not DINO's 0.05-0.4)."""
    fitted = _per_kind(ref_lafs.fitted)
    ours_crop, ours_flip = _per_kind(ours_params.crop), _per_kind(ours_params.flip)
    for k, kind in enumerate(KINDS):
        ref_geo, our_geo = _geometry(fitted[k][:, :4]), _geometry(ours_crop[k])
        for name in ref_geo:
            _same_dist(f"{kind} {name}", ref_geo[name], our_geo[name])
        # the ranges: area fraction within 0.4-1 up to the rounding of the sides, aspect within 3/4-4/3
        for geo in (ref_geo, our_geo):
            assert geo["crop scale (area fraction)"].min() > 0.38 and geo["crop scale (area fraction)"].max() <= 1
            assert geo["aspect w/h"].min() > 0.73 and geo["aspect w/h"].max() < 1.37
        nf = int(fitted[k][:, 4].sum())
        _same_rate(
            f"{kind} flip", nf, fitted[k].shape[0], int(ours_flip[k].sum()), ours_flip[k].numel(), NOMINAL["flip"][k]
        )
    # every kind draws its scale from the same range in the reference: locals vs globals
    _same_dist(
        "reference crop scale, locals vs globals",
        _geometry(fitted[2][:, :4])["crop scale (area fraction)"],
        _geometry(torch.cat(fitted[:2])[:, :4])["crop scale (area fraction)"],
        ("locals", "globals"),
    )
    assert {v.scale for v in ref_lafs.views} == {(0.4, 1.0)}


# ------------------------------------------------------------------------------------------ colour draws


def test_colour_draws_match_reference(ref_lafs: RefLafsRun, ours_params: ViewParams) -> None:
    """Per view kind: the rates of jitter (p 0.8), grayscale (0.2), blur (1.0 / 0.1 / 0.5) and solarize
    (global 2 only, 0.2, threshold 128); the jitter factors' distributions and order; the blur radius."""
    p = ours_params
    ours = {
        "jitter": _per_kind(p.jitter),
        "gray": _per_kind(p.gray),
        "blur": _per_kind(p.blur_sigma > 0),
        "solarize": _per_kind(p.solarize),
    }
    factors, orders, sigmas = _per_kind(p.factors), _per_kind(p.order), _per_kind(p.blur_sigma)
    thresholds = _per_kind(p.solarize_threshold)
    names = ("brightness", "contrast", "saturation", "hue")
    for k, kind in enumerate(KINDS):
        rv = _ref_kind(ref_lafs.views, k)
        n = len(rv)
        got = {
            "jitter": [v.jitter for v in rv],
            "gray": [v.gray for v in rv],
            "blur": [v.blur is not None for v in rv],
            "solarize": [v.solarize for v in rv],
        }
        for op in got:
            _same_rate(
                f"{kind} {op} rate", sum(got[op]), n, int(ours[op][k].sum()), ours[op][k].numel(), NOMINAL[op][k]
            )
        on = ours["jitter"][k]
        ref_f = np.array([v.factors for v in rv if v.jitter])
        for j, name in enumerate(names):
            _same_dist(f"{kind} jitter {name} factor", ref_f[:, j], factors[k][on, j].numpy())
        # the order: how often op `o` runs at step `t` (each 1/4 for a uniform random permutation)
        ref_o = np.array([v.order for v in rv if v.jitter])
        for t in range(4):
            for o in range(4):
                _same_rate(
                    f"{kind} jitter op {names[o]} at step {t}",
                    int((ref_o[:, t] == o).sum()),
                    ref_o.shape[0],
                    int((orders[k][on, t] == o).sum()),
                    int(on.sum()),
                    0.25,
                )
        ref_r = np.array([v.blur for v in rv if v.blur is not None])
        our_r = sigmas[k][sigmas[k] > 0].numpy()
        _same_dist(f"{kind} blur radius", ref_r, our_r)
        assert ref_r.min() >= 0.1 and ref_r.max() <= 2.0 and our_r.min() >= 0.1 and our_r.max() <= 2.0
        if k == 1:
            ref_t = {v.threshold for v in rv if v.solarize}
            our_t = set((thresholds[k] * 255).round().int().tolist())
            _report(f"solarize threshold: reference {ref_t} vs ours {our_t}")
            assert ref_t == our_t == {128}
    # the ranges of the factors: ColorJitter(0.4, 0.4, 0.2, 0.1)
    allf = p.factors[p.jitter]
    lo, hi = allf.min(0).values.tolist(), allf.max(0).values.tolist()
    assert lo[0] >= 0.6 and hi[0] <= 1.4 and lo[1] >= 0.6 and hi[1] <= 1.4
    assert lo[2] >= 0.8 and hi[2] <= 1.2 and lo[3] >= -0.1 and hi[3] <= 0.1


def _params(
    crop: torch.Tensor,
    flip: torch.Tensor | None = None,
    jitter: torch.Tensor | None = None,
    factors: torch.Tensor | None = None,
    order: torch.Tensor | None = None,
    gray: torch.Tensor | None = None,
    blur: torch.Tensor | None = None,
    solarize: torch.Tensor | None = None,
    num_views: int = 1,
) -> ViewParams:
    """ViewParams for N views from explicit draws (absent: off / identity); crop (N, 4)."""
    n = crop.shape[0]
    off = torch.zeros(n, dtype=torch.bool)
    return ViewParams(
        crop=crop.to(torch.int64),
        flip=off if flip is None else flip,
        jitter=off if jitter is None else jitter,
        factors=torch.tensor([[1.0, 1.0, 1.0, 0.0]]).expand(n, 4).contiguous() if factors is None else factors,
        order=torch.arange(4).expand(n, 4).contiguous() if order is None else order,
        gray=off if gray is None else gray,
        blur_sigma=torch.zeros(n) if blur is None else blur,
        solarize=off if solarize is None else solarize,
        solarize_threshold=torch.full((n,), 128 / 255),
        num_views=num_views,
        blur_halfwidth=draw_view_params(1, _lafs_specs()[1], (S, S), torch.Generator()).blur_halfwidth,
    )


def _as_params(views: list[RefView], num_views: int) -> ViewParams:
    """The reference's recorded draws as our ViewParams (flat b * V + v)."""
    return _params(
        torch.tensor([v.crop for v in views]),
        flip=torch.tensor([v.flip for v in views]),
        jitter=torch.tensor([v.jitter for v in views]),
        factors=torch.tensor([v.factors if v.jitter else (1.0, 1.0, 1.0, 0.0) for v in views], dtype=torch.float32),
        order=torch.tensor([v.order if v.jitter else [0, 1, 2, 3] for v in views]),
        gray=torch.tensor([v.gray for v in views]),
        blur=torch.tensor([v.blur or 0.0 for v in views], dtype=torch.float32),
        solarize=torch.tensor([v.solarize for v in views]),
        num_views=num_views,
    )


def test_same_draws_render_the_same_views_up_to_the_documented_departures(
    ref_lafs: RefLafsRun, faces: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reference's own draws on real faces, rendered by ours: every clean copy within 1 uint8 level
    (mean abs) of the reference's, every augmented copy within 3 (the op order crop -> flip -> jitter
    -> gray -> blur -> solarize is the same). With PIL's bicubic A = -0.5 in ours the clean copies'
    difference drops to PIL's uint8 rounding (its two resampling passes are each rounded) and the
    crop-edge taps: A is the clean copy's main departure."""
    cfg, _ = _lafs_specs()
    idx = [face for face, _, _ in ref_lafs.replay]
    views = [v for i in range(N_REF_CALLS) if i % 2 == 1 for v in ref_lafs.views[i * 10 : i * 10 + 10]][: 10 * len(idx)]
    params = _as_params(views, 10)
    clean, augmented = apply_views_torch(faces[idx], params, S, interpolation=cfg.views.interpolation)
    ref_clean = torch.stack([c for _, c, _ in ref_lafs.replay])
    ref_aug = torch.stack([a for _, _, a in ref_lafs.replay])
    dc = ((clean - ref_clean).abs() * 127.5).mean((2, 3, 4)).flatten()
    da = ((augmented - ref_aug).abs() * 127.5).mean((2, 3, 4)).flatten()
    _report(
        f"replayed reference draws, clean copy mean |diff| per view (uint8 levels): mean {dc.mean():.3f}, "
        f"max {dc.max():.3f}; largest pixel |diff| {(clean - ref_clean).abs().max() * 127.5:.2f} "
        f"(N {dc.numel()} views)"
    )
    _report(f"replayed reference draws, augmented copy mean |diff| per view: mean {da.mean():.3f}, max {da.max():.3f}")
    assert dc.max() < 1.0 and da.max() < 3.0
    monkeypatch.setattr(kv, "_BICUBIC_A", -0.5)  # PIL's Keys parameter
    clean_pil, _ = apply_views_torch(faces[idx], params, S, interpolation="bicubic")
    d = (clean_pil - ref_clean).abs() * 127.5
    inner = d[..., 2:-2, 2:-2]  # PIL renormalises the taps at the crop's edge, PyTorch repeats the edge pixel
    _report(
        f"clean copy with A = -0.5: mean |diff| {d.mean():.3f} uint8 levels (interior max {inner.max():.2f}, "
        f"edge pixels max {d.max():.2f}): PIL's two uint8-rounded passes"
    )
    assert d.mean() < 0.35 < dc.mean()


def test_departure_sizes_of_each_op_on_real_faces(faces: torch.Tensor) -> None:
    """Each colour op of ours (the view renderer on an identity crop) against what the reference runs
    on PIL (torchvision's functional ops, PIL's GaussianBlur and solarize): mean and max |diff| in
    uint8 levels over real faces; these are the float-pipeline departures of docs/method.md 7.1."""
    import torchvision.transforms.functional as TF
    from PIL import Image, ImageFilter, ImageOps

    n = faces.shape[0]
    pil = [Image.fromarray(f.numpy()) for f in faces]
    full = torch.tensor([[0, 0, S, S]]).expand(n, 4)
    on = torch.ones(n, dtype=torch.bool)

    def ours(**kw) -> torch.Tensor:  # (N, 3, S, S) augmented copy in uint8 levels
        return (apply_views_torch(faces, _params(full, **kw), S, interpolation="bicubic")[1][:, 0] + 1) * 127.5

    def theirs(imgs) -> torch.Tensor:
        return torch.stack([torch.from_numpy(np.asarray(i.convert("RGB"), dtype=np.float64)) for i in imgs]).permute(
            0, 3, 1, 2
        )

    def size(name: str, a: torch.Tensor, b: torch.Tensor, mean_max: float, max_max: float) -> None:
        """mean |diff| over the whole view, max |diff| over its interior (8 px from the border)."""
        d = (a.double() - b).abs()
        inner = d[..., 8:-8, 8:-8]
        _report(
            f"departure {name}: mean |diff| {d.mean():.3f}, interior max {inner.max():.2f}, border max "
            f"{d.max():.2f} uint8 levels (N {n} faces)"
        )
        assert d.mean() <= mean_max and inner.max() <= max_max, name

    fns = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for op, name, values in (
        (0, "brightness", (0.6, 1.4)),
        (1, "contrast", (0.6, 1.4)),
        (2, "saturation", (0.8, 1.2)),
        (3, "hue", (-0.1, 0.1)),
    ):
        for f in values:
            fac = torch.tensor([[1.0, 1.0, 1.0, 0.0]]).expand(n, 4).clone()
            fac[:, op] = f
            order = torch.tensor([op] + [o for o in range(4) if o != op]).expand(n, 4)
            size(
                f"{name} {f}",
                ours(jitter=on, factors=fac, order=order),
                theirs([fns[op](i, f) for i in pil]),
                0.6,
                1.5 if op < 3 else 8.0,
            )
    size("grayscale", ours(gray=on), theirs([TF.rgb_to_grayscale(i, 3) for i in pil]), 0.3, 1.0)
    size("solarize", ours(solarize=on), theirs([ImageOps.solarize(i) for i in pil]), 1e-3, 1e-3)
    for r in (0.1, 0.5, 1.0, 1.5, 2.0):
        size(
            f"blur radius {r}",
            ours(blur=torch.full((n,), r)),
            theirs([i.filter(ImageFilter.GaussianBlur(r)) for i in pil]),
            1.0,
            5.0,
        )
    # the blur kernels themselves: edge spread functions (a 0 | 255 step) away from the image border
    step = torch.zeros(1, S, S, 3, dtype=torch.uint8)
    step[:, :, S // 2 :] = 255
    for r in (0.5, 1.0, 2.0):
        a = (apply_views_torch(step, _params(full[:1], blur=torch.tensor([r])), S)[1][0, 0, 0, S // 2] + 1) * 127.5
        b = torch.from_numpy(
            np.asarray(Image.fromarray(step[0].numpy()).filter(ImageFilter.GaussianBlur(r)), np.float64)
        )
        d = (a.double() - b[S // 2, :, 0]).abs()
        _report(f"blur radius {r} edge spread function: max |diff| {d.max():.2f} of 255 levels")
        assert d.max() < 16


# ------------------------------------------------------------------------------------------ landmarks and tokens


class _StubTrunk(nn.Module):
    """Stands in for the MobileNetV3 trunk: (B, 3, H, W) -> (B, 160, 2, 2) features of the image."""

    def __init__(self) -> None:
        super().__init__()
        self.pool, self.proj = nn.AdaptiveAvgPool2d(2), nn.Conv2d(3, 160, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.pool(x))


@dataclass
class RefLandmarkRun:
    base: torch.Tensor  # (B, 196, 2) landmarks without the augmentations
    global_theta: torch.Tensor  # (B, 196, 2) what the global call samples at
    global_tokens: torch.Tensor  # (B, 196, 192) the loop's rearrange of its patch mosaic
    local_all: torch.Tensor  # (B, 196, 2) the local call's perturbed landmarks, before the index draw
    local_idx: torch.Tensor  # (B, 36) the drawn indices
    local_theta: torch.Tensor  # (B, 36, 2)
    local_tokens: torch.Tensor  # (B, 36, 192)
    x_aug: torch.Tensor  # (B, 3, S, S) the augmented copies the patches come from


@pytest.fixture(scope="module")
def ref_landmarks(ref: types.SimpleNamespace) -> RefLandmarkRun:
    """face_landmark_4simmin_glo_loc built with lafs_train.py's arguments and called as its loop
    calls it (global: Random_prob, return_prob; local: Random_prob, ran_sample), with the index draw's
    torch.gather recorded."""
    from einops import rearrange

    b = 64
    with _seeded(99), pytest.MonkeyPatch.context() as mp:
        net = ref.vit_face.face_landmark_4simmin_glo_loc(
            loss_type="CosFace", GPU_ID=None, num_class=300, num_patches=196, image_size=112, patch_size=8,
            dim=512, depth=12, heads=11, mlp_dim=2560, dropout=0.1, emb_dropout=0.1,
        )  # fmt: skip
        net.stn = _StubTrunk()
        net.eval()
        mp.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)  # the module moves its draws to the GPU
        x = torch.rand(b, 3, S, S) * 2 - 1
        x_aug = torch.rand(b, 3, S, S) * 2 - 1
        seen: dict[str, torch.Tensor] = {}
        gather = torch.gather

        def rec_gather(inp, dim, index, **kw):
            seen["inp"], seen["index"] = inp.clone(), index.clone()
            return gather(inp, dim, index, **kw)

        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            base, _ = net(x, x_Aug=x_aug)
            g_theta, g_img = net(x, x_Aug=x_aug, Random_prob=True, return_prob=True, random_coor=False)
            assert "inp" not in seen  # the dense call draws no indices
            mp.setattr(torch, "gather", rec_gather)
            l_theta, l_img = net(x, x_Aug=x_aug, Random_prob=True, ran_sample=True, random_coor=False)
    p = net.patch_size
    tok = "b c (h p1) (w p2) -> b (h w) (p1 p2 c)"  # lafs_train.py's train_one_epoch
    assert torch.equal(seen["index"][..., 0], seen["index"][..., 1])
    return RefLandmarkRun(
        base=base,
        global_theta=g_theta,
        global_tokens=rearrange(g_img, tok, p1=p, p2=p),
        local_all=seen["inp"],
        local_idx=seen["index"][..., 0],
        local_theta=l_theta,
        local_tokens=rearrange(l_img, tok, p1=p, p2=p),
        x_aug=x_aug,
    )


def _fake_augment_views(images: torch.Tensor, specs, *, seed: int, out_size: int, **kw) -> AugmentedViews:
    """Random views in place of the renderer (the landmark stage reads only their shapes and pixels)."""
    b, v = images.shape[0], len(specs)
    x = torch.rand(b, v, 3, out_size, out_size, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return AugmentedViews(x, x, torch.zeros(b, v, 2, 3), None, "stub")


def _ours_landmarks(monkeypatch: pytest.MonkeyPatch, b: int = 64):
    cfg = load_config("reference", None, ["views.landmarks=grid"])
    monkeypatch.setattr("lafs_fast.views.augment_views", _fake_augment_views)
    views = LafsViews(cfg.views, cfg.model, sampler_backend="torch")
    return cfg, views(torch.zeros(b, S, S, 3, dtype=torch.uint8), seed=2024)


def test_landmark_perturbation_and_index_draws_match_reference(
    ref_landmarks: RefLandmarkRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    """N(0, 5^2) px on every coordinate of every view (dense and sparse), dense views all 196 landmarks
    in order, sparse views 36 indices uniform WITH replacement from 196, and a landmark drawn twice is
    one perturbed point (the reference perturbs the 196 landmarks, then draws): identical tokens."""
    r = ref_landmarks
    cfg, vb = _ours_landmarks(monkeypatch)
    grid = grid_landmarks()
    b = vb.batch
    # dense views: the noise is the only change from the landmarks, token j = landmark j
    ref_g = (r.global_theta - r.base).numpy().ravel()
    our_g = (vb.global_coords - grid).numpy().ravel()
    assert vb.global_coords.shape == (2 * b, 196, 2) and r.global_theta.shape == r.base.shape
    # sparse views: each view's 196 landmarks perturbed once, then gathered
    ref_l = (r.local_all - r.base).numpy().ravel()
    l_idx = vb.local_indices
    our_l_tok = vb.local_coords - grid[l_idx]
    first = torch.zeros_like(l_idx, dtype=torch.bool)  # the first token of each (view, landmark): one draw each
    for i in range(l_idx.shape[0]):
        seen_i: set[int] = set()
        for j, k in enumerate(l_idx[i].tolist()):
            first[i, j] = k not in seen_i
            seen_i.add(k)
    our_l = our_l_tok[first].numpy().ravel()
    for name, a, c in (("dense-view perturbation", ref_g, our_g), ("sparse-view perturbation", ref_l, our_l)):
        _same_mean(name, a, c)
        _same_std(name, a, c)
        _same_dist(name, a, c)
        assert abs(a.std() - cfg.views.perturb_sigma) < 0.25 and abs(c.std() - 5.0) < 0.25
    assert (ref_g != 0).all() and (our_g != 0).all() and (our_l != 0).all()  # every view, every coordinate
    # the index draw
    assert r.local_idx.shape == (r.base.shape[0], 36) and l_idx.shape == (8 * b, cfg.views.local_tokens) == (8 * b, 36)
    for who, idx in (("reference", r.local_idx), ("ours", l_idx)):
        assert int(idx.min()) >= 0 and int(idx.max()) < 196
        counts = torch.bincount(idx.reshape(-1), minlength=196).double()
        expect = idx.numel() / 196
        chi2 = float(((counts - expect) ** 2 / expect).sum())
        _report(f"{who} index histogram chi2 {chi2:.1f} (df 195, N {idx.numel()})")
        assert chi2 < 195 + Z * math.sqrt(2 * 195)  # uniform over all 196
    distinct_ref = np.array([len(set(row.tolist())) for row in r.local_idx])
    distinct_ours = np.array([len(set(row.tolist())) for row in l_idx])
    expected = 196 * (1 - (195 / 196) ** 36)  # with replacement (without: always 36)
    _report(f"distinct landmarks among 36 draws: expected {expected:.2f} with replacement")
    _same_mean("distinct landmarks per sparse view", distinct_ref, distinct_ours)
    # a landmark drawn twice: one perturbed point, one patch (reference: by construction; ours too)
    for who, idx, coords, tokens in (
        ("reference", r.local_idx, r.local_theta, r.local_tokens),
        ("ours", l_idx, vb.local_coords, vb.local_tokens),
    ):
        same = idx[:, :, None] == idx[:, None, :]
        pairs = same & ~torch.eye(36, dtype=torch.bool)
        assert int(pairs.sum()) > 20
        dc = (coords[:, :, None] - coords[:, None, :]).abs().amax(-1)
        dt = (tokens[:, :, None].float() - tokens[:, None, :].float()).abs().amax(-1)
        _report(f"{who}: {int(pairs.sum()) // 2} repeated-index token pairs, max coordinate gap {dc[pairs].max():.3g}")
        assert dc[pairs].max() == 0 and dt[pairs].max() == 0, f"{who}: a repeated landmark gives different tokens"


def test_token_layout_matches_reference_patches(ref_landmarks: RefLandmarkRun) -> None:
    """Our sampler on the reference's coordinates gives the reference's tokens: token j of a sparse view
    is landmark idx_j's patch, dense views all 196 in order, the layout (p1 p2 c) with the FIRST patch
    axis the x offset (extract_patches' meshgrid + the loop's rearrange)."""
    r = ref_landmarks
    dense = sample_patches(r.x_aug, r.global_theta, 8)
    torch.testing.assert_close(dense, r.global_tokens, atol=1e-6, rtol=0)
    sparse = sample_patches(r.x_aug, r.local_all, 8, indices=r.local_idx)
    torch.testing.assert_close(sparse, r.local_tokens, atol=1e-6, rtol=0)
    # first patch axis = x: on an image whose R is the column, R steps along axis 0 of the (8, 8) patch
    ramp = (torch.arange(S, dtype=torch.float32) / S).expand(1, 3, S, S).contiguous()
    tok = sample_patches(ramp, torch.tensor([[[40.5, 60.5]]]), 8).reshape(8, 8, 3)[..., 0] * S
    torch.testing.assert_close(tok[1:] - tok[:-1], torch.ones(7, 8), atol=1e-4, rtol=0)
    torch.testing.assert_close(tok[:, 1:] - tok[:, :-1], torch.zeros(8, 7), atol=1e-4, rtol=0)


def test_position_embedding_per_token_matches_reference_student(ref: types.SimpleNamespace, gen) -> None:
    """Token j of any view gets position embedding j + 1 (0: CLS), as in the reference student's
    embedding (ViT_face_landmark_patch8 with with_land=False, the one lafs_train.py trains)."""
    from lafs_fast.models import FViT

    with _seeded(5), warnings.catch_warnings(), contextlib.redirect_stdout(None):
        warnings.simplefilter("ignore")
        student = ref.vit_face.ViT_face_landmark_patch8(
            loss_type="None", GPU_ID=None, num_class=1, image_size=112, patch_size=8, dim=32, depth=1, heads=2,
            num_patches=196, mlp_dim=64, dropout=0.1, emb_dropout=0.1, with_land=False, use_standcoord=False,
            Random_prob=False, shuffle=False,
        ).eval()  # fmt: skip
    ours = FViT(dim=32, depth=1, heads=2, head_dim=16, mlp_dim=64, num_patches=196, patch_size=8)
    with torch.no_grad():
        for name in ("pos_embedding", "cls_token", "patch_to_embedding.weight", "patch_to_embedding.bias"):
            ours.get_parameter(name).copy_(student.get_parameter(name))
    got: list[torch.Tensor] = []
    student.dropout.register_forward_hook(lambda m, args, out: got.append(args[0].detach()))
    for n in (36, 196):
        tokens = torch.randn(3, n, 192, generator=gen)
        with torch.no_grad():
            student(tokens)
            torch.testing.assert_close(ours.embed(tokens), got[-1])


def test_teacher_gets_the_globals_and_student_all_views_as_reference(
    ref: types.SimpleNamespace, tmp_path: Path
) -> None:
    """The reference's loop builds [global 1, global 2, local 1..8], runs teacher(images[:2]) and
    student(images) through MultiCropWrapper (one backbone batch per token length); our DinoStage
    feeds its backbones exactly those batches, in that row order."""
    from lafs_fast.launch import DistInfo
    from lafs_fast.train.dino import DinoStage
    from lafs_fast.train.engine import StepContext

    cfg = load_config("small", None, [*TINY_PRETRAIN, "views.n_local=8", f"train.out_dir={tmp_path}"])
    stage = DinoStage(cfg, torch.device("cpu"))
    seen = {"teacher": [], "student": []}
    stage.teacher.backbone.register_forward_pre_hook(lambda m, args: seen["teacher"].append(args[0]))
    stage.model.backbone.register_forward_pre_hook(lambda m, args: seen["student"].append(args[0]))
    b = 2
    images = torch.randint(0, 256, (b, S, S, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    ctx = StepContext(0, 0, 0, 77, {"teacher_temp": 0.04, "teacher_momentum": 0.996}, DistInfo())
    stage.forward_loss(stage.model, (images, torch.zeros(b, dtype=torch.int64)), ctx)
    vb = stage.views(images, ctx.seed)
    views = [vb.global_tokens[:b], vb.global_tokens[b:], *vb.local_tokens.chunk(8)]  # the loop's `images`

    class Recorder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.seen: list[torch.Tensor] = []

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.seen.append(x)
            return x[:, 0, :4]

    ref_teacher, ref_student = Recorder(), Recorder()
    ref.utils.MultiCropWrapper(ref_teacher, nn.Identity())(views[:2])
    ref.utils.MultiCropWrapper(ref_student, nn.Identity())(views)
    shapes = [tuple(x.shape) for x in ref_student.seen]
    _report(f"reference teacher batches {[tuple(x.shape) for x in ref_teacher.seen]}, student batches {shapes}")
    assert shapes == [(2 * b, 196, 192), (8 * b, 36, 192)]
    for who, ref_in, ours_in in (
        ("teacher", ref_teacher.seen, seen["teacher"]),
        ("student", ref_student.seen, seen["student"]),
    ):
        assert len(ref_in) == len(ours_in), who
        for a, c in zip(ref_in, ours_in):
            assert torch.equal(a, c), who


# ------------------------------------------------------------------------------------------ the DINO-face baseline


def test_dino_baseline_views_vs_reference_data_augmentation_dino(
    ref: types.SimpleNamespace, faces: torch.Tensor
) -> None:
    """``--views dino`` against the reference's DataAugmentationDINO: 112 px globals at scale 0.4-1 and
    48 px locals at 0.05-0.4, flip -> jitter -> gray -> blur (-> solarize) with the LAFS rates: the
    same. Departures: it normalises with ImageNet's mean / std (ours: x / 255 * 2 - 1, the LAFS
    views' range), and PIL antialiases the locals' downscaling (ours: PyTorch's bicubic, no antialias)."""
    from PIL import Image

    args = _ref_args(ref)
    aug = ref.train.DataAugmentationDINO(args.global_crops_scale, args.local_crops_scale, args.local_crops_number)
    to_input = aug.global_transfo1.transforms[-1]  # Compose(ToTensor, Normalize) closes each chain
    norm = to_input.transforms[-1]
    mean, std = torch.tensor(norm.mean)[:, None, None], torch.tensor(norm.std)[:, None, None]
    pil = [Image.fromarray(f.numpy()) for f in faces]
    views: list[RefView] = []
    sizes: set[tuple[int, ...]] = set()
    quiet: list[tuple[int, int, torch.Tensor]] = []  # (face, view index in `views`, output) of op-free locals
    with _seeded(77), _recording(ref, views):
        for call in range(N_DINO_CALLS):
            out = aug(pil[call % len(pil)])
            sizes.add(tuple(o.shape[-1] for o in out))
            for j, o in enumerate(out):
                v = views[call * 10 + j]
                if j >= 2 and v.no_colour_op():
                    quiet.append((call % len(pil), call * 10 + j, o))
    cfg = load_config("reference", None, ["views.mode=dino"])
    g_specs, l_specs = view_specs(cfg.views)
    ours = draw_view_params(N_OURS // 4, g_specs + l_specs, (S, S), torch.Generator().manual_seed(11))
    _report(f"DINO-face view sides: reference {sizes} vs ours {cfg.model.image_size} / {cfg.views.local_size}")
    assert sizes == {(cfg.model.image_size,) * 2 + (cfg.views.local_size,) * 8} == {(112,) * 2 + (48,) * 8}
    crops, flips = _per_kind(ours.crop), _per_kind(ours.flip)
    rates = {
        "jitter": _per_kind(ours.jitter),
        "gray": _per_kind(ours.gray),
        "blur": _per_kind(ours.blur_sigma > 0),
        "solarize": _per_kind(ours.solarize),
    }
    for k, kind in enumerate(KINDS):
        rv = _ref_kind(views, k)
        ref_geo = _geometry(torch.tensor([v.crop for v in rv]))
        our_geo = _geometry(crops[k])
        _same_dist(
            f"DINO-face {kind} crop scale", ref_geo["crop scale (area fraction)"], our_geo["crop scale (area fraction)"]
        )
        _same_rate(f"DINO-face {kind} flip", sum(v.flip for v in rv), len(rv), int(flips[k].sum()), flips[k].numel())
        for op, got in (
            ("jitter", [v.jitter for v in rv]),
            ("gray", [v.gray for v in rv]),
            ("blur", [v.blur is not None for v in rv]),
            ("solarize", [v.solarize for v in rv]),
        ):
            _same_rate(
                f"DINO-face {kind} {op} rate",
                sum(got),
                len(rv),
                int(rates[op][k].sum()),
                rates[op][k].numel(),
                NOMINAL[op][k],
            )
    assert {v.scale for v in _ref_kind(views, 2)} == {(0.05, 0.4)} and {v.scale for v in views[:2]} == {(0.4, 1.0)}
    # normalisation: ImageNet's there, [-1, 1] here (a per-channel affine map between the two)
    grey = Image.new("RGB", (S, S), (128, 128, 128))
    ref_grey = to_input(grey)[:, 0, 0]
    our_grey = apply_views_torch(
        torch.full((1, S, S, 3), 128, dtype=torch.uint8), _params(torch.tensor([[0, 0, S, S]])), S
    )[0][0, 0, :, 0, 0]
    _report(
        f"DINO-face normalisation of grey 128: reference {ref_grey.tolist()} (ImageNet mean {norm.mean}, "
        f"std {norm.std}) vs ours {our_grey.tolist()}"
    )
    torch.testing.assert_close(our_grey, ref_grey * 2 * std[:, 0, 0] + 2 * mean[:, 0, 0] - 1, atol=1e-6, rtol=0)
    # resampling of the op-free locals, rendered by ours from the reference's draws at 48 px
    fidx = [f for f, _, _ in quiet]
    params = _as_params([views[i] for _, i, _ in quiet], 1)
    mine = (apply_views_torch(faces[fidx], params, cfg.views.local_size, interpolation="bicubic")[0][:, 0] + 1) * 127.5
    theirs = (torch.stack([o for _, _, o in quiet]) * std + mean) * 255
    d = (mine - theirs).abs().mean((1, 2, 3))
    down = (params.crop[:, 2:] > cfg.views.local_size).any(1)
    for name, sel in (("upscaled (crop side <= 48)", ~down), ("downscaled (crop side > 48)", down)):
        _report(
            f"DINO-face locals {name}: mean |diff| per view {d[sel].mean():.3f} (max {d[sel].max():.3f}) "
            f"uint8 levels, N {int(sel.sum())}"
        )
    assert d[~down].max() < 1.5 and d[down].max() < 6.0
