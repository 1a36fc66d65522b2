"""Data sources: N items, each (encoded image bytes, label), with a name for error messages: an
InsightFace rec (:class:`RecSource`) or an image folder (:class:`FolderSource`); :func:`open_source`
picks one for a path or spec; :func:`decode_pil` decodes an item as every CPU path does."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from lafs_fast.data.recordio import CorruptRecordError, RecordIOReader, check_image_header, first_label, read_meta
from lafs_fast.data.synthetic import SyntheticFaces, parse_spec

log = logging.getLogger(__name__)


# How the public InsightFace releases store channels (docs/method.md section 6), matched against the rec's
# path when the rec has no lafs_fast.json; pass color_order= to make_loader to override.
DATASET_COLOR_ORDER = {
    "ms1mv3": "BGR",
    "ms1m": "BGR",
    "faces_emore": "BGR",  # packed from cv2 arrays: BGR in the JPEGs
    "webface42m": "RGB",
    "webface4m": "RGB",
    "webface": "RGB",
}


# --------------------------------------------------------------------------------------------------
# sources: N items, each (encoded bytes, label), with a name for error messages


class RecSource:
    """Image records of a rec (minus keys listed in ``<rec>.bad``)."""

    kind = "rec"

    def __init__(self, path: str | os.PathLike) -> None:
        self.reader = RecordIOReader(path)
        bad = self.reader.bad_keys()
        keys = self.reader.image_keys
        self.keys = keys[~np.isin(keys, list(bad))] if bad else keys
        self.num_classes = self.reader.num_classes
        self.height, self.width = self.reader.property.height, self.reader.property.width
        self.path = self.reader.rec_path

    def __len__(self) -> int:
        return len(self.keys)

    def item(self, i: int) -> tuple[bytes, int]:
        """(encoded image, label) of image record ``i``: the label is read with the image, so no
        pass over millions of headers happens at start-up."""
        k = int(self.keys[i])
        header, data = self.reader.record(k)
        label = first_label(header)
        if not np.isfinite(label):
            raise CorruptRecordError(
                f"{self.path} key {k} (offset {self.reader.offset(k)}) is corrupt: its label is {label}"
            )
        try:
            check_image_header(data, (self.height, self.width))
        except (OSError, ValueError) as exc:  # the image, not the framing: skipped and named as corrupt
            raise CorruptRecordError(f"{self.name(i)} is corrupt: {exc}") from None
        return data, int(label)

    def check_labels(self, num_classes: int) -> None:
        """One sentence naming the keys whose label is outside ``[0, num_classes)`` (see RecordIOReader)."""
        self.reader.check_labels(num_classes)

    def get(self, i: int) -> bytes:
        return self.item(i)[0]

    def name(self, i: int) -> str:
        k = int(self.keys[i])
        return f"{self.path} key {k} (offset {self.reader.offset(k)})"

    def color_order(self) -> str:
        meta = read_meta(self.path)
        if "color_order" in meta:
            return meta["color_order"]
        path = str(self.path).lower()
        return next((order for name, order in DATASET_COLOR_ORDER.items() if name in path), "RGB")


class FolderSource:
    """Images of an identity folder (``root/<identity>/<image>``)."""

    kind = "folder"

    def __init__(self, root: str | os.PathLike) -> None:
        from lafs_fast.data.folder import list_folder

        listing = list_folder(root)
        for name in listing.empty:
            log.warning("%s/%s holds no image; that identity is left out", root, name)
        items = listing.items()
        self.paths = [p for p, _ in items]
        self.labels = np.array([label for _, label in items], dtype=np.int64)
        self.num_classes = len(listing.identities)
        self.path = Path(root)
        self.height = self.width = None  # per image

    def __len__(self) -> int:
        return len(self.paths)

    def item(self, i: int) -> tuple[bytes, int]:
        return self.get(i), int(self.labels[i])

    def get(self, i: int) -> bytes:
        data = self.paths[i].read_bytes()
        check_image_header(data)  # the pixel cap before any decode (the loaders resize any other size)
        return data

    def name(self, i: int) -> str:
        return str(self.paths[i])

    def check_labels(self, num_classes: int) -> None:
        """Folder labels are the sub-folder positions: always inside ``[0, num_classes)``."""

    def color_order(self) -> str:
        return "RGB"


def decode_pil(data: bytes, size: int, bgr: bool) -> np.ndarray:
    """Encoded image -> (size, size, 3) uint8 RGB (bilinear resize only when the size differs)."""
    from lafs_fast.data.folder import load_rgb

    arr = np.asarray(load_rgb(data, size))
    return np.ascontiguousarray(arr[..., ::-1]) if bgr else arr


def open_source(source):
    """A path / spec / dataset -> (kind, source object)."""
    if source is None or isinstance(source, SyntheticFaces):
        return "synthetic", source or parse_spec("synthetic")
    if isinstance(source, str) and source.startswith("synthetic"):
        return "synthetic", parse_spec(source)
    p = Path(source)
    if p.suffix == ".rec" or (p.is_dir() and (p / "train.rec").is_file()):
        return "rec", RecSource(p)
    if p.is_dir():
        return "folder", FolderSource(p)
    if not p.exists():
        raise FileNotFoundError(
            f"{source} does not exist; pass a .rec, a folder holding train.rec, an image folder, or "
            "synthetic[:IDSxIMGS]"
        )
    raise ValueError(
        f"{source} is neither a .rec nor a folder; pass a .rec, a folder holding train.rec, an image folder, or "
        "synthetic[:IDSxIMGS]"
    )
