"""DINO for LAFS (docs/method.md section 3): student / teacher fViT + DINO head, EMA teacher,
centering, the multi-view cross-entropy, and the stage that plugs them into the engine.

- :class:`MultiCrop`: backbone + head over a list of token tensors of different lengths (views of
  equal length run as one batch, or with ``views.pack`` all views in one block-diagonal sequence);
  the head runs once on all embeddings.
- :class:`DINOLoss`: mean over the (teacher global view q, student view v != q) pairs of
  ``sum_k -softmax((t_q - c) / tau_t)_k * log_softmax(s_v / tau_s)_k``, averaged over the batch;
  the centre ``c`` is an EMA (momentum 0.9) of the teacher outputs' batch mean, all-reduced.
  ``dino.centering=sinkhorn`` replaces the centred softmax by DINOv2's Sinkhorn-Knopp targets
  (:func:`sinkhorn_knopp`).
- :func:`koleo_loss`: DINOv2's KoLeo regulariser (``dino.koleo_weight``), which pushes each
  student global-view CLS embedding away from its nearest neighbour in the batch.
- :func:`ema_update`: teacher <- m * teacher + (1 - m) * student, over backbone and head.
- :class:`DinoStage`: the engine's stage (views -> student / teacher -> loss), with the teacher
  momentum (cosine 0.996 -> 1 over all steps) and teacher temperature (per epoch, linear over
  ``teacher_temp_epochs`` from ``teacher_temp_start`` to ``teacher_temp_end``: the reference
  DECREASES 0.07 -> 0.04; swap the two for DINO's rising default) schedules, and the last layer
  frozen during the first ``freeze_last_layer_epochs`` epochs.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from lafs_fast.config import Config
from lafs_fast.dense_landmarks import DetectorLandmarks
from lafs_fast.launch import resolve_precision
from lafs_fast.models import DINOHead, FViT, build_backbone
from lafs_fast.models.checkpoints import model_file
from lafs_fast.train.engine import Plan, Stage, StepContext, cosine_schedule, linear_then_constant, param_groups
from lafs_fast.train.health import CollapseWatch, dino_health
from lafs_fast.views import LafsViews

__all__ = ["MultiCrop", "DINOLoss", "sinkhorn_knopp", "koleo_loss", "ema_update", "DinoStage", "build_dino_models"]


class MultiCrop(nn.Module):
    """``backbone`` + ``head``: crops [(n_i, N_i, 3*P*P), ...] -> head outputs (sum n_i, out_dim),
    rows in the crops' order (view-major within each crop tensor).

    ``pack=False``: one backbone batch per crop tensor (views of equal length batched).
    ``pack=True`` (``views.pack``): with two or more crop tensors, every view runs in ONE packed
    sequence with block-diagonal attention (:meth:`FViT.forward_packed`; same outputs and gradients
    up to float rounding, drop-path still per view); a single crop tensor (the teacher's globals)
    is already one batch and runs unpacked.

    State dict: ``backbone.*`` (the fViT, reference names) and ``head.*`` (DINO head), the layout of
    the reference's SSL checkpoint without ``module.``.
    """

    def __init__(self, backbone: FViT, head: DINOHead, pack: bool = False) -> None:
        super().__init__()
        self.backbone, self.head, self.pack = backbone, head, pack

    def forward(
        self, crops: list[torch.Tensor], return_features: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """-> head outputs (sum n_i, K), and with ``return_features`` also the backbone's CLS
        embeddings (sum n_i, D) in the same row order."""
        if self.pack and len(crops) > 1:
            feats = self.backbone(list(crops))  # a list runs FViT.forward_packed (and its compiled form)
        else:
            feats = torch.cat([self.backbone(c) for c in crops])
        out = self.head(feats)
        return (out, feats) if return_features else out


def _all_reduce(x: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """``x`` reduced in place over every rank ("sum" or "max") when a process group runs; ``x`` itself otherwise."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(x, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return x


@torch.no_grad()
def sinkhorn_knopp(teacher_out: torch.Tensor, teacher_temp: float, n_iters: int = 3) -> torch.Tensor:
    """DINOv2's teacher targets: ``exp(t / tau)`` rescaled alternately so that every prototype gets
    the same total mass over the (global, all-ranks) batch and every sample a total of 1.

    teacher_out: (G*B, K) any float dtype -> (G*B, K) fp32, rows summing to 1. The column sums are
    all-reduced (the batch spans every rank), the row sums are local. No host sync."""
    logits = teacher_out.float() / teacher_temp
    # exp of logits shifted by the global max: same targets (every rescaling removes the shift), no overflow
    shift = _all_reduce(logits.max().reshape(1), "max")
    q = torch.exp(logits - shift).t()  # (K, n)
    k = q.shape[0]
    # total mass and sample count over every rank in one collective (the count a fill: no host data)
    total, n = _all_reduce(torch.cat((q.sum().reshape(1), q.new_full((1,), float(q.shape[1]))))).unbind()
    q = q / total
    for _ in range(n_iters):
        q = q / _all_reduce(q.sum(dim=1, keepdim=True)) / k  # each prototype: 1/K of the mass
        q = q / q.sum(dim=0, keepdim=True) / n  # each sample: 1/n of the mass
    return (q * n).t()


def koleo_loss(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """KoLeo (Sablayrolles et al. 2019; DINOv2): ``-mean_i log ||x_i - x_nn(i)||`` over the
    L2-normalised rows of ``x`` (B, D), ``nn(i)`` the nearest other row. () fp32; needs B >= 2.
    Minimising it spreads the embeddings over the sphere (a collapsed batch scores +inf-ish).
    fp32 under any autocast: a bf16 similarity would pick near-tied neighbours at random."""
    with torch.autocast(x.device.type, enabled=False):
        x = F.normalize(x.float(), dim=-1, eps=eps)
        sim = x @ x.t()
        sim = sim - 3.0 * torch.eye(x.shape[0], device=x.device, dtype=sim.dtype)  # never its own neighbour
        nearest = x[sim.argmax(dim=1)]
        return -torch.log((x - nearest).norm(dim=-1) + eps).mean()


class DINOLoss(nn.Module):
    """The LAFS / DINO multi-view loss with centering.

    forward(student_out (V*B, K), teacher_out (G*B, K), teacher_temp) -> loss () fp32; both inputs
    view-major (view v occupies rows v*B .. v*B + B - 1; teacher views are the student's first G).
    The centre is updated from ``teacher_out`` after the loss is computed (DINO's order).
    """

    def __init__(
        self,
        out_dim: int,
        n_views: int,
        n_global: int = 2,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        centering: str = "center",
    ) -> None:
        super().__init__()
        if centering not in ("center", "sinkhorn"):
            raise ValueError(f"centering must be 'center' or 'sinkhorn', not {centering!r}")
        self.n_views, self.n_global = n_views, n_global
        self.student_temp, self.center_momentum, self.centering = student_temp, center_momentum, centering
        # kept in both modes: with sinkhorn the centre is not used by the loss, but the health log reads it
        self.register_buffer("center", torch.zeros(1, out_dim))

    def targets(self, teacher_out: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """The teacher's targets q (G*B, K) fp32, no gradient: centred softmax or Sinkhorn-Knopp."""
        if self.centering == "sinkhorn":
            return sinkhorn_knopp(teacher_out, teacher_temp)
        # a bf16 teacher_out minus the fp32 centre is computed in fp32 (exact upcast): no .float() copy first
        return F.softmax((teacher_out - self.center) / teacher_temp, dim=-1).detach()

    def forward(
        self, student_out: torch.Tensor, teacher_out: torch.Tensor, teacher_temp: float, return_targets: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """-> loss (), and with ``return_targets`` also the targets q (G*B, K) fp32 it used: the
        centred softmax that the health metrics read too (:func:`lafs_fast.train.health.dino_health`'s
        ``q``), computed once per step over the K prototypes instead of twice."""
        # fp32 throughout, as the spec computes it: under bf16 autocast the einsum below would run as a
        # bf16 bmm (3 significant digits on a sum over 100k prototypes)
        with torch.autocast(student_out.device.type, enabled=False):
            loss, q = self._loss(student_out, teacher_out, teacher_temp)
        return (loss, q) if return_targets else loss

    def _loss(
        self, student_out: torch.Tensor, teacher_out: torch.Tensor, teacher_temp: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        v, g = self.n_views, self.n_global
        logp = F.log_softmax(student_out.float() / self.student_temp, dim=-1).view(v, -1, student_out.shape[-1])
        targets = self.targets(teacher_out, teacher_temp)
        q = targets.view(g, -1, teacher_out.shape[-1])
        b = q.shape[1]
        # cross[i, j] = mean_b sum_k -q_i log p_j: every (teacher view, student view) pair at once
        cross = -torch.einsum("gbk,vbk->gv", q, logp) / b
        # v != q: a view never predicts itself (a select, not a boolean index: no host sync)
        off_diagonal = ~torch.eye(g, v, dtype=torch.bool, device=cross.device)
        loss = torch.where(off_diagonal, cross, 0.0).sum() / (g * v - g)
        self.update_center(teacher_out)
        return loss, targets

    @torch.no_grad()
    def update_center(self, teacher_out: torch.Tensor) -> None:
        """c <- m c + (1 - m) * mean of the teacher outputs over every rank's batch.

        The row count rides in the same all-reduce as the sums, made on the device (a fill, not a
        copy from host data): no host sync, one collective."""
        out = teacher_out.float()
        stats = _all_reduce(torch.cat((out.sum(dim=0), out.new_full((1,), float(out.shape[0]))))[None])  # (1, K + 1)
        batch_center = stats[:, :-1] / stats[:, -1:]
        self.center.mul_(self.center_momentum).add_(batch_center * (1 - self.center_momentum))


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, parameter by parameter."""
    t = [p for p in teacher.parameters()]
    s = [p.detach() for p in student.parameters()]
    if len(t) != len(s):
        raise ValueError("teacher and student have different parameter lists")
    torch._foreach_mul_(t, momentum)
    torch._foreach_add_(t, s, alpha=1.0 - momentum)


def build_dino_models(cfg: Config) -> tuple[MultiCrop, MultiCrop]:
    """(student, teacher): fViT + DINO head each; the teacher starts as a copy of the student and
    is never trained by the optimiser."""
    d = cfg.dino
    student = MultiCrop(
        build_backbone(cfg.model),
        DINOHead(cfg.model.dim, d.out_dim, d.hidden_dim, d.bottleneck_dim, d.norm_last_layer),
        pack=cfg.views.pack,
    )
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return student, teacher


class DinoStage(Stage):
    """LAFS pre-training as an engine stage. ``model`` is the student; the teacher, the loss centre
    and the view maker live here.

    batch: (images (B, H, W, 3) uint8, labels (B,) ignored[, positions (B,) int64 record positions,
    for ``--landmarks detector``]).
    """

    name = "pretrain"

    def __init__(
        self,
        cfg: Config,
        device: torch.device,
        views: LafsViews | None = None,
        student: MultiCrop | None = None,
        teacher: MultiCrop | None = None,
        detector: DetectorLandmarks | None = None,
        precision: str | None = None,
    ) -> None:
        """``precision``: the run's, "bf16" | "fp32", resolved once by the command (None: resolve
        ``train.precision`` for ``device`` here, a library caller's stage)."""
        self.cfg = cfg
        if student is None:
            student, teacher = build_dino_models(cfg)
        elif teacher is None:
            teacher = copy.deepcopy(student).requires_grad_(False)
        self.model = student.to(device)
        self.teacher = teacher.to(device)
        self.teacher.train(cfg.dino.teacher_mode == "train")
        # the views' tokens in the run's compute dtype (bf16 regime: bf16 tokens on every device)
        precision = precision or resolve_precision(cfg.train.precision, device)
        tok_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        self.views = (views or LafsViews(cfg.views, cfg.model, out_dtype=tok_dtype, detector=detector)).to(device)
        n_views = cfg.views.n_global + cfg.views.n_local
        self.loss_fn = DINOLoss(
            cfg.dino.out_dim,
            n_views,
            cfg.views.n_global,
            cfg.dino.student_temp,
            cfg.dino.center_momentum,
            cfg.dino.centering,
        ).to(device)
        self.watch = CollapseWatch(cfg.dino.out_dim)

    # -- schedules and optimiser

    def schedules(self, plan: Plan) -> dict[str, np.ndarray]:
        d = self.cfg.dino
        return {
            "teacher_momentum": cosine_schedule(d.teacher_momentum, 1.0, plan.epochs, plan.steps_per_epoch),
            "teacher_temp": linear_then_constant(
                d.teacher_temp_start, d.teacher_temp_end, d.teacher_temp_epochs, plan.epochs, plan.steps_per_epoch
            ),
        }

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        return param_groups(model)

    # -- one micro-batch

    def forward_loss(
        self, model: nn.Module, batch: Any, ctx: StepContext
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """-> (loss (), health metrics: () fp32 device tensors, :func:`lafs_fast.train.health.dino_health`)."""
        images = batch[0]
        vb = self.views(images, ctx.seed, positions=batch[2] if len(batch) > 2 else None)
        with (
            torch.no_grad()
        ):  # backbone then head: what MultiCrop does for one crop tensor, keeping the CLS for the health log
            teacher_emb = self.teacher.backbone(vb.global_tokens)
            teacher_out = self.teacher.head(teacher_emb)
        koleo_weight = self.cfg.dino.koleo_weight
        student_out, student_emb = model(vb.crops(), return_features=True)
        center = self.loss_fn.center.clone()  # the loss updates it in place after use
        teacher_temp = ctx.values["teacher_temp"]
        loss, q = self.loss_fn(student_out, teacher_out, teacher_temp, return_targets=True)
        # the centred softmax is the loss's own targets (computed once); Sinkhorn targets are not it
        shared = q if self.loss_fn.centering == "center" else None
        health = dino_health(teacher_out, center, teacher_temp, loss, teacher_emb, q=shared)
        if koleo_weight > 0:  # DINOv2: per global view, over that view's batch
            g, b = self.cfg.views.n_global, teacher_out.shape[0] // self.cfg.views.n_global
            koleo = sum(koleo_loss(student_emb[i * b : (i + 1) * b]) for i in range(g))
            health["koleo"] = koleo.detach()
            loss = loss + koleo_weight * koleo
        return loss, health

    progress_keys = ("teacher_entropy", "teacher_batch_entropy")

    def check_health(self, step: int, record: dict[str, float]) -> str | None:
        return self.watch.update(step, record)

    def before_optimizer_step(self, model: nn.Module, ctx: StepContext) -> None:
        if ctx.epoch < self.cfg.dino.freeze_last_layer_epochs:
            for name, p in self.model.named_parameters():
                if "last_layer" in name:
                    p.grad = None  # DINO's cancel_gradients_last_layer: AdamW skips it entirely

    def after_optimizer_step(self, model: nn.Module, ctx: StepContext) -> None:
        ema_update(self.teacher, self.model, ctx.values["teacher_momentum"])

    # -- state

    def state_dict(self) -> dict[str, Any]:
        return {"teacher": self.teacher.state_dict(), "center": self.loss_fn.center.detach().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.teacher.load_state_dict(state["teacher"])
        self.loss_fn.center.copy_(state["center"])

    def compile_targets(self) -> list[nn.Module]:
        return [self.model.backbone, self.teacher.backbone]

    def export(self) -> dict[str, Any]:
        """The teacher (backbone + DINO head) as a lafs-fast model file: what fine-tuning reads."""
        return model_file(
            self.cfg.model, self.teacher.backbone, dino_head=self.teacher.head, source="lafs-fast pretrain (teacher)"
        )

    def finite_tensors(self) -> list[torch.Tensor]:
        return list(self.model.parameters()) + list(self.teacher.parameters()) + [self.loss_fn.center]
