"""Several processes on the CPU (gloo): DDP keeps ranks identical; a 2-rank run stopped and resumed
ends bit for bit where an uninterrupted one does; a dying rank ends the job fast."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests import TINY_DINO, TINY_MODEL

ROOT = Path(__file__).resolve().parents[1]
# 4 x 2 = 8 faces over 2 ranks at batch 2: 2 steps per epoch, so stopping after step 1 resumes mid-epoch
TINY = [
    *TINY_MODEL,
    *TINY_DINO,
    "optim.batch_size=2",
    "optim.epochs=1",
    "data.synthetic_identities=4",
    "data.synthetic_images_per_identity=2",
    "views.n_local=1",
    "train.log_every=1",
]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _pretrain_2ranks(out: Path, *argv: str, rc: int = 0) -> subprocess.CompletedProcess:
    """``lafs-fast pretrain`` on 2 gloo ranks into ``out`` (``argv`` before the tiny config), expecting exit ``rc``."""
    cmd = [
        sys.executable,
        "-m",
        "lafs_fast.train.pretrain",
        "--device",
        "cpu",
        "--gpus",
        "2",
        "--no-knn",
        "--no-progress",
    ]
    r = subprocess.run(
        [*cmd, "--out", str(out), *argv, *TINY], capture_output=True, text=True, timeout=280, cwd=ROOT, env=_env()
    )
    assert r.returncode == rc, r.stdout[-2000:] + r.stderr[-3000:]
    return r


def _digests(r: subprocess.CompletedProcess, steps: int) -> dict[str, str]:
    return dict(re.findall(rf"rank (\d): {steps} steps, parameters sha256 ([0-9a-f]+)", r.stdout))


@pytest.fixture(scope="module")
def one_step(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """A 2-rank run stopped after 1 of its 2 steps (shared: the resume test continues a copy of it)."""
    out = tmp_path_factory.mktemp("one_step")
    return out, _pretrain_2ranks(out, "--max-steps", "1")


@pytest.mark.timeout(300)
def test_two_cpu_processes_stay_identical(one_step):
    out, r = one_step
    digests = _digests(r, 1)
    assert set(digests) == {"0", "1"} and digests["0"] == digests["1"], r.stdout
    assert "2 process(es) on cpu" in r.stdout
    assert (out / "ckpt-00000001.pt").is_file() and (out / "teacher.pt").is_file()


def _assert_same(a, b, where: str = "") -> None:
    """Nested checkpoint contents equal: tensors bitwise, everything else by ==."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_cpu_processes_resume_bitwise(one_step, tmp_path):
    """1 step + resume to 2 == 2 uninterrupted steps, on 2 gloo ranks, bit for bit (fp32 CPU): the
    student, the teacher, the DINO centre, AdamW's moments, the loader position and every rank's RNG
    (dropout / drop-path are on, different per rank) all carry over the stop."""
    from lafs_fast.train.checkpointing import load_checkpoint

    part = tmp_path / "part"
    shutil.copytree(one_step[0], part)
    resumed = _pretrain_2ranks(part, "--max-steps", "2", "--resume", "auto")
    assert "resumed from" in resumed.stdout and "at step 1 (epoch 0)" in resumed.stdout, resumed.stdout
    full = _pretrain_2ranks(tmp_path / "full", "--max-steps", "2")
    d_res, d_full = _digests(resumed, 2), _digests(full, 2)
    assert set(d_full) == {"0", "1"} and len(set(d_full.values())) == 1, full.stdout
    assert d_res == d_full, resumed.stdout + full.stdout
    a, b = load_checkpoint(tmp_path / "full" / "ckpt-00000002.pt"), load_checkpoint(part / "ckpt-00000002.pt")
    assert a["config"]["train"].pop("out_dir") != b["config"]["train"].pop("out_dir")
    assert len(a["rng_ranks"]) == 2 and not torch.equal(a["rng_ranks"][0]["torch"], a["rng_ranks"][1]["torch"])
    assert a["loader"]["epoch"] == 0 and a["loader"]["batch"] == 2
    _assert_same(a, b)  # model, stage_state (teacher, centre), optimizer, loader, rng, rng_ranks, model_file, ...
    losses = [
        [json.loads(x)["loss"] for x in (d / "metrics.jsonl").read_text().splitlines()]
        for d in (tmp_path / "full", part)
    ]
    assert len(losses[0]) == 2 and losses[0] == losses[1]


_RANK_1_FAILS = """
import os, signal, sys, time
import torch.distributed as dist
from lafs_fast.launch import launch, init_distributed, RankFailed

def worker():
    info = init_distributed("cpu", timeout_s={timeout_s})
    if info.rank == 1:
        time.sleep(1.0)
        os.kill(os.getpid(), signal.{signal})  # SIGKILL: a rank dies without a word; SIGSTOP: it hangs
    dist.barrier()  # rank 0 would wait here forever without the agent (or the collective timeout)
    return info.rank

if __name__ == "__main__":
    t = time.time()
    try:
        launch(worker, (), 2)
    except RankFailed as exc:
        print(f"FAILED after {{time.time() - t:.1f}}s: {{exc}}", flush=True)
        sys.exit(1)
    sys.exit(0)
"""


def _rank_1_fails(tmp_path: Path, signal: str, timeout_s: float = 600) -> tuple[subprocess.CompletedProcess, float]:
    script = tmp_path / f"{signal}.py"
    script.write_text(_RANK_1_FAILS.format(signal=signal, timeout_s=timeout_s))
    t = time.time()
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=140, cwd=ROOT, env=_env())
    return r, time.time() - t


@pytest.mark.timeout(150)
def test_a_killed_rank_ends_the_job_nonzero(tmp_path):
    r, seconds = _rank_1_fails(tmp_path, "SIGKILL")
    assert r.returncode == 1, r.stdout + r.stderr[-3000:]
    assert "FAILED" in r.stdout and "rank 1 of 2 failed" in r.stdout
    assert seconds < 100


@pytest.mark.timeout(300)
def test_a_users_mistake_inside_a_worker_is_one_sentence(one_step, tmp_path):
    """Found by the ranks themselves (resuming with other settings is seen only once a worker reads the
    checkpoint): one line on stderr and exit 2, as in one process, not the elastic launcher's traceback."""
    out = tmp_path / "run"
    shutil.copytree(one_step[0], out)
    r = _pretrain_2ranks(out, "--resume", "auto", "optim.lr=0.01", rc=2)
    err = r.stderr.strip()
    assert (
        err.count("\n") == 0
        and err.startswith("lafs-fast pretrain: error: ")
        and "other settings: optim.lr 0.008 -> 0.01" in err
    ), err
    assert "Traceback" not in r.stdout + r.stderr


_MEAN = """
import sys
import torch
from lafs_fast.config import load_config
from lafs_fast.launch import launch, init_distributed
from lafs_fast.train.engine import Engine, Stage
from tests.test_engine import TensorLoader


class RankLoss(Stage):
    name = "toy"

    def __init__(self, rank):
        self.model, self.rank = torch.nn.Linear(4, 1), rank

    def forward_loss(self, model, batch, ctx):
        return model(batch[0]).sum() * 0 + (self.rank + 1.0), {}  # rank 0: 1, rank 1: 2


def worker(out):
    info = init_distributed("cpu")
    cfg = load_config("small", None, ["optim.epochs=1", "optim.batch_size=4", "train.log_every=1", "train.max_steps=2",
                                      f"train.out_dir={out}"])
    Engine(cfg, RankLoss(info.rank), TensorLoader(8, 4), info, out, progress=False).fit()
    return info.rank

if __name__ == "__main__":
    launch(worker, (sys.argv[1],), 2)
"""


@pytest.mark.timeout(120)
def test_the_logged_loss_is_the_mean_over_ranks(tmp_path):
    script = tmp_path / "mean.py"
    script.write_text(_MEAN)
    r = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=110,
        cwd=ROOT,
        env=_env(),
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    losses = [json.loads(x)["loss"] for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert losses == [1.5, 1.5]  # rank 0's alone was 1.0


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_nodes_train_as_one_job(tmp_path):
    """Two `torchrun` invocations (one process each) meeting through a c10d rendezvous on localhost,
    gloo, as two machines would: one job of world size 2 (identical parameters on both, rank 0 writes)."""
    port = _free_port()
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "2",
        "--nproc-per-node",
        "1",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{port}",
        "--rdzv-id",
        "lafs-two-nodes",
    ]
    job = [
        "-m",
        "lafs_fast.train.pretrain",
        "--device",
        "cpu",
        "--no-knn",
        "--no-progress",
        "--out",
        str(tmp_path / "run"),
        "--max-steps",
        "2",
        *TINY,
    ]

    def node(is_host: int) -> subprocess.Popen:
        conf = f"is_host={is_host},read_timeout=240,join_timeout=240"
        return subprocess.Popen(
            [*torchrun, "--rdzv-conf", conf, *job],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=_env(),
        )

    nodes = [node(1)]
    try:  # the second "machine" joins once the first hosts the rendezvous store (a loaded CI box is slow to start)
        deadline = time.time() + 150
        while time.time() < deadline and nodes[0].poll() is None:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.2)
        nodes.append(node(0))
        outs = [n.communicate(timeout=280) for n in nodes]
    finally:
        for n in nodes:
            if n.poll() is None:
                n.kill()
    for n, (out, err) in zip(nodes, outs):
        assert n.returncode == 0, out[-2000:] + err[-3000:]
    digests = {}
    for out, _ in outs:
        digests.update(re.findall(r"rank (\d): 2 steps, parameters sha256 ([0-9a-f]+)", out))
    assert set(digests) == {"0", "1"} and digests["0"] == digests["1"], outs
    from lafs_fast.train.checkpointing import load_checkpoint

    ck = load_checkpoint(tmp_path / "run" / "ckpt-00000002.pt")
    assert ck["plan"]["world_size"] == 2 and len(ck["rng_ranks"]) == 2


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(150)
def test_a_hung_rank_ends_the_job_after_the_collective_timeout(tmp_path):
    """A stopped rank (SIGSTOP) held the job past 73 s: the collective timeout (train.dist_timeout_s) ends it."""
    r, seconds = _rank_1_fails(tmp_path, "SIGSTOP", timeout_s=5)
    assert r.returncode == 1 and "rank 1 of 2 failed: it stopped answering" in r.stdout, r.stdout + r.stderr[-3000:]
    assert seconds < 90, r.stdout
