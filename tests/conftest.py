"""Shared test settings: CPU threads and clean skips for GPU/TensorRT tests."""

import os
import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")


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
        # Markers, not keywords: a parameter id such as "tensorrt" is a keyword too.
        if item.get_closest_marker("gpu") and not has_gpu:
            item.add_marker(skip_gpu)
        if item.get_closest_marker("tensorrt") and not has_trt:
            item.add_marker(skip_trt)


@pytest.fixture(autouse=True)
def _sigchld_as_before():
    """Each test leaves SIGCHLD's handler as it found it: a DataLoader with workers leaves torch's
    handler, and with OpenVINO loaded the next child's exit (a subprocess in test_hot_swap) crashed
    the interpreter with SIGSEGV (3 of 3 runs; 0 of 3 with the handler put back)."""
    from mrkd.child_signal import sigchld_kept
    with sigchld_kept():
        yield
