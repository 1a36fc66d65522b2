"""Cold ``train.compile`` cost of one LAFS pre-training step on the CPU (Inductor's C++ backend).

Builds the engine exactly as ``lafs-fast pretrain`` does (``Engine`` with ``train.compile=true``,
so whatever the engine compiles is what is measured) on synthetic faces, then times the first
optimiser step (compiles every graph: student at 197 and 37 tokens, forward and backward, and the
no-grad teacher), the second (warm) and, for reference, an eager step. Compile time = first step
minus the eager step. Run with a fresh Inductor cache for a cold figure:

    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) OMP_NUM_THREADS=1 TORCHINDUCTOR_COMPILE_THREADS=1 \\
        python benchmarks/compile_time.py                     # small preset (4 layers, dim 192)
    ... python benchmarks/compile_time.py model.depth=12 model.dim=64 model.heads=2 model.head_dim=32 model.mlp_dim=128

Prints one JSON line. Not a pytest case: one cold compile is the measurement, and it takes minutes.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

import torch


class _Batches:
    """The minimal loader the engine reads: the same synthetic batch, ``steps`` times."""

    def __init__(self, batch: tuple[torch.Tensor, torch.Tensor], steps: int) -> None:
        self.batch, self.steps = batch, steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        return iter([self.batch] * self.steps)

    def set_epoch(self, epoch: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {}


def _engine(overrides: list[str], compile_: bool, steps: int):
    from lafs_fast.config import load_config
    from lafs_fast.launch import DistInfo
    from lafs_fast.train.dino import DinoStage
    from lafs_fast.train.engine import Engine

    cfg = load_config(
        "small",
        None,
        [
            *overrides,
            f"train.compile={str(compile_).lower()}",
            "train.device=cpu",
            "optim.epochs=1",
            "optim.warmup_epochs=0",
        ],
    )
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    b, s = cfg.optim.batch_size, cfg.model.image_size
    batch = (torch.randint(0, 256, (b, s, s, 3), dtype=torch.uint8, generator=g), torch.zeros(b, dtype=torch.int64))
    stage = DinoStage(cfg, torch.device("cpu"))
    out = tempfile.mkdtemp(prefix="lafs-compile-time-")
    t0 = time.perf_counter()
    engine = Engine(cfg, stage, _Batches(batch, steps), DistInfo(), out, progress=False)
    return cfg, engine, time.perf_counter() - t0


def _step_times(engine, steps: int) -> list[float]:
    batches = engine._batches(0)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        rec = engine._train_step(batches, 0)
        float(rec["loss"])  # wait for the step
        engine.step += 1
        times.append(time.perf_counter() - t0)
    return times


def main(argv: list[str]) -> int:
    overrides = list(argv)
    cfg, eager, _ = _engine(overrides, False, 2)
    eager_t = min(_step_times(eager, 2))
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    _, comp, setup = _engine(overrides, True, 2)
    first, second = _step_times(comp, 2)
    m = cfg.model
    print(
        json.dumps(
            {
                "overrides": overrides,
                "depth": m.depth,
                "dim": m.dim,
                "batch": cfg.optim.batch_size,
                "tokens": [cfg.views.global_tokens, cfg.views.local_tokens],
                "pack": cfg.views.pack,
                "compile_s": round(first - eager_t + setup, 2),
                "first_step_s": round(first, 2),
                "second_step_s": round(second, 3),
                "eager_step_s": round(eager_t, 3),
                "unique_graphs": counters["stats"]["unique_graphs"],
                "torch": torch.__version__,
                "cache_dir": os.environ.get("TORCHINDUCTOR_CACHE_DIR"),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
