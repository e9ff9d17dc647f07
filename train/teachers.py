"""Frozen ImageNet teachers: one builder per backbone, weights chosen by one explicit argument.

``teacher_weights`` decides where the weights come from, in one place:

* ``"imagenet"`` — the backbone's named ImageNet weights (torchvision's weights API for the ResNets;
  downloads on first use), also ``"IMAGENET1K_V2"``-style names;
* a path to a state dict in the backbone's own format (air-gapped factories);
* ``"random"`` — for plumbing tests and the offline demo only: a random teacher gives features
  that are at chance on real images, so a loud warning is printed.

Each teacher returns its features at strides 4, 8 and 16 (ResNets: after layer1, layer2, layer3).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from mrkd.console import warn_for_all_ranks
from mrkd.errors import MrkdError, SettingError

RANDOM_TEACHER_WARNING = (
    "teacher_weights='random': the teacher network has RANDOM weights. This is for plumbing tests and "
    "the offline demo only — on real inspection images a random teacher detects at chance level. "
    "Use teacher_weights='imagenet' (or a local ImageNet state dict) for inspection."
)


class TeacherWeightsError(MrkdError, ValueError):
    """Teacher weights missing, unreadable, or not matching the backbone."""


@dataclass
class TeacherSource:
    """Where a teacher's weights came from; stored in checkpoints so the model reloads identically."""

    kind: str                      # "imagenet" | "file" | "random"
    name: Optional[str] = None     # weights enum name ("IMAGENET1K_V1") or file path
    sha256: Optional[str] = None   # hash of the loaded state dict (see state_dict_sha256)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "name": self.name, "sha256": self.sha256}


@dataclass
class TeacherSpec:
    """Everything the student needs to know about a backbone, derived once per backbone."""

    name: str
    channels: Tuple[int, int, int]          # feature widths at strides 4, 8, 16
    build: Callable[[], nn.Module]          # the feature extractor with random weights
    load_imagenet: Callable[[str], Tuple[dict, str]]   # variant name -> (state dict, resolved name)
    student_block: str                      # "basic" | "bottleneck": block type of bottleneck and decoder
    student_layers: Tuple[int, int, int]    # decoder blocks per stage (deepest first)
    bottleneck_blocks: int                  # blocks in the one-class bottleneck embedding
    width_per_group: int = 64
    convert_state_dict: Callable[[dict], dict] = field(default=lambda sd: sd)
    # Input normalisation the weights were trained with (RGB, [0, 1] units); None: ImageNet mean/std.
    mean: Optional[Tuple[float, float, float]] = None
    std: Optional[Tuple[float, float, float]] = None


class ResNetFeatures(nn.Module):
    """A torchvision ResNet cut after layer3, returning [layer1, layer2, layer3] features."""

    def __init__(self, resnet: nn.Module):
        super().__init__()
        self.conv1, self.bn1, self.relu, self.maxpool = resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool
        self.layer1, self.layer2, self.layer3 = resnet.layer1, resnet.layer2, resnet.layer3

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        f1 = self.layer1(x)
        f2 = self.layer2(f1)
        f3 = self.layer3(f2)
        return [f1, f2, f3]


def _drop_classifier(state_dict: dict) -> dict:
    # layer4 and fc are not part of the teacher; torchvision checkpoints carry them.
    return {k: v for k, v in state_dict.items() if not k.startswith(("layer4.", "fc."))}


def _torchvision_resnet(arch: str) -> Tuple[Callable[[], nn.Module], Callable[[str], Tuple[dict, str]]]:
    def build() -> nn.Module:
        from mrkd.deps import require
        models = require("torchvision.models")
        return ResNetFeatures(getattr(models, arch)(weights=None))

    def load_imagenet(variant: str) -> Tuple[dict, str]:
        from mrkd.deps import require
        models = require("torchvision.models")
        enum = models.get_model_weights(arch)
        # The paper and the official code use torchvision's first ImageNet weights (IMAGENET1K_V1).
        name = "IMAGENET1K_V1" if variant in ("imagenet", "IMAGENET1K_V1") else variant
        try:
            weights = enum[name]
        except KeyError:
            raise TeacherWeightsError(f"{arch}: unknown ImageNet weights {variant!r}; "
                                      f"choose one of {[w.name for w in enum]}") from None
        try:
            return weights.get_state_dict(progress=True), name
        except (OSError, ValueError) as exc:    # URLError (offline, proxy, DNS) is an OSError
            raise TeacherWeightsError(
                f"{arch}: could not download torchvision's ImageNet weights {name} from {weights.url} ({exc}). "
                f"Choices: put that file in the torch hub cache ({_hub_checkpoints()}) or pass it as a local "
                f"weights file (--teacher-weights PATH.pth), or use the teacher that needs no download "
                f"(--backbone efficientnet_lite0, weights from its pip package)") from exc

    return build, load_imagenet


def _hub_checkpoints() -> str:
    import torch
    return os.path.join(torch.hub.get_dir(), "checkpoints")


TEACHERS: Dict[str, TeacherSpec] = {}


def register_teacher(spec: TeacherSpec) -> TeacherSpec:
    TEACHERS[spec.name] = spec
    return spec


for _arch, _channels, _block, _layers, _bneck, _width in [
    ("resnet18", (64, 128, 256), "basic", (2, 2, 2), 2, 64),
    ("resnet50", (256, 512, 1024), "bottleneck", (3, 4, 6), 3, 64),
    ("wide_resnet50_2", (256, 512, 1024), "bottleneck", (3, 4, 6), 3, 128),
    ("wide_resnet101_2", (256, 512, 1024), "bottleneck", (3, 4, 23), 3, 128),
]:
    _build, _load = _torchvision_resnet(_arch)
    register_teacher(TeacherSpec(_arch, _channels, _build, _load, _block, _layers, _bneck, _width,
                                 convert_state_dict=_drop_classifier))


def teacher_spec(backbone: str) -> TeacherSpec:
    if backbone not in TEACHERS:
        # Importing the lite module registers the EfficientNet-Lite teachers.
        try:
            from mrkd.train import teachers_lite  # noqa: F401
        except ImportError:
            pass
    try:
        return TEACHERS[backbone]
    except KeyError:
        raise SettingError(f"unknown backbone {backbone!r}; choose one of {sorted(TEACHERS)}") from None


def state_dict_sha256(state_dict: dict) -> str:
    """A content hash of a state dict (keys, dtypes, shapes and values), independent of file format."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key]
        if not torch.is_tensor(tensor):
            continue
        tensor = tensor.detach().cpu().contiguous()
        digest.update(key.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _load_state_dict_file(path: str) -> dict:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise TeacherWeightsError(f"teacher weights file not found: {path}") from None
    except Exception as exc:
        from mrkd.train.checkpoint import load_failure
        raise TeacherWeightsError(f"{path}: not a readable PyTorch state dict, cannot use it as teacher weights "
                                  f"({load_failure(exc)})") from exc
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise TeacherWeightsError(f"{path}: expected a state dict, found {type(obj).__name__}")
    return strip_module_prefix(obj)


def strip_module_prefix(state_dict: dict) -> dict:
    """Keys without the ``module.`` prefix DataParallel / DistributedDataParallel put in front."""
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}


def freeze(module: nn.Module) -> nn.Module:
    module.eval()
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    return module


def build_teacher(backbone: str, teacher_weights: str = "imagenet",
                  state_dict: Optional[dict] = None) -> Tuple[nn.Module, TeacherSource]:
    """Build the frozen teacher of ``backbone`` with weights from ``teacher_weights``.

    ``state_dict`` (already converted to the teacher's own keys) overrides the source: checkpoints
    that carry their teacher use it so a random teacher reloads bit-identically.
    """
    spec = teacher_spec(backbone)
    teacher = spec.build()
    if state_dict is not None:
        source = TeacherSource("file", teacher_weights, None)
        loaded = state_dict
    elif teacher_weights == "random":
        warn_for_all_ranks(RANDOM_TEACHER_WARNING, stacklevel=2)   # every torchrun rank builds one
        source = TeacherSource("random")
        loaded = None
    elif os.path.sep in str(teacher_weights) or os.path.exists(str(teacher_weights)) or \
            str(teacher_weights).endswith((".pth", ".pt", ".bin", ".ckpt")):
        loaded = spec.convert_state_dict(_load_state_dict_file(str(teacher_weights)))
        source = TeacherSource("file", str(teacher_weights))
    else:
        raw, resolved = spec.load_imagenet(str(teacher_weights))
        loaded = spec.convert_state_dict(raw)
        source = TeacherSource("imagenet", resolved)
    if loaded is not None:
        try:
            missing, unexpected = teacher.load_state_dict(loaded, strict=False)
        except RuntimeError as exc:  # shape mismatches
            raise TeacherWeightsError(f"teacher weights {teacher_weights!r} do not fit backbone {backbone}: "
                                      f"{exc}") from exc
        if missing or unexpected:
            raise TeacherWeightsError(
                f"teacher weights {teacher_weights!r} do not fit backbone {backbone}: "
                f"{len(missing)} missing keys (e.g. {missing[:3]}), {len(unexpected)} unexpected "
                f"(e.g. {unexpected[:3]})")
    source.sha256 = state_dict_sha256(teacher.state_dict())
    return freeze(teacher), source


def feature_channels(backbone: str) -> Sequence[int]:
    return teacher_spec(backbone).channels


# --- a faster copy of a frozen teacher, for training -----------------------------------------------

def _fold_batchnorm_into_convs(module: nn.Module) -> int:
    """Fold every BatchNorm that directly follows a Conv2d into that conv (eval mode); returns how many.

    Pairs are a Sequential's adjacent [Conv2d, BatchNorm2d], and sibling attributes ``convN``/``bnN``
    (``conv``/``bn``), the layout of torchvision's ResNets and of our Lite blocks. The caller checks
    the folded copy against the original, so a module whose forward does something else between the
    two is caught rather than trusted.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval
    folded = 0
    for parent in module.modules():
        children = parent._modules
        if isinstance(parent, nn.Sequential):
            names = list(children)
            pairs = list(zip(names, names[1:]))
        else:
            pairs = [(name, "bn" + name[len("conv"):]) for name in children if name.startswith("conv")]
        for conv_name, bn_name in pairs:
            conv, bn = children.get(conv_name), children.get(bn_name)
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) \
                    and conv.out_channels == bn.num_features:
                children[conv_name] = fuse_conv_bn_eval(conv, bn)
                children[bn_name] = nn.Identity()
                folded += 1
    return folded


class FastTeacher(nn.Module):
    """A frozen teacher's inference-only copy: BatchNorms folded into the convolutions and the
    weights in channels-last layout (oneDNN's fast path for depthwise and 1×1 convolutions on CPU;
    cuDNN's for tensor cores). Same features as the original to float rounding; the features come
    back contiguous (the student's layers run faster on that layout).

    The copy is separate from ``model.teacher`` so checkpoints, export and evaluation keep the
    original modules. Measured (Lite0, 256 px, batch 16, 2 threads): 0.60 s -> 0.18 s per forward.
    """

    def __init__(self, teacher: nn.Module, fold_batchnorm: bool = True, channels_last: bool = True):
        super().__init__()
        import copy
        self.network = freeze(copy.deepcopy(teacher))
        self.folded = _fold_batchnorm_into_convs(self.network) if fold_batchnorm else 0
        self.channels_last = channels_last
        if channels_last:
            self.network.to(memory_format=torch.channels_last)
        if self.folded:
            self._check_against(teacher)

    def _check_against(self, teacher: nn.Module) -> None:
        # A probe input through both: a wrongly paired conv/BN would change the features grossly.
        parameter = next(teacher.parameters())
        probe = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)).to(parameter)
        with torch.no_grad():
            expected, got = teacher.eval()(probe), self(probe)
        for index, (a, b) in enumerate(zip(expected, got)):
            error = float((a - b).abs().max() / a.abs().max().clamp_min(1e-12))
            if error > 1e-3:
                raise RuntimeError(f"FastTeacher: folding BatchNorm changed feature {index} of "
                                   f"{type(teacher).__name__} (relative error {error:.2e}); "
                                   f"use fold_batchnorm=False for this teacher")

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        with torch.no_grad():
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            return [f.contiguous() for f in self.network(x)]
