"""Every checkpoint lafs-fast writes, and the reference's, as a ready model for evaluation.

Accepted (all read with ``torch.load(weights_only=True)``):
- a lafs-fast model file (``lafs-fast checkpoint import``, ``teacher.pt``, ``part_fvit.pt``, ``best.pt``);
- a lafs-fast TRAINING checkpoint (``format: lafs-fast-train``, resumable; it carries its model file
  under ``model_file``), so a run can be evaluated while it trains;
- a reference Part fViT state dict or a LAFS SSL checkpoint (its teacher), converted in memory.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from lafs_fast.config import ModelConfig
from lafs_fast.io import safe_load
from lafs_fast.models.checkpoints import detect_format, infer_model_config, load_into, split_reference
from lafs_fast.models.fvit import FViT
from lafs_fast.models.part_fvit import PartFViT, build_backbone, build_landmark_cnn

__all__ = ["TRAIN_FORMAT", "load_eval_model", "model_from_object"]

TRAIN_FORMAT = "lafs-fast-train"  # lafs_fast.train.engine.CHECKPOINT_FORMAT (not imported: keeps eval light)


def model_from_object(obj: Any, what: str, head_dim: int = 64) -> tuple[PartFViT | FViT, str]:
    """(eval-mode CPU model, kind) from a loaded checkpoint object; ``what`` names it in errors;
    ``head_dim``: attention head width of a reference checkpoint (its tensors do not record it; 64)."""
    kind = "training checkpoint" if isinstance(obj, dict) and obj.get("format") == TRAIN_FORMAT else None
    if kind:
        if not isinstance(obj.get("model_file"), dict):
            raise ValueError(f"{what} is a training checkpoint without a model file; evaluate the run's exported model instead")
        obj = obj["model_file"]
    fmt = detect_format(obj)
    kind = kind or fmt
    if fmt != "lafs-fast":
        parts = split_reference(obj)
        obj = {"model": dataclasses.asdict(infer_model_config(parts["backbone"], head_dim)), **parts}
    mcfg = ModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in obj["model"].items()})
    backbone = build_backbone(mcfg)
    load_into(backbone, obj["backbone"], f"{what}: backbone")
    if obj.get("landmark_cnn") is None:
        return backbone.eval(), kind
    landmark = build_landmark_cnn(mcfg)
    load_into(landmark, obj["landmark_cnn"], f"{what}: landmark CNN")
    return PartFViT(landmark, backbone).eval(), kind


def load_eval_model(path: str | Path, head_dim: int = 64) -> tuple[PartFViT | FViT, str]:
    """Load ``path`` (module doc) -> (model, kind: 'lafs-fast', 'training checkpoint',
    'reference-part-fvit' or 'reference-ssl'). Errors name the file and the fix."""
    try:
        return model_from_object(safe_load(path), str(path), head_dim)
    except ValueError as exc:
        msg = str(exc)
        if msg.startswith("not a recognised checkpoint"):
            raise ValueError(f"{path} is {msg}") from None
        raise
