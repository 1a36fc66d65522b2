"""Models: the fViT backbone, the landmark CNN, Part fViT, DINO and margin heads, attention backends."""

from lafs_fast.models.attention import ATTENTION_BACKENDS, attention, resolve_attention
from lafs_fast.models.fvit import FViT, image_grid_tokens
from lafs_fast.models.heads import ArcFace, CosFace, DINOHead, MarginHead
from lafs_fast.models.landmark_cnn import LandmarkCNN, MobileNetV3Trunk
from lafs_fast.models.part_fvit import (
    PartFViT, build_backbone, build_landmark_cnn, build_margin_head, build_part_fvit,
)

__all__ = [
    "ATTENTION_BACKENDS", "attention", "resolve_attention", "FViT", "image_grid_tokens", "ArcFace", "CosFace",
    "DINOHead", "MarginHead", "LandmarkCNN", "MobileNetV3Trunk", "PartFViT", "build_backbone",
    "build_landmark_cnn", "build_margin_head", "build_part_fvit",
]
