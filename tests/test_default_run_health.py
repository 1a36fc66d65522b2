"""The default run's health (issue 14): the first 30 steps of `lafs-fast pretrain` as it runs out of
the box (the `small` preset's pre-training recipe, synthetic faces) stay healthy, while the DINO
recipe it replaced (reference centering, no KoLeo, a teacher EMA of 0.9 in train mode, dropout,
peak lr 2e-3) collapses on the same faces within those steps: the guard that the recipe change,
not luck, keeps the default run from collapsing. The whole default run (96 steps) is measured in
docs/training_health.md."""

from __future__ import annotations

import argparse
import json

import pytest

from lafs_fast.config import config_to_dict
from lafs_fast.train import pretrain
from lafs_fast.train.health import CollapseWatch
from tests import CPU

STEPS = 30
# the small pre-training recipe before issue 14's change (lafs_fast.train.pretrain.stage_defaults then)
OLD_RECIPE = [
    "dino.centering=center",
    "dino.koleo_weight=0",
    "dino.teacher_momentum=0.9",
    "dino.teacher_mode=train",
    "model.dropout=0.1",
    "model.emb_dropout=0.1",
    "optim.lr=0.032",
]


def _health(tmp_path, *overrides: str) -> tuple[list[str], list[dict]]:
    parser = argparse.ArgumentParser()
    pretrain.add_arguments(parser)
    args = parser.parse_args(
        ["--out", str(tmp_path), *CPU, f"train.max_steps={STEPS}", "train.log_every=1", *overrides]
    )
    cfg = pretrain.resolve_config(args)
    pretrain.train_worker(config_to_dict(cfg), {"knn": False, "progress": False})
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    watch = CollapseWatch(cfg.dino.out_dim)
    said = [line for r in records if (line := watch.update(r["step"], r))]
    return said, records


@pytest.mark.timeout(600)
def test_default_run_stays_healthy_where_the_old_recipe_collapses(tmp_path):
    said, records = _health(tmp_path / "default")
    assert len(records) == STEPS and not said, said
    late = records[10:]
    assert min(r["teacher_batch_entropy"] - r["teacher_entropy"] for r in late) > 0.3  # nats: faces still differ
    assert min(r["embed_std"] for r in late) > 0.5

    said_old, _ = _health(tmp_path / "old", *OLD_RECIPE)
    assert len(said_old) == 1 and said_old[0].startswith("COLLAPSE since step"), said_old
