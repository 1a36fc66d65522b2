"""Training health of DINO / LAFS pre-training: the numbers that say whether a run learns or collapses.

DINO has two ways to fail (Caron et al. 2021, section 5.3 / figure 7), both visible in the teacher's
centred, sharpened output ``q = softmax((t - c) / tau_t)`` over K prototypes:

- **one prototype wins**: every sample puts its mass on the same prototype. The per-sample entropy
  ``mean_b H(q_b)`` -> 0 AND the entropy of the batch mean ``H(mean_b q_b)`` -> 0 (sharpening without
  enough centering);
- **uniform**: every sample's output is flat. ``mean_b H(q_b)`` -> log K (and the batch mean is flat
  too; centering without enough sharpening). The loss then sits at log K (+ the student's KL).

Both are cases of the teacher's output no longer depending on its input: then every sample's q is
the batch mean q, and the per-sample entropy EQUALS the batch-mean entropy (their difference is the
mutual information between the sample and its prototype). A run also passes through that state at
intermediate entropies (every sample the same non-flat output; the centre, an EMA of that output,
then flattens it towards uniform within ~1 / (1 - centre momentum) steps). A healthy run keeps the
per-sample entropy well below the batch-mean entropy (different samples pick different prototypes).
:func:`dino_health` computes these on the device
(no host sync: the engine brings them to the host one step late, with the loss);
:class:`CollapseWatch` reads them on the host and says once when a run has collapsed.
docs/training_health.md shows measured healthy and collapsed curves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["dino_health", "CollapseWatch", "HEALTH_KEYS"]

# metric names in metrics.jsonl / TensorBoard (and what they mean, for docs/training_health.md)
HEALTH_KEYS = ("teacher_entropy", "teacher_batch_entropy", "kl", "center_norm", "embed_std")


def _entropy(p: torch.Tensor) -> torch.Tensor:
    """Entropy in nats along the last dim of probabilities p (..., K); 0 log 0 = 0."""
    return -(p * torch.log(p.clamp_min(1e-30))).sum(dim=-1)


@torch.no_grad()
def dino_health(
    teacher_out: torch.Tensor,
    center: torch.Tensor,
    teacher_temp: float,
    loss: torch.Tensor,
    embeddings: torch.Tensor,
    q: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Health metrics of one step, all () fp32 device tensors.

    Args:
        teacher_out: (G*B, K) any float dtype, the teacher head's output on the global views.
        center: (1, K) fp32, the centre the loss used at this step (read BEFORE the loss updates it).
        teacher_temp: this step's teacher temperature.
        loss: () the DINO loss of the step: the mean over (teacher view i, student view j != i) pairs
            of the cross-entropy ``H(q_i, p_j)``.
        embeddings: (G*B, D) the teacher backbone's CLS embeddings of the same views.
        q: (G*B, K) fp32 ``softmax((teacher_out - center) / teacher_temp)`` where the caller has it
            already (the DINO loss's targets: one softmax over the K prototypes a step, not two);
            None computes it here.

    Returns ``teacher_entropy`` (mean per-sample H(q), nats), ``teacher_batch_entropy`` (H of the
    batch-mean q), ``kl`` (mean student-teacher KL(q_i || p_j) over the loss's pairs: cross-entropy
    minus H(q_i); every teacher view sits in the same number of pairs, so it is ``loss -
    teacher_entropy``), ``center_norm`` (||c||_2) and ``embed_std`` (the population std across the batch of the
    L2-normalised embeddings, averaged over dimensions and scaled by sqrt(D): 1 at most, since by
    Jensen it is at most sqrt(1 - ||batch mean||^2) (samples spread evenly over the sphere's
    directions), 0 when every sample has the same embedding).
    """
    if q is None:
        q = F.softmax((teacher_out.float() - center.float()) / teacher_temp, dim=-1)
    h = _entropy(q).mean()
    e = F.normalize(embeddings.float(), dim=-1)
    return {
        "teacher_entropy": h,
        "teacher_batch_entropy": _entropy(q.mean(dim=0)),
        "kl": loss.detach().float() - h,
        "center_norm": center.float().norm(),
        "embed_std": e.std(dim=0, correction=0).mean() * math.sqrt(e.shape[-1]),
    }


@dataclass
class CollapseWatch:
    """Reads each step's health metrics on the host and names a collapse once.

    A step looks collapsed when the teacher's output hardly depends on the sample: the batch-mean
    entropy exceeds the per-sample entropy by less than ``info_frac * log K`` nats. Its mode:
    'uniform' (per-sample entropy above ``uniform_frac * log K``), 'one prototype' (batch-mean
    entropy below ``one_frac * log K``), else 'identical outputs'. The run is declared collapsed
    after ``patience`` such steps in a row, after ``grace`` steps (a run from random init starts
    near uniform).
    """

    out_dim: int
    info_frac: float = 0.02
    uniform_frac: float = 0.9
    one_frac: float = 0.1
    patience: int = 10
    grace: int = 10
    said: bool = False
    _streak: int = 0

    def mode(self, record: dict[str, float]) -> str:
        """'uniform', 'one prototype', 'identical outputs' or '' (healthy) for one step's host metrics."""
        log_k = math.log(self.out_dim)
        h, hb = record["teacher_entropy"], record["teacher_batch_entropy"]
        if hb - h >= self.info_frac * log_k:
            return ""
        if h > self.uniform_frac * log_k:
            return "uniform"
        if hb < self.one_frac * log_k:
            return "one prototype"
        return "identical outputs"

    def update(self, step: int, record: dict[str, float]) -> str | None:
        """One line the first time the run has collapsed, else None. ``step``: the step of ``record``
        as metrics.jsonl counts it (1 = after the first optimiser step)."""
        if self.said or "teacher_entropy" not in record or "teacher_batch_entropy" not in record:
            return None
        mode = self.mode(record)
        self._streak = self._streak + 1 if mode else 0  # a collapse may pass from one mode to the next
        if step <= self.grace or self._streak < self.patience:
            return None
        self.said = True
        log_k = math.log(self.out_dim)
        h, hb = record["teacher_entropy"], record["teacher_batch_entropy"]
        if mode == "uniform":
            what = (
                f"the teacher's output is UNIFORM for every face "
                f"(per-sample entropy {h:.3f} of log K = {log_k:.3f} nats)"
            )
        elif mode == "one prototype":
            what = f"ONE PROTOTYPE wins for every face (batch-mean entropy {hb:.3f} of log K = {log_k:.3f} nats)"
        else:
            what = (
                f"the teacher gives EVERY FACE THE SAME output (per-sample entropy {h:.3f} = batch-mean entropy "
                f"{hb:.3f} nats); centering flattens it to uniform next"
            )
        what += (
            "; try DINOv2's Sinkhorn-Knopp targets and KoLeo (dino.centering=sinkhorn dino.koleo_weight=1, the "
            "small preset's recipe), a slower teacher (dino.teacher_momentum closer to 1), a lower lr (optim.lr) or, "
            "for one prototype, a higher teacher temperature"
        )
        return f"COLLAPSE since step {step + 1 - self.patience}: {what}. See docs/training_health.md."
