"""mrkd: Masked Reverse Knowledge Distillation for visual inspection, from training to the edge.

The package is layered so that a Jetson without PyTorch can still run exported models:

* ``mrkd.runtime`` needs numpy, OpenCV and an inference backend (ONNX Runtime or TensorRT) only.
* ``mrkd.train`` and ``mrkd.export`` need PyTorch (``pip install 'mrkd[train]'``).
"""

__version__ = "0.1.0"
