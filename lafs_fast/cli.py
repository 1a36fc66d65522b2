"""The `lafs-fast` command. Sub-commands only parse arguments and hand over to their module.

Each command lives in a module with ``add_arguments(parser)`` and ``run(args) -> int`` (or in an
object of a module that holds two commands, named ``module:object``); the module is imported only
when its command runs, so ``lafs-fast --help`` stays instant. A user's mistake
(ValueError, a missing or unwritable path) ends with one sentence on stderr and exit code 2,
never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from lafs_fast.errors import run_command

# name -> (module, one-line help). Add a command by adding its line here.
COMMANDS: dict[str, tuple[str, str]] = {
    "pretrain": (
        "lafs_fast.train.pretrain",
        "stage 1: LAFS self-supervised pre-training (DINO on landmark views), 1 to N GPUs",
    ),
    "train-landmarks": (
        "lafs_fast.train.supervised_run:train_landmarks",
        "stage 0: Part fViT from scratch (landmark CNN + fViT + margin head), 1 to N GPUs",
    ),
    "finetune": (
        "lafs_fast.train.supervised_run:finetune",
        "stage 2: LAFS fine-tuning (teacher fViT + stage-0 landmarks, CosFace/ArcFace, few-shot), 1 to N GPUs",
    ),
    "eval": (
        "lafs_fast.eval.cli",
        "verification accuracy (.bin: LFW, CFP-FP, AgeDB...) and IJB-B/C TAR@FAR of a checkpoint",
    ),
    "embed": ("lafs_fast.eval.embed", "embeddings of a folder of faces (.npz); ONNX export with a parity check"),
    "data": (
        "lafs_fast.data.cli",
        "datasets: build / inspect / subset / verify InsightFace recs, landmarks, face alignment",
    ),
    "checkpoint": ("lafs_fast.models.checkpoints", "import / export reference (Part fViT, LAFS SSL) checkpoints"),
    "viz": ("lafs_fast.eval.viz", "PNGs: learned landmarks on faces, ROC curves, training curves from a metrics log"),
    "config": (
        "lafs_fast.train.config_show",
        "show STAGE [options]: the config a training command would run with (its config.yaml); --help-keys",
    ),
    "info": ("lafs_fast.info", "versions, devices, and the backend each fast module picks and why"),
}


def _top_help() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = [
        "usage: lafs-fast COMMAND [options]",
        "",
        "Fast, faithful LAFS / Part fViT face-recognition training (Triton, DALI, xformers, torch.compile).",
        "",
        "commands:",
        *(f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()),
        "",
        "Run `lafs-fast COMMAND --help` for a command's options.",
    ]
    return "\n".join(lines)


def build_parser(name: str) -> tuple[argparse.ArgumentParser, object]:
    """The parser of one command and its module (or the module's object that ``module:name`` names)."""
    spec, help_ = COMMANDS[name]
    module_name, _, attribute = spec.partition(":")
    module = importlib.import_module(module_name)
    if attribute:
        module = getattr(module, attribute)
    parser = argparse.ArgumentParser(prog=f"lafs-fast {name}", description=help_)
    module.add_arguments(parser)
    return parser, module


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:
        # stdout closed early (`lafs-fast ... | head`): stop quietly, as other command-line tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_top_help())
        return 0
    if argv[0] == "--version":
        from lafs_fast import __version__

        print(f"lafs-fast {__version__}")
        return 0
    name = argv[0]
    if name not in COMMANDS:
        print(f"lafs-fast: error: unknown command {name!r}; choose one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    parser, module = build_parser(name)
    return run_command(f"lafs-fast {name}", parser, module.run, argv[1:])


if __name__ == "__main__":
    sys.exit(main())
