"""Shared small models for the export tests (resnet18 teacher, 64 px, random weights, fixed seed)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

IMAGE_SIZE = 64


def small_model(seed: int = 0, threshold: float = 3.0):
    from mrkd.train.model import build_model
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_model("resnet18", "random", image_size=IMAGE_SIZE).eval()
    model.calibration = {"threshold": threshold, "threshold_method": "quantile", "quantile": 0.99,
                         "good_min": 2.5, "good_mean": 2.9}
    return model


def run_onnx(path, batch: np.ndarray) -> dict:
    from mrkd.runtime.backends.onnxruntime_backend import ort_session
    session = ort_session(path, ["cpu"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {session.get_inputs()[0].name: batch})))
