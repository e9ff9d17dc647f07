"""The GPU this process runs on: name and compute capability of a CUDA device, read once here for
the engine build (export/tensorrt_build.py records them) and the engine check (the TensorRT backend
compares them), through the CUDA driver API with ctypes: no pycuda, torch or TensorRT needed."""

from __future__ import annotations

import ctypes
from typing import Tuple

from mrkd.errors import MrkdError

# CUdevice_attribute values of the driver API
_COMPUTE_CAPABILITY_MAJOR, _COMPUTE_CAPABILITY_MINOR = 75, 76


class NoGpuError(MrkdError, RuntimeError):
    """No NVIDIA driver or no such CUDA device on this machine."""


def gpu_identity(device: int = 0) -> Tuple[str, str]:
    """(GPU name, compute capability "major.minor") of CUDA ``device``; NoGpuError without one."""
    cuda = None
    for name in ("libcuda.so.1", "libcuda.so"):
        try:
            cuda = ctypes.CDLL(name)
            break
        except OSError:
            continue
    if cuda is None or cuda.cuInit(0) != 0:
        raise NoGpuError("no NVIDIA GPU / CUDA driver found")
    handle = ctypes.c_int()
    if cuda.cuDeviceGet(ctypes.byref(handle), device) != 0:
        raise NoGpuError(f"no CUDA device {device} on this machine")
    buffer = ctypes.create_string_buffer(256)
    cuda.cuDeviceGetName(buffer, 256, handle)
    major, minor = ctypes.c_int(), ctypes.c_int()
    cuda.cuDeviceGetAttribute(ctypes.byref(major), _COMPUTE_CAPABILITY_MAJOR, handle)
    cuda.cuDeviceGetAttribute(ctypes.byref(minor), _COMPUTE_CAPABILITY_MINOR, handle)
    return buffer.value.decode(), f"{major.value}.{minor.value}"
