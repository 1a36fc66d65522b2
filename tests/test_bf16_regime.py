"""The bf16 regime on the CPU: ``train.precision=bf16`` runs the dtypes a GPU run has (bf16 view
tokens, bf16 autocast around each stage) with fp32 where the design needs it (DINO loss, landmark
CNN, detector densification, margin head, k-NN / eval embeddings). Each training command runs once
end to end in bf16 here, so a dtype mismatch that would crash on a GPU fails on the CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lafs_fast.config import config_to_dict, load_config
from lafs_fast.data import SyntheticFaces
from lafs_fast.eval import knn
from lafs_fast.launch import resolve_precision
from lafs_fast.models.checkpoints import load_model
from lafs_fast.train import pretrain, supervised_run
from lafs_fast.train.dino import DINOLoss, DinoStage
from lafs_fast.views import LafsViews
from tests import TINY_DINO, TINY_MODEL

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread

TINY = [
    *TINY_MODEL,
    *TINY_DINO,
    "optim.batch_size=2",
    "optim.epochs=1",
    "optim.warmup_epochs=0",
    "dino.teacher_temp_epochs=1",
    "data.synthetic_identities=2",
    "data.synthetic_images_per_identity=2",
    "train.log_every=1",
    "views.n_local=2",
    "train.device=cpu",
    "train.precision=bf16",
    "train.compile=false",
]
SUP_TINY = [a for a in TINY if not a.startswith("dino.")] + ["optim.batch_size=4", "data.synthetic_identities=4"]


def test_precision_resolution():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_precision("auto", cpu) == "fp32" and resolve_precision("auto", cuda) == "bf16"
    assert resolve_precision("bf16", cpu) == "bf16" and resolve_precision("fp32", cuda) == "fp32"
    with pytest.raises(ValueError, match="train.precision"):
        resolve_precision("fp8", cpu)


def test_bf16_views_give_bf16_tokens_and_fp32_coordinates(tmp_path):
    cfg = load_config("small", None, [*TINY, f"train.out_dir={tmp_path}"])
    stage = DinoStage(cfg, torch.device("cpu"))
    images = SyntheticFaces(2, 1, seed=3).batch(range(2))[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the engine's region around forward_loss
        vb = stage.views(images, seed=1)
    assert vb.global_tokens.dtype == torch.bfloat16 and vb.local_tokens.dtype == torch.bfloat16
    assert vb.global_coords.dtype == torch.float32 and vb.local_coords.dtype == torch.float32


def test_dino_loss_is_fp32_under_bf16_autocast(gen):
    """The loss's cross-entropy matmul runs in fp32 (the spec's), not as a bf16 bmm under autocast."""
    v, g, b, k = 10, 2, 8, 256
    s, t = torch.randn(v * b, k, generator=gen) * 3, torch.randn(g * b, k, generator=gen) * 3
    ref = DINOLoss(k, v, g)(s, t, 0.04)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = DINOLoss(k, v, g)(s, t, 0.04)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)


def test_sinkhorn_and_koleo_are_fp32_under_bf16_autocast(gen):
    """DINOv2's targets and KoLeo term give the fp32 values inside a bf16 autocast region."""
    from lafs_fast.train.dino import koleo_loss

    t, emb = torch.randn(16, 256, generator=gen).clamp(-1, 1), torch.randn(8, 64, generator=gen)
    ref_q, ref_k = DINOLoss(256, 2, 2, centering="sinkhorn").targets(t, 0.04), koleo_loss(emb)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got_q, got_k = DINOLoss(256, 2, 2, centering="sinkhorn").targets(t, 0.04), koleo_loss(emb)
    assert got_q.dtype == got_k.dtype == torch.float32
    torch.testing.assert_close(got_q, ref_q)
    torch.testing.assert_close(got_k, ref_k)


def test_frozen_landmark_cnn_runs_fp32_under_bf16_autocast(tmp_path):
    """The frozen CNN's min-max coordinates in bf16 move in 0.5 px steps: the views keep them fp32."""
    from lafs_fast.io import atomic_save
    from lafs_fast.models.checkpoints import model_file
    from lafs_fast.models.part_fvit import build_backbone, build_landmark_cnn

    cfg = load_config("small", None, [*TINY, f"train.out_dir={tmp_path}", "model.landmark_dropout=0"])
    torch.manual_seed(0)
    ckpt = tmp_path / "s0.pt"
    atomic_save(model_file(cfg.model, build_backbone(cfg.model), landmark_cnn=build_landmark_cnn(cfg.model)), ckpt)
    views = LafsViews(cfg.views.__class__(**{**cfg.views.__dict__, "landmarks": str(ckpt)}), cfg.model)
    clean = torch.rand(2, 3, 3, 112, 112) * 2 - 1
    ref = views.landmarks(clean)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = views.landmarks(clean)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref)


def test_pretrain_bf16_end_to_end_with_the_knn_check(tmp_path):
    """The README's first command in the GPU regime: bf16 tokens reach the k-NN check's fp32 backbone."""
    cfg = load_config("small", None, [*TINY, f"train.out_dir={tmp_path / 's1'}", "train.max_steps=2"])
    summary = pretrain.train_worker(config_to_dict(cfg), {"knn": True, "progress": False})
    assert summary["steps"] == 2
    for key in ("knn_before", "knn_after"):
        assert 0 <= summary[key]["knn_top1"] <= 100 and 0 <= summary[key]["verification"] <= 100
    # the k-NN embeddings are fp32 and equal (to bf16 rounding) an fp32 run of the same weights
    stage = DinoStage(cfg, torch.device("cpu"))
    faces = knn.knn_faces(None, torch.device("cpu"), identities=4, per_identity=2)
    emb = knn.embed(stage.teacher.backbone, stage.views, faces.images)
    assert emb.dtype == torch.float32
    fp32 = LafsViews(cfg.views, cfg.model, out_dtype=torch.float32)
    ref = knn.embed(stage.teacher.backbone, fp32, faces.images, precision="fp32")
    assert (emb - ref).abs().max() < 0.05


def test_supervised_commands_and_eval_in_bf16(tmp_path, capsys):
    """train-landmarks -> finetune from a bf16 pre-training -> embed, all in the bf16 regime."""
    s1 = tmp_path / "s1"
    cfg = load_config("small", None, [*TINY, f"train.out_dir={s1}", "train.max_steps=1"])
    pretrain.train_worker(config_to_dict(cfg), {"knn": False, "progress": False})
    common = ["--max-steps", "1", "--no-progress", *SUP_TINY]
    assert supervised_run.main(["--out", str(tmp_path / "s0"), *common], stage=0) == 0  # with the held-out check
    assert (
        supervised_run.main(
            [
                "--out",
                str(tmp_path / "s2"),
                "--init",
                str(s1 / "teacher.pt"),
                "--landmarks",
                str(tmp_path / "s0" / "part_fvit.pt"),
                *common,
            ],
            stage=2,
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "precision bf16" in out and "held-out check after" in out
    from lafs_fast.eval.embedder import Embedder

    faces = SyntheticFaces(2, 1, seed=9).batch(range(2))[0].numpy()
    for path in (tmp_path / "s2" / "part_fvit.pt", s1 / "teacher.pt"):
        model = load_model(path)
        bf16 = Embedder(model, dtype="bf16").embed_batch(faces)
        ref = Embedder(model, dtype="fp32").embed_batch(faces)
        assert bf16.dtype == np.float32 and np.isfinite(bf16).all()
        assert np.abs(bf16 - ref).max() < 0.05 * np.abs(ref).max()
