"""Arguments, config resolution and process launch shared by the training commands (pretrain,
train-landmarks, finetune): one place for what every stage has, so the three commands read alike."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

from lafs_fast.config import Config, add_config_arguments, load_config

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
]

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
        "--resume", nargs="?", const="auto", help="continue from a checkpoint (no value: the latest in --out)"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="start a new run in an --out that holds an older one, deleting "
        "its checkpoints and logs (without it such an --out is refused)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


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
    return load_config(preset, args.config, overrides, defaults=stage_defaults(preset))


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
) -> int:
    """Run ``worker(*worker_args)`` in ``train.gpus`` processes (one when under torchrun, which made
    them) and return the command's exit code: a non-finite loss or a failed rank is one line on stderr
    and 1; with several ranks, each rank's step count and parameter digest (``worker`` returns
    ``{"steps", "digest"}``) are printed and ranks that disagree are an error."""
    import torch

    from lafs_fast.launch import RankFailed, launch, under_torchrun
    from lafs_fast.train.engine import NonFiniteLoss, Preempted
    from lafs_fast.train.run_folder import check_run_folder

    if (
        not under_torchrun() or os.environ.get("RANK") == "0"
    ):  # rank 0 writes; another node's check would race its files
        check_run_folder(
            cfg.train.out_dir, resume, overwrite
        )  # before any work (the engine checks again, under its lock)
    device = cfg.train.device
    if device == "auto" and not torch.cuda.is_available():
        device = "cpu"
    nprocs = 1 if under_torchrun() else cfg.train.gpus
    if nprocs > 1 and device in ("auto", "cuda") and torch.cuda.is_available() and torch.cuda.device_count() < nprocs:
        raise ValueError(
            f"--gpus {nprocs} but only {torch.cuda.device_count()} GPU(s) are visible; use --device cpu for CPU "
            "processes"
        )
    try:
        results = launch(worker, worker_args, nprocs)
    except NonFiniteLoss as exc:
        print(f"lafs-fast {prog}: stopped: {exc}", file=sys.stderr)
        return 1
    except Preempted as exc:
        print(f"lafs-fast {prog}: {exc}", file=sys.stderr)
        return 143  # 128 + SIGTERM: what a scheduler expects of a job it asked to stop
    except RankFailed as exc:  # a worker of --gpus N: its own one sentence, as in a single process
        if exc.user_error:
            print(f"lafs-fast {prog}: error: {exc.detail}", file=sys.stderr)
            return 2
        if exc.error_type == "NonFiniteLoss":
            print(f"lafs-fast {prog}: stopped: {exc.detail}", file=sys.stderr)
            return 1
        if exc.error_type == "Preempted":
            print(f"lafs-fast {prog}: {exc.detail}", file=sys.stderr)
            return 143
        print(f"lafs-fast {prog}: error: {exc}", file=sys.stderr)
        return 1
    if (
        under_torchrun() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    ):  # each process says its own (several nodes: several logs)
        for rank, r in results.items():
            print(f"[{prog}] rank {rank}: {r['steps']} steps, {digest_what} sha256 {r['digest'][:16]}")
    elif len(results) > 1:
        for rank in sorted(results):
            print(
                f"[{prog}] rank {rank}: {results[rank]['steps']} steps, {digest_what} sha256 "
                f"{results[rank]['digest'][:16]}"
            )
        if len({r["digest"] for r in results.values()}) != 1:
            print(f"lafs-fast {prog}: error: the ranks ended with different parameters", file=sys.stderr)
            return 1
    return 0


# --------------------------------------------------------------------------------------------------
# one process of a training job (what every command's worker shares)


@contextlib.contextmanager
def training_process(cfg: Config) -> Iterator[Any]:
    """One process of a training job: joins the process group (``train.device``, the collective
    timeout), seeds torch with ``train.seed`` (identical initial weights on every rank) and sets up the
    run's messages (rank 0 speaks; ``train.log``: lafs_fast.logs). Yields the DistInfo; however the block ends,
    the logging and the process group are closed."""
    import torch

    from lafs_fast.launch import init_distributed, shutdown
    from lafs_fast.logs import start_run_logging, stop_run_logging

    info = init_distributed(cfg.train.device, cfg.train.dist_timeout_s)
    start_run_logging(info.rank)
    try:
        torch.manual_seed(cfg.train.seed)
        yield info
    finally:
        stop_run_logging()
        shutdown()


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
