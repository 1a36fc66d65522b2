"""Dataset tools behind ``lafs-fast data inspect`` and ``verify``: statistics, a montage, full decode."""

from __future__ import annotations

import io
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from lafs_fast.data.recordio import (
    BAD_SUFFIX,
    CorruptRecordError,
    RecordIOError,
    RecordIOReader,
    check_image_header,
    first_label,
    read_meta,
)
from lafs_fast.io import atomic_write_bytes


def inspect_rec(
    rec: str | os.PathLike, *, montage: str | os.PathLike | None = None, rows: int = 8, cols: int = 8
) -> dict:
    """Counts and per-identity statistics of a rec; writes a ``rows x cols`` montage PNG when asked
    (one row per identity, evenly spread over the labels; shown in RGB)."""
    r = RecordIOReader(rec)
    per_id = [(label, keys) for label, keys in r.identities()]
    counts = np.array([len(k) for _, k in per_id]) if per_id else np.zeros(1, int)
    meta = read_meta(rec)
    report = {
        "rec": str(r.rec_path),
        "records": int(len(r.keys)),
        "images": r.num_images,
        "identities": len(per_id),
        "num_classes": r.num_classes,
        "property": f"{r.property.num_classes},{r.property.height},{r.property.width}"
        + (" (inferred: no property file)" if r.property.inferred else ""),
        "header": f"identity records [{r.header0[0]}, {r.header0[1]})"
        if r.header0
        else "none (no InsightFace header record)",
        "images_per_identity": {
            "min": int(counts.min()),
            "median": float(np.median(counts)),
            "mean": round(float(counts.mean()), 2),
            "max": int(counts.max()),
        },
        "color_order": meta.get("color_order", "unknown (no lafs_fast.json)"),
        "bad_listed": len(r.bad_keys()),
    }
    if montage is not None:
        bgr = meta.get("color_order") == "BGR"
        sel = np.linspace(0, len(per_id) - 1, min(rows, len(per_id))).round().astype(int) if per_id else []
        sheet = Image.new("RGB", (cols * 112, len(sel) * 112), (0, 0, 0))
        for row, i in enumerate(sel):
            for col, k in enumerate(per_id[i][1][:cols]):
                try:
                    im = Image.open(io.BytesIO(r.image(int(k)))).convert("RGB").resize((112, 112))
                except (OSError, ValueError, SyntaxError):
                    continue  # a corrupt image stays a black tile; `verify` names it
                if bgr:
                    im = Image.fromarray(np.asarray(im)[..., ::-1])
                sheet.paste(im, (col * 112, row * 112))
        buf = io.BytesIO()
        sheet.save(buf, format="PNG")
        atomic_write_bytes(buf.getvalue(), montage)
        report["montage"] = str(montage)
    return report


def _check(r: RecordIOReader, key: int) -> str | None:
    """None when record ``key`` reads (framing, IRHeader, a finite label) and decodes, else the reason."""
    try:
        header, data = r.record(key)
        if not np.isfinite(first_label(header)):
            return f"its label is {first_label(header)}"
        check_image_header(data, (r.property.height, r.property.width))  # before decoding: size and pixel cap
        with Image.open(io.BytesIO(data)) as im:
            im.load()
        return None
    except CorruptRecordError as e:
        return str(e).split(" is corrupt: ", 1)[-1]
    except (OSError, ValueError, SyntaxError) as e:
        return f"{type(e).__name__}: {e}"


def verify_rec(
    rec: str | os.PathLike, *, workers: int | None = None, write_bad: bool = False, progress: bool = True
) -> dict:
    """Decode every image record; ``corrupt``: list of ``(key, offset, reason)``. Also checks that
    every label is inside ``[0, num_classes)`` of the property file and that the identity records
    cover the image keys (``problems``). ``write_bad``: list the corrupt keys in ``<rec>.bad``
    (atomically), which every loader then skips."""
    from tqdm import tqdm

    r = RecordIOReader(rec)
    keys = r.image_keys
    workers = workers or min(16, os.cpu_count() or 1)
    corrupt: list[tuple[int, int, str]] = []
    window = 256 * workers  # bounded: millions of records never become millions of pending futures (or reasons)
    with (
        ThreadPoolExecutor(workers) as pool,
        tqdm(
            total=len(keys), desc=f"verify {r.rec_path.name}", unit="img", disable=not progress, file=sys.stderr
        ) as bar,
    ):
        for start in range(0, len(keys), window):
            chunk = keys[start : start + window].tolist()
            corrupt += [
                (k, r.offset(k), why)
                for k, why in zip(chunk, pool.map(lambda k: _check(r, k), chunk))
                if why is not None
            ]
            bar.update(len(chunk))
    problems = []
    try:
        r.check_labels()
    except RecordIOError as e:  # labels past the class count: the property file or the rec is wrong, not one record
        problems.append(str(e))
    if r.header0 is not None:
        covered = sum(b - a for a, b in r.identity_ranges())
        if covered != r.num_images:
            problems.append(f"the identity records cover {covered} image keys but the rec holds {r.num_images} images")
    report = {"rec": str(r.rec_path), "images": len(keys), "corrupt": corrupt, "problems": problems}
    if write_bad:
        path = r.rec_path.with_suffix(r.rec_path.suffix + BAD_SUFFIX)
        text = "# keys of corrupt images found by `lafs-fast data verify`; the loaders skip them\n" + "".join(
            f"{k}\t{o}\t{why}\n" for k, o, why in corrupt
        )
        atomic_write_bytes(text.encode(), path)
        report["bad_file"] = str(path)
    return report
