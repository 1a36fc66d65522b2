"""The record of a GPU run (the `env` stage of benchmarks/gpu_run.sh): date, command, device, driver,
versions, ``lafs-fast info --json`` (backends, whether xformers' own kernels loaded), as one JSON file.

    python benchmarks/gpu_env.py OUT/env.json
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

PACKAGES = (
    "torch",
    "triton",
    "numpy",
    "torchvision",
    "timm",
    "xformers",
    "pytest",
    "pytest-benchmark",
    "nvidia-cuda-runtime-cu12",
)


def _run(cmd: list[str], timeout: float = 60) -> tuple[int, str]:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        return p.returncode, p.stdout.strip() or p.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        return -1, f"{type(exc).__name__}: {exc}"


def commit() -> str:
    """The tree's commit: ``LAFS_COMMIT`` (gpu_run.sh's COMMIT or first argument; the device copy of the
    tree has no .git, so the caller writes the hash into the command), else ``git rev-parse HEAD``
    where a .git exists, else ""."""
    given = os.environ.get("LAFS_COMMIT", "").strip()
    if given:
        return given
    return _run(["git", "rev-parse", "HEAD"])[1] if Path(".git").exists() else ""


def collect() -> dict[str, object]:
    env: dict[str, object] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": os.environ.get("LAFS_GPU_RUN_CMD", " ".join(sys.argv)),
        "dry_run": os.environ.get("LAFS_GPU_DRY_RUN", "0") == "1",
        "python": platform.python_version(),
        "env": {
            k: os.environ.get(k, "")
            for k in (
                "TRITON_INTERPRET",
                "OMP_NUM_THREADS",
                "LD_LIBRARY_PATH",
                "TORCHINDUCTOR_CACHE_DIR",
                "TRITON_CACHE_DIR",
            )
        },
        "git_commit": commit(),
    }
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    env["versions"] = versions
    import torch

    env["torch_cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env["device"] = torch.cuda.get_device_name(0)
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
        env["memory_gib"] = round(props.total_memory / 2**30, 1)
        env["multiprocessors"] = props.multi_processor_count
    else:
        env["device"] = "cpu"
    rc, out = _run(
        ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm", "--format=csv,noheader"]
    )
    env["nvidia_smi"] = out if rc == 0 else None
    env["driver"] = out.split(", ")[1] if rc == 0 and out.count(", ") >= 1 else None
    try:  # what `lafs-fast info --json` prints (in this process: one torch import less)
        from lafs_fast.info import collect_info

        env["lafs_fast_info"] = collect_info()
    except Exception as exc:  # noqa: BLE001 - an import error on the device is what this records
        env["lafs_fast_info"] = {"error": f"{type(exc).__name__}: {exc}"}
    try:
        from lafs_fast.models.attention import xformers_status

        ok, why = xformers_status()
        env["xformers_kernels"] = {"loaded": bool(ok), "why": str(why)}
    except Exception as exc:  # noqa: BLE001 - a broken xformers is what this records
        env["xformers_kernels"] = {"loaded": False, "why": f"{type(exc).__name__}: {exc}"}
    return env


def main() -> int:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else None
    env = collect()
    text = json.dumps(env, indent=1)
    print(text)
    if out is not None:
        out.write_text(text + "\n")
    return 0 if "error" not in env["lafs_fast_info"] else 1


if __name__ == "__main__":
    sys.exit(main())
