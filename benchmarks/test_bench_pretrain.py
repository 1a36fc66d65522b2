"""Full LAFS pre-training step (stage 1), samples/s: the fast path beside a reference-style path.

    pytest benchmarks/test_bench_pretrain.py           # CPU: `small` preset, tiny batch, seconds
                                                      # GPU: `reference` preset + MFU (skipped without CUDA)

One step = views of every image (2 dense + 8 sparse), teacher forward on the dense views, student
forward/backward on all ten, DINO loss, per-parameter clipping, AdamW, EMA teacher update.

- fast: ``lafs_fast.train.dino.DinoStage`` (on-device view kernel / twin, one-launch patch sampler,
  SDPA / xformers attention, bf16 autocast on CUDA, fused AdamW; ``torch.compile`` on GPU);
- reference-style: views per (image, view) with torchvision on the CPU, a ``grid_sample`` per
  landmark, math attention, eager, fp16 autocast + GradScaler on CUDA (fp32 on the CPU), for-loop
  AdamW (``benchmarks/baselines.py``).

Landmarks: the 14 x 14 grid in both paths (the frozen landmark CNN costs the same in both). GPU
figures record samples/s on the median step, MFU = model FLOPs (``benchmarks/perf_model.py``,
counted from the modules, attention included) x samples/s
over the device's dense bf16 peak, both the datasheet's and the measured matmul rate
(``benchmarks/bench_device.py``), and the first step's time apart (``first_step_s``; compile
included for the compiled case, ``compile_s`` = first step - median step). Nothing is asserted
about speed; results are recorded (gpu_run.sh, render.py). ``LAFS_GPU_DRY_RUN=1``: the GPU cases
on the CPU with a toy model (plumbing only).
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.baselines import (
    reference_lafs_tokens,
    reference_tokens_from_views,
    reference_workers,
    synced,
    torchvision_views_per_sample,
    worker_loader,
)
from benchmarks.bench_device import COMPILE_BACKEND, DEVICE, DRY, bench, gpu, record_ceilings, size, timed_call
from benchmarks.perf_model import annotate, step_model
from lafs_fast.config import Config, load_config
from lafs_fast.data import SyntheticFaces
from lafs_fast.launch import DistInfo
from lafs_fast.sampling import grid_landmarks
from lafs_fast.train.dino import DinoStage, ema_update
from lafs_fast.train.engine import StepContext, clip_gradients, compile_stage, param_groups

# the dry run's toy model: one narrow block, a small DINO head (the views keep their real shapes)
TOY_MODEL = [
    "model.dim=32",
    "model.depth=1",
    "model.heads=2",
    "model.head_dim=16",
    "model.mlp_dim=64",
    "dino.out_dim=64",
    "dino.hidden_dim=32",
    "dino.bottleneck_dim=16",
]


def _fast_step(cfg: Config, device: torch.device, images: torch.Tensor, compile_: bool, bf16: bool | None = None):
    """bf16: autocast (default: on CUDA only; the GPU cases' dry run turns it on on the CPU)."""
    torch.manual_seed(0)
    stage = DinoStage(cfg, device)
    if compile_:  # exactly what the engine does (train.compile: regional, per fViT block)
        compile_stage(stage, device, backend=COMPILE_BACKEND)
    params = [p for g in param_groups(stage.model) for p in g["params"]]
    opt = torch.optim.AdamW(param_groups(stage.model), lr=1e-4, **({"fused": True} if device.type == "cuda" else {}))
    bf16 = device.type == "cuda" if bf16 is None else bf16
    values = {"teacher_temp": 0.04, "teacher_momentum": 0.996}
    count = [0]

    def step():
        count[0] += 1
        ctx = StepContext(step=count[0], epoch=1, micro=0, seed=count[0], values=values, dist=DistInfo(device=device))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss, _ = stage.forward_loss(stage.model, (images, None), ctx)
        loss.backward()
        clip_gradients(params, 3.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema_update(stage.teacher, stage.model, 0.996)
        return loss

    return step


def _reference_crops(cfg: Config, stage: DinoStage, device: torch.device, images_cpu: torch.Tensor, workers: int):
    """The reference's tokens for one step: the torchvision views in the step (``workers`` 0: the
    strawman) or made by ``workers`` DataLoader processes while the steps run (the reference as it
    runs); the per-landmark grid_sample loop on ``device`` either way."""
    specs = stage.views.global_specs + stage.views.local_specs
    grid = grid_landmarks()
    gen = torch.Generator().manual_seed(0)
    v, b, s = cfg.views, images_cpu.shape[0], images_cpu.shape[1]
    if not workers:
        return lambda: reference_lafs_tokens(
            images_cpu, specs, grid, v.n_global, v.local_tokens, v.perturb_sigma, gen, device
        )

    def views(i: int) -> torch.Tensor:  # in a worker: one image's V augmented views (V, 3, S, S)
        return torchvision_views_per_sample(images_cpu[i % b][None], specs, s, bicubic=True)[1][0]

    batches = worker_loader(views, b, steps=64, workers=workers)
    return lambda: reference_tokens_from_views(
        next(batches).to(device, non_blocking=True), grid, v.n_global, v.local_tokens, v.perturb_sigma, gen
    )


def _reference_step(cfg: Config, device: torch.device, images_cpu: torch.Tensor, workers: int = 0):
    """The reference-style step; ``workers`` > 0: its views from DataLoader workers (:func:`_reference_crops`)."""
    torch.manual_seed(0)
    stage = DinoStage(cfg, device)
    for mb in (stage.model.backbone, stage.teacher.backbone):
        mb.set_attention("math")
    opt = torch.optim.AdamW(param_groups(stage.model), lr=1e-4, foreach=False)
    fp16 = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=fp16)
    crops_fn = _reference_crops(cfg, stage, device, images_cpu, workers)

    def step():
        crops = crops_fn()
        with torch.autocast(device.type, dtype=torch.float16, enabled=fp16):
            with torch.no_grad():
                t = stage.teacher([crops[0]])
            s = stage.model(crops)
            loss = stage.loss_fn(s, t, 0.04)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        for p in stage.model.parameters():  # the reference's per-parameter clip, one tensor at a time
            if p.grad is not None:
                n = p.grad.norm()
                coef = 3.0 / (n + 1e-6)
                if coef < 1:
                    p.grad.mul_(coef)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for ps, pt in zip(stage.model.parameters(), stage.teacher.parameters()):
                pt.data.mul_(0.996).add_((1 - 0.996) * ps.detach().data)
        return loss

    return step


def _record(
    benchmark,
    cfg: Config,
    batch: int,
    device: torch.device,
    role: str = "",
    first_step_s: float | None = None,
    compiled: bool | None = None,
) -> None:
    """samples/s on the median step; on the GPU cases also MFU against the datasheet and the
    measured bf16 matmul peak (FLOPs from benchmarks/perf_model.py, attention included), the
    performance model's prediction from the measured ceilings beside it (fast cases: ``compiled``
    given), and the first step's time (compile included) apart."""
    benchmark.extra_info.update(items=batch, unit="samples", preset_dim=cfg.model.dim, batch=batch)
    if role:
        benchmark.extra_info["role"] = role
    median = benchmark.stats.stats.median if benchmark.stats else None
    if not median:
        return
    benchmark.extra_info["samples_per_s"] = batch / median
    if device == DEVICE and (device.type == "cuda" or DRY):
        c = record_ceilings(benchmark)
        model = step_model(1, cfg, batch)
        flops = model.flops()
        benchmark.extra_info["flops_per_sample"] = flops
        if compiled is not None:
            annotate(benchmark.extra_info, model, compiled, median)
        achieved = flops * batch / median
        benchmark.extra_info["mfu_measured"] = achieved / (c["matmul_TFLOPs"] * 1e12)
        if "datasheet_TFLOPs" in c:
            benchmark.extra_info["mfu_datasheet"] = achieved / (c["datasheet_TFLOPs"] * 1e12)
    if first_step_s is not None:
        benchmark.extra_info["first_step_s"] = first_step_s
        benchmark.extra_info["compile_s"] = max(0.0, first_step_s - median)


# --------------------------------------------------------------------------------------------- CPU

CPU_BATCH = 2


@pytest.fixture(scope="module")
def cpu_setup():
    cfg = load_config("small", None, ["model.dropout=0", "model.emb_dropout=0", "model.drop_path=0"])
    images = SyntheticFaces(CPU_BATCH, 1, seed=0).batch(range(CPU_BATCH))[0]
    return cfg, images


def test_pretrain_step_reference_style_cpu(benchmark, cpu_setup):
    cfg, images = cpu_setup
    dev = torch.device("cpu")
    benchmark.group = f"pretrain step, CPU, small preset, {CPU_BATCH} images x 10 views"
    step = _reference_step(cfg, dev, images)
    loss = benchmark.pedantic(step, rounds=2, warmup_rounds=1)
    assert torch.isfinite(loss)
    _record(benchmark, cfg, CPU_BATCH, dev, role="reference")


def test_pretrain_step_fast_cpu(benchmark, cpu_setup):
    cfg, images = cpu_setup
    dev = torch.device("cpu")
    benchmark.group = f"pretrain step, CPU, small preset, {CPU_BATCH} images x 10 views"
    step = _fast_step(cfg, dev, images, compile_=False)
    loss = benchmark.pedantic(step, rounds=3, warmup_rounds=1)
    assert torch.isfinite(loss)
    _record(benchmark, cfg, CPU_BATCH, dev)


# --------------------------------------------------------------------------------------------- GPU

GPU_BATCH = size(82, 2)  # the reference's per-GPU batch


@pytest.fixture(scope="module")
def gpu_setup():
    cfg = load_config("reference", None, TOY_MODEL if DRY else [])
    images = SyntheticFaces(GPU_BATCH, 1, seed=0).batch(range(GPU_BATCH), DEVICE)[0]
    return cfg, images


def _gpu_group(cfg: Config) -> str:
    preset = "toy model (dry run)" if DRY else "reference preset"
    return f"pretrain step, {DEVICE.type.upper()}, {preset}, {GPU_BATCH} images x 10 views"


@gpu
def test_pretrain_step_reference_style_gpu(benchmark, gpu_setup):
    """The strawman: torchvision views inside the timed step (role ``reference-in-step``)."""
    cfg, images = gpu_setup
    benchmark.group = _gpu_group(cfg)
    step = synced(_reference_step(cfg, DEVICE, images.cpu()))
    first = timed_call(step)
    bench(benchmark, step, rounds=2, warmup=0)
    _record(benchmark, cfg, GPU_BATCH, DEVICE, role="reference-in-step", first_step_s=first)


@gpu
def test_pretrain_step_reference_pipeline_gpu(benchmark, gpu_setup):
    """The honest baseline (the group's 1.0x): the reference as it runs, its views made by DataLoader
    workers overlapped with the step. Untimed steps first drain what the workers made while they
    started (2 batches a worker), so the timed rounds see the steady state: the slower of the step
    and the workers' rate."""
    cfg, images = gpu_setup
    benchmark.group = _gpu_group(cfg)
    workers = size(reference_workers(), 1)  # 10 on the GPU machine's 16 cores
    step = synced(_reference_step(cfg, DEVICE, images.cpu(), workers=workers))
    first = timed_call(step)  # the workers' start and first batch
    for _ in range(size(20, 2)):
        step()
    bench(benchmark, step, rounds=8, warmup=0)
    benchmark.extra_info["workers"] = workers
    _record(benchmark, cfg, GPU_BATCH, DEVICE, role="reference", first_step_s=first)


@gpu
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_pretrain_step_fast_gpu(benchmark, gpu_setup, compiled):
    cfg, images = gpu_setup
    benchmark.group = _gpu_group(cfg)
    step = synced(_fast_step(cfg, DEVICE, images, compile_=compiled, bf16=True))
    first = timed_call(step)  # compile (compiled case), Triton kernel compiles, allocator warm-up
    for _ in range(size(2, 0)):  # autotune and allocator settle outside the timing
        step()
    loss = bench(benchmark, step, rounds=10)
    assert torch.isfinite(loss)
    _record(benchmark, cfg, GPU_BATCH, DEVICE, first_step_s=first, compiled=compiled)
