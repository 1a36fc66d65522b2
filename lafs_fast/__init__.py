"""lafs-fast: a fast, faithful trainer for LAFS / Part fViT landmark-based face recognition.

Drop-in fast modules::

    from lafs_fast import sample_patches, FViT, LandmarkCNN, PartFViT, DINOHead, CosFace, ArcFace
    from lafs_fast.compat import ViT_face_landmark_patch8, extract_patches_pytorch_gridsample
    from lafs_fast.compat import face_landmark_4simmin_glo_loc
"""

import importlib.abc as _abc
import importlib.util as _util
import os as _os
import sys as _sys


class _KernelsFromSourceTree(_abc.MetaPathFinder):
    """``lafs_fast.kernels`` -> the top-level ``kernels/`` folder of a source checkout run without an
    install (``PYTHONPATH=.``, as on the offline GPU machine); pyproject maps it the same way for an
    install. Only that one name: no other top-level folder becomes part of the package."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def find_spec(self, name, path=None, target=None):  # noqa: D102 - importlib's protocol
        if name != "lafs_fast.kernels":
            return None
        return _util.spec_from_file_location(
            name, _os.path.join(self.folder, "__init__.py"), submodule_search_locations=[self.folder]
        )


def _map_kernels() -> None:
    root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    folder = _os.path.join(root, "kernels")
    installed = _os.path.isdir(_os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "kernels"))
    if installed or not _os.path.isfile(_os.path.join(folder, "patch_sampling.py")):
        return
    if any(isinstance(f, _KernelsFromSourceTree) for f in _sys.meta_path):
        return
    if _util.find_spec("lafs_fast.kernels") is None:  # an editable install's finder already maps it
        _sys.meta_path.append(_KernelsFromSourceTree(folder))


_map_kernels()

__version__ = "0.1.0"

from lafs_fast import logs as _logs  # noqa: E402,F401 - the package logger and its terminal handler (logs.py)
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
