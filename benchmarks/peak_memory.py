"""The memory guard's calibration (issue 24 item 5): a training command's measured peak memory beside
the guard's estimate for the same config.

    python benchmarks/peak_memory.py pretrain --max-steps 4 --no-knn --no-progress --out /tmp/pm16 --batch-size 16
    python benchmarks/peak_memory.py pretrain --max-steps 4 --no-knn --no-progress --out /tmp/pm64 --batch-size 64

Runs ``lafs-fast ARGS`` in this process (one process: leave --gpus at 1) and prints one JSON line:
the guard's estimate (GB, by part), the peak resident memory of this process (``ru_maxrss``), the
largest sum of this process's and its children's RSS sampled every 0.2 s (the data-loader workers),
and on CUDA ``torch.cuda.max_memory_reserved`` plus the CUDA context. docs/performance.md ("The
memory guard") holds the figures the constants of lafs_fast/train/memory_guard.py were set from.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import threading
import time
from pathlib import Path

GB = 1024**3


def _tree_rss(pid: int) -> int:
    """RSS (bytes) of ``pid`` and its direct children, from /proc."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().split()
            if int(fields[0]) == pid or int(fields[3]) == pid:
                total += int((stat.parent / "statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            continue  # a process that ended while read
    return total


def main(argv: list[str]) -> int:
    from lafs_fast.cli import build_parser
    from lafs_fast.cli import main as lafs_main
    from lafs_fast.errors import parse_command_line
    from lafs_fast.train.config_show import stage_config
    from lafs_fast.train.memory_guard import estimate, run_facts

    stage = argv[0]
    parser, _ = build_parser(stage)
    args = parse_command_line(parser, argv[1:])
    cfg = stage_config(stage, args)
    peak = [0]

    def watch() -> None:
        while True:
            peak[0] = max(peak[0], _tree_rss(os.getpid()))
            time.sleep(0.2)

    threading.Thread(target=watch, daemon=True).start()
    start = time.perf_counter()
    rc = lafs_main(argv)
    import torch

    from lafs_fast.launch import resolve_device
    from lafs_fast.train.cli_common import data_source

    device = resolve_device(cfg.train.device)
    cuda = device.type == "cuda"
    classes, precision = run_facts(cfg, stage, device, data_source(cfg))  # as the guard resolves them
    est = estimate(cfg, stage, classes, device.type, precision)
    row = {
        "argv": argv,
        "rc": rc,
        "seconds": round(time.perf_counter() - start, 1),
        "estimate_gb": round(est.total / GB, 3),
        "estimate_parts_gb": {k: round(v / GB, 3) for k, v in est.parts.items()},
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB, 3),
        "peak_tree_rss_gb": round(peak[0] / GB, 3),
    }
    if cuda:
        row["cuda_max_reserved_gb"] = round(torch.cuda.max_memory_reserved() / GB, 3)
    print(json.dumps(row))
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
