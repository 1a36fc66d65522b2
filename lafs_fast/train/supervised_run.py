"""The `lafs-fast train-landmarks` (stage 0) and `lafs-fast finetune` (stage 2) commands: one module,
two entry points (:data:`train_landmarks`, :data:`finetune`), one worker (:class:`SupervisedJob` in
the skeleton every training command shares, ``cli_common.run_job``).

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

from lafs_fast.config import Config, config_to_dict
from lafs_fast.io import check_writable_dir
from lafs_fast.train import cli_common  # the arguments, the launch and the worker every command shares

log = logging.getLogger(__name__)

__all__ = [
    "add_arguments",
    "resolve_config",
    "run",
    "train_worker",
    "SupervisedJob",
    "train_landmarks",
    "finetune",
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
        # measured on celeb24's held-out people (docs/finetuning.md, runs S1-S7): a plain softmax head, a landmark
        # CNN starting at the patch grid, no dropout, crop + flip only and peak lr 5e-4 at batch 32 give
        # embeddings that verify unseen people better than their raw pixels within a few hundred steps; the
        # reference's CosFace (s 64, m 0.4), its random landmark start, dropout and heavier augmentation do not
        # in so short a run. CLS / position tables at std 0.02.
        d.update(
            {
                "optim.lr": 0.004,
                "model.token_init_std": 0.02,
                "finetune.head": "softmax",
                "model.landmark_start": "grid",
                "model.dropout": 0.0,
                "model.emb_dropout": 0.0,
                "model.drop_path": 0.0,
                "finetune.randaug_ops": 0,
                "finetune.erase_p": 0.0,
                "finetune.mixup_p": 0.0,
                "finetune.jitter": 0.0,
            }
        )
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
    cli_common.add_source_arguments(parser, "both with this stage's optimiser defaults, see the module doc")
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
    parser.add_argument(
        "--head", choices=["cosface", "arcface", "softmax"], help="finetune.head (margin: finetune.margin)"
    )
    parser.add_argument("--subset", help="few-shot subset: shots=K,fraction=P,seed=S (finetune.subset)")
    parser.add_argument("--val", help="comma-separated .bin verification sets (finetune.val_sets)")
    parser.add_argument(
        "--val-every", type=int, help="verify every this many steps (finetune.val_every; 0 = at the end)"
    )
    parser.add_argument("--augment", choices=["auto", "cpu", "gpu", "none"], help="finetune.augment")
    cli_common.add_run_arguments(parser)
    cli_common.add_check_arguments(parser, "check")


_STAGE_FLAGS = (
    ("init", "finetune.init"),
    ("landmarks", "finetune.landmarks"),
    ("head", "finetune.head"),
    ("subset", "finetune.subset"),
    ("val", "finetune.val_sets"),
    ("val_every", "finetune.val_every"),
    ("augment", "finetune.augment"),
    ("landmark_reg", "finetune.landmark_reg"),
)


def resolve_config(args: argparse.Namespace) -> Config:
    """Preset (small without --data, else reference) <- stage defaults <- --config <- key=value <- flags,
    then the fViT architecture of ``--init``'s weights (what the run builds and writes to config.yaml)."""
    extra = {}
    if args.head == "arcface" and not any(str(o).startswith("finetune.margin=") for o in args.overrides or []):
        extra["finetune.margin"] = 0.5  # ArcFace's usual margin unless given
    cfg = cli_common.resolve_training_config(args, _STAGE_FLAGS, stage_defaults, extra)
    from lafs_fast.train.supervised_model import init_architecture

    return init_architecture(cfg)  # the shape of --init's weights, as the worker builds it


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
    src = cli_common.data_source(cfg)
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


def preflight(cfg: Config, resume: str | None) -> None:
    """Every check that needs no work: output folder writable, data, starting weights, verification
    sets and subset readable."""
    from lafs_fast.data.sources import open_source

    check_writable_dir(cfg.train.out_dir)
    open_source(cli_common.data_source(cfg))
    f = cfg.finetune
    for what, p in (("--init", f.init), ("--landmarks", None if f.landmarks in ("scratch", "grid") else f.landmarks)):
        if p and not Path(p).is_file():
            raise FileNotFoundError(f"{what} {p} does not exist")
    for p in filter(None, f.val_sets.split(",")):
        if not Path(p).is_file():
            raise FileNotFoundError(
                f"verification set {p} does not exist; pass .bin files (lafs-fast data make-bin builds one)"
            )
    if f.subset:
        parse_subset(f.subset)
    if resume not in (None, "auto") and not Path(resume).is_file():
        raise FileNotFoundError(
            f"checkpoint {resume} does not exist; pass a ckpt-*.pt of a previous run, or --resume alone for the latest "
            "in --out"
        )


def run(args: argparse.Namespace, stage: int) -> int:
    cfg = resolve_config(args)
    preflight(cfg, args.resume)
    opts = {
        "resume": args.resume,
        "overwrite": args.overwrite,
        "check": cli_common.check_enabled(cfg, args.check, args.knn_data),
        "knn_data": args.knn_data,
        "progress": not args.no_progress,
        "memory_check": args.memory_check,
    }
    return cli_common.launch_training(
        PROG[stage],
        train_worker,
        (config_to_dict(cfg), stage, opts),
        cfg,
        digest_what="shared parameters",
        resume=args.resume,
        overwrite=args.overwrite,
        memory_check=args.memory_check,
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


class SupervisedJob(cli_common.TrainingJob):
    """Stages 0 and 2 in the shared worker: the few-shot subset, labelled data, the Part fViT from
    ``finetune.init`` / ``finetune.landmarks``, the supervised stage; ``part_fvit.pt`` at the end, with
    ``--val`` sets verified before, during and after; the check embeds with the Part fViT."""

    model_file = "part_fvit.pt"

    def __init__(self, cfg: Config, opts: dict[str, Any], info: Any, precision: str, stage: int) -> None:
        super().__init__(cfg, opts, info, precision)
        self.stage_no, self.prog = stage, PROG[stage]
        self.val_sets = [p for p in cfg.finetune.val_sets.split(",") if p]
        self.val_before: dict[str, float] | None = None

    def setup(self) -> Any:
        from lafs_fast.train.engine import barrier
        from lafs_fast.train.supervised import SupervisedStage
        from lafs_fast.train.supervised_model import build_supervised_model

        cfg, info = self.cfg, self.info
        # the few-shot subset (if any): rank 0 writes it, the others then find and reuse it
        data = self.opts.get("data") or (prepare_data(cfg) if info.is_main else None)
        barrier(info)
        if data is None:
            data = prepare_data(cfg)  # rank 0's subset, reused (its lines are rank 0's alone)
        loader = cli_common.training_loader(cfg, info, data)
        loader.check_labels()  # a label past the head: one sentence now, not a traceback in mixup later
        self.num_classes = int(loader.num_classes)
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank (the loader drew none)
        f = cfg.finetune
        self.cfg, self.model, ref = build_supervised_model(
            cfg, self.num_classes, self.stage_no, f.init or None, f.landmarks or None
        )
        self.stage = SupervisedStage(
            self.cfg,
            self.model,
            self.num_classes,
            self.stage_no,
            info.device,
            ref_landmarks=ref,
            out_dir=Path(cfg.train.out_dir),
            val_sets=self.val_sets,
            is_main=info.is_main,
        )
        return loader

    def describe(self, loader: Any) -> list[str]:
        cfg, info, st, model = self.cfg, self.info, self.stage, self.model
        f = cfg.finetune
        lines = [
            f"{info.world_size} process(es) on {info.device.type}; data: {loader.backend}; {self.num_classes} "
            f"identities, {loader.n} images",
            f"model dim {cfg.model.dim} depth {cfg.model.depth}, "
            f"{sum(p.numel() for p in model.backbone.parameters()) / 1e6:.2f} M fViT + "
            f"{sum(p.numel() for p in model.landmark_cnn.parameters()) / 1e6:.2f} M landmark CNN; head {f.head} "
            + (
                "(plain linear classifier) "
                if f.head == "softmax"
                else f"(s {f.scale}, m {f.margin}"
                f"{f', reached over {f.margin_warmup_epochs:g} epochs' if f.margin_warmup_epochs else ''}) "
            )
            + f"{'sharded' if st.sharded else 'replicated'}{f', sample rate {f.sample_rate}' if st.sharded else ''}",
            f"{st.augment.describe()}; mixup "
            f"{'off' if st.mixup is None else f'alpha {f.mixup_alpha} p {f.mixup_p}'}; "
            f"landmark regulariser {'on (lambda 1000/100/1/0.11/0 from epochs 0/8/14/21/28)' if st.reg_on else 'off'}; "
            f"layer decay {cfg.optim.layer_decay}",
        ]
        return lines + [f"note: {note}" for note in st.notes]

    def check_faces(self) -> Any:
        from lafs_fast.eval.knn import knn_faces

        return knn_faces(self.opts.get("knn_data"), self.info.device)

    def check(self, faces: Any) -> dict[str, float]:
        return heldout_check(self.model, self.info.device, self.precision, faces)

    def before_fit(self, engine: Any) -> None:
        if self.val_sets and self.info.is_main and not self.opts.get("resume"):
            self.val_before = self.validate(0)  # the starting point (and best.pt until training beats it)
        if self.val_sets and self.cfg.finetune.val_every > 0:
            engine.every(self.cfg.finetune.val_every, self.validate)

    def validate(self, step: int) -> dict[str, float]:
        """The ``--val`` sets' accuracy (%) at ``step`` (rank 0), into metrics.jsonl as ``val/<set>``
        (and ``val/mean`` with several sets)."""
        acc = self.stage.validate(step)
        record = {f"val/{name}": v for name, v in acc.items()}
        if len(acc) > 1:
            record["val/mean"] = round(sum(acc.values()) / len(acc), 3)
        self.engine.log_record(record, step)
        return acc

    def digest(self) -> str:
        return _shared_digest(self.model, self.stage.sharded)

    def summary(self) -> dict[str, Any]:
        st = self.stage
        ran = st.first_loss is not None
        self.first = [float(t) for t in st.first_loss] if ran else [None, None]
        self.last = [float(t) for t in st.last_loss] if ran else [None, None]
        return {
            "loss_first": self.first[0],
            "loss_last": self.last[0],
            "ce_first": self.first[1],
            "ce_last": self.last[1],
        }

    def finish(self, result: Any, summary: dict[str, Any]) -> None:
        first, last, st = self.first, self.last, self.stage
        lines = [
            f"{result.steps} steps in {result.seconds:.1f} s; first -> last batch: loss {first[0]:.3f} -> "
            f"{last[0]:.3f}, margin cross-entropy {first[1]:.3f} -> {last[1]:.3f}"
            if st.first_loss is not None
            else f"nothing to do: already at step {result.steps}",
            f"model file: {Path(self.cfg.train.out_dir) / self.model_file}",
        ]
        for line in lines:
            log.info(f"[{self.prog}] {line}")
        if self.val_sets:
            acc = st.val.last if st.val.last_step == result.steps else self.validate(result.steps)
            summary["verification"] = acc
            summary["verification_before"] = self.val_before
            summary["best"] = {"mean": st.val.best, "step": st.val.best_step}


def train_worker(cfg_dict: dict[str, Any], stage: int, opts: dict[str, Any]) -> dict[str, Any]:
    """One process: data, model (loaded per stage), the supervised stage, the engine; rank 0 writes.
    Returns a summary (steps, digest, loss first/last, checks, verification)."""
    return cli_common.run_job(SupervisedJob, cfg_dict, opts, stage)


def main(argv: list[str] | None = None, stage: int = 2) -> int:
    """``lafs-fast train-landmarks`` (stage 0) / ``lafs-fast finetune`` (stage 2) with ``argv``."""
    from lafs_fast.errors import run_command

    parser = argparse.ArgumentParser(prog=f"lafs-fast {PROG[stage]}", description=__doc__.splitlines()[0])
    add_arguments(parser, stage)
    return run_command(
        f"lafs-fast {PROG[stage]}", parser, lambda args: run(args, stage), sys.argv[1:] if argv is None else argv
    )


class _Command:
    """One of the module's two commands, as ``lafs_fast.cli`` runs a command: ``add_arguments(parser)``
    and ``run(args) -> int``."""

    def __init__(self, stage: int) -> None:
        self.stage = stage

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        add_arguments(parser, self.stage)

    def run(self, args: argparse.Namespace) -> int:
        return run(args, self.stage)


train_landmarks = _Command(0)  # lafs-fast train-landmarks: stage 0, Part fViT from scratch (docs/method.md 2)
finetune = _Command(2)  # lafs-fast finetune: stage 2, LAFS fine-tuning of a Part fViT (docs/method.md 4)


if __name__ == "__main__":  # python -m lafs_fast.train.supervised_run {train-landmarks,finetune} ... (torchrun)
    from lafs_fast.train import supervised_run as _module  # its own name: its logger, its spawned worker

    _stages = {name: s for s, name in _module.PROG.items()}
    if len(sys.argv) < 2 or sys.argv[1] not in _stages:
        sys.exit(f"usage: python -m lafs_fast.train.supervised_run {{{','.join(_stages)}}} [options]")
    sys.exit(_module.main(sys.argv[2:], stage=_stages[sys.argv[1]]))
