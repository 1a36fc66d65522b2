"""``lafs-fast embed FOLDER --model M --out FILE``: embeddings of every face in a folder; ONNX export.

Every image under FOLDER (recursively; aligned faces, resized to 112x112 when another size) is
embedded with flip-sum and L2-normalised. FILE is an ``.npz`` (no pickles) with

- ``embeddings``: float32 (N, dim), unit rows (``--raw``: the unnormalised flip sums);
- ``paths``: (N,) str, relative to FOLDER, sorted;
- ``landmarks``: float32 (N, 196, 2) px, with ``--landmarks`` (Part fViT models only);
- ``protocol``: str, the model kind, dtype and input normalisation used.

``--export-onnx OUT.onnx`` writes the recognition model (landmark CNN + sampler + backbone) as ONNX
and checks its outputs against PyTorch (FOLDER is then optional). Examples::

    lafs-fast embed faces/ --model finetuned.pt --out faces.npz
    lafs-fast embed --model finetuned.pt --export-onnx partfvit.onnx
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np

from lafs_fast.eval.cli import add_model_arguments, make_embedder
from lafs_fast.eval.embedder import Embedder, decode_face
from lafs_fast.eval.metrics import l2_normalise
from lafs_fast.io import atomic_write_bytes, check_output_file

__all__ = ["list_images", "embed_folder", "add_arguments", "run"]
_IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".pgm", ".ppm", ".pnm", ".tif", ".tiff", ".webp"}


def list_images(folder: str | Path) -> list[Path]:
    """Every image file under ``folder``, recursively, sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder of face images")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in _IMAGE_EXTS)
    if not files:
        raise ValueError(f"{folder} holds no image files ({', '.join(sorted(_IMAGE_EXTS))})")
    return files


def embed_folder(
    embedder: Embedder,
    folder: str | Path,
    out: str | Path,
    landmarks: bool = False,
    raw: bool = False,
    progress: bool = True,
    workers: int = 4,
) -> dict:
    """Embed every image under ``folder`` into ``out`` (.npz, module doc); returns {"images", "dim", "out"}."""
    folder = Path(folder)
    files = list_images(folder)

    def load(p: Path) -> np.ndarray:
        try:
            return decode_face(p, embedder.image_size)
        except OSError as exc:
            raise ValueError(f"cannot read image {p} ({exc}); remove it and run again") from None

    got = embedder.embed_items(
        files, load, progress="embed" if progress else None, workers=workers, return_landmarks=landmarks
    )
    emb, pts = got if landmarks else (got, None)
    arrays = {
        "embeddings": (emb if raw else l2_normalise(emb)).astype(np.float32),
        "paths": np.array([str(p.relative_to(folder)) for p in files]),
        "protocol": np.array(embedder.describe()),
    }
    if pts is not None:
        arrays["landmarks"] = pts.astype(np.float32)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(buf.getvalue(), out)
    return {"images": len(files), "dim": int(emb.shape[1]), "out": str(out)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", nargs="?", default=None, help="folder of aligned faces (searched recursively)")
    p.add_argument("--model", required=True, help="model file (lafs-fast or reference checkpoint, or an .onnx export)")
    p.add_argument("--out", default=None, help="output .npz (embeddings, paths[, landmarks])")
    p.add_argument("--landmarks", action="store_true", help="also store the landmark CNN's 196 points per face")
    p.add_argument("--raw", action="store_true", help="store the unnormalised flip sums instead of unit vectors")
    p.add_argument("--no-flip", action="store_true", help="embed the face alone, without its mirror")
    p.add_argument(
        "--export-onnx",
        default=None,
        metavar="OUT.onnx",
        help="write the model as ONNX (parity-checked with onnxruntime)",
    )
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    p.add_argument(
        "--onnx-exporter",
        default="dynamo",
        choices=("dynamo", "torchscript"),
        help="dynamo (default, maintained) or torchscript (older tracer, much faster)",
    )
    p.add_argument("--no-progress", action="store_true")
    add_model_arguments(p)


def run(args: argparse.Namespace) -> int:
    if args.folder is None and args.export_onnx is None:
        raise ValueError("give a FOLDER to embed (with --out) or --export-onnx OUT.onnx")
    if args.folder is not None and args.out is None:
        raise ValueError("--out FILE.npz is required to embed a folder")
    if str(args.model).lower().endswith(".onnx") and (args.export_onnx or args.landmarks):
        raise ValueError(
            f"{args.model} is already ONNX (embeddings only): pass the PyTorch model file for "
            f"{'--export-onnx' if args.export_onnx else '--landmarks'}"
        )
    for out in (args.out, args.export_onnx):  # before any work: learning it after embedding everything wastes the run
        if out is not None:
            check_output_file(out)
    if args.export_onnx:
        from lafs_fast.eval.loading import load_eval_model
        from lafs_fast.eval.onnx_export import export_onnx

        rep = export_onnx(
            load_eval_model(args.model, args.head_dim)[0],
            args.export_onnx,
            opset=args.opset,
            exporter=args.onnx_exporter,
        )
        print(
            f"wrote {rep['path']} (opset {rep['opset']}, {rep['exporter']} exporter): images float32 (B, 3, 112, 112) "
            "in [-1, 1] (x/255*2-1) -> "
            f"embedding (B, dim); max |onnxruntime - PyTorch| = {rep['max_abs_diff']:.2e}"
        )
        print("metadata: " + ", ".join(f"{k.removeprefix('lafs_fast.')}={v}" for k, v in rep["metadata"].items()))
    if args.folder is not None:
        emb = make_embedder(args, flip=not args.no_flip)
        print(f"model {args.model} ({emb.checkpoint_kind}): {emb.describe()}", file=sys.stderr)
        rep = embed_folder(
            emb,
            args.folder,
            args.out,
            landmarks=args.landmarks,
            raw=args.raw,
            progress=not args.no_progress,
            workers=args.workers,
        )
        print(f"wrote {rep['out']}: {rep['images']} embeddings of dim {rep['dim']}")
    return 0
