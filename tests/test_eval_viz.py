"""`lafs-fast viz`: landmarks on faces, ROC curves and training curves as PNG files."""

import json

import numpy as np
import pytest
from PIL import Image

from lafs_fast.data.binfile import write_bin
from lafs_fast.eval import viz
from lafs_fast.eval.verification import evaluate_scores, save_scores
from tests.test_eval_util import faces, jpeg, run_command, tiny_model_file


def _png(path, min_size=100):
    with Image.open(path) as im:
        assert im.format == "PNG" and min(im.size) >= min_size
        return np.asarray(im.convert("RGB"))


def test_viz_landmarks_from_bin_and_folder(tmp_path, capsys):
    model = tiny_model_file(tmp_path / "tiny.pt")
    f = faces(4, seed=1)
    write_bin(tmp_path / "s.bin", [jpeg(x) for x in f], [True, False])
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(jpeg(f[0]))
    out = tmp_path / "lm.png"
    rc = run_command(
        viz,
        [
            "landmarks",
            str(tmp_path / "s.bin"),
            str(tmp_path / "imgs"),
            "--model",
            str(model),
            "--out",
            str(out),
            "--max",
            "3",
            "--device",
            "cpu",
        ],
    )
    assert rc == 0 and "196 landmarks on 3 faces" in capsys.readouterr().out
    _png(out)
    bare = tiny_model_file(tmp_path / "bare.pt", landmarks=False)
    with pytest.raises(ValueError, match="no landmark CNN"):
        run_command(
            viz, ["landmarks", str(tmp_path / "s.bin"), "--model", str(bare), "--out", str(out), "--device", "cpu"]
        )


def test_viz_roc_from_eval_scores(tmp_path):
    rng = np.random.default_rng(0)
    y = rng.random(400) < 0.5
    s = np.where(y, rng.normal(0.6, 0.1, 400), rng.normal(0.1, 0.1, 400))
    save_scores(tmp_path / "lfw_scores.npz", evaluate_scores("lfw", s, y))
    save_scores(tmp_path / "cfp_scores.npz", evaluate_scores("cfp", s + rng.normal(0, 0.2, 400), y))
    assert run_command(viz, ["roc", str(tmp_path), "--out", str(tmp_path / "roc.png")]) == 0
    _png(tmp_path / "roc.png")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no \\*_scores.npz"):
        run_command(viz, ["roc", str(empty), "--out", str(tmp_path / "r.png")])


def test_viz_curves_from_jsonl(tmp_path, capsys):
    log = tmp_path / "run1" / "metrics.jsonl"
    log.parent.mkdir()
    lines = [
        json.dumps({"step": i, "loss": 5.0 / (i + 1), "lr": 1e-3 * min(1, i / 10), "epoch": i // 20, "note": "x"})
        for i in range(50)
    ]
    log.write_text("\n".join(lines[:25]) + "\n\n" + "\n".join(lines[25:]) + "\n")
    out = tmp_path / "curves.png"
    assert run_command(viz, ["curves", str(log), "--out", str(out)]) == 0
    assert "loss, lr, epoch over step" in capsys.readouterr().out
    _png(out)
    assert run_command(viz, ["curves", str(log), "--keys", "loss", "--out", str(out)]) == 0
    with pytest.raises(ValueError, match="--keys los: not in the metrics logs; their numeric keys: loss, lr, epoch"):
        run_command(viz, ["curves", str(log), "--keys", "loss", "los", "--out", str(out)])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"loss": 1}\n')
    with pytest.raises(ValueError, match='line 1 has no numeric "step"'):
        viz.read_metrics(bad)
    bad.write_text("{not json\n")
    with pytest.raises(ValueError, match="line 1 is not JSON"):
        viz.read_metrics(bad)
