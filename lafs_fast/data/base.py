"""The loader contract every decode path shares: epochs, rank shards, exact resume, and corrupt
records skipped, counted and refilled (the rules are in ``lafs_fast.data.loaders``'s docstring).
The decode paths (``loaders``: PIL, nvJPEG, synthetic; ``dali``) subclass :class:`Loader`."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from lafs_fast.data.recordio import CorruptRecordError, RecordIOError

log = logging.getLogger(__name__)


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


def read_items(
    source,
    positions: Sequence[int],
    stream: Iterator[int],
    check=None,
    check_errors: tuple = (OSError, ValueError, SyntaxError),
) -> tuple[list[tuple], list[tuple[int, str, str]]]:
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
            fix = (  # data verify reads recs only: for a folder, the files named in the warnings
                f"run `lafs-fast data verify {source.path}` to see what is wrong with it"
                if getattr(source, "kind", "") == "rec"
                else "check the image files named in the warnings"
            )
            raise RecordIOError(f"{MAX_REFILL_TRIES} records of {source.path} in a row could not be read; {fix}")
    return items, bad


class Loader:
    """Base: epochs, sharding, position, the corrupt-record count; subclasses implement
    ``_fetch(positions) -> (images, labels, kept)`` (or ``_fetch_all``), ``kept`` the
    positions of the images actually returned (corrupt ones replaced, see the module docstring)."""

    backend: str = ""

    def __init__(
        self,
        n: int,
        batch_size: int,
        *,
        rank: int,
        world_size: int,
        shuffle: bool,
        seed: int,
        device: str | torch.device,
        drop_last: bool,
        num_classes: int,
        with_positions: bool = False,
        max_bad_fraction: float = 0.01,
    ) -> None:
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
            raise ValueError(
                f"{n} images over {world_size} rank(s) make no full batch of {batch_size}; lower the batch size or "
                "pass drop_last=False"
            )

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        return num_batches(
            self.n, self.batch_size, rank=self.rank, world_size=self.world_size, drop_last=self.drop_last
        )

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
        idx = shard_indices(
            self.n, epoch, seed=self.seed, shuffle=self.shuffle, rank=self.rank, world_size=self.world_size
        )
        return [idx[b * self.batch_size : (b + 1) * self.batch_size] for b in range(len(self))]

    def state_dict(self) -> dict:
        """The exact position: ``epoch``, ``batch`` (handed out so far this epoch) and what must match."""
        return {
            "epoch": self.epoch,
            "batch": self.batch,
            "seed": self.seed,
            "n": self.n,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "backend": self.backend.split(":")[0],
            "bad": [[p, name, why] for p, (name, why) in sorted(self.bad.items())],
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue at a saved position; ValueError when data size, seed, batch or world size differ."""
        for k in ("seed", "n", "batch_size", "world_size"):
            if k in state and state[k] != getattr(self, k):
                raise ValueError(
                    f"the saved loader position is for {k}={state[k]} but this loader has {k}={getattr(self, k)}; "
                    "resume with the same data, batch size and world size"
                )
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
        self.bad = {int(p): (name, why) for p, name, why in state.get("bad", [])}  # the count goes on across a resume

    def _stream(self) -> Iterator[int]:
        """Replacements for the corrupt records of the batch being fetched (``self._at``)."""
        return replacement_stream(self.seed, self.epoch, self._at, self.rank, self.n)

    def _note_corrupt(self, bad: Sequence[tuple[int, str, str]]) -> None:
        """Count and name each new corrupt record (a warning each); past ``max_bad_fraction`` instead one
        ValueError, the run's last words (one sentence, naming the records it met last and the fix)."""
        new = {int(pos): (what, why) for pos, what, why in bad if int(pos) not in self.bad}
        seen = len(self.bad)
        self.bad.update(new)
        if len(self.bad) <= self.max_bad_fraction * self.share:
            for count, (what, why) in enumerate(new.values(), seen + 1):
                log.warning("skipped a corrupt record: %s (%s); %d so far", what, why, count)
        else:
            path = getattr(getattr(self, "source", None), "path", "the data")
            fix = (
                f"run `lafs-fast data verify {path} --write-bad` to list them in {path}.bad (every loader then skips "
                "the listed keys "
                f"without counting them) or raise data.max_bad_fraction"
                if getattr(self.source, "kind", "") == "rec"
                else "delete or replace the files named here and in the warnings, or raise data.max_bad_fraction"
            )
            names = [what for what, _ in new.values()]
            latest = f"the latest: {', '.join(names[:3])}{f' and {len(names) - 3} more' if len(names) > 3 else ''}; "
            raise ValueError(
                f"{len(self.bad)} of the {self.share} records this process reads from {path} are corrupt "
                f"({latest if names else ''}{len(self.bad) / self.share:.1%}, more than data.max_bad_fraction="
                f"{self.max_bad_fraction:g}); {fix}"
            )

    def _fetch_all(
        self, batches: list[np.ndarray], first: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, np.ndarray]]:
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


class SourceLoader(Loader):
    """A decode path over the records of a source (a rec or an image folder, ``lafs_fast.data.sources``):
    the source, the output side and whether the source stores BGR, set once for every decode path
    (PIL, nvJPEG, DALI). ``kw``: :class:`Loader`'s keywords."""

    def __init__(self, source, batch_size: int, *, image_size: int = 112, color_order: str = "RGB", **kw) -> None:
        super().__init__(len(source), batch_size, num_classes=source.num_classes, **kw)
        self.source, self.image_size, self.bgr = source, image_size, color_order == "BGR"
