"""The guard before a run that cannot fit (issue 24, item 5): a rough analytic estimate of one
process's peak memory for a resolved config, checked against what the device has free before any
model is built or compiled.

The estimate (bytes, one training process; :func:`estimate`):

- **runtime**: Python, torch and the libraries, ``RUNTIME_BYTES`` (the supervised stages' augmentation
  adds a little); on the CPU each data-loader worker
  process adds ``WORKER_BYTES``; ``train.compile`` adds ``COMPILE_BYTES`` (inductor's compile
  workers and graphs); on CUDA the context adds ``CUDA_CONTEXT_BYTES``.
- **weights**: trainable parameters x 16 bytes (fp32 weight, gradient, AdamW's two moments), frozen
  copies (the DINO teacher, the frozen stage-0 landmark CNN) x 4 bytes. The counts are the models'
  exact ones (:func:`lafs_fast.config.backbone_parameters`, :func:`dino_head_parameters`), counted without importing
  the models: the check must come seconds after the command starts, before torch's compiler loads.
- **activations**: what autograd keeps for backward, per token and block ``4 dim + 5 inner + 2 mlp``
  values (the two LayerNorms' inputs and outputs, q/k/v, the attention output and its softmax
  statistics, the MLP's two hidden tensors) plus ``(2 dim + mlp) / 4`` for the dropout masks, times
  4 bytes (fp32) or 2 (bf16), times every view's tokens (+ CLS) x depth x the per-process batch; the
  landmark CNN (supervised stages) adds ``LANDMARK_CNN_BYTES_PER_IMAGE`` per image at 112 x 112.
- **head**: DINO: the student's logits over every view and the teacher's over the global views,
  three (batch, out_dim) fp32 tensors each (logits, softmax / targets, their gradient); supervised:
  four (batch, classes) tensors.
- **inputs**: the batch's images and view tokens, a few copies.

Calibrated against the peak RSS of small-preset runs on the CPU at two batch sizes each
(``benchmarks/peak_memory.py``; docs/performance.md, "The memory guard"): pre-training's slope, 28
MB per image measured, is the activation count's 29.7 MB unchanged; fine-tuning's 22 MB per image
set the landmark CNN's share (13 MB) and the intercepts set the runtimes. It is meant
to tell a run that fits from one that is several times too large (the reference preset on a laptop:
about 40 GB for pre-training at batch 82), not to predict the last hundred megabytes; the refusal
says how to force the run anyway (``--no-memory-check``).

On the CPU the guard also says, in one warning line, when a step will be slow: a rough estimate of
the seconds per step, the step's matmul FLOPs (:func:`step_flops`: forward + backward = 3 forwards)
over the machine's fp32 matmul speed (measured in ~0.1 s) times ``CPU_EFFICIENCY``.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from lafs_fast.config import Config, backbone_parameters
from lafs_fast.errors import available_ram

log = logging.getLogger(__name__)

__all__ = [
    "Estimate",
    "estimate",
    "available_memory",
    "check_memory",
    "guard_process",
    "run_facts",
    "step_flops",
    "GB",
]

GB = 1024**3
# measured (docs/performance.md, "The memory guard"): the intercepts of peak RSS against the batch
RUNTIME_BYTES = {"pretrain": int(0.45 * GB), "supervised": int(0.6 * GB)}
WORKER_BYTES = int(0.12 * GB)  # a PIL decode worker (rec / image-folder data on the CPU), not measured
COMPILE_BYTES = int(1.0 * GB)
CUDA_CONTEXT_BYTES = int(0.6 * GB)
LANDMARK_CNN_BYTES_PER_IMAGE = 13 * 1024**2  # measured: MobileNetV3 at 112 x 112, fp32, what backward keeps
LANDMARK_CNN_MACS = 60e6  # its multiply-adds per 112 x 112 image
LANDMARK_CNN_PARAMS = 2_872_928  # model.landmark_cnn=mobilenetv3 (a timm:<name> CNN is counted alike)
CPU_EFFICIENCY = 0.33  # measured: a small-preset pre-training step's matmul FLOP/s over a bare matmul's
SLOW_STEP_S = 60.0  # a CPU step estimated slower than this is warned about (the small preset's: seconds)
SLOW_CPU_FLOPS = 5e9  # a slow laptop core's matmul: a step under SLOW_STEP_S even there needs no measuring


@dataclass
class Estimate:
    """One process's estimated peak memory, by part (bytes), and its step's FLOPs."""

    parts: dict[str, int] = field(default_factory=dict)
    flops: float = 0.0

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def describe(self) -> str:
        return ", ".join(f"{k} {v / GB:.1f}" for k, v in self.parts.items() if v >= 0.05 * GB)


def dino_head_parameters(dim: int, d: Any) -> int:
    """The DINO head's: the MLP dim -> hidden -> hidden -> bottleneck and the weight-normed last layer."""
    h, b = d.hidden_dim, d.bottleneck_dim
    return dim * h + h + h * h + h + h * b + b + b * d.out_dim + d.out_dim


def _parameters(cfg: Config, stage: str, num_classes: int) -> tuple[int, int]:
    """(trainable, frozen) parameter counts: the student and its frozen teacher copy (pre-training);
    the landmark CNN, the fViT and the margin head (+ the regulariser's frozen landmark CNN)."""
    backbone = backbone_parameters(cfg.model)
    if stage == "pretrain":
        student = backbone + dino_head_parameters(cfg.model.dim, cfg.dino)
        return student, student
    frozen = LANDMARK_CNN_PARAMS if stage == "finetune" and cfg.finetune.landmark_reg else 0
    return backbone + LANDMARK_CNN_PARAMS + cfg.model.dim * max(num_classes, 1), frozen


def _view_tokens(cfg: Config, stage: str) -> tuple[list[int], list[int]]:
    """(tokens of each student view, tokens of each teacher view), CLS included, per image."""
    m, v = cfg.model, cfg.views
    if stage != "pretrain":
        return [m.num_patches + 1], []
    local = v.local_tokens if v.mode == "lafs" else (v.local_size // m.patch_size) ** 2
    globals_ = [v.global_tokens + 1] * v.n_global
    return globals_ + [local + 1] * v.n_local, globals_


def _activations(cfg: Config, stage: str, bytes_per_value: int) -> int:
    """Bytes autograd keeps for backward over one per-process batch (student / trainable model)."""
    m, b = cfg.model, cfg.optim.batch_size
    inner = m.heads * m.head_dim
    per_token_block = 4 * m.dim + 5 * inner + 2 * m.mlp_dim + (2 * m.dim + m.mlp_dim) // 4
    student, _ = _view_tokens(cfg, stage)
    acts = sum(student) * m.depth * per_token_block * bytes_per_value * b
    if stage != "pretrain":
        acts += LANDMARK_CNN_BYTES_PER_IMAGE * b
    return acts


def _head(cfg: Config, stage: str, num_classes: int) -> int:
    b = cfg.optim.batch_size
    if stage == "pretrain":
        student, teacher = _view_tokens(cfg, stage)
        return 3 * 4 * b * cfg.dino.out_dim * (len(student) + len(teacher))
    return 4 * 4 * b * max(num_classes, 1)


def step_flops(cfg: Config, stage: str) -> float:
    """Matmul FLOPs of one optimiser step of one process (rough): the student's forward + backward
    (3 x forward), the teacher's forward (pre-training), the landmark CNN's (supervised)."""
    m = cfg.model
    inner = m.heads * m.head_dim
    student, teacher = _view_tokens(cfg, stage)

    def forward_macs(tokens: list[int]) -> float:
        per_block = sum(t * (4 * m.dim * inner + 2 * m.dim * m.mlp_dim + 2 * t * inner) for t in tokens)
        return per_block * m.depth + sum(tokens) * 3 * m.patch_size**2 * m.dim

    macs = 3 * forward_macs(student) + forward_macs(teacher)
    if stage != "pretrain":
        macs += 3 * LANDMARK_CNN_MACS
    return 2.0 * macs * cfg.optim.batch_size * cfg.optim.accumulation


def estimate(cfg: Config, stage: str, num_classes: int = 0, device: str = "cpu", precision: str = "fp32") -> Estimate:
    """One process's peak memory for ``cfg`` (``stage``: "pretrain", "train-landmarks" or "finetune";
    ``num_classes``: the supervised head's, 0 for pre-training) on a ``device`` type in ``precision``."""
    trainable, frozen = _parameters(cfg, stage, num_classes)
    runtime = RUNTIME_BYTES["pretrain" if stage == "pretrain" else "supervised"]
    runtime += COMPILE_BYTES if cfg.train.compile else 0
    synthetic = not cfg.data.path or cfg.data.path.startswith("synthetic")  # rendered in-process, no workers
    runtime += CUDA_CONTEXT_BYTES if device == "cuda" else 0 if synthetic else WORKER_BYTES * cfg.data.workers
    s = cfg.model.image_size
    student, _ = _view_tokens(cfg, stage)
    inputs = cfg.optim.batch_size * (3 * s * s * 4 * 3 + sum(student) * 3 * cfg.model.patch_size**2 * 4 * 2)
    parts = {
        "runtime": runtime,
        "weights + AdamW": 16 * trainable + 4 * frozen,
        "activations": _activations(cfg, stage, 2 if precision == "bf16" else 4),
        "head outputs": _head(cfg, stage, num_classes),
        "inputs": inputs,
    }
    return Estimate(parts, step_flops(cfg, stage))


def available_memory(device: torch.device) -> tuple[int, str]:
    """(bytes free, what they are): the GPU's free memory on CUDA, else the RAM the kernel says is
    available (/proc/meminfo MemAvailable; the free pages elsewhere)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free), f"free on {torch.cuda.get_device_name(device)}"
    avail = available_ram()
    if avail is not None:
        return avail, "RAM available"
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "RAM free"


def _cpu_matmul_flops() -> float:
    """This machine's fp32 matmul speed (FLOP/s), measured on a few 512 x 512 products (~0.1 s)."""
    a = torch.randn(512, 512)
    a @ a  # warm-up
    n, start = 0, time.perf_counter()
    while n < 4 or time.perf_counter() - start < 0.05:
        a @ a
        n += 1
    return 2 * 512**3 * n / (time.perf_counter() - start)


def check_memory(
    cfg: Config,
    stage: str,
    device: torch.device,
    precision: str,
    *,
    num_classes: int = 0,
    processes: int = 1,
    warn: bool = True,
) -> Estimate:
    """Refuse (ValueError, one sentence) a run whose estimated peak exceeds the device's free memory:
    on the CPU ``processes`` processes of this machine share the RAM. On the CPU a slow step is said
    in one warning line (``warn``: rank 0). Returns the estimate."""
    est = estimate(cfg, stage, num_classes, device.type, precision)
    share = processes if device.type == "cpu" else 1
    need = est.total * share
    free, what = available_memory(device)
    if need > free:
        each = f" ({share} processes x {est.total / GB:.1f} GB)" if share > 1 else ""
        raise ValueError(
            f"this run needs about {need / GB:.1f} GB{each} ({est.describe()} GB, a rough estimate) but only "
            f"{free / GB:.1f} GB is {what}; use --preset small, a smaller --batch-size (now "
            f"{cfg.optim.batch_size}) or a smaller model, or --no-memory-check to run it anyway"
        )
    if device.type == "cpu" and warn and est.flops > SLOW_STEP_S * SLOW_CPU_FLOPS * CPU_EFFICIENCY:
        seconds = est.flops / (_cpu_matmul_flops() * CPU_EFFICIENCY)
        if seconds > SLOW_STEP_S:
            log.warning(
                f"[{stage}] warning: on this CPU a step of this config takes roughly {seconds:,.0f} s (a rough "
                f"estimate from its {est.flops / 1e12:.1f} TFLOP; about {est.total / GB:.1f} GB of memory); "
                "--preset small is the CPU recipe"
            )
    return est


def run_facts(cfg: Config, stage: str, device: torch.device, source: str) -> tuple[int, str]:
    """(the supervised head's classes from the data ``source``, 0 for pre-training; the precision the
    run resolves on ``device``): what :func:`estimate` needs besides the config."""
    from lafs_fast.data.sources import open_source
    from lafs_fast.launch import resolve_precision

    classes = 0 if stage == "pretrain" else int(open_source(source)[1].num_classes)
    return classes, resolve_precision(cfg.train.precision, device)


def guard_process(
    cfg: Config, stage: str, device: torch.device, source: str, *, processes: int = 1, warn: bool = True
) -> Estimate:
    """:func:`check_memory` for a training command, before any model is built: the precision the run
    resolves on ``device``, the supervised head's classes from the data ``source`` (the full set: a
    few-shot subset has fewer), ``processes`` of this machine sharing its RAM."""
    classes, precision = run_facts(cfg, stage, device, source)
    return check_memory(cfg, stage, device, precision, num_classes=classes, processes=processes, warn=warn)
