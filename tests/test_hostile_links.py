"""No file written through a link (issue 25 item 1): each probe plants a link where lafs-fast writes
(the run lock, the write probe, the run's files and ``tb/``, ``data build``'s temporaries, a default
``--out``) pointing at a victim file or folder, and asserts the victim is untouched and any refusal
is one sentence. A shared cluster's scratch folder is where such a link gets planted."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest

from lafs_fast.data.recordio import RecordIOError, RecordIOReader, finish_swap
from lafs_fast.data.recordio_writer import write_identity_dataset
from lafs_fast.io import _umask, check_writable_dir
from lafs_fast.launch import DistInfo
from lafs_fast.train import pretrain
from lafs_fast.train.engine import Engine
from lafs_fast.train.run_folder import LOCK_NAME, RunLock, run_files
from tests import one_sentence
from tests.test_engine import Regression, TensorLoader, _cfg, _engine

SECRET = b"the victim's own bytes\n"


def victim_file(tmp_path: Path) -> Path:
    v = tmp_path / "victim.txt"
    v.write_bytes(SECRET)
    return v


def victim_folder(tmp_path: Path) -> Path:
    v = tmp_path / "victim"
    v.mkdir()
    (v / "keep.txt").write_bytes(SECRET)
    return v


def assert_untouched(victim: Path) -> None:
    if victim.is_dir():
        assert sorted(p.name for p in victim.iterdir()) == ["keep.txt"]
        assert (victim / "keep.txt").read_bytes() == SECRET
    else:
        assert victim.read_bytes() == SECRET


@pytest.mark.parametrize("link", ["symlink", "hardlink"])
def test_a_run_lock_that_is_a_link_is_refused(tmp_path: Path, link: str) -> None:
    """It received "pid N, since ..." (the victim truncated and overwritten)."""
    victim, out = victim_file(tmp_path), tmp_path / "run"
    out.mkdir()
    (os.symlink if link == "symlink" else os.link)(victim, out / LOCK_NAME)
    with pytest.raises(FileExistsError, match=rf"the run lock .*{LOCK_NAME} is a .*delete it and run again") as exc:
        _engine(_cfg(out, "train.max_steps=1"))
    assert one_sentence(str(exc.value))
    assert_untouched(victim)
    assert run_files(out) == []  # nothing written either


def test_a_dangling_lock_link_creates_nothing(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    os.symlink(tmp_path / "made-by-us", out / LOCK_NAME)
    with pytest.raises(FileExistsError, match="symbolic link"):
        RunLock(out)
    assert not (tmp_path / "made-by-us").exists()


def test_the_write_probe_never_opens_a_planted_name(tmp_path: Path) -> None:
    """A fixed ``.write-test`` planted as a link was truncated to 0 bytes."""
    victim, out = victim_file(tmp_path), tmp_path / "out"
    out.mkdir()
    os.symlink(victim, out / ".write-test")
    assert check_writable_dir(out) == out
    assert_untouched(victim)
    assert sorted(p.name for p in out.iterdir()) == [".write-test"]  # the probe left nothing of its own


@pytest.mark.parametrize("folder", ["tb", "wandb"])
def test_overwrite_with_a_run_folder_a_link_checks_before_it_deletes(tmp_path: Path, folder: str) -> None:
    """``--overwrite`` failed in rmtree on ``tb`` (or ``wandb``) after the old run's files were already
    deleted."""
    out = tmp_path / "run"
    _engine(_cfg(out, "train.max_steps=2")).fit()
    victim = victim_folder(tmp_path)
    if (out / folder).is_dir():
        import shutil

        shutil.rmtree(out / folder)
    os.symlink(victim, out / folder)
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(
        FileExistsError, match=rf"run/{folder} is a symbolic link \(to .*victim\).*delete the link"
    ) as exc:
        Engine(_cfg(out, "train.max_steps=2"), Regression(), TensorLoader(24, 4), DistInfo(), out, overwrite=True)
    assert one_sentence(str(exc.value))
    assert sorted(p.name for p in out.iterdir()) == before  # nothing of the old run deleted
    assert_untouched(victim)


@pytest.mark.parametrize("name", ["metrics.jsonl", "train.log"])
def test_resume_refuses_a_run_file_that_is_a_link(tmp_path: Path, name: str) -> None:
    """``--resume`` appended the run's records and log lines to wherever the link pointed."""
    out = tmp_path / "run"
    _engine(_cfg(out, "train.max_steps=2")).fit()
    victim = victim_file(tmp_path)
    (out / name).unlink(missing_ok=True)
    os.symlink(victim, out / name)
    with pytest.raises(FileExistsError, match=rf"{name} is a symbolic link") as exc:
        _engine(_cfg(out, "train.max_steps=3"), resume="auto")
    assert one_sentence(str(exc.value))
    assert_untouched(victim)


def test_data_build_temporaries_are_not_guessable(tmp_path: Path) -> None:
    """``train.rec.tmp<pid>`` planted as a link received the rec; now every temporary is made by
    mkstemp (O_EXCL | O_NOFOLLOW), the planted links are deleted as a killed build's leftovers (the
    link, never its target), and the files get the usual mode."""
    victim, out = victim_file(tmp_path), tmp_path / "ds"
    out.mkdir()
    planted = [
        f"{n}.tmp{os.getpid()}" for n in ("train.rec", "train.idx", "property", "lafs_fast.json", "train.rec.swap")
    ]
    for n in planted:
        os.symlink(victim, out / n)
    write_identity_dataset(out, [[b"a" * 40, b"b" * 40], [b"c" * 40]], height=112, width=112)
    assert_untouched(victim)
    assert sorted(p.name for p in out.iterdir()) == sorted(["train.rec", "train.idx", "property", "lafs_fast.json"])
    assert (out / "train.rec").stat().st_mode & 0o777 == 0o666 & ~_umask()
    with RecordIOReader(out) as r:
        assert r.num_images == 3 and r.num_classes == 2


def test_a_planted_swap_marker_renames_nothing(tmp_path: Path) -> None:
    """The swap marker's renames are done by every reader: a planted one could move any file into
    the dataset's place (or out of the folder)."""
    victim, out = victim_file(tmp_path), tmp_path / "ds"
    write_identity_dataset(out, [[b"a" * 40]], height=112, width=112)
    for line in ("../victim.txt\ttrain.rec", "train.rec.tmp1\t../victim.txt", "x\ty\tz"):
        (out / "train.rec.swap").write_text(line + "\n")
        with pytest.raises(RecordIOError, match="lists renames no `lafs-fast data build` makes") as exc:
            finish_swap(out / "train.rec")
        assert one_sentence(str(exc.value))
        assert_untouched(victim)


def test_a_default_out_that_is_a_link_is_refused_unless_named(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    parser = argparse.ArgumentParser()
    pretrain.add_arguments(parser)
    default = Path(pretrain.resolve_config(parser.parse_args([])).train.out_dir)
    victim = victim_folder(tmp_path)
    default.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(victim, default)
    with pytest.raises(FileExistsError, match=rf"the default output folder {default} is a symbolic link") as exc:
        pretrain.resolve_config(parser.parse_args([]))
    assert one_sentence(str(exc.value)) and f"pass --out {default}" in str(exc.value)
    for named in (["--out", str(default)], [f"train.out_dir={default}"]):  # the user named the link: theirs
        assert pretrain.resolve_config(parser.parse_args(named)).train.out_dir == str(default)
    assert_untouched(victim)
