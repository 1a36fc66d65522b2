"""The sharded margin head equals the replicated one (world size 1, and 2 ranks over gloo)."""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from lafs_fast.models.heads import ArcFace, CosFace
from lafs_fast.models.sharded_head import ShardedMarginHead, shard_range

C, D, B = 11, 8, 6  # classes, embedding width, per-rank batch


def replicated(kind: str, weight: torch.Tensor, emb: torch.Tensor, labels: torch.Tensor):
    head = (CosFace if kind == "cosface" else ArcFace)(D, C)
    head.weight.data.copy_(weight)
    emb = emb.clone().requires_grad_(True)
    loss = F.cross_entropy(head(emb, labels), labels)
    loss.backward()
    return loss.detach(), emb.grad, head.weight.grad


def test_shard_ranges_cover_all_classes():
    for world in (1, 2, 3, 7):
        ranges = [shard_range(C, r, world) for r in range(world)]
        assert ranges[0][0] == 0 and ranges[-1][1] == C
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))


@pytest.mark.parametrize("kind", ["cosface", "arcface"])
def test_world_size_one_equals_replicated(kind, gen):
    emb = torch.randn(B, D, generator=gen)
    labels = torch.randint(0, C, (B,), generator=gen)
    sharded = ShardedMarginHead(D, C, kind)
    ref_loss, ref_demb, ref_dw = replicated(kind, sharded.weight.detach(), emb, labels)
    e = emb.clone().requires_grad_(True)
    loss = sharded(e, labels)
    loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(e.grad, ref_demb, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(sharded.weight.grad, ref_dw, rtol=1e-4, atol=1e-6)


def test_sampling_keeps_positives_and_trains(gen):
    torch.manual_seed(0)
    head = ShardedMarginHead(D, 100, "cosface", sample_rate=0.1)
    labels = torch.randint(0, 100, (B,), generator=gen)
    torch.manual_seed(5)
    cols = head._sampled_columns(labels)
    assert cols is not None and set(labels.tolist()) <= set(cols.tolist()) and len(cols) >= 10
    emb = torch.randn(B, D, generator=gen, requires_grad=True)
    torch.manual_seed(5)  # the same draw inside forward
    head(emb, labels).backward()
    touched = head.weight.grad.abs().sum(1) > 0
    assert set(touched.nonzero().flatten().tolist()) <= set(cols.tolist())


def _worker(rank: int, world: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    g = torch.Generator().manual_seed(123)  # the same global batch and weights on every rank
    weight = torch.randn(C, D, generator=g)
    emb_all = torch.randn(world * B, D, generator=g)
    labels_all = torch.randint(0, C, (world * B,), generator=g)
    head = ShardedMarginHead(D, C, "cosface")
    head.weight.data.copy_(weight[head.start : head.end])
    emb = emb_all[rank * B : (rank + 1) * B].clone().requires_grad_(True)
    loss = head(emb, labels_all[rank * B : (rank + 1) * B])
    loss.backward()
    torch.save(
        {
            "loss": loss.detach(),
            "demb": emb.grad,
            "dw": head.weight.grad,
            "range": (head.start, head.end),
            "weight": weight,
            "emb_all": emb_all,
            "labels_all": labels_all,
        },
        f"{out}/rank{rank}.pt",
    )
    dist.destroy_process_group()


@pytest.mark.timeout(180)
def test_two_ranks_equal_replicated_under_ddp(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    r = [torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in range(2)]
    ref_loss, ref_demb, ref_dw = replicated("cosface", r[0]["weight"], r[0]["emb_all"], r[0]["labels_all"])
    for i in range(2):
        torch.testing.assert_close(r[i]["loss"], ref_loss, rtol=1e-5, atol=1e-5)
        a, b = r[i]["range"]
        torch.testing.assert_close(r[i]["dw"], ref_dw[a:b], rtol=1e-4, atol=1e-6)
        # Replicated under DDP, rank i's loss is the mean over ITS batch: d/d emb = world * global-mean grad.
        torch.testing.assert_close(r[i]["demb"], 2 * ref_demb[i * B : (i + 1) * B], rtol=1e-4, atol=1e-6)
