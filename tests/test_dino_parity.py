"""DINO parity (issue 14 item 2): our loss, centre, schedules, EMA, last-layer freezing and head
against an independent re-statement of DINO (Caron et al. 2021, algorithm 1 and section 3; the facts
checked against facebookresearch/dino main_dino.py DINOLoss / cosine_scheduler, utils.py
cancel_gradients_last_layer, vision_transformer.py DINOHead), and the LAFS views against
docs/method.md section 3 (perturbation N(0, 5^2), 36-of-196 with replacement, position j + 1).

The re-statements below are written from the paper's formulas, one pair / one view at a time, not
vectorised like the code under test.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

from lafs_fast.config import load_config
from lafs_fast.models import DINOHead
from lafs_fast.models.part_fvit import build_backbone
from lafs_fast.sampling import sample_patches
from lafs_fast.train.dino import DINOLoss, DinoStage, MultiCrop, ema_update
from lafs_fast.train.engine import Plan, StepContext, cosine_schedule, linear_then_constant
from tests import TINY_MODEL

# --------------------------------------------------------------------------------------- re-statement


def paper_loss(
    student: list[torch.Tensor], teacher: list[torch.Tensor], center: torch.Tensor, tau_s: float, tau_t: float
) -> torch.Tensor:
    """H(P_t(x), P_s(x')) = -sum_k P_t log P_s with P_t = softmax((g_t - C) / tau_t), P_s =
    softmax(g_s / tau_s), averaged over the batch, then over every (global view x, any view x' != x)
    pair. student: V tensors (B, K), the first G the global views the teacher also sees."""
    terms = []
    for i, t in enumerate(teacher):
        a = (t.double() - center.double()) / tau_t
        p_t = torch.exp(a - a.max(dim=1, keepdim=True).values)  # float64, shifted: exp overflows at tau 0.04 otherwise
        p_t = p_t / p_t.sum(dim=1, keepdim=True)
        for j, s in enumerate(student):
            if i == j:
                continue
            z = s.double() / tau_s
            log_p_s = z - torch.logsumexp(z, dim=1, keepdim=True)
            per_sample = torch.stack([-(p_t[b] * log_p_s[b]).sum() for b in range(t.shape[0])])
            terms.append(per_sample.mean())
    return (sum(terms) / len(terms)).float()


def paper_center(center: torch.Tensor, teacher: list[torch.Tensor], m: float) -> torch.Tensor:
    """C <- m C + (1 - m) mean over every teacher output of the batch (both global views)."""
    rows = torch.cat(teacher)
    return m * center + (1 - m) * rows.sum(dim=0, keepdim=True) / rows.shape[0]


def paper_teacher_temp(warmup: float, final: float, warmup_epochs: int, epochs: int) -> list[float]:
    """Per EPOCH: linear from ``warmup`` to ``final`` over ``warmup_epochs`` (both ends included), then final."""
    if warmup_epochs == 0:
        return [final] * epochs
    step = (final - warmup) / (warmup_epochs - 1) if warmup_epochs > 1 else 0.0
    return [warmup + e * step if e < warmup_epochs else final for e in range(epochs)]


def paper_cosine(base: float, final: float, total: int) -> list[float]:
    """Per iteration i of ``total``: final + (base - final) (1 + cos(pi i / total)) / 2."""
    return [final + (base - final) * (1 + math.cos(math.pi * i / total)) / 2 for i in range(total)]


# --------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("v,g", [(10, 2), (4, 2), (2, 2)])
def test_loss_and_centre_match_the_paper_over_steps(gen, v, g):
    b, k = 5, 48
    loss_fn = DINOLoss(k, v, g, student_temp=0.1, center_momentum=0.9)
    center = torch.zeros(1, k)
    for tau_t in (0.07, 0.055, 0.04):  # the centre carries over: three steps in a row
        s = torch.randn(v * b, k, generator=gen) * 3
        t = torch.randn(g * b, k, generator=gen) * 3 + 1.0  # an offset for the centre to remove
        got = loss_fn(s, t, tau_t)
        want = paper_loss(list(s.chunk(v)), list(t.chunk(g)), center, 0.1, tau_t)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        center = paper_center(center, list(t.chunk(g)), 0.9)
        torch.testing.assert_close(loss_fn.center, center, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "start,end,ramp,epochs",
    [(0.07, 0.04, 30, 41), (0.04, 0.07, 30, 41), (0.07, 0.04, 2, 6), (0.04, 0.04, 0, 5), (0.04, 0.07, 1, 3)],
)
def test_teacher_temperature_schedule(start, end, ramp, epochs):
    got = linear_then_constant(start, end, ramp, epochs, steps_per_epoch=3)
    want = np.repeat(paper_teacher_temp(start, end, ramp, epochs), 3)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)


def test_teacher_momentum_schedule_and_stage_wiring(tmp_path):
    np.testing.assert_allclose(cosine_schedule(0.996, 1.0, 41, 7), paper_cosine(0.996, 1.0, 41 * 7), rtol=0, atol=1e-15)
    cfg = load_config(
        "small",
        None,
        [
            *TINY_MODEL,
            "dino.out_dim=32",
            "dino.hidden_dim=32",
            "dino.bottleneck_dim=8",
            "dino.teacher_temp_epochs=3",
            f"train.out_dir={tmp_path}",
        ],
    )
    sch = DinoStage(cfg, torch.device("cpu")).schedules(
        Plan(epochs=4, steps_per_epoch=5, accumulation=1, batch_size=2, world_size=1)
    )
    np.testing.assert_allclose(sch["teacher_momentum"], paper_cosine(cfg.dino.teacher_momentum, 1.0, 20), atol=1e-15)
    want_t = np.repeat(paper_teacher_temp(cfg.dino.teacher_temp_start, cfg.dino.teacher_temp_end, 3, 4), 5)
    np.testing.assert_allclose(sch["teacher_temp"], want_t, atol=1e-15)


def _head(gen: torch.Generator, k: int = 40) -> DINOHead:
    torch.manual_seed(gen.initial_seed())
    return DINOHead(16, k, hidden_dim=24, bottleneck_dim=8)


def test_ema_over_every_parameter_including_the_fixed_norm(gen):
    student, teacher = MultiCrop(nn.Linear(4, 16), _head(gen)), MultiCrop(nn.Linear(4, 16), _head(gen))
    for p in student.parameters():
        if p.requires_grad:
            p.data.add_(torch.randn(p.shape, generator=gen))
    student.head.last_layer.weight_g.data.fill_(1.5)  # fixed norm: still averaged, as DINO's zip over parameters()
    before = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    ema_update(teacher, student, 0.9)
    for (n, p_t), p_s in zip(teacher.named_parameters(), student.parameters()):
        torch.testing.assert_close(p_t, 0.9 * before[n] + 0.1 * p_s.detach(), msg=n)


def test_last_layer_gradients_cancelled_in_the_frozen_epochs(tmp_path):
    cfg = load_config(
        "small",
        None,
        [
            *TINY_MODEL,
            "dino.out_dim=32",
            "dino.hidden_dim=32",
            "dino.bottleneck_dim=8",
            "dino.freeze_last_layer_epochs=2",
            f"train.out_dir={tmp_path}",
        ],
    )
    stage = DinoStage(cfg, torch.device("cpu"))
    for epoch, frozen in ((0, True), (1, True), (2, False)):
        for p in stage.model.parameters():
            p.grad = torch.ones_like(p) if p.requires_grad else None
        stage.before_optimizer_step(stage.model, StepContext(0, epoch, 0, 0, {}, None))
        for n, p in stage.model.named_parameters():
            if not p.requires_grad:
                assert n == "head.last_layer.weight_g" and p.grad is None  # the fixed norm never trains
            elif "last_layer" in n:
                assert (p.grad is None) == frozen, (n, epoch)
            else:
                assert p.grad is not None, n


def test_head_matches_weight_norm_linear(gen):
    """DINO's head: MLP -> L2 normalise -> nn.utils.weight_norm(Linear(bias=False)) with g = 1 fixed;
    the same state dict loads into an independently built one and gives the same outputs and grads."""
    ours = _head(gen)
    ref = nn.Module()
    ref.mlp = nn.Sequential(nn.Linear(16, 24), nn.GELU(), nn.Linear(24, 24), nn.GELU(), nn.Linear(24, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # weight_norm's deprecation notice: DINO uses this very form
        ref.last_layer = nn.utils.weight_norm(nn.Linear(8, 40, bias=False))
    ref.load_state_dict(ours.state_dict())
    assert torch.equal(ref.last_layer.weight_g, torch.ones(40, 1)) and not ours.last_layer.weight_g.requires_grad
    x = torch.randn(6, 16, generator=gen)
    out_ref = ref.last_layer(nn.functional.normalize(ref.mlp(x), dim=-1, p=2))
    out = ours(x)
    torch.testing.assert_close(out, out_ref)
    assert out.abs().max() <= 1 + 1e-5  # unit rows on unit inputs: logits are cosines
    w = torch.randn(6, 40, generator=gen)
    (out * w).sum().backward()
    (out_ref * w).sum().backward()
    # gradients: the two heads order the float32 work differently (weight_norm's g * v / ||v|| against
    # a normalised weight), and the first layer's gradient sums that through the MLP: 1e-4, not 1e-5
    # (a wrong formula is off by O(1)); seen 1.2e-5 apart on one draw with the default tolerance
    torch.testing.assert_close(ours.last_layer.weight_v.grad, ref.last_layer.weight_v.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.mlp[0].weight.grad, ref.mlp[0].weight.grad, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------ views vs the spec


def test_local_draw_and_perturbation_follow_the_spec(gen):
    """36 indices per local view, uniform WITH replacement over 196; N(0, 5^2) px on each x and y,
    fresh per sample and token (also for a repeated index), no clamp."""
    cfg = load_config("reference", None, [])
    assert (cfg.views.local_tokens, cfg.views.global_tokens, cfg.views.perturb_sigma) == (36, 196, 5.0)
    n = 256
    grid = (
        torch.stack(torch.meshgrid(torch.arange(14.0), torch.arange(14.0), indexing="xy"), -1).reshape(196, 2) * 8 + 4
    )
    coords = grid.expand(n, -1, -1).contiguous()
    images = torch.zeros(n, 3, 112, 112)
    _, idx, noise = sample_patches(
        images, coords, 8, num_tokens=36, sigma=5.0, seed=int(gen.initial_seed()), return_draws=True, backend="torch"
    )
    assert idx.shape == (n, 36) and noise.shape == (n, 36, 2)
    counts = torch.bincount(idx.reshape(-1), minlength=196).double()
    expect = n * 36 / 196
    chi2 = ((counts - expect) ** 2 / expect).sum().item()
    assert chi2 < 195 + 7 * math.sqrt(2 * 195)  # uniform over all 196 (df 195)
    repeats = sum(len(set(r.tolist())) < 36 for r in idx)
    p_repeat = 1 - math.prod((196 - i) / 196 for i in range(36))  # birthday bound, ~0.97
    assert abs(repeats / n - p_repeat) < 0.06  # with replacement
    assert abs(noise.mean().item()) < 0.2 and abs(noise.std().item() - 5.0) < 0.15
    assert abs(torch.corrcoef(noise.reshape(-1, 2).T)[0, 1].item()) < 0.05  # x and y independent
    # a repeated index gets its own noise (fresh per token)
    r = next(i for i in range(n) if len(set(idx[i].tolist())) < 36)
    a, b = [j for j in range(36) if (idx[r] == idx[r][j]).sum() > 1][:2]
    assert not torch.equal(noise[r, a], noise[r, b])
    # dense views: all 196 in order, the same noise law; no clamp (border patches leave the image)
    _, _, dnoise = sample_patches(images[:64], coords[:64], 8, sigma=5.0, seed=1, return_draws=True, backend="torch")
    assert abs(dnoise.std().item() - 5.0) < 0.15
    assert ((coords[:64] + dnoise) < 0).any()


def test_token_j_gets_position_j_plus_1(gen):
    """The shuffle: token j of a view carries its landmark's patch but the position embedding j + 1
    (0 is the CLS), whatever landmark index it was drawn from."""
    cfg = load_config("small", None, [])
    torch.manual_seed(gen.initial_seed())
    fvit = build_backbone(cfg.model)
    tokens = torch.randn(2, 36, fvit.token_dim, generator=gen)
    x = fvit.embed(tokens)
    assert x.shape == (2, 37, cfg.model.dim)
    torch.testing.assert_close(x[:, 0], fvit.cls_token[0, 0].expand(2, -1) + fvit.pos_embedding[0, 0])
    for j in (0, 17, 35):
        torch.testing.assert_close(x[:, j + 1], fvit.patch_to_embedding(tokens[:, j]) + fvit.pos_embedding[0, j + 1])
