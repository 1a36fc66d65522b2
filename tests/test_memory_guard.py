"""The guard before a run that cannot fit (issue 24, item 5): the reference preset on a 24 GB CPU
machine is refused in one sentence, in seconds, before any model is built; --no-memory-check runs
it anyway; the estimate's parameter counts are the models'; a slow CPU step is said in one line."""

from __future__ import annotations

import logging
import time

import pytest
import torch

from lafs_fast.cli import main
from lafs_fast.config import load_config
from lafs_fast.train import memory_guard, pretrain, supervised_run
from lafs_fast.train.memory_guard import GB, check_memory, estimate
from tests import CPU, TINY_PRETRAIN


@pytest.fixture
def ram_24gb(monkeypatch):
    """A machine with 24 GB of RAM available, whatever this one has."""
    monkeypatch.setattr(memory_guard, "available_memory", lambda device: (24 * GB, "RAM available"))


@pytest.fixture
def no_model(monkeypatch):
    """Building a model (the work that takes minutes with the reference preset) fails the test."""

    def refuse(self):
        raise AssertionError("the run built its model before the memory guard refused it")

    monkeypatch.setattr(pretrain.PretrainJob, "setup", refuse)
    monkeypatch.setattr(supervised_run.SupervisedJob, "setup", refuse)


def _refused(capsys, *argv: str) -> str:
    start = time.perf_counter()
    assert main(list(argv)) == 2
    assert time.perf_counter() - start < 10
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_reference_pretraining_on_a_24gb_cpu_is_refused_in_one_sentence(tmp_path, capsys, ram_24gb, no_model):
    err = _refused(capsys, "pretrain", "--data", "synthetic:8x2", "--preset", "reference", "--device", "cpu",
                   "--out", str(tmp_path))  # fmt: skip
    assert err.startswith("lafs-fast pretrain: error: this run needs about ")
    need = float(err.split("needs about ")[1].split(" GB")[0])
    assert 25 < need < 60  # 64 M + 32 M parameters, batch 82 x 10 views x 12 blocks
    assert "24.0 GB is RAM available" in err and "--preset small" in err and "--batch-size (now 82)" in err
    assert "--no-memory-check" in err and not (tmp_path / "config.yaml").exists()


def test_reference_preset_with_real_data_is_refused(orl_dir, tmp_path, capsys, ram_24gb, no_model):
    """The issue's case: --data alone picks the reference preset."""
    err = _refused(capsys, "pretrain", "--data", str(orl_dir), "--device", "cpu", "--out", str(tmp_path))
    assert "needs about" in err and "24.0 GB is RAM available" in err


def test_reference_finetuning_is_refused_and_a_smaller_batch_fits(tmp_path, capsys, ram_24gb, no_model):
    argv = ["finetune", "--data", "synthetic:8x2", "--preset", "reference", "--device", "cpu", "--out", str(tmp_path)]
    err = _refused(capsys, *argv)
    assert "--batch-size (now 200)" in err
    with pytest.raises(AssertionError, match="built its model"):  # batch 32 fits: the run goes on to build
        main([*argv, "--batch-size", "32"])


def test_no_memory_check_runs_anyway(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(memory_guard, "available_memory", lambda device: (1024**2, "RAM available"))
    argv = ["pretrain", "--no-knn", "--no-progress", "--max-steps", "1", *TINY_PRETRAIN]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 2
    assert "but only 0.0 GB is RAM available" in capsys.readouterr().err
    assert main([*argv, "--out", str(tmp_path / "b"), "--no-memory-check"]) == 0
    assert (tmp_path / "b" / "teacher.pt").is_file()


def test_several_cpu_processes_share_the_ram(monkeypatch):
    cfg = load_config("small", None, CPU)
    one = estimate(cfg, "pretrain").total
    monkeypatch.setattr(memory_guard, "available_memory", lambda device: (int(1.5 * one), "RAM available"))
    check_memory(cfg, "pretrain", torch.device("cpu"), "fp32")
    with pytest.raises(ValueError, match=r"\(2 processes x"):
        check_memory(cfg, "pretrain", torch.device("cpu"), "fp32", processes=2)


@pytest.mark.parametrize("preset", ["small", "reference"])
def test_parameter_counts_are_the_models(preset):
    from lafs_fast.models import DINOHead, build_backbone, build_landmark_cnn

    cfg = load_config(preset)
    m, d = cfg.model, cfg.dino
    with torch.device("meta"):  # shapes only
        count = {
            "backbone": build_backbone(m),
            "head": DINOHead(m.dim, d.out_dim, d.hidden_dim, d.bottleneck_dim),
            "cnn": build_landmark_cnn(m),
        }
    count = {k: sum(p.numel() for p in v.parameters()) for k, v in count.items()}
    assert memory_guard.backbone_parameters(m) == count["backbone"]
    assert memory_guard.dino_head_parameters(m.dim, d) == count["head"]
    assert count["cnn"] == memory_guard.LANDMARK_CNN_PARAMS


def test_the_estimate_grows_with_batch_classes_and_precision():
    cfg = load_config("reference")
    base = estimate(cfg, "finetune", 100)
    assert estimate(cfg, "finetune", 200_000).total > base.total + 200_000 * 768 * 16 * 0.99
    fp32 = estimate(cfg, "pretrain").parts["activations"]
    assert estimate(cfg, "pretrain", precision="bf16").parts["activations"] * 2 == fp32  # bf16 activations
    cfg.optim.batch_size *= 2
    assert estimate(cfg, "finetune", 100).parts["activations"] == 2 * base.parts["activations"]


def test_a_slow_cpu_step_is_one_warning_line(monkeypatch, caplog):
    monkeypatch.setattr(memory_guard, "available_memory", lambda device: (10**15, "RAM available"))
    monkeypatch.setattr(memory_guard, "_cpu_matmul_flops", lambda: 50e9)
    cfg = load_config("reference")
    with caplog.at_level(logging.WARNING, logger="lafs_fast"):
        est = check_memory(cfg, "pretrain", torch.device("cpu"), "fp32")
        check_memory(load_config("small"), "pretrain", torch.device("cpu"), "fp32")  # seconds: no warning
    lines = [r.getMessage() for r in caplog.records]
    seconds = est.flops / (50e9 * memory_guard.CPU_EFFICIENCY)
    assert len(lines) == 1 and f"roughly {seconds:,.0f} s (a rough estimate" in lines[0], lines


def test_available_memory_reads_the_device(monkeypatch):
    free, what = memory_guard.available_memory(torch.device("cpu"))
    assert free > 0 and what.startswith("RAM")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (7 * GB, 80 * GB))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100")
    assert memory_guard.available_memory(torch.device("cuda", 0)) == (7 * GB, "free on NVIDIA H100")
    with pytest.raises(ValueError, match="but only 7.0 GB is free on NVIDIA H100"):
        check_memory(load_config("reference"), "pretrain", torch.device("cuda", 0), "bf16")
