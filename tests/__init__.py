"""lafs-fast's tests. ``SHARED``: the ../shared folder beside the repository (real faces, BlazeFace
weights) where it exists; a user's clone has none and the tests that need it skip."""

from pathlib import Path

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
BLAZEFACE_DIR = SHARED / "data" / "blazeface"
