"""Small files that inflate (issue 25, item 2): every parser of a user's file refuses, in one
sentence, a file that would allocate far more than its own size, before allocating it.

Each case is a probe of the issue: before the fix it loaded (or crashed) while allocating
hundreds of MB or more; here it is refused at once.
"""

import io
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from lafs_fast.cli import main
from lafs_fast.config import load_config
from lafs_fast.data.binfile import UnsafePickleError, load_bin
from lafs_fast.dense_landmarks import LandmarkSidecar
from lafs_fast.io import MAX_LOAD_ENV, safe_load


def deflated_checkpoint(path: Path, numel: int) -> Path:
    """A valid PyTorch checkpoint ``{"w": zeros(numel)}`` whose tensor data is deflated: a few
    hundred KB on disk for ``4 * numel`` bytes once loaded. Written in 1 MB chunks (no copy of it
    in memory here); the pickle of a 65793-element save is patched to declare ``numel``."""
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(65793)}, buf)  # 65793 = 0x010101: a BININT no other field holds
    src = zipfile.ZipFile(buf)
    with zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            if info.filename.endswith("/data/0"):
                member = zipfile.ZipInfo(info.filename)
                member.compress_type = zipfile.ZIP_DEFLATED
                with dst.open(member, "w", force_zip64=True) as f:
                    for start in range(0, 4 * numel, 1 << 20):
                        f.write(bytes(min(1 << 20, 4 * numel - start)))
                continue
            data = src.read(info)
            if info.filename.endswith("/data.pkl"):
                data = data.replace(b"J\x01\x01\x01\x00", b"J" + numel.to_bytes(4, "little"))
            dst.writestr(info.filename, data)
    return path


# -------------------------------------------------------------------------------------- checkpoints


def test_deflated_checkpoint_is_refused_before_it_unpacks(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(MAX_LOAD_ENV, raising=False)
    path = deflated_checkpoint(tmp_path / "bomb.pt", 20_000_000)  # 80 MB of zeros in about 80 KB
    assert path.stat().st_size < 200_000
    with pytest.raises(ValueError, match=r"unpack to 76 MiB, more than the 64 MiB allowed") as e:
        safe_load(path)
    assert "\n" not in str(e.value) and MAX_LOAD_ENV in str(e.value)
    assert main(["checkpoint", "show", str(path)]) == 2  # the command: one line, exit 2
    err = capsys.readouterr().err
    assert "refusing to load checkpoint" in err and len(err.strip().splitlines()) == 1


def test_the_cap_can_be_raised_for_a_trusted_file(tmp_path, monkeypatch):
    path = deflated_checkpoint(tmp_path / "big.pt", 20_000_000)
    monkeypatch.setenv(MAX_LOAD_ENV, str(100 << 20))
    assert safe_load(path)["w"].shape == (20_000_000,)
    monkeypatch.setenv(MAX_LOAD_ENV, "lots")
    with pytest.raises(ValueError, match=f"{MAX_LOAD_ENV}='lots' is not a number of bytes"):
        safe_load(path)


def test_an_ordinary_checkpoint_still_loads(tmp_path, monkeypatch):
    monkeypatch.delenv(MAX_LOAD_ENV, raising=False)
    torch.save({"w": torch.arange(6.0)}, tmp_path / "ok.pt")
    assert safe_load(tmp_path / "ok.pt")["w"].tolist() == [0, 1, 2, 3, 4, 5]


def test_sidecar_member_declaring_more_than_it_holds_is_refused(tmp_path):
    """A compressed member whose .npy header claims 10^12 points: numpy would allocate them."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (10**11, 5, 2)})
    path = tmp_path / "x.landmarks.npz"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("keys.npy", _npy(np.arange(3)))
        z.writestr("points.npy", b"\x93NUMPY\x01\x00" + header.getvalue()[8:] + bytes(64))
    with pytest.raises(ValueError, match=r"not a landmark sidecar .*declares \(100000000000, 5, 2\)"):
        LandmarkSidecar.load(path)


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------- YAML


def test_yaml_alias_bomb_is_refused(tmp_path):
    """Aliases nest: 9 levels of 9 make 387 M strings from 300 bytes (the issue's 425-byte file ran
    59 s to 2.4 GB). Refused at the first alias, whatever the depth."""
    lines = ['a0: &a0 ["x","x","x","x","x","x","x","x","x"]']
    lines += [f"a{i}: &a{i} [{','.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    (tmp_path / "bomb.yaml").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"bomb.yaml is not valid YAML: uses the alias \*a0; write the value out"):
        load_config("small", tmp_path / "bomb.yaml")


def test_yaml_alias_inside_a_section_is_refused(tmp_path):
    (tmp_path / "c.yaml").write_text("model: {dim: &d 64}\nviews: {global_tokens: *d}\n")
    with pytest.raises(ValueError, match=r"uses the alias \*d; .*\(line 2, column 24\)"):
        load_config("small", tmp_path / "c.yaml")


def test_yaml_nesting_and_huge_numbers_are_one_sentence(tmp_path):
    cases = {
        "model: " + "[" * 5000: "nests too deeply",  # the composer recursed into a RecursionError
        "model: {dim: 1" + "0" * 400 + "}": "expects an integer, got one of 401 digits",  # OverflowError
        "model: {dim: 1" + "0" * 5000 + "}": "Exceeds the limit",  # Python's int-string limit
    }
    for text, why in cases.items():
        (tmp_path / "c.yaml").write_text(text)
        with pytest.raises(ValueError, match=why) as e:
            load_config("small", tmp_path / "c.yaml")
        assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------- .bin


class _Call:
    """Pickles to ``func(*args)``: a crafted .bin's constructor call."""

    def __init__(self, func, *args) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


def test_bin_numpy_integer_sizes_count_against_the_budget(tmp_path):
    """``bytearray(np.int64(600_000_000))``: 245 bytes that allocated 600 MB (the budget only
    counted Python ints)."""
    data = pickle.dumps(([_Call(bytearray, np.int64(600_000_000))] * 2, [True]), protocol=2)
    assert len(data) < 300
    (tmp_path / "n.bin").write_bytes(data)
    with pytest.raises(UnsafePickleError, match="refusing to build bytearray\\(\\) of 600000000 bytes"):
        load_bin(tmp_path / "n.bin")


def test_bin_repeated_references_count_against_the_budget(tmp_path):
    """One 125 KB bytearray listed 10,000 times: 150 KB of file, 1.25 GB of copies (and decodes)."""
    one = bytearray(b"\xff\xd8" + bytes(125_000))
    (tmp_path / "r.bin").write_bytes(pickle.dumps(([one] * 10_000, [True] * 5_000), protocol=4))
    with pytest.raises(UnsafePickleError, match="another copy of an object it refers to again"):
        load_bin(tmp_path / "r.bin")


def test_bin_nested_issame_is_refused_before_numpy_expands_it(tmp_path):
    """issame as lists of lists of one shared list: a few KB that np.asarray would expand to 10^9 values."""
    inner = [True] * 1000
    middle = [inner] * 1000
    (tmp_path / "s.bin").write_bytes(pickle.dumps(([b"\xff\xd8"] * 2, [middle] * 1000), protocol=4))
    with pytest.raises(ValueError, match="refers to again|values other than true / false"):
        load_bin(tmp_path / "s.bin")


def test_bin_with_distinct_images_still_loads(tmp_path):
    images = [bytearray(b"\xff\xd8" + bytes([i]) * 1000) for i in range(4)]
    (tmp_path / "ok.bin").write_bytes(pickle.dumps((images, [True, False]), protocol=2))
    bs = load_bin(tmp_path / "ok.bin")
    assert bs.num_pairs == 2 and bs.images[3] == bytes(images[3])
