"""`lafs-fast config show STAGE ...` prints exactly the config.yaml that `lafs-fast STAGE ...` writes
(issue 24, item 4): for every stage and preset the config the command hands its worker, and one real
run's config.yaml, equal what `config show` printed; `--help-keys` lists every key."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from lafs_fast.cli import main
from lafs_fast.config import Config, config_from_dict, config_yaml
from lafs_fast.train import cli_common, pretrain
from tests import CPU, TINY_PRETRAIN

STAGES = ("pretrain", "finetune", "train-landmarks")


def _show(capsys, *argv: str) -> str:
    capsys.readouterr()
    assert main(["config", "show", *argv]) == 0
    return capsys.readouterr().out


def _handed_to_worker(monkeypatch, capsys, stage: str, *argv: str) -> str:
    """The config.yaml text of the config ``lafs-fast STAGE argv`` hands its worker (the launch is
    caught: the worker turns this dict back into the Config its engine writes)."""
    seen = {}

    def caught(prog, worker, worker_args, cfg, *a, **kw):
        seen["cfg"] = worker_args[0]
        return 0

    monkeypatch.setattr(pretrain, "launch_training", caught)
    monkeypatch.setattr(cli_common, "launch_training", caught)
    capsys.readouterr()
    assert main([stage, *argv]) == 0
    return config_yaml(config_from_dict(seen["cfg"]))


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize(
    "argv",
    [
        ["--preset", "small"],
        ["--preset", "reference"],
        [],  # the default preset: small on the built-in faces
        ["--data", "synthetic:6x2", "--preset", "reference", "--batch-size", "5", "optim.lr=0.01", "--epochs", "3"],
    ],
    ids=["small", "reference", "default", "flags"],
)
def test_config_show_is_what_the_stage_runs_with(stage, argv, tmp_path, monkeypatch, capsys):
    argv = [*argv, "--out", str(tmp_path / "run")]
    shown = _show(capsys, stage, *argv)
    assert shown == _handed_to_worker(monkeypatch, capsys, stage, *argv)
    # and the stage's own defaults are in it (the plain preset is not what any stage runs)
    plain = yaml.safe_dump(dataclasses.asdict(Config()), sort_keys=False)
    assert shown != plain


def test_config_show_small_has_the_stage_defaults(capsys):
    """The values issue 24 found missing from `config show --preset small`."""
    pre = yaml.safe_load(_show(capsys, "pretrain", "--preset", "small"))
    assert pre["dino"]["centering"] == "sinkhorn" and pre["dino"]["koleo_weight"] == 1.0
    assert pre["model"]["dropout"] == 0.0 and pre["optim"]["batch_size"] == 16 and pre["dino"]["out_dim"] == 256
    fine = yaml.safe_load(_show(capsys, "finetune", "--preset", "small", "--head", "arcface"))
    assert fine["finetune"]["head"] == "arcface" and fine["finetune"]["margin"] == 0.5
    assert fine["optim"]["lr"] == 0.004 and fine["optim"]["weight_decay"] == 0.1


def test_a_real_run_writes_what_config_show_printed(tmp_path, capsys):
    """One real run of each kind; fine-tuning from its teacher takes the teacher's architecture, not the
    preset's, and `config show` with the same --init says so."""
    pre = tmp_path / "pre"
    argv = ["--out", str(pre), "--no-knn", "--no-progress", "--max-steps", "1", *TINY_PRETRAIN]
    shown = _show(capsys, "pretrain", *argv)
    assert main(["pretrain", *argv]) == 0
    assert (pre / "config.yaml").read_text() == shown
    fine = tmp_path / "fine"
    argv = ["--init", str(pre / "teacher.pt"), "--preset", "small", "--out", str(fine), "--no-check", "--no-progress"]
    argv += ["--max-steps", "1", "--batch-size", "2", "--data", "synthetic:3x2", *CPU]
    shown = _show(capsys, "finetune", *argv)
    assert yaml.safe_load(shown)["model"]["dim"] == 32  # the teacher's, not the small preset's 192
    assert main(["finetune", *argv]) == 0
    assert (fine / "config.yaml").read_text() == shown


def test_config_show_without_a_stage_says_the_form(capsys):
    with pytest.raises(SystemExit) as e:
        main(["config", "show", "--preset", "small", "model.dim=200"])  # the old form
    err = capsys.readouterr().err
    assert e.value.code == 2 and "config show pretrain|finetune|train-landmarks" in err
    assert main(["config", "show"]) == 2
    assert "needs the stage" in capsys.readouterr().err
    assert main(["config", "show", "pretrain", "model.dimm=2"]) == 2
    assert "unknown config key 'model.dimm'" in capsys.readouterr().err


def test_help_keys_lists_every_key_with_its_help_default_and_range(capsys):
    text = _show(capsys, "--help-keys")
    cfg = Config()
    for section in (f.name for f in dataclasses.fields(cfg)):
        for f in dataclasses.fields(getattr(cfg, section)):
            assert f"  {section}.{f.name}  (" in text, f"{section}.{f.name}"
    assert "  model.dropout  (float, default 0.1, range in [0, 1])  dropout in attention output and MLP\n" in text
    assert "  finetune.head  (str, default 'cosface', one of cosface/arcface/softmax)  margin head" in text


def test_every_key_and_section_has_a_help_text(capsys):
    """A key added without a help text (or a section without its own docstring, which --help-keys
    would print as the dataclass's generated signature) fails here, not silently in the listing."""
    cfg = Config()
    bare = []
    for section in dataclasses.fields(cfg):
        cls = type(getattr(cfg, section.name))
        if not cls.__doc__ or cls.__doc__.startswith(f"{cls.__name__}("):
            bare.append(section.name)
        bare += [f"{section.name}.{f.name}" for f in dataclasses.fields(cls) if not f.metadata.get("help", "").strip()]
    assert bare == [], f"config keys / sections without a help text: {', '.join(bare)}"
    # and the listing shows it: every key line goes on past its facts, "  key  (facts)  help"
    lines = [ln for ln in _show(capsys, "--help-keys").splitlines() if ln.startswith("  ")]
    assert len(lines) == sum(len(dataclasses.fields(getattr(cfg, s.name))) for s in dataclasses.fields(cfg))
    assert [ln for ln in lines if ")  " not in ln] == []
