"""The performance model of a training step: FLOPs and bytes per kernel, counted from the real
modules, and the time they predict on a GPU (issue 21 item 1).

How it counts. The step's modules are built on the ``meta`` device at the preset's sizes and run
for ONE sample under :class:`KernelTrace`, a ``TorchDispatchMode`` that sees every aten op (one op
is one kernel in eager mode) and records, per op:

- FLOPs: ``torch.utils.flop_counter``'s formulas (matmuls, convolutions); attention explicitly,
  ``4 * B * H * Nq * Nk * Dh`` for the two products of any ``scaled_dot_product`` op (the counter
  gives SDPA 0 on the CPU, so MFU built on it came out low);
- bytes: every tensor the op reads plus every tensor it writes, at the dtype the bf16 regime gives
  it. Autocast is emulated (meta tensors are fp32): a matmul reads bf16 operands (an fp32 operand
  costs a cast kernel first, read 4 B + write 2 B an element; a weight's cast is cached, once per
  forward) and writes bf16; layer_norm / softmax / log_softmax / losses write fp32 (autocast's fp32
  list); any other op writes the widest of its inputs. View ops move nothing.

Compiled (Inductor) bytes: the same trace with the elementwise chains fused: a memory-bound op
reads only inputs that no memory-bound op produced and writes only outputs that a matmul reads or
nothing reads (saved activations are left out: an estimate, not a count).

Backward = 2 x forward, FLOPs and bytes (a trainable module's weight and input gradients); frozen
modules (the teacher, the frozen landmark CNN) run forward only. Per-parameter kernels (fused AdamW
28 B, clipping 12 B, EMA 12 B per fp32 parameter) are spread over the batch.

Time: each kernel on the roofline, ``max(FLOPs / matmul rate, bytes / bandwidth)``, summed: no
overlap between kernels, no launch gaps (a compiled or CUDA-graphed step; an eager step adds its
CPU dispatch where the GPU waits). ``ceiling``: datasheet peak and bandwidth; ``expected``: 75 % of
the peak for matmuls (an H200 here measured 790 of 989 TFLOP/s at 8192^3; the step's matmuls are
smaller) and 80 % of the bandwidth. On the device (``--measured``), the measured bf16 matmul rate
and copy bandwidth of ``benchmarks/bench_device.py`` replace them.

    python benchmarks/perf_model.py                 # the table of docs/performance.md (markdown)
    python benchmarks/perf_model.py --json          # the same as JSON
    python benchmarks/perf_model.py --measured      # on a GPU: + a row from the measured ceilings
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

if __package__ in (None, ""):  # python benchmarks/perf_model.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

aten = torch.ops.aten

# Dense bf16 tensor-core peak (FLOP/s) and memory bandwidth (B/s), SXM parts, vendor datasheets:
# H100 SXM 989.4 TFLOP/s (1,979 with 2:4 sparsity), HBM3 3.35 TB/s; H200 SXM 989.4, HBM3e 4.8 TB/s;
# A100 SXM 80 GB 312 TFLOP/s, HBM2e 2.039 TB/s.
DEVICES: dict[str, tuple[float, float]] = {
    "H100 SXM": (989.4e12, 3.35e12),
    "H200 SXM": (989.4e12, 4.8e12),
    "A100 SXM 80GB": (312e12, 2.039e12),
}
ETA_MATMUL, ETA_BW = 0.75, 0.80  # the expected fraction of the datasheet figures (docstring)
ADAMW_B, CLIP_B, EMA_B = 28, 12, 12  # bytes per fp32 parameter and step (fused AdamW; clip; EMA)
_FP32_OUT = ("layer_norm", "softmax", "log_softmax", "mse_loss", "cross_entropy", "nll_loss", "norm")
_MATMUL = {aten.mm, aten.addmm, aten.bmm, aten.baddbmm, aten.convolution}
# ops that move no bytes: aliases and allocations
_NO_BYTES = ("detach", "alias", "lift_fresh", "_unsafe_view", "empty_like", "new_empty", "empty", "empty_strided")


def _is_attention(name: str) -> bool:
    return "scaled_dot_product" in name or name == "fused_attention"


def view_read_px(landmarks: int, side: int = 112, patch: int = 8) -> int:
    """Pixels of one view a patch sampler must read: the bilinear footprint of its patches,
    (patch + 1)^2 each, at most the whole view (a dense view's 196 footprints cover it; a sparse
    view's 36 touch 2,916 of 12,544 pixels)."""
    return min(landmarks * (patch + 1) ** 2, side * side)


@dataclass
class Kernel:
    """One traced op: name, FLOPs, bytes moved; ``matmul``: a FLOP kernel (matmul, conv, attention).
    ``static``: the bytes of weights and tensors made from weights alone (weight norm, weight casts),
    moved once per step however large the batch; ``nbytes``: the rest, per sample."""

    name: str
    flops: int
    nbytes: int
    matmul: bool
    static: int = 0
    ins: list[tuple[int, int]] = field(default_factory=list)  # (tensor id, bytes)
    outs: list[tuple[int, int]] = field(default_factory=list)


def _tensors(tree) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


def _attention_flops(name: str, args: tuple) -> int:
    """Both products of attention, q x k^T then x v: 4 * B * H * Nq * Nk * Dh. ``fused_attention``
    (this module's stand-in) takes (B, N, H, Dh); torch's SDPA ops (B, H, N, Dh)."""
    q, k = args[0], args[1]
    nk = k.shape[1] if name == "fused_attention" else k.shape[-2]
    return 4 * q.numel() * nk


@torch.library.custom_op("perf_model::fused_attention", mutates_args=())
def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """One fused attention kernel (flash / memory-efficient: no N x N scores in memory), as one op
    the trace can see: q, k, v (B, N, H, Dh) -> (B, Nq, H, Dh). Shapes only (never computed)."""
    return torch.empty_like(q)


@fused_attention.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(q)


def _fused_attention(q, k, v, scale, backend="sdpa", seqlens=None) -> torch.Tensor:
    """``lafs_fast.models.attention.attention`` during a trace: the GPU's fused kernel."""
    return fused_attention(q, k, v)


class KernelTrace(TorchDispatchMode):
    """Every aten op under the mode, as :class:`Kernel` rows (see the module docstring).

    ``bf16``: emulate bf16 autocast (matmul operands and outputs 2 B); else every float is 4 B."""

    def __init__(self, bf16: bool = True) -> None:
        super().__init__()
        self.bf16, self.kernels = bf16, []
        self._size: dict[int, int] = {}  # tensor id -> logical bytes per element
        self._static: set[int] = set()  # ids of tensors made from weights alone
        self._cast: set[int] = set()  # weights already cast this forward (autocast's cache)
        self._keep: list[torch.Tensor] = []  # ids stay unique while the trace lives

    def _itemsize(self, t: torch.Tensor) -> int:
        return self._size.get(id(t), t.element_size())

    def _is_static(self, t: torch.Tensor) -> bool:
        return isinstance(t, torch.nn.Parameter) or id(t) in self._static

    def _mark(self, t: torch.Tensor, size: int, static: bool) -> None:
        self._size[id(t)] = size
        if static:
            self._static.add(id(t))
        self._keep.append(t)

    def _nbytes(self, t: torch.Tensor) -> int:
        return t.numel() * self._itemsize(t)

    def _matmul(self, name: str, func, args, kwargs, ins, outs) -> None:
        if _is_attention(name):
            flops = _attention_flops(name, args)
        else:
            flops = flop_registry[func._overloadpacket](*args, **kwargs, out_val=outs[0] if len(outs) == 1 else outs)
        w = 2 if self.bf16 else 4
        ids = [self._operand(t) for t in ins]
        for t in outs:
            self._mark(t, w, False)
        k = Kernel(name, int(flops), 0, True, ins=[(i, t.numel() * w) for i, t in zip(ids, ins)])
        k.static = sum(t.numel() * w for t in ins if self._is_static(t))
        k.nbytes = sum(t.numel() * w for t in ins if not self._is_static(t)) + sum(t.numel() * w for t in outs)
        self.kernels.append(k)

    def _operand(self, t: torch.Tensor) -> int:
        """The id a matmul reads ``t`` under: an fp32 float operand is cast to bf16 first (a kernel
        reading 4 B and writing 2 B an element; a weight's cast is cached for the forward)."""
        if not (self.bf16 and self._itemsize(t) == 4 and t.is_floating_point()):
            return id(t)
        static = self._is_static(t)
        if id(t) not in self._cast:
            cast = Kernel("autocast cast to bf16", 0, 0 if static else t.numel() * 6, False, t.numel() * 6 * static)
            cast.ins, cast.outs = [(id(t), t.numel() * 4)], [(-id(t), t.numel() * 2)]
            self.kernels.append(cast)
            if static:
                self._cast.add(id(t))
        return -id(t)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        ins, outs = _tensors((args, kwargs)), _tensors(out)
        name = str(func.overloadpacket.__name__)
        static = bool(ins) and all(self._is_static(t) for t in ins)
        if func.is_view or not outs or name in _NO_BYTES:
            for t in outs:
                self._mark(t, self._itemsize(ins[0]) if ins else t.element_size(), static)
            return out
        if func._overloadpacket in _MATMUL or _is_attention(name):
            self._matmul(name, func, args, kwargs, ins, outs)
            return out
        widest = max((self._itemsize(t) for t in ins if t.is_floating_point()), default=4)
        size = 4 if any(k in name for k in _FP32_OUT) else widest
        for t in outs:
            self._mark(t, size if t.is_floating_point() else t.element_size(), static)
        k = Kernel(name, 0, 0, False, ins=[(id(t), self._nbytes(t)) for t in ins])
        k.outs = [(id(t), self._nbytes(t)) for t in outs]
        total = sum(b for _, b in k.ins + k.outs)
        k.nbytes, k.static = (0, total) if static else (total, 0)
        self.kernels.append(k)
        return out


def fused_bytes(kernels: list[Kernel]) -> int:
    """Per-sample bytes of the memory-bound kernels once elementwise chains are fused (Inductor):
    inputs that no memory-bound kernel produced, outputs that a matmul reads or nothing reads."""
    mem = [k for k in kernels if not k.matmul and not k.static]
    made_by_mem = {i for k in mem for i, _ in k.outs}
    read_by_mem = {i for k in mem for i, _ in k.ins}
    read_by_mm = {i for k in kernels if k.matmul for i, _ in k.ins}
    total = 0
    for k in mem:
        total += sum(b for i, b in k.ins if i not in made_by_mem)
        total += sum(b for i, b in k.outs if i in read_by_mm or i not in read_by_mem)
    return total


@dataclass
class Part:
    """One traced piece of a step, per sample: forward FLOPs / bytes and how often they count."""

    name: str
    flops: int
    mm: list[tuple[int, int, int]]  # (FLOPs, bytes per sample, weight bytes per step) of each FLOP kernel
    eager_bytes: int  # the memory-bound kernels, one op one kernel, per sample
    compiled_bytes: int  # the same, elementwise chains fused
    static_bytes: int  # memory-bound kernels on weights alone (weight norm, weight casts), per step
    passes: int  # 3 = forward + backward (trainable), 1 = forward only (frozen)
    kernels: int


def _dropout_hooks(t: KernelTrace, modules: list[torch.nn.Module]) -> list:
    """nn.Dropout (p > 0, training) as CUDA's one fused kernel: read x, write y and a 1-byte mask
    (on the meta device it would decompose into a full-size fp32 mask and three kernels). The
    modules are put in eval mode for the trace (the caller restores them); the hooks add the kernel."""
    handles = []
    for mod in modules:
        for d in mod.modules():
            if isinstance(d, torch.nn.Dropout) and d.p > 0 and d.training:
                d.eval()

                def hook(_m, inp, _out) -> None:
                    x = inp[0]
                    n, w = x.numel(), t._itemsize(x)
                    k = Kernel("dropout (fused)", 0, n * (2 * w + 1), False)
                    k.outs = [(-(len(t.kernels) + 1) << 40, n)]  # the mask: written, read by no forward op
                    t.kernels.append(k)

                handles.append(d.register_forward_hook(hook))
    return handles


def trace(
    name: str, fn: Callable[[], object], passes: int, bf16: bool = True, modules: list[torch.nn.Module] = ()
) -> Part:
    """Run ``fn`` (one sample, on meta tensors) under :class:`KernelTrace`, one :class:`Part`.
    ``modules``: the modules ``fn`` runs (their dropout as the fused kernel; training flags restored);
    attention as one fused kernel (:func:`fused_attention`)."""
    import lafs_fast.models.fvit as fvit

    modes = [(m, m.training) for mod in modules for m in mod.modules()]
    saved, fvit.attention = fvit.attention, _fused_attention
    handles: list = []
    try:
        with torch.no_grad(), KernelTrace(bf16) as t:
            handles = _dropout_hooks(t, list(modules))
            fn()
    finally:
        fvit.attention = saved
        for h in handles:
            h.remove()
        for m, mode in modes:
            m.train(mode)
    mem = [k for k in t.kernels if not k.matmul]
    mm = [k for k in t.kernels if k.matmul]
    return Part(
        name,
        sum(k.flops for k in mm),
        [(k.flops, k.nbytes, k.static) for k in mm],
        sum(k.nbytes for k in mem),
        fused_bytes(t.kernels),
        sum(k.static for k in mem),
        passes,
        len(t.kernels),
    )


def explicit(name: str, nbytes: int, passes: int = 1) -> Part:
    """A memory-bound piece the trace cannot see (a Triton kernel), bytes per sample."""
    return Part(name, 0, [], nbytes, nbytes, 0, passes, 1)


# ------------------------------------------------------------------------------------------ stages


@dataclass
class StepModel:
    """One training step: per-sample parts, per-step bytes (per-parameter kernels), the batch."""

    stage: str
    batch: int
    parts: list[Part]
    step_bytes: int
    params: int

    def flops(self) -> int:
        """Model FLOPs per sample (forward x passes, attention included)."""
        return sum(p.flops * p.passes for p in self.parts)

    def nbytes(self, compiled: bool) -> int:
        """Bytes per sample of the memory-bound kernels (the per-step ones spread over the batch)."""
        mem = sum((p.compiled_bytes if compiled else p.eager_bytes) * p.passes for p in self.parts)
        static = self.step_bytes + sum(p.static_bytes * p.passes for p in self.parts)
        return mem + static // self.batch

    def seconds(self, rate: float, bw: float, compiled: bool) -> dict[str, float]:
        """Per step: matmul time (each FLOP kernel on its roofline at the batch), memory time, total."""
        b = self.batch
        mm = sum(p.passes * sum(max(f * b / rate, (n * b + w) / bw) for f, n, w in p.mm) for p in self.parts)
        mem = self.nbytes(compiled) * b / bw
        return {"matmul_s": mm, "memory_s": mem, "step_s": mm + mem}


def _meta_config(preset: str, overrides: list[str]):
    from lafs_fast.config import load_config
    from lafs_fast.train.supervised_run import stage_defaults

    return load_config(preset, None, overrides, defaults=stage_defaults(preset))


def stage1(cfg, batch: int = 82) -> StepModel:
    """A LAFS pre-training step per source image: student (fViT + DINO head) on 2 dense views of
    196 tokens and 8 sparse views of 36, forward + backward; the teacher on the 2 dense views; the
    DINO loss; the views kernel and patch sampler (explicit bytes); AdamW, clipping, EMA."""
    from lafs_fast.train.dino import DINOLoss, build_dino_models

    m, v, d = cfg.model, cfg.views, cfg.dino
    tok = 3 * m.patch_size**2
    with torch.device("meta"):
        student, teacher = build_dino_models(cfg)
        loss = DINOLoss(d.out_dim, v.n_global + v.n_local, v.n_global, d.student_temp, d.center_momentum, d.centering)
        dense = torch.empty(v.n_global, v.global_tokens, tok)
        sparse = torch.empty(v.n_local, v.local_tokens, tok)
    for b in (student.backbone, teacher.backbone):
        b.set_attention("sdpa")
    student.train(), teacher.train()
    # the loss on real CPU tensors of its real sizes (12 x out_dim): it opens autocast regions, which
    # the meta device does not support
    s_out = torch.randn(v.n_global + v.n_local, d.out_dim)
    t_out = torch.randn(v.n_global, d.out_dim)
    loss = loss.to_empty(device="cpu")
    loss.center.zero_()
    parts = [
        trace("student fViT + DINO head", lambda: student([dense, sparse]), 3, modules=[student]),
        trace("teacher fViT + DINO head", lambda: teacher([dense]), 1, modules=[teacher]),
        trace("DINO loss (softmaxes over out_dim)", lambda: loss(s_out, t_out, 0.04), 3),
        explicit(
            "views kernel (10 views: source read, clean + augmented bf16 written)",
            (v.n_global + v.n_local) * m.image_size**2 * 3 * 5,
        ),
        explicit("patch sampler (footprints read fp32, tokens written bf16)", _sampler_bytes(m, v)),
    ]
    n = sum(p.numel() for p in student.parameters())
    return StepModel("stage 1", batch, parts, n * (ADAMW_B + CLIP_B + EMA_B), n)


def _sampler_bytes(m, v) -> int:
    px = v.n_global * view_read_px(v.global_tokens, m.image_size, m.patch_size)
    px += v.n_local * view_read_px(v.local_tokens, m.image_size, m.patch_size)
    tokens = v.n_global * v.global_tokens + v.n_local * v.local_tokens
    return px * 3 * 4 + tokens * 3 * m.patch_size**2 * 2


def stage2(cfg, batch: int = 200, classes: int = 10_000) -> StepModel:
    """A LAFS fine-tuning step per image: the trainable landmark CNN (fp32), the patch sampler
    (explicit), the fViT on 196 tokens + the margin head + cross-entropy (bf16), forward + backward;
    the frozen landmark CNN with BatchNorm folded, forward; augmentation (explicit: the view kernel,
    RandAugment, erasing, Mixup: about 8 passes over the fp32 image); AdamW."""
    import torch.nn.functional as F

    from lafs_fast.models import build_backbone, build_landmark_cnn
    from lafs_fast.models.landmark_cnn import fold_batchnorm
    from lafs_fast.models.part_fvit import build_margin_head

    m = cfg.model
    with torch.device("meta"):
        cnn, vit = build_landmark_cnn(m), build_backbone(m)
        head = build_margin_head(cfg.finetune.head, m.dim, classes, cfg.finetune.scale, cfg.finetune.margin)
        frozen = fold_batchnorm(build_landmark_cnn(m))
        image = torch.empty(1, 3, m.image_size, m.image_size)
        tokens = torch.empty(1, m.num_patches, 3 * m.patch_size**2)
        label = torch.zeros(1, dtype=torch.long)
    vit.set_attention("sdpa")

    def vit_head() -> object:
        return F.cross_entropy(head(vit(tokens), label), label)

    img_bytes = 3 * m.image_size**2 * 4
    parts = [
        trace("landmark CNN (fp32)", lambda: cnn(image), 3, bf16=False, modules=[cnn]),
        explicit("patch sampler", img_bytes + m.num_patches * 3 * m.patch_size**2 * 2, 3),
        trace("fViT + margin head + cross-entropy", vit_head, 3, modules=[vit]),
        trace("frozen landmark CNN, BatchNorm folded (fp32)", lambda: frozen(image), 1, bf16=False),
        explicit("augmentation (views, RandAugment, erasing, Mixup)", 8 * img_bytes),
    ]
    n = sum(p.numel() for mod in (cnn, vit, head) for p in mod.parameters())
    return StepModel("stage 2", batch, parts, n * ADAMW_B, n)


# ---------------------------------------------------------------------------------------- prediction


def predict(model: StepModel, rate: float, bw: float, compiled: bool, peak: float | None = None) -> dict[str, float]:
    """Predicted step at matmul ``rate`` (FLOP/s) and bandwidth ``bw`` (B/s): samples/s, ms per step
    (matmul / memory), and MFU against ``peak`` (default ``rate``)."""
    t = model.seconds(rate, bw, compiled)
    per_s = model.batch / t["step_s"]
    return {
        "per_s": per_s,
        "step_ms": t["step_s"] * 1e3,
        "matmul_ms": t["matmul_s"] * 1e3,
        "memory_ms": t["memory_s"] * 1e3,
        "mfu": model.flops() * per_s / (peak or rate),
    }


def models(preset: str = "reference", overrides: list[str] | None = None) -> list[StepModel]:
    """Stage 1 (82 images a GPU) and stage 2 (200 images, 10,000 classes) at ``preset``."""
    cfg = _meta_config(preset, list(overrides or []))
    return [stage1(cfg), stage2(cfg)]


_MODELS: dict[tuple, StepModel] = {}


def step_model(stage: int, cfg, batch: int, classes: int = 10_000) -> StepModel:
    """stage1(cfg, batch) or stage2(cfg, batch, classes), built once per process (a benchmark's rows)."""
    key = (stage, repr(cfg), batch, classes)
    if key not in _MODELS:
        _MODELS[key] = stage1(cfg, batch) if stage == 1 else stage2(cfg, batch, classes)
    return _MODELS[key]


def annotate(extra: dict, model: StepModel, compiled: bool, median_s: float) -> None:
    """A GPU benchmark row's prediction beside its measurement, from the device's measured matmul
    rate and copy bandwidth (``extra`` holds them: bench_device.record_ceilings): ``predicted_per_s``,
    ``predicted_step_ms`` and ``measured_over_predicted``."""
    if "matmul_TFLOPs" not in extra or "copy_GBps" not in extra:
        return
    p = predict(model, extra["matmul_TFLOPs"] * 1e12, extra["copy_GBps"] * 1e9, compiled)
    extra["predicted_per_s"] = p["per_s"]
    extra["predicted_step_ms"] = p["step_ms"]
    extra["measured_over_predicted"] = model.batch / median_s / p["per_s"]


def rows(ms: list[StepModel], ceilings: dict[str, tuple[float, float, float]]) -> list[dict[str, object]]:
    """One row per (stage, mode, device): ceilings = {label: (matmul rate, bandwidth, MFU peak)}."""
    out = []
    for m in ms:
        for compiled in (False, True):
            for label, (rate, bw, peak) in ceilings.items():
                r = predict(m, rate, bw, compiled, peak)
                out.append(dict(stage=m.stage, mode="compiled" if compiled else "eager", device=label, **r))
    return out


def datasheet_ceilings(expected: bool) -> dict[str, tuple[float, float, float]]:
    """{device: (rate, bandwidth, peak)}: the datasheet's, times ETA_MATMUL / ETA_BW when ``expected``."""
    em, eb = (ETA_MATMUL, ETA_BW) if expected else (1.0, 1.0)
    return {k: (f * em, b * eb, f) for k, (f, b) in DEVICES.items()}


def markdown(ms: list[StepModel], measured: dict[str, tuple[float, float, float]] | None = None) -> str:
    """The tables of docs/performance.md: counts per sample, then predicted figures per device."""
    out = [
        "| stage | parameters | FLOPs / sample | bytes / sample, eager | bytes / sample, compiled | kernels / forward |"
    ]
    out.append("| --- | ---: | ---: | ---: | ---: | ---: |")
    for m in ms:
        k = sum(p.kernels for p in m.parts)
        out.append(
            f"| {m.stage} (batch {m.batch}) | {m.params / 1e6:.1f} M | {m.flops() / 1e9:.1f} G | "
            f"{m.nbytes(False) / 1e6:,.0f} MB | {m.nbytes(True) / 1e6:,.0f} MB | {k:,} |"
        )
    out += ["", "| stage | mode | device | samples/s | ms / step | matmul ms | memory ms | MFU |"]
    out.append("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    ceil = {f"{k} ceiling": v for k, v in datasheet_ceilings(False).items()}
    ceil.update({f"{k} expected": v for k, v in datasheet_ceilings(True).items()})
    ceil.update(measured or {})
    for r in sorted(rows(ms, ceil), key=lambda r: (r["stage"], r["mode"], r["device"])):
        out.append(
            f"| {r['stage']} | {r['mode']} | {r['device']} | {r['per_s']:,.0f} | {r['step_ms']:.1f} | "
            f"{r['matmul_ms']:.1f} | {r['memory_ms']:.1f} | {100 * r['mfu']:.0f} % |"
        )
    return "\n".join(out) + "\n"


def parts_markdown(ms: list[StepModel]) -> str:
    """Per part: forward FLOPs, per-sample bytes eager / compiled, per-step weight bytes, passes."""
    out = ["| stage | part | GFLOP fwd | MB eager fwd | MB compiled fwd | MB per step (weights) | passes |"]
    out.append("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for m in ms:
        for p in m.parts:
            out.append(
                f"| {m.stage} | {p.name} | {p.flops / 1e9:.2f} | {p.eager_bytes / 1e6:,.1f} | "
                f"{p.compiled_bytes / 1e6:,.1f} | {p.static_bytes / 1e6:,.0f} | {p.passes} |"
            )
    return "\n".join(out) + "\n"


def measured_ceilings() -> dict[str, tuple[float, float, float]]:
    """This device's measured bf16 matmul rate and copy bandwidth (benchmarks/bench_device.py)."""
    from benchmarks.bench_device import ceilings, datasheet_bf16_flops

    c = ceilings()
    rate = c["matmul_TFLOPs"] * 1e12
    return {"this device, measured": (rate, c["copy_GBps"] * 1e9, datasheet_bf16_flops() or rate)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="reference")
    ap.add_argument("--json", action="store_true", help="rows as JSON instead of markdown")
    ap.add_argument("--measured", action="store_true", help="add this device's measured ceilings (a GPU)")
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. model.depth=1")
    a = ap.parse_args(argv)
    ms = models(a.preset, a.overrides)
    measured = measured_ceilings() if a.measured else None
    if a.json:
        ceil = dict(datasheet_ceilings(True), **(measured or {}))
        print(json.dumps(rows(ms, ceil), indent=1))
    else:
        print(markdown(ms, measured) + "\n" + parts_markdown(ms), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
