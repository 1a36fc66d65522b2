"""Sharded margin head (Partial FC style): class centres split across ranks, embeddings gathered.

WebFace4M has 205,990 identities: a replicated 206k x 768 classifier is bigger than the backbone and
is all-reduced every step. Here rank r holds only its slice of the centres; every rank sees the
embeddings of the whole global batch (all-gather), computes cosine logits against its slice, and a
distributed softmax cross-entropy (max and sum-exp all-reduced) gives the global loss.

Equivalence (tested at world size 1 and 2): with ``sample_rate = 1`` the loss equals the replicated
head's mean loss over the global batch; each rank's centre slice gets exactly that loss's gradient,
and the embedding gradient is scaled by the world size so that DDP's averaging of the backbone
gradients yields the same backbone gradient as a replicated head under DDP.

Negative-class sampling (``sample_rate < 1``): each rank keeps every class that is a positive in
the global batch plus random negatives, up to ``ceil(sample_rate * local classes)``.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from lafs_fast.models.heads import ArcFace, CosFace, MarginHead

__all__ = ["ShardedMarginHead", "shard_range"]


def shard_range(num_classes: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, end) of the classes held by ``rank``: as even as possible, the first ranks one more."""
    base, extra = divmod(num_classes, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherEmbeddings(torch.autograd.Function):
    """all_gather forward; backward sums the gradient of every rank's copy, keeps this rank's rows,
    and multiplies by the world size (DDP then averages the backbone gradients)."""

    @staticmethod
    def forward(ctx, emb: torch.Tensor) -> torch.Tensor:  # emb: (B, D) -> (W*B, D)
        rank, world = _world()
        ctx.rank, ctx.world, ctx.b = rank, world, emb.shape[0]
        if world == 1:
            return emb.clone()
        parts = [torch.empty_like(emb) for _ in range(world)]
        dist.all_gather(parts, emb.contiguous())
        return torch.cat(parts, 0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        if ctx.world > 1:
            dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.b : (ctx.rank + 1) * ctx.b] * ctx.world


class _DistributedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy over rows whose classes are spread over ranks.

    logits: (N, C_local) fp32 this rank's columns; target_col: (N,) int, the target's column in this
    rank's slice or -1 when another rank holds it. Backward: ``(softmax - onehot) / N`` on the local
    columns only (the exact gradient of the global loss w.r.t. this rank's logits).
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target_col: torch.Tensor) -> torch.Tensor:
        _, world = _world()
        row_max = logits.max(dim=1).values
        if world > 1:
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX)
        shifted = logits - row_max[:, None]
        exp = torch.exp(shifted)
        sum_exp = exp.sum(dim=1)
        if world > 1:
            dist.all_reduce(sum_exp, op=dist.ReduceOp.SUM)
        owned = target_col >= 0
        rows = torch.arange(logits.shape[0], device=logits.device)
        # Log space: at s = 64 a target probability can underflow fp32, its logit cannot.
        target = torch.zeros_like(sum_exp)
        target[owned] = shifted[rows[owned], target_col[owned]]
        if world > 1:
            dist.all_reduce(target, op=dist.ReduceOp.SUM)
        ctx.save_for_backward(exp / sum_exp[:, None], target_col)
        return (torch.log(sum_exp) - target).mean()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        prob, target_col = ctx.saved_tensors
        g = prob.clone()
        owned = target_col >= 0
        rows = torch.arange(g.shape[0], device=g.device)
        g[rows[owned], target_col[owned]] -= 1.0
        return g * (grad / g.shape[0]), None


class ShardedMarginHead(nn.Module):
    """CosFace / ArcFace with centres sharded over the process group (one rank: the whole head).

    Args:
        in_features: embedding width D.
        num_classes: total identities C (all ranks).
        kind: "cosface" or "arcface"; s, m: scale and margin.
        sample_rate: fraction of local classes kept per step (positives always kept); 1 = all.

    forward(emb (B, D) local batch, labels (B,) int64 global class ids) -> scalar loss (mean over
    the global batch, the same value on every rank).
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        kind: str = "cosface",
        s: float = 64.0,
        m: float | None = None,
        sample_rate: float = 1.0,
    ) -> None:
        super().__init__()
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must lie in (0, 1], got {sample_rate}")
        rank, world = _world()
        self.start, self.end = shard_range(num_classes, rank, world)
        self.num_classes, self.sample_rate = num_classes, sample_rate
        margin_cls = {"cosface": CosFace, "arcface": ArcFace}.get(kind)
        if margin_cls is None:
            raise ValueError(
                f"finetune.head={kind!r} has no sharded form; finetune.shard_classes needs cosface or arcface"
            )
        # The margin maths of the replicated head, over this rank's slice of the centres.
        self.margin: MarginHead = margin_cls(in_features, self.end - self.start, s, *(() if m is None else (m,)))

    def set_margin(self, m: float) -> None:
        """Change the margin (see MarginHead.set_margin)."""
        self.margin.set_margin(m)

    @property
    def weight(self) -> nn.Parameter:
        """(C_local, D) this rank's centres."""
        return self.margin.weight

    def _sampled_columns(self, labels: torch.Tensor) -> torch.Tensor | None:
        """Local class columns to keep this step (None = all)."""
        local = self.end - self.start
        keep = math.ceil(self.sample_rate * local)
        if keep >= local:
            return None
        positive = torch.zeros(local, dtype=torch.bool, device=labels.device)
        mine = (labels >= self.start) & (labels < self.end)
        positive[labels[mine] - self.start] = True
        score = torch.rand(local, device=labels.device)
        score[positive] = 2.0  # positives first, then random negatives
        return score.topk(max(keep, int(positive.sum()))).indices.sort().values

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if labels.dim() != 1:
            raise ValueError("the sharded head takes integer labels (B,); mixup soft targets need the replicated head")
        all_emb = _GatherEmbeddings.apply(emb)
        rank, world = _world()
        if world > 1:
            parts = [torch.empty_like(labels) for _ in range(world)]
            dist.all_gather(parts, labels.contiguous())
            all_labels = torch.cat(parts)
        else:
            all_labels = labels
        cols = self._sampled_columns(all_labels)
        weight = self.weight if cols is None else self.weight[cols]
        cos = F.linear(F.normalize(all_emb.float()), F.normalize(weight.float()))
        owned = (all_labels >= self.start) & (all_labels < self.end)
        target_col = torch.where(owned, all_labels - self.start, torch.full_like(all_labels, -1))
        if cols is not None:  # map class ids to sampled-column positions
            lookup = torch.full((self.end - self.start,), -1, dtype=torch.long, device=cols.device)
            lookup[cols] = torch.arange(cols.numel(), device=cols.device)
            target_col = torch.where(owned, lookup[target_col.clamp(min=0)], target_col)
        onehot = torch.zeros_like(cos)
        hit = target_col >= 0
        onehot[hit.nonzero().squeeze(1), target_col[hit]] = 1.0
        logits = self.margin.s * (onehot * self.margin.target_logit(cos) + (1 - onehot) * cos)
        return _DistributedCrossEntropy.apply(logits, target_col)
