"""Face alignment / landmarks: BlazeFace with the local weights, FAN with random weights, offline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lafs_fast.cli import main
from lafs_fast.data import align
from tests import BLAZEFACE_DIR

pytest.importorskip("face_alignment")
needs_blazeface = pytest.mark.skipif(
    not (BLAZEFACE_DIR / "blazeface.pth").is_file(), reason="BlazeFace weights not in ../shared/data/blazeface"
)


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory) -> Path:
    """A real photo (scikit-image's astronaut, shipped with the package: no download)."""
    skdata = pytest.importorskip("skimage.data")
    root = tmp_path_factory.mktemp("raw")
    (root / "eileen").mkdir()
    Image.fromarray(skdata.astronaut()).save(root / "eileen" / "a.png")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(root / "eileen" / "blank.png")
    return root


def test_similarity_and_warp_put_points_on_template() -> None:
    """Points made by a known similarity of the template are mapped back onto it, and the warp
    moves a marked pixel to where the matrix says."""
    ang, s, t = 0.3, 1.7, np.array([40.0, 25.0])
    rot = s * np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]])
    pts = (align.ARCFACE_112 @ rot.T + t).astype(np.float32)
    m = align.similarity_to_template(pts)
    assert np.allclose((m[:2, :2] @ pts.T).T + m[:2, 2], align.ARCFACE_112, atol=1e-3)
    img = np.zeros((300, 300, 3), np.uint8)
    x, y = np.round(pts[2]).astype(int)  # nose tip
    img[y - 2 : y + 3, x - 2 : x + 3] = 255
    out = align.warp_affine(img, m)
    assert out.shape == (112, 112, 3)
    yy, xx = np.nonzero(out[..., 0] > 128)
    assert abs(xx.mean() - align.ARCFACE_112[2, 0]) < 1.0 and abs(yy.mean() - align.ARCFACE_112[2, 1]) < 1.0


def test_five_points_from_68() -> None:
    p = np.arange(136, dtype=np.float32).reshape(68, 2)
    f = align.five_points_from_68(p)
    assert np.allclose(f[0], p[36:42].mean(0)) and np.allclose(f[1], p[42:48].mean(0))
    assert np.allclose(f[2:], p[[30, 48, 54]])


def test_missing_weights_say_where(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("LAFS_FAST_WEIGHTS", str(tmp_path / "nowhere"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    with pytest.raises(FileNotFoundError, match=r"no BlazeFace weights found .*blazeface\.pth.*--weights DIR"):
        align.BlazeFaceKeypoints("cpu")
    with pytest.raises(FileNotFoundError, match="FAN 68-point"):
        align.FanLandmarks("cpu")
    assert main(["data", "align", str(tmp_path), str(tmp_path / "o")]) == 2


@needs_blazeface
def test_blazeface_align_real_photo(photo_dir: Path, tmp_path: Path) -> None:
    rep = align.align_folder(photo_dir, tmp_path / "out")
    assert rep["images"] == 2 and rep["aligned"] == 1 and rep["no_face"] == [str(photo_dir / "eileen" / "blank.png")]
    assert rep["max_residual_px"][0] < 5.0  # eyes/nose/mouth land within a few px of the template
    out = np.asarray(Image.open(tmp_path / "out" / "eileen" / "a.png"))
    assert out.shape == (112, 112, 3) and out.std() > 20
    # the aligned face is still a face, with its eyes near the template's
    det = align.BlazeFaceKeypoints("cpu")([out])[0]
    assert det is not None and np.abs(det[1][:2] - align.ARCFACE_112[:2]).max() < 8.0


@needs_blazeface
def test_a_photo_with_two_faces_aligns_the_central_one_by_default() -> None:
    """Face data sets centre the person they label (LFW: the most confident face was a background face
    in 593 of 13,233 photos): ``pick="central"`` takes the face nearest the photo's centre, ``confident``
    the highest score. Two copies of a real face: a larger one in a corner, a smaller one centred."""
    skdata = pytest.importorskip("skimage.data")
    face = skdata.astronaut()[20:260, 110:350]
    canvas = np.full((600, 600, 3), 90, np.uint8)
    canvas[:260, :260] = np.asarray(Image.fromarray(face).resize((260, 260)))
    canvas[200:400, 200:400] = np.asarray(Image.fromarray(face).resize((200, 200)))
    centres = {}
    for pick in align.BlazeFaceKeypoints.PICKS:
        box = align.BlazeFaceKeypoints("cpu", pick=pick)([canvas])[0][0]
        centres[pick] = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
    assert np.hypot(centres["central"][0] - 300, centres["central"][1] - 300) < 20
    assert np.hypot(centres["confident"][0] - 130, centres["confident"][1] - 130) < 30  # the corner face
    with pytest.raises(ValueError, match="pick must be one of"):
        align.BlazeFaceKeypoints("cpu", pick="largest")


@needs_blazeface
def test_fan_path_random_weights(photo_dir: Path, tmp_path: Path) -> None:
    """The 68-point path with the real FAN architecture and random weights: it runs end to end and
    its points lie inside the face box it was given (the heatmap -> image mapping is right)."""
    fan = align.FanLandmarks("cpu", random_init=True)
    im = np.asarray(Image.open(photo_dir / "eileen" / "a.png").convert("RGB"))
    box = np.array([150.0, 60.0, 260.0, 190.0])
    ((pts, score),) = fan([im], [box])
    assert pts.shape == (68, 2) and np.isfinite(pts).all()
    w = box[2] - box[0]
    assert (
        (pts[:, 0] > box[0] - w).all()
        and (pts[:, 0] < box[2] + w).all()
        and (pts[:, 1] > box[1] - w).all()
        and (pts[:, 1] < box[3] + w).all()
    )


def test_heatmap_points_match_face_alignment_convention() -> None:
    """A single peak at heatmap (col 20, row 40) maps to the image point face-alignment's transform gives."""
    hm = np.zeros((68, 64, 64), np.float32)
    hm[:, 40, 20] = 1.0
    center, scale = np.array([100.0, 120.0]), 0.8
    pts, score = align._heatmap_points(hm, center, scale)
    h = 200 * scale
    expect = (np.array([20.5, 40.5]) - 32.0) * h / 64 + center  # (p - res/2) * h/res + centre
    assert np.allclose(pts, expect[None], atol=1e-4) and score == 1.0


@needs_blazeface
def test_landmarks_sidecar_on_orl(orl_dir: Path, tmp_path: Path) -> None:
    from lafs_fast.data.folder import build_rec
    from lafs_fast.data.subsets import make_subset

    build_rec(orl_dir, tmp_path / "orl", progress=False)
    make_subset(tmp_path / "orl", tmp_path / "few", shots=1, fraction=0.2, seed=0)
    assert main(["data", "landmarks", str(tmp_path / "few"), "--batch-size", "4"]) == 0
    d = np.load(tmp_path / "few" / "train.rec.landmarks.npz")
    assert (
        d["keys"].tolist() == list(range(1, 9)) and d["points"].shape == (8, 6, 2) and str(d["detector"]) == "blazeface"
    )
    found = d["scores"] > 0
    assert found.sum() >= 6  # ORL faces are frontal: BlazeFace finds nearly all
    p = d["points"][found]
    # in the 112x112 loader image: eyes above the nose above the mouth, left eye left of right eye
    assert (
        (p[:, 0, 0] < p[:, 1, 0]).all() and (p[:, :2, 1].max(1) < p[:, 2, 1]).all() and (p[:, 2, 1] < p[:, 3, 1]).all()
    )
    assert ((p >= 0) & (p < 112)).all()


def test_sidecar_is_memory_mapped_not_read(tmp_path) -> None:
    """The sidecar's arrays come back as read-only memory maps of the file (4.2 M faces load
    without a copy); a compressed .npz (written by another tool) still loads, read as np.load does."""
    from lafs_fast.data.align import load_sidecar_arrays, write_sidecar
    from lafs_fast.dense_landmarks import LandmarkSidecar

    rng = np.random.default_rng(0)
    keys, points, scores = (
        np.arange(1, 41),
        rng.random((40, 6, 2), dtype=np.float32) * 112,
        rng.random(40, dtype=np.float32),
    )
    points[3] = np.nan
    path = write_sidecar(
        tmp_path / "s.npz", keys, points, scores, detector="blazeface", names=["a", "b", "c", "d", "e", "f"]
    )
    z = load_sidecar_arrays(path)
    assert isinstance(z["points"], np.memmap) and not z["points"].flags.writeable
    assert (
        np.array_equal(z["points"], points, equal_nan=True)
        and np.array_equal(z["keys"], keys)
        and str(z["detector"]) == "blazeface"
    )
    side = LandmarkSidecar.load(path)
    assert isinstance(side.points.base, np.memmap) or isinstance(side.points, np.memmap)
    np.testing.assert_allclose(side.template(), np.nanmean(points.astype(np.float64), axis=0), rtol=1e-12)
    np.savez_compressed(tmp_path / "c.npz", keys=keys, points=points, detector=np.array("fan"))
    assert np.array_equal(load_sidecar_arrays(tmp_path / "c.npz")["points"], points, equal_nan=True)


def test_alignment_is_opencvs_warp_affine_and_the_ijb_protocol_uses_it() -> None:
    """The InsightFace convention is OpenCV's warpAffine (pixel centres at integer coordinates):
    ``data align`` reproduces it on a real face within one grey level (it was half a pixel off, PIL's
    convention), and the IJB protocol aligns with the very same function."""
    cv2 = pytest.importorskip("cv2")
    skdata = pytest.importorskip("skimage.data")
    from lafs_fast.eval import ijb

    face = skdata.astronaut()  # a real face, shipped with scikit-image (no download)
    pts = np.array(
        [[185.0, 110.0], [240.0, 108.0], [215.0, 140.0], [192.0, 172.0], [236.0, 170.0]]
    )  # eyes, nose, mouth
    ours = align.align_face(face, pts)
    m = align.similarity_transform(pts, align.ARCFACE_112)
    ref = cv2.warpAffine(face, m, (112, 112), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    diff = np.abs(ours.astype(int) - ref.astype(int))
    assert diff.max() <= 1, diff.max()
    half_pixel_off = cv2.warpAffine(face, m + np.array([[0, 0, 0.5], [0, 0, 0.5]]), (112, 112), flags=cv2.INTER_LINEAR)
    assert np.abs(ours.astype(int) - half_pixel_off.astype(int)).max() > 10  # the test tells the conventions apart
    assert ijb.align_face is align.align_face  # (and so align.similarity_transform; ijb no longer re-exports it)
