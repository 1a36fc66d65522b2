"""Stage 0 on real faces (ORL, when present) with verification on held-out identities during training,
and the few-shot subset path (a rec subset written and trained on)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from lafs_fast.config import config_to_dict, load_config
from lafs_fast.data import make_loader
from lafs_fast.data.make_bin import make_bin
from lafs_fast.train import supervised_run

TINY = [
    "model.dim=64",
    "model.depth=2",
    "model.heads=2",
    "model.head_dim=32",
    "model.mlp_dim=128",
    "model.dropout=0",
    "model.emb_dropout=0",
    "model.drop_path=0",
    "model.landmark_dropout=0.1",
    "train.log_every=1",
    "data.workers=0",
    "data.loader=pil",
    "finetune.mixup_p=0",
    "train.device=cpu",  # CPU semantics (fp32, bitwise) even where a GPU runs the suite
]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread


def _split(orl: Path, tmp: Path, train_ids: range, held_ids: range) -> tuple[Path, Path]:
    train, held = tmp / "train", tmp / "held"
    for root, ids in ((train, train_ids), (held, held_ids)):
        root.mkdir()
        for i in ids:
            os.symlink(orl / f"s{i}", root / f"s{i:02d}")
    return train, held


def test_orl_loss_falls_and_held_out_verification_rises(orl_dir, tmp_path):
    train, held = _split(orl_dir, tmp_path, range(1, 11), range(31, 41))
    bin_path = tmp_path / "orl_held.bin"
    make_bin(held, bin_path, num_pairs=100, seed=0)
    out = tmp_path / "run"
    cfg = load_config(
        "small",
        None,
        [
            *TINY,
            f"data.path={train}",
            f"train.out_dir={out}",
            "optim.batch_size=10",
            "optim.epochs=3",
            "optim.warmup_epochs=0",
            "optim.lr=0.15",
            "finetune.val_every=15",
            f"finetune.val_sets={bin_path}",
        ],
        defaults=supervised_run.stage_defaults("small"),
    )
    res = supervised_run.train_worker(config_to_dict(cfg), 0, {"check": False, "progress": False})
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in records if "ce" in r]  # the step records (the validations are records too)
    val = [(r["step"], r["val/orl_held"]) for r in records if "val/orl_held" in r]  # on the curves, with its step
    assert [s for s, _ in val] == [0, 15, 30], val
    assert val[0][1] == res["verification_before"]["orl_held"] and val[-1][1] == res["verification"]["orl_held"]
    first = sum(r["ce"] for r in rows[:5]) / 5
    last = sum(r["ce"] for r in rows[-5:]) / 5
    assert last < first, (first, last)
    before, after = res["verification_before"]["orl_held"], res["verification"]["orl_held"]
    print(f"ORL held-out verification {before:.1f}% -> {after:.1f}%; cross-entropy {first:.2f} -> {last:.2f}")
    assert after > 50.0 and after > before  # above chance (balanced pairs) and better than the start
    best = json.loads((out / "best.json").read_text())
    assert (out / "best.pt").is_file() and best["mean_accuracy"] >= after
    assert best["step"] > 0


def test_subset_shots_fraction_seed_writes_and_trains_on_a_subset(orl_dir, tmp_path):
    train, _ = _split(orl_dir, tmp_path, range(1, 11), range(0))
    out = tmp_path / "few"
    cfg = load_config(
        "small",
        None,
        [
            *TINY,
            f"data.path={train}",
            f"train.out_dir={out}",
            "optim.batch_size=4",
            "finetune.subset=shots=2,fraction=0.5,seed=3",
            "train.max_steps=1",
        ],
        defaults=supervised_run.stage_defaults("small"),
    )
    src = supervised_run.prepare_data(cfg)
    loader = make_loader(src, 2, backend="pil", num_workers=0)
    assert loader.num_classes == 5 and loader.n == 10  # half the identities, two images each
    assert supervised_run.prepare_data(cfg) == src  # reused, not rebuilt
    again = load_config(
        "small",
        None,
        [
            *TINY,
            f"data.path={train}",
            f"train.out_dir={tmp_path / 'few2'}",
            "finetune.subset=shots=2,fraction=0.5,seed=3",
        ],
    )
    src2 = supervised_run.prepare_data(again)
    assert (Path(src) / "train.rec").read_bytes() == (Path(src2) / "train.rec").read_bytes()  # seeded
    res = supervised_run.train_worker(config_to_dict(cfg), 2, {"check": False, "progress": False, "data": src})
    assert res["steps"] == 1
    syn = load_config(
        "small", None, ["finetune.subset=shots=1,fraction=0.25,seed=0", "train.device=cpu", f"train.out_dir={tmp_path}"]
    )
    assert supervised_run.prepare_data(syn).startswith("synthetic:16x1")
