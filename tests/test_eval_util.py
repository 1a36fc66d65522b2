"""Helpers shared by the evaluation tests (no tests here): a tiny model file, synthetic faces."""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
import torch

from lafs_fast.config import ModelConfig
from lafs_fast.io import atomic_save
from lafs_fast.models.checkpoints import model_file
from lafs_fast.models.part_fvit import build_backbone, build_landmark_cnn

TINY = dict(dim=32, depth=1, heads=2, head_dim=16, mlp_dim=64)


def tiny_model_file(path: Path, landmarks: bool = True, seed: int = 0) -> Path:
    """A random tiny Part fViT (dim 32, depth 1; with the real landmark CNN) as a lafs-fast model file."""
    torch.manual_seed(seed)
    m = ModelConfig(**TINY)
    backbone = build_backbone(m)
    lcnn = build_landmark_cnn(m) if landmarks else None
    atomic_save(model_file(m, backbone, lcnn), path)
    return path


def faces(n: int, seed: int = 0, size: int = 112) -> np.ndarray:
    """n smooth random uint8 faces (n, size, size, 3): blurred noise, so JPEG keeps them recognisable."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(s).resize((size, size), Image.BICUBIC)) for s in small])


def jpeg(img: np.ndarray, quality: int = 95) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def run_command(module, argv: list[str]) -> int:
    """Parse ``argv`` with a command module's own ``add_arguments`` and call its ``run`` (no
    dependency on the top-level COMMANDS table)."""
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return module.run(parser.parse_args(argv))
