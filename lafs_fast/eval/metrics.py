"""Verification metrics: k-fold accuracy (InsightFace protocol), ROC, TAR at FAR.

Scores are cosine similarities of L2-normalised embeddings (higher = more alike). The k-fold
accuracy follows InsightFace's ``calculate_roc``: squared Euclidean distance ``d = 2 - 2 cos``, a
pair is "same" when ``d < t``; the pairs are cut into k contiguous folds (sklearn
``KFold(shuffle=False)`` sizes); for each fold the threshold with the best accuracy on the OTHER k-1
folds (first one on ties) is applied to it. The candidate thresholds are by default EXACT, as an ROC
takes them: every midpoint between consecutive distinct distances of the other folds (and one below
and one above all of them), so no accuracy reachable on those folds is missed. InsightFace's grid
``0, 0.01, ..., 3.99`` (:func:`insightface_thresholds`) is kept for comparison with published tables;
it misses the best threshold when the scores crowd closer than its step (a weak or collapsed model).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "best_accuracy",
    "DEFAULT_FARS",
    "KFoldResult",
    "kfold_accuracy",
    "exact_thresholds",
    "insightface_thresholds",
    "roc_curve",
    "tar_at_far",
    "l2_normalise",
]

DEFAULT_FARS: tuple[float, ...] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def l2_normalise(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows of ``x`` (N, D) float scaled to unit length (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


@dataclass
class KFoldResult:
    """``accuracy``/``std``: mean and std over folds of the held-out fold accuracy; ``threshold``:
    mean of the chosen cosine thresholds; ``fold_accuracy``/``fold_threshold``: per fold."""

    accuracy: float
    std: float
    threshold: float
    fold_accuracy: list[float] = field(default_factory=list)
    fold_threshold: list[float] = field(default_factory=list)


def _accuracy(dist2: np.ndarray, same: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Accuracy of "same when d < t" for every threshold: dist2 (n,), same (n,) bool -> (T,).

    Counted with sorted distances (O((n + T) log n)), so a fine threshold grid costs no (T, n) matrix.
    """
    d_same, d_diff = np.sort(dist2[same]), np.sort(dist2[~same])
    true_accepts = np.searchsorted(d_same, thresholds, side="left")  # genuine with d < t
    true_rejects = d_diff.shape[0] - np.searchsorted(d_diff, thresholds, side="left")  # impostors with d >= t
    return (true_accepts + true_rejects) / dist2.shape[0]


def insightface_thresholds(step: float = 0.01) -> np.ndarray:
    """InsightFace's squared-distance grid ``arange(0, 4, step)`` (its step: 0.01). (T,) float64."""
    if not 0 < step <= 0.5:
        raise ValueError(f"threshold step must lie in (0, 0.5], got {step}")
    return np.arange(0, 4, step)


def exact_thresholds(dist2: np.ndarray) -> np.ndarray:
    """Every distinct accuracy of "same when d < t" over distances dist2 (n,): one threshold below all
    of them, the midpoint of each pair of consecutive distinct sorted distances, one above all.
    (U + 1,) float64 ascending, U = distinct distances."""
    u = np.unique(np.asarray(dist2, dtype=np.float64))
    return np.r_[u[0] - 1.0, (u[:-1] + u[1:]) / 2, u[-1] + 1.0]


def best_accuracy(dist2: np.ndarray, same: np.ndarray) -> float:
    """The best accuracy of "same when d < t" over every threshold (no folds: a quick check of a whole
    set, e.g. the k-NN check of training runs). dist2 (n,), same (n,) bool -> accuracy in [0, 1]."""
    dist2 = np.asarray(dist2, dtype=np.float64)
    return float(_accuracy(dist2, np.asarray(same, dtype=bool), exact_thresholds(dist2)).max())


def kfold_accuracy(
    scores: np.ndarray, issame: np.ndarray, nfolds: int = 10, thresholds: np.ndarray | None = None
) -> KFoldResult:
    """k-fold verification accuracy, threshold chosen on the other folds (module doc).

    Args:
        scores: (P,) cosine similarities of L2-normalised embeddings.
        issame: (P,) bool.
        nfolds: k (10 for every standard set); needs at least k pairs.
        thresholds: squared-distance thresholds, e.g. :func:`insightface_thresholds`; None (default):
            exact, :func:`exact_thresholds` of each fold's training pairs.
    Returns: :class:`KFoldResult`; thresholds reported as cosine ``1 - t / 2``.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    same = np.asarray(issame, dtype=bool).reshape(-1)
    if scores.shape != same.shape:
        raise ValueError(f"scores {scores.shape} and issame {same.shape} must have the same length")
    if nfolds < 2 or scores.shape[0] < nfolds:
        raise ValueError(
            f"k-fold accuracy needs nfolds >= 2 and at least nfolds pairs; got {nfolds} folds, {scores.shape[0]} pairs"
        )
    grid = None if thresholds is None else np.asarray(thresholds, dtype=np.float64)
    dist2 = 2.0 - 2.0 * scores
    folds = np.array_split(np.arange(scores.shape[0]), nfolds)  # == sklearn KFold(n_splits, shuffle=False)
    accs, chosen = [], []
    for k, test in enumerate(folds):
        train = np.concatenate([f for j, f in enumerate(folds) if j != k])
        thr = exact_thresholds(dist2[train]) if grid is None else grid
        best = int(np.argmax(_accuracy(dist2[train], same[train], thr)))  # first maximum, as InsightFace
        accs.append(float(_accuracy(dist2[test], same[test], thr[best : best + 1])[0]))
        chosen.append(float(1.0 - thr[best] / 2.0))
    return KFoldResult(float(np.mean(accs)), float(np.std(accs)), float(np.mean(chosen)), accs, chosen)


def roc_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC of "same when score >= threshold", one point per distinct score (plus the origin).

    scores: (P,) float; labels: (P,) bool. Returns ``fpr, tpr, thresholds``, each (T + 1,) float64,
    fpr and tpr non-decreasing, ``thresholds[0] = +inf``.
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels, dtype=bool).reshape(-1)
    if s.shape != y.shape:
        raise ValueError(f"scores {s.shape} and labels {y.shape} must have the same length")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"an ROC needs both genuine and impostor pairs; got {n_pos} genuine, {n_neg} impostor")
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.nonzero(np.diff(s))[0], s.shape[0] - 1]  # last index of each distinct score
    tp = np.cumsum(y)[last]
    fp = (last + 1) - tp
    return (np.r_[0.0, fp / n_neg], np.r_[0.0, tp / n_pos], np.r_[np.inf, s[last]])


def tar_at_far(
    scores: np.ndarray, labels: np.ndarray, fars: tuple[float, ...] = DEFAULT_FARS, rule: str = "at_most"
) -> dict[float, float]:
    """True accept rate at each false accept rate.

    rule ``"at_most"`` (default): the largest TPR of an operating point whose FPR <= FAR; NaN when
    FAR < 1 / impostors (the set is too small to measure it). ``"nearest"``: InsightFace's IJB
    script (the point whose FPR is nearest to FAR, which may exceed it).
    """
    if rule not in ("at_most", "nearest"):
        raise ValueError(f"unknown TAR@FAR rule {rule!r}; choose at_most or nearest")
    fpr, tpr, _ = roc_curve(scores, labels)
    n_neg = int((~np.asarray(labels, dtype=bool)).sum())
    out: dict[float, float] = {}
    for far in fars:
        if rule == "nearest":
            out[far] = float(tpr[int(np.argmin(np.abs(fpr - far)))])
        elif far * n_neg < 1:
            out[far] = float("nan")
        else:
            out[far] = float(tpr[fpr <= far + 1e-12].max())
    return out
