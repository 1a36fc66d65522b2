"""The staged GPU runner (benchmarks/gpu_run.sh) and its renderer, checked on the CPU so that they
cannot rot between GPU runs: the dry run end to end, and render.py's merge / save / tables."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from benchmarks import render

ROOT = Path(__file__).resolve().parents[1]
STAGES = [
    "env",
    "pre_eager",
    "pre_compiled",
    "finetune",
    "reference",
    "parity",
    "kernels",
    "attention",
    "smoke_pretrain",
    "smoke_resume",
    "smoke_landmarks",
    "smoke_finetune",
    "smoke_eval",
]
BENCH_STAGES = ["pre_eager", "pre_compiled", "finetune", "reference", "kernels", "attention"]


def _bench(name: str, group: str, median: float, mean: float, items: int = 1, role: str = "", **extra) -> dict:
    info = dict(items=items, **extra)
    if role:
        info["role"] = role
    return {"name": name, "group": group, "extra_info": info, "stats": {"median": median, "mean": mean}}


def test_render_uses_medians_and_compares_throughput():
    """Medians, not means (a compile inside one round moves the mean); the speed-up is a ratio of
    throughputs, so a reference timed on a smaller batch compares per item."""
    data = {
        "benchmarks": [
            _bench("test_ref", "g", median=0.100, mean=0.900, items=32, role="reference"),
            _bench("test_fast", "g", median=0.010, mean=0.011, items=256),
        ]
    }
    table = render.render(data)
    assert "| ref | 100.00 | 320 | 1.0x |" in table
    assert "| fast | 10.00 | 25,600 | 80.0x |" in table


def _out_dir(path: Path, stages: list[dict], benchmarks: list[dict], env: dict | None = None) -> Path:
    path.mkdir(parents=True)
    (path / "results.jsonl").write_text("".join(json.dumps(s) + "\n" for s in stages))
    (path / "bench.json").write_text(json.dumps({"datetime": "2026-11-30T12:00:00", "benchmarks": benchmarks}))
    if env is not None:
        (path / "env.json").write_text(json.dumps(env))
    return path


def test_render_names_failed_timed_out_and_skipped_stages(tmp_path):
    out = _out_dir(
        tmp_path / "out",
        [
            {"stage": "env", "rc": 0, "seconds": 9},
            {"stage": "kernels", "rc": 124, "seconds": 150, "status": "timed out"},
            {"stage": "pre_ref", "rc": 1, "seconds": 20},
            {"stage": "finetune", "rc": None, "seconds": 0, "skipped": "40s left of BUDGET_S=420, stage needs 90s"},
        ],
        [dict(_bench("test_copy", "device ceilings", 0.001, 0.001), extra_info={"stage": "kernels", "GBps": 4300.0})],
    )
    table = render.render(render.load(out))
    assert "| kernels | timed out after 150 s | 150 | 1 |" in table
    assert "| pre_ref | failed (rc 1) |" in table
    assert "| finetune | skipped: 40s left of BUDGET_S=420, stage needs 90s |" in table
    assert "4,300 GB/s" in table


def test_save_records_device_versions_and_command_and_never_overwrites(tmp_path):
    env = {
        "date": "2026-11-30T12:00:00+00:00",
        "command": "BUDGET_S=420 bash benchmarks/gpu_run.sh",
        "device": "NVIDIA H200",
        "driver": "580.159.03",
        "versions": {"torch": "2.11.0+cu130", "triton": "3.6.0", "xformers": "0.0.35"},
        "lafs_fast_info": {"devices": ["NVIDIA H200"]},
    }
    first = _out_dir(tmp_path / "a", [{"stage": "env", "rc": 0}], [_bench("test_a", "g", 1.0, 1.0)], env)
    second = _out_dir(tmp_path / "b", [{"stage": "finetune", "rc": 0}], [_bench("test_b", "g", 1.0, 1.0)], env)
    dest = render.save([first, second], tmp_path / "results")
    assert dest.name == "2026-11-30-nvidia-h200.json"
    saved = json.loads(dest.read_text())
    rec = saved["record"]
    assert (rec["device"], rec["driver"], rec["torch"], rec["triton"], rec["xformers"]) == (
        "NVIDIA H200",
        "580.159.03",
        "2.11.0+cu130",
        "3.6.0",
        "0.0.35",
    )
    assert rec["command"] == env["command"] and rec["date"].startswith("2026-11-30")
    assert [s["stage"] for s in saved["stages"]] == ["env", "finetune"] and [s["call"] for s in saved["stages"]] == [
        1,
        2,
    ]
    assert [b["name"] for b in saved["benchmarks"]] == ["test_a", "test_b"]
    assert render.save([first], tmp_path / "results").name == "2026-11-30-nvidia-h200-2.json"


def test_merge_tags_stages_and_survives_a_torn_json(tmp_path):
    stage_dir = tmp_path / "stages"
    stage_dir.mkdir()
    (stage_dir / "kernels.json").write_text(json.dumps({"benchmarks": [_bench("test_a", "g", 1.0, 1.0)]}))
    (stage_dir / "pre_ref.json").write_text('{"benchmarks": [')  # a session killed while writing
    out = tmp_path / "bench.json"
    assert render.merge(stage_dir, out) == 1
    assert json.loads(out.read_text())["benchmarks"][0]["extra_info"]["stage"] == "kernels"


def test_an_interrupted_session_keeps_the_cases_it_timed():
    """A stage timeout interrupts pytest inside a timed case: that case has no rounds, and
    pytest-benchmark would fail to write any JSON (min() of nothing) unless it is dropped first."""
    from benchmarks import conftest as bench_conftest

    class Case:  # pytest-benchmark's Metadata is falsy when it holds no round
        def __init__(self, rounds: int) -> None:
            self.rounds = rounds

        def __bool__(self) -> bool:
            return self.rounds > 0

    timed, cut = Case(3), Case(0)
    session = SimpleNamespace(config=SimpleNamespace(_benchmarksession=SimpleNamespace(benchmarks=[timed, cut])))
    hook = bench_conftest.pytest_sessionfinish(session, 2)
    next(hook)
    assert session.config._benchmarksession.benchmarks == [timed]


def test_cases_jsonl_is_the_fallback_without_the_private_attribute(tmp_path):
    """A pytest-benchmark without ``config._benchmarksession`` (private): the session hook does
    nothing, and the per-case JSONL (public fixture fields, written as each case ends) is what
    render.merge reads for a stage whose JSON is missing, torn or empty."""
    from benchmarks import conftest as bench_conftest

    session = SimpleNamespace(config=SimpleNamespace())  # no _benchmarksession
    hook = bench_conftest.pytest_sessionfinish(session, 2)
    next(hook)
    stats = SimpleNamespace(min=0.9, max=1.2, mean=1.0, median=1.0, stddev=0.1, iqr=0.1, rounds=3)
    fixture = SimpleNamespace(stats=SimpleNamespace(stats=stats), group="g", extra_info={"items": 8})
    item = SimpleNamespace(name="test_step_gpu[eager]", nodeid="b.py::test_step_gpu[eager]")
    row = bench_conftest.case_record(item, fixture)
    assert row["stats"]["median"] == 1.0 and row["extra_info"] == {"items": 8} and row["group"] == "g"
    assert bench_conftest.case_record(item, SimpleNamespace(stats=None)) is None  # cut: no round
    stage_dir = tmp_path / "stages"
    stage_dir.mkdir()
    (stage_dir / "pre_eager.cases.jsonl").write_text(json.dumps(row) + "\n" + '{"name": "torn')
    (stage_dir / "finetune.json").write_text('{"benchmarks": [')  # torn JSON, no JSONL: nothing
    (stage_dir / "kernels.json").write_text(json.dumps({"benchmarks": [_bench("test_a", "g", 1.0, 1.0)]}))
    (stage_dir / "kernels.cases.jsonl").write_text(json.dumps(row) + "\n")  # the JSON wins
    out = tmp_path / "bench.json"
    assert render.merge(stage_dir, out) == 2
    got = {b["extra_info"]["stage"]: b["name"] for b in json.loads(out.read_text())["benchmarks"]}
    assert got == {"kernels": "test_a", "pre_eager": "test_step_gpu[eager]"}


def test_commit_is_taken_from_the_caller(monkeypatch):
    """The device copy of the tree has no .git: gpu_run.sh's COMMIT (or first argument) reaches the record."""
    from benchmarks import gpu_env

    monkeypatch.setenv("LAFS_COMMIT", "0123abcd" * 5)
    assert gpu_env.commit() == "0123abcd" * 5
    env = {"git_commit": gpu_env.commit(), "device": "NVIDIA H100 80GB HBM3"}
    assert render._record(env, {}, "", "")["commit"] == "0123abcd" * 5


def test_sampler_bytes_count_only_the_pixels_read():
    """Sparse views read the 9 x 9 footprints of their 36 patches, not the whole view; dense views' 196
    footprints cover it."""
    from benchmarks.perf_model import view_read_px

    assert view_read_px(36) == 36 * 81 == 2916 and view_read_px(196) == 112 * 112


def test_runner_is_made_for_one_call():
    """The headline steps before the checks; the budget fits one call of 590 s."""
    text = (ROOT / "benchmarks" / "gpu_run.sh").read_text()
    order = text.split('ALL="', 1)[1].split('"', 1)[0].split()
    assert order == ["env", "pre_eager", "pre_compiled", "finetune", "reference", "parity", "kernels"] + [
        "attention",
        "smoke",
    ]
    assert 'BUDGET_S="${BUDGET_S:-540}"' in text
    assert "timeout_s=590" in (ROOT / "docs" / "gpu.md").read_text()


@pytest.mark.slow
def test_gpu_run_dry_run(tmp_path):
    """Every stage's plumbing on the CPU at toy sizes: one results line per stage with rc 0 (or a
    named skip), >= 1 benchmark merged per benchmark stage, at most 6 files under $OUT."""
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("STAGES", "BUDGET_S", "XF_STAGES")}
    env.update(OUT=str(out), LAFS_GPU_DRY_RUN="1", PYTHON=sys.executable, BUDGET_S="1200")
    p = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_run.sh")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1300,
    )
    log = (out / "run.log").read_text() if (out / "run.log").is_file() else p.stdout + p.stderr
    lines = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert [x["stage"] for x in lines] == STAGES, log[-3000:]
    bad = [x for x in lines if not (x["rc"] == 0 or x.get("skipped"))]
    assert not bad, f"{bad}\n{log[-6000:]}"
    merged = json.loads((out / "bench.json").read_text())["benchmarks"]
    per_stage = {s: sum(b["extra_info"].get("stage") == s for b in merged) for s in BENCH_STAGES}
    assert all(n >= 1 for n in per_stage.values()), per_stage
    files = [f for f in out.rglob("*") if f.is_file()]
    assert len(files) <= 6, files
    assert "Dry run on the CPU" in (out / "table.md").read_text()


def test_render_puts_predicted_beside_measured():
    b = _bench("test_pretrain_step_fast_gpu[compiled]", "g", median=0.1, mean=0.1, items=82)
    b["extra_info"].update(predicted_per_s=1000.0, measured_over_predicted=0.82)
    table = render.render({"benchmarks": [b]})
    assert "| pretrain_step_fast_gpu[compiled] | 1,000 | 820 | 82% |" in table
    assert "predicted 1,000/s (measured 82% of it)" in table


def test_step_speed_up_is_against_the_worker_pipeline_and_the_in_step_strawman():
    """Issue 21: the training steps' 1.0x is the reference as it runs (augmentation in DataLoader
    workers, role "reference"); the in-step strawman gets its own column."""
    data = {
        "benchmarks": [
            _bench("test_step_reference_style_gpu", "g", median=1.0, mean=1.0, items=82, role="reference-in-step"),
            _bench("test_step_reference_pipeline_gpu", "g", median=0.25, mean=0.25, items=82, role="reference"),
            _bench("test_step_fast_gpu[compiled]", "g", median=0.1, mean=0.1, items=82),
        ]
    }
    table = render.render(data)
    assert "| case | median (ms) | throughput (/s) | vs reference | vs in-step reference | figures |" in table
    assert "| step_fast_gpu[compiled] | 100.00 | 820 | 2.5x | 10.0x |" in table
    assert "| step_reference_pipeline_gpu | 250.00 | 328 | 1.0x | 4.0x |" in table
