"""Synthetic faces, subsets, the `lafs-fast data` CLI, and ORL end to end."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lafs_fast.cli import main
from lafs_fast.data import RecordIOReader, SyntheticFaces, make_loader
from lafs_fast.data.recordio_writer import write_identity_dataset
from lafs_fast.data.subsets import make_subset


def test_synthetic_is_deterministic_and_identity_structured() -> None:
    a, b = SyntheticFaces(6, 4, seed=1), SyntheticFaces(6, 4, seed=1)
    x, y = a.batch(range(24))
    assert x.shape == (24, 112, 112, 3) and x.dtype == torch.uint8 and y.tolist() == [i // 4 for i in range(24)]
    assert torch.equal(x, b.batch(range(24))[0])
    img, lab = a[9]
    assert isinstance(img, np.ndarray) and np.array_equal(img, x[9].numpy()) and lab == 2  # batch == one by one
    assert not torch.equal(x, SyntheticFaces(6, 4, seed=2).batch(range(24))[0])
    # learnable but not trivial: images of one identity differ, and sit closer (centre crop, no
    # background) to each other than to other identities on average
    f = x[:, 30:100, 30:82].float().reshape(24, -1)
    d = torch.cdist(f, f)
    same = torch.tensor([[i // 4 == j // 4 and i != j for j in range(24)] for i in range(24)])
    other = torch.tensor([[i // 4 != j // 4 for j in range(24)] for i in range(24)])
    assert d[same].min() > 0 and d[same].mean() < d[other].mean()
    with pytest.raises(ValueError):
        SyntheticFaces(0, 3)


def test_subset_is_deterministic(tmp_path: Path) -> None:
    ids = [[f"{i}-{j}".encode() for j in range(3 + i % 4)] for i in range(10)]
    write_identity_dataset(
        tmp_path / "full", ids, height=112, width=112, meta={"identities": [f"id{i}" for i in range(10)]}
    )
    outs = []
    for name, seed in (("a", 4), ("b", 4), ("c", 5)):
        rep = make_subset(tmp_path / "full", tmp_path / name, shots=2, fraction=0.5, seed=seed)
        assert rep["identities"] == 5 and rep["images"] == 10
        r = RecordIOReader(tmp_path / name)
        outs.append([[r.image(int(k)) for k in keys] for _, keys in r.identities()])
        assert r.labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert outs[0] == outs[1] and outs[0] != outs[2]
    for group in outs[0]:  # each chosen image belongs to one identity of the source
        assert len({g.split(b"-")[0] for g in group}) == 1
    one = make_subset(tmp_path / "full", tmp_path / "one", shots=1, fraction=1.0, seed=0)
    assert one["images"] == 10 and one["identities_with_fewer_shots"] == 0


def _folder(root: Path, spec: dict[str, int]) -> Path:
    rng = np.random.default_rng(0)
    for name, n in spec.items():
        (root / name).mkdir(parents=True)
        for j in range(n):
            Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(root / name / f"{j}.png")
    return root


def test_cli_build_reports_bad_input(tmp_path: Path, capsys) -> None:
    src = _folder(tmp_path / "src", {"alice": 3, "bob": 0, "carol": 2})
    (src / "carol" / "broken.jpg").write_bytes(b"not a jpeg")
    (src / "ann").mkdir()  # sorts first: its only image is unreadable, so labels must not shift
    (src / "ann" / "x.png").write_bytes(b"\x89PNG broken")
    assert main(["data", "build", str(src), str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "2 identities, 5 images" in out and "broken.jpg" in out and "identity bob" in out
    assert "identity ann: none of its images could be read" in out
    r = RecordIOReader(tmp_path / "out")
    assert r.labels.tolist() == [0, 0, 0, 1, 1] and r.property.height == 40 and r.property.width == 30
    from lafs_fast.data.recordio import read_meta

    assert read_meta(tmp_path / "out")["identities"] == ["alice", "carol"]
    # a second build without --overwrite, an empty folder, a missing rec: one line, exit 2
    assert main(["data", "build", str(src), str(tmp_path / "out")]) == 2
    (tmp_path / "empty").mkdir()
    assert main(["data", "build", str(tmp_path / "empty"), str(tmp_path / "o2")]) == 2
    assert main(["data", "inspect", str(tmp_path / "nope.rec")]) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and "holds no identity sub-folder" in err and "nope" in err
    assert "Traceback" not in err


def test_cli_verify_names_corrupt_record(tmp_path: Path, capsys) -> None:
    write_identity_dataset(tmp_path / "ds", [[b"\xff\xd8junk", b"\x89PNGjunk"]], height=112, width=112)
    assert main(["data", "verify", str(tmp_path / "ds"), "--write-bad"]) == 1
    out = capsys.readouterr().out
    assert "corrupt: key 1 at offset 0" in out and "corrupt: key 2 at offset" in out and "2 corrupt" in out
    assert RecordIOReader(tmp_path / "ds").bad_keys() == {1, 2}


def test_orl_end_to_end(orl_dir: Path, tmp_path: Path, capsys) -> None:
    """Real faces: build -> inspect (montage) -> verify -> subset -> load through each loader."""
    out = tmp_path / "orl"
    assert main(["data", "build", str(orl_dir), str(out)]) == 0
    montage = tmp_path / "m.png"
    assert main(["data", "inspect", str(out), "--montage", str(montage)]) == 0
    text = capsys.readouterr().out
    assert "images: 400" in text and "identities: 40" in text and "property: 40,112,92" in text
    assert Image.open(montage).size == (8 * 112, 8 * 112)
    assert main(["data", "verify", str(out)]) == 0
    assert (
        main(["data", "subset", str(out), str(tmp_path / "sub"), "--shots", "2", "--fraction", "0.25", "--seed", "1"])
        == 0
    )
    assert RecordIOReader(tmp_path / "sub").num_images == 20
    backends = ["pil"]
    try:
        import nvidia.dali  # noqa: F401

        backends += ["dali", "dali-mxnet"]
    except Exception:
        pass
    for backend in backends:
        ld = make_loader(out, 50, backend=backend, num_workers=0)
        ims, labs = zip(*list(ld))
        ims, labs = torch.cat(ims), torch.cat(labs)
        assert ims.shape == (400, 112, 112, 3) and ims.dtype == torch.uint8, backend
        assert sorted(labs.tolist()) == [i // 10 for i in range(400)], backend
        assert torch.equal(ims[..., 0], ims[..., 1])  # grey faces stay grey after decode + resize
    # the folder itself through the same interface; PGM decode + 92->112 resize agree across paths
    # (PIL bilinear vs DALI linear: within a level or two)
    folder = {}
    for backend in backends[:2]:
        fl = make_loader(orl_dir, 100, shuffle=False, backend=backend, num_workers=0)
        assert fl.num_classes == 40 and len(fl) == 4
        folder[backend] = torch.cat([im for im, _ in fl])
    if "dali" in folder:
        diff = (folder["pil"].int() - folder["dali"].int()).abs()
        assert diff.max() <= 2 and diff.float().mean() < 0.1


def test_missing_align_extra_is_one_sentence(tmp_path: Path, monkeypatch, capsys) -> None:
    """Without face-alignment (the [align] extra) `data align` and `data landmarks` end with one
    sentence naming the extra, exit 2, not an ImportError traceback."""
    import sys

    for name in [m for m in sys.modules if m == "face_alignment" or m.startswith("face_alignment.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "face_alignment", None)  # `import face_alignment` now raises ImportError
    raw = _folder(tmp_path / "raw", {"alice": 1})
    write_identity_dataset(tmp_path / "ds", [[(raw / "alice" / "0.png").read_bytes()]], height=40, width=30)
    assert main(["data", "align", str(raw), str(tmp_path / "out")]) == 2
    assert main(["data", "landmarks", str(tmp_path / "ds")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all("pip install 'lafs-fast[align]'" in line for line in err), err
    assert not (tmp_path / "out").exists()


def test_build_keep_jpeg_stores_fitting_jpegs_byte_for_byte(tmp_path: Path, capsys) -> None:
    """--keep-jpeg: a JPEG whose size fits goes into the rec unchanged; a PNG, a JPEG that needs a
    resize and a CMYK JPEG are re-encoded; a truncated JPEG is still skipped. Without the flag every
    image is re-encoded."""
    rng = np.random.default_rng(1)
    src = tmp_path / "src"
    for name in ("a", "b"):
        (src / name).mkdir(parents=True)
    arr = rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)
    Image.fromarray(arr).save(src / "a" / "0.jpg", quality=70)
    Image.fromarray(arr[..., 0]).save(src / "a" / "1.jpg", quality=70)  # grey: kept too
    Image.fromarray(arr).save(src / "a" / "2.png")
    Image.fromarray(arr).convert("CMYK").save(src / "b" / "0.jpg")
    Image.fromarray(rng.integers(0, 255, (50, 40, 3), dtype=np.uint8)).save(src / "b" / "1.jpg")  # needs --size 40
    (src / "b" / "2.jpg").write_bytes((src / "a" / "0.jpg").read_bytes()[:300])  # truncated
    files = [src / "a" / "0.jpg", src / "a" / "1.jpg", src / "a" / "2.png", src / "b" / "0.jpg", src / "b" / "1.jpg"]
    stored = {}
    for flag in ([], ["--keep-jpeg"]):
        out = tmp_path / f"out{len(flag)}"
        assert main(["data", "build", str(src), str(out), "--size", "40", *flag]) == 0
        r = RecordIOReader(out)
        stored[bool(flag)] = [r.image(int(k)) for k in r.image_keys]
    out = capsys.readouterr().out
    assert "2 JPEG(s) stored as they were, 3 re-encoded" in out and out.count("skipped unreadable image") == 2
    same = [a == f.read_bytes() for a, f in zip(stored[True], files)]
    assert same == [True, True, False, False, False]
    assert not any(a == f.read_bytes() for a, f in zip(stored[False], files))
    assert all(Image.open(io.BytesIO(d)).size == (40, 40) for d in stored[True])
