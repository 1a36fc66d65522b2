"""Configs: presets, YAML, overrides, and rejections that name the key."""

import subprocess
import sys

import pytest
import yaml

from lafs_fast.config import Config, config_from_dict, config_to_dict, load_config


def test_reference_preset_has_spec_values():
    c = load_config("reference")
    assert (c.model.dim, c.model.depth, c.model.heads, c.model.head_dim, c.model.mlp_dim) == (768, 12, 11, 64, 2048)
    assert c.model.attn_scale == "dim" and c.model.drop_path == 0.1 and c.model.token_init_std == 1.0
    assert (c.dino.out_dim, c.dino.teacher_temp_start, c.dino.teacher_temp_end, c.dino.teacher_temp_epochs) == (100_000, 0.07, 0.04, 30)
    assert (c.optim.epochs, c.optim.batch_size, c.optim.lr, c.optim.clip_grad) == (41, 82, 5e-4, 3.0)
    assert (c.views.n_global, c.views.n_local, c.views.local_tokens, c.views.perturb_sigma) == (2, 8, 36, 5.0)


def test_small_preset_and_overrides():
    c = load_config("small", overrides=["model.dim=256", "optim.betas=0.8,0.9", "train.compile=false"])
    assert c.model.dim == 256 and c.model.depth == 4
    assert c.optim.betas == (0.8, 0.9) and c.train.compile is False


def test_yaml_then_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"model": {"dim": 320, "depth": 2}, "optim": {"lr": 1e-3}}))
    c = load_config("small", p, ["model.depth=3"])
    assert (c.model.dim, c.model.depth, c.optim.lr) == (320, 3, 1e-3)


def test_round_trip_dict():
    c = load_config("small")
    assert config_from_dict(config_to_dict(c)) == c
    assert isinstance(Config(), Config)


@pytest.mark.parametrize(
    "override, match",
    [
        ("model.nope=1", "unknown config key 'model.nope'"),
        ("zzz.dim=1", "unknown config section 'zzz'"),
        ("model.dim=3.5", "'model.dim' expects an integer"),
        ("model.dim=-4", "'model.dim' must be positive"),
        ("model.attention=fast", "'model.attention' must be one of"),
        ("train.compile=maybe", "'train.compile' expects true/false"),
        ("model.dropout=1.5", "'model.dropout' is a probability"),
        ("dim=3", "must be 'section.key'"),
        ("model.dim", "must look like section.key=value"),
    ],
)
def test_rejections_name_the_key(override, match):
    with pytest.raises(ValueError, match=match):
        load_config("small", overrides=[override])


def test_bad_yaml_and_preset(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model: [1, 2]\n")
    with pytest.raises(ValueError, match="section 'model' must be a mapping"):
        load_config("small", p)
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        load_config("huge")
    with pytest.raises(FileNotFoundError):
        load_config("small", tmp_path / "absent.yaml")


def test_config_show_cli():
    r = subprocess.run([sys.executable, "-m", "lafs_fast.cli", "config", "show", "--preset", "small", "model.dim=200"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert yaml.safe_load(r.stdout)["model"]["dim"] == 200
    r = subprocess.run([sys.executable, "-m", "lafs_fast.cli", "config", "show", "model.dimm=2"], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown config key 'model.dimm'" in r.stderr and "Traceback" not in r.stderr
