"""`lafs-fast pretrain`: stage 1, LAFS self-supervised pre-training (docs/method.md section 3).

With no arguments: the built-in synthetic faces and the ``small`` preset, a few minutes on two CPU
cores, then a k-NN / verification check on held-out synthetic identities, printed before and after
pre-training. With ``--data PATH`` the preset defaults to ``reference``.

Outputs in ``--out`` (rank 0): ``ckpt-<step>.pt`` training checkpoints (resume with ``--resume``;
each also holds the teacher as a model file under ``model_file``), ``metrics.jsonl`` (the k-NN
checks too: before, every ``--knn-every``, after), ``teacher-<step>.pt`` every
``--save-teacher-every``, and at the end ``teacher.pt``, a lafs-fast model file of the teacher
backbone + DINO head (the input of ``lafs-fast finetune``; ``lafs-fast checkpoint export`` turns it
into the reference's SSL layout).

Processes: ``--gpus N`` starts N processes (torch's elastic launcher; NCCL on GPUs, gloo with
``--device cpu``); under ``torchrun`` it joins the existing group. Global batch = per-process batch
x processes x accumulation; the lr is ``optim.lr * global_batch / 256``.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from lafs_fast.config import Config, config_to_dict
from lafs_fast.dense_landmarks import DetectorLandmarks
from lafs_fast.eval.knn import format_check, knn_check, knn_faces
from lafs_fast.io import atomic_save, check_writable_dir
from lafs_fast.train.cli_common import (
    TrainingJob,
    add_check_arguments,
    add_run_arguments,
    add_source_arguments,
    check_enabled,
    data_source,
    launch_training,
    resolve_training_config,
    run_job,
    training_loader,
)
from lafs_fast.train.progress import check_record, parse_every

log = logging.getLogger(__name__)

__all__ = [
    "add_arguments",
    "run",
    "resolve_config",
    "stage_defaults",
    "train_worker",
    "param_digest",
    "detector_landmarks",
]


# --------------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_source_arguments(parser)
    parser.add_argument(
        "--landmarks",
        help="'grid' (default), a stage-0 / reference Part fViT checkpoint, or 'detector' (the "
        "face-detector landmarks of `lafs-fast data landmarks REC`, densified to the token count; "
        "views.detector_file=PATH names another sidecar)",
    )
    parser.add_argument(
        "--views", choices=["lafs", "dino"], help="landmark views (default) or the DINO-face image-grid baseline"
    )
    add_run_arguments(parser)
    add_check_arguments(parser, "knn")
    parser.add_argument(
        "--knn-every",
        metavar="N[steps|epochs]",
        help="also run the k-NN check during training, every N optimiser steps (500, 500steps) or epochs "
        "(2epochs), into the log and metrics.jsonl as knn/top1, knn/verification (turns the check on). Cost: "
        "rank 0 embeds the check's faces twice (with flips) with the teacher while the other ranks wait: "
        f"{KNN_COST}",
    )
    parser.add_argument(
        "--save-teacher-every",
        metavar="N[steps|epochs]",
        help="also keep a snapshot of the teacher every N steps or epochs, as teacher-<step>.pt (a model file "
        "like teacher.pt, for `lafs-fast eval` / `finetune --init`), never pruned. Cost: one teacher.pt each, "
        f"{SNAPSHOT_COST}, written atomically by rank 0",
    )


_STAGE_FLAGS = (("landmarks", "views.landmarks"), ("views", "views.mode"))
# what a periodic check and a teacher snapshot cost (--help), measured 2026-12-06 on the 2-core CPU machine
# under load: knn_check of the small preset's teacher on knn_faces(None), 3 calls; len(torch.save(export()))
KNN_COST = (
    "about 13 s for the default 200 held-out faces at the small preset on 2 busy CPU cores (two training steps), "
    "linear in the faces (up to 2,000 with --knn-data)"
)
SNAPSHOT_COST = "5.7 MB at the small preset, 384 MB at the reference"


def resolve_config(args: argparse.Namespace) -> Config:
    """Preset (small without --data, else reference) <- stage defaults <- --config <- key=value <- the flags."""
    return resolve_training_config(args, _STAGE_FLAGS, stage_defaults)


def stage_defaults(preset: str) -> dict[str, Any]:
    """Pre-training's own values on top of a preset (below --config and key=value).

    ``small`` (the default run: a few minutes on two CPU cores): batch 16, 6 epochs, peak lr 5e-4 at
    that batch, a 256-prototype head, CLS / position tables drawn with std 0.02 instead of the
    reference's N(0, 1) (in a 192-wide model N(0, 1) positions swamp the 8 x 8 pixel patches), and
    the recipe that made pre-training beat the random-init features on held-out real faces
    (docs/pretraining_experiments.md): DINOv2's Sinkhorn-Knopp targets and KoLeo term (weight 1), a
    teacher EMA of 0.99 -> 1, a deterministic teacher (eval mode) and no dropout. The DINO recipe
    with the reference's centering collapsed within ~10 steps here. The backbone shape stays the
    preset's, so ``lafs-fast finetune --preset small`` reads the teacher. ``reference`` keeps every
    spec value.
    """
    if preset != "small":
        return {}
    return {
        "model.token_init_std": 0.02,
        "model.dropout": 0.0,
        "model.emb_dropout": 0.0,
        "dino.out_dim": 256,
        "dino.hidden_dim": 256,
        "dino.bottleneck_dim": 64,
        "dino.teacher_momentum": 0.99,
        "dino.teacher_mode": "eval",
        "dino.centering": "sinkhorn",
        "dino.koleo_weight": 1.0,
        "optim.batch_size": 16,
        "optim.epochs": 6,
        "optim.lr": 0.008,
    }


def preflight(cfg: Config, resume: str | None) -> None:
    """Every check that needs no work: output folder writable, data and landmark paths readable."""
    from lafs_fast.data.sources import open_source

    check_writable_dir(cfg.train.out_dir)
    open_source(data_source(cfg))  # FileNotFoundError / ValueError naming the path
    lm = cfg.views.landmarks
    if cfg.views.mode == "lafs" and lm not in ("grid", "detector") and not Path(lm).is_file():
        raise FileNotFoundError(
            f"landmark checkpoint {lm} does not exist; pass a stage-0 / Part fViT checkpoint or --landmarks grid"
        )
    if cfg.views.mode == "lafs" and lm == "detector":
        if cfg.data.loader == "dali-mxnet":
            raise ValueError(
                "--landmarks detector needs each image's record, which DALI's mxnet reader does not say; use "
                "data.loader=dali (or auto)"
            )
        detector_landmarks(cfg)  # the sidecar exists, matches the rec and has faces
    if resume not in (None, "auto") and not Path(resume).is_file():
        raise FileNotFoundError(
            f"checkpoint {resume} does not exist; pass a ckpt-*.pt of a previous run, or --resume alone for the latest "
            "in --out"
        )
    if cfg.train.gpus > 1 and cfg.train.device == "cuda" and torch.cuda.device_count() < cfg.train.gpus:
        raise ValueError(f"--gpus {cfg.train.gpus} but only {torch.cuda.device_count()} GPU(s) are visible")


def detector_landmarks(cfg: Config) -> DetectorLandmarks | None:
    """The per-record landmark table of ``--landmarks detector`` (None otherwise)."""
    if cfg.views.mode != "lafs" or cfg.views.landmarks != "detector":
        return None
    return DetectorLandmarks.for_source(
        data_source(cfg),
        cfg.views.detector_file or None,
        image_size=cfg.model.image_size,
        patch_size=cfg.model.patch_size,
        smoothing=cfg.views.detector_smoothing,
    )


def run(args: argparse.Namespace) -> int:
    cfg = resolve_config(args)
    preflight(cfg, args.resume)
    knn_every, save_every = getattr(args, "knn_every", None), getattr(args, "save_teacher_every", None)
    for flag, value in (("--knn-every", knn_every), ("--save-teacher-every", save_every)):
        if value is not None:
            parse_every(value, flag)  # one sentence now, not in a worker
    if knn_every is not None and args.knn is False:
        raise ValueError("--knn-every runs the k-NN check, which --no-knn turns off; drop one of the two")
    knn = check_enabled(cfg, True if knn_every is not None else args.knn, args.knn_data)
    opts = {
        "resume": args.resume,
        "overwrite": args.overwrite,
        "knn": knn,
        "knn_data": args.knn_data,
        "knn_every": knn_every,
        "save_teacher_every": save_every,
        "progress": not args.no_progress,
        "memory_check": args.memory_check,
    }
    return launch_training(
        "pretrain",
        train_worker,
        (config_to_dict(cfg), opts),
        cfg,
        resume=args.resume,
        overwrite=args.overwrite,
        memory_check=args.memory_check,
    )


# --------------------------------------------------------------------------------------------------
# the worker (one per process)


def param_digest(module: torch.nn.Module) -> str:
    """sha256 of every parameter's bytes, in order (equal across ranks after DDP steps)."""
    h = hashlib.sha256()
    for p in module.parameters():
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class PretrainJob(TrainingJob):
    """Stage 1 in the shared worker: data (record positions with ``--landmarks detector``), views,
    DINO; ``teacher.pt`` at the end; the check embeds with the teacher's backbone."""

    prog = "pretrain"
    model_file = "teacher.pt"
    check_opt = "knn"
    summary_prefix = "knn"

    def setup(self) -> Any:
        from lafs_fast.train.dino import DinoStage

        cfg, info = self.cfg, self.info
        self.detector = detector_landmarks(cfg)
        loader = training_loader(cfg, info, with_positions=self.detector is not None)
        self.stage = DinoStage(cfg, info.device, detector=self.detector, precision=self.precision)
        return loader

    def describe(self, loader: Any) -> list[str]:
        cfg, info, detector = self.cfg, self.info, self.detector
        lines = [
            f"{info.world_size} process(es) on {info.device.type}; data: {loader.backend}",
            f"views: {cfg.views.mode}, landmarks: "
            f"{cfg.views.landmarks if cfg.views.mode == 'lafs' else 'none (image grid)'}; "
            f"model dim {cfg.model.dim} depth {cfg.model.depth}, "
            f"{sum(p.numel() for p in self.stage.model.backbone.parameters()) / 1e6:.2f} M backbone params",
        ]
        if detector is not None and info.is_main:
            q = detector.quality()
            lines.append(
                f"{detector.describe()}; on {q['faces']} faces the densification fits the detected points to "
                f"{q['fit_px']:.1f} px (affine {q['affine_fit_px']:.1f} px), smallest grid step {q['min_step_px']:.1f} "
                "px" + (" - THE GRID FOLDS: raise views.detector_smoothing" if q["min_step_px"] <= 0 else "")
            )
        return lines

    def check_faces(self) -> Any:
        train_data = data_source(self.cfg)
        return knn_faces(
            self.opts.get("knn_data"), self.info.device, train_data=train_data, detector=self.detector is not None
        )

    def check(self, faces: Any) -> dict[str, float]:
        return knn_check(self.stage.teacher.backbone, self.stage.views, self.info.device, faces, self.precision)

    def before_fit(self, engine: Any) -> None:
        """``--knn-every`` / ``--save-teacher-every``: rank 0's periodic checks (Engine.every)."""
        spe, max_steps = engine.plan.steps_per_epoch, self.cfg.train.max_steps
        self.stop = engine.plan.total_steps if max_steps <= 0 else min(max_steps, engine.plan.total_steps)
        if self.opts.get("knn_every") and self.faces is not None:
            engine.every(parse_every(self.opts["knn_every"], "--knn-every").steps(spe), self.periodic_check)
        if self.opts.get("save_teacher_every"):
            every = parse_every(self.opts["save_teacher_every"], "--save-teacher-every")
            engine.every(every.steps(spe), self.save_teacher)

    def periodic_check(self, step: int) -> None:
        """The k-NN check at ``step``: a log line and metrics.jsonl's knn/top1, knn/verification (at the
        last step the check after training says it, beside the one before and the pixel floor)."""
        if step == self.stop:
            return
        result = self.check(self.faces)
        self.engine.log_record(check_record(result), step)
        log.info(f"[pretrain] step {step}: {self.faces.title} {format_check(result, self.faces)}")

    def save_teacher(self, step: int) -> None:
        """``teacher-<step>.pt``: the teacher now, as a model file (atomic: a kill leaves no half file)."""
        path = Path(self.cfg.train.out_dir) / f"teacher-{step:08d}.pt"
        atomic_save(self.stage.export(), path)
        log.info(f"[pretrain] step {step}: teacher snapshot {path}")

    def digest(self) -> str:
        return param_digest(self.stage.model)

    def finish(self, result: Any, summary: dict[str, Any]) -> None:
        out = Path(self.cfg.train.out_dir) / self.model_file
        log.info(f"[pretrain] {result.steps} steps in {result.seconds:.1f} s; teacher model file: {out}")


def train_worker(cfg_dict: dict[str, Any], opts: dict[str, Any]) -> dict[str, Any]:
    """One process of the job: data, views, DINO, the engine; rank 0 writes. Returns a summary
    (steps, parameter digest, k-NN figures on rank 0)."""
    return run_job(PretrainJob, cfg_dict, opts)


def main(argv: list[str] | None = None) -> int:
    """``python -m lafs_fast.train.pretrain ...`` (what ``torchrun`` runs): ``lafs-fast pretrain``."""
    from lafs_fast.errors import run_command

    parser = argparse.ArgumentParser(prog="lafs-fast pretrain", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run_command("lafs-fast pretrain", parser, run, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":  # through the module's own name: its logger is under lafs_fast, its worker spawns
    from lafs_fast.train.pretrain import main as _main

    sys.exit(_main())
