"""``lafs-fast eval MODEL SET [SET ...]``: verification accuracy and TAR@FAR of a checkpoint.

A SET is a verification ``.bin`` (LFW, CFP-FP, AgeDB-30, CALFW, CPLFW...), a folder of ``.bin``
files, or an IJB-B/C release root (a folder with ``meta/`` and ``loose_crop/``). MODEL is any model
file or training checkpoint lafs-fast writes, or a reference Part fViT / LAFS checkpoint. Example::

    lafs-fast eval finetuned.pt data/lfw.bin data/cfp_fp.bin data/agedb_30.bin IJB_release/IJBC --out eval/

prints the protocol line and a results table; ``--out`` also writes results.json, results.txt and
``<set>_scores.npz`` (for ``lafs-fast viz roc``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lafs_fast.errors import non_negative_int, positive_int, probability
from lafs_fast.eval.metrics import DEFAULT_FARS

__all__ = ["add_arguments", "run", "resolve_sets", "add_model_arguments", "make_embedder"]


def _folds(text: str) -> int:
    """--nfolds: k-fold needs at least 2 folds (one to choose the threshold on, one to score)."""
    import argparse

    n = positive_int(text)
    if n < 2:
        raise argparse.ArgumentTypeError(f"must be >= 2 (the threshold is chosen on the other folds), got {text}")
    return n


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """Options every embedding command shares (eval, embed, viz landmarks)."""
    p.add_argument("--device", default="auto", help="auto (cuda when available, else cpu), cpu, cuda, cuda:N")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "bf16", "fp16", "fp32"),
        help="backbone compute dtype (auto: bf16 on CUDA, fp32 on the CPU)",
    )
    p.add_argument("--batch-size", type=positive_int, default=128, help="faces per forward pass (default 128)")
    p.add_argument(
        "--input-norm",
        default="train",
        choices=("train", "reference"),
        help="train: x/255*2-1, as in training (default); reference: x/255-0.5, as the reference's eval scripts",
    )
    p.add_argument(
        "--sampler", default="auto", choices=("auto", "torch", "triton"), help="patch sampler backend (default auto)"
    )
    p.add_argument("--workers", type=non_negative_int, default=4, help="image decode threads (default 4)")
    p.add_argument(
        "--head-dim",
        type=positive_int,
        default=64,
        help="attention head width of a REFERENCE checkpoint (default 64, the reference's)",
    )


def make_embedder(args: argparse.Namespace, flip: bool = True):
    """Load ``args.model`` and wrap it in an Embedder per the shared options (an ``.onnx`` file in
    an OnnxEmbedder)."""
    import torch

    from lafs_fast.eval.embedder import Embedder
    from lafs_fast.eval.loading import load_eval_model

    if str(args.model).lower().endswith(".onnx"):  # run by onnxruntime, its metadata checked (onnx_model.py)
        from lafs_fast.eval.onnx_model import OnnxEmbedder

        return OnnxEmbedder(args.model, args.device, args.dtype, args.batch_size, flip, args.input_norm)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model, kind = load_eval_model(args.model, args.head_dim)
    emb = Embedder(
        model,
        device=device,
        dtype=args.dtype,
        batch_size=args.batch_size,
        flip=flip,
        input_norm=args.input_norm,
        sampler_backend=args.sampler,
    )
    emb.checkpoint_kind = kind  # printed beside the protocol line
    return emb


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = __doc__.split("\n\n")[0] if __doc__ else None
    p.add_argument("model", help="model file (lafs-fast or reference checkpoint, or an .onnx export)")
    p.add_argument("sets", nargs="+", help=".bin files, folders of .bin files, or IJB-B/C roots (meta/ + loose_crop/)")
    p.add_argument("--out", default=None, help="folder for results.json, results.txt and <set>_scores.npz")
    p.add_argument("--nfolds", type=_folds, default=10, help="folds of the .bin accuracy protocol (default 10)")
    p.add_argument(
        "--threshold-step",
        type=float,
        default=None,
        help="search the k-fold threshold on a squared-distance grid of this step (InsightFace's: 0.01, for "
        "comparison with published tables); default: exact, every midpoint between sorted scores",
    )
    p.add_argument(
        "--far", type=probability, nargs="+", default=list(DEFAULT_FARS), help="FARs for TAR (default 1e-6 .. 1e-1)"
    )
    p.add_argument(
        "--far-rule",
        default="at_most",
        choices=("at_most", "nearest"),
        help="at_most: best TAR with FPR <= FAR (default); nearest: InsightFace IJB script's nearest ROC point",
    )
    p.add_argument("--no-flip", action="store_true", help="no flip-sum (the protocol uses it; for ablations only)")
    p.add_argument(
        "--no-detector-score", action="store_true", help="IJB: do not weight image features by detector score"
    )
    p.add_argument("--ijb-target", default=None, choices=("ijbb", "ijbc"), help="IJB meta prefix (default: detected)")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_model_arguments(p)


def resolve_sets(paths: list[str]) -> list[tuple[str, Path]]:
    """[(kind 'bin' | 'ijb', path)] for the command-line SETs (folders of .bin files expanded)."""
    from lafs_fast.eval.ijb import is_ijb_root

    out: list[tuple[str, Path]] = []
    for s in paths:
        p = Path(s)
        if p.is_file():
            out.append(("bin", p))
        elif is_ijb_root(p):
            out.append(("ijb", p))
        elif p.is_dir():
            bins = sorted(p.glob("*.bin"))
            if not bins:
                raise ValueError(f"{p} holds no .bin file and is not an IJB root (no meta/*_face_tid_mid.txt)")
            out += [("bin", b) for b in bins]
        else:
            raise FileNotFoundError(
                f"evaluation set {p} does not exist; pass .bin files, folders of them, or an IJB root"
            )
    names = [p.stem if k == "bin" else p.name for k, p in out]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ValueError(f"two sets share the name {sorted(dup)[0]!r}; their result files would collide, rename one")
    return out


def run(args: argparse.Namespace) -> int:
    from lafs_fast.eval.ijb import evaluate_ijb
    from lafs_fast.eval.metrics import insightface_thresholds
    from lafs_fast.eval.verification import evaluate_bin, format_table, pct, save_results
    from lafs_fast.io import check_writable_dir

    sets = resolve_sets(args.sets)  # fail on a bad path before loading the model
    if args.threshold_step is not None:
        insightface_thresholds(args.threshold_step)  # a bad step fails here, not after embedding
    if args.out:
        check_writable_dir(args.out)
    emb = make_embedder(args, flip=not args.no_flip)
    protocol = emb.describe()
    print(f"model {args.model} ({emb.checkpoint_kind}): {protocol}", file=sys.stderr)
    results = []
    for kind, path in sets:
        if kind == "bin":
            r = evaluate_bin(
                emb,
                path,
                args.nfolds,
                args.far,
                progress=not args.no_progress,
                workers=args.workers,
                threshold_step=args.threshold_step,
            )
        else:
            r = evaluate_ijb(
                emb,
                path,
                args.ijb_target,
                args.far,
                args.far_rule,
                progress=not args.no_progress,
                workers=args.workers,
                use_detector_score=not args.no_detector_score,
            )
        results.append(r)
        if not args.json:
            acc = "" if kind == "ijb" else f"acc {pct(r.accuracy)} +- {pct(r.std)} %, "
            tars = (
                ", ".join(f"TAR@FAR={f:g} {pct(r.tar[f])} %" for f in args.far if f in (1e-4, 1e-3))
                or f"TAR@FAR={args.far[0]:g} {pct(r.tar[args.far[0]])} %"
            )
            print(f"{r.name}: {acc}{tars}", file=sys.stderr)
    meta = {
        "model": str(args.model),
        "checkpoint": emb.checkpoint_kind,
        "protocol": protocol,
        "nfolds": args.nfolds,
        "threshold_step": args.threshold_step,
        "far_rule": args.far_rule,
        "flip": not args.no_flip,
        "input_norm": args.input_norm,
    }
    if args.json:
        print(json.dumps({**meta, "results": [r.to_json() for r in results]}, indent=1))
    else:
        print(format_table(results, tuple(f for f in (1e-4, 1e-3) if f in args.far) or tuple(args.far[:2])))
        for r in results:
            for note in r.notes:
                print(f"note ({r.name}): {note}")
        search = (
            "exact thresholds"
            if args.threshold_step is None
            else f"threshold grid step {args.threshold_step:g} (squared distance)"
        )
        print(
            f"protocol: {protocol}; .bin accuracy over {args.nfolds} folds, each fold's threshold chosen on the others "
            f"({search}); "
            f"TAR@FAR rule {args.far_rule}"
        )
    if args.out:
        path = save_results(args.out, results, meta)
        print(f"wrote {path}", file=sys.stderr)
    return 0
