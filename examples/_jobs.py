"""Shared pieces of the examples' experiment scripts (pipeline.py, study.py): identity splits of an
image folder, rec building, and a small job runner that runs `lafs-fast` commands side by side.

Every job is one `lafs-fast` command with its own log; a job whose ``done`` file exists is skipped
(so a script can be stopped and run again), and jobs start once the jobs they need have finished.
Each job runs with one intra-op thread (``OMP_NUM_THREADS=1``): on a few cores, N single-threaded
runs side by side finish sooner than N multi-threaded runs one after the other.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import sys
import time
from argparse import ArgumentParser
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("examples")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
EXE = [sys.executable, "-m", "lafs_fast.cli"]


def add_run_arguments(ap: ArgumentParser) -> None:
    """The options every script passes to its runs: --weights (detector landmarks), --precision."""
    ap.add_argument(
        "--weights",
        type=Path,
        default=Path("../shared/data/blazeface"),
        help="the BlazeFace weights folder (detector landmarks)",
    )
    ap.add_argument(
        "--precision",
        default="bf16",
        choices=["bf16", "fp32"],
        help="train.precision of every run: bf16 autocast (the GPU regime; 1.3x faster than fp32 on CPUs with "
        "AVX512-BF16 / AMX) or fp32",
    )


def people_of(folder: Path) -> dict[str, list[Path]]:
    """{identity: sorted image files} of an image folder (one sub-folder per identity)."""
    out = {}
    for p in sorted(folder.iterdir()):
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
            if files:
                out[p.name] = files
    if not out:
        raise SystemExit(f"{folder} holds no identity folders with images (expected FOLDER/<identity>/<image>)")
    return out


def link_folder(files: dict[str, list[Path]], dst: Path) -> Path:
    """An image folder of symlinks ``dst/<identity>/<file>`` to ``files`` (kept when already there)."""
    for person, fs in files.items():
        (dst / person).mkdir(parents=True, exist_ok=True)
        for f in fs:
            link = dst / person / f.name
            if not link.exists():
                os.symlink(f.resolve(), link)
    return dst


def spaced(files: list[Path], n: int | None) -> list[Path]:
    """At most ``n`` of ``files``, evenly spaced (all when ``n`` is None)."""
    return files if n is None else files[:: max(1, len(files) // n)][:n]


def build_rec(files: dict[str, list[Path]], out: Path, logdir: Path) -> Path:
    """``out/train.rec`` of ``files`` (one label per identity) via `lafs-fast data build`, once."""
    rec = out / "train.rec"
    if not rec.is_file():
        src = link_folder(files, out.parent / f"{out.name}_src")
        run_now([*EXE, "data", "build", str(src), str(out), "--workers", "1"], logdir / f"data_{out.name}.log")
    return rec


def run_now(cmd: list[str], logfile: Path) -> None:
    """Run one command now, its output into ``logfile``; stop the script with its tail on failure."""
    logfile.parent.mkdir(parents=True, exist_ok=True)
    log.info("$ %s", shlex.join(cmd))
    with logfile.open("w") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=_env())
    if rc != 0:
        raise SystemExit(f"{shlex.join(cmd[:4])} ... failed (exit {rc}); the end of {logfile}:\n{_tail(logfile)}")


@dataclass
class Job:
    """One command. ``done``: the file whose presence means it already ran (e.g. its summary.json);
    ``needs``: names of the jobs that must finish first."""

    name: str
    cmd: list[str]
    done: Path
    needs: list[str] = field(default_factory=list)


def run_jobs(jobs: Iterable[Job], parallel: int, logdir: Path) -> float:
    """Run ``jobs`` with up to ``parallel`` at once, each after the jobs it needs; skip finished ones.
    Stops at the first failure (the others still running are ended). Returns the seconds spent."""
    pending = {j.name: j for j in jobs}
    finished = {n for n, j in pending.items() if j.done.is_file()}
    for n in finished:
        log.info("[%s] already done (%s)", n, pending[n].done)
    pending = {n: j for n, j in pending.items() if n not in finished}
    unknown = {d for j in pending.values() for d in j.needs} - set(pending) - finished
    if unknown:
        raise SystemExit(f"jobs need unknown jobs: {sorted(unknown)}")
    running: dict[str, tuple[subprocess.Popen, float]] = {}
    t0 = time.time()
    logdir.mkdir(parents=True, exist_ok=True)
    try:
        while pending or running:
            for n, (proc, started) in list(running.items()):
                rc = proc.poll()
                if rc is None:
                    continue
                del running[n]
                logfile = logdir / f"{n}.log"
                if rc != 0:
                    raise SystemExit(f"[{n}] failed (exit {rc}); the end of {logfile}:\n{_tail(logfile)}")
                finished.add(n)
                log.info("[%s] done in %.0f s (%d left)", n, time.time() - started, len(pending) + len(running))
            ready = [j for j in pending.values() if set(j.needs) <= finished]
            while ready and len(running) < parallel:
                j = ready.pop(0)
                del pending[j.name]
                log.info("[%s] $ %s", j.name, shlex.join(j.cmd))
                f = (logdir / f"{j.name}.log").open("w")
                running[j.name] = (subprocess.Popen(j.cmd, stdout=f, stderr=subprocess.STDOUT, env=_env()), time.time())
            if pending and not running and not ready:
                raise SystemExit(f"jobs wait on each other: {sorted(pending)}")
            time.sleep(1.0)
    finally:
        for proc, _ in running.values():
            proc.terminate()
    return time.time() - t0


def summary(run_dir: Path) -> dict:
    """A run's summary.json (written at its end)."""
    path = run_dir / "summary.json"
    if not path.is_file():
        raise SystemExit(f"{path} is missing: the run did not finish (run the script again without --table-only)")
    return json.loads(path.read_text())


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _tail(logfile: Path, n: int = 15) -> str:
    return "".join(logfile.read_text(errors="replace").splitlines(keepends=True)[-n:])
