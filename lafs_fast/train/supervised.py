"""Stages 0 and 2 (docs/method.md sections 2 and 4): supervised Part fViT training with a margin head.

Three files: this one (the stage and the landmark regulariser's schedule), ``supervised_augment.py``
(FaceAugment, erasing, Mixup), ``supervised_model.py`` (building the model and its weights, the
optimiser groups).

One stage serves both; they differ only in what is loaded and what is regularised:

- stage 0 (``lafs-fast train-landmarks``): landmark CNN -> patch sampler (coordinate gradient) ->
  fViT -> CosFace / ArcFace, all from scratch; no landmark regulariser (there is no reference yet).
- stage 2 (``lafs-fast finetune``): the fViT from a stage-1 teacher (``lafs-fast pretrain``'s
  ``teacher.pt`` / a ``ckpt-*.pt`` / the reference's SSL checkpoint), the landmark CNN from stage 0
  (our ``part_fvit.pt`` or the reference's Part fViT checkpoint), both trainable; a frozen copy of
  that landmark CNN (eval mode) predicts reference points on the same batch and the loss gains
  ``lambda(epoch) * MSE(theta_ref / 111, theta / 111)`` with lambda = 1000 (epochs 0-7), 100 (8-13),
  1 (14-20), 0.11 (21-27), 0 after (:data:`LANDMARK_LAMBDA`). The reference's first release had it
  on, its latest has it off: here on by default, ``finetune.landmark_reg=false`` switches it off.

Optimiser (the engine's AdamW): weight decay ``optim.weight_decay`` (0.1) on the fViT and head
weights, ``optim.landmark_weight_decay`` (0.05) on the landmark-CNN weights, 0 on biases and 1-D
parameters; optional layer-wise lr decay ``optim.layer_decay`` (the reference computes 0.58 but
never applies it: default 1.0 = off): fViT layer l of depth D (embeddings l = 0, block i l = i + 1)
gets ``lr * decay ** (D + 1 - l)``; the final norm, the margin head and the landmark CNN keep the
full lr.

Augmentation (per source face, in this order): RandomResizedCrop(112, scale (0.9, 1)), horizontal
flip, ColorJitter(0.1, 0.1, 0.1, 0.1), face RandAugment (timm's increasing-severity ops without
Solarize / SolarizeAdd,
2 ops each with p 0.5, magnitude ~ N(m, 0.5)), normalise to [-1, 1], RandomErasing (p 0.5, area
0.02-0.1, value 0); then Mixup (timm, alpha 0.2, per-batch probability ``finetune.mixup_p``, no
cutmix, no label smoothing) with soft-target cross-entropy through the margin head (the target's
margin is scaled by its soft weight, the reference's behaviour).
``finetune.augment``: ``cpu`` runs the recipe above per sample with PIL / timm (the reference
semantics); ``gpu`` renders crop / flip / jitter with the view kernel (``lafs_fast.augment``), then
RandAugment vectorised over the batch (``lafs_fast.train.randaugment``, timm's op arguments, float
between ops) and erasing on the device; ``auto`` = ``gpu`` on CUDA, ``cpu`` otherwise; ``none``
only normalises. Every draw is keyed by the engine's per-step seed, so a resumed run sees
the same augmentations.

Margin head: ``finetune.margin_warmup_epochs`` > 0 raises the margin linearly from 0 (an option; the
reference keeps it constant), set on the head before each step. Metrics: ``train_acc`` is the plain
nearest-centre accuracy of the batch, ``margin_acc`` the margin logits' (0 while the embeddings crowd
together, whatever the model learns: docs/finetuning.md). Replicated (``PartFViT.head``) or, with
``finetune.shard_classes``, the Partial-FC style :class:`~lafs_fast.models.sharded_head.ShardedMarginHead`
(``finetune.sample_rate`` negative sampling; integer labels only, so Mixup is switched off with it,
said in the log).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from lafs_fast.config import Config
from lafs_fast.io import atomic_save
from lafs_fast.models import LandmarkCNN, PartFViT
from lafs_fast.models.checkpoints import model_file
from lafs_fast.models.landmark_cnn import fold_batchnorm
from lafs_fast.models.sharded_head import ShardedMarginHead
from lafs_fast.train.engine import Plan, Stage, StepContext, cosine_schedule
from lafs_fast.train.supervised_augment import FaceAugment, apply_mixup, build_mixup
from lafs_fast.train.supervised_model import supervised_param_groups

__all__ = [
    "LANDMARK_LAMBDA",
    "landmark_lambda",
    "landmark_lambda_schedule",
    "SupervisedStage",
]

log = logging.getLogger(__name__)

# (first epoch, lambda): the regulariser's weight from that epoch on (spec section 4)
LANDMARK_LAMBDA: tuple[tuple[int, float], ...] = ((0, 1000.0), (8, 100.0), (14, 1.0), (21, 0.11), (28, 0.0))


def landmark_lambda(epoch: int) -> float:
    """lambda(epoch) of the landmark regulariser: 1000 (0-7), 100 (8-13), 1 (14-20), 0.11 (21-27), 0."""
    value = 0.0
    for start, lam in LANDMARK_LAMBDA:
        if epoch >= start:
            value = lam
    return value


def landmark_lambda_schedule(plan: Plan, enabled: bool = True) -> np.ndarray:
    """Per-step lambda (total_steps,) float64, constant within an epoch (zeros when disabled)."""
    per_epoch = np.array([landmark_lambda(e) if enabled else 0.0 for e in range(plan.epochs)], dtype=np.float64)
    return np.repeat(per_epoch, plan.steps_per_epoch)


# --------------------------------------------------------------------------------------------------
# the stage


@dataclass
class ValState:
    best: float = -1.0
    best_step: int = -1
    last: dict[str, float] | None = None
    last_step: int = -1


class SupervisedStage(Stage):
    """Stages 0 and 2 as an engine stage. ``model`` is the PartFViT (landmark CNN, fViT, margin head).

    batch: (images (B, H, W, 3) uint8, labels (B,) int64) on the device.
    forward_loss: augmentation -> Mixup -> landmark CNN -> sampler -> fViT -> margin head -> soft CE
    (+ lambda * landmark MSE in stage 2) -> (loss (), {"ce", "landmark_mse", "train_acc", "margin_acc"}).
    """

    def __init__(
        self,
        cfg: Config,
        model: PartFViT,
        num_classes: int,
        stage: int,
        device: torch.device,
        ref_landmarks: LandmarkCNN | None = None,
        augment: str | None = None,
        out_dir: str | Path | None = None,
        val_sets: list[str] | None = None,
        is_main: bool = True,
    ) -> None:
        if stage not in (0, 2):
            raise ValueError(f"the supervised stage is 0 or 2, not {stage}")
        self.cfg, self.stage_no, self.num_classes, self.device = cfg, stage, num_classes, device
        self.name = "train-landmarks" if stage == 0 else "finetune"
        self.model = model.to(device)
        self.sharded = isinstance(model.head, ShardedMarginHead)
        if self.sharded:
            # each rank holds its own slice of the centres: DDP must neither broadcast nor average them
            names = [f"head.{n}" for n, _ in model.head.named_parameters()]
            nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self.model, names)
        self.ref = ref_landmarks.to(device).eval() if ref_landmarks is not None else None
        self.reg_on = stage == 2 and cfg.finetune.landmark_reg and self.ref is not None
        if device.type == "cuda" and isinstance(model.landmark_cnn, LandmarkCNN):
            model.landmark_cnn.to_channels_last()  # NHWC: cuDNN's fast layout for depthwise / 1x1 convolutions
        self._ref_fast = self._fold_ref()
        mode = augment or cfg.finetune.augment
        if mode == "auto":  # per-sample PIL would starve a GPU; the CPU keeps the reference semantics
            mode = "gpu" if device.type == "cuda" else "cpu"
        self.augment = FaceAugment(cfg, mode)
        self.mixup = build_mixup(cfg, num_classes)
        self.notes: list[str] = []
        if self.mixup is not None and self.sharded:
            self.mixup = None
            self.notes.append("Mixup off: the sharded margin head takes integer labels only")
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.val_sets = list(val_sets or [])
        self.is_main = is_main
        self.val = ValState()
        self.first_loss: tuple[torch.Tensor, torch.Tensor] | None = None
        self.last_loss: tuple[torch.Tensor, torch.Tensor] | None = None

    # -- schedules and optimiser

    def schedules(self, plan: Plan) -> dict[str, np.ndarray]:
        f = self.cfg.finetune
        # margin warm-up: 0 -> m linearly over margin_warmup_epochs, then m (constant m when 0)
        margin = cosine_schedule(f.margin, f.margin, plan.epochs, plan.steps_per_epoch, f.margin_warmup_epochs)
        return {"landmark_lambda": landmark_lambda_schedule(plan, self.reg_on), "margin": margin}

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        return supervised_param_groups(model, self.cfg)

    # -- one micro-batch

    def forward_loss(self, model: nn.Module, batch: Any, ctx: StepContext) -> tuple[torch.Tensor, dict[str, float]]:
        images, labels = batch[0], batch[1].to(self.device)
        if "margin" in ctx.values:  # a host float: the head is eager, so no recompile and no sync
            self.model.head.set_margin(ctx.values["margin"])
        x = self.augment(images, ctx.seed)
        targets: torch.Tensor = labels
        if self.mixup is not None:
            x, targets = apply_mixup(self.mixup, x, labels, ctx.seed)
        metrics: dict[str, float] = {}
        if self.sharded:
            ce, coords = model(x, targets)  # the sharded head returns the global mean cross-entropy
        else:
            out, coords, cos = model(x, targets, return_cosine=True)
            logits = out.float()
            if targets.dim() == 2:
                ce = torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()  # timm SoftTargetCrossEntropy
                hard = targets.argmax(dim=1)
            else:
                ce = F.cross_entropy(logits, targets)
                hard = targets
            # train_acc: the nearest class centre (plain cosine) is the label's; margin_acc: it wins even
            # by the margin (the logits' argmax), which stays 0 while the embeddings crowd together
            metrics["train_acc"] = (cos.argmax(dim=1) == hard).float().mean()
            metrics["margin_acc"] = (logits.detach().argmax(dim=1) == hard).float().mean()
        loss = ce
        lam = ctx.values.get("landmark_lambda", 0.0)
        if self.reg_on and lam > 0:
            with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
                # fp32: the min-max of 392 numbers loses pixels in bf16. The frozen copy's BatchNorms folded
                ref = self._ref_fast(x.float()).float()
            extent = float(self.cfg.model.image_size - 1)
            mse = F.mse_loss(coords.float() / extent, ref / extent)
            loss = loss + lam * mse
            metrics["landmark_mse"] = mse.detach()
        metrics["ce"] = ce.detach()
        # first / last micro-batch losses of this process (the summary's "loss a -> b"; no host sync here)
        if self.first_loss is None:
            self.first_loss = (loss.detach(), ce.detach())
        self.last_loss = (loss.detach(), ce.detach())
        return loss, metrics

    # the log line's health keys: the nearest class centre is the label's, and it wins by the margin
    progress_keys = ("train_acc", "margin_acc")

    # -- verification during training

    def validate(self, step: int) -> dict[str, float]:
        """Verification accuracy (%) on every ``.bin`` set with the current weights (rank 0); keeps
        ``best.pt`` (model file) + ``best.json`` in ``out_dir`` when the mean accuracy improves."""
        from lafs_fast.eval.embedder import Embedder
        from lafs_fast.eval.verification import evaluate_bin

        was = self.model.training
        head = self.model.head
        try:
            self.model.head = None  # the embedder needs the PartFViT without its head
            self.model.eval()
            emb = Embedder(self.model, self.device, batch_size=64)
            results = {Path(p).stem: evaluate_bin(emb, p, progress=False, workers=2) for p in self.val_sets}
        finally:
            self.model.head = head
            self.model.train(was)
        acc = {k: round(r.accuracy * 100, 3) for k, r in results.items()}
        mean = float(np.mean(list(acc.values())))
        self.val.last, self.val.last_step = acc, step
        improved = mean > self.val.best
        if improved:
            self.val.best, self.val.best_step = mean, step
            if self.out_dir is not None:
                self.out_dir.mkdir(parents=True, exist_ok=True)
                atomic_save(self.export(), self.out_dir / "best.pt")
                (self.out_dir / "best.json").write_text(
                    json.dumps({"step": step, "mean_accuracy": mean, "accuracy": acc}, indent=1) + "\n"
                )
        log.info(
            f"[{self.name}] step {step}: verification "
            + ", ".join(f"{k} {v:.2f}%" for k, v in acc.items())
            + (
                " (best so far, best.pt written)"
                if improved and self.out_dir is not None
                else f" (best {self.val.best:.2f}% at step {self.val.best_step})"
            )
        )
        return acc

    # -- state

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"val": {"best": self.val.best, "best_step": self.val.best_step}}
        if self.ref is not None:
            state["ref_landmarks"] = {k: v.detach().cpu() for k, v in self.ref.state_dict().items()}
        return state

    def _fold_ref(self) -> nn.Module | None:
        """The frozen reference CNN as it runs: BatchNorms folded into the convolutions
        (:func:`~lafs_fast.models.landmark_cnn.fold_batchnorm`; eval mode, so the same function up to
        rounding), NHWC on CUDA. ``self.ref`` (unfolded) is what checkpoints hold."""
        if self.ref is None:
            return None
        fast = fold_batchnorm(self.ref)
        if self.device.type == "cuda" and isinstance(fast, LandmarkCNN):
            fast.to_channels_last()
        return fast

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.ref is not None and "ref_landmarks" in state:
            self.ref.load_state_dict(state["ref_landmarks"])
            self._ref_fast = self._fold_ref()
        v = state.get("val", {})
        self.val.best, self.val.best_step = float(v.get("best", -1.0)), int(v.get("best_step", -1))

    def compile_targets(self) -> list[nn.Module]:
        """The fViT (regional: per block) and the landmark CNNs' trunks (trainable and frozen copy)."""
        targets: list[nn.Module] = [self.model.backbone, self.model.landmark_cnn]
        return targets + ([self._ref_fast] if self._ref_fast is not None else [])

    def sharded_parameters(self) -> dict[str, tuple[nn.Parameter, int, int]]:
        """The sharded head's class centres: this rank's rows [start, end) (see Stage.sharded_parameters)."""
        if not self.sharded:
            return {}
        head = self.model.head
        name = next(n for n, p in self.model.named_parameters() if p is head.weight)
        return {name: (head.weight, head.start, head.end)}

    def export(self) -> dict[str, Any]:
        """The Part fViT as a lafs-fast model file (landmark CNN + fViT (+ the replicated margin
        head)): the input of ``pretrain --landmarks``, ``finetune --landmarks`` / ``--init``, ``eval``."""
        head = None if self.sharded else self.model.head
        return model_file(
            self.cfg.model,
            self.model.backbone,
            landmark_cnn=self.model.landmark_cnn,
            margin_head=head,
            source=f"lafs-fast {self.name}",
        )
