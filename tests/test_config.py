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
    assert (c.dino.out_dim, c.dino.teacher_temp_start, c.dino.teacher_temp_end, c.dino.teacher_temp_epochs) == (
        100_000,
        0.07,
        0.04,
        30,
    )
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
        ("model.dim=-4", r"'model.dim' must be > 0, got -4"),
        ("model.attention=fast", "'model.attention' must be one of"),
        ("train.compile=maybe", "'train.compile' expects true/false"),
        ("model.dropout=1.5", r"'model.dropout' must be in \[0, 1\], got 1.5"),
        # values that make no sense (issue 16 item 7): each names its key and what it may be
        ("optim.lr=-1", r"'optim.lr' must be >= 0"),
        ("dino.teacher_momentum=2", r"'dino.teacher_momentum' must be in \[0, 1\]"),
        ("dino.center_momentum=5", r"'dino.center_momentum' must be in \[0, 1\]"),
        ("views.local_tokens=0", r"'views.local_tokens' must be > 0"),
        ("views.local_size=0", r"'views.local_size' must be > 0"),
        ("dino.teacher_temp_start=-0.07", r"'dino.teacher_temp_start' must be > 0"),
        ("dino.student_temp=0", r"'dino.student_temp' must be > 0"),
        ("train.keep_last=-1", r"'train.keep_last' must be >= 1"),
        ("train.max_steps=-5", r"'train.max_steps' must be >= 0"),
        ("train.seed=-1", r"'train.seed' must be >= 0"),
        ("optim.betas=2,2", r"'optim.betas' must be in \[0, 1\)"),
        ("views.n_global=0", r"'views.n_global' must be > 0"),
        ("views.n_local=-1", r"'views.n_local' must be >= 0"),
        ("views.hue=0.7", r"'views.hue' must be in \[0, 0.5\]"),
        # NaN compares False with both bounds (issue 25: it passed every range check and trained)
        ("optim.lr=nan", r"'optim.lr' must be >= 0, got nan"),
        ("model.dropout=nan", r"'model.dropout' must be in \[0, 1\], got nan"),
        ("views.flip_p=nan", r"'views.flip_p' must be in \[0, 1\], got nan"),
        ("dim=3", "must be 'section.key'"),
        ("model.dim", "must look like section.key=value"),
    ],
)
def test_rejections_name_the_key(override, match):
    with pytest.raises(ValueError, match=match):
        load_config("small", overrides=[override])


def test_cross_field_rejections():
    with pytest.raises(ValueError, match="at least 2 views"):
        load_config("small", overrides=["views.n_global=1", "views.n_local=0"])
    with pytest.raises(ValueError, match="'views.blur_radius_min'"):
        load_config("small", overrides=["views.blur_radius_min=3"])
    load_config("small", overrides=["views.n_global=1", "views.n_local=1"])  # two views: fine


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
    r = subprocess.run(
        [sys.executable, "-m", "lafs_fast.cli", "config", "show", "pretrain", "--preset", "small", "model.dim=200"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert yaml.safe_load(r.stdout)["model"]["dim"] == 200
    r = subprocess.run(
        [sys.executable, "-m", "lafs_fast.cli", "config", "show", "finetune", "model.dimm=2"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "unknown config key 'model.dimm'" in r.stderr and "Traceback" not in r.stderr
