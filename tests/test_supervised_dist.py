"""Two CPU processes (gloo) for the supervised stages: DDP with the sharded margin head keeps the
shared parameters identical on both ranks (each rank's slice of the class centres is its own)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests import TINY_MODEL

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    *TINY_MODEL,
    "optim.batch_size=2",
    "optim.epochs=1",
    "data.synthetic_identities=5",
    "data.synthetic_images_per_identity=2",
    "train.log_every=1",
]


def _train_landmarks_2ranks(out: Path, *argv: str) -> subprocess.CompletedProcess:
    """``lafs-fast train-landmarks`` on 2 gloo ranks into ``out`` with the sharded head (``argv`` before
    the tiny config, which key=value pairs in ``argv`` may refine); must exit 0."""
    cmd = [sys.executable, "-m", "lafs_fast.train.supervised_run", "train-landmarks", "--device", "cpu", "--gpus", "2"]
    cmd.append("--no-check")
    r = subprocess.run(
        [*cmd, "--no-progress", "--out", str(out), *[a for a in argv if "=" not in a], *TINY,
         *[a for a in argv if "=" in a], "finetune.head=cosface", "finetune.shard_classes=true"],
        capture_output=True, text=True, timeout=290, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


@pytest.mark.timeout(300)
def test_two_cpu_processes_sharded_head_stay_identical(tmp_path):
    r = _train_landmarks_2ranks(tmp_path, "--max-steps", "2")
    digests = dict(re.findall(r"rank (\d): 2 steps, shared parameters sha256 ([0-9a-f]+)", r.stdout))
    assert set(digests) == {"0", "1"} and digests["0"] == digests["1"], r.stdout
    assert "2 process(es) on cpu" in r.stdout and "sharded" in r.stdout
    assert (tmp_path / "part_fvit.pt").is_file()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sharded_head_resumes_bitwise_on_two_ranks(tmp_path):
    """The sharded head's whole point is the 206k-class, 8-GPU case: each rank's slice of the class
    centres and of its AdamW moments is in the checkpoint (gathered whole on rank 0) and comes back to
    its rank, so 1 step + --resume to 2 ends where 2 uninterrupted steps do, bit for bit (fp32 CPU)."""
    import torch

    from lafs_fast.train.checkpointing import load_checkpoint

    def run(out, *argv):
        return _train_landmarks_2ranks(out, *argv, "optim.epochs=2", "train.ckpt_every_steps=1")

    run(tmp_path / "full", "--max-steps", "3")
    run(tmp_path / "part", "--max-steps", "1")
    resumed = run(tmp_path / "part", "--max-steps", "3", "--resume", "auto")
    assert "resumed from" in resumed.stdout
    a, b = (load_checkpoint(tmp_path / d / "ckpt-00000003.pt") for d in ("full", "part"))
    whole = a["sharded"]["head.margin.weight"]
    assert (
        whole["param"].shape[0] == 5 and {"param", "optim.exp_avg", "optim.exp_avg_sq"} <= whole.keys()
    )  # 5 classes, both ranks' rows
    for k in whole:
        assert torch.equal(whole[k], b["sharded"]["head.margin.weight"][k]), k
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    digests = [
        dict(re.findall(r"rank (\d): 3 steps, shared parameters sha256 ([0-9a-f]+)", r)) for r in (resumed.stdout,)
    ]
    assert len(set(digests[0].values())) == 1
