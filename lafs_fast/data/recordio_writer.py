"""Writing InsightFace RecordIO (the format is ``recordio.py``'s): :class:`RecordIOWriter` (records,
``.idx``, ``property`` and our ``lafs_fast.json``, replaced atomically through the swap marker),
:class:`IdentityRecWriter` (images grouped by identity, with the header and identity records the
reference's readers expect) and :func:`write_identity_dataset`."""

from __future__ import annotations

import json
import os
import tempfile
from array import array
from pathlib import Path

import numpy as np

from lafs_fast.data.recordio import META_NAME, IRHeader, encode_record, finish_swap, pack, rec_paths, swap_marker
from lafs_fast.io import _umask

__all__ = ["RecordIOWriter", "IdentityRecWriter", "write_identity_dataset"]


def _temp_beside(path: Path) -> tuple[int, Path]:
    """``(descriptor, path)`` of a new empty temporary file beside ``path`` (``<name>.tmp<random>``),
    made by ``mkstemp`` (``O_EXCL | O_NOFOLLOW``: a link planted under the old guessable
    ``.tmp<pid>`` name received the rec) and written through that descriptor only, with the mode a
    plain ``open`` gives, not mkstemp's 0600."""
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".tmp", dir=path.parent)
    os.fchmod(fd, 0o666 & ~_umask())
    return fd, Path(tmp)


def _write_text_beside(path: Path, chunks, made: list[Path]) -> Path:
    """Write ``chunks`` (strings) to a new temporary beside ``path``, fsync'ed; its path is appended
    to ``made`` as soon as it exists (so a failure deletes it) and returned."""
    fd, tmp = _temp_beside(path)
    made.append(tmp)
    with os.fdopen(fd, "w") as f:
        for chunk in chunks:
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    return tmp


class RecordIOWriter:
    """Writes ``.rec`` + ``.idx`` (+ ``property`` and our ``lafs_fast.json``) atomically.

    Everything goes to temporary names in the output folder; :meth:`close` renames them into place
    through a marker file, so an interrupted build leaves no half-written dataset and a kill between
    two renames (``--overwrite``) leaves no new .rec beside an old .idx. Use as a context manager: an exception
    inside the ``with`` deletes the temporaries instead.
    """

    def __init__(self, out: str | os.PathLike, *, overwrite: bool = False) -> None:
        self.rec_path, self.idx_path, self.prop_path = rec_paths(
            out if str(out).endswith(".rec") else Path(out) / "train.rec"
        )
        self.rec_path.parent.mkdir(parents=True, exist_ok=True)
        finish_swap(self.rec_path)
        if self.rec_path.exists() and not overwrite:
            raise FileExistsError(f"{self.rec_path} already exists; choose another output or pass --overwrite")
        fd, self._tmp_rec = _temp_beside(self.rec_path)
        self._rec = os.fdopen(fd, "wb")  # written record by record, closed by close()
        # 16 bytes a record (a list of tuples and a set of keys cost ~200: 1 GB at WebFace4M scale)
        self._keys, self._offsets = array("q"), array("q")
        self._extra: dict[Path, str] = {}

    def write_idx(self, key: int, payload: bytes) -> int:
        """Append one record (payload from :func:`pack`) under ``key``; returns its offset. A key
        written twice is refused at :meth:`close` (before anything is renamed)."""
        offset = self._rec.tell()
        self._rec.write(encode_record(payload))
        self._keys.append(int(key))
        self._offsets.append(offset)
        return offset

    def write(self, key: int, header: IRHeader, data: bytes = b"") -> int:
        return self.write_idx(key, pack(header, data))

    def set_property(self, num_classes: int, height: int, width: int) -> None:
        self._extra[self.prop_path] = f"{num_classes},{height},{width}\n"

    def set_meta(self, meta: dict) -> None:
        self._extra[self.rec_path.parent / META_NAME] = json.dumps(meta, indent=1) + "\n"

    def close(self) -> None:
        """Flush every output under its temporary name, then swap them all into place through a
        marker (:func:`finish_swap`): a kill between two renames never pairs a new .rec with an old
        .idx, because the next reader (or build) completes the swap first."""
        self._rec.flush()
        os.fsync(self._rec.fileno())
        self._rec.close()
        keys, offsets = np.frombuffer(self._keys, dtype=np.int64), np.frombuffer(self._offsets, dtype=np.int64)
        order = np.argsort(keys, kind="stable")
        keys, offsets = keys[order], offsets[order]
        if len(keys) > 1 and (np.diff(keys) == 0).any():
            self.abort()
            raise ValueError(f"key {int(keys[np.flatnonzero(np.diff(keys) == 0)[0]])} written twice to {self.rec_path}")
        made: list[Path] = []  # temporaries of this close, deleted if it fails before the commit
        try:

            def idx_lines():  # in slices: no string per record held for millions of records
                for a in range(0, len(keys), 1 << 16):
                    pairs = zip(keys[a : a + (1 << 16)].tolist(), offsets[a : a + (1 << 16)].tolist())
                    yield "".join(f"{k}\t{o}\n" for k, o in pairs)

            swaps = [
                (self._tmp_rec, self.rec_path),
                (_write_text_beside(self.idx_path, idx_lines(), made), self.idx_path),
            ]
            swaps += [(_write_text_beside(path, [text], made), path) for path, text in self._extra.items()]
            marker = swap_marker(self.rec_path)
            tmp_marker = _write_text_beside(marker, [f"{a.name}\t{b.name}\n" for a, b in swaps], made)
            os.replace(tmp_marker, marker)  # from here on the new dataset is committed
        except BaseException:  # not committed: the old dataset stays, the temporaries go
            for p in (self._tmp_rec, *made):
                p.unlink(missing_ok=True)
            raise
        finish_swap(self.rec_path)

    def abort(self) -> None:
        """Delete the temporaries (before the swap began); nothing is left behind."""
        self._rec.close()
        if swap_marker(self.rec_path).is_file():
            return  # the new dataset is committed: finish_swap completes it
        self._tmp_rec.unlink(missing_ok=True)

    def __enter__(self) -> RecordIOWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class IdentityRecWriter:
    """Streams an InsightFace face rec: images keys 1..N grouped by identity (ONE label per identity:
    its index), then one identity record per identity with its ``[start, end)`` key range, then
    header record 0 holding the identity-record range (InsightFace's layout; record 0 written last,
    as theirs). Images go to disk as they come, so a dataset never has to fit in memory.

    ``add(data, group)``: append an image of source group ``group`` (any hashable; consecutive
    images of one group form one identity, so an identity whose images all failed upstream simply
    never appears and the labels stay contiguous). ``finish(height, width, meta)`` writes the rest
    and renames everything into place; ``abort()`` leaves nothing behind.
    """

    def __init__(self, out: str | os.PathLike, *, overwrite: bool = False) -> None:
        self.writer = RecordIOWriter(out, overwrite=overwrite)
        self.key = 1
        self.ranges: list[tuple[int, int]] = []
        self._group: object = object()

    def add(self, data: bytes, group) -> int:
        """Write one image; returns its label."""
        if group != self._group or not self.ranges:
            self._group = group
            self.ranges.append((self.key, self.key))
        label = len(self.ranges) - 1
        self.writer.write(self.key, IRHeader(0, float(label), self.key, 0), data)
        self.key += 1
        self.ranges[-1] = (self.ranges[-1][0], self.key)
        return label

    def finish(self, *, height: int, width: int, meta: dict | None = None) -> dict:
        w = self.writer
        try:
            key = self.key
            id_start = key
            for a, b in self.ranges:
                w.write(key, IRHeader(2, np.array([a, b], np.float32), 0, 0))
                key += 1
            w.write(0, IRHeader(2, np.array([id_start, key], np.float32), 0, 0))
            w.set_property(len(self.ranges), height, width)
            w.set_meta({"color_order": "RGB", "builder": "lafs-fast", **(meta or {})})
        except BaseException:
            w.abort()
            raise
        w.close()
        return {"identities": len(self.ranges), "images": id_start - 1, "records": key}

    def abort(self) -> None:
        self.writer.abort()


def write_identity_dataset(
    out: str | os.PathLike,
    identities: list[list[bytes]],
    *,
    height: int,
    width: int,
    meta: dict | None = None,
    overwrite: bool = False,
) -> dict:
    """Write an InsightFace face rec from ``identities[i]`` = the encoded images of identity i
    (non-empty), with :class:`IdentityRecWriter`. Returns counts."""
    iw = IdentityRecWriter(out, overwrite=overwrite)
    try:
        for label, images in enumerate(identities):
            if not images:
                raise ValueError(f"identity {label} has no image; leave it out")
            for data in images:
                iw.add(data, label)
    except BaseException:
        iw.abort()
        raise
    return iw.finish(height=height, width=width, meta=meta)
