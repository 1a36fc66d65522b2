"""The engine's checkpoints: what one holds, writing it, pruning old ones, and resuming from one.

A training checkpoint (``ckpt-<step>.pt``, format ``models.checkpoints.TRAIN_FORMAT``) holds exactly
what the loop reads: model, optimiser, step (so every schedule), stage state (teacher, centre), every
rank's RNG states, the loader's position, the sharded parameters gathered whole, the config and the
run's plan, and the stage's model file. It is written atomically by rank 0, never from non-finite
parameters; the last ``train.keep_last`` are kept, and every ``train.keep_every``-th epoch's.

Resume refuses a checkpoint of another stage, of other settings (the config but for
:data:`RESUME_MAY_DIFFER`), of another plan (steps per epoch, processes) or of another model, each
in one sentence; ``--resume`` alone takes the newest checkpoint that loads (a truncated newest one
is named and skipped). Each rank gets its own rows of the sharded parameters and their moments back.

The functions take the :class:`~lafs_fast.train.engine.Engine` whose state they save or restore
(``engine.stage``, ``.optimizer``, ``.loader``, ``.dist``, ``.plan``, ``.cfg``, ``.step``, ...).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from lafs_fast.config import config_to_dict
from lafs_fast.io import atomic_save, safe_load
from lafs_fast.models.checkpoints import TRAIN_FORMAT, check_finite

__all__ = [
    "RESUME_MAY_DIFFER",
    "list_checkpoints",
    "load_checkpoint",
    "training_state",
    "all_finite",
    "save",
    "prune",
    "resume",
    "load",
]

# config keys a resumed run may change: where and how long it runs, how it logs, not what it trains
# (and the starting weights: the checkpoint replaces them)
RESUME_MAY_DIFFER = frozenset(
    {
        "train.out_dir",
        "train.max_steps",
        "train.log_every",
        "train.ckpt_every_epochs",
        "train.ckpt_every_steps",
        "train.keep_last",
        "train.keep_every",
        "train.compile",
        "train.device",
        "train.dist_timeout_s",
        "train.wandb",
        "data.workers",
        "data.loader",
        "model.attention",
        "finetune.val_sets",
        "finetune.val_every",
        "finetune.init",
        "finetune.landmarks",
    }
)
_CKPT_RE = re.compile(r"^ckpt-(\d{8})\.pt$")
log = logging.getLogger(__name__)


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """``ckpt-XXXXXXXX.pt`` files of ``out_dir``, oldest step first."""
    d = Path(out_dir)
    if not d.is_dir():
        return []
    return sorted(
        (p for p in d.iterdir() if _CKPT_RE.match(p.name)), key=lambda p: int(_CKPT_RE.match(p.name).group(1))
    )


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    obj = safe_load(path)
    if not isinstance(obj, dict) or obj.get("format") != TRAIN_FORMAT:
        raise ValueError(
            f"{path} is not a lafs-fast training checkpoint (a model file cannot be resumed; use it with --init)"
        )
    check_finite(obj.get("model"), f"{path}: model")  # a NaN weight resumed would train on as NaN
    return obj


# --------------------------------------------------------------------------------------------------
# writing


def rng_state(device: torch.device) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def training_state(engine: Any, rng_ranks: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The full training state; ``rng_ranks``: every rank's RNG states (gathered by :func:`save`),
    else this process's alone."""
    plan = engine.plan
    return {
        "format": TRAIN_FORMAT,
        "version": 1,
        "stage": engine.stage.name,
        "config": config_to_dict(engine.cfg),
        "step": engine.step,
        "epoch": engine.step // plan.steps_per_epoch,
        "plan": {"epochs": plan.epochs, "steps_per_epoch": plan.steps_per_epoch, "world_size": plan.world_size},
        "model": engine.stage.model.state_dict(),
        "stage_state": engine.stage.state_dict(),
        "optimizer": engine.optimizer.state_dict(),
        "loader": engine.loader.state_dict(),
        "rng": rng_state(engine.device),
        "rng_ranks": rng_ranks or [rng_state(engine.device)],
        "model_file": engine.stage.export(),
    }


def all_finite(stage: Any) -> bool:
    """Whether the tensors the stage names (``finite_tensors``) are all finite (checked before a save)."""
    ts = [t for t in stage.finite_tensors() if t.is_floating_point()]
    if not ts:
        return True
    return bool(torch.isfinite(torch.stack(torch._foreach_norm(ts))).all())


def save(engine: Any, epoch_end: bool) -> Path | None:
    """Write ``ckpt-<step>.pt`` atomically (rank 0; every rank takes part in the gathers), then prune.
    The engine has checked :func:`all_finite` first."""
    info = engine.dist
    rng_ranks = None
    if info.distributed and dist.is_initialized():
        rng_ranks = [None] * info.world_size
        dist.all_gather_object(rng_ranks, {k: v.cpu() for k, v in rng_state(engine.device).items()})
    shards = gather_shards(engine.stage, engine.optimizer, info)
    if not info.is_main:
        return None
    path = engine.out_dir / f"ckpt-{engine.step:08d}.pt"
    state = training_state(engine, rng_ranks)
    if shards:
        state["sharded"] = shards
    atomic_save(state, path)
    keep_every = engine.cfg.train.keep_every
    if epoch_end and keep_every > 0 and (engine.step // engine.plan.steps_per_epoch) % keep_every == 0:
        (engine.out_dir / f"ckpt-{engine.step:08d}.keep").touch()
    engine.last_checkpoint = path
    prune(engine.out_dir, engine.cfg.train.keep_last)
    return path


def prune(out_dir: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` (at least one) checkpoints without a ``.keep`` mark."""
    removable = [p for p in list_checkpoints(out_dir) if not p.with_suffix(".keep").exists()]
    for p in removable[: max(len(removable) - max(keep_last, 1), 0)]:
        p.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------
# the sharded parameters: gathered whole for a checkpoint, split per rank on resume


def gather_shards(stage: Any, optimizer: torch.optim.Optimizer, info: Any) -> dict[str, dict[str, torch.Tensor]] | None:
    """Every rank's rows of the stage's sharded parameters and of their AdamW moments, whole, on
    rank 0 (None elsewhere, and without sharded parameters or a process group). Rows are kept in
    class order, so a resume re-splits them with the same ``shard_range``. Memory: one whole copy
    per tensor on rank 0's host at checkpoint time (206k x 768 fp32: 0.6 GB each)."""
    sharded = stage.sharded_parameters()
    if not sharded or not (info.distributed and dist.is_initialized()):
        return None
    local = {}
    for name, (p, start, end) in sharded.items():
        opt = {
            f"optim.{k}": v.detach().cpu()
            for k, v in optimizer.state.get(p, {}).items()
            if torch.is_tensor(v) and v.shape == p.shape
        }
        local[name] = {"start": start, "end": end, "param": p.detach().cpu(), **opt}
    parts: list[Any] | None = [None] * info.world_size if info.is_main else None
    dist.gather_object(local, parts, dst=0)
    if not info.is_main:
        return None
    whole = {}
    for name in sharded:
        ranks = sorted((r[name] for r in parts), key=lambda r: r["start"])
        whole[name] = {k: torch.cat([r[k] for r in ranks]) for k in ranks[0] if k not in ("start", "end")}
    return whole


def split_shards(path: Path, ck: dict[str, Any], stage: Any, info: Any) -> dict[str, Any]:
    """This rank's rows of the stage's sharded parameters from a checkpoint's whole tensors; returns
    the model state without them (each rank's own slice shape differs from rank 0's)."""
    sharded = stage.sharded_parameters()
    model_state = ck["model"]
    if not sharded or not info.distributed:
        return model_state
    whole = ck.get("sharded") or {}
    missing = [n for n in sharded if n not in whole]
    if missing:
        raise ValueError(
            f"{path} holds rank 0's slice of {', '.join(missing)} only (written by an older lafs-fast); "
            "it cannot resume a multi-process sharded run"
        )
    with torch.no_grad():
        for name, (p, start, end) in sharded.items():
            rows = whole[name]["param"]
            if rows.shape[0] < end:
                raise ValueError(f"{path} holds {rows.shape[0]} rows of {name}, this run needs {end}")
            p.copy_(rows[start:end].to(p.device, p.dtype))
    return {k: v for k, v in model_state.items() if k not in sharded}


def restore_shard_moments(ck: dict[str, Any], stage: Any, optimizer: torch.optim.Optimizer, info: Any) -> None:
    """After the optimiser's state dict (rank 0's rows for the sharded parameters): this rank's rows."""
    sharded = stage.sharded_parameters()
    if not sharded or not info.distributed:
        return
    for name, (p, start, end) in sharded.items():
        state = optimizer.state.get(p)
        for key, rows in ck["sharded"][name].items():
            if key.startswith("optim.") and state is not None:
                state[key[len("optim.") :]] = rows[start:end].to(p.device).clone()


# --------------------------------------------------------------------------------------------------
# resuming


def resume(engine: Any, where: str | Path) -> None:
    """``where``: a checkpoint path, or "auto" (the newest loadable one in ``engine.out_dir``, if any)."""
    if str(where) == "auto":
        _load_latest(engine)
    else:
        load(engine, Path(where))


def _load_latest(engine: Any) -> None:
    """``--resume`` alone: the newest checkpoint of ``out_dir`` that loads (a truncated newest one,
    e.g. from a full disk, is named and the previous one taken); nothing when there is none."""
    ckpts = list_checkpoints(engine.out_dir)
    for i, path in enumerate(reversed(ckpts)):
        try:
            ck = load_checkpoint(path)
        except ValueError as exc:
            if i == len(ckpts) - 1:
                raise ValueError(f"no checkpoint in {engine.out_dir} loads (the oldest: {exc})") from None
            engine._log_line(f"{path.name} does not load ({exc}); resuming from the one before it")
            continue
        load(engine, path, ck)
        return


def check_resume_config(path: Path, saved: dict[str, Any], now: dict[str, Any]) -> None:
    """The checkpoint's config must be this run's, but for the run-only keys (RESUME_MAY_DIFFER)."""
    diffs = [
        f"{s}.{k} {saved[s][k]!r} -> {v!r}"
        for s, body in now.items()
        for k, v in body.items()
        if f"{s}.{k}" not in RESUME_MAY_DIFFER and s in saved and k in saved[s] and saved[s][k] != v
    ]
    if diffs:
        more = f" (and {len(diffs) - 3} more)" if len(diffs) > 3 else ""
        raise ValueError(
            f"{path} was written by a run with other settings: {'; '.join(diffs[:3])}{more}; resume with that "
            "run's settings (its config.yaml, or --config from `lafs-fast checkpoint show`), or start a new run "
            "in another --out"
        )


def _check_fits(path: Path, ck: dict[str, Any], engine: Any) -> None:
    """The checkpoint's stage, config and plan are this run's (one sentence each otherwise)."""
    if ck.get("stage") != engine.stage.name:
        raise ValueError(f"{path} is a {ck.get('stage')!r} checkpoint, this is {engine.stage.name!r}")
    if isinstance(ck.get("config"), dict):
        check_resume_config(path, ck["config"], config_to_dict(engine.cfg))
    plan, now = ck.get("plan", {}), engine.plan
    if plan.get("steps_per_epoch") not in (None, now.steps_per_epoch) or plan.get("world_size") not in (
        None,
        now.world_size,
    ):
        raise ValueError(
            f"{path} was written with {plan.get('steps_per_epoch')} steps per epoch on {plan.get('world_size')} "
            f"process(es); this run has {now.steps_per_epoch} on {now.world_size}: resume with the same data, batch "
            "size and --gpus"
        )


def _load_weights(path: Path, ck: dict[str, Any], engine: Any) -> None:
    """Model (this rank's shard rows), stage state and optimiser; one sentence for another model."""
    stage = engine.stage
    try:
        model_state = split_shards(path, ck, stage, engine.dist)
        missing, unexpected = stage.model.load_state_dict(model_state, strict=False)
        missing = [k for k in missing if k not in stage.sharded_parameters()]
        if missing or unexpected:
            raise KeyError(f"missing keys {missing[:3]}, unexpected keys {unexpected[:3]}")
        stage.load_state_dict(ck["stage_state"])
        engine.optimizer.load_state_dict(ck["optimizer"])
        restore_shard_moments(ck, stage, engine.optimizer, engine.dist)
    except (RuntimeError, KeyError, ValueError) as exc:  # shapes or names of another model
        first = str(exc).strip().splitlines()
        raise ValueError(
            f"{path} does not fit this model "
            f"({first[1].strip() if len(first) > 1 else first[0] if first else type(exc).__name__}); "
            "resume with the run's own settings"
        ) from None


def load(engine: Any, path: Path, ck: dict[str, Any] | None = None) -> None:
    """Continue ``engine`` from the checkpoint at ``path`` (``ck``: it, already read)."""
    if ck is None:
        try:
            ck = load_checkpoint(path)
        except ValueError as exc:
            older = [p for p in list_checkpoints(path.parent) if p != path]
            hint = f"; the previous checkpoint is {older[-1]} (--resume {older[-1]})" if older else ""
            raise ValueError(f"{exc}{hint}") from None
    _check_fits(path, ck, engine)
    _load_weights(path, ck, engine)
    engine.loader.load_state_dict(ck["loader"])
    ranks = ck.get("rng_ranks") or [ck["rng"]]
    if engine.dist.rank < len(ranks):  # each rank continues its own dropout / drop-path stream
        rng = ranks[engine.dist.rank]
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and engine.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], engine.device)
    engine.step = int(ck["step"])
    engine.last_checkpoint = path
    engine._log_line(f"resumed from {path} at step {engine.step} (epoch {engine.step // engine.plan.steps_per_epoch})")
