"""The messages of a training run: one logger per run, rank 0 speaks, everything it says also goes to
``train.log`` in the run folder.

``start_run_logging(rank)`` returns the run's logger: INFO from rank 0 only (the others' INFO would
repeat it N times), WARNING and above from every rank, prefixed ``rank r:``. Lines go through
``tqdm.write`` (a progress bar stays intact) to whatever ``sys.stdout`` is at that moment. Lines said
before the run folder is known (before the engine holds its lock) are kept and written first when
:func:`log_to_file` opens ``train.log``. ``stop_run_logging`` closes it (a later run in the same
process gets its own file).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

__all__ = ["RUN_LOGGER", "start_run_logging", "log_to_file", "stop_run_logging", "run_logging_active"]

RUN_LOGGER = "lafs_fast.run"
_active = False  # between start_run_logging and stop_run_logging (its handlers alone do not say: tools add their own)


class _Console(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stdout if record.levelno < logging.WARNING else sys.stderr)
        except BrokenPipeError:
            raise
        except Exception:  # noqa: BLE001 - logging must never stop a run
            self.handleError(record)


class _Rank(logging.Filter):
    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        if self.rank == 0:
            return True
        if record.levelno < logging.WARNING:
            return False
        record.msg = f"rank {self.rank}: {record.msg}"
        return True


class _Early(logging.Handler):
    """Keeps what is said before the log file exists."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def start_run_logging(rank: int = 0) -> logging.Logger:
    """The run's logger, set up for this process's ``rank`` (replacing any earlier run's set-up)."""
    global _active
    stop_run_logging()
    _active = True
    log = logging.getLogger(RUN_LOGGER)
    log.setLevel(logging.INFO)
    log.propagate = False
    console = _Console()
    console.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(console)
    if rank == 0:
        log.addHandler(_Early())
    log.addFilter(_Rank(rank))
    return log


def log_to_file(path: str | Path) -> None:
    """From now on also append the run's lines to ``path`` (rank 0), starting with those said so far."""
    log = logging.getLogger(RUN_LOGGER)
    early = [h for h in log.handlers if isinstance(h, _Early)]
    if not early:
        return  # not rank 0, or no run logging (a library caller's engine)
    for h in early:
        log.removeHandler(h)
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    for record in early[0].records:
        handler.handle(record)
    log.addHandler(handler)


def run_logging_active() -> bool:
    """Whether a command set up the run's logging (else a library caller's engine prints plainly)."""
    return _active


def stop_run_logging() -> None:
    global _active
    _active = False
    log = logging.getLogger(RUN_LOGGER)
    for h in [h for h in log.handlers if isinstance(h, (_Console, _Early, logging.FileHandler))]:
        log.removeHandler(h)
        h.close()
    for f in list(log.filters):
        log.removeFilter(f)
