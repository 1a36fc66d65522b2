"""Triton kernels and their torch twins, importable as ``lafs_fast.kernels``.

The torch twins import eagerly (torch only); the Triton entry points load on first use, so this
package imports where triton is absent.
"""

from __future__ import annotations

import importlib

from lafs_fast.kernels.patch_sampling import (
    gather_landmarks,
    normalise_images,
    patch_offsets,
    sample_patches_torch,
)

_LAZY = {
    "sample_patches_triton": "lafs_fast.kernels.patch_sampling_triton",
    "ViewSpec": "lafs_fast.kernels.augment",
    "ViewParams": "lafs_fast.kernels.augment",
    "lafs_view_specs": "lafs_fast.kernels.augment",
    "draw_view_params": "lafs_fast.kernels.augment",
    "apply_views_torch": "lafs_fast.kernels.augment",
    "map_to_views": "lafs_fast.kernels.augment",
    "apply_views_triton": "lafs_fast.kernels.augment_triton",
}


def __getattr__(name: str):
    """Load the Triton entry points (and the view twin) on first use."""
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lafs_fast.kernels' has no attribute {name!r}")


__all__ = [
    "gather_landmarks",
    "normalise_images",
    "patch_offsets",
    "sample_patches_torch",
    *_LAZY,
]
