"""Processes: ``--gpus N`` on one machine, or joining a group that ``torchrun`` started.

``launch(fn, args, nprocs)`` runs ``fn(*args)`` in every process and returns ``{rank: result}``:

- under ``torchrun`` (``RANK`` / ``WORLD_SIZE`` in the environment; one or several nodes) it calls
  ``fn`` in this process, which joins the existing group;
- with ``nprocs > 1`` it starts the processes itself through torch's elastic launcher (the engine
  ``torchrun`` uses; no external launcher), with ``max_restarts=0``: when one rank fails the agent
  stops the others and ``launch`` raises :class:`RankFailed`, so the job ends non-zero within
  seconds instead of hanging in a collective;
- otherwise it calls ``fn`` here, single process, no process group.

Inside ``fn``, ``init_distributed(device)`` creates the process group (NCCL on GPUs, gloo on the
CPU) and returns the :class:`DistInfo` of this process.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "DistInfo",
    "RankFailed",
    "launch",
    "init_distributed",
    "under_torchrun",
    "resolve_device",
    "resolve_precision",
    "shutdown",
]


class RankFailed(RuntimeError):
    """One of the processes started by ``launch`` ended with an error (the others were stopped).

    ``rank``: the first rank that failed; ``error_type``: its exception's class name (``""`` when it
    died without one, e.g. killed); ``user_error``: whether that was a user's mistake (one sentence,
    exit 2); ``detail``: the exception's one line."""

    def __init__(
        self, text: str, rank: int = -1, error_type: str = "", user_error: bool = False, detail: str = ""
    ) -> None:
        super().__init__(text)
        self.rank, self.error_type, self.user_error, self.detail = rank, error_type, user_error, detail


_ERROR_DIR_ENV = "LAFS_FAST_ERROR_DIR"


def _worker_entry(fn: Callable[..., Any], *args: Any) -> Any:
    """Runs ``fn`` in a worker of ``launch``. An exception is written (class name, one line) where the
    launcher reads it, and the worker exits quietly with code 3: the launcher prints one sentence,
    not 27-53 lines of elastic traceback."""
    try:
        return fn(*args)
    except BaseException as exc:  # noqa: BLE001 - every failure is reported, then the process ends
        folder = os.environ.get(_ERROR_DIR_ENV)
        if folder:
            import json
            import sys
            import traceback

            from lafs_fast.errors import is_user_error, user_message

            text = str(exc)
            record = {
                "type": type(exc).__name__,
                "user_error": is_user_error(exc),
                "message": user_message(exc),
                # a collective that failed because another rank died first: a consequence, not the cause
                "peer_lost": any(
                    k in text
                    for k in (
                        "Connection closed by peer",
                        "remote worker",
                        "Connection reset by peer",
                        "NCCL communicator was aborted",
                        "Timed out",
                        "timed out",
                        "Watchdog",
                    )
                ),
            }
            with open(os.path.join(folder, f"rank{os.environ.get('RANK', '0')}.json"), "w") as f:
                json.dump(record, f)
            if (
                not record["user_error"]
                and not record["peer_lost"]  # a consequence of another rank's failure, which that rank says
                and type(exc).__name__ not in ("NonFiniteLoss", "Preempted")
            ):  # a bug: keep its traceback
                traceback.print_exc(file=sys.stderr)
            sys.stderr.flush()
            os._exit(143 if record["type"] == "Preempted" else 3)  # 128 + SIGTERM on every rank, as schedulers expect
        raise


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: ``rank`` of ``world_size``, its ``device``; rank 0 logs and writes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def under_torchrun() -> bool:
    """True when an external launcher (torchrun, or our own elastic agent) set up this process."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def resolve_device(device: str) -> torch.device:
    """'auto' -> cuda when available else cpu; 'cuda' without a GPU is a user error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but no CUDA GPU is visible; use --device cpu")
    return torch.device(device)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``train.precision`` -> "bf16" | "fp32": 'auto' is bf16 on CUDA and fp32 elsewhere; an explicit
    value means the same dtypes on every device (bf16 view tokens, bf16 autocast around the stage,
    fp32 where the design needs it), so ``train.precision=bf16`` on the CPU runs the GPU's regime."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"train.precision={precision!r}; choose auto, bf16 or fp32")
    return precision


def init_distributed(device: str = "auto", timeout_s: float = 600.0) -> DistInfo:
    """Join (or create) the process group of this job; a no-op DistInfo in a single process.

    NCCL on CUDA (device ``cuda:LOCAL_RANK``), gloo on the CPU. A collective waiting longer than
    ``timeout_s`` raises (a hung or stopped rank then ends the job instead of holding it forever).
    """
    dev = resolve_device(device)
    if not under_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        if dev.type == "cuda":
            dev = torch.device("cuda", torch.cuda.current_device())
        return DistInfo(device=dev)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if dev.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"local rank {local_rank} has no GPU: only {torch.cuda.device_count()} visible; lower --gpus"
            )
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    if not dist.is_initialized():
        from datetime import timedelta

        dist.init_process_group(
            "nccl" if dev.type == "cuda" else "gloo", init_method="env://", timeout=timedelta(seconds=timeout_s)
        )
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(fn: Callable[..., Any], args: tuple = (), nprocs: int = 1) -> dict[int, Any]:
    """Run ``fn(*args)`` in ``nprocs`` processes of this machine (or in this one; see module doc).

    ``fn`` must be a module-level function (the workers are spawned). Returns ``{rank: value}``
    (only this process's rank under torchrun). Raises :class:`RankFailed` when a worker fails.
    """
    if under_torchrun() or nprocs <= 1:
        return {int(os.environ.get("RANK", 0)): fn(*args)}
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nprocs,
        run_id=f"lafs-fast-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint=f"127.0.0.1:{_free_port()}",
        rdzv_configs={"timeout": 120},
        max_restarts=0,
        monitor_interval=0.5,
        start_method="spawn",
    )
    # The workers must not think they are the launcher's parent: they read RANK etc. from the agent.
    import logging
    import tempfile

    # the agent's per-failure report and its "Received 15 death signal" repeat what RankFailed says in
    # one line; torch gives some of its loggers their own level, so each is quietened (and put back)
    prefix = "torch.distributed.elastic"
    elastic_logs = [logging.getLogger(prefix)] + [
        logging.getLogger(n) for n in list(logging.root.manager.loggerDict) if n.startswith(prefix + ".")
    ]
    levels = [g.level for g in elastic_logs]
    for g in elastic_logs:
        g.setLevel(logging.CRITICAL)
    # a worker that ends with os._exit (its error already written) leaves a semaphore that
    # multiprocessing's resource tracker would report at exit: not news (the tracker inherits this)
    quiet = "ignore:resource_tracker:UserWarning"
    if quiet not in os.environ.get("PYTHONWARNINGS", ""):
        os.environ["PYTHONWARNINGS"] = ",".join(w for w in (os.environ.get("PYTHONWARNINGS"), quiet) if w)
    with tempfile.TemporaryDirectory(prefix="lafs-fast-errors-") as errors:
        os.environ[_ERROR_DIR_ENV] = errors  # the spawned workers inherit it
        try:
            return elastic_launch(config, _worker_entry)(fn, *args)
        except ChildFailedError as exc:
            raise _rank_failure(_recorded(errors, nprocs), exc.failures, nprocs) from None
        except SignalException as exc:  # the agent got SIGTERM (a scheduler): it stopped the workers first
            raise _signalled(_recorded(errors, nprocs), exc.sigval) from None
        finally:
            os.environ.pop(_ERROR_DIR_ENV, None)
            for g, lvl in zip(elastic_logs, levels):
                g.setLevel(lvl)


def _recorded(errors: str, nprocs: int) -> dict[int, dict[str, Any]]:
    """The error records the failed workers wrote (``_worker_entry``), by rank."""
    import json

    recorded = {}
    for rank in range(nprocs):
        path = os.path.join(errors, f"rank{rank}.json")
        if os.path.isfile(path):
            with open(path) as f:
                recorded[rank] = json.load(f)
    return recorded


def _signalled(recorded: dict[int, dict[str, Any]], sigval: Any) -> BaseException:
    """The launcher was sent ``sigval``: SIGTERM is the workers' own stop (each wrote the checkpoint
    of the step reached and recorded Preempted; exit 143), SIGINT is Ctrl-C."""
    import signal

    if sigval == signal.SIGINT:
        return KeyboardInterrupt()
    stopped = sorted(r for r, rec in recorded.items() if rec["type"] == "Preempted")
    if stopped:
        return RankFailed(
            f"rank {stopped[0]}: {recorded[stopped[0]]['message']}",
            stopped[0],
            "Preempted",
            False,
            recorded[stopped[0]]["message"],
        )
    name = signal.Signals(sigval).name if sigval in signal.Signals._value2member_map_ else f"signal {sigval}"
    text = f"stopped by {name} before any rank reached a step it could save; run the command again (or --resume)"
    return RankFailed(text, 0, "Preempted", False, text)


def _rank_failure(recorded: dict[int, dict[str, Any]], failures: dict[int, Any], nprocs: int) -> RankFailed:
    """One RankFailed for the workers that failed: the cause, not a rank that failed because of it (a
    user's mistake; else a rank that died without a word, killed: its peers then fail in a
    collective; else the first recorded)."""
    users = [r for r, rec in recorded.items() if rec["user_error"]]
    # a rank the agent stopped with SIGTERM because another failed (Preempted) is a consequence too
    causes = [r for r, rec in recorded.items() if not rec.get("peer_lost") and rec["type"] != "Preempted"]
    silent = [r for r in range(nprocs) if r not in recorded]
    if not causes and not silent:  # every rank stopped by SIGTERM (torchrun's agent passed one on)
        causes = [r for r, rec in recorded.items() if rec["type"] == "Preempted"]
    if not users and not causes and silent:
        return RankFailed(
            f"rank {min(silent)} of {nprocs} failed: it stopped answering without reporting an error (killed, hung "
            "or out of memory?) and the other ranks lost it or timed out waiting; the job was stopped",
            min(silent),
        )
    first = min(users) if users else min(causes) if causes else min(recorded) if recorded else min(failures)
    rec = recorded.get(first)
    if rec is not None:
        return RankFailed(
            f"rank {first} of {nprocs}: {rec['message']}", first, rec["type"], rec["user_error"], rec["message"]
        )
    f = failures[first]
    why = f"exit code {f.exitcode}" if f.exitcode is not None else "an error"
    if f.exitcode is not None and f.exitcode < 0:
        why = f"signal {-f.exitcode}"
    return RankFailed(f"rank {first} of {nprocs} failed with {why}; the other ranks were stopped", first)
