"""Stage 1 (LAFS pre-training): DINO loss / centre / EMA / schedules, views, runs, resume, errors."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lafs_fast.config import config_to_dict, load_config
from lafs_fast.data import SyntheticFaces
from lafs_fast.eval import knn
from lafs_fast.kernels.patch_sampling import sample_patches_torch
from lafs_fast.models.checkpoints import load_model, model_file
from lafs_fast.models.part_fvit import build_backbone, build_landmark_cnn
from lafs_fast.sampling import grid_landmarks
from lafs_fast.train import pretrain
from lafs_fast.train.checkpointing import list_checkpoints, load_checkpoint
from lafs_fast.train.dino import DINOLoss, DinoStage, ema_update
from lafs_fast.train.engine import Plan
from lafs_fast.views import LafsViews
from tests import TINY_PRETRAIN

ROOT = Path(__file__).resolve().parents[1]

TINY = TINY_PRETRAIN


def tiny(tmp_path, *extra: str):
    return load_config("small", None, [*TINY, f"train.out_dir={tmp_path}", *extra])


def _images(n: int = 2) -> torch.Tensor:
    return SyntheticFaces(n, 1, seed=5).batch(range(n))[0]


# ------------------------------------------------------------------------------------------ DINO maths


def test_loss_is_the_mean_over_18_pairs(gen):
    b, k, v, g = 3, 20, 10, 2
    s = torch.randn(v * b, k, generator=gen)
    t = torch.randn(g * b, k, generator=gen)
    loss_fn = DINOLoss(k, v, g, student_temp=0.1, center_momentum=0.9)
    loss_fn.center.copy_(torch.randn(1, k, generator=gen))
    center = loss_fn.center.clone()
    got = loss_fn(s, t, teacher_temp=0.05)
    # the reference's loop, pair by pair
    sc, tc = (s / 0.1).chunk(v), F.softmax((t - center) / 0.05, dim=-1).chunk(g)
    terms = [
        torch.sum(-q * F.log_softmax(sc[j], dim=-1), dim=-1).mean()
        for i, q in enumerate(tc)
        for j in range(v)
        if j != i
    ]
    assert len(terms) == 18
    torch.testing.assert_close(got, sum(terms) / 18)
    # centre: EMA 0.9 of the teacher batch mean, after the loss
    torch.testing.assert_close(loss_fn.center, center * 0.9 + t.mean(0, keepdim=True) * 0.1)


def test_ema_update_formula(gen):
    student, teacher = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    before = [p.detach().clone() for p in teacher.parameters()]
    ema_update(teacher, student, 0.99)
    for t0, t1, s in zip(before, teacher.parameters(), student.parameters()):
        torch.testing.assert_close(t1, 0.99 * t0 + 0.01 * s.detach())


def test_stage_schedules_follow_the_spec(tmp_path):
    cfg = tiny(tmp_path, "dino.teacher_temp_epochs=3", "optim.epochs=5")
    stage = DinoStage(cfg, torch.device("cpu"))
    sch = stage.schedules(Plan(epochs=5, steps_per_epoch=4, accumulation=1, batch_size=2, world_size=1))
    mom, temp = sch["teacher_momentum"], sch["teacher_temp"]
    assert mom[0] == pytest.approx(0.996) and mom[-1] < 1 and mom[-1] > 0.9999
    it = torch.arange(20, dtype=torch.float64)
    torch.testing.assert_close(torch.from_numpy(mom), 1 + 0.5 * (0.996 - 1) * (1 + torch.cos(torch.pi * it / 20)))
    # reference direction: 0.07 -> 0.04 over 3 epochs (per epoch), then 0.04
    assert list(temp[::4]) == pytest.approx([0.07, 0.055, 0.04, 0.04, 0.04])
    assert stage.teacher.training  # reference: the teacher stays in train mode
    assert not DinoStage(tiny(tmp_path, "dino.teacher_mode=eval"), torch.device("cpu")).teacher.training


# ------------------------------------------------------------------------------------------ views


def test_grid_landmarks_read_the_image_blocks():
    img = torch.rand(1, 3, 112, 112)
    coords = grid_landmarks(112, 8)[None]
    assert coords.shape == (1, 196, 2)
    tok = sample_patches_torch(img, coords, 8)
    r, c = 3, 11  # landmark r * 14 + c = the block at rows 8r.., columns 8c..; token layout (x, y, channel)
    block = img[0, :, 8 * r : 8 * r + 8, 8 * c : 8 * c + 8].permute(2, 1, 0).reshape(-1)
    torch.testing.assert_close(tok[0, r * 14 + c], block)


def test_lafs_views_counts_positions_and_perturbation(tmp_path):
    cfg = tiny(tmp_path, "views.n_local=8")
    views = LafsViews(cfg.views, cfg.model)
    imgs = _images(2)
    vb = views(imgs, seed=11)
    assert vb.global_tokens.shape == (2 * 2, 196, 192) and vb.local_tokens.shape == (8 * 2, 36, 192)
    assert len(vb.crops()) == 2
    grid = grid_landmarks()
    # dense views: every landmark in canonical order, each moved by N(0, 5^2) px
    shift = vb.global_coords - grid
    assert 4.0 < shift.std().item() < 6.0 and shift.abs().mean().item() > 1.0
    # sparse views: 36 indices drawn with replacement from 196; token j at landmark idx_j (+ noise)
    idx = vb.local_indices
    assert idx.shape == (16, 36) and idx.min() >= 0 and idx.max() < 196
    assert any(len(set(row.tolist())) < 36 for row in idx)  # with replacement: repeats happen (p ~ 0.96 per row)
    l_shift = vb.local_coords - grid[idx]
    assert 4.0 < l_shift.std().item() < 6.0
    # the tokens are the patches at those coordinates of the augmented views (replayed through the twin)
    again = views(imgs, seed=11)
    torch.testing.assert_close(again.global_tokens, vb.global_tokens)
    assert not torch.equal(views(imgs, seed=12).global_tokens, vb.global_tokens)
    from lafs_fast.augment import augment_views
    from lafs_fast.views import _seed

    av = augment_views(
        imgs, views.global_specs + views.local_specs, seed=_seed(11, 0), interpolation=cfg.views.interpolation
    )
    aug = av.augmented.transpose(0, 1).reshape(-1, 3, 112, 112)
    torch.testing.assert_close(sample_patches_torch(aug[:4], vb.global_coords, 8), vb.global_tokens)
    torch.testing.assert_close(sample_patches_torch(aug[4:], vb.local_coords, 8), vb.local_tokens)


def test_dino_baseline_views_are_image_grids(tmp_path):
    cfg = tiny(tmp_path, "views.mode=dino", "views.n_local=3")
    vb = LafsViews(cfg.views, cfg.model)(_images(2), seed=1)
    assert vb.global_tokens.shape == (4, 196, 192) and vb.local_tokens.shape == (6, 36, 192)
    assert vb.global_coords is None


def test_landmarks_from_a_stage0_checkpoint(tmp_path):
    cfg = tiny(tmp_path)
    torch.manual_seed(0)
    cnn = build_landmark_cnn(cfg.model)
    path = tmp_path / "stage0.pt"
    torch.save(model_file(cfg.model, build_backbone(cfg.model), landmark_cnn=cnn), path)
    views = LafsViews(load_config("small", None, [*TINY, f"views.landmarks={path}"]).views, cfg.model)
    views.train()
    assert not views.landmarks.cnn.training and not any(p.requires_grad for p in views.landmarks.cnn.parameters())
    imgs = _images(2)
    vb = views(imgs, seed=3)
    assert vb.global_tokens.shape == (4, 196, 192)
    # without the noise the coordinates are the CNN's on the clean views
    cnn.eval()
    from lafs_fast.augment import augment_views
    from lafs_fast.views import _seed

    av = augment_views(
        imgs, views.global_specs + views.local_specs, seed=_seed(3, 0), interpolation=cfg.views.interpolation
    )
    with torch.no_grad():
        expect = cnn(av.clean.transpose(0, 1).reshape(-1, 3, 112, 112)[:4])
    assert (vb.global_coords - expect).std().item() == pytest.approx(5.0, abs=1.0)
    bare = tmp_path / "bare.pt"
    torch.save(model_file(cfg.model, build_backbone(cfg.model)), bare)
    with pytest.raises(ValueError, match="holds no landmark CNN"):
        LafsViews(load_config("small", None, [*TINY, f"views.landmarks={bare}"]).views, cfg.model)


# ------------------------------------------------------------------------------------------ runs


def _run(cfg, **opts):
    return pretrain.train_worker(config_to_dict(cfg), {"knn": False, "progress": False, **opts})


def test_a_few_steps_finite_loss_and_model_file(tmp_path):
    cfg = tiny(tmp_path, "train.max_steps=3")
    summary = _run(cfg)
    assert summary["steps"] == 3
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    import json

    recs = [json.loads(x) for x in lines]
    assert len(recs) == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in recs)
    assert {"lr", "weight_decay", "teacher_momentum", "teacher_temp", "samples_per_s"} <= recs[0].keys()
    model = load_model(tmp_path / "teacher.pt")  # the teacher as a model file fine-tuning can read
    assert model.dim == 32
    ck = load_checkpoint(list_checkpoints(tmp_path)[-1])
    assert ck["model_file"]["format"] == "lafs-fast-model" and ck["model_file"]["dino_head"] is not None


def test_last_layer_frozen_in_epoch_zero(tmp_path):
    cfg = tiny(tmp_path, "data.synthetic_identities=2", "views.n_local=1")  # 2 steps per epoch
    stage = DinoStage(cfg, torch.device("cpu"))
    from lafs_fast.data import make_loader
    from lafs_fast.launch import DistInfo
    from lafs_fast.train.engine import Engine

    loader = make_loader("synthetic:2x2", 2, device="cpu")
    eng = Engine(cfg, stage, loader, DistInfo(), tmp_path, progress=False)
    v0 = stage.model.head.last_layer.weight_v.detach().clone()
    w0 = stage.model.head.mlp[0].weight.detach().clone()
    cfg.train.max_steps = 2
    eng.fit()
    assert torch.equal(stage.model.head.last_layer.weight_v, v0) and not torch.equal(stage.model.head.mlp[0].weight, w0)
    cfg.train.max_steps = 3
    eng.fit()
    assert not torch.equal(stage.model.head.last_layer.weight_v, v0)


def test_resume_continues_bitwise(tmp_path):
    two = ("data.synthetic_identities=2",)  # 2 steps per epoch, 4 in all; stop after 1, resume mid-epoch
    _run(tiny(tmp_path / "full", *two))
    _run(tiny(tmp_path / "part", *two, "train.max_steps=1"))
    _run(tiny(tmp_path / "part", *two), resume="auto")
    a = load_checkpoint(tmp_path / "full" / "ckpt-00000004.pt")
    b = load_checkpoint(tmp_path / "part" / "ckpt-00000004.pt")
    for part in ("model",):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), k
    for k in a["stage_state"]["teacher"]:
        assert torch.equal(a["stage_state"]["teacher"][k], b["stage_state"]["teacher"][k]), k
    assert torch.equal(a["stage_state"]["center"], b["stage_state"]["center"])
    for pid, st in a["optimizer"]["state"].items():
        for k, v in st.items():
            assert torch.equal(v, b["optimizer"]["state"][pid][k])


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    pretrain.add_arguments(p)
    return p.parse_args(list(argv))


def test_injected_nan_stops_the_run_and_the_checkpoint_loads(tmp_path, monkeypatch, capsys):
    real = DinoStage.forward_loss

    def poisoned(self, model, batch, ctx):
        loss, m = real(self, model, batch, ctx)
        return (loss * float("nan") if ctx.step == 3 else loss), m

    monkeypatch.setattr(DinoStage, "forward_loss", poisoned)
    args = _args("--out", str(tmp_path), "--no-knn", "--no-progress", *TINY, "train.ckpt_every_steps=2")
    assert pretrain.run(args) == 1
    err = capsys.readouterr().err
    # 3 steps per epoch: checkpoints after steps 2 and 3 (epoch end); the 4th step (index 3) fails
    assert "loss is nan at step 3" in err and "ckpt-00000003.pt" in err and err.count("\n") == 1
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-00000002.pt", "ckpt-00000003.pt"]
    assert not (tmp_path / "teacher.pt").exists()
    ck = load_checkpoint(tmp_path / "ckpt-00000003.pt")
    assert all(torch.isfinite(v).all() for v in ck["model"].values())


def _cli(*argv: str, timeout: int = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "lafs_fast.train.pretrain", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=env,
    )


@pytest.mark.timeout(120)
def test_bad_paths_fail_fast_with_one_sentence(tmp_path):
    r = _cli("--data", str(tmp_path / "nope.rec"), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "nope.rec does not exist" in r.stderr
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user who can write anywhere (root): cannot make a folder unwritable")
        r = _cli("--out", str(locked / "run"))
        assert r.returncode == 2 and "not writable" in r.stderr and r.stderr.strip().count("\n") == 0
    finally:
        locked.chmod(0o700)


def test_unwritable_out_dir_is_caught_before_work(tmp_path, monkeypatch):
    target = tmp_path / "a-file"
    target.write_text("x")  # a file where the folder should be: unwritable as a folder, even for root
    with pytest.raises(PermissionError, match="not writable"):
        pretrain.preflight(tiny(target / "run"), None)
    with pytest.raises(FileNotFoundError, match="landmark checkpoint"):
        pretrain.preflight(tiny(tmp_path, f"views.landmarks={tmp_path / 'missing.pt'}"), None)


def test_dino_baseline_trains(tmp_path):
    summary = _run(tiny(tmp_path, "views.mode=dino", "train.max_steps=1"))
    assert summary["steps"] == 1
    assert load_checkpoint(list_checkpoints(tmp_path)[-1])["config"]["views"]["mode"] == "dino"


def test_default_run_config_and_reference_with_data(tmp_path):
    cfg = pretrain.resolve_config(_args())
    assert (cfg.model.dim, cfg.data.path, cfg.optim.batch_size, cfg.dino.teacher_momentum) == (192, "", 16, 0.99)
    ref = pretrain.resolve_config(_args("--data", str(tmp_path), "--gpus", "2", "dino.teacher_temp_start=0.04"))
    assert (ref.model.dim, ref.dino.out_dim, ref.optim.batch_size, ref.model.token_init_std, ref.train.gpus) == (
        768,
        100_000,
        82,
        1.0,
        2,
    )
    assert ref.dino.teacher_temp_start == 0.04  # key=value still wins


@pytest.mark.timeout(180)
def test_sigterm_writes_a_final_checkpoint_and_resume_continues(tmp_path):
    """What schedulers send before a kill: the step reached is saved, no temporary file is left,
    exit 143 with one line, and --resume continues from there."""
    import signal
    import time

    out = tmp_path / "run"
    argv = ["--out", str(out), "--no-knn", "--no-progress", *TINY, "optim.epochs=200", "data.synthetic_identities=2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen(
        [sys.executable, "-m", "lafs_fast.train.pretrain", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=env,
    )
    metrics = out / "metrics.jsonl"
    t0 = time.time()
    while (
        (not metrics.exists() or len(metrics.read_text().splitlines()) < 3)
        and time.time() - t0 < 120
        and p.poll() is None
    ):
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 143, err[-2000:]
    assert err.strip().count("\n") == 0 and "stopped by SIGTERM at step" in err and "--resume" in err, err
    ckpts = list_checkpoints(out)
    step = int(err.split("at step ")[1].split()[0])
    assert ckpts and ckpts[-1].name == f"ckpt-{step:08d}.pt" and load_checkpoint(ckpts[-1])["step"] == step
    assert not [f for f in out.iterdir() if f.name.endswith(".tmp")]
    assert pretrain.main([*argv, "--resume", "--max-steps", str(step + 1)]) == 0
    assert load_checkpoint(list_checkpoints(out)[-1])["step"] == step + 1


def jpeg_bytes(face) -> bytes:
    """A face (H, W, 3) uint8 array as JPEG bytes (labelled recs for the check's tests)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(face).save(buf, format="JPEG")
    return buf.getvalue()


def test_knn_data_skips_and_names_a_corrupt_record(tmp_path):
    """--knn-data holding a corrupt JPEG stopped the run with a traceback: now it is skipped and named."""
    from lafs_fast.data.recordio_writer import write_identity_dataset

    faces = SyntheticFaces(2, 2, seed=3).batch(range(4))[0].numpy()
    jpeg = jpeg_bytes

    write_identity_dataset(
        tmp_path, [[jpeg(faces[0]), b"\xff\xd8 not a jpeg"], [jpeg(faces[2]), jpeg(faces[3])]], height=112, width=112
    )
    got = knn.knn_faces(str(tmp_path / "train.rec"), torch.device("cpu"))
    assert got.images.shape[0] == 3 and got.labels.tolist() == [0, 1, 1]
    assert "1 corrupt record(s) skipped (positions 1)" in got.what


def test_pixel_floor_and_knn_metrics(gen):
    """The raw-pixel floor: identities that differ only in their pixels' mean pattern are found at
    100 %; faces whose labels carry no pixel information sit near chance; the lines name all three."""
    base = torch.randint(0, 256, (4, 1, 8, 8, 3), generator=gen).float()
    noise = torch.randn(4, 6, 8, 8, 3, generator=gen) * 4
    images = (base + noise).clamp(0, 255).to(torch.uint8).reshape(24, 8, 8, 3)
    labels = torch.arange(4).repeat_interleave(6)
    faces = knn.KnnFaces(images, labels, None, "24 test faces, 4 identities")
    floor = knn.pixel_floor(faces)
    assert floor == {"knn_top1": 100.0, "verification": 100.0}
    shuffled = knn.KnnFaces(images, labels[torch.randperm(24, generator=gen)], None, "shuffled")
    assert knn.pixel_floor(shuffled)["knn_top1"] < 60.0
    lines = knn.report_lines({"knn_top1": 10.0, "verification": 50.0}, {"knn_top1": 20.0, "verification": 60.0}, faces)
    assert [line.split(":")[0] for line in lines] == ["k-NN check before", "k-NN check after", "k-NN check floor"]
    assert "1-NN top-1 100.0%, verification 100.0% (raw pixels of the same faces)" in lines[2]
