"""``lafs-fast data SUBCOMMAND``: build, inspect, subset, verify, landmarks, align, make-bin, overlap.

Each sub-command is an ``(add_arguments, run, help)`` triple in :data:`SUBCOMMANDS`; adding one
(e.g. ``make-bin``) is two functions (here or imported from another module) and one line in the
table. ``run`` functions return the exit code; user mistakes raise ValueError / FileNotFoundError,
which ``lafs_fast.cli`` prints as one line.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable


def _print(report: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(report, indent=1, default=str))
        return
    for k, v in report.items():
        if isinstance(v, list) and len(v) > 10:
            v = f"{len(v)} items, first: {v[:3]}"
        print(f"{k}: {v}")


# -- build ----------------------------------------------------------------------------------------
def _add_build(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="image folder: one sub-folder of images per identity")
    p.add_argument("out", help="output folder (gets train.rec, train.idx, property, lafs_fast.json)")
    p.add_argument(
        "--size",
        type=int,
        default=None,
        help="resize every image to SIZE x SIZE (default: keep; the loaders resize to 112)",
    )
    p.add_argument("--quality", type=int, default=95, help="JPEG quality (default 95)")
    p.add_argument(
        "--keep-jpeg",
        action="store_true",
        help="store a JPEG that needs no resize byte for byte (checked by a full decode) instead of re-encoding it",
    )
    p.add_argument("--workers", type=int, default=None, help="encode threads (default: cores, at most 16)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing train.rec in OUT")


def _run_build(args: argparse.Namespace) -> int:
    from lafs_fast.data.folder import build_rec

    rep = build_rec(
        args.src,
        args.out,
        size=args.size,
        quality=args.quality,
        workers=args.workers,
        overwrite=args.overwrite,
        keep_jpeg=args.keep_jpeg,
    )
    print(
        f"wrote {args.out}/train.rec: {rep['identities']} identities, {rep['images']} images, "
        f"{rep['height']}x{rep['width']}"
    )
    if args.keep_jpeg:
        print(f"{rep['kept_jpeg']} JPEG(s) stored as they were, {rep['images'] - rep['kept_jpeg']} re-encoded")
    for path, why in rep["skipped"]:
        print(f"skipped unreadable image {path}: {why}")
    for name in rep["empty_identities"]:
        print(f"skipped identity {name}: its folder holds no image")
    for name in rep["unreadable_identities"]:
        print(f"skipped identity {name}: none of its images could be read")
    if rep["skipped"]:
        print(f"{len(rep['skipped'])} image(s) skipped")
    return 0


# -- inspect --------------------------------------------------------------------------------------
def _add_inspect(p: argparse.ArgumentParser) -> None:
    p.add_argument("rec", help="a .rec file or a folder holding train.rec")
    p.add_argument(
        "--montage",
        default=None,
        help="montage PNG path (default: <rec name>_montage.png in the current folder; 'none' to skip)",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def _run_inspect(args: argparse.Namespace) -> int:
    from lafs_fast.data.recordio import rec_paths
    from lafs_fast.data.tools import inspect_rec

    montage = args.montage
    if montage is None:
        rec = rec_paths(args.rec)[0]
        montage = f"{rec.parent.name}_{rec.stem}_montage.png"
    rep = inspect_rec(args.rec, montage=None if montage == "none" else montage)
    _print(rep, args.json)
    return 0


# -- subset ---------------------------------------------------------------------------------------
def _add_subset(p: argparse.ArgumentParser) -> None:
    p.add_argument("rec", help="source .rec (or folder holding train.rec)")
    p.add_argument("out", help="output folder")
    p.add_argument("--shots", type=int, default=None, help="K images per identity (default: all)")
    p.add_argument("--fraction", type=float, default=1.0, help="fraction P of the identities (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the choice (default 0)")
    p.add_argument("--overwrite", action="store_true")


def _run_subset(args: argparse.Namespace) -> int:
    from lafs_fast.data.subsets import make_subset

    rep = make_subset(
        args.rec, args.out, shots=args.shots, fraction=args.fraction, seed=args.seed, overwrite=args.overwrite
    )
    print(f"wrote {args.out}/train.rec: {rep['identities']} identities, {rep['images']} images")
    if rep["identities_with_fewer_shots"]:
        print(f"{rep['identities_with_fewer_shots']} identities have fewer than {args.shots} images and keep them all")
    return 0


# -- verify ---------------------------------------------------------------------------------------
def _add_verify(p: argparse.ArgumentParser) -> None:
    p.add_argument("rec", help="a .rec file or a folder holding train.rec")
    p.add_argument("--write-bad", action="store_true", help="list corrupt keys in <rec>.bad; every loader skips them")
    p.add_argument("--workers", type=int, default=None)


def _run_verify(args: argparse.Namespace) -> int:
    from lafs_fast.data.tools import verify_rec

    rep = verify_rec(args.rec, workers=args.workers, write_bad=args.write_bad)
    for key, offset, why in rep["corrupt"]:
        print(f"corrupt: key {key} at offset {offset}: {why}")
    for msg in rep["problems"]:
        print(f"problem: {msg}")
    print(
        f"{rep['images']} images decoded, {len(rep['corrupt'])} corrupt"
        + (f"; listed in {rep['bad_file']}" if "bad_file" in rep else "")
    )
    return 1 if rep["corrupt"] or rep["problems"] else 0


# -- landmarks / align ----------------------------------------------------------------------------
def _add_landmarks(p: argparse.ArgumentParser) -> None:
    p.add_argument("rec", help="a .rec file or a folder holding train.rec")
    p.add_argument("out", nargs="?", default=None, help="sidecar .npz (default: <rec>.landmarks.npz beside it)")
    p.add_argument(
        "--detector",
        choices=("blazeface", "fan"),
        default="blazeface",
        help="blazeface: 6 keypoints (weights local); fan: 68 points (needs FAN weights)",
    )
    p.add_argument(
        "--weights",
        default=None,
        help="folder holding the weights (default: $TORCH_HOME/hub/checkpoints, then $LAFS_FAST_WEIGHTS)",
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cpu")


def _run_landmarks(args: argparse.Namespace) -> int:
    from lafs_fast.data.align import rec_landmarks

    rep = rec_landmarks(
        args.rec, args.out, detector=args.detector, weights=args.weights, batch_size=args.batch_size, device=args.device
    )
    print(
        f"wrote {rep['path']}: {rep['images']} images, {rep['found']} with a face, {rep['points']} points each "
        f"({rep['detector']})"
    )
    return 0


def _add_align(p: argparse.ArgumentParser) -> None:
    p.add_argument("raw", help="folder of photos (sub-folders per identity are kept)")
    p.add_argument("out", help="output folder of aligned 112x112 faces (same sub-folders)")
    p.add_argument("--detector", choices=("blazeface", "fan"), default="blazeface")
    p.add_argument(
        "--weights",
        default=None,
        help="folder holding the weights (default: $TORCH_HOME/hub/checkpoints, then $LAFS_FAST_WEIGHTS)",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--pick",
        choices=("central", "confident"),
        default="central",
        help="the face of a photo with several: the one nearest the photo's centre (default; face data sets "
        "centre the person they label) or the most confident detection",
    )


def _run_align(args: argparse.Namespace) -> int:
    from lafs_fast.data.align import align_folder

    rep = align_folder(
        args.raw, args.out, detector=args.detector, weights=args.weights, device=args.device, pick=args.pick
    )
    print(f"aligned {rep['aligned']} of {rep['images']} images into {args.out}")
    for path in rep["no_face"]:
        print(f"no face found: {path}")
    return 0


# -- make-bin (implemented in lafs_fast.data.make_bin) --------------------------------------------
def _add_make_bin(p: argparse.ArgumentParser) -> None:
    from lafs_fast.data.make_bin import add_arguments

    add_arguments(p)


def _run_make_bin(args: argparse.Namespace) -> int:
    from lafs_fast.data.make_bin import run

    return run(args)


# -- overlap (implemented in lafs_fast.data.overlap) ----------------------------------------------
def _add_overlap(p: argparse.ArgumentParser) -> None:
    p.add_argument("train", help="training set: a rec (or folder holding train.rec) or an image folder")
    p.add_argument("eval", help="evaluation set: a verification .bin, an image folder or a rec")
    p.add_argument(
        "--max-distance",
        type=int,
        default=24,
        help="perceptual-hash bits (of 255) two images may differ in and count as one photo (default 24)",
    )
    p.add_argument("--show", type=int, default=20, help="near-duplicate pairs to list (default 20; all with --json)")
    p.add_argument("--fail-on-overlap", action="store_true", help="exit 1 when anything is shared (for CI)")
    p.add_argument("--workers", type=int, default=None, help="decode threads (default: cores, at most 16)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def _print_overlap(rep: dict, show: int) -> None:
    """The text form of :func:`lafs_fast.data.overlap.find_overlap`'s report."""
    for side in ("train", "eval"):
        s = rep[side]
        names = "yes" if s["names"] else "none"
        print(f"{side}: {s['path']} ({s['kind']}, {s['images']} images, identity names: {names})")
    shared = rep["shared_identities"]
    if shared is None:
        print("identities by name: not compared (a side carries no identity names)")
    else:
        listed = ", ".join(f"{d['name']} (train {d['train_images']}, eval {d['eval_images']})" for d in shared)
        print(f"identities shared by name: {len(shared)}" + (f": {listed}" if shared else ""))
    print(
        f"near-duplicate images (perceptual hash, <= {rep['max_distance']} of {rep['hash_bits']} bits apart): "
        f"{rep['eval_images_with_duplicate']} eval image(s) have one among {rep['train_images_with_duplicate']} "
        "train image(s)"
    )
    for d in rep["near_duplicates"][: max(0, show)]:
        print(f"  train {d['train']} ~ eval {d['eval']}: {d['distance']} bits")
    for side, bad in rep["unreadable"].items():
        if bad:
            print(f"{len(bad)} unreadable {side} image(s) left out, first: {bad[0]}")
    print("overlap found" if shared or rep["near_duplicates"] else "no overlap found")


def _run_overlap(args: argparse.Namespace) -> int:
    from lafs_fast.data.overlap import find_overlap

    rep = find_overlap(args.train, args.eval, max_distance=args.max_distance, workers=args.workers)
    if args.json:
        print(json.dumps(rep, indent=1))
    else:
        _print_overlap(rep, args.show)
    return 1 if args.fail_on_overlap and (rep["shared_identities"] or rep["near_duplicates"]) else 0


# name -> (add_arguments, run, help). Add a sub-command with one line here.
SUBCOMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int], str]] = {
    "build": (
        _add_build,
        _run_build,
        "image folder (one sub-folder per identity) -> rec/idx/property, one label per identity",
    ),
    "inspect": (_add_inspect, _run_inspect, "counts, identities, images per identity, a montage PNG"),
    "subset": (_add_subset, _run_subset, "few-shot subset: K images per identity of a fraction of identities, by seed"),
    "verify": (_add_verify, _run_verify, "decode every record; name the corrupt ones by key and offset"),
    "landmarks": (_add_landmarks, _run_landmarks, "face-alignment landmarks of every image, into a sidecar .npz"),
    "align": (_add_align, _run_align, "detect + 5-point similarity-align raw photos to 112x112 (ArcFace template)"),
    "make-bin": (
        _add_make_bin,
        _run_make_bin,
        "verification .bin from pairs.txt or seeded balanced random pairs of an identity folder",
    ),
    "overlap": (
        _add_overlap,
        _run_overlap,
        "identities (by name) and near-duplicate images (perceptual hash) a training and an evaluation set share",
    ),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    for name, (add, run_fn, help_) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        add(p)
        p.set_defaults(data_run=run_fn)


def run(args: argparse.Namespace) -> int:
    return int(args.data_run(args) or 0)
