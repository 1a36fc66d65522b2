"""Make torchvision (and so timm) importable on a CPU-only torch.

PyPI's torchvision wheels are CUDA builds; on the CPU torch of our dev/CI machines their compiled
ops fail to load and ``import torchvision`` then dies with "operator torchvision::nms does not exist"
(pytorch issue 122494), taking ``import timm`` with it. Defining the op schemas that torchvision's
Python side registers fake kernels for (and a plain-torch CPU ``nms``) lets the import succeed.
Where torchvision imports normally (any GPU machine) this does nothing.
"""

from __future__ import annotations

import sys

import torch

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_LIB: torch.library.Library | None = None
applied = False  # True when the schemas had to be defined here (reported by `lafs-fast info`)


def _nms_cpu(dets: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy non-maximum suppression in plain torch: indices kept, by decreasing score."""
    order = scores.argsort(descending=True)
    x1, y1, x2, y2 = dets.unbind(1)
    areas = (x2 - x1).clamp(min=0) * (y2 - y1).clamp(min=0)
    keep = []
    suppressed = torch.zeros(dets.shape[0], dtype=torch.bool)
    for i in order.tolist():
        if suppressed[i]:
            continue
        keep.append(i)
        w = (torch.minimum(x2[i], x2) - torch.maximum(x1[i], x1)).clamp(min=0)
        h = (torch.minimum(y2[i], y2) - torch.maximum(y1[i], y1)).clamp(min=0)
        inter = w * h
        iou = inter / (areas[i] + areas - inter).clamp(min=1e-12)
        suppressed |= iou > iou_threshold
    return torch.tensor(keep, dtype=torch.int64)


def ensure_torchvision() -> None:
    """Import torchvision, defining its missing op schemas first if the plain import fails."""
    global _LIB, applied
    if "torchvision" in sys.modules and hasattr(sys.modules["torchvision"], "transforms"):
        return
    try:
        import torchvision  # noqa: F401

        return
    except ModuleNotFoundError:
        return  # not installed: nothing to fix, callers that need it will say so
    except RuntimeError as exc:
        if "torchvision::" not in str(exc):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    _LIB = torch.library.Library("torchvision", "FRAGMENT")
    for schema in _SCHEMAS.values():
        _LIB.define(schema)
    _LIB.impl("nms", _nms_cpu, "CPU")
    applied = True
    import torchvision  # noqa: F401,F811
