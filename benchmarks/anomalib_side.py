"""anomalib's side of the peer benchmark (benchmarks/bench_anomalib.py). It runs in anomalib's own
virtual environment (scripts/setup_anomalib_venv.sh), imports nothing of mrkd, and is driven over
stdin/stdout so that the two sides can be alternated round by round:

    python anomalib_side.py WORKDIR --image-size 256 --threads 2 --backbone wide_resnet50_2 --models rd,patchcore

At start it builds each model with random weights (speed only: anomalib would fetch ImageNet weights
through timm, which this machine cannot), exports it through anomalib's own deploy API
(``to_openvino`` and ``to_torch``) and opens both inferencers, then prints one JSON line ``{"ready":
[row names], "precision": {...}}``. Then each stdin line ``ROW N`` times N calls of
``inferencer.predict(image)`` on WORKDIR/images (decoded once, RGB uint8 arrays, as a camera hands
them over) and answers one JSON line with the wall milliseconds per call and the process CPU seconds
spent. ``quit`` ends it.

PatchCore's memory bank is random too, of the size anomalib's default coreset ratio (0.1) keeps from
BANK_IMAGES training images of 32x32 layer2 patches: its cost is the kNN search over that bank.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

BANK_IMAGES = 160           # training images behind PatchCore's random bank (ratio 0.1 of 32x32 patches each)


def _images(folder: Path):
    import numpy as np
    from PIL import Image
    paths = sorted(folder.glob("*.png"))
    if not paths:
        raise SystemExit(f"no PNG images in {folder}")
    return [np.asarray(Image.open(p).convert("RGB")) for p in paths]


def _build(kind: str, backbone: str, image_size: int):
    import torch
    if kind == "rd":
        from anomalib.models import ReverseDistillation
        model = ReverseDistillation(backbone=backbone, pre_trained=False,
                                    pre_processor=ReverseDistillation.configure_pre_processor(
                                        image_size=(image_size, image_size)),
                                    evaluator=False, visualizer=False)
    elif kind == "patchcore":
        from anomalib.models import Patchcore
        model = Patchcore(backbone=backbone, pre_trained=False,
                          pre_processor=Patchcore.configure_pre_processor(image_size=(image_size, image_size)),
                          evaluator=False, visualizer=False)
        probe = torch.zeros(1, 3, image_size, image_size)
        with torch.no_grad():
            features = model.model.feature_extractor(probe)
            dims = sum(f.shape[1] for f in features.values())
            side = next(iter(features.values())).shape[-1]
        generator = torch.Generator().manual_seed(0)
        model.model.memory_bank = torch.randn(int(0.1 * BANK_IMAGES * side * side), dims, generator=generator)
    else:
        raise SystemExit(f"unknown anomalib model {kind!r}")
    return model.eval()


def _ov_precision(inferencer) -> str:
    try:
        return str(inferencer.model.get_property("INFERENCE_PRECISION_HINT"))
    except Exception:             # AUTO device: ask the CPU plugin it delegated to
        try:
            import openvino as ov
            return str(ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT")) + " (CPU plugin default)"
        except Exception as exc:
            return f"unknown ({exc})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir", type=Path, help="folder with images/*.png; exports go below it")
    parser.add_argument("--image-size", type=int, default=256, help="model input size (square)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (OpenVINO keeps its default)")
    parser.add_argument("--backbone", default="wide_resnet50_2", help="timm/torchvision backbone of both models")
    parser.add_argument("--models", default="rd,patchcore", help="comma-separated: rd, patchcore")
    args = parser.parse_args()

    import os

    import torch
    torch.set_num_threads(args.threads)
    # TorchInferencer unpickles the whole module; it asks for this switch. The .pt is the one this
    # process exported a moment earlier, so nothing foreign is loaded.
    os.environ.setdefault("TRUST_REMOTE_CODE", "1")
    import anomalib
    from anomalib.deploy import OpenVINOInferencer, TorchInferencer
    # stdout is the answer channel: the exporters' own prints go to stderr.
    with contextlib.redirect_stdout(sys.stderr):
        images = _images(args.workdir / "images")
        inferencers, precision = {}, {}
        for kind in args.models.split(","):
            model = _build(kind, args.backbone, args.image_size)
            root = args.workdir / f"anomalib_{kind}"
            size = (args.image_size, args.image_size)
            # Batch 1, static: anomalib 2.7's dynamo export (torch 2.14) specialised ReverseDistillation's
            # "dynamic" batch to its example size 2 at 256 px, which then refuses single images.
            xml = model.to_openvino(root, input_size=size, onnx_kwargs={"dynamic_axes": {}})
            pt = model.to_torch(root)
            # The deploy defaults: OpenVINOInferencer(path) is device "AUTO" with no config.
            inferencers[f"anomalib {kind} OpenVINOInferencer (default)"] = OpenVINOInferencer(xml)
            precision[f"anomalib {kind} OpenVINOInferencer (default)"] = _ov_precision(
                inferencers[f"anomalib {kind} OpenVINOInferencer (default)"])
            inferencers[f"anomalib {kind} TorchInferencer"] = TorchInferencer(pt, device="cpu")
            precision[f"anomalib {kind} TorchInferencer"] = str(torch.get_default_dtype()).replace("torch.", "")
        for inferencer in inferencers.values():       # warm-up: first calls compile and allocate
            for _ in range(2):
                inferencer.predict(images[0])
    print(json.dumps({"ready": list(inferencers), "precision": precision, "anomalib": anomalib.__version__,
                      "torch": torch.__version__, "images": len(images)}), flush=True)
    position = 0
    for line in sys.stdin:
        words = line.split()
        if not words or words[0] == "quit":
            break
        count = int(words[-1])
        name = " ".join(words[:-1])
        inferencer = inferencers[name]
        times = []
        cpu_start = time.process_time()
        for _ in range(count):
            image = images[position % len(images)]
            position += 1
            start = time.perf_counter()
            inferencer.predict(image)
            times.append((time.perf_counter() - start) * 1e3)
        print(json.dumps({"row": name, "ms": times, "cpu_s": time.process_time() - cpu_start}), flush=True)


if __name__ == "__main__":
    main()
