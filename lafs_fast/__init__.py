"""lafs-fast: a fast, faithful trainer for LAFS / Part fViT landmark-based face recognition.

Drop-in fast modules::

    from lafs_fast import sample_patches, FViT, LandmarkCNN, PartFViT, DINOHead, CosFace, ArcFace
    from lafs_fast.compat import ViT_face_landmark_patch8, extract_patches_pytorch_gridsample
"""

import os as _os

# Run from a source checkout without installing (e.g. PYTHONPATH=. on an offline GPU machine):
# make the top-level kernels/ folder importable as lafs_fast.kernels, as pyproject maps it.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_root, "pyproject.toml")) and _os.path.isfile(_os.path.join(_root, "kernels", "patch_sampling.py")):
    __path__.append(_root)  # noqa: F821 - the package's own search path

from lafs_fast._torchvision_fix import ensure_torchvision as _ensure_torchvision  # noqa: E402

_ensure_torchvision()  # before anything imports timm (no-op where torchvision works)

__version__ = "0.1.0"

from lafs_fast.sampling import sample_patches  # noqa: E402

_LAZY = {
    "FViT": "lafs_fast.models",
    "LandmarkCNN": "lafs_fast.models",
    "PartFViT": "lafs_fast.models",
    "DINOHead": "lafs_fast.models",
    "CosFace": "lafs_fast.models",
    "ArcFace": "lafs_fast.models",
    "Config": "lafs_fast.config",
    "load_config": "lafs_fast.config",
}


def __getattr__(name: str):
    """Models and configs load on first use, so `import lafs_fast` stays light."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lafs_fast' has no attribute {name!r}")


__all__ = ["sample_patches", "__version__", *_LAZY]
