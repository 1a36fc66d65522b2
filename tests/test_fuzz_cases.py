"""The crashes tests/test_fuzz.py found, each kept as a fixed case with its bytes (issue 25, item 6):
before its fix each raised something other than a one-sentence user error. These run without
hypothesis."""

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from lafs_fast.config import load_config
from lafs_fast.data.binfile import load_bin
from lafs_fast.data.recordio import IRHeader, RecordIOError, RecordIOReader, encode_record, pack
from lafs_fast.dense_landmarks import LandmarkSidecar
from lafs_fast.io import safe_load

# two plain records (IRHeader flag 0), labels 0.0 and +inf, at offsets 0 and 32
_REC_INF_LABEL = (
    b"\n#\xd7\xce\x18\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"
    b"\x00\x00\x00\x00\n#\xd7\xce\x18\x00\x00\x00\x00\x00\x00\x00\x00\x00\x80\x7f\x02\x00\x00\x00\x00\x00\x00\x00"
    b"\x00\x00\x00\x00\x00\x00\x00\x00"
)


def _rec(folder: Path, rec: bytes, idx: bytes) -> Path:
    (folder / "train.rec").write_bytes(rec)
    (folder / "train.idx").write_bytes(idx)
    return folder / "train.rec"


def test_infinite_label_without_property_file(tmp_path):
    """The class count inferred without a property file took int(max label): OverflowError for +inf.
    The infinite label is a damaged record, left to the loaders; the count comes from the others."""
    with RecordIOReader(_rec(tmp_path, _REC_INF_LABEL, b"1\t0\n2\t32\n")) as r:
        assert r.num_classes == 1 and r.property.inferred


def test_infinite_label_is_a_corrupt_record_not_a_garbage_class(tmp_path):
    """The per-image labels cast +inf to int64 (-2^63, with only numpy's RuntimeWarning): the first
    record whose label is no class index is named as corrupt instead."""
    from lafs_fast.data.recordio import CorruptRecordError

    reader = RecordIOReader(_rec(tmp_path, _REC_INF_LABEL, b"1\t0\n2\t32\n"))
    with reader, pytest.raises(CorruptRecordError, match=r"key 2 \(offset 32\) is corrupt: its label inf is not"):
        _ = reader.labels


def test_idx_number_past_64_bits(tmp_path):
    """An .idx offset of 2^63 passed the digit check and crashed numpy's int64 conversion
    (OverflowError: Python int too large to convert to C long)."""
    with pytest.raises(RecordIOError, match=r"train.idx line 1 holds a number past 64 bits: '0\\t9223372036854775808'"):
        RecordIOReader(_rec(tmp_path, _REC_INF_LABEL, b"0\t9223372036854775808\n\n"))


def _npz(path: Path, compression: int, old: bytes, new: bytes) -> Path:
    """A two-member sidecar .npz whose ``keys.npy`` header has ``old`` replaced by ``new``."""
    members = {}
    for name, a in (("keys", np.arange(3)), ("points", np.zeros((3, 5, 2), np.float32))):
        buf = io.BytesIO()
        np.save(buf, a)
        members[name] = buf.getvalue()
    members["keys"] = members["keys"].replace(old, new, 1)
    with zipfile.ZipFile(path, "w", compression) as z:
        for name, data in members.items():
            z.writestr(f"{name}.npy", data)
    return path


@pytest.mark.parametrize(
    ("compression", "old", "new", "found"),
    [
        (zipfile.ZIP_STORED, b"{'de", bytes(4), "header is damaged \\(TokenError\\)"),  # numpy tokenizes the header
        (zipfile.ZIP_DEFLATED, b"), }", b"),  ", "header is damaged \\(TokenError\\)"),  # an unclosed brace
        (
            zipfile.ZIP_DEFLATED,
            None,
            None,
            "error: Error -3 while decompressing data: invalid block type",
        ),  # zlib.error
    ],
)
def test_sidecar_with_a_damaged_member(tmp_path, compression, old, new, found):
    """numpy parses an .npy header as a Python literal, and zipfile leaves a damaged deflate stream
    to zlib: a damaged header raised tokenize.TokenError, damaged compressed data zlib.error, out of
    LandmarkSidecar.load instead of its one sentence."""
    path = tmp_path / "s.landmarks.npz"
    if old is None:  # the first member's deflate stream starts with a block of the reserved type 3
        data = bytearray(_npz(path, compression, b"", b"").read_bytes())
        data[30 + len("keys.npy")] = 0b111  # BFINAL 1, BTYPE 11
        path.write_bytes(bytes(data))
    else:
        _npz(path, compression, old, new)
    with pytest.raises(ValueError, match=f"is not a landmark sidecar .*{found}"):
        LandmarkSidecar.load(path)


def test_yaml_with_a_control_character_is_one_line(tmp_path):
    """yaml's reader error spans two lines ("... not allowed" then "in <unicode string>, position 0")."""
    (tmp_path / "c.yaml").write_bytes(b"\x1f")
    with pytest.raises(ValueError, match="not valid YAML: unacceptable character #x001f") as e:
        load_config("small", tmp_path / "c.yaml")
    assert "\n" not in str(e.value)


def _insightface_rec(folder: Path, header: list[float], identity: list[float]) -> Path:
    """Record 0 the header ``[first identity record, end)``, image record 1 (label 0), identity
    record 2 holding ``identity`` as its ``[start, end)`` image keys."""
    records = [
        (0, pack(IRHeader(0, header, 0, 0))),
        (1, pack(IRHeader(0, 0.0, 1, 0), b"\xff\xd8")),
        (2, pack(IRHeader(0, identity, 0, 0))),
    ]
    rec, idx = bytearray(), ""
    for key, payload in records:
        idx += f"{key}\t{len(rec)}\n"
        rec += encode_record(payload)
    (folder / "property").write_text("1,112,112\n")
    return _rec(folder, bytes(rec), idx.encode())


def test_infinite_identity_range_in_the_header(tmp_path):
    """A header record whose range starts at +inf: int(inf) raised OverflowError opening the rec."""
    with pytest.raises(RecordIOError, match=r"key 0 should hold a \[start, end\) range of record keys .*\[inf, 3.0\]"):
        RecordIOReader(_insightface_rec(tmp_path, [float("inf"), 3.0], [1.0, 2.0]))


def test_identity_range_of_a_billion_keys(tmp_path):
    """An identity record claiming keys [1, 1e9): identities() allocated np.arange of 8 GB."""
    r = RecordIOReader(_insightface_rec(tmp_path, [2.0, 3.0], [1.0, 1e9]))
    with pytest.raises(RecordIOError, match=r"key 2 should hold a \[start, end\) range .*\[1.0, 1000000000.0\]"):
        list(r.identities())
    r.close()


def test_flag_past_uint32_in_the_label_scan(tmp_path):
    """Found by LAFS_TEST_FUZZ=1: an IRHeader flag of 2^31 - 1 in a 24-byte payload. The exact
    reader refuses the record (it would need 8 GB of labels); the vectorised scan computed 4 * flag
    in uint32, which wrapped, and read a label from the next record's bytes (fixed by issue 25 item 3,
    the header flag read as the format defines it)."""
    payload = pack(IRHeader(0, 0.0, 1, 0))
    payload = (0x7FFFFFFF).to_bytes(4, "little") + payload[4:]
    rec = encode_record(payload) + encode_record(pack(IRHeader(0, 1.0, 2, 0)))
    with RecordIOReader(_rec(tmp_path, rec, b"1\t0\n2\t32\n")) as r:
        labels, bad = r.scan_labels()
        assert 1 in bad and np.isnan(labels[0])


def test_bin_error_text_with_a_newline_is_one_line(tmp_path):
    """Found by LAFS_TEST_FUZZ=1: numpy's scalar() fed the string '\\x01\\n' raised a ValueError
    quoting it, and load_bin's sentence carried the newline into a second line."""
    data = (
        b"\x80\x00]q\x00J\x00\x00\x00\x00J\x00\x00\x00\x00cnumpy.core.multiarray\nscalar\nq\x00cnumpy\ndtype\nq\x00X"
        b"\x02\x00\x00\x00\x00\x00K\x00q\x00q\x00q\x00X\x00\x00\x00\x00q\x00J\x00\x00\x00\x00J\x00\x00\x00\x00K\x00q"
        b"\x00c_codecs\nencode\nq\x00X\x08\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00q\x00X\x06\x00\x00\x00\x00\x00"
        b"\x00\x00\x00\x00F\x01\n"
    )
    (tmp_path / "x.bin").write_bytes(data)
    with pytest.raises(ValueError, match="is not a readable verification .bin") as e:
        load_bin(tmp_path / "x.bin")
    assert "\n" not in str(e.value)


def _set_zip_field(data: bytes, signature: bytes, at: int, value: int) -> bytes:
    """``data`` with the 2-byte field ``at`` bytes into every zip header starting with ``signature`` set."""
    out, start = bytearray(data), 0
    while (start := out.find(signature, start)) >= 0:
        out[start + at : start + at + 2] = value.to_bytes(2, "little")
        start += 4
    return bytes(out)


def test_checkpoint_of_a_zip_version_zipfile_cannot_read(tmp_path):
    """Found by LAFS_TEST_FUZZ=1: a central directory asking for zip version 6.4 made zipfile raise
    NotImplementedError in the unpacked-size check; such a file is refused, unchecked sizes unread."""
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(3)}, buf)
    (tmp_path / "m.pt").write_bytes(_set_zip_field(buf.getvalue(), b"PK\x01\x02", 6, 64))
    with pytest.raises(
        ValueError, match=r"its zip directory cannot be read \(NotImplementedError: zip file version 6.4"
    ):
        safe_load(tmp_path / "m.pt")


def test_sidecar_with_an_unknown_compression_method(tmp_path):
    """Found by LAFS_TEST_FUZZ=1: zipfile raises NotImplementedError opening a member of a method it
    lacks (here 99, in both headers), which escaped LandmarkSidecar.load."""
    path = _npz(tmp_path / "s.landmarks.npz", zipfile.ZIP_STORED, b"", b"")
    data = _set_zip_field(path.read_bytes(), b"PK\x03\x04", 8, 99)
    path.write_bytes(_set_zip_field(data, b"PK\x01\x02", 10, 99))
    with pytest.raises(ValueError, match="is not a landmark sidecar .*NotImplementedError: That compression method"):
        LandmarkSidecar.load(path)
