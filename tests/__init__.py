"""lafs-fast's tests. ``SHARED``: the ../shared folder beside the repository (real faces, BlazeFace
weights) where it exists; a user's clone has none and the tests that need it skip."""

from pathlib import Path

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
BLAZEFACE_DIR = SHARED / "data" / "blazeface"

# the tiniest fViT and DINO head the tests train (key=value overrides on the small preset)
TINY_MODEL = ["model.dim=32", "model.depth=1", "model.heads=2", "model.head_dim=16", "model.mlp_dim=64"]
TINY_DINO = ["dino.out_dim=64", "dino.hidden_dim=64", "dino.bottleneck_dim=16"]
CPU = ["train.device=cpu"]  # CPU semantics (fp32, bitwise) even where a GPU runs the suite
# a tiny pre-training run: 3 x 2 synthetic faces at batch 2, 2 epochs, 2 local views
TINY_PRETRAIN = [
    *TINY_MODEL,
    *TINY_DINO,
    "optim.batch_size=2",
    "optim.epochs=2",
    "optim.warmup_epochs=1",
    "dino.teacher_temp_epochs=1",
    "data.synthetic_identities=3",
    "data.synthetic_images_per_identity=2",
    "train.log_every=1",
    "views.n_local=2",
    *CPU,
]
# the supervised stages' tiniest run: 4 x 2 synthetic faces at batch 4, 2 steps an epoch, 2 epochs
TINY_SUPERVISED = [
    *TINY_MODEL,
    "optim.batch_size=4",
    "optim.epochs=2",
    "optim.warmup_epochs=0",
    "data.synthetic_identities=4",
    "data.synthetic_images_per_identity=2",
    *CPU,
]


def one_sentence(text: str) -> bool:
    """A user's error as lafs-fast says it: one line, no traceback."""
    return "\n" not in text.strip() and "Traceback" not in text
