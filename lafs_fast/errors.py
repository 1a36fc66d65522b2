"""What counts as a user's mistake, and how it is said: one sentence, exit code 2, no traceback.

The base of the import graph (it imports nothing of lafs_fast): the CLI, the training commands and
the process launcher all use it, so a mistake found inside a worker process of ``--gpus N`` reaches
the user as the same one sentence as in a single process.
"""

from __future__ import annotations

import errno
import os

__all__ = ["USER_ERRORS", "is_user_error", "user_message", "available_ram", "check_fits_memory"]

USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    NotADirectoryError,
    IsADirectoryError,
)


# what the machine says about a path the user chose, not a bug: a name too long, a full disk or quota,
# a read-only mount, a file-size limit, a loop of links (issue 25: each ended in a traceback)
USER_ERRNOS: dict[int, str] = {
    errno.ENAMETOOLONG: "a name in this path is too long for the file system (at most 255 bytes each); choose a "
    "shorter one",
    errno.ENOSPC: "the disk is full; free space (then --resume a training run) or choose another folder",
    errno.EDQUOT: "the disk quota is used up; free space (then --resume a training run) or choose another folder",
    errno.EFBIG: "the file is larger than this process may write (ulimit -f) or the file system holds; raise the "
    "limit or choose another folder",
    errno.EROFS: "the file system is read-only; choose a writable folder",
    errno.ELOOP: "too many levels of symbolic links; give the real path",
}


def is_user_error(exc: BaseException) -> bool:
    """A user's mistake (or the machine's state at a path the user chose): said in one sentence, exit 2."""
    return isinstance(exc, USER_ERRORS) or (isinstance(exc, OSError) and exc.errno in USER_ERRNOS)


def user_message(exc: BaseException) -> str:
    """One line for ``exc``: an OSError without lafs-fast's own wording says what failed on which path
    (``regfile: file exists``, not ``[Errno 17] File exists: 'regfile'``)."""
    if isinstance(exc, OSError) and exc.errno in USER_ERRNOS and str(exc).startswith("[Errno"):
        where = f"cannot use {exc.filename}: " if exc.filename is not None else f"{os.strerror(exc.errno).lower()}: "
        return where + USER_ERRNOS[exc.errno]
    if isinstance(exc, OSError) and exc.strerror and exc.filename is not None and str(exc).startswith("[Errno"):
        target = f"{exc.filename} -> {exc.filename2}" if exc.filename2 else str(exc.filename)
        return f"{target}: {exc.strerror.lower()}"
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def parse_command_line(parser, argv: list[str]):  # (argparse.ArgumentParser, list) -> argparse.Namespace
    """``parse_intermixed_args`` where the parser allows it, so ``key=value`` overrides may stand on
    both sides of a flag (``--out R a.b=1 --max-steps 2 c.d=2``); plain ``parse_args`` for parsers
    with sub-commands, which argparse cannot intermix."""
    if parser._subparsers is None:  # noqa: SLF001 - argparse has no public test for this
        return _resume_value(parser.parse_intermixed_args(argv))
    args, extra = parser.parse_known_args(argv)
    if (
        extra
        and isinstance(getattr(args, "overrides", None), list)
        and all("=" in e and not e.startswith("-") for e in extra)
    ):
        args.overrides = [*args.overrides, *extra]  # overrides after a flag of a sub-command (config show)
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def _resume_value(args):  # (argparse.Namespace) -> argparse.Namespace
    """``--resume`` takes an optional checkpoint path, so argparse gives it the word after it: a
    ``key=value`` there (``--resume optim.lr=1``) is an override, not a path (none by that name
    exists), and ``--resume`` then means the latest checkpoint, as when it stands last."""
    value = getattr(args, "resume", None)
    overrides = getattr(args, "overrides", None)
    if isinstance(value, str) and "=" in value and isinstance(overrides, list) and not os.path.exists(value):
        args.overrides, args.resume = [*overrides, value], "auto"
    return args


def run_command(prog: str, parser, run, argv: list[str]) -> int:
    """Parse ``argv`` and call ``run(args)``: a user's mistake is one line on stderr and exit code 2,
    Ctrl-C is one line and 130. The one place every entry point (``lafs-fast``, ``python -m ...``
    under torchrun) handles errors."""
    import sys

    args = parse_command_line(parser, argv)
    try:
        return int(run(args) or 0)
    except Exception as exc:
        if not is_user_error(exc):
            raise
        print(f"{prog}: error: {user_message(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def _number_type(kind: type, low: float, high: float | None = None, low_open: bool = False, what: str = ""):
    """An argparse ``type=`` for ``kind`` values in [low, high] (or (low, high] with ``low_open``)."""
    import argparse

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expects {'an integer' if kind is int else 'a number'}, got {text!r}"
            ) from None
        if (
            value != value  # NaN compares False with both bounds
            or (value <= low if low_open else value < low)
            or (high is not None and value > high)
        ):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value

    parse.__name__ = what or kind.__name__  # argparse names the type in its messages
    return parse


positive_int = _number_type(int, 1, what=">= 1")
non_negative_int = _number_type(int, 0, what=">= 0")
probability = _number_type(float, 0, 1, low_open=True, what="in (0, 1]")


def require_extra(feature: str, extra: str, *modules: str) -> None:
    """Import ``modules`` or refuse ``feature`` in one sentence naming the extra that installs them
    (``pip install 'lafs-fast[viz]'``): the core install leaves them out (pyproject.toml)."""
    import importlib

    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ValueError(
                f"{feature} needs {name.split('.')[0]}, which is not installed ({type(exc).__name__}); "
                f"pip install 'lafs-fast[{extra}]'"
            ) from None


def available_ram() -> int | None:
    """The RAM the kernel says is available now (``MemAvailable`` of /proc/meminfo, bytes), or None
    where there is no such file (not Linux)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def machine_memory() -> int:
    """This machine's RAM in bytes (what any one process could ever hold, before swap)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_fits_memory(nbytes: float, what: str, fix: str) -> None:
    """Refuse in one sentence (ValueError) what needs more than the machine's whole memory: a size
    read from a file or a setting (a ``property`` claiming 10^12 classes, ``--epochs 10^9``,
    ``model.dim=10^9``) ended in an allocator traceback, or ran for minutes first and swapped."""
    total = machine_memory()
    if nbytes > total:
        raise ValueError(
            f"{what} would need {nbytes / 2**30:,.0f} GiB, more than this machine's {total / 2**30:,.0f} GiB "
            f"of memory; {fix}"
        )
