"""Dispatch at the edge, one mechanism for every fast module with a Triton kernel and a torch twin:
``auto`` takes the kernel on CUDA when its module imports, the twin otherwise, and says why."""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable

import torch

__all__ = ["TRITON_BACKENDS", "triton_entry", "resolve_triton_backend"]

TRITON_BACKENDS = ("auto", "torch", "triton")


@functools.cache
def triton_entry(module: str, name: str, what: str) -> tuple[Callable | None, str]:
    """``module.name`` if the kernel module imports here, else (None, why). Cached: a broken
    install is probed once, not on every call."""
    try:
        mod = importlib.import_module(module)
    except Exception as exc:  # triton missing, or the kernel module broken
        return None, f"{what} unavailable ({type(exc).__name__}: {exc})"
    return getattr(mod, name), what


def resolve_triton_backend(
    backend: str, device: torch.device, entry: Callable[[], tuple[Callable | None, str]], kind: str, twin: str
) -> tuple[str, str]:
    """Which backend runs for ``backend`` on ``device``, and why (for logs and `lafs-fast info`).

    ``entry`` returns the kernel or (None, why); ``kind`` names the module in errors ("sampler");
    ``twin`` describes the torch path. The interpreter (TRITON_INTERPRET=1) runs Triton on CPU
    tensors only when asked for explicitly: it is a test vehicle, far slower than the twin.
    """
    if backend not in TRITON_BACKENDS:
        raise ValueError(f"unknown {kind} backend {backend!r}; choose one of {', '.join(TRITON_BACKENDS)}")
    if backend != "auto":
        return backend, "forced"
    if device.type != "cuda":
        return "torch", f"no CUDA device: {twin}"
    fn, why = entry()
    if fn is None:
        return "torch", f"{why}: {twin}"
    return "triton", why
