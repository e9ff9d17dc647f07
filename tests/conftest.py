"""Shared test settings: CPU threads, quiet warnings for the random plumbing teacher, GPU skips."""

import os
import warnings

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")


def pytest_configure(config):
    # The random-teacher warning is the product's loud message for users; tests use random teachers
    # on purpose (tests that check the warning itself use pytest.warns).
    warnings.filterwarnings("ignore", message="teacher_weights='random'")


def gpu_available() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except Exception:
        return False


def tensorrt_available() -> bool:
    try:
        import tensorrt  # noqa: F401
    except Exception:
        return False
    return gpu_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs an NVIDIA GPU")
    skip_trt = pytest.mark.skip(reason="needs TensorRT and an NVIDIA GPU")
    has_gpu, has_trt = gpu_available(), tensorrt_available()
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip_gpu)
        if "tensorrt" in item.keywords and not has_trt:
            item.add_marker(skip_trt)
