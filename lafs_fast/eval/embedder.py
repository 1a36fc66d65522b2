"""Batch face embedding for evaluation: any lafs-fast or reference model, CPU or GPU, flip-sum.

Inputs are aligned faces as uint8 RGB (B, S, S, 3). They are normalised with the TRAINING
normalisation ``x / 255 * 2 - 1`` (the reference's evaluation scripts use ``x / 255 - 0.5``, a
mismatch with its own training; ``input_norm="reference"`` reproduces it on request).

- Part fViT (a model file with a landmark CNN): landmarks from the CNN in fp32 (the per-sample
  min-max of 392 numbers loses pixels in bf16), patches through ``sample_patches`` (the Triton kernel
  on CUDA, straight to the compute dtype), the backbone under autocast.
- a bare fViT (e.g. a pre-training teacher without landmarks): a regular 14x14 grid of 8x8 patches.

With ``flip=True`` the embedding of an image is ``f(x) + f(flip(x))``, unnormalised (the InsightFace
protocol normalises the sum afterwards).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from lafs_fast.models.fvit import FViT
from lafs_fast.models.part_fvit import PartFViT
from lafs_fast.sampling import resolve_backend, sample_patches

__all__ = ["Embedder", "INPUT_NORMS", "decode_face", "iter_batches"]

INPUT_NORMS = {
    "train": "x/255*2-1 (the training normalisation)",
    "reference": "x/255-0.5 (the reference's evaluation scripts)",
}


def decode_face(data: bytes | str | Path, size: int = 112) -> np.ndarray:
    """Decode image bytes or a path to uint8 RGB (size, size, 3), resized (bilinear) when needed."""
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data) as im:
        im = im.convert("RGB")
        if im.size != (size, size):
            im = im.resize((size, size), Image.BILINEAR)
        return np.array(im, dtype=np.uint8)  # a writable copy


def iter_batches(
    items: Sequence, load: Callable[[object], np.ndarray], batch_size: int, workers: int = 4
) -> Iterator[np.ndarray]:
    """Yield ``load(item)`` stacked in batches (B, ...) in order; the next batch decodes in threads
    (PIL releases the GIL) while the caller embeds the current one."""
    starts = range(0, len(items), batch_size)
    with ThreadPoolExecutor(max(1, workers)) as pool:

        def submit(s: int):
            return [pool.submit(load, it) for it in items[s : s + batch_size]]

        pending = submit(0) if len(items) else None
        for s in starts:
            current = pending
            nxt = s + batch_size
            pending = submit(nxt) if nxt < len(items) else None
            yield np.stack([f.result() for f in current])


def _name(item: object) -> str:
    """A short name of one item of :meth:`Embedder.embed_items` for a message (a path, or its index)."""
    if isinstance(item, tuple) and item:  # (index, bytes) of a .bin, (name, landmarks) of IJB
        item = item[0]
    if isinstance(item, (int, np.integer)):
        return f"face {int(item)}"
    return str(item) if isinstance(item, (str, Path)) else type(item).__name__


class Embedder:
    """Embeds uint8 faces with a model from ``lafs_fast.eval.loading.load_eval_model`` (or ``load_model``).

    Args:
        model: PartFViT (landmarks) or FViT (regular grid), eval mode.
        device: "cpu", "cuda", "cuda:1"...
        dtype: "auto" (bf16 on CUDA, fp32 on the CPU), "bf16", "fp16" or "fp32": the backbone's
            compute dtype (landmarks always fp32).
        batch_size: faces per forward pass (a flip doubles it internally).
        flip: flip-sum test-time augmentation.
        input_norm: "train" (default) or "reference" (see the module doc).
        sampler_backend: "auto" | "torch" | "triton".
    """

    def __init__(
        self,
        model: PartFViT | FViT,
        device: str | torch.device = "cpu",
        dtype: str = "auto",
        batch_size: int = 128,
        flip: bool = True,
        input_norm: str = "train",
        sampler_backend: str = "auto",
    ) -> None:
        if not isinstance(model, (PartFViT, FViT)):
            raise ValueError(
                f"cannot embed with a {type(model).__name__}: load a model with lafs_fast.eval.loading.load_eval_model"
            )
        if input_norm not in INPUT_NORMS:
            raise ValueError(f"unknown input normalisation {input_norm!r}; choose one of {', '.join(INPUT_NORMS)}")
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device} requested but CUDA is not available here; use --device cpu")
        dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
        if dtype == "auto":
            dtype = "bf16" if self.device.type == "cuda" else "fp32"
        if dtype not in dtypes:
            raise ValueError(f"unknown dtype {dtype!r}; choose auto, bf16, fp16 or fp32")
        self.dtype_name, self.dtype = dtype, dtypes[dtype]
        self.model = model.to(self.device).eval()
        self.batch_size, self.flip, self.input_norm = int(batch_size), bool(flip), input_norm
        self.sampler_backend = sampler_backend
        self.checkpoint_kind = "in-memory model"  # set by the commands to the loaded file's kind
        self.is_part = isinstance(model, PartFViT)
        self.backbone: FViT = model.backbone if self.is_part else model
        # Part fViT: the landmark CNN's extent is image_size - 1; a bare fViT: its grid covers the face.
        self.image_size = (
            int(round(model.landmark_cnn.extent)) + 1
            if self.is_part
            else int(self.backbone.patch_size * round(self.backbone.num_patches**0.5))
        )

    @property
    def dim(self) -> int:
        return int(self.backbone.dim)

    def describe(self) -> str:
        """One line: model kind, sampler, dtype, normalisation, flip (printed by every command)."""
        if self.is_part:
            sampler = resolve_backend(self.sampler_backend, self.device)[0]
            kind = f"Part fViT (landmarks from its CNN, {sampler} sampler)"
        else:
            g = self.image_size // self.backbone.patch_size
            p = self.backbone.patch_size
            kind = f"fViT without landmark CNN: regular {g}x{g} grid of {p}x{p} patches"
        return (
            f"{kind}, dim {self.dim}, {self.device.type} {self.dtype_name}, inputs {INPUT_NORMS[self.input_norm]}"
            f"{', flip-sum' if self.flip else ''}"
        )

    def _to_input(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 (B, S, S, 3) -> float32 (B, 3, S, S) on the device, normalised."""
        if isinstance(images, np.ndarray) and not images.flags.writeable:
            images = images.copy()  # torch refuses to wrap read-only memory (e.g. np.asarray of a PIL image)
        x = torch.as_tensor(images)
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[-1] != 3:
            raise ValueError(f"faces must be uint8 (B, H, W, 3) RGB, got {tuple(x.shape)} {x.dtype}")
        if x.shape[1] != self.image_size or x.shape[2] != self.image_size:
            raise ValueError(
                f"faces must be {self.image_size}x{self.image_size} (aligned), got {x.shape[1]}x{x.shape[2]}"
            )
        x = x.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float() / 255.0
        return x * 2 - 1 if self.input_norm == "train" else x - 0.5

    def _autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    @torch.inference_mode()
    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (B, 3, S, S) float32 -> (embedding (B, dim) float32, coords (B, L, 2) or None)."""
        if not self.is_part:
            with self._autocast():
                return self.backbone(x).float(), None
        coords = self.model.landmark_cnn(x)  # fp32 on purpose (module doc)
        out_dtype = None if self.dtype == torch.float32 else self.dtype
        tokens = sample_patches(x, coords, self.backbone.patch_size, backend=self.sampler_backend, out_dtype=out_dtype)
        with self._autocast():
            return self.backbone(tokens).float(), coords

    def embed_batch(self, images: np.ndarray | torch.Tensor, return_landmarks: bool = False):
        """uint8 (B, S, S, 3) RGB -> (B, dim) float32, unnormalised (flip-summed when ``flip``);
        with ``return_landmarks`` also the (B, L, 2) float32 px landmarks of the unflipped faces."""
        if return_landmarks and not self.is_part:
            raise ValueError(
                "this model has no landmark CNN (a bare fViT): it uses a regular grid, there are no landmarks to store"
            )
        x = self._to_input(images)
        b = x.shape[0]
        if self.flip:
            emb, coords = self._forward(torch.cat([x, x.flip(-1)]))
            emb = emb[:b] + emb[b:]
        else:
            emb, coords = self._forward(x)
        if return_landmarks:
            return emb.cpu().numpy(), coords[:b].float().cpu().numpy()
        return emb.cpu().numpy()

    def landmarks(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        """uint8 (B, S, S, 3) -> (B, L, 2) float32 px (x, y) from the landmark CNN (Part fViT only)."""
        if not self.is_part:
            raise ValueError(
                "this model has no landmark CNN (a bare fViT): it uses a regular grid, there are no landmarks to show"
            )
        with torch.inference_mode():
            return self.model.landmark_cnn(self._to_input(images)).float().cpu().numpy()

    def embed_items(
        self,
        items: Sequence,
        load: Callable[[object], np.ndarray],
        progress: str | None = None,
        workers: int = 4,
        return_landmarks: bool = False,
    ):
        """Embed ``items`` (bytes, paths...) decoded by ``load`` -> (N, dim) float32, unnormalised;
        with ``return_landmarks`` also (N, L, 2) float32 px (Part fViT only), from the same pass."""
        from tqdm import tqdm

        out = np.zeros((len(items), self.dim), dtype=np.float32)
        pts: list[np.ndarray] = []
        bar = tqdm(total=len(items), desc=progress, unit="img", disable=progress is None, leave=False)
        i = 0
        for batch in iter_batches(items, load, self.batch_size, workers):
            if return_landmarks:
                emb, coords = self.embed_batch(batch, return_landmarks=True)
                pts.append(coords)
            else:
                emb = self.embed_batch(batch)
            bad = np.flatnonzero(~np.isfinite(emb).all(axis=1))
            if bad.size:  # a NaN embedding scores as a coin flip and is written without a word: stop here
                raise ValueError(
                    f"the model gives a NaN or infinite embedding for {bad.size} of {len(batch)} faces in a batch "
                    f"(the first: {_name(items[i + int(bad[0])])}); its weights or the {self.dtype_name} compute "
                    "overflow, try --dtype fp32 or an earlier checkpoint"
                )
            out[i : i + len(batch)] = emb
            i += len(batch)
            bar.update(len(batch))
        bar.close()
        return (out, np.concatenate(pts)) if return_landmarks else out
