"""The paper's few-shot claim in miniature, on celeb24 (issue 14 item 4): one command, one table.

Identities are split into training people and held-out people (every third in sorted order is
held out). Then:

1. pre-train without labels on the training people's faces, three ways: LAFS with grid landmarks,
   LAFS with face-detector landmarks (BlazeFace, `lafs-fast data landmarks`), the DINO-face
   baseline (`--views dino`);
2. fine-tune each teacher, and a model from scratch, few-shot: K images per training identity
   (`finetune --subset shots=K`), the same number of steps for every start;
3. print one table of held-out 1-NN and verification accuracy (the k-NN check of `--knn-data`,
   leave-one-out on the held-out people), with the raw-pixel floor of the same faces beside it.

Every step is a `lafs-fast` command (printed as it runs), so each row can be re-run alone. Defaults
are sized for a couple of CPU cores (16 minutes with 2 idle ones); `--help` lists the knobs. The
measured tables (two seeds) and their commands are in docs/results.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger("fewshot")

PRETRAIN = {  # row name -> extra pretrain arguments
    "LAFS (grid landmarks)": ["--landmarks", "grid"],
    "LAFS (detector landmarks)": ["--landmarks", "detector"],
    "DINO-face baseline": ["--views", "dino"],
}


def split_people(celeb24: Path) -> tuple[list[str], list[str]]:
    people = sorted(p.name for p in celeb24.iterdir() if p.is_dir())
    if len(people) < 6:
        raise SystemExit(f"{celeb24} holds {len(people)} identity folders; expected celeb24's 24 (one folder a person)")
    held = people[::3]
    return [p for p in people if p not in held], held


def link_subset(celeb24: Path, people: list[str], per_person: int, dst: Path) -> Path:
    """An image folder of symlinks: at most ``per_person`` files of each person, evenly spaced."""
    for p in people:
        files = sorted(f for f in (celeb24 / p).iterdir() if f.suffix.lower() in (".jpg", ".jpeg", ".png"))
        (dst / p).mkdir(parents=True, exist_ok=True)
        for f in files[:: max(1, len(files) // per_person)][:per_person]:
            link = dst / p / f.name
            if not link.exists():
                os.symlink(f.resolve(), link)
    return dst


def run(cmd: list[str], logfile: Path) -> None:
    """Run one lafs-fast command, its output into ``logfile``; stop the script with its tail on failure."""
    log.info("$ %s", shlex.join(cmd))
    t = time.time()
    with logfile.open("w") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT)
    if rc != 0:
        tail = "".join(logfile.read_text().splitlines(keepends=True)[-15:])
        raise SystemExit(f"{cmd[0]} {cmd[1]} failed (exit {rc}); the end of {logfile}:\n{tail}")
    log.info("  done in %.0f s (log: %s)", time.time() - t, logfile)


def figures(summary: Path, prefix: str) -> tuple[dict, dict, dict]:
    """(before, after, floor) of a run's k-NN check from its summary.json (prefix "knn" or "check")."""
    if not summary.is_file():
        raise SystemExit(f"{summary} is missing: run the script without --table-only / --no-pretrain first")
    s = json.loads(summary.read_text())
    return s[f"{prefix}_before"], s[f"{prefix}_after"], s[f"{prefix}_floor"]


def cell(r: dict, key: str) -> str:
    return f"{r[key]:.1f}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--celeb24", type=Path, default=Path("../shared/data/celeb24"), help="celeb24's folder")
    ap.add_argument("--out", type=Path, default=Path("runs/fewshot"), help="work folder (recs, runs, logs)")
    ap.add_argument("--shots", default="1,5", help="images per training identity, comma-separated")
    ap.add_argument("--pretrain-per-person", type=int, default=16, help="unlabelled faces per training person")
    ap.add_argument("--heldout-per-person", type=int, default=100, help="faces per held-out person")
    ap.add_argument("--finetune-steps", type=int, default=60, help="optimiser steps of every fine-tuning run")
    ap.add_argument(
        "--finetune-landmarks",
        default="grid",
        choices=("grid", "scratch"),
        help="the Part fViT's landmark CNN in every fine-tuning run: from scratch with its output starting at the "
        "patch grid the teachers were pre-trained on (grid), or from scratch as it comes (random points)",
    )
    ap.add_argument("--finetune-batch", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--weights",
        type=Path,
        default=Path(os.environ.get("LAFS_FAST_WEIGHTS", "../shared/data/blazeface")),
        help="folder holding the BlazeFace weights for the detector landmarks ($LAFS_FAST_WEIGHTS)",
    )
    ap.add_argument("--no-pretrain", action="store_true", help="reuse the teachers already in --out")
    ap.add_argument("--table-only", action="store_true", help="print the table of the runs already in --out")
    return ap.parse_args(argv)


def build_data(args: argparse.Namespace, out: Path, exe: list[str], reuse: bool) -> tuple[dict, list, list]:
    """1. data: training people (unlabelled for stage 1, labelled for the few-shot subsets), held-out
    people. Returns (recs by name, training people, held-out people)."""
    train_people, held_people = split_people(args.celeb24)
    log.info("training people (%d): %s", len(train_people), ", ".join(train_people))
    log.info("held-out people (%d): %s", len(held_people), ", ".join(held_people))
    recs = {}
    for name, people, per in (
        ("train", train_people, args.pretrain_per_person),
        ("heldout", held_people, args.heldout_per_person),
    ):
        rec = out / name / "train.rec"
        if not rec.is_file():
            src = link_subset(args.celeb24, people, per, out / f"{name}_src")
            run([*exe, "data", "build", str(src), str(out / name), "--workers", "1"], out / f"data_{name}.log")
        recs[name] = rec
    if not (out / "train" / "train.rec.landmarks.npz").is_file() and not reuse:
        weights = ["--weights", str(args.weights.resolve())] if args.weights.is_dir() else []
        run([*exe, "data", "landmarks", str(recs["train"]), *weights], out / "data_landmarks.log")
    return recs, train_people, held_people


def pretrain_all(recs: dict, out: Path, exe: list[str], common: list[str], reuse: bool) -> tuple[dict, dict]:
    """2. pre-training, three ways. Returns (teacher file by row, from scratch: None; check figures by row)."""
    teachers: dict[str, Path | None] = {"from scratch": None}
    pre_rows = {}
    for i, (row, extra) in enumerate(PRETRAIN.items()):
        run_dir = out / f"pretrain_{i}"
        if not reuse:
            run(
                [*exe, "pretrain", "--data", str(recs["train"]), "--out", str(run_dir), "--overwrite", *common, *extra],
                out / f"pretrain_{i}.log",
            )
        teachers[row] = run_dir / "teacher.pt"
        pre_rows[row] = figures(run_dir / "summary.json", "knn")
    return teachers, pre_rows


def finetune_all(args, shots, recs, teachers, n_people, out, exe, common) -> list[tuple[str, str, dict]]:
    """3. few-shot fine-tuning of every start, the same steps for each: (k-shot, row, check after)."""
    table = []
    for k in shots:
        images = k * n_people
        steps_per_epoch = max(1, images // args.finetune_batch)
        epochs = max(1, round(args.finetune_steps / steps_per_epoch))
        for j, (row, teacher) in enumerate(teachers.items()):
            run_dir = out / f"finetune_{k}shot_{j}"
            cmd = [
                *exe,
                "finetune",
                "--data",
                str(recs["train"]),
                "--subset",
                f"shots={k},seed={args.seed}",
                "--out",
                str(run_dir),
                "--overwrite",
                "--batch-size",
                str(min(args.finetune_batch, images)),
                "--epochs",
                str(epochs),
                "--landmarks",
                args.finetune_landmarks,
                *common,
            ]
            if teacher is not None:
                cmd += ["--init", str(teacher)]
            if not args.table_only:
                run(cmd, out / f"finetune_{k}shot_{j}.log")
            table.append((f"{k}-shot", row, figures(run_dir / "summary.json", "check")[1]))
    return table


def table_lines(out: Path, n_held: int, n_train: int, pre_rows: dict, table: list) -> list[str]:
    """4. the table: held-out 1-NN top-1 / verification (%), before -> after for the pre-trainings."""
    lines = [
        f"{n_held} held-out people ({out / 'heldout'}); {n_train} training people",
        "",
        "| stage | start | held-out 1-NN (%) | held-out verification (%) |",
        "|---|---|---|---|",
    ]
    floor = next(iter(pre_rows.values()))[2]
    lines.append(f"| floor | raw pixels | {cell(floor, 'knn_top1')} | {cell(floor, 'verification')} |")
    for row, (before, after, _) in pre_rows.items():
        lines.append(
            f"| pre-trained, no labels (random init -> trained) | {row} | {cell(before, 'knn_top1')} -> "
            f"{cell(after, 'knn_top1')} | {cell(before, 'verification')} -> {cell(after, 'verification')} |"
        )
    for stage, row, after in table:
        lines.append(f"| fine-tuned {stage} | {row} | {cell(after, 'knn_top1')} | {cell(after, 'verification')} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not args.celeb24.is_dir():
        raise SystemExit(f"{args.celeb24} does not exist; pass --celeb24 PATH (celeb24: 24 people, aligned 112x112)")
    shots = [int(k) for k in args.shots.split(",") if k]
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    exe = [sys.executable, "-m", "lafs_fast.cli"]
    t0 = time.time()
    reuse = args.no_pretrain or args.table_only
    recs, train_people, held_people = build_data(args, out, exe, reuse)
    common = ["--preset", "small", "--knn-data", str(recs["heldout"]), "--no-progress", "--seed", str(args.seed)]
    teachers, pre_rows = pretrain_all(recs, out, exe, common, reuse)
    table = finetune_all(args, shots, recs, teachers, len(train_people), out, exe, common)
    lines = table_lines(out, len(held_people), len(train_people), pre_rows, table)
    lines.append("")
    lines.append(("" if args.table_only else f"total {time.time() - t0:.0f} s; ") + f"runs and logs under {out}")
    text = "\n".join(lines)
    (out / "table.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
