"""ONNX export of the recognition model: landmark CNN + patch sampler + fViT backbone, one graph.

Input ``images``: float32 (B, 3, 112, 112) in [-1, 1] (``x / 255 * 2 - 1``; dynamic batch);
output ``embedding``: float32 (B, dim), raw (normalise it, and add the flipped image's embedding for
the verification protocol). A bare fViT exports the regular-grid model.

Exporters: ``"dynamo"`` (default; ``torch.onnx.export(dynamo=True)``, needs ``onnxscript``; tens of
seconds) or ``"torchscript"`` (the older tracer, deprecated by PyTorch but about ten times faster).
The sampler goes through its torch twin (one ``grid_sample``, exported as ONNX GridSample) and
attention through the plain matmul path, so the graph runs on any ONNX runtime. Parity with PyTorch
is checked with onnxruntime on random faces before the file is kept.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from lafs_fast.eval.onnx_model import onnx_metadata, stamp_metadata
from lafs_fast.io import atomic_write
from lafs_fast.models.fvit import FViT
from lafs_fast.models.part_fvit import PartFViT

__all__ = ["EXPORTERS", "ExportWrapper", "export_onnx", "onnx_parity"]


class ExportWrapper(nn.Module):
    """images (B, 3, S, S) float32 in [-1, 1] -> embedding (B, dim) float32, no landmark outputs."""

    def __init__(self, model: PartFViT | FViT) -> None:
        super().__init__()
        model = copy.deepcopy(model).cpu().float().eval()
        backbone = model.backbone if isinstance(model, PartFViT) else model
        backbone.set_attention("math")  # plain ops: every runtime has them
        if isinstance(model, PartFViT):
            model.sampler_backend = "torch"
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)


def _require_onnx() -> None:
    from lafs_fast.errors import require_extra

    require_extra("ONNX export", "onnx", "onnx", "onnxruntime", "onnxscript")


def onnx_parity(
    model: PartFViT | FViT, onnx_path: str | Path, batch_sizes: tuple[int, ...] = (1, 3), seed: int = 0
) -> float:
    """Max |PyTorch - onnxruntime| over random faces (float32, several batch sizes); ``inf`` when
    either output holds a NaN or an infinity (NaN compares False, so ``max`` skipped it: parity 0)."""
    import onnxruntime as ort

    ref_model = ExportWrapper(model)
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(seed)
    worst = 0.0
    for b in batch_sizes:
        x = torch.rand(b, 3, 112, 112, generator=gen) * 2 - 1
        with torch.no_grad():
            ref = ref_model(x).numpy()
        got = sess.run(["embedding"], {"images": x.numpy()})[0]
        if not (np.isfinite(got).all() and np.isfinite(ref).all()):
            return math.inf
        worst = max(worst, float(np.abs(got - ref).max()))
    return worst


EXPORTERS = ("dynamo", "torchscript")


def export_onnx(
    model: PartFViT | FViT,
    out: str | Path,
    opset: int = 18,
    check: bool = True,
    atol: float = 1e-3,
    exporter: str = "dynamo",
) -> dict:
    """Export ``model`` to ``out`` (atomically) with ``exporter`` (module doc); with ``check``, refuse
    a graph whose outputs differ from PyTorch's by more than ``atol``.
    The file carries lafs-fast's metadata (``onnx_model.py``: RGB, ``x/255*2-1``, 112, no flip-sum,
    dim, version). Returns {"path", "max_abs_diff", "opset", "exporter", "metadata"}."""
    if exporter not in EXPORTERS:
        raise ValueError(f"unknown ONNX exporter {exporter!r}; choose dynamo or torchscript")
    _require_onnx()
    import warnings

    out = Path(out)
    wrapper = ExportWrapper(model)
    x = torch.rand(2, 3, 112, 112) * 2 - 1
    meta = onnx_metadata(model, image_size=x.shape[-1])
    diff = float("nan")

    def write(tmp: str) -> None:  # export, then check the file before it replaces ``out``
        nonlocal diff
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            names = {"input_names": ["images"], "output_names": ["embedding"], "opset_version": opset}
            if exporter == "dynamo":
                batch = {"dynamic_shapes": ({0: torch.export.Dim("batch")},), "external_data": False, "verbose": False}
            else:
                batch = {"dynamic_axes": {"images": {0: "batch"}, "embedding": {0: "batch"}}}
            torch.onnx.export(wrapper, (x,), tmp, **names, dynamo=exporter == "dynamo", **batch)
        stamp_metadata(tmp, meta)  # before the parity check: the checked file is the one kept
        if check:
            diff = onnx_parity(model, tmp)
            if diff == math.inf:
                raise ValueError(
                    f"the model or its exported graph gives NaN or infinite embeddings on random faces; not writing "
                    f"{out}"
                )
            if not diff <= atol:
                raise ValueError(f"the exported graph differs from PyTorch by {diff:.3g} (> {atol}); not writing {out}")

    atomic_write(out, write)
    return {"path": str(out), "max_abs_diff": diff, "opset": opset, "exporter": exporter, "metadata": meta}
