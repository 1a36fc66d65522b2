"""The run folder (``--out``): one run at a time, and a new run never mixes with an older one.

- :func:`check_run_folder` (before any work): a NEW run (no ``--resume``) into a folder that holds
  another run's checkpoints, model files or metrics log is refused with one sentence, unless
  ``--overwrite`` asks to replace it (its files are deleted when the run starts). Without this, a
  fresh run into an old folder kept none of its own checkpoints (pruning keeps the highest step
  numbers, the old run's) and a later ``--resume`` continued the OLD run.
- :class:`RunLock` (rank 0, for the life of the run): an exclusive ``flock`` on ``.lafs-fast.lock``
  in the folder. A second run into the same folder at the same time is refused naming the first's
  pid; the kernel drops the lock when the holder dies (kill -9 included), so it is never stale.
  Under the lock, temporary files of killed writes are cleared.
- Nothing is written through a link planted in the folder (a shared scratch folder is where this
  happens): the lock is opened with ``O_NOFOLLOW`` and must be a plain file of one name, and
  :func:`check_no_links` refuses a run file or ``tb/`` that is a symbolic link before anything is
  written or deleted (``--overwrite`` included). ``--out`` itself may be a link: the user named it.
- :class:`MetricsLog`: the run's ``metrics.jsonl`` (and TensorBoard's ``tb/`` when it is installed,
  W&B with ``train.wandb``).
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import stat
import time
from pathlib import Path

from lafs_fast.io import atomic_write_bytes, remove_stale_temporaries

__all__ = ["RUN_FILES", "RunLock", "MetricsLog", "check_no_links", "check_run_folder", "run_files"]

log = logging.getLogger(__name__)

LOCK_NAME = ".lafs-fast.lock"
# what a run writes (checkpoints by pattern); a folder holding any of these holds a run
RUN_FILES = (
    "metrics.jsonl",
    "teacher.pt",
    "part_fvit.pt",
    "best.pt",
    "best.json",
    "summary.json",
    "config.yaml",
    "train.log",
)
RUN_DIRS = ("tb", "wandb")  # TensorBoard's and W&B's folders


def run_files(out_dir: str | Path) -> list[Path]:
    """The files (and the TensorBoard / W&B folders) of a run in ``out_dir``, checkpoints first."""
    d = Path(out_dir)
    if not d.is_dir():
        return []
    found = sorted(p for p in d.iterdir() if p.name.startswith("ckpt-") and p.suffix in (".pt", ".keep"))
    found += [d / n for n in RUN_FILES if (d / n).exists()]
    found += sorted(d.glob("teacher-*.pt"))  # pretrain --save-teacher-every
    found += [d / n for n in RUN_DIRS if (d / n).is_dir()]
    return found


def check_no_links(out_dir: str | Path) -> None:
    """Refuse a run file, checkpoint or folder (``tb/``, ``wandb/``) of ``out_dir`` that is a symbolic
    link: the run would append to, write into or delete what it points at (one sentence naming both)."""
    d = Path(out_dir)
    if not d.is_dir():
        return
    names = {*RUN_FILES, *RUN_DIRS, LOCK_NAME}
    for p in sorted(d.iterdir()):
        if p.is_symlink() and (p.name in names or p.name.startswith("ckpt-")):
            raise FileExistsError(
                f"{p} is a symbolic link (to {os.readlink(p)}) and a run never writes through one; delete the link "
                "or choose another --out"
            )


def check_run_folder(out_dir: str | Path, resume: str | None, overwrite: bool = False) -> None:
    """Refuse a new run into a folder that holds another (see the module docstring)."""
    if resume is not None or overwrite:
        return
    found = run_files(out_dir)
    if found:
        names = ", ".join(p.name for p in found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
        raise FileExistsError(
            f"{out_dir} already holds a run ({names}); continue it with --resume, replace it with --overwrite, "
            "or choose another --out"
        )


def _open_lock(path: Path) -> int:
    """The lock file's descriptor, never through a link: ``O_NOFOLLOW``, and a plain file with one name
    (a hard link to a victim file would have its contents replaced by our pid line)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        why = f"a symbolic link (to {os.readlink(path)})"
    else:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
            return fd
        os.close(fd)
        why = f"a file with {st.st_nlink} names (hard links)" if stat.S_ISREG(st.st_mode) else "not a plain file"
    raise FileExistsError(
        f"the run lock {path} is {why}, which lafs-fast never writes through; delete it and run again"
    )


def append_line(path: Path, line: str) -> None:
    """Append ``line`` to ``path`` whole or not at all: a write that a full disk (or a file-size limit)
    cuts short is taken back, so the log never ends in half a JSON line; the error names ``path``.
    Never through a link (``O_NOFOLLOW``: ELOOP)."""
    data = line.encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    try:
        size = os.fstat(fd).st_size
        try:
            done = 0
            while done < len(data):
                done += os.write(fd, data[done:])
        except OSError as exc:
            os.ftruncate(fd, size)
            raise OSError(exc.errno, exc.strerror, str(path)) from None
    finally:
        os.close(fd)


class RunLock:
    """Exclusive lock of a run folder for this process's life (or until every holder :meth:`release`s).

    Within one process the lock is shared: a later engine on the same folder (a library user running
    two stages one after the other, a test) reuses it; ``flock`` would otherwise refuse the
    process's own older descriptor."""

    _held: dict[Path, list[int]] = {}  # folder -> [fd, holders] of this process

    def __init__(self, out_dir: str | Path) -> None:
        self.path = Path(out_dir).resolve() / LOCK_NAME
        self._released = False
        held = RunLock._held.get(self.path)
        if held is not None:
            held[1] += 1
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = _open_lock(self.path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            self._released = True
            raise FileExistsError(
                f"another lafs-fast run ({holder}) is writing to {self.path.parent}; wait for it to end "
                "or choose another --out"
            ) from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode(), 0)
        except OSError as exc:  # a full disk: one sentence naming the lock (errors.USER_ERRNOS)
            os.close(fd)
            self._released = True
            raise OSError(exc.errno, exc.strerror, str(self.path)) from None
        RunLock._held[self.path] = [fd, 1]
        remove_stale_temporaries(self.path.parent)

    def replace_old_run(self) -> list[Path]:
        """Delete the files of an older run in the folder (``--overwrite``); returns what was deleted."""
        check_no_links(self.path.parent)  # all checked before anything is deleted
        found = run_files(self.path.parent)
        for p in found:
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
        return found

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        held = RunLock._held.get(self.path)
        if held is None:
            return
        held[1] -= 1
        if held[1] == 0:
            del RunLock._held[self.path]
            fcntl.flock(held[0], fcntl.LOCK_UN)
            os.close(held[0])

    def __del__(self) -> None:
        self.release()


class MetricsLog:
    """The run's records: one JSON line each in ``out_dir/metrics.jsonl``, the same keys as TensorBoard
    scalars in ``out_dir/tb`` when tensorboard is installed (``pip install 'lafs-fast[tensorboard]'``),
    and in a W&B run with ``wandb_config`` (``train.wandb``: the run's config dict; W&B files in
    ``out_dir/wandb``). Every record has a ``step``; step records also an ``epoch``. Only a process
    with ``write`` (rank 0) writes anything."""

    def __init__(self, out_dir: str | Path, write: bool, wandb_config: dict | None = None) -> None:
        self.out_dir, self.write = Path(out_dir), write
        self._tb = None  # None: not opened yet; False: tensorboard missing
        self._wandb_config = wandb_config
        self._wandb = None  # the W&B run once opened
        if write and wandb_config is not None:
            from lafs_fast.errors import require_extra

            require_extra("train.wandb", "wandb", "wandb")  # one sentence before the run, not after a step

    def add(self, record: dict[str, float]) -> None:
        if not self.write:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        append_line(self.out_dir / "metrics.jsonl", json.dumps(record) + "\n")
        scalars = {k: v for k, v in record.items() if k not in ("step", "epoch")}
        step = int(record["step"])
        if self._tb is None:
            self._tb = self._open_tensorboard()
        if self._tb:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb_config is not None:
            if self._wandb is None:
                self._wandb = self._open_wandb()
            self._wandb.log(scalars, step=step)

    def _open_tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception as exc:  # noqa: BLE001 - missing or broken: the JSONL log is the record; say so once
            log.info(
                f"TensorBoard is not available ({type(exc).__name__}): metrics.jsonl only "
                "(pip install 'lafs-fast[tensorboard]')"
            )
            return False
        return SummaryWriter(str(self.out_dir / "tb"))

    def _open_wandb(self):
        import wandb

        return wandb.init(
            project=os.environ.get("WANDB_PROJECT", "lafs-fast"),
            name=self.out_dir.resolve().name,
            dir=str(self.out_dir),
            config=self._wandb_config,
        )

    def cut_back(self, step: int) -> None:
        """``--resume`` from ``step``: drop the records after it (a killed run logged steps past its last
        checkpoint; the resumed run logs them again) and a torn last line (a write the kill or a full
        disk cut short), each said in one line."""
        path = self.out_dir / "metrics.jsonl"
        if not self.write or not path.is_file():
            return
        lines = path.read_bytes().splitlines(keepends=True)
        kept, torn, later = [], 0, 0
        for line in lines:
            try:
                rec = json.loads(line)
            except ValueError:  # UnicodeDecodeError included
                torn += 1
                continue
            if isinstance(rec, dict) and isinstance(rec.get("step"), (int, float)) and rec["step"] > step:
                later += 1
            else:
                kept.append(line if line.endswith(b"\n") else line + b"\n")
        if torn or later:
            atomic_write_bytes(b"".join(kept), path)
        if torn:
            log.warning("%s: dropped %d line(s) that are not whole JSON records (a write cut short)", path, torn)
        if later:
            log.info("%s: dropped the %d record(s) after step %d, which this run logs again", path, later, step)

    def close(self) -> None:
        """Flush and close TensorBoard's writer and finish the W&B run (idempotent)."""
        if self._tb:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
