"""Verification end to end: flip-sum embeddings, .bin evaluation, make-bin, the eval command, ORL."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from lafs_fast.data import make_bin
from lafs_fast.data.binfile import load_bin, write_bin
from lafs_fast.data.make_bin import random_pairs, read_pairs_txt
from lafs_fast.eval import cli as eval_cli
from lafs_fast.eval.embedder import Embedder
from lafs_fast.eval.verification import evaluate_bin, format_table, load_scores
from lafs_fast.models.checkpoints import load_model
from tests.test_eval_util import faces, jpeg, run_command, tiny_model_file


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return tiny_model_file(tmp_path_factory.mktemp("m") / "tiny.pt")


def _synthetic_bin(path, n_pairs=20, seed=0):
    """Genuine pair = one face at two JPEG qualities; impostor = two different faces."""
    f = faces(2 * n_pairs, seed)
    images, same = [], []
    for i in range(n_pairs):
        if i % 2 == 0:
            images += [jpeg(f[2 * i], 95), jpeg(f[2 * i], 70)]
        else:
            images += [jpeg(f[2 * i]), jpeg(f[2 * i + 1])]
        same.append(i % 2 == 0)
    write_bin(path, images, same)
    return path


def test_flip_sum_is_sum_of_both_embeddings(model_path):
    model = load_model(model_path)
    emb = Embedder(model, batch_size=3)
    x = faces(4, seed=3)
    got = emb.embed_batch(x)
    t = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255 * 2 - 1  # the training normalisation
    with torch.no_grad():
        want = model(t) + model(t.flip(-1))
    assert got.shape == (4, 32) and got.dtype == np.float32
    np.testing.assert_allclose(got, want.numpy(), atol=1e-5)
    assert "x/255*2-1" in emb.describe() and "Part fViT" in emb.describe()
    ref = Embedder(model, input_norm="reference", flip=False).embed_batch(x)
    with torch.no_grad():
        np.testing.assert_allclose(ref, model(t / 2).numpy(), atol=1e-5)  # x/255 - 0.5 == t / 2


def test_bare_fvit_uses_the_regular_grid(tmp_path):
    model = load_model(tiny_model_file(tmp_path / "bb.pt", landmarks=False))
    emb = Embedder(model)
    assert "regular 14x14 grid" in emb.describe()
    assert emb.embed_batch(faces(2)).shape == (2, 32)
    with pytest.raises(ValueError, match="no landmark CNN"):
        emb.landmarks(faces(1))


def test_evaluate_bin_numbers_in_range(model_path, tmp_path):
    path = _synthetic_bin(tmp_path / "syn.bin")
    r = evaluate_bin(Embedder(load_model(model_path), batch_size=16), path, nfolds=10, progress=False)
    assert r.name == "syn" and r.pairs == 20 and r.genuine == 10
    assert 0.0 <= r.accuracy <= 1.0 and 0.0 <= r.std <= 0.5 and len(r.fold_accuracy) == 10
    assert r.scores.shape == (20,) and np.all(np.abs(r.scores) <= 1 + 1e-6)
    # near-identical images score higher than different ones, even for a random network
    assert r.scores[r.labels].mean() > r.scores[~r.labels].mean()
    assert np.isnan(r.tar[1e-4]) and 0 <= r.tar[1e-1] <= 1  # 10 impostors: only FAR >= 0.1 is measurable
    table = format_table([r])
    assert "syn" in table and "n/a" in table


def test_eval_command_several_sets_writes_results(model_path, tmp_path, capsys):
    a = _synthetic_bin(tmp_path / "sets" / "a.bin", 20, seed=1)
    _synthetic_bin(tmp_path / "sets" / "b.bin", 20, seed=2)
    out = tmp_path / "out"
    rc = run_command(
        eval_cli,
        [str(model_path), str(a.parent), "--out", str(out), "--device", "cpu", "--no-progress", "--batch-size", "16"],
    )
    assert rc == 0
    printed = capsys.readouterr()
    assert "a " in printed.out and "b " in printed.out and "x/255*2-1" in printed.out
    res = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in res["results"]] == ["a", "b"]
    assert res["input_norm"] == "train" and res["flip"] is True
    assert all(0 <= r["accuracy"] <= 1 for r in res["results"]) and res["results"][0]["tar"]["0.0001"] is None
    name, scores, labels = load_scores(out / "a_scores.npz")
    assert name == "a" and scores.shape == (20,) and labels.sum() == 10
    assert (out / "results.txt").read_text().startswith("set")


def test_corrupt_image_in_bin_is_named(model_path, tmp_path):
    write_bin(tmp_path / "bad.bin", [jpeg(faces(1)[0]), b"\xff\xd8 not a jpeg"], [True])
    with pytest.raises(ValueError, match="bad.bin: image 1 cannot be decoded"):
        evaluate_bin(Embedder(load_model(model_path)), tmp_path / "bad.bin", nfolds=0, progress=False)


def test_eval_command_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.bin does not exist"):
        eval_cli.resolve_sets([str(tmp_path / "nope.bin")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no .bin file"):
        eval_cli.resolve_sets([str(tmp_path / "empty")])


def _lfw_like(root, n_ids=4, per_id=3):
    imgs = faces(n_ids * per_id, seed=7)
    for i in range(n_ids):
        d = root / f"Person_{i}"
        d.mkdir(parents=True)
        for j in range(per_id):
            (d / f"Person_{i}_{j + 1:04d}.jpg").write_bytes(jpeg(imgs[i * per_id + j]))
    return root


def test_make_bin_from_pairs_txt_keeps_order_and_bytes(tmp_path):
    root = _lfw_like(tmp_path / "lfw")
    (tmp_path / "pairs.txt").write_text("1\t2\nPerson_0\t1\t3\nPerson_1\t2\tPerson_3\t1\n")
    pairs = read_pairs_txt(tmp_path / "pairs.txt", root)
    assert [(a.name, b.name, s) for a, b, s in pairs] == [
        ("Person_0_0001.jpg", "Person_0_0003.jpg", True),
        ("Person_1_0002.jpg", "Person_3_0001.jpg", False),
    ]
    rc = run_command(make_bin, [str(root), str(tmp_path / "o.bin"), "--pairs", str(tmp_path / "pairs.txt")])
    assert rc == 0
    bs = load_bin(tmp_path / "o.bin")
    assert bs.issame.tolist() == [True, False]
    assert bs.images[3] == (root / "Person_3" / "Person_3_0001.jpg").read_bytes()  # 112 JPEG kept byte for byte
    (tmp_path / "bad.txt").write_text("Person_0\tone\t3\n")
    with pytest.raises(ValueError, match="line 1: expected"):
        read_pairs_txt(tmp_path / "bad.txt", root)
    (tmp_path / "bad2.txt").write_text("Person_0\t1\t9\n")
    with pytest.raises(ValueError, match="no image number 9"):
        read_pairs_txt(tmp_path / "bad2.txt", root)


def test_random_pairs_are_balanced_distinct_and_seeded(tmp_path):
    root = _lfw_like(tmp_path / "ids", n_ids=5, per_id=4)
    p1 = random_pairs(root, 20, seed=3, folds=2)
    assert p1 == random_pairs(root, 20, seed=3, folds=2) and p1 != random_pairs(root, 20, seed=4, folds=2)
    assert [s for _, _, s in p1] == [True] * 5 + [False] * 5 + [True] * 5 + [False] * 5
    assert len({(a, b) for a, b, _ in p1}) == 20
    assert all((a.parent == b.parent) == s and a != b for a, b, s in p1)
    with pytest.raises(ValueError, match="at most"):
        random_pairs(root, 200, seed=0)


def test_orl_end_to_end(orl_dir, model_path, tmp_path, capsys):
    """ORL (40 people x 10 grey 92x112 PGM) -> make-bin -> eval with a tiny random model."""
    out_bin = tmp_path / "orl.bin"
    assert run_command(make_bin, [str(orl_dir), str(out_bin), "--num-pairs", "60", "--seed", "1"]) == 0
    assert "60 pairs (30 genuine)" in capsys.readouterr().out
    bs = load_bin(out_bin)
    assert bs.num_pairs == 60 and int(bs.issame.sum()) == 30
    with Image.open(io.BytesIO(bs.images[0])) as im:
        assert im.format == "JPEG" and im.size == (112, 112) and im.mode == "RGB"
    rc = run_command(eval_cli, [str(model_path), str(out_bin), "--device", "cpu", "--no-progress", "--json"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)["results"][0]
    assert res["name"] == "orl" and res["pairs"] == 60 and 0.0 <= res["accuracy"] <= 1.0
    assert 0.0 <= res["tar"]["0.1"] <= 1.0


def test_bf16_and_triton_sampler_paths_match_fp32(model_path):
    """The GPU configuration (bf16 backbone, Triton sampler) on the CPU: Triton under TRITON_INTERPRET."""
    from lafs_fast.sampling import triton_sampler

    model = load_model(model_path)
    x = faces(1, seed=4)
    ref = Embedder(model).embed_batch(x)
    scale = np.abs(ref).max()
    bf16 = Embedder(model, dtype="bf16").embed_batch(x)
    assert np.abs(bf16 - ref).max() < 0.05 * scale
    if triton_sampler()[0] is None:
        pytest.skip("triton not importable here")
    tri = Embedder(model, sampler_backend="triton").embed_batch(x)
    np.testing.assert_allclose(tri, ref, atol=1e-4 * scale)
