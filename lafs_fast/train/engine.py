"""The training engine: one loop for every stage.

A stage (LAFS pre-training, Part fViT / fine-tuning) supplies the model and the batch -> loss map
through the small :class:`Stage` interface; the engine owns everything else:

- AdamW with parameter groups (no weight decay on biases and 1-D parameters, per-group multipliers
  ``lr_mult`` / ``wd_mult``), per-step cosine schedules with warm-up for lr and weight decay, plus
  whatever per-step schedules the stage adds (teacher momentum, teacher temperature, ...);
- gradient accumulation (``optim.accumulation`` batches per optimiser step, DDP ``no_sync`` on all
  but the last), per-parameter gradient-norm clipping (``optim.clip_grad``, DINO's rule);
- bf16 autocast (no loss scaler) on CUDA, fp32 on the CPU (``train.precision`` auto; an explicit
  ``bf16`` runs the same regime on the CPU, :func:`lafs_fast.launch.resolve_precision`); optional
  ``torch.compile`` of the stage's modules (``train.compile``; regional for the fViT: each block
  compiled, one graph shared by all blocks per shape);
- DDP when the process group has several ranks; rank 0 alone logs and writes;
- a tqdm progress bar (samples/s, ETA) and, every ``train.log_every`` steps, one log line (step,
  epoch, smoothed loss, lr, the stage's health keys, speed, data wait, ETA, peak memory:
  ``progress.py``), bar or no bar; a JSONL metrics log (and TensorBoard when installed, W&B with
  ``train.wandb``) that also takes the measurements made beside the steps (:meth:`Engine.log_record`,
  e.g. a validation) and periodic checks on rank 0 (:meth:`Engine.every`);
- checkpoints written atomically (keep the last ``train.keep_last`` and every ``train.keep_every``-th
  epoch's), and resume that continues the same trajectory bit for bit on the CPU: model,
  optimiser, step (so every schedule), stage state (teacher, centre), RNG states and the loader's
  position;
- a non-finite loss stops the run with :class:`NonFiniteLoss` naming the step; a checkpoint is
  never written from non-finite parameters. The loss is read on the host ONE STEP LATE (step s's
  after step s + 1 is queued), and at once before every log line and checkpoint: no host sync
  inside a step, so on a GPU the CPU queues the next step while the current one runs. A
  non-finite step has therefore been applied (with the step after it) when the run stops; nothing
  is saved from it, the last checkpoint is from before it.

Randomness of the data path is keyed by ``StepContext.seed`` (a function of run seed, rank, step
and micro-batch), so it needs no saved state to resume.

Beside it: what a checkpoint holds (exactly what the loop reads), writing, pruning and resuming in
``checkpointing.py``; the run folder's rules and the metrics log in ``run_folder.py``; messages in
``logs.py``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

from lafs_fast.config import Config, config_to_dict, config_yaml
from lafs_fast.io import atomic_write_bytes
from lafs_fast.launch import DistInfo, resolve_precision
from lafs_fast.logs import log_to_file
from lafs_fast.train import checkpointing
from lafs_fast.train.progress import ProgressMeter
from lafs_fast.train.run_folder import MetricsLog, RunLock, check_no_links, check_run_folder

__all__ = [
    "Stage",
    "StepContext",
    "Plan",
    "Engine",
    "FitResult",
    "NonFiniteLoss",
    "Preempted",
    "compile_stage",
    "cosine_schedule",
    "linear_then_constant",
    "param_groups",
    "clip_gradients",
]

log = logging.getLogger(__name__)


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or inf; the run stopped before using it."""


class Preempted(RuntimeError):
    """SIGTERM (what schedulers send before they kill a job): the run wrote a checkpoint of the step it
    had reached and stopped; ``--resume`` continues it."""


def _sigterm_handler(flag: list[bool]) -> Callable[[], None]:
    """Until the returned function is called, SIGTERM sets ``flag[0]`` instead of killing the process
    (main thread only: handlers can be installed nowhere else; a library caller's thread is left alone)."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: flag.__setitem__(0, True))
    return lambda: signal.signal(signal.SIGTERM, previous)


# --------------------------------------------------------------------------------------------------
# schedules


def cosine_schedule(
    base: float,
    final: float,
    epochs: int,
    steps_per_epoch: int,
    warmup_epochs: float = 0,
    start_warmup_value: float = 0.0,
) -> np.ndarray:
    """Per-step values (epochs * steps_per_epoch,) float64: linear warm-up from ``start_warmup_value``
    to ``base`` over ``warmup_epochs``, then half a cosine from ``base`` to ``final`` (DINO's
    ``cosine_scheduler``, value for value)."""
    total = int(epochs * steps_per_epoch)
    warm = min(int(round(warmup_epochs * steps_per_epoch)), total)
    warmup = np.linspace(start_warmup_value, base, warm) if warm > 0 else np.array([])
    iters = np.arange(total - warm)
    cos = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / max(len(iters), 1)))
    return np.concatenate((warmup, cos)).astype(np.float64)


def linear_then_constant(start: float, end: float, ramp_epochs: int, epochs: int, steps_per_epoch: int) -> np.ndarray:
    """Per-step values: ``np.linspace(start, end, ramp_epochs)`` indexed by EPOCH (DINO's teacher
    temperature: constant within an epoch), then ``end``. Works in either direction."""
    ramp = min(ramp_epochs, epochs)
    per_epoch = np.concatenate((np.linspace(start, end, ramp), np.full(epochs - ramp, end)))
    return np.repeat(per_epoch, steps_per_epoch).astype(np.float64)


# --------------------------------------------------------------------------------------------------
# optimiser helpers


def param_groups(
    model: nn.Module, lr_mult: float = 1.0, wd_mult: float = 1.0, no_decay: tuple[str, ...] = ()
) -> list[dict[str, Any]]:
    """Two AdamW groups of ``model``'s trainable parameters: weights (``wd_mult``) and biases /
    1-D parameters / names containing any of ``no_decay`` (no weight decay; DINO's rule)."""
    decay, plain = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith(".bias") or any(s in name for s in no_decay):
            plain.append(p)
        else:
            decay.append(p)
    groups = [
        {"params": decay, "lr_mult": lr_mult, "wd_mult": wd_mult},
        {"params": plain, "lr_mult": lr_mult, "wd_mult": 0.0},
    ]
    return [g for g in groups if g["params"]]


@torch.no_grad()
def clip_gradients(params: list[torch.Tensor], clip: float) -> torch.Tensor | None:
    """Per-parameter clip: each gradient whose 2-norm exceeds ``clip`` is scaled by
    ``clip / (norm + 1e-6)`` (DINO's ``clip_gradients``), without a host sync. Returns the norms.

    Multi-tensor: the norms in one ``_foreach_norm``, the factors as one vector (4 small kernels
    for every parameter at once, the same arithmetic as per parameter), the scaling in one
    ``_foreach_mul_``; a few launches per step instead of 4 per parameter (580 at the reference
    preset: tests/test_engine.py checks the numbers against the per-parameter loop)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or clip <= 0:
        return None
    norms = torch.stack(torch._foreach_norm(grads, 2.0))
    coefs = torch.clamp(clip / (norms + 1e-6), max=1.0)
    torch._foreach_mul_(grads, list(coefs.unbind(0)))
    return norms


# --------------------------------------------------------------------------------------------------
# the stage interface


@dataclass(frozen=True)
class Plan:
    """The run's shape: ``total_steps = epochs * steps_per_epoch`` optimiser steps of
    ``global_batch = batch_size * world_size * accumulation`` samples."""

    epochs: int
    steps_per_epoch: int
    accumulation: int
    batch_size: int
    world_size: int

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size * self.accumulation


@dataclass
class StepContext:
    """What a stage sees of the loop at one micro-batch."""

    step: int  # optimiser step (0-based) this micro-batch belongs to
    epoch: int
    micro: int  # micro-batch index within the accumulation
    seed: int  # data-path seed of this (run seed, rank, step, micro)
    values: dict[str, float]  # every schedule's value at ``step`` (lr, weight_decay, + the stage's)
    dist: DistInfo
    autocast: Any = field(default=None, repr=False)  # a context-manager factory (precision)


class Stage:
    """What a training stage provides to the engine. Subclass and implement the abstract parts.

    - ``model``: the trainable ``nn.Module``; the engine moves nothing, wraps it in DDP when
      distributed and passes the wrapped module back to ``forward_loss``; its ``state_dict`` is
      checkpointed as ``model``;
    - ``forward_loss(model, batch, ctx) -> (loss (), metrics)``: one micro-batch; the engine runs it
      under autocast and calls backward on the loss;
    - optional hooks: ``schedules``, ``param_groups``, ``before_optimizer_step`` (e.g. cancel
      gradients of a frozen layer), ``after_optimizer_step`` (e.g. the EMA teacher), ``state_dict``
      / ``load_state_dict`` for state outside ``model`` (teacher, centre), ``compile_targets``,
      ``export`` (a model file for ``lafs-fast checkpoint`` / ``eval``), ``samples(batch)``.
    """

    name: str = "stage"
    model: nn.Module

    def schedules(self, plan: Plan) -> dict[str, np.ndarray]:
        return {}

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        return param_groups(model)

    def forward_loss(self, model: nn.Module, batch: Any, ctx: StepContext) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def before_optimizer_step(self, model: nn.Module, ctx: StepContext) -> None:
        pass

    def after_optimizer_step(self, model: nn.Module, ctx: StepContext) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def compile_targets(self) -> list[nn.Module]:
        return [self.model]

    def export(self) -> dict[str, Any] | None:
        return None

    def samples(self, batch: Any) -> int:
        return int(batch[0].shape[0])

    def finite_tensors(self) -> list[torch.Tensor]:
        """Tensors that must be finite before a checkpoint is written (default: model parameters)."""
        return list(self.model.parameters())

    def sharded_parameters(self) -> dict[str, tuple[nn.Parameter, int, int]]:
        """Parameters each rank holds a different row slice of (the sharded margin head's class
        centres): ``{model state-dict key: (parameter, first row, end row)}``. The engine gathers
        them (with their optimiser state) into whole tensors in every checkpoint, and gives each rank
        its rows back on resume. Default: none."""
        return {}

    # metrics of a step shown beside the loss on the progress bar and (averaged) in the log line
    progress_keys: tuple[str, ...] = ()

    def check_health(self, step: int, record: dict[str, float]) -> str | None:
        """Every step's record on the host (``step`` counted as metrics.jsonl counts it, from 1):
        a one-line warning to log (e.g. a collapse), or None."""
        return None


@dataclass
class FitResult:
    steps: int  # optimiser steps done in total (including before a resume)
    epochs_done: int
    last_checkpoint: Path | None
    history: list[dict[str, float]]
    seconds: float


def compile_stage(stage: Stage, device: torch.device, backend: str = "inductor") -> None:
    """``train.compile``: each of the stage's compile targets, after its attention backend is fixed for
    ``device``; a module with ``compile_blocks`` (the fViT) compiles its repeated blocks (regional
    compilation: one block's graph per shape instead of the whole depth), anything else compiles
    whole. What the engine does, and what the benchmarks time."""
    for m in stage.compile_targets():
        for sub in m.modules():
            if hasattr(sub, "attention_for"):
                sub.attention_for(device)
        regional = getattr(m, "compile_blocks", None)
        if regional is not None:
            regional(dynamic=False, backend=backend)
        else:
            m.compile(dynamic=False, backend=backend)


# --------------------------------------------------------------------------------------------------
# the engine


@dataclass
class _Window:
    """The loop's bookkeeping between steps (see :meth:`Engine.fit`)."""

    bar: Any
    saved_at: int  # the step of the last checkpoint written (or resumed from)
    samples: int = 0  # samples since the last metrics line
    since: float = field(default_factory=time.perf_counter)
    unchecked: tuple[int, int, dict[str, Any]] | None = None  # (step, epoch, record) whose loss is on the device
    last_loss: float = math.nan
    meter: ProgressMeter | None = None  # the periodic log line's sums (progress.py)


class Engine:
    """Runs ``stage`` over ``loader`` for ``cfg.optim.epochs`` epochs (or ``cfg.train.max_steps``).

    Args:
        cfg: the resolved config (optim.*, train.* are read here).
        stage: the stage (its ``model`` already on ``dist.device``).
        loader: a ``lafs_fast.data.Loader`` (len, set_epoch, state_dict / load_state_dict).
        dist: this process's place in the job.
        out_dir: checkpoints and ``metrics.jsonl`` (rank 0 writes).
        resume: a checkpoint path, "auto" (latest loadable in ``out_dir`` if any) or None (a new run:
            refused when ``out_dir`` holds another run, unless ``overwrite``, which deletes that run's files).
            The checkpoint's config must equal this run's but for the keys in
            ``checkpointing.RESUME_MAY_DIFFER``.
        progress: show the tqdm bar (rank 0).
        precision: "bf16" | "fp32", resolved once by the caller (the training commands); None resolves
            ``train.precision`` for ``dist.device`` here (a library caller's engine).
    """

    def __init__(
        self,
        cfg: Config,
        stage: Stage,
        loader: Any,
        dist: DistInfo,
        out_dir: str | Path,
        resume: str | Path | None = None,
        progress: bool = True,
        overwrite: bool = False,
        precision: str | None = None,
    ) -> None:
        self.cfg, self.stage, self.loader, self.dist = cfg, stage, loader, dist
        self.out_dir = Path(out_dir)
        self.device = dist.device
        self._lock: RunLock | None = None
        if dist.is_main:  # rank 0 writes: it holds the folder for the run's life (see train/run_folder.py)
            self._claim_folder(resume, overwrite)
        o = cfg.optim
        steps_per_epoch = len(loader) // o.accumulation
        if steps_per_epoch < 1:
            raise ValueError(
                f"an epoch has {len(loader)} batches, fewer than optim.accumulation={o.accumulation}; lower the "
                "accumulation or the batch size"
            )
        self.plan = Plan(o.epochs, steps_per_epoch, o.accumulation, o.batch_size, dist.world_size)
        self.precision = precision or resolve_precision(cfg.train.precision, self.device)
        self.progress = progress and dist.is_main
        self.schedules = self._build_schedules()
        self.model = self._wrap_model()
        groups = stage.param_groups(stage.model)
        self.params = [p for g in groups for p in g["params"]]
        self.optimizer = torch.optim.AdamW(
            groups,
            lr=float(self.schedules["lr"][0]),
            betas=tuple(o.betas),
            weight_decay=0.0,
            **({"fused": True} if self.device.type == "cuda" else {}),
        )
        self.step = 0
        self.last_checkpoint: Path | None = None
        self.history: list[dict[str, float]] = []
        self._checked: dict[str, Any] = {}  # the latest step record on the host
        self.metrics = MetricsLog(self.out_dir, dist.is_main, config_to_dict(cfg) if cfg.train.wandb else None)
        self._periodic: list[tuple[int, Callable[[int], None]]] = []  # (every n steps, fn(step)) on rank 0
        self._meter: ProgressMeter | None = None
        if resume is not None:
            checkpointing.resume(self, resume)
        if dist.is_main:
            atomic_write_bytes(config_yaml(cfg).encode(), self.out_dir / "config.yaml")  # = `config show`

    def _claim_folder(self, resume: str | Path | None, overwrite: bool) -> None:
        """Rank 0: lock ``out_dir`` (another run's files refused or, with ``overwrite``, deleted) and
        send the run's lines to its train.log."""
        self._lock = RunLock(self.out_dir)
        check_no_links(self.out_dir)  # a planted link to a victim: refused before anything is written or deleted
        old = self._lock.replace_old_run() if resume is None and overwrite else []
        check_run_folder(self.out_dir, None if resume is None else str(resume))
        log_to_file(self.out_dir / "train.log")  # what the run says, also in the folder (logs.py)
        if old:
            self._log_line(f"--overwrite: deleted the older run in {self.out_dir} ({len(old)} files)")

    def _build_schedules(self) -> dict[str, np.ndarray]:
        """lr (scaled by the global batch: peak lr * global_batch / 256) and weight decay, + the stage's."""
        o, plan = self.cfg.optim, self.plan
        peak = o.lr * plan.global_batch / 256.0
        schedules = {
            "lr": cosine_schedule(peak, o.min_lr, o.epochs, plan.steps_per_epoch, o.warmup_epochs),
            "weight_decay": cosine_schedule(o.weight_decay, o.weight_decay_end, o.epochs, plan.steps_per_epoch),
        }
        for k, v in self.stage.schedules(plan).items():
            if len(v) != plan.total_steps:
                raise ValueError(f"stage schedule {k!r} has {len(v)} steps, the run has {plan.total_steps}")
            schedules[k] = v
        return schedules

    def _wrap_model(self) -> nn.Module:
        """The stage's model, compiled (``train.compile``) and, with several ranks, in DDP."""
        if self.cfg.train.compile:  # before DDP wraps (DDP over compiled submodules)
            compile_stage(self.stage, self.device)
        if not self.dist.distributed:
            return self.stage.model
        ids = [self.device.index] if self.device.type == "cuda" else None
        with warnings.catch_warnings():  # torch 2.13 deprecates broadcast_buffers; its successor still syncs at init
            warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
            return nn.parallel.DistributedDataParallel(self.stage.model, device_ids=ids, broadcast_buffers=False)

    # ---------------------------------------------------------------- checkpoints (checkpointing.py)

    def save_checkpoint(self, epoch_end: bool) -> Path | None:
        """Write ``ckpt-<step>.pt`` atomically (rank 0), then prune. Refuses non-finite parameters."""
        if not checkpointing.all_finite(self.stage):
            raise NonFiniteLoss(
                f"parameters became non-finite by step {self.step}; no checkpoint written "
                f"(last good: {self.last_checkpoint or 'none'})"
            )
        return checkpointing.save(self, epoch_end)

    def state_dict(self, rng_ranks: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """The full training state, as a checkpoint holds it (``checkpointing.training_state``)."""
        return checkpointing.training_state(self, rng_ranks)

    # ---------------------------------------------------------------- logging

    def _log_line(self, text: str) -> None:
        if self.dist.is_main:  # the terminal, and train.log during a command's run (logs.py)
            log.info(f"[{self.stage.name}] {text}")

    def _log_metrics(self, record: dict[str, float]) -> None:
        self.history.append(record)
        self.metrics.add(record)  # metrics.jsonl (rank 0)

    def log_record(self, record: dict[str, float], step: int | None = None) -> None:
        """A measurement made beside the training steps (a validation, a k-NN check) into metrics.jsonl,
        TensorBoard and W&B at ``step`` (default: the step reached), beside the step records (rank 0)."""
        self.metrics.add({"step": self.step if step is None else step, **record})

    def every(self, steps: int, fn: Callable[[int], None]) -> None:
        """Call ``fn(step)`` on rank 0 after every ``steps``-th optimiser step (``step`` counted from 1,
        as metrics.jsonl counts it), after that step's log line and checkpoint. The other ranks go on
        and wait for rank 0 at the next collective (within ``train.dist_timeout_s``)."""
        if steps < 1:
            raise ValueError(f"a periodic check runs every >= 1 steps, not {steps}")
        self._periodic.append((steps, fn))

    # ---------------------------------------------------------------- the loop

    def _autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _set_optimizer_values(self, step: int) -> dict[str, float]:
        values = {k: float(v[step]) for k, v in self.schedules.items()}
        for g in self.optimizer.param_groups:
            g["lr"] = values["lr"] * g.get("lr_mult", 1.0)
            g["weight_decay"] = values["weight_decay"] * g.get("wd_mult", 1.0)
        return values

    def _seed(self, step: int, micro: int) -> int:
        # distinct, reproducible per (run seed, rank, step, micro); < 2**63 for torch generators
        return int(
            np.random.SeedSequence([self.cfg.train.seed, self.dist.rank, step, micro]).generate_state(1, np.uint64)[0]
            >> np.uint64(1)
        )

    def _batches(self, epoch: int) -> Iterator[Any]:
        self.loader.set_epoch(epoch)
        return iter(self.loader)

    def fit(self, keep_metrics_open: bool = False) -> FitResult:
        """Train to the end of the plan (or ``train.max_steps``); checkpoint at epoch ends (every
        ``train.ckpt_every_epochs``), every ``train.ckpt_every_steps`` and at the end. SIGTERM writes a
        checkpoint of the step reached and raises :class:`Preempted`. The metrics log is closed at the
        end, unless ``keep_metrics_open`` (the caller logs what it measures after the run, then calls
        ``engine.metrics.close()``); an error closes it either way."""
        t_start = time.perf_counter()
        plan, max_steps = self.plan, self.cfg.train.max_steps
        stop = plan.total_steps if max_steps <= 0 else min(max_steps, plan.total_steps)
        look = {"disable": not self.progress, "unit": "step", "dynamic_ncols": True, "desc": self.stage.name}
        bar = tqdm(total=stop, initial=self.step, **look)
        self.model.train()
        self._meter = ProgressMeter(self.stage.progress_keys, stop, plan.epochs, self.device)
        window = _Window(bar, saved_at=self.step, meter=self._meter)
        term = [False]  # set by SIGTERM while training (see _sigterm_handler)
        restore = _sigterm_handler(term)
        try:
            while self.step < stop:
                epoch = self.step // plan.steps_per_epoch
                batches = self._batches(epoch)
                while self.step < stop and self.step // plan.steps_per_epoch == epoch:
                    self._step_and_report(batches, epoch, stop, window, term)
            if window.saved_at != self.step:
                self.save_checkpoint(self.step % plan.steps_per_epoch == 0)
        except BaseException:
            self.metrics.close()
            raise
        finally:
            restore()
            bar.close()
        if not keep_metrics_open:
            self.metrics.close()
        epochs_done = self.step // plan.steps_per_epoch
        return FitResult(self.step, epochs_done, self.last_checkpoint, self.history, time.perf_counter() - t_start)

    def _step_and_report(
        self, batches: Iterator[Any], epoch: int, stop: int, window: _Window, term: list[bool]
    ) -> None:
        """One optimiser step, then what follows it: the previous step's loss read back, the progress
        bar, the metrics line, a checkpoint when due, and a stop on SIGTERM (:class:`Preempted`)."""
        cfg, plan = self.cfg.train, self.plan
        record = self._train_step(batches, epoch)
        if window.unchecked is not None:  # the previous step: finished on the device by now, or nearly
            window.last_loss = self._check_loss(*window.unchecked)
        window.unchecked = (self.step, epoch, record)
        window.samples += record.pop("_samples")
        window.meter.add_step(record.pop("_data_wait"))
        self.step += 1
        window.bar.update(1)
        now = time.perf_counter()
        rate = window.samples * plan.world_size / max(now - window.since, 1e-9)
        log_now = self.step % max(cfg.log_every, 1) == 0 or self.step == stop
        epoch_end = self.step % plan.steps_per_epoch == 0
        due = self._checkpoint_due(epoch_end)
        if log_now or due:  # this step's loss is needed (or must be vetted) now
            window.last_loss, window.unchecked = self._check_loss(*window.unchecked), None
        shown = {k: f"{self._checked[k]:.3g}" for k in self.stage.progress_keys if k in self._checked}
        loss_shown = "..." if math.isnan(window.last_loss) else f"{window.last_loss:.4f}"  # "...": not read back yet
        window.bar.set_postfix(loss=loss_shown, **shown, samples_s=f"{rate:.1f}")
        if log_now:
            record.update(step=self.step, epoch=epoch, samples_per_s=rate)
            self._log_metrics(record)
            self._log_line(window.meter.line(self.step, epoch, record["lr"], rate, now - window.since))
            window.samples, window.since = 0, now
        if due:
            self.save_checkpoint(epoch_end)
            window.saved_at = self.step
        self._run_periodic()
        if self._stop_requested(term, log_now or due):
            self._preempt(window, epoch, epoch_end)

    def _run_periodic(self) -> None:
        """Rank 0: the checks due after this step (:meth:`every`); their time counts in the next log
        line's speed and ETA (they are part of what the run takes)."""
        if self.dist.is_main:
            for n, fn in self._periodic:
                if self.step % n == 0:
                    fn(self.step)

    def _checkpoint_due(self, epoch_end: bool) -> bool:
        """Whether the step just done ends with a checkpoint (``train.ckpt_every_epochs`` / ``_steps``)."""
        cfg, step = self.cfg.train, self.step
        every_epochs = cfg.ckpt_every_epochs > 0 and (step // self.plan.steps_per_epoch) % cfg.ckpt_every_epochs == 0
        return (epoch_end and every_epochs) or (cfg.ckpt_every_steps > 0 and step % cfg.ckpt_every_steps == 0)

    def _preempt(self, window: _Window, epoch: int, epoch_end: bool) -> None:
        """SIGTERM: vet the last loss, checkpoint the step reached (unless just done), raise Preempted."""
        if window.unchecked is not None:
            window.last_loss, window.unchecked = self._check_loss(*window.unchecked), None
        if window.saved_at != self.step:
            self.save_checkpoint(epoch_end)
        raise Preempted(
            f"stopped by SIGTERM at step {self.step} (epoch {epoch}); checkpoint "
            f"{self.last_checkpoint or 'none'}; continue with --resume"
        )

    def _stop_requested(self, term: list[bool], sync_point: bool) -> bool:
        """SIGTERM seen by this process; with several ranks, by any of them (agreed at the steps where
        every rank syncs anyway, the log and checkpoint steps, so all stop at the same step)."""
        if not (self.dist.distributed and dist.is_initialized()):
            return term[0]
        if not sync_point:
            return False
        flag = torch.tensor([1.0 if term[0] else 0.0], device=self.device)
        dist.all_reduce(flag)
        return bool(flag.item() > 0)

    def _check_loss(self, step: int, epoch: int, record: dict[str, Any]) -> float:
        """Bring ``record``'s device values to the host (the one sync of a step); NonFiniteLoss
        naming ``step`` when its loss is not finite. Returns the loss."""
        for k, v in record.items():
            if isinstance(v, torch.Tensor):
                record[k] = float(v)
        value = record["loss"]
        if not math.isfinite(value):
            raise NonFiniteLoss(
                f"loss is {value} at step {step} (epoch {epoch}); stopped, nothing saved after it; "
                f"last good checkpoint: {self.last_checkpoint or 'none'}"
            )
        self._checked = record
        if self._meter is not None:
            self._meter.add_record(record)
        warning = self.stage.check_health(step + 1, record)
        if warning:
            self._log_line(warning)
        return value

    def _train_step(self, batches: Iterator[Any], epoch: int) -> dict[str, Any]:
        """Queue one optimiser step; the record's loss and metrics stay device tensors (no host sync)."""
        plan, step = self.plan, self.step
        values = self._set_optimizer_values(step)
        self.optimizer.zero_grad(set_to_none=True)
        total_loss: torch.Tensor | float = 0.0
        metrics_sum: dict[str, Any] = {}
        samples, waited = 0, 0.0
        for micro in range(plan.accumulation):
            t0 = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                raise RuntimeError(
                    f"the loader ran out of batches at step {step} (epoch {epoch}); it yielded fewer than len(loader)"
                ) from None
            waited += time.perf_counter() - t0  # the loop's wait for the loader (the log line's data time)
            ctx = StepContext(step, epoch, micro, self._seed(step, micro), values, self.dist, self._autocast)
            sync = micro == plan.accumulation - 1 or not isinstance(self.model, nn.parallel.DistributedDataParallel)
            with contextlib.nullcontext() if sync else self.model.no_sync():
                with self._autocast():
                    loss, metrics = self.stage.forward_loss(self.model, batch, ctx)
                (loss / plan.accumulation).backward()
            total_loss = total_loss + loss.detach().float() / plan.accumulation  # NaN / inf in any micro-batch stays
            for k, v in metrics.items():
                v = v.detach().float() if isinstance(v, torch.Tensor) else float(v)
                metrics_sum[k] = metrics_sum.get(k, 0.0) + v / plan.accumulation
            samples += self.stage.samples(batch)
        clip_gradients(self.params, self.cfg.optim.clip_grad)
        self.stage.before_optimizer_step(self.model, ctx)
        self.optimizer.step()
        self.stage.after_optimizer_step(self.model, ctx)
        if self.dist.distributed and dist.is_initialized() and isinstance(total_loss, torch.Tensor):
            # the logged loss is the mean over ranks (a non-finite rank stops every rank at the same step);
            # an all-reduce queued on the device, read with the rest of the record one step late
            dist.all_reduce(total_loss)
            total_loss = total_loss / self.dist.world_size
        return {"loss": total_loss, **values, **metrics_sum, "_samples": samples, "_data_wait": waited}


def barrier(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.barrier()
