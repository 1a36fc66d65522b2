"""Image folders (one sub-folder per identity) and the folder -> RecordIO builder.

``build_rec`` writes ONE label per identity (the reference's ImageFolder-to-rec script writes a
label per image, a bug), encodes in parallel threads (PIL releases the GIL while coding) with a
tqdm progress bar, skips unreadable images (counted and named), reports identities without images,
and writes atomically (RecordIOWriter: temporary names, then rename).
"""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from lafs_fast.data.recordio import check_image_header
from lafs_fast.data.recordio_writer import IdentityRecWriter

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".pgm", ".ppm", ".pnm", ".tif", ".tiff", ".webp", ".gif"}


@dataclass
class FolderListing:
    """``identities``: sorted sub-folder names (label = position); ``counts[label]``: its images;
    ``files(label)``: its image paths (kept from the listing, or listed again when ``keep=False``)."""

    root: Path
    identities: list[str]
    counts: list[int]
    empty: list[str] = field(default_factory=list)  # sub-folders without images (left out)
    names: list[list[str]] | None = None  # file names per identity; None: not kept (millions of images)

    @property
    def num_images(self) -> int:
        return sum(self.counts)

    def files(self, label: int) -> list[Path]:
        sub = self.root / self.identities[label]
        names = self.names[label] if self.names is not None else _image_names(sub)
        return [sub / n for n in names]

    def items(self) -> list[tuple[Path, int]]:
        """Every ``(path, label)`` in label order."""
        return list(self.iter_items())

    def iter_items(self) -> Iterator[tuple[Path, int]]:
        """``(path, label)`` in label order, one identity's files at a time."""
        return ((p, label) for label in range(len(self.identities)) for p in self.files(label))


def _image_names(sub: Path) -> list[str]:
    """Sorted names of the image files in ``sub``."""
    return sorted(e.name for e in os.scandir(sub) if e.is_file() and os.path.splitext(e.name)[1].lower() in IMAGE_EXTS)


def list_folder(root: str | os.PathLike, *, keep: bool = True) -> FolderListing:
    """List ``root/<identity>/<image>``; identities without images are left out and listed in ``empty``.
    ``keep=False``: count the files but keep no name (``files(label)`` lists that folder again),
    so listing millions of images holds only the identities.

    Raises ValueError with the fix when the folder holds no identity with an image.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder; pass a folder with one sub-folder of images per identity")
    idents, counts, names, empty = [], [], [], []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        imgs = _image_names(sub)
        if imgs:
            idents.append(sub.name)
            counts.append(len(imgs))
            if keep:
                names.append(imgs)
        else:
            empty.append(sub.name)
    if not idents:
        loose = [p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS]
        hint = " (it holds images directly: put each identity's images in its own sub-folder)" if loose else ""
        raise ValueError(
            f"{root} holds no identity sub-folder with images{hint}; expected {root}/<identity>/<image>.jpg"
        )
    return FolderListing(root, idents, counts, empty, names if keep else None)


def load_rgb(data: bytes | Path, size: int | None = None) -> Image.Image:
    """Decode (bytes or a path) to an RGB PIL image, resized to ``size`` x ``size`` when given and different."""
    raw = data if isinstance(data, (bytes, bytearray, memoryview)) else Path(data).read_bytes()
    check_image_header(raw)  # the pixel cap, read from the header before decoding
    im = Image.open(io.BytesIO(raw)).convert("RGB")
    if size is not None and im.size != (size, size):
        im = im.resize((size, size), Image.BILINEAR)
    return im


def _encode(
    path: Path, size: int | None, quality: int, keep_jpeg: bool = False
) -> tuple[bytes | None, tuple[int, int] | None, str | None, bool]:
    """-> (JPEG bytes, (h, w), None, kept as is) or (None, None, reason, False). ``keep_jpeg``: a
    JPEG (RGB or grey) whose size already fits is returned byte for byte (after a full decode, so a
    corrupt one is still skipped): re-encoding would only lose quality and time."""
    try:
        data = path.read_bytes()
        if keep_jpeg:
            check_image_header(data)  # the pixel cap before this path's own decode, as load_rgb's
            with Image.open(io.BytesIO(data)) as src:
                if src.format == "JPEG" and src.mode in ("RGB", "L") and (size is None or src.size == (size, size)):
                    src.load()
                    return data, (src.height, src.width), None, True
        im = load_rgb(data, size)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=quality)
        return buf.getvalue(), (im.height, im.width), None, False
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        return None, None, f"{type(e).__name__}: {e}", False


def build_rec(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    size: int | None = None,
    quality: int = 95,
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    keep_jpeg: bool = False,
) -> dict:
    """Folder -> ``out/train.rec``, ``train.idx``, ``property``, ``lafs_fast.json``.

    ``size``: resize every image to size x size (None keeps each image's size; the loaders resize
    to 112 when it differs). ``keep_jpeg``: store a JPEG that needs no resize as it is (see
    :func:`_encode`; counted in the report's ``kept_jpeg``), re-encode the rest. Returns a report
    dict: identities, images, skipped (path, reason), empty identities. Raises ValueError when
    nothing readable remains.
    """
    from tqdm import tqdm

    listing = list_folder(src, keep=False)
    items = listing.iter_items()  # streamed, one identity folder at a time: no path per image held
    workers = workers or min(16, os.cpu_count() or 1)
    skipped: list[tuple[str, str]] = []
    shapes: set[tuple[int, int]] = set()
    written: list[int] = []  # source identity index of each label
    kept = 0  # JPEGs stored as they were (keep_jpeg)
    window = 64 * workers  # bounded look-ahead: encoded images stream to disk, memory stays flat
    iw = IdentityRecWriter(out, overwrite=overwrite)
    try:
        with (
            ThreadPoolExecutor(workers) as pool,
            tqdm(
                total=listing.num_images,
                desc=f"encode {listing.root.name}",
                unit="img",
                disable=not progress,
                file=sys.stderr,
            ) as bar,
        ):
            while chunk := list(islice(items, window)):
                for (path, ident), (data, shape, err, as_is) in zip(
                    chunk, pool.map(lambda it: _encode(it[0], size, quality, keep_jpeg), chunk)
                ):
                    if data is None:
                        skipped.append((str(path), err))
                    else:
                        if iw.add(data, ident) == len(written):
                            written.append(ident)
                        shapes.add(shape)
                        kept += as_is
                bar.update(len(chunk))
        if not written:
            raise ValueError(f"no image under {src} could be decoded ({len(skipped)} tried); check the files")
        # identities whose every image failed are dropped, like empty ones, and named in the report
        unreadable = [name for i, name in enumerate(listing.identities) if i not in set(written)]
        h, w = next(iter(shapes)) if len(shapes) == 1 else (size or 112, size or 112)
    except BaseException:
        iw.abort()
        raise
    counts = iw.finish(
        height=h,
        width=w,
        meta={
            "identities": [listing.identities[i] for i in written],
            "source": str(Path(src).resolve()),
            "mixed_sizes": len(shapes) > 1,
            "kept_jpeg": kept,
        },
    )
    return {
        **counts,
        "skipped": skipped,
        "empty_identities": listing.empty,
        "unreadable_identities": unreadable,
        "kept_jpeg": kept,
        "height": h,
        "width": w,
    }
