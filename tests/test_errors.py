"""One sentence for every mistake: errors module, atomic writes that fail, refused checkpoints,
overrides around flags (issue 16 items 6, 8, 9)."""

from __future__ import annotations

import argparse
import os

import pytest
import torch

from lafs_fast.errors import parse_command_line, user_message
from lafs_fast.io import atomic_save, atomic_write_bytes, safe_load


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_a_refused_checkpoint_names_the_global_and_gives_no_advice_to_load_it(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"x": _Payload()}, path)
    with pytest.raises(ValueError) as e:
        safe_load(path)
    msg = str(e.value)
    assert "refusing to load" in msg and "posix.system" in msg and "weights_only=False" not in msg and "\n" not in msg


def test_a_full_disk_is_one_sentence_naming_the_target_and_leaves_no_temporary(tmp_path, monkeypatch):
    def full(obj, f):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4416 vs 4308")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(
        ValueError, match=r"cannot write .*ckpt-00000001.pt: the disk is full \(\d+ MB free on .*\); free space"
    ):
        atomic_save({"a": 1}, tmp_path / "ckpt-00000001.pt")
    assert list(tmp_path.iterdir()) == []


def test_names_near_the_limit_still_write_and_longer_ones_are_one_sentence(tmp_path):
    atomic_write_bytes(b"x", tmp_path / ("a" * 250 + ".pt"))  # the temporary name once added 14 characters to this
    with pytest.raises(ValueError, match=r"the name is too long for the file system \(260 bytes; at most 255\)"):
        atomic_write_bytes(b"x", tmp_path / ("b" * 257 + ".pt"))


def test_os_errors_read_as_sentences():
    assert user_message(FileExistsError(17, "File exists", "regfile")) == "regfile: file exists"
    assert user_message(ValueError("plain words\nsecond line")) == "plain words"


def test_overrides_may_stand_on_both_sides_of_a_flag():
    from lafs_fast.train import pretrain

    p = argparse.ArgumentParser()
    pretrain.add_arguments(p)
    args = parse_command_line(p, ["--out", "R", "a.b=1", "--max-steps", "2", "c.d=2"])
    assert args.overrides == ["a.b=1", "c.d=2"] and args.max_steps == 2 and args.out == "R"
    from lafs_fast.train import config_show

    top = argparse.ArgumentParser()
    config_show.add_arguments(top)
    args = parse_command_line(top, ["show", "pretrain", "model.dim=64", "--preset", "small", "optim.lr=0.1"])
    assert args.overrides == ["model.dim=64", "optim.lr=0.1"] and args.preset == "small"


@pytest.mark.parametrize(
    "argv, match",
    [
        (["eval", "m.pt", "x.bin", "--far", "2"], "argument --far: must be in (0, 1], got 2"),
        (["eval", "m.pt", "x.bin", "--nfolds", "0"], "argument --nfolds: must be >= 1, got 0"),
        (["eval", "m.pt", "x.bin", "--nfolds", "1"], "argument --nfolds: must be >= 2"),
        (["eval", "m.pt", "x.bin", "--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
    ],
)
def test_eval_refuses_values_that_make_no_sense(argv, match, capsys):
    from lafs_fast.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and match in capsys.readouterr().err


def test_embed_checks_its_output_before_any_work(tmp_path, capsys):
    """embed learnt that it could not write --out only after embedding everything."""
    from lafs_fast.cli import main

    (tmp_path / "faces").mkdir()
    (tmp_path / "regfile").write_text("x")
    assert (
        main(
            [
                "embed",
                str(tmp_path / "faces"),
                "--model",
                str(tmp_path / "absent.pt"),
                "--out",
                str(tmp_path / "regfile" / "e.npz"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "not writable" in err and "absent.pt" not in err  # refused before the model was even opened
    assert (
        main(
            ["embed", str(tmp_path / "faces"), "--model", str(tmp_path / "absent.pt"), "--out", str(tmp_path / "faces")]
        )
        == 2
    )
    assert "is a folder" in capsys.readouterr().err


def test_the_reference_ssl_checkpoint_globals_load_and_nothing_else(tmp_path):
    """lafs_train.py saves its argparse.Namespace and numpy float64 lr / weight decay (issue 26)."""
    import argparse
    import datetime

    import numpy as np

    ok = tmp_path / "checkpoint.pth"
    torch.save({"args": argparse.Namespace(lr=5e-4), "optimizer": {"param_groups": [{"lr": np.float64(1e-3)}]}}, ok)
    obj = safe_load(ok)
    assert obj["args"].lr == 5e-4 and obj["optimizer"]["param_groups"][0]["lr"] == np.float64(1e-3)
    for value, name in ((datetime.date(2024, 1, 1), "datetime.date"), (np.int64(3), "numpy.dtypes.Int64DType")):
        bad = tmp_path / "other.pth"
        torch.save({"x": value}, bad)
        with pytest.raises(ValueError) as e:
            safe_load(bad)
        msg = str(e.value)
        assert f"the Python global {name}," in msg and "GLOBAL" not in msg and "tampered" not in msg, msg
