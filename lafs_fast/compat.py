"""Drop-in replacements for the reference code's names (change one import line, keep the script).

- ``extract_patches_pytorch_gridsample(imgs, landmarks, patch_shape, num_landm)``: the reference's
  mosaic layout (B, C, P*row, P*row), same numbers, computed by lafs-fast's sampler (one call, or
  the Triton kernel on CUDA) instead of a loop of grid_sample calls.
- ``ViT_face_landmark_patch8``: the reference's constructor keywords, forward signature, return
  values and state-dict keys, running on lafs-fast's modules.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from lafs_fast.models.fvit import FViT, image_grid_tokens
from lafs_fast.models.heads import ArcFace, CosFace
from lafs_fast.models.landmark_cnn import MobileNetV3Trunk, minmax_coords
from lafs_fast.sampling import sample_patches

__all__ = ["extract_patches_pytorch_gridsample", "ViT_face_landmark_patch8", "tokens_to_mosaic"]


def tokens_to_mosaic(tokens: torch.Tensor, patch_size: int, channels: int = 3) -> torch.Tensor:
    """tokens (B, L, P*P*C) with L = row*row -> mosaic (B, C, row*P, row*P), the reference layout:
    token r1*row + r2, element (a, b, c) lands at ``[c, r1*P + a, r2*P + b]``."""
    b, n, _ = tokens.shape
    row = math.isqrt(n)
    if row * row != n:
        raise ValueError(f"the mosaic layout needs a square number of landmarks, got {n}")
    p = patch_size
    x = tokens.reshape(b, row, row, p, p, channels).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, channels, row * p, row * p)


def extract_patches_pytorch_gridsample(
    imgs: torch.Tensor, landmarks: torch.Tensor, patch_shape, num_landm: int = 49
) -> torch.Tensor:
    """The reference function's contract: imgs (B, C, H, W), landmarks (B, >= num_landm, 2) px,
    patch_shape (P, P) -> mosaic (B, C, P*row, P*row) with row = sqrt(num_landm)."""
    p = int(torch.as_tensor(patch_shape).flatten()[0])
    tokens = sample_patches(imgs, landmarks[:, :num_landm], p)
    return tokens_to_mosaic(tokens, p, imgs.shape[1])


class ViT_face_landmark_patch8(FViT):  # noqa: N801 - the reference's class name
    """The reference's Part fViT class, on lafs-fast's modules.

    Same constructor keywords, same ``forward(x, label=None, mask=None, visualize=False,
    save_token=False, opt=None)`` (images of 0..255 floats, normalised inside as ``x/255*2-1``),
    same returns (embedding; with a label ``(logits, theta)``; ``visualize`` -> ``(emb, theta)``;
    ``save_token`` -> ``(emb, tokens, theta)``) and the same state-dict keys. ``GPU_ID`` (the
    reference's manual model parallelism of the classifier) is accepted and ignored: use DDP and,
    for large class counts, lafs-fast's sharded head.
    """

    def __init__(
        self,
        *,
        loss_type: str,
        GPU_ID=None,
        num_class: int,
        image_size: int,
        patch_size: int,  # noqa: N803
        dim: int,
        depth: int,
        heads: int,
        mlp_dim: int,
        pool: str = "cls",
        num_patches: int | None = None,
        channels: int = 3,
        dim_head: int = 64,
        dropout: float = 0.0,
        emb_dropout: float = 0.0,
        fp16: bool = True,
        with_land: bool = False,
    ) -> None:
        if num_patches is None:
            num_patches = (image_size // patch_size) ** 2
        if channels != 3:
            raise ValueError(f"channels must be 3 (RGB faces), got {channels}")
        if pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r}")
        # The reference hard-codes drop-path 0.1 in every block and the dim**-0.5 attention scale.
        super().__init__(
            dim,
            depth,
            heads,
            dim_head,
            mlp_dim,
            num_patches,
            patch_size,
            dropout,
            emb_dropout,
            drop_path=0.1,
            attn_scale="dim",
        )
        self.pool, self.with_land, self.fp16, self.GPU_ID = pool, with_land, fp16, GPU_ID
        self.row_num = int(math.sqrt(num_patches))
        self.image_size = image_size
        self.theta: torch.Tensor | int = 0
        if with_land:
            self.stn = MobileNetV3Trunk()
            self.output_layer = nn.Sequential(nn.Dropout(p=0.5), nn.Linear(160, self.row_num * self.row_num * 2))
            self.patch_shape = torch.tensor([patch_size, patch_size])
        self.loss_type = loss_type
        if loss_type == "CosFace":
            self.loss = CosFace(dim, num_class, 64.0, 0.4)
        elif loss_type == "ArcFace":
            self.loss = ArcFace(dim, num_class, 64.0, 0.5)
        elif loss_type != "None":
            raise ValueError(
                f"loss_type {loss_type!r} is not supported by lafs-fast; use 'CosFace', 'ArcFace' or 'None'"
            )

    def forward(
        self,
        x: torch.Tensor,
        label: torch.Tensor | None = None,
        mask=None,
        visualize: bool = False,
        save_token: bool = False,
        opt=None,
    ):
        if mask is not None:
            raise ValueError("attention masks are not supported by lafs-fast's ViT_face_landmark_patch8")
        if opt is not None:
            raise ValueError("the 'opt' argument (AdaFace-style heads) is not supported by lafs-fast")
        if x.dim() == 4:
            x = x / 255.0 * 2 - 1
        if self.with_land:
            raw = self.output_layer(self.stn(x).mean(dim=(-2, -1)))
            self.theta = minmax_coords(raw, float(self.image_size - 1))
            x = sample_patches(x, self.theta, self.patch_size)
        elif x.dim() == 4:
            x = image_grid_tokens(x, self.patch_size)
        feats = self.forward_features(x)
        tokens = feats[:, 1:]
        pooled = tokens.mean(dim=1) if self.pool == "mean" else feats[:, 0]
        emb = self.mlp_head(pooled)
        if save_token:
            return emb, tokens, self.theta
        if label is not None:
            if self.loss_type == "None":
                raise ValueError("this model was built with loss_type='None': it has no margin head for labels")
            return self.loss(emb, label), self.theta
        return (emb, self.theta) if visualize else emb
