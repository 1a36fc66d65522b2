"""The `lafs-fast train-landmarks` (stage 0) and `lafs-fast finetune` (stage 2) commands.

With no arguments each runs on the built-in synthetic faces with the ``small`` preset (a minute or
two on two CPU cores) and prints a verification check on held-out synthetic identities before and
after training. With ``--data PATH`` the preset defaults to ``reference`` and the optimiser to the
reference fine-tuning recipe (34 epochs, 200 per process x 3 accumulation, lr 2.29e-3 at a global
batch of 1,200 = ``optim.lr`` 4.885e-4 per 256, 5 warm-up epochs, cosine to 1e-6, weight decay 0.1
/ 0.05 on the landmark CNN, no gradient clipping). Both presets get the constant weight decay 0.1.

Outputs in ``--out`` (rank 0): ``ckpt-<step>.pt`` (resume with ``--resume``), ``metrics.jsonl``,
``part_fvit.pt`` at the end (a lafs-fast model file: landmark CNN + fViT (+ replicated margin
head); ``pretrain --landmarks``, ``finetune --landmarks`` and ``lafs-fast eval`` read it), and with
``--val`` sets ``best.pt`` / ``best.json`` beside the last checkpoint.

Examples::

    lafs-fast train-landmarks                                   # synthetic faces, small preset
    lafs-fast train-landmarks --data /data/webface4m --gpus 8
    lafs-fast finetune --init runs/pre/teacher.pt --landmarks runs/s0/part_fvit.pt --data rec/ \\
        --val lfw.bin,cfp_fp.bin --val-every 2000 finetune.head=arcface finetune.margin=0.5
    lafs-fast finetune --init lafs_ssl.pth --landmarks part_fvit_ref.pth --data rec/ \\
        --subset shots=1,fraction=0.01,seed=0
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from lafs_fast.config import Config, config_from_dict, config_to_dict
from lafs_fast.io import atomic_save, check_writable_dir
from lafs_fast.launch import resolve_precision
from lafs_fast.train.cli_common import (
    add_check_arguments,
    add_run_arguments,
    add_source_arguments,
    check_enabled,
    data_source,
    launch_training,
    plan_line,
    resolve_training_config,
    training_loader,
    training_process,
    write_summary,
)

log = logging.getLogger(__name__)

__all__ = [
    "add_arguments",
    "resolve_config",
    "run",
    "train_worker",
    "stage_defaults",
    "parse_subset",
    "prepare_data",
    "heldout_check",
]

PROG = {0: "train-landmarks", 2: "finetune"}

# Per-256 lr of the reference fine-tuning: 2.29e-3 at a global batch of 1,200 (spec section 4).
REFERENCE_LR_PER_256 = 2.29e-3 * 256 / 1200


def stage_defaults(preset: str) -> dict[str, Any]:
    """The supervised stages' own values, applied between the preset and the user's config: the
    optimiser's, and for ``small`` the lr and token init measured on real faces (docs/finetuning.md)."""
    d: dict[str, Any] = {"optim.weight_decay": 0.1, "optim.weight_decay_end": 0.1, "optim.clip_grad": 0.0}
    if preset == "small":
        # measured on celeb24 (docs/finetuning.md): peak lr 3e-4 at batch 32 fits 23-25 % of 246 real faces in
        # 140 steps (6e-3 collapses the embeddings); CLS / position tables at std 0.02 as in pretrain's small
        d.update({"optim.lr": 0.0024, "model.token_init_std": 0.02})
    if preset == "reference":
        d.update(
            {
                "optim.epochs": 34,
                "optim.batch_size": 200,
                "optim.accumulation": 3,
                "optim.lr": REFERENCE_LR_PER_256,
                "optim.warmup_epochs": 5,
                "optim.min_lr": 1e-6,
            }
        )
    return d


def add_arguments(parser: argparse.ArgumentParser, stage: int) -> None:
    add_source_arguments(parser, "both with this stage's optimiser defaults, see the module doc")
    if stage == 2:
        parser.add_argument(
            "--init",
            help="the stage-1 backbone: lafs-fast pretrain's teacher.pt / ckpt-*.pt, or the reference's SSL checkpoint",
        )
        parser.add_argument(
            "--landmarks",
            help="the stage-0 landmark CNN: train-landmarks' part_fvit.pt, the reference's Part fViT checkpoint, "
            "'scratch', or 'grid' (from scratch, its output starting at the patch grid that `pretrain --landmarks "
            "grid` trained the teacher on) (default: --init's own if it has one)",
        )
        parser.add_argument(
            "--no-landmark-reg",
            dest="landmark_reg",
            action="store_false",
            default=None,
            help="switch the lambda-scheduled landmark regulariser off",
        )
    else:
        parser.add_argument("--init", help="optional starting weights (a Part fViT model file or reference checkpoint)")
    parser.add_argument("--head", choices=["cosface", "arcface"], help="finetune.head (margin: finetune.margin)")
    parser.add_argument("--subset", help="few-shot subset: shots=K,fraction=P,seed=S (finetune.subset)")
    parser.add_argument("--val", help="comma-separated .bin verification sets (finetune.val_sets)")
    parser.add_argument(
        "--val-every", type=int, help="verify every this many steps (finetune.val_every; 0 = at the end)"
    )
    parser.add_argument("--augment", choices=["auto", "cpu", "gpu", "none"], help="finetune.augment")
    add_run_arguments(parser)
    add_check_arguments(parser, "check")


_STAGE_FLAGS = (
    ("head", "finetune.head"),
    ("subset", "finetune.subset"),
    ("val", "finetune.val_sets"),
    ("val_every", "finetune.val_every"),
    ("augment", "finetune.augment"),
    ("landmark_reg", "finetune.landmark_reg"),
)


def resolve_config(args: argparse.Namespace) -> Config:
    """Preset (small without --data, else reference) <- stage defaults <- --config <- key=value <- flags."""
    extra = {}
    if args.head == "arcface" and not any(str(o).startswith("finetune.margin=") for o in args.overrides or []):
        extra["finetune.margin"] = 0.5  # ArcFace's usual margin unless given
    return resolve_training_config(args, _STAGE_FLAGS, stage_defaults, extra)


def parse_subset(spec: str) -> dict[str, Any]:
    """'shots=K,fraction=P,seed=S' (any order, each optional) -> {"shots", "fraction", "seed"}."""
    out: dict[str, Any] = {"shots": None, "fraction": 1.0, "seed": 0}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        key, _, val = part.partition("=")
        try:
            if key == "shots":
                out["shots"] = int(val)
            elif key == "fraction":
                out["fraction"] = float(val)
            elif key == "seed":
                out["seed"] = int(val)
            else:
                raise ValueError
        except ValueError:
            raise ValueError(f"--subset {spec!r}: {part!r} is not shots=K, fraction=P or seed=S") from None
    if out["shots"] is not None and out["shots"] < 1 or not 0 < out["fraction"] <= 1:
        raise ValueError(f"--subset {spec!r}: shots must be >= 1 and fraction in (0, 1]")
    return out


def prepare_data(cfg: Config) -> str:
    """The data source to train on: ``data.path`` or, with ``finetune.subset``, the few-shot subset
    (written once under ``train.out_dir``, reused when present; an image folder is packed into a
    rec first). Synthetic data: ``round(P * IDS)`` identities with K images each from the same
    generator (every synthetic identity is drawn alike, so this is the subset's distribution)."""
    src = data_source(cfg)
    if not cfg.finetune.subset:
        return src
    s = parse_subset(cfg.finetune.subset)
    if src.startswith("synthetic"):
        from lafs_fast.data.synthetic import parse_spec

        ds = parse_spec(src)
        ids = max(1, round(s["fraction"] * ds.num_identities))
        shots = min(s["shots"] or ds.images_per_identity, ds.images_per_identity)
        out = f"synthetic:{ids}x{shots}:seed={ds.seed}"
        log.info(f"[subset] synthetic: {ids} identities x {shots} images ({out})")
        return out
    from lafs_fast.data.folder import build_rec
    from lafs_fast.data.subsets import make_subset

    root = Path(cfg.train.out_dir) / f"subset-shots{s['shots']}-frac{s['fraction']:g}-seed{s['seed']}"
    if (root / "train.rec").is_file():
        log.info(f"[subset] reusing {root}")
        return str(root)
    rec = Path(src)
    if rec.is_dir() and not (rec / "train.rec").is_file():  # an image folder: pack it first
        packed = Path(cfg.train.out_dir) / "packed"
        if not (packed / "train.rec").is_file():
            build_rec(rec, packed, progress=False)
        rec = packed
    counts = make_subset(rec, root, shots=s["shots"], fraction=s["fraction"], seed=s["seed"])
    log.info(f"[subset] {counts} -> {root}")
    return str(root)


def preflight(cfg: Config, stage: int, init: str | None, landmarks: str | None, resume: str | None) -> None:
    from lafs_fast.data.sources import open_source

    check_writable_dir(cfg.train.out_dir)
    open_source(data_source(cfg))
    for what, p in (("--init", init), ("--landmarks", None if landmarks in ("scratch", "grid") else landmarks)):
        if p and not Path(p).is_file():
            raise FileNotFoundError(f"{what} {p} does not exist")
    for p in filter(None, cfg.finetune.val_sets.split(",")):
        if not Path(p).is_file():
            raise FileNotFoundError(
                f"verification set {p} does not exist; pass .bin files (lafs-fast data make-bin builds one)"
            )
    if cfg.finetune.subset:
        parse_subset(cfg.finetune.subset)
    if resume not in (None, "auto") and not Path(resume).is_file():
        raise FileNotFoundError(
            f"checkpoint {resume} does not exist; pass a ckpt-*.pt of a previous run, or --resume alone for the latest "
            "in --out"
        )


def run(args: argparse.Namespace, stage: int) -> int:
    cfg = resolve_config(args)
    init = getattr(args, "init", None)
    landmarks = getattr(args, "landmarks", None)
    preflight(cfg, stage, init, landmarks, args.resume)
    opts = {
        "resume": args.resume,
        "overwrite": args.overwrite,
        "check": check_enabled(cfg, args.check, args.knn_data),
        "knn_data": args.knn_data,
        "progress": not args.no_progress,
        "init": init,
        "landmarks": landmarks,
    }
    return launch_training(
        PROG[stage],
        train_worker,
        (config_to_dict(cfg), stage, opts),
        cfg,
        digest_what="shared parameters",
        resume=args.resume,
        overwrite=args.overwrite,
    )


# --------------------------------------------------------------------------------------------------
# the worker


def heldout_check(model, device: torch.device, precision: str = "fp32", faces=None) -> dict[str, float]:
    """1-NN top-1 and verification accuracy (%) on ``faces`` (:func:`lafs_fast.eval.knn.knn_faces`;
    default: held-out synthetic identities, never trained on), with flip-sum embeddings of the Part
    fViT (eval mode; its head is not used), the fViT under the run's ``precision`` (the landmark CNN
    stays fp32 in PartFViT)."""
    from lafs_fast.eval.knn import ImageInputs, knn_check

    return knn_check(model, ImageInputs(), device, faces, precision=precision)


def _shared_digest(model, sharded: bool) -> str:
    """sha256 of the parameters every rank holds alike (the sharded head's slices differ by design)."""
    import hashlib

    h = hashlib.sha256()
    for name, p in model.named_parameters():
        if sharded and name.startswith("head."):
            continue
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def train_worker(cfg_dict: dict[str, Any], stage: int, opts: dict[str, Any]) -> dict[str, Any]:
    """One process: data, model (loaded per stage), the supervised stage, the engine; rank 0 writes.
    Returns a summary (steps, digest, loss first/last, checks, verification)."""
    from lafs_fast.eval.knn import format_check, knn_faces, pixel_floor, report_lines
    from lafs_fast.train.engine import Engine, barrier
    from lafs_fast.train.supervised import SupervisedStage
    from lafs_fast.train.supervised_model import build_supervised_model

    cfg = config_from_dict(cfg_dict)
    name = PROG[stage]
    with training_process(cfg) as info:
        # the few-shot subset (if any): rank 0 writes it, the others then find and reuse it
        data = opts.get("data") or (prepare_data(cfg) if info.is_main else None)
        barrier(info)
        if data is None:
            data = prepare_data(cfg)  # reuses rank 0's subset (its lines are rank 0's alone)
        loader = training_loader(cfg, info, data)
        loader.check_labels()  # a label past the head: one sentence now, not a traceback in mixup later
        num_classes = int(loader.num_classes)
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank (the loader drew none)
        cfg, model, ref = build_supervised_model(cfg, num_classes, stage, opts.get("init"), opts.get("landmarks"))
        out = Path(cfg.train.out_dir)
        val_sets = [p for p in cfg.finetune.val_sets.split(",") if p]
        st = SupervisedStage(
            cfg,
            model,
            num_classes,
            stage,
            info.device,
            ref_landmarks=ref,
            out_dir=out,
            val_sets=val_sets,
            is_main=info.is_main,
        )
        torch.manual_seed(cfg.train.seed + 1_000 * info.rank)  # dropout / drop-path streams differ per rank
        f = cfg.finetune
        log.info(
            f"[{name}] {info.world_size} process(es) on {info.device.type}; data: {loader.backend}; {num_classes} "
            f"identities, {loader.n} images"
        )
        log.info(
            f"[{name}] model dim {cfg.model.dim} depth {cfg.model.depth}, "
            f"{sum(p.numel() for p in model.backbone.parameters()) / 1e6:.2f} M fViT + "
            f"{sum(p.numel() for p in model.landmark_cnn.parameters()) / 1e6:.2f} M landmark CNN; head {f.head} (s "
            f"{f.scale}, m {f.margin}"
            f"{f', reached over {f.margin_warmup_epochs:g} epochs' if f.margin_warmup_epochs else ''}) "
            f"{'sharded' if st.sharded else 'replicated'}{f', sample rate {f.sample_rate}' if st.sharded else ''}"
        )
        log.info(
            f"[{name}] {st.augment.describe()}; mixup "
            f"{'off' if st.mixup is None else f'alpha {f.mixup_alpha} p {f.mixup_p}'}; "
            f"landmark regulariser {'on (lambda 1000/100/1/0.11/0 from epochs 0/8/14/21/28)' if st.reg_on else 'off'}; "
            f"layer decay {cfg.optim.layer_decay}"
        )
        for note in st.notes:
            log.info(f"[{name}] note: {note}")
        before = faces = None
        precision = resolve_precision(cfg.train.precision, info.device)
        if opts.get("check") and info.is_main:
            faces = knn_faces(opts.get("knn_data"), info.device)
        if faces is not None and not opts.get("resume"):
            before = heldout_check(model, info.device, precision, faces)
            log.info(f"[{name}] {faces.title} before: {format_check(before, faces)}")
        barrier(info)
        engine = Engine(
            cfg,
            st,
            loader,
            info,
            out,
            resume=opts.get("resume"),
            progress=opts.get("progress", True),
            overwrite=opts.get("overwrite", False),
        )  # claims the run folder before anything is written there
        if val_sets and info.is_main and not opts.get("resume"):
            summary_before = st.validate(0)  # the starting point (and best.pt until training beats it)
        else:
            summary_before = None
        log.info(plan_line(name, engine, cfg))
        result = engine.fit()
        ran = st.first_loss is not None
        first = [float(t) for t in st.first_loss] if ran else [None, None]
        last = [float(t) for t in st.last_loss] if ran else [None, None]
        summary: dict[str, Any] = {
            "rank": info.rank,
            "steps": result.steps,
            "digest": _shared_digest(model, st.sharded),
            "seconds": result.seconds,
            "last_checkpoint": str(result.last_checkpoint),
            "loss_first": first[0],
            "loss_last": last[0],
            "ce_first": first[1],
            "ce_last": last[1],
        }
        if info.is_main:
            atomic_save(st.export(), out / "part_fvit.pt")
            log.info(
                f"[{name}] {result.steps} steps in {result.seconds:.1f} s; first -> last batch: loss {first[0]:.3f} -> "
                f"{last[0]:.3f}, "
                f"margin cross-entropy {first[1]:.3f} -> {last[1]:.3f}"
                if ran
                else f"[{name}] nothing to do: already at step {result.steps}"
            )
            log.info(f"[{name}] model file: {out / 'part_fvit.pt'}")
            if val_sets:
                acc = st.val.last if st.val.last_step == result.steps else st.validate(result.steps)
                summary["verification"] = acc
                summary["verification_before"] = summary_before
                summary["best"] = {"mean": st.val.best, "step": st.val.best_step}
            if faces is not None:
                after = heldout_check(model, info.device, precision, faces)
                floor = pixel_floor(faces)
                for line in report_lines(before, after, faces, floor):
                    log.info(f"[{name}] {line}")
                summary.update(check_before=before, check_after=after, check_floor=floor)
            write_summary(out, summary)
        barrier(info)
        return summary


def main(argv: list[str] | None = None, stage: int = 2) -> int:
    """``python -m lafs_fast.train.finetune ...`` (what ``torchrun`` runs)."""
    from lafs_fast.errors import run_command

    parser = argparse.ArgumentParser(prog=f"lafs-fast {PROG[stage]}", description=__doc__.splitlines()[0])
    add_arguments(parser, stage)
    return run_command(
        f"lafs-fast {PROG[stage]}", parser, lambda args: run(args, stage), sys.argv[1:] if argv is None else argv
    )
