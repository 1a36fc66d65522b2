"""`lafs-fast data overlap`: identities shared by name and near-duplicate images (perceptual hash)
between a training set and an evaluation set."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lafs_fast.cli import main
from lafs_fast.data.binfile import write_bin
from lafs_fast.data.folder import build_rec
from lafs_fast.data.overlap import HASH_BITS, near_duplicates


def _face(rng: np.random.Generator) -> Image.Image:
    """A smooth random 112x112 RGB image (upsampled 8x8 noise): distinct ones share no structure."""
    return Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((112, 112), Image.BICUBIC)


def _copy(path: Path) -> bytes:
    """The photo at ``path`` as a copy would look: resized 112 -> 100 -> 112, JPEG quality 70."""
    im = Image.open(path).convert("RGB").resize((100, 100), Image.BILINEAR).resize((112, 112), Image.BILINEAR)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=70)
    return buf.getvalue()


@pytest.fixture
def sets(tmp_path: Path) -> tuple[Path, Path]:
    """(train rec with names Alice, Bob, Carol; eval folder: 'alice' (new photos), Dave (new photos
    plus a re-encoded, resized copy of Bob's first photo))."""
    rng = np.random.default_rng(0)
    for name in ("Alice", "Bob", "Carol"):
        (tmp_path / "train" / name).mkdir(parents=True)
        for j in range(3):
            _face(rng).save(tmp_path / "train" / name / f"{j}.png")
    build_rec(tmp_path / "train", tmp_path / "rec", progress=False)
    for name in ("alice", "Dave"):
        (tmp_path / "eval" / name).mkdir(parents=True)
        for j in range(2):
            _face(rng).save(tmp_path / "eval" / name / f"{j}.png")
    (tmp_path / "eval" / "Dave" / "copy.jpg").write_bytes(_copy(tmp_path / "train" / "Bob" / "0.png"))
    return tmp_path / "rec", tmp_path / "eval"


def test_overlap_names_shared_identities_and_copies(sets: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    rec, evaluation = sets
    assert main(["data", "overlap", str(rec), str(evaluation)]) == 0
    out = capsys.readouterr().out
    assert "identities shared by name: 1: Alice (train 3, eval 2)" in out
    assert "1 eval image(s) have one among 1 train image(s)" in out
    assert "train key 4 (Bob) ~ eval Dave/copy.jpg (Dave)" in out and out.rstrip().endswith("overlap found")
    assert main(["data", "overlap", str(rec), str(evaluation), "--fail-on-overlap", "--json"]) == 1
    rep = json.loads(capsys.readouterr().out)
    assert [d["name"] for d in rep["shared_identities"]] == ["Alice"] and len(rep["near_duplicates"]) == 1
    assert rep["near_duplicates"][0]["distance"] <= 24 < rep["hash_bits"] == HASH_BITS
    # a .bin carries no names: only the images are compared, and fresh photos are no duplicates
    fresh = [(evaluation / "Dave" / f"{j}.png").read_bytes() for j in range(2)]
    write_bin(tmp_path / "fresh.bin", fresh, [True])
    assert main(["data", "overlap", str(rec), str(tmp_path / "fresh.bin"), "--fail-on-overlap"]) == 0
    out = capsys.readouterr().out
    assert "identities by name: not compared" in out and "0 eval image(s)" in out
    assert out.rstrip().endswith("no overlap found")
    assert main(["data", "overlap", str(rec), str(tmp_path / "nope")]) == 2
    assert main(["data", "overlap", str(rec), str(evaluation), "--max-distance", "200"]) == 2
    assert "--max-distance must be in [0, 64]" in capsys.readouterr().err


def test_near_duplicates_hamming_distances() -> None:
    """Packed hashes differing in k bits are k apart; only pairs within max_distance come back."""
    rng = np.random.default_rng(1)
    bits = rng.integers(0, 2, (3, HASH_BITS)).astype(bool)
    other = bits.copy()
    other[0, :5] ^= True  # 5 bits from bits[0]
    other[1] = ~bits[1]  # as far as can be
    got = near_duplicates(np.packbits(bits, axis=1), np.packbits(other, axis=1), 10)
    assert (0, 0, 5) in got and (2, 2, 0) in got and not any(j == 1 for _, j, _ in got)


def test_threshold_on_real_faces_separates_copies_from_other_people() -> None:
    """The default --max-distance (24) on aligned celeb24 faces: every copy (resized, JPEG 70,
    +10 % brightness) of 16 people's photos stays within it, and no photo of the other 8 people
    comes within it of any of them (the module doc's figures, on a sample)."""
    from PIL import ImageEnhance

    from lafs_fast.data.overlap import _grey64, perceptual_hashes
    from tests import SHARED

    root = SHARED / "data" / "celeb24"
    if not root.is_dir():
        pytest.skip("../shared/data/celeb24 not present (a user's clone has no shared/)")
    people = sorted(p for p in root.iterdir() if p.is_dir())
    train = [f for p in people[:16] for f in sorted(p.glob("*.jpg"))[::8]]
    held = [f for p in people[16:] for f in sorted(p.glob("*.jpg"))[::8]]

    def copy(f: Path) -> bytes:
        im = ImageEnhance.Brightness(Image.open(f).convert("RGB")).enhance(1.1)
        buf = io.BytesIO()
        im.resize((96, 96), Image.BILINEAR).resize((112, 112), Image.BILINEAR).save(buf, format="JPEG", quality=70)
        return buf.getvalue()

    def hashes(datas: list[bytes]) -> np.ndarray:
        return np.packbits(perceptual_hashes(np.stack([_grey64(d, False) for d in datas])), axis=1)

    a = hashes([f.read_bytes() for f in train])
    copies = near_duplicates(a, hashes([copy(f) for f in train]), 24)
    assert len(train) > 600 and {(i, i) for i in range(len(train))} <= {(i, j) for i, j, _ in copies}
    assert near_duplicates(a, hashes([f.read_bytes() for f in held]), 24) == []
