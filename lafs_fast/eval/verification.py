"""1:1 verification on InsightFace ``.bin`` sets (LFW, CFP-FP, AgeDB-30, CALFW, CPLFW).

Protocol (docs/method.md section 5), explicit so that numbers can be reproduced:
1. decode each image to 112x112 RGB (resized if stored at another size);
2. embed it and its horizontal flip, sum the two raw embeddings, L2-normalise;
3. score each pair by cosine similarity;
4. 10-fold accuracy, the threshold of each fold chosen on the other nine (exact: every midpoint of
   the sorted scores; or InsightFace's grid of squared-distance thresholds), reported as mean +- std
   over folds; plus TAR at FAR over the whole set (``metrics.tar_at_far``), NaN where the set has too
   few impostor pairs for that FAR.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from lafs_fast.data.binfile import load_bin
from lafs_fast.eval.embedder import Embedder, decode_face
from lafs_fast.eval.metrics import DEFAULT_FARS, insightface_thresholds, kfold_accuracy, l2_normalise, tar_at_far
from lafs_fast.io import atomic_write_bytes

__all__ = [
    "SetResult",
    "pct",
    "evaluate_scores",
    "evaluate_bin",
    "format_table",
    "save_results",
    "save_scores",
    "load_scores",
]


@dataclass
class SetResult:
    """One evaluated set. ``accuracy``/``std`` in [0, 1] (NaN for IJB, which has no k-fold protocol);
    ``tar``: {FAR: TAR}; ``scores``/``labels``: (P,) pair scores and truths (kept for ROC plots)."""

    name: str
    kind: str  # "bin" or "ijb"
    pairs: int
    genuine: int
    accuracy: float = float("nan")
    std: float = float("nan")
    threshold: float = float("nan")
    fold_accuracy: list[float] = field(default_factory=list)
    tar: dict[float, float] = field(default_factory=dict)
    scores: np.ndarray | None = field(default=None, repr=False)
    labels: np.ndarray | None = field(default=None, repr=False)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("scores"), d.pop("labels")
        d["tar"] = {f"{k:g}": (None if math.isnan(v) else v) for k, v in self.tar.items()}
        for k in ("accuracy", "std", "threshold"):
            d[k] = None if math.isnan(d[k]) else d[k]
        return d


def evaluate_scores(
    name: str,
    scores: np.ndarray,
    issame: np.ndarray,
    nfolds: int = 10,
    fars: Sequence[float] = DEFAULT_FARS,
    kind: str = "bin",
    far_rule: str = "at_most",
    threshold_step: float | None = None,
) -> SetResult:
    """Metrics of pair scores (P,) float against issame (P,) bool; k-fold accuracy when ``nfolds``,
    over exact thresholds (``threshold_step`` None) or the squared-distance grid
    ``arange(0, 4, threshold_step)`` (InsightFace: 0.01)."""
    scores = np.asarray(scores, dtype=np.float64)
    issame = np.asarray(issame, dtype=bool)
    res = SetResult(name, kind, int(scores.shape[0]), int(issame.sum()), scores=scores, labels=issame)
    if nfolds:
        grid = None if threshold_step is None else insightface_thresholds(threshold_step)
        k = kfold_accuracy(scores, issame, nfolds, grid)
        res.accuracy, res.std, res.threshold, res.fold_accuracy = k.accuracy, k.std, k.threshold, k.fold_accuracy
    res.tar = tar_at_far(scores, issame, tuple(fars), rule=far_rule)
    n_neg = res.pairs - res.genuine
    if far_rule == "at_most" and any(math.isnan(v) for v in res.tar.values()):
        res.notes.append(f"TAR at FAR < 1/{n_neg} is n/a: the set has only {n_neg} impostor pairs")
    return res


def evaluate_bin(
    embedder: Embedder,
    path: str | Path,
    nfolds: int = 10,
    fars: Sequence[float] = DEFAULT_FARS,
    progress: bool = True,
    workers: int = 4,
    threshold_step: float | None = None,
) -> SetResult:
    """Read a ``.bin`` safely, embed with flip-sum (the embedder's setting), score, measure."""
    bs = load_bin(path)

    def load(item: tuple[int, bytes]) -> np.ndarray:
        try:
            return decode_face(item[1], embedder.image_size)
        except OSError as exc:  # PIL's UnidentifiedImageError included
            raise ValueError(f"{path}: image {item[0]} cannot be decoded ({exc}); the file is damaged") from None

    emb = embedder.embed_items(
        list(enumerate(bs.images)), load, progress=bs.name if progress else None, workers=workers
    )
    emb = l2_normalise(emb)
    scores = np.sum(emb[0::2] * emb[1::2], axis=1)
    return evaluate_scores(bs.name, scores, bs.issame, nfolds, fars, threshold_step=threshold_step)


def pct(v: float) -> str:
    """A rate in [0, 1] as a percentage with two decimals, 'n/a' for NaN."""
    return "n/a" if v is None or math.isnan(v) else f"{100 * v:.2f}"


def format_table(results: Sequence[SetResult], fars: Sequence[float] = (1e-4, 1e-3)) -> str:
    """A plain-text table: set, pairs, accuracy % +- std, TAR % at the given FARs."""
    head = ["set", "pairs", "acc % (10-fold)", *[f"TAR@FAR={f:g} %" for f in fars]]
    rows = []
    for r in results:
        acc = "-" if math.isnan(r.accuracy) else f"{100 * r.accuracy:.2f} +- {100 * r.std:.2f}"
        rows.append([r.name, str(r.pairs), acc, *[pct(r.tar.get(f, float("nan"))) for f in fars]])
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, rows)])


def save_scores(path: str | Path, result: SetResult) -> None:
    """Pair scores and truths as ``.npz`` (``scores`` (P,) float64, ``labels`` (P,) bool, ``name``),
    the input of ``lafs-fast viz roc``; written atomically."""
    import io

    buf = io.BytesIO()
    np.savez(buf, scores=result.scores, labels=result.labels, name=np.array(result.name))
    atomic_write_bytes(buf.getvalue(), path)


def load_scores(path: str | Path) -> tuple[str, np.ndarray, np.ndarray]:
    """-> (name, scores (P,) float64, labels (P,) bool) from ``save_scores`` output (no pickles)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"scores file {path} does not exist; `lafs-fast eval ... --out DIR` writes DIR/<set>_scores.npz"
        )
    try:
        with np.load(path, allow_pickle=False) as z:
            return str(z["name"]), z["scores"].astype(np.float64), z["labels"].astype(bool)
    except (KeyError, ValueError, OSError) as exc:
        raise ValueError(f"{path} is not a scores file written by `lafs-fast eval` ({exc})") from None


def save_results(out_dir: str | Path, results: Sequence[SetResult], meta: dict) -> Path:
    """Write ``results.json`` (metrics + ``meta``: model, protocol), ``results.txt`` (the table) and
    one ``<set>_scores.npz`` per set into ``out_dir``; returns the JSON path."""
    out = Path(out_dir)
    payload = {**meta, "results": [r.to_json() for r in results]}
    for r in results:
        save_scores(out / f"{r.name}_scores.npz", r)
    atomic_write_bytes((format_table(results) + "\n").encode(), out / "results.txt")
    atomic_write_bytes((json.dumps(payload, indent=1) + "\n").encode(), out / "results.json")
    return out / "results.json"
