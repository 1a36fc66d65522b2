"""File helpers shared by every writer: atomic saves and safe loads.

Writes go to a short temporary name beside the target (``.lafs-XXXXXXXX.tmp``: a target name near the
file system's 255-byte limit still gets one), are fsync'ed, given the mode a plain ``open`` would give
(0666 less the umask, not mkstemp's 0600), then renamed over the target: a crash leaves the old file
or the new one, never half of one. A killed write can leave its temporary file behind;
:func:`remove_stale_temporaries` clears them (the engine does at the start of a run, under its lock).
Failures become one sentence naming the target: a full disk, a name too long, a folder not writable.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lafs_fast.errors import available_ram

__all__ = [
    "atomic_write",
    "atomic_save",
    "atomic_write_bytes",
    "safe_load",
    "check_unpacked_size",
    "MAX_LOAD_ENV",
    "check_writable_dir",
    "check_output_file",
    "remove_stale_temporaries",
    "TEMP_PREFIX",
]

TEMP_PREFIX = ".lafs-"
_TEMP_RE = re.compile(r"^\.lafs-[A-Za-z0-9_]{8}\.tmp$")


def _umask() -> int:
    """The process umask, read without changing it (Linux), else the usual 022."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def _write_failed(path: Path, exc: BaseException) -> Exception:
    """One sentence for a failed write of ``path`` (never naming the temporary file)."""
    no = getattr(exc, "errno", None)
    text = str(exc)
    if no == errno.ENAMETOOLONG:
        return ValueError(
            f"cannot write {path}: the name is too long for the file system "
            f"({len(path.name.encode())} bytes; at most 255); choose a shorter name"
        )
    # torch.save's zip writer says a full disk as "unexpected pos", "failed writing" or, from its C++
    # stream, "basic_ios::clear: iostream error"
    if no in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) or any(
        s in text for s in ("unexpected pos", "failed writing", "iostream error")
    ):
        try:
            free = f"{shutil.disk_usage(path.parent).free / 2**20:.0f} MB free"
        except OSError:
            free = "free space unknown"
        return ValueError(
            f"cannot write {path}: the disk is full ({free} on {path.parent}); free space, then resume from the last "
            "checkpoint"
        )
    if no in (errno.EACCES, errno.EPERM, errno.EROFS):
        return PermissionError(f"cannot write {path}: {os.strerror(no).lower()}; choose another output folder")
    if isinstance(exc, OSError) and exc.strerror:
        return ValueError(f"cannot write {path}: {exc.strerror.lower()}")
    return ValueError(f"cannot write {path}: {type(exc).__name__}: {text.splitlines()[0] if text else ''}")


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """``write(tmp)`` fills a temporary file beside ``path`` (by name: a library that opens the file
    itself can write it), which then replaces ``path`` atomically (module docstring). Anything
    ``write`` raises leaves ``path`` as it was and no temporary behind."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise _write_failed(path, exc) from None
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, (OSError, RuntimeError)):  # torch.save reports a full disk as a RuntimeError
            raise _write_failed(path, exc) from None
        raise


def atomic_write_bytes(data: bytes, path: str | Path) -> None:
    """Write ``data`` to ``path`` atomically (module docstring)."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write(path, write)


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to ``path`` atomically (module docstring)."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary files that killed atomic writes left in ``folder``; returns them. Call it
    only while no other process writes there (the engine holds its run lock)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.iterdir() if _TEMP_RE.match(p.name)]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


MAX_LOAD_ENV = "LAFS_FAST_MAX_LOAD_BYTES"  # overrides the cap of check_unpacked_size (bytes)
_MIN_LOAD_CAP = 64 << 20  # a small compressed archive may still unpack to this much


def check_unpacked_size(path: str | Path, what: str = "checkpoint", *, stored_too: bool = True) -> None:
    """Refuse a zip archive (a PyTorch checkpoint, an ``.npz``) whose members unpack to more than a
    cap, before anything is unpacked: a small deflated file can otherwise claim gigabytes of memory.

    The sizes are the central directory's declared ones, which are what the readers allocate (and
    read no further than). Cap: ``$LAFS_FAST_MAX_LOAD_BYTES`` when set, else 4x the file's size
    (what PyTorch writes is stored, not compressed, so it unpacks to about its own size) and at
    least 64 MiB, and never more than the memory available. A file that is not a zip is left to
    its reader. ``stored_too=False`` counts only compressed members (a reader that memory-maps the
    stored ones, such as the landmark sidecar's, holds no copy of them)."""
    import zipfile

    path = Path(path)
    try:
        with zipfile.ZipFile(path) as zf:
            total = sum(
                max(0, info.file_size)
                for info in zf.infolist()
                if stored_too or info.compress_type != zipfile.ZIP_STORED
            )
    except (zipfile.BadZipFile, OSError):  # not a zip (a legacy checkpoint), or unreadable: its reader says
        return
    except (NotImplementedError, ValueError, EOFError) as exc:  # a zip whose sizes cannot be read: unchecked
        raise ValueError(
            f"refusing to load {what} {path}: its zip directory cannot be read ({type(exc).__name__}: "
            f"{' '.join(str(exc).split())}), so its unpacked size cannot be checked; it is damaged or crafted"
        ) from None
    env = os.environ.get(MAX_LOAD_ENV, "").strip()
    if env:
        try:
            cap = int(float(env))
        except ValueError:
            raise ValueError(f"{MAX_LOAD_ENV}={env!r} is not a number of bytes; unset it or give one") from None
        why = f"{MAX_LOAD_ENV}"
    else:
        cap = max(4 * path.stat().st_size, _MIN_LOAD_CAP)
        why = "4x its size on disk, at least 64 MiB"
        avail = available_ram()
        if avail is not None and avail < cap:
            cap, why = avail, "the memory available now"
    if total > cap:
        raise ValueError(
            f"refusing to load {what} {path}: its contents unpack to {total / 2**20:.0f} MiB, more than the "
            f"{cap / 2**20:.0f} MiB allowed ({why}), so it is crafted or damaged; set {MAX_LOAD_ENV} to a larger "
            "number of bytes only for a file you trust"
        )


# torch's wording: "Unsupported global: GLOBAL argparse.Namespace was not an allowed global ..." (older:
# "... GLOBAL x.y ..."): the name after the GLOBAL opcode, never the opcode itself; a type built from an
# allowed global: "Can only build Tensor, ... allowlisted via `add_safe_globals`, but got <class 'x.y'>"
_GLOBAL_RE = re.compile(
    r"Unsupported global: (?:GLOBAL )?([\w.]+)|GLOBAL ([\w.]+)|global ['\"]?([\w.]+)['\"]? (?:was|is) not an allowed"
    r"|allowlisted via `add_safe_globals`, but got <class '([\w.]+)'>"
)
_UNPICKLER_RE = re.compile(r"WeightsUnpickler error:\s*([^\n]+)")  # torch's reason, without its advice to load anyway


def _reference_globals() -> list:
    """The only Python globals a checkpoint may name besides torch's own: the reference's
    ``lafs_train.py`` saves its ``argparse.Namespace`` and an optimizer state whose lr / weight decay
    are numpy float64 scalars (the scalar reconstructor, ``numpy.dtype`` and its float64 class)."""
    import argparse

    import numpy as np

    core = np._core if hasattr(np, "_core") else np.core  # numpy 2 / numpy 1
    return [argparse.Namespace, core.multiarray.scalar, np.dtype, np.dtypes.Float64DType]


def safe_load(path: str | Path) -> Any:
    """``torch.load(weights_only=True)`` on the CPU (tensors, plain Python values and
    :func:`_reference_globals`), with one readable sentence on failure; a file that asks for any other
    Python global is refused naming that global, one that would unpack to more than
    :func:`check_unpacked_size` allows is refused before it is read."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    check_unpacked_size(path)
    try:
        with torch.serialization.safe_globals(_reference_globals()), warnings.catch_warnings():
            # torch's note on an unusual pickle protocol: the refusal below says it
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        text = str(exc)
        m = _GLOBAL_RE.search(text)
        if m and ("weights_only" in text or "Unsupported global" in text or "allowlisted" in text):
            name = next(g for g in m.groups() if g)
            raise ValueError(
                f"refusing to load {path}: it asks for the Python global {name}, which lafs-fast does not load "
                "from a checkpoint (only tensors, plain Python values, argparse.Namespace and numpy float64 "
                "scalars); it was not loaded"
            ) from None
        reason = _UNPICKLER_RE.search(text)
        if reason or "weights_only" in text:  # junk or a foreign pickle; never relay torch's advice to load it anyway
            why = reason.group(1).strip().rstrip(".") if reason else "refused by the safe unpickler"
            raise ValueError(
                f"{path} is not a loadable PyTorch checkpoint ({type(exc).__name__}: {why}); it was not loaded"
            ) from None
        first = text.strip().splitlines()[0] if text.strip() else ""
        raise ValueError(f"{path} is not a loadable PyTorch checkpoint ({type(exc).__name__}: {first})") from None


def check_writable_dir(path: str | Path) -> Path:
    """Create ``path`` if needed and prove a file can be written there, before any work starts."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        # a fresh name made with O_EXCL | O_NOFOLLOW: a fixed one planted as a link truncated its target
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise PermissionError(
            f"output folder {path} is not writable ({(exc.strerror or str(exc)).lower()}); choose another with --out"
        ) from None
    return path


def check_output_file(path: str | Path) -> Path:
    """Before any work: ``path`` can be written as a file (not a folder; its folder exists or can be
    made and is writable; its name fits the file system)."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"--out {path} is a folder; give a file name inside it")
    if len(path.name.encode()) > 255:
        raise ValueError(
            f"--out {path}: the name is too long for the file system ({len(path.name.encode())} bytes; at most 255)"
        )
    check_writable_dir(path.parent)
    return path
