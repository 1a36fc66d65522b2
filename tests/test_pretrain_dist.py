"""Several processes on the CPU (gloo): DDP keeps ranks identical; a dying rank ends the job fast."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "model.dim=32", "model.depth=1", "model.heads=2", "model.head_dim=16", "model.mlp_dim=64",
    "dino.out_dim=64", "dino.hidden_dim=64", "dino.bottleneck_dim=16", "optim.batch_size=2", "optim.epochs=1",
    "data.synthetic_identities=2", "data.synthetic_images_per_identity=2", "views.n_local=1", "train.log_every=1",
]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@pytest.mark.timeout(300)
def test_two_cpu_processes_stay_identical(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "lafs_fast.train.pretrain", "--device", "cpu", "--gpus", "2", "--max-steps", "1", "--no-knn",
         "--no-progress", "--out", str(tmp_path), *TINY],
        capture_output=True, text=True, timeout=290, cwd=ROOT, env=_env(),
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    digests = dict(re.findall(r"rank (\d): 1 steps, parameters sha256 ([0-9a-f]+)", r.stdout))
    assert set(digests) == {"0", "1"} and digests["0"] == digests["1"], r.stdout
    assert "2 process(es) on cpu" in r.stdout
    assert (tmp_path / "ckpt-00000001.pt").is_file() and (tmp_path / "teacher.pt").is_file()


_KILL = """
import os, signal, sys, time
import torch.distributed as dist
from lafs_fast.launch import launch, init_distributed, RankFailed

def worker():
    info = init_distributed("cpu")
    if info.rank == 1:
        time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGKILL)  # a rank dies without a word
    dist.barrier()  # rank 0 would wait here forever without the agent
    return info.rank

if __name__ == "__main__":
    t = time.time()
    try:
        launch(worker, (), 2)
    except RankFailed as exc:
        print(f"FAILED after {time.time() - t:.1f}s: {exc}", flush=True)
        sys.exit(1)
    sys.exit(0)
"""


@pytest.mark.timeout(120)
def test_a_killed_rank_ends_the_job_nonzero(tmp_path):
    script = tmp_path / "kill.py"
    script.write_text(_KILL)
    t = time.time()
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=110, cwd=ROOT, env=_env())
    assert r.returncode == 1, r.stdout + r.stderr[-3000:]
    assert "FAILED" in r.stdout and "rank 1 of 2 failed" in r.stdout
    assert time.time() - t < 100
