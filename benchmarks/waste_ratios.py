"""Issue 21 item 4: each removal of waste timed against what it replaced, side by side in one run.

Each case builds its "before" and "after" on the same inputs and times them interleaved (before,
after, before, ...), so both see the same machine load; the ratio is median(before) / median(after).
The "before" is the code path each change kept as its oracle (``FViT.cls_only_last_block=False``,
``rand_augment(all_ops=True)``, the unfolded NCHW frozen landmark CNN) or, for the clipping, the
per-parameter loop it replaced (tests/test_engine.py holds the same loop as the bitwise oracle).

    OMP_NUM_THREADS=1 python benchmarks/waste_ratios.py [--rounds 7] [--cases landmark_ref,cls_only]

One thread: on a 2-core machine shared with other jobs, two threads measured 5-10x slower and noisier.
Prints one JSON line per case: {"case", "before_ms", "after_ms", "ratio", "what"}. CPU figures: on a
GPU the launch-bound cases (clipping) gain more, the FLOP-bound ones (CLS only) about their FLOP ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

Case = tuple[Callable[[], object], Callable[[], object], str]


def side_by_side(before: Callable[[], object], after: Callable[[], object], rounds: int) -> tuple[float, float]:
    """Median seconds of ``before`` and ``after``, timed alternately after one warm-up call of each."""
    before(), after()
    tb: list[float] = []
    ta: list[float] = []
    for _ in range(rounds):
        for fn, acc in ((before, tb), (after, ta)):
            t0 = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t0)
    return statistics.median(tb), statistics.median(ta)


def landmark_ref(batch: int = 32) -> Case:
    """The stage-2 regulariser's frozen reference CNN (eval, fp32, no grad) on (batch, 3, 112, 112):
    46 BatchNorms as their own passes (before) vs folded into the convolutions (after)."""
    from lafs_fast.models.landmark_cnn import LandmarkCNN, fold_batchnorm

    torch.manual_seed(0)
    cnn = LandmarkCNN().eval().requires_grad_(False)
    folded = fold_batchnorm(cnn)
    x = torch.rand(batch, 3, 112, 112) * 2 - 1

    def run(m: torch.nn.Module) -> Callable[[], object]:
        return lambda: m(x)

    return run(cnn), run(folded), f"frozen landmark CNN, batch {batch}: BatchNorm folded"


def landmark_nhwc(batch: int = 16) -> Case:
    """The trainable landmark CNN (train mode, dropout 0) forward + backward on (batch, 3, 112, 112):
    NCHW (before) vs channels_last (after). A GPU layout (cuDNN's depthwise / 1x1 convolutions);
    on the CPU it is shown, not claimed."""
    from lafs_fast.models.landmark_cnn import LandmarkCNN

    torch.manual_seed(0)
    nchw = LandmarkCNN(dropout=0.0)
    nhwc = LandmarkCNN(dropout=0.0)
    nhwc.load_state_dict(nchw.state_dict())
    nhwc.to_channels_last()
    x = torch.rand(batch, 3, 112, 112) * 2 - 1

    def run(m: torch.nn.Module) -> Callable[[], object]:
        return lambda: m(x).sum().backward()

    return run(nchw), run(nhwc), f"landmark CNN, batch {batch}, fwd+bwd: channels_last"


def cls_only(batch: int = 8, depth: int = 4) -> Case:
    """fViT forward + backward on (batch, 196, 192) patch tokens at dim 192 (the small preset's
    width), every row of the last block (before) vs its CLS row only (after)."""
    from lafs_fast.models.fvit import FViT

    torch.manual_seed(0)
    kw = dict(dim=192, depth=depth, heads=3, head_dim=64, mlp_dim=768)
    full, fast = FViT(**kw, cls_only_last_block=False), FViT(**kw)
    fast.load_state_dict(full.state_dict())
    tokens = torch.randn(batch, 196, 192)

    def run(m: torch.nn.Module) -> Callable[[], object]:
        return lambda: m(tokens).sum().backward()

    return run(full), run(fast), f"fViT depth {depth} dim 192, batch {batch}, fwd+bwd: last block CLS only"


def randaugment(batch: int = 64) -> Case:
    """Device RandAugment (2 layers, p 0.5) on (batch, 3, 112, 112): every op on every image and a
    select (before) vs the drawn ops only (after); the same draws (one seed) in both."""
    from lafs_fast.train.randaugment import rand_augment

    x = torch.rand(batch, 3, 112, 112) * 255

    def run(all_ops: bool) -> Callable[[], object]:
        return lambda: rand_augment(x, torch.Generator().manual_seed(0), all_ops=all_ops)

    return run(True), run(False), f"RandAugment, batch {batch} at 112 px: drawn ops only"


def clip(n_params: int = 150) -> Case:
    """Per-parameter gradient clipping over ``n_params`` small gradients (the reference preset has
    ~145 parameters): the factors one parameter at a time (before) vs as one vector (after)."""
    from lafs_fast.train.engine import clip_gradients

    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(192 if i % 2 else 64, generator=gen) * 10 for i in range(n_params)]
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]

    def before() -> object:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        gs = [p.grad for p in params]
        norms = torch._foreach_norm(gs, 2.0)
        torch._foreach_mul_(gs, [torch.clamp(3.0 / (n + 1e-6), max=1.0) for n in norms])
        return norms

    def after() -> object:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        return clip_gradients(params, 3.0)

    return before, after, f"gradient clipping, {n_params} parameters: one factor vector"


CASES: dict[str, Callable[[], Case]] = {
    "landmark_ref": landmark_ref,
    "landmark_nhwc": landmark_nhwc,
    "cls_only": cls_only,
    "randaugment": randaugment,
    "clip": clip,
}


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
    """Runs the named cases; prints and returns one record per case."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--cases", default=",".join(CASES))
    args = ap.parse_args(argv)
    rows = []
    for name in args.cases.split(","):
        before, after, what = CASES[name]()
        with torch.inference_mode(name == "landmark_ref"):
            tb, ta = side_by_side(before, after, args.rounds)
        row = {"case": name, "before_ms": round(tb * 1e3, 2), "after_ms": round(ta * 1e3, 2)}
        row.update(ratio=round(tb / ta, 2), what=what, threads=torch.get_num_threads())
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


if __name__ == "__main__":
    main()
