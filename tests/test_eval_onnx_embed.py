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


def _tiny_onnx(tmp_path):
    """(model file, its torchscript ONNX export, folder of 4 faces) for the metadata tests."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    path = tiny_model_file(tmp_path / "tiny.pt")
    onnx_path = tmp_path / "tiny.onnx"
    assert (
        run_command(
            embed_cmd, ["--model", str(path), "--export-onnx", str(onnx_path), "--onnx-exporter", "torchscript"]
        )
        == 0
    )
    folder = tmp_path / "faces" / "a"
    folder.mkdir(parents=True)
    for i, im in enumerate(faces(4, seed=3)):
        (folder / f"{i}.jpg").write_bytes(jpeg(im))
    return path, onnx_path, folder.parent


def _embed(model, folder, out, *extra) -> np.ndarray:
    argv = [str(folder), "--model", str(model), "--out", str(out), "--device", "cpu", "--no-progress", *extra]
    assert run_command(embed_cmd, argv) == 0
    with np.load(out, allow_pickle=False) as z:
        return z["embeddings"]


def test_onnx_export_carries_metadata_that_embed_and_eval_read_back(tmp_path, capsys):
    """The exported .onnx says RGB, x/255*2-1, 112, no flip-sum, its dim and the version; `embed`
    on it gives the PyTorch model's embeddings (flip-sum added by the embedder), `eval` runs it."""
    import onnx

    from lafs_fast import __version__
    from lafs_fast.data.binfile import write_bin
    from lafs_fast.eval import cli as eval_cmd

    path, onnx_path, folder = _tiny_onnx(tmp_path)
    meta = {p.key: p.value for p in onnx.load(str(onnx_path)).metadata_props}
    assert meta == {
        "lafs_fast.metadata_format": "1",
        "lafs_fast.version": __version__,
        "lafs_fast.model": "Part fViT",
        "lafs_fast.input_color_order": "RGB",
        "lafs_fast.input_layout": "NCHW float32",
        "lafs_fast.input_normalisation": "x/255*2-1",
        "lafs_fast.input_size": "112",
        "lafs_fast.flip_sum": "false",
        "lafs_fast.embedding_normalised": "false",
        "lafs_fast.embedding_dim": "32",
    }
    assert "metadata: metadata_format=1" in capsys.readouterr().out
    want = _embed(path, folder, tmp_path / "pt.npz")
    got = _embed(onnx_path, folder, tmp_path / "onnx.npz")
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert "ONNX Part fViT (tiny.onnx, onnxruntime CPUExecutionProvider), dim 32" in capsys.readouterr().err
    imgs = faces(4, seed=4)
    write_bin(tmp_path / "t.bin", [jpeg(im) for im in imgs], [True, False])
    argv = [str(onnx_path), str(tmp_path / "t.bin"), "--nfolds", "2", "--device", "cpu", "--no-progress", "--json"]
    assert run_command(eval_cmd, argv) == 0
    assert '"checkpoint": "ONNX written by lafs-fast' in capsys.readouterr().out
    with pytest.raises(ValueError, match="already ONNX"):
        run_command(embed_cmd, ["--model", str(onnx_path), "--export-onnx", str(tmp_path / "again.onnx")])


def test_onnx_metadata_that_disagrees_is_refused_and_none_is_a_warning(tmp_path, caplog):
    """An .onnx whose metadata says another normalisation, colour order or a flip-sum inside is
    refused in one sentence; one without lafs-fast metadata (a foreign export) runs with a warning."""
    import onnx

    from lafs_fast.eval.onnx_model import stamp_metadata

    _, onnx_path, folder = _tiny_onnx(tmp_path)
    want = _embed(onnx_path, folder, tmp_path / "ok.npz")
    out = tmp_path / "x.npz"
    for key, value, message in (
        ("input_normalisation", "x/255-0.5", r"expects inputs x/255-0\.5 .*; pass --input-norm reference$"),
        ("input_color_order", "BGR", r"input_color_order = 'BGR' in its metadata, but lafs-fast feeds and reads 'RGB'"),
        ("flip_sum", "true", r"flip_sum = 'true'"),
        ("metadata_format", "2", r"metadata format '2' .*upgrade lafs-fast"),
    ):
        bad = tmp_path / f"{key}.onnx"
        bad.write_bytes(onnx_path.read_bytes())
        stamp_metadata(bad, {f"lafs_fast.{key}": value})
        with pytest.raises(ValueError, match=message):
            _embed(bad, folder, out)
    # what the metadata says is also what is used: the reference normalisation runs when asked
    ref = tmp_path / "ref.onnx"
    ref.write_bytes(onnx_path.read_bytes())
    stamp_metadata(ref, {"lafs_fast.input_normalisation": "x/255-0.5"})
    assert not np.allclose(_embed(ref, folder, out, "--input-norm", "reference"), want, atol=1e-3)
    foreign = onnx.load(str(onnx_path))
    del foreign.metadata_props[:]
    onnx.save(foreign, str(tmp_path / "foreign.onnx"))
    with caplog.at_level("WARNING", logger="lafs_fast"):
        got = _embed(tmp_path / "foreign.onnx", folder, out)
    assert "carries no lafs-fast metadata" in caplog.text and "x/255*2-1" in caplog.text
    np.testing.assert_allclose(got, want, atol=1e-6)
    # a foreign graph lafs-fast cannot feed (uint8 input) is refused in one sentence too
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.UINT8, ["B", 3, 112, 112])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["B", 3, 112, 112])
    cast = onnx.helper.make_node("Cast", ["x"], ["y"], to=onnx.TensorProto.FLOAT)
    graph = onnx.helper.make_graph([cast], "u8", [x], [y])
    onnx.save(
        onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)]), str(tmp_path / "u8.onnx")
    )
    with pytest.raises(ValueError, match=r"takes tensor\(uint8\) .*not float32 images"):
        _embed(tmp_path / "u8.onnx", folder, out)


def test_onnx_device_picks_the_provider_or_refuses():
    """auto runs on CUDA only where onnxruntime has it; an explicit cuda without it is refused."""
    from lafs_fast.eval.onnx_model import _providers

    cpu_only, both = ["CPUExecutionProvider"], ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert _providers("auto", cpu_only) == ["CPUExecutionProvider"] == _providers("cpu", both)
    assert _providers("cuda:1", both) == [("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]
    assert _providers("auto", both)[0] == ("CUDAExecutionProvider", {"device_id": 0})
    with pytest.raises(ValueError, match="cannot run on cuda .*--device cpu or install onnxruntime-gpu"):
        _providers("cuda", cpu_only)
