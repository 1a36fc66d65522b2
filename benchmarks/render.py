"""Render pytest-benchmark JSON as the README's side-by-side table, and save results with their record.

    python benchmarks/render.py RESULT.json                 # markdown table on stdout
    python benchmarks/render.py --save OUT_DIR benchmarks/results/
        # copies OUT_DIR/{bench.json, info.json, command.txt} to benchmarks/results/<date>-<device>.json
        # (one file: the benchmarks, the versions and devices, the exact command)

Per group, the reference-style case (``extra_info["role"] == "reference"``, or a name containing
"reference") is the 1.0x baseline; throughput is ``extra_info["items"]`` / mean time (items = the
samples, images or tokens one call processes; 1 when absent).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path


def _rows(data: dict) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for b in data.get("benchmarks", []):
        groups[b.get("group") or "ungrouped"].append(b)
    return groups


def _is_reference(b: dict) -> bool:
    return b.get("extra_info", {}).get("role") == "reference" or "reference" in b["name"]


def render(data: dict) -> str:
    """Markdown: one table per group with mean time, throughput and speed-up over the reference."""
    out = []
    machine = data.get("machine_info", {})
    info = data.get("lafs_fast_info", {})
    devices = ", ".join(info.get("devices", [])) or machine.get("cpu", {}).get("brand_raw", "?")
    out.append(f"Device: {devices}; torch {info.get('torch', '?')}, triton {info.get('triton', '?')}; {data.get('datetime', '')}")
    for group, items in sorted(_rows(data).items()):
        ref = next((b for b in items if _is_reference(b)), None)
        out += ["", f"**{group}**", "", "| case | mean (ms) | throughput (/s) | vs reference |", "| --- | ---: | ---: | ---: |"]
        for b in sorted(items, key=lambda b: -b["stats"]["mean"]):
            mean = b["stats"]["mean"]
            n = b.get("extra_info", {}).get("items", 1)
            speed = f"{ref['stats']['mean'] / mean:.1f}x" if ref is not None else "-"
            name = re.sub(r"^test_", "", b["name"])
            out.append(f"| {name} | {mean * 1e3:.2f} | {n / mean:,.0f} | {speed} |")
    return "\n".join(out) + "\n"


def save(out_dir: Path, results_dir: Path) -> Path:
    data = json.loads((out_dir / "bench.json").read_text())
    info_path = out_dir / "info.json"
    data["lafs_fast_info"] = json.loads(info_path.read_text()) if info_path.is_file() else {}
    cmd = out_dir / "command.txt"
    data["lafs_fast_command"] = cmd.read_text().strip() if cmd.is_file() else ""
    device = (data["lafs_fast_info"].get("devices") or ["cpu"])[0]
    stamp = (data.get("datetime") or "undated")[:10]
    dest = results_dir / f"{stamp}-{re.sub(r'[^A-Za-z0-9]+', '-', device).strip('-').lower()}.json"
    results_dir.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(data, indent=1))
    return dest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json", nargs="?", help="a pytest-benchmark JSON file")
    p.add_argument("--save", nargs=2, metavar=("OUT_DIR", "RESULTS_DIR"), help="store a gpu_run.sh output folder")
    a = p.parse_args(argv)
    if a.save:
        print(save(Path(a.save[0]), Path(a.save[1])))
        return 0
    if not a.json:
        p.error("give a JSON file or --save")
    path = Path(a.json)
    if not path.is_file():
        print(f"render: {path} does not exist", file=sys.stderr)
        return 2
    print(render(json.loads(path.read_text())), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
