"""Few-shot subsets of a face rec: K images per identity from a fraction P of the identities.

Deterministic by seed: the identities are the first ``round(P * C)`` of ``default_rng(seed)``'s
permutation (kept in their original order, relabelled 0..C'-1), and each identity's K images are
drawn from ``default_rng([seed, label])`` (its own stream, so changing P keeps the images of the
identities that stay). An identity with fewer than K images keeps all of them and is counted.
Image bytes are copied, not re-encoded.
"""

from __future__ import annotations

import os

import numpy as np

from lafs_fast.data.recordio import RecordIOReader, read_meta
from lafs_fast.data.recordio_writer import IdentityRecWriter


def choose_subset(
    identities: list[tuple[int, np.ndarray]], *, shots: int | None, fraction: float, seed: int
) -> list[tuple[int, np.ndarray]]:
    """``identities``: ``(label, image keys)`` -> the chosen ``(label, keys)``, in label order."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"--fraction must be in (0, 1], not {fraction}")
    if shots is not None and shots < 1:
        raise ValueError(f"--shots must be at least 1, not {shots}")
    n = len(identities)
    take = max(1, round(fraction * n))
    chosen = np.sort(np.random.default_rng(seed).permutation(n)[:take])
    out = []
    for i in chosen:
        label, keys = identities[int(i)]
        if shots is not None and len(keys) > shots:
            keys = np.sort(np.random.default_rng([seed, int(label)]).choice(keys, size=shots, replace=False))
        out.append((int(label), np.asarray(keys)))
    return out


def make_subset(
    rec: str | os.PathLike,
    out: str | os.PathLike,
    *,
    shots: int | None,
    fraction: float = 1.0,
    seed: int = 0,
    overwrite: bool = False,
) -> dict:
    """Write the subset of ``rec`` to ``out/train.rec`` (+ idx, property, lafs_fast.json); returns counts."""
    reader = RecordIOReader(rec)
    chosen = choose_subset(list(reader.identities()), shots=shots, fraction=fraction, seed=seed)
    short = sum(1 for _, k in chosen if shots is not None and len(k) < shots)
    src_meta = read_meta(rec)
    names = src_meta.get("identities")
    meta = {
        "color_order": src_meta.get("color_order", "RGB"),
        "subset_of": str(reader.rec_path.resolve()),
        "shots": shots,
        "fraction": fraction,
        "seed": seed,
        "source_labels": [label for label, _ in chosen],
    }
    if names:
        meta["identities"] = [names[label] for label, _ in chosen]
    iw = IdentityRecWriter(out, overwrite=overwrite)  # streamed: record by record, never all in memory
    try:
        for label, keys in chosen:
            for k in keys:
                iw.add(reader.image(int(k)), label)
    except BaseException:
        iw.abort()
        raise
    counts = iw.finish(height=reader.property.height, width=reader.property.width, meta=meta)
    return {**counts, "identities_with_fewer_shots": short}
