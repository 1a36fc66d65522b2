"""`lafs-fast train-landmarks`: stage 0, Part fViT trained end to end from scratch (docs/method.md
section 2): landmark CNN -> patch sampler (coordinate gradient) -> fViT -> margin head.

Its ``part_fvit.pt`` feeds ``lafs-fast pretrain --landmarks`` and ``lafs-fast finetune --landmarks``.
See ``lafs_fast.train.supervised`` (the stage) and ``supervised_run`` (the command).
"""

from __future__ import annotations

import argparse
import sys

from lafs_fast.train import supervised_run

STAGE = 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    supervised_run.add_arguments(parser, STAGE)


def run(args: argparse.Namespace) -> int:
    return supervised_run.run(args, STAGE)


if __name__ == "__main__":
    sys.exit(supervised_run.main(stage=STAGE))
