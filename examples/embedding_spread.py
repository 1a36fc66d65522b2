"""How far apart a Part fViT puts faces, and how many training faces it classifies (docs/finetuning.md).

    python examples/embedding_spread.py REC [--model part_fvit.pt] [KEY=VALUE ...]

REC: a labelled .rec (e.g. the training faces). Without --model, a random Part fViT of the small
preset (KEY=VALUE overrides, e.g. model.token_init_std=1) with a margin head for the rec's classes.
Prints the 1st / 50th / 99th percentile of the pairwise cosine similarities of the embeddings
(near 1: every face gets nearly the same embedding, so no class centre can win by a margin) and,
with a trained model, the plain nearest-centre accuracy over every face of the rec.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from lafs_fast.config import load_config
from lafs_fast.eval.knn import ImageInputs, knn_faces
from lafs_fast.models.checkpoints import load_model
from lafs_fast.models.part_fvit import build_part_fvit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rec")
    ap.add_argument("--model", help="a part_fvit.pt of finetune / train-landmarks (default: a random one)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("overrides", nargs="*", help="config KEY=VALUE for the random model")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    faces = knn_faces(args.rec, torch.device("cpu"), max_images=10**9)  # every face, decoded as the loaders do
    x, y = ImageInputs.eval_tokens(faces.images), faces.labels
    if args.model:
        model = load_model(args.model)
    else:
        model = build_part_fvit(load_config("small", None, args.overrides), num_classes=int(y.max()) + 1)
    model.eval()
    with torch.no_grad():
        emb = torch.cat([model(x[i : i + 64]) for i in range(0, len(y), 64)])
        e = torch.nn.functional.normalize(emb.float(), dim=-1)
        sim = (e @ e.T)[torch.triu_indices(len(y), len(y), offset=1).unbind()]
        q = np.percentile(sim.numpy(), [1, 50, 99])
        print(
            f"{len(y)} faces: pairwise cosine of the embeddings, 1st / 50th / 99th percentile: "
            f"{q[0]:.4f} / {q[1]:.4f} / {q[2]:.5f}"
        )
        if args.model and model.head is not None:
            acc = (model.head.cosine(emb).argmax(dim=1) == y).float().mean().item()
            print(
                f"plain nearest-centre accuracy: {acc:.1%} ({model.head.num_classes} classes, "
                f"chance {1 / model.head.num_classes:.1%})"
            )


if __name__ == "__main__":
    main()
