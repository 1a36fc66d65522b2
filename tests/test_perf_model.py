"""benchmarks/perf_model.py: its FLOP count is torch's FLOP counter's (attention included) on a
tiny model, and its byte count of a known chain of kernels is the hand count, eager and fused."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import perf_model
from lafs_fast.models import FViT


def test_flops_match_the_counter_with_attention_counted_explicitly(gen):
    """The counter sees attention as two batched matmuls under the math backend; the model counts it
    from the fused kernel's shapes (the counter gives SDPA 0 on the CPU): the totals agree."""
    kw = dict(dim=48, depth=3, heads=3, head_dim=16, mlp_dim=96, dropout=0.0, emb_dropout=0.0, drop_path=0.0)
    vit = FViT(**kw, attention="math").eval()
    tokens = torch.randn(2, 36, 192, generator=gen)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        vit(tokens)
    with torch.device("meta"):
        meta = FViT(**kw).eval()
        t_meta = torch.empty(2, 36, 192)
    part = perf_model.trace("fvit", lambda: meta(t_meta), 1, modules=[meta])
    assert part.flops == fc.get_total_flops() > 0
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        FViT(**kw, attention="sdpa").eval()(tokens)
    assert fc.get_total_flops() < part.flops  # what the counter alone gives with SDPA on the CPU


def test_bytes_per_kernel_eager_and_fused():
    """gelu(gelu(x)) on n fp32 elements: eager 2 kernels of 8n bytes, fused one of 8n. A linear layer
    under emulated bf16 autocast: the activation's cast (6 B an element) and the weight read per step."""
    n = 1000
    with torch.device("meta"):
        x = torch.empty(n)
        lin = torch.nn.Linear(10, 20, bias=False)
        a = torch.empty(5, 10)
    p = perf_model.trace("chain", lambda: F.gelu(F.gelu(x)), 1, bf16=False)
    assert (p.eager_bytes, p.compiled_bytes, p.flops) == (16 * n, 8 * n, 0)
    p = perf_model.trace("linear", lambda: lin(a), 1)
    assert p.flops == 2 * 5 * 10 * 20
    assert p.mm == [(2 * 5 * 10 * 20, 2 * (5 * 10 + 5 * 20), 2 * 10 * 20)]  # bf16 in / out; the weight per step
    assert p.eager_bytes == 6 * 5 * 10 and p.static_bytes == 6 * 10 * 20  # the casts


def test_reference_preset_prediction_is_self_consistent():
    """The tables' arithmetic: compiled moves fewer bytes than eager, a faster device predicts more,
    MFU = FLOPs x samples/s / peak."""
    s1 = perf_model.models("reference", ["model.depth=1"])[0]
    assert s1.nbytes(True) < s1.nbytes(False)
    h100 = perf_model.predict(s1, 989.4e12, 3.35e12, True)
    a100 = perf_model.predict(s1, 312e12, 2.039e12, True)
    assert h100["per_s"] > a100["per_s"] > 0
    assert abs(h100["mfu"] - s1.flops() * h100["per_s"] / 989.4e12) < 1e-9


def test_docs_table_is_what_the_command_prints():
    """docs/performance.md holds the tables `python benchmarks/perf_model.py` prints (reference preset)."""
    from pathlib import Path

    ms = perf_model.models("reference")
    doc = (Path(__file__).resolve().parents[1] / "docs" / "performance.md").read_text()
    assert perf_model.markdown(ms) + "\n" + perf_model.parts_markdown(ms) in doc
