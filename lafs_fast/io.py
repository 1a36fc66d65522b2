"""File helpers shared by every writer: atomic saves and safe loads."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["atomic_save", "atomic_write_bytes", "safe_load", "check_writable_dir"]


def atomic_write_bytes(data: bytes, path: str | Path) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync, then rename over it: a crash
    leaves either the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` through a temporary name and a rename (see ``atomic_write_bytes``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def safe_load(path: str | Path) -> Any:
    """``torch.load(weights_only=True)`` on the CPU, with one readable sentence on failure."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path} is not a loadable PyTorch checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None


def check_writable_dir(path: str | Path) -> Path:
    """Create ``path`` if needed and prove a file can be written there, before any work starts."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise PermissionError(f"output folder {path} is not writable ({exc.strerror}); choose another with --out") from None
    return path
