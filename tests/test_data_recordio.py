"""RecordIO: fixtures written byte by byte from the format spec (not by the writer under test)."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from lafs_fast.data.recordio import (
    CorruptRecordError,
    IRHeader,
    RecordIOError,
    RecordIOReader,
    decode_record,
    encode_record,
    pack,
    unpack,
)
from lafs_fast.data.recordio_writer import RecordIOWriter, write_identity_dataset

MAGIC = b"\x0a\x23\xd7\xce"  # 0xced7230a little-endian


def raw_record(flag: int, label: float, id_: int, id2: int, labels: list[float], data: bytes) -> bytes:
    """One unsplit record, by hand: magic, lrec (cflag 0 | length), IfQQ, float32 labels, data, pad."""
    payload = struct.pack("<I", flag) + struct.pack("<f", label) + struct.pack("<Q", id_) + struct.pack("<Q", id2)
    payload += b"".join(struct.pack("<f", x) for x in labels) + data
    pad = (4 - len(payload) % 4) % 4
    return MAGIC + struct.pack("<I", len(payload)) + payload + b"\x00" * pad


def write_raw(folder: Path, records: dict[int, bytes], order: list[int], prop: str | None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    blob, idx = b"", []
    for k in order:
        idx.append(f"{k}\t{len(blob)}\n")
        blob += records[k]
    (folder / "train.rec").write_bytes(blob)
    (folder / "train.idx").write_text("".join(idx))
    if prop is not None:
        (folder / "property").write_text(prop)
    return folder / "train.rec"


@pytest.fixture
def spec_rec(tmp_path: Path) -> Path:
    """InsightFace layout: 2 identities (3 + 2 images), identity records 6-7, header record 0 LAST
    in the file (as InsightFace writes it); image 4 carries 3 float labels (flag 3); odd data sizes
    exercise the padding."""
    recs = {
        1: raw_record(0, 0.0, 1, 0, [], b"img-one"),
        2: raw_record(0, 0.0, 2, 0, [], b"image-two!"),
        3: raw_record(0, 0.0, 3, 0, [], b"i3"),
        4: raw_record(3, 0.0, 4, 0, [1.0, 0.5, -2.0], b"multi-label"),
        5: raw_record(0, 1.0, 5, 0, [], b"five5"),
        6: raw_record(2, 0.0, 0, 0, [1.0, 4.0], b""),
        7: raw_record(2, 0.0, 0, 0, [4.0, 6.0], b""),
        0: raw_record(2, 0.0, 0, 0, [6.0, 8.0], b""),
    }
    return write_raw(tmp_path / "spec", recs, [1, 2, 3, 4, 5, 6, 7, 0], "2,112,112\n")


def test_reader_reads_hand_made_rec(spec_rec: Path) -> None:
    r = RecordIOReader(spec_rec)
    assert r.header0 == (6, 8)
    assert r.image_keys.tolist() == [1, 2, 3, 4, 5]
    assert r.num_classes == 2 and not r.property.inferred
    h, data = r.record(2)
    assert (h.flag, h.label, h.id, data) == (0, 0.0, 2, b"image-two!")
    h4, d4 = r.record(4)
    assert h4.flag == 3 and np.allclose(h4.label, [1.0, 0.5, -2.0]) and d4 == b"multi-label"
    assert r.labels.tolist() == [0, 0, 0, 1, 1]  # flag>0: the first extra label is the class
    assert r.identity_ranges() == [(1, 4), (4, 6)]
    assert [(label, k.tolist()) for label, k in r.identities()] == [(0, [1, 2, 3]), (1, [4, 5])]
    assert [k for k, _, _ in r] == [1, 2, 3, 4, 5]


def test_writer_bytes_equal_hand_made(tmp_path: Path, spec_rec: Path) -> None:
    """The writer's output is byte-identical to the hand-made file for the same records."""
    with RecordIOWriter(tmp_path / "w") as w:
        for k, flag_labels, data in [
            (1, 0.0, b"img-one"),
            (2, 0.0, b"image-two!"),
            (3, 0.0, b"i3"),
            (4, [1.0, 0.5, -2.0], b"multi-label"),
            (5, 1.0, b"five5"),
        ]:
            w.write(k, IRHeader(0, flag_labels, k, 0), data)
        w.write(6, IRHeader(2, [1.0, 4.0], 0, 0))
        w.write(7, IRHeader(2, [4.0, 6.0], 0, 0))
        w.write(0, IRHeader(2, [6.0, 8.0], 0, 0))
        w.set_property(2, 112, 112)
    assert (tmp_path / "w" / "train.rec").read_bytes() == spec_rec.read_bytes()
    idx = sorted((tmp_path / "w" / "train.idx").read_text().splitlines())
    assert idx == sorted(spec_rec.with_suffix(".idx").read_text().splitlines())
    assert not list((tmp_path / "w").glob("*.tmp*"))  # temporaries renamed away


def test_round_trip_identity_dataset(tmp_path: Path) -> None:
    ids = [[b"a" * 5, b"bb" * 7], [b"c" * 9], [b"d", b"e" * 3, b"f" * 4]]
    counts = write_identity_dataset(tmp_path / "ds", ids, height=112, width=112)
    assert counts == {"identities": 3, "images": 6, "records": 10}
    r = RecordIOReader(tmp_path / "ds")
    assert r.header0 == (7, 10) and r.num_classes == 3
    got = [[r.image(int(k)) for k in keys] for _, keys in r.identities()]
    assert got == ids
    assert r.labels.tolist() == [0, 0, 1, 2, 2, 2]  # one label per identity


def test_continuation_split_matches_spec() -> None:
    """A payload with the magic word at an aligned position splits there (cflag 1 then 3), the word
    dropped; an unaligned occurrence does not split. Checked against bytes laid out by hand."""
    payload = b"ABCD" + MAGIC + b"EFGHIJ"
    enc = encode_record(payload)
    by_hand = (
        MAGIC
        + struct.pack("<I", (1 << 29) | 4)
        + b"ABCD"
        + MAGIC
        + struct.pack("<I", (3 << 29) | 6)
        + b"EFGHIJ"
        + b"\0\0"
    )
    assert enc == by_hand
    assert decode_record(by_hand, 0) == (payload, len(by_hand))
    unaligned = b"AB" + MAGIC + b"C"
    assert encode_record(unaligned)[4:8] == struct.pack("<I", len(unaligned))
    # three parts: first, middle, last
    three = MAGIC + b"xy" + MAGIC[:0] + b"zw" + MAGIC + b"q"
    assert decode_record(encode_record(three), 0)[0] == three


def test_pack_unpack_multilabel() -> None:
    h, data = unpack(pack(IRHeader(0, np.array([3.0, 7.5]), 11, 12), b"jpeg"))
    assert h.flag == 2 and h.label.tolist() == [3.0, 7.5] and (h.id, h.id2, data) == (11, 12, b"jpeg")
    h, data = unpack(pack(IRHeader(0, 4.0, 1, 2), b""))
    assert (h.flag, h.label, data) == (0, 4.0, b"")


def test_truncated_rec_names_file_and_offset(tmp_path: Path, spec_rec: Path) -> None:
    blob = spec_rec.read_bytes()
    spec_rec.write_bytes(blob[:-6])  # cut into record 0, the last one in the file
    with pytest.raises(
        RecordIOError,
        match=r"train\.rec is truncated or damaged at its end \(its last record, key 0: "
        r"the record at offset \d+ declares bytes up to \d+ .*copy the file again",
    ):
        RecordIOReader(spec_rec)


def test_idx_mismatch_names_file_and_offset(spec_rec: Path) -> None:
    idx = spec_rec.with_suffix(".idx")
    lines = idx.read_text().splitlines()
    k, off = lines[1].split("\t")
    lines[1] = f"{k}\t{int(off) + 4}"  # key 2 now points into the middle of a record
    idx.write_text("\n".join(lines) + "\n")
    r = RecordIOReader(spec_rec)
    with pytest.raises(
        CorruptRecordError,
        match=rf"train\.rec key 2 \(offset {int(off) + 4}\) is corrupt: "
        rf"no record starts at offset {int(off) + 4} \(magic",
    ):
        r.record(2)


def test_missing_property_is_inferred(spec_rec: Path) -> None:
    (spec_rec.parent / "property").unlink()
    r = RecordIOReader(spec_rec)
    assert r.property.inferred and r.num_classes == 2  # from the header's identity range


def test_rec_without_header(tmp_path: Path) -> None:
    """A plain rec (no record 0 header): every record is an image; ranges from label runs."""
    recs = {k: raw_record(0, float(k // 3), k, 0, [], b"x" * k) for k in range(1, 7)}
    rec = write_raw(tmp_path / "plain", recs, list(range(1, 7)), None)
    r = RecordIOReader(rec)
    assert r.header0 is None and r.image_keys.tolist() == [1, 2, 3, 4, 5, 6]
    assert r.num_classes == 3 and r.property.inferred
    assert r.identity_ranges() == [(1, 3), (3, 6), (6, 7)]


def test_writer_refuses_overwrite_and_aborts_cleanly(tmp_path: Path) -> None:
    write_identity_dataset(tmp_path / "ds", [[b"a"]], height=112, width=112)
    with pytest.raises(FileExistsError, match="--overwrite"):
        RecordIOWriter(tmp_path / "ds")
    with pytest.raises(RuntimeError), RecordIOWriter(tmp_path / "new") as w:
        w.write(1, IRHeader(0, 0.0, 1, 0), b"x")
        raise RuntimeError("interrupted")
    assert not (tmp_path / "new" / "train.rec").exists() and not list((tmp_path / "new").iterdir())


def test_bad_idx_line_is_named(spec_rec: Path) -> None:
    idx = spec_rec.with_suffix(".idx")
    idx.write_text(idx.read_text() + "9\tnot-a-number\n")
    with pytest.raises(RecordIOError, match=r"train\.idx line 9 is not `key<TAB>offset`"):
        RecordIOReader(spec_rec)


OLD = [[b"old-a1", b"old-a2"], [b"old-b1"]]
NEW = [[b"new-x1"], [b"new-y1", b"new-y2", b"new-y3"], [b"new-z1" * 3]]


@pytest.mark.parametrize("renames_before_kill", [0, 1, 2, 3, 4])
def test_overwrite_killed_between_renames_never_pairs_new_rec_with_old_idx(
    tmp_path: Path, monkeypatch, renames_before_kill: int
) -> None:
    """`data build --overwrite` killed after N renames (os.replace raising on call N+1): the next
    reader sees the old dataset or the new one whole (rec, idx, property), never a mix."""
    import os

    from lafs_fast.data import recordio

    write_identity_dataset(tmp_path / "ds", OLD, height=112, width=112)
    real, calls = os.replace, []

    def killed(src, dst):
        if len(calls) == renames_before_kill:
            raise KeyboardInterrupt("killed between renames")
        calls.append(dst)
        real(src, dst)

    monkeypatch.setattr(recordio.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        write_identity_dataset(tmp_path / "ds", NEW, height=112, width=112, overwrite=True)
    monkeypatch.setattr(recordio.os, "replace", real)
    r = RecordIOReader(tmp_path / "ds")
    got = [[r.image(int(k)) for k in keys] for _, keys in r.identities()]
    assert got in (OLD, NEW) and r.num_classes == len(got)
    if renames_before_kill >= 1:  # the swap was committed (its marker written): the new dataset, whole
        assert got == NEW
    assert not list((tmp_path / "ds").glob("*.swap")) and not list((tmp_path / "ds").glob("*.tmp*"))


def test_writer_refuses_a_key_written_twice_and_leaves_nothing(tmp_path: Path) -> None:
    w = RecordIOWriter(tmp_path / "dup")
    w.write(1, IRHeader(0, 0.0, 1, 0), b"a")
    w.write(1, IRHeader(0, 0.0, 1, 0), b"b")
    with pytest.raises(ValueError, match="key 1 written twice"):
        w.close()
    assert not list((tmp_path / "dup").iterdir())
