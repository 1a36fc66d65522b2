"""`lafs-fast config show STAGE [the stage's options]`: the config a training command would run with.

``config show pretrain --preset small --data D k=v`` takes the same options as ``lafs-fast pretrain``
(its own parser) and resolves them with the same function the command calls (``resolve_config`` of
the stage's module: preset <- the stage's defaults <- --config <- key=value <- the flags), then
prints them with the function the run's engine writes ``config.yaml`` with
(:func:`lafs_fast.config.config_yaml`). What it prints is therefore what the run writes, byte for
byte (tests/test_config_show.py runs each stage and compares). ``config show --help-keys`` lists
every key with its type, default, range or choices and help text.

A config without a stage is not what any run uses (each stage adds its own defaults to the preset),
so ``config show --preset P`` alone is refused with the form to use.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import NoReturn

from lafs_fast.config import Config, config_yaml, keys_help

__all__ = ["STAGES", "add_arguments", "run", "stage_config"]

STAGES = ("pretrain", "finetune", "train-landmarks")
USAGE = "lafs-fast config show pretrain|finetune|train-landmarks [--preset P] [--data D] [section.key=value ...]"


def _stage_command(stage: str) -> tuple[Callable[[argparse.ArgumentParser], None], Callable[..., Config]]:
    """(add_arguments, resolve_config) of a training command: the very functions the command uses."""
    if stage == "pretrain":
        from lafs_fast.train import pretrain

        return pretrain.add_arguments, pretrain.resolve_config
    from lafs_fast.train import supervised_run

    number = {"train-landmarks": 0, "finetune": 2}[stage]
    return (lambda p: supervised_run.add_arguments(p, number)), supervised_run.resolve_config


class _ShowParser(argparse.ArgumentParser):
    """``config show``'s parser: a word that is not a stage (the old ``config show --preset small
    k=v``) gets the form to use, not only argparse's list of choices."""

    def error(self, message: str) -> NoReturn:
        if "invalid choice" in message and self.prog.endswith(" show"):
            message = f"{message}; name the stage whose run to show first: {USAGE}"
        super().error(message)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION", parser_class=_ShowParser)
    show = sub.add_parser(
        "show",
        help="print the config a training command would run with: exactly the run's config.yaml",
        description=f"{USAGE}: the stage's options, resolved as the stage resolves them, printed as its run "
        "writes config.yaml.",
    )
    show.add_argument(
        "--help-keys", action="store_true", help="list every key with its type, default, range and help text"
    )
    stages = show.add_subparsers(dest="stage", metavar="STAGE")
    for stage in STAGES:
        add, _ = _stage_command(stage)
        add(stages.add_parser(stage, help=f"the config `lafs-fast {stage}` with these options would run with"))


def stage_config(stage: str, args: argparse.Namespace) -> Config:
    """The config ``lafs-fast STAGE`` with ``args`` (its own parser's) runs with."""
    return _stage_command(stage)[1](args)


def run(args: argparse.Namespace) -> int:
    if args.help_keys:
        print(keys_help(), end="")
        return 0
    if args.stage is None:
        raise ValueError(
            f"config show needs the stage whose run to show (each stage adds its own defaults to the preset): {USAGE}"
        )
    print(config_yaml(stage_config(args.stage, args)), end="")
    return 0
