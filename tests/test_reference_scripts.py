"""The drop-in claim, tested on the reference's own scripts (issue 26).

``lafs_train.py`` (stage 1) and ``train_largescale.py`` (fine-tuning) from
../shared/reference/LAFS_CVPR2024 run a few CPU steps on a tiny rec, once as published and once with
only their ``from face_pre_pro.ViT_face import ...`` line pointed at ``lafs_fast.compat``
(tests/reference_scripts.py: the CPU / one-process patches and the MXNet stand-in, the same for both
runs); every step's loss must agree within 1e-5, and every checkpoint they write must import into
lafs-fast with the same embeddings. The compat classes are also compared with the reference's
directly: same-seed weights, parameter order, outputs of every keyword. Skips without the reference.
"""

from __future__ import annotations

import importlib
import io
import json
import os
import subprocess
import sys
import types
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

import lafs_fast.compat as compat
from lafs_fast.data.binfile import write_bin
from lafs_fast.data.recordio import RecordIOReader
from lafs_fast.data.recordio_writer import write_identity_dataset
from lafs_fast.models.checkpoints import import_checkpoint, load_model
from tests import reference_scripts as rs

REF_DIR = rs.REF_DIR
HARNESS = Path(rs.__file__)
pytestmark = pytest.mark.skipif(
    not REF_DIR.is_dir(), reason="../shared/reference/LAFS_CVPR2024 not present (a user's clone has no shared/)"
)

# lafs_train.py feeds a 768-wide DINO head (hard-coded), so only depth / heads / MLP shrink there.
STAGE1_SIZES = {"depth": 2, "heads": 2, "dim_head": 32, "mlp_dim": 128}
FINETUNE_SIZES = {"dim": 48, "depth": 2, "heads": 3, "dim_head": 16, "mlp_dim": 64}
N_IDS, PER_ID = 4, 3  # 12 images: 6 batches of 2 in each script
_REF_MODULES = ("face_pre_pro", "utils", "util", "vision_transformer", "image_iter", "supervised_config")


def _faces(n: int) -> list[np.ndarray]:
    """n random 112 x 112 RGB images (uint8) of 8 x 8 blocks (integer ops: the same bytes whatever the
    thread count), so crops, flips and blurs change what the models see."""
    small = np.random.default_rng(0).integers(0, 256, (n, 14, 14, 3), dtype=np.uint8)
    return list(small.repeat(8, axis=1).repeat(8, axis=2))


def _png(a: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def _landmark_file(path: Path) -> None:
    """A landmark CNN checkpoint as the reference's stage 0 saves it (DDP ``module.`` prefix), with
    non-trivial BatchNorm statistics (both scripts run it in eval mode)."""
    torch.manual_seed(5)
    cnn = compat.face_landmark_4simmin_glo_loc(
        loss_type="CosFace", GPU_ID=None, num_class=3, image_size=112, patch_size=8, dim=16, depth=1, heads=1,
        mlp_dim=16, num_patches=196,
    )  # fmt: skip
    g = torch.Generator().manual_seed(1)
    for m in cnn.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    sd = {f"module.{k}": v for k, v in cnn.state_dict().items() if k.startswith(("stn.", "output_layer."))}
    torch.save(sd, path)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny rec (4 identities x 3 images, written by lafs-fast), lfw.bin (2 pairs), the landmark
    CNN file and a small SSL teacher for the fine-tuning script."""
    root = tmp_path_factory.mktemp("refdata")
    faces = _faces(N_IDS * PER_ID)
    ids = [[_png(f) for f in faces[i * PER_ID : (i + 1) * PER_ID]] for i in range(N_IDS)]
    write_identity_dataset(root, ids, height=112, width=112)
    write_bin(root / "lfw.bin", [_png(f) for f in faces[:4]], [True, False])
    _landmark_file(root / "landmark.pth")
    torch.manual_seed(6)
    vit = compat.ViT_face_landmark_patch8(
        loss_type="None", GPU_ID=None, num_class=1, image_size=112, patch_size=8, num_patches=196, **FINETUNE_SIZES
    )
    torch.save({"teacher": {f"backbone.{k}": v for k, v in vit.state_dict().items()}}, root / "ssl.pth")
    return root


def test_mxnet_stand_in_reads_the_recordio_lafs_fast_writes(data: Path, one_thread) -> None:
    rec = rs.MXIndexedRecordIO(str(data / "train.idx"), str(data / "train.rec"), "r")
    ours = RecordIOReader(data / "train.rec")
    assert sorted(rec.keys) == sorted(int(k) for k in ours.keys)
    for key in rec.keys:
        assert rec.read_idx(key) == ours.read_idx(key), key
    header, _ = rs.unpack(rec.read_idx(0))
    assert header.flag == 2
    a, b = int(header.label[0]), int(header.label[1])
    assert b - a == N_IDS
    faces = _faces(N_IDS * PER_ID)
    for label, identity in enumerate(range(a, b)):
        h, _ = rs.unpack(rec.read_idx(identity))
        lo, hi = int(h.label[0]), int(h.label[1])
        assert hi - lo == PER_ID
        for key in range(lo, hi):
            h, img = rs.unpack(rec.read_idx(key))
            assert h.flag == 0 and h.label == label
            np.testing.assert_array_equal(rs.imdecode(img).asnumpy(), faces[key - 1])


def _run(mode: str, script: str, sizes: dict, args: list[str], out: Path) -> list[float]:
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-B", str(HARNESS), mode, script, str(out / "losses.json"), json.dumps(sizes), "--", *args]
    proc = subprocess.run(cmd, cwd=out, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{script} ({mode}) failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads((out / "losses.json").read_text())


def _same_losses(script: str, sizes: dict, args, tmp_path: Path) -> tuple[Path, Path]:
    runs = {}
    for mode in ("reference", "compat"):
        out = tmp_path / mode
        runs[mode] = (_run(mode, script, sizes, args(out), out), out)
    ref, ours = runs["reference"][0], runs["compat"][0]
    assert len(ref) == N_IDS * PER_ID // 2 and len(ours) == len(ref)
    assert np.isfinite(ref).all() and len(set(ref)) > 1
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5)
    return runs["reference"][1], runs["compat"][1]


@pytest.fixture(scope="module")
def ref_vit() -> Iterator[types.ModuleType]:
    """The reference's face_pre_pro.ViT_face, imported in this process (stand-ins and sys.modules restored after)."""
    stashed = {k: sys.modules.pop(k) for k in list(sys.modules) if k.split(".")[0] in _REF_MODULES}
    saved = dict(sys.modules)
    path, bytecode = list(sys.path), sys.dont_write_bytecode
    sys.path.insert(0, str(REF_DIR))
    sys.dont_write_bytecode = True  # leave no __pycache__ in the shared folder
    rs.install_stand_ins()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mod = importlib.import_module("face_pre_pro.ViT_face")
    finally:
        sys.path[:] = path
        sys.dont_write_bytecode = bytecode
    yield mod
    for k in [k for k in sys.modules if k not in saved]:
        del sys.modules[k]
    sys.modules.update(saved)
    sys.modules.update(stashed)


def _reference_model(ref_vit, sd: dict, sizes: dict, **kw):
    m = ref_vit.ViT_face_landmark_patch8(
        loss_type="None", GPU_ID=None, num_class=1, image_size=112, patch_size=8, num_patches=196,
        dropout=0.1, emb_dropout=0.1, **{"dim": 768, **sizes}, **kw,
    )  # fmt: skip
    m.load_state_dict({k: v for k, v in sd.items() if not k.startswith(("loss.", "head."))})
    return m.eval()


def test_lafs_train_runs_on_compat_with_the_same_losses(data: Path, tmp_path: Path, ref_vit, one_thread) -> None:
    def args(out: Path) -> list[str]:
        return [
            "--data_path", str(data), "--landmark_path", str(data / "landmark.pth"), "--output_dir", str(out),
            "--out_dim", "64", "--batch_size_per_gpu", "2", "--epochs", "1", "--warmup_epochs", "0",
            "--warmup_teacher_temp_epochs", "1", "--local_crops_number", "2", "--num_workers", "0",
            "--use_fp16", "False", "--saveckp_freq", "1",
        ]  # fmt: skip

    ref_out, ours_out = _same_losses("lafs_train.py", STAGE1_SIZES, args, tmp_path)
    # the command line, on the reference's own file
    from lafs_fast.cli import main

    cmd = ["checkpoint", "import", str(ref_out / "checkpoint.pth"), str(ref_out / "cli.pt"), "--head-dim", "32"]
    assert main(cmd) == 0 and (ref_out / "cli.pt").is_file()
    # every file it writes imports (numpy scalars and argparse.Namespace inside), same embeddings
    tokens = torch.randn(2, 196, 192, generator=torch.Generator().manual_seed(3))
    for out in (ref_out, ours_out):
        for name in ("checkpoint.pth", "checkpoint0000.pth"):
            for which in ("teacher", "student"):
                dst = out / f"{name}.{which}.pt"
                summary = import_checkpoint(out / name, dst, which=which, head_dim=STAGE1_SIZES["dim_head"])
                assert summary["dino_head"] and summary["num_classes"] == 30000
                sd = torch.load(out / name, weights_only=False)[which]
                sd = {k.removeprefix("module.").removeprefix("backbone."): v for k, v in sd.items()}
                ref = _reference_model(ref_vit, sd, STAGE1_SIZES)
                with torch.no_grad():
                    torch.testing.assert_close(load_model(dst)(tokens), ref(tokens), rtol=1e-5, atol=1e-5)


def test_train_largescale_runs_on_compat_with_the_same_losses(data: Path, tmp_path: Path, ref_vit, one_thread) -> None:
    def args(out: Path) -> list[str]:
        return [
            "-w", "cpu", "-e", "1", "-b", "2", "-t", "lfw", "-r", "", "--pretrain_path", str(data / "landmark.pth"),
            "--model_dir", str(data / "ssl.pth"), "--dataset_path", str(data), "--eval_root", str(data),
            "--outdir", str(out), "--mixup", "0", "--fp16", "", "--warmup-epochs", "0",
        ]  # fmt: skip

    ref_out, ours_out = _same_losses("train_largescale.py", FINETUNE_SIZES, args, tmp_path)
    x = torch.rand(2, 3, 112, 112, generator=torch.Generator().manual_seed(4)) * 2 - 1
    for out in (ref_out, ours_out):
        src = out / "Backbone_VIT_land_8_checkpoint.pth"
        sd = torch.load(src, weights_only=True)
        assert all(k.startswith("module.") for k in sd)  # DDP's prefix, as its save line writes it
        summary = import_checkpoint(src, out / "imported.pt", head_dim=FINETUNE_SIZES["dim_head"])
        assert summary["landmark_cnn"] and summary["num_classes"] == 205990
        ref = _reference_model(
            ref_vit, {k.removeprefix("module."): v for k, v in sd.items()}, FINETUNE_SIZES, with_land=True
        )
        with torch.no_grad():
            torch.testing.assert_close(load_model(out / "imported.pt")(x), ref(x), rtol=1e-5, atol=1e-5)


VIT = dict(
    loss_type="CosFace", GPU_ID=None, num_class=30, image_size=112, patch_size=8, dim=48, depth=2, heads=3,
    dim_head=16, mlp_dim=64, num_patches=196, dropout=0.1, emb_dropout=0.1,
)  # fmt: skip
LANDMARK = dict(
    loss_type="CosFace", GPU_ID=None, num_class=300, num_patches=196, image_size=112, patch_size=8, dim=32,
    depth=12, heads=11, mlp_dim=2560, dropout=0.1, emb_dropout=0.1,
)  # fmt: skip


def _built(cls, kw: dict) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    m = cls(**kw)
    return m, torch.get_rng_state()


def _same_module(ref_cls, ours_cls, kw: dict) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Same seed -> same parameter names in the same order, the same tensors, the same RNG state after."""
    ref, ref_rng = _built(ref_cls, kw)
    ours, ours_rng = _built(ours_cls, kw)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
    rsd, osd = ref.state_dict(), ours.state_dict()
    assert list(osd) == list(rsd)
    assert [k for k in rsd if not torch.equal(rsd[k], osd[k])] == []
    assert torch.equal(ours_rng, ref_rng)
    return ref, ours


def _same_outputs(ref, ours, *args, **kwargs) -> None:
    outs = []
    for m in (ref, ours):
        torch.manual_seed(7)
        out = m(*args, **kwargs)
        outs.append(list(out) if isinstance(out, tuple) else [out])
    assert len(outs[0]) == len(outs[1])
    for a, b in zip(*outs):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=2e-5)


def test_compat_takes_the_reference_keywords(ref_vit) -> None:
    import inspect

    def names(f) -> set[str]:
        return {p.name for p in inspect.signature(f).parameters.values() if p.kind is not p.VAR_KEYWORD} - {"self"}

    for cls in (compat.ViT_face_landmark_patch8, compat.face_landmark_4simmin_glo_loc):
        ref_cls = getattr(ref_vit, cls.__name__)
        assert names(cls.forward) >= names(ref_cls.forward)
        assert names(cls.__init__) | getattr(cls, "IGNORED", set()) >= names(ref_cls.__init__)
    with pytest.raises(TypeError, match="unexpected keyword arguments with_land"):
        compat.face_landmark_4simmin_glo_loc(**LANDMARK, with_land=True)


def test_compat_classes_match_the_reference_classes(ref_vit, monkeypatch, one_thread) -> None:
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)  # the reference's .cuda() calls
    g = torch.Generator().manual_seed(2)
    tokens, images = torch.randn(2, 196, 192, generator=g), torch.rand(2, 3, 112, 112, generator=g) * 2 - 1
    label = torch.tensor([1, 7])
    ref, ours = _same_module(ref_vit.ViT_face_landmark_patch8, compat.ViT_face_landmark_patch8, VIT)
    _same_outputs(ref, ours, tokens)  # train mode: dropout and drop-path draw alike
    _same_outputs(ref, ours, torch.randn(2, 36, 192, generator=g), keep_num=36, glo_diff=True)
    _same_outputs(ref, ours, images)  # no landmarks: a 14 x 14 grid of the (already normalised) image
    kw = {**VIT, "with_land": True}
    ref, ours = _same_module(ref_vit.ViT_face_landmark_patch8, compat.ViT_face_landmark_patch8, kw)
    for m in (ref, ours):
        m.eval()
    _same_outputs(ref, ours, images)
    _same_outputs(ref, ours, images, visualize=True)
    _same_outputs(ref, ours, images, label=label)
    _same_outputs(ref, ours, images, save_token=True)
    kw = {**VIT, "use_standcoord": True, "Random_prob": True, "shuffle": True}
    ref, ours = _same_module(ref_vit.ViT_face_landmark_patch8, compat.ViT_face_landmark_patch8, kw)
    _same_outputs(ref, ours, images, visualize=True)
    ref, ours = _same_module(ref_vit.face_landmark_4simmin_glo_loc, compat.face_landmark_4simmin_glo_loc, LANDMARK)
    aug = torch.rand(2, 3, 112, 112, generator=g) * 2 - 1
    for mode in ("train", "eval"):
        for m in (ref, ours):
            getattr(m, mode)()
        _same_outputs(ref, ours, images)
        _same_outputs(ref, ours, images, x_Aug=aug, Random_prob=True, return_prob=True, random_coor=False)
        _same_outputs(ref, ours, images, x_Aug=aug, Random_prob=True, ran_sample=True, random_coor=False)
        _same_outputs(ref, ours, images, Random_prob=True)
        _same_outputs(ref, ours, images, random_coor=True)
        _same_outputs(ref, ours, images, return_land=True)
    assert ours.patch_size == 8


def test_an_exported_small_model_gives_its_embeddings_in_the_reference_class(ref_vit, tmp_path, one_thread) -> None:
    """The small preset scales attention by head_dim**-0.5; the reference by dim**-0.5: export folds it."""
    from lafs_fast.models.checkpoints import export_reference
    from tests.test_checkpoints import _small_model_file

    net = _small_model_file(tmp_path / "small.pt", torch.Generator().manual_seed(8))
    export_reference(tmp_path / "small.pt", tmp_path / "ref.pth", "part_fvit")
    ref = _reference_model(ref_vit, torch.load(tmp_path / "ref.pth", weights_only=True), FINETUNE_SIZES, with_land=True)
    x = torch.rand(2, 3, 112, 112, generator=torch.Generator().manual_seed(9)) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(ref(x), net(x), rtol=1e-5, atol=1e-5)
