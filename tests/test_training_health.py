"""Training health of pre-training (issue 14 item 1): the metrics on constructed collapsed (both
modes) and healthy teacher outputs, and the one-line collapse warning of a run."""

from __future__ import annotations

import functools
import json
import math

import pytest
import torch
import torch.nn.functional as F

from lafs_fast.config import config_to_dict, load_config
from lafs_fast.train import dino, pretrain
from lafs_fast.train.dino import DINOLoss
from lafs_fast.train.health import HEALTH_KEYS, CollapseWatch, dino_health
from tests import TINY_PRETRAIN

K, B, G, V = 64, 32, 2, 4


def _health(teacher_out: torch.Tensor, gen: torch.Generator, emb: torch.Tensor | None = None) -> dict[str, float]:
    student = torch.randn(V * B, K, generator=gen)
    loss_fn = DINOLoss(K, V, G)
    center = loss_fn.center.clone()
    loss = loss_fn(student, teacher_out, 0.04)
    emb = torch.randn(G * B, 16, generator=gen) if emb is None else emb
    m = dino_health(teacher_out, center, 0.04, loss, emb)
    assert all(v.shape == () and v.dtype == torch.float32 for v in m.values())  # device tensors, no .item()
    return {k: float(v) for k, v in m.items()}


def test_uniform_collapse(gen):
    m = _health(torch.zeros(G * B, K), gen, emb=torch.ones(G * B, 16))
    assert m["teacher_entropy"] == pytest.approx(math.log(K), abs=1e-5)
    assert m["teacher_batch_entropy"] == pytest.approx(math.log(K), abs=1e-5)
    assert m["embed_std"] == pytest.approx(0.0, abs=1e-6)  # every sample the same embedding
    assert CollapseWatch(K).mode(m) == "uniform"


def test_one_prototype_collapse(gen):
    t = torch.zeros(G * B, K)
    t[:, 3] = 1.0  # every sample on prototype 3 (cosine 1 vs 0: sharp at tau 0.04)
    m = _health(t, gen)
    assert m["teacher_entropy"] < 0.01 and m["teacher_batch_entropy"] < 0.01
    assert CollapseWatch(K).mode(m) == "one prototype"


def test_healthy_output(gen):
    t = torch.zeros(G * B, K)
    t[torch.arange(G * B), torch.arange(G * B) % K] = 1.0  # each sample its own prototype
    m = _health(t, gen)
    assert m["teacher_entropy"] < 0.01  # sharp per sample
    assert m["teacher_batch_entropy"] > 0.9 * math.log(K)  # spread over the batch
    assert 0.8 < m["embed_std"] <= 1.0  # random embeddings spread over the sphere
    assert CollapseWatch(K).mode(m) == ""


def test_identical_outputs_at_any_entropy(gen):
    t = torch.zeros(G * B, K)
    t[:, :8] = 0.1  # every sample the same output, mass on 8 of 64 prototypes
    m = _health(t, gen)
    assert m["teacher_entropy"] == pytest.approx(m["teacher_batch_entropy"], abs=1e-5)
    assert 0.1 * math.log(K) < m["teacher_entropy"] < 0.9 * math.log(K)
    assert CollapseWatch(K).mode(m) == "identical outputs"


def test_kl_is_the_pairs_mean_kl(gen):
    t, s = torch.randn(G * B, K, generator=gen), torch.randn(V * B, K, generator=gen)
    loss_fn = DINOLoss(K, V, G)
    loss_fn.center.copy_(torch.randn(1, K, generator=gen))
    center = loss_fn.center.clone()
    m = dino_health(t, center, 0.05, loss_fn(s, t, 0.05), torch.randn(G * B, 8, generator=gen))
    q = F.softmax((t - center) / 0.05, dim=-1).chunk(G)
    logp = F.log_softmax(s / 0.1, dim=-1).chunk(V)
    kls = [F.kl_div(logp[j], q[i], reduction="batchmean") for i in range(G) for j in range(V) if j != i]
    torch.testing.assert_close(m["kl"], torch.stack(kls).mean(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(m["center_norm"], center.norm())


def test_watch_says_once_after_patience():
    w = CollapseWatch(K, patience=3, grace=2)
    flat = {"teacher_entropy": math.log(K), "teacher_batch_entropy": math.log(K)}
    same = {"teacher_entropy": 2.0, "teacher_batch_entropy": 2.0}
    ok = {"teacher_entropy": 1.0, "teacher_batch_entropy": 3.5}
    said = [w.update(s, r) for s, r in enumerate([flat, flat, ok, same, flat, flat, flat, flat], start=1)]
    assert [i + 1 for i, x in enumerate(said) if x] == [6]  # steps 4-6 collapsed in a row (two modes); once only
    assert said[5].startswith("COLLAPSE since step 4: the teacher's output is UNIFORM")


def test_a_run_logs_health_and_warns_once(tmp_path, capsys, monkeypatch):
    cfg = load_config("small", None, [*TINY_PRETRAIN, "train.max_steps=4", f"train.out_dir={tmp_path}"])
    # every step "collapsed" (uniform_frac 0): the run must say so exactly once
    monkeypatch.setattr(dino, "CollapseWatch", functools.partial(CollapseWatch, info_frac=10.0, patience=1, grace=0))
    pretrain.train_worker(config_to_dict(cfg), {"knn": False, "progress": False})
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) == 4 and all(set(HEALTH_KEYS) <= r.keys() for r in recs)
    assert all(math.isfinite(r[k]) for r in recs for k in HEALTH_KEYS)
    assert all(0 <= r["teacher_entropy"] <= math.log(64) + 1e-4 for r in recs)
    assert capsys.readouterr().out.count("COLLAPSE since step 1") == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_health_shares_the_loss_softmax_bit_for_bit(gen, dtype):
    """Issue 21: the loss returns its targets and the health metrics read them, one softmax over the
    K prototypes a step instead of two: same loss, same centre update, same metrics, to the bit,
    as the two computed apart (bf16 teacher outputs as on the GPU; the centre non-zero)."""
    student = torch.randn(V * B, K, generator=gen).to(dtype)
    teacher = (torch.randn(G * B, K, generator=gen) * 3).to(dtype)
    emb = torch.randn(G * B, 16, generator=gen)
    start = torch.randn(1, K, generator=gen)
    old, new = DINOLoss(K, V, G), DINOLoss(K, V, G)
    old.center.copy_(start), new.center.copy_(start)
    centre = old.center.clone()
    ref_q = F.softmax((teacher.float() - centre) / 0.05, dim=-1)  # the targets as computed before
    ref_loss = old(student, teacher, 0.05)
    ref = dino_health(teacher, centre, 0.05, ref_loss, emb)
    loss, q = new(student, teacher, 0.05, return_targets=True)
    assert torch.equal(q, ref_q) and torch.equal(loss, ref_loss) and torch.equal(new.center, old.center)
    got = dino_health(teacher, centre, 0.05, loss, emb, q=q)
    assert all(torch.equal(got[k], ref[k]) for k in ref)
