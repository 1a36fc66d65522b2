"""`lafs-fast pretrain`: stage 1, LAFS self-supervised pre-training (LAFS_SPEC.md section 3).

With no arguments: the built-in synthetic faces and the ``small`` preset, a few minutes on two CPU
cores, then a k-NN / verification check on held-out synthetic identities, printed before and after
pre-training. With ``--data PATH`` the preset defaults to ``reference``.

Outputs in ``--out`` (rank 0): ``ckpt-<step>.pt`` training checkpoints (resume with ``--resume``;
each also holds the teacher as a model file under ``model_file``), ``metrics.jsonl``, and at the
end ``teacher.pt``, a lafs-fast model file of the teacher backbone + DINO head (the input of
``lafs-fast finetune``; ``lafs-fast checkpoint export`` turns it into the reference's SSL layout).

Processes: ``--gpus N`` starts N processes (torch's elastic launcher; NCCL on GPUs, gloo with
``--device cpu``); under ``torchrun`` it joins the existing group. Global batch = per-process batch
x processes x accumulation; the lr is ``optim.lr * global_batch / 256``.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lafs_fast.config import Config, config_from_dict, config_to_dict
from lafs_fast.dense_landmarks import DetectorLandmarks
from lafs_fast.io import atomic_save, check_writable_dir
from lafs_fast.train.cli_common import add_run_arguments, add_source_arguments, data_source, launch_training, resolve_training_config
from lafs_fast.launch import init_distributed, shutdown

__all__ = ["add_arguments", "run", "resolve_config", "stage_defaults", "train_worker", "knn_check", "knn_faces", "KnnFaces",
           "embed", "param_digest", "detector_landmarks"]

EVAL_SEED = 7_000_001  # held-out synthetic identities: a different seed draws different faces
KNN_MAX_IMAGES = 2000


# --------------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_source_arguments(parser)
    parser.add_argument("--landmarks", help="'grid' (default), a stage-0 / reference Part fViT checkpoint, or 'detector' (the "
                        "face-detector landmarks of `lafs-fast data landmarks REC`, densified to the token count; "
                        "views.detector_file=PATH names another sidecar)")
    parser.add_argument("--views", choices=["lafs", "dino"], help="landmark views (default) or the DINO-face image-grid baseline")
    add_run_arguments(parser)
    parser.add_argument("--knn", dest="knn", action="store_true", default=None, help="k-NN / verification check before and after "
                        "(default: on for synthetic data or with --knn-data)")
    parser.add_argument("--no-knn", dest="knn", action="store_false")
    parser.add_argument("--knn-data", metavar="REC", help="labelled faces for the check: a .rec (labels are read for the check "
                        f"only; up to {KNN_MAX_IMAGES} images, evenly spaced); default: held-out synthetic identities")


_STAGE_FLAGS = (("landmarks", "views.landmarks"), ("views", "views.mode"))


def resolve_config(args: argparse.Namespace) -> Config:
    """Preset (small without --data, else reference) <- stage defaults <- --config <- key=value <- the flags."""
    return resolve_training_config(args, _STAGE_FLAGS, stage_defaults)


def stage_defaults(preset: str) -> dict[str, Any]:
    """Pre-training's own values on top of a preset (below --config and key=value).

    ``small`` (the default run: a few minutes on two CPU cores): batch 16, 6 epochs, peak lr 2e-3 at that batch,
    a faster teacher (EMA 0.9 -> 1: 0.996 barely moves the teacher in ~100 steps), a 256-prototype
    head, and CLS / position tables drawn with std 0.02 instead of the reference's N(0, 1) (in a
    192-wide model N(0, 1) positions swamp the 8 x 8 pixel patches; measured on the held-out check,
    a short run then learns nothing visible). The backbone shape stays the preset's, so
    ``lafs-fast finetune --preset small`` reads the teacher. ``reference`` keeps every spec value.
    """
    if preset != "small":
        return {}
    return {
        "model.token_init_std": 0.02, "dino.out_dim": 256, "dino.hidden_dim": 256, "dino.bottleneck_dim": 64,
        "dino.teacher_momentum": 0.9, "optim.batch_size": 16, "optim.epochs": 6, "optim.lr": 0.032,
    }


def preflight(cfg: Config, resume: str | None) -> None:
    """Every check that needs no work: output folder writable, data and landmark paths readable."""
    from lafs_fast.data.loaders import open_source

    check_writable_dir(cfg.train.out_dir)
    open_source(data_source(cfg))  # FileNotFoundError / ValueError naming the path
    lm = cfg.views.landmarks
    if cfg.views.mode == "lafs" and lm not in ("grid", "detector") and not Path(lm).is_file():
        raise FileNotFoundError(f"landmark checkpoint {lm} does not exist; pass a stage-0 / Part fViT checkpoint or --landmarks grid")
    if cfg.views.mode == "lafs" and lm == "detector":
        if cfg.data.loader == "dali-mxnet":
            raise ValueError("--landmarks detector needs each image's record, which DALI's mxnet reader does not say; use data.loader=dali (or auto)")
        detector_landmarks(cfg)  # the sidecar exists, matches the rec and has faces
    if resume not in (None, "auto") and not Path(resume).is_file():
        raise FileNotFoundError(f"checkpoint {resume} does not exist; pass a ckpt-*.pt of a previous run, or --resume alone for the latest in --out")
    if cfg.train.gpus > 1 and cfg.train.device == "cuda" and torch.cuda.device_count() < cfg.train.gpus:
        raise ValueError(f"--gpus {cfg.train.gpus} but only {torch.cuda.device_count()} GPU(s) are visible")


def detector_landmarks(cfg: Config) -> DetectorLandmarks | None:
    """The per-record landmark table of ``--landmarks detector`` (None otherwise)."""
    if cfg.views.mode != "lafs" or cfg.views.landmarks != "detector":
        return None
    return DetectorLandmarks.for_source(data_source(cfg), cfg.views.detector_file or None, image_size=cfg.model.image_size,
                                        patch_size=cfg.model.patch_size, smoothing=cfg.views.detector_smoothing)


def run(args: argparse.Namespace) -> int:
    cfg = resolve_config(args)
    preflight(cfg, args.resume)
    knn = args.knn if args.knn is not None else bool(args.knn_data) or not cfg.data.path or cfg.data.path.startswith("synthetic")
    if args.knn_data and knn:
        from lafs_fast.data.loaders import open_source

        if open_source(args.knn_data)[0] != "rec":
            raise ValueError(f"--knn-data {args.knn_data} is not a .rec; pack labelled faces with `lafs-fast data build`")
    opts = {"resume": args.resume, "knn": knn, "knn_data": args.knn_data, "progress": not args.no_progress}
    return launch_training("pretrain", train_worker, (config_to_dict(cfg), opts), cfg)


# --------------------------------------------------------------------------------------------------
# the worker (one per process)


def param_digest(module: torch.nn.Module) -> str:
    """sha256 of every parameter's bytes, in order (equal across ranks after DDP steps)."""
    h = hashlib.sha256()
    for p in module.parameters():
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def train_worker(cfg_dict: dict[str, Any], opts: dict[str, Any]) -> dict[str, Any]:
    """One process of the job: data, views, DINO, the engine; rank 0 writes. Returns a summary
    (steps, parameter digest, k-NN figures on rank 0)."""
    from lafs_fast.data import make_loader
    from lafs_fast.train.dino import DinoStage
    from lafs_fast.train.engine import Engine, barrier

    cfg = config_from_dict(cfg_dict)
    info = init_distributed(cfg.train.device)
    try:
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        detector = detector_landmarks(cfg)
        loader = make_loader(data_source(cfg), cfg.optim.batch_size, rank=info.rank, world_size=info.world_size, shuffle=True,
                             seed=cfg.train.seed, device=info.device, drop_last=True, backend=cfg.data.loader,
                             num_workers=cfg.data.workers, color_order=cfg.data.color_order.upper(),
                             with_positions=detector is not None, max_bad_fraction=cfg.data.max_bad_fraction)
        stage = DinoStage(cfg, info.device, detector=detector)
        torch.manual_seed(cfg.train.seed + 1_000 * info.rank)  # dropout / drop-path streams differ per rank
        out = Path(cfg.train.out_dir)
        say = print if info.is_main else (lambda *a, **k: None)
        say(f"[pretrain] {info.world_size} process(es) on {info.device.type}; data: {loader.backend}")
        say(f"[pretrain] views: {cfg.views.mode}, landmarks: {cfg.views.landmarks if cfg.views.mode == 'lafs' else 'none (image grid)'}; "
            f"model dim {cfg.model.dim} depth {cfg.model.depth}, {sum(p.numel() for p in stage.model.backbone.parameters()) / 1e6:.2f} M backbone params")
        if detector is not None and info.is_main:
            q = detector.quality()
            say(f"[pretrain] {detector.describe()}; on {q['faces']} faces the densification fits the detected points to "
                f"{q['fit_px']:.1f} px (affine {q['affine_fit_px']:.1f} px), smallest grid step {q['min_step_px']:.1f} px"
                + (" - THE GRID FOLDS: raise views.detector_smoothing" if q["min_step_px"] <= 0 else ""))
        before = faces = None
        if opts.get("knn") and info.is_main:
            faces = knn_faces(opts.get("knn_data"), info.device, train_data=data_source(cfg), detector=detector is not None)
        if faces is not None and not opts.get("resume"):
            before = knn_check(stage.teacher.backbone, stage.views, info.device, faces)
            say(f"[pretrain] {faces.title} before: {format_check(before, faces)}")
        barrier(info)
        engine = Engine(cfg, stage, loader, info, out, resume=opts.get("resume"), progress=opts.get("progress", True))
        say(f"[pretrain] {engine.plan.total_steps} steps ({engine.plan.epochs} epochs x {engine.plan.steps_per_epoch}), global batch "
            f"{engine.plan.global_batch}, peak lr {engine.schedules['lr'].max():.2e}, precision {engine.precision}, compile {cfg.train.compile}")
        result = engine.fit()
        summary: dict[str, Any] = {"rank": info.rank, "steps": result.steps, "digest": param_digest(stage.model),
                                   "seconds": result.seconds, "last_checkpoint": str(result.last_checkpoint)}
        if info.is_main:
            atomic_save(stage.export(), out / "teacher.pt")
            say(f"[pretrain] {result.steps} steps in {result.seconds:.1f} s; teacher model file: {out / 'teacher.pt'}")
            if faces is not None:
                after = knn_check(stage.teacher.backbone, stage.views, info.device, faces)
                if before is not None:
                    say(f"[pretrain] {faces.title} before: {format_check(before, faces)}")
                say(f"[pretrain] {faces.title} after:  {format_check(after, faces)}")
                summary.update(knn_before=before, knn_after=after)
        barrier(info)
        return summary
    finally:
        shutdown()


# --------------------------------------------------------------------------------------------------
# held-out check


@dataclass
class KnnFaces:
    """Labelled faces for the check: images (N, H, W, 3) uint8 and labels (N,) int64 on the device;
    positions (N,) int64 record positions when the views may look up the records' own landmarks
    (``--landmarks detector`` on the training rec), else None; what they are, for the log."""

    images: torch.Tensor
    labels: torch.Tensor
    positions: torch.Tensor | None
    what: str
    title: str = "k-NN check"  # "held-out check" when no face was trained on


def knn_faces(data: str | None, device: torch.device, *, train_data: str | None = None, detector: bool = False,
              max_images: int = KNN_MAX_IMAGES, identities: int = 40, per_identity: int = 5) -> KnnFaces:
    """The check's faces: ``data`` a .rec (up to ``max_images`` records, evenly spaced, decoded like
    the loaders), or None: ``identities x per_identity`` synthetic faces never seen in training."""
    if data is None:
        from lafs_fast.data import SyntheticFaces

        ds = SyntheticFaces(identities, per_identity, seed=EVAL_SEED)
        images, labels = ds.batch(range(len(ds)), device)
        return KnnFaces(images, labels, None, "held-out synthetic identities", "held-out check")
    from lafs_fast.data.loaders import RecSource, decode_pil

    src = RecSource(data)
    picks = np.unique(np.linspace(0, len(src) - 1, min(max_images, len(src))).round().astype(np.int64))
    bgr = src.color_order() == "BGR"
    ims, labels = [], []
    for i in picks:  # a corrupt record here is the data's problem: `lafs-fast data verify` names it
        data_bytes, label = src.item(int(i))
        ims.append(decode_pil(data_bytes, 112, bgr))
        labels.append(label)
    # the records' own landmarks only where the views' table is this rec's (detector mode trains on a rec)
    same = detector and train_data is not None and RecSource(train_data).path.resolve() == src.path.resolve()
    positions = torch.as_tensor(picks) if same else None
    what = f"{len(picks)} faces of {src.path.name}, {len(set(labels))} identities"
    if detector and not same:
        what += "; the mean face's landmarks (not the training rec)"
    return KnnFaces(torch.from_numpy(np.stack(ims)).to(device), torch.tensor(labels, dtype=torch.int64, device=device), positions, what)


@torch.no_grad()
def embed(backbone: torch.nn.Module, views: Any, images: torch.Tensor, batch: int = 64,
          positions: torch.Tensor | None = None, precision: str | None = None) -> torch.Tensor:
    """L2-normalised embeddings (N, dim) fp32 of faces (N, H, W, 3) uint8 (+ their flips, summed);
    ``positions`` (N,): record positions for ``views.eval_tokens`` (detector landmarks).

    ``precision``: "bf16" runs the backbone under bf16 autocast, as in training (what the views'
    bf16 tokens need: the backbone's weights stay fp32); "fp32" without; None: bf16 when the views
    make bf16 tokens (``views.out_dtype``), else fp32. The embeddings are fp32 either way."""
    if precision is None:
        precision = "bf16" if getattr(views, "out_dtype", torch.float32) == torch.bfloat16 else "fp32"
    was = backbone.training
    backbone.eval()
    out = []
    try:
        for i in range(0, images.shape[0], batch):
            x = images[i:i + batch]
            kw = {} if positions is None else {"positions": positions[i:i + batch]}
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                e = backbone(views.eval_tokens(x, **kw)).float() + backbone(views.eval_tokens(x, flip=True, **kw)).float()
            out.append(F.normalize(e, dim=-1))
    finally:
        backbone.train(was)
    return torch.cat(out)


def knn_check(backbone: torch.nn.Module, views: Any, device: torch.device, faces: KnnFaces | None = None,
              precision: str | None = None) -> dict[str, float]:
    """Leave-one-out 1-NN identification accuracy (cosine) and verification accuracy on balanced pairs
    (every genuine pair, as many impostor pairs drawn at random, best threshold), both in %, on
    ``faces`` (default: held-out synthetic identities, :func:`knn_faces`); ``precision`` as in :func:`embed`."""
    faces = faces or knn_faces(None, device)
    labels = faces.labels
    emb = embed(backbone, views, faces.images, positions=faces.positions, precision=precision)
    n = len(labels)
    sim = emb @ emb.T
    sim.fill_diagonal_(-math.inf)
    nn_idx = sim.argmax(dim=1)
    top1 = (labels[nn_idx] == labels).float().mean().item() * 100
    sim.fill_diagonal_(1.0)
    same = labels[:, None] == labels[None, :]
    iu = torch.triu_indices(n, n, offset=1, device=device)
    s, y = sim[iu[0], iu[1]].cpu().numpy(), same[iu[0], iu[1]].cpu().numpy()
    rng = np.random.default_rng(EVAL_SEED)
    n_pos = int(y.sum())
    neg = rng.choice(np.flatnonzero(~y), size=min(n_pos, int((~y).sum())), replace=False)
    s, y = np.concatenate((s[y], s[neg])), np.concatenate((np.ones(n_pos, bool), np.zeros(len(neg), bool)))
    order = np.argsort(-s)
    # accuracy at every threshold between consecutive sorted scores: TP so far + TN remaining
    tp = np.concatenate(([0], np.cumsum(y[order])))
    fp = np.concatenate(([0], np.cumsum(~y[order])))
    acc = (tp + (len(neg) - fp)) / len(y)
    return {"knn_top1": round(top1, 2), "verification": round(float(acc.max()) * 100, 2)}


def format_check(r: dict[str, float], faces: KnnFaces | None = None) -> str:
    what = faces.what if faces is not None else "held-out synthetic identities"
    return f"1-NN top-1 {r['knn_top1']:.1f}%, verification {r['verification']:.1f}% ({what})"


def main(argv: list[str] | None = None) -> int:
    """``python -m lafs_fast.train.pretrain ...`` (what ``torchrun`` runs): ``lafs-fast pretrain``."""
    from lafs_fast.cli import USER_ERRORS

    parser = argparse.ArgumentParser(prog="lafs-fast pretrain", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return int(run(args) or 0)
    except USER_ERRORS as exc:
        print(f"lafs-fast pretrain: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
