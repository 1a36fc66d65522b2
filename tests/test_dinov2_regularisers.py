"""DINOv2's two additions to the DINO loss, as options of stage 1 (``dino.centering=sinkhorn``,
``dino.koleo_weight``): Sinkhorn-Knopp teacher targets and the KoLeo spreading term, each against a
re-statement written one element at a time from the papers (Caron et al. 2020 SwAV section 3.1,
Oquab et al. 2023 DINOv2 section 5; facts checked against facebookresearch/dinov2 loss/), and wired
into the stage."""

from __future__ import annotations

import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lafs_fast.config import load_config
from lafs_fast.train.dino import DINOLoss, DinoStage, koleo_loss, sinkhorn_knopp
from lafs_fast.train.engine import StepContext
from tests import CPU, TINY_MODEL


def paper_sinkhorn(scores: torch.Tensor, tau: float, iters: int) -> torch.Tensor:
    """SwAV's equipartition: Q = exp(S / tau) as a K x n matrix normalised to total mass 1, then
    ``iters`` rounds of (every prototype's row to mass 1/K, every sample's column to mass 1/n); the
    targets are the columns scaled to sum to 1. float64, loops."""
    n, k = scores.shape
    q = [[math.exp(float(scores[i, j]) / tau) for i in range(n)] for j in range(k)]
    total = sum(map(sum, q))
    q = [[v / total for v in row] for row in q]
    for _ in range(iters):
        for j in range(k):
            r = sum(q[j])
            q[j] = [v / r / k for v in q[j]]
        for i in range(n):
            c = sum(q[j][i] for j in range(k))
            for j in range(k):
                q[j][i] = q[j][i] / c / n
    return torch.tensor([[q[j][i] * n for j in range(k)] for i in range(n)], dtype=torch.float64)


def paper_koleo(x: torch.Tensor) -> torch.Tensor:
    """-(1/n) sum_i log min_{j != i} ||x_i / |x_i| - x_j / |x_j| ||, loops in float64."""
    u = [r.double() / r.double().norm() for r in x]
    terms = [math.log(min(float((u[i] - u[j]).norm()) for j in range(len(u)) if j != i)) for i in range(len(u))]
    return torch.tensor(-sum(terms) / len(terms), dtype=torch.float64)


@pytest.mark.parametrize("n, k, tau", [(6, 10, 0.04), (12, 5, 0.1)])
def test_sinkhorn_matches_the_restatement(gen, n, k, tau):
    scores = torch.randn(n, k, generator=gen).clamp(-1, 1)  # cosine-like head outputs
    got = sinkhorn_knopp(scores, tau, n_iters=3)
    torch.testing.assert_close(got.double(), paper_sinkhorn(scores, tau, 3), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got.sum(dim=1), torch.ones(n))  # every sample a distribution
    # a constant added to every score changes nothing (the rescalings remove it)
    torch.testing.assert_close(sinkhorn_knopp(scores + 0.5, tau), got, rtol=1e-4, atol=1e-6)


def _sinkhorn_rank(rank: int, world: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    scores = torch.randn(12, 10, generator=torch.Generator().manual_seed(3)).clamp(-1, 1)  # the global batch
    torch.save(sinkhorn_knopp(scores[rank * 6 : (rank + 1) * 6], 0.04), f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.timeout(180)
def test_sinkhorn_over_two_ranks_equals_one_process_on_the_whole_batch(tmp_path):
    """The prototype masses are all-reduced: each rank's rows are those of the whole batch's targets."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_sinkhorn_rank, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    scores = torch.randn(12, 10, generator=torch.Generator().manual_seed(3)).clamp(-1, 1)
    whole = sinkhorn_knopp(scores, 0.04)
    got = torch.cat([torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in range(2)])
    torch.testing.assert_close(got, whole)
    # without the all-reduce a rank would balance the prototypes over its own half only
    assert not torch.allclose(sinkhorn_knopp(scores[:6], 0.04), whole[:6], atol=1e-3)


def test_sinkhorn_spreads_a_collapsed_teacher(gen):
    """Every sample's softmax picks prototype 0; the Sinkhorn targets share the prototypes out."""
    scores = torch.full((16, 8), -1.0)
    scores[:, 0] = 1.0
    scores += 0.01 * torch.randn(16, 8, generator=gen)
    soft = torch.softmax(scores / 0.04, dim=1)
    sk = sinkhorn_knopp(scores, 0.04)
    assert soft.mean(dim=0)[0] > 0.99
    assert sk.mean(dim=0).max() < 0.2  # near 1/8 each after 3 rounds
    loss_fn = DINOLoss(8, 2, 2, centering="sinkhorn")
    torch.testing.assert_close(loss_fn.targets(scores, 0.04), sk)


def test_koleo_matches_the_restatement_and_spreads(gen):
    x = torch.randn(9, 5, generator=gen)
    torch.testing.assert_close(koleo_loss(x).double(), paper_koleo(x), rtol=1e-5, atol=1e-6)
    # its gradient pushes the nearest pair apart: one step raises the smallest distance
    near = torch.randn(8, 5, generator=gen)
    near[1] = near[0] + 0.01 * torch.randn(5, generator=gen)
    x = near.clone().requires_grad_(True)
    koleo_loss(x).backward()
    with torch.no_grad():
        stepped = x - 0.01 * x.grad / x.grad.norm()

    def min_dist(y: torch.Tensor) -> float:
        u = torch.nn.functional.normalize(y, dim=1)
        return float((torch.cdist(u, u) + 10 * torch.eye(len(u))).min())

    assert min_dist(stepped) > min_dist(near)
    assert koleo_loss(near) > koleo_loss(torch.randn(8, 5, generator=gen))  # crowded scores worse


def test_stage_uses_sinkhorn_and_koleo(tmp_path, gen):
    overrides = [*TINY_MODEL, *CPU, "dino.out_dim=32", "dino.hidden_dim=32", "dino.bottleneck_dim=8"]
    overrides += ["views.n_local=2", f"train.out_dir={tmp_path}"]
    images = torch.randint(0, 256, (4, 112, 112, 3), dtype=torch.uint8, generator=gen)
    ctx = StepContext(0, 0, 0, 123, {"teacher_temp": 0.04, "teacher_momentum": 0.99}, None)
    out = {}
    for name, extra in (("dino", []), ("dinov2", ["dino.centering=sinkhorn", "dino.koleo_weight=0.1"])):
        torch.manual_seed(0)
        stage = DinoStage(load_config("small", None, overrides + extra), torch.device("cpu"))
        loss, health = stage.forward_loss(stage.model, (images, torch.zeros(4)), ctx)
        loss.backward()
        out[name] = (float(loss.detach()), health)
    assert "koleo" not in out["dino"][1]
    koleo = float(out["dinov2"][1]["koleo"])
    assert math.isfinite(koleo)
    # same models and views: the totals differ by the KoLeo term and the targets (not by nothing)
    assert out["dinov2"][0] != pytest.approx(out["dino"][0], abs=1e-4)
