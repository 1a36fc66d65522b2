"""InsightFace / MXNet RecordIO (``.rec`` + ``.idx`` + ``property``), read and written without MXNet.

Format (dmlc-core recordio + mxnet.recordio, docs/method.md section 6):

- a record on disk: ``uint32 magic = 0xced7230a``, ``uint32 lrec`` (upper 3 bits: continuation flag
  ``cflag``, lower 29 bits: length), ``length`` payload bytes, zero padding to a multiple of 4 bytes.
  A payload that contains the magic word at a 4-byte aligned position is split there (the magic
  word itself is dropped): parts with ``cflag`` 1 (first), 2 (middle), 3 (last); ``cflag`` 0 is a
  whole record. The reader joins the parts with the magic word between them.
- a payload: ``IRHeader`` packed as ``<IfQQ`` (flag, label, id, id2; 24 bytes); when ``flag > 0``,
  ``flag`` float32 labels follow (and the ``label`` field is 0); then the image bytes (JPEG).
- ``.idx``: text lines ``key\\toffset``.
- ``property``: ``num_classes,height,width``.
- InsightFace face datasets: record 0 is a header whose labels hold ``[first identity record, end)``;
  image records are keys ``1 .. first identity record - 1``; identity records hold the ``[start, end)``
  range of their image keys in their labels.

All errors about a broken file are one sentence naming the file, the offset and the fix
(:class:`RecordIOError`, a ValueError, so the CLI prints it without a traceback).

Why this file is long (~500 lines): it is the whole read side of one format, the framing, the index
(parsed without a Python object per record, for WebFace4M's 4.2 M), the vectorised label scan, the
corrupt-record checks every loader relies on, and the completion of an interrupted replacement that
every reader must do before it reads. Writing lives in ``recordio_writer.py``.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import struct
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", MAGIC)
IR_FORMAT = "<IfQQ"
IR_SIZE = struct.calcsize(IR_FORMAT)  # 24
_LEN_MASK = (1 << 29) - 1
META_NAME = "lafs_fast.json"  # our sidecar: colour order, identity names, provenance
BAD_SUFFIX = ".bad"  # keys of corrupt images found by `lafs-fast data verify`, one per line


class RecordIOError(ValueError):
    """A broken or mismatched rec/idx/property; the message names the file, the offset and the fix."""


class CorruptRecordError(RecordIOError):
    """ONE record cannot be read (bad magic, length, continuation flag or IRHeader): the loaders
    skip, count and name it; the rest of the file is fine."""


class IRHeader(NamedTuple):
    """mxnet.recordio.IRHeader. ``label`` is a float when ``flag == 0``, else a (flag,) float32 array."""

    flag: int
    label: float | np.ndarray
    id: int
    id2: int


# --------------------------------------------------------------------------------------------------
# payloads


def pack(header: IRHeader, data: bytes = b"") -> bytes:
    """Payload bytes of one record (what mxnet.recordio.pack makes): IRHeader, extra labels, data.

    A scalar label gives ``flag = 0``; a sequence/array label of length n gives ``flag = n``, the
    labels as n float32 after the header, and 0 in the header's label field.
    """
    label = header.label
    if np.ndim(label) == 0:
        head = struct.pack(IR_FORMAT, 0, float(label), int(header.id), int(header.id2))
        return head + bytes(data)
    arr = np.asarray(label, dtype="<f4").reshape(-1)
    head = struct.pack(IR_FORMAT, arr.size, 0.0, int(header.id), int(header.id2))
    return head + arr.tobytes() + bytes(data)


def unpack(payload: bytes | memoryview) -> tuple[IRHeader, bytes]:
    """Inverse of :func:`pack`: ``(IRHeader, data bytes)``. Raises CorruptRecordError when too short."""
    if len(payload) < IR_SIZE:
        raise CorruptRecordError(f"a record payload of {len(payload)} bytes is shorter than its 24-byte IRHeader")
    flag, label, id_, id2 = struct.unpack_from(IR_FORMAT, payload, 0)
    start = IR_SIZE
    if flag > 0:
        end = start + 4 * flag
        if end > len(payload):
            raise CorruptRecordError(
                f"a record payload declares {flag} labels but holds only {len(payload) - IR_SIZE} bytes after its "
                "header"
            )
        label = np.frombuffer(bytes(payload[start:end]), dtype="<f4").astype(np.float32)
        start = end
    return IRHeader(int(flag), label, int(id_), int(id2)), bytes(payload[start:])


def first_label(header: IRHeader) -> float:
    """The class label of an image record: ``label`` when ``flag == 0``, else the first extra label."""
    return float(header.label) if header.flag == 0 else float(header.label[0])


# --------------------------------------------------------------------------------------------------
# framing


def encode_record(payload: bytes) -> bytes:
    """The on-disk bytes of one payload, split at aligned magic words exactly as dmlc-core does."""
    buf = memoryview(payload)
    n = len(buf)
    out = bytearray()
    start = 0
    lower_align = n & ~3
    # aligned occurrences of the magic word: compare 4-byte words through a uint32 view
    words = np.frombuffer(payload, dtype="<u4", count=lower_align // 4) if lower_align else np.empty(0, "<u4")
    for w in np.flatnonzero(words == MAGIC):
        i = int(w) * 4
        out += MAGIC_BYTES + struct.pack("<I", ((1 if start == 0 else 2) << 29) | (i - start)) + buf[start:i]
        start = i + 4
    cflag = 3 if start != 0 else 0
    out += MAGIC_BYTES + struct.pack("<I", (cflag << 29) | (n - start)) + buf[start:n]
    out += b"\0" * (-(n - start) % 4)
    return bytes(out)


def decode_record(buf: bytes | memoryview | mmap.mmap, offset: int, *, path: str = "<buffer>") -> tuple[bytes, int]:
    """``(payload, offset of the next record)`` of the record starting at ``offset`` in ``buf``.

    Raises :class:`CorruptRecordError` naming ``path`` and the offset when the bytes there are not
    a record: no magic word (the .idx points inside a record, or the bytes are damaged), a length
    past the end of the file, or a continuation flag out of sequence (first part 0 or 1, later
    parts 2 or 3).
    """
    size = len(buf)
    parts: list[bytes] = []
    pos = offset
    while True:
        if pos + 8 > size:
            raise CorruptRecordError(
                f"{path}: the record at offset {offset} needs bytes up to {pos + 8} but the file ends at {size}"
            )
        magic, lrec = struct.unpack_from("<II", buf, pos)
        if magic != MAGIC:
            raise CorruptRecordError(
                f"{path}: no record starts at offset {pos} (magic 0x{magic:08x}, expected 0xced7230a)"
            )
        cflag, length = lrec >> 29, lrec & _LEN_MASK
        if cflag not in ((0, 1) if not parts else (2, 3)):
            raise CorruptRecordError(
                f"{path}: the record at offset {pos} has continuation flag {cflag} "
                f"({'a first part must have 0 or 1' if not parts else 'a later part must have 2 or 3'})"
            )
        end = pos + 8 + length
        if end > size:
            raise CorruptRecordError(
                f"{path}: the record at offset {offset} declares bytes up to {end} but the file ends at {size}"
            )
        parts.append(bytes(buf[pos + 8 : end]))
        pos = end + (-length % 4)
        if cflag in (0, 3):
            break
    return MAGIC_BYTES.join(parts), pos


# --------------------------------------------------------------------------------------------------
# files


def rec_paths(path: str | os.PathLike) -> tuple[Path, Path, Path]:
    """``(rec, idx, property)`` paths from a ``.rec`` path or a folder holding ``train.rec``."""
    p = Path(path)
    if not p.exists() and p.suffix != ".rec":
        raise FileNotFoundError(f"{path} does not exist; pass a .rec file or a folder holding train.rec")
    if p.is_dir():
        p = p / "train.rec"
    if p.suffix != ".rec":
        raise ValueError(f"{path} is not a .rec file nor a folder holding train.rec; pass the .rec path")
    return p, p.with_suffix(".idx"), p.parent / "property"


def read_meta(rec: str | os.PathLike) -> dict:
    """Our sidecar ``lafs_fast.json`` beside the rec (colour order, identity names), or {}."""
    meta = rec_paths(rec)[0].parent / META_NAME
    return json.loads(meta.read_text()) if meta.is_file() else {}


MAX_IMAGE_PIXELS = 50_000_000  # a face photo is far smaller; a 144-megapixel JPEG decodes to 430 MB


_SOF = frozenset((0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF))


def _jpeg_size(data: bytes | memoryview) -> tuple[int, int] | None:
    """(width, height) from a JPEG's frame header, walking its marker segments; None when ``data`` is
    not a JPEG or the walk fails (PIL then reads the header). Every record of every batch passes
    here on the loaders' host thread: PIL's ``Image.open`` costs ~25 us an image, this ~2."""
    if data[:2] != b"\xff\xd8":
        return None
    at, n = 2, len(data)
    while at + 9 <= n and data[at] == 0xFF:
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        length = (data[at + 2] << 8) | data[at + 3]
        if marker in _SOF:
            return (data[at + 7] << 8) | data[at + 8], (data[at + 5] << 8) | data[at + 6]
        at += 2 + length
    return None


def check_image_header(data: bytes | memoryview, size: tuple[int, int] | None = None) -> None:
    """ValueError when the encoded image's header (read without decoding it) gives more than
    MAX_IMAGE_PIXELS pixels, or a (height, width) other than ``size`` (a rec's property: a 128 x 128
    record in a 112 x 112 rec broke batching); OSError when it is not an image. Every loader, ``data
    build`` and ``data verify`` call it before decoding, so such a record is skipped and named."""
    import io

    from PIL import Image

    dims = _jpeg_size(data)
    if dims is not None:
        w, h = dims
    else:
        with warnings.catch_warnings():  # PIL's decompression-bomb warning: the refusal below says it in one sentence
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:  # the header only: nothing is decoded yet
                w, h = im.size
    if w * h > MAX_IMAGE_PIXELS:
        raise ValueError(
            f"the image is {w} x {h} = {w * h / 1e6:,.0f} megapixels, more than the {MAX_IMAGE_PIXELS / 1e6:.0f} a "
            "face image may have"
        )
    if size is not None and all(size) and (h, w) != tuple(size):
        raise ValueError(f"the image is {w} x {h}, not the {size[1]} x {size[0]} of the rec's property file")


@dataclass(frozen=True)
class Property:
    """``property`` file: ``num_classes,height,width``."""

    num_classes: int
    height: int
    width: int
    inferred: bool = False  # True when no property file existed and it was worked out from the rec


class RecordIOReader:
    """Random access to an InsightFace rec by key (mmap, no MXNet).

    ``reader[key] -> (IRHeader, image bytes)``; ``image_keys``: (N,) int64 keys of the image records
    (all records when the rec has no InsightFace header); ``labels``: (N,) int64 class per image
    record, read lazily; ``identities()`` yields ``(label, image keys)``; ``num_classes``. Picklable
    (the mmap is reopened in each DataLoader worker).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.rec_path, self.idx_path, self.prop_path = rec_paths(path)
        finish_swap(self.rec_path)  # a killed `data build --overwrite`: its new files, never half of them
        if not self.rec_path.is_file():
            raise FileNotFoundError(f"{self.rec_path} does not exist; build one with `lafs-fast data build FOLDER OUT`")
        if not self.idx_path.is_file():
            raise FileNotFoundError(
                f"{self.idx_path} (the index of {self.rec_path.name}) does not exist; copy it beside the .rec"
            )
        self.keys, self.offsets = self._read_index()
        # key -> offset by binary search (a dict of millions of keys costs GBs and pickles slowly)
        order = np.argsort(self.keys, kind="stable")
        self._sorted_keys, self._sorted_offsets = self.keys[order], self.offsets[order]
        if len(self._sorted_keys) > 1 and (np.diff(self._sorted_keys) == 0).any():
            dup = int(self._sorted_keys[np.flatnonzero(np.diff(self._sorted_keys) == 0)[0]])
            raise RecordIOError(f"{self.idx_path} lists key {dup} twice; rebuild the index")
        self._open()
        self._check_tail()
        self.header0: tuple[int, int] | None = None
        self.id_range: tuple[int, int] | None = None
        self._labels: np.ndarray | None = None
        self._identity_ranges: list[tuple[int, int]] | None = None
        if self.has_key(0):
            h, _ = self.record(0)
            if h.flag == 2:  # the InsightFace header: [first identity record, end)
                self.header0 = self.id_range = self._key_range(h, 0)
        if self.header0 is not None:
            a, _ = self.header0
            self.image_keys = self.keys[(self.keys > 0) & (self.keys < a)]
        else:
            self.image_keys = self.keys.copy()
        self.image_keys.sort()
        self.property = self._read_property()

    # -- setup --------------------------------------------------------------------------------------
    def _read_index(self) -> tuple[np.ndarray, np.ndarray]:
        # fast path (millions of lines): one split, one conversion; the line loop below only runs
        # to name the bad line when this fails
        text = self.idx_path.read_bytes()
        try:  # numbers straight into int64 (no Python string per field: 15x less memory)
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # "could not be read to its end": a bad line, use the exact path
                flat = np.fromstring(text, dtype=np.int64, sep=" ")
            lines = text.count(b"\n") + (0 if text.endswith(b"\n") else 1)
            if flat.size and flat.size == 2 * lines and (flat[1::2] >= 0).all():
                return flat[0::2].copy(), flat[1::2].copy()
        except (ValueError, OverflowError, DeprecationWarning):
            pass
        del text
        keys, offsets = [], []
        with open(self.idx_path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                fields = line.split()
                if len(fields) != 2 or not (fields[0].lstrip("-").isdigit() and fields[1].isdigit()):
                    raise RecordIOError(
                        f"{self.idx_path} line {lineno} is not `key<TAB>offset`: {line.strip()[:60]!r}; rebuild the "
                        "index"
                    )
                key, offset = int(fields[0]), int(fields[1])
                if not (-(2**63) <= key < 2**63 and offset < 2**63):  # numpy's int64 below
                    raise RecordIOError(
                        f"{self.idx_path} line {lineno} holds a number past 64 bits: {line.strip()[:60]!r}; rebuild "
                        "the index"
                    )
                keys.append(key)
                offsets.append(offset)
        if not keys:
            raise RecordIOError(f"{self.idx_path} is empty; rebuild the index")
        return np.asarray(keys, dtype=np.int64), np.asarray(offsets, dtype=np.int64)

    def _key_range(self, header: IRHeader, key: int, most: int | None = None) -> tuple[int, int]:
        """The ``[start, end)`` range of record keys that an InsightFace header or identity record
        ``key`` holds in its first two labels (at most ``most`` keys), or a RecordIOError: a damaged
        one (NaN, inf, reversed, 10^9 keys) would otherwise crash int() or allocate the range."""
        lab = np.atleast_1d(np.asarray(header.label, dtype=np.float64))[:2]
        ok = lab.size == 2 and bool(np.isfinite(lab).all()) and 0 <= lab[0] <= lab[1] < 2**62
        if not ok or (most is not None and lab[1] - lab[0] > most):
            raise RecordIOError(
                f"{self.rec_path} key {key} should hold a [start, end) range of record keys in its labels, not "
                f"{lab.tolist()}; rebuild the rec"
            )
        return int(lab[0]), int(lab[1])

    def _open(self) -> None:
        self._file = open(self.rec_path, "rb")  # noqa: SIM115 - held open for the mmap, closed by close()
        self.size = os.fstat(self._file.fileno()).st_size
        self._mm = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if self.size else b""

    def _check_tail(self) -> None:
        """Catch a truncated rec or a foreign idx at open time: every offset in range, the last record whole."""
        bad = np.flatnonzero(self.offsets >= self.size)
        if bad.size:
            i = int(bad[0])
            raise RecordIOError(
                f"{self.rec_path} is truncated or does not match {self.idx_path.name}: key {self.keys[i]} is at "
                f"offset {self.offsets[i]} but the file ends at {self.size}; copy the file again or rebuild it"
            )
        last = int(np.argmax(self.offsets))
        try:
            self.read_payload_at(int(self.offsets[last]))
        except CorruptRecordError as e:  # the end of the file: a copy cut short, not one bad record
            raise RecordIOError(
                f"{self.rec_path} is truncated or damaged at its end (its last record, key {self.keys[last]}: "
                f"{str(e).split(': ', 1)[-1]}); copy the file again or rebuild it"
            ) from None

    def _read_property(self) -> Property:
        if self.prop_path.is_file():
            fields = self.prop_path.read_text().strip().split(",")
            try:
                c, h, w = (int(x) for x in fields)
            except ValueError:
                raise RecordIOError(
                    f"{self.prop_path} should read `num_classes,height,width`, not {','.join(fields)!r}; fix or delete "
                    "it"
                ) from None
            return Property(c, h, w)
        # inferred: identity count from the header, else the largest label + 1; size from the first image
        if self.header0 is not None:
            c = self.header0[1] - self.header0[0]
        else:
            labels = self.scan_labels()[0]  # damaged records (NaN) are the loaders' business, not the count's
            finite = labels[np.isfinite(labels)]  # an infinite label is a damaged record too
            c = int(finite.max()) + 1 if finite.size else 0
        h = w = 112
        if len(self.image_keys):
            import io

            from PIL import Image

            try:
                with Image.open(io.BytesIO(self.image(int(self.image_keys[0])))) as im:
                    w, h = im.size
            except Exception:
                pass
        return Property(c, h, w, inferred=True)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_file", None)
        state.pop("_mm", None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._open()

    def close(self) -> None:
        if isinstance(self._mm, mmap.mmap):
            self._mm.close()
        self._file.close()

    def __enter__(self) -> RecordIOReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- access -------------------------------------------------------------------------------------
    def read_payload_at(self, offset: int) -> bytes:
        return decode_record(self._mm, offset, path=str(self.rec_path))[0]

    def has_key(self, key: int) -> bool:
        i = int(np.searchsorted(self._sorted_keys, key))
        return i < len(self._sorted_keys) and int(self._sorted_keys[i]) == int(key)

    def offset(self, key: int) -> int:
        """Byte offset of record ``key`` in the rec (KeyError when the .idx lacks it)."""
        i = int(np.searchsorted(self._sorted_keys, key))
        if i >= len(self._sorted_keys) or int(self._sorted_keys[i]) != int(key):
            raise KeyError(f"key {key} is not in {self.idx_path}")
        return int(self._sorted_offsets[i])

    def read_idx(self, key: int) -> bytes:
        """Payload bytes of record ``key`` (as mxnet's MXIndexedRecordIO.read_idx)."""
        return self.read_payload_at(self.offset(key))

    def record(self, key: int) -> tuple[IRHeader, bytes]:
        """``(IRHeader, image bytes)`` of record ``key``; :class:`CorruptRecordError` naming the key
        and offset when that record cannot be read."""
        try:
            return unpack(self.read_idx(key))
        except CorruptRecordError as e:
            why = str(e).split(": ", 1)[-1] if str(e).startswith(str(self.rec_path)) else str(e)
            raise CorruptRecordError(
                f"{self.rec_path} key {key} (offset {self.offset(key)}) is corrupt: {why}"
            ) from None

    __getitem__ = record

    def image(self, key: int) -> bytes:
        """Encoded image bytes of record ``key``."""
        return self.record(key)[1]

    def label(self, key: int) -> int:
        return int(first_label(self.record(key)[0]))

    @property
    def num_classes(self) -> int:
        return self.property.num_classes

    @property
    def num_images(self) -> int:
        return int(len(self.image_keys))

    def __len__(self) -> int:
        return self.num_images

    @property
    def labels(self) -> np.ndarray:
        """(N,) int64 label of each image record in ``image_keys`` order (reads the headers once);
        :class:`CorruptRecordError` naming the first record whose header cannot be read."""
        if self._labels is None:
            labels, bad = self.scan_labels()
            if bad:
                key, why = next(iter(bad.items()))
                raise CorruptRecordError(f"{self.rec_path} key {key} (offset {self.offset(key)}) is corrupt: {why}")
            wild = np.flatnonzero(~(np.abs(labels) < 2.0**31))  # inf or 1e30 would cast to a garbage int64
            if wild.size:
                key = int(self.image_keys[wild[0]])
                raise CorruptRecordError(
                    f"{self.rec_path} key {key} (offset {self.offset(key)}) is corrupt: its label "
                    f"{float(labels[wild[0]])} is not a class index"
                )
            self._labels = labels.astype(np.int64)
        return self._labels

    def scan_labels(self, keys: np.ndarray | None = None) -> tuple[np.ndarray, dict[int, str]]:
        """``(labels (N,) float64, {key: reason})`` of records ``keys`` (default ``image_keys``), read
        from the headers in a few vectorised gathers over the mmap (millions of records in seconds);
        a record whose framing is unusual (split in its first 28 bytes, or damaged) is read on its
        own, and a damaged one gets label NaN and its reason."""
        keys = self.image_keys if keys is None else np.asarray(keys, dtype=np.int64)
        labels = np.full(len(keys), np.nan)
        fast = np.zeros(len(keys), dtype=bool)
        buf = np.frombuffer(self._mm, dtype=np.uint8) if self.size else np.empty(0, np.uint8)

        def u32(at: np.ndarray) -> np.ndarray:
            return buf[at[:, None] + np.arange(4)].copy().view("<u4")[:, 0]  # noqa: F821 - used before the del

        for a in range(0, len(keys), 1 << 18):  # in slices: the gathers' temporaries stay a few MB
            offs = self._sorted_offsets[np.searchsorted(self._sorted_keys, keys[a : a + (1 << 18)])]
            f = offs + 8 + IR_SIZE + 4 <= self.size  # magic, lrec, IRHeader and one extra label in range
            i = np.flatnonzero(f)
            if i.size:
                o = offs[i]
                magic, lrec = u32(o), u32(o + 4)
                # int64: 4 * flag in uint32 wraps (a corrupt flag 2^30 looked like 0 extra labels and the
                # image's first bytes were read as its label); the format's flag is a uint32 count of labels
                flag = u32(o + 8).astype(np.int64)
                length = (lrec & _LEN_MASK).astype(np.int64)
                ok = (
                    (magic == MAGIC)
                    & ((lrec >> 29) == 0)
                    & (length >= IR_SIZE + 4 * flag)
                    & (o + 8 + length <= self.size)
                )
                label_at = np.where(flag > 0, o + 8 + IR_SIZE, o + 12)
                labels[a + i[ok]] = u32(label_at[ok]).view("<f4")
                f[i[~ok]] = False
            fast[a : a + len(f)] = f
        del buf
        bad: dict[int, str] = {}
        for j in np.flatnonzero(~fast):  # the exact (slow) reader names what is wrong
            try:
                labels[j] = first_label(self.record(int(keys[j]))[0])
            except CorruptRecordError as e:
                bad[int(keys[j])] = str(e).split(" is corrupt: ", 1)[-1]
        return labels, bad

    def check_labels(self, num_classes: int | None = None) -> None:
        """ValueError (one sentence naming keys, labels and the range) when an image record's label
        is outside ``[0, num_classes)`` (default: the property file's count). Unreadable records and
        non-finite labels are left to the loaders, which skip them as corrupt."""
        c = self.num_classes if num_classes is None else int(num_classes)
        labels, bad = self.scan_labels()
        if bad and len(bad) == len(labels):
            raise RecordIOError(
                f"no image record of {self.rec_path} can be read; run `lafs-fast data verify {self.rec_path}`"
            )
        # non-finite: a damaged header (NaN for unreadable records), skipped by the loaders like any corrupt record
        out = np.flatnonzero(np.isfinite(labels) & ~((labels >= 0) & (labels < c)))
        if out.size:
            shown = ", ".join(f"key {int(self.image_keys[j])} (label {labels[j]:g})" for j in out[:5])
            raise RecordIOError(
                f"{self.rec_path}: {out.size} image record(s) have labels outside [0, {c}) of its "
                f"{'property file' if not self.property.inferred else 'inferred class count'} "
                f"({shown}{', ...' if out.size > 5 else ''}); "
                f"fix num_classes in {self.prop_path} or rebuild the rec"
            )

    def identity_ranges(self) -> list[tuple[int, int]]:
        """``[start, end)`` image-key range of each identity record, in label order (InsightFace layout).

        Without identity records, the ranges are worked out from runs of equal labels.
        """
        if self._identity_ranges is None:
            ranges: list[tuple[int, int]] = []
            if self.header0 is not None:
                a, b = self.header0
                for k in range(a, b):
                    if not self.has_key(k):
                        raise RecordIOError(
                            f"{self.idx_path} lacks identity record {k} of the range [{a}, {b}) in its header; rebuild "
                            "the rec"
                        )
                    ranges.append(self._key_range(self.record(k)[0], k, most=len(self.keys)))
            else:
                labels = self.labels
                keys = self.image_keys
                order = np.argsort(labels, kind="stable")
                if len(order) and not np.array_equal(order, np.arange(len(order))):
                    raise RecordIOError(
                        f"{self.rec_path} has no identity records and its images are not grouped by label; rebuild it "
                        "with `lafs-fast data build`"
                    )
                starts = np.flatnonzero(np.r_[True, labels[1:] != labels[:-1]]) if len(labels) else np.empty(0, int)
                ends = np.r_[starts[1:], len(labels)]
                ranges = [(int(keys[s]), int(keys[e - 1]) + 1) for s, e in zip(starts, ends)]
            self._identity_ranges = ranges
        return self._identity_ranges

    def identities(self) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(label, image keys (n,) int64)`` per identity."""
        for ident, (a, b) in enumerate(self.identity_ranges()):
            keys = np.arange(a, b, dtype=np.int64)
            if self.header0 is None:
                ident = int(self.labels[np.searchsorted(self.image_keys, a)])
            yield ident, keys

    def __iter__(self) -> Iterator[tuple[int, IRHeader, bytes]]:
        """``(key, header, image bytes)`` of every image record, by key."""
        for k in self.image_keys:
            h, data = self.record(int(k))
            yield int(k), h, data

    def bad_keys(self) -> set[int]:
        """Keys listed in ``<rec>.bad`` (written by ``lafs-fast data verify``); empty when absent."""
        p = self.rec_path.with_suffix(self.rec_path.suffix + BAD_SUFFIX)
        if not p.is_file():
            return set()
        return {int(x.split()[0]) for x in p.read_text().splitlines() if x.strip() and not x.startswith("#")}


def swap_marker(rec: Path) -> Path:
    """``<rec>.swap``: the renames of a replacement in progress, one ``temporary<TAB>final`` per line."""
    return rec.with_name(rec.name + ".swap")


def finish_swap(rec: str | os.PathLike) -> bool:
    """Complete the replacement of ``rec`` (and its .idx, property, lafs_fast.json) that a build was
    killed in the middle of: every file listed in the marker is complete, so the renames left are
    done now (idempotent, safe against a concurrent finisher). Returns whether a marker was found."""
    rec = Path(rec)
    marker = swap_marker(rec)
    try:
        lines = marker.read_text().splitlines()
    except FileNotFoundError:
        return False
    finals = {rec.name, rec.with_suffix(".idx").name, "property", META_NAME}
    pairs = [line.split("\t") for line in lines]
    # only the renames a build makes: a planted marker must not rename other files, or out of the folder
    if not all(len(p) == 2 and p[1] in finals and p[0].startswith(p[1] + ".tmp") and "/" not in p[0] for p in pairs):
        raise RecordIOError(
            f"{marker} lists renames no `lafs-fast data build` makes; delete it and rebuild if in doubt"
        )
    try:
        for tmp, final in pairs:
            with contextlib.suppress(FileNotFoundError):  # renamed already (before a kill, or by a concurrent reader)
                os.replace(rec.parent / tmp, rec.parent / final)
        marker.unlink(missing_ok=True)
    except OSError as e:
        raise RecordIOError(
            f"{rec} was being replaced by `lafs-fast data build --overwrite` when that stopped, and the "
            f"renames left ({marker}) cannot be done here ({e.strerror}); open it once where the folder is writable"
        ) from None
    return True
