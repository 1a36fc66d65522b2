"""DALI decode pipelines: ONE pipeline definition, parameterised by device and reader.

``face_pipeline(device="gpu" | "cpu", reader="external" | "mxnet", ...)`` ->
``(images (B, S, S, 3) uint8 RGB as stored, labels (B,) int64)``. The same graph runs on the CPU
(``decoders.image(device="cpu")``, ``device_id=None``) and on a GPU (``device="mixed"``: nvJPEG,
with the resize on the GPU), so the CPU tests exercise the graph the GPU runs.

Readers:

- ``external`` (the default, :class:`DaliLoader`): our sampler (``base.shard_indices``) picks
  the records, the bytes are sliced from the mmap'ed rec (or read from the image folder) and fed
  with ``feed_input``. Epochs are exact whole-file permutations, sharding is identical to the other
  paths, resume is ``(epoch, batch)``, and a corrupt record is found, named and replaced (the
  batch is re-run with a replacement record) instead of killing the run.
- ``mxnet`` (:class:`DaliMxnetLoader`): DALI's own ``fn.readers.mxnet``, sharded by rank
  (``shard_id``/``num_shards``, shards rotate every epoch) and shuffled with ``random_shuffle``.
  DALI's RecordIO reader shuffles through a buffer of ``initial_fill`` records only
  (``shuffle_after_epoch`` permutes whole files, and a rec is one file: seen with DALI 2.4.0, every
  epoch then comes in file order), and that buffer carries a few records across epoch boundaries;
  resume uses DALI's own checkpoints. It reads an index of the
  image records only (the header and identity records hold no image), written to a temporary
  folder, without the keys listed in ``<rec>.bad``; a corrupt image not listed there stops it with
  the fix (``lafs-fast data verify REC --write-bad``).
"""

from __future__ import annotations

import logging
import tempfile
from collections import deque
from pathlib import Path

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types

from lafs_fast.data.base import SourceLoader, read_items
from lafs_fast.data.sources import decode_pil

log = logging.getLogger(__name__)


@pipeline_def
def face_pipeline(
    *,
    device: str,
    reader: str = "external",
    rec: str = "",
    idx: str = "",
    shard_id: int = 0,
    num_shards: int = 1,
    shuffle: bool = True,
    initial_fill: int = 4096,
    resize_to: int | None = None,
):
    """The decode graph. ``device``: "gpu" (mixed decode, GPU resize) or "cpu"; ``resize_to``: output
    side when the stored images differ from it (None: no resize node)."""
    if reader == "mxnet":
        jpegs, labels = fn.readers.mxnet(
            path=[rec],
            index_path=[idx],
            shard_id=shard_id,
            num_shards=num_shards,
            random_shuffle=shuffle,
            initial_fill=initial_fill,
            pad_last_batch=False,
            name="Reader",
        )
        labels = fn.cast(labels[0], dtype=types.INT64)  # image records: flag 0 -> one float label
    elif reader == "external":
        jpegs = fn.external_source(name="jpegs", dtype=types.UINT8, ndim=1)
        labels = fn.external_source(name="labels", dtype=types.INT64, ndim=0)
    else:
        raise ValueError(f"unknown DALI reader {reader!r}; use 'external' or 'mxnet'")
    images = fn.decoders.image(jpegs, device="mixed" if device == "gpu" else "cpu", output_type=types.RGB)
    if resize_to is not None:
        images = fn.resize(images, size=[resize_to, resize_to], interp_type=types.INTERP_LINEAR, antialias=True)
    return images, labels


def _to_torch(tl, device: torch.device) -> torch.Tensor:
    """A dense DALI TensorList (CPU or GPU) -> torch tensor on ``device`` (a copy)."""
    from nvidia.dali.tensors import TensorListGPU

    if isinstance(tl, TensorListGPU):  # both list types have as_cpu(): test the type itself
        if device.type == "cuda":  # GPU -> GPU on torch's current stream
            from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

            t = tl.as_tensor()
            out = torch.empty(t.shape(), dtype=to_torch_type[t.dtype], device=device)
            feed_ndarray(t, out, cuda_stream=torch.cuda.current_stream(device))
            return out
        tl = tl.as_cpu()
    return torch.from_numpy(np.array(tl.as_array())).to(device)


def _device_id(device: torch.device) -> int | None:
    """DALI's device_id: None for the CPU graph; the CUDA index (or torch's current device)."""
    if device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


def _resize_needed(source, image_size: int) -> int | None:
    """None when the source's stored size is image_size x image_size (no resize node), else image_size."""
    return None if (source.height, source.width) == (image_size, image_size) else image_size


class DaliLoader(SourceLoader):
    """DALI decode of the records our sampler picks (``reader="external"``); see the module docstring."""

    def __init__(self, source, batch_size: int, *, reason: str = "", num_threads: int = 4, **kw) -> None:
        super().__init__(source, batch_size, **kw)
        self.pipe_device = "gpu" if self.device.type == "cuda" else "cpu"
        self.num_threads = num_threads
        self.depth = 2  # batches in flight: the next one decodes while the current one trains
        self._pending = 0  # runs scheduled and not yet collected
        self.resize_to = _resize_needed(source, self.image_size)
        self.pipe = self._build()
        self.backend = (
            f"dali: DALI decode {'mixed (nvJPEG)' if self.pipe_device == 'gpu' else 'cpu'} of sampler-fed records"
            f"{f', resize to {self.image_size}' if self.resize_to else ''} ({reason})"
        )

    def _build(self):
        pipe = face_pipeline(
            device=self.pipe_device,
            reader="external",
            resize_to=self.resize_to,
            batch_size=self.batch_size,
            num_threads=self.num_threads,
            device_id=_device_id(self.device),
            prefetch_queue_depth=self.depth,
            seed=self.seed,
        )
        pipe.build()
        # batches are fed one by one ahead of time (feed_input + schedule_run), so the legacy
        # first-iteration prefetch (which expects `depth` batches already fed) must not run
        if hasattr(pipe, "_first_iter"):
            pipe._first_iter = False
        elif self.depth > 1:  # a DALI without that attribute: one batch at a time
            self.depth = 1
            return self._build()
        return pipe

    def _feed(self, positions: np.ndarray, check=None) -> np.ndarray:
        """Read the records of batch ``self._at`` (corrupt ones replaced, see ``loaders.read_items``;
        ``check`` also decodes each with PIL) and feed them; returns the positions actually fed."""
        items, bad = read_items(self.source, positions, self._stream(), check=check)
        self._note_corrupt(bad)
        self.pipe.feed_input("jpegs", [np.frombuffer(d, dtype=np.uint8) for _, d, _, _ in items])
        self.pipe.feed_input("labels", np.array([label for _, _, label, _ in items], dtype=np.int64))
        return np.asarray([p for p, *_ in items], dtype=np.int64)

    def _convert(self, outputs) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = outputs
        images = _to_torch(images, self.device)  # a copy: DALI's buffers are reused
        if self.bgr:
            images = images.flip(-1)
        return images, _to_torch(labels, self.device).view(-1)

    def _fetch_all(self, batches, first):
        """Up to ``depth`` batches in flight (feed + schedule_run ahead, outputs in order). After a
        DALI error the pipeline is rebuilt and the batches in flight go through :meth:`_fetch`,
        which finds the records DALI cannot decode with PIL and replaces them."""
        while self._pending:  # runs left in flight by an abandoned pass: drain, never hand out
            self._pending -= 1
            self.pipe.outputs()
        todo = deque(enumerate((np.asarray(b) for b in batches), first))
        inflight: deque = deque()
        while todo or inflight:
            while todo and len(inflight) < self.depth:
                self._at, b = todo.popleft()
                fed = self._feed(b)
                self.pipe.schedule_run()
                self._pending += 1
                inflight.append((self._at, b, fed))
            i, b, fed = inflight.popleft()
            try:
                self._pending -= 1
                out = (*self._convert(self.pipe.outputs()), fed)
            except RuntimeError:
                self.pipe, self._pending = self._build(), 0
                redo = [(i, b), *((j, c) for j, c, _ in inflight)]
                inflight.clear()
                for self._at, c in redo:
                    yield self._fetch(c)
                continue
            yield out

    def _fetch(self, positions):
        """Batch ``self._at``, synchronously; on a DALI error the records are decoded with PIL first, the
        ones that fail are replaced, and the batch runs again."""
        positions = np.asarray(positions)
        try:
            fed = self._feed(positions)
            self.pipe.schedule_run()
            return (*self._convert(self.pipe.outputs()), fed)
        except RuntimeError as e:
            # DALI invalidates the pipeline on a decode error: rebuild, and feed only records PIL decodes
            self.pipe = self._build()
            fed = self._feed(positions, check=lambda d: decode_pil(d, self.image_size, False))
            try:
                self.pipe.schedule_run()
                return (*self._convert(self.pipe.outputs()), fed)
            except RuntimeError:
                self.pipe = self._build()
                raise RuntimeError(
                    "DALI failed on a batch in which PIL decodes every image: "
                    f"{str(e).splitlines()[-1] if str(e) else e}"
                ) from e


class DaliMxnetLoader(SourceLoader):
    """DALI's ``fn.readers.mxnet`` (``reader="mxnet"``): DALI shards and shuffles; see the module docstring.

    ``len()`` is the batches of the smallest shard (every rank yields that many per epoch, extra
    batches of a larger shard are read and dropped, so ranks stay in step); ``state_dict`` holds
    DALI's reader checkpoint, so a resume continues the same stream.
    """

    def __init__(
        self, source, batch_size: int, *, reason: str = "", num_threads: int = 4, initial_fill: int = 4096, **kw
    ) -> None:
        kw["drop_last"] = True  # DALI's reader gives full batches; partial ones are dropped
        if kw.pop("with_positions", False):
            raise ValueError(
                "backend 'dali-mxnet' reads records in DALI's own order and cannot say which record each image is; "
                "use backend 'dali' (records picked by our sampler) where positions are needed (--landmarks detector)"
            )
        super().__init__(source, batch_size, **kw)
        self.pipe_device = "gpu" if self.device.type == "cuda" else "cpu"
        self.num_threads, self.initial_fill = num_threads, initial_fill
        self.resize_to = _resize_needed(source, self.image_size)
        self._tmp = tempfile.TemporaryDirectory(prefix="lafs_fast_dali_")
        self.idx_path = Path(self._tmp.name) / "images.idx"
        reader = source.reader
        with open(self.idx_path, "w") as f:  # image records only: DALI would decode the header records
            f.writelines(f"{int(k)}\t{reader.offset(int(k))}\n" for k in source.keys)
        self._checkpoint: str | None = None
        self._it = None
        self.backend = (
            f"dali-mxnet: DALI fn.readers.mxnet shard {self.rank}/{self.world_size}, shuffle buffer {initial_fill}, "
            f"decode {'mixed (nvJPEG)' if self.pipe_device == 'gpu' else 'cpu'} ({reason})"
        )

    def _iterator(self):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        pipe = face_pipeline(
            device=self.pipe_device,
            reader="mxnet",
            rec=str(self.source.path),
            idx=str(self.idx_path),
            shard_id=self.rank,
            num_shards=self.world_size,
            shuffle=self.shuffle,
            initial_fill=min(self.initial_fill, max(1, self.n // self.world_size)),
            resize_to=self.resize_to,
            batch_size=self.batch_size,
            num_threads=self.num_threads,
            device_id=_device_id(self.device),
            seed=self.seed,
            enable_checkpointing=True,
            checkpoint=self._checkpoint,
        )
        return DALIGenericIterator(
            [pipe], ["images", "labels"], reader_name="Reader", last_batch_policy=LastBatchPolicy.DROP, auto_reset=True
        )

    def set_epoch(self, epoch: int) -> None:
        """A new epoch after a partial pass: read out the rest of DALI's epoch first, so the reader's
        stream stays the one an uninterrupted run sees."""
        if epoch != self.epoch and self._it is not None and 0 < self.batch < len(self):
            for _ in self._it:  # stops at DALI's epoch end (auto_reset re-arms it)
                pass
        super().set_epoch(epoch)

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["dali_checkpoint"] = self._it.checkpoints()[0] if self._it is not None else self._checkpoint
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._checkpoint = state.get("dali_checkpoint")
        self._it = None

    def __iter__(self):
        if self.batch >= len(self):
            self.epoch, self.batch = self.epoch + 1, 0
        if self._it is None:
            self._it = self._iterator()
        try:
            for out in self._it:
                if self.batch >= len(self):
                    continue  # a larger shard's extra batches: read, not handed out
                images = out[0]["images"]
                images = images.to(self.device) if images.device != self.device else images
                if self.bgr:
                    images = images.flip(-1)
                self.batch += 1
                yield images, out[0]["labels"].view(-1).to(self.device)
        except RuntimeError as e:
            raise ValueError(
                f"DALI's mxnet reader stopped on {self.source.path} (most likely a corrupt image): "
                f"{str(e).strip().splitlines()[-1]}; "
                f"run `lafs-fast data verify {self.source.path} --write-bad` (the loaders skip the keys it lists) or "
                "use backend='dali'"
            ) from e
