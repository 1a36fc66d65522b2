"""benchmarks/data_scale.py runs (at 2,000 records; the real sizes are run by hand, docs/data_scale.md)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread


def _script():
    spec = importlib.util.spec_from_file_location("data_scale", ROOT / "benchmarks" / "data_scale.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_data_scale_script_runs_at_2000_records(tmp_path: Path) -> None:
    ds = _script()
    ds.make_folder(tmp_path / "n2000" / "folder", 2000)
    rows = [ds.run_tool(tool, tmp_path, 2000) for tool in ds.TOOLS]  # in this process: the tools themselves
    rows += [ds.run_tool("sidecar-write", tmp_path, 5000), ds.run_tool("sidecar-load", tmp_path, 5000)]
    rows.append(ds.measure("index", tmp_path, 2000))  # and once through the fresh-process path
    assert [r["tool"] for r in rows] == [*ds.TOOLS, "sidecar-write", "sidecar-load", "index"]
    assert all(r["seconds"] > 0 and r["rss_mb"] > 0 for r in rows)
    text = ds.table(rows, [2000])
    assert text.count("\n| ") >= len(ds.TOOLS) + 2 and "| sidecar-load | 5,000 |" in text
