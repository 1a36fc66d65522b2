"""Part fViT: landmark CNN -> patch sampler -> fViT backbone (-> margin head), end to end.

The loss reaches the landmark CNN through the sampler's bilinear weights (gradient w.r.t. coords).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from lafs_fast.config import backbone_parameters
from lafs_fast.models.fvit import FViT
from lafs_fast.models.heads import ArcFace, CosFace, MarginHead, SoftmaxHead
from lafs_fast.models.landmark_cnn import LandmarkCNN
from lafs_fast.sampling import grid_landmarks, sample_patches

__all__ = ["PartFViT", "build_backbone", "build_landmark_cnn", "build_margin_head", "build_part_fvit"]


class PartFViT(nn.Module):
    """images (B, 3, S, S) in [-1, 1] -> embedding (B, dim); with labels -> (logits, coords).

    Under autocast the landmark CNN and the margin head run in fp32, the fViT in the autocast
    dtype: in bf16 the per-sample min-max of 392 numbers scaled to 0..111 moves in 0.5 px steps
    (too coarse for the sampler and its coordinate gradient), and a cosine keeps ~3 digits, +-0.25
    on a logit at s = 64.

    State dict: ``landmark_cnn.*``, ``backbone.*``, ``head.weight`` (see models.checkpoints for the
    mapping to the reference's flat names).
    """

    def __init__(
        self, landmark_cnn: LandmarkCNN, backbone: FViT, head: MarginHead | None = None, sampler_backend: str = "auto"
    ) -> None:
        super().__init__()
        self.landmark_cnn, self.backbone, self.head = landmark_cnn, backbone, head
        self.sampler_backend = sampler_backend

    def landmarks(self, images: torch.Tensor) -> torch.Tensor:
        """coords (B, 196, 2) px predicted for images (B, 3, S, S)."""
        return self.landmark_cnn(images)

    def embed(self, images: torch.Tensor, coords: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(embedding (B, dim), coords (B, L, 2) fp32); coords predicted when not given."""
        if coords is None:
            with torch.autocast(images.device.type, enabled=False):
                coords = self.landmark_cnn(images.float())
        tokens = sample_patches(
            images,
            coords,
            self.backbone.patch_size,
            backend=self.sampler_backend,
            check_finite=not torch.compiler.is_compiling(),
        )
        return self.backbone(tokens), coords

    def forward(self, images: torch.Tensor, label: torch.Tensor | None = None, return_cosine: bool = False):
        """images (B, 3, S, S) -> embedding (B, dim); with ``label`` (B,) / (B, C): (margin logits
        (B, C) fp32, coords (B, L, 2) fp32), plus the plain cosines (B, C) with ``return_cosine``
        (the replicated head only)."""
        emb, coords = self.embed(images)
        if label is None:
            return emb
        if self.head is None:
            raise ValueError("this PartFViT has no margin head: build it with num_classes to train with labels")
        with torch.autocast(images.device.type, enabled=False):
            if return_cosine:
                logits, cos = self.head(emb.float(), label, return_cosine=True)
                return logits, coords, cos
            return self.head(emb.float(), label), coords


def build_backbone(m) -> FViT:
    """FViT from a ``ModelConfig`` (refused in one sentence when its weights alone cannot fit the machine)."""
    from lafs_fast.errors import check_fits_memory

    params = backbone_parameters(m)
    check_fits_memory(
        4.0 * params,
        f"a backbone of {params / 1e9:,.1f} G parameters (model.dim={m.dim}, depth={m.depth}, mlp_dim={m.mlp_dim})",
        "lower model.dim, model.depth or model.mlp_dim",
    )
    return FViT.from_config(m)


def build_landmark_cnn(m) -> LandmarkCNN:
    """LandmarkCNN from a ``ModelConfig``; ``landmark_start="grid"``: its output starts at the patch grid."""
    cnn = LandmarkCNN(m.num_patches, m.image_size, m.landmark_cnn, m.landmark_dropout)
    if m.landmark_start == "grid":
        cnn.start_at(grid_landmarks(m.image_size, m.patch_size))
    return cnn


def build_margin_head(kind: str, dim: int, num_classes: int, s: float = 64.0, m: float | None = None) -> MarginHead:
    if kind == "cosface":
        return CosFace(dim, num_classes, s, 0.4 if m is None else m)
    if kind == "arcface":
        return ArcFace(dim, num_classes, s, 0.5 if m is None else m)
    if kind == "softmax":
        return SoftmaxHead(dim, num_classes)
    raise ValueError(f"unknown margin head {kind!r}; choose cosface, arcface or softmax")


def build_part_fvit(cfg, num_classes: int | None = None) -> PartFViT:
    """A PartFViT from a full ``Config`` (margin head only when ``num_classes`` is given)."""
    head = None
    if num_classes:
        f = cfg.finetune
        head = build_margin_head(f.head, cfg.model.dim, num_classes, f.scale, f.margin)
    return PartFViT(build_landmark_cnn(cfg.model), build_backbone(cfg.model), head)
