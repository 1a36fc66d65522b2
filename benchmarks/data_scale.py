"""Data tools at scale: wall time and peak memory of each tool against the record count.

NOT part of the pytest benchmark suite (it takes minutes and gigabytes of /tmp); run by hand:

    OMP_NUM_THREADS=1 python benchmarks/data_scale.py --sizes 10000,50000,200000 --sidecar 4200000 \\
        --work /tmp/lafs_data_scale

For each size N it writes an identity folder of N small faces (64x64 JPEG, 20 per identity, drawn
from a pool of 512 distinct synthetic faces; not timed), then runs each tool in a fresh subprocess:

- ``build``: ``lafs-fast data build`` (decode + JPEG re-encode of every image, 2 threads);
- ``verify``: ``lafs-fast data verify`` (decode every record, check the labels, 2 threads);
- ``subset``: ``lafs-fast data subset --shots 5 --fraction 0.5``;
- ``inspect``: ``lafs-fast data inspect`` with its montage;
- ``index``: opening the rec (``.idx`` parse, key sort, header) and ``labels``: the vectorised
  label scan that ``train-landmarks`` / ``finetune`` run before they start;
- ``epoch``: one loader epoch (PIL, in-process, batch 256, decode + resize to 112).

and, with ``--sidecar M``: ``sidecar write`` (a ``data landmarks`` sidecar of M faces x 6 points,
synthetic coordinates, through the same writer) and ``sidecar load`` (``LandmarkSidecar.load`` +
``DetectorLandmarks``, what ``pretrain --landmarks detector`` does at start-up).

Memory, sampled every 10 ms from /proc/self/status in the child: ``heap`` = peak anonymous RSS
(RssAnon: what the process allocated, not the page cache of the mmap'ed rec) above the level right
after the imports; ``rss`` = VmHWM, the high-water mark of the whole resident set, mmap'ed file
pages included. Prints a markdown table (``--out FILE`` also writes it).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ("build", "verify", "subset", "inspect", "index", "labels", "epoch")
PER_IDENTITY = 20


def _status(field: str) -> int:
    """A /proc/self/status field in bytes (0 where the kernel does not report it)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


class PeakAnon:
    """Samples RssAnon every ``every`` seconds in a thread; ``peak`` is the highest seen."""

    def __init__(self, every: float = 0.01) -> None:
        self.every, self.peak, self._stop = every, _status("RssAnon"), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _status("RssAnon"))
            self._stop.wait(self.every)

    def __enter__(self) -> PeakAnon:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _status("RssAnon"))


# ------------------------------------------------------------------------------------------ inputs


def make_folder(folder: Path, n: int, size: int = 64) -> None:
    """``n`` JPEG faces in ``n / 20`` identity sub-folders (skipped when already there)."""
    done = folder / ".complete"
    if done.is_file() and done.read_text() == str(n):
        return
    from PIL import Image

    from lafs_fast.data.synthetic import SyntheticFaces

    shutil.rmtree(folder, ignore_errors=True)
    faces = SyntheticFaces(64, 8, seed=0, image_size=size)
    images, _ = faces.batch(range(len(faces)))
    pool = []
    for im in images:
        buf = io.BytesIO()
        Image.fromarray(im.numpy()).save(buf, format="JPEG", quality=90)
        pool.append(buf.getvalue())
    for i in range(0, n, PER_IDENTITY):
        sub = folder / f"id{i // PER_IDENTITY:07d}"
        sub.mkdir(parents=True)
        for j in range(i, min(n, i + PER_IDENTITY)):
            (sub / f"{j:08d}.jpg").write_bytes(pool[(j * 7 + i) % len(pool)])
    done.write_text(str(n))


# ------------------------------------------------------------------------------------------ child


def run_tool(tool: str, work: Path, n: int) -> dict:
    """One measurement, in this (fresh) process: imports first, then the timed call."""
    import numpy as np
    import torch  # noqa: F401  (every tool's process has it loaded: the baseline includes it)

    import lafs_fast.data.recordio as recordio
    from lafs_fast.data import make_loader
    from lafs_fast.data.folder import build_rec
    from lafs_fast.data.subsets import make_subset
    from lafs_fast.data.tools import inspect_rec, verify_rec
    from lafs_fast.dense_landmarks import DetectorLandmarks, LandmarkSidecar
    from lafs_fast.sampling import grid_landmarks  # noqa: F401  (imported by DetectorLandmarks: not part of the load)

    base = work / f"n{n}"
    rec = base / "rec" / "train.rec"
    side = work / f"sidecar{n}.npz"
    if tool == "sidecar-write":  # the inputs of the write are made before the clock starts, as the detector would
        rng = np.random.default_rng(0)
        keys = np.arange(1, n + 1, dtype=np.int64)
        points = (rng.random((n, 6, 2), dtype=np.float32) * 60 + 26).astype(np.float32)
        scores = np.ones(n, np.float32)
    anon0, t0 = _status("RssAnon"), time.perf_counter()
    with PeakAnon() as peak:
        if tool == "build":
            shutil.rmtree(rec.parent, ignore_errors=True)
            rep = build_rec(base / "folder", rec.parent, workers=2, progress=False)
            assert rep["images"] == n
        elif tool == "verify":
            rep = verify_rec(rec, workers=2, progress=False)
            assert not rep["corrupt"] and not rep["problems"], rep["problems"]
        elif tool == "subset":
            make_subset(rec, base / "subset", shots=5, fraction=0.5, seed=0, overwrite=True)
        elif tool == "inspect":
            inspect_rec(rec, montage=base / "montage.png")
        elif tool == "index":
            assert recordio.RecordIOReader(rec).num_images == n
        elif tool == "labels":
            recordio.RecordIOReader(rec).check_labels()
        elif tool == "epoch":
            loader = make_loader(rec, 256, backend="pil", num_workers=0, drop_last=False, seed=0)
            assert sum(len(labels) for _, labels in loader) == n
        elif tool == "sidecar-write":
            from lafs_fast.data.align import write_sidecar

            write_sidecar(side, keys, points, scores, detector="blazeface", names=["a", "b", "c", "d", "e", "f"])
        elif tool == "sidecar-load":
            sidecar = LandmarkSidecar.load(side)
            table = DetectorLandmarks(sidecar, sidecar.keys)
            assert table.points.shape == (n, 6, 2)
        else:
            raise ValueError(f"unknown tool {tool!r}; one of {', '.join(TOOLS)}, sidecar-write, sidecar-load")
    return {
        "tool": tool,
        "n": n,
        "seconds": time.perf_counter() - t0,
        "heap_mb": (peak.peak - anon0) / 2**20,
        "rss_mb": _status("VmHWM") / 2**20,
    }


def measure(tool: str, work: Path, n: int, code: Path = ROOT) -> dict:
    """``run_tool`` in a fresh interpreter (so each peak is that tool's alone), importing lafs_fast
    from ``code`` (another checkout: a before/after comparison)."""
    env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    r = subprocess.run(
        [sys.executable, __file__, "--child", tool, "--n", str(n), "--work", str(work)],
        capture_output=True,
        text=True,
        env=env,
    )
    if r.returncode != 0:
        raise RuntimeError(f"{tool} at {n} records failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------ report


def table(rows: list[dict], sizes: list[int]) -> str:
    """Markdown: one row per tool, per size ``seconds / heap MB / rss MB``, then the growth
    from the smallest to the largest size (time ratio vs record ratio; heap growth per record)."""
    by = {(r["tool"], r["n"]): r for r in rows}
    head = (
        "| tool | "
        + " | ".join(f"{n:,} records: s / heap MB / rss MB" for n in sizes)
        + " | time growth | heap bytes per extra record |"
    )
    lines = [head, "|" + "---|" * (len(sizes) + 3)]
    for tool in dict.fromkeys(r["tool"] for r in rows if r["tool"] in TOOLS):
        cells, have = [], [n for n in sizes if (tool, n) in by]
        for n in sizes:
            r = by.get((tool, n))
            cells.append(f"{r['seconds']:.2f} / {r['heap_mb']:.0f} / {r['rss_mb']:.0f}" if r else "-")
        a, b = by[(tool, have[0])], by[(tool, have[-1])]
        ratio = b["n"] / a["n"]
        growth = f"x{b['seconds'] / max(a['seconds'], 1e-9):.1f} for x{ratio:.0f} records" if len(have) > 1 else "-"
        per = f"{(b['heap_mb'] - a['heap_mb']) * 2**20 / (b['n'] - a['n']):.0f}" if len(have) > 1 else "-"
        lines.append(f"| {tool} | " + " | ".join(cells) + f" | {growth} | {per} |")
    side = [r for r in rows if r["tool"].startswith("sidecar")]
    if side:
        lines += [
            "",
            "| sidecar (6 points per face) | faces | s | heap MB | rss MB | points array MB |",
            "|---|---|---|---|---|---|",
        ]
        for r in side:
            lines.append(
                f"| {r['tool']} | {r['n']:,} | {r['seconds']:.2f} | {r['heap_mb']:.0f} | {r['rss_mb']:.0f} | "
                f"{r['n'] * 48 / 2**20:.0f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="10000,50000,200000", help="comma-separated record counts")
    p.add_argument("--sidecar", type=int, default=4_200_000, help="faces in the landmark sidecar (0: skip)")
    p.add_argument("--tools", default=",".join(TOOLS), help="comma-separated subset of " + ",".join(TOOLS))
    p.add_argument("--work", default="/tmp/lafs_data_scale", help="scratch folder (GBs at 200k records)")
    p.add_argument("--out", default=None, help="also write the table (markdown) here")
    p.add_argument("--json", default=None, help="also write the raw measurements here")
    p.add_argument("--code", default=str(ROOT), help="checkout whose lafs_fast the tools run (default: this one)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    work = Path(args.work)
    if args.child:
        print(json.dumps(run_tool(args.child, work, args.n)))
        return 0
    sizes = [int(x) for x in args.sizes.split(",") if x]
    tools = [t for t in args.tools.split(",") if t]
    rows = []
    for n in sizes:
        make_folder(work / f"n{n}" / "folder", n)
        for tool in tools:
            rows.append(measure(tool, work, n, Path(args.code)))
            r = rows[-1]
            print(
                f"{tool:>8} {n:>9,}: {r['seconds']:8.2f} s  heap {r['heap_mb']:7.1f} MB  rss {r['rss_mb']:7.1f} MB",
                file=sys.stderr,
                flush=True,
            )
    if args.sidecar:
        for tool in ("sidecar-write", "sidecar-load"):
            # the file is always written by this checkout's writer; --code changes who loads it
            rows.append(measure(tool, work, args.sidecar, ROOT if tool == "sidecar-write" else Path(args.code)))
            r = rows[-1]
            print(
                f"{tool} {args.sidecar:,}: {r['seconds']:.2f} s  heap {r['heap_mb']:.1f} MB  rss {r['rss_mb']:.1f} MB",
                file=sys.stderr,
                flush=True,
            )
    text = table(rows, sizes)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
