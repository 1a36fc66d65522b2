"""lafs-fast's tests. ``SHARED``: the ../shared folder beside the repository (real faces, BlazeFace
weights) where it exists; a user's clone has none and the tests that need it skip."""

from pathlib import Path

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
BLAZEFACE_DIR = SHARED / "data" / "blazeface"

# the tiniest fViT and DINO head the tests train (key=value overrides on the small preset)
TINY_MODEL = ["model.dim=32", "model.depth=1", "model.heads=2", "model.head_dim=16", "model.mlp_dim=64"]
TINY_DINO = ["dino.out_dim=64", "dino.hidden_dim=64", "dino.bottleneck_dim=16"]
CPU = ["train.device=cpu"]  # CPU semantics (fp32, bitwise) even where a GPU runs the suite
