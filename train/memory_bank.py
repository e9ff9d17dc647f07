"""A memory bank of training patches inside the model: the kNN distance map of ``--score knn|both``.

On real images (ELPV solar cells, ``mrkd bench quality``) a nearest-neighbour patch distance on the
teacher's own features is a strong detector, and the sum of it and the MRKD map beats either alone
(numbers in benchmarks/RESULTS.md). So it lives in the model, not beside it: the bank is a buffer of
the anomaly-map head, the distance map is one more "scale" the head sums, and the exported ONNX graph
carries the bank as a constant — the runtime and TensorRT path stay one.

* Features: the teacher's stride-8 and stride-16 maps, 16 upsampled bilinearly to 8, concatenated.
* Bank: a seeded random ``fraction`` of all training patches (no coreset), FP32. Memory: patches ×
  channels × 4 bytes (Lite0, 256 px, 700 images, 10 %: 72k × 152 × 4 B ≈ 42 MB, in the checkpoint and
  the graph).
* Distance: per patch the minimum L2 distance to the bank, written as ``|q|² − 2 q·b + |b|²`` over bank
  chunks (MatMul + ReduceMin in the graph; no cdist operator needed), clamped at 0, square root.
* ``both``: each detector's map is divided by the spread (std) of its image scores on the training
  images, then summed; the threshold is calibrated on the summed map as usual. The MRKD part uses the
  stride-8 and stride-16 scales only (``BOTH_SCALE_WEIGHTS``): chosen on the ELPV validation split
  (poly +0.010 image AUROC, mono ±0.001 against all three scales), confirmed on the test split.
"""

from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

SCORES = ("mrkd", "knn", "both")
BOTH_SCALE_WEIGHTS = (0.0, 1.0, 1.0)    # MRKD scales (strides 4, 8, 16) in the "both" map
BANK_CHUNK = 4096


def patch_features(teacher_feats: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stride-8 and stride-16 features (16 upsampled to 8, bilinear), concatenated: N×C×h×w."""
    mid, deep = teacher_feats[1].float(), teacher_feats[2].float()
    deep = F.interpolate(deep, size=mid.shape[-2:], mode="bilinear", align_corners=False)
    return torch.cat([mid, deep], 1)


class MemoryBank(nn.Module):
    """Minimum L2 distance of each stride-8 patch to a bank of training patches, as an N×h×w map."""

    def __init__(self, bank: torch.Tensor, chunk: int = BANK_CHUNK):
        super().__init__()
        if bank.dim() != 2 or len(bank) == 0:
            raise ValueError(f"memory bank must be a non-empty patches × channels matrix, got {tuple(bank.shape)}")
        bank = bank.detach().float().contiguous()
        self.register_buffer("bank", bank)
        self.chunk = int(chunk)

    @property
    def memory_bytes(self) -> int:
        return self.bank.numel() * self.bank.element_size()

    def forward(self, teacher_feats: Sequence[torch.Tensor]) -> torch.Tensor:
        features = patch_features(teacher_feats)
        h, w = features.shape[-2:]
        queries = features.flatten(2).transpose(1, 2)                     # N×hw×C
        query_sq = queries.pow(2).sum(-1, keepdim=True)                   # N×hw×1
        best = None
        for start in range(0, len(self.bank), self.chunk):
            part = self.bank[start:start + self.chunk]                    # M×C (a graph constant)
            d2 = query_sq - 2.0 * torch.matmul(queries, part.t()) + part.pow(2).sum(-1)
            nearest = d2.amin(-1)
            best = nearest if best is None else torch.minimum(best, nearest)
        return best.clamp_min(0.0).sqrt().reshape(-1, h, w)


def build_bank(model, batches, fraction: float = 0.1, seed: int = 0) -> torch.Tensor:
    """A seeded random ``fraction`` of the patches of the (pre-processed) training batches."""
    if not 0 < fraction <= 1:
        raise ValueError(f"memory bank fraction must be in (0, 1], got {fraction}")
    patches: List[torch.Tensor] = []
    device = next(model.parameters()).device
    with torch.no_grad():
        for x in batches:
            f = patch_features(model.teacher(x.to(device)))
            patches.append(f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]).cpu())
    patches = torch.cat(patches)
    keep = max(1, int(round(fraction * len(patches))))
    order = torch.randperm(len(patches), generator=torch.Generator().manual_seed(int(seed)))
    return patches[order[:keep]].contiguous()


def _image_scores(model, batches) -> torch.Tensor:
    device = next(model.parameters()).device
    return torch.cat([model.scores(x.to(device)).cpu() for x in batches])


def fit_memory_bank(model, paths: Sequence[str], score: str, fraction: float = 0.1, seed: int = 0,
                    batch_size: int = 16) -> dict:
    """Give ``model`` its memory bank from the training images ``paths`` and set the head for ``score``.

    "knn": the map is the distance map alone. "both": MRKD's map over the std of its training-image
    scores plus the distance map over the std of its own. Returns what was set (for the report).
    """
    from mrkd.train.data import TestDataset, TestItem
    if score not in SCORES:
        raise ValueError(f"score {score!r}: expected one of {SCORES}")
    config = model.config
    items = [TestItem(str(p), 0, "good", None) for p in paths]
    dataset = TestDataset(items, config.image_size, config.resize_mode, config.mean, config.std)

    def batches():
        for image, _, _, _ in torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False):
            yield image

    was_training = model.training
    model.eval()
    head = model.head
    head.set_memory_bank(None, 0.0)
    base_weights = tuple(config.scale_weights) if any(config.scale_weights) else (1.0, 1.0, 1.0)
    if score == "both":
        base_weights = BOTH_SCALE_WEIGHTS
    head.scale_weights = base_weights
    mrkd_std = float(_image_scores(model, batches()).std()) if score == "both" else 1.0
    bank = MemoryBank(build_bank(model, batches(), fraction, seed)).to(next(model.parameters()).device)
    head.set_memory_bank(bank, 1.0)
    head.scale_weights = (0.0, 0.0, 0.0)
    knn_std = float(_image_scores(model, batches()).std()) if score == "both" else 1.0
    if score == "mrkd":
        head.set_memory_bank(None, 0.0)
        head.scale_weights = base_weights
        knn_weight = 0.0
    elif score == "knn":
        knn_weight = 1.0
    else:
        head.scale_weights = tuple(w / max(mrkd_std, 1e-12) for w in base_weights)
        knn_weight = 1.0 / max(knn_std, 1e-12)
        head.set_memory_bank(bank, knn_weight)
    config.score, config.scale_weights, config.knn_weight = score, head.scale_weights, knn_weight
    config.knn_memory_fraction = float(fraction)
    model.train(was_training)
    return {"score": score, "bank_patches": int(len(bank.bank)), "bank_mb": round(bank.memory_bytes / 2 ** 20, 2),
            "mrkd_train_score_std": mrkd_std, "knn_train_score_std": knn_std}
