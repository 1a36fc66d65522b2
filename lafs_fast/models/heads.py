"""Heads: the DINO projection head (stage 1) and the CosFace / ArcFace margin heads (stages 0, 2).

State-dict names follow the reference / DINO (``mlp.N``, ``last_layer.weight_g|weight_v``,
margin ``weight``) so their checkpoints load as they are.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["DINOHead", "WeightNormLinear", "MarginHead", "CosFace", "ArcFace", "SoftmaxHead", "one_hot_targets"]


class WeightNormLinear(nn.Module):
    """Linear without bias, ``W = g * v / ||v||`` per output row (``torch.nn.utils.weight_norm``'s
    parametrisation and key names, written out so it compiles and loads DINO checkpoints).

    weight_g: (out, 1), weight_v: (out, in).
    """

    def __init__(self, in_features: int, out_features: int, fix_norm: bool = True) -> None:
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.trunc_normal_(self.weight_v, std=0.02)
        self.weight_g = nn.Parameter(torch.ones(out_features, 1))
        self.weight_g.requires_grad_(not fix_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)
        return F.linear(x, w)


class DINOHead(nn.Module):
    """x (B, dim) -> MLP dim->hidden->hidden->bottleneck (GELU, no BN) -> L2 normalise ->
    weight-normed Linear(bottleneck -> out_dim, no bias) with its norm fixed to 1 -> (B, out_dim)."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 100_000,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, bottleneck_dim),
        )
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, fix_norm=norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1, p=2)
        return self.last_layer(x)


def check_targets(label: torch.Tensor, num_classes: int) -> None:
    """Raise unless ``label`` is (B,) class indices or (B, num_classes) soft targets (mixup)."""
    if label.dim() == 2 and label.shape[1] != num_classes:
        raise ValueError(f"soft targets have {label.shape[1]} classes, the head has {num_classes}")
    if label.dim() not in (1, 2):
        raise ValueError(f"labels must be (B,) class indices or (B, C) soft targets, got {tuple(label.shape)}")


def one_hot_targets(label: torch.Tensor, num_classes: int, dtype: torch.dtype) -> torch.Tensor:
    """label (B,) int -> (B, C) one-hot; a (B, C) soft target (mixup) passes through."""
    check_targets(label, num_classes)
    if label.dim() == 2:
        return label.to(dtype)
    # scatter, not F.one_hot: one_hot reads the largest label back to the host to check it (a sync per step)
    return torch.zeros(label.shape[0], num_classes, dtype=dtype, device=label.device).scatter_(
        1, label.long()[:, None], 1.0
    )


class MarginHead(nn.Module):
    """Normalised-softmax margin head: logits = s * (y * target_logit(cos) + (1 - y) * cos).

    emb: (B, dim), label: (B,) int or (B, C) soft targets -> logits (B, C) fp32. ``weight``
    (C, dim) holds the class centres (the reference's ``loss.weight``), xavier-uniform init.
    """

    def __init__(self, in_features: int, num_classes: int, s: float = 64.0, m: float = 0.4) -> None:
        super().__init__()
        self.in_features, self.num_classes, self.s, self.m = in_features, num_classes, s, m
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        nn.init.xavier_uniform_(self.weight)

    def cosine(self, emb: torch.Tensor) -> torch.Tensor:
        return F.linear(F.normalize(emb.float()), F.normalize(self.weight.float()))

    def set_margin(self, m: float) -> None:
        """Change the margin (a host float: the stage's margin warm-up sets it before each step)."""
        self.m = float(m)

    def target_logit(self, cos: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError  # defined by CosFace / ArcFace

    def forward(
        self, emb: torch.Tensor, label: torch.Tensor, return_cosine: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """logits (B, C) fp32; with ``return_cosine`` also the plain cosines (B, C) fp32, detached
        (what a plain-accuracy metric reads: the margin hides a correct but not yet margin-wide win)."""
        cos = self.cosine(emb)
        y = one_hot_targets(label, self.num_classes, cos.dtype)
        logits = self.s * (y * self.target_logit(cos) + (1.0 - y) * cos)
        return (logits, cos.detach()) if return_cosine else logits

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, num_classes={self.num_classes}, s={self.s}, m={self.m}"


class CosFace(MarginHead):
    """cos(theta) - m on the target (reference: s = 64, m = 0.4)."""

    def __init__(self, in_features: int, num_classes: int, s: float = 64.0, m: float = 0.4) -> None:
        super().__init__(in_features, num_classes, s, m)

    def target_logit(self, cos: torch.Tensor) -> torch.Tensor:
        return cos - self.m


class ArcFace(MarginHead):
    """cos(theta + m) on the target, with the usual fallback ``cos - sin(pi - m) * m`` past pi - m."""

    def __init__(self, in_features: int, num_classes: int, s: float = 64.0, m: float = 0.5) -> None:
        super().__init__(in_features, num_classes, s, m)
        self.set_margin(m)

    def set_margin(self, m: float) -> None:
        super().set_margin(m)
        self.cos_m, self.sin_m = math.cos(m), math.sin(m)
        self.th, self.mm = math.cos(math.pi - m), math.sin(math.pi - m) * m

    def target_logit(self, cos: torch.Tensor) -> torch.Tensor:
        sine = torch.sqrt((1.0 - cos * cos).clamp(min=0.0))
        phi = cos * self.cos_m - sine * self.sin_m
        return torch.where(cos > self.th, phi, cos - self.mm)


class SoftmaxHead(MarginHead):
    """A plain softmax classifier, logits = emb @ weight^T: no normalisation, no scale, no margin.

    Not the reference's (CosFace, s = 64, m = 0.4): the ``small`` preset's supervised head, because on
    a short run from scratch its embeddings verify unseen people better (docs/finetuning.md). Same
    interface and ``weight`` (C, dim) as the margin heads; ``s`` and ``m`` are ignored (a margin
    warm-up sets nothing); ``return_cosine`` gives the cosines to the class weights, as theirs.
    """

    def __init__(self, in_features: int, num_classes: int, s: float = 1.0, m: float = 0.0) -> None:
        super().__init__(in_features, num_classes, 1.0, 0.0)

    def set_margin(self, m: float) -> None:
        """No margin to set."""

    def forward(
        self, emb: torch.Tensor, label: torch.Tensor, return_cosine: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        check_targets(label, self.num_classes)  # the margin heads' check, without building their (B, C) one-hot
        logits = F.linear(emb.float(), self.weight.float())
        return (logits, self.cosine(emb).detach()) if return_cosine else logits
