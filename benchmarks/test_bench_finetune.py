"""Stage-2 (LAFS fine-tuning) training step, images/s: the fast path beside a reference-style path.

    pytest benchmarks/test_bench_finetune.py          # CPU: `small` preset, tiny batch, seconds
                                                     # GPU: `reference` preset + MFU (skipped without CUDA)

One step = augmentation of every face, Mixup (timm, p 1 here so that every step pays for it), the
trainable landmark CNN, patch sampling, the fViT, CosFace, soft-target cross-entropy, the landmark
regulariser (frozen copy of the CNN, lambda 1000 as in epoch 0), backward, AdamW.

- fast: ``lafs_fast.train.supervised.SupervisedStage`` (one-launch patch sampler, SDPA / xformers
  attention, fused AdamW and bf16 autocast and ``torch.compile`` of the fViT on CUDA). Augmentation
  ``gpu`` = the view kernel (crop / flip / jitter) + vectorised RandAugment + erasing on the device;
  ``cpu`` = the per-sample PIL/timm recipe (the CPU rows show both);
- reference-style: the same per-sample PIL/timm augmentation on the CPU (serially in the step, where
  the reference spreads it over DataLoader workers), a ``grid_sample`` per landmark, math attention,
  replicated head, eager, fp16 autocast + GradScaler on CUDA (fp32 on the CPU), for-loop AdamW.

GPU figures record MFU against the H100's dense bf16 peak (989 TFLOP/s) with the model FLOPs counted
by ``torch.utils.flop_counter`` on one image (forward x 3 for the trainable model + the frozen CNN's
forward). Nothing is asserted about speed; results are recorded (gpu_run.sh, render.py).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

try:
    from benchmarks.baselines import reference_part_fvit_forward, synced
except ImportError:  # run as `pytest benchmarks/...` without the repo root on sys.path
    from baselines import reference_part_fvit_forward, synced
from lafs_fast.config import Config, load_config
from lafs_fast.data import SyntheticFaces
from lafs_fast.launch import DistInfo
from lafs_fast.models import build_backbone, build_landmark_cnn
from lafs_fast.models.checkpoints import model_file
from lafs_fast.train.engine import StepContext
from lafs_fast.train.supervised import FaceAugment, SupervisedStage, apply_mixup, build_supervised_model, supervised_param_groups
from lafs_fast.train.supervised_run import stage_defaults

CUDA = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"
gpu = pytest.mark.skipif(not CUDA, reason="needs CUDA (and TRITON_INTERPRET unset)")
H100_BF16_PEAK = 989.4e12


def _cfg(preset: str, extra: list[str]) -> Config:
    return load_config(preset, None, ["finetune.mixup_p=1.0", *extra], defaults=stage_defaults(preset))


def _stage(cfg: Config, num_classes: int, device: torch.device, tmp_path, augment: str) -> SupervisedStage:
    torch.manual_seed(0)
    src = tmp_path / f"stage0-{cfg.model.dim}.pt"
    if not src.exists():
        torch.save(model_file(cfg.model, build_backbone(cfg.model), landmark_cnn=build_landmark_cnn(cfg.model)), src)
    cfg2, model, ref = build_supervised_model(cfg, num_classes, 2, init=str(src), say=lambda *a: None)
    return SupervisedStage(cfg2, model, num_classes, 2, device, ref_landmarks=ref, augment=augment, say=lambda *a: None)


def step_flops(stage: SupervisedStage) -> float:
    """Model FLOPs of one training step per image: 3 x forward of the Part fViT + head, + the frozen
    CNN's forward (flop_counter on one image on the CPU; the sampler's gathers are not FLOPs)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = stage.model
    dev = next(model.parameters()).device
    x = torch.zeros(1, 3, 112, 112)
    y = torch.zeros(1, dtype=torch.long)
    model.cpu()
    try:
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            model(x, y)
        train = fc.get_total_flops()
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            model.landmark_cnn(x)
        cnn = fc.get_total_flops()
    finally:
        model.to(dev)
    return 3.0 * train + cnn


def _fast_step(stage: SupervisedStage, device: torch.device, images: torch.Tensor, labels: torch.Tensor, compile_: bool):
    if compile_:
        stage.model.backbone.attention_for(device)
        stage.model.backbone.compile(dynamic=False)
    opt = torch.optim.AdamW(supervised_param_groups(stage.model, stage.cfg), lr=1e-4, **({"fused": True} if device.type == "cuda" else {}))
    bf16 = device.type == "cuda"
    count = [0]

    def step():
        count[0] += 1
        ctx = StepContext(step=count[0], epoch=0, micro=0, seed=count[0], values={"landmark_lambda": 1000.0}, dist=DistInfo(device=device))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss, _ = stage.forward_loss(stage.model, (images, labels), ctx)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def _reference_step(stage: SupervisedStage, device: torch.device, images_cpu: torch.Tensor, labels: torch.Tensor):
    model, ref = stage.model, stage.ref
    model.backbone.set_attention("math")
    aug = FaceAugment(stage.cfg, "cpu")
    opt = torch.optim.AdamW(supervised_param_groups(model, stage.cfg), lr=1e-4, foreach=False)
    fp16 = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=fp16)
    count = [0]

    def step():
        count[0] += 1
        x = aug(images_cpu, count[0]).to(device)  # per-sample PIL / timm on the CPU
        x, targets = apply_mixup(stage.mixup, x, labels, count[0])
        with torch.autocast(device.type, dtype=torch.float16, enabled=fp16):
            logits, coords = reference_part_fvit_forward(model.landmark_cnn, model.backbone, model.head, x, targets)
            with torch.no_grad():
                theta_ref = ref(x)
            ce = torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
            loss = ce + 1000.0 * F.mse_loss(coords.float() / 111, theta_ref.float() / 111)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def _record(benchmark, stage: SupervisedStage, batch: int, device: torch.device, role: str = "", flops: float | None = None) -> None:
    benchmark.extra_info.update(items=batch, unit="images", preset_dim=stage.cfg.model.dim, batch=batch,
                                augment=stage.augment.mode)
    if role:
        benchmark.extra_info["role"] = role
    mean = benchmark.stats.stats.mean if benchmark.stats else None
    if mean:
        benchmark.extra_info["images_per_s"] = batch / mean
        if flops is not None:
            benchmark.extra_info["mfu"] = flops * batch / mean / H100_BF16_PEAK


# --------------------------------------------------------------------------------------------- CPU

CPU_BATCH = 4
CPU_CLASSES = 64


@pytest.fixture(scope="module")
def cpu_setup(tmp_path_factory):
    cfg = _cfg("small", ["model.dropout=0", "model.emb_dropout=0", "model.drop_path=0"])
    images, labels = SyntheticFaces(CPU_BATCH, 1, seed=0).batch(range(CPU_BATCH))
    return cfg, images, labels, tmp_path_factory.mktemp("bench_finetune")


def test_finetune_step_reference_style_cpu(benchmark, cpu_setup):
    cfg, images, labels, tmp = cpu_setup
    dev = torch.device("cpu")
    benchmark.group = f"finetune step, CPU, small preset, {CPU_BATCH} images"
    stage = _stage(cfg, CPU_CLASSES, dev, tmp, "cpu")
    loss = benchmark.pedantic(_reference_step(stage, dev, images, labels), rounds=2, warmup_rounds=1)
    assert torch.isfinite(loss)
    _record(benchmark, stage, CPU_BATCH, dev, role="reference")


@pytest.mark.parametrize("augment", ["cpu", "gpu"])
def test_finetune_step_fast_cpu(benchmark, cpu_setup, augment):
    cfg, images, labels, tmp = cpu_setup
    dev = torch.device("cpu")
    benchmark.group = f"finetune step, CPU, small preset, {CPU_BATCH} images"
    stage = _stage(cfg, CPU_CLASSES, dev, tmp, augment)
    loss = benchmark.pedantic(_fast_step(stage, dev, images, labels, compile_=False), rounds=3, warmup_rounds=1)
    assert torch.isfinite(loss)
    _record(benchmark, stage, CPU_BATCH, dev)


# --------------------------------------------------------------------------------------------- GPU

GPU_BATCH = 200  # the reference's per-GPU batch
GPU_CLASSES = 10_000


@pytest.fixture(scope="module")
def gpu_setup(tmp_path_factory):
    cfg = _cfg("reference", [])
    images, labels = SyntheticFaces(GPU_BATCH, 1, seed=0).batch(range(GPU_BATCH), "cuda")
    return cfg, images, labels, tmp_path_factory.mktemp("bench_finetune_gpu")


@gpu
def test_finetune_step_reference_style_gpu(benchmark, gpu_setup):
    cfg, images, labels, tmp = gpu_setup
    dev = torch.device("cuda")
    benchmark.group = f"finetune step, GPU, reference preset, {GPU_BATCH} images"
    stage = _stage(cfg, GPU_CLASSES, dev, tmp, "cpu")
    flops = step_flops(stage)
    loss = benchmark.pedantic(synced(_reference_step(stage, dev, images.cpu(), labels)), rounds=3, warmup_rounds=1)
    assert torch.isfinite(loss)
    _record(benchmark, stage, GPU_BATCH, dev, role="reference", flops=flops)


@gpu
def test_finetune_step_fast_gpu(benchmark, gpu_setup):
    cfg, images, labels, tmp = gpu_setup
    dev = torch.device("cuda")
    benchmark.group = f"finetune step, GPU, reference preset, {GPU_BATCH} images"
    stage = _stage(cfg, GPU_CLASSES, dev, tmp, "gpu")
    flops = step_flops(stage)
    step = synced(_fast_step(stage, dev, images, labels, compile_=True))
    for _ in range(3):  # compile and autotune outside the timing
        step()
    loss = benchmark.pedantic(step, rounds=10, warmup_rounds=2)
    assert torch.isfinite(loss)
    _record(benchmark, stage, GPU_BATCH, dev, flops=flops)
