"""``lafs-fast data overlap TRAIN EVAL``: what a training set and an evaluation set share.

Two checks, each reported on its own:

- **identities by name**, where both sets carry names: an image folder's sub-folder names, a rec's
  name list (``lafs_fast.json`` ``identities``, written by ``data build``). Names are compared after
  ``casefold()`` with spaces as underscores (``Barack Obama`` = ``barack_obama``). A ``.bin`` holds
  pairs only and a rec from elsewhere has no name list: the check is then skipped, and said so.
- **near-duplicate images** by a perceptual hash (:func:`perceptual_hashes`): every image is turned
  grey, resized to 64x64, and its 2-D DCT's lowest 16x16 frequencies (less the constant term, 255
  numbers) are compared with their median: 255 bits. Two images whose hashes differ in at most
  ``max_distance`` bits (default 24) count as one photo. On 1,500 aligned celeb24 faces a JPEG
  re-encode at quality 70 with a 112 -> 96 -> 112 resize and +10 % brightness moved a hash by at
  most 18 bits (99th percentile 10), while 99.99 % of the pairs of distinct photos lay 70 bits or
  more apart; the few distinct-file pairs under 24 were the same photo cropped or retouched
  (tests/test_data_overlap.py checks the threshold on a sample: every copy within it, no photo of
  another person).

The hash sees pixels, not people: two photos of one person are not duplicates (the name check is
the one for identities), and the threshold trades missed copies for false alarms (``--max-distance``).
Cost: one decode per image, and one (train x eval) matrix product of the 255-bit hashes in slices.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from lafs_fast.data.folder import load_rgb

__all__ = [
    "HASH_BITS",
    "MAX_DISTANCE",
    "ImageSet",
    "open_image_set",
    "perceptual_hashes",
    "near_duplicates",
    "find_overlap",
]

_HASH_SIDE, _LOW = 64, 16  # DCT of a 64x64 grey image; its lowest 16x16 frequencies
HASH_BITS = _LOW * _LOW - 1  # less the constant term
MAX_DISTANCE = 64  # past it every pair of aligned faces starts to match: a list of N x M "duplicates"
# DCT-II basis rows (k, x) = cos(pi (2x + 1) k / 2N), the lowest _LOW only: one matrix product each way
# (numpy has no DCT and scipy is no dependency of lafs-fast)
_DCT = np.cos(np.pi * (2 * np.arange(_HASH_SIDE)[None, :] + 1) * np.arange(_LOW)[:, None] / (2 * _HASH_SIDE)).astype(
    np.float32
)


@dataclass
class ImageSet:
    """The images of one side: ``read(i) -> (encoded bytes, identity name or None)`` for i in
    ``range(count)``; ``where(i)``: how the report names image i; ``has_names``: whether the set
    carries identity names at all; ``bgr``: the decoded pixels are BGR (InsightFace MS1M recs)."""

    path: Path
    kind: str
    count: int
    read: Callable[[int], tuple[bytes, str | None]]
    where: Callable[[int], str]
    has_names: bool
    bgr: bool = False


def _rec_set(path: Path) -> ImageSet:
    from lafs_fast.data.recordio import read_meta
    from lafs_fast.data.sources import RecSource

    src = RecSource(path)
    names = read_meta(src.path).get("identities")
    names = names if isinstance(names, list) and len(names) == src.num_classes else None

    def read(i: int) -> tuple[bytes, str | None]:
        data, label = src.item(i)
        return data, (names[label] if names is not None and 0 <= label < len(names) else None)

    return ImageSet(
        src.path,
        "rec",
        len(src),
        read,
        lambda i: f"key {int(src.keys[i])}",
        names is not None,
        src.color_order() == "BGR",
    )


def _bin_set(path: Path) -> ImageSet:
    from lafs_fast.data.binfile import load_bin

    images = load_bin(path).images
    return ImageSet(
        path, ".bin", len(images), lambda i: (images[i], None), lambda i: f"image {i} (pair {i // 2})", False
    )


def _folder_set(path: Path) -> ImageSet:
    """Every image under ``path``, recursively; an image inside a sub-folder belongs to the identity
    that sub-folder names, one directly in ``path`` to none."""
    from lafs_fast.data.folder import IMAGE_EXTS

    files = sorted(  # os.walk follows symlinked identity folders, which Path.rglob skips
        Path(d) / f for d, _, fs in os.walk(path, followlinks=True) for f in fs if Path(f).suffix.lower() in IMAGE_EXTS
    )
    if not files:
        raise ValueError(f"{path} holds no image ({', '.join(sorted(IMAGE_EXTS))})")
    rel = [f.relative_to(path) for f in files]
    names = [r.parts[0] if len(r.parts) > 1 else None for r in rel]
    return ImageSet(
        path,
        "folder",
        len(files),
        lambda i: (files[i].read_bytes(), names[i]),
        lambda i: str(rel[i]),
        any(n is not None for n in names),
    )


def open_image_set(path: str | os.PathLike) -> ImageSet:
    """A rec (a .rec or a folder holding train.rec), a verification ``.bin`` or an image folder."""
    p = Path(path)
    if p.suffix == ".bin" and p.is_file():
        return _bin_set(p)
    if p.suffix == ".rec" or (p.is_dir() and (p / "train.rec").is_file()):
        return _rec_set(p)
    if p.is_dir():
        return _folder_set(p)
    raise FileNotFoundError(f"{path} does not exist or is not a rec, a .bin or a folder of images; pass one of those")


def _grey64(data: bytes, bgr: bool) -> np.ndarray:
    """Encoded image -> (64, 64) float32 grey of its RGB pixels."""

    rgb = load_rgb(data)  # the pixel cap read from the header first, as every decoder of the data tools
    if bgr:
        rgb = Image.fromarray(np.asarray(rgb)[..., ::-1])
    return np.asarray(rgb.convert("L").resize((_HASH_SIDE, _HASH_SIDE), Image.BILINEAR), dtype=np.float32)


def perceptual_hashes(greys: np.ndarray) -> np.ndarray:
    """(N, 64, 64) float32 grey images -> (N, 255) bool hashes (module doc)."""
    low = (_DCT @ greys @ _DCT.T).reshape(len(greys), -1)[:, 1:]  # (N, 255), the constant term dropped
    return low > np.median(low, axis=1, keepdims=True)


def _hash_set(s: ImageSet, workers: int, progress: bool) -> tuple[np.ndarray, list[str | None], list[int], list[str]]:
    """(packed hashes (n, 32) uint8 of the readable images, their identity names, their indices in
    ``s``, the unreadable images' descriptions)."""
    import sys

    from tqdm import tqdm

    def load(i: int) -> tuple[np.ndarray | None, str | None]:
        try:
            data, name = s.read(i)
            return _grey64(data, s.bgr), name
        except (OSError, ValueError, SyntaxError):
            return None, None

    packed, names, index, bad = [], [], [], []
    step = 1024
    with (
        ThreadPoolExecutor(workers) as pool,
        tqdm(total=s.count, desc=f"hash {s.path.name}", unit="img", disable=not progress, file=sys.stderr) as bar,
    ):
        for start in range(0, s.count, step):
            ids = range(start, min(start + step, s.count))
            got = list(pool.map(load, ids))
            ok = [(i, g, n) for i, (g, n) in zip(ids, got) if g is not None]
            bad += [s.where(i) for i, (g, _) in zip(ids, got) if g is None]
            if ok:
                packed.append(np.packbits(perceptual_hashes(np.stack([g for _, g, _ in ok])), axis=1))
                index += [i for i, _, _ in ok]
                names += [n for _, _, n in ok]
            bar.update(len(ids))
    hashes = np.concatenate(packed) if packed else np.zeros((0, (HASH_BITS + 7) // 8), np.uint8)
    return hashes, names, index, bad


def near_duplicates(a: np.ndarray, b: np.ndarray, max_distance: int) -> list[tuple[int, int, int]]:
    """Every ``(i, j, hamming distance)`` with distance <= ``max_distance`` between packed hashes
    ``a`` (N, 32) uint8 and ``b`` (M, 32) uint8, as one +-1 matrix product per slice of ``a``
    (Hamming = (bits - dot) / 2), at most ~64 MB of products at a time."""
    sb = np.unpackbits(b, axis=1, count=HASH_BITS).astype(np.float32) * 2 - 1
    rows = max(1, (1 << 24) // max(1, len(b)))
    out: list[tuple[int, int, int]] = []
    for start in range(0, len(a), rows):
        sa = np.unpackbits(a[start : start + rows], axis=1, count=HASH_BITS).astype(np.float32) * 2 - 1
        dot = sa @ sb.T  # integers, exact in float32
        ii, jj = np.nonzero(dot >= HASH_BITS - 2 * max_distance - 0.5)
        out += [(start + int(i), int(j), int(round((HASH_BITS - dot[i, j]) / 2))) for i, j in zip(ii, jj)]
    return out


def _norm(name: str) -> str:
    return name.strip().casefold().replace(" ", "_")


def _shared_names(a: list[str | None], b: list[str | None]) -> list[dict]:
    """[{name, train_images, eval_images}] of the identity names both lists hold (normalised)."""
    count_a: dict[str, int] = {}
    count_b: dict[str, int] = {}
    spelled: dict[str, str] = {}
    for names, counts in ((a, count_a), (b, count_b)):
        for n in names:
            if n is not None:
                counts[_norm(n)] = counts.get(_norm(n), 0) + 1
                spelled.setdefault(_norm(n), n)
    return [
        {"name": spelled[k], "train_images": count_a[k], "eval_images": count_b[k]}
        for k in sorted(set(count_a) & set(count_b))
    ]


def find_overlap(
    train: str | os.PathLike,
    evaluation: str | os.PathLike,
    *,
    max_distance: int = 24,
    workers: int | None = None,
    progress: bool = True,
) -> dict:
    """The report of ``data overlap``: both sets' descriptions, ``shared_identities`` (None when a
    side has no names), ``near_duplicates`` [{train, eval, distance}] sorted by distance, the
    counts of eval images with a near-duplicate in train, and the unreadable images of each side."""
    if not 0 <= max_distance <= MAX_DISTANCE:
        raise ValueError(
            f"--max-distance must be in [0, {MAX_DISTANCE}] (of {HASH_BITS} bits; distinct photos lie ~70 or more "
            f"apart), got {max_distance}"
        )
    workers = workers or min(16, os.cpu_count() or 1)
    sets = [open_image_set(train), open_image_set(evaluation)]
    (ha, na, ia, bad_a), (hb, nb, ib, bad_b) = (_hash_set(s, workers, progress) for s in sets)
    pairs = sorted(near_duplicates(ha, hb, max_distance), key=lambda p: (p[2], p[1], p[0]))
    both_named = sets[0].has_names and sets[1].has_names
    return {
        "train": {"path": str(sets[0].path), "kind": sets[0].kind, "images": sets[0].count, "names": sets[0].has_names},
        "eval": {"path": str(sets[1].path), "kind": sets[1].kind, "images": sets[1].count, "names": sets[1].has_names},
        "shared_identities": _shared_names(na, nb) if both_named else None,
        "max_distance": max_distance,
        "hash_bits": HASH_BITS,
        "near_duplicates": [
            {
                "train": sets[0].where(ia[i]) + (f" ({na[i]})" if na[i] else ""),
                "eval": sets[1].where(ib[j]) + (f" ({nb[j]})" if nb[j] else ""),
                "distance": d,
            }
            for i, j, d in pairs
        ],
        "eval_images_with_duplicate": len({j for _, j, _ in pairs}),
        "train_images_with_duplicate": len({i for i, _, _ in pairs}),
        "unreadable": {"train": bad_a, "eval": bad_b},
    }
