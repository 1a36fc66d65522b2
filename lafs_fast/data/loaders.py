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
import os

import numpy as np
import torch

from lafs_fast.data.base import Loader, SourceLoader, read_items, replacement_stream
from lafs_fast.data.recordio import RecordIOError
from lafs_fast.data.sources import decode_pil, open_source
from lafs_fast.data.synthetic import SyntheticFaces

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# PIL DataLoader


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
            items, bad = read_items(
                self.source,
                positions,
                replacement_stream(*stream_seed),
                check=lambda d: decode_pil(d, self.size, self.bgr),
            )
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


class PilLoader(SourceLoader):
    """CPU decode with PIL in torch DataLoader workers (one batch per worker task; the workers
    persist across epochs, the sampler is swapped)."""

    def __init__(self, source, batch_size: int, *, num_workers: int | None = None, reason: str = "", **kw) -> None:
        super().__init__(source, batch_size, **kw)
        self.num_workers = min(8, os.cpu_count() or 1) if num_workers is None else num_workers
        self.dataset = _BatchDecode(source, self.image_size, self.bgr)
        self._sampler = _Batches()
        self._dl = torch.utils.data.DataLoader(
            self.dataset,
            batch_size=None,
            sampler=self._sampler,
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=self.num_workers > 0,
            prefetch_factor=2 if self.num_workers > 0 else None,
            # not plain fork: forking a process that runs DALI's (or any) thread pools can crash the
            # child; forkserver workers start from a clean server process
            multiprocessing_context=_worker_context() if self.num_workers > 0 else None,
        )
        self.backend = f"pil: PIL decode in a torch DataLoader, {self.num_workers} workers ({reason})"

    def _fetch_all(self, batches, first):
        self._sampler.batches = [
            (b, (self.seed, self.epoch, i, self.rank, self.n)) for i, b in enumerate(batches, first)
        ]
        for images, labels, bad, kept in self._dl:
            if images is None:
                raise RecordIOError(bad)
            self._note_corrupt(bad)
            yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True), kept


# --------------------------------------------------------------------------------------------------
# nvJPEG through torchvision


class NvjpegLoader(SourceLoader):
    """GPU without DALI: batched ``torchvision.io.decode_jpeg(device='cuda')`` (nvJPEG), resize on the GPU.

    Non-JPEG records fall back to PIL one by one; a batch that fails to decode is decoded image by
    image to name the corrupt ones.
    """

    def __init__(self, source, batch_size: int, *, reason: str = "", allow_cpu: bool = False, **kw) -> None:
        super().__init__(source, batch_size, **kw)
        # allow_cpu: torchvision's CPU decoder behind the same batching / fallback / resize code (tests)
        if self.device.type != "cuda" and not allow_cpu:
            raise ValueError("the nvjpeg backend needs a CUDA device; pass device='cuda' or backend='pil'")
        self.backend = f"nvjpeg: torchvision.io.decode_jpeg on {self.device} ({reason})"

    def _decode_one(self, data: torch.Tensor) -> torch.Tensor:
        from torchvision.io import ImageReadMode, decode_jpeg

        if data[:2].tolist() == [0xFF, 0xD8]:
            img = decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
        else:  # PNG and friends: PIL, then to the device
            img = (
                torch.tensor(decode_pil(data.numpy().tobytes(), self.image_size, False))
                .permute(2, 0, 1)
                .to(self.device)
            )
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
                    (item,), more = read_items(
                        self.source,
                        [next(stream)],
                        stream,
                        check_errors=(RuntimeError, OSError, ValueError),
                        check=lambda b: self._decode_one(torch.frombuffer(bytearray(b), dtype=torch.uint8)),
                    )
                    bad += more
                    items[j] = item
                    imgs.append(item[3])
        self._note_corrupt(bad)
        out = []
        for img in imgs:  # (3, H, W) uint8 on the device
            if img.shape[1:] != (self.image_size, self.image_size):
                img = (
                    torch.nn.functional.interpolate(
                        img[None].float(),
                        size=(self.image_size, self.image_size),
                        mode="bilinear",
                        antialias=True,
                        align_corners=False,
                    )[0]
                    .round_()
                    .clamp_(0, 255)
                    .to(torch.uint8)
                )
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
        self.backend = (
            f"synthetic: {dataset.num_identities} x {dataset.images_per_identity} procedural faces "
            f"(seed {dataset.seed}) rendered on {self.device} ({reason})"
        )

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


def _color_order(src, color_order: str) -> str:
    """``RGB`` / ``BGR`` as asked, or ``auto``: what the source says it stores."""
    color_order = color_order.upper()
    if color_order == "AUTO":
        color_order = src.color_order()
    if color_order not in ("RGB", "BGR"):
        raise ValueError(f"colour order must be RGB, BGR or auto, not {color_order!r}")
    return color_order


def _file_loader(
    kind: str, src, batch_size: int, backend: str, device: torch.device, num_workers: int | None, files: dict
) -> Loader:
    """The decode path of a rec or an image folder: ``backend`` resolved (auto: DALI, nvJPEG, PIL);
    ``files``: the loader's keywords (image size, colour order, the common ones)."""
    dali_missing = _dali_available()
    backend, reason = resolve_loader_backend(backend, device)
    if backend in ("dali", "dali-mxnet"):
        if dali_missing is not None:
            raise ValueError(
                f"backend {backend!r} needs NVIDIA DALI ({dali_missing}); pip install nvidia-dali-cuda130 or use "
                "backend='pil'"
            )
        from lafs_fast.data.dali import DaliLoader, DaliMxnetLoader

        if backend == "dali-mxnet" and kind != "rec":
            raise ValueError("backend 'dali-mxnet' reads .rec files only; use backend='dali' for an image folder")
        cls = DaliMxnetLoader if backend == "dali-mxnet" else DaliLoader
        return cls(src, batch_size, reason=reason, **files)
    if backend == "nvjpeg":
        return NvjpegLoader(src, batch_size, reason=reason, **files)
    return PilLoader(src, batch_size, num_workers=num_workers, reason=reason, **files)


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
    common = dict(
        rank=rank,
        world_size=world_size,
        shuffle=shuffle,
        seed=seed,
        device=device,
        drop_last=drop_last,
        with_positions=with_positions,
        max_bad_fraction=max_bad_fraction,
    )
    if kind == "synthetic":
        if backend not in ("auto", "synthetic"):
            raise ValueError(
                f"backend {backend!r} decodes files; the synthetic source is rendered (use backend='auto')"
            )
        loader: Loader = SyntheticLoader(src, batch_size, reason="no files: procedural faces", **common)
    else:
        color_order = _color_order(src, color_order)
        if backend == "synthetic":
            raise ValueError(f"backend 'synthetic' renders faces; {source} is a {kind}")
        files = dict(image_size=image_size, color_order=color_order, **common)
        loader = _file_loader(kind, src, batch_size, backend, device, num_workers, files)
        loader.backend += f"; colour order of the source: {color_order}"
    log.info("data loader: %s", loader.backend)
    return loader
