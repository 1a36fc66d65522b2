"""``--landmarks detector``: sidecar loading, the thin-plate densification, landmarks carried into the
views through the crop / flip affine, and a pre-training run on a rec with a sidecar."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lafs_fast.augment import augment_views
from lafs_fast.config import load_config
from lafs_fast.data import SyntheticFaces
from lafs_fast.data.align import sidecar_path
from lafs_fast.data.recordio_writer import write_identity_dataset
from lafs_fast.dense_landmarks import DetectorLandmarks, LandmarkSidecar, thin_plate_weights, views_from_source
from lafs_fast.eval import knn
from lafs_fast.kernels.augment import ViewSpec
from lafs_fast.sampling import grid_landmarks, sample_patches
from lafs_fast.train import pretrain
from lafs_fast.views import LafsViews
from tests import BLAZEFACE_DIR, TINY_DINO, TINY_MODEL
from tests.devices import cuda_compiled

ROOT = Path(__file__).resolve().parents[1]
# six BlazeFace-like points (eyes, nose, mouth, ears) of a mean face, continuous px
FACE6 = np.array([[38.0, 51.0], [74.0, 51.0], [56.0, 71.0], [56.0, 92.0], [17.0, 57.0], [95.0, 57.0]], dtype=np.float32)
IDS, PER = 4, 3


def _grid_continuous() -> torch.Tensor:
    return grid_landmarks().double() - 0.5  # sampler convention -> continuous px


def _rotation(deg: float) -> torch.Tensor:
    a = math.radians(deg)
    return torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]], dtype=torch.float64)


def _make_rec_with_sidecar(folder: Path, points: np.ndarray | None = None) -> Path:
    """A PNG rec of IDS x PER synthetic faces and a sidecar: FACE6 moved by a small affine per image
    (NaN for image 2: no face)."""
    import io

    from PIL import Image

    ds = SyntheticFaces(IDS, PER, seed=3)
    images, _ = ds.batch(range(len(ds)))

    def png(a: np.ndarray) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        return buf.getvalue()

    write_identity_dataset(
        folder, [[png(images[i * PER + j].numpy()) for j in range(PER)] for i in range(IDS)], height=112, width=112
    )
    n = IDS * PER
    if points is None:
        rng = np.random.default_rng(0)
        points = np.stack(
            [FACE6 @ (np.eye(2) + rng.normal(0, 0.05, (2, 2))).T + rng.normal(0, 3, 2) for _ in range(n)]
        ).astype(np.float32)
        points[2] = np.nan
    np.savez(
        sidecar_path(folder / "train.rec"),
        keys=np.arange(1, n + 1),
        points=points,
        scores=np.isfinite(points[:, 0, 0]).astype(np.float32),
        detector=np.array("test"),
    )
    return folder / "train.rec"


# ------------------------------------------------------------------------------------------ densification


def _face68() -> np.ndarray:
    """68 points laid out like iBUG's (jaw arc, brows, nose, eyes, mouth), for the P = 68 (FAN) case."""
    a = np.linspace(0.1, np.pi - 0.1, 17)
    jaw = np.stack([56 - 38 * np.cos(a), 55 + 45 * np.sin(a)], 1)
    brows = np.stack([np.r_[np.linspace(28, 48, 5), np.linspace(64, 84, 5)], np.full(10, 42.0)], 1)
    nose = np.r_[
        np.stack([np.full(4, 56.0), np.linspace(50, 68, 4)], 1), np.stack([np.linspace(48, 64, 5), np.full(5, 72.0)], 1)
    ]
    e = np.linspace(0, 2 * np.pi, 7)[:6]
    eyes = np.r_[
        np.stack([38 + 7 * np.cos(e), 52 + 3 * np.sin(e)], 1), np.stack([74 + 7 * np.cos(e), 52 + 3 * np.sin(e)], 1)
    ]
    m = np.linspace(0, 2 * np.pi, 21)[:20]
    mouth = np.stack([56 + 14 * np.cos(m), 90 + 5 * np.sin(m)], 1)
    pts = np.concatenate([jaw, brows, nose, eyes, mouth]).astype(np.float32)
    assert pts.shape == (68, 2)
    return pts


@pytest.mark.parametrize("points", ["blazeface6", "fan68"])
@pytest.mark.parametrize("smoothing", [0.0, 0.3, 50.0])
def test_spline_reproduces_affine_maps_and_the_grid(smoothing: float, points: str) -> None:
    t = torch.from_numpy(FACE6 if points == "blazeface6" else _face68()).double()
    g = _grid_continuous()
    w = thin_plate_weights(t, g, smoothing, 112.0)
    assert w.shape == (196, len(t))
    torch.testing.assert_close(w.sum(1), torch.ones(196, dtype=torch.float64))
    torch.testing.assert_close(w @ t, g, atol=1e-9, rtol=0)  # the mean face gets exactly the grid
    a, shift = 1.1 * _rotation(12.0), torch.tensor([4.0, -3.0], dtype=torch.float64)
    torch.testing.assert_close(
        w @ (t @ a.T + shift), g @ a.T + shift, atol=1e-8, rtol=0
    )  # a moved face: the grid moved alike


def test_spline_interpolates_without_smoothing_and_is_affine_with_much() -> None:
    t = torch.from_numpy(FACE6).double()
    d = t + torch.tensor(
        [[3.0, -2.0], [0.0, 1.0], [-2.0, 0.0], [1.0, 3.0], [0.0, 0.0], [2.0, -1.0]], dtype=torch.float64
    )
    torch.testing.assert_close(thin_plate_weights(t, t, 0.0, 112.0) @ d, d, atol=1e-8, rtol=0)
    # huge smoothing: the least-squares affine map of the template onto d
    g = _grid_continuous()
    basis = torch.cat((torch.ones(6, 1, dtype=torch.float64), t), 1)
    coef = torch.linalg.lstsq(basis, d).solution
    expect = torch.cat((torch.ones(196, 1, dtype=torch.float64), g), 1) @ coef
    torch.testing.assert_close(thin_plate_weights(t, g, 1e9, 112.0) @ d, expect, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="on one line"):
        thin_plate_weights(torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]]), g, 0.0, 112.0)


# ------------------------------------------------------------------------------------------ sidecar and table


def test_sidecar_errors_name_the_file_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="lafs-fast data landmarks"):
        LandmarkSidecar.load(tmp_path / "none.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="junk.npz is not a landmark sidecar"):
        LandmarkSidecar.load(tmp_path / "junk.npz")
    np.savez(tmp_path / "two.npz", keys=np.arange(3), points=np.zeros((3, 2, 2), np.float32))
    with pytest.raises(ValueError, match="at least 3"):
        LandmarkSidecar.load(tmp_path / "two.npz")
    np.savez(tmp_path / "ok.npz", keys=np.array([5, 1, 3]), points=np.stack([FACE6 + k for k in (5, 1, 3)]))
    sc = LandmarkSidecar.load(tmp_path / "ok.npz")
    assert np.array_equal(sc.for_keys(np.array([1, 5])), np.stack([FACE6 + 1, FACE6 + 5]))
    with pytest.raises(ValueError, match="no landmarks for 1 of the 2 records.*key 4.*rerun"):
        sc.for_keys(np.array([1, 4]))
    np.savez(tmp_path / "empty.npz", keys=np.arange(2), points=np.full((2, 6, 2), np.nan, np.float32))
    with pytest.raises(ValueError, match="found no face"):
        LandmarkSidecar.load(tmp_path / "empty.npz").template()


def test_table_densifies_by_position_and_faceless_images_get_the_grid(tmp_path: Path) -> None:
    rec = _make_rec_with_sidecar(tmp_path / "rec")
    det = DetectorLandmarks.for_source(rec.parent)  # a folder holding train.rec finds the sidecar too
    assert det.no_face == 1 and det.num_points == 196 and "1 of 12 images without a face" in det.describe()
    raw = np.load(sidecar_path(rec))["points"]
    template = torch.from_numpy(np.nanmean(raw, axis=0)).float()
    torch.testing.assert_close(det.template, template)
    out = det(torch.tensor([2, 5]), "cpu")  # (2, 196, 2) sampler px
    torch.testing.assert_close(out[0], grid_landmarks(), atol=1e-3, rtol=0)  # no face: the mean face's grid
    w = thin_plate_weights(template.double(), _grid_continuous(), 0.3, 112.0)
    torch.testing.assert_close(out[1].double(), w @ torch.from_numpy(raw[5]).double() + 0.5, atol=1e-3, rtol=0)
    with pytest.raises(ValueError, match="synthetic data has none"):
        DetectorLandmarks.for_source("synthetic:2x2")


# ------------------------------------------------------------------------------------------ into the views


def _ramp(b: int = 2) -> torch.Tensor:
    """(B, 112, 112, 3) uint8: R = 2x, G = 2y (a linear image: any centred average reads the centre)."""
    y, x = torch.meshgrid(torch.arange(112), torch.arange(112), indexing="ij")
    im = torch.stack((2 * x, 2 * y, torch.full_like(x, 128)), -1).to(torch.uint8)
    return im.expand(b, -1, -1, -1).contiguous()


def test_a_landmark_reads_the_same_point_of_the_face_in_every_view() -> None:
    """On a linear image, a patch's mean is the image at the patch centre: the source patch at a
    landmark and the view patch at its mapped position must agree through crop, resize and flip
    (an off-by-half-a-pixel convention shows up as 1/255 here)."""
    images = _ramp()
    pts = torch.tensor([[[40.3, 50.7], [56.5, 70.2], [75.0, 52.0], [60.0, 90.0]]]).expand(2, -1, -1).contiguous()
    spec = ViewSpec(scale=(0.5, 1.0), flip_p=0.5, jitter_p=0.0, gray_p=0.0)
    av = augment_views(images, [spec] * 6, seed=11)
    assert av.params.flip.any() and not av.params.flip.all()
    coords = views_from_source(pts, av.affine)  # (6 * 2, 4, 2)
    src_mean = sample_patches(images, pts, 8).reshape(2, 4, 64, 3).mean(2)[..., :2]
    views = av.clean.transpose(0, 1).reshape(-1, 3, 112, 112)
    view_mean = sample_patches(views, coords, 8).reshape(12, 4, 64, 3).mean(2)[..., :2]
    v, k = coords[..., 0], coords[..., 1]
    inside = ((v > 8) & (v < 104) & (k > 8) & (k < 104)).all(1)  # patches clear of the view's border
    assert inside.sum() >= 6
    expect = src_mean.repeat(6, 1, 1)[inside]
    assert (view_mean[inside] - expect).abs().max() < 0.5 / 255


DEVICES = ["cpu", cuda_compiled()]  # cpu: the torch twins (no Triton)


@pytest.mark.parametrize("device", DEVICES)
def test_lafs_views_in_detector_mode(tmp_path: Path, device: str) -> None:
    rec = _make_rec_with_sidecar(tmp_path / "rec")
    cfg = load_config("small", None, ["views.landmarks=detector", "views.n_local=2", "views.perturb_sigma=0"])
    det = DetectorLandmarks.for_source(rec)
    backend = "torch" if device == "cpu" else "auto"  # on CUDA: the Triton kernels
    views = LafsViews(cfg.views, cfg.model, detector=det, sampler_backend=backend, view_backend=backend).to(device)
    images = SyntheticFaces(3, 1, seed=1).batch(range(3), device)[0]
    pos = torch.tensor([0, 4, 7])  # record positions stay on the CPU, like the loaders yield them
    vb = views(images, seed=5, positions=pos)
    assert vb.global_tokens.shape == (2 * 3, 196, 192) and vb.local_tokens.shape == (2 * 3, 36, 192)
    av = augment_views(
        images,
        views.global_specs + views.local_specs,
        seed=pretrain_seed(5),
        interpolation=cfg.views.interpolation,
        backend=backend,
    )
    mapped = views_from_source(det(pos, device), av.affine)
    torch.testing.assert_close(vb.global_coords, mapped[:6])  # sigma 0: the mapped landmarks themselves
    torch.testing.assert_close(
        vb.local_coords, torch.gather(mapped[6:], 1, vb.local_indices[..., None].expand(-1, -1, 2))
    )
    with pytest.raises(ValueError, match="record position"):
        views(images, seed=5)
    eval_tokens = views.eval_tokens(images, pos)
    # the CUDA kernel rounds unlike CUDA's grid_sample: up to 1.7e-5 measured against the twin there
    atol = 1e-5 if device == "cpu" else 5e-5
    torch.testing.assert_close(
        eval_tokens, sample_patches(images, det(pos, device), 8, backend="torch"), atol=atol, rtol=0
    )
    # test-time flip: each token stays on its point of the face, its patch mirrored (the x offset axis)
    flipped = views.eval_tokens(images, pos, flip=True).reshape(3, 196, 8, 8, 3)
    torch.testing.assert_close(flipped, eval_tokens.reshape(3, 196, 8, 8, 3).flip(2), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="needs the landmark table"):
        LafsViews(cfg.views, cfg.model)


def test_detector_densification_stays_fp32_under_bf16_autocast(tmp_path: Path) -> None:
    """The densification matmul and the view affine in fp32 inside the run's bf16 autocast region
    (bf16 coordinates near x = 100 px step by 0.5 px)."""
    rec = _make_rec_with_sidecar(tmp_path / "rec")
    cfg = load_config("small", None, ["views.landmarks=detector", "views.n_local=2", "views.perturb_sigma=0"])
    views = LafsViews(
        cfg.views, cfg.model, detector=DetectorLandmarks.for_source(rec), sampler_backend="torch", view_backend="torch"
    )
    images = SyntheticFaces(3, 1, seed=1).batch(range(3))[0]
    pos = torch.tensor([0, 4, 7])
    ref = views(images, seed=5, positions=pos)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = views(images, seed=5, positions=pos)
        eval_got = views.eval_tokens(images, pos)
    assert got.global_coords.dtype == torch.float32
    torch.testing.assert_close(got.global_coords, ref.global_coords)
    torch.testing.assert_close(got.local_coords, ref.local_coords)
    torch.testing.assert_close(eval_got, views.eval_tokens(images, pos))


def test_knn_faces_of_a_rec_carry_positions_only_for_its_own_table(tmp_path: Path) -> None:
    rec = _make_rec_with_sidecar(tmp_path / "rec")
    faces = knn.knn_faces(str(rec), torch.device("cpu"), train_data=str(rec.parent), detector=True, max_images=5)
    assert faces.positions.tolist() == [0, 3, 6, 8, 11] and faces.labels.tolist() == [0, 1, 2, 2, 3]
    assert faces.images.shape == (5, 112, 112, 3) and "5 faces of train.rec, 4 identities" in faces.what
    other = _make_rec_with_sidecar(tmp_path / "other")
    assert knn.knn_faces(str(other), torch.device("cpu"), train_data=str(rec), detector=True).positions is None
    assert knn.knn_faces(str(rec), torch.device("cpu"), train_data=str(rec), detector=False).positions is None


def pretrain_seed(seed: int) -> int:
    from lafs_fast.views import _seed

    return _seed(seed, 0)


# ------------------------------------------------------------------------------------------ the command

TINY = [
    *TINY_MODEL,
    *TINY_DINO,
    "optim.batch_size=4",
    "optim.epochs=1",
    "views.n_local=2",
    "train.log_every=1",
]


@pytest.mark.timeout(300)
def test_pretrain_with_detector_landmarks_runs_and_refuses_what_it_cannot_use(tmp_path: Path) -> None:
    rec = _make_rec_with_sidecar(tmp_path / "rec")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "lafs_fast.train.pretrain",
            "--data",
            str(rec),
            "--landmarks",
            "detector",
            "--preset",
            "small",
            "--device",
            "cpu",
            "--max-steps",
            "2",
            "--no-progress",
            "--out",
            str(tmp_path / "run"),
            "--knn-data",
            str(rec),
            "data.loader=pil",
            "data.workers=0",
            *TINY,
        ],
        capture_output=True,
        text=True,
        timeout=280,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert (
        "test landmarks from" in r.stdout
        and "6 points densified to 196" in r.stdout
        and "smallest grid step" in r.stdout
    )
    assert "2 steps in" in r.stdout and (tmp_path / "run" / "teacher.pt").is_file()
    assert "k-NN check after:  1-NN top-1" in r.stdout and "(12 faces of train.rec, 4 identities)" in r.stdout

    def refusal(*args: str) -> str:
        with pytest.raises((ValueError, FileNotFoundError)) as exc:
            pretrain.preflight(
                load_config(
                    "small", None, [*TINY, f"train.out_dir={tmp_path / 'x'}", "views.landmarks=detector", *args]
                ),
                None,
            )
        return str(exc.value)

    assert "synthetic data has none" in refusal()
    assert "dali" in refusal(f"data.path={rec}", "data.loader=dali-mxnet")
    assert "lafs-fast data landmarks" in refusal(f"data.path={rec}", f"views.detector_file={tmp_path / 'gone.npz'}")
    sidecar_path(rec).unlink()
    assert "lafs-fast data landmarks" in refusal(f"data.path={rec}")


@pytest.mark.skipif(
    not (BLAZEFACE_DIR / "blazeface.pth").is_file(), reason="BlazeFace weights not in ../shared/data/blazeface"
)
@pytest.mark.timeout(300)
def test_default_smoothing_keeps_real_blazeface_grids_unfolded(orl_dir: Path, tmp_path: Path) -> None:
    """ORL through `data build` + `data landmarks` (BlazeFace, 6 points): at the default smoothing no
    face's grid folds and the spline fits the detections closer than an affine map; far less
    smoothing folds some grids (why the default is not lower)."""
    from lafs_fast.cli import main
    from lafs_fast.data.folder import build_rec
    from lafs_fast.data.subsets import make_subset

    build_rec(orl_dir, tmp_path / "orl", progress=False)
    make_subset(tmp_path / "orl", tmp_path / "few", shots=4, fraction=1.0, seed=0)  # 160 faces
    assert main(["data", "landmarks", str(tmp_path / "few"), "--batch-size", "32"]) == 0
    default = load_config("small", None, []).views.detector_smoothing
    q = DetectorLandmarks.for_source(tmp_path / "few", smoothing=default).quality()
    assert q["faces"] >= 150 and q["min_step_px"] > 1.0 and q["fit_px"] < 0.8 * q["affine_fit_px"]
    assert (
        DetectorLandmarks.for_source(tmp_path / "few", smoothing=0.01).quality()["min_step_px"] < q["min_step_px"] / 2
    )
