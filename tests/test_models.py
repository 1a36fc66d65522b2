"""Model stack: sizes, reference semantics, attention backends, heads, Part fViT gradients."""

import math

import pytest
import torch
import torch.nn.functional as F

from lafs_fast.config import load_config
from lafs_fast.models import (
    ArcFace,
    CosFace,
    DINOHead,
    FViT,
    LandmarkCNN,
    attention,
    build_backbone,
    build_landmark_cnn,
    build_margin_head,
    build_part_fvit,
)
from lafs_fast.models.attention import xformers_status
from lafs_fast.models.sharded_head import ShardedMarginHead


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_reference_sizes():
    cfg = load_config("reference")
    assert n_params(build_backbone(cfg.model)) == 64_082_688
    lm = build_landmark_cnn(cfg.model)
    assert n_params(lm.stn) == 2_809_816
    assert n_params(lm.output_layer) == 63_112
    assert n_params(build_part_fvit(cfg, num_classes=100)) == 67_032_416


def test_landmark_cnn_shapes_and_minmax():
    torch.manual_seed(0)
    lm = LandmarkCNN().eval()
    x = torch.rand(3, 3, 112, 112) * 2 - 1
    assert lm.stn(x).shape == (3, 160, 4, 4)
    coords = lm(x)
    assert coords.shape == (3, 196, 2)
    flat = coords.reshape(3, -1)
    torch.testing.assert_close(flat.min(1).values, torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(flat.max(1).values, torch.full((3,), 111.0))


def small_vit(**kw) -> FViT:
    args = dict(dim=48, depth=2, heads=3, head_dim=16, mlp_dim=64, num_patches=196)
    args.update(kw)
    return FViT(**args)


@pytest.mark.parametrize("scale", ["dim", "head_dim"])
def test_attention_backends_agree(scale, gen):
    vit = small_vit(attn_scale=scale).eval()
    tokens = torch.randn(2, 37, 192, generator=gen)
    outs = {}
    for backend in ("math", "sdpa"):
        vit.set_attention(backend)
        outs[backend] = vit(tokens)
    torch.testing.assert_close(outs["sdpa"], outs["math"], rtol=1e-5, atol=1e-5)


def test_attention_scale_is_honoured(gen):
    q, k, v = (torch.randn(2, 5, 3, 16, generator=gen) for _ in range(3))
    for scale in (48**-0.5, 16**-0.5):
        expect = torch.einsum(
            "bhij,bhjd->bhid", (torch.einsum("bihd,bjhd->bhij", q, k) * scale).softmax(-1), v.transpose(1, 2)
        )
        for backend in ("math", "sdpa"):
            torch.testing.assert_close(attention(q, k, v, scale, backend), expect.transpose(1, 2), rtol=1e-5, atol=1e-6)
    assert small_vit(attn_scale="dim").transformer.layers[0][0].fn.fn.scale == 48**-0.5
    assert small_vit(attn_scale="head_dim").transformer.layers[0][0].fn.fn.scale == 16**-0.5


@pytest.mark.skipif(not xformers_status()[0], reason=f"xformers' own kernels do not run here: {xformers_status()[1]}")
def test_xformers_matches_sdpa_on_cuda(gen):
    q, k, v = (torch.randn(2, 197, 4, 64, generator=gen).cuda() for _ in range(3))
    torch.testing.assert_close(
        attention(q, k, v, 0.036, "xformers"), attention(q, k, v, 0.036, "sdpa"), rtol=2e-3, atol=2e-3
    )


def test_xformers_without_its_extension_is_not_reported_as_xformers(monkeypatch):
    """xformers whose _C.so did not load (libcudart.so.12 missing on a CUDA 13 image) still imports
    and still runs -- on torch's flash kernel: ``auto`` must pick SDPA and say why, not claim xformers."""
    import importlib
    import sys
    import types

    att = importlib.import_module("lafs_fast.models.attention")  # the module (the package exports the function)

    fake = types.ModuleType("xformers")
    fake._has_cpp_library = False
    fake._cpp_lib = types.SimpleNamespace(
        _cpp_library_load_exception=OSError("libcudart.so.12: cannot open shared object file")
    )
    ops = types.ModuleType("xformers.ops")
    ops.memory_efficient_attention = lambda q, k, v, **kw: q  # "works", as the fallback does
    fake.ops = ops
    monkeypatch.setitem(sys.modules, "xformers", fake)
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    att.xformers_status.cache_clear()
    try:
        ok, why = att.xformers_extension()
        assert not ok and "libcudart.so.12" in why
        backend, why = att.resolve_attention("auto", torch.device("cuda"))
        assert backend == "sdpa" and "libcudart.so.12" in why
        fake._has_cpp_library = True
        att.xformers_status.cache_clear()
        assert att.xformers_extension()[0]
    finally:
        att.xformers_status.cache_clear()


def test_position_slice_for_short_views(gen):
    """A 36-token view uses positions 0..36: equal to the first 36 tokens of a longer view only
    through pos[:, :37] (checked by zeroing later positions and comparing)."""
    vit = small_vit().eval()
    with torch.no_grad():
        vit.pos_embedding[:, 37:] = 1e3  # would wreck the result if used
    tokens = torch.randn(2, 36, 192, generator=gen)
    ref = vit(tokens)
    with torch.no_grad():
        vit.pos_embedding[:, 37:] = -1e3
    torch.testing.assert_close(vit(tokens), ref)
    with pytest.raises(ValueError, match="exceed"):
        vit(torch.randn(1, 197, 192))


def test_drop_path_constant_per_block():
    vit = build_backbone(load_config("reference").model)
    rates = [blk.drop_path.drop_prob for layer in vit.transformer.layers for blk in layer]
    assert rates == [0.1] * 24


def test_token_init_std():
    torch.manual_seed(0)
    vit = build_backbone(load_config("reference").model)
    assert 0.9 < vit.pos_embedding.std().item() < 1.1  # N(0, 1) as the reference


def test_vit_takes_images_and_landmarks(gen):
    vit = small_vit().eval()
    imgs = torch.rand(2, 3, 112, 112, generator=gen) * 2 - 1
    coords = torch.rand(2, 196, 2, generator=gen) * 111
    from lafs_fast import sample_patches

    torch.testing.assert_close(vit(imgs, coords), vit(sample_patches(imgs, coords)))
    assert vit(imgs).shape == (2, 48)  # regular 14x14 grid


def test_part_fvit_gradient_reaches_landmark_cnn(gen):
    cfg = load_config("small", overrides=["model.depth=1"])
    model = build_part_fvit(cfg, num_classes=5).train()
    imgs = torch.rand(4, 3, 112, 112, generator=gen) * 2 - 1
    logits, coords = model(imgs, torch.tensor([0, 1, 2, 3]))
    assert logits.shape == (4, 5) and coords.shape == (4, 196, 2)
    F.cross_entropy(logits, torch.tensor([0, 1, 2, 3])).backward()
    g = model.landmark_cnn.output_layer[1].weight.grad
    assert g is not None and g.abs().sum() > 0
    assert model.landmark_cnn.stn.features[0][0].weight.grad.abs().sum() > 0


def test_dino_head(gen):
    head = DINOHead(48, out_dim=300, hidden_dim=64, bottleneck_dim=32)
    out = head(torch.randn(5, 48, generator=gen))
    assert out.shape == (5, 300)
    assert not head.last_layer.weight_g.requires_grad
    w = head.last_layer.weight_g * head.last_layer.weight_v / head.last_layer.weight_v.norm(dim=1, keepdim=True)
    torch.testing.assert_close(w.norm(dim=1), torch.ones(300))
    # output = normalised bottleneck . unit prototypes: a cosine, so |out| <= 1
    assert out.abs().max() <= 1 + 1e-5
    assert [k for k in head.state_dict() if "last_layer" in k] == ["last_layer.weight_v", "last_layer.weight_g"]


def test_cosface_and_arcface_formulas(gen):
    emb = torch.randn(4, 16, generator=gen)
    label = torch.tensor([0, 2, 1, 2])
    cos_head, arc_head = CosFace(16, 3), ArcFace(16, 3)
    arc_head.weight.data.copy_(cos_head.weight.data)
    cos = F.normalize(emb) @ F.normalize(cos_head.weight).T
    y = F.one_hot(label, 3).float()
    torch.testing.assert_close(cos_head(emb, label), 64 * (cos - 0.4 * y))
    theta = torch.acos(cos.clamp(-1, 1))
    target = torch.where(cos > math.cos(math.pi - 0.5), torch.cos(theta + 0.5), cos - math.sin(math.pi - 0.5) * 0.5)
    torch.testing.assert_close(arc_head(emb, label), 64 * (y * target + (1 - y) * cos), rtol=1e-4, atol=1e-4)
    soft = torch.tensor([[0.7, 0.3, 0.0]] * 4)
    torch.testing.assert_close(cos_head(emb, soft), 64 * (cos - 0.4 * soft))
    logits, plain = arc_head(emb, label, return_cosine=True)  # the plain cosines beside (train accuracy)
    torch.testing.assert_close(logits, arc_head(emb, label))
    torch.testing.assert_close(plain, cos)
    assert not plain.requires_grad


def test_softmax_head_is_a_plain_linear_classifier(gen):
    """finetune.head=softmax: logits = emb @ W^T (no normalisation, scale or margin), soft targets
    accepted as by the margin heads, a margin warm-up changes nothing, cosines beside for the metric;
    the sharded head refuses it in one sentence."""
    emb, label = torch.randn(4, 16, generator=gen), torch.tensor([0, 2, 1, 2])
    head = build_margin_head("softmax", 16, 3)
    torch.testing.assert_close(head(emb, label), emb @ head.weight.T)
    torch.testing.assert_close(head(emb, torch.tensor([[0.7, 0.3, 0.0]] * 4)), emb @ head.weight.T)
    head.set_margin(0.4)
    torch.testing.assert_close(head(emb, label), emb @ head.weight.T)
    logits, cos = head(emb, label, return_cosine=True)
    torch.testing.assert_close(cos, F.normalize(emb) @ F.normalize(head.weight).T)
    with pytest.raises(ValueError, match="soft targets have 1 classes"):
        head(emb, label[:, None])
    with pytest.raises(ValueError, match="no sharded form"):
        ShardedMarginHead(16, 3, "softmax")


def test_set_margin_equals_a_head_built_with_that_margin(gen):
    """The margin warm-up changes the margin in place: every derived constant follows (ArcFace's cos m,
    sin m, threshold and fallback), and the sharded head passes it on."""
    emb, label = torch.randn(6, 16, generator=gen), torch.tensor([0, 2, 1, 2, 0, 1])
    for cls, m_built, m_set in ((CosFace, 0.4, 0.1), (ArcFace, 0.5, 0.2)):
        changed, built = cls(16, 3, m=m_built), cls(16, 3, m=m_set)
        built.weight.data.copy_(changed.weight.data)
        before = changed(emb, label)
        changed.set_margin(m_set)
        torch.testing.assert_close(changed(emb, label), built(emb, label))
        assert not torch.allclose(before, built(emb, label))
    sharded = ShardedMarginHead(16, 3, "arcface", m=0.5)
    sharded.set_margin(0.2)
    assert sharded.margin.m == 0.2 and sharded.margin.sin_m == pytest.approx(math.sin(0.2))


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_cls_only_last_block_equals_every_row(gen, backend):
    """Issue 21: the last block computes the CLS row alone (keys and values of every token, the query
    of CLS). Same embeddings and gradients as computing every row: in eval mode with dropout on,
    and in training with drop-path on and dropout 0 (drop-path draws one number per sample in both
    paths, so the random stream is the same)."""
    for train in (False, True):
        torch.manual_seed(0)
        drop = 0.0 if train else 0.1
        fast = FViT(dim=48, depth=3, heads=3, head_dim=16, mlp_dim=96, dropout=drop, drop_path=0.3, attention=backend)
        full = FViT(dim=48, depth=3, heads=3, head_dim=16, mlp_dim=96, dropout=drop, drop_path=0.3, attention=backend)
        full.load_state_dict(fast.state_dict())
        full.cls_only_last_block = False
        fast.train(train), full.train(train)
        for n in (196, 36):
            tokens = torch.randn(4, n, 192, generator=gen)
            torch.manual_seed(1)
            a = fast(tokens)
            torch.manual_seed(1)
            b = full(tokens)
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
            g = torch.randn_like(a)
            ga = torch.autograd.grad(a, list(fast.parameters()), g, allow_unused=True)
            gb = torch.autograd.grad(b, list(full.parameters()), g, allow_unused=True)
            for x, y in zip(ga, gb):
                torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)


def test_cls_only_last_block_flops(gen):
    """The FLOPs it saves, counted by torch's FLOP counter: the last block's q projection, attention
    rows, output projection and MLP of the N - 1 non-CLS tokens (about 80% of one block of 12)."""
    from torch.utils.flop_counter import FlopCounterMode

    vit = FViT(dim=48, depth=3, heads=3, head_dim=16, mlp_dim=96, attention="math").eval()
    tokens = torch.randn(1, 196, 192, generator=gen)
    counts = []
    for cls_only in (False, True):
        vit.cls_only_last_block = cls_only
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            vit(tokens)
        counts.append(fc.get_total_flops())
    n, d, inner, m = 197, 48, 48, 96
    block = 2 * (n * (d * 3 * inner + inner * d + 2 * d * m) + 2 * n * n * inner)
    last = 2 * (n * d * 2 * inner + d * inner + 2 * n * inner + inner * d + 2 * d * m)
    assert counts[0] - counts[1] == block - last


def _trained_looking_cnn(gen) -> LandmarkCNN:
    """A landmark CNN whose BatchNorms hold non-trivial running statistics and affine parameters."""
    torch.manual_seed(0)
    cnn = LandmarkCNN()
    with torch.no_grad():
        for m in cnn.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2, generator=gen)
                m.running_var.uniform_(0.5, 2.0, generator=gen)
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.normal_(0, 0.1, generator=gen)
    return cnn.eval()


def test_folded_batchnorm_gives_the_same_landmarks(gen):
    """Issue 21: the frozen reference CNN with its BatchNorms folded into the convolutions (46
    pairs: one kernel and one activation pass less each) predicts the same coordinates up to fp32
    rounding; the original is untouched and keeps its state-dict keys."""
    from lafs_fast.models.landmark_cnn import fold_batchnorm

    cnn = _trained_looking_cnn(gen)
    keys = list(cnn.state_dict())
    folded = fold_batchnorm(cnn)
    bns = sum(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert bns == 0 and sum(isinstance(m, torch.nn.BatchNorm2d) for m in cnn.modules()) == 46
    assert list(cnn.state_dict()) == keys and not any(p.requires_grad for p in folded.parameters())
    x = torch.rand(4, 3, 112, 112, generator=gen) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(folded(x), cnn(x), rtol=0, atol=2e-3)  # px of 111


def test_channels_last_landmark_cnn_is_the_same_function(gen):
    """Issue 21: NHWC weights and inputs (the GPU's fast layout) give the same coordinates and
    gradients as NCHW, in training mode (batch statistics) with dropout off."""
    a = LandmarkCNN(dropout=0.0).train()
    b = LandmarkCNN(dropout=0.0).train()
    b.load_state_dict(a.state_dict())
    b.to_channels_last()
    assert b.stn.features[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.rand(4, 3, 112, 112, generator=gen) * 2 - 1
    ya, yb = a(x), b(x)
    torch.testing.assert_close(yb, ya, rtol=0, atol=2e-3)
    g = torch.randn_like(ya)
    ga = torch.autograd.grad(ya, list(a.parameters()), g)
    gb = torch.autograd.grad(yb, list(b.parameters()), g)
    scale = max(float(u.abs().max()) for u in ga)  # some BN biases have a gradient of 0 up to rounding
    for u, v in zip(ga, gb):
        torch.testing.assert_close(v, u, rtol=1e-3, atol=1e-4 * scale)


def test_compiled_landmark_trunk_is_one_graph_and_the_same_function(gen):
    """Issue 21: ``compile_blocks`` compiles the trunk as one graph (no graph break: fullgraph) in
    NHWC, and the head stays eager; the same coordinates as the eager CNN. AOT-eager backend: the
    trace and the autograd graph are checked, Inductor's codegen is tests/test_compile.py's."""
    eager = LandmarkCNN(dropout=0.0).eval()
    compiled = LandmarkCNN(dropout=0.0).eval()
    compiled.load_state_dict(eager.state_dict())
    compiled.to_channels_last().compile_blocks(backend="aot_eager", fullgraph=True, dynamic=False)
    x = torch.rand(2, 3, 112, 112, generator=gen) * 2 - 1
    try:
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), eager(x), rtol=0, atol=2e-3)
        assert compiled.stn._compiled_call_impl is not None and compiled.output_layer._compiled_call_impl is None
    finally:
        torch._dynamo.reset()
