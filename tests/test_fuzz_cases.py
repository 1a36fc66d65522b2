"""The crashes tests/test_fuzz.py found, each kept as a fixed case with its bytes (issue 25, item 6):
before its fix each raised something other than a one-sentence user error. These run without
hypothesis."""

from pathlib import Path

import pytest

from lafs_fast.data.recordio import RecordIOError, RecordIOReader

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


def test_idx_number_past_64_bits(tmp_path):
    """An .idx offset of 2^63 passed the digit check and crashed numpy's int64 conversion
    (OverflowError: Python int too large to convert to C long)."""
    with pytest.raises(RecordIOError, match=r"train.idx line 1 holds a number past 64 bits: '0\\t9223372036854775808'"):
        RecordIOReader(_rec(tmp_path, _REC_INF_LABEL, b"0\t9223372036854775808\n\n"))
