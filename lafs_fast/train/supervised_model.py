"""The supervised stages' model: building the Part fViT from a config and the weights a stage starts
from (a stage-1 teacher, a stage-0 Part fViT, the reference's checkpoints), and its optimiser groups
(weight decay per part, optional layer-wise lr decay; docs/method.md section 4)."""

from __future__ import annotations

import copy
import logging
import re
from pathlib import Path
from typing import Any

import torch.nn as nn

from lafs_fast.config import Config, ModelConfig
from lafs_fast.io import safe_load
from lafs_fast.models import LandmarkCNN, PartFViT, build_backbone, build_landmark_cnn, build_margin_head
from lafs_fast.models.checkpoints import TRAIN_FORMAT, detect_format, infer_model_config, load_into, split_reference
from lafs_fast.models.sharded_head import ShardedMarginHead
from lafs_fast.sampling import grid_landmarks

log = logging.getLogger(__name__)

__all__ = [
    "ARCH_FIELDS",
    "layer_id",
    "supervised_param_groups",
    "read_weights",
    "init_architecture",
    "build_supervised_model",
]

# ModelConfig fields that fix the architecture (taken from a loaded backbone, not from the preset)
ARCH_FIELDS = ("dim", "depth", "heads", "head_dim", "mlp_dim", "num_patches", "patch_size", "attn_scale", "image_size")


def layer_id(name: str, depth: int) -> int:
    """fViT parameter name (PartFViT naming) -> layer: embeddings 0, block i -> i + 1, the rest depth + 1."""
    if name.startswith("backbone."):
        rest = name[len("backbone.") :]
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
            groups[key] = {
                "params": [],
                "lr_mult": lr_mult,
                "wd_mult": wd_mult,
                "name": f"{'landmark' if landmark else 'vit'}{'-nodecay' if plain else ''}-l{lid}",
            }
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
    if isinstance(obj, dict) and obj.get("format") == TRAIN_FORMAT:
        if not obj.get("model_file"):
            raise ValueError(f"{path} is a training checkpoint without a model file")
        obj = obj["model_file"]
    kind = detect_format(obj)
    if kind == "lafs-fast":
        mcfg = ModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in obj["model"].items()})
        return {
            "model": mcfg,
            "backbone": obj.get("backbone"),
            "landmark_cnn": obj.get("landmark_cnn"),
            "source": f"{path} (lafs-fast: {obj.get('source', '?')})",
        }
    parts = split_reference(obj, "teacher")
    mcfg = infer_model_config(parts["backbone"]) if parts["backbone"] else ModelConfig()
    return {
        "model": mcfg,
        "backbone": parts["backbone"] or None,
        "landmark_cnn": parts["landmark_cnn"],
        "source": f"{path} ({kind})",
    }


def _init_weights(cfg: Config, init: str, landmarks: str | None) -> tuple[Any, Any]:
    """(fViT, landmark CNN) state dicts of ``init`` (the landmark CNN only when ``landmarks`` names no
    other); ``cfg.model`` takes the loaded architecture."""
    w = read_weights(init)
    if w["backbone"] is None:
        raise ValueError(f"{init} holds no fViT backbone")
    changed = _take_architecture(cfg, w["model"])
    if changed:
        log.info(f"[supervised] architecture from {w['source']}: {', '.join(changed)}")
    log.info(f"[supervised] fViT from {w['source']}")
    landmark_sd = None
    if w["landmark_cnn"] is not None and landmarks is None:
        landmark_sd = w["landmark_cnn"]
        log.info(f"[supervised] landmark CNN from {init}")
    return w["backbone"], landmark_sd


def _take_architecture(cfg: Config, model: ModelConfig) -> list[str]:
    """Set ``cfg.model``'s ARCH_FIELDS to ``model``'s; the changes, as 'dim 192 -> 768'."""
    changed = [
        f"{k} {getattr(cfg.model, k)} -> {getattr(model, k)}"
        for k in ARCH_FIELDS
        if getattr(cfg.model, k) != getattr(model, k)
    ]
    for k in ARCH_FIELDS:
        setattr(cfg.model, k, getattr(model, k))
    return changed


def init_architecture(cfg: Config) -> Config:
    """``cfg`` with the fViT architecture of its ``finetune.init`` weights (a copy; ``cfg`` itself
    when there are none): what the run builds, so what it writes to config.yaml, what `config show`
    prints and what the memory guard measures (a preset's shape gives way to the loaded weights')."""
    if not cfg.finetune.init:
        return cfg
    if not Path(cfg.finetune.init).is_file():
        raise FileNotFoundError(f"--init {cfg.finetune.init} (finetune.init) does not exist")
    cfg = copy.deepcopy(cfg)
    _take_architecture(cfg, read_weights(cfg.finetune.init)["model"])
    return cfg


def _landmark_weights(landmarks: str) -> Any:
    """The landmark CNN's state dict of a stage-0 / Part fViT checkpoint."""
    lw = read_weights(landmarks)
    if lw["landmark_cnn"] is None:
        raise ValueError(f"{landmarks} holds no landmark CNN; pass a stage-0 (train-landmarks) or Part fViT checkpoint")
    log.info(f"[supervised] landmark CNN from {lw['source']}")
    return lw["landmark_cnn"]


def _margin_head(cfg: Config, num_classes: int) -> nn.Module:
    f = cfg.finetune
    if f.shard_classes:
        return ShardedMarginHead(cfg.model.dim, num_classes, f.head, f.scale, f.margin, f.sample_rate)
    return build_margin_head(f.head, cfg.model.dim, num_classes, f.scale, f.margin)


def build_supervised_model(
    cfg: Config, num_classes: int, stage: int, init: str | None = None, landmarks: str | None = None
) -> tuple[Config, PartFViT, LandmarkCNN | None]:
    """(cfg with the loaded architecture, PartFViT with its margin head, reference landmark CNN or None).

    Stage 0: everything from scratch (``init`` may still give starting weights). Stage 2: the fViT
    from ``init``, the landmark CNN from ``landmarks`` (default: ``init``'s own when it has one;
    "scratch" = a fresh one). The reference landmark CNN (a frozen copy, eval mode) exists only in
    stage 2 with a loaded landmark CNN: without one the regulariser has nothing to hold it to.
    Missing pieces in stage 2 are allowed (random weights) and said in the log.
    """
    cfg = copy.deepcopy(cfg)
    backbone_sd = landmark_sd = None
    if init:
        backbone_sd, landmark_sd = _init_weights(cfg, init, landmarks)
    elif stage == 2:
        log.info(
            "[supervised] note: no --init: the fViT starts from random weights (pass teacher.pt from lafs-fast "
            "pretrain or the reference's SSL checkpoint)"
        )
    if landmarks and landmarks not in ("scratch", "grid"):
        landmark_sd = _landmark_weights(landmarks)
    if stage == 2 and landmark_sd is None:
        start = ", its output starting at the patch grid" if landmarks == "grid" else ""
        log.info(
            f"[supervised] note: landmark CNN from scratch{start} (no stage-0 CNN): the landmark regulariser is off"
        )
    head = _margin_head(cfg, num_classes)
    landmark_cnn = build_landmark_cnn(cfg.model)
    backbone = build_backbone(cfg.model)
    if backbone_sd is not None:
        load_into(backbone, backbone_sd, f"{init}: backbone")
    if landmark_sd is not None:
        load_into(landmark_cnn, landmark_sd, f"{landmarks or init}: landmark CNN")
    elif landmarks == "grid":  # the patches a grid-pre-trained teacher saw (sampling.grid_landmarks)
        landmark_cnn.start_at(grid_landmarks(cfg.model.image_size, cfg.model.patch_size))
    model = PartFViT(landmark_cnn, backbone, head)
    ref = None
    if stage == 2 and landmark_sd is not None:
        ref = copy.deepcopy(landmark_cnn).eval().requires_grad_(False)
    return cfg, model, ref
