"""Render benchmark results as the README's side-by-side tables, merge a staged run, save a run.

    python benchmarks/render.py RESULT               # markdown on stdout; RESULT = a pytest-benchmark
                                                     # JSON, a saved run, or a gpu_run.sh $OUT folder
    python benchmarks/render.py --save OUT_DIR [OUT_DIR ...] benchmarks/results/
        # one file benchmarks/results/<date>-<device>.json from one or more gpu_run.sh / cpu_run.sh
        # output folders (a first and a second call): the benchmarks, every stage's line of
        # results.jsonl, and the record (device, driver, torch, triton, xformers, date, command)
    python benchmarks/render.py --merge STAGE_DIR OUT/bench.json
        # every pytest-benchmark JSON of STAGE_DIR into one (gpu_run.sh, after each stage), each
        # benchmark tagged with its stage (the file's stem); written atomically

Per group, the reference-style case (``extra_info["role"] == "reference"``, or a name containing
"reference") is the 1.0x baseline; throughput is ``extra_info["items"]`` / median time (items = the
samples, images, tokens or bytes one call processes; 1 when absent), and the speed-up is the ratio
of throughputs (cases of one group may process different batch sizes). Medians, not means: a
warm-up outlier or a stray recompile moves a mean, not a median. Stages that failed, timed out or
were skipped are listed as such, so a missing table is never silent.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys
from collections import defaultdict
from pathlib import Path

# ------------------------------------------------------------------------------------------ loading


def _stage_cases(stage_dir: Path, stem: str) -> dict | None:
    """A stage's pytest-benchmark JSON, or, when it is missing, torn or empty, the cases
    benchmarks/conftest.py appended to ``<stem>.cases.jsonl`` as each ended (the fallback)."""
    try:
        d = json.loads((stage_dir / f"{stem}.json").read_text())
        if d.get("benchmarks"):
            return d
    except (OSError, json.JSONDecodeError):
        d = None  # a session killed while writing, or no JSON written at all
    cases = stage_dir / f"{stem}.cases.jsonl"
    if not cases.is_file():
        return d
    rows = []
    for line in cases.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # the line being written when the stage was killed
    return {"benchmarks": rows}


def merge(stage_dir: Path, out: Path) -> int:
    """Every stage of ``stage_dir`` (``<stage>.json`` from one pytest-benchmark session each, else its
    ``<stage>.cases.jsonl``) -> ``out``, each benchmark tagged with its stage. Returns the count."""
    merged: dict | None = None
    stems = {Path(f).name.split(".")[0] for f in glob.glob(str(stage_dir / "*.json*"))}
    for stem in sorted(stems):
        d = _stage_cases(stage_dir, stem)
        if d is None:
            continue
        if merged is None:
            merged = dict(d, benchmarks=[])
        for b in d.get("benchmarks", []):
            b.setdefault("extra_info", {})["stage"] = stem
            merged["benchmarks"].append(b)
    if merged is None:
        return 0
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(merged, indent=1))
    os.replace(tmp, out)
    return len(merged["benchmarks"])


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        return {}


def _record(env: dict, info: dict, command: str, date: str) -> dict:
    """What a stored run says about where and how it ran."""
    versions = env.get("versions", {})
    return {
        "device": env.get("device") or (info.get("devices") or ["?"])[0],
        "driver": env.get("driver"),
        "torch": versions.get("torch") or info.get("torch"),
        "torch_cuda": env.get("torch_cuda"),
        "triton": versions.get("triton") or info.get("triton"),
        "xformers": versions.get("xformers") or info.get("xformers"),
        "xformers_kernels": env.get("xformers_kernels"),
        "numpy": versions.get("numpy"),
        "python": env.get("python") or info.get("python"),
        "commit": env.get("git_commit") or None,
        "date": env.get("date") or date,
        "command": env.get("command") or command,
        "dry_run": env.get("dry_run", False),
    }


def load_out(dirs: list[Path]) -> dict:
    """One or more output folders (gpu_run.sh: bench.json, results.jsonl, env.json; cpu_run.sh:
    bench.json, info.json, command.txt) -> one run: benchmarks, stages, record."""
    data: dict = {"benchmarks": [], "stages": [], "calls": []}
    for i, d in enumerate(dirs):
        bench = _read_json(d / "bench.json")
        env = _read_json(d / "env.json")
        info = env.get("lafs_fast_info") or _read_json(d / "info.json")
        cmd = (d / "command.txt").read_text().strip() if (d / "command.txt").is_file() else ""
        for k in ("machine_info", "commit_info", "datetime", "version"):
            if k in bench and k not in data:
                data[k] = bench[k]
        data["benchmarks"] += bench.get("benchmarks", [])
        res = d / "results.jsonl"
        if res.is_file():
            for line in res.read_text().splitlines():
                if line.strip():
                    data["stages"].append(dict(json.loads(line), call=i + 1))
        record = _record(env, info, cmd, bench.get("datetime", ""))
        data["calls"].append(record)
        if i == 0:
            data["record"] = record
            data["lafs_fast_info"] = info
            data["lafs_fast_env"] = env
            data["lafs_fast_command"] = record["command"]
    return data


def load(path: Path) -> dict:
    if path.is_dir():
        return load_out([path])
    data = json.loads(path.read_text())
    if "record" not in data:  # a plain pytest-benchmark JSON, or a run saved before records existed
        data["record"] = _record(
            {}, data.get("lafs_fast_info", {}), data.get("lafs_fast_command", ""), data.get("datetime", "")
        )
    return data


def save(out_dirs: list[Path], results_dir: Path) -> Path:
    data = load_out(out_dirs)
    rec = data["record"]
    device = re.sub(r"[^A-Za-z0-9]+", "-", str(rec["device"] or "cpu")).strip("-").lower()
    stamp = (rec["date"] or "undated")[:10]
    results_dir.mkdir(parents=True, exist_ok=True)
    dest = results_dir / f"{stamp}-{device}.json"
    n = 2
    while dest.exists():  # never overwrite an earlier run of the same day
        dest = results_dir / f"{stamp}-{device}-{n}.json"
        n += 1
    dest.write_text(json.dumps(data, indent=1))
    return dest


# ---------------------------------------------------------------------------------------- rendering


def _is_reference(b: dict) -> bool:
    return b.get("extra_info", {}).get("role") == "reference" or "reference" in b["name"]


def _median(b: dict) -> float:
    s = b["stats"]
    return s.get("median", s["mean"])


def _throughput(b: dict) -> float:
    return b.get("extra_info", {}).get("items", 1) / _median(b)


def _figures(e: dict) -> str:
    """The headline figures a case recorded: GB/s (% of copy), samples/s, MFU, compile time."""
    out = []
    if "GBps" in e:
        pct = f" ({e['pct_copy_bw']:.0f}% of copy)" if "pct_copy_bw" in e else ""
        out.append(f"{e['GBps']:,.0f} GB/s{pct}")
    if "TFLOPs" in e:
        out.append(f"{e['TFLOPs']:,.0f} TFLOP/s")
    for key, unit in (("samples_per_s", "samples/s"), ("images_per_s", "images/s")):
        if key in e:
            out.append(f"{e[key]:,.0f} {unit}")
    mfu = [
        f"{e[k] * 100:.1f}% {label}"
        for k, label in (("mfu_datasheet", "datasheet"), ("mfu_measured", "measured"))
        if k in e
    ]
    if mfu:
        out.append("MFU " + " / ".join(mfu))
    if "predicted_per_s" in e:
        out.append(
            f"predicted {e['predicted_per_s']:,.0f}/s (measured {100 * e['measured_over_predicted']:.0f}% of it)"
        )
    if e.get("compile_s", 0) >= 0.5:
        out.append(f"first step {e['first_step_s']:.1f} s (compile ~{e['compile_s']:.1f} s)")
    return "; ".join(out)


def _stage_status(s: dict) -> str:
    if s.get("skipped"):
        return f"skipped: {s['skipped']}"
    if s.get("rc") == 124:
        return f"timed out after {s.get('seconds', '?')} s"
    if s.get("rc") == 0:
        return "ok"
    return f"failed (rc {s.get('rc')})"


def _predicted_table(benchmarks: list[dict]) -> list[str]:
    """The rows benchmarks/perf_model.py made a prediction for (from the measured matmul rate and
    copy bandwidth of the device), predicted and measured side by side."""
    rows = [b for b in benchmarks if "predicted_per_s" in b.get("extra_info", {})]
    if not rows:
        return []
    out = ["", "**Predicted (benchmarks/perf_model.py, measured ceilings) and measured**", ""]
    out += ["| case | predicted /s | measured /s | measured / predicted |", "| --- | ---: | ---: | ---: |"]
    for b in rows:
        e = b["extra_info"]
        out.append(
            f"| {re.sub(r'^test_', '', b['name'])} | {e['predicted_per_s']:,.0f} | {_throughput(b):,.0f} | "
            f"{100 * e['measured_over_predicted']:.0f}% |"
        )
    return out


def render(data: dict) -> str:
    """Markdown: the run's record, its stages, then one table per group (median time, throughput,
    speed-up over the reference case, the case's headline figures)."""
    rec = data.get("record", {})
    machine = data.get("machine_info", {})
    device = rec.get("device") or machine.get("cpu", {}).get("brand_raw", "?")
    head = f"Device: {device}"
    if rec.get("driver"):
        head += f" (driver {rec['driver']})"
    head += f"; torch {rec.get('torch', '?')}, triton {rec.get('triton', '?')}, xformers {rec.get('xformers') or '-'}"
    head += f"; {rec.get('date') or data.get('datetime', '')}"
    out = [head]
    if rec.get("command"):
        out.append(f"Command: `{rec['command']}`")
    if rec.get("commit"):
        out.append(f"Commit: {rec['commit']}")
    if rec.get("dry_run"):
        out.append("**Dry run on the CPU at toy sizes: the figures check the plumbing, they are not speeds.**")
    groups: dict[str, list[dict]] = defaultdict(list)
    per_stage: dict[str, int] = defaultdict(int)
    for b in data.get("benchmarks", []):
        groups[b.get("group") or "ungrouped"].append(b)
        per_stage[b.get("extra_info", {}).get("stage", "")] += 1
    stages = data.get("stages", [])
    if stages:
        out += ["", "| stage | status | seconds | benchmarks | pytest |", "| --- | --- | ---: | ---: | --- |"]
        for s in stages:
            n = per_stage.get(s["stage"], 0)
            out.append(
                f"| {s['stage']} | {_stage_status(s)} | {s.get('seconds', 0)} | {n or '-'} | {s.get('summary', '')} |"
            )
    out += _predicted_table(data.get("benchmarks", []))
    for group, items in sorted(groups.items()):
        out += _group_table(group, items)
    return "\n".join(out) + "\n"


def _role(b: dict) -> str:
    return b.get("extra_info", {}).get("role", "")


def _group_table(group: str, items: list[dict]) -> list[str]:
    """One group: its cases by throughput, the speed-up over the group's reference (role
    "reference": for the training steps the honest pipeline, augmentation in DataLoader workers)
    and, where the group has one, over the in-step strawman (role "reference-in-step")."""
    ref = next((b for b in items if _role(b) == "reference"), None) or next(
        (b for b in items if _is_reference(b)), None
    )
    instep = next((b for b in items if _role(b) == "reference-in-step"), None)
    stage = {b.get("extra_info", {}).get("stage") for b in items} - {None}
    label = f" (stage {', '.join(sorted(stage))})" if stage else ""
    extra_head, extra_rule = (" vs in-step reference |", " ---: |") if instep is not None else ("", "")
    out = [
        "",
        f"**{group}**{label}",
        "",
        f"| case | median (ms) | throughput (/s) | vs reference |{extra_head} figures |",
        f"| --- | ---: | ---: | ---: |{extra_rule} --- |",
    ]
    for b in sorted(items, key=lambda b: _throughput(b)):
        speed = f"{_throughput(b) / _throughput(ref):.1f}x" if ref is not None else "-"
        if instep is not None:
            speed += f" | {_throughput(b) / _throughput(instep):.1f}x"
        name = re.sub(r"^test_", "", b["name"])
        out.append(
            f"| {name} | {_median(b) * 1e3:.2f} | {_throughput(b):,.0f} | {speed} | "
            f"{_figures(b.get('extra_info', {}))} |"
        )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", nargs="?", help="a pytest-benchmark JSON, a saved run, or a gpu_run.sh output folder")
    p.add_argument("--save", nargs="+", metavar="DIR", help="OUT_DIR [OUT_DIR ...] RESULTS_DIR: store a run")
    p.add_argument("--merge", nargs=2, metavar=("STAGE_DIR", "OUT_JSON"), help="merge a staged run's benchmark JSONs")
    a = p.parse_args(argv)
    if a.merge:
        print(f"render: merged {merge(Path(a.merge[0]), Path(a.merge[1]))} benchmarks into {a.merge[1]}")
        return 0
    if a.save:
        if len(a.save) < 2:
            p.error("--save needs OUT_DIR [OUT_DIR ...] RESULTS_DIR")
        print(save([Path(d) for d in a.save[:-1]], Path(a.save[-1])))
        return 0
    if not a.path:
        p.error("give a JSON file, an output folder, --save or --merge")
    path = Path(a.path)
    if not path.exists():
        print(f"render: {path} does not exist", file=sys.stderr)
        return 2
    print(render(load(path)), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
