"""Typed configuration: dataclasses, presets, a YAML file and ``section.key=value`` overrides.

One config tree serves every stage::

    cfg = load_config(preset="small", yaml_path=None, overrides=["model.dim=256", "optim.epochs=3"])

Presets: ``reference`` (every value of docs/method.md; the dataclass defaults) and ``small`` (fast on
a CPU). Unknown keys and values of the wrong type or outside a field's choices are rejected with the
key's name (ValueError). ``lafs-fast config show STAGE --preset P k=v ...`` (lafs_fast.train.config_show)
prints the tree that stage's run resolves, and ``--help-keys`` every key with its help text.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "Config",
    "ModelConfig",
    "DinoConfig",
    "ViewsConfig",
    "OptimConfig",
    "FinetuneConfig",
    "DataConfig",
    "TrainConfig",
    "PRESETS",
    "load_config",
    "apply_overrides",
    "config_to_dict",
    "config_from_dict",
    "config_yaml",
    "keys_help",
    "backbone_parameters",
]


@dataclass(frozen=True)
class Range:
    """The interval a numeric field's value (a tuple field's: each element) must lie in, written beside
    the field; ``None``: unbounded on that side."""

    lo: float | None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def holds(self, v: float) -> bool:
        if not math.isfinite(v):  # NaN compares False with both bounds; inf passes an open-ended range
            return False
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        return not (self.hi is not None and (v >= self.hi if self.hi_open else v > self.hi))

    def __str__(self) -> str:
        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {self.lo:g}"
        return f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"


POSITIVE = Range(0, lo_open=True)
NON_NEGATIVE = Range(0)
UNIT = Range(0, 1)  # a probability or a momentum
UNIT_OPEN_LOW = Range(0, 1, lo_open=True)  # a scale or a fraction that must not be 0
ATTENTION_BACKENDS = ("auto", "xformers", "sdpa", "math")  # model.attention; lafs_fast.models.attention picks


def choice(default: Any, *choices: Any, help: str = "") -> Any:  # noqa: A002 - matches argparse
    """A field restricted to ``choices`` (checked on every override)."""
    return field(default=default, metadata={"choices": choices, "help": help})


def doc(default: Any, help: str, rng: Range | None = None) -> Any:  # noqa: A002
    """A field with its help text (``lafs-fast config show``) and, for a number, its allowed range."""
    return field(default=default, metadata={"help": help, "range": rng})


@dataclass
class ModelConfig:
    """The fViT backbone and the landmark CNN (docs/method.md section 2)."""

    image_size: int = doc(112, "input face size (aligned, square)", rng=POSITIVE)
    patch_size: int = doc(8, "patch side P; a token has 3*P*P values", rng=POSITIVE)
    num_patches: int = doc(196, "landmarks per face = tokens of a dense view (positions 0..num_patches)", rng=POSITIVE)
    dim: int = doc(768, "token / embedding width; a face's embedding has this size (reference 768)", rng=POSITIVE)
    depth: int = doc(12, "transformer blocks (reference 12)", rng=POSITIVE)
    heads: int = doc(
        11,
        "attention heads (reference 11); q, k, v are heads * head_dim wide (704 at the reference), not dim",
        rng=POSITIVE,
    )
    head_dim: int = doc(64, "width of one attention head (reference 64)", rng=POSITIVE)
    mlp_dim: int = doc(2048, "hidden width of each block's GELU MLP (reference 2048)", rng=POSITIVE)
    dropout: float = doc(0.1, "dropout in attention output and MLP", rng=UNIT)
    emb_dropout: float = doc(0.1, "dropout after adding the position embedding", rng=UNIT)
    drop_path: float = doc(0.1, "stochastic depth, the SAME rate in every block (reference), not a ramp", rng=UNIT)
    ln_eps: float = doc(
        1e-5, "LayerNorm epsilon (reference 1e-5; export to the reference's layout needs 1e-5)", rng=POSITIVE
    )
    attn_scale: str = choice(
        "dim", "dim", "head_dim", help="softmax scale dim**-0.5 (reference quirk) or head_dim**-0.5"
    )
    attention: str = choice("auto", *ATTENTION_BACKENDS, help="attention backend")
    token_init_std: float = doc(1.0, "std of the CLS / position embedding init (reference N(0, 1))", rng=NON_NEGATIVE)
    landmark_cnn: str = doc("mobilenetv3", "'mobilenetv3' (reference layout, weight-compatible) or 'timm:<name>'")
    landmark_dropout: float = doc(0.5, "dropout before the landmark regression layer", rng=UNIT)
    landmark_start: str = choice(
        "random",
        "random",
        "grid",
        help="where a landmark CNN trained from scratch starts: its random init's points (reference) or the 14 x 14 "
        "patch grid (regression weights 0, bias the grid; the small preset's stage 0, docs/finetuning.md)",
    )


def backbone_parameters(m: ModelConfig) -> int:
    """The fViT's parameter count for a ModelConfig, without building it (the memory guard's and
    ``build_backbone``'s size checks; tests/test_memory_guard.py checks it against the built model):
    position table and CLS, patch embedding, per block a LayerNorm, q/k/v (no bias), the output
    projection, a LayerNorm and the MLP, and the final LayerNorm."""
    inner = m.heads * m.head_dim
    block = (
        2 * m.dim + 3 * inner * m.dim + inner * m.dim + m.dim + 2 * m.dim + 2 * m.dim * m.mlp_dim + m.mlp_dim + m.dim
    )
    return (m.num_patches + 2) * m.dim + (3 * m.patch_size**2 + 1) * m.dim + 2 * m.dim + m.depth * block


@dataclass
class DinoConfig:
    """Stage 1 (docs/method.md section 3): DINO head, temperatures, EMA, centering."""

    out_dim: int = doc(100_000, "prototypes of the weight-normed last layer", rng=POSITIVE)
    hidden_dim: int = doc(
        2048,
        "width of the DINO head's two hidden layers: MLP dim -> hidden -> hidden -> bottleneck, GELU (reference 2048)",
        rng=POSITIVE,
    )
    bottleneck_dim: int = doc(
        256, "width of the DINO head MLP's output, L2-normalised before the last layer (reference 256)", rng=POSITIVE
    )
    student_temp: float = doc(0.1, "student softmax temperature tau_s (reference 0.1)", rng=POSITIVE)
    teacher_temp_start: float = doc(0.07, "teacher temperature at epoch 0 (reference: 0.07, decreasing)", rng=POSITIVE)
    teacher_temp_end: float = doc(0.04, "teacher temperature after the warm-up epochs", rng=POSITIVE)
    teacher_temp_epochs: int = doc(
        30,
        "epochs of the linear teacher-temperature ramp from start to end (set per epoch); then teacher_temp_end",
        rng=NON_NEGATIVE,
    )
    center_momentum: float = doc(
        0.9,
        "EMA momentum of the centre subtracted from the teacher outputs (centering=center; batch mean over all ranks)",
        rng=UNIT,
    )
    centering: str = choice(
        "center",
        "center",
        "sinkhorn",
        help="teacher targets: softmax of the centred output (DINO, reference) or 3 Sinkhorn-Knopp iterations "
        "(DINOv2: every prototype used equally across the batch)",
    )
    koleo_weight: float = doc(
        0.0,
        "weight of DINOv2's KoLeo term, spreading the student's global-view CLS embeddings (0 = off, reference)",
        rng=NON_NEGATIVE,
    )
    teacher_momentum: float = doc(0.996, "EMA momentum at step 0, cosine to 1.0 at the last step", rng=UNIT)
    teacher_mode: str = choice("train", "train", "eval", help="reference keeps the teacher in train mode (dropout on)")
    freeze_last_layer_epochs: int = doc(
        1,
        "the head's last layer gets no update during the first this many epochs (reference: epoch 0)",
        rng=NON_NEGATIVE,
    )
    norm_last_layer: bool = doc(True, "fix the weight norm of the last layer to 1")


@dataclass
class ViewsConfig:
    """LAFS landmark multi-crop (docs/method.md section 3)."""

    mode: str = choice("lafs", "lafs", "dino", help="landmark views, or the DINO-face baseline (image grids)")
    landmarks: str = doc("grid", "'grid', 'detector', or a stage-0 / reference checkpoint path")
    detector_file: str = doc(
        "", "landmark sidecar of --landmarks detector (default: <rec>.landmarks.npz beside the rec)"
    )
    detector_smoothing: float = doc(
        0.3,
        "thin-plate smoothing of the detector landmarks' densification (0: interpolate, large: affine; below ~0.1 "
        "BlazeFace points fold the grid)",
        rng=NON_NEGATIVE,
    )
    n_global: int = doc(
        2,
        "global views per image, seen by teacher and student; they alternate the global-1 and global-2 recipes "
        "(blur_p_global*, solarize)",
        rng=POSITIVE,
    )
    n_local: int = doc(8, "local views per image, seen by the student only (0 = none)", rng=NON_NEGATIVE)
    global_tokens: int = doc(
        196, "tokens of a global view: every landmark in order (lafs mode needs model.num_patches)", rng=POSITIVE
    )
    local_tokens: int = doc(
        36,
        "tokens of a LAFS local view: landmark indices drawn with replacement (the dino baseline's come from "
        "local_size)",
        rng=POSITIVE,
    )
    pack: bool = doc(
        False,
        "student: all views in ONE sequence with block-diagonal attention (xformers on CUDA, exact torch twin "
        "elsewhere) instead of one batch per token length",
    )
    local_size: int = doc(48, "local crop size of the dino baseline (6x6 patches of 8)", rng=POSITIVE)
    local_scale_min: float = doc(
        0.05, "local crop scale of the dino baseline (DINO's 0.05-0.4; lafs locals use crop_scale_*)", rng=UNIT_OPEN_LOW
    )
    local_scale_max: float = doc(0.4, "upper end of local_scale_* (see local_scale_min)", rng=UNIT_OPEN_LOW)
    lafs_local_scale: str = choice(
        "global",
        "global",
        "local",
        help="crop scale of the LAFS local views: the global views' crop_scale_* (the reference) or local_scale_* "
        "(DINO's 0.05-0.4; an ablation, docs/pretraining_study.md)",
    )
    crop_scale_min: float = doc(
        0.4, "RandomResizedCrop area scale of the views, lower end (reference 0.4; aspect 3/4-4/3)", rng=UNIT_OPEN_LOW
    )
    crop_scale_max: float = doc(1.0, "RandomResizedCrop area scale of the views, upper end", rng=UNIT_OPEN_LOW)
    flip_p: float = doc(0.5, "horizontal flip probability of a view", rng=UNIT)
    interpolation: str = choice(
        "bicubic", "bicubic", "bilinear", help="resampling of the view crops (reference bicubic)"
    )
    perturb_sigma: float = doc(5.0, "landmark position noise, px", rng=NON_NEGATIVE)
    jitter_p: float = doc(0.8, "colour jitter probability of a view (the landmark CNN sees the clean copy)", rng=UNIT)
    brightness: float = doc(0.4, "colour jitter brightness: factor uniform in [1 - b, 1 + b]", rng=NON_NEGATIVE)
    contrast: float = doc(0.4, "colour jitter contrast: factor uniform in [1 - c, 1 + c]", rng=NON_NEGATIVE)
    saturation: float = doc(0.2, "colour jitter saturation: factor uniform in [1 - s, 1 + s]", rng=NON_NEGATIVE)
    hue: float = doc(0.1, "colour jitter hue shift, uniform in [-h, h]", rng=Range(0, 0.5))
    grayscale_p: float = doc(0.2, "grayscale probability of a view", rng=UNIT)
    blur_p_global1: float = doc(1.0, "Gaussian blur probability of global view 1 (and 3, 5, ...)", rng=UNIT)
    blur_p_global2: float = doc(0.1, "Gaussian blur probability of global view 2 (and 4, 6, ...)", rng=UNIT)
    blur_p_local: float = doc(0.5, "Gaussian blur probability of a local view", rng=UNIT)
    blur_radius_min: float = doc(
        0.1, "Gaussian blur sigma, px, drawn uniform in [blur_radius_min, blur_radius_max]", rng=NON_NEGATIVE
    )
    blur_radius_max: float = doc(2.0, "upper end of the blur sigma, px", rng=NON_NEGATIVE)
    solarize_p_global2: float = doc(
        0.2, "solarize probability of global view 2 (and 4, 6, ...); other views never solarize", rng=UNIT
    )
    solarize_threshold: int = doc(128, "solarize inverts pixels at or above this uint8 level", rng=Range(0, 256))


@dataclass
class OptimConfig:
    """AdamW with cosine schedules; defaults are the stage-1 reference values."""

    epochs: int = doc(
        41, "training epochs (stage 1 reference 41; stages 0 and 2: 34 with the reference preset)", rng=POSITIVE
    )
    batch_size: int = doc(82, "per-GPU batch", rng=POSITIVE)
    accumulation: int = doc(
        1,
        "micro-batches per optimiser step; global batch = batch_size x processes x accumulation (stages 0 and 2: 3 "
        "with the reference preset)",
        rng=POSITIVE,
    )
    lr: float = doc(5e-4, "peak lr per 256 samples of global batch (scaled linearly)", rng=NON_NEGATIVE)
    min_lr: float = doc(1e-6, "lr at the end of the cosine decay", rng=NON_NEGATIVE)
    warmup_epochs: int = doc(
        10, "epochs of linear lr warm-up from 0 to the peak (stage 1 reference 10; stages 0 and 2: 5)", rng=NON_NEGATIVE
    )
    weight_decay: float = doc(
        0.04,
        "AdamW weight decay at step 0, cosine to weight_decay_end; none on biases and 1-D parameters (stages 0 and "
        "2: 0.1, constant)",
        rng=NON_NEGATIVE,
    )
    weight_decay_end: float = doc(
        0.4, "weight decay at the last step (stage 1 reference 0.4; stages 0 and 2: 0.1)", rng=NON_NEGATIVE
    )
    landmark_weight_decay: float = doc(0.05, "weight decay of landmark-CNN weights (stages 0 and 2)", rng=NON_NEGATIVE)
    clip_grad: float = doc(3.0, "per-parameter gradient-norm clip (0 = off)", rng=NON_NEGATIVE)
    layer_decay: float = doc(
        1.0, "layer-wise lr decay (1.0 = off, the reference's effective behaviour)", rng=UNIT_OPEN_LOW
    )
    betas: tuple[float, float] = doc((0.9, 0.999), "AdamW (beta1, beta2)", rng=Range(0, 1, hi_open=True))


@dataclass
class FinetuneConfig:
    """Stages 0 and 2 (docs/method.md section 4)."""

    init: str = doc(
        "",
        "starting weights (--init): stage 2's fViT from lafs-fast pretrain's teacher.pt / ckpt-*.pt or the reference's "
        "SSL checkpoint; stage 0: optional, a Part fViT model file or reference checkpoint ('' = none)",
    )
    landmarks: str = doc(
        "",
        "stage 2's landmark CNN (--landmarks): train-landmarks' part_fvit.pt or the reference's Part fViT checkpoint, "
        "'scratch', or 'grid' (from scratch, its output starting at the patch grid); '' = --init's own if it has one",
    )
    head: str = choice(
        "cosface",
        "cosface",
        "arcface",
        "softmax",
        help="margin head (reference: cosface); softmax: a plain linear classifier, no margin (the small preset's)",
    )
    scale: float = doc(
        64.0, "logit scale s of the cosface / arcface head (reference 64; softmax ignores it)", rng=POSITIVE
    )
    margin: float = doc(0.4, "CosFace 0.4 (reference); ArcFace usually 0.5", rng=NON_NEGATIVE)
    margin_warmup_epochs: float = doc(
        0.0,
        "ramp the margin linearly from 0 to finetune.margin over this many epochs (0 = the full margin from the "
        "first step, the reference); a short run from weak features needs it (docs/finetuning.md)",
        rng=NON_NEGATIVE,
    )
    landmark_reg: bool = doc(True, "lambda-scheduled MSE to a frozen stage-0 landmark CNN")
    mixup_alpha: float = doc(0.2, "Mixup Beta(alpha, alpha) mixing weight (timm, no CutMix; 0 = off)", rng=NON_NEGATIVE)
    mixup_p: float = doc(
        0.1, "probability that a batch is mixed up (0 = off; reference 0.1 WebFace4M, 0.2 MS1MV3)", rng=UNIT
    )
    randaug_magnitude: float = doc(
        1.0, "mean RandAugment magnitude m on the 0-10 scale (reference 1 WebFace4M, 2 MS1MV3)", rng=NON_NEGATIVE
    )
    shard_classes: bool = doc(False, "Partial-FC-style class centres split across ranks")
    sample_rate: float = doc(1.0, "fraction of negative classes sampled by the sharded head", rng=UNIT_OPEN_LOW)
    augment: str = choice(
        "auto",
        "auto",
        "cpu",
        "gpu",
        "none",
        help="cpu: timm/PIL per sample; gpu: view kernel + vectorised RandAugment + erasing on the "
        "device; auto: gpu on CUDA, else cpu",
    )
    randaug_ops: int = doc(2, "RandAugment ops per image (each applied with probability randaug_p)", rng=NON_NEGATIVE)
    randaug_p: float = doc(0.5, "probability that each drawn RandAugment op is applied", rng=UNIT)
    randaug_std: float = doc(
        0.5, "std of the per-op RandAugment magnitude, N(randaug_magnitude, std)", rng=NON_NEGATIVE
    )
    crop_scale_min: float = doc(0.9, "RandomResizedCrop(112, scale=(crop_scale_min, 1))", rng=UNIT_OPEN_LOW)
    jitter: float = doc(0.1, "ColorJitter brightness = contrast = saturation = hue", rng=Range(0, 0.5))
    erase_p: float = doc(0.5, "RandomErasing probability (area 0.02-0.1, value 0)", rng=UNIT)
    subset: str = doc("", "few-shot: 'shots=K,fraction=P,seed=S' (a subset rec is written under train.out_dir)")
    val_sets: str = doc("", "comma-separated .bin verification sets evaluated during training")
    val_every: int = doc(0, "verify every this many optimiser steps (0 = at the end only)", rng=NON_NEGATIVE)


@dataclass
class DataConfig:
    """The training faces: where they come from and how they are decoded."""

    path: str = doc("", "'' = built-in synthetic faces; a .rec file or an image folder otherwise")
    color_order: str = choice("rgb", "rgb", "bgr", help="channel order stored in the data (MS1MV3: bgr)")
    synthetic_identities: int = doc(1000, "identities of the built-in synthetic faces (data.path '')", rng=POSITIVE)
    synthetic_images_per_identity: int = doc(8, "images per identity of the built-in synthetic faces", rng=POSITIVE)
    loader: str = choice(
        "auto",
        "auto",
        "dali",
        "nvjpeg",
        "pil",
        "synthetic",
        help="decoder of a .rec or image folder: auto = DALI if installed, else nvJPEG on CUDA, else PIL; "
        "synthetic: the built-in faces only",
    )
    workers: int = doc(
        4,
        "DataLoader worker processes of the PIL loader (0 = decode in the training process); the others ignore it",
        rng=NON_NEGATIVE,
    )
    max_bad_fraction: float = doc(
        0.01,
        "corrupt records are skipped and named; stop once more than this fraction of a rank's "
        "records are corrupt (the fix: `lafs-fast data verify REC --write-bad`)",
    )


@dataclass
class TrainConfig:
    """The run: its folder, devices and processes, precision, logging and checkpoints."""

    out_dir: str = doc(
        "runs/lafs",
        "run folder (--out): config.yaml, train.log, metrics.jsonl, the checkpoints and the trained weights",
    )
    seed: int = doc(
        0, "seeds the initial weights, the data order and every augmentation draw (per rank and step)", rng=NON_NEGATIVE
    )
    device: str = choice("auto", "auto", "cuda", "cpu", help="auto: cuda when a GPU is visible, else cpu")
    gpus: int = doc(
        1,
        "processes to start on this machine (--gpus): one per GPU, or CPU processes with device cpu; torchrun starts "
        "its own",
        rng=POSITIVE,
    )
    compile: bool = doc(
        True, "torch.compile the stage's modules (the fViT per block, regional); the small preset turns it off"
    )
    precision: str = choice(
        "auto", "auto", "bf16", "fp32", help="auto: bf16 autocast on CUDA, fp32 elsewhere; bf16 / fp32 on every device"
    )
    log_every: int = doc(
        10,
        "a log line and a metrics.jsonl record every this many optimiser steps and at the last (0 = every step)",
        rng=NON_NEGATIVE,
    )
    ckpt_every_epochs: int = doc(
        1,
        "checkpoint at every k-th epoch end (0 = none there); the run's last step is always checkpointed",
        rng=NON_NEGATIVE,
    )
    keep_last: int = doc(2, "keep the newest this many checkpoints, besides keep_every's (marked .keep)", rng=Range(1))
    keep_every: int = doc(
        0, "also keep the checkpoint of every k-th epoch (0 = only the last keep_last)", rng=NON_NEGATIVE
    )
    ckpt_every_steps: int = doc(
        0, "also checkpoint every this many optimiser steps (0 = epoch ends only)", rng=NON_NEGATIVE
    )
    max_steps: int = doc(0, "stop after this many steps (0 = run all epochs)", rng=NON_NEGATIVE)
    dist_timeout_s: int = doc(
        600,
        "several processes: a collective that waits longer than this ends the job (a hung or stopped rank)",
        rng=POSITIVE,
    )
    wandb: bool = doc(
        False,
        "also log metrics.jsonl's records to Weights & Biases (pip install 'lafs-fast[wandb]'; project "
        "$WANDB_PROJECT or lafs-fast, run named after --out; WANDB_MODE=offline keeps it on disk)",
    )


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    dino: DinoConfig = field(default_factory=DinoConfig)
    views: ViewsConfig = field(default_factory=ViewsConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# Preset = overrides on top of the reference defaults.
PRESETS: dict[str, dict[str, Any]] = {
    "reference": {},
    "small": {
        "model.dim": 192,
        "model.depth": 4,
        "model.heads": 3,
        "model.head_dim": 64,
        "model.mlp_dim": 384,
        "model.attn_scale": "head_dim",
        "dino.out_dim": 1024,
        "dino.hidden_dim": 384,
        "dino.bottleneck_dim": 96,
        "dino.teacher_temp_epochs": 2,
        "optim.epochs": 4,
        "optim.batch_size": 32,
        "optim.warmup_epochs": 1,
        "optim.lr": 1e-3,
        "data.synthetic_identities": 64,
        "data.synthetic_images_per_identity": 4,
        "train.compile": False,
        "train.out_dir": "runs/small",
    },
}


def _coerce(key: str, tp: Any, value: Any) -> Any:
    """Convert ``value`` (from YAML or a ``k=v`` string) to the field type ``tp``, or say why not."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(key, args[0], value)
    if origin is tuple:
        items = value
        if isinstance(value, str):
            items = [v for v in value.strip("()[] ").split(",") if v.strip()]
        args = typing.get_args(tp)
        if not isinstance(items, (list, tuple)) or len(items) != len(args):
            raise ValueError(f"config key {key!r} expects {len(args)} comma-separated values, got {value!r}")
        return tuple(_coerce(key, a, v) for a, v in zip(args, items))
    scalar = _SCALARS.get(tp)
    return value if scalar is None else scalar(key, value)


def _to_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
        return True
    if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"config key {key!r} expects true/false, got {value!r}")


def _to_int(key: str, value: Any) -> int:
    try:
        f = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        f = math.nan
    except OverflowError:  # an integer past float's range: no field holds one
        raise ValueError(f"config key {key!r} expects an integer, got one of {len(str(value))} digits") from None
    if not f.is_integer():  # a bool, a non-number, a fraction (nan and inf are not integers either)
        raise ValueError(f"config key {key!r} expects an integer, got {value!r}")
    return int(f)


def _to_float(key: str, value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"config key {key!r} expects a number, got {value!r}") from None
    except OverflowError:  # an integer past float's range
        return math.inf if value > 0 else -math.inf


def _to_str(key: str, value: Any) -> str:
    if isinstance(value, (dict, list)):
        raise ValueError(f"config key {key!r} expects a string, got {value!r}")
    return str(value)


_SCALARS = {bool: _to_bool, int: _to_int, float: _to_float, str: _to_str}


def _set(cfg: Config, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    if len(parts) != 2:
        raise ValueError(f"config key {dotted!r} must be 'section.key' (sections: {', '.join(_sections())})")
    section, key = parts
    if section not in _sections():
        raise ValueError(f"unknown config section {section!r} in {dotted!r}; sections: {', '.join(_sections())}")
    sub = getattr(cfg, section)
    fields = {f.name: f for f in dataclasses.fields(sub)}
    if key not in fields:
        raise ValueError(f"unknown config key {dotted!r}; {section} has: {', '.join(fields)}")
    f = fields[key]
    hints = typing.get_type_hints(type(sub))
    new = _coerce(dotted, hints[key], value)
    choices = f.metadata.get("choices")
    if choices and new not in choices:
        raise ValueError(f"config key {dotted!r} must be one of {', '.join(map(str, choices))}, got {new!r}")
    setattr(sub, key, new)


def _sections() -> list[str]:
    return [f.name for f in dataclasses.fields(Config)]


def _validate(cfg: Config) -> None:
    """Range and cross-field checks, each naming the key, the value and what it may be."""
    for section in _sections():
        sub = getattr(cfg, section)
        for f in dataclasses.fields(sub):
            rng, value = f.metadata.get("range"), getattr(sub, f.name)
            if rng is not None and not all(rng.holds(v) for v in (value if isinstance(value, tuple) else (value,))):
                raise ValueError(f"config key '{section}.{f.name}' must be {rng}, got {value!r}")
    m, v = cfg.model, cfg.views
    if m.patch_size % 2:
        raise ValueError(f"config key 'model.patch_size' must be even, got {m.patch_size}")
    if v.crop_scale_min > v.crop_scale_max:
        raise ValueError(
            f"config keys 'views.crop_scale_min' ({v.crop_scale_min}) <= 'views.crop_scale_max' ({v.crop_scale_max})"
        )
    if v.local_scale_min > v.local_scale_max:
        raise ValueError(
            f"config keys 'views.local_scale_min' ({v.local_scale_min}) <= 'views.local_scale_max' "
            f"({v.local_scale_max})"
        )
    if v.blur_radius_min > v.blur_radius_max:
        raise ValueError(
            f"config keys 'views.blur_radius_min' ({v.blur_radius_min}) <= 'views.blur_radius_max' "
            f"({v.blur_radius_max})"
        )
    if v.n_global + v.n_local < 2:
        raise ValueError(
            "config keys 'views.n_global' + 'views.n_local' must give at least 2 views (DINO compares views), got "
            f"{v.n_global} + {v.n_local}"
        )
    if max(v.global_tokens, v.local_tokens) > m.num_patches:
        raise ValueError("config keys 'views.global_tokens' / 'views.local_tokens' exceed 'model.num_patches'")
    if v.mode == "dino" and v.local_size > m.image_size:  # the baseline's local crops (lafs locals are image-size)
        raise ValueError(f"config key 'views.local_size' ({v.local_size}) exceeds 'model.image_size' ({m.image_size})")


def apply_overrides(cfg: Config, overrides: dict[str, Any] | list[str]) -> Config:
    """Apply ``{"section.key": value}`` or ``["section.key=value", ...]`` in order."""
    if isinstance(overrides, dict):
        items = list(overrides.items())
    else:
        items = []
        for item in overrides:
            if "=" not in item:
                raise ValueError(f"override {item!r} must look like section.key=value")
            k, v = item.split("=", 1)
            items.append((k.strip(), v.strip()))
    for k, v in items:
        _set(cfg, k, v)
    return cfg


def _flatten(d: dict[str, Any], where: str) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for section, body in d.items():
        if not isinstance(body, dict):
            raise ValueError(f"{where}: section {section!r} must be a mapping of keys to values")
        for k, v in body.items():
            flat[f"{section}.{k}"] = v
    return flat


class _NoAliasLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses aliases (``*name``): a config never needs them, and nested
    aliases make a file of a few hundred bytes expand to gigabytes (a "billion laughs")."""

    def compose_node(self, parent: Any, index: Any) -> Any:  # (Node | None, Any) -> Node | None
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, f"uses the alias *{event.anchor}; write the value out instead", event.start_mark
            )
        return super().compose_node(parent, index)


def _read_yaml(path: Path) -> Any:
    """The YAML document of ``path`` (aliases refused), or a ValueError naming the file."""
    try:
        return yaml.load(path.read_text(), Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader
    except (yaml.YAMLError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        mark = getattr(exc, "problem_mark", None)
        if isinstance(exc, RecursionError):
            why = "it nests too deeply"
        elif isinstance(exc, yaml.MarkedYAMLError) and mark is not None:  # its str() spans several lines
            why = f"{exc.problem} (line {mark.line + 1}, column {mark.column + 1})"
        else:
            why = " ".join(str(exc).split(";")[0].split())  # one line (a reader error spans two)
        raise ValueError(f"config file {path} is not valid YAML: {why}") from None


def load_config(
    preset: str = "reference",
    yaml_path: str | Path | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
    defaults: dict[str, Any] | None = None,
) -> Config:
    """Resolve a config: reference defaults <- preset <- ``defaults`` (a command's own, e.g.
    fine-tuning's optimiser values) <- YAML file <- overrides, then validate."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    cfg = apply_overrides(Config(), PRESETS[preset])
    if defaults:
        apply_overrides(cfg, defaults)
    if yaml_path is not None:
        path = Path(yaml_path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        data = _read_yaml(path) or {}
        if not isinstance(data, dict):
            raise ValueError(f"config file {path} must hold a mapping of sections")
        data.pop("preset", None)
        apply_overrides(cfg, _flatten(data, str(path)))
    if overrides:
        apply_overrides(cfg, overrides)
    _validate(cfg)
    return cfg


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict (tuples as lists): what checkpoints and `config show` store."""
    d = dataclasses.asdict(cfg)
    return {s: {k: list(v) if isinstance(v, tuple) else v for k, v in body.items()} for s, body in d.items()}


def config_from_dict(d: dict[str, Any]) -> Config:
    """Inverse of ``config_to_dict`` (validated; unknown keys rejected)."""
    cfg = apply_overrides(Config(), _flatten(d, "config"))
    _validate(cfg)
    return cfg


# ---------------------------------------------------------------- the keys, as text


def config_yaml(cfg: Config) -> str:
    """The YAML text of ``cfg``: what a run writes to its ``config.yaml`` and ``lafs-fast config show``
    prints (one function, so the two cannot drift apart)."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def keys_help() -> str:
    """Every key, one line each: ``section.key  (type, default D[, range R | one of a/b])  help text``
    under its section's description (``lafs-fast config show --help-keys``)."""
    lines = [
        "Every config key (set with section.key=value or a --config YAML). Defaults are the reference preset's; "
        "`lafs-fast config show STAGE --preset P` prints the values a stage's run uses with a preset.",
    ]
    for section in _sections():
        cls = type(getattr(Config(), section))
        lines.append(f"{section}: {(cls.__doc__ or '').strip().splitlines()[0]}" if cls.__doc__ else f"{section}:")
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            key = f"{section}.{f.name}"
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            facts = [getattr(hints[f.name], "__name__", str(hints[f.name])), f"default {default!r}"]
            if f.metadata.get("range") is not None:
                facts.append(f"range {f.metadata['range']}")
            if f.metadata.get("choices"):
                facts.append(f"one of {'/'.join(map(str, f.metadata['choices']))}")
            help_ = f.metadata.get("help", "")
            lines.append(f"  {key}  ({', '.join(facts)})" + (f"  {help_}" if help_ else ""))
    return "\n".join(lines) + "\n"


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """--preset / --config / trailing key=value overrides: shared by every training command."""
    parser.add_argument(
        "--preset", default="reference", choices=list(PRESETS), help="starting values (default: reference)"
    )
    parser.add_argument(
        "--config", metavar="YAML", help="a YAML file of sections (model:, optim:, ...) applied on the preset"
    )
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="overrides applied last")
