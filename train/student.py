"""The MRKD student: one-class bottleneck embedding (OCBE) and the reverse-distillation decoder with
feature-level masking (FLM).

Widths are derived from the teacher's three feature widths (c1, c2, c3) — nothing is hard-coded for
one backbone. With WideResNet50-2 the module and parameter names are those of the official
RD4AD/MRKD code (``bn`` ↔ OneClassBottleneck, ``decoder`` ↔ Decoder), so its checkpoints load as is
(minus two layers it defines but never uses).
"""

from __future__ import annotations

from typing import List, Sequence, Type

import torch
from torch import nn


def conv3x3(cin: int, cout: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, groups=groups, bias=False)


def conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


def deconv2x2(cin: int, cout: int, groups: int = 1) -> nn.ConvTranspose2d:
    # The decoder doubles resolution with 2×2 stride-2 transposed convolutions.
    return nn.ConvTranspose2d(cin, cout, 2, stride=2, groups=groups, bias=False)


# --- encoder-style blocks for the bottleneck (same layout as torchvision's) -----------------------
class EncoderBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module = None,
                 base_width: int = 64):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class EncoderBottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module = None,
                 base_width: int = 64):
        super().__init__()
        width = int(planes * base_width / 64)
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


# --- decoder blocks: the mirror images, upsampling where the encoder downsampled ------------------
class DecoderBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, upsample: nn.Module = None,
                 base_width: int = 64):
        super().__init__()
        self.conv1 = deconv2x2(inplanes, planes) if stride == 2 else conv3x3(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.upsample = upsample

    def forward(self, x):
        identity = x if self.upsample is None else self.upsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class DecoderBottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, upsample: nn.Module = None,
                 base_width: int = 64):
        super().__init__()
        width = int(planes * base_width / 64)
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = deconv2x2(width, width) if stride == 2 else conv3x3(width, width)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.upsample = upsample

    def forward(self, x):
        identity = x if self.upsample is None else self.upsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


ENCODER_BLOCKS = {"basic": EncoderBasicBlock, "bottleneck": EncoderBottleneck}
DECODER_BLOCKS = {"basic": DecoderBasicBlock, "bottleneck": DecoderBottleneck}


def _init_weights(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class OneClassBottleneck(nn.Module):
    """Multi-scale feature fusion (MFF) then one-class embedding (OCE).

    The two shallower teacher features are brought to stride 16 by strided 3×3 convolutions,
    concatenated with the deepest one, and compressed by residual blocks at stride 32 into the
    compact embedding the decoder must restore from.
    """

    def __init__(self, channels: Sequence[int], block: str = "bottleneck", num_blocks: int = 3,
                 width_per_group: int = 64):
        super().__init__()
        c1, c2, c3 = channels
        block_cls: Type[nn.Module] = ENCODER_BLOCKS[block]
        self.conv1 = conv3x3(c1, c2, 2)
        self.bn1 = nn.BatchNorm2d(c2)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(c2, c3, 2)
        self.bn2 = nn.BatchNorm2d(c3)
        self.conv3 = conv3x3(c2, c3, 2)
        self.bn3 = nn.BatchNorm2d(c3)
        planes = 2 * c3 // block_cls.expansion
        out_channels = planes * block_cls.expansion
        downsample = nn.Sequential(conv1x1(3 * c3, out_channels, 2), nn.BatchNorm2d(out_channels))
        blocks = [block_cls(3 * c3, planes, 2, downsample, base_width=width_per_group)]
        blocks += [block_cls(out_channels, planes, base_width=width_per_group) for _ in range(1, num_blocks)]
        self.bn_layer = nn.Sequential(*blocks)
        self.out_channels = out_channels
        _init_weights(self)

    def forward(self, features: List[torch.Tensor]) -> torch.Tensor:
        f1, f2, f3 = features
        l1 = self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(f1))))))
        l2 = self.relu(self.bn3(self.conv3(f2)))
        return self.bn_layer(torch.cat([l1, l2, f3], 1)).contiguous()


def random_spatial_mask(feature: torch.Tensor, ratio: float) -> torch.Tensor:
    """A N×1×H×W mask that zeroes each spatial position with probability ``ratio`` (all channels)."""
    n, _, h, w = feature.shape
    keep = torch.rand(n, 1, h, w, device=feature.device) >= ratio
    return keep.to(feature.dtype)


class Decoder(nn.Module):
    """The student: restores the teacher's three feature scales from the one-class embedding.

    Feature-level masking (MRKD): at each scale a random spatial mask (``mask_ratio`` of positions)
    zeroes the decoder's features, and a generation block (3×3 conv, ReLU, 3×3 conv) must produce
    the teacher's features from what is left. Masking is applied in training only, so inference is
    deterministic; ``test_time_mask=True`` reproduces the official code, which masks at test time too.
    """

    def __init__(self, channels: Sequence[int], block: str = "bottleneck", layers: Sequence[int] = (3, 4, 6),
                 width_per_group: int = 64, mask_ratio: float = 0.2, flm: bool = True,
                 test_time_mask: bool = False):
        super().__init__()
        c1, c2, c3 = channels
        block_cls: Type[nn.Module] = DECODER_BLOCKS[block]
        self.mask_ratio, self.flm, self.test_time_mask = mask_ratio, flm, test_time_mask
        self.inplanes = 2 * c3
        self.width_per_group = width_per_group
        self.layer1 = self._make_layer(block_cls, c3 // block_cls.expansion, layers[0])
        self.layer2 = self._make_layer(block_cls, c2 // block_cls.expansion, layers[1])
        self.layer3 = self._make_layer(block_cls, c1 // block_cls.expansion, layers[2])
        self.generation1 = self._generation(c3)
        self.generation2 = self._generation(c2)
        self.generation3 = self._generation(c1)
        _init_weights(self)

    @staticmethod
    def _generation(channels: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True),
                             nn.Conv2d(channels, channels, 3, padding=1))

    def _make_layer(self, block_cls, planes: int, blocks: int) -> nn.Sequential:
        out_channels = planes * block_cls.expansion
        upsample = nn.Sequential(deconv2x2(self.inplanes, out_channels), nn.BatchNorm2d(out_channels))
        layers = [block_cls(self.inplanes, planes, 2, upsample, base_width=self.width_per_group)]
        self.inplanes = out_channels
        layers += [block_cls(out_channels, planes, base_width=self.width_per_group) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def _masked(self, feature: torch.Tensor) -> torch.Tensor:
        masking = self.flm and self.mask_ratio > 0 and (self.training or self.test_time_mask)
        return feature * random_spatial_mask(feature, self.mask_ratio) if masking else feature

    def forward(self, embedding: torch.Tensor) -> List[torch.Tensor]:
        deep = self.layer1(embedding)      # stride 16, c3 channels
        middle = self.layer2(deep)         # stride 8, c2
        shallow = self.layer3(middle)      # stride 4, c1
        # Returned shallow-first, matching the teacher's [layer1, layer2, layer3] order.
        return [self.generation3(self._masked(shallow)),
                self.generation2(self._masked(middle)),
                self.generation1(self._masked(deep))]
