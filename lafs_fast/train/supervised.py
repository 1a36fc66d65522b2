"""Stages 0 and 2 (LAFS_SPEC.md sections 2 and 4): supervised Part fViT training with a margin head.

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

Margin head: replicated (``PartFViT.head``) or, with ``finetune.shard_classes``, the Partial-FC
style :class:`~lafs_fast.models.sharded_head.ShardedMarginHead` (``finetune.sample_rate`` negative
sampling; integer labels only, so Mixup is switched off with it, said in the log).
"""

from __future__ import annotations

import copy
import json
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from lafs_fast.config import Config, ModelConfig
from lafs_fast.io import atomic_save, safe_load
from lafs_fast.models import LandmarkCNN, PartFViT, build_backbone, build_landmark_cnn, build_margin_head
from lafs_fast.models.checkpoints import detect_format, infer_model_config, load_into, model_file, split_reference
from lafs_fast.kernels.patch_sampling import normalise_images
from lafs_fast.models.sharded_head import ShardedMarginHead
from lafs_fast.train.engine import CHECKPOINT_FORMAT, Plan, Stage, StepContext

__all__ = [
    "LANDMARK_LAMBDA", "landmark_lambda", "landmark_lambda_schedule", "SupervisedStage", "FaceAugment",
    "build_mixup", "layer_id", "supervised_param_groups", "read_weights", "build_supervised_model",
    "ARCH_FIELDS",
]

# (first epoch, lambda): the regulariser's weight from that epoch on (spec section 4)
LANDMARK_LAMBDA: tuple[tuple[int, float], ...] = ((0, 1000.0), (8, 100.0), (14, 1.0), (21, 0.11), (28, 0.0))

# ModelConfig fields that fix the architecture (taken from a loaded backbone, not from the preset)
ARCH_FIELDS = ("dim", "depth", "heads", "head_dim", "mlp_dim", "num_patches", "patch_size", "attn_scale", "image_size")


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
# augmentation


def _randaug_ops(cfg: Config) -> list:
    """timm's RandAugment ops without the Solarize ops (the face recipe): the increasing-severity
    variants (timm's ``inc1``), so that the small face magnitudes (m = 1 or 2) are mild changes
    (the original Posterize / Color / Contrast / Brightness / Sharpness are strongest at m = 0)."""
    from lafs_fast import _torchvision_fix  # noqa: F401 - timm imports torchvision
    from timm.data.auto_augment import _RAND_INCREASING_TRANSFORMS, rand_augment_ops

    f = cfg.finetune
    names = [n for n in _RAND_INCREASING_TRANSFORMS if "Solarize" not in n]
    hparams = {"magnitude_std": f.randaug_std, "img_mean": (128, 128, 128)}
    return rand_augment_ops(magnitude=f.randaug_magnitude, prob=f.randaug_p, hparams=hparams, transforms=names)


class FaceAugment:
    """The stage-2 augmentation of a batch of source faces.

    ``__call__(images (B, H, W, 3) uint8, seed) -> (B, 3, S, S) float32 in [-1, 1]`` on the images'
    device. ``mode``: "cpu" (PIL / timm per sample, the full recipe), "gpu" (view kernel + device
    erasing, no RandAugment), "none" (resize-free normalisation only). Reproducible from ``seed``
    without touching the global RNG streams.
    """

    def __init__(self, cfg: Config, mode: str = "cpu") -> None:
        if mode not in ("cpu", "gpu", "none"):
            raise ValueError(f"unknown augmentation mode {mode!r}; choose cpu, gpu or none")
        f = cfg.finetune
        for key in ("randaug_p", "erase_p", "crop_scale_min"):
            if not 0.0 <= getattr(f, key) <= 1.0:
                raise ValueError(f"config key 'finetune.{key}' must lie in [0, 1], got {getattr(f, key)}")
        self.cfg, self.mode, self.size = cfg, mode, cfg.model.image_size
        self._cpu = None
        if mode == "cpu":
            self._cpu = self._build_cpu()

    def describe(self) -> str:
        f = self.cfg.finetune
        if self.mode == "none":
            return "augmentation: none (normalise only)"
        common = f"RandomResizedCrop({self.size}, scale ({f.crop_scale_min}, 1)), flip, ColorJitter {f.jitter}"
        erase = f"RandomErasing p {f.erase_p}"
        ra = f"RandAugment {f.randaug_ops} ops p {f.randaug_p} m ~ N({f.randaug_magnitude}, {f.randaug_std}) without Solarize"
        if self.mode == "gpu":
            return f"augmentation (on the device: view kernel + vectorised RandAugment): {common}, {ra}, {erase}"
        return f"augmentation (cpu, PIL/timm per sample): {common}, {ra}, {erase}"

    def _build_cpu(self):
        from lafs_fast import _torchvision_fix  # noqa: F401
        from timm.data.auto_augment import RandAugment
        from timm.data.random_erasing import RandomErasing
        from torchvision import transforms as T

        f = self.cfg.finetune
        j = f.jitter
        pil = T.Compose([
            T.RandomResizedCrop(self.size, scale=(f.crop_scale_min, 1.0)),
            T.RandomHorizontalFlip(),
            T.ColorJitter(j, j, j, j),
            RandAugment(_randaug_ops(self.cfg), num_layers=f.randaug_ops),
            T.ToTensor(),
            T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # x/255*2-1
        ])
        erase = RandomErasing(f.erase_p, min_area=0.02, max_area=0.1, mode="const", device="cpu")
        return pil, erase

    def __call__(self, images: torch.Tensor, seed: int) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != 3:
            raise ValueError(f"faces must be uint8 (B, H, W, 3), got {tuple(images.shape)} {images.dtype}")
        if self.mode == "none":
            x = normalise_images(images)
            if x.shape[-1] != self.size:
                x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
            return x.contiguous()
        if self.mode == "gpu":
            return self._gpu(images, seed)
        return self._cpu_batch(images, seed)

    def _cpu_batch(self, images: torch.Tensor, seed: int) -> torch.Tensor:
        from PIL import Image

        pil, erase = self._cpu
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            # torchvision draws from torch's global RNG, timm from `random` (ops, magnitudes, erasing)
            # and numpy (RandAugment's op choice): all keyed by the step seed, then restored
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                random.seed(seed)
                np.random.seed(seed % 2**32)
                arr = images.cpu().numpy()
                out = torch.stack([erase(pil(Image.fromarray(a))) for a in arr])
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
        return out.to(images.device, non_blocking=True)

    def _gpu(self, images: torch.Tensor, seed: int) -> torch.Tensor:
        from lafs_fast.augment import augment_views
        from lafs_fast.kernels.views import ViewSpec

        f = self.cfg.finetune
        spec = ViewSpec(scale=(f.crop_scale_min, 1.0), flip_p=0.5, jitter_p=1.0, brightness=f.jitter, contrast=f.jitter,
                        saturation=f.jitter, hue=f.jitter, gray_p=0.0, blur_p=0.0, solarize_p=0.0)
        from lafs_fast.train.randaugment import rand_augment

        gen = torch.Generator(device=images.device).manual_seed(int(seed))
        x = augment_views(images, [spec], generator=gen, out_size=self.size, interpolation="bilinear").augmented[:, 0]
        if f.randaug_ops > 0 and f.randaug_p > 0:
            x255 = rand_augment((x.float() + 1) * 127.5, gen, f.randaug_magnitude, f.randaug_std, f.randaug_ops, f.randaug_p)
            x = x255 / 127.5 - 1
        return random_erase(x, f.erase_p, gen)


def random_erase(x: torch.Tensor, p: float, gen: torch.Generator, area: tuple[float, float] = (0.02, 0.1),
                 log_ratio: tuple[float, float] = (math.log(0.3), math.log(1 / 0.3))) -> torch.Tensor:
    """Vectorised RandomErasing (timm's ``const`` mode: the box is set to 0) on (B, C, H, W): with
    probability ``p`` per image one box of area fraction U(area) and log-aspect U(log_ratio); a
    box that does not fit is dropped (timm retries 10 times; one try here)."""
    b, _, h, w = x.shape
    dev = x.device
    u = torch.rand((b, 5), generator=gen, device=dev)
    target = (area[0] + (area[1] - area[0]) * u[:, 0]) * h * w
    ratio = torch.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[:, 1])
    eh = torch.sqrt(target * ratio).round()
    ew = torch.sqrt(target / ratio).round()
    ok = (u[:, 2] < p) & (eh < h) & (ew < w) & (eh > 0) & (ew > 0)
    top = ((h - eh + 1) * u[:, 3]).floor()
    left = ((w - ew + 1) * u[:, 4]).floor()
    ys = torch.arange(h, device=dev)[None, :, None]
    xs = torch.arange(w, device=dev)[None, None, :]
    box = (ys >= top[:, None, None]) & (ys < (top + eh)[:, None, None]) & (xs >= left[:, None, None]) & (xs < (left + ew)[:, None, None])
    return x.masked_fill((box & ok[:, None, None])[:, None], 0.0)


def build_mixup(cfg: Config, num_classes: int):
    """timm's Mixup (alpha ``finetune.mixup_alpha``, per-batch probability ``finetune.mixup_p``, no
    cutmix, no label smoothing) or None when off."""
    f = cfg.finetune
    if f.mixup_alpha <= 0 or f.mixup_p <= 0:
        return None
    from lafs_fast import _torchvision_fix  # noqa: F401
    from timm.data import Mixup

    return Mixup(mixup_alpha=f.mixup_alpha, cutmix_alpha=0.0, prob=f.mixup_p, mode="batch", label_smoothing=0.0,
                 num_classes=num_classes)


def apply_mixup(mixup, x: torch.Tensor, labels: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mixed images, soft targets (B, C) fp32 summing to one); timm draws from numpy's global RNG,
    keyed here by ``seed`` and restored afterwards. timm pairs the batch with its reverse and needs
    an even batch: an odd one (e.g. a corrupt image skipped by the loader) passes unmixed."""
    if x.shape[0] % 2:
        return x, F.one_hot(labels.long(), mixup.num_classes).float()
    state = np.random.get_state()
    try:
        np.random.seed(seed % 2**32)
        x, targets = mixup(x.clone(), labels)  # timm mixes in place
    finally:
        np.random.set_state(state)
    return x, targets.float()


# --------------------------------------------------------------------------------------------------
# optimiser groups


def layer_id(name: str, depth: int) -> int:
    """fViT parameter name (PartFViT naming) -> layer: embeddings 0, block i -> i + 1, the rest depth + 1."""
    if name.startswith("backbone."):
        rest = name[len("backbone."):]
        if rest.startswith(("cls_token", "pos_embedding", "patch_to_embedding")):
            return 0
        m = re.match(r"transformer\.layers\.(\d+)\.", rest)
        if m:
            return int(m.group(1)) + 1
    return depth + 1


def supervised_param_groups(model: nn.Module, cfg: Config) -> list[dict[str, Any]]:
    """AdamW groups: (landmark CNN | rest) x (decay | no decay) x layer; ``wd_mult`` is relative to
    ``optim.weight_decay`` (the engine's schedule), ``lr_mult`` the layer decay factor."""
    o = cfg.optim
    depth = cfg.model.depth
    base_wd = o.weight_decay
    lm_mult = (o.landmark_weight_decay / base_wd) if base_wd > 0 else 0.0
    groups: dict[tuple[bool, bool, int], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        landmark = name.startswith("landmark_cnn.")
        plain = p.ndim <= 1 or name.endswith(".bias")
        lid = layer_id(name, depth)
        key = (landmark, plain, lid)
        if key not in groups:
            wd_mult = 0.0 if plain else (lm_mult if landmark else 1.0)
            lr_mult = o.layer_decay ** (depth + 1 - lid) if o.layer_decay != 1.0 else 1.0
            groups[key] = {"params": [], "lr_mult": lr_mult, "wd_mult": wd_mult, "name": f"{'landmark' if landmark else 'vit'}{'-nodecay' if plain else ''}-l{lid}"}
        groups[key]["params"].append(p)
    return list(groups.values())


# --------------------------------------------------------------------------------------------------
# loading weights


def read_weights(path: str | Path) -> dict[str, Any]:
    """Any checkpoint the supervised stages read -> {"model": ModelConfig, "backbone": sd | None,
    "landmark_cnn": sd | None, "source": str}.

    Accepts a lafs-fast model file (``teacher.pt``, ``part_fvit.pt``, ``checkpoint import``), a
    lafs-fast training checkpoint (``ckpt-*.pt`` of any stage: its model file), the reference's
    LAFS SSL checkpoint (teacher weights) or Part fViT state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    obj = safe_load(path)
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        if not obj.get("model_file"):
            raise ValueError(f"{path} is a training checkpoint without a model file")
        obj = obj["model_file"]
    kind = detect_format(obj)
    if kind == "lafs-fast":
        mcfg = ModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in obj["model"].items()})
        return {"model": mcfg, "backbone": obj.get("backbone"), "landmark_cnn": obj.get("landmark_cnn"), "source": f"{path} (lafs-fast: {obj.get('source', '?')})"}
    parts = split_reference(obj, "teacher")
    mcfg = infer_model_config(parts["backbone"]) if parts["backbone"] else ModelConfig()
    return {"model": mcfg, "backbone": parts["backbone"] or None, "landmark_cnn": parts["landmark_cnn"], "source": f"{path} ({kind})"}


def build_supervised_model(cfg: Config, num_classes: int, stage: int, init: str | None = None,
                           landmarks: str | None = None, say=print) -> tuple[Config, PartFViT, LandmarkCNN | None]:
    """(cfg with the loaded architecture, PartFViT with its margin head, reference landmark CNN or None).

    Stage 0: everything from scratch (``init`` may still give starting weights). Stage 2: the fViT
    from ``init``, the landmark CNN from ``landmarks`` (default: ``init``'s own when it has one;
    "scratch" = a fresh one). The reference landmark CNN (a frozen copy, eval mode) exists only in
    stage 2 with a loaded landmark CNN: without one the regulariser has nothing to hold it to.
    Missing pieces in stage 2 are allowed (random weights) and said through ``say``.
    """
    cfg = copy.deepcopy(cfg)
    backbone_sd = landmark_sd = None
    if init:
        w = read_weights(init)
        if w["backbone"] is None:
            raise ValueError(f"{init} holds no fViT backbone")
        changed = [f"{k} {getattr(cfg.model, k)} -> {getattr(w['model'], k)}" for k in ARCH_FIELDS if getattr(cfg.model, k) != getattr(w["model"], k)]
        for k in ARCH_FIELDS:
            setattr(cfg.model, k, getattr(w["model"], k))
        if changed:
            say(f"[supervised] architecture from {w['source']}: {', '.join(changed)}")
        say(f"[supervised] fViT from {w['source']}")
        backbone_sd = w["backbone"]
        if w["landmark_cnn"] is not None and landmarks is None:
            landmark_sd = w["landmark_cnn"]
            say(f"[supervised] landmark CNN from {init}")
    elif stage == 2:
        say("[supervised] note: no --init: the fViT starts from random weights (pass teacher.pt from lafs-fast pretrain "
            "or the reference's SSL checkpoint)")
    if landmarks and landmarks != "scratch":
        lw = read_weights(landmarks)
        if lw["landmark_cnn"] is None:
            raise ValueError(f"{landmarks} holds no landmark CNN; pass a stage-0 (train-landmarks) or Part fViT checkpoint")
        landmark_sd = lw["landmark_cnn"]
        say(f"[supervised] landmark CNN from {lw['source']}")
    if stage == 2 and landmark_sd is None:
        say("[supervised] note: landmark CNN from scratch (no --landmarks): the landmark regulariser is off")
    f = cfg.finetune
    head = None
    if f.shard_classes:
        head = ShardedMarginHead(cfg.model.dim, num_classes, f.head, f.scale, f.margin, f.sample_rate)
    else:
        head = build_margin_head(f.head, cfg.model.dim, num_classes, f.scale, f.margin)
    landmark_cnn = build_landmark_cnn(cfg.model)
    backbone = build_backbone(cfg.model)
    if backbone_sd is not None:
        load_into(backbone, backbone_sd, f"{init}: backbone")
    if landmark_sd is not None:
        load_into(landmark_cnn, landmark_sd, f"{landmarks or init}: landmark CNN")
    model = PartFViT(landmark_cnn, backbone, head)
    ref = None
    if stage == 2 and landmark_sd is not None:
        ref = copy.deepcopy(landmark_cnn).eval().requires_grad_(False)
    return cfg, model, ref


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
    (+ lambda * landmark MSE in stage 2) -> (loss (), {"ce", "landmark_mse", "train_acc"}).
    """

    def __init__(self, cfg: Config, model: PartFViT, num_classes: int, stage: int, device: torch.device,
                 ref_landmarks: LandmarkCNN | None = None, augment: str | None = None, out_dir: str | Path | None = None,
                 val_sets: list[str] | None = None, is_main: bool = True, say=print) -> None:
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
        self.is_main, self.say = is_main, say
        self.val = ValState()
        self.first_loss: tuple[torch.Tensor, torch.Tensor] | None = None
        self.last_loss: tuple[torch.Tensor, torch.Tensor] | None = None

    # -- schedules and optimiser

    def schedules(self, plan: Plan) -> dict[str, np.ndarray]:
        return {"landmark_lambda": landmark_lambda_schedule(plan, self.reg_on)}

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        return supervised_param_groups(model, self.cfg)

    # -- one micro-batch

    def forward_loss(self, model: nn.Module, batch: Any, ctx: StepContext) -> tuple[torch.Tensor, dict[str, float]]:
        images, labels = batch[0], batch[1].to(self.device)
        x = self.augment(images, ctx.seed)
        targets: torch.Tensor = labels
        if self.mixup is not None:
            x, targets = apply_mixup(self.mixup, x, labels, ctx.seed)
        out, coords = model(x, targets)
        metrics: dict[str, float] = {}
        if self.sharded:
            ce = out  # the sharded head returns the global mean cross-entropy
        else:
            logits = out.float()
            if targets.dim() == 2:
                ce = torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()  # timm SoftTargetCrossEntropy
                hard = targets.argmax(dim=1)
            else:
                ce = F.cross_entropy(logits, targets)
                hard = targets
            metrics["train_acc"] = (logits.detach().argmax(dim=1) == hard).float().mean()
        loss = ce
        lam = ctx.values.get("landmark_lambda", 0.0)
        if self.reg_on and lam > 0:
            with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
                ref = self.ref(x.float()).float()  # fp32: the min-max of 392 numbers loses pixels in bf16
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

    def after_optimizer_step(self, model: nn.Module, ctx: StepContext) -> None:
        every = self.cfg.finetune.val_every
        if self.val_sets and every > 0 and (ctx.step + 1) % every == 0 and self.is_main:
            self.validate(ctx.step + 1)

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
                (self.out_dir / "best.json").write_text(json.dumps({"step": step, "mean_accuracy": mean, "accuracy": acc}, indent=1) + "\n")
        self.say(f"[{self.name}] step {step}: verification " + ", ".join(f"{k} {v:.2f}%" for k, v in acc.items())
                 + (f" (best so far, best.pt written)" if improved and self.out_dir is not None else f" (best {self.val.best:.2f}% at step {self.val.best_step})"))
        return acc

    # -- state

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"val": {"best": self.val.best, "best_step": self.val.best_step}}
        if self.ref is not None:
            state["ref_landmarks"] = {k: v.detach().cpu() for k, v in self.ref.state_dict().items()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.ref is not None and "ref_landmarks" in state:
            self.ref.load_state_dict(state["ref_landmarks"])
        v = state.get("val", {})
        self.val.best, self.val.best_step = float(v.get("best", -1.0)), int(v.get("best_step", -1))

    def compile_targets(self) -> list[nn.Module]:
        return [self.model.backbone]

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
        return model_file(self.cfg.model, self.model.backbone, landmark_cnn=self.model.landmark_cnn, margin_head=head,
                          source=f"lafs-fast {self.name}")
