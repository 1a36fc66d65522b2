"""Verification metrics against hand-computed cases."""

import math

import numpy as np
import pytest

from lafs_fast.eval.metrics import (
    exact_thresholds,
    insightface_thresholds,
    kfold_accuracy,
    roc_curve,
    tar_at_far,
)


def test_kfold_threshold_comes_from_the_other_folds():
    # Distances d = 2 - 2 cos are exact binary fractions: 0.25, 1.75 | 0.75, 1.25.
    scores = np.array([0.875, 0.125, 0.625, 0.375])
    same = np.array([True, False, True, False])
    r = kfold_accuracy(scores, same, nfolds=2, thresholds=insightface_thresholds())
    # fold 1 is tested with the threshold learnt on fold 2 (first t > 0.75: t = 0.76) -> both right;
    # fold 2 with the threshold of fold 1 (first t > 0.25: t = 0.26) -> its genuine pair (d 0.75) fails.
    assert r.fold_accuracy == [1.0, 0.5]
    assert r.accuracy == pytest.approx(0.75) and r.std == pytest.approx(0.25)
    assert r.fold_threshold == pytest.approx([1 - 0.76 / 2, 1 - 0.26 / 2])


def test_kfold_fold_sizes_follow_sklearn_kfold():
    rng = np.random.default_rng(0)
    same = rng.random(103) < 0.5
    same[32] = True
    scores = np.where(same, 0.75, rng.uniform(-0.5, 0.0, 103))  # genuine d = 0.5: t = 0.51 everywhere
    scores[32] = -0.9  # one hopeless genuine pair, the last of fold 3 (folds of 11, 11, 11, 10, ...)
    r = kfold_accuracy(scores, same, 10, insightface_thresholds())
    expect = [1.0] * 10
    expect[2] = 10 / 11
    assert r.fold_accuracy == pytest.approx(expect)
    assert r.fold_threshold == pytest.approx([1 - 0.51 / 2] * 10)
    assert r.accuracy == pytest.approx(np.mean(expect)) and r.std == pytest.approx(np.std(expect))


def test_kfold_rejects_bad_input():
    with pytest.raises(ValueError, match="same length"):
        kfold_accuracy(np.zeros(4), np.zeros(3, bool))
    with pytest.raises(ValueError, match="at least nfolds pairs"):
        kfold_accuracy(np.zeros(4), np.zeros(4, bool), 10)


GEN = [0.9, 0.8, 0.4, 0.3]
IMP = [0.85, 0.5, 0.2, 0.1, 0.05, 0.0, -0.1, -0.2, -0.3, -0.4]


def _set():
    return np.array(GEN + IMP), np.array([True] * 4 + [False] * 10)


def test_tar_at_far_by_hand():
    s, y = _set()
    t = tar_at_far(s, y, (0.01, 0.1, 0.2, 1.0))
    assert math.isnan(t[0.01])  # 10 impostors cannot measure FAR 1 %
    assert t[0.1] == 0.5  # one false accept allowed (0.85): accept down to 0.8 -> 2 of 4
    assert t[0.2] == 1.0  # two allowed (0.85, 0.5): accept down to 0.3 -> all
    assert t[1.0] == 1.0
    # InsightFace's IJB rule takes the first ROC point whose FPR is nearest: at 0.2 that is (fp 2, tp 2)
    assert tar_at_far(s, y, (0.2,), rule="nearest")[0.2] == 0.5


def test_roc_groups_tied_scores():
    fpr, tpr, thr = roc_curve(np.array([0.5, 0.5, 0.1]), np.array([True, False, False]))
    assert fpr.tolist() == [0.0, 0.5, 1.0] and tpr.tolist() == [0.0, 1.0, 1.0]
    assert thr[0] == np.inf and thr[1:].tolist() == [0.5, 0.1]
    with pytest.raises(ValueError, match="both genuine and impostor"):
        roc_curve(np.array([0.1, 0.2]), np.array([True, True]))


def test_sorted_accuracy_equals_brute_force(gen):
    from lafs_fast.eval.metrics import _accuracy

    rng = np.random.default_rng(gen.initial_seed())
    d = np.round(rng.uniform(0, 4, 301), 2)  # ties with the grid on purpose
    same = rng.random(301) < 0.4
    t = np.arange(0, 4, 0.01)
    brute = ((d[None, :] < t[:, None]) == same[None, :]).mean(axis=1)
    np.testing.assert_allclose(_accuracy(d, same, t), brute)


def test_threshold_step_resolves_crowded_scores():
    from lafs_fast.eval.verification import evaluate_scores

    same = np.tile([True, False], 50)
    scores = np.where(same, 0.9999, 0.9990)  # d = 2e-4 vs 2e-3: both below InsightFace's first step
    assert evaluate_scores("x", scores, same, threshold_step=0.01).accuracy == 0.5
    assert evaluate_scores("x", scores, same, threshold_step=1e-4).accuracy == 1.0
    assert evaluate_scores("x", scores, same).accuracy == 1.0  # default: exact thresholds
    with pytest.raises(ValueError, match="threshold step"):
        evaluate_scores("x", scores, same, threshold_step=0)


def test_exact_thresholds_find_what_the_grid_misses(gen):
    # a collapsed model: every cosine within 0.9993 +- 2e-4 (squared distances within 0.0014 +- 4e-4),
    # genuine pairs slightly closer; InsightFace's grid has one threshold (0.01) above all of them
    rng = np.random.default_rng(gen.initial_seed())
    same = np.tile([True, False], 300)
    scores = 0.9993 + np.where(same, 1e-4, -1e-4) + rng.normal(0, 1e-4, 600)
    grid = kfold_accuracy(scores, same, 10, insightface_thresholds())
    exact = kfold_accuracy(scores, same, 10)
    assert grid.accuracy == pytest.approx(0.5)
    assert exact.accuracy > 0.75
    # each fold's exact threshold is the best possible on the other folds: brute force over every cut
    d = 2 - 2 * scores
    folds = np.array_split(np.arange(600), 10)
    for k, test in enumerate(folds):
        train = np.setdiff1d(np.arange(600), test)
        cuts = np.r_[-np.inf, np.sort(d[train]) + 1e-15]
        best = max(((d[train] < c) == same[train]).mean() for c in cuts)
        t = 2 - 2 * exact.fold_threshold[k]
        assert ((d[train] < t) == same[train]).mean() == pytest.approx(best)


def test_exact_thresholds_lie_between_the_scores():
    t = exact_thresholds(np.array([0.5, 0.1, 0.5, 0.3]))
    np.testing.assert_allclose(t, [-0.9, 0.2, 0.4, 1.5])
