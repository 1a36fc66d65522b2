"""The landmark CNN of Part fViT: a MobileNetV3-Large trunk that regresses 196 (x, y) points.

The trunk reproduces the reference's own MobileNetV3 variant layer for layer (docs/method.md
section 8; NOT timm's or torchvision's layout) so reference weights load unchanged:
``features.0`` = conv 3->16 s2 + BN + hard-swish; ``features.1..15`` = bottlenecks whose ``conv`` is
[1x1 expand, BN, act, kxk depthwise, BN, SE-or-identity, act, 1x1 project, BN]. 2,809,816 params.
Head: mean over H, W -> Dropout(0.5) -> Linear(160, 392) -> per-sample min-max over all 392
numbers to [0, image_size - 1] -> (B, 196, 2). No sigmoid, no clamp (the reference's choice).
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["MobileNetV3Trunk", "LandmarkCNN", "minmax_coords", "fold_batchnorm", "MOBILENETV3_LARGE"]

# (kernel, expansion, out, squeeze-excite, nonlinearity, stride): the reference's table.
MOBILENETV3_LARGE: tuple[tuple[int, int, int, bool, str, int], ...] = (
    (3, 16, 16, False, "RE", 1),
    (3, 64, 24, False, "RE", 2),
    (3, 72, 24, False, "RE", 1),
    (5, 72, 40, True, "RE", 2),
    (5, 120, 40, True, "RE", 1),
    (5, 120, 40, True, "RE", 1),
    (3, 240, 80, False, "HS", 2),
    (3, 200, 80, False, "HS", 1),
    (3, 184, 80, False, "HS", 1),
    (3, 184, 80, False, "HS", 1),
    (3, 480, 112, True, "HS", 1),
    (3, 672, 112, True, "HS", 1),
    (5, 672, 160, True, "HS", 2),
    (5, 960, 160, True, "HS", 1),
    (5, 960, 160, True, "HS", 1),
)


class HardSigmoid(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu6(x + 3.0) / 6.0


class HardSwish(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * F.relu6(x + 3.0) / 6.0


class SqueezeExcite(nn.Module):
    """Global average -> Linear(c, c/4) -> ReLU -> Linear(c/4, c) -> hard-sigmoid -> scale."""

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        self.fc = nn.Sequential(
            nn.Linear(channels, channels // reduction, bias=False),
            nn.ReLU(),
            nn.Linear(channels // reduction, channels, bias=False),
            HardSigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.fc(x.mean(dim=(2, 3)))[:, :, None, None]


class Bottleneck(nn.Module):
    def __init__(self, inp: int, out: int, kernel: int, stride: int, exp: int, se: bool, nl: str) -> None:
        super().__init__()
        act = nn.ReLU if nl == "RE" else HardSwish
        self.use_res_connect = stride == 1 and inp == out
        self.conv = nn.Sequential(
            nn.Conv2d(inp, exp, 1, 1, 0, bias=False),
            nn.BatchNorm2d(exp),
            act(),
            nn.Conv2d(exp, exp, kernel, stride, (kernel - 1) // 2, groups=exp, bias=False),
            nn.BatchNorm2d(exp),
            SqueezeExcite(exp) if se else nn.Identity(),
            act(),
            nn.Conv2d(exp, out, 1, 1, 0, bias=False),
            nn.BatchNorm2d(out),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV3Trunk(nn.Module):
    """images (B, 3, 112, 112) in [-1, 1] -> features (B, 160, 4, 4)."""

    out_channels = 160

    def __init__(self, reference_init: bool = False) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), HardSwish())
        ]
        c = 16
        for k, exp, out, se, nl, s in MOBILENETV3_LARGE:
            layers.append(Bottleneck(c, out, k, s, exp, se, nl))
            c = out
        self.features = nn.Sequential(*layers)
        if reference_init:
            self.reference_init()

    @torch.no_grad()
    def reference_init(self) -> None:
        """Re-draw the weights as the reference's trunk does after building it (module order:
        convolutions kaiming-normal fan-out, BatchNorm 1 / 0, linear layers N(0, 0.01)): with the same
        seed before construction, the same initial weights as the reference's (lafs_fast.compat)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


class _TimmTrunk(nn.Module):
    """A timm backbone as the trunk (new training only; not reference-compatible)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        import timm

        try:
            self.net = timm.create_model(name, pretrained=False, num_classes=0, global_pool="")
        except RuntimeError as exc:
            raise ValueError(f"unknown timm model {name!r} for the landmark CNN: {exc}") from None
        self.out_channels = self.net.num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def minmax_coords(raw: torch.Tensor, extent: float) -> torch.Tensor:
    """raw: (B, 2K) regression output -> (B, K, 2) px: per-sample min-max over all 2K numbers.

    ``t = (t - t.min()) / (t.max() - t.min()) * extent``, exactly the reference's scaling.
    """
    t_min = raw.min(dim=1, keepdim=True).values
    t_max = raw.max(dim=1, keepdim=True).values
    return ((raw - t_min) / (t_max - t_min) * extent).view(raw.shape[0], -1, 2)


class LandmarkCNN(nn.Module):
    """images (B, 3, S, S) in [-1, 1] -> coords (B, num_points, 2) px in [0, S - 1].

    State dict: ``stn.features.*`` (trunk) and ``output_layer.1.*`` (Linear(160, 2 * num_points)),
    the reference's names. ``reference_init``: the trunk's weights drawn as the reference draws them
    (:meth:`MobileNetV3Trunk.reference_init`).
    """

    def __init__(
        self,
        num_points: int = 196,
        image_size: int = 112,
        backbone: str = "mobilenetv3",
        dropout: float = 0.5,
        reference_init: bool = False,
    ) -> None:
        super().__init__()
        if backbone == "mobilenetv3":
            self.stn: nn.Module = MobileNetV3Trunk(reference_init)
        elif backbone.startswith("timm:"):
            self.stn = _TimmTrunk(backbone[5:])
        else:
            raise ValueError(f"unknown landmark CNN {backbone!r}: use 'mobilenetv3' or 'timm:<model name>'")
        self.num_points, self.extent = num_points, float(image_size - 1)
        self.output_layer = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.stn.out_channels, 2 * num_points))
        self.memory_format = torch.contiguous_format

    def to_channels_last(self) -> LandmarkCNN:
        """Weights and inputs in NHWC (``torch.channels_last``), the layout cuDNN's depthwise and 1x1
        convolutions run fastest in on a GPU; the same function (tests/test_models.py). Returns self."""
        self.memory_format = torch.channels_last
        return self.to(memory_format=torch.channels_last)

    def compile_blocks(self, **kwargs) -> None:
        """``train.compile``: the trunk compiled as one graph (convolutions, folded activations,
        squeeze-excite and residuals fused between the convolutions); the head stays eager."""
        self.stn.compile(**kwargs)

    @torch.no_grad()
    def start_at(self, points: torch.Tensor) -> None:
        """Make the output ``points`` (num_points, 2) px for every image, up to the min-max scaling
        (which stretches them to span [0, S - 1]): regression weights 0, bias = the points. Training
        moves the weights from there (their gradient does not vanish: the features are not 0)."""
        if points.shape != (self.num_points, 2):
            raise ValueError(f"start points must be ({self.num_points}, 2), got {tuple(points.shape)}")
        linear = self.output_layer[-1]
        linear.weight.zero_()
        linear.bias.copy_(points.reshape(-1).to(linear.bias))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"landmark CNN takes images (B, 3, H, W) in [-1, 1], got {tuple(images.shape)}")
        feats = self.stn(images.contiguous(memory_format=self.memory_format)).mean(dim=(-2, -1))
        return minmax_coords(self.output_layer(feats), self.extent)


@torch.no_grad()
def fold_batchnorm(cnn: nn.Module) -> nn.Module:
    """A frozen inference copy of ``cnn`` with every BatchNorm that follows a convolution folded
    into it (weights scaled by gamma / sqrt(var + eps), the shift as the convolution's bias) and
    replaced by an identity: one kernel and one pass over the activations less per pair. Valid for
    eval mode only (running statistics); ``cnn`` is left untouched. The landmark regulariser's
    frozen reference CNN (stage 2) runs this copy: the same coordinates up to float rounding
    (tests/test_models.py)."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    out = copy.deepcopy(cnn).eval().requires_grad_(False)
    for seq in [m for m in out.modules() if isinstance(m, nn.Sequential)]:
        for i in range(len(seq) - 1):
            if isinstance(seq[i], nn.Conv2d) and isinstance(seq[i + 1], nn.BatchNorm2d):
                seq[i] = fuse_conv_bn_eval(seq[i], seq[i + 1])
                seq[i + 1] = nn.Identity()
    return out.requires_grad_(False)
