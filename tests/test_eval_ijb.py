"""IJB-B/C 1:1: alignment, template pooling by hand, and the whole protocol on a tiny fixture
in the release layout (loose_crop/ + meta/), made here."""

import json

import numpy as np
import pytest

from lafs_fast.data.align import ARCFACE_112 as ARCFACE_TEMPLATE
from lafs_fast.data.align import align_face, similarity_transform
from lafs_fast.eval import cli as eval_cli
from lafs_fast.eval.ijb import read_ijb, template_features, template_pair_scores
from tests.test_eval_util import faces, jpeg, run_command, tiny_model_file


def test_similarity_transform_recovers_a_known_one():
    th, s, t = 0.3, 1.7, np.array([12.0, -4.0])
    r = s * np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    dst = ARCFACE_TEMPLATE @ r.T + t
    m = similarity_transform(ARCFACE_TEMPLATE, dst)
    np.testing.assert_allclose(m, np.c_[r, t], atol=1e-10)


def test_align_integer_shift_returns_the_face():
    face = faces(1, seed=5)[0]
    canvas = np.zeros((200, 180, 3), np.uint8)
    canvas[20:132, 30:142] = face  # face's pixel (x, y) sits at (x + 30, y + 20)
    out = align_face(canvas, ARCFACE_TEMPLATE + [30, 20])
    assert out.shape == (112, 112, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - face.astype(int)).max() <= 1


def test_template_pooling_by_hand():
    templates = np.array([1, 1, 1, 2])
    medias = np.array([10, 10, 11, 20])
    feats = np.array([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [0.0, -5.0]])
    tids, tf = template_features(feats, templates, medias)
    # template 1: mean of media 10 = (2, 0), plus media 11 = (0, 2) -> (2, 2) -> normalised
    assert tids.tolist() == [1, 2]
    np.testing.assert_allclose(tf, [[2**-0.5, 2**-0.5], [0.0, -1.0]])
    np.testing.assert_allclose(
        template_pair_scores(tids, tf, np.array([[1, 2], [2, 1], [1, 1]])), [-(2**-0.5)] * 2 + [1.0]
    )
    with pytest.raises(ValueError, match="template 7"):
        template_pair_scores(tids, tf, np.array([[1, 7]]))


def make_ijb(root, target="ijbc", shuffle_tid=False):
    """3 identities x 2 templates x 2 medias x 1-2 loose crops; every template pair."""
    rng = np.random.default_rng(0)
    crops, meta = root / "loose_crop", root / "meta"
    crops.mkdir(parents=True)
    meta.mkdir()
    base = faces(3, seed=11)
    lines5, tid_lines, n, tid = [], [], 0, 0
    owner = {}
    for ident in range(3):
        for _ in range(2):
            tid += 1
            owner[tid] = ident
            for media in range(2):
                for _ in range(1 + (media + tid) % 2):
                    n += 1
                    ox, oy = rng.integers(5, 40, 2)
                    canvas = np.zeros((170, 160, 3), np.uint8)
                    noisy = np.clip(base[ident].astype(int) + rng.integers(-8, 9, base[ident].shape), 0, 255).astype(
                        np.uint8
                    )
                    canvas[oy : oy + 112, ox : ox + 112] = noisy
                    (crops / f"{n}.jpg").write_bytes(jpeg(canvas))
                    lm = (ARCFACE_TEMPLATE + [ox, oy]).reshape(-1)
                    lines5.append(f"{n}.jpg " + " ".join(f"{v:.3f}" for v in lm) + f" {rng.uniform(0.6, 1.0):.4f}")
                    tid_lines.append(f"{n}.jpg {tid} {tid * 100 + media}")
    if shuffle_tid:
        tid_lines = tid_lines[::-1]
    (meta / f"{target}_name_5pts_score.txt").write_text("\n".join(lines5) + "\n")
    (meta / f"{target}_face_tid_mid.txt").write_text("\n".join(tid_lines) + "\n")
    pairs = [f"{a} {b} {int(owner[a] == owner[b])}" for a in range(1, tid + 1) for b in range(a + 1, tid + 1)]
    (meta / f"{target}_template_pair_label.txt").write_text("\n".join(pairs) + "\n")
    return root


def test_read_ijb_parses_and_joins_by_name(tmp_path):
    a = read_ijb(make_ijb(tmp_path / "a"))
    b = read_ijb(make_ijb(tmp_path / "b", shuffle_tid=True))
    assert a.target == "ijbc" and a.landmarks.shape == (len(a.names), 5, 2) and a.pairs.shape == (15, 2)
    assert a.labels.sum() == 3
    np.testing.assert_array_equal(a.templates, b.templates)
    np.testing.assert_array_equal(a.medias, b.medias)
    (tmp_path / "a" / "meta" / "ijbc_face_tid_mid.txt").write_text("1.jpg 1\n")
    with pytest.raises(ValueError, match="expected 2 numbers per line"):
        read_ijb(tmp_path / "a")


def test_ijb_protocol_end_to_end(tmp_path, capsys):
    root = make_ijb(tmp_path / "IJBC")
    model = tiny_model_file(tmp_path / "tiny.pt")
    out = tmp_path / "out"
    rc = run_command(
        eval_cli,
        [str(model), str(root), "--out", str(out), "--device", "cpu", "--no-progress", "--far", "0.1", "0.5", "--json"],
    )
    assert rc == 0
    res = json.loads(capsys.readouterr().out)["results"][0]
    assert res["kind"] == "ijb" and res["name"] == "IJBC" and res["pairs"] == 15 and res["genuine"] == 3
    assert res["accuracy"] is None  # no k-fold protocol for IJB
    assert 0.0 <= res["tar"]["0.5"] <= 1.0 and 0.0 <= res["tar"]["0.1"] <= 1.0
    assert (out / "IJBC_scores.npz").is_file()
