"""Why LAFS views do or do not beat image crops: pre-training ablations and a budget curve on
held-out people (issue 20, items 3 and 4; docs/pretraining_study.md).

Two studies, each a set of `lafs-fast pretrain` runs at one budget, every run checked on faces of
people it never saw (the k-NN check of ``--knn-data``: leave-one-out 1-NN and balanced-pair
verification, beside the raw pixels of the same faces), over several seeds:

- ``ablations``: LAFS (grid landmarks, the reference's views) against the DINO-face baseline, and
  one change at a time: the landmark perturbation sigma (0 / 2 / 5 px), the sparse token count, the
  local views' crop scale (LAFS's 0.4-1 against DINO's 0.05-0.4), the number of local views, the
  landmark source (grid / detector / a stage-0 Part fViT, ``--stage0 PATH``);
- ``budget``: LAFS and DINO-face views at several pre-training lengths (``--budget-epochs``).

Data (``--data``):

- ``lfw``: the setting of a web-face test: pre-training on LFW people with ONE photo each (``--faces``
  of them: 2,016 faces at batch 16 = 126 steps an epoch), held out: a quarter of the LFW people with
  two or more photos (every fourth in sorted order; celeb24's people are left out of everything),
  also scored as 1,000 balanced pairs in 10 folds (``lafs-fast eval``, as the .bin protocols);
  ``--lfw`` is an aligned LFW folder (``lafs-fast data align``, one sub-folder per person);
- ``celeb24``: the split of examples/pipeline.py (every third person held out).

    python examples/study.py ablations --data lfw --lfw PATH --out runs/study --seeds 0,1
    python examples/study.py budget --data celeb24 --budget-epochs 1,4,16 --out runs/budget
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
from _jobs import EXE, Job, add_run_arguments, build_rec, people_of, run_jobs, run_now, summary

log = logging.getLogger("study")

# name -> pretrain arguments; "{stage0}" is --stage0's path
ABLATIONS: dict[str, list[str]] = {
    "LAFS (grid, the reference's views)": [],
    "DINO-face (image crops)": ["--views", "dino"],
    "sigma 0 px": ["views.perturb_sigma=0"],
    "sigma 2 px": ["views.perturb_sigma=2"],
    "16 sparse tokens": ["views.local_tokens=16"],
    "64 sparse tokens": ["views.local_tokens=64"],
    "local crops 0.05-0.4": ["views.lafs_local_scale=local"],
    "2 local views": ["views.n_local=2"],
    "4 local views": ["views.n_local=4"],
    "detector landmarks": ["--landmarks", "detector"],
    "stage-0 landmarks": ["--landmarks", "{stage0}"],
}
BUDGET = {"LAFS (grid)": [], "DINO-face (image crops)": ["--views", "dino"]}


def slug(name: str) -> str:
    """A folder name for a row: 'LAFS (grid, the reference's views)' -> 'lafs_grid_the_reference_s_views'."""
    return "_".join("".join(c if c.isalnum() else " " for c in name.lower()).split())[:40]


def lfw_data(lfw: Path, celeb24: Path | None, faces: int, out: Path) -> dict[str, Path]:
    """Recs of the LFW setting: ``pretrain`` (one-photo people, unlabelled use), ``heldout`` (every
    fourth of the people with 2+ photos) and ``train`` (the other three quarters, for a stage 0), and
    ``pairs``: 1,000 balanced pairs of held-out people (``lafs-fast data make-bin``)."""
    people = people_of(lfw)
    skip = {p.name for p in celeb24.iterdir() if p.is_dir()} if celeb24 and celeb24.is_dir() else set()
    people = {p: f for p, f in people.items() if p not in skip}
    multi = sorted(p for p, f in people.items() if len(f) >= 2)
    single = sorted(p for p, f in people.items() if len(f) == 1)
    if len(single) < faces:
        raise SystemExit(f"{lfw}: {len(single)} people with one photo, --faces asks for {faces}")
    held = multi[::4]
    train = [p for p in multi if p not in held]
    log.info(
        "LFW: %d one-photo people (%d used, unlabelled), %d held-out people (%d photos), %d training people%s",
        len(single),
        faces,
        len(held),
        sum(len(people[p]) for p in held),
        len(train),
        f" ({len(skip)} celeb24 names left out)" if skip else "",
    )
    logs = out / "logs"
    recs = {
        "pretrain": build_rec({p: people[p] for p in single[:faces]}, out / "lfw_pretrain", logs),
        "heldout": build_rec({p: people[p] for p in held}, out / "lfw_heldout", logs),
        "train": build_rec({p: people[p] for p in train}, out / "lfw_train", logs),
    }
    pairs = out / "lfw_heldout_1000.bin"
    if not pairs.is_file():
        run_now(
            [*EXE, "data", "make-bin", str(out / "lfw_heldout_src"), str(pairs), "--num-pairs", "1000"],
            logs / "bin.log",
        )
    recs["pairs"] = pairs
    return recs


def celeb24_data(celeb24: Path, per_person: int, out: Path) -> dict[str, Path]:
    from pipeline import split_celeb24

    train, held = split_celeb24(celeb24, per_person, 100)
    logs = out / "logs"
    return {
        "pretrain": build_rec(train, out / "c24_train", logs),
        "heldout": build_rec(held, out / "c24_heldout", logs),
    }


def pixel_accuracy(pairs: Path) -> float:
    """10-fold accuracy (%) of the raw pixels on a .bin (centred by the set's mean face, cosine)."""
    from lafs_fast.data.binfile import load_bin
    from lafs_fast.eval.embedder import decode_face
    from lafs_fast.eval.metrics import kfold_accuracy

    bs = load_bin(pairs)
    x = np.stack([decode_face(b).reshape(-1).astype(np.float32) for b in bs.images])
    x -= x.mean(axis=0)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return 100 * kfold_accuracy(np.sum(x[0::2] * x[1::2], axis=1), bs.issame).accuracy


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("study", choices=["ablations", "budget"])
    ap.add_argument("--data", choices=["lfw", "celeb24"], default="lfw")
    ap.add_argument("--lfw", type=Path, help="aligned LFW folder (one sub-folder per person), for --data lfw")
    ap.add_argument("--celeb24", type=Path, default=Path("../shared/data/celeb24"), help="celeb24's folder")
    ap.add_argument("--out", type=Path, default=Path("runs/study"))
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--jobs", type=int, default=2, help="runs side by side (one thread each)")
    ap.add_argument("--faces", type=int, default=2016, help="lfw: one-photo people to pre-train on")
    ap.add_argument("--per-person", type=int, default=125, help="celeb24: faces of each training person")
    ap.add_argument("--epochs", type=int, default=2, help="ablations: pre-training epochs")
    ap.add_argument("--budget-epochs", default="2,8,32", help="budget: the pre-training lengths, in epochs")
    ap.add_argument("--rows", help="ablations: comma-separated row numbers to run (default: all)")
    ap.add_argument("--stage0", type=Path, help="a stage-0 part_fvit.pt for the 'stage-0 landmarks' row")
    add_run_arguments(ap)
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",") if s]
    if args.data == "lfw":
        if args.lfw is None or not args.lfw.is_dir():
            raise SystemExit("--data lfw needs --lfw PATH: an aligned LFW folder (lafs-fast data align)")
        recs = lfw_data(args.lfw, args.celeb24, args.faces, out)
    else:
        recs = celeb24_data(args.celeb24, args.per_person, out)
    rows, lengths = study_rows(args)
    if "detector landmarks" in rows and not Path(str(recs["pretrain"]) + ".landmarks.npz").is_file():
        weights = ["--weights", str(args.weights.resolve())] if args.weights.is_dir() else []
        run_now([*EXE, "data", "landmarks", str(recs["pretrain"]), *weights], out / "logs" / "landmarks.log")
    jobs, cells = study_jobs(args, recs, rows, lengths, seeds, out)
    if not args.table_only:
        seconds = run_jobs(jobs, args.jobs, out / "logs")
        log.info("all runs done in %.0f s", seconds)
    text = table(cells, recs, seeds, args.study)
    (out / f"{args.study}.md").write_text(text + "\n")
    print(text)
    if args.study == "budget":
        log.info("figure: %s", plot_budget(cells, out / "budget.png"))
    return 0


def study_rows(args: argparse.Namespace) -> tuple[dict[str, list[str]], list[int]]:
    """The rows (name -> pretrain arguments) and the pre-training lengths (epochs) of the study."""
    if args.study == "budget":
        return BUDGET, [int(e) for e in args.budget_epochs.split(",")]
    rows = dict(ABLATIONS)
    if args.stage0 is None:
        rows.pop("stage-0 landmarks")
    if args.rows:
        keep = {int(i) for i in args.rows.split(",")}
        rows = {k: v for i, (k, v) in enumerate(rows.items()) if i in keep}
    return rows, [args.epochs]


def study_jobs(
    args: argparse.Namespace, recs: dict, rows: dict, lengths: list[int], seeds: list[int], out: Path
) -> tuple[list[Job], dict]:
    """One pretrain job per (length, row, seed), and with LFW pairs an eval job after each; and the
    table's cells: (row, epochs) -> the runs' folders."""
    jobs, cells = [], {}
    for epochs in lengths:
        for name, extra in rows.items():
            extra = [a.replace("{stage0}", str(args.stage0)) for a in extra]
            for seed in seeds:
                tag = f"{slug(name)}_e{epochs}_s{seed}"
                run = out / tag
                cmd = [*EXE, "pretrain", "--preset", "small", "--data", str(recs["pretrain"]), "--knn-data"]
                cmd += [str(recs["heldout"]), "--out", str(run), "--overwrite", "--no-progress", "--seed", str(seed)]
                cmd += [f"train.precision={args.precision}", "--epochs", str(epochs), *extra]
                jobs.append(Job(tag, cmd, run / "summary.json"))
                if "pairs" in recs:
                    ev = run / "eval"
                    ecmd = [*EXE, "eval", str(run / "teacher.pt"), str(recs["pairs"]), "--out", str(ev)]
                    jobs.append(Job(f"{tag}_eval", [*ecmd, "--no-progress"], ev / "results.json", [tag]))
                cells.setdefault((name, epochs), []).append(run)
    return jobs, cells


def plot_budget(cells: dict, path: Path) -> Path:
    """Held-out 1-NN and verification against pre-training steps, one line per row (mean over seeds),
    with the random init and the raw pixels as horizontal references."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    floor = init = None
    for name in dict.fromkeys(n for n, _ in cells):
        pts = sorted(
            (summary(runs[0])["steps"], [summary(r) for r in runs]) for (n, _), runs in cells.items() if n == name
        )
        for ax, key in zip(axes, ("knn_top1", "verification")):
            ax.plot(
                [p for p, _ in pts], [np.mean([s["knn_after"][key] for s in ss]) for _, ss in pts], "o-", label=name
            )
        floor, init = pts[0][1][0]["knn_floor"], pts[0][1][0]["knn_before"]
    for ax, key, title in zip(
        axes, ("knn_top1", "verification"), ("held-out 1-NN top-1 (%)", "held-out verification (%)")
    ):
        ax.axhline(floor[key], color="k", ls="--", lw=1, label="raw pixels")
        ax.axhline(init[key], color="gray", ls=":", lw=1, label="random init")
        ax.set_xscale("log")
        ax.set_xlabel("pre-training steps (batch 16)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def table(cells: dict, recs: dict, seeds: list[int], study: str) -> str:
    """Held-out 1-NN / verification (%) of every row: random init -> pre-trained, per seed, and the
    mean gain over the seeds; with LFW pairs, their 10-fold accuracy."""
    pairs = "pairs" in recs
    head = "| run | epochs (steps) | " + " | ".join(f"seed {s}: 1-NN / verif." for s in seeds)
    head += " | mean gain 1-NN / verif. |" + (" 1,000 pairs, mean (seeds) |" if pairs else "")
    lines = [head, "|---|---|" + "---|" * (len(seeds) + 1 + pairs)]
    floor = None
    for (name, epochs), runs in cells.items():
        ss = [summary(r) for r in runs]
        floor = ss[0]["knn_floor"]
        figs = [
            f"{s['knn_before']['knn_top1']:.1f} / {s['knn_before']['verification']:.1f} -> "
            f"{s['knn_after']['knn_top1']:.1f} / {s['knn_after']['verification']:.1f}"
            for s in ss
        ]
        g1 = np.mean([s["knn_after"]["knn_top1"] - s["knn_before"]["knn_top1"] for s in ss])
        gv = np.mean([s["knn_after"]["verification"] - s["knn_before"]["verification"] for s in ss])
        row = f"| {name} | {epochs} ({ss[0]['steps']}) | " + " | ".join(figs) + f" | {g1:+.1f} / {gv:+.1f} |"
        if pairs:
            accs = [100 * json.loads((r / "eval" / "results.json").read_text())["results"][0]["accuracy"] for r in runs]
            row += f" {np.mean(accs):.1f} ({', '.join(f'{a:.1f}' for a in accs)}) |"
        lines.append(row)
    if floor is not None:
        tail = f" {pixel_accuracy(recs['pairs']):.1f} |" if pairs else ""
        lines.append(
            f"| raw pixels | - | {floor['knn_top1']:.1f} / {floor['verification']:.1f} |" + " |" * len(seeds) + tail
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
