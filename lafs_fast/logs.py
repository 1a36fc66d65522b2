"""The package's messages: one logger tree under ``lafs_fast``, whose handlers live on the package
logger alone.

Every module logs to ``logging.getLogger(__name__)``; its records climb to the ``lafs_fast`` logger,
which writes them to the terminal through ``tqdm.write`` (a progress bar stays intact) to whatever
``sys.stdout`` (INFO) or ``sys.stderr`` (WARNING and above) is at that moment, without a prefix.
Outside a training run (a library caller, a tool) that is all.

A training run (:func:`start_run_logging`) replaces that handler by the run's: INFO from rank 0
only (the others' INFO would repeat it N times), WARNING and above from every rank, prefixed
``rank r:``, and on rank 0 everything also goes to ``train.log`` in the run folder. Lines said
before the run folder is known (before the engine holds its lock) are kept and written first when
:func:`log_to_file` opens ``train.log``. :func:`stop_run_logging` closes it and puts the plain
terminal handler back (a later run in the same process gets its own file).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path

__all__ = ["PACKAGE_LOGGER", "start_run_logging", "log_to_file", "log_to_file_only", "stop_run_logging"]

PACKAGE_LOGGER = "lafs_fast"


class _Console(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stdout if record.levelno < logging.WARNING else sys.stderr)
        except BrokenPipeError:
            raise
        except Exception:  # noqa: BLE001 - logging must never stop a run
            self.handleError(record)


class _RunConsole(_Console):
    """The terminal during a run: INFO from rank 0 only, warnings from every rank with its number."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text if self.rank == 0 else f"rank {self.rank}: {text}"

    def filter(self, record: logging.LogRecord) -> bool:
        return (self.rank == 0 or record.levelno >= logging.WARNING) and super().filter(record)


class _RunFile(logging.FileHandler):
    """train.log. A write that fails (a full disk) must not print logging's traceback on every later
    line: the file is given up with one warning on the terminal, and the run goes on (what it saves
    then fails in one sentence if the disk is still full)."""

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        exc = sys.exc_info()[1]
        if not isinstance(exc, OSError):
            super().handleError(record)
            return
        _package().removeHandler(self)
        with contextlib.suppress(OSError):
            self.close()
        _package().warning(
            "%s: cannot write (%s); from here on the run's lines go to the terminal only",
            self.baseFilename,
            (exc.strerror or str(exc)).lower(),
        )


class _Early(logging.Handler):
    """Keeps what is said before the log file exists."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _package() -> logging.Logger:
    return logging.getLogger(PACKAGE_LOGGER)


class _Forward(logging.Handler):
    """Python's warnings (torch's, numpy's) during a run, handed to the package logger: on the
    terminal as before, and in train.log too, which holds everything the run printed."""

    def emit(self, record: logging.LogRecord) -> None:
        record.msg, record.args = str(record.getMessage()).rstrip(), None
        _package().handle(record)


def _capture_warnings(on: bool) -> None:
    """Route ``warnings.warn`` through the package logger during a run (``on``), or stop doing so."""
    pw = logging.getLogger("py.warnings")
    for h in [h for h in pw.handlers if isinstance(h, _Forward)]:
        pw.removeHandler(h)
    logging.captureWarnings(on)
    if on:
        pw.propagate = False
        pw.addHandler(_Forward())


def _clear(log: logging.Logger) -> None:
    for h in [h for h in log.handlers if isinstance(h, (_Console, _Early, logging.FileHandler))]:
        log.removeHandler(h)
        h.close()


def _plain_console() -> None:
    """The package logger outside a run: every INFO line and warning on the terminal, as said."""
    log = _package()
    _clear(log)
    log.setLevel(logging.INFO)
    log.propagate = False  # its own handler speaks; the root logger's would say it twice
    console = _Console()
    console.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(console)


def start_run_logging(rank: int = 0) -> logging.Logger:
    """Set the package logger up for a run of this process's ``rank`` (replacing any earlier run's
    set-up); returns it."""
    log = _package()
    _clear(log)
    log.setLevel(logging.INFO)
    log.propagate = False
    console = _RunConsole(rank)
    console.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(console)
    if rank == 0:
        log.addHandler(_Early())
    _capture_warnings(True)
    return log


def log_to_file(path: str | Path) -> None:
    """From now on also append the run's lines to ``path`` (rank 0), starting with those said so far."""
    log = _package()
    early = [h for h in log.handlers if isinstance(h, _Early)]
    if not early:
        return  # not rank 0, or no run logging (a library caller's engine)
    for h in early:
        log.removeHandler(h)
    handler = _RunFile(path, mode="a", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    for record in early[0].records:
        handler.handle(record)
    log.addHandler(handler)


def log_to_file_only(text: str, level: int = logging.ERROR) -> None:
    """Write ``text`` to the run's ``train.log`` alone (rank 0, once the file is open): the line that
    ends a run, which the command also prints on the terminal in its own words (said there once)."""
    log = _package()
    record = log.makeRecord(log.name, level, __file__, 0, text, None, None)
    for h in log.handlers:
        if isinstance(h, logging.FileHandler):
            h.handle(record)


def stop_run_logging() -> None:
    """Close the run's handlers (``train.log``) and go back to the plain terminal handler."""
    _capture_warnings(False)
    _plain_console()


_plain_console()
