"""Face detection, landmarks and 5-point alignment with face-alignment, offline.

Weights (never downloaded here): face-alignment looks in ``$TORCH_HOME/hub/checkpoints``
(default ``~/.cache/torch/hub/checkpoints``); lafs-fast searches, in order, ``--weights DIR``,
that folder, and the folders in ``$LAFS_FAST_WEIGHTS`` (``os.pathsep``-separated). Files:

- BlazeFace (detector + 6 keypoints: eyes, nose tip, mouth centre, ears): ``blazeface.pth`` and
  ``anchors.npy`` (github.com/hollance/BlazeFace-PyTorch, what face-alignment downloads);
- FAN 68 points: ``2DFAN4-11f355bf06.pth.tar`` (face-alignment's 2DFAN-4).

Alignment (:func:`align_face`, also the IJB protocol's): a least-squares similarity transform
(Umeyama) from the detected points to the InsightFace 112x112 template (:data:`ARCFACE_112`): 5 points
from FAN (eye centres, nose tip, mouth corners), 4 from BlazeFace (eyes, nose tip, mouth centre =
the mean of the template's mouth corners); warped as OpenCV's ``warpAffine`` does (the InsightFace
convention: pixel centres at integer coordinates).

Landmark sidecar (``lafs-fast data landmarks``), ``<rec>.landmarks.npz``:
``keys`` (N,) int64 image keys; ``points`` (N, P, 2) float32, x = column and y = row in the
112x112 image the loaders yield, continuous coordinates (pixel i covers [i, i + 1)), NaN when no
face was found; ``scores`` (N,) float32 (0 when none);
``detector`` str; ``names`` (P,) str point names (P = 6 for BlazeFace, 68 for FAN). Written
uncompressed (:func:`write_sidecar`) and memory-mapped when read (:func:`load_sidecar_arrays`).
"""

from __future__ import annotations

import io
import os
import tokenize
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lafs_fast.io import check_unpacked_size

ARCFACE_112 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float64,
)  # left eye, right eye (image left/right), nose tip, left / right mouth corner
BLAZE_NAMES = ("eye_image_left", "eye_image_right", "nose_tip", "mouth_centre", "ear_image_left", "ear_image_right")
FAN_FILE = "2DFAN4-11f355bf06.pth.tar"
WEIGHTS_ENV = "LAFS_FAST_WEIGHTS"  # more folders to search for weights (os.pathsep-separated)


def sidecar_path(rec: str | os.PathLike) -> Path:
    """Where the landmark sidecar of ``rec`` (a .rec, or a folder holding train.rec) lives by default."""
    p = Path(rec)
    if p.is_dir():
        p = p / "train.rec"
    return p.with_suffix(p.suffix + ".landmarks.npz")


def weight_dirs(weights: str | os.PathLike | None = None) -> list[Path]:
    """Folders searched for weights, in order."""
    dirs = [Path(weights)] if weights else []
    dirs.append(Path(torch.hub.get_dir()) / "checkpoints")
    dirs.extend(Path(d) for d in os.environ.get(WEIGHTS_ENV, "").split(os.pathsep) if d)
    return dirs


def find_weights(names: tuple[str, ...], weights: str | os.PathLike | None = None, what: str = "") -> list[Path]:
    """Paths of ``names`` from the first folder holding all of them; FileNotFoundError with the fix."""
    dirs = weight_dirs(weights)
    for d in dirs:
        if all((d / n).is_file() for n in names):
            return [d / n for n in names]
    raise FileNotFoundError(
        f"no {what or ' + '.join(names)} weights found (looked for {', '.join(names)} in {', '.join(map(str, dirs))}); "
        f"put them in one of those folders or pass --weights DIR (nothing is downloaded)"
    )


def _require_face_alignment() -> None:
    """face-alignment (the ``[align]`` extra) or one sentence naming it, not an ImportError traceback."""
    from lafs_fast.errors import require_extra

    require_extra("face detection and landmarks (data align, data landmarks)", "align", "face_alignment")


class BlazeFaceKeypoints:
    """BlazeFace (face-alignment's network, local weights): boxes + 6 keypoints, batched.

    ``__call__(images)``: list of (H, W, 3) uint8 RGB -> list of ``(box (4,) x0,y0,x1,y1, points
    (6, 2) x,y, score)`` of one face per image, or None where there is none. ``pick``: which face when
    several score above ``min_score``: ``central`` (default), the one whose box centre is nearest the
    image centre (face data sets centre the person they label: on LFW the most confident face was a
    background face in 593 of 13,233 photos), or ``confident``, the highest score.
    """

    PICKS = ("central", "confident")

    def __init__(
        self,
        device: str = "cpu",
        weights: str | os.PathLike | None = None,
        min_score: float = 0.5,
        pick: str = "central",
    ) -> None:
        _require_face_alignment()
        from face_alignment.detection.blazeface.net_blazeface import BlazeFace

        pth, anchors = find_weights(("blazeface.pth", "anchors.npy"), weights, "BlazeFace")
        self.net = BlazeFace(back_model=False)
        check_unpacked_size(pth, "weights")  # a user's --weights folder: no zip bomb
        self.net.load_state_dict(torch.load(pth, map_location="cpu", weights_only=True))
        self.net.load_anchors_from_npy(np.load(anchors), device)
        self.net.min_score_thresh = min_score
        self.net.to(device).eval()
        if pick not in self.PICKS:
            raise ValueError(f"pick must be one of {self.PICKS}, got {pick!r}")
        self.pick = pick

    def __call__(self, images: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray, float] | None]:
        crops, frames = [], []
        for im in images:  # centre square crop, resized to the network's 128 px
            h, w = im.shape[:2]
            side = min(h, w)
            x0, y0 = (w - side) // 2, (h - side) // 2
            crop = Image.fromarray(im[y0 : y0 + side, x0 : x0 + side]).resize((128, 128), Image.BILINEAR)
            crops.append(np.asarray(crop))
            frames.append((x0, y0, side))
        preds = self.net.predict_on_batch(np.stack(crops)) if crops else []
        out = []
        for im, pred, (x0, y0, side) in zip(images, preds, frames):
            pred = pred.cpu().numpy() if torch.is_tensor(pred) else np.asarray(pred)
            if len(pred) == 0:
                out.append(None)
                continue
            boxes = pred[:, [1, 0, 3, 2]] * side + [x0, y0, x0, y0]  # x0, y0, x1, y1 in the image
            if self.pick == "central":
                h, w = im.shape[:2]
                centre_dist = np.hypot((boxes[:, 0] + boxes[:, 2]) / 2 - w / 2, (boxes[:, 1] + boxes[:, 3]) / 2 - h / 2)
                i = int(np.argmin(centre_dist))
            else:
                i = int(np.argmax(pred[:, -1]))
            best, box = pred[i], boxes[i]
            pts = best[4:16].reshape(6, 2) * side + [x0, y0]
            if pts[0, 0] > pts[1, 0]:  # order the eyes and ears by image x
                pts[[0, 1]] = pts[[1, 0]]
                pts[[4, 5]] = pts[[5, 4]]
            out.append((box.astype(np.float32), pts.astype(np.float32), float(best[-1])))
        return out


class FanLandmarks:
    """face-alignment's FAN (2DFAN-4, 68 points) on a face box. ``random_init=True`` builds the real
    architecture with random weights (tests, where the 95 MB weights cannot be had)."""

    def __init__(
        self, device: str = "cpu", weights: str | os.PathLike | None = None, random_init: bool = False
    ) -> None:
        _require_face_alignment()
        from face_alignment.models import FAN

        self.net = FAN(4)
        if not random_init:
            (path,) = find_weights((FAN_FILE,), weights, "FAN 68-point")
            check_unpacked_size(path, "weights")
            self.net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        self.net.to(device).eval()
        self.device = device

    def __call__(self, images: list[np.ndarray], boxes: list[np.ndarray]) -> list[tuple[np.ndarray, float]]:
        """Images (H, W, 3) uint8 and boxes x0,y0,x1,y1 -> ``(points (68, 2) x,y, mean score)`` each."""
        from face_alignment.utils import CENTER_Y_OFFSET, crop

        crops, frames = [], []
        for im, d in zip(images, boxes):  # face-alignment's own crop convention
            d = [float(x) for x in d]
            center = np.array([(d[0] + d[2]) / 2.0, (d[1] + d[3]) / 2.0])
            center[1] -= (d[3] - d[1]) * CENTER_Y_OFFSET
            scale = float((d[2] - d[0] + d[3] - d[1]) / 195.0)
            crops.append(crop(im, center, scale).transpose(2, 0, 1).astype(np.float32) / 255.0)
            frames.append((center, scale))
        if not crops:
            return []
        with torch.inference_mode():
            heat = self.net(torch.from_numpy(np.stack(crops)).to(self.device))
            heat = (heat[-1] if isinstance(heat, (list, tuple)) else heat).float().cpu().numpy()  # last hourglass
        out = []
        for hm, (center, scale) in zip(heat, frames):
            out.append(_heatmap_points(hm, center, scale))
        return out


def _heatmap_points(hm: np.ndarray, center: np.ndarray, scale: float) -> tuple[np.ndarray, float]:
    """(68, R, R) heatmaps -> (points (68, 2) in the image, mean peak score): face-alignment's
    get_preds_fromhm (argmax, quarter-pixel step towards the larger neighbour, crop -> image), in
    numpy (theirs is a numba function that compiles for ~30 s in every new process)."""
    c, r, _ = hm.shape
    flat = hm.reshape(c, -1)
    idx = flat.argmax(1)
    scores = flat[np.arange(c), idx]
    x, y = (idx % r).astype(np.float32), (idx // r).astype(np.float32)
    xi, yi = x.astype(int), y.astype(int)
    inner = (xi > 0) & (xi < r - 1) & (yi > 0) & (yi < r - 1)
    j = np.arange(c)[inner]
    x[inner] += 0.25 * np.sign(hm[j, yi[inner], xi[inner] + 1] - hm[j, yi[inner], xi[inner] - 1])
    y[inner] += 0.25 * np.sign(hm[j, yi[inner] + 1, xi[inner]] - hm[j, yi[inner] - 1, xi[inner]])
    h = 200.0 * scale  # crop side in image pixels (face-alignment's SCALE_FACTOR)
    pts = np.stack([x + 0.5, y + 0.5], 1) * (h / r) + np.asarray(center) - h / 2.0
    return pts.astype(np.float32), float(scores.mean())


def five_points_from_68(p: np.ndarray) -> np.ndarray:
    """(68, 2) iBUG points -> (5, 2): eye centres (36-41, 42-47), nose tip 30, mouth corners 48, 54."""
    return np.stack([p[36:42].mean(0), p[42:48].mean(0), p[30], p[48], p[54]]).astype(np.float32)


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) taking ``src`` to ``dst``
    (Umeyama 1991, what skimage's ``SimilarityTransform`` and InsightFace's alignment estimate).
    src, dst: (K, 2) -> (2, 3) float64 matrix."""
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s0, d0 = src - mu_s, dst - mu_d
    cov = d0.T @ s0 / src.shape[0]
    u, sig, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(cov) < 0:
        d[-1] = -1
    r = u @ np.diag(d) @ vt
    var_s = (s0**2).sum() / src.shape[0]
    scale = (sig * d).sum() / var_s if var_s > 0 else 1.0
    m = np.zeros((2, 3))
    m[:, :2] = scale * r
    m[:, 2] = mu_d - scale * r @ mu_s
    return m


def template_points(n: int, size: int = 112) -> np.ndarray:
    """The template points ``n`` detected points map to: the 5 of :data:`ARCFACE_112`, or for
    BlazeFace's 4 used points (eyes, nose tip, mouth centre) the mouth corners' mean; scaled to ``size``."""
    t = ARCFACE_112.astype(np.float64) * (size / 112.0)
    return t if n == 5 else np.vstack([t[:3], t[3:].mean(0)])


def similarity_to_template(points: np.ndarray, size: int = 112) -> np.ndarray:
    """(5, 2) or BlazeFace (6, 2) points -> (3, 3) similarity matrix mapping them onto the template."""
    src = np.asarray(points, dtype=np.float64)
    src = src if len(src) == 5 else src[:4]  # BlazeFace: eyes, nose tip, mouth centre (not the ears)
    return np.vstack([similarity_transform(src, template_points(len(src), size)), [0.0, 0.0, 1.0]])


def warp_affine(image, matrix: np.ndarray, size: int = 112) -> np.ndarray:
    """OpenCV's ``warpAffine(image, matrix[:2], (size, size))`` (InsightFace's alignment convention,
    bilinear, zeros outside) through PIL: output pixel index p reads the input at index
    ``matrix^-1 p``. image: PIL image or uint8 (H, W, 3); matrix (2, 3) or (3, 3). -> uint8 (size, size, 3)."""
    im = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
    m = np.asarray(matrix, dtype=np.float64)
    inv = np.linalg.inv(np.vstack([m[:2], [0.0, 0.0, 1.0]]))[:2]
    a, b, c = inv[0]
    d, e, f = inv[1]
    # PIL samples input index a(x+.5)+b(y+.5)+c-.5 for output index x: shift c, f to OpenCV's a x + b y + c
    coeffs = (a, b, c + 0.5 - 0.5 * (a + b), d, e, f + 0.5 - 0.5 * (d + e))
    out = im.convert("RGB").transform((size, size), Image.AFFINE, coeffs, resample=Image.BILINEAR, fillcolor=(0, 0, 0))
    return np.asarray(out, dtype=np.uint8)


def align_face(image, points: np.ndarray, size: int = 112) -> np.ndarray:
    """``image`` warped so its 5 (or BlazeFace's 6) points land on the InsightFace template: the one
    alignment of ``data align`` and the IJB protocol. -> uint8 (size, size, 3) RGB."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    return warp_affine(image, similarity_to_template(pts, size), size)


def _detector(kind: str, device: str, weights, fan_random: bool = False, pick: str = "central"):
    blaze = BlazeFaceKeypoints(device, weights, pick=pick)
    fan = FanLandmarks(device, weights, random_init=fan_random) if kind == "fan" else None
    return blaze, fan


def align_folder(
    raw: str | os.PathLike,
    out: str | os.PathLike,
    *,
    detector: str = "blazeface",
    weights=None,
    device: str = "cpu",
    fan_random: bool = False,
    pick: str = "central",
) -> dict:
    """Align every photo under ``raw`` (sub-folders kept) to ``out`` as 112x112 PNG; report counts
    and the photos without a face. Each file is written under a temporary name, then renamed.
    ``pick``: which face of a photo with several (:class:`BlazeFaceKeypoints`)."""
    from lafs_fast.data.folder import IMAGE_EXTS
    from lafs_fast.io import atomic_write_bytes

    raw, out = Path(raw), Path(out)
    if not raw.is_dir():
        raise FileNotFoundError(f"{raw} is not a folder of photos")
    files = sorted(p for p in raw.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
    if not files:
        raise ValueError(f"{raw} holds no image ({', '.join(sorted(IMAGE_EXTS))}); nothing to align")
    blaze, fan = _detector(detector, device, weights, fan_random, pick)
    aligned, no_face, residuals = 0, [], []
    for path in files:
        im = np.asarray(Image.open(path).convert("RGB"))
        det = blaze([im])[0]
        if det is None:
            no_face.append(str(path))
            continue
        box, pts, _ = det
        if fan is not None:
            pts = five_points_from_68(fan([im], [box])[0][0])
        m = similarity_to_template(pts)
        used = pts[: len(pts) if len(pts) == 5 else 4]
        residuals.append(float(np.abs((m[:2, :2] @ used.T).T + m[:2, 2] - template_points(len(used))).max()))
        buf = io.BytesIO()
        Image.fromarray(warp_affine(im, m)).save(buf, format="PNG")
        atomic_write_bytes(buf.getvalue(), out / path.relative_to(raw).with_suffix(".png"))
        aligned += 1
    return {"images": len(files), "aligned": aligned, "no_face": no_face, "max_residual_px": residuals}


def rec_landmarks(
    rec,
    out=None,
    *,
    detector: str = "blazeface",
    weights=None,
    batch_size: int = 64,
    device: str = "cpu",
    fan_random: bool = False,
    progress: bool = True,
) -> dict:
    """Landmarks of every image record of ``rec`` (decoded and resized to 112 like the loaders),
    batched, into the sidecar described in the module docstring; returns counts and the path."""
    import sys

    from tqdm import tqdm

    from lafs_fast.data.sources import RecSource, decode_pil

    src = RecSource(rec)
    bgr = src.color_order() == "BGR"
    blaze, fan = _detector(detector, device, weights, fan_random)
    n_pts = 68 if fan is not None else 6
    points = np.full((len(src), n_pts, 2), np.nan, dtype=np.float32)
    scores = np.zeros(len(src), dtype=np.float32)
    for start in tqdm(
        range(0, len(src), batch_size), desc="landmarks", unit="batch", disable=not progress, file=sys.stderr
    ):
        idx = list(range(start, min(start + batch_size, len(src))))
        ims = []
        for i in idx:
            try:
                ims.append(decode_pil(src.get(i), 112, bgr))
            except (OSError, ValueError, SyntaxError):
                ims.append(None)  # corrupt: stays NaN / score 0
        ok = [j for j, im in enumerate(ims) if im is not None]
        dets = blaze([ims[j] for j in ok])
        found = [(j, d) for j, d in zip(ok, dets) if d is not None]
        if fan is not None and found:
            res = fan([ims[j] for j, _ in found], [d[0] for _, d in found])
            for (j, _), (p, s) in zip(found, res):
                points[idx[j]], scores[idx[j]] = p, s
        else:
            for j, (_, p, s) in found:
                points[idx[j]], scores[idx[j]] = p, s
    path = Path(out) if out else sidecar_path(src.path)
    names = [f"ibug68_{i}" for i in range(68)] if fan is not None else list(BLAZE_NAMES)
    write_sidecar(path, src.keys, points, scores, detector=detector, names=names)
    return {
        "path": str(path),
        "images": len(src),
        "found": int((scores > 0).sum()),
        "points": n_pts,
        "detector": detector,
    }


def write_sidecar(
    path: str | os.PathLike,
    keys: np.ndarray,
    points: np.ndarray,
    scores: np.ndarray,
    *,
    detector: str,
    names: list[str],
) -> Path:
    """Write a landmark sidecar (module docstring) atomically, streamed to a temporary file (no
    in-memory copy of the points: 2.3 GB for 4.2 M faces with FAN), members uncompressed so that
    :func:`load_sidecar_arrays` can memory-map them. keys (N,) int64; points (N, P, 2) fp32; scores (N,) fp32."""
    from lafs_fast.io import atomic_write

    path = Path(path)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(
                f,
                keys=np.asarray(keys, dtype=np.int64),
                points=np.asarray(points, dtype=np.float32),
                scores=np.asarray(scores, dtype=np.float32),
                detector=np.array(detector),
                names=np.array(names),
            )

    atomic_write(path, write)
    return path


def _npy_header(f) -> tuple[tuple[int, ...], bool, np.dtype]:  # (binary file at a .npy) -> (shape, fortran, dtype)
    """The shape, order and dtype of the ``.npy`` that starts at ``f``'s position (format 1.0 or 2.0,
    what ``np.savez`` writes); ValueError for anything else."""
    read_header = {
        (1, 0): np.lib.format.read_array_header_1_0,
        (2, 0): np.lib.format.read_array_header_2_0,
    }.get(np.lib.format.read_magic(f))
    if read_header is None:
        raise ValueError("a member is not a .npy of format 1.0 or 2.0")
    try:
        return read_header(f)
    except (SyntaxError, tokenize.TokenError) as exc:  # numpy parses the header as a Python literal
        raise ValueError(f"a member's .npy header is damaged ({type(exc).__name__})") from None


def load_sidecar_arrays(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` (a landmark sidecar), each uncompressed member memory-mapped
    read-only instead of read (``np.load``'s ``mmap_mode`` does not apply to .npz): loading 4.2 M
    faces holds no copy; pages are read as rows are used. Compressed members and object arrays
    are read as ``np.load`` does (``allow_pickle=False``), each only after its header's size is
    checked against the size the archive declares for it (a crafted header cannot allocate more)."""
    import math
    import zipfile

    check_unpacked_size(path, "landmark sidecar", stored_too=False)  # what is read into memory
    out: dict[str, np.ndarray] = {}
    with zipfile.ZipFile(path) as zf, open(path, "rb") as f:
        for info in zf.infolist():
            name = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
            if info.compress_type == zipfile.ZIP_STORED:
                f.seek(info.header_offset)
                local = f.read(30)  # the local file header: its name and extra field lengths at 26..30
                name_len, extra_len = int.from_bytes(local[26:28], "little"), int.from_bytes(local[28:30], "little")
                f.seek(info.header_offset + 30 + name_len + extra_len)
                shape, fortran, dtype = _npy_header(f)
                if not dtype.hasobject and math.prod(shape) > 0:
                    out[name] = np.memmap(
                        path, dtype=dtype, mode="r", offset=f.tell(), shape=shape, order="F" if fortran else "C"
                    )
                    continue
            with zf.open(info) as member:
                shape, _, dtype = _npy_header(member)
            if math.prod(shape) * dtype.itemsize > info.file_size:
                raise ValueError(f"member {info.filename} declares {shape} {dtype} but holds {info.file_size} bytes")
            with zf.open(info) as member:
                out[name] = np.lib.format.read_array(member, allow_pickle=False)
    return out
