"""Arguments, config resolution and process launch shared by the training commands (pretrain,
train-landmarks, finetune): one place for what every stage has, so the three commands read alike."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from lafs_fast.config import Config, add_config_arguments, load_config
from lafs_fast.io import atomic_save

__all__ = [
    "add_source_arguments",
    "add_run_arguments",
    "add_check_arguments",
    "check_enabled",
    "write_summary",
    "default_preset",
    "resolve_training_config",
    "data_source",
    "launch_training",
    "TrainingJob",
    "run_job",
]

log = logging.getLogger(__name__)

# flag (argparse dest) -> config key, for the flags of add_source_arguments / add_run_arguments
COMMON_FLAGS: tuple[tuple[str, str], ...] = (
    ("data", "data.path"),
    ("out", "train.out_dir"),
    ("gpus", "train.gpus"),
    ("device", "train.device"),
    ("epochs", "optim.epochs"),
    ("batch_size", "optim.batch_size"),
    ("max_steps", "train.max_steps"),
    ("seed", "train.seed"),
    ("compile", "train.compile"),
    ("wandb", "train.wandb"),
)


def add_source_arguments(parser: argparse.ArgumentParser, preset_note: str = "") -> None:
    """--preset/--config/overrides, --data, --out, --gpus, --device."""
    add_config_arguments(parser)
    parser.set_defaults(preset=None)  # small for the built-in data, reference with --data
    for action in parser._actions:
        if action.dest == "preset":
            action.help = (
                "starting values (default: small on the built-in synthetic faces, reference with --data PATH"
                + (f"; {preset_note})" if preset_note else ")")
            )
    parser.add_argument(
        "--data",
        help="a .rec, a folder holding train.rec, an image folder, or synthetic[:IDSxIMGS] "
        "(default: built-in synthetic faces)",
    )
    parser.add_argument("--out", help="output folder (default: train.out_dir)")
    parser.add_argument("--gpus", type=int, help="processes to start on this machine (train.gpus)")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], help="train.device")


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """--epochs, --batch-size, --max-steps, --seed, --compile/--no-compile, --resume, --no-progress."""
    parser.add_argument("--epochs", type=int, help="optim.epochs")
    parser.add_argument("--batch-size", type=int, help="per-process batch (optim.batch_size)")
    parser.add_argument("--max-steps", type=int, help="stop after this many optimiser steps (train.max_steps)")
    parser.add_argument("--seed", type=int, help="train.seed")
    parser.add_argument("--compile", dest="compile", action="store_true", default=None, help="torch.compile the fViT")
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        metavar="CKPT",
        help="continue from a checkpoint (no value, or auto: the latest in --out, refused when there is none; a "
        "key=value after it is an override)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="start a new run in an --out that holds an older one, deleting "
        "its checkpoints and logs (without it such an --out is refused)",
    )
    parser.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar (the log line every train.log_every steps stays: step, loss, lr, speed, ETA, memory)",
    )
    parser.add_argument(
        "--wandb",
        action="store_true",
        default=None,
        help="also log the metrics to Weights & Biases (train.wandb; WANDB_MODE=offline keeps the run on disk)",
    )
    parser.add_argument(
        "--no-memory-check",
        dest="memory_check",
        action="store_false",
        help="run even when the estimated peak memory exceeds what the device has free (by default such a run is "
        "refused before any model is built; lafs_fast/train/memory_guard.py)",
    )


def add_check_arguments(parser: argparse.ArgumentParser, flag: str) -> None:
    """--FLAG / --no-FLAG and --knn-data REC: the k-NN check of the embeddings before and after a run
    (lafs_fast.eval.knn). ``flag``: "knn" (pretrain) or "check" (the supervised stages)."""
    from lafs_fast.eval.knn import KNN_MAX_IMAGES

    parser.add_argument(
        f"--{flag}",
        dest=flag,
        action="store_true",
        default=None,
        help="1-NN / verification check of the embeddings before and after (default: on for synthetic data or with "
        "--knn-data)",
    )
    parser.add_argument(f"--no-{flag}", dest=flag, action="store_false")
    parser.add_argument(
        "--knn-data",
        metavar="REC",
        help="labelled faces for the check, e.g. held-out people: a .rec (labels are read for the check only; up to "
        f"{KNN_MAX_IMAGES} images, evenly spaced); default: held-out synthetic identities",
    )


def check_enabled(cfg: Config, enabled: bool | None, knn_data: str | None) -> bool:
    """Whether the k-NN check runs: as asked, else on for synthetic data or with ``--knn-data`` (which
    must then be a .rec: ValueError naming it otherwise)."""
    synthetic = not cfg.data.path or cfg.data.path.startswith("synthetic")
    on = enabled if enabled is not None else bool(knn_data) or synthetic
    if knn_data and on:
        from lafs_fast.data.sources import open_source

        if open_source(knn_data)[0] != "rec":
            raise ValueError(f"--knn-data {knn_data} is not a .rec; pack labelled faces with `lafs-fast data build`")
    return on


def write_summary(out_dir: str | os.PathLike, summary: dict[str, Any]) -> None:
    """``out_dir/summary.json``: a run's figures for scripts (examples/fewshot.py), written atomically;
    the parameter digest stays out (it is for comparing ranks, not a result)."""
    import json
    from pathlib import Path

    from lafs_fast.io import atomic_write_bytes

    text = json.dumps({k: v for k, v in summary.items() if k != "digest"}, indent=1, default=str) + "\n"
    atomic_write_bytes(text.encode(), Path(out_dir) / "summary.json")


def default_preset(args: argparse.Namespace) -> str:
    """--preset, else small on the built-in synthetic faces and reference with --data PATH."""
    return args.preset or ("small" if not args.data or str(args.data).startswith("synthetic") else "reference")


def resolve_training_config(
    args: argparse.Namespace,
    stage_flags: tuple[tuple[str, str], ...],
    stage_defaults: Callable[[str], dict[str, Any]],
    extra: dict[str, Any] | None = None,
) -> Config:
    """Preset <- the stage's defaults <- --config <- key=value <- the flags (``extra`` last)."""
    preset = default_preset(args)
    flags = {
        key: getattr(args, dest) for dest, key in (*COMMON_FLAGS, *stage_flags) if getattr(args, dest, None) is not None
    }
    flags.update(extra or {})
    overrides = [*(args.overrides or []), *(f"{k}={v}" for k, v in flags.items())]
    cfg = load_config(preset, args.config, overrides, defaults=stage_defaults(preset))
    out = Path(cfg.train.out_dir)
    # a default folder the user never named, planted as a link, would receive (and --overwrite delete) a run
    if (
        out.is_symlink()
        and not any(o.startswith("train.out_dir=") for o in overrides)
        and cfg.train.out_dir == load_config(preset, None, [], defaults=stage_defaults(preset)).train.out_dir
    ):
        raise FileExistsError(
            f"the default output folder {out} is a symbolic link (to {os.readlink(out)}); pass --out {out} to "
            "write there, or choose another --out"
        )
    return cfg


def data_source(cfg: Config) -> str:
    """What make_loader reads: data.path, or the synthetic spec of the config."""
    d = cfg.data
    return d.path or f"synthetic:{d.synthetic_identities}x{d.synthetic_images_per_identity}"


def launch_training(
    prog: str,
    worker: Callable[..., dict[str, Any]],
    worker_args: tuple,
    cfg: Config,
    digest_what: str = "parameters",
    *,
    resume: str | None = None,
    overwrite: bool = False,
    memory_check: bool = True,
) -> int:
    """Run ``worker(*worker_args)`` in ``train.gpus`` processes (one when under torchrun, which made
    them) and return the command's exit code: a non-finite loss or a failed rank is one line on stderr
    and 1; with several ranks, each rank's step count and parameter digest (``worker`` returns
    ``{"steps", "digest"}``) are printed and ranks that disagree are an error. ``memory_check``: a run
    whose estimated peak memory exceeds what its device has free is refused before any model is built
    (lafs_fast/train/memory_guard.py)."""
    from lafs_fast.launch import RankFailed, launch, under_torchrun
    from lafs_fast.train.run_folder import check_run_folder

    if not under_torchrun() or os.environ.get("RANK") == "0":  # rank 0 writes; another node's check would race
        check_run_folder(cfg.train.out_dir, resume, overwrite)  # before any work (the engine checks again, locked)
    nprocs = _process_count(cfg)
    if memory_check:
        _check_cpu_memory(prog, cfg, nprocs)
    from lafs_fast.train.engine import NonFiniteLoss, Preempted  # loads torch's compiler: after the check

    try:
        results = launch(worker, worker_args, nprocs)
    except (NonFiniteLoss, Preempted, RankFailed) as exc:
        return _failure_exit(prog, exc)
    return _report_ranks(prog, results, digest_what)


def _check_cpu_memory(prog: str, cfg: Config, nprocs: int) -> None:
    """A CPU run's memory guard, before the engine's imports load torch's compiler (seconds, not tens);
    the processes of this machine share its RAM. A GPU run checks in each worker, on its GPU (a CUDA
    context made here would stay on GPU 0 for the whole job)."""
    import torch

    from lafs_fast.launch import resolve_device

    if resolve_device(cfg.train.device).type == "cuda":
        return
    from lafs_fast.train.memory_guard import guard_process

    local = int(os.environ.get("LOCAL_WORLD_SIZE", nprocs))
    rank0 = os.environ.get("RANK", "0") == "0"
    guard_process(cfg, prog, torch.device("cpu"), data_source(cfg), processes=local, warn=rank0)


def _process_count(cfg: Config) -> int:
    """Processes to start here: one under torchrun (it made them), else ``train.gpus`` (refused when
    more than the GPUs visible)."""
    import torch

    from lafs_fast.launch import under_torchrun

    device = cfg.train.device
    if device == "auto" and not torch.cuda.is_available():
        device = "cpu"
    nprocs = 1 if under_torchrun() else cfg.train.gpus
    if nprocs > 1 and device in ("auto", "cuda") and torch.cuda.is_available() and torch.cuda.device_count() < nprocs:
        raise ValueError(
            f"--gpus {nprocs} but only {torch.cuda.device_count()} GPU(s) are visible; use --device cpu for CPU "
            "processes"
        )
    return nprocs


def _failure_exit(prog: str, exc: Exception) -> int:
    """One line on stderr for a run that ended early, and its exit code: 1 for a non-finite loss or a
    failed rank, 143 (128 + SIGTERM: what a scheduler expects) when preempted, 2 for a user's
    mistake found in a worker of --gpus N (its own one sentence, as in a single process)."""
    kind, detail = type(exc).__name__, str(exc)
    if kind == "RankFailed":
        kind, detail = ("user", exc.detail) if exc.user_error else (exc.error_type, exc.detail)
    if kind == "user":
        print(f"lafs-fast {prog}: error: {detail}", file=sys.stderr)
        return 2
    if kind == "NonFiniteLoss":
        print(f"lafs-fast {prog}: stopped: {detail}", file=sys.stderr)
        return 1
    if kind == "Preempted":
        print(f"lafs-fast {prog}: {detail}", file=sys.stderr)
        return 143
    print(f"lafs-fast {prog}: error: {exc}", file=sys.stderr)
    return 1


def _report_ranks(prog: str, results: dict[int, dict[str, Any]], digest_what: str) -> int:
    """Each rank's steps and parameter digest (several ranks); 1 when the ranks disagree."""
    from lafs_fast.launch import under_torchrun

    if under_torchrun() and int(os.environ.get("WORLD_SIZE", "1")) > 1:  # each says its own (several nodes)
        shown = results
    elif len(results) > 1:
        shown = dict(sorted(results.items()))
    else:
        return 0
    for rank, r in shown.items():
        print(f"[{prog}] rank {rank}: {r['steps']} steps, {digest_what} sha256 {r['digest'][:16]}")
    if len(results) > 1 and len({r["digest"] for r in results.values()}) != 1:
        print(f"lafs-fast {prog}: error: the ranks ended with different parameters", file=sys.stderr)
        return 1
    return 0


# --------------------------------------------------------------------------------------------------
# one process of a training job (what every command's worker shares)


@contextlib.contextmanager
def training_process(cfg: Config) -> Iterator[Any]:
    """One process of a training job: joins the process group (``train.device``, the collective
    timeout), seeds torch with ``train.seed`` (identical initial weights on every rank) and sets up the
    run's messages (rank 0 speaks; ``train.log``: lafs_fast.logs). Yields the DistInfo; however the
    block ends, the logging and the process group are closed."""
    import torch

    from lafs_fast.launch import init_distributed, shutdown
    from lafs_fast.logs import log_to_file_only, start_run_logging, stop_run_logging
    from lafs_fast.train.engine import stop_on_sigterm

    # SIGTERM while setting up (building, loading, the check before) stops at once, exit 143; the
    # engine's own handler takes over while training (a checkpoint of the step reached)
    restore = stop_on_sigterm(
        "stopped by SIGTERM outside the training steps (setting up, or writing the results after them); no step "
        "was lost: --resume continues from the last checkpoint, if there is one"
    )
    try:
        info = init_distributed(cfg.train.device, cfg.train.dist_timeout_s)
        start_run_logging(info.rank)
    except BaseException:
        restore()
        raise
    try:
        torch.manual_seed(cfg.train.seed)
        yield info
    except BaseException as exc:  # train.log holds how the run ended, as the terminal does
        log_to_file_only(ending_line(exc))
        raise
    finally:
        restore()
        stop_run_logging()
        shutdown()


def ending_line(exc: BaseException) -> str:
    """How a run that raised ``exc`` ended, as one line for train.log (a bug's traceback follows)."""
    import traceback

    from lafs_fast.errors import is_user_error, user_message

    kind = type(exc).__name__
    if is_user_error(exc):
        return f"error: {user_message(exc)}"
    if kind in ("NonFiniteLoss", "Preempted", "KeyboardInterrupt", "SystemExit"):
        return f"stopped: {exc or kind}"
    return f"error: {kind}: {exc}\n{''.join(traceback.format_exception(exc)).rstrip()}"


class TrainingJob:
    """What one training command adds to the worker every command shares (:func:`run_job`).

    The skeleton: the process (:func:`training_process`), the run's precision (resolved once, here),
    :meth:`setup` (loader and stage), the lines that describe the run, the k-NN check of the
    embeddings before training (rank 0, a new run), the engine, :meth:`fit`, the summary, and on rank
    0 the model file ``model_file``, :meth:`finish`'s lines, the check after training against the
    raw-pixel floor, and ``summary.json``. Subclasses set the class attributes and the hooks."""

    prog = ""  # the command's name, the prefix of its lines
    model_file = ""  # written in the run folder at the end (rank 0)
    check_opt = "check"  # the opts key that switches the k-NN check on
    summary_prefix = "check"  # summary keys <prefix>_before / _after / _floor

    def __init__(self, cfg: Config, opts: dict[str, Any], info: Any, precision: str) -> None:
        self.cfg, self.opts, self.info, self.precision = cfg, opts, info, precision
        self.stage: Any = None
        self.engine: Any = None  # the run's Engine, once made (its log_record takes the checks' figures)
        self.faces: Any = None  # the k-NN check's faces (rank 0, check on)

    def setup(self) -> Any:
        """This job's loader; sets ``self.stage`` (and may refine ``self.cfg``, e.g. the architecture
        of the loaded weights)."""
        raise NotImplementedError

    def describe(self, loader: Any) -> list[str]:
        """The lines that say what runs (before any training)."""
        return []

    def check_faces(self) -> Any:
        """The faces of the k-NN check (``lafs_fast.eval.knn.knn_faces``)."""
        raise NotImplementedError

    def check(self, faces: Any) -> dict[str, float]:
        """The k-NN check of the current embeddings on ``faces``."""
        raise NotImplementedError

    def before_fit(self, engine: Any) -> None:
        """After the engine has claimed the run folder, before the first step."""

    def digest(self) -> str:
        """The sha256 of the parameters every rank must hold alike."""
        raise NotImplementedError

    def summary(self) -> dict[str, Any]:
        """The job's own figures in every rank's summary."""
        return {}

    def finish(self, result: Any, summary: dict[str, Any]) -> None:
        """Rank 0, after the model file is written: say how it went (may add to ``summary``)."""


def run_job(job_cls: type[TrainingJob], cfg_dict: dict[str, Any], opts: dict[str, Any], *args: Any) -> dict[str, Any]:
    """One process of a training command (the worker :func:`launch_training` starts): the skeleton
    of :class:`TrainingJob` with ``job_cls(cfg, opts, info, precision, *args)``'s hooks. Returns the
    summary (steps, digest, the job's figures, the check's on rank 0)."""
    import torch

    from lafs_fast.config import config_from_dict
    from lafs_fast.launch import resolve_precision
    from lafs_fast.train.engine import Engine, barrier
    from lafs_fast.train.progress import check_record

    cfg = config_from_dict(cfg_dict)
    with training_process(cfg) as info:
        job = job_cls(cfg, opts, info, resolve_precision(cfg.train.precision, info.device), *args)
        if opts.get("memory_check", True) and info.device.type == "cuda":  # its GPU, before any model is built
            from lafs_fast.train.memory_guard import guard_process

            guard_process(job.cfg, job.prog, info.device, data_source(job.cfg), warn=info.is_main)
        loader = job.setup()
        torch.manual_seed(job.cfg.train.seed + 1_000 * info.rank)  # dropout / drop-path streams differ per rank
        for line in job.describe(loader):
            log.info(f"[{job.prog}] {line}")
        faces, before = _check_before(job)
        barrier(info)
        out = Path(job.cfg.train.out_dir)
        engine = Engine(
            job.cfg,
            job.stage,
            loader,
            info,
            out,
            resume=opts.get("resume"),
            progress=opts.get("progress", True),
            overwrite=opts.get("overwrite", False),
            precision=job.precision,
        )  # claims the run folder before anything is written there
        job.engine = engine
        if before is not None:  # the check before training, on the curves at step 0
            engine.log_record(check_record(before), step=0)
        job.before_fit(engine)
        log.info(plan_line(job.prog, engine, job.cfg))
        result = engine.fit(keep_metrics_open=True)  # what is measured after the run joins the curves
        summary: dict[str, Any] = {
            "rank": info.rank,
            "steps": result.steps,
            "digest": job.digest(),
            "seconds": result.seconds,
            "last_checkpoint": str(result.last_checkpoint),
            **job.summary(),
        }
        if info.is_main:
            atomic_save(job.stage.export(), out / job.model_file)
            job.finish(result, summary)
            if faces is not None:
                summary.update(_check_after(job, faces, before))
            write_summary(out, summary)
        engine.metrics.close()
        barrier(info)
        return summary


def _check_before(job: TrainingJob) -> tuple[Any, dict[str, float] | None]:
    """(the check's faces, the check before training): rank 0 with the check on; before: a new run."""
    from lafs_fast.eval.knn import format_check

    faces = job.check_faces() if job.opts.get(job.check_opt) and job.info.is_main else None
    job.faces = faces
    if faces is None or job.opts.get("resume"):
        return faces, None
    before = job.check(faces)
    log.info(f"[{job.prog}] {faces.title} before: {format_check(before, faces)}")
    return faces, before


def _check_after(job: TrainingJob, faces: Any, before: dict[str, float] | None) -> dict[str, Any]:
    """The check after training, beside the one before and the raw-pixel floor; their summary keys."""
    from lafs_fast.eval.knn import pixel_floor, report_lines
    from lafs_fast.train.progress import check_record

    after = job.check(faces)
    job.engine.log_record(check_record(after))  # at the step reached
    floor = pixel_floor(faces)
    for line in report_lines(before, after, faces, floor):
        log.info(f"[{job.prog}] {line}")
    key = job.summary_prefix
    return {f"{key}_before": before, f"{key}_after": after, f"{key}_floor": floor}


def training_loader(cfg: Config, info: Any, data: str | None = None, with_positions: bool = False):
    """The job's shuffled, rank-sharded loader of ``data`` (default: the config's data source) with
    the config's batch size, backend, workers, colour order and corrupt-record threshold."""
    from lafs_fast.data import make_loader

    return make_loader(
        data if data is not None else data_source(cfg),
        cfg.optim.batch_size,
        rank=info.rank,
        world_size=info.world_size,
        shuffle=True,
        seed=cfg.train.seed,
        device=info.device,
        drop_last=True,
        backend=cfg.data.loader,
        num_workers=cfg.data.workers,
        color_order=cfg.data.color_order.upper(),
        with_positions=with_positions,
        max_bad_fraction=cfg.data.max_bad_fraction,
    )


def plan_line(prog: str, engine: Any, cfg: Config) -> str:
    """The run's plan in one line: steps, epochs, global batch, peak lr, precision, compile."""
    p = engine.plan
    return (
        f"[{prog}] {p.total_steps} steps ({p.epochs} epochs x {p.steps_per_epoch}), global batch {p.global_batch}, "
        f"peak lr {engine.schedules['lr'].max():.2e}, precision {engine.precision}, compile {cfg.train.compile}"
    )
