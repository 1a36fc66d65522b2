"""The k-NN check of training runs: leave-one-out 1-NN identification and balanced-pair verification
of an embedding model on labelled faces (held-out synthetic identities by default, or a labelled
.rec), printed before and after a run. The check of DINOv2's ``eval/knn.py``, sized for a log line.

Faces -> tokens through the caller's ``views`` (anything with ``eval_tokens(images (B, H, W, 3) uint8,
[positions], flip) -> model input``): the pre-training views for an fViT, :class:`ImageInputs` for a
Part fViT, which samples its own patches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lafs_fast.eval.metrics import best_accuracy

__all__ = [
    "EVAL_SEED",
    "KNN_MAX_IMAGES",
    "KnnFaces",
    "ImageInputs",
    "knn_faces",
    "embed",
    "knn_check",
    "knn_metrics",
    "pixel_floor",
    "report_lines",
    "format_check",
]

EVAL_SEED = 7_000_001  # held-out synthetic identities: a different seed draws different faces
KNN_MAX_IMAGES = 2000


class ImageInputs:
    """The ``views`` of :func:`knn_check` for a model that takes whole images (a Part fViT):
    uint8 faces (B, H, W, 3) -> (B, 3, H, W) in [-1, 1]."""

    @staticmethod
    def eval_tokens(x: torch.Tensor, flip: bool = False) -> torch.Tensor:
        from lafs_fast.kernels.patch_sampling import normalise_images

        return normalise_images(x.flip(2) if flip else x)


@dataclass
class KnnFaces:
    """Labelled faces for the check: images (N, H, W, 3) uint8 and labels (N,) int64 on the device;
    positions (N,) int64 record positions when the views may look up the records' own landmarks
    (``--landmarks detector`` on the training rec), else None; what they are, for the log."""

    images: torch.Tensor
    labels: torch.Tensor
    positions: torch.Tensor | None
    what: str
    title: str = "k-NN check"  # "held-out check" when no face was trained on


def knn_faces(
    data: str | None,
    device: torch.device,
    *,
    train_data: str | None = None,
    detector: bool = False,
    max_images: int = KNN_MAX_IMAGES,
    identities: int = 40,
    per_identity: int = 5,
) -> KnnFaces:
    """The check's faces: ``data`` a .rec (up to ``max_images`` records, evenly spaced, decoded like
    the loaders), or None: ``identities x per_identity`` synthetic faces never seen in training."""
    if data is None:
        from lafs_fast.data import SyntheticFaces

        ds = SyntheticFaces(identities, per_identity, seed=EVAL_SEED)
        images, labels = ds.batch(range(len(ds)), device)
        return KnnFaces(images, labels, None, "held-out synthetic identities", "held-out check")
    from lafs_fast.data.sources import RecSource, decode_pil

    src = RecSource(data)
    picks = np.unique(np.linspace(0, len(src) - 1, min(max_images, len(src))).round().astype(np.int64))
    bgr = src.color_order() == "BGR"
    ims, labels, kept, bad = [], [], [], []
    for i in picks:  # a corrupt record is skipped and named (`lafs-fast data verify` lists them all)
        try:
            data_bytes, label = src.item(int(i))
            ims.append(decode_pil(data_bytes, 112, bgr))
        except Exception:  # noqa: BLE001 - any record that does not decode: RecordIOError, PIL's errors, ...
            bad.append(int(i))
            continue
        labels.append(label)
        kept.append(int(i))
    if not ims:
        raise ValueError(
            f"--knn-data {src.path}: none of the {len(picks)} records read decodes; check it with `lafs-fast data "
            f"verify {src.path}`"
        )
    picks = np.asarray(kept, dtype=np.int64)
    # the records' own landmarks only where the views' table is this rec's (detector mode trains on a rec)
    same = detector and train_data is not None and RecSource(train_data).path.resolve() == src.path.resolve()
    positions = torch.as_tensor(picks) if same else None
    what = f"{len(picks)} faces of {src.path.name}, {len(set(labels))} identities"
    if bad:
        shown = ", ".join(map(str, bad[:5])) + (", ..." if len(bad) > 5 else "")
        what += f"; {len(bad)} corrupt record(s) skipped (positions {shown})"
    if detector and not same:
        what += "; the mean face's landmarks (not the training rec)"
    return KnnFaces(
        torch.from_numpy(np.stack(ims)).to(device),
        torch.tensor(labels, dtype=torch.int64, device=device),
        positions,
        what,
    )


@torch.no_grad()
def embed(
    backbone: torch.nn.Module,
    views: Any,
    images: torch.Tensor,
    batch: int = 64,
    positions: torch.Tensor | None = None,
    precision: str | None = None,
) -> torch.Tensor:
    """L2-normalised embeddings (N, dim) fp32 of faces (N, H, W, 3) uint8 (+ their flips, summed);
    ``positions`` (N,): record positions for ``views.eval_tokens`` (detector landmarks).

    ``precision``: "bf16" runs the backbone under bf16 autocast, as in training (what the views'
    bf16 tokens need: the backbone's weights stay fp32); "fp32" without; None: bf16 when the views
    make bf16 tokens (``views.out_dtype``), else fp32. The embeddings are fp32 either way."""
    if precision is None:
        precision = "bf16" if getattr(views, "out_dtype", torch.float32) == torch.bfloat16 else "fp32"
    was = backbone.training
    backbone.eval()
    out = []
    try:
        for i in range(0, images.shape[0], batch):
            x = images[i : i + batch]
            kw = {} if positions is None else {"positions": positions[i : i + batch]}
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                e = (
                    backbone(views.eval_tokens(x, **kw)).float()
                    + backbone(views.eval_tokens(x, flip=True, **kw)).float()
                )
            out.append(F.normalize(e, dim=-1))
    finally:
        backbone.train(was)
    return torch.cat(out)


def knn_check(
    backbone: torch.nn.Module,
    views: Any,
    device: torch.device,
    faces: KnnFaces | None = None,
    precision: str | None = None,
) -> dict[str, float]:
    """Leave-one-out 1-NN identification accuracy (cosine) and verification accuracy on balanced pairs
    (every genuine pair, as many impostor pairs drawn at random, best threshold), both in %, on
    ``faces`` (default: held-out synthetic identities, :func:`knn_faces`); ``precision`` as in :func:`embed`."""
    faces = faces or knn_faces(None, device)
    emb = embed(backbone, views, faces.images, positions=faces.positions, precision=precision)
    return knn_metrics(emb, faces.labels)


def pixel_floor(faces: KnnFaces) -> dict[str, float]:
    """The check's trivial floor: the same two figures on the raw pixels (N, H*W*3), centred by the
    faces' mean image (cosine of the differences). On aligned faces pixels are a strong baseline,
    one a learnt embedding must beat to be worth anything."""
    x = faces.images.flatten(1).float()  # 2,000 faces: 300 MB, so in place from here on
    x.sub_(x.mean(dim=0))
    x.div_(x.norm(dim=1, keepdim=True).clamp_min(1e-12))
    return knn_metrics(x, faces.labels)


def knn_metrics(emb: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Leave-one-out 1-NN top-1 and balanced-pair verification accuracy (%) of unit embeddings (N, D)
    fp32 with labels (N,) int64 (see :func:`knn_check`)."""
    n = len(labels)
    sim = emb @ emb.T
    sim.fill_diagonal_(-math.inf)
    nn_idx = sim.argmax(dim=1)
    top1 = (labels[nn_idx] == labels).float().mean().item() * 100
    sim.fill_diagonal_(1.0)
    same = labels[:, None] == labels[None, :]
    iu = torch.triu_indices(n, n, offset=1, device=emb.device)
    s, y = sim[iu[0], iu[1]].cpu().numpy(), same[iu[0], iu[1]].cpu().numpy()
    rng = np.random.default_rng(EVAL_SEED)
    n_pos = int(y.sum())
    neg = rng.choice(np.flatnonzero(~y), size=min(n_pos, int((~y).sum())), replace=False)
    s, y = np.concatenate((s[y], s[neg])), np.concatenate((np.ones(n_pos, bool), np.zeros(len(neg), bool)))
    acc = best_accuracy(2.0 - 2.0 * s, y)  # unit vectors: squared distance = 2 - 2 cos
    return {"knn_top1": round(top1, 2), "verification": round(acc * 100, 2)}


def report_lines(
    before: dict[str, float] | None, after: dict[str, float], faces: KnnFaces, floor: dict[str, float] | None = None
) -> list[str]:
    """The end-of-run lines: before (when measured), after, and the raw-pixel floor on the same faces."""
    lines = [f"{faces.title} before: {format_check(before, faces)}"] if before is not None else []
    lines.append(f"{faces.title} after:  {format_check(after, faces)}")
    floor = floor if floor is not None else pixel_floor(faces)
    lines.append(
        f"{faces.title} floor:  1-NN top-1 {floor['knn_top1']:.1f}%, verification {floor['verification']:.1f}% "
        "(raw pixels of the same faces)"
    )
    return lines


def format_check(r: dict[str, float], faces: KnnFaces | None = None) -> str:
    what = faces.what if faces is not None else "held-out synthetic identities"
    return f"1-NN top-1 {r['knn_top1']:.1f}%, verification {r['verification']:.1f}% ({what})"
