"""What a run says while it trains, for a person or a batch job: the periodic log line, and the
measurements (validation, k-NN checks) that join the step records on the curves.

- :class:`ProgressMeter`: every ``train.log_every`` steps rank 0 logs one line (the terminal and
  ``train.log``, with or without the progress bar), in the spirit of arcface_torch's speed line and
  DINOv2's ``MetricLogger``::

      [pretrain] step 30/96 (31%) epoch 2/6 | loss 5.412 (mean of 10) lr 4.96e-04 teacher_entropy 4.71
      teacher_batch_entropy 5.40 | 24.5 samples/s, 0.65 s/step, data 0.01 s/step, eta 0:00:43 | peak RSS 0.62 GiB

  The loss and the stage's health keys (``Stage.progress_keys``) are the means over the steps since
  the previous line (each step's values are read on the host anyway, one step late, for the NaN
  check: no extra sync); the speed, the time the loop waited for the loader and the ETA are over the
  same steps; the memory is the process's peak so far (CUDA's allocator on a GPU, the resident set
  on the CPU).
- :func:`parse_every`: ``500`` / ``500steps`` / ``2epochs`` -> a number of steps once the plan is known.
- :func:`check_record`: a k-NN check's figures as metrics.jsonl keys.
"""

from __future__ import annotations

import datetime
import math
import re
import sys
from dataclasses import dataclass, field

import torch

__all__ = ["ProgressMeter", "peak_memory", "parse_every", "Every", "check_record"]


def peak_memory(device: torch.device) -> str:
    """The process's peak memory so far: CUDA's allocator peak on a GPU, else the peak resident set
    (``getrusage``; "n/a" where the platform has none)."""
    if device.type == "cuda":
        return f"peak mem {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB (CUDA)"
    try:
        import resource
    except ImportError:  # Windows: no getrusage
        return "peak RSS n/a"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss *= 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return f"peak RSS {rss / 2**30:.2f} GiB"


@dataclass
class ProgressMeter:
    """The sums behind one log line, reset after each line.

    ``keys``: the stage's health keys shown (averaged) beside the loss; ``total``: the step the run
    stops at; ``epochs``: the plan's."""

    keys: tuple[str, ...]
    total: int
    epochs: int
    device: torch.device
    sums: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    steps: int = 0  # optimiser steps since the last line
    data_wait: float = 0.0  # seconds the loop waited for the loader since the last line

    def add_record(self, record: dict[str, float]) -> None:
        """One step's host values (the loss and the health keys it has)."""
        for k in ("loss", *self.keys):
            v = record.get(k)
            if isinstance(v, (int, float)) and math.isfinite(v):
                self.sums[k] = self.sums.get(k, 0.0) + float(v)
                self.counts[k] = self.counts.get(k, 0) + 1

    def add_step(self, data_wait: float) -> None:
        """One optimiser step done, of which ``data_wait`` seconds waiting for batches."""
        self.steps += 1
        self.data_wait += data_wait

    def line(self, step: int, epoch: int, lr: float, samples_per_s: float, seconds: float) -> str:
        """The line after ``step`` (1-based, as metrics.jsonl counts) in ``epoch`` (0-based), ``seconds``
        after the previous line; resets the sums."""
        n = max(self.steps, 1)
        per_step = seconds / n
        mean = {k: self.sums[k] / self.counts[k] for k in self.sums if self.counts.get(k)}
        loss = f"loss {mean['loss']:.4f} (mean of {self.counts['loss']})" if "loss" in mean else "loss n/a"
        health = "".join(f" {k} {mean[k]:.4g}" for k in self.keys if k in mean)
        eta = datetime.timedelta(seconds=round(per_step * (self.total - step)))
        text = (
            f"step {step}/{self.total} ({100 * step / max(self.total, 1):.0f}%) "
            f"epoch {epoch + 1}/{self.epochs} | {loss} lr {lr:.3g}{health} | {samples_per_s:.1f} samples/s, "
            f"{per_step:.3g} s/step, data {self.data_wait / n:.3g} s/step, eta {eta} | {peak_memory(self.device)}"
        )
        self.sums, self.counts, self.steps, self.data_wait = {}, {}, 0, 0.0
        return text


_EVERY = re.compile(r"^\s*(\d+)\s*(steps?|epochs?)?\s*$")


@dataclass(frozen=True)
class Every:
    """A period in optimiser steps or epochs (``--knn-every``, ``--save-teacher-every``)."""

    count: int
    unit: str  # "steps" | "epochs"

    def steps(self, steps_per_epoch: int) -> int:
        return self.count * (steps_per_epoch if self.unit == "epochs" else 1)

    def __str__(self) -> str:
        return f"{self.count} {self.unit}"


def parse_every(text: str, flag: str) -> Every:
    """``"500"`` or ``"500steps"`` -> every 500 optimiser steps; ``"2epochs"`` -> every 2 epochs.
    ValueError naming ``flag`` otherwise (0 included)."""
    m = _EVERY.match(str(text))
    if not m or int(m.group(1)) < 1:
        raise ValueError(f"{flag} {text!r}: expects a count of steps or epochs >= 1, e.g. 500, 500steps or 2epochs")
    unit = "epochs" if (m.group(2) or "").startswith("epoch") else "steps"
    return Every(int(m.group(1)), unit)


def check_record(result: dict[str, float]) -> dict[str, float]:
    """A k-NN check's figures (``lafs_fast.eval.knn.knn_check``) as metrics.jsonl / TensorBoard keys."""
    return {"knn/top1": result["knn_top1"], "knn/verification": result["verification"]}
