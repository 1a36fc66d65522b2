"""Reference checkpoints: key layout, import/export round trips, same embeddings as the reference."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from lafs_fast.compat import ViT_face_landmark_patch8
from lafs_fast.models.checkpoints import export_reference, import_checkpoint, load_model, read_model_file
from tests.test_sampler import mosaic_to_tokens, reference_loop_mosaic

SMALL = dict(
    loss_type="CosFace",
    GPU_ID=None,
    num_class=7,
    image_size=112,
    patch_size=8,
    dim=48,
    depth=2,
    heads=3,
    mlp_dim=64,
    dim_head=16,
    dropout=0.1,
    emb_dropout=0.1,
    with_land=True,
)


def reference_forward(sd: dict, x: torch.Tensor, heads: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference Part fViT forward in eval mode, written from the spec over its state dict:
    0..255 images, MobileNetV3 trunk (run with torch functional ops), min-max coords, per-landmark
    grid_sample loop + mosaic + rearrange, einsum attention with dim**-0.5, CLS LayerNorm."""
    x = x / 255.0 * 2 - 1
    stn = ViT_face_landmark_patch8(**{**SMALL, "dim": dim}).stn  # the trunk's layer graph only
    stn.load_state_dict({k[4:]: v for k, v in sd.items() if k.startswith("stn.")})
    stn.eval()
    t = stn(x).mean(dim=(-2, -1))
    t = F.linear(t, sd["output_layer.1.weight"], sd["output_layer.1.bias"])
    t_min, t_max = t.min(1, keepdim=True)[0], t.max(1, keepdim=True)[0]
    theta = ((t - t_min) / (t_max - t_min) * 111).view(x.shape[0], -1, 2)
    tokens = mosaic_to_tokens(reference_loop_mosaic(x, theta))
    h = F.linear(tokens, sd["patch_to_embedding.weight"], sd["patch_to_embedding.bias"])
    h = torch.cat([sd["cls_token"].expand(h.shape[0], -1, -1), h], 1) + sd["pos_embedding"][:, : h.shape[1] + 1]
    depth = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("transformer.layers."))
    for i in range(depth):
        p = f"transformer.layers.{i}."
        y = F.layer_norm(h, (dim,), sd[p + "0.fn.norm.weight"], sd[p + "0.fn.norm.bias"])
        q, k, v = F.linear(y, sd[p + "0.fn.fn.to_qkv.weight"]).chunk(3, dim=-1)
        q, k, v = (z.reshape(z.shape[0], z.shape[1], heads, -1).transpose(1, 2) for z in (q, k, v))
        attn = (torch.einsum("bhid,bhjd->bhij", q, k) * dim**-0.5).softmax(-1)
        o = torch.einsum("bhij,bhjd->bhid", attn, v).transpose(1, 2).reshape(h.shape[0], h.shape[1], -1)
        h = h + F.linear(o, sd[p + "0.fn.fn.to_out.0.weight"], sd[p + "0.fn.fn.to_out.0.bias"])
        y = F.layer_norm(h, (dim,), sd[p + "1.fn.norm.weight"], sd[p + "1.fn.norm.bias"])
        y = F.linear(
            F.gelu(F.linear(y, sd[p + "1.fn.fn.net.0.weight"], sd[p + "1.fn.fn.net.0.bias"])),
            sd[p + "1.fn.fn.net.3.weight"],
            sd[p + "1.fn.fn.net.3.bias"],
        )
        h = h + y
    emb = F.layer_norm(h[:, 0], (dim,), sd["mlp_head.0.weight"], sd["mlp_head.0.bias"])
    return emb, theta


def randomise_bn(model: torch.nn.Module) -> None:
    """Give BatchNorm non-trivial running statistics so eval mode is really tested."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


def test_reference_state_dict_keys():
    m = ViT_face_landmark_patch8(
        **{**SMALL, "dim": 768, "depth": 12, "heads": 11, "mlp_dim": 2048, "dim_head": 64, "num_class": 100}
    )
    sd = m.state_dict()
    expect = {
        "cls_token": (1, 1, 768),
        "pos_embedding": (1, 197, 768),
        "patch_to_embedding.weight": (768, 192),
        "transformer.layers.11.0.fn.norm.weight": (768,),
        "transformer.layers.0.0.fn.fn.to_qkv.weight": (2112, 768),
        "transformer.layers.0.0.fn.fn.to_out.0.weight": (768, 704),
        "transformer.layers.3.1.fn.fn.net.0.weight": (2048, 768),
        "transformer.layers.3.1.fn.fn.net.3.weight": (768, 2048),
        "mlp_head.0.weight": (768,),
        "loss.weight": (100, 768),
        "output_layer.1.weight": (392, 160),
        "stn.features.0.0.weight": (16, 3, 3, 3),
        "stn.features.4.conv.5.fc.0.weight": (18, 72),
        "stn.features.15.conv.8.running_var": (160,),
    }
    for k, shape in expect.items():
        assert tuple(sd[k].shape) == shape, k
    assert "transformer.layers.0.0.fn.fn.to_qkv.bias" not in sd
    assert sum(v.numel() for k, v in m.named_parameters()) == 67_032_416


def test_compat_model_matches_reference_forward(gen):
    torch.manual_seed(gen.initial_seed())
    model = ViT_face_landmark_patch8(**SMALL, scale_input=True)  # 0..255 in, as reference_forward takes
    randomise_bn(model)
    model.eval()
    x = torch.rand(2, 3, 112, 112, generator=gen) * 255
    emb_ref, theta_ref = reference_forward(model.state_dict(), x, heads=3, dim=48)
    emb = model(x)
    torch.testing.assert_close(emb, emb_ref, rtol=1e-4, atol=1e-4)
    emb2, theta = model(x, visualize=True)
    torch.testing.assert_close(theta, theta_ref, rtol=1e-5, atol=1e-4)
    logits, theta3 = model(x, label=torch.tensor([1, 5]))
    assert logits.shape == (2, 7)
    assert torch.equal(theta3, theta)
    emb4, tokens, _ = model(x, save_token=True)
    assert tokens.shape == (2, 196, 48)


def test_import_reference_part_fvit_gives_same_embeddings(tmp_path, gen):
    torch.manual_seed(gen.initial_seed())
    ref = ViT_face_landmark_patch8(**SMALL)
    randomise_bn(ref)
    ref.eval()
    src = tmp_path / "ref.pth"
    torch.save({f"module.{k}": v for k, v in ref.state_dict().items()}, src)  # DataParallel prefix
    summary = import_checkpoint(src, tmp_path / "ours.pt", head_dim=16)
    assert summary["landmark_cnn"] and summary["num_classes"] == 7 and summary["dim"] == 48
    ours = load_model(tmp_path / "ours.pt")
    x = torch.rand(2, 3, 112, 112, generator=gen) * 255
    torch.testing.assert_close(ours(x / 255 * 2 - 1), ref(x / 255 * 2 - 1), rtol=1e-5, atol=1e-5)
    # export back: the reference's keys, the same tensors
    export_reference(tmp_path / "ours.pt", tmp_path / "back.pth", "part_fvit")
    back = torch.load(tmp_path / "back.pth", weights_only=True)
    assert set(back) == set(ref.state_dict())
    for k, v in ref.state_dict().items():
        assert torch.equal(back[k], v), k


def test_import_ssl_teacher_with_prefixes(tmp_path):
    from lafs_fast.models import DINOHead, FViT

    torch.manual_seed(0)
    vit = FViT(dim=48, depth=2, heads=3, head_dim=16, mlp_dim=64)
    head = DINOHead(48, 100, 64, 32)
    teacher = {f"module.backbone.{k}": v for k, v in vit.state_dict().items()}
    teacher.update({f"module.head.{k}": v for k, v in head.state_dict().items()})
    teacher["module.backbone.mask_token"] = torch.zeros(1, 1, 48)
    student = {k: v + 1 if v.is_floating_point() else v for k, v in teacher.items()}
    torch.save({"student": student, "teacher": teacher, "epoch": 3}, tmp_path / "ssl.pth")
    s = import_checkpoint(tmp_path / "ssl.pth", tmp_path / "t.pt", which="teacher", head_dim=16)
    assert s["dino_head"] and not s["landmark_cnn"] and s["ignored"] == ["mask_token"]
    f = read_model_file(tmp_path / "t.pt")
    for k, v in vit.state_dict().items():
        assert torch.equal(f["backbone"][k], v)
    loaded = load_model(tmp_path / "t.pt")
    assert isinstance(loaded, FViT)
    export_reference(tmp_path / "t.pt", tmp_path / "ssl2.pth", "ssl")
    out = torch.load(tmp_path / "ssl2.pth", weights_only=True)
    assert set(out["teacher"]) == {k[len("module.") :] for k in teacher if "mask_token" not in k}


def test_other_architecture_is_refused_readably(tmp_path):
    torch.save({"cls_token": torch.zeros(1, 1, 8), "pos_embedding": torch.zeros(1, 5, 8)}, tmp_path / "x.pth")
    with pytest.raises(ValueError, match="another architecture"):
        import_checkpoint(tmp_path / "x.pth", tmp_path / "y.pt")
    torch.save({"conv1.weight": torch.zeros(3)}, tmp_path / "resnet.pth")
    with pytest.raises(ValueError, match="not a recognised checkpoint"):
        import_checkpoint(tmp_path / "resnet.pth", tmp_path / "y.pt")
    ref = ViT_face_landmark_patch8(**SMALL).state_dict()
    ref.pop("transformer.layers.1.1.fn.fn.net.3.bias")
    ref["extra.weight"] = torch.zeros(2)
    torch.save(ref, tmp_path / "broken.pth")
    with pytest.raises(
        ValueError, match=r"missing 1: transformer.layers.1.1.fn.fn.net.3.bias; unexpected 1: extra.weight"
    ):
        import_checkpoint(tmp_path / "broken.pth", tmp_path / "y.pt", head_dim=16)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a loadable PyTorch checkpoint"):
        import_checkpoint(tmp_path / "junk.pth", tmp_path / "y.pt")


def test_checkpoint_cli(tmp_path):
    ref = ViT_face_landmark_patch8(**SMALL)
    torch.save(ref.state_dict(), tmp_path / "ref.pth")
    cmd = [sys.executable, "-m", "lafs_fast.cli", "checkpoint"]
    r = subprocess.run(
        cmd + ["import", str(tmp_path / "ref.pth"), str(tmp_path / "o.pt"), "--head-dim", "16"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert "reference-part-fvit" in r.stdout and (tmp_path / "o.pt").is_file()
    r = subprocess.run(
        cmd + ["import", str(tmp_path / "missing.pth"), str(tmp_path / "o2.pt")], capture_output=True, text=True
    )
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr


def _small_model_file(path, gen, head: str | None = None, **model) -> torch.nn.Module:
    """A lafs-fast model file of a small-preset-like Part fViT (attention scale by head dim)."""
    from lafs_fast.config import ModelConfig
    from lafs_fast.io import atomic_save
    from lafs_fast.models.checkpoints import model_file
    from lafs_fast.models.part_fvit import PartFViT, build_backbone, build_landmark_cnn, build_margin_head

    torch.manual_seed(gen.initial_seed())
    m = ModelConfig(dim=48, depth=2, heads=3, head_dim=16, mlp_dim=64, attn_scale="head_dim", **model)
    margin = None if head is None else build_margin_head(head, 48, 5)
    net = PartFViT(build_landmark_cnn(m), build_backbone(m), margin)
    randomise_bn(net)
    atomic_save(model_file(m, net.backbone, net.landmark_cnn, margin), path)
    return net.eval()


def test_export_folds_the_head_dim_attention_scale_exactly(tmp_path, gen):
    """issue 26: the small preset's head_dim**-0.5 scale went out unchanged, and the reference's
    dim**-0.5 gave embeddings up to 0.28 off; now the q weights carry sqrt(dim / head_dim)."""
    net = _small_model_file(tmp_path / "small.pt", gen)
    export_reference(tmp_path / "small.pt", tmp_path / "ref.pth", "part_fvit")
    sd = torch.load(tmp_path / "ref.pth", weights_only=True)
    own = net.backbone.state_dict()["transformer.layers.0.0.fn.fn.to_qkv.weight"]
    torch.testing.assert_close(sd["transformer.layers.0.0.fn.fn.to_qkv.weight"][:48], own[:48] * 3**0.5)
    ref = ViT_face_landmark_patch8(**SMALL)  # the reference's semantics: dim**-0.5
    ref.load_state_dict(sd, strict=False)
    x = torch.rand(2, 3, 112, 112, generator=gen) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(ref.eval()(x), net(x), rtol=1e-5, atol=1e-5)


def test_export_refuses_what_the_reference_cannot_express(tmp_path, gen):
    _small_model_file(tmp_path / "eps.pt", gen, ln_eps=1e-6)
    with pytest.raises(ValueError, match=r"eps.pt: cannot export: the model's LayerNorm eps is 1e-06 .*model.ln_eps"):
        export_reference(tmp_path / "eps.pt", tmp_path / "out.pth")
    _small_model_file(tmp_path / "big.pt", gen, image_size=128, num_patches=196)
    with pytest.raises(ValueError, match=r"cannot export: the reference scales landmarks to 0..111"):
        export_reference(tmp_path / "big.pt", tmp_path / "out.pth")
    _small_model_file(tmp_path / "softmax.pt", gen, head="softmax")
    with pytest.raises(ValueError, match=r"its margin head is a plain softmax classifier .*--format ssl"):
        export_reference(tmp_path / "softmax.pt", tmp_path / "out.pth")
    assert not (tmp_path / "out.pth").exists()
    export_reference(tmp_path / "softmax.pt", tmp_path / "out.pth", "ssl")  # the backbone and landmarks go out
    _small_model_file(tmp_path / "cosface.pt", gen, head="cosface")
    export_reference(tmp_path / "cosface.pt", tmp_path / "cos.pth")
    assert torch.load(tmp_path / "cos.pth", weights_only=True)["loss.weight"].shape == (5, 48)
