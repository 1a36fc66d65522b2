"""Packed multi-crop: all views in one block-diagonal sequence == one batch per token length."""

from __future__ import annotations

import pytest
import torch

from lafs_fast.config import load_config
from lafs_fast.models import FViT, attention
from lafs_fast.models.attention import xformers_status
from lafs_fast.models.fvit import segment_drop_path
from lafs_fast.train.dino import build_dino_models

G, L = 196, 36  # global / local token counts


def tiny_vit(**kw) -> FViT:
    args = dict(dim=32, depth=2, heads=2, head_dim=16, mlp_dim=48, num_patches=196)
    args.update(kw)
    return FViT(**args)


def crops(gen: torch.Generator, b: int = 2, n_global: int = 2, n_local: int = 3) -> list[torch.Tensor]:
    """[(n_global*b, 196, 192), (n_local*b, 36, 192)] fp32, view-major like LafsViews.crops()."""
    return [torch.randn(n_global * b, G, 192, generator=gen), torch.randn(n_local * b, L, 192, generator=gen)]


def unpacked(vit: FViT, cs: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([vit(c) for c in cs])


def masked_reference(q, k, v, scale, seqlens):
    """The dense definition: softmax over (1, H, T, T) scores with -inf off the diagonal blocks."""
    seg = torch.repeat_interleave(torch.arange(len(seqlens)), torch.tensor(seqlens))
    bias = torch.where(seg[:, None] == seg[None, :], 0.0, float("-inf"))
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    return ((qh @ kh.transpose(-2, -1)) * scale + bias).softmax(-1).matmul(vh).transpose(1, 2)


@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_packed_attention_equals_the_dense_block_mask(backend, gen):
    seqlens = (7, 7, 3, 3, 3, 5, 7)  # runs of equal lengths, not only one run per length
    q, k, v = (torch.randn(1, sum(seqlens), 2, 16, generator=gen) for _ in range(3))
    out = attention(q, k, v, 0.2, backend, seqlens)
    torch.testing.assert_close(out, masked_reference(q, k, v, 0.2, seqlens), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_packed_forward_and_gradients_equal_unpacked(backend, gen):
    vit = tiny_vit(attention=backend, token_init_std=0.02).eval()  # eval: dropout off, same numbers
    cs = crops(gen)
    ref_in = [c.clone().requires_grad_(True) for c in cs]
    pk_in = [c.clone().requires_grad_(True) for c in cs]
    ref = unpacked(vit, ref_in)
    ref_grads = torch.autograd.grad(
        (ref * torch.linspace(-1, 1, ref.numel()).view_as(ref)).sum(), [*ref_in, *vit.parameters()]
    )
    out = vit.forward_packed(pk_in)
    assert out.shape == (sum(c.shape[0] for c in cs), 32) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)  # same rows, same (view-major) order
    grads = torch.autograd.grad(
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(), [*pk_in, *vit.parameters()]
    )
    for name, g, r in zip(["tokens_g", "tokens_l"] + [n for n, _ in vit.named_parameters()], grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    torch.testing.assert_close(vit(pk_in), out)  # a list through forward() is the packed path


def test_no_attention_across_views(gen):
    """Perturbing one view's tokens changes that view's output only."""
    vit = tiny_vit(attention="sdpa").eval()
    cs = crops(gen, b=1, n_global=2, n_local=2)
    with torch.no_grad():
        base = vit.forward_packed(cs)
        for crop, row in ((0, 1), (1, 0)):  # the 2nd global view, the 1st local view
            moved = [c.clone() for c in cs]
            moved[crop][row] += 3 * torch.randn(moved[crop][row].shape, generator=gen)
            out = vit.forward_packed(moved)
            changed = (out - base).abs().amax(-1) > 1e-4
            target = row + (cs[0].shape[0] if crop == 1 else 0)
            assert changed.tolist() == [i == target for i in range(len(changed))]


def test_drop_path_is_per_view_in_a_packed_row(gen):
    torch.manual_seed(gen.initial_seed())
    seqlens = (5,) * 200 + (3,) * 200
    y = torch.ones(1, sum(seqlens), 4)
    out = segment_drop_path(y, seqlens, 0.3)
    per_tok = out[0, :, 0]
    segs = torch.split(per_tok, list(seqlens))
    assert all(bool((s == s[0]).all()) for s in segs)  # one draw per view, shared by its tokens
    kept = torch.stack([s[0] for s in segs])
    assert (
        torch.isclose(kept, torch.tensor(0.0)).logical_or(torch.isclose(kept, torch.tensor(1 / 0.7))).all()
    )  # timm's scale_by_keep
    assert 0.2 < (kept == 0).float().mean().item() < 0.4  # ~30 % of views dropped, not all-or-none
    # in training the packed row still trains with drop path (finite, and it differs from eval)
    vit = tiny_vit(attention="sdpa", dropout=0.0, emb_dropout=0.0, drop_path=0.5).train()
    cs = crops(gen, b=2, n_global=2, n_local=2)
    out = vit.forward_packed(cs)
    assert torch.isfinite(out).all() and not torch.allclose(out, vit.eval().forward_packed(cs))


def test_config_key_wires_through_build_dino_models(gen, monkeypatch):
    base = [
        "model.dim=32",
        "model.depth=1",
        "model.heads=2",
        "model.head_dim=16",
        "model.mlp_dim=48",
        "dino.out_dim=64",
        "dino.hidden_dim=64",
        "dino.bottleneck_dim=16",
        "model.attention=sdpa",
    ]
    assert load_config("small", None, base).views.pack is False  # off by default
    student, teacher = build_dino_models(load_config("small", None, [*base, "views.pack=true"]))
    assert student.pack and teacher.pack
    student.eval()
    calls = []
    packed = FViT.forward_packed
    monkeypatch.setattr(FViT, "forward_packed", lambda self, cs: calls.append(len(cs)) or packed(self, cs))
    cs = crops(gen, b=2, n_global=2, n_local=2)
    with torch.no_grad():
        out = student(cs)
        teacher.eval()(cs[:1])  # one crop tensor is already one batch: not packed
        student.pack = False
        ref = student(cs)
    assert calls == [2]
    assert out.shape == (8, 64)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_packing_errors_are_clear(gen):
    vit = tiny_vit(attention="sdpa")
    with pytest.raises(ValueError, match="at least one crop"):
        vit.forward_packed([])
    with pytest.raises(ValueError, match="token tensors only"):
        vit([torch.zeros(1, 3, 112, 112)], coords=torch.zeros(1, 196, 2))
    with pytest.raises(ValueError, match=r"tokens must be \(B, N, 192\)"):
        vit.forward_packed([torch.zeros(2, 36, 191)])
    q = torch.zeros(2, 10, 2, 16)
    with pytest.raises(ValueError, match="packed attention needs"):
        attention(q, q, q, 0.25, "sdpa", (5, 5))


def test_packed_path_traces_under_torch_compile(gen):
    """The engine compiles the backbone (``module.compile``): a list of crops through forward()
    must trace (dynamo, eager backend: no C++ compiler needed) and give the same numbers."""
    vit = tiny_vit(attention="sdpa", depth=1).eval()
    cs = crops(gen, b=1, n_global=2, n_local=2)
    ref = unpacked(vit, cs)
    vit.attention_for(torch.device("cpu"))
    vit.compile(dynamic=False, backend="eager")
    torch._dynamo.reset()
    with torch.no_grad():
        torch.testing.assert_close(vit(cs), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not xformers_status()[0], reason="xformers' CUDA kernels are not available here")
def test_xformers_block_diagonal_equals_unpacked_sdpa(gen):
    vit = tiny_vit(attention="xformers", heads=2, head_dim=64).cuda().eval()
    cs = [c.cuda() for c in crops(gen)]
    with torch.no_grad():
        out = vit.forward_packed(cs)
        vit.set_attention("sdpa")
        ref = unpacked(vit, cs)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
