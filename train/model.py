"""The MRKD detector: frozen teacher + one-class bottleneck + decoder student + anomaly-map head.

Builders mirror torchvision's (one function per backbone, weights as one explicit argument)::

    model = mrkd.train.efficientnet_lite0(teacher_weights="imagenet", image_size=256)
    maps = model.anomaly_map(x)          # N×1×H×W, official protocol
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from mrkd.errors import SettingError
from mrkd.runtime.calibration import Calibration
from mrkd.runtime.metadata import MAX_IMAGE_SIZE
from mrkd.runtime.preprocess import IMAGENET_MEAN, IMAGENET_STD, RESIZE_MODES
from mrkd.train import DEFAULT_BACKBONE
from mrkd.train.head import AnomalyMapHead, distillation_loss
from mrkd.train.memory_bank import check_pool, default_pool
from mrkd.train.student import Decoder, OneClassBottleneck
from mrkd.train.teachers import TeacherSource, build_teacher, teacher_spec


@dataclass
class MRKDConfig:
    """What a model needs to be rebuilt and used for inference; stored in every checkpoint."""

    backbone: str = DEFAULT_BACKBONE
    image_size: int = 256
    teacher_weights: str = "imagenet"      # "imagenet" | weights name | file path | "random"
    mask_ratio: float = 0.2                # feature-level masking: share of positions zeroed
    flm: bool = True                       # feature-level masking on (training only)
    test_time_mask: bool = False           # mask at inference too, as the official code does
    sigma: float = 4.0                     # Gaussian smoothing of the anomaly map
    # Input normalisation; None: the teacher's own (EfficientNet-Lite: (x - 127) / 128), else ImageNet's.
    mean: Optional[Tuple[float, float, float]] = None
    std: Optional[Tuple[float, float, float]] = None
    resize_mode: str = "resize"            # "resize" (whole image) | "center_crop" (official)
    # Weight of each scale's 1 − cos map (strides 4, 8, 16) in the anomaly map; (1, 1, 1) is the
    # official protocol. A pure inference setting: training's loss does not use it.
    scale_weights: Tuple[float, float, float] = (1.0, 1.0, 1.0)
    # "mrkd" (the distillation map) | "knn" (distance to a memory bank of training patches) | "both"
    # (their sum, each over its training-score spread); see mrkd.train.memory_bank.
    score: str = "mrkd"
    knn_weight: float = 0.0
    knn_memory_fraction: float = 0.05
    knn_sampler: str = "coreset"     # how the bank was chosen: "coreset" | "random" (for the record)
    knn_pool: Optional[int] = None   # bank patches averaged over pool × pool; None: default_pool(image_size)

    def __post_init__(self):
        # what training can write; a hand-made or damaged checkpoint's config is refused here by field, where
        # its value would otherwise surface far away (a torch traceback in the export, a wrong pre-processing)
        size = self.image_size
        if isinstance(size, bool) or not isinstance(size, int) or not 32 <= size <= MAX_IMAGE_SIZE or size % 32:
            raise SettingError(f"image_size={size!r} must be a whole multiple of 32 in [32, {MAX_IMAGE_SIZE}]")
        if not (_real(self.sigma) and self.sigma > 0):
            raise SettingError(f"sigma={self.sigma!r} must be a finite number > 0")
        for name in ("mean", "std"):
            values = getattr(self, name)
            if values is not None and (not isinstance(values, (list, tuple)) or len(values) != 3
                                       or not all(map(_real, values)) or (name == "std" and min(values) <= 0)):
                raise SettingError(f"{name}={values!r} must be 3 finite numbers" + (" > 0" if name == "std" else ""))
        if self.resize_mode not in RESIZE_MODES:
            raise SettingError(f"resize_mode={self.resize_mode!r} is not one of {', '.join(RESIZE_MODES)}")
        if self.mean is None or self.std is None:
            spec = teacher_spec(self.backbone)
            if self.mean is None:
                self.mean = spec.mean if spec.mean is not None else IMAGENET_MEAN
            if self.std is None:
                self.std = spec.std if spec.std is not None else IMAGENET_STD
        # One canonical type whatever the caller (or a checkpoint's JSON-like lists) passed, so a
        # reloaded config equals the saved one.
        self.mean = tuple(float(v) for v in self.mean)
        self.std = tuple(float(v) for v in self.std)
        self.scale_weights = tuple(float(v) for v in self.scale_weights)
        if len(self.scale_weights) != 3 or min(self.scale_weights) < 0 or (
                self.score == "mrkd" and not any(self.scale_weights)):
            raise SettingError(f"scale_weights must be 3 non-negative numbers, not all 0; got {self.scale_weights}")
        if self.score not in ("mrkd", "knn", "both"):
            raise SettingError(f"score must be 'mrkd', 'knn' or 'both', got {self.score!r}")
        self.knn_weight, self.knn_memory_fraction = float(self.knn_weight), float(self.knn_memory_fraction)
        if self.knn_sampler not in ("coreset", "random"):
            raise SettingError(f"knn_sampler must be 'coreset' or 'random', got {self.knn_sampler!r}")
        if self.knn_pool is None:
            self.knn_pool = default_pool(self.image_size)
        check_pool(self.knn_pool)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["mean"], data["std"] = list(self.mean), list(self.std)
        data["scale_weights"] = list(self.scale_weights)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "MRKDConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        # Checkpoints written before a field existed did what its value here says.
        data = {**BEFORE_FIELD, **data}
        return cls(**{k: v for k, v in data.items() if k in known})


def _real(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


BEFORE_FIELD = {"scale_weights": (1.0, 1.0, 1.0), "knn_sampler": "random", "knn_memory_fraction": 0.1,
                "knn_pool": 1}


class MRKD(nn.Module):
    """Masked Reverse Knowledge Distillation.

    ``forward(x_clean, x_student)`` is the training step's model: the teacher's features of the
    clean image are the target, and the student restores them from the teacher's features of the
    image-level-masked (patch-swapped) image ``x_student`` through the bottleneck and decoder.
    At inference both are the same image.
    """

    def __init__(self, config: MRKDConfig, teacher: nn.Module, teacher_source: TeacherSource):
        super().__init__()
        spec = teacher_spec(config.backbone)
        self.config = config
        self.teacher = teacher
        self.teacher_source = teacher_source
        self.bottleneck = OneClassBottleneck(spec.channels, spec.student_block, spec.bottleneck_blocks,
                                             spec.width_per_group)
        self.student = Decoder(spec.channels, spec.student_block, spec.student_layers, spec.width_per_group,
                               mask_ratio=config.mask_ratio, flm=config.flm,
                               test_time_mask=config.test_time_mask)
        self.head = AnomalyMapHead(config.image_size, config.sigma, config.scale_weights)
        self._calibration: Optional[Calibration] = None

    @property
    def calibration(self) -> Optional[Calibration]:
        """How the alarm threshold was set (mrkd.runtime.calibration.Calibration), None when uncalibrated."""
        return self._calibration

    @calibration.setter
    def calibration(self, value) -> None:
        # A Calibration, None, or an older checkpoint's dict (migrated and validated here).
        self._calibration = Calibration.of(value, "model calibration")

    # The teacher stays frozen in eval mode (its BatchNorm statistics are ImageNet's).
    def train(self, mode: bool = True) -> "MRKD":
        super().train(mode)
        self.teacher.eval()
        return self

    def trainable_parameters(self) -> List[nn.Parameter]:
        return list(self.bottleneck.parameters()) + list(self.student.parameters())

    def teacher_features(self, x: torch.Tensor) -> List[torch.Tensor]:
        with torch.no_grad():
            return self.teacher(x)

    def forward(self, x_clean: torch.Tensor, x_student: Optional[torch.Tensor] = None
                ) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        target = self.teacher_features(x_clean)
        source = target if x_student is None else self.teacher_features(x_student)
        restored = self.student(self.bottleneck(source))
        return target, restored

    def loss(self, x_clean: torch.Tensor, x_student: Optional[torch.Tensor] = None) -> torch.Tensor:
        return distillation_loss(*self(x_clean, x_student))

    # --- inference API -------------------------------------------------------------------------
    @torch.no_grad()
    def per_scale_maps(self, x: torch.Tensor) -> List[torch.Tensor]:
        """The three unsmoothed 1 − cos maps at feature resolution (strides 4, 8, 16), N×h×w."""
        return self.head.per_scale_maps(*self(x))

    @torch.no_grad()
    def anomaly_map(self, x: torch.Tensor) -> torch.Tensor:
        """N×1×H×W smoothed anomaly map (official protocol) for ImageNet-normalised N×3×H×W input."""
        return self.head(*self(x))

    @torch.no_grad()
    def scores(self, x: torch.Tensor) -> torch.Tensor:
        return self.head.scores(self.anomaly_map(x))

    def save(self, path) -> None:
        """Write this model as a self-contained checkpoint, atomically (see mrkd.train.checkpoint)."""
        from mrkd.train.checkpoint import save_checkpoint
        save_checkpoint(self, path)


def build_model(backbone: str = DEFAULT_BACKBONE, teacher_weights: str = "imagenet", *,
                image_size: int = 256, teacher_state_dict: Optional[dict] = None, **config_kwargs) -> MRKD:
    """Build an MRKD detector for ``backbone`` with the teacher weights named by ``teacher_weights``."""
    config = MRKDConfig(backbone=backbone, image_size=image_size, teacher_weights=str(teacher_weights),
                        **config_kwargs)
    teacher, source = build_teacher(backbone, str(teacher_weights), state_dict=teacher_state_dict)
    return MRKD(config, teacher, source)


def _builder(backbone: str):
    def build(*, teacher_weights: str = "imagenet", image_size: int = 256, **config_kwargs) -> MRKD:
        return build_model(backbone, teacher_weights, image_size=image_size, **config_kwargs)
    build.__name__ = backbone
    build.__doc__ = (f"MRKD with a frozen {backbone} teacher. ``teacher_weights``: 'imagenet', a weights "
                     f"name, a state-dict path, or 'random' (plumbing only).")
    return build


resnet18 = _builder("resnet18")
resnet50 = _builder("resnet50")
wide_resnet50_2 = _builder("wide_resnet50_2")
wide_resnet101_2 = _builder("wide_resnet101_2")
efficientnet_lite0 = _builder("efficientnet_lite0")
