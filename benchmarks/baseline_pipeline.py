"""The reference pipeline every speed figure is compared with: one image the way the official MRKD
evaluation scores it.

PyTorch eager FP32 teacher → bottleneck → decoder; per scale ``1 − F.cosine_similarity`` and
``F.interpolate(bilinear, align_corners=True)``; maps moved to numpy, summed, smoothed with
``scipy.ndimage.gaussian_filter(sigma=4)``; score = max. Batch 1, as the official loop runs.
"""

from __future__ import annotations

import numpy as np


def official_style_score(model, image):
    """Score one 1×3×H×W image with the official evaluation's steps; returns (map H×W, score)."""
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        teacher_feats = model.teacher(image)
        student_feats = model.student(model.bottleneck(teacher_feats))
        per_scale = [1 - F.cosine_similarity(t, s).unsqueeze(1) for t, s in zip(teacher_feats, student_feats)]
        return official_style_postprocess(per_scale, image.shape[-1], model.config.sigma)


def official_style_postprocess(per_scale, size: int, sigma: float):
    """The official evaluation's post-processing of one image: each 1×1×h×w torch map upsampled with
    ``F.interpolate(bilinear, align_corners=True)``, moved to numpy and summed (float64), smoothed
    with ``gaussian_filter(sigma)``; returns (map size×size, score = max)."""
    import torch.nn.functional as F
    from scipy.ndimage import gaussian_filter

    total = np.zeros((size, size))
    for amap in per_scale:
        total += F.interpolate(amap, size=size, mode="bilinear", align_corners=True)[0, 0].cpu().numpy()
    smoothed = gaussian_filter(total, sigma=sigma)
    return smoothed, float(smoothed.max())


def official_style_preprocess(bgr, size: int):
    """The official data path for one frame: PIL resize (shorter side), centre crop, ToTensor, Normalize."""
    from PIL import Image
    from torchvision import transforms as T

    from mrkd.runtime.preprocess import IMAGENET_MEAN, IMAGENET_STD

    rgb = Image.fromarray(bgr[..., ::-1].copy())
    transform = T.Compose([T.Resize(size), T.CenterCrop(size), T.ToTensor(),
                           T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    return transform(rgb).unsqueeze(0)
