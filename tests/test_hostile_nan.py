"""No silent NaN (issue 25 item 3): a non-finite weight, embedding, ONNX output, config value or a
corrupt RecordIO header flag is refused in one sentence instead of giving a wrong result with exit 0.

Each probe plants the fault the issue found and asserts the refusal (and its one sentence)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lafs_fast.cli import main as lafs_main
from lafs_fast.config import load_config
from lafs_fast.data.recordio import RecordIOReader
from lafs_fast.eval.embedder import Embedder
from lafs_fast.eval.loading import load_eval_model
from lafs_fast.io import atomic_save, safe_load
from lafs_fast.models.checkpoints import TRAIN_FORMAT, load_model
from lafs_fast.train.checkpointing import load_checkpoint
from tests import one_sentence
from tests.test_data_recordio import raw_record, write_raw
from tests.test_eval_util import faces, tiny_model_file

NAN_KEY = "transformer.layers.0.0.fn.fn.to_qkv.weight"


def nan_model_file(tmp_path: Path, value: float = float("nan")) -> Path:
    """A tiny lafs-fast model file with ONE non-finite backbone weight."""
    path = tiny_model_file(tmp_path / "good.pt")
    obj = safe_load(path)
    obj["backbone"][NAN_KEY][0, 0] = value
    atomic_save(obj, tmp_path / "nan.pt")
    return tmp_path / "nan.pt"


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weight_is_refused_at_load_naming_the_tensor(tmp_path: Path, value: float) -> None:
    path = nan_model_file(tmp_path, value)
    with pytest.raises(ValueError, match=rf"backbone: tensor {NAN_KEY} holds 1 NaN or infinite value") as exc:
        load_eval_model(path)
    assert one_sentence(str(exc.value)) and str(path) in str(exc.value)
    with pytest.raises(ValueError, match=NAN_KEY):
        load_model(path)  # training's --init and the landmark views use this loader
    load_eval_model(tmp_path / "good.pt")  # the finite original still loads


def test_cli_embed_eval_show_refuse_a_nan_model(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = nan_model_file(tmp_path)
    (tmp_path / "faces" / "a").mkdir(parents=True)
    from PIL import Image

    Image.fromarray(faces(1)[0]).save(tmp_path / "faces" / "a" / "0.png")
    runs = [
        ["embed", str(tmp_path / "faces"), "--model", str(path), "--out", str(tmp_path / "e.npz"), "--no-progress"],
        ["embed", "--model", str(path), "--export-onnx", str(tmp_path / "m.onnx"), "--onnx-exporter", "torchscript"],
        ["checkpoint", "show", str(path)],
    ]
    for argv in runs:
        assert lafs_main(argv) == 2, argv
        err = capsys.readouterr().err
        assert NAN_KEY in err and one_sentence(err), (argv, err)
    assert not (tmp_path / "e.npz").exists() and not (tmp_path / "m.onnx").exists()


def test_resume_refuses_a_checkpoint_with_a_nan_weight(tmp_path: Path) -> None:
    ck = {"format": TRAIN_FORMAT, "model": {"stage.head.weight": torch.tensor([1.0, float("nan")])}}
    torch.save(ck, tmp_path / "ckpt-00000010.pt")
    with pytest.raises(ValueError, match=r"model: tensor stage\.head\.weight holds 1 NaN or infinite value"):
        load_checkpoint(tmp_path / "ckpt-00000010.pt")
    ck["model"]["stage.head.weight"][1] = 0.0
    torch.save(ck, tmp_path / "ckpt-00000010.pt")
    assert load_checkpoint(tmp_path / "ckpt-00000010.pt")["format"] == TRAIN_FORMAT


def _poisoned_model(tmp_path: Path):
    """A finite file's model with a NaN weight set in memory (the load-time check cannot see it):
    what a finite model overflowing in its compute gives."""
    model = load_eval_model(tiny_model_file(tmp_path / "good.pt"))[0]
    with torch.no_grad():
        model.backbone.state_dict()[NAN_KEY][0, 0] = float("nan")
    return model


def test_embedder_refuses_non_finite_embeddings(tmp_path: Path) -> None:
    emb = Embedder(_poisoned_model(tmp_path), batch_size=2, flip=False)
    imgs = faces(3)
    for items, first in (([Path("a.jpg"), Path("b.jpg"), Path("c.jpg")], "a.jpg"), (list(enumerate(imgs)), "face 0")):
        with pytest.raises(ValueError, match=rf"NaN or infinite embedding for 2 of 2 faces .*first: {first}") as exc:
            emb.embed_items(items, lambda it: imgs[0], workers=0)
        assert one_sentence(str(exc.value))


def test_onnx_parity_counts_nan_as_failure(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from lafs_fast.eval.onnx_export import export_onnx

    out = tmp_path / "m.onnx"
    with pytest.raises(ValueError, match="NaN or infinite embeddings") as exc:
        export_onnx(_poisoned_model(tmp_path), out, exporter="torchscript")
    assert one_sentence(str(exc.value)) and not out.exists()


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("optim.lr=inf", r"'optim.lr' must be >= 0, got inf"),
        ("optim.clip_grad=inf", r"'optim.clip_grad' must be >= 0, got inf"),
        ("views.perturb_sigma=inf", r"'views.perturb_sigma' must be >= 0, got inf"),
        ("model.ln_eps=-inf", r"'model.ln_eps' must be > 0, got -inf"),
        ("optim.lr=nan", r"'optim.lr' must be >= 0, got nan"),
    ],
)
def test_range_table_rejects_inf_and_nan(override: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        load_config("small", overrides=[override])


def test_corrupt_header_flag_is_a_corrupt_record_not_a_label(tmp_path: Path) -> None:
    """flag 2^30: 4 * flag wrapped to 0 in uint32, so the image's first bytes (here float 2^24) were
    read as the label and the range check blamed num_classes; it is a record too short for its flag."""
    recs = {
        1: raw_record(0, 0.0, 1, 0, [], b"img-one"),
        2: raw_record(1 << 30, 1.0, 2, 0, [], b"\x00\x00\x80\x4bimage-two"),
        3: raw_record(0, 1.0, 3, 0, [], b"i3"),
    }
    with RecordIOReader(write_raw(tmp_path / "d", recs, [1, 2, 3], "2,112,112\n")) as r:
        labels, bad = r.scan_labels()
        assert np.isnan(labels[1]) and labels[[0, 2]].tolist() == [0.0, 1.0]
        assert bad == {2: "a record payload declares 1073741824 labels but holds only 13 bytes after its header"}
        r.check_labels()  # the corrupt record is the loaders' to skip, not a num_classes problem
        with pytest.raises(ValueError, match="key 2 .* is corrupt"):
            r.record(2)


def test_a_stride_0_tensor_of_a_huge_shape_is_checked_as_stored(tmp_path: Path) -> None:
    """A crafted file can hold a view of 2^40 elements over one stored float (stride 0): torch.load
    rebuilds it for free, and the NaN check must not expand it (a bool per viewed element: 1 TB)."""
    from lafs_fast.io import safe_load
    from lafs_fast.models.checkpoints import check_finite

    for value, refused in ((1.0, False), (float("nan"), True)):
        huge = torch.tensor([value]).as_strided((2**20, 2**20), (0, 0))
        torch.save({"w": huge}, tmp_path / "huge.pt")
        loaded = safe_load(tmp_path / "huge.pt")["w"]
        assert loaded.shape == (2**20, 2**20) and loaded.stride() == (0, 0)
        if refused:
            with pytest.raises(ValueError, match=r"tensor w holds 1 NaN"):
                check_finite({"w": loaded}, "huge.pt")
        else:
            check_finite({"w": loaded}, "huge.pt")  # instant, no allocation of the viewed size
