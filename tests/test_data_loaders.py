"""Loaders: sharding, epochs, exact resume, DALI-CPU vs PIL pixels, corrupt records, colour order."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lafs_fast.data import make_loader
from lafs_fast.data.base import num_batches, shard_indices
from lafs_fast.data.recordio_writer import write_identity_dataset
from lafs_fast.data.synthetic import SyntheticFaces

try:
    import nvidia.dali  # noqa: F401

    HAS_DALI = True
except Exception:
    HAS_DALI = False
needs_dali = pytest.mark.skipif(not HAS_DALI, reason="NVIDIA DALI not installed")

IDS, PER = 6, 5


def _encode(arr: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _make_rec(
    folder: Path, fmt: str, size: int = 112, corrupt: set[int] = frozenset(), meta: dict | None = None
) -> Path:
    ds = SyntheticFaces(IDS, PER, seed=5, image_size=size)
    images, _ = ds.batch(range(len(ds)))
    ids = [[_encode(images[i * PER + j].numpy(), fmt) for j in range(PER)] for i in range(IDS)]
    for flat in corrupt:  # garbage after a JPEG start marker: every decoder rejects it
        ids[flat // PER][flat % PER] = b"\xff\xd8\xff\xe0" + b"\x13" * 50
    write_identity_dataset(folder, ids, height=size, width=size, meta=meta)
    return folder / "train.rec"


@pytest.fixture(scope="module")
def jpeg_rec(tmp_path_factory) -> Path:
    return _make_rec(tmp_path_factory.mktemp("jpeg"), "JPEG")


@pytest.fixture(scope="module")
def png_rec(tmp_path_factory) -> Path:
    return _make_rec(tmp_path_factory.mktemp("png"), "PNG")


def _match(images: torch.Tensor, ref: torch.Tensor, tol: int) -> list[list[int]]:
    """For each image, the indices of the ref images within ``tol`` levels everywhere (one op)."""
    d = (images.reshape(len(images), 1, -1).short() - ref.reshape(1, len(ref), -1).short()).abs().amax(-1)
    return [torch.nonzero(row <= tol).flatten().tolist() for row in d]


def _epoch(loader) -> tuple[torch.Tensor, torch.Tensor]:
    ims, labs = zip(*list(loader))
    return torch.cat(ims), torch.cat(labs)


@pytest.mark.parametrize("n,world,bs", [(30, 1, 4), (30, 3, 4), (31, 4, 3), (7, 2, 5)])
def test_sharding_covers_every_record_once(n: int, world: int, bs: int) -> None:
    for epoch in (0, 1):
        shards = [shard_indices(n, epoch, seed=3, shuffle=True, rank=r, world_size=world) for r in range(world)]
        assert sorted(np.concatenate(shards).tolist()) == list(range(n))
        full = [num_batches(n, bs, rank=r, world_size=world, drop_last=True) for r in range(world)]
        assert len(set(full)) == 1 and full[0] * bs <= min(len(s) for s in shards)
    a = shard_indices(n, 0, seed=3, shuffle=True, rank=0, world_size=1)
    b = shard_indices(n, 1, seed=3, shuffle=True, rank=0, world_size=1)
    assert not np.array_equal(a, b) or n < 3  # a new permutation each epoch


BACKENDS = ["pil", pytest.param("dali", marks=needs_dali)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_loader_sharding_end_to_end(jpeg_rec: Path, backend: str) -> None:
    """Across 3 ranks with drop_last=False every image is yielded exactly once (identified by pixels)."""
    world, seen = 3, []
    ref = make_loader(jpeg_rec, 30, shuffle=False, drop_last=False, backend="pil", num_workers=0)
    ref_imgs, ref_labels = _epoch(ref)
    for rank in range(world):
        ld = make_loader(
            jpeg_rec, 4, rank=rank, world_size=world, seed=1, drop_last=False, backend=backend, num_workers=0
        )
        ims, labs = _epoch(ld)
        assert ims.shape[1:] == (112, 112, 3) and ims.dtype == torch.uint8 and labs.dtype == torch.int64
        for match, lab in zip(_match(ims, ref_imgs, 8), labs):
            assert len(match) == 1 and ref_labels[match[0]] == lab
            seen.append(match[0])
    assert sorted(seen) == list(range(IDS * PER))


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_is_exact(jpeg_rec: Path, backend: str) -> None:
    kw = dict(seed=7, backend=backend, num_workers=0)
    full = make_loader(jpeg_rec, 4, **kw)
    full.set_epoch(2)
    batches = list(full)
    part = make_loader(jpeg_rec, 4, **kw)
    part.set_epoch(2)
    it = iter(part)
    next(it), next(it)
    state = part.state_dict()
    assert state["epoch"] == 2 and state["batch"] == 2
    resumed = make_loader(jpeg_rec, 4, **kw)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # the usual loop calls set_epoch after loading: keeps the position
    rest = list(resumed)
    assert len(rest) == len(batches) - 2
    for (a, la), (b, lb) in zip(batches[2:], rest):
        assert torch.equal(a, b) and torch.equal(la, lb)
    with pytest.raises(ValueError, match="batch size"):
        make_loader(jpeg_rec, 5, **kw).load_state_dict(state)


@needs_dali
def test_dali_mxnet_reader_resume_and_epoch(jpeg_rec: Path) -> None:
    """DALI's own reader: full batches, labels of the rec, and its checkpoint resumes the same stream."""
    ld = make_loader(jpeg_rec, 4, seed=3, backend="dali-mxnet")
    assert ld.backend.startswith("dali-mxnet") and len(ld) == 7
    it = iter(ld)
    first = [next(it) for _ in range(3)]
    state = ld.state_dict()
    tail = list(it)
    assert len(first) + len(tail) == 7
    again = make_loader(jpeg_rec, 4, seed=3, backend="dali-mxnet")
    again.load_state_dict(state)
    for (a, la), (b, lb) in zip(tail, again):
        assert torch.equal(a, b) and torch.equal(la, lb)
    labels = torch.cat([lab for _, lab in first + tail])
    assert labels.min() >= 0 and labels.max() < IDS


@needs_dali
def test_dali_cpu_matches_pil_pixels(jpeg_rec: Path, png_rec: Path) -> None:
    """Same records through DALI's CPU graph and PIL: PNG (lossless) bit-identical; JPEG within the
    few levels that two JPEG decoders (IDCT / chroma upsampling) may differ by."""
    for rec, tol in ((png_rec, 0), (jpeg_rec, 6)):
        a_img, a_lab = _epoch(make_loader(rec, 8, shuffle=False, drop_last=False, backend="pil", num_workers=0))
        b_img, b_lab = _epoch(make_loader(rec, 8, shuffle=False, drop_last=False, backend="dali"))
        assert torch.equal(a_lab, b_lab)
        diff = (a_img.int() - b_img.int()).abs()
        assert diff.max() <= tol, f"{rec.parent.name}: max diff {diff.max()}"
        assert diff.float().mean() < 0.5


@pytest.mark.parametrize("backend", BACKENDS)
def test_positions_name_each_image_past_a_corrupt_record(tmp_path: Path, backend: str) -> None:
    """with_positions=True: the third element is each yielded image's record position (what indexes
    the landmark sidecar), also for the replacement of a corrupt record."""
    rec = _make_rec(tmp_path / "bad", "PNG", corrupt={7})
    ld = make_loader(
        rec,
        6,
        shuffle=True,
        seed=4,
        drop_last=False,
        backend=backend,
        num_workers=0,
        with_positions=True,
        max_bad_fraction=0.5,
    )
    ref, _ = SyntheticFaces(IDS, PER, seed=5).batch(range(IDS * PER))
    for (images, labels, pos), want in zip(ld, ld.batch_positions(0)):
        assert pos.dtype == torch.int64 and pos.device.type == "cpu" and len(pos) == len(want)
        assert [p for p, w in zip(pos.tolist(), want) if p != w] == (
            [] if 7 not in want else [pos.tolist()[list(want).index(7)]]
        )
        assert 7 not in pos.tolist()
        assert labels.tolist() == [p // PER for p in pos.tolist()]
        assert torch.equal(images.cpu(), ref[pos])  # PNG: lossless, so the very image of that record
    syn = make_loader("synthetic:3x2", 4, shuffle=True, seed=1, with_positions=True)
    ((images, labels, pos),) = list(syn)
    assert pos.tolist() == syn.batch_positions(0)[0].tolist()
    assert len(next(iter(make_loader("synthetic:3x2", 4)))) == 2  # off by default: (images, labels)


@needs_dali
def test_dali_mxnet_cannot_give_positions(jpeg_rec: Path) -> None:
    with pytest.raises(ValueError, match="cannot say which record"):
        make_loader(jpeg_rec, 4, backend="dali-mxnet", with_positions=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_corrupt_record_skipped_counted_named(tmp_path: Path, backend: str) -> None:
    rec = _make_rec(tmp_path / "bad", "JPEG", corrupt={7})
    ld = make_loader(
        rec,
        6,
        shuffle=False,
        drop_last=False,
        backend=backend,
        num_workers=0,
        max_bad_fraction=0.5,
        with_positions=True,
    )
    ims, labs, pos = (torch.cat(t) for t in zip(*list(ld)))
    assert len(ims) == IDS * PER and len(labs) == len(ims)  # the slot is refilled: batches stay full
    assert len(ld.corrupt) == 1 and "key 8 (offset" in ld.corrupt[0][0]  # flat 7 -> key 8
    assert 7 not in pos.tolist() and labs.tolist() == [p // PER for p in pos.tolist()]
    assert [p for p, want in zip(pos.tolist(), range(IDS * PER)) if p != want] == [pos.tolist()[7]]


# every way one record can be damaged: (how, key): framing, IRHeader, label, and the .idx
DAMAGE = [
    ("magic", 3),
    ("length", 8),
    ("continuation-flag", 14),
    ("irheader-flag", 20),
    ("idx-offset", 25),
    ("nan-label", 28),
]


def _damage(rec: Path) -> dict[int, str]:
    """Damage one record per kind of DAMAGE in place; returns key -> kind."""
    import struct

    idx = rec.with_suffix(".idx")
    lines = idx.read_text().splitlines()
    offsets = {int(k): int(o) for k, o in (ln.split("\t") for ln in lines)}
    blob = bytearray(rec.read_bytes())
    for how, key in DAMAGE:
        o = offsets[key]
        if how == "magic":
            blob[o : o + 4] = b"\0\0\0\0"
        elif how == "length":
            blob[o + 4 : o + 8] = struct.pack("<I", (1 << 29) - 1)  # runs past the end of the file
        elif how == "continuation-flag":  # "first part of a split record", but the next record is whole
            length = struct.unpack_from("<I", blob, o + 4)[0]
            blob[o + 4 : o + 8] = struct.pack("<I", (1 << 29) | length)
        elif how == "irheader-flag":
            blob[o + 8 : o + 12] = struct.pack("<I", 10**6)  # a million labels in a few kB
        elif how == "nan-label":
            blob[o + 12 : o + 16] = struct.pack("<f", float("nan"))
        elif how == "idx-offset":
            offsets[key] = o + 8  # points inside its record
    rec.write_bytes(bytes(blob))
    idx.write_text("".join(f"{k}\t{o}\n" for k, o in offsets.items()))
    return {key: how for how, key in DAMAGE}


def _nvjpeg_stand_in(monkeypatch) -> None:
    """torchvision.io.decode_jpeg replaced by PIL (same signature and errors): the nvJPEG path's
    host side on the CPU (torchvision's image ops do not load on this CPU torch)."""
    import torchvision.io

    def stand_in(data, mode=None, device="cpu"):
        def one(t: torch.Tensor) -> torch.Tensor:
            try:
                im = Image.open(io.BytesIO(t.numpy().tobytes()))
                im.load()
            except (OSError, SyntaxError) as e:
                raise RuntimeError(f"decode failed: {e}") from None
            return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).to(device)

        return [one(t) for t in data] if isinstance(data, list) else one(data)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", stand_in)


def _loader(rec: Path, backend: str, workers: int, batch_size: int, **kw):
    if backend == "nvjpeg":
        from lafs_fast.data.loaders import NvjpegLoader
        from lafs_fast.data.sources import RecSource

        return NvjpegLoader(
            RecSource(rec),
            batch_size,
            allow_cpu=True,
            rank=0,
            world_size=1,
            seed=kw.pop("seed", 0),
            device="cpu",
            shuffle=kw.pop("shuffle", True),
            drop_last=kw.pop("drop_last", True),
            **kw,
        )
    return make_loader(rec, batch_size, backend=backend, num_workers=workers, **kw)


LOADER_PATHS = [("pil", 0), ("pil", 1), pytest.param("dali", 0, marks=needs_dali), ("nvjpeg", 0)]


@pytest.mark.parametrize("backend,workers", LOADER_PATHS)
def test_every_kind_of_corrupt_record_is_skipped_counted_named(
    tmp_path: Path, backend: str, workers: int, monkeypatch
) -> None:
    """A bad magic, length, continuation flag, IRHeader flag, NaN label and an .idx offset inside a
    record: each skipped and named by key and offset, training data goes on (full batches)."""
    _nvjpeg_stand_in(monkeypatch)
    rec = _make_rec(tmp_path / "mm", "JPEG")
    damaged = _damage(rec)
    ld = _loader(rec, backend, workers, 6, shuffle=False, drop_last=False, max_bad_fraction=0.5, with_positions=True)
    ims, labs, pos = (torch.cat(t) for t in zip(*list(ld)))
    assert len(ims) == IDS * PER and labs.tolist() == [p // PER for p in pos.tolist()]
    assert not set(pos.tolist()) & {k - 1 for k in damaged}
    named = sorted(int(what.split(" key ")[1].split()[0]) for what, _ in ld.corrupt)
    assert named == sorted(damaged), ld.corrupt
    assert all("(offset " in what for what, _ in ld.corrupt)


@pytest.mark.parametrize("backend,workers", LOADER_PATHS)
def test_too_many_corrupt_records_stop_with_one_sentence_naming_verify(
    tmp_path: Path, backend: str, workers: int, monkeypatch
) -> None:
    """Past max_bad_fraction the run stops with one sentence naming `data verify --write-bad`; after
    that command the loaders skip the listed keys up front and count nothing."""
    from lafs_fast.data.tools import verify_rec

    _nvjpeg_stand_in(monkeypatch)
    rec = _make_rec(tmp_path / "mm", "JPEG")
    damaged = _damage(rec)
    ld = _loader(rec, backend, workers, 6, shuffle=False, drop_last=False, max_bad_fraction=0.1)
    with pytest.raises(
        ValueError,
        match=r"of the 30 records this process reads from .*train\.rec are corrupt "
        r".*more than data\.max_bad_fraction=0\.1\); "
        r"run `lafs-fast data verify .*train\.rec --write-bad`",
    ) as e:
        list(ld)
    assert "\n" not in str(e.value)
    rep = verify_rec(rec, write_bad=True, progress=False)
    assert sorted(k for k, _, _ in rep["corrupt"]) == sorted(damaged)
    ld = _loader(rec, backend, workers, 6, shuffle=False, drop_last=False, max_bad_fraction=0.0)
    assert sum(len(im) for im, _ in ld) == IDS * PER - len(damaged) and ld.corrupt == []


@pytest.mark.parametrize("backend,workers", LOADER_PATHS)
def test_batch_size_one_never_yields_an_empty_batch(tmp_path: Path, backend: str, workers: int, monkeypatch) -> None:
    """Batch size 1 with corrupt records: every batch holds one image (the record is replaced), so
    no stage ever sees an empty batch (which trained to "loss is nan"); the refill is the same on a
    resumed loader."""
    _nvjpeg_stand_in(monkeypatch)
    rec = _make_rec(tmp_path / "b1", "JPEG", corrupt={0, 13})
    ld = _loader(rec, backend, workers, 1, seed=3, max_bad_fraction=0.5, with_positions=True)
    got = list(ld)
    assert len(got) == IDS * PER and all(len(im) == 1 and len(lab) == 1 for im, lab, _ in got)
    assert len(ld.corrupt) == 2
    again = _loader(rec, backend, workers, 1, seed=3, max_bad_fraction=0.5, with_positions=True)
    again.load_state_dict({**ld.state_dict(), "epoch": 0, "batch": 10})
    rest = list(again)
    assert [p.tolist() for _, _, p in rest] == [p.tolist() for _, _, p in got[10:]]
    assert len(again.corrupt) == 2  # the count survives the resume


def test_bad_list_from_verify_is_skipped(tmp_path: Path) -> None:
    from lafs_fast.data.tools import verify_rec

    rec = _make_rec(tmp_path / "bad", "JPEG", corrupt={0, 13})
    rep = verify_rec(rec, write_bad=True, progress=False)
    assert [k for k, _, _ in rep["corrupt"]] == [1, 14]
    ld = make_loader(rec, 4, shuffle=False, drop_last=False, backend="pil", num_workers=0)
    ims, labs = _epoch(ld)
    assert len(ims) == IDS * PER - 2 and ld.corrupt == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_bgr_source_is_flipped_to_rgb(tmp_path: Path, png_rec: Path, backend: str) -> None:
    bgr = _make_rec(tmp_path / "bgr", "PNG", meta={"color_order": "BGR"})
    a, _ = _epoch(make_loader(png_rec, 8, shuffle=False, drop_last=False, backend=backend, num_workers=0))
    b, _ = _epoch(make_loader(bgr, 8, shuffle=False, drop_last=False, backend=backend, num_workers=0))
    assert torch.equal(a, b.flip(-1))
    assert "BGR" in make_loader(bgr, 8, backend=backend, num_workers=0).backend
    assert "RGB" in make_loader(bgr, 8, backend=backend, num_workers=0, color_order="RGB").backend


@needs_dali
def test_dali_mxnet_reader_shards_first_epoch(jpeg_rec: Path) -> None:
    """fn.readers.mxnet with shard_id/num_shards: in the first epoch the 3 ranks together read
    every image record once (pixels matched against the ordered PIL pass)."""
    ref, _ = _epoch(make_loader(jpeg_rec, 30, shuffle=False, drop_last=False, backend="pil", num_workers=0))
    seen = []
    for rank in range(3):
        ld = make_loader(jpeg_rec, 5, rank=rank, world_size=3, seed=4, backend="dali-mxnet")
        assert len(ld) == 2
        ims, _ = _epoch(ld)
        for match in _match(ims, ref, 6):
            seen += match
    assert sorted(seen) == list(range(IDS * PER))


def test_resize_when_source_differs(tmp_path: Path) -> None:
    rec = _make_rec(tmp_path / "small", "PNG", size=64)
    for backend in ["pil"] + (["dali"] if HAS_DALI else []):
        ims, _ = _epoch(make_loader(rec, 8, drop_last=False, backend=backend, num_workers=0))
        assert ims.shape == (IDS * PER, 112, 112, 3)


def test_synthetic_loader_and_auto_choice(jpeg_rec: Path) -> None:
    ld = make_loader("synthetic:4x3:seed=2", 5, seed=0)
    assert ld.backend.startswith("synthetic") and len(ld) == 2
    ims, labs = _epoch(ld)
    ref = SyntheticFaces(4, 3, seed=2)
    first = shard_indices(12, 0, seed=0, shuffle=True, rank=0, world_size=1)[0]
    assert torch.equal(ims[0], torch.from_numpy(ref[int(first)][0])) and labs[0] == ref.label(int(first))
    auto = make_loader(jpeg_rec, 4)
    assert auto.backend.startswith("dali" if HAS_DALI else "pil")
    with pytest.raises(ValueError, match="unknown data backend"):
        make_loader(jpeg_rec, 4, backend="magic")
    with pytest.raises(ValueError, match="no full batch"):
        make_loader(jpeg_rec, 64)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_paths_match_pil(jpeg_rec: Path) -> None:
    a, la = _epoch(make_loader(jpeg_rec, 8, shuffle=False, drop_last=False, backend="pil", num_workers=0))
    for backend in ["nvjpeg"] + (["dali"] if HAS_DALI else []):
        b, lb = _epoch(make_loader(jpeg_rec, 8, shuffle=False, drop_last=False, backend=backend, device="cuda"))
        assert b.is_cuda and torch.equal(la, lb.cpu())
        # nvJPEG upsamples chroma differently from libjpeg: single pixels differ by 25-43 levels on
        # an H200, so bound the mean difference (as torchvision's own decode_jpeg tests do), and the
        # max only loosely (a wrong colour order or an off-by-one crop moves both by far more)
        diff = (a.int() - b.cpu().int()).abs()
        assert diff.float().mean() <= 1.0 and diff.max() <= 64, (diff.float().mean(), diff.max())


@pytest.mark.parametrize("backend,workers", [("pil", 0), ("pil", 1), pytest.param("dali", 0, marks=needs_dali)])
def test_idx_offset_inside_a_record_is_skipped_and_named(tmp_path: Path, backend: str, workers: int) -> None:
    """A record the .idx points into the middle of is one corrupt record (skipped, counted, named
    with its key and offset), not the end of the run (issue 16 item 3 reversed the old stop)."""
    rec = _make_rec(tmp_path / "mm", "JPEG")
    idx = rec.with_suffix(".idx")
    lines = idx.read_text().splitlines()
    k, off = lines[5].split("\t")  # key 5
    lines[5] = f"{k}\t{int(off) + 8}"
    idx.write_text("\n".join(lines) + "\n")
    ld = make_loader(
        rec, 30, shuffle=False, drop_last=False, backend=backend, num_workers=workers, max_bad_fraction=0.05
    )
    ((ims, _),) = list(ld)
    assert len(ims) == IDS * PER
    ((what, why),) = ld.corrupt
    assert (
        what.endswith(f"train.rec key {k} (offset {int(off) + 8})")
        and f"no record starts at offset {int(off) + 8}" in why
    )


@pytest.mark.parametrize(
    "backend,workers",
    [("pil", 2), pytest.param("dali", 0, marks=needs_dali), pytest.param("dali-mxnet", 0, marks=needs_dali)],
)
def test_abandoned_epoch_then_next_epoch(jpeg_rec: Path, backend: str, workers: int) -> None:
    """An epoch abandoned after 2 batches (the iterator kept alive), then epoch 1: the same batches
    as a fresh loader's epoch 1 (no stale prefetched / in-flight batch leaks in). PIL: two
    persistent worker processes."""
    ld = make_loader(jpeg_rec, 4, seed=2, backend=backend, num_workers=workers)
    it = iter(ld)
    next(it), next(it)
    ld.set_epoch(1)
    got = list(ld)
    ref = make_loader(jpeg_rec, 4, seed=2, backend=backend, num_workers=0)
    if backend == "dali-mxnet":  # DALI's stream: epoch 1 comes after a whole epoch 0
        list(ref)
    ref.set_epoch(1)
    want = list(ref)
    assert len(got) == len(want) == 7
    for (a, la), (b, lb) in zip(got, want):
        assert torch.equal(a, b) and torch.equal(la, lb)
    again = list(ld)  # iterating past the end moves on to epoch 2
    assert ld.epoch == 2 and len(again) == 7


def test_colour_order_by_dataset_name(tmp_path: Path) -> None:
    from lafs_fast.data.sources import RecSource

    for name, order in (("ms1mv3", "BGR"), ("faces_emore", "BGR"), ("webface4m", "RGB"), ("mine", "RGB")):
        folder = tmp_path / name
        write_identity_dataset(folder, [[b"x"]], height=112, width=112)
        (folder / "lafs_fast.json").unlink()  # as downloaded: no sidecar, the name decides
        assert RecSource(folder).color_order() == order, name


def test_resolve_loader_backend_says_why() -> None:
    from lafs_fast.data import resolve_loader_backend

    name, why = resolve_loader_backend("auto", "cpu")
    assert name == ("dali" if HAS_DALI else "pil") and why
    assert resolve_loader_backend("pil", "cpu") == ("pil", "requested")
    with pytest.raises(ValueError, match="unknown data backend"):
        resolve_loader_backend("opencv", "cpu")


def test_nvjpeg_loader_logic_with_stand_in_decoder(tmp_path: Path, jpeg_rec: Path, monkeypatch) -> None:
    """The nvJPEG path's batching, per-image fallback (PNG, corrupt), resize and labels, with a PIL
    stand-in for ``torchvision.io.decode_jpeg`` (same signature and errors; torchvision's image ops
    do not load on this CPU torch). The real nvJPEG run is test_gpu_paths_match_pil."""
    from lafs_fast.data.loaders import NvjpegLoader
    from lafs_fast.data.sources import RecSource

    _nvjpeg_stand_in(monkeypatch)

    def run(rec: Path) -> tuple[torch.Tensor, torch.Tensor, list]:
        ld = NvjpegLoader(
            RecSource(rec),
            8,
            allow_cpu=True,
            rank=0,
            world_size=1,
            shuffle=False,
            seed=0,
            device="cpu",
            drop_last=False,
            max_bad_fraction=0.5,
        )
        ims, labs = _epoch(ld)
        return ims, labs, ld.corrupt

    a, la = _epoch(make_loader(jpeg_rec, 8, shuffle=False, drop_last=False, backend="pil", num_workers=0))
    b, lb, bad = run(jpeg_rec)
    assert torch.equal(la, lb) and bad == [] and (a.int() - b.int()).abs().max() <= 6
    c, lc, bad = run(_make_rec(tmp_path / "mixed", "JPEG", corrupt={3}))
    assert len(c) == IDS * PER and len(bad) == 1 and "key 4 " in bad[0][0]  # replaced: the batch stays full
    ld = NvjpegLoader(
        RecSource(tmp_path / "mixed" / "train.rec"),
        8,
        allow_cpu=True,
        rank=0,
        world_size=1,
        shuffle=False,
        seed=0,
        device="cpu",
        drop_last=False,
        with_positions=True,
        max_bad_fraction=0.5,
    )
    pos = torch.cat([pos for _, _, pos in ld]).tolist()
    assert [p for i, p in enumerate(pos) if i != 3] == [p for p in range(IDS * PER) if p != 3] and pos[3] != 3
    small, _, _ = run(_make_rec(tmp_path / "small", "PNG", size=64))  # not JPEG: PIL fallback + resize
    assert small.shape == (IDS * PER, 112, 112, 3)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        make_loader(jpeg_rec, 8, backend="nvjpeg")
