"""`lafs-fast info`: versions, devices, and which backend each fast module picks and why."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import platform

import torch

__all__ = ["collect_info", "add_arguments", "run"]


def _version(module: str, attr: str = "__version__") -> str:
    import logging

    logging.getLogger("xformers").setLevel(logging.ERROR)  # its CPU-build warning is not news here
    try:
        return str(getattr(importlib.import_module(module), attr))
    except Exception as exc:  # missing or broken install: say which
        return f"not available ({type(exc).__name__})"


def collect_info() -> dict[str, object]:
    """Everything `lafs-fast info` prints, as a dict (also recorded beside benchmark results)."""
    import lafs_fast
    from lafs_fast import _torchvision_fix
    from lafs_fast.models.attention import resolve_attention, xformers_extension
    from lafs_fast.sampling import resolve_backend

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    info: dict[str, object] = {
        "lafs_fast": lafs_fast.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "xformers": _version("xformers"),
        "xformers_extension": xformers_extension()[1],  # "loaded", or why not (then its kernels are torch's)
        "nvidia.dali": _version("nvidia.dali"),
        "timm": _version("timm"),
        "torchvision": _version("torchvision"),
        "face_alignment": _version("face_alignment"),
        "torchvision_cpu_fix": "applied (CPU torch with a CUDA torchvision wheel)"
        if _torchvision_fix.applied
        else "not needed",
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else ["cpu"],
        "cpu_threads": torch.get_num_threads(),
    }
    backends = {
        "patch sampler": resolve_backend("auto", device),
        "attention": resolve_attention("auto", device),
    }
    for name, module, fn in (
        ("view augmentation", "lafs_fast.augment", "resolve_view_backend"),
        ("data loader", "lafs_fast.data", "resolve_loader_backend"),
    ):
        with contextlib.suppress(ImportError, AttributeError):  # module not built in this version
            backends[name] = getattr(importlib.import_module(module), fn)("auto", device)
    info["backends"] = {k: f"{v[0]} ({v[1]})" for k, v in backends.items()}
    return info


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def run(args: argparse.Namespace) -> int:
    info = collect_info()
    if args.json:
        import json

        print(json.dumps(info, indent=2))
        return 0
    for key, val in info.items():
        if key == "backends":
            print("backends (auto):")
            for name, why in val.items():  # type: ignore[union-attr]
                print(f"  {name:<18} {why}")
        elif isinstance(val, list):
            print(f"{key:<20} {', '.join(map(str, val))}")
        else:
            print(f"{key:<20} {val}")
    return 0
