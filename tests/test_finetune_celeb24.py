"""Stage 2 learns on real faces (issue 14 item 3; docs/finetuning.md): a short run on celeb24's
training people reaches a train accuracy above chance, measured on every training face after
the run (nearest class centre by plain cosine), and the held-out check names its raw-pixel floor.
Skips when ../shared/data/celeb24 is absent (a user's clone)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from lafs_fast.config import config_to_dict, load_config
from lafs_fast.data.folder import build_rec
from lafs_fast.eval.knn import ImageInputs, knn_faces
from lafs_fast.models.checkpoints import load_model
from lafs_fast.train import supervised_run
from tests import SHARED

CELEB24 = SHARED / "data" / "celeb24"
PEOPLE, PER_PERSON = 6, 12

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread


def _subset(root: Path, people: list[str], per_person: int) -> Path:
    """An image folder of symlinks: ``per_person`` files of each person, evenly spaced."""
    for p in people:
        files = sorted((CELEB24 / p).iterdir())
        (root / p).mkdir(parents=True)
        for f in files[:: max(1, len(files) // per_person)][:per_person]:
            os.symlink(f, root / p / f.name)
    return root


def _plain_accuracy(model_path: Path, rec: Path) -> float:
    """Fraction of the rec's faces whose nearest class centre (cosine) is their own class."""
    model = load_model(model_path).eval()
    faces = knn_faces(str(rec), torch.device("cpu"))  # every face of a rec this small, decoded as the loaders do
    with torch.no_grad():
        cos = model.head.cosine(model(ImageInputs.eval_tokens(faces.images)))
    return float((cos.argmax(dim=1) == faces.labels).float().mean())


def test_stage2_on_celeb24_reaches_train_accuracy_above_chance(tmp_path, capsys):
    if not CELEB24.is_dir():
        pytest.skip("../shared/data/celeb24 not present (a user's clone has no shared/)")
    people = sorted(p.name for p in CELEB24.iterdir() if p.is_dir())
    held = people[::3]  # every third person is never trained on
    train = [p for p in people if p not in held]
    build_rec(_subset(tmp_path / "train_src", train[:PEOPLE], PER_PERSON), tmp_path / "train", progress=False)
    build_rec(_subset(tmp_path / "held_src", held[:4], PER_PERSON), tmp_path / "held", progress=False)
    out = tmp_path / "run"
    cfg = load_config(
        "small",
        None,
        [
            "model.dim=64",
            "model.depth=2",
            "model.heads=2",
            "model.head_dim=32",
            "model.mlp_dim=128",
            f"data.path={tmp_path / 'train'}",
            f"train.out_dir={out}",
            "data.workers=0",
            "data.loader=pil",
            "optim.batch_size=12",
            "optim.epochs=15",
            "train.log_every=10",
            "train.device=cpu",  # CPU semantics even where a GPU runs the suite
        ],
        defaults=supervised_run.stage_defaults("small"),
    )
    opts = {"check": True, "knn_data": str(tmp_path / "held" / "train.rec"), "progress": False}
    res = supervised_run.train_worker(config_to_dict(cfg), 2, opts)
    acc = _plain_accuracy(out / "part_fvit.pt", tmp_path / "train" / "train.rec")
    chance = 1 / PEOPLE
    print(f"celeb24 stage 2: train accuracy {acc:.1%} (chance {chance:.1%}); held-out {res['check_after']}")
    # measured 41.7 % (seed 0), 29.2 % (seeds 1 and 2): chance is 16.7 %; the margin CE itself stays near its
    # equal-cosine plateau in so short a run, which is why the test reads the plain accuracy
    assert acc >= 1.5 * chance, acc
    assert res["check_floor"]["knn_top1"] > 25.0  # the pixels of 4 aligned people: a real floor, printed
    assert "k-NN check floor:" in capsys.readouterr().out
