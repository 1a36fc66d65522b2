"""The training engine: schedules, optimiser groups, clipping, accumulation, checkpoints, resume, NaN."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from lafs_fast.config import load_config
from lafs_fast.data.base import Loader
from lafs_fast.launch import DistInfo
from lafs_fast.train.checkpointing import list_checkpoints, load_checkpoint
from lafs_fast.train.engine import (
    Engine,
    NonFiniteLoss,
    Stage,
    clip_gradients,
    cosine_schedule,
    linear_then_constant,
    param_groups,
)


class TensorLoader(Loader):
    """A tiny deterministic dataset of (x (B, 4), y (B,)) with the real Loader's epochs and position."""

    backend = "tensors"

    def __init__(self, n: int, batch_size: int) -> None:
        super().__init__(
            n, batch_size, rank=0, world_size=1, shuffle=True, seed=3, device="cpu", drop_last=True, num_classes=1
        )
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 4, generator=g)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1 * torch.randn(n, generator=g)

    def _fetch(self, positions):
        idx = torch.as_tensor(np.asarray(positions))
        return (
            self.x[idx],
            self.y[idx],
            np.asarray(positions),
        )  # (images, labels, kept positions): Loader's _fetch contract


class Regression(Stage):
    """A toy stage: dropout MLP regression (so the torch RNG matters) with a moving-average buffer."""

    name = "toy"

    def __init__(self, nan_at: int | None = None) -> None:
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.3), nn.ReLU(), nn.Linear(16, 1))
        self.avg = torch.zeros(())
        self.nan_at = nan_at

    def schedules(self, plan):
        return {"momentum": cosine_schedule(0.9, 1.0, plan.epochs, plan.steps_per_epoch)}

    def forward_loss(self, model, batch, ctx):
        x, y = batch
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(ctx.seed)) * 0.01  # data-path randomness
        loss = ((model(x + noise).squeeze(1) - y) ** 2).mean()
        if self.nan_at is not None and ctx.step == self.nan_at:
            loss = loss * float("nan")
        return loss, {"pred_mean": 0.0}

    def after_optimizer_step(self, model, ctx):
        m = ctx.values["momentum"]
        self.avg = m * self.avg + (1 - m) * self.model[0].weight.detach().mean()

    def state_dict(self):
        return {"avg": self.avg.clone()}

    def load_state_dict(self, state):
        self.avg = state["avg"].clone()


def _cfg(tmp_path, *extra):
    return load_config(
        "small",
        None,
        [
            "optim.epochs=3",
            "optim.batch_size=4",
            "optim.warmup_epochs=1",
            "optim.lr=0.05",
            "train.log_every=1",
            f"train.out_dir={tmp_path}",
            "optim.clip_grad=1.0",
            *extra,
        ],
    )


def _engine(cfg, stage=None, resume=None):
    return Engine(
        cfg,
        stage or Regression(),
        TensorLoader(24, cfg.optim.batch_size),
        DistInfo(),
        cfg.train.out_dir,
        resume=resume,
        progress=False,
    )


def test_cosine_schedule_matches_dino_formula():
    s = cosine_schedule(1.0, 0.1, epochs=4, steps_per_epoch=5, warmup_epochs=1, start_warmup_value=0.0)
    assert s.shape == (20,)
    np.testing.assert_allclose(s[:5], np.linspace(0, 1.0, 5))
    it = np.arange(15)
    np.testing.assert_allclose(s[5:], 0.1 + 0.45 * (1 + np.cos(np.pi * it / 15)))
    m = cosine_schedule(0.996, 1.0, 3, 7)
    assert m[0] == pytest.approx(0.996) and m[-1] < 1.0 and np.all(np.diff(m) >= 0)


def test_teacher_temperature_both_directions():
    down = linear_then_constant(0.07, 0.04, ramp_epochs=3, epochs=5, steps_per_epoch=2)
    np.testing.assert_allclose(down, np.repeat([0.07, 0.055, 0.04, 0.04, 0.04], 2))
    up = linear_then_constant(0.04, 0.07, ramp_epochs=3, epochs=5, steps_per_epoch=2)
    np.testing.assert_allclose(up, np.repeat([0.04, 0.055, 0.07, 0.07, 0.07], 2))


def test_param_groups_no_decay_on_bias_and_1d():
    m = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    groups = param_groups(m)
    decay = {id(p) for p in groups[0]["params"]}
    assert decay == {id(m[0].weight)} and groups[0]["wd_mult"] == 1.0
    assert {id(p) for p in groups[1]["params"]} == {id(m[0].bias), id(m[1].weight), id(m[1].bias)} and groups[1][
        "wd_mult"
    ] == 0.0


def test_per_parameter_clipping(gen):
    a, b = nn.Parameter(torch.zeros(5)), nn.Parameter(torch.zeros(3))
    a.grad = torch.randn(5, generator=gen) * 10
    b.grad = torch.full((3,), 0.01)
    ga, gb = a.grad.clone(), b.grad.clone()
    clip_gradients([a, b], 3.0)
    torch.testing.assert_close(a.grad, ga * (3.0 / (ga.norm() + 1e-6)))
    assert torch.equal(b.grad, gb)  # under the threshold: untouched


def _clip_per_parameter(params, clip):
    """The engine's clipping before issue 21: the factor of each parameter as its own small kernels."""
    grads = [p.grad for p in params if p.grad is not None]
    norms = torch._foreach_norm(grads, 2.0)
    torch._foreach_mul_(grads, [torch.clamp(clip / (n + 1e-6), max=1.0) for n in norms])
    return torch.stack(norms)


def test_multi_tensor_clipping_is_bitwise_the_per_parameter_loop(gen):
    """Issue 21: the factors as one vector give the same bits as one per parameter (fp32 and bf16
    grads, some above the threshold, some under, an empty list entry skipped)."""
    shapes = [(7, 5), (5,), (3, 4, 2), (1,), (64,)]
    for dtype in (torch.float32, torch.bfloat16):
        ps, qs = [], []
        for i, shape in enumerate(shapes):
            g = (torch.randn(shape, generator=gen) * (10.0 if i % 2 else 0.1)).to(dtype)
            p, q = nn.Parameter(torch.zeros(shape, dtype=dtype)), nn.Parameter(torch.zeros(shape, dtype=dtype))
            p.grad, q.grad = g.clone(), g.clone()
            ps.append(p), qs.append(q)
        ps.append(nn.Parameter(torch.zeros(2)))  # no grad: skipped by both
        qs.append(nn.Parameter(torch.zeros(2)))
        n_new, n_old = clip_gradients(ps, 3.0), _clip_per_parameter(qs, 3.0)
        assert torch.equal(n_new, n_old)
        for p, q in zip(ps, qs):
            assert (p.grad is None and q.grad is None) or torch.equal(p.grad, q.grad)


def test_schedules_reach_the_optimizer(tmp_path):
    cfg = _cfg(tmp_path, "train.max_steps=4")
    eng = _engine(cfg)
    eng.fit()
    rec = eng.history
    assert [r["step"] for r in rec] == [1, 2, 3, 4]
    spe = eng.plan.steps_per_epoch
    peak = 0.05 * eng.plan.global_batch / 256
    for r in rec:
        step = r["step"] - 1
        assert r["lr"] == pytest.approx(eng.schedules["lr"][step])
        assert r["weight_decay"] == pytest.approx(cosine_schedule(0.04, 0.4, 3, spe)[step])
    assert eng.schedules["lr"][spe] == pytest.approx(peak)  # warm-up ends at the peak
    assert eng.optimizer.param_groups[0]["weight_decay"] > 0 and eng.optimizer.param_groups[1]["weight_decay"] == 0
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 4


def test_accumulation_equals_big_batch(tmp_path):
    """Two micro-batches of 4 give the same update as one batch of 8 (dropout off, same data)."""

    def run(bs, acc, out):
        cfg = _cfg(out, f"optim.batch_size={bs}", f"optim.accumulation={acc}", "train.max_steps=1", "optim.clip_grad=0")
        stage = Regression()
        stage.model[1].p = 0.0
        loader = TensorLoader(24, bs)
        loader.shuffle = False
        eng = Engine(cfg, stage, loader, DistInfo(), out, progress=False)
        eng._seed = lambda step, micro: 0  # same noise in both
        eng.fit()
        return stage.model[0].weight.detach()

    w1 = run(8, 1, tmp_path / "a")
    w2 = run(4, 2, tmp_path / "b")
    torch.testing.assert_close(w1, w2, rtol=1e-5, atol=1e-6)


def _flat_state(sd):
    out = {}
    for k, v in sd.items():
        if isinstance(v, dict):
            out.update({f"{k}.{kk}": vv for kk, vv in _flat_state(v).items()})
        elif isinstance(v, torch.Tensor):
            out[k] = v
    return out


def test_resume_is_bitwise_identical(tmp_path):
    full = _engine(_cfg(tmp_path / "full"))
    full.fit()
    part = _engine(_cfg(tmp_path / "part", "train.max_steps=7"))  # stops mid-epoch 1 (6 steps per epoch)
    part.fit()
    assert list_checkpoints(tmp_path / "part")[-1].name == "ckpt-00000007.pt"
    rest = _engine(_cfg(tmp_path / "part"), resume="auto")
    assert rest.step == 7 and rest.loader.batch == 1
    rest.fit()
    a = _flat_state(full.state_dict()["model"]) | _flat_state(full.state_dict()["optimizer"]["state"])
    b = _flat_state(rest.state_dict()["model"]) | _flat_state(rest.state_dict()["optimizer"]["state"])
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert torch.equal(full.stage.avg, rest.stage.avg)
    assert [r["loss"] for r in full.history[7:]] == [r["loss"] for r in rest.history]


def test_checkpoint_retention(tmp_path):
    cfg = _cfg(tmp_path, "train.keep_last=2", "train.keep_every=2", "train.ckpt_every_steps=2")
    _engine(cfg).fit()  # 18 steps, 6 per epoch
    names = [p.name for p in list_checkpoints(tmp_path)]
    # epoch 2's end (step 12) is a keeper; the last two are 16 and 18
    assert names == ["ckpt-00000012.pt", "ckpt-00000016.pt", "ckpt-00000018.pt"]
    ck = load_checkpoint(tmp_path / names[-1])
    assert ck["step"] == 18 and ck["stage"] == "toy"
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporaries


def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path):
    cfg = _cfg(tmp_path, "train.ckpt_every_steps=2")
    eng = _engine(cfg, Regression(nan_at=3))
    with pytest.raises(NonFiniteLoss, match=r"loss is nan at step 3 .*ckpt-00000002\.pt"):
        eng.fit()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-00000002.pt"]
    ck = load_checkpoint(tmp_path / "ckpt-00000002.pt")
    assert all(torch.isfinite(v).all() for v in ck["model"].values())


def test_loss_is_read_one_step_late_and_a_nan_still_names_its_step(tmp_path, monkeypatch):
    """No host sync inside a step: step s's loss is read after step s + 1 is queued (or at once when a
    log line or a checkpoint needs it); a NaN between checkpoints stops the run naming its own step."""
    reads = []
    real = Engine._check_loss

    def spy(self, step, epoch, record):
        updates = int(next(iter(self.optimizer.state.values()))["step"])
        reads.append((step, updates))  # (the step whose loss is read, optimiser updates queued so far)
        return real(self, step, epoch, record)

    monkeypatch.setattr(Engine, "_check_loss", spy)
    eng = _engine(_cfg(tmp_path, "train.log_every=100", "train.max_steps=8"))  # 6 steps per epoch, checkpoint at 6
    eng.fit()
    assert [s for s, _ in reads] == list(range(8))  # every step vetted once, in order
    assert all(queued == s + 2 for s, queued in reads if s not in (5, 7))  # read after the next step was queued
    assert (5, 6) in reads and (7, 8) in reads  # at once before the epoch-end checkpoint and at the end
    reads.clear()
    eng = _engine(_cfg(tmp_path / "nan", "train.log_every=100"), Regression(nan_at=3))
    with pytest.raises(NonFiniteLoss, match=r"loss is nan at step 3 \(epoch 0\).*last good checkpoint: none"):
        eng.fit()
    assert reads[-1] == (3, 5) and list_checkpoints(tmp_path / "nan") == []


def test_nonfinite_parameters_are_never_saved(tmp_path):
    eng = _engine(_cfg(tmp_path))
    with torch.no_grad():
        eng.stage.model[0].weight[0, 0] = math.inf
    with pytest.raises(NonFiniteLoss, match="no checkpoint written"):
        eng.save_checkpoint(epoch_end=False)
    assert list_checkpoints(tmp_path) == []


def test_resume_rejects_other_settings_naming_them(tmp_path):
    _engine(_cfg(tmp_path, "train.max_steps=2")).fit()
    with pytest.raises(ValueError, match=r"other settings: optim.batch_size 4 -> 3"):
        _engine(_cfg(tmp_path, "optim.batch_size=3"), resume="auto")
    with pytest.raises(ValueError, match=r"optim.epochs 3 -> 4; optim.lr 0.05 -> 0.01"):
        _engine(_cfg(tmp_path, "optim.lr=0.01", "optim.epochs=4"), resume="auto")
    _engine(_cfg(tmp_path, "train.max_steps=3", "train.log_every=2"), resume="auto").fit()  # run-only keys may change


# ------------------------------------------------------------------------------------------ the run folder


def test_a_new_run_into_an_old_runs_folder_is_refused_or_replaced(tmp_path):
    """Reusing --out kept none of the new run's checkpoints (pruning keeps the highest steps, the old
    run's) and a later --resume continued the OLD run: now refused, or replaced with --overwrite."""
    _engine(_cfg(tmp_path, "train.max_steps=4")).fit()
    with pytest.raises(
        FileExistsError,
        match=r"already holds a run \(ckpt-00000004.pt, metrics.jsonl, config.yaml( and 1 more)?\); "  # + tb/
        r"continue it with --resume, replace it with --overwrite",
    ):
        _engine(_cfg(tmp_path, "train.max_steps=2"))
    eng = Engine(
        _cfg(tmp_path, "train.max_steps=2"),
        Regression(),
        TensorLoader(24, 4),
        DistInfo(),
        tmp_path,
        progress=False,
        overwrite=True,
    )
    eng.fit()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-00000002.pt"]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2  # the new run's alone
    assert load_config("small", tmp_path / "config.yaml").train.max_steps == 2  # the run's config, reloadable


def test_two_runs_into_one_folder_at_once_are_refused(tmp_path):
    import subprocess
    import sys
    import textwrap

    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
        import sys, time
        from lafs_fast.train.run_folder import RunLock
        lock = RunLock({str(tmp_path)!r}); print('locked', flush=True); time.sleep(60)"""),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(
            FileExistsError, match=rf"another lafs-fast run \(pid {holder.pid}, since .*\) is writing to"
        ):
            _engine(_cfg(tmp_path))
    finally:
        holder.kill()
        holder.wait()
    _engine(_cfg(tmp_path, "train.max_steps=1")).fit()  # a dead holder leaves no stale lock (kill -9)


def test_resume_auto_skips_a_truncated_latest_checkpoint(tmp_path, capsys):
    _engine(_cfg(tmp_path, "train.max_steps=2", "train.ckpt_every_steps=1")).fit()
    last = list_checkpoints(tmp_path)[-1]
    last.write_bytes(last.read_bytes()[:1000])  # a disk that filled up mid-write on an old torch
    with pytest.raises(
        ValueError, match=r"ckpt-00000002.pt is not a loadable.*previous checkpoint is .*ckpt-00000001.pt"
    ):
        _engine(_cfg(tmp_path, "train.max_steps=3", "train.ckpt_every_steps=1"), resume=last)
    eng = _engine(_cfg(tmp_path, "train.max_steps=3", "train.ckpt_every_steps=1"), resume="auto")
    assert eng.step == 1 and "ckpt-00000002.pt does not load" in capsys.readouterr().out


def test_stale_temporaries_are_cleared_and_files_follow_the_umask(tmp_path):
    import os

    stale = tmp_path / ".lafs-abcd1234.tmp"
    stale.write_bytes(b"half a checkpoint")  # what a kill -9 during a write leaves
    _engine(_cfg(tmp_path, "train.max_steps=1")).fit()
    assert not stale.exists()
    old = os.umask(0o022)
    try:
        assert all(p.stat().st_mode & 0o777 == 0o644 for p in list_checkpoints(tmp_path))  # was 0600 (mkstemp's)
    finally:
        os.umask(old)


def test_resume_with_another_architecture_is_one_sentence(tmp_path):
    """Same config, another model (a library user's stage): not a traceback from load_state_dict."""
    _engine(_cfg(tmp_path, "train.max_steps=1")).fit()
    wider = Regression()
    wider.model = nn.Sequential(nn.Linear(4, 32), nn.Dropout(0.3), nn.ReLU(), nn.Linear(32, 1))
    with pytest.raises(
        ValueError,
        match=r"ckpt-00000001.pt does not fit this model \(.*size mismatch.*\); resume with the run's own settings",
    ):
        _engine(_cfg(tmp_path, "train.max_steps=2"), stage=wider, resume="auto")


def test_the_run_folder_holds_its_log_and_only_rank_0_speaks(tmp_path, capsys):
    """Run records: config.yaml, train.log (what was printed, lines said before the folder was
    claimed included) and metrics.jsonl; INFO from rank 0 only, warnings from every rank."""
    from lafs_fast.logs import start_run_logging, stop_run_logging

    say = start_run_logging(0).info
    try:
        say("[toy] said before the engine")
        _engine(_cfg(tmp_path, "train.max_steps=2", "train.ckpt_every_steps=1")).fit()
        say("[toy] said after the run")
    finally:
        stop_run_logging()
    log = (tmp_path / "train.log").read_text()
    assert "said before the engine" in log and "said after the run" in log
    assert {"config.yaml", "train.log", "metrics.jsonl"} <= {p.name for p in tmp_path.iterdir()}
    assert "said before the engine" in capsys.readouterr().out
    other = start_run_logging(1)
    try:
        other.info("a rank-1 line")
        other.warning("a rank-1 warning")
    finally:
        stop_run_logging()
    out = capsys.readouterr()
    assert "a rank-1 line" not in out.out + out.err and "rank 1: a rank-1 warning" in out.err
