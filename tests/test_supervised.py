"""Stages 0 and 2 (supervised Part fViT): gradients through the sampler, the landmark regulariser and
its schedule, augmentation, Mixup targets, optimiser groups, checkpoint loading, resume, sharded head."""

from __future__ import annotations

import argparse
import copy

import numpy as np
import pytest
import torch

from lafs_fast.config import config_to_dict, load_config
from lafs_fast.data import SyntheticFaces
from lafs_fast.launch import DistInfo
from lafs_fast.models.checkpoints import export_reference, model_file
from lafs_fast.models.part_fvit import build_backbone, build_landmark_cnn
from lafs_fast.train import supervised_run
from lafs_fast.train.checkpointing import list_checkpoints
from lafs_fast.train.engine import Plan, StepContext
from lafs_fast.train.supervised import SupervisedStage, landmark_lambda, landmark_lambda_schedule
from lafs_fast.train.supervised_augment import FaceAugment, apply_mixup, build_mixup, random_erase
from lafs_fast.train.supervised_model import build_supervised_model, layer_id, read_weights, supervised_param_groups
from tests import TINY_DINO, TINY_MODEL, TINY_SUPERVISED

TINY = [*TINY_SUPERVISED, "model.depth=2", "train.log_every=1"]
# no dropout anywhere: forward passes become functions of the weights alone
DETERMINISTIC = ["model.dropout=0", "model.emb_dropout=0", "model.drop_path=0", "model.landmark_dropout=0"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread


def tiny(tmp_path, *extra: str):
    return load_config(
        "small", None, [*TINY, f"train.out_dir={tmp_path}", *extra], defaults=supervised_run.stage_defaults("small")
    )


def _batch(n: int = 4, seed: int = 5):
    return SyntheticFaces(n, 1, seed=seed).batch(range(n))


def _ctx(step: int = 0, epoch: int = 0, lam: float = 0.0, seed: int = 1) -> StepContext:
    return StepContext(step, epoch, 0, seed, {"lr": 1e-3, "weight_decay": 0.1, "landmark_lambda": lam}, DistInfo())


# ------------------------------------------------------------------------------------------ schedule


def test_landmark_lambda_follows_the_spec():
    expect = {0: 1000, 7: 1000, 8: 100, 13: 100, 14: 1, 20: 1, 21: 0.11, 27: 0.11, 28: 0, 33: 0, 100: 0}
    for epoch, lam in expect.items():
        assert landmark_lambda(epoch) == pytest.approx(lam), epoch
    plan = Plan(epochs=30, steps_per_epoch=3, accumulation=1, batch_size=2, world_size=1)
    sch = landmark_lambda_schedule(plan)
    assert sch.shape == (90,)
    assert list(sch[::3]) == pytest.approx([landmark_lambda(e) for e in range(30)])
    assert (sch[24:27] == 100).all() and (sch[:24] == 1000).all()  # constant within an epoch
    assert not landmark_lambda_schedule(plan, enabled=False).any()


def test_stage_schedule_is_off_in_stage0_and_switchable(tmp_path):
    plan = Plan(epochs=10, steps_per_epoch=2, accumulation=1, batch_size=4, world_size=1)
    cfg = tiny(tmp_path)
    _, m0, ref0 = build_supervised_model(cfg, 4, 0)
    assert ref0 is None
    s0 = SupervisedStage(cfg, m0, 4, 0, torch.device("cpu"), augment="none")
    assert not s0.schedules(plan)["landmark_lambda"].any()
    cnn = tmp_path / "s0.pt"
    torch.save(s0.export(), cnn)
    _, m2, ref2 = build_supervised_model(cfg, 4, 2, init=str(cnn))
    s2 = SupervisedStage(cfg, m2, 4, 2, torch.device("cpu"), ref_landmarks=ref2, augment="none")
    assert s2.schedules(plan)["landmark_lambda"][0] == 1000 and s2.reg_on
    off = tiny(tmp_path, "finetune.landmark_reg=false")
    s2off = SupervisedStage(off, copy.deepcopy(m2), 4, 2, torch.device("cpu"), ref_landmarks=ref2, augment="none")
    assert not s2off.reg_on and not s2off.schedules(plan)["landmark_lambda"].any()


def test_landmarks_grid_starts_at_the_pretraining_grid_and_learns(tmp_path, gen):
    """finetune --landmarks grid: a fresh landmark CNN whose output is the patch grid (up to the min-max
    stretch to [0, S - 1]) for every face, i.e. the patches a grid-pre-trained teacher saw; its
    regression weights still get a gradient. Without it a fresh CNN points anywhere."""
    from lafs_fast.sampling import grid_landmarks

    cfg = tiny(tmp_path)
    grid = grid_landmarks(cfg.model.image_size, cfg.model.patch_size)
    lo, hi = float(grid.min()), float(grid.max())
    want = (grid - lo) / (hi - lo) * (cfg.model.image_size - 1)
    faces = torch.rand(3, 3, cfg.model.image_size, cfg.model.image_size, generator=gen) * 2 - 1
    _, model, ref = build_supervised_model(cfg, 4, 2, landmarks="grid")
    cnn = model.landmark_cnn.eval()
    coords = cnn(faces)
    torch.testing.assert_close(coords, want.expand(3, -1, -1))
    assert ref is None  # no stage-0 CNN to hold it to
    coords.square().sum().backward()
    assert cnn.output_layer[-1].weight.grad.abs().sum() > 0
    random_start = tiny(tmp_path, "model.landmark_start=random")  # the reference's start (the small preset's is grid)
    _, fresh, _ = build_supervised_model(random_start, 4, 2, landmarks="scratch")
    assert (fresh.landmark_cnn.eval()(faces) - want).abs().mean() > 10  # px: random points


def test_model_landmark_start_grid_starts_every_fresh_cnn_at_the_grid(tmp_path, gen):
    """model.landmark_start=grid (the small preset's stage 0): a landmark CNN trained from scratch starts
    at the patch grid, as finetune --landmarks grid does, and still learns; the reference's random
    start is the default."""
    from lafs_fast.sampling import grid_landmarks

    cfg = tiny(tmp_path, "model.landmark_start=grid")
    grid = grid_landmarks(cfg.model.image_size, cfg.model.patch_size)
    want = (grid - grid.min()) / (grid.max() - grid.min()) * (cfg.model.image_size - 1)
    faces = torch.rand(2, 3, cfg.model.image_size, cfg.model.image_size, generator=gen) * 2 - 1
    _, model, _ = build_supervised_model(cfg, 4, 0)
    coords = model.landmark_cnn.eval()(faces)
    torch.testing.assert_close(coords, want.expand(2, -1, -1))
    coords.square().sum().backward()
    assert model.landmark_cnn.output_layer[-1].weight.grad.abs().sum() > 0
    assert load_config("reference").model.landmark_start == "random"


def test_margin_warm_up_ramps_to_the_margin_and_reaches_the_head(tmp_path):
    """finetune.margin_warmup_epochs: the margin rises linearly from 0 to finetune.margin over that many
    epochs, then stays; the stage sets it on the head before each step; 0 keeps the reference's constant."""
    plan = Plan(epochs=4, steps_per_epoch=5, accumulation=1, batch_size=4, world_size=1)
    cfg = tiny(tmp_path, "finetune.head=cosface", "finetune.margin_warmup_epochs=2", "finetune.margin=0.4")
    _, model, _ = build_supervised_model(cfg, 4, 0)
    st = SupervisedStage(cfg, model, 4, 0, torch.device("cpu"), augment="none")
    margin = st.schedules(plan)["margin"]
    assert margin.shape == (20,) and margin[0] == 0.0 and margin[9] == pytest.approx(0.4)
    assert (np.diff(margin[:10]) > 0).all() and (margin[10:] == pytest.approx(0.4))
    images, labels = _batch()
    ctx = StepContext(3, 0, 0, 1, {"lr": 1e-3, "weight_decay": 0.1, "margin": float(margin[3])}, DistInfo())
    st.forward_loss(st.model, (images, labels), ctx)
    assert model.head.m == pytest.approx(margin[3])
    constant = SupervisedStage(tiny(tmp_path), model, 4, 0, torch.device("cpu"), augment="none")
    assert (constant.schedules(plan)["margin"] == 0.4).all()


# ------------------------------------------------------------------------------------------ gradients


def test_gradients_reach_the_landmark_cnn_through_the_sampler(tmp_path):
    # the reference's random start: at the grid start the regression weights are 0, so the trunk's first step
    # has no gradient yet
    cfg = tiny(tmp_path, *DETERMINISTIC, "finetune.mixup_p=0", "model.landmark_start=random")
    torch.manual_seed(0)
    _, model, _ = build_supervised_model(cfg, 4, 0)
    stage = SupervisedStage(cfg, model, 4, 0, torch.device("cpu"), augment="none")
    images, labels = _batch()
    loss, metrics = stage.forward_loss(model, (images, labels), _ctx())
    loss.backward()
    assert torch.isfinite(loss) and "landmark_mse" not in metrics
    # the CNN's only path to the loss is the coordinates: a gradient here went through the sampler
    for name in ("output_layer.1.weight", "stn.features.0.0.weight"):
        g = dict(model.landmark_cnn.named_parameters())[name].grad
        assert g is not None and g.abs().sum() > 0, name
    assert model.head.weight.grad.abs().sum() > 0


def test_regulariser_adds_lambda_times_mse_to_a_frozen_copy(tmp_path):
    cfg = tiny(tmp_path, *DETERMINISTIC, "finetune.mixup_p=0")
    torch.manual_seed(0)
    src = tmp_path / "s0.pt"
    torch.save(model_file(cfg.model, build_backbone(cfg.model), landmark_cnn=build_landmark_cnn(cfg.model)), src)
    _, model, ref = build_supervised_model(cfg, 4, 2, init=str(src))
    stage = SupervisedStage(cfg, model, 4, 2, torch.device("cpu"), ref_landmarks=ref, augment="none")
    images, labels = _batch()
    # identical CNNs, both in eval mode (the copy always is: BatchNorm on running statistics): 0
    model.eval()
    loss, m = stage.forward_loss(model, (images, labels), _ctx(lam=1000.0))
    assert float(m["landmark_mse"]) == pytest.approx(0.0, abs=1e-12)
    model.train()
    # move the trainable CNN: loss = ce + lambda * MSE(theta_ref / 111, theta / 111)
    with torch.no_grad():
        model.landmark_cnn.output_layer[1].bias.add_(torch.randn(392) * 0.5)
    loss, m = stage.forward_loss(model, (images, labels), _ctx(lam=100.0))
    x = images.permute(0, 3, 1, 2).float() / 255 * 2 - 1
    with torch.no_grad():
        mse = torch.mean((model.landmark_cnn(x) / 111 - ref(x) / 111) ** 2).item()
    assert float(m["landmark_mse"]) == pytest.approx(mse, rel=1e-5) and mse > 0
    assert loss.item() == pytest.approx(float(m["ce"]) + 100.0 * mse, rel=1e-5)
    loss.backward()
    assert not any(p.requires_grad or p.grad is not None for p in ref.parameters())  # frozen
    assert not ref.training
    loss0, m0 = stage.forward_loss(model, (images, labels), _ctx(lam=0.0))
    assert loss0.item() == pytest.approx(float(m0["ce"])) and "landmark_mse" not in m0


# ------------------------------------------------------------------------------------------ augmentation


def test_cpu_augmentation_is_seeded_and_leaves_global_rngs_alone(tmp_path):
    cfg = tiny(tmp_path)
    aug = FaceAugment(cfg, "cpu")
    images, _ = _batch(4)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = aug(images, seed=7)
    after = torch.rand(1)
    b = aug(images, seed=7)
    c = aug(images, seed=8)
    assert a.shape == (4, 3, 112, 112) and a.dtype == torch.float32
    assert a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(before, after)  # the global torch stream did not move
    plain = images.permute(0, 3, 1, 2).float() / 255 * 2 - 1
    assert not torch.allclose(a, plain)
    assert "Solarize" not in " ".join(type(op).__name__ + op.name for op in aug._cpu[0].transforms[3].ops)


def test_gpu_path_runs_on_the_twin_and_erases(tmp_path):
    cfg = tiny(tmp_path, "finetune.erase_p=1.0")
    aug = FaceAugment(cfg, "gpu")
    images, _ = _batch(4)
    x = aug(images, seed=3)
    assert x.shape == (4, 3, 112, 112) and torch.equal(x, aug(images, seed=3))
    g = torch.Generator().manual_seed(0)
    ones = torch.ones(64, 3, 112, 112)
    erased = random_erase(ones, 1.0, g)
    frac = (erased == 0).float().mean(dim=(1, 2, 3))
    assert ((frac > 0.015) & (frac < 0.11)).float().mean() > 0.9  # area 0.02-0.1 (rounded sides)
    assert torch.equal(random_erase(ones, 0.0, g), ones)


def test_mixup_targets_sum_to_one(tmp_path):
    cfg = tiny(tmp_path, "finetune.mixup_p=1.0")
    mix = build_mixup(cfg, 10)
    x = torch.randn(6, 3, 8, 8)
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    xm, t = apply_mixup(mix, x, labels, seed=11)
    assert t.shape == (6, 10)
    torch.testing.assert_close(t.sum(dim=1), torch.ones(6))
    lam = t[0, 0].item()
    assert 0 < lam < 1 and t[0, 5].item() == pytest.approx(1 - lam)  # timm pairs the batch with its flip
    torch.testing.assert_close(xm, lam * x + (1 - lam) * x.flip(0))
    xm2, t2 = apply_mixup(mix, x, labels, seed=11)
    assert torch.equal(t, t2) and torch.equal(xm, xm2)
    assert build_mixup(tiny(tmp_path, "finetune.mixup_p=0"), 10) is None


def test_mixup_soft_targets_train_through_the_margin_head(tmp_path):
    cfg = tiny(tmp_path, *DETERMINISTIC, "finetune.mixup_p=1.0")
    _, model, _ = build_supervised_model(cfg, 4, 0)
    stage = SupervisedStage(cfg, model, 4, 0, torch.device("cpu"), augment="none")
    loss, m = stage.forward_loss(model, _batch(), _ctx())
    assert torch.isfinite(loss) and m["ce"] > 0


# ------------------------------------------------------------------------------------------ optimiser


def test_param_groups_weight_decay_and_layer_decay(tmp_path):
    cfg = tiny(tmp_path, "optim.layer_decay=0.5")
    _, model, _ = build_supervised_model(cfg, 4, 0)
    groups = supervised_param_groups(model, cfg)
    where = {id(p): g for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert len(where) == len(named)
    assert cfg.optim.weight_decay == pytest.approx(0.1)
    lm_w = named["landmark_cnn.output_layer.1.weight"]
    assert where[id(lm_w)]["wd_mult"] * 0.1 == pytest.approx(0.05)
    assert where[id(named["landmark_cnn.output_layer.1.bias"])]["wd_mult"] == 0
    assert where[id(named["backbone.transformer.layers.0.0.fn.fn.to_qkv.weight"])]["wd_mult"] == 1.0
    assert where[id(named["backbone.transformer.layers.0.0.fn.norm.weight"])]["wd_mult"] == 0
    assert where[id(named["backbone.pos_embedding"])]["wd_mult"] == 1.0  # (1, 197, dim): not 1-D (spec: 0 on 1-D only)
    assert where[id(named["head.weight"])]["wd_mult"] == 1.0
    # depth 2: embeddings 0.5**3, block 0 0.5**2, block 1 0.5, final norm / head / CNN 1
    assert where[id(named["backbone.patch_to_embedding.weight"])]["lr_mult"] == pytest.approx(0.125)
    assert where[id(named["backbone.transformer.layers.0.0.fn.fn.to_qkv.weight"])]["lr_mult"] == pytest.approx(0.25)
    assert where[id(named["backbone.transformer.layers.1.1.fn.fn.net.0.weight"])]["lr_mult"] == pytest.approx(0.5)
    for n in ("backbone.mlp_head.0.weight", "head.weight", "landmark_cnn.output_layer.1.weight"):
        assert where[id(named[n])]["lr_mult"] == 1.0, n
    assert layer_id("backbone.transformer.layers.11.0.fn.norm.weight", 12) == 12
    off = supervised_param_groups(model, tiny(tmp_path))
    assert all(g["lr_mult"] == 1.0 for g in off)


def test_reference_finetune_defaults():
    cfg = load_config("reference", None, None, defaults=supervised_run.stage_defaults("reference"))
    o = cfg.optim
    assert (o.epochs, o.batch_size, o.accumulation, o.warmup_epochs) == (34, 200, 3, 5)
    assert o.lr * 1200 / 256 == pytest.approx(2.29e-3)
    assert (o.weight_decay, o.weight_decay_end, o.landmark_weight_decay) == (0.1, 0.1, 0.05)
    assert cfg.finetune.head == "cosface" and cfg.finetune.landmark_reg and cfg.optim.layer_decay == 1.0


# ------------------------------------------------------------------------------------------ loading


def test_stage2_loads_reference_format_checkpoints(tmp_path):
    # reference files imply 64-wide heads and the reference's dim**-0.5 attention scale (a head-dim scale is
    # folded into the exported q weights: equal embeddings, other weights; test_checkpoints checks that)
    cfg = tiny(tmp_path, "model.heads=1", "model.head_dim=64", "model.attn_scale=dim")
    torch.manual_seed(1)
    bb, cnn = build_backbone(cfg.model), build_landmark_cnn(cfg.model)
    ours = tmp_path / "ours.pt"
    torch.save(model_file(cfg.model, bb, landmark_cnn=cnn), ours)
    ssl, part = tmp_path / "ssl.pth", tmp_path / "part.pth"
    export_reference(ours, ssl, "ssl")  # {"teacher": {"backbone.*"...}}
    export_reference(ours, part, "part_fvit")  # flat reference Part fViT state dict
    only_backbone = tmp_path / "bb.pt"
    torch.save(model_file(cfg.model, bb), only_backbone)
    export_reference(only_backbone, tmp_path / "ssl_bb.pth", "ssl")
    for init, lm in ((ssl, None), (tmp_path / "ssl_bb.pth", part)):
        cfg2, model, ref = build_supervised_model(cfg, 4, 2, init=str(init), landmarks=None if lm is None else str(lm))
        for k, v in bb.state_dict().items():
            assert torch.equal(model.backbone.state_dict()[k], v), k
        for k, v in cnn.state_dict().items():
            assert torch.equal(model.landmark_cnn.state_dict()[k], v) and torch.equal(ref.state_dict()[k], v), k
        # the reference layout carries no head width: the attention scale is the reference's
        assert cfg2.model.attn_scale == "dim" and cfg2.model.dim == 32
    assert read_weights(ssl)["landmark_cnn"] is not None
    with pytest.raises(ValueError, match="holds no landmark CNN"):
        build_supervised_model(cfg, 4, 2, init=str(ours), landmarks=str(only_backbone))
    with pytest.raises(FileNotFoundError):
        read_weights(tmp_path / "missing.pt")


def _args(**kw) -> argparse.Namespace:
    base = dict(
        preset=None,
        config=None,
        overrides=[],
        data=None,
        out=None,
        gpus=None,
        device=None,
        init=None,
        landmarks=None,
        landmark_reg=None,
        head=None,
        subset=None,
        val=None,
        val_every=None,
        augment=None,
        epochs=None,
        batch_size=None,
        max_steps=None,
        seed=None,
        compile=None,
        resume=None,
        check=False,
        no_progress=True,
    )
    base.update(kw)
    return argparse.Namespace(**base)


def test_stage2_loads_a_stage1_checkpoint_from_the_pretrain_code(tmp_path):
    from lafs_fast.train import pretrain

    pre = load_config(
        "small",
        None,
        [
            *TINY_MODEL,
            *TINY_DINO,
            "optim.batch_size=2",
            "optim.epochs=1",
            "optim.warmup_epochs=0",
            "data.synthetic_identities=2",
            "data.synthetic_images_per_identity=1",
            "views.n_local=1",
            "train.max_steps=1",
            "train.device=cpu",
            f"train.out_dir={tmp_path / 'pre'}",
        ],
    )
    pretrain.train_worker(config_to_dict(pre), {"knn": False, "progress": False})
    teacher = tmp_path / "pre" / "teacher.pt"
    ckpt = list_checkpoints(tmp_path / "pre")[-1]
    s0 = tmp_path / "s0.pt"
    cfg = tiny(tmp_path)
    torch.save(model_file(cfg.model, build_backbone(cfg.model), landmark_cnn=build_landmark_cnn(cfg.model)), s0)
    want = torch.load(teacher, weights_only=True)["backbone"]
    for init in (teacher, ckpt):
        cfg2, model, ref = build_supervised_model(
            tiny(tmp_path, "model.depth=3"), 4, 2, init=str(init), landmarks=str(s0)
        )
        assert cfg2.model.depth == 1  # the architecture comes from the checkpoint
        for k, v in want.items():
            assert torch.equal(model.backbone.state_dict()[k], v), k
        assert ref is not None


# ------------------------------------------------------------------------------------------ runs


def _run(cfg, stage: int, **opts):
    return supervised_run.train_worker(config_to_dict(cfg), stage, {"check": False, "progress": False, **opts})


def test_resume_continues_bitwise(tmp_path):
    extra = ("finetune.mixup_p=1.0", "optim.epochs=2", "train.ckpt_every_steps=1")
    full = _run(tiny(tmp_path / "a", *extra), 0)
    assert full["steps"] == 4
    cut = tiny(tmp_path / "b", *extra, "train.max_steps=2")
    _run(cut, 0)
    resumed = _run(tiny(tmp_path / "b", *extra), 0, resume="auto")
    assert resumed["steps"] == 4
    assert resumed["digest"] == full["digest"]
    assert resumed["loss_last"] == full["loss_last"]


def test_the_supervised_stage_memorises_a_tiny_set(tmp_path):
    """Images and labels arrive together and the margin head + backbone can fit them: 8 faces of 4
    people, no augmentation, no margin, 50 steps -> every training image classified (a label / image
    mismatch anywhere in the data path would keep the cross-entropy at ln 4)."""
    import json

    _run(
        tiny(
            tmp_path,
            *DETERMINISTIC,
            "finetune.augment=none",
            "finetune.mixup_p=0",
            "finetune.margin=0",
            "finetune.scale=16",
            "optim.lr=0.5",
            "optim.epochs=25",
            "optim.warmup_epochs=1",
            "train.log_every=10",
        ),
        0,
    )
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 50 and rows[-1]["train_acc"] == 1.0 and rows[-1]["ce"] < 0.3 < rows[0]["ce"]


def test_stage2_run_with_regulariser_writes_part_fvit_and_metrics(tmp_path):
    s0 = _run(tiny(tmp_path / "s0", "train.max_steps=1"), 0)
    assert s0["steps"] == 1
    out = tmp_path / "s2"
    res = _run(tiny(out, "train.max_steps=2", f"finetune.init={tmp_path / 's0' / 'part_fvit.pt'}"), 2)
    assert res["steps"] == 2 and np.isfinite(res["loss_last"])
    import json

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["landmark_lambda"] == 1000 and "landmark_mse" in rows[0] and "ce" in rows[0]
    f = torch.load(out / "part_fvit.pt", weights_only=True)
    assert f["landmark_cnn"] is not None and f["margin_head"]["weight"].shape == (4, 32)


def test_a_finetune_runs_config_yaml_holds_its_init_and_landmarks(tmp_path):
    """--init and --landmarks are config keys (finetune.init / finetune.landmarks): the run folder's
    config.yaml records what a stage-2 run started from, and --config of it starts from the same."""
    import yaml

    s0 = tmp_path / "s0"
    assert _run(tiny(s0, "train.max_steps=1"), 0)["steps"] == 1
    init = str(s0 / "part_fvit.pt")
    flags = ["--no-progress", "--no-check", "--init", init, "--landmarks", "grid", "--max-steps", "1"]
    out = tmp_path / "s2"
    assert supervised_run.main(["--out", str(out), *flags, *TINY], stage=2) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())["finetune"]
    assert saved["init"] == init and saved["landmarks"] == "grid"
    again = load_config("small", out / "config.yaml", [f"train.out_dir={tmp_path / 'again'}"])
    assert (again.finetune.init, again.finetune.landmarks) == (init, "grid")


def test_sharded_head_option_runs(tmp_path, capsys):
    extra = ("finetune.head=cosface", "finetune.mixup_p=0.1", "finetune.shard_classes=true", "finetune.sample_rate=0.5")
    extra += ("train.max_steps=2",)
    res = _run(tiny(tmp_path, *extra), 0)
    assert res["steps"] == 2 and np.isfinite(res["loss_last"])
    out = capsys.readouterr().out
    assert "sharded" in out and "Mixup off" in out
    f = torch.load(tmp_path / "part_fvit.pt", weights_only=True)
    assert f["margin_head"] is None and f["landmark_cnn"] is not None


def test_bad_inputs_fail_with_one_sentence(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        supervised_run.run(_args(out=str(tmp_path), init=str(tmp_path / "nope.pt")), 2)
    with pytest.raises(ValueError, match="shots=K"):
        supervised_run.parse_subset("shots=2,frac=0.5")
    assert supervised_run.parse_subset("fraction=0.25,shots=1,seed=3") == {"shots": 1, "fraction": 0.25, "seed": 3}
    with pytest.raises(FileNotFoundError, match="verification set"):
        supervised_run.run(_args(out=str(tmp_path), val=str(tmp_path / "lfw.bin")), 0)
    # an odd batch (a corrupt image skipped) passes unmixed instead of stopping the run
    mix = build_mixup(tiny(tmp_path, "finetune.mixup_p=1.0"), 10)
    x = torch.randn(3, 3, 8, 8)
    xm, t = apply_mixup(mix, x, torch.tensor([1, 2, 3]), seed=0)
    assert (
        torch.equal(xm, x)
        and torch.equal(t.argmax(1), torch.tensor([1, 2, 3]))
        and torch.equal(t.sum(1), torch.ones(3))
    )


def test_landmarks_and_head_stay_fp32_under_bf16_autocast(tmp_path):
    cfg = tiny(tmp_path, *DETERMINISTIC)
    _, model, _ = build_supervised_model(cfg, 4, 0)
    x = torch.rand(2, 3, 112, 112) * 2 - 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, coords = model(x, torch.tensor([0, 1]))
    assert coords.dtype == torch.float32 and logits.dtype == torch.float32
    torch.testing.assert_close(coords, model.landmark_cnn(x))  # exactly the fp32 CNN


def test_command_line_end_to_end_and_flags(tmp_path, capsys):
    tiny_args = [a for a in TINY if not a.startswith("optim.epochs")]
    rc = supervised_run.main(
        ["--out", str(tmp_path / "s0"), "--max-steps", "1", "--no-progress", "--no-check", *tiny_args], stage=0
    )
    assert rc == 0 and (tmp_path / "s0" / "part_fvit.pt").is_file()
    out = capsys.readouterr().out
    assert "[train-landmarks] 1 steps in" in out and "margin cross-entropy" in out
    ns = argparse.ArgumentParser()
    supervised_run.add_arguments(ns, 2)
    args = ns.parse_args(["--head", "arcface", "--no-landmark-reg", "--subset", "shots=1", "optim.layer_decay=0.58"])
    cfg = supervised_run.resolve_config(args)
    assert (cfg.finetune.head, cfg.finetune.margin, cfg.finetune.landmark_reg, cfg.finetune.subset) == (
        "arcface",
        0.5,
        False,
        "shots=1",
    )
    assert cfg.optim.layer_decay == 0.58 and cfg.model.dim == 192  # small preset without --data
    rc = supervised_run.main(
        [
            "--out",
            str(tmp_path / "s2"),
            "--init",
            str(tmp_path / "s0" / "part_fvit.pt"),
            "--max-steps",
            "1",
            "--no-progress",
            "--no-check",
            "--head",
            "arcface",
            *tiny_args,
        ],
        stage=2,
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "head arcface (s 64.0, m 0.5)" in out and "landmark regulariser on" in out
    assert supervised_run.main(["--out", str(tmp_path), "--init", str(tmp_path / "none.pt")], stage=2) == 2


def test_knn_data_checks_a_supervised_run_on_labelled_faces(tmp_path, capsys):
    """finetune / train-landmarks --knn-data REC: the 1-NN / verification check before and after on
    those faces (e.g. held-out people) instead of synthetic ones; a non-rec is one sentence, exit 2."""
    from lafs_fast.data.recordio_writer import write_identity_dataset
    from tests.test_pretrain import jpeg_bytes

    faces = SyntheticFaces(3, 2, seed=11).batch(range(6))[0].numpy()
    write_identity_dataset(
        tmp_path / "held",
        [[jpeg_bytes(faces[2 * i]), jpeg_bytes(faces[2 * i + 1])] for i in range(3)],
        height=112,
        width=112,
    )
    tiny_args = [a for a in TINY if not a.startswith("optim.epochs")]
    argv = ["--out", str(tmp_path / "run"), "--max-steps", "1", "--no-progress", *tiny_args]
    assert supervised_run.main([*argv, "--knn-data", str(tmp_path / "held" / "train.rec")], stage=0) == 0
    out = capsys.readouterr().out
    assert "k-NN check before: 1-NN top-1" in out and "(6 faces of train.rec, 3 identities)" in out
    assert (
        "k-NN check after:" in out
        and "k-NN check floor:  1-NN top-1" in out
        and "(raw pixels of the same faces)" in out
    )
    (tmp_path / "folder" / "a").mkdir(parents=True)
    (tmp_path / "folder" / "a" / "0.jpg").write_bytes(jpeg_bytes(faces[0]))  # an image folder, not a rec
    assert supervised_run.main([*argv, "--overwrite", "--knn-data", str(tmp_path / "folder")], stage=0) == 2
    assert "is not a .rec; pack labelled faces with `lafs-fast data build`" in capsys.readouterr().err
