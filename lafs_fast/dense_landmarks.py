"""``--landmarks detector``: detected facial landmarks, densified to the token count, per record.

LAFS with no labelled stage 0: the landmarks of every image come from a face detector, computed
once by ``lafs-fast data landmarks REC`` into the sidecar ``<rec>.landmarks.npz`` (see
``lafs_fast.data.align``: ``keys`` (N,), ``points`` (N, P, 2) px in the 112 x 112 loader image, x =
column, y = row, continuous coordinates (pixel i covers [i, i + 1)); NaN where no face was found;
P = 68 for FAN, 6 for BlazeFace).

The densification (a fixed scheme, the same for every image and every run on one sidecar):

1. template ``T`` (P, 2): the mean of the sidecar's points over the images with a face (the data
   set's mean face; aligned crops put it at the canonical place);
2. targets ``G`` (K, 2): the K = (S / p)^2 centres of the regular patch grid of the S x S image
   (row-major, the points of ``--landmarks grid``);
3. for an image with points ``D``, a thin-plate spline ``f`` with smoothing ``lambda`` is fitted to
   map ``T`` onto ``D`` (coordinates divided by S first, so ``lambda`` does not depend on the image
   size), and its K landmarks are ``f(G)``.

As ``T`` and ``G`` are fixed, ``f(G)`` is linear in ``D``: ``dense = W @ D`` with ``W`` (K, P)
computed once, so a batch densifies with one matmul on its device. Properties (tested): every row
of ``W`` sums to 1 and the spline reproduces affine maps exactly, so an image whose points ARE the
template gets the grid itself and a face shifted, rotated or scaled from the mean gets the grid
moved by the same map; ``lambda -> inf`` is the least-squares affine fit, ``lambda = 0``
interpolates (``f(T_i) = D_i``). Default ``lambda = 0.3`` (``views.detector_smoothing``): on the
BlazeFace sidecar of ORL (6 points, ears included) ``lambda <= 0.01`` folds the grid on some faces
(neighbouring landmarks swap), 0.3 keeps every grid step positive while fitting the detected points
much closer than the affine fit (``DetectorLandmarks.quality`` measures both; ``lafs-fast pretrain``
prints them, ``tests/test_detector_landmarks.py`` checks them on ORL). Token k is grid cell k of the
mean face, carried along with the face; sparse views draw among the K like with any landmark source.
Images with no face use the template (so their tokens are the plain grid), and the count is reported.

In the views (``lafs_fast.views``) the K source-image points are mapped into every view through the
view's crop / flip affine (``kernels.augment.map_to_views``), so landmarks follow the face through
the crop; a point the crop leaves out reads zeros, like any out-of-image landmark.
"""

from __future__ import annotations

import os
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lafs_fast.data.align import load_sidecar_arrays, sidecar_path
from lafs_fast.kernels.augment import map_to_views

__all__ = ["LandmarkSidecar", "DetectorLandmarks", "sidecar_path", "thin_plate_weights", "views_from_source"]

# Sampler convention (kernels.patch_sampling): landmark x reads continuous coordinates x - 4 .. x + 3,
# so its patch is centred on continuous x - 0.5, i.e. on pixel-centre coordinate x - 1.
_SAMPLER_TO_CONTINUOUS = -0.5
_SAMPLER_TO_PIXEL_CENTRE = -1.0


@dataclass
class LandmarkSidecar:
    """The landmarks of one rec: ``keys`` (N,) int64, ``points`` (N, P, 2) fp32 continuous px (NaN:
    no face), ``detector`` (what made them)."""

    path: Path
    keys: np.ndarray
    points: np.ndarray
    detector: str

    @classmethod
    def load(cls, path: str | os.PathLike) -> LandmarkSidecar:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"landmark sidecar {path} does not exist; make it with `lafs-fast data landmarks REC` "
                f"(or name another with views.detector_file=PATH)"
            )
        try:  # memory-mapped: 4.2 M faces are not read (nor copied) until their rows are used
            z = load_sidecar_arrays(path)
            keys, points = np.asarray(z["keys"], dtype=np.int64), np.asarray(z["points"], dtype=np.float32)
            detector = str(z["detector"]) if "detector" in z else "unknown"
        # zlib: a bad deflate stream; NotImplementedError: a zip method or version zipfile lacks;
        # RuntimeError: an encrypted member
        except (OSError, ValueError, KeyError, EOFError, RuntimeError, zipfile.BadZipFile, zlib.error) as exc:
            raise ValueError(
                f"{path} is not a landmark sidecar ({type(exc).__name__}: {' '.join(str(exc).split())}); remake it "
                "with `lafs-fast data landmarks REC`"
            ) from None
        if points.ndim != 3 or points.shape[2] != 2 or points.shape[0] != keys.shape[0]:
            raise ValueError(f"{path}: points must be (N, P, 2) with N = {keys.shape[0]} keys, got {points.shape}")
        if points.shape[1] < 3:
            raise ValueError(f"{path} holds {points.shape[1]} points per face; densification needs at least 3")
        return cls(path, keys, points, detector)

    @property
    def found(self) -> np.ndarray:
        """(N,) bool: the images with a face (every coordinate finite)."""
        return np.isfinite(self.points).all(axis=(1, 2))

    def template(self) -> np.ndarray:
        """(P, 2) float64: the mean face over the images with a face."""
        total, count = np.zeros(self.points.shape[1:], np.float64), 0
        for a in range(0, len(self.points), 1 << 18):  # in slices: no (N, P, 2) float64 copy of millions of faces
            pts = np.asarray(self.points[a : a + (1 << 18)])
            found = np.isfinite(pts).all(axis=(1, 2))
            total += pts[found].sum(axis=0, dtype=np.float64)
            count += int(found.sum())
        if not count:
            raise ValueError(f"{self.path}: the detector found no face in any image; nothing to densify")
        return total / count

    def for_keys(self, keys: np.ndarray) -> np.ndarray:
        """(M, P, 2) fp32: the points of records ``keys`` (M,), in that order."""
        order = np.argsort(self.keys, kind="stable")
        sorted_keys = self.keys[order]
        at = np.clip(np.searchsorted(sorted_keys, keys), 0, len(sorted_keys) - 1)
        missing = sorted_keys[at] != keys
        if missing.any():
            raise ValueError(
                f"{self.path} has no landmarks for {int(missing.sum())} of the {len(keys)} records (first: key "
                f"{int(keys[missing][0])}); it belongs to another rec or is out of date: rerun `lafs-fast data "
                "landmarks REC`"
            )
        return self.points[order[at]]


def thin_plate_weights(template: torch.Tensor, targets: torch.Tensor, smoothing: float, scale: float) -> torch.Tensor:
    """The linear map ``W`` (K, P) float64 with ``f(targets) = W @ D`` for the thin-plate spline
    ``f`` that maps ``template`` onto points ``D`` with smoothing ``smoothing``.

    template: (P, 2) px, P >= 3 and not all on one line; targets: (K, 2) px; scale: px per unit
    (coordinates are divided by it). Kernel U(r) = r^2 log r^2; system
    [[U(T) + lambda I, [1 T]], [[1 T]^T, 0]] [w; a] = [D; 0].
    """
    t = template.double() / scale
    g = targets.double() / scale
    p = t.shape[0]

    def kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        r2 = torch.cdist(a, b).square()
        return torch.where(r2 > 0, r2 * torch.log(r2.clamp_min(1e-300)), torch.zeros_like(r2))

    ones = torch.ones(p, 1, dtype=torch.float64)
    affine = torch.cat((ones, t), dim=1)  # (P, 3)
    system = torch.zeros(p + 3, p + 3, dtype=torch.float64)
    system[:p, :p] = kernel(t, t) + smoothing * torch.eye(p, dtype=torch.float64)
    system[:p, p:] = affine
    system[p:, :p] = affine.T
    if torch.linalg.matrix_rank(affine) < 3:
        raise ValueError("the template landmarks lie on one line; a thin-plate spline needs 3 points not on a line")
    solve = torch.linalg.solve(system, torch.eye(p + 3, dtype=torch.float64)[:, :p])  # (P+3, P): [w; a] per unit D
    basis = torch.cat((kernel(g, t), torch.ones(g.shape[0], 1, dtype=torch.float64), g), dim=1)  # (K, P+3)
    return basis @ solve


def views_from_source(points: torch.Tensor, affine: torch.Tensor) -> torch.Tensor:
    """Source-image landmarks into every view, view-major.

    points: (B, K, 2) fp32 sampler px on the source; affine: (B, V, 2, 3) (``AugmentedViews.affine``,
    pixel-centre convention). Returns (V * B, K, 2) sampler px in each view (rows v * B .. v * B + B - 1
    are view v), each patch centred on the same point of the face as on the source.
    """
    v = map_to_views(points + _SAMPLER_TO_PIXEL_CENTRE, affine) - _SAMPLER_TO_PIXEL_CENTRE  # (B, V, K, 2)
    return v.transpose(0, 1).reshape(-1, points.shape[1], 2)


class DetectorLandmarks:
    """Per-record densified landmarks of one data source.

    ``__call__(positions (B,) int64 record positions, device) -> (B, K, 2) fp32`` sampler px on the
    source images. The records' points stay on the CPU, one copy per process (N x P x 2 fp32: 2.7 GB
    for 5 M faces with FAN); a batch's rows are gathered there and densified on ``device``.
    """

    def __init__(
        self,
        sidecar: LandmarkSidecar,
        record_keys: np.ndarray,
        image_size: int = 112,
        patch_size: int = 8,
        smoothing: float = 0.3,
    ) -> None:
        from lafs_fast.sampling import grid_landmarks

        if smoothing < 0:
            raise ValueError(f"views.detector_smoothing must be >= 0, not {smoothing}")
        self.smoothing, self.image_size = float(smoothing), float(image_size)
        self.grid_side = image_size // patch_size
        self.source_desc = f"{sidecar.detector} landmarks from {sidecar.path} ({sidecar.points.shape[1]} points"
        template = sidecar.template()
        points = sidecar.for_keys(np.asarray(record_keys, dtype=np.int64))  # a copy: the sidecar's arrays can go
        self.found = torch.from_numpy(np.isfinite(points).all(axis=(1, 2)))  # (N,) bool per record
        points[~self.found.numpy()] = template.astype(np.float32)
        self.no_face = int((~self.found).sum())
        self.points = torch.from_numpy(np.ascontiguousarray(points))  # (N, P, 2) continuous px
        self.template = torch.from_numpy(template).float()
        grid = grid_landmarks(image_size, patch_size).double() + _SAMPLER_TO_CONTINUOUS  # (K, 2) continuous px
        self.weights = thin_plate_weights(self.template, grid, smoothing, float(image_size)).float()  # (K, P)
        self._on: dict[torch.device, torch.Tensor] = {}

    @classmethod
    def for_source(cls, data: str | os.PathLike, file: str | os.PathLike | None = None, **kw) -> DetectorLandmarks:
        """The table of the rec ``data`` (a .rec or a folder holding train.rec), from ``file`` or the
        sidecar beside the rec."""
        from lafs_fast.data.sources import RecSource, open_source

        kind, src = open_source(str(data))
        if kind != "rec" or not isinstance(src, RecSource):
            what = "the built-in synthetic data" if kind == "synthetic" else f"{data} (a {kind})"
            raise ValueError(
                f"--landmarks detector reads the landmark sidecar of a .rec, and {what} has none; pack the images "
                f"with `lafs-fast data build`, run `lafs-fast data landmarks REC`, or use --landmarks grid"
            )
        return cls(LandmarkSidecar.load(file or sidecar_path(src.path)), src.keys, **kw)

    @property
    def num_points(self) -> int:
        """K, the landmarks per image after densification."""
        return self.weights.shape[0]

    def describe(self) -> str:
        return (
            f"{self.source_desc} densified to {self.num_points}; "
            f"{self.no_face} of {len(self.points)} images without a face use the mean face)"
        )

    def quality(self, max_faces: int = 10_000) -> dict[str, float]:
        """How the densification treats (up to ``max_faces``) detected faces: ``fit_px`` mean distance
        of the spline's image of the template to the detected points (``affine_fit_px``: the same for the
        least-squares affine map), ``min_step_px`` the smallest step between neighbouring grid
        landmarks along a row or a column (nominal: the patch size; below 0 the grid folds)."""
        found = torch.nonzero(self.found).flatten()[:max_faces]
        pts = self.points[found].double()  # (F, P, 2)
        t = self.template.double()
        fit = thin_plate_weights(t, t, self.smoothing, self.image_size) @ pts
        affine = thin_plate_weights(t, t, 1e12, self.image_size) @ pts
        g = (self.weights.double() @ pts).reshape(len(found), self.grid_side, self.grid_side, 2)
        steps = torch.cat(((g[:, :, 1:, 0] - g[:, :, :-1, 0]).flatten(), (g[:, 1:, :, 1] - g[:, :-1, :, 1]).flatten()))
        return {
            "faces": len(found),
            "fit_px": float((fit - pts).norm(dim=-1).mean()),
            "affine_fit_px": float((affine - pts).norm(dim=-1).mean()),
            "min_step_px": float(steps.min()),
        }

    def densify(self, points: torch.Tensor) -> torch.Tensor:
        """(B, P, 2) continuous px -> (B, K, 2) fp32 sampler px, on the points' device."""
        w = self._on.get(points.device)
        if w is None:
            w = self._on[points.device] = self.weights.to(points.device)
        return torch.matmul(w, points.float()) - _SAMPLER_TO_CONTINUOUS

    def __call__(self, positions: torch.Tensor, device: torch.device | str) -> torch.Tensor:
        """positions: (B,) int64 on the CPU (as the loader yields them: no device read)."""
        device = torch.device(device)
        idx = positions.cpu().long()
        # gathered straight into pinned memory on CUDA, so the copy is truly asynchronous (a copy
        # from pageable memory is staged by the host)
        rows = torch.empty(
            (idx.numel(), *self.points.shape[1:]), dtype=self.points.dtype, pin_memory=device.type == "cuda"
        )
        torch.index_select(self.points, 0, idx, out=rows)
        return self.densify(rows.to(device, non_blocking=True))
