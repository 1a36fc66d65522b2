"""Built-in synthetic faces: deterministic, identity-labelled 112x112 RGB faces drawn procedurally.

An identity is a face geometry and appearance (head shape, skin, hair, eye spacing and size, iris
colour, brows, nose, mouth); each image of it adds pose (roll, shift, scale),
expression (smile, eye opening, brow raise), lighting (direction and strength), background and sensor noise.
Faces sit near the InsightFace 5-point template (eyes at y~52, nose ~72, mouth ~92), like aligned
face crops, so the landmark CNN sees the layout it expects. Every identity's parameters come from
``seed`` and the identity index alone, and every image's from ``(seed, identity, image)``, so any
subset is reproducible on its own and the whole set needs no storage.

Rendering is vectorised in torch over a batch (signed-distance ellipses, soft edges), on any device:
:func:`render_faces` is the zero-I/O source for speed tests.
"""

from __future__ import annotations

import math

import numpy as np
import torch

# identity (geometry + appearance) parameters, each drawn uniformly in [lo, hi]
_IDENTITY = {
    "face_w": (30.0, 40.0),
    "face_h": (40.0, 50.0),
    "face_cy": (62.0, 68.0),
    "skin_r": (0.45, 0.95),
    "skin_g": (0.30, 0.75),
    "skin_b": (0.20, 0.65),
    "hair_r": (0.02, 0.65),
    "hair_g": (0.02, 0.50),
    "hair_b": (0.02, 0.40),
    "hairline": (20.0, 34.0),
    "eye_dx": (14.0, 21.0),
    "eye_y": (47.0, 55.0),
    "eye_w": (4.5, 7.5),
    "eye_h": (2.2, 3.6),
    "iris_r": (0.05, 0.55),
    "iris_g": (0.05, 0.55),
    "iris_b": (0.05, 0.65),
    "brow_dy": (6.0, 10.0),
    "brow_t": (0.8, 2.0),
    "brow_tilt": (-0.12, 0.12),
    "nose_len": (12.0, 22.0),
    "nose_w": (3.0, 7.0),
    "mouth_y": (88.0, 96.0),
    "mouth_w": (8.0, 16.0),
    "lip_r": (0.45, 0.85),
}
# per-image variation (pose, expression, lighting, noise)
_IMAGE = {
    "roll": (-0.16, 0.16),
    "tx": (-3.5, 3.5),
    "ty": (-3.5, 3.5),
    "scale": (0.92, 1.08),
    "smile": (-0.5, 1.0),
    "eye_open": (0.35, 1.1),
    "brow_raise": (-1.5, 2.5),
    "light_dir": (-math.pi, math.pi),
    "light_amp": (0.0, 0.35),
    "gain": (0.75, 1.2),
    "noise": (2.0, 9.0),
    "bg_r": (0.0, 1.0),
    "bg_g": (0.0, 1.0),
    "bg_b": (0.0, 1.0),  # background: per image, not a shortcut
}


def _draw(rng: np.random.Generator, spec: dict[str, tuple[float, float]]) -> dict[str, float]:
    return {k: float(rng.uniform(lo, hi)) for k, (lo, hi) in spec.items()}


def identity_params(seed: int, identity: int) -> dict[str, float]:
    """The geometry/appearance of one identity: a function of (seed, identity) only."""
    return _draw(np.random.default_rng([seed, identity, 0x1D]), _IDENTITY)


def image_params(seed: int, identity: int, image: int) -> dict[str, float]:
    """The pose/expression/lighting/noise of one image (plus its noise seed)."""
    rng = np.random.default_rng([seed, identity, image, 0x1A])
    p = _draw(rng, _IMAGE)
    p["noise_seed"] = float(rng.integers(0, 2**31 - 1))
    return p


def _stack(params: list[dict[str, float]], device: torch.device) -> dict[str, torch.Tensor]:
    keys = params[0].keys()
    return {k: torch.tensor([p[k] for p in params], dtype=torch.float32, device=device).view(-1, 1, 1) for k in keys}


def _soft(d: torch.Tensor) -> torch.Tensor:
    """Coverage of a signed distance field (negative inside), anti-aliased over ~1 px."""
    return torch.clamp(0.5 - d, 0.0, 1.0)


def render_faces(
    ident: dict[str, torch.Tensor], img: dict[str, torch.Tensor], size: int = 112, noise: torch.Tensor | None = None
) -> torch.Tensor:
    """Render a batch: parameter dicts of (B, 1, 1) float32 tensors -> (B, size, size, 3) uint8 RGB.

    ``noise``: (B, size, size, 3) float32 standard normal (scaled by each image's ``noise``), or None.
    """
    dev = next(iter(ident.values())).device
    s = size / 112.0
    yy, xx = torch.meshgrid(
        torch.arange(size, device=dev, dtype=torch.float32),
        torch.arange(size, device=dev, dtype=torch.float32),
        indexing="ij",
    )
    # inverse pose: image pixel -> face coordinates (roll about the face centre, shift, scale)
    cx, cy = 56.0 * s + img["tx"] * s, ident["face_cy"] * s + img["ty"] * s
    c, sn = torch.cos(img["roll"]), torch.sin(img["roll"])
    dx, dy = (xx - cx) / (img["scale"] * s), (yy - cy) / (img["scale"] * s)
    u = c * dx + sn * dy  # face frame, px at 112 scale, origin at face centre
    v = -sn * dx + c * dy
    fy = ident["face_cy"]  # template y of the face centre

    def ellipse(x0, y0, rx, ry):  # approximate signed distance (px) to an axis-aligned ellipse
        r = torch.sqrt(((u - x0) / rx) ** 2 + ((v - y0) / ry) ** 2)
        return (r - 1.0) * torch.minimum(rx, ry) / s if not isinstance(rx, float) else (r - 1.0) * rx / s

    bg = torch.stack([img["bg_r"], img["bg_g"], img["bg_b"]], -1) * 0.6 + 0.2  # (B,1,1,3)
    out = bg.expand(-1, size, size, 3).clone()

    def paint(mask: torch.Tensor, colour: torch.Tensor) -> None:
        out.lerp_(colour, mask.unsqueeze(-1))  # one fused pass: out + m * (colour - out)

    skin = torch.stack([ident["skin_r"], ident["skin_g"], ident["skin_b"]], -1)
    hair = torch.stack([ident["hair_r"], ident["hair_g"], ident["hair_b"]], -1)
    zero = torch.zeros_like(ident["face_w"])
    # hair: a larger ellipse behind the head, cut below the hairline on the face
    paint(_soft(ellipse(zero, zero - 6.0, ident["face_w"] + 5.0, ident["face_h"] + 6.0)), hair)
    face = _soft(ellipse(zero, zero, ident["face_w"], ident["face_h"]))
    paint(face, skin)
    top = (fy - ident["face_h"] + ident["hairline"]) - fy  # hairline in face coords
    paint(face * _soft(v - top), hair)
    # eyes: whites, iris, lids close with eye_open
    iris = torch.stack([ident["iris_r"], ident["iris_g"], ident["iris_b"]], -1)
    white = torch.full_like(skin, 0.95)
    ey = ident["eye_y"] - fy
    eh = ident["eye_h"] * img["eye_open"]
    for side in (-1.0, 1.0):
        ex = side * ident["eye_dx"]
        paint(_soft(ellipse(ex, ey, ident["eye_w"], eh)), white)
        paint(_soft(ellipse(ex, ey, ident["eye_h"] * 0.9, torch.minimum(ident["eye_h"] * 0.9, eh))), iris)
        # brow: a thin tilted band above the eye, raised by expression
        by = ey - ident["brow_dy"] - img["brow_raise"] + side * ident["brow_tilt"] * (u - ex)
        band = _soft((v - by).abs() - ident["brow_t"]) * _soft((u - ex).abs() - ident["eye_w"] * 1.3)
        paint(band, hair * 0.8)
    # nose: a darker vertical wedge with nostrils
    ny0, ny1 = ey + 4.0, ey + 4.0 + ident["nose_len"]
    t = torch.clamp((v - ny0) / (ny1 - ny0), 0, 1)
    nose = _soft(u.abs() - ident["nose_w"] * (0.3 + 0.7 * t)) * _soft(v - ny1) * _soft(ny0 - v)
    paint(nose * 0.35, skin * 0.6)
    for side in (-1.0, 1.0):
        paint(
            _soft(ellipse(side * ident["nose_w"] * 0.7, ny1, ident["nose_w"] * 0.35, ident["nose_w"] * 0.25 + zero))
            * 0.7,
            skin * 0.35,
        )
    # mouth: a curved band; smile bends the corners up
    my = ident["mouth_y"] - fy
    xm = u / ident["mouth_w"]
    curve = my - img["smile"] * 3.0 * (xm**2 - 0.5)
    lips = _soft((v - curve).abs() - 1.6 - 0.8 * (1 - xm.abs().clamp(max=1))) * _soft(u.abs() - ident["mouth_w"])
    lip = torch.stack([ident["lip_r"], ident["lip_r"] * 0.35, ident["lip_r"] * 0.35], -1)
    paint(lips, lip)
    # lighting: a linear gradient across the face from a per-image direction, then gain
    shade = 1.0 + img["light_amp"] * (torch.cos(img["light_dir"]) * u + torch.sin(img["light_dir"]) * v) / 50.0
    out = out * (shade * img["gain"]).unsqueeze(-1)
    out = out * 255.0
    if noise is not None:
        out = out + noise * img["noise"].unsqueeze(-1)
    return out.round_().clamp_(0, 255).to(torch.uint8)


class SyntheticFaces:
    """A deterministic face dataset: ``num_identities x images_per_identity`` images, label = identity.

    ``ds[i] -> (image (image_size, image_size, 3) uint8 numpy HWC RGB, label int)`` with
    ``label = i // images_per_identity``. ``ds.batch(indices, device)`` renders many at once (torch,
    any device) and gives the same pixels as indexing one by one.
    """

    def __init__(self, num_identities: int, images_per_identity: int, seed: int = 0, image_size: int = 112) -> None:
        if num_identities < 1 or images_per_identity < 1:
            raise ValueError(
                f"synthetic faces need at least 1 identity and 1 image per identity, not {num_identities} x "
                f"{images_per_identity}"
            )
        self.num_identities = int(num_identities)
        self.images_per_identity = int(images_per_identity)
        self.seed = int(seed)
        self.image_size = int(image_size)
        self._ident_cache: dict[int, dict[str, float]] = {}

    @property
    def num_classes(self) -> int:
        return self.num_identities

    def __len__(self) -> int:
        return self.num_identities * self.images_per_identity

    def label(self, index: int) -> int:
        return int(index) // self.images_per_identity

    @property
    def labels(self) -> np.ndarray:
        """(N,) int64 label of every image."""
        return np.repeat(np.arange(self.num_identities, dtype=np.int64), self.images_per_identity)

    def _params(self, index: int) -> tuple[dict[str, float], dict[str, float]]:
        if not 0 <= index < len(self):
            raise IndexError(f"synthetic face {index} out of range [0, {len(self)})")
        ident, j = divmod(int(index), self.images_per_identity)
        if ident not in self._ident_cache:
            self._ident_cache[ident] = identity_params(self.seed, ident)
        return self._ident_cache[ident], image_params(self.seed, ident, j)

    def batch(self, indices, device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Render ``indices`` (length B) -> ``(images (B, S, S, 3) uint8, labels (B,) int64)`` on ``device``."""
        indices = [int(i) for i in indices]
        pairs = [self._params(i) for i in indices]
        dev = torch.device(device)
        ident = _stack([p[0] for p in pairs], dev)
        img = _stack([p[1] for p in pairs], dev)
        # per-image noise from its own seed, so a batch equals its images rendered one by one
        noise = torch.stack(
            [
                torch.randn(
                    self.image_size,
                    self.image_size,
                    3,
                    generator=torch.Generator().manual_seed(int(p[1]["noise_seed"])),
                )
                for p in pairs
            ]
        ).to(dev)
        images = render_faces(ident, img, self.image_size, noise)
        labels = torch.tensor([self.label(i) for i in indices], dtype=torch.int64, device=dev)
        return images, labels

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        images, labels = self.batch([index])
        return images[0].numpy(), int(labels[0])


def parse_spec(spec: str) -> SyntheticFaces:
    """``synthetic`` or ``synthetic:IDS[xIMGS][:seed=S]`` (e.g. ``synthetic:1000x20:seed=3``) -> dataset.

    The bare ``synthetic`` is 1000 identities x 20 images, seed 0.
    """
    parts = spec.split(":")
    if parts[0] != "synthetic":
        raise ValueError(f"{spec!r} is not a synthetic spec; write synthetic:IDSxIMGS[:seed=S], e.g. synthetic:1000x20")
    ids, per, seed = 1000, 20, 0
    try:
        for p in parts[1:]:
            if p.startswith("seed="):
                seed = int(p[5:])
            elif p:
                a, _, b = p.partition("x")
                ids, per = int(a), int(b or per)
    except ValueError:
        raise ValueError(
            f"{spec!r} is not a synthetic spec; write synthetic:IDSxIMGS[:seed=S], e.g. synthetic:1000x20"
        ) from None
    return SyntheticFaces(ids, per, seed)
