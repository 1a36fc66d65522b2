"""Evaluation loads every checkpoint kind: model file, training checkpoint, reference Part fViT / SSL."""

import numpy as np
import pytest
import torch

from lafs_fast.eval.embedder import Embedder
from lafs_fast.eval.loading import load_eval_model
from lafs_fast.io import atomic_save, safe_load
from lafs_fast.models.checkpoints import export_reference
from lafs_fast.models.fvit import FViT
from lafs_fast.models.part_fvit import PartFViT
from tests.test_eval_util import faces, tiny_model_file


def test_every_checkpoint_kind_gives_the_same_embeddings(tmp_path):
    src = tiny_model_file(tmp_path / "model.pt")
    x = faces(2, seed=9)
    model, kind = load_eval_model(src)
    assert kind == "lafs-fast" and isinstance(model, PartFViT) and not model.training
    want = Embedder(model).embed_batch(x)

    export_reference(src, tmp_path / "ref.pt", "part_fvit")
    atomic_save(
        {"format": "lafs-fast-train", "version": 1, "model_file": safe_load(src), "optimizer": {}},
        tmp_path / "train.pt",
    )
    for path, expect in ((tmp_path / "ref.pt", "reference-part-fvit"), (tmp_path / "train.pt", "training checkpoint")):
        m, k = load_eval_model(path, head_dim=16)  # reference files do not record the head width
        assert k == expect and isinstance(m, PartFViT)
        np.testing.assert_allclose(Embedder(m).embed_batch(x), want, atol=1e-6)

    export_reference(src, tmp_path / "ssl.pt", "ssl")
    m, k = load_eval_model(tmp_path / "ssl.pt", head_dim=16)
    assert k == "reference-ssl"
    np.testing.assert_allclose(Embedder(m).embed_batch(x), want, atol=1e-6)


def test_bare_backbone_and_bad_files(tmp_path):
    m, k = load_eval_model(tiny_model_file(tmp_path / "bb.pt", landmarks=False))
    assert isinstance(m, FViT) and k == "lafs-fast"
    torch.save({"a": torch.zeros(1)}, tmp_path / "junk.pt")
    with pytest.raises(ValueError, match="junk.pt is not a recognised checkpoint"):
        load_eval_model(tmp_path / "junk.pt")
    torch.save({"format": "lafs-fast-train", "model_file": None}, tmp_path / "t.pt")
    with pytest.raises(ValueError, match="training checkpoint without a model file"):
        load_eval_model(tmp_path / "t.pt")
    with pytest.raises(FileNotFoundError):
        load_eval_model(tmp_path / "missing.pt")
