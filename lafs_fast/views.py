"""LAFS landmark multi-crop views (docs/method.md section 3), and the DINO-face image-grid baseline.

Per source face, ``n_global`` dense + ``n_local`` sparse views, all made on the batch's device:

1. ``lafs_fast.augment.augment_views`` renders each view twice with one geometry
   (RandomResizedCrop + flip): a CLEAN copy and an AUGMENTED copy (jitter, grayscale, blur,
   solarize), (B, V, 3, S, S) in [-1, 1];
2. landmarks per view (:class:`Landmarks`): the frozen landmark CNN (eval mode) on the clean copy,
   the regular 14 x 14 grid of patch centres (``grid``, no network), or (``detector``) each source
   image's detected landmarks densified to 196 (``lafs_fast.dense_landmarks``) and mapped into the
   view through its crop / flip affine;
3. ``lafs_fast.sampling.sample_patches`` cuts 8 x 8 patches from the augmented copy with the
   perturbation N(0, sigma^2) px on every coordinate of every view; dense views take all 196
   landmarks in their canonical order, sparse views ``local_tokens`` indices drawn uniformly WITH
   replacement (the shuffle: token j carries landmark idx_j and position embedding j + 1), drawn
   after the perturbation as in the reference (a landmark drawn twice gives two identical tokens).

Tokens come out view-major: ``global_tokens`` (G * B, 196, 192) holds view 0 of every image, then
view 1; ``local_tokens`` (L * B, 36, 192) likewise, so ``chunk(G)`` / ``chunk(L)`` splits the views.

``mode="dino"``: no landmarks; global crops at 112 px and local crops at ``local_size`` px become
regular grids of 8 x 8 patches (``lafs_fast.models.image_grid_tokens``): 196 and 36 tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from lafs_fast.augment import augment_views
from lafs_fast.config import ModelConfig, ViewsConfig
from lafs_fast.dense_landmarks import DetectorLandmarks, views_from_source
from lafs_fast.kernels.augment import ViewSpec, lafs_view_specs
from lafs_fast.kernels.patch_sampling import normalise_images
from lafs_fast.models import LandmarkCNN, image_grid_tokens
from lafs_fast.sampling import grid_landmarks, sample_patches

__all__ = ["ViewBatch", "Landmarks", "LafsViews", "view_specs", "load_landmark_cnn"]


def load_landmark_cnn(path: str) -> LandmarkCNN:
    """The landmark CNN of a stage-0 / reference Part fViT checkpoint (or a lafs-fast model file),
    frozen, in eval mode."""
    from lafs_fast.models.checkpoints import load_model

    model = load_model(path)
    cnn = getattr(model, "landmark_cnn", None)
    if cnn is None:
        raise ValueError(
            f"{path} holds no landmark CNN (a bare backbone); pass a stage-0 / Part fViT checkpoint or --landmarks grid"
        )
    cnn.eval()
    for p in cnn.parameters():
        p.requires_grad_(False)
    return cnn


class Landmarks(nn.Module):
    """Where the tokens of a view come from: ``grid``, a frozen landmark CNN, or ``detector``.

    forward(clean (B, V, 3, S, S) in [-1, 1]) -> coords (V * B, K, 2) fp32 px, view-major, for ``grid``
    and the CNN (only the CNN reads the pixels: the grid needs no view-major copy of them).
    ``detector`` landmarks belong to the source images, not the views: ``detector`` (a
    :class:`DetectorLandmarks` table) maps record positions to them, ``LafsViews`` moves them into
    the views; ``forward`` gives the grid (the mean face's landmarks) for images with no position.
    """

    def __init__(self, source: str, model: ModelConfig, detector: DetectorLandmarks | None = None) -> None:
        super().__init__()
        self.source = source
        self.image_size, self.patch_size = model.image_size, model.patch_size
        self.cnn: LandmarkCNN | None = None
        self.detector: DetectorLandmarks | None = None
        if source in ("grid", "detector"):
            g = model.image_size // model.patch_size
            if g * g != model.num_patches:
                raise ValueError(
                    f"--landmarks {source} gives {g * g} tokens but model.num_patches is {model.num_patches}"
                )
            if source == "detector":
                if detector is None:
                    raise ValueError(
                        "--landmarks detector needs the landmark table of the training data "
                        "(DetectorLandmarks.for_source)"
                    )
                self.detector = detector
        else:
            self.cnn = load_landmark_cnn(source)
            if self.cnn.num_points != model.num_patches:
                raise ValueError(
                    f"{source} predicts {self.cnn.num_points} landmarks but model.num_patches is {model.num_patches}"
                )
        self.register_buffer("grid", grid_landmarks(model.image_size, model.patch_size), persistent=False)

    def train(self, mode: bool = True) -> Landmarks:
        super().train(mode)
        if self.cnn is not None:
            self.cnn.eval()  # frozen in eval mode whatever the caller does (spec: stage 1)
        return self

    @torch.no_grad()
    def forward(self, clean: torch.Tensor) -> torch.Tensor:
        b, v = clean.shape[:2]
        if self.cnn is None:
            return self.grid.unsqueeze(0).expand(v * b, -1, -1)
        # fp32 under the run's autocast: in bf16 the CNN's min-max coordinates move in 0.5 px steps
        with torch.autocast(clean.device.type, enabled=False):
            return self.cnn(clean.transpose(0, 1).reshape(v * b, *clean.shape[2:]).float()).float()


@dataclass
class ViewBatch:
    """One batch of views, view-major.

    global_tokens: (G * B, Ng, 3*P*P); local_tokens: (L * B, Nl, 3*P*P) or None when L = 0.
    global_coords / local_coords: the landmark coordinates sampled (after perturbation and the
    index draw), (G*B, Ng, 2) / (L*B, Nl, 2) px, or None in dino mode.
    """

    global_tokens: torch.Tensor
    local_tokens: torch.Tensor | None
    n_global: int
    n_local: int
    batch: int
    global_coords: torch.Tensor | None = None
    local_coords: torch.Tensor | None = None
    local_indices: torch.Tensor | None = None

    def crops(self) -> list[torch.Tensor]:
        """The student's input: one tensor per token length (globals first)."""
        return [self.global_tokens] + ([self.local_tokens] if self.local_tokens is not None else [])


def view_specs(v: ViewsConfig) -> tuple[list[ViewSpec], list[ViewSpec]]:
    """The global and local ViewSpecs of a ViewsConfig (``kernels.augment.lafs_view_specs``, split)."""
    specs = lafs_view_specs(views=v)
    return specs[: v.n_global], specs[v.n_global :]


def _seed(seed: int, k: int) -> int:
    return (int(seed) * 1_000_003 + 7919 * k) % (2**62)


class LafsViews(nn.Module):
    """uint8 faces (B, H, W, 3) -> :class:`ViewBatch` (module so the landmark CNN moves with ``.to``).

    Args:
        views: ViewsConfig (mode, landmarks, counts, token counts, augmentation).
        model: ModelConfig (image size, patch size, num_patches).
        out_dtype: token dtype (bf16 on CUDA for the fast path, fp32 on the CPU).
        sampler_backend / view_backend: "auto" | "torch" | "triton".
        detector: the per-record landmark table, for ``views.landmarks == "detector"``.
    """

    def __init__(
        self,
        views: ViewsConfig,
        model: ModelConfig,
        out_dtype: torch.dtype = torch.float32,
        sampler_backend: str = "auto",
        view_backend: str = "auto",
        detector: DetectorLandmarks | None = None,
    ) -> None:
        super().__init__()
        self.cfg, self.mcfg = views, model
        self.out_dtype = out_dtype
        self.sampler_backend, self.view_backend = sampler_backend, view_backend
        self.global_specs, self.local_specs = view_specs(views)
        self.landmarks = Landmarks(views.landmarks, model, detector) if views.mode == "lafs" else None
        if views.mode == "lafs" and views.global_tokens != model.num_patches:
            raise ValueError(
                f"views.global_tokens={views.global_tokens}: dense views take all {model.num_patches} landmarks in "
                "order"
            )
        if views.mode == "dino":
            if model.image_size % model.patch_size or views.local_size % model.patch_size:
                raise ValueError(
                    f"--views dino needs crop sizes ({model.image_size}, {views.local_size}) that are multiples of the "
                    f"patch size {model.patch_size}"
                )
            if (views.local_size // model.patch_size) ** 2 > model.num_patches:
                raise ValueError(f"views.local_size {views.local_size} gives more tokens than model.num_patches")

    @torch.no_grad()
    def forward(self, images: torch.Tensor, seed: int, positions: torch.Tensor | None = None) -> ViewBatch:
        """images: (B, H, W, 3) uint8; positions: (B,) int64 record positions (``--landmarks detector``)."""
        if self.cfg.mode == "dino":
            return self._dino(images, seed)
        v = self.cfg
        b, s = images.shape[0], self.mcfg.image_size
        specs = self.global_specs + self.local_specs
        av = augment_views(
            images,
            specs,
            seed=_seed(seed, 0),
            out_size=s,
            interpolation=v.interpolation,
            out_dtype=torch.float32,
            backend=self.view_backend,
        )
        # view-major: (V, B, 3, S, S) -> (V*B, 3, S, S); chunk(V) then splits views
        aug = av.augmented.transpose(0, 1).reshape(-1, 3, s, s)
        det = self.landmarks.detector
        if det is not None:
            if positions is None:
                raise ValueError(
                    "--landmarks detector needs each image's record position (make_loader(..., with_positions=True))"
                )
            with torch.autocast(images.device.type, enabled=False):  # the densification matmul in fp32
                coords = views_from_source(det(positions, images.device), av.affine)  # (V*B, K, 2)
        else:
            coords = self.landmarks(av.clean)
        g = v.n_global * b
        p = self.mcfg.patch_size
        # every view: the run's token dtype and sampler, the perturbation, the draws returned
        kw = {"out_dtype": self.out_dtype, "backend": self.sampler_backend, "sigma": v.perturb_sigma}
        kw.update(return_draws=True, check_finite=False)
        gt, _, g_noise = sample_patches(aug[:g], coords[:g], p, seed=_seed(seed, 1), **kw)
        g_coords = coords[:g] + (g_noise if g_noise is not None else 0)
        lt = l_coords = l_idx = None
        if v.n_local > 0:
            # The reference perturbs all K landmarks of a view, THEN draws the token indices: a landmark
            # drawn twice is one perturbed point, two identical tokens (noise drawn per token would give
            # two different patches). So the noise is added here and the sampler only draws the indices.
            loc = coords[g:]
            if v.perturb_sigma > 0:
                gen = torch.Generator(device=loc.device).manual_seed(_seed(seed, 4))
                loc = loc + torch.randn(loc.shape, generator=gen, device=loc.device, dtype=loc.dtype) * v.perturb_sigma
            lt, l_idx, _ = sample_patches(
                aug[g:], loc, p, num_tokens=v.local_tokens, seed=_seed(seed, 2), **{**kw, "sigma": 0.0}
            )
            l_coords = torch.gather(loc, 1, l_idx[..., None].expand(-1, -1, 2))
        return ViewBatch(gt, lt, v.n_global, v.n_local, b, g_coords, l_coords, l_idx)

    def _dino(self, images: torch.Tensor, seed: int) -> ViewBatch:
        v = self.cfg
        gt = self._grid_view_tokens(images, self.global_specs, _seed(seed, 0), self.mcfg.image_size)
        lt = self._grid_view_tokens(images, self.local_specs, _seed(seed, 3), v.local_size) if v.n_local > 0 else None
        return ViewBatch(gt, lt, v.n_global, v.n_local, images.shape[0])

    def _grid_view_tokens(self, images: torch.Tensor, specs: list[ViewSpec], seed: int, size: int) -> torch.Tensor:
        """The DINO baseline's views of ``specs`` at ``size`` px cut into a regular grid of patches:
        (V * B, (size / P)^2, 3*P*P), view-major."""
        views = augment_views(
            images, specs, seed=seed, out_size=size, interpolation=self.cfg.interpolation, backend=self.view_backend
        ).augmented
        return image_grid_tokens(views.transpose(0, 1).reshape(-1, 3, size, size), self.mcfg.patch_size).to(
            self.out_dtype
        )

    @torch.no_grad()
    def eval_tokens(
        self, images: torch.Tensor, positions: torch.Tensor | None = None, flip: bool = False
    ) -> torch.Tensor:
        """Tokens of whole, un-augmented faces (B, H, W, 3) uint8 for embedding at test time:
        all landmarks in order, no perturbation (lafs), or the regular grid (dino). ``detector``:
        the images' own landmarks when their record ``positions`` (B,) are given, else the mean
        face's. ``flip``: of the mirrored faces (detector landmarks mirrored with them, each token
        on the same point of the face, as in the training views)."""
        x = normalise_images(images)
        if flip:
            x = x.flip(3)
        if self.cfg.mode == "dino":
            return image_grid_tokens(x, self.mcfg.patch_size).to(self.out_dtype)
        det = self.landmarks.detector
        if det is not None and positions is not None:
            with torch.autocast(x.device.type, enabled=False):
                coords = det(positions, x.device)
            if flip:  # continuous x -> W - x; the sampler's coordinate is continuous + 0.5
                coords = torch.stack((x.shape[3] + 1.0 - coords[..., 0], coords[..., 1]), dim=-1)
        else:
            coords = self.landmarks(x[:, None])  # one view per face
        return sample_patches(
            x, coords, self.mcfg.patch_size, out_dtype=self.out_dtype, backend=self.sampler_backend, check_finite=False
        )
