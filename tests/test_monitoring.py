"""A run one can watch (issue 24, items 1-3): the periodic log line with or without the progress bar,
validation and k-NN checks on the curves (metrics.jsonl, TensorBoard read back from its event file,
W&B in offline mode), and pre-training's periodic checks and teacher snapshots."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import torch

from lafs_fast.data.binfile import write_bin
from lafs_fast.models.checkpoints import load_model
from lafs_fast.train import pretrain, supervised_run
from lafs_fast.train.progress import Every, parse_every
from lafs_fast.train.run_folder import MetricsLog, run_files
from tests import TINY_PRETRAIN, TINY_SUPERVISED
from tests.test_eval_util import faces, jpeg

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread

_NUMBER = r"[0-9.]+(?:e[+-]\d+)?"
LINE = re.compile(
    rf"\[pretrain\] step (?P<step>\d+)/30 \(\d+%\) epoch (?P<epoch>\d+)/10 \| "
    rf"loss (?P<loss>{_NUMBER}) \(mean of (?P<n>\d+)\) lr {_NUMBER} "
    rf"teacher_entropy {_NUMBER} teacher_batch_entropy {_NUMBER} \| "
    rf"(?P<rate>{_NUMBER}) samples/s, {_NUMBER} s/step, data {_NUMBER} s/step, eta \d+:\d\d:\d\d \| "
    rf"peak (?:RSS|mem) (?P<mem>{_NUMBER}) GiB"
)


def _records(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _tensorboard(out: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the run's TensorBoard event files, read back with tensorboard's own reader."""
    pytest.importorskip("tensorboard", reason="tensorboard not installed (pip install 'lafs-fast[tensorboard]')")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_a_no_progress_run_logs_every_log_every_steps(tmp_path, capsys):
    """Issue 24's test: 30 steps with --no-progress and train.log_every=10 print 3 lines, each with
    step/total, epoch, the loss averaged over the 10 steps, lr, the health keys, speed, data wait, ETA
    and peak memory; train.log holds the same lines."""
    out = tmp_path / "run"
    argv = ["--out", str(out), "--no-progress", "--no-knn", *TINY_PRETRAIN, "optim.epochs=10", "train.log_every=10"]
    assert pretrain.main(argv) == 0
    said = [m for line in capsys.readouterr().out.splitlines() if (m := LINE.search(line))]
    assert [m["step"] for m in said] == ["10", "20", "30"], said
    assert [m["epoch"] for m in said] == ["4", "7", "10"]  # 3 steps an epoch, counted from 1
    assert all(m["n"] == "10" and float(m["rate"]) > 0 and float(m["mem"]) > 0 for m in said)
    losses = [r["loss"] for r in _records(out)]  # every 10th step's loss; the line's is the mean of 10
    assert len(losses) == 3 and all(float(m["loss"]) > 0 for m in said)
    logged = [m for line in (out / "train.log").read_text().splitlines() if (m := LINE.search(line))]
    assert [m["step"] for m in logged] == ["10", "20", "30"]


class _SlowLoader:
    """Wraps a loader: every batch arrives ``delay`` seconds late (a starved input pipeline)."""

    def __init__(self, loader, delay: float) -> None:
        self.loader, self.delay = loader, delay

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def __iter__(self):
        for batch in self.loader:
            time.sleep(self.delay)
            yield batch


def test_the_line_measures_data_wait_and_averages_the_loss(tmp_path, caplog):
    """The data time is the loop's wait for the loader (a loader 50 ms late shows >= 0.05 s/step of
    data, most of the step), and with train.log_every=1 the line's loss is that step's loss."""
    from lafs_fast.launch import DistInfo
    from lafs_fast.train.engine import Engine
    from tests.test_engine import Regression, TensorLoader, _cfg

    cfg = _cfg(tmp_path, "train.max_steps=4")
    engine = Engine(cfg, Regression(), _SlowLoader(TensorLoader(24, 4), 0.05), DistInfo(), tmp_path, progress=False)
    with caplog.at_level("INFO", logger="lafs_fast"):
        engine.fit()
    lines = [r.getMessage() for r in caplog.records if " s/step, data " in r.getMessage()]
    assert len(lines) == 4, lines
    for line, rec in zip(lines, _records(tmp_path)):
        per_step = float(re.search(rf"({_NUMBER}) s/step, data", line)[1])
        data = float(re.search(rf"data ({_NUMBER}) s/step", line)[1])
        assert 0.05 <= data <= per_step, line
        assert f"step {rec['step']}/4 " in line and f"loss {rec['loss']:.4f} (mean of 1)" in line, line


def test_bin_validation_reaches_metrics_and_tensorboard(tmp_path):
    """`--val X.bin --val-every 2`: the accuracy before training (step 0) and every 2 steps is a
    record of metrics.jsonl with its step and the same scalar in TensorBoard's event file."""
    f = faces(20, seed=1)
    images, same = [], []
    for i in range(10):  # 10 pairs: one a fold  # genuine: one face at two JPEG qualities; impostor: two faces
        images += [jpeg(f[2 * i], 95), jpeg(f[2 * i], 70)] if i % 2 == 0 else [jpeg(f[2 * i]), jpeg(f[2 * i + 1])]
        same.append(i % 2 == 0)
    write_bin(tmp_path / "held.bin", images, same)
    out = tmp_path / "run"
    argv = ["--out", str(out), "--no-progress", "--no-check", "--val", str(tmp_path / "held.bin"), "--val-every", "2"]
    assert supervised_run.main([*argv, *TINY_SUPERVISED, "train.log_every=2"], stage=0) == 0
    val = [(r["step"], r["val/held"]) for r in _records(out) if "val/held" in r]
    assert [s for s, _ in val] == [0, 2, 4] and all(0 <= a <= 100 for _, a in val), val
    summary = json.loads((out / "summary.json").read_text())
    assert val[-1][1] == summary["verification"]["held"] and val[0][1] == summary["verification_before"]["held"]
    tb = _tensorboard(out)
    assert [(s, pytest.approx(a)) for s, a in tb["val/held"]] == val
    assert [s for s, _ in tb["loss"]] == [2, 4] and "train_acc" in tb  # the step records too


def test_pretrain_checks_and_teacher_snapshots_during_the_run(tmp_path):
    """`--knn-every 2 --save-teacher-every 1epochs` on 6 steps (3 an epoch): the k-NN check at step 0
    (before), 2, 4 and 6 (after) in metrics.jsonl and TensorBoard; teacher-00000003.pt and
    teacher-00000006.pt, model files, the last the same weights as teacher.pt; they belong to the run
    (a new run into the folder is refused, --overwrite deletes them); none of it changes what trains."""
    out = tmp_path / "run"
    argv = ["--out", str(out), "--no-progress", "--knn-every", "2", "--save-teacher-every", "1epochs", *TINY_PRETRAIN]
    assert pretrain.main(argv) == 0
    knn = [(r["step"], r["knn/top1"], r["knn/verification"]) for r in _records(out) if "knn/top1" in r]
    assert [s for s, *_ in knn] == [0, 2, 4, 6], knn
    summary = json.loads((out / "summary.json").read_text())
    assert knn[0][1:] == (summary["knn_before"]["knn_top1"], summary["knn_before"]["verification"])
    assert knn[-1][1:] == (summary["knn_after"]["knn_top1"], summary["knn_after"]["verification"])
    tb = _tensorboard(out)
    assert [s for s, _ in tb["knn/top1"]] == [0, 2, 4, 6] and [s for s, _ in tb["knn/verification"]] == [0, 2, 4, 6]
    snaps = sorted(p.name for p in out.glob("teacher-*.pt"))
    assert snaps == ["teacher-00000003.pt", "teacher-00000006.pt"]
    last, final = torch.load(out / snaps[-1], weights_only=True), torch.load(out / "teacher.pt", weights_only=True)
    assert all(torch.equal(last["backbone"][k], v) for k, v in final["backbone"].items())
    first = torch.load(out / snaps[0], weights_only=True)["backbone"]
    assert not all(torch.equal(first[k], v) for k, v in final["backbone"].items())  # an earlier teacher
    assert load_model(out / snaps[0]).dim == 32
    assert set(snaps) <= {p.name for p in run_files(out)}  # --overwrite deletes them, a new run is refused
    plain = tmp_path / "plain"  # the same run without the periodic checks and snapshots trains the same weights
    assert pretrain.main(["--out", str(plain), "--no-progress", *TINY_PRETRAIN]) == 0
    again = torch.load(plain / "teacher.pt", weights_only=True)["backbone"]
    assert all(torch.equal(again[k], v) for k, v in final["backbone"].items())


def test_period_flags_are_parsed_or_refused_in_one_sentence(tmp_path, capsys):
    assert parse_every("500", "--knn-every") == Every(500, "steps") == parse_every("500steps", "--knn-every")
    assert parse_every("2epochs", "--knn-every").steps(7) == 14 and parse_every("1 epoch", "--x").steps(7) == 7
    for bad in ("0", "2 weeks", "-3", "epochs"):
        with pytest.raises(ValueError, match="expects a count of steps or epochs >= 1"):
            parse_every(bad, "--knn-every")
    base = ["--out", str(tmp_path / "r"), "--no-progress", *TINY_PRETRAIN]
    assert pretrain.main([*base, "--knn-every", "2 weeks"]) == 2
    assert pretrain.main([*base, "--knn-every", "2", "--no-knn"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "--knn-every '2 weeks'" in err[0] and "--no-knn turns off" in err[1], err
    assert not run_files(tmp_path / "r")  # refused before any work


def test_wandb_is_refused_in_one_sentence_when_missing(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "wandb", None)
    with pytest.raises(ValueError, match=r"train.wandb needs wandb.*pip install 'lafs-fast\[wandb\]'"):
        MetricsLog(tmp_path, True, {"train": {}})
    MetricsLog(tmp_path, False, {"train": {}})  # only rank 0 writes, only rank 0 needs it


def test_wandb_offline_gets_the_same_records(tmp_path, monkeypatch):
    """`--wandb` under WANDB_MODE=offline: every metrics.jsonl record reaches W&B with its step (the
    k-NN check's at 0 and the last step included) and the run's files stay in --out/wandb."""
    wandb = pytest.importorskip("wandb", reason="wandb not installed (pip install 'lafs-fast[wandb]')")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logged: list[tuple[int, dict]] = []
    real = wandb.Run.log

    def spy(self, data, step=None, **kw):
        logged.append((step, dict(data)))
        return real(self, data, step=step, **kw)

    monkeypatch.setattr(wandb.Run, "log", spy)
    out = tmp_path / "run"
    assert pretrain.main(["--out", str(out), "--no-progress", "--wandb", *TINY_PRETRAIN, "train.max_steps=2"]) == 0
    want = [(r["step"], {k: v for k, v in r.items() if k not in ("step", "epoch")}) for r in _records(out)]
    assert logged == want and [s for s, _ in logged] == [0, 1, 2, 2], logged
    assert "knn/top1" in logged[0][1] and "loss" in logged[1][1]
    assert list((out / "wandb").glob("offline-run-*/run-*.wandb"))
