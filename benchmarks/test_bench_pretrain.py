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
figures record MFU against the H100's dense bf16 peak (989 TFLOP/s) with the model FLOPs counted
by :func:`step_flops`. Nothing is asserted about speed; results are recorded (gpu_run.sh, render.py).
"""

from __future__ import annotations

import os

import pytest
import torch

try:
    from benchmarks.baselines import reference_lafs_tokens, synced
except ImportError:  # run as `pytest benchmarks/...` without the repo root on sys.path
    from baselines import reference_lafs_tokens, synced
from lafs_fast.config import Config, load_config
from lafs_fast.data import SyntheticFaces
from lafs_fast.launch import DistInfo
from lafs_fast.train.dino import DinoStage
from lafs_fast.train.dino import ema_update
from lafs_fast.train.engine import StepContext, clip_gradients, param_groups
from lafs_fast.views import grid_landmarks

CUDA = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"
gpu = pytest.mark.skipif(not CUDA, reason="needs CUDA (and TRITON_INTERPRET unset)")
H100_BF16_PEAK = 989.4e12


def step_flops(cfg: Config) -> float:
    """Model FLOPs of one pre-training step per source image (matmuls only, 2 per MAC; backward = 2x
    forward for the student, forward only for the teacher)."""
    m, d, v = cfg.model, cfg.dino, cfg.views
    inner = m.heads * m.head_dim

    def backbone(n_tokens: int) -> float:  # one view of n tokens (+ CLS)
        n = n_tokens + 1
        per_layer = n * (m.dim * 3 * inner + inner * m.dim + 2 * m.dim * m.mlp_dim) + 2 * n * n * inner
        return 2.0 * (n_tokens * 3 * m.patch_size**2 * m.dim + m.depth * per_layer)

    head = 2.0 * (m.dim * d.hidden_dim + d.hidden_dim**2 + d.hidden_dim * d.bottleneck_dim + d.bottleneck_dim * d.out_dim)
    student = v.n_global * (backbone(v.global_tokens) + head) + v.n_local * (backbone(v.local_tokens) + head)
    teacher = v.n_global * (backbone(v.global_tokens) + head)
    return 3.0 * student + teacher


def _fast_step(cfg: Config, device: torch.device, images: torch.Tensor, compile_: bool):
    torch.manual_seed(0)
    stage = DinoStage(cfg, device)
    if compile_:
        for mod in stage.compile_targets():
            mod.attention_for(device) if hasattr(mod, "attention_for") else None
            mod.compile(dynamic=False)
    params = [p for g in param_groups(stage.model) for p in g["params"]]
    opt = torch.optim.AdamW(param_groups(stage.model), lr=1e-4, **({"fused": True} if device.type == "cuda" else {}))
    bf16 = device.type == "cuda"
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


def _reference_step(cfg: Config, device: torch.device, images_cpu: torch.Tensor):
    torch.manual_seed(0)
    stage = DinoStage(cfg, device)
    for mb in (stage.model.backbone, stage.teacher.backbone):
        mb.set_attention("math")
    opt = torch.optim.AdamW(param_groups(stage.model), lr=1e-4, foreach=False)
    fp16 = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=fp16)
    specs = stage.views.global_specs + stage.views.local_specs
    grid = grid_landmarks()
    gen = torch.Generator().manual_seed(0)
    v = cfg.views

    def step():
        crops = reference_lafs_tokens(images_cpu, specs, grid, v.n_global, v.local_tokens, v.perturb_sigma, gen, device)
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


def _record(benchmark, cfg: Config, batch: int, device: torch.device, role: str = "") -> None:
    benchmark.extra_info.update(items=batch, unit="samples", preset_dim=cfg.model.dim, batch=batch)
    if role:
        benchmark.extra_info["role"] = role
    mean = benchmark.stats.stats.mean if benchmark.stats else None
    if mean:
        benchmark.extra_info["samples_per_s"] = batch / mean
        if device.type == "cuda":
            benchmark.extra_info["mfu"] = step_flops(cfg) * batch / mean / H100_BF16_PEAK


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

GPU_BATCH = 82  # the reference's per-GPU batch


@pytest.fixture(scope="module")
def gpu_setup():
    cfg = load_config("reference")
    images = SyntheticFaces(GPU_BATCH, 1, seed=0).batch(range(GPU_BATCH), "cuda")[0]
    return cfg, images


@gpu
def test_pretrain_step_reference_style_gpu(benchmark, gpu_setup):
    cfg, images = gpu_setup
    dev = torch.device("cuda")
    benchmark.group = f"pretrain step, GPU, reference preset, {GPU_BATCH} images x 10 views"
    step = synced(_reference_step(cfg, dev, images.cpu()))
    benchmark.pedantic(step, rounds=2, warmup_rounds=1)
    _record(benchmark, cfg, GPU_BATCH, dev, role="reference")


@gpu
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_pretrain_step_fast_gpu(benchmark, gpu_setup, compiled):
    cfg, images = gpu_setup
    dev = torch.device("cuda")
    benchmark.group = f"pretrain step, GPU, reference preset, {GPU_BATCH} images x 10 views"
    step = synced(_fast_step(cfg, dev, images, compile_=compiled))
    for _ in range(3):  # compile + autotune + allocator warm-up
        step()
    benchmark.pedantic(step, rounds=10, warmup_rounds=1)
    _record(benchmark, cfg, GPU_BATCH, dev)
