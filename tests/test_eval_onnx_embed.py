"""`lafs-fast embed`: folder embeddings, and ONNX export whose outputs match PyTorch's."""

import numpy as np
import pytest
import torch

from lafs_fast.eval import embed as embed_cmd
from lafs_fast.models.checkpoints import load_model
from tests.test_eval_util import faces, jpeg, run_command, tiny_model_file


def test_embed_folder_npz(tmp_path, capsys):
    model = tiny_model_file(tmp_path / "tiny.pt")
    imgs = faces(5, seed=2)
    for i, im in enumerate(imgs):
        d = tmp_path / "faces" / f"id{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i}.jpg").write_bytes(jpeg(im))
    (tmp_path / "faces" / "notes.txt").write_text("not an image")
    out = tmp_path / "emb.npz"
    rc = run_command(
        embed_cmd,
        [
            str(tmp_path / "faces"),
            "--model",
            str(model),
            "--out",
            str(out),
            "--landmarks",
            "--device",
            "cpu",
            "--no-progress",
            "--batch-size",
            "2",
        ],
    )
    assert rc == 0 and "5 embeddings of dim 32" in capsys.readouterr().out
    with np.load(out, allow_pickle=False) as z:
        assert z["embeddings"].shape == (5, 32) and z["embeddings"].dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(z["embeddings"], axis=1), 1.0, atol=1e-5)
        assert z["paths"].tolist() == ["id0/0.jpg", "id0/2.jpg", "id0/4.jpg", "id1/1.jpg", "id1/3.jpg"]
        assert z["landmarks"].shape == (5, 196, 2)
        from lafs_fast.eval.embedder import Embedder, decode_face

        first = decode_face(tmp_path / "faces" / "id0" / "0.jpg")[None]
        np.testing.assert_allclose(z["landmarks"][0], Embedder(load_model(model)).landmarks(first)[0], atol=1e-4)
        assert "x/255*2-1" in str(z["protocol"])
    with pytest.raises(ValueError, match="--out"):
        run_command(embed_cmd, [str(tmp_path / "faces"), "--model", str(model)])


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_onnx_export_matches_pytorch(tmp_path, capsys, exporter):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    path = tiny_model_file(tmp_path / "tiny.pt")
    out = tmp_path / "partfvit.onnx"
    rc = run_command(embed_cmd, ["--model", str(path), "--export-onnx", str(out), "--onnx-exporter", exporter])
    assert rc == 0 and out.is_file() and "max |onnxruntime - PyTorch|" in capsys.readouterr().out
    import onnxruntime as ort

    model = load_model(path)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = torch.rand(4, 3, 112, 112, generator=torch.Generator().manual_seed(1)) * 2 - 1  # a batch size not exported
    with torch.no_grad():
        want = model(x).numpy()
    got = sess.run(["embedding"], {"images": x.numpy()})[0]
    assert got.shape == (4, 32)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
