"""IJB-B / IJB-C 1:1 verification (template pairs) from the standard release layout.

Layout (InsightFace's ``IJB_release/IJBC``; IJB-B the same with ``ijbb``)::

    ROOT/loose_crop/<name>.jpg                       the released loose crops
    ROOT/meta/ijbc_name_5pts_score.txt               "<name> x1 y1 ... x5 y5 <detector score>"
    ROOT/meta/ijbc_face_tid_mid.txt                  "<name> <template id> <media id>"
    ROOT/meta/ijbc_template_pair_label.txt           "<template 1> <template 2> <0|1>"

Protocol (docs/method.md section 5, as InsightFace's ``ijb_11.py`` with its defaults):
1. 5-point similarity alignment (Umeyama) onto the ArcFace 112x112 template, bilinear, zero border;
2. flip test: raw embedding of the face plus that of its mirror, NOT normalised;
3. times the detector score; averaged per media within a template, the media means summed per
   template, the template L2-normalised;
4. cosine score for each template pair; TAR at FAR 1e-6 .. 1e-1 (headline 1e-4).
Inputs are normalised with the training normalisation (see ``embedder``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lafs_fast.data.align import align_face  # the one template and alignment (ARCFACE_112, data/align.py)
from lafs_fast.eval.embedder import Embedder
from lafs_fast.eval.metrics import DEFAULT_FARS, l2_normalise
from lafs_fast.eval.verification import SetResult, evaluate_scores

__all__ = [
    "IJBMeta",
    "find_target",
    "read_ijb",
    "template_features",
    "template_pair_scores",
    "evaluate_ijb",
    "is_ijb_root",
]


@dataclass
class IJBMeta:
    """Parsed meta files. Per image (N): ``names``, ``landmarks`` (N, 5, 2) px, ``scores`` (N,),
    ``templates`` (N,) int64, ``medias`` (N,) int64; per pair (P): ``pairs`` (P, 2) int64, ``labels`` (P,) bool."""

    root: Path
    target: str
    names: list[str]
    landmarks: np.ndarray
    scores: np.ndarray
    templates: np.ndarray
    medias: np.ndarray
    pairs: np.ndarray
    labels: np.ndarray


def is_ijb_root(path: str | Path) -> bool:
    """True when ``path`` is a folder with ``meta/*_face_tid_mid.txt`` (an IJB release root)."""
    return Path(path).is_dir() and any((Path(path) / "meta").glob("*_face_tid_mid.txt"))


def find_target(root: str | Path) -> str:
    """'ijbb' or 'ijbc' (the meta file prefix) found in ``root/meta``."""
    found = sorted(p.name[: -len("_face_tid_mid.txt")] for p in (Path(root) / "meta").glob("*_face_tid_mid.txt"))
    if len(found) != 1:
        raise ValueError(
            f"{root}/meta must hold exactly one *_face_tid_mid.txt (found {found or 'none'}); "
            "point at one IJB release folder such as IJB_release/IJBC"
        )
    return found[0]


def _numbers(path: Path, cols: int, skip_first: bool) -> tuple[list[str], np.ndarray]:
    """Whitespace table -> (first-column strings if ``skip_first``, float64 (rows, cols))."""
    if not path.is_file():
        raise FileNotFoundError(
            f"IJB meta file {path} does not exist; expected the standard release layout (see `lafs-fast eval --help`)"
        )
    lines = path.read_text().split("\n")
    lines = [ln for ln in lines if ln.strip()]
    names: list[str] = []
    if skip_first:
        parts = [ln.split(None, 1) for ln in lines]
        names = [p[0] for p in parts]
        body = "\n".join(p[1] if len(p) > 1 else "" for p in parts)
    else:
        body = "\n".join(lines)
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # numpy warns, then stops, at the first non-number
            vals = np.fromstring(body, dtype=np.float64, sep=" ")  # text mode: no list of 10^7 str objects
    except (ValueError, DeprecationWarning):
        vals = np.zeros(0)
    if vals.size != len(lines) * cols:
        raise ValueError(
            f"{path}: expected {cols} numbers per line{' after the name' if skip_first else ''}; the file is damaged"
        )
    return names, vals.reshape(len(lines), cols)


def read_ijb(root: str | Path, target: str | None = None) -> IJBMeta:
    """Read the three meta files of an IJB-B/C release root (module doc)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"IJB folder {root} does not exist")
    t = (target or find_target(root)).lower()
    meta = root / "meta"
    names, lm = _numbers(meta / f"{t}_name_5pts_score.txt", 11, True)
    tid_names, tm = _numbers(meta / f"{t}_face_tid_mid.txt", 2, True)
    _, pairs = _numbers(meta / f"{t}_template_pair_label.txt", 3, False)
    if tid_names != names:
        # InsightFace relies on the two files sharing one order; join by name when they do not.
        where = {n: i for i, n in enumerate(tid_names)}
        missing = [n for n in names if n not in where]
        if missing:
            raise ValueError(
                f"{meta}/{t}_face_tid_mid.txt lacks {len(missing)} image(s) of the 5-point file, e.g. {missing[0]}"
            )
        tm = tm[[where[n] for n in names]]
    return IJBMeta(
        root,
        t,
        names,
        lm[:, :10].reshape(-1, 5, 2),
        lm[:, 10],
        tm[:, 0].astype(np.int64),
        tm[:, 1].astype(np.int64),
        pairs[:, :2].astype(np.int64),
        pairs[:, 2] > 0.5,
    )


def template_features(feats: np.ndarray, templates: np.ndarray, medias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-image features (N, D) -> (template ids (T,) sorted, L2-normalised template features (T, D)).

    A template's feature is the SUM over its medias of the MEAN of that media's image features.
    """
    feats = np.asarray(feats, dtype=np.float64)
    pair_keys, media_of = np.unique(np.stack([templates, medias], 1), axis=0, return_inverse=True)
    media_of = media_of.reshape(-1)
    sums = np.zeros((pair_keys.shape[0], feats.shape[1]))
    np.add.at(sums, media_of, feats)
    counts = np.bincount(media_of, minlength=pair_keys.shape[0])[:, None]
    media_means = sums / counts
    tids, tmpl_of = np.unique(pair_keys[:, 0], return_inverse=True)
    tfeats = np.zeros((tids.shape[0], feats.shape[1]))
    np.add.at(tfeats, tmpl_of.reshape(-1), media_means)
    return tids, l2_normalise(tfeats)


def template_pair_scores(tids: np.ndarray, tfeats: np.ndarray, pairs: np.ndarray, chunk: int = 100_000) -> np.ndarray:
    """Cosine scores (P,) of template pairs (P, 2) given sorted ids (T,) and normalised features (T, D)."""
    idx = np.searchsorted(tids, pairs)
    bad = (idx >= tids.shape[0]) | (tids[np.minimum(idx, tids.shape[0] - 1)] != pairs)
    if bad.any():
        t = int(pairs[bad][0])
        raise ValueError(
            f"template {t} of the pair list has no image in the face/template file; the meta files do not match"
        )
    out = np.empty(pairs.shape[0])
    for s in range(0, pairs.shape[0], chunk):
        i = idx[s : s + chunk]
        out[s : s + chunk] = np.sum(tfeats[i[:, 0]] * tfeats[i[:, 1]], axis=1)
    return out


def evaluate_ijb(
    embedder: Embedder,
    root: str | Path,
    target: str | None = None,
    fars: Sequence[float] = DEFAULT_FARS,
    far_rule: str = "at_most",
    progress: bool = True,
    workers: int = 4,
    use_detector_score: bool = True,
) -> SetResult:
    """The full IJB-B/C 1:1 protocol (module doc) -> SetResult (kind "ijb", no k-fold accuracy)."""
    from PIL import Image

    meta = read_ijb(root, target)
    crops = meta.root / "loose_crop"
    if not crops.is_dir():
        raise FileNotFoundError(f"{crops} does not exist; the IJB release keeps its images in loose_crop/")
    items = list(zip(meta.names, meta.landmarks))

    def load(item) -> np.ndarray:
        name, lm = item
        path = crops / name
        if not path.is_file():
            raise FileNotFoundError(f"IJB image {path} listed in the 5-point file does not exist")
        try:
            with Image.open(path) as im:
                return align_face(im, lm, embedder.image_size)
        except OSError as exc:  # PIL's UnidentifiedImageError included
            raise ValueError(f"IJB image {path} cannot be decoded ({exc}); replace it from the release") from None

    feats = embedder.embed_items(items, load, progress=meta.target if progress else None, workers=workers)
    if use_detector_score:
        feats = feats * meta.scores[:, None]
    tids, tfeats = template_features(feats, meta.templates, meta.medias)
    scores = template_pair_scores(tids, tfeats, meta.pairs)
    res = evaluate_scores(meta.target.upper(), scores, meta.labels, nfolds=0, fars=fars, kind="ijb", far_rule=far_rule)
    res.notes.append(
        f"{len(meta.names)} images, {tids.shape[0]} templates; TAR rule {far_rule}"
        + ("" if use_detector_score else "; detector scores ignored")
    )
    return res
