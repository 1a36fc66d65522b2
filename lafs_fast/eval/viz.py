"""``lafs-fast viz``: PNG pictures of landmarks, ROC curves and training curves.

- ``viz landmarks --model M SRC [SRC ...] --out faces.png``: the landmark CNN's 196 points drawn on
  faces (SRC: image files, folders searched recursively, or a verification ``.bin``); each point's
  colour is its index, so the same colour is the same token (and position embedding) on every face.
- ``viz roc SCORES [SCORES ...] --out roc.png``: ROC curves (log FAR axis) of ``lafs-fast eval --out``
  results (``<set>_scores.npz`` files, or the folder holding them).
- ``viz curves metrics.jsonl [...] --out curves.png [--keys loss lr]``: training curves from a
  metrics log, one JSON object per line with ``"step"`` and numeric metrics; one panel per metric.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lafs_fast.io import atomic_write_bytes

log = logging.getLogger(__name__)

__all__ = ["draw_landmarks", "plot_roc", "plot_curves", "read_metrics", "add_arguments", "run"]


def _plt():
    from lafs_fast.errors import require_extra

    require_extra("lafs-fast viz", "viz", "matplotlib")
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: str | Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    _plt().close(fig)
    atomic_write_bytes(buf.getvalue(), out)


def draw_landmarks(
    faces: np.ndarray, coords: np.ndarray, out: str | Path, titles: Sequence[str] | None = None, cols: int = 4
) -> None:
    """faces uint8 (B, S, S, 3), coords (B, L, 2) px (x, y) -> a PNG grid, points coloured by index."""
    plt = _plt()
    b = faces.shape[0]
    cols = max(1, min(cols, b))
    rows = math.ceil(b / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), squeeze=False)
    colours = np.arange(coords.shape[1])
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= b:
            continue
        ax.imshow(faces[i], interpolation="bilinear")
        ax.scatter(coords[i, :, 0], coords[i, :, 1], c=colours, cmap="turbo", s=9, edgecolors="none")
        ax.set_xlim(-0.5, faces.shape[2] - 0.5)
        ax.set_ylim(faces.shape[1] - 0.5, -0.5)
        if titles is not None:
            ax.set_title(titles[i], fontsize=8)
    fig.suptitle(f"{coords.shape[1]} learned landmarks (colour = token index)", fontsize=10)
    _save(fig, out)


def plot_roc(curves: Sequence[tuple[str, np.ndarray, np.ndarray]], out: str | Path) -> None:
    """curves: [(name, scores (P,), labels (P,) bool)] -> ROC PNG, TAR against log FAR."""
    from lafs_fast.eval.metrics import roc_curve, tar_at_far

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name, scores, labels in curves:
        fpr, tpr, _ = roc_curve(scores, labels)
        t = tar_at_far(scores, labels, (1e-4,))[1e-4]
        label = name + ("" if math.isnan(t) else f" (TAR@1e-4 {100 * t:.2f} %)")
        keep = fpr > 0
        ax.plot(fpr[keep], tpr[keep], label=label)
    ax.set_xscale("log")
    ax.set_xlabel("false accept rate")
    ax.set_ylabel("true accept rate")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("ROC")
    _save(fig, out)


def read_metrics(path: str | Path) -> list[dict]:
    """JSONL metrics log -> records with a numeric ``step`` (blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"metrics log {path} does not exist")
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a text file; a metrics log holds one JSON object per line") from None
    recs = []
    lines = text.splitlines()
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) and not text.endswith("\n"):  # a write cut short (a kill, a full disk): the rest holds
                log.warning("%s: dropped its last line, which is not whole JSON (a write cut short)", path)
                continue
            raise ValueError(f"{path} line {i} is not JSON; a metrics log holds one JSON object per line") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("step"), (int, float)):
            raise ValueError(
                f'{path} line {i} has no numeric "step"; each line must be an object like {{"step": 10, "loss": 2.3}}'
            )
        recs.append(rec)
    if not recs:
        raise ValueError(f"{path} holds no metrics")
    return recs


def plot_curves(
    logs: Sequence[tuple[str, list[dict]]], out: str | Path, keys: Sequence[str] | None = None
) -> list[str]:
    """logs: [(run name, records)] -> PNG with one panel per metric (x = step); returns the metrics drawn."""
    plt = _plt()
    seen: dict[str, None] = {}
    for _, recs in logs:
        for r in recs:
            for k, v in r.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    seen.setdefault(k)
    if not seen:
        raise ValueError('the metrics logs hold no numeric metric besides "step"')
    unknown = [k for k in keys or () if k not in seen]
    if unknown:  # a typo would draw an empty panel and look like a metric that never moved
        raise ValueError(f"--keys {' '.join(unknown)}: not in the metrics logs; their numeric keys: {', '.join(seen)}")
    keys = list(seen) if keys is None else list(keys)
    n = len(keys)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for name, recs in logs:
            pts = [
                (r["step"], r[key])
                for r in recs
                if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)
            ]
            if pts:
                x, y = zip(*pts)
                ax.plot(x, y, label=name, linewidth=1)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        if len(logs) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    _save(fig, out)
    return list(keys)


# ---------------------------------------------------------------- CLI


def _faces_from(sources: Sequence[str], size: int, limit: int) -> tuple[np.ndarray, list[str]]:
    from lafs_fast.data.binfile import load_bin
    from lafs_fast.eval.embed import list_images
    from lafs_fast.eval.embedder import decode_face

    faces, names = [], []
    for s in sources:
        p = Path(s)
        if p.is_file() and p.suffix == ".bin":
            bs = load_bin(p)
            for i, data in enumerate(bs.images[: limit - len(faces)]):
                faces.append(decode_face(data, size))
                names.append(f"{bs.name}[{i}]")
        elif p.is_dir() or p.is_file():
            for f in (list_images(p) if p.is_dir() else [p])[: limit - len(faces)]:
                faces.append(decode_face(f, size))
                names.append(f.name)
        else:
            raise FileNotFoundError(f"{p} does not exist; pass face images, folders of them or a .bin")
        if len(faces) >= limit:
            break
    return np.stack(faces), names


def add_arguments(p: argparse.ArgumentParser) -> None:
    from lafs_fast.eval.cli import add_model_arguments

    sub = p.add_subparsers(dest="viz", required=True, metavar="WHAT")
    lm = sub.add_parser("landmarks", help="a checkpoint's learned landmarks drawn on faces")
    lm.add_argument("sources", nargs="+", help="face images, folders of them, or a .bin")
    lm.add_argument("--model", required=True)
    lm.add_argument("--out", default="landmarks.png")
    lm.add_argument("--max", type=int, default=16, help="faces to draw (default 16)")
    add_model_arguments(lm)
    roc = sub.add_parser("roc", help="ROC curves from `lafs-fast eval --out` scores")
    roc.add_argument("scores", nargs="+", help="<set>_scores.npz files or folders holding them")
    roc.add_argument("--out", default="roc.png")
    cur = sub.add_parser("curves", help="training curves from JSONL metrics logs")
    cur.add_argument("logs", nargs="+", help='metrics.jsonl files (one JSON object per line with "step")')
    cur.add_argument("--keys", nargs="+", default=None, help="metrics to draw (default: every numeric key)")
    cur.add_argument("--out", default="curves.png")


def run(args: argparse.Namespace) -> int:
    if args.viz == "landmarks":
        from lafs_fast.eval.cli import make_embedder

        emb = make_embedder(args, flip=False)
        faces, names = _faces_from(args.sources, emb.image_size, max(1, args.max))
        coords = np.concatenate(
            [emb.landmarks(faces[s : s + emb.batch_size]) for s in range(0, len(faces), emb.batch_size)]
        )
        draw_landmarks(faces, coords, args.out, names)
        print(f"wrote {args.out}: {coords.shape[1]} landmarks on {len(faces)} faces ({emb.describe()})")
    elif args.viz == "roc":
        from lafs_fast.eval.verification import load_scores

        files: list[Path] = []
        for s in args.scores:
            p = Path(s)
            files += sorted(p.glob("*_scores.npz")) if p.is_dir() else [p]
        if not files:
            raise ValueError(
                f"no *_scores.npz in {', '.join(args.scores)}; write them with `lafs-fast eval ... --out DIR`"
            )
        plot_roc([load_scores(f) for f in files], args.out)
        print(f"wrote {args.out}: ROC of {len(files)} set(s)")
    else:
        logs = [(Path(f).parent.name or Path(f).stem, read_metrics(f)) for f in args.logs]
        keys = plot_curves(logs, args.out, args.keys)
        print(f"wrote {args.out}: {', '.join(keys)} over step")
    return 0
