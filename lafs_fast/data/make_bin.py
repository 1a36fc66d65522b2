"""``lafs-fast data make-bin FOLDER OUT.bin``: a verification ``.bin`` from a folder of faces.

Two ways to choose the pairs:
- ``--pairs pairs.txt`` (LFW style): an optional header line (``10 300``), then one pair per line,
  ``name n1 n2`` (same person) or ``name1 n1 name2 n2`` (different people), tab- or space-separated;
  image n of ``name`` is ``FOLDER/name/name_000n.*`` (LFW naming) or else the n-th file (1-based,
  sorted) of ``FOLDER/name/``. Pair order is kept.
- otherwise balanced random pairs from an identity folder (``FOLDER/<identity>/<image>``), drawn
  with ``--seed``: ``--num-pairs`` pairs, half genuine (two different images of one identity with
  at least two), half impostor (one image each of two identities), no pair twice, laid out like LFW
  as ``--folds`` blocks, each holding its share of genuine pairs, then of impostor pairs, so the
  10-fold protocol sees balanced folds.

Images are stored as JPEG of ``--size`` x ``--size`` RGB (default 112: the sets are aligned faces;
a JPEG already that size is stored byte for byte). Faces should be aligned first
(``lafs-fast data align``); other sizes are resized, not cropped.
"""

from __future__ import annotations

import argparse
import io
import random
import re
from pathlib import Path

from lafs_fast.data.binfile import write_bin

__all__ = ["read_pairs_txt", "random_pairs", "encode_face", "make_bin", "add_arguments", "run"]

_IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".pgm", ".ppm", ".pnm", ".tif", ".tiff", ".webp"}

Pair = tuple[Path, Path, bool]


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in _IMAGE_EXTS)


def _lookup(root: Path, name: str, n: int, line_no: int) -> Path:
    folder = root / name
    if not folder.is_dir():
        raise FileNotFoundError(f"pairs file line {line_no}: identity folder {folder} does not exist")
    for p in folder.glob(f"{name}_{n:04d}.*"):
        if p.suffix.lower() in _IMAGE_EXTS:
            return p
    files = _images(folder)
    if not 1 <= n <= len(files):
        raise ValueError(f"pairs file line {line_no}: {name} has {len(files)} image(s), no image number {n}")
    return files[n - 1]


def read_pairs_txt(pairs_txt: str | Path, root: str | Path) -> list[Pair]:
    """LFW-style pairs file -> [(path1, path2, issame)] in file order (module doc)."""
    pairs_txt, root = Path(pairs_txt), Path(root)
    if not pairs_txt.is_file():
        raise FileNotFoundError(f"pairs file {pairs_txt} does not exist")
    try:
        text = pairs_txt.read_text()
    except UnicodeDecodeError:
        raise ValueError(
            f"{pairs_txt} is not a text pairs file (LFW style: 'name n1 n2' / 'name1 n1 name2 n2' lines)"
        ) from None
    out: list[Pair] = []
    for i, line in enumerate(text.splitlines(), 1):
        f = line.split()
        if not f or (i == 1 and all(re.fullmatch(r"\d+", x) for x in f)):
            continue  # blank line or the "folds pairs" header
        nums = [f[1], f[2]] if len(f) == 3 else [f[1], f[3]] if len(f) == 4 else []
        if not nums or not all(re.fullmatch(r"\d+", x) for x in nums):
            raise ValueError(
                f"{pairs_txt} line {i}: expected 'name n1 n2' or 'name1 n1 name2 n2', got {line.strip()!r}"
            )
        if len(f) == 3:
            out.append((_lookup(root, f[0], int(f[1]), i), _lookup(root, f[0], int(f[2]), i), True))
        else:
            out.append((_lookup(root, f[0], int(f[1]), i), _lookup(root, f[2], int(f[3]), i), False))
    if not out:
        raise ValueError(f"{pairs_txt} holds no pairs")
    return out


def random_pairs(root: str | Path, num_pairs: int, seed: int = 0, folds: int = 10) -> list[Pair]:
    """Balanced random pairs from ``root/<identity>/<image>`` (module doc); reproducible by ``seed``."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder; pass a folder with one sub-folder of images per identity")
    ids = [(d.name, _images(d)) for d in sorted(root.iterdir()) if d.is_dir()]
    ids = [(n, fs) for n, fs in ids if fs]
    multi = [fs for _, fs in ids if len(fs) >= 2]
    if len(ids) < 2 or not multi:
        raise ValueError(f"{root} needs at least two identities and one with two or more images to make pairs")
    if num_pairs < 2 or num_pairs % 2:
        raise ValueError(f"--num-pairs must be an even number >= 2 (half genuine, half impostor), got {num_pairs}")
    half = num_pairs // 2
    max_same = sum(len(fs) * (len(fs) - 1) // 2 for fs in multi)
    total = sum(len(fs) for _, fs in ids)
    max_diff = (total * total - sum(len(fs) ** 2 for _, fs in ids)) // 2
    if half > max_same or half > max_diff:
        raise ValueError(
            f"{root} allows at most {min(max_same, max_diff)} distinct pairs of each kind; ask for --num-pairs <= "
            f"{2 * min(max_same, max_diff)}"
        )
    rng = random.Random(seed)
    same: set[tuple[Path, Path]] = set()
    while len(same) < half:
        a, b = sorted(rng.sample(rng.choice(multi), 2))
        same.add((a, b))
    diff: set[tuple[Path, Path]] = set()
    while len(diff) < half:
        (_, fa), (_, fb) = rng.sample(ids, 2)
        a, b = sorted((rng.choice(fa), rng.choice(fb)))
        diff.add((a, b))
    same_l, diff_l = sorted(same), sorted(diff)
    rng.shuffle(same_l)
    rng.shuffle(diff_l)
    folds = max(1, min(folds, half))
    out: list[Pair] = []
    for k in range(folds):  # LFW layout: per fold, its genuine block then its impostor block
        lo, hi = k * half // folds, (k + 1) * half // folds
        out += [(a, b, True) for a, b in same_l[lo:hi]] + [(a, b, False) for a, b in diff_l[lo:hi]]
    return out


def encode_face(path: Path, size: int = 112, quality: int = 95) -> bytes:
    """The JPEG bytes stored for one image: the file itself when it is already a size x size RGB JPEG."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            if im.format == "JPEG" and im.mode == "RGB" and im.size == (size, size):
                return path.read_bytes()
            im = im.convert("RGB")
            if im.size != (size, size):
                im = im.resize((size, size), Image.BILINEAR)
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=quality)
            return buf.getvalue()
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"cannot read image {path} ({exc}); remove it or fix the pairs") from None


def make_bin(
    folder: str | Path,
    out: str | Path,
    pairs_txt: str | Path | None = None,
    num_pairs: int = 6000,
    seed: int = 0,
    folds: int = 10,
    size: int = 112,
    quality: int = 95,
) -> dict:
    """Build the ``.bin`` (module doc); returns {"pairs", "genuine", "images", "out"}."""
    pairs = read_pairs_txt(pairs_txt, folder) if pairs_txt else random_pairs(folder, num_pairs, seed, folds)
    cache: dict[Path, bytes] = {}
    images: list[bytes] = []
    for a, b, _ in pairs:
        for p in (a, b):
            if p not in cache:
                cache[p] = encode_face(p, size, quality)
            images.append(cache[p])
    write_bin(out, images, [s for _, _, s in pairs])
    return {"pairs": len(pairs), "genuine": sum(s for _, _, s in pairs), "images": len(cache), "out": str(out)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "folder", help="face folder: FOLDER/<identity>/<image> (aligned 112x112 faces, e.g. from `data align`)"
    )
    p.add_argument("out", help="output .bin")
    p.add_argument("--pairs", default=None, help="LFW-style pairs.txt; without it, balanced random pairs are drawn")
    p.add_argument("--num-pairs", type=int, default=6000, help="random pairs, half genuine (default 6000, as LFW)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random pairs (default 0)")
    p.add_argument("--folds", type=int, default=10, help="fold blocks of the random layout (default 10)")
    p.add_argument("--size", type=int, default=112, help="stored image size (default 112)")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality of re-encoded images (default 95)")


def run(args: argparse.Namespace) -> int:
    rep = make_bin(args.folder, args.out, args.pairs, args.num_pairs, args.seed, args.folds, args.size, args.quality)
    how = f"pairs from {args.pairs}" if args.pairs else f"random balanced pairs, seed {args.seed}"
    print(
        f"wrote {rep['out']}: {rep['pairs']} pairs ({rep['genuine']} genuine), {rep['images']} distinct images; {how}"
    )
    return 0
