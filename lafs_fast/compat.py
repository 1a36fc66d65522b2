"""Drop-in replacements for what the reference's training scripts import from ``face_pre_pro.ViT_face``.

Change the one import line of ``lafs_train.py`` (stage 1) or ``train_largescale.py`` (fine-tuning)
to ``from lafs_fast.compat import ...`` and the script runs on lafs-fast's modules with the same
per-step losses (tests/test_reference_scripts.py runs both scripts, as published and with that line
changed, and compares every step's loss within 1e-5).

- ``extract_patches_pytorch_gridsample(imgs, landmarks, patch_shape, num_landm)``: the reference's
  mosaic layout (B, C, P*row, P*row), same numbers, computed by lafs-fast's sampler (one call, or
  the Triton kernel on CUDA) instead of a loop of grid_sample calls.
- ``ViT_face_landmark_patch8``: the Part fViT / fViT (lafs-fast's :class:`FViT`, its landmark CNN
  trunk and margin heads): the reference's constructor keywords, forward signature, return values,
  state-dict keys, parameter order and same-seed initial weights.
- ``face_landmark_4simmin_glo_loc``: stage 1's frozen landmark CNN (lafs-fast's
  :class:`LandmarkCNN`) that returns ``(coords, mosaic)``, with its perturbation and sub-sampling
  keywords; the reference's unused tensors (position table, CLS, mask token, ``global_token``) are
  kept so its state dicts load strictly.

Inputs are taken as the reference's ``forward`` takes them: images already normalised by the caller
(the reference scripts do ``x/255*2-1`` or ``Normalize(0.5, 0.5)`` themselves), or tokens (B, N, 192).
``scale_input=True`` (a lafs-fast keyword) makes ``ViT_face_landmark_patch8`` take 0..255 images.

Not supported (a ValueError naming the argument): attention ``mask``, the ``opt`` argument of
AdaFace-style heads, ``loss_type`` other than CosFace / ArcFace / None. The reference's other
``ViT_face.py`` classes (its ablation variants, GNN, ``mobile_dino``) are not provided.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from lafs_fast.models.fvit import FViT, image_grid_tokens
from lafs_fast.models.heads import ArcFace, CosFace
from lafs_fast.models.landmark_cnn import LandmarkCNN, MobileNetV3Trunk, minmax_coords
from lafs_fast.sampling import sample_patches

__all__ = [
    "extract_patches_pytorch_gridsample",
    "ViT_face_landmark_patch8",
    "face_landmark_4simmin_glo_loc",
    "tokens_to_mosaic",
]

# The reference scales its min-max landmarks to 0..111 whatever its image_size argument says.
REFERENCE_EXTENT = 111.0


def tokens_to_mosaic(tokens: torch.Tensor, patch_size: int, channels: int = 3) -> torch.Tensor:
    """tokens (B, L, P*P*C) with L = row*row -> mosaic (B, C, row*P, row*P), the reference layout:
    token r1*row + r2, element (a, b, c) lands at ``[c, r1*P + a, r2*P + b]``."""
    b, n, _ = tokens.shape
    row = math.isqrt(n)
    if row * row != n:
        raise ValueError(f"the mosaic layout needs a square number of landmarks, got {n}")
    p = patch_size
    x = tokens.reshape(b, row, row, p, p, channels).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, channels, row * p, row * p)


def extract_patches_pytorch_gridsample(
    imgs: torch.Tensor, landmarks: torch.Tensor, patch_shape, num_landm: int = 49
) -> torch.Tensor:
    """The reference function's contract: imgs (B, C, H, W), landmarks (B, >= num_landm, 2) px,
    patch_shape (P, P) -> mosaic (B, C, P*row, P*row) with row = sqrt(num_landm)."""
    p = int(torch.as_tensor(patch_shape).flatten()[0])
    tokens = sample_patches(imgs, landmarks[:, :num_landm], p)
    return tokens_to_mosaic(tokens, p, imgs.shape[1])


def _reference_num_land(num_patches: int, height: int, patch_size: int) -> int:
    """How many landmarks the reference samples for inputs of ``height`` rows (its ``keep_num``,
    computed from the input whatever the caller passed): all of a 144- or 196-point model's on
    112-px images, else (height // P)**2."""
    if height == 112 and num_patches in (144, 196):
        return num_patches
    return (height // patch_size) ** 2


def _move_first(module: nn.Module, names: tuple[str, ...]) -> None:
    """Put the submodules ``names`` first in ``module``'s registration order (named_parameters,
    state_dict and optimizer groups follow it): the reference registers its landmark CNN first."""
    order = list(names) + [k for k in module._modules if k not in names]
    module._modules = {k: module._modules[k] for k in order}


class ViT_face_landmark_patch8(FViT):  # noqa: N801 - the reference's class name
    """The reference's Part fViT class, on lafs-fast's modules.

    Same constructor keywords, same ``forward(x, label=None, mask=None, visualize=False,
    save_token=False, opt=None, keep_num=None, glo_diff=False)``, same returns (embedding; with a
    label ``(logits, theta)``; ``visualize`` -> ``(emb, theta)``; ``save_token`` -> ``(emb, tokens,
    theta)``), the same state-dict keys and parameter order (landmark CNN first), and with the same
    seed the same initial weights. x: images (B, 3, S, S) as the caller normalised them, or tokens
    (B, N, 3*P*P).

    Keywords that change behaviour, as in the reference: ``with_land`` (landmark CNN + sampler),
    ``use_standcoord`` (patches at the fixed grid ``8*i + 4``, mosaic transposed), ``Random_prob``
    (with ``use_standcoord``: N(0, 3) px noise on the grid), ``shuffle`` (with ``use_standcoord``:
    landmarks drawn with replacement), ``pool``. Accepted and ignored, as the reference ignores
    them: ``keep_num`` (recomputed from the input size), ``glo_diff``, ``fp16``, ``GPU_ID`` (its
    manual model parallelism of the classifier: use DDP and lafs-fast's sharded head). lafs-fast's
    own keyword: ``scale_input`` (4-D input of 0..255 is normalised inside as ``x/255*2-1``).
    """

    def __init__(
        self,
        *,
        loss_type: str,
        GPU_ID=None,
        num_class: int,
        image_size: int,
        patch_size: int,
        dim: int,
        depth: int,
        heads: int,
        mlp_dim: int,
        pool: str = "cls",
        num_patches: int | None = None,
        channels: int = 3,
        dim_head: int = 64,
        dropout: float = 0.0,
        emb_dropout: float = 0.0,
        fp16: bool = True,
        with_land: bool = False,
        use_standcoord: bool = False,
        Random_prob: bool = False,  # noqa: N803
        shuffle: bool = False,
        scale_input: bool = False,
    ) -> None:
        if num_patches is None:
            num_patches = (image_size // patch_size) ** 2
        if channels != 3:
            raise ValueError(f"channels must be 3 (RGB faces), got {channels}")
        if pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r}")
        row = int(math.sqrt(num_patches))
        # Built before the ViT, as the reference builds them: the same random draws per seed.
        land = None
        if with_land:
            land = MobileNetV3Trunk(reference_init=True), nn.Sequential(nn.Dropout(0.5), nn.Linear(160, row * row * 2))
        # The reference hard-codes drop-path 0.1 in every block and the dim**-0.5 attention scale.
        super().__init__(
            dim, depth, heads, dim_head, mlp_dim, num_patches, patch_size, dropout, emb_dropout, 0.1, attn_scale="dim"
        )
        self.pool, self.with_land, self.fp16, self.GPU_ID = pool, with_land, fp16, GPU_ID
        self.use_standcoord, self.Random_prob, self.shuffle = use_standcoord, Random_prob, shuffle
        self.scale_input = scale_input
        self.row_num, self.image_size = row, image_size
        self.patch_shape = torch.tensor([patch_size, patch_size])
        self.theta: torch.Tensor | int = 0
        if land is not None:
            self.stn, self.output_layer = land
            _move_first(self, ("stn", "output_layer"))
        self.loss_type = loss_type
        if loss_type == "CosFace":
            self.loss = CosFace(dim, num_class, 64.0, 0.4)
        elif loss_type == "ArcFace":
            self.loss = ArcFace(dim, num_class, 64.0, 0.5)
        elif loss_type != "None":
            raise ValueError(
                f"loss_type {loss_type!r} is not supported by lafs-fast; use 'CosFace', 'ArcFace' or 'None'"
            )

    def _standard_grid(self, x: torch.Tensor, num_land: int) -> torch.Tensor:
        """``use_standcoord``: the reference's fixed grid (8*i + 4 px, x-major), with ``Random_prob``
        N(0, 3) px noise and with ``shuffle`` landmarks drawn with replacement -> coords (B, L, 2).
        The random numbers come from the default CPU generator, as the reference's do."""
        r = torch.arange(0, math.sqrt(num_land)) * 8 + 4
        grid = torch.stack(torch.meshgrid(r, r, indexing="ij"), 2).view(1, -1, 2)
        theta = grid.expand(x.shape[0], -1, -1)
        if self.Random_prob:
            theta = theta + torch.randn(theta.shape) * 3
        if self.shuffle:
            b, c, _ = theta.shape
            theta = torch.gather(theta, 1, torch.randint(0, c, (b, c, 1)).repeat(1, 1, 2))
        return theta.to(x.device)

    def forward(
        self,
        x: torch.Tensor,
        label: torch.Tensor | None = None,
        mask=None,
        visualize: bool = False,
        save_token: bool = False,
        opt=None,
        keep_num: int | None = None,
        glo_diff: bool = False,
    ):
        if mask is not None:
            raise ValueError("attention masks are not supported by lafs-fast's ViT_face_landmark_patch8")
        if opt is not None:
            raise ValueError("the 'opt' argument (AdaFace-style heads) is not supported by lafs-fast")
        if self.scale_input and x.dim() == 4:
            x = x / 255.0 * 2 - 1
        num_land = _reference_num_land(self.num_patches, x.shape[-2], self.patch_size)
        theta = self.theta
        if self.with_land:
            raw = self.output_layer(self.stn(x).mean(dim=(-2, -1)))
            theta = self.theta = minmax_coords(raw, REFERENCE_EXTENT)
            x = sample_patches(x, theta[:, :num_land], self.patch_size)
        if self.use_standcoord:
            theta = self._standard_grid(x, num_land)
            x = extract_patches_pytorch_gridsample(x, theta, self.patch_shape, num_land).transpose(2, 3)
        if x.dim() == 4:
            x = image_grid_tokens(x, self.patch_size)
        feats = self.forward_features(x)
        tokens = feats[:, 1:]
        pooled = feats.mean(dim=1) if self.pool == "mean" else feats[:, 0]
        emb = self.mlp_head(pooled)
        if save_token:
            return emb, tokens, self.theta
        if label is not None:
            if self.loss_type == "None":
                raise ValueError("this model was built with loss_type='None': it has no margin head for labels")
            return self.loss(emb, label), self.theta
        return (emb, theta) if visualize else emb


class face_landmark_4simmin_glo_loc(LandmarkCNN):  # noqa: N801 - the reference's class name
    """Stage 1's landmark CNN (``lafs_train.py`` loads it frozen): lafs-fast's :class:`LandmarkCNN`
    with the reference's constructor keywords and ``forward(x, x_Aug=None, keep_num=None,
    patch_shape=None, Random_prob=False, return_prob=False, ran_sample=False, random_coor=False,
    return_land=False) -> (theta (B, L, 2) px, mosaic (B, 3, row*P, row*P))``: the landmarks of x,
    patches cut from ``x_Aug`` when given (else from x).

    ``Random_prob``: N(0, 5) px noise on every landmark; unless ``return_prob``, then L landmarks
    drawn with replacement (36 with ``ran_sample``, else all). ``random_coor``: uniform random
    landmarks in [0, 111) instead of the CNN's (25 with ``ran_sample``). ``return_land``: returns
    ``(theta, x)`` without sampling. Random numbers come from the default CPU generator, in the
    reference's order. ``keep_num`` and ``patch_shape`` are ignored, as the reference ignores them.

    Constructor: ``image_size``, ``patch_size``, ``dim``, ``num_patches``, ``channels`` are used; the
    reference's other keywords (:attr:`IGNORED`) are accepted and ignored, as the reference ignores them.
    The reference's unused tensors (``pos_embedding``, ``patch_to_embedding``, ``cls_token``,
    ``mask_token``, ``global_token``) are kept, in its order, so its state dicts load strictly and
    the same seed draws the same weights; ``global_token`` still runs (its dropout draws).
    """

    # Keywords the reference's constructor takes and never reads (its ViT keywords, no ViT is built).
    IGNORED = frozenset(
        {
            "loss_type",
            "GPU_ID",
            "num_class",
            "depth",
            "heads",
            "mlp_dim",
            "pool",
            "dim_head",
            "dropout",
            "emb_dropout",
            "fp16",
        }
    )

    def __init__(
        self,
        *,
        image_size: int,
        patch_size: int,
        dim: int,
        num_patches: int | None = None,
        channels: int = 3,
        **ignored,
    ) -> None:
        unknown = sorted(set(ignored) - self.IGNORED)
        if unknown:
            raise TypeError(f"face_landmark_4simmin_glo_loc got unexpected keyword arguments {', '.join(unknown)}")
        if num_patches is None:
            num_patches = (image_size // patch_size) ** 2
        row = int(math.sqrt(num_patches))
        super().__init__(row * row, image_size, "mobilenetv3", 0.5, reference_init=True)
        self.extent = REFERENCE_EXTENT
        self.patch_size, self.num_patches, self.row_num, self.dim = patch_size, num_patches, row, dim
        self.global_token = nn.Sequential(nn.Dropout(0.5), nn.Linear(160, dim))
        self.pos_embedding = nn.Parameter(torch.randn(1, num_patches + 1, dim))
        self.patch_to_embedding = nn.Linear(channels * patch_size**2, dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        # timm's, as the reference's: torch's own trunc_normal_ draws differently (other random state
        # after). Imported here: timm imports torchvision, which lafs_fast.models makes importable first.
        from timm.layers import trunc_normal_

        trunc_normal_(self.mask_token, std=0.02, a=-0.02, b=0.02)
        self.patch_shape = torch.tensor([patch_size, patch_size])
        self.theta: torch.Tensor | int = 0

    def _predict(self, x: torch.Tensor, random_prob: bool, return_prob: bool, ran_sample: bool):
        """(theta (B, L, 2), L): the CNN's landmarks, perturbed / drawn as the keywords say."""
        keep = _reference_num_land(self.num_patches, x.shape[-2], self.patch_size)
        feats = self.stn(x.contiguous(memory_format=self.memory_format)).mean(dim=(-2, -1))
        theta = minmax_coords(self.output_layer(feats), self.extent)
        self.global_token(feats)  # the reference computes and drops it: same dropout draws in train mode
        if random_prob:
            theta = theta + (torch.randn(theta.shape) * 5).to(theta.device)
            if not return_prob:
                b, c, _ = theta.shape
                keep = 36 if ran_sample else c
                idx = torch.randint(0, c, (b, keep, 1)).to(theta.device)
                theta = torch.gather(theta, 1, idx.repeat(1, 1, 2))
        self.theta = theta
        return theta, keep

    def forward(
        self,
        x: torch.Tensor,
        x_Aug: torch.Tensor | None = None,  # noqa: N803
        keep_num: int | None = None,
        patch_shape=None,
        Random_prob: bool = False,  # noqa: N803
        return_prob: bool = False,
        ran_sample: bool = False,
        random_coor: bool = False,
        return_land: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not random_coor:
            theta, num_land = self._predict(x, Random_prob, return_prob, ran_sample)
        else:
            num_land = 25 if ran_sample else self.num_points
            theta = (torch.rand(x.shape[0], num_land, 2) * REFERENCE_EXTENT).to(x.device)
        if return_land:
            return theta, x
        src = x if x_Aug is None else x_Aug
        return theta, extract_patches_pytorch_gridsample(src, theta, self.patch_shape, num_land)
