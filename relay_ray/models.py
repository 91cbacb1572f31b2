"""Model zoo: small image classifiers with parameters only (pure torch; no Ray).

Decentralized workers exchange and average *parameters*; any non-parameter state (BatchNorm running
statistics) would silently diverge between workers and never be averaged.  So no model here has
buffers: ResNet-20 uses GroupNorm instead of BatchNorm, and VGG-11 has no normalisation at all,
as in the RelaySGD paper's CIFAR-10 setup (VGG-11 without BN).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from relay_ray.names import MODELS  # noqa: E402, F401  (re-exported)

MLP_HIDDEN = 128
RESNET_GROUPS = 2  # GroupNorm groups; 2 as in Hsieh et al. 2020 ("The Non-IID Data Quagmire")
VGG11_HIDDEN = 512
VGG11_CONFIG: tuple[int | str, ...] = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


def build_model(name: str, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """Build model ``name`` for ``(C, H, W)`` inputs and ``num_classes`` outputs.

    Initialisation draws from torch's global RNG, so ``torch.manual_seed(s)`` before the call gives
    the same model on every worker (the common x⁰ of DESIGN §1).
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    if len(input_shape) != 3 or min(input_shape) < 1:
        raise ValueError(f"input_shape must be (channels, height, width), got {tuple(input_shape)}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    channels, height, width = (int(d) for d in input_shape)
    if name == "logreg":
        return nn.Sequential(nn.Flatten(), nn.Linear(channels * height * width, num_classes))
    if name == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(channels * height * width, MLP_HIDDEN), nn.ReLU(),
                             nn.Linear(MLP_HIDDEN, num_classes))
    if name == "cnn":
        return SmallCNN(channels, num_classes)
    if name == "resnet20":
        return ResNet20(channels, num_classes)
    return VGG11(channels, (height, width), num_classes)


class SmallCNN(nn.Module):
    """conv32 - pool - conv64 - pool - adaptive avg pool to 2x2 - linear.

    The adaptive pool makes one network fit 8x8 digits, 28x28 MNIST and 32x32 CIFAR-10.
    """

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        )
        self.classifier = nn.Linear(64 * 2 * 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection (He et al. 2016, CIFAR variant).

    The shortcut is "option A": identity, or stride-2 subsampling with zero-padded channels when
    the shape changes, so it has no parameters (this is what gives ResNet-20 its 0.27M).
    """

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(RESNET_GROUPS, planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(RESNET_GROUPS, planes)
        self.stride = stride
        self.extra_channels = planes - in_planes

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.extra_channels:
            half = self.extra_channels // 2
            x = F.pad(x, (0, 0, 0, 0, half, self.extra_channels - half))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet20(nn.Module):
    """CIFAR ResNet-20: 3x3 conv 16, three stages of three basic blocks (16/32/64 channels),
    global average pool, linear.  GroupNorm replaces BatchNorm (no buffers, see module docstring)."""

    def __init__(self, in_channels: int, num_classes: int, blocks_per_stage: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.norm = nn.GroupNorm(RESNET_GROUPS, 16)
        layers: list[nn.Module] = []
        in_planes = 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            for block in range(blocks_per_stage):
                layers.append(BasicBlock(in_planes, planes, stride if block == 0 else 1))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.classifier = nn.Linear(64, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm(self.conv(x)))
        out = self.layers(out)
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.classifier(out)


class VGG11(nn.Module):
    """VGG-11 without BatchNorm (the paper's CIFAR-10 model) with the authors' classifier head:
    dropout, 512 -> 512, ReLU, dropout, 512 -> 512, ReLU, 512 -> classes (their tasks/models/vgg.py).

    Made for 32x32 inputs (five 2x2 pools down to 1x1, ~9.75M parameters).  For smaller inputs a
    pool is skipped when its input is already 1 pixel high or wide, so 8x8 and 28x28 images also end
    at 1x1; larger inputs keep their final spatial map and the classifier grows to match.
    """

    def __init__(self, in_channels: int, spatial: tuple[int, int], num_classes: int):
        super().__init__()
        layers: list[nn.Module] = []
        channels, (height, width) = in_channels, spatial
        for item in VGG11_CONFIG:
            if item == "M":
                if height >= 2 and width >= 2:
                    layers.append(nn.MaxPool2d(2))
                    height, width = height // 2, width // 2
            else:
                layers += [nn.Conv2d(channels, int(item), 3, padding=1), nn.ReLU(inplace=True)]
                channels = int(item)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Dropout(), nn.Linear(channels * height * width, VGG11_HIDDEN), nn.ReLU(inplace=True),
            nn.Dropout(), nn.Linear(VGG11_HIDDEN, VGG11_HIDDEN), nn.ReLU(inplace=True),
            nn.Linear(VGG11_HIDDEN, num_classes))
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                # Without BN, He init keeps activations at a trainable scale through 8 ReLU layers.
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))
