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

GPU figures record images/s on the median step and MFU against the device's dense bf16 peak, the
datasheet's and the measured matmul rate (``benchmarks/bench_device.py``), with the model FLOPs
of ``benchmarks/perf_model.py`` (counted from the modules, attention included; forward x 3 for the
trainable model + the frozen CNN's forward) and its predicted images/s beside the measured; the
first step (the compile) is recorded apart. Nothing is asserted about
speed; results are recorded (gpu_run.sh, render.py). ``LAFS_GPU_DRY_RUN=1``: the GPU cases on the
CPU with a toy model (plumbing only).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from benchmarks.baselines import reference_part_fvit_forward, reference_workers, synced, worker_loader
from benchmarks.bench_device import COMPILE_BACKEND, DEVICE, DRY, bench, gpu, record_ceilings, size, timed_call
from benchmarks.perf_model import annotate, step_model
from lafs_fast.config import Config, load_config
from lafs_fast.data import SyntheticFaces
from lafs_fast.launch import DistInfo
from lafs_fast.models import build_backbone, build_landmark_cnn
from lafs_fast.models.checkpoints import model_file
from lafs_fast.train.engine import StepContext, compile_stage
from lafs_fast.train.supervised import SupervisedStage
from lafs_fast.train.supervised_augment import FaceAugment, apply_mixup
from lafs_fast.train.supervised_model import build_supervised_model, supervised_param_groups
from lafs_fast.train.supervised_run import stage_defaults

TOY_MODEL = ["model.dim=32", "model.depth=1", "model.heads=2", "model.head_dim=16", "model.mlp_dim=64"]  # dry run


def _cfg(preset: str, extra: list[str]) -> Config:
    return load_config(preset, None, ["finetune.mixup_p=1.0", *extra], defaults=stage_defaults(preset))


def _stage(cfg: Config, num_classes: int, device: torch.device, tmp_path, augment: str) -> SupervisedStage:
    torch.manual_seed(0)
    src = tmp_path / f"stage0-{cfg.model.dim}.pt"
    if not src.exists():
        torch.save(model_file(cfg.model, build_backbone(cfg.model), landmark_cnn=build_landmark_cnn(cfg.model)), src)
    cfg2, model, ref = build_supervised_model(cfg, num_classes, 2, init=str(src))
    return SupervisedStage(cfg2, model, num_classes, 2, device, ref_landmarks=ref, augment=augment)


def _fast_step(
    stage: SupervisedStage,
    device: torch.device,
    images: torch.Tensor,
    labels: torch.Tensor,
    compile_: bool,
    bf16: bool | None = None,
):
    """bf16: autocast (default: on CUDA only; the GPU cases' dry run turns it on on the CPU)."""
    if compile_:  # exactly what the engine does (train.compile: regional, per fViT block)
        compile_stage(stage, device, backend=COMPILE_BACKEND)
    opt = torch.optim.AdamW(
        supervised_param_groups(stage.model, stage.cfg), lr=1e-4, **({"fused": True} if device.type == "cuda" else {})
    )
    bf16 = device.type == "cuda" if bf16 is None else bf16
    count = [0]

    def step():
        count[0] += 1
        ctx = StepContext(
            step=count[0],
            epoch=0,
            micro=0,
            seed=count[0],
            values={"landmark_lambda": 1000.0},
            dist=DistInfo(device=device),
        )
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss, _ = stage.forward_loss(stage.model, (images, labels), ctx)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def _reference_images(stage: SupervisedStage, images_cpu: torch.Tensor, workers: int):
    """``images(step)``: the per-sample PIL / timm augmentation of the batch, in the step (``workers``
    0: the strawman) or made by ``workers`` DataLoader processes while the steps run (the reference)."""
    aug = FaceAugment(stage.cfg, "cpu")
    if not workers:
        return lambda step: aug(images_cpu, step)
    b = images_cpu.shape[0]
    batches = worker_loader(lambda i: aug(images_cpu[i % b][None], i)[0], b, steps=64, workers=workers)
    return lambda step: next(batches)


def _reference_step(
    stage: SupervisedStage, device: torch.device, images_cpu: torch.Tensor, labels: torch.Tensor, workers: int = 0
):
    """The reference-style step; ``workers`` > 0: its augmentation in DataLoader workers."""
    model, ref = stage.model, stage.ref
    model.backbone.set_attention("math")
    images_of = _reference_images(stage, images_cpu, workers)
    opt = torch.optim.AdamW(supervised_param_groups(model, stage.cfg), lr=1e-4, foreach=False)
    fp16 = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=fp16)
    count = [0]

    def step():
        count[0] += 1
        x = images_of(count[0]).to(device, non_blocking=True)  # per-sample PIL / timm on the CPU
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


def _record(
    benchmark,
    stage: SupervisedStage,
    batch: int,
    device: torch.device,
    role: str = "",
    gpu_case: bool = False,
    first_step_s: float | None = None,
    compiled: bool | None = None,
) -> None:
    """images/s on the median step; a GPU case also MFU against the measured bf16 matmul peak and
    the datasheet's (FLOPs from benchmarks/perf_model.py, attention included), the performance
    model's prediction from the measured ceilings beside it (fast cases: ``compiled`` given), and
    the first step's time (compile included) apart."""
    benchmark.extra_info.update(
        items=batch, unit="images", preset_dim=stage.cfg.model.dim, batch=batch, augment=stage.augment.mode
    )
    if role:
        benchmark.extra_info["role"] = role
    median = benchmark.stats.stats.median if benchmark.stats else None
    if not median:
        return
    benchmark.extra_info["images_per_s"] = batch / median
    if gpu_case:
        c = record_ceilings(benchmark)
        model = step_model(2, stage.cfg, batch, GPU_CLASSES)
        flops = model.flops()
        benchmark.extra_info["flops_per_sample"] = flops
        if compiled is not None:
            annotate(benchmark.extra_info, model, compiled, median)
        benchmark.extra_info["mfu_measured"] = flops * batch / median / (c["matmul_TFLOPs"] * 1e12)
        if "datasheet_TFLOPs" in c:
            benchmark.extra_info["mfu_datasheet"] = flops * batch / median / (c["datasheet_TFLOPs"] * 1e12)
    if first_step_s is not None:
        benchmark.extra_info["first_step_s"] = first_step_s
        benchmark.extra_info["compile_s"] = max(0.0, first_step_s - median)


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

GPU_BATCH = size(200, 2)  # the reference's per-GPU batch
GPU_CLASSES = size(10_000, 16)


@pytest.fixture(scope="module")
def gpu_setup(tmp_path_factory):
    cfg = _cfg("reference", TOY_MODEL if DRY else [])
    images, labels = SyntheticFaces(GPU_BATCH, 1, seed=0).batch(range(GPU_BATCH), DEVICE)
    return cfg, images, labels, tmp_path_factory.mktemp("bench_finetune_gpu")


def _gpu_group() -> str:
    preset = "toy model (dry run)" if DRY else "reference preset"
    return f"finetune step, {DEVICE.type.upper()}, {preset}, {GPU_BATCH} images"


@gpu
def test_finetune_step_reference_style_gpu(benchmark, gpu_setup):
    cfg, images, labels, tmp = gpu_setup
    benchmark.group = _gpu_group()
    stage = _stage(cfg, GPU_CLASSES, DEVICE, tmp, "cpu")
    step = synced(_reference_step(stage, DEVICE, images.cpu(), labels))
    first = timed_call(step)
    loss = bench(benchmark, step, rounds=3, warmup=0)
    assert torch.isfinite(loss)
    _record(benchmark, stage, GPU_BATCH, DEVICE, role="reference-in-step", gpu_case=True, first_step_s=first)


@gpu
def test_finetune_step_reference_pipeline_gpu(benchmark, gpu_setup):
    """The honest baseline (the group's 1.0x): the augmentation in DataLoader workers overlapped with
    the step, timed after the workers' start-up burst is drained (see the stage-1 case)."""
    cfg, images, labels, tmp = gpu_setup
    benchmark.group = _gpu_group()
    stage = _stage(cfg, GPU_CLASSES, DEVICE, tmp, "cpu")
    workers = size(reference_workers(), 1)
    step = synced(_reference_step(stage, DEVICE, images.cpu(), labels, workers=workers))
    first = timed_call(step)
    for _ in range(size(20, 2)):
        step()
    loss = bench(benchmark, step, rounds=8, warmup=0)
    assert torch.isfinite(loss)
    benchmark.extra_info["workers"] = workers
    _record(benchmark, stage, GPU_BATCH, DEVICE, role="reference", gpu_case=True, first_step_s=first)


@gpu
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_finetune_step_fast_gpu(benchmark, gpu_setup, compiled):
    """Eager first (gpu_run.sh's `finetune` stage keeps it if the compiled case is cut)."""
    cfg, images, labels, tmp = gpu_setup
    benchmark.group = _gpu_group()
    stage = _stage(cfg, GPU_CLASSES, DEVICE, tmp, "gpu")
    step = synced(_fast_step(stage, DEVICE, images, labels, compile_=compiled, bf16=True))
    first = timed_call(step)  # the compile (fViT blocks, landmark CNN trunks), Triton kernels, allocator warm-up
    for _ in range(size(2, 0)):  # autotune and allocator settle outside the timing
        step()
    loss = bench(benchmark, step, rounds=10, warmup=1)
    assert torch.isfinite(loss)
    _record(benchmark, stage, GPU_BATCH, DEVICE, gpu_case=True, first_step_s=first, compiled=compiled)
