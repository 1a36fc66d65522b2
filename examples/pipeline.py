"""LAFS's three stages in miniature on celeb24, one command, one table (docs/results.md).

celeb24's people are split by identity (every third in sorted order held out). On the training
people, for each seed:

- stage 0, ``lafs-fast train-landmarks``: a Part fViT (landmark CNN + fViT) trained with labels;
- stage 1, ``lafs-fast pretrain``: LAFS on the same faces without labels, its patches placed by the
  frozen stage-0 landmark CNN (the paper's LAFS). Beside it, at the same budget: LAFS with grid
  landmarks, LAFS with face-detector landmarks (BlazeFace, ``lafs-fast data landmarks``), and the
  DINO-face baseline (``--views dino``: image crops, no landmarks);
- stage 2, ``lafs-fast finetune``: few-shot fine-tuning (``--shots`` labelled faces per training
  person, the same steps for every start) of each teacher and of a model from scratch; the stage-0
  pipeline fine-tunes with its stage-0 landmark CNN (as the paper), the others start the landmark
  CNN at the patch grid (``--landmarks grid``); and, with ``--full``, fine-tuning on every labelled
  training face from the starts named there.

Every run reports held-out 1-NN top-1 and verification (the k-NN check of ``--knn-data``: leave-one-
out on the held-out people, balanced pairs) and the table puts the raw-pixel floor of the same
faces beside them. Seeds run side by side (``--jobs``, one thread each); every step is a
``lafs-fast`` command whose log is kept, and a finished step is not run again. The defaults took
about 93 minutes on two shared cores for two seeds (docs/results.md has the per-step times).

    python examples/pipeline.py --celeb24 ../shared/data/celeb24 --out runs/pipeline --seeds 0,1
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from _jobs import EXE, Job, add_run_arguments, build_rec, people_of, run_jobs, run_now, spaced, summary

log = logging.getLogger("pipeline")

# the starts of stage 2: name -> pretrain arguments (None: no pre-training)
STARTS: dict[str, list[str] | None] = {
    "from scratch": None,
    "LAFS, stage-0 landmarks": ["--landmarks", "{s0}"],
    "LAFS, grid landmarks": ["--landmarks", "grid"],
    "LAFS, detector landmarks": ["--landmarks", "detector"],
    "DINO-face (image crops)": ["--views", "dino"],
}
SHORT = {
    "from scratch": "scratch",
    "LAFS, stage-0 landmarks": "lafs_s0",
    "LAFS, grid landmarks": "lafs_grid",
    "LAFS, detector landmarks": "lafs_det",
    "DINO-face (image crops)": "dino",
}


def split_celeb24(celeb24: Path, per_person: int, held_per_person: int) -> tuple[dict, dict]:
    """(training people's files, held-out people's files): every third person in sorted order is
    held out; at most ``per_person`` / ``held_per_person`` files a person, evenly spaced."""
    people = people_of(celeb24)
    names = sorted(people)
    if len(names) < 6:
        raise SystemExit(f"{celeb24} holds {len(names)} identity folders; expected celeb24's 24")
    held = names[::3]
    train = {p: spaced(people[p], per_person) for p in names if p not in held}
    return train, {p: spaced(people[p], held_per_person) for p in held}


def jobs_for_seed(args: argparse.Namespace, seed: int, recs: dict[str, Path], out: Path) -> list[Job]:
    """Every command of one seed: stage 0, the four pre-trainings, the fine-tunings."""
    d = out / f"seed{seed}"
    check = ["--knn-data", str(recs["heldout"]), "--no-progress", "--seed", str(seed), "--preset", "small"]
    check += [f"train.precision={args.precision}"]
    train = ["--data", str(recs["train"])]
    s0 = d / "stage0"
    jobs = [
        Job(
            f"s{seed}_stage0",
            [
                *EXE,
                "train-landmarks",
                *train,
                "--out",
                str(s0),
                "--overwrite",
                "--epochs",
                str(args.stage0_epochs),
                *check,
            ],
            s0 / "summary.json",
        )
    ]
    teachers: dict[str, tuple[Path | None, list[str]]] = {}
    for row, extra in STARTS.items():
        if extra is None:
            teachers[row] = (None, [])
            continue
        extra = [a.replace("{s0}", str(s0 / "part_fvit.pt")) for a in extra]
        run = d / f"pretrain_{SHORT[row]}"
        needs = [f"s{seed}_stage0"] if "{s0}" in " ".join(STARTS[row]) else []
        jobs.append(
            Job(
                f"s{seed}_pre_{SHORT[row]}",
                [
                    *EXE,
                    "pretrain",
                    *train,
                    "--out",
                    str(run),
                    "--overwrite",
                    "--epochs",
                    str(args.pretrain_epochs),
                    *check,
                    *extra,
                ],
                run / "summary.json",
                needs,
            )
        )
        teachers[row] = (run / "teacher.pt", [f"s{seed}_pre_{SHORT[row]}"])
    for row, (teacher, needs) in teachers.items():
        landmarks = str(s0 / "part_fvit.pt") if row == "LAFS, stage-0 landmarks" else "grid"
        needs = needs + ([f"s{seed}_stage0"] if landmarks != "grid" else [])
        init = ["--init", str(teacher)] if teacher is not None else []
        for mode in (["few"] if args.shots else []) + (["full"] if row in args.full else []):
            run = d / f"finetune_{mode}_{SHORT[row]}"
            subset = ["--subset", f"shots={args.shots},seed={seed}", "--batch-size", str(args.fewshot_batch)]
            subset = subset if mode == "few" else []
            epochs = args.fewshot_epochs if mode == "few" else args.stage0_epochs
            jobs.append(
                Job(
                    f"s{seed}_ft_{mode}_{SHORT[row]}",
                    [
                        *EXE,
                        "finetune",
                        *train,
                        *subset,
                        "--out",
                        str(run),
                        "--overwrite",
                        "--epochs",
                        str(epochs),
                        "--landmarks",
                        landmarks,
                        *init,
                        *check,
                    ],
                    run / "summary.json",
                    needs,
                )
            )
    return jobs


def fig(r: dict) -> str:
    return f"{r['knn_top1']:.1f} / {r['verification']:.1f}"


def table(args: argparse.Namespace, out: Path, seeds: list[int]) -> str:
    """The markdown table of every seed's runs: held-out 1-NN / verification (%)."""
    head = " | ".join(f"seed {s}" for s in seeds)
    lines = [f"| stage | start | {head} |", "|---|---|" + "---|" * len(seeds)]
    first = summary(out / f"seed{seeds[0]}" / "stage0")
    floor = " | ".join([fig(first["check_floor"])] * len(seeds))
    lines.append(f"| floor | raw pixels of the held-out faces | {floor} |")
    cells = [fig(summary(out / f"seed{s}" / "stage0")["check_after"]) for s in seeds]
    lines.append(f"| 0, labels | Part fViT from scratch (train-landmarks) | {' | '.join(cells)} |")
    for row, extra in STARTS.items():
        if extra is None:
            continue
        cells = []
        for s in seeds:
            r = summary(out / f"seed{s}" / f"pretrain_{SHORT[row]}")
            cells.append(f"{fig(r['knn_before'])} -> {fig(r['knn_after'])}")
        lines.append(f"| 1, no labels (random init -> trained) | {row} | {' | '.join(cells)} |")
    for mode, title in (("few", f"2, {args.shots}-shot"), ("full", "2, all labels")):
        for row in STARTS:
            if (mode == "few" and not args.shots) or (mode == "full" and row not in args.full):
                continue
            cells = [fig(summary(out / f"seed{s}" / f"finetune_{mode}_{SHORT[row]}")["check_after"]) for s in seeds]
            lines.append(f"| {title} | {row} | {' | '.join(cells)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--celeb24", type=Path, default=Path("../shared/data/celeb24"), help="celeb24's folder")
    ap.add_argument("--out", type=Path, default=Path("runs/pipeline"), help="work folder (recs, runs, logs)")
    ap.add_argument("--seeds", default="0,1", help="comma-separated seeds (init, data order, few-shot subset)")
    ap.add_argument("--jobs", type=int, default=2, help="commands side by side (one thread each)")
    ap.add_argument("--per-person", type=int, default=125, help="faces of each training person (labelled in 0, 2)")
    ap.add_argument("--heldout-per-person", type=int, default=100, help="faces of each held-out person")
    ap.add_argument("--stage0-epochs", type=int, default=10, help="epochs of stage 0 (and of --full fine-tuning)")
    ap.add_argument("--pretrain-epochs", type=int, default=2, help="epochs of every pre-training (stage 1)")
    ap.add_argument("--shots", type=int, default=5, help="few-shot stage 2: faces per training person (0: none)")
    ap.add_argument("--fewshot-epochs", type=int, default=12, help="epochs of the few-shot fine-tuning")
    ap.add_argument("--fewshot-batch", type=int, default=16, help="batch of the few-shot fine-tuning")
    ap.add_argument(
        "--full",
        default="",
        help="comma-separated short names of the starts also fine-tuned on every labelled training face, "
        "as long as stage 0 each (default none: they double the time) "
        f"({', '.join(v for v in SHORT.values() if v != 'scratch')}); stage 0 is the from-scratch one",
    )
    add_run_arguments(ap)
    ap.add_argument("--table-only", action="store_true", help="print the table of the runs already in --out")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    by_short = {v: k for k, v in SHORT.items()}
    unknown = [s for s in filter(None, args.full.split(",")) if s not in by_short or s == "scratch"]
    if unknown:
        known = sorted(set(by_short) - {"scratch"})
        raise SystemExit(f"--full {args.full}: unknown start(s) {unknown}; choose from {known}")
    args.full = [by_short[s] for s in filter(None, args.full.split(","))]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    out = args.out.resolve()
    if not args.table_only:
        if not args.celeb24.is_dir():
            raise SystemExit(f"{args.celeb24} does not exist; pass --celeb24 PATH (24 people, aligned 112x112)")
        out.mkdir(parents=True, exist_ok=True)
        train, held = split_celeb24(args.celeb24, args.per_person, args.heldout_per_person)
        log.info("training people (%d, %d faces): %s", len(train), sum(map(len, train.values())), ", ".join(train))
        log.info("held-out people (%d, %d faces): %s", len(held), sum(map(len, held.values())), ", ".join(held))
        recs = {
            "train": build_rec(train, out / "train", out / "logs"),
            "heldout": build_rec(held, out / "heldout", out / "logs"),
        }
        if not (out / "train" / "train.rec.landmarks.npz").is_file():
            weights = ["--weights", str(args.weights.resolve())] if args.weights.is_dir() else []
            run_now([*EXE, "data", "landmarks", str(recs["train"]), *weights], out / "logs" / "data_landmarks.log")
        jobs = [j for s in seeds for j in jobs_for_seed(args, s, recs, out)]
        # stage 0 first (stage 1 of the paper's pipeline waits for it), then stage 1, then stage 2; seeds interleaved
        order = {"stage0": 0, "pre": 1, "ft": 2}
        jobs.sort(key=lambda j: (order[j.name.split("_")[1]], j.name.split("_", 1)[1], j.name))
        seconds = run_jobs(jobs, args.jobs, out / "logs")
        log.info("all runs done in %.0f s", seconds)
    text = table(args, out, seeds)
    (out / "table.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
