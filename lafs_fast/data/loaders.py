"""One loader interface over every data source and decode path, chosen automatically.

``make_loader(source, batch_size, ...)`` returns a :class:`Loader` that yields
``(images (B, 112, 112, 3) uint8 RGB on device, labels (B,) int64 on device)`` (with
``with_positions=True`` also ``positions (B,) int64 on the CPU``: each image's record position in the
source, the index into per-record tables such as the landmark sidecar) and says in
``loader.backend`` which path it took and why:

- ``dali``: DALI decodes (``mixed`` = nvJPEG on a GPU, ``cpu`` without one) the record bytes that
  our sampler picks (``fn.external_source``), so epochs, sharding and resume are exact and the same
  as on every other path (see ``dali.py``; ``dali-mxnet`` is DALI's own ``fn.readers.mxnet``);
- ``nvjpeg``: a GPU without DALI: batched ``torchvision.io.decode_jpeg`` on CUDA;
- ``pil``: no DALI, no GPU: a torch DataLoader whose workers decode with PIL;
- ``synthetic``: the built-in faces rendered straight on the device (zero I/O).

Epoch semantics (all paths but ``dali-mxnet``): epoch ``e`` is the permutation
``default_rng([seed, e])`` of all N records (identity order when ``shuffle=False``); rank ``r`` of
``W`` takes positions ``r, r+W, r+2W, ...``, so every record is in exactly one rank's shard. With
``drop_last=True`` every rank yields the same number of full batches, ``(N // W) // B`` (a few
records sit out each epoch, different ones each epoch); with ``drop_last=False`` every record is
yielded exactly once per epoch across ranks (the last batch may be short).

Resume: ``state_dict()`` is ``{epoch, batch, ...}`` where ``batch`` counts the batches already
handed out this epoch; ``load_state_dict`` continues at the next one, bit for bit. ``set_epoch(e)``
with a new ``e`` restarts at batch 0; with the current epoch it keeps the position (so the usual
``load_state_dict`` then ``set_epoch`` works); iterating an exhausted epoch moves to the next.

Corrupt records (``rec``, folder; every path but ``dali-mxnet``): a record that cannot be read
(bad magic, length, continuation flag or IRHeader, an ``.idx`` offset inside a record) or decoded is
skipped, counted and named by key and offset (``loader.corrupt``: list of ``(what, reason)`` of the
distinct records, one warning each), and its slot in the batch is refilled with a replacement
record drawn from ``default_rng([seed, epoch, batch, rank])`` (deterministic, so resume stays exact):
every batch stays full, so a batch size of 1 never yields an empty batch. Training goes on until
more than ``max_bad_fraction`` of this rank's share of the records have been found corrupt; then
one sentence names ``lafs-fast data verify REC --write-bad``, whose ``<rec>.bad`` list every loader
skips up front without counting.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from lafs_fast.data.recordio import CorruptRecordError, RecordIOError, RecordIOReader, first_label, read_meta
from lafs_fast.data.synthetic import SyntheticFaces, parse_spec

log = logging.getLogger("lafs_fast.data")

# How the public InsightFace releases store channels (LAFS_SPEC section 6), matched against the rec's
# path when the rec has no lafs_fast.json; pass color_order= to make_loader to override.
DATASET_COLOR_ORDER = {
    "ms1mv3": "BGR", "ms1m": "BGR", "faces_emore": "BGR",  # packed from cv2 arrays: BGR in the JPEGs
    "webface42m": "RGB", "webface4m": "RGB", "webface": "RGB",
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
            raise CorruptRecordError(f"{self.path} key {k} (offset {self.reader.offset(k)}) is corrupt: its label is {label}")
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
        return self.paths[i].read_bytes(), int(self.labels[i])

    def get(self, i: int) -> bytes:
        return self.paths[i].read_bytes()

    def name(self, i: int) -> str:
        return str(self.paths[i])

    def check_labels(self, num_classes: int) -> None:
        """Folder labels are the sub-folder positions: always inside ``[0, num_classes)``."""

    def color_order(self) -> str:
        return "RGB"


# --------------------------------------------------------------------------------------------------
# sampling


def shard_indices(n: int, epoch: int, *, seed: int, shuffle: bool, rank: int, world_size: int) -> np.ndarray:
    """(n_rank,) int64 positions of this rank's records in epoch ``epoch`` (see the module docstring)."""
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    return order[rank::world_size].astype(np.int64)


def num_batches(n: int, batch_size: int, *, rank: int, world_size: int, drop_last: bool) -> int:
    """Batches per epoch on ``rank``."""
    if drop_last:
        return (n // world_size) // batch_size
    return math.ceil(len(range(rank, n, world_size)) / batch_size)


def replacement_stream(seed: int, epoch: int, batch: int, rank: int, n: int) -> Iterator[int]:
    """Record positions that stand in for the corrupt records of batch ``batch`` of ``epoch`` on
    ``rank``: deterministic in those (and not in what was seen before), so a resumed run refills
    the same way as an uninterrupted one."""
    rng = np.random.default_rng([seed, epoch, batch, rank, 0x0BAD])
    while True:
        yield from (int(p) for p in rng.integers(n, size=16))


MAX_REFILL_TRIES = 64  # replacement draws per slot before the source is declared unreadable


def read_items(source, positions: Sequence[int], stream: Iterator[int], check=None, check_errors: tuple = (OSError, ValueError, SyntaxError)) -> tuple[list[tuple], list[tuple[int, str, str]]]:
    """Read (and with ``check``, decode) each record at ``positions``; a corrupt one is replaced by
    the next position of ``stream`` until a good one comes.

    Returns ``(items, bad)``: ``items`` one ``(position, bytes, label, check(bytes) or None)`` per
    input position, in order; ``bad``: ``(position, name, reason)`` of each corrupt record met.
    A file-level RecordIOError (not one record) propagates.
    """
    items, bad = [], []
    for p in positions:
        p = int(p)
        for _ in range(MAX_REFILL_TRIES):
            try:
                data, label = source.item(p)
                items.append((p, data, label, check(data) if check is not None else None))
                break
            except CorruptRecordError as e:
                bad.append((p, source.name(p), str(e).split(" is corrupt: ", 1)[-1]))
            except RecordIOError:
                raise
            except check_errors as e:  # a file that cannot be read, an image that cannot be decoded
                if isinstance(e, torch.cuda.OutOfMemoryError):  # the device, not the record
                    raise
                bad.append((p, source.name(p), f"{type(e).__name__}: {e}"))
            p = next(stream)
        else:
            raise RecordIOError(f"{MAX_REFILL_TRIES} records of {source.path} in a row could not be read; "
                                f"run `lafs-fast data verify {source.path}` to see what is wrong with it")
    return items, bad


class Loader:
    """Base: epochs, sharding, position, the corrupt-record count; subclasses implement
    ``_fetch(positions) -> (images, labels, kept)`` (or ``_fetch_all``), ``kept`` the
    positions of the images actually returned (corrupt ones replaced, see the module docstring)."""

    backend: str = ""

    def __init__(self, n: int, batch_size: int, *, rank: int, world_size: int, shuffle: bool, seed: int, device: str | torch.device, drop_last: bool, num_classes: int, with_positions: bool = False, max_bad_fraction: float = 0.01) -> None:
        if batch_size < 1:
            raise ValueError(f"batch size must be at least 1, not {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        if n == 0:
            raise ValueError("the data source holds no image")
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(f"data.max_bad_fraction must be in [0, 1], not {max_bad_fraction}")
        self.n, self.batch_size, self.rank, self.world_size = n, batch_size, rank, world_size
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.with_positions = with_positions
        self.device = torch.device(device)
        self.num_classes = num_classes
        self.epoch = 0
        self.batch = 0
        self.max_bad_fraction = float(max_bad_fraction)
        self.bad: dict[int, tuple[str, str]] = {}  # position -> (name, reason) of each corrupt record met
        self._at = 0  # index in its epoch of the batch being fetched (seeds the replacements)
        if len(self) == 0:
            raise ValueError(f"{n} images over {world_size} rank(s) make no full batch of {batch_size}; lower the batch size or pass drop_last=False")

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        return num_batches(self.n, self.batch_size, rank=self.rank, world_size=self.world_size, drop_last=self.drop_last)

    @property
    def corrupt(self) -> list[tuple[str, str]]:
        """``(name, reason)`` of each distinct corrupt record met so far."""
        return list(self.bad.values())

    @property
    def share(self) -> int:
        """Records this rank reads per epoch (the denominator of ``max_bad_fraction``)."""
        return len(range(self.rank, self.n, self.world_size))

    def check_labels(self) -> None:
        """One sentence (ValueError) when a record's label is outside ``[0, num_classes)``; call before
        training a classifier (a label past the head fails deep inside mixup / the margin loss)."""
        check = getattr(getattr(self, "source", None), "check_labels", None)
        if check is not None:
            check(self.num_classes)

    def set_epoch(self, epoch: int) -> None:
        """Go to ``epoch`` at batch 0; the current epoch keeps its position (resume)."""
        if epoch != self.epoch:
            self.epoch, self.batch = int(epoch), 0

    def batch_positions(self, epoch: int) -> list[np.ndarray]:
        """This rank's batches of epoch ``epoch``: a list of (B,) int64 record positions."""
        idx = shard_indices(self.n, epoch, seed=self.seed, shuffle=self.shuffle, rank=self.rank, world_size=self.world_size)
        return [idx[b * self.batch_size : (b + 1) * self.batch_size] for b in range(len(self))]

    def state_dict(self) -> dict:
        """The exact position: ``epoch``, ``batch`` (handed out so far this epoch) and what must match."""
        return {"epoch": self.epoch, "batch": self.batch, "seed": self.seed, "n": self.n, "batch_size": self.batch_size, "world_size": self.world_size, "backend": self.backend.split(":")[0],
                "bad": [[p, name, why] for p, (name, why) in sorted(self.bad.items())]}

    def load_state_dict(self, state: dict) -> None:
        """Continue at a saved position; ValueError when data size, seed, batch or world size differ."""
        for k in ("seed", "n", "batch_size", "world_size"):
            if k in state and state[k] != getattr(self, k):
                raise ValueError(f"the saved loader position is for {k}={state[k]} but this loader has {k}={getattr(self, k)}; resume with the same data, batch size and world size")
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
        self.bad = {int(p): (name, why) for p, name, why in state.get("bad", [])}  # the count goes on across a resume

    def _stream(self) -> Iterator[int]:
        """Replacements for the corrupt records of the batch being fetched (``self._at``)."""
        return replacement_stream(self.seed, self.epoch, self._at, self.rank, self.n)

    def _note_corrupt(self, bad: Sequence[tuple[int, str, str]]) -> None:
        """Count and name each new corrupt record; ValueError (one sentence) past ``max_bad_fraction``."""
        for pos, what, why in bad:
            if int(pos) in self.bad:
                continue
            self.bad[int(pos)] = (what, why)
            log.warning("skipped a corrupt record: %s (%s); %d so far", what, why, len(self.bad))
        if len(self.bad) > self.max_bad_fraction * self.share:
            path = getattr(getattr(self, "source", None), "path", "the data")
            fix = (f"run `lafs-fast data verify {path} --write-bad` to list them in {path}.bad (every loader then skips the listed keys "
                   f"without counting them) or raise data.max_bad_fraction"
                   if getattr(self.source, "kind", "") == "rec" else "delete or replace the files named in the warnings, or raise data.max_bad_fraction")
            raise ValueError(f"{len(self.bad)} of the {self.share} records this process reads from {path} are corrupt "
                             f"({len(self.bad) / self.share:.1%}, more than data.max_bad_fraction={self.max_bad_fraction:g}); {fix}")

    def _fetch_all(self, batches: list[np.ndarray], first: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, np.ndarray]]:
        """Batches ``first, first + 1, ...`` of this epoch (``batches``: their positions)."""
        for self._at, positions in enumerate(batches, first):
            yield self._fetch(positions)

    def _fetch(self, positions: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """Batch ``self._at`` of this epoch, at record ``positions``."""
        raise NotImplementedError

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        if self.batch >= len(self):
            self.epoch, self.batch = self.epoch + 1, 0
        batches = self.batch_positions(self.epoch)[self.batch :]
        for images, labels, kept in self._fetch_all(batches, self.batch):
            self.batch += 1  # counted before the hand-over: a checkpoint taken now resumes after it
            if self.with_positions:
                yield images, labels, torch.as_tensor(np.asarray(kept, dtype=np.int64))
            else:
                yield images, labels


# --------------------------------------------------------------------------------------------------
# PIL DataLoader


def decode_pil(data: bytes, size: int, bgr: bool) -> np.ndarray:
    """Encoded image -> (size, size, 3) uint8 RGB (bilinear resize only when the size differs)."""
    from lafs_fast.data.folder import load_rgb

    arr = np.asarray(load_rgb(data, size))
    return np.ascontiguousarray(arr[..., ::-1]) if bgr else arr


class _BatchDecode(torch.utils.data.Dataset):
    """Item = one whole batch, ``(positions, replacement stream seed)``, read and decoded in one
    worker (corrupt records replaced): (images, labels, corrupt list, positions of the images)."""

    def __init__(self, source, size: int, bgr: bool) -> None:
        self.source, self.size, self.bgr = source, size, bgr

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, task: tuple[np.ndarray, tuple[int, ...]]):
        positions, stream_seed = task
        try:
            items, bad = read_items(self.source, positions, replacement_stream(*stream_seed), check=lambda d: decode_pil(d, self.size, self.bgr))
        except RecordIOError as e:
            return None, None, str(e), None  # raised in the main process as one sentence, not a worker traceback
        images = torch.from_numpy(np.stack([im for *_, im in items]))
        labels = torch.tensor([label for _, _, label, _ in items], dtype=torch.int64)
        return images, labels, bad, np.asarray([p for p, *_ in items], dtype=np.int64)


class _Batches(torch.utils.data.Sampler):
    """The sampler of a persistent DataLoader: this epoch's batches, replaced before each pass."""

    def __init__(self) -> None:
        self.batches: list[np.ndarray] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _worker_context():
    import multiprocessing as mp

    if "forkserver" not in mp.get_all_start_methods():
        return None
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["lafs_fast.data.loaders"])  # imported once in the server, not per worker
    return ctx


class PilLoader(Loader):
    """CPU decode with PIL in torch DataLoader workers (one batch per worker task; the workers
    persist across epochs, the sampler is swapped)."""

    def __init__(self, source, batch_size: int, *, num_workers: int | None = None, image_size: int = 112, color_order: str = "RGB", reason: str = "", **kw) -> None:
        super().__init__(len(source), batch_size, num_classes=source.num_classes, **kw)
        self.source, self.image_size = source, image_size
        self.num_workers = min(8, os.cpu_count() or 1) if num_workers is None else num_workers
        self.dataset = _BatchDecode(source, image_size, color_order == "BGR")
        self._sampler = _Batches()
        self._dl = torch.utils.data.DataLoader(
            self.dataset, batch_size=None, sampler=self._sampler, num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda", persistent_workers=self.num_workers > 0,
            prefetch_factor=2 if self.num_workers > 0 else None,
            # not plain fork: forking a process that runs DALI's (or any) thread pools can crash the
            # child; forkserver workers start from a clean server process
            multiprocessing_context=_worker_context() if self.num_workers > 0 else None,
        )
        self.backend = f"pil: PIL decode in a torch DataLoader, {self.num_workers} workers ({reason})"

    def _fetch_all(self, batches, first):
        self._sampler.batches = [(b, (self.seed, self.epoch, i, self.rank, self.n)) for i, b in enumerate(batches, first)]
        for images, labels, bad, kept in self._dl:
            if images is None:
                raise RecordIOError(bad)
            self._note_corrupt(bad)
            yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True), kept


# --------------------------------------------------------------------------------------------------
# nvJPEG through torchvision


class NvjpegLoader(Loader):
    """GPU without DALI: batched ``torchvision.io.decode_jpeg(device='cuda')`` (nvJPEG), resize on the GPU.

    Non-JPEG records fall back to PIL one by one; a batch that fails to decode is decoded image by
    image to name the corrupt ones.
    """

    def __init__(self, source, batch_size: int, *, image_size: int = 112, color_order: str = "RGB", reason: str = "", allow_cpu: bool = False, **kw) -> None:
        super().__init__(len(source), batch_size, num_classes=source.num_classes, **kw)
        # allow_cpu: torchvision's CPU decoder behind the same batching / fallback / resize code (tests)
        if self.device.type != "cuda" and not allow_cpu:
            raise ValueError("the nvjpeg backend needs a CUDA device; pass device='cuda' or backend='pil'")
        self.source, self.image_size, self.bgr = source, image_size, color_order == "BGR"
        self.backend = f"nvjpeg: torchvision.io.decode_jpeg on {self.device} ({reason})"

    def _decode_one(self, data: torch.Tensor) -> torch.Tensor:
        from torchvision.io import ImageReadMode, decode_jpeg

        if data[:2].tolist() == [0xFF, 0xD8]:
            img = decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
        else:  # PNG and friends: PIL, then to the device
            img = torch.tensor(decode_pil(data.numpy().tobytes(), self.image_size, False)).permute(2, 0, 1).to(self.device)
        return img

    def _fetch(self, positions):
        from torchvision.io import ImageReadMode, decode_jpeg

        stream = self._stream()
        items, bad = read_items(self.source, positions, stream)  # host side: unreadable records replaced
        datas = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for _, d, _, _ in items]
        try:
            if not all(d[:2].tolist() == [0xFF, 0xD8] for d in datas):
                raise RuntimeError("not all JPEG")
            imgs = decode_jpeg(datas, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:  # image by image: a record that does not decode is replaced
            imgs = []
            for j, d in enumerate(datas):
                try:
                    imgs.append(self._decode_one(d))
                except (RuntimeError, OSError, ValueError) as e:
                    if isinstance(e, torch.cuda.OutOfMemoryError):  # the device, not the record
                        raise
                    bad.append((items[j][0], self.source.name(items[j][0]), f"{type(e).__name__}: {e}"))
                    (item,), more = read_items(self.source, [next(stream)], stream, check_errors=(RuntimeError, OSError, ValueError),
                                               check=lambda b: self._decode_one(torch.frombuffer(bytearray(b), dtype=torch.uint8)))
                    bad += more
                    items[j] = item
                    imgs.append(item[3])
        self._note_corrupt(bad)
        out = []
        for img in imgs:  # (3, H, W) uint8 on the device
            if img.shape[1:] != (self.image_size, self.image_size):
                img = torch.nn.functional.interpolate(img[None].float(), size=(self.image_size, self.image_size), mode="bilinear", antialias=True, align_corners=False)[0].round_().clamp_(0, 255).to(torch.uint8)
            out.append(img)
        images = torch.stack(out).permute(0, 2, 3, 1).contiguous()
        if self.bgr:
            images = images.flip(-1)
        labels = torch.tensor([label for _, _, label, _ in items], dtype=torch.int64).to(self.device)
        return images, labels, np.asarray([p for p, *_ in items], dtype=np.int64)


# --------------------------------------------------------------------------------------------------
# synthetic


class SyntheticLoader(Loader):
    """The built-in faces, rendered in batches straight on the device (no files, no decode)."""

    def __init__(self, dataset: SyntheticFaces, batch_size: int, *, reason: str = "", **kw) -> None:
        super().__init__(len(dataset), batch_size, num_classes=dataset.num_classes, **kw)
        self.dataset = dataset
        self.backend = f"synthetic: {dataset.num_identities} x {dataset.images_per_identity} procedural faces (seed {dataset.seed}) rendered on {self.device} ({reason})"

    def _fetch(self, positions):
        return (*self.dataset.batch(positions, self.device), np.asarray(positions))


# --------------------------------------------------------------------------------------------------
# factory


def _dali_available() -> str | None:
    """None when DALI imports, else the reason it does not."""
    try:
        import nvidia.dali  # noqa: F401
    except Exception as e:  # ImportError, or a broken CUDA library under it
        return f"DALI not importable: {type(e).__name__}"
    return None


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
        raise FileNotFoundError(f"{source} does not exist; pass a .rec, a folder holding train.rec, an image folder, or synthetic[:IDSxIMGS]")
    raise ValueError(f"{source} is neither a .rec nor a folder; pass a .rec, a folder holding train.rec, an image folder, or synthetic[:IDSxIMGS]")


BACKENDS = ("auto", "dali", "dali-mxnet", "nvjpeg", "pil", "synthetic")


def resolve_loader_backend(backend: str = "auto", device: str | torch.device = "cpu") -> tuple[str, str]:
    """``(backend, reason)`` that ``make_loader`` picks for a file source (a rec or an image folder)
    on ``device``: DALI when it imports, else nvJPEG on CUDA, else PIL. (`lafs-fast info` shows it.)"""
    if backend not in BACKENDS:
        raise ValueError(f"unknown data backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend, "requested"
    cuda = torch.device(device).type == "cuda"
    missing = _dali_available()
    if missing is None:
        return "dali", f"DALI installed, decode {'mixed (nvJPEG)' if cuda else 'on the CPU'}"
    if cuda:
        return "nvjpeg", f"{missing}; CUDA device"
    return "pil", f"{missing}; no CUDA device"


def make_loader(
    source,
    batch_size: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    shuffle: bool = True,
    seed: int = 0,
    device: str | torch.device = "cpu",
    drop_last: bool = True,
    backend: str = "auto",
    num_workers: int | None = None,
    color_order: str = "auto",
    image_size: int = 112,
    with_positions: bool = False,
    max_bad_fraction: float = 0.01,
) -> Loader:
    """A :class:`Loader` over ``source`` (a ``.rec`` path, a folder holding ``train.rec``, an image
    folder, ``"synthetic[:IDSxIMGS[:seed=S]]"``, a :class:`SyntheticFaces`, or None = synthetic).

    ``backend``: ``auto`` (DALI when it imports; else nvJPEG on CUDA, else PIL), or one of
    ``dali``, ``dali-mxnet`` (rec only), ``nvjpeg``, ``pil``. ``color_order``: how the source stores
    channels, ``RGB`` / ``BGR`` / ``auto`` (our ``lafs_fast.json``, else :data:`DATASET_COLOR_ORDER` by
    the path: MS1M BGR, WebFace RGB; else RGB); the output is always RGB. The choice and the reason are
    in ``loader.backend`` and logged. ``with_positions``: yield each image's record position too
    (not with ``dali-mxnet``, whose reader picks the records itself). ``max_bad_fraction``
    (``data.max_bad_fraction``): corrupt records are replaced and training goes on until more than
    this fraction of a rank's records turned out corrupt; then one sentence names the fix.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown data backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    kind, src = open_source(source)
    device = torch.device(device)
    common = dict(rank=rank, world_size=world_size, shuffle=shuffle, seed=seed, device=device, drop_last=drop_last,
                  with_positions=with_positions, max_bad_fraction=max_bad_fraction)
    if kind == "synthetic":
        if backend not in ("auto", "synthetic"):
            raise ValueError(f"backend {backend!r} decodes files; the synthetic source is rendered (use backend='auto')")
        loader: Loader = SyntheticLoader(src, batch_size, reason="no files: procedural faces", **common)
    else:
        color_order = color_order.upper()
        if color_order == "AUTO":
            color_order = src.color_order()
        if color_order not in ("RGB", "BGR"):
            raise ValueError(f"colour order must be RGB, BGR or auto, not {color_order!r}")
        if backend == "synthetic":
            raise ValueError(f"backend 'synthetic' renders faces; {source} is a {kind}")
        dali_missing = _dali_available()
        backend, reason = resolve_loader_backend(backend, device)
        if backend in ("dali", "dali-mxnet"):
            if dali_missing is not None:
                raise ValueError(f"backend {backend!r} needs NVIDIA DALI ({dali_missing}); pip install nvidia-dali-cuda130 or use backend='pil'")
            from lafs_fast.data.dali import DaliLoader, DaliMxnetLoader

            if backend == "dali-mxnet":
                if kind != "rec":
                    raise ValueError("backend 'dali-mxnet' reads .rec files only; use backend='dali' for an image folder")
                loader = DaliMxnetLoader(src, batch_size, image_size=image_size, color_order=color_order, reason=reason, **common)
            else:
                loader = DaliLoader(src, batch_size, image_size=image_size, color_order=color_order, reason=reason, **common)
        elif backend == "nvjpeg":
            loader = NvjpegLoader(src, batch_size, image_size=image_size, color_order=color_order, reason=reason, **common)
        else:
            loader = PilLoader(src, batch_size, num_workers=num_workers, image_size=image_size, color_order=color_order, reason=reason, **common)
        loader.backend += f"; colour order of the source: {color_order}"
    log.info("data loader: %s", loader.backend)
    return loader
