"""The anomaly-map head: the one module that turns teacher/student features into maps and scores.

Training (loss), evaluation, prediction, ONNX export and the reference tests all use it, so the
protocol lives in one place:

* per scale: 1 − cosine similarity over channels, at feature resolution, times that scale's weight
  (``scale_weights``; all 1 is the official protocol, 0 leaves a scale out of the map and score);
* bilinear upsampling with ``align_corners=True`` to the input size, summed over scales;
* Gaussian smoothing with ``scipy.ndimage.gaussian_filter`` semantics — sigma 4, truncate 4.0,
  radius ``int(4·sigma + 0.5)``, and scipy's ``reflect`` border (d c b a | a b c d, the edge pixel
  repeated; PyTorch's ``reflect`` padding is scipy's ``mirror`` and differs at the border);
* image score = maximum of the smoothed map.

The cosine is written out (dot product over the product of norms) and always computed in FP32:
a sum of squares over 1024 channels overflows half precision, so an FP16 student must not take the
head down with it.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

COSINE_EPS = 1e-8


def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """scipy's 1-D Gaussian weights: radius int(truncate·sigma + 0.5), normalised to sum 1."""
    radius = int(truncate * float(sigma) + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    weights = torch.exp(-0.5 * (x / float(sigma)) ** 2)
    return (weights / weights.sum()).to(torch.float32)


def symmetric_indices(length: int, radius: int) -> torch.Tensor:
    """Indices of a length-``length`` axis padded by ``radius`` with scipy's 'reflect' rule.

    The pattern repeats with period 2·length (… c b a | a b c … c | c b a …), so any radius works,
    including one larger than the axis.
    """
    positions = torch.arange(-radius, length + radius)
    period = 2 * length
    folded = torch.remainder(positions, period)
    return torch.where(folded < length, folded, period - 1 - folded)


def cosine_distance(teacher: torch.Tensor, student: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """1 − cos(teacher, student) along ``dim``, in FP32 whatever the inputs' precision."""
    teacher, student = teacher.float(), student.float()
    dot = (teacher * student).sum(dim)
    norm_t = teacher.pow(2).sum(dim).sqrt().clamp_min(COSINE_EPS)
    norm_s = student.pow(2).sum(dim).sqrt().clamp_min(COSINE_EPS)
    return 1.0 - dot / (norm_t * norm_s)


def distillation_loss(teacher_feats: Sequence[torch.Tensor], student_feats: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum over scales of mean(1 − cos) between each sample's flattened teacher and student features."""
    loss = 0.0
    for t, s in zip(teacher_feats, student_feats):
        loss = loss + cosine_distance(t.flatten(1), s.flatten(1), dim=1).mean()
    return loss


class GaussianBlur(nn.Module):
    """Separable Gaussian with scipy semantics; sizes are static so the graph exports cleanly."""

    def __init__(self, sigma: float = 4.0, truncate: float = 4.0):
        super().__init__()
        kernel = gaussian_kernel1d(sigma, truncate)
        self.sigma = float(sigma)
        self.radius = (kernel.numel() - 1) // 2
        self.register_buffer("kernel_h", kernel.view(1, 1, 1, -1), persistent=False)
        self.register_buffer("kernel_v", kernel.view(1, 1, -1, 1), persistent=False)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:   # N×1×H×W
        if self.sigma <= 0:
            return maps
        h, w = maps.shape[-2:]
        cols = symmetric_indices(int(w), self.radius).to(maps.device)
        rows = symmetric_indices(int(h), self.radius).to(maps.device)
        maps = F.conv2d(maps.index_select(3, cols), self.kernel_h)
        return F.conv2d(maps.index_select(2, rows), self.kernel_v)


class AnomalyMapHead(nn.Module):
    """Teacher/student features → per-scale maps → full-resolution smoothed map and image score."""

    def __init__(self, image_size: int | Tuple[int, int], sigma: float = 4.0,
                 scale_weights: Sequence[float] = (1.0, 1.0, 1.0)):
        super().__init__()
        self.image_size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        self.blur = GaussianBlur(sigma)
        self.scale_weights = tuple(float(w) for w in scale_weights)
        self.memory_bank = None          # mrkd.train.memory_bank.MemoryBank for --score knn|both
        self.knn_weight = 0.0

    def set_memory_bank(self, bank, weight: float) -> None:
        """Add (or with None remove) the kNN distance map, times ``weight``, as one more scale."""
        self.memory_bank = bank
        self.knn_weight = float(weight) if bank is not None else 0.0

    @property
    def sigma(self) -> float:
        return self.blur.sigma

    def per_scale_maps(self, teacher_feats: Sequence[torch.Tensor],
                       student_feats: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """The unsmoothed 1 − cos maps at each feature resolution, N×h×w each, each times its scale weight
        (applied here, so the exported per-scale outputs and every consumer of them carry it)."""
        maps = [cosine_distance(t, s) for t, s in zip(teacher_feats, student_feats)]
        maps = [m if w == 1.0 else m * w for m, w in zip(maps, self.scale_weights)]
        if self.memory_bank is not None:
            maps.append(self.memory_bank(teacher_feats) * self.knn_weight)
        return maps

    def upsample_sum(self, per_scale: Sequence[torch.Tensor]) -> torch.Tensor:
        """Upsample every scale to the image size (bilinear, align_corners=True) and sum: N×1×H×W."""
        total = None
        for amap in per_scale:
            up = F.interpolate(amap.unsqueeze(1), size=self.image_size, mode="bilinear", align_corners=True)
            total = up if total is None else total + up
        return total

    def forward(self, teacher_feats: Sequence[torch.Tensor], student_feats: Sequence[torch.Tensor],
                smooth: bool = True) -> torch.Tensor:
        summed = self.upsample_sum(self.per_scale_maps(teacher_feats, student_feats))
        return self.blur(summed) if smooth else summed

    @staticmethod
    def scores(maps: torch.Tensor) -> torch.Tensor:
        """Image score = maximum of each map."""
        return maps.flatten(1).amax(1)
