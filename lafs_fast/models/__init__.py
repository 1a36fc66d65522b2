"""Models: the fViT backbone, the landmark CNN, Part fViT, DINO and margin heads, attention backends."""

# timm (DropPath here, the landmark CNN's timm trunks, RandAugment / Mixup in the supervised stage)
# imports torchvision, which fails on a CPU-only torch beside PyPI's CUDA torchvision wheel: define
# the missing op schemas first (a no-op wherever torchvision imports; see _torchvision_fix.py).
from lafs_fast._torchvision_fix import ensure_torchvision as _ensure_torchvision

_ensure_torchvision()

from lafs_fast.models.attention import attention, resolve_attention
from lafs_fast.models.fvit import FViT, image_grid_tokens
from lafs_fast.models.heads import ArcFace, CosFace, DINOHead, MarginHead, SoftmaxHead
from lafs_fast.models.landmark_cnn import LandmarkCNN, MobileNetV3Trunk
from lafs_fast.models.part_fvit import (
    PartFViT,
    build_backbone,
    build_landmark_cnn,
    build_margin_head,
    build_part_fvit,
)

__all__ = [
    "attention",
    "resolve_attention",
    "FViT",
    "image_grid_tokens",
    "ArcFace",
    "CosFace",
    "DINOHead",
    "MarginHead",
    "SoftmaxHead",
    "LandmarkCNN",
    "MobileNetV3Trunk",
    "PartFViT",
    "build_backbone",
    "build_landmark_cnn",
    "build_margin_head",
    "build_part_fvit",
]
