"""The examples' experiment runner (examples/_jobs.py): jobs wait for what they need, finished jobs
are skipped, a failure stops the script naming its log; and each script's --help runs."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

import _jobs  # noqa: E402


def _writer(path: Path, text: str, delay: float = 0.0) -> list[str]:
    """A job command that sleeps, then appends ``text`` to the order file and writes its done file."""
    code = f"import time; time.sleep({delay}); open({str(path)!r}, 'a').write({text!r} + ' ')"
    return [sys.executable, "-c", code]


def test_jobs_wait_for_their_needs_and_finished_ones_are_skipped(tmp_path):
    order = tmp_path / "order.txt"
    done = {n: tmp_path / f"{n}.done" for n in "abcd"}
    done["d"].write_text("")  # finished in an earlier run of the script: not run again
    jobs = [
        _jobs.Job("c", _writer(order, "c"), done["c"], ["a", "b"]),
        _jobs.Job("a", _writer(order, "a", 0.3), done["a"]),
        _jobs.Job("b", _writer(order, "b"), done["b"]),
        _jobs.Job("d", _writer(order, "d"), done["d"]),
    ]
    for j in jobs:  # each job's done file appears when its command ran
        j.cmd[-1] += f"; open({str(j.done)!r}, 'w')"
    _jobs.run_jobs(jobs, parallel=2, logdir=tmp_path / "logs")
    ran = order.read_text().split()
    assert sorted(ran) == ["a", "b", "c"] and ran[-1] == "c"  # d skipped; c after both a and b
    assert (tmp_path / "logs" / "c.log").is_file()


def test_a_failing_job_stops_the_run_naming_its_log(tmp_path):
    slow = _jobs.Job("slow", [sys.executable, "-c", "import time; time.sleep(30)"], tmp_path / "slow.done")
    bad = _jobs.Job("bad", [sys.executable, "-c", "raise SystemExit('broken input')"], tmp_path / "bad.done")
    t = time.time()
    with pytest.raises(SystemExit, match=r"(?s)\[bad\] failed \(exit 1\).*bad\.log.*broken input"):
        _jobs.run_jobs([slow, bad], parallel=2, logdir=tmp_path / "logs")
    assert time.time() - t < 20  # the slow one was ended, not waited for
    with pytest.raises(SystemExit, match="unknown jobs"):
        _jobs.run_jobs([_jobs.Job("x", ["true"], tmp_path / "x", ["nope"])], 1, tmp_path)


@pytest.mark.parametrize("script", ["pipeline.py", "study.py"])
def test_scripts_say_what_they_do(script):
    out = subprocess.run([sys.executable, str(EXAMPLES / script), "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "usage:" in out.stdout


def test_the_pipeline_runs_each_stage_after_what_it_reads():
    """examples/pipeline.py's jobs of one seed: stage 0 first; the stage-0 LAFS pre-training and the
    fine-tunings that read a teacher or the stage-0 landmark CNN wait for them and name their files;
    every start gets one few-shot fine-tuning, and --full adds one only for the starts it names."""
    import argparse

    import pipeline

    args = argparse.Namespace(stage0_epochs=10, pretrain_epochs=2, shots=5, fewshot_epochs=12, fewshot_batch=16)
    args.precision, args.full = "bf16", ["LAFS, stage-0 landmarks"]
    recs = {"train": Path("t/train.rec"), "heldout": Path("h/train.rec")}
    jobs = {j.name: j for j in pipeline.jobs_for_seed(args, 3, recs, Path("out"))}
    part_fvit = str(Path("out/seed3/stage0/part_fvit.pt"))
    assert next(iter(jobs)) == "s3_stage0" and jobs["s3_stage0"].needs == []
    assert jobs["s3_pre_lafs_s0"].needs == ["s3_stage0"] and part_fvit in jobs["s3_pre_lafs_s0"].cmd
    assert jobs["s3_pre_dino"].needs == [] and "dino" in jobs["s3_pre_dino"].cmd
    few = sorted(n for n in jobs if n.startswith("s3_ft_few_"))
    assert few == [f"s3_ft_few_{s}" for s in sorted(pipeline.SHORT.values())]
    assert [n for n in jobs if n.startswith("s3_ft_full_")] == ["s3_ft_full_lafs_s0"]
    ft = jobs["s3_ft_few_lafs_s0"]
    assert set(ft.needs) == {"s3_pre_lafs_s0", "s3_stage0"}
    assert ft.cmd[ft.cmd.index("--landmarks") + 1] == part_fvit
    assert ft.cmd[ft.cmd.index("--init") + 1] == str(Path("out/seed3/pretrain_lafs_s0/teacher.pt"))
    assert "shots=5,seed=3" in ft.cmd
    scratch = jobs["s3_ft_few_scratch"]
    assert "--init" not in scratch.cmd and scratch.cmd[scratch.cmd.index("--landmarks") + 1] == "grid"
    assert all("--seed" in j.cmd and j.cmd[j.cmd.index("--seed") + 1] == "3" for j in jobs.values())
