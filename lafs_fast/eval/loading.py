"""Models for evaluation: every checkpoint lafs-fast writes, and the reference's, as a ready model.

One loader serves training and evaluation (``lafs_fast.models.checkpoints.model_from_object``); this
is its evaluation entry point, without the margin head (embeddings only).
"""

from __future__ import annotations

from pathlib import Path

from lafs_fast.models.checkpoints import load_model_and_kind
from lafs_fast.models.fvit import FViT
from lafs_fast.models.part_fvit import PartFViT

__all__ = ["load_eval_model"]


def load_eval_model(path: str | Path, head_dim: int = 64) -> tuple[PartFViT | FViT, str]:
    """(eval-mode CPU model without its margin head, kind) of ``path``; see
    ``lafs_fast.models.checkpoints.model_from_object``."""
    return load_model_and_kind(path, head_dim, margin_head=False)
