"""`lafs-fast finetune`: stage 2, LAFS fine-tuning of a Part fViT (docs/method.md section 4).

The fViT from a stage-1 teacher, the landmark CNN from stage 0, both trainable; CosFace / ArcFace,
the lambda-scheduled landmark regulariser, Mixup, face RandAugment, few-shot subsets, verification
during training. See ``lafs_fast.train.supervised`` (the stage) and ``supervised_run`` (the command).
"""

from __future__ import annotations

import argparse
import sys

from lafs_fast.train import supervised_run

STAGE = 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    supervised_run.add_arguments(parser, STAGE)


def run(args: argparse.Namespace) -> int:
    return supervised_run.run(args, STAGE)


if __name__ == "__main__":
    sys.exit(supervised_run.main(stage=STAGE))
