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
