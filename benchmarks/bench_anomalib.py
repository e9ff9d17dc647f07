"""Peer benchmark: anomalib 2.7 against mrkd on the same CPU, images, input size and threads (batch 1).

anomalib runs in its own virtual environment (scripts/setup_anomalib_venv.sh; the bench uses
$MRKD_ANOMALIB_PYTHON, else /work/anomalib-venv/bin/python) as a child process driven line by line
(benchmarks/anomalib_side.py); mrkd runs in this process. The two are alternated round by round:
in each round every row judges FRAMES_PER_ROUND images, so load on a shared machine falls on every
row alike.

Rows (random weights on both sides: speed only):
* anomalib ReverseDistillation and PatchCore with its default WideResNet50-2 backbone, each through its
  two deploy paths: ``OpenVINOInferencer(model.xml)`` (its default: device AUTO, OpenVINO's default
  precision, which is bf16 on a CPU with native bf16) and ``TorchInferencer``; PatchCore with a random
  memory bank of the size its default coreset ratio keeps (see anomalib_side.BANK_IMAGES).
* mrkd's ``Detector`` on the default export (the default teacher, mrkd.train.DEFAULT_BACKBONE, with
  ``--score both``: MRKD plus the kNN memory bank at the trainer's cap, fitted on the same synthetic
  training images, threshold calibrated on their scores, bf16 checked on them as ``mrkd export
  --check-images`` does) with ``--backend auto`` (what `mrkd run` picks: OpenVINO on x86, bf16 where the
  check passed), with ONNX Runtime FP32, and its INT8 graph (``--int8``, the cpu form the export picks
  without TensorRT).
* The same export with anomalib's backbone as our teacher (same-network rows): ``--backend auto``,
  OpenVINO bf16 where the CPU has it, and the INT8 graph.
* ``mrkd run`` end to end on the default export (folder source, decode, model, alarm rule, events) in
  frames/s.

Per row: median and p90 ms per image from the decoded image to the anomaly map and score, frames/s,
CPU seconds per image (the timing process's CPU time: both sides are single processes), precision.

    python -m mrkd.benchmarks.bench_anomalib [--quick] [--rounds N]      (mrkd bench --only anomalib)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from mrkd.benchmarks.timing import percentile

DEFAULT_VENV_PYTHON = "/work/anomalib-venv/bin/python"
FRAMES_PER_ROUND = 4
DEFAULT_ROW = "mrkd default export, --backend auto"
SETUP_HINT = "bash scripts/setup_anomalib_venv.sh (anomalib 2.7 in a venv of its own)"


def anomalib_python() -> Optional[str]:
    """The anomalib venv's interpreter, or None when it is not set up (the bench then says how)."""
    path = os.environ.get("MRKD_ANOMALIB_PYTHON") or DEFAULT_VENV_PYTHON
    if not Path(path).is_file():
        return None
    probe = subprocess.run([path, "-c", "import anomalib, openvino"], capture_output=True, timeout=120)
    return path if probe.returncode == 0 else None


class AnomalibSide:
    """The anomalib child process (benchmarks/anomalib_side.py)."""

    def __init__(self, python: str, workdir: Path, image_size: int, threads: int, backbone: str):
        self.log = open(workdir / "anomalib_side.log", "w")
        self.process = subprocess.Popen(
            [python, str(Path(__file__).with_name("anomalib_side.py")), str(workdir), "--image-size", str(image_size),
             "--threads", str(threads), "--backbone", backbone],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, cwd=workdir)
        hello = self._answer()
        self.rows: List[str] = hello["ready"]
        self.precision: Dict[str, str] = hello["precision"]
        self.version = hello["anomalib"]

    def _answer(self) -> dict:
        while True:
            line = self.process.stdout.readline()
            if not line:
                self.log.flush()
                tail = Path(self.log.name).read_text()[-1500:]
                raise RuntimeError(f"anomalib side ended without an answer; its log ends:\n{tail}")
            if line.startswith("{"):     # a library's stray print on stdout is not an answer
                return json.loads(line)

    def run(self, row: str, count: int) -> dict:
        self.process.stdin.write(f"{row} {count}\n")
        self.process.stdin.flush()
        return self._answer()

    def close(self) -> None:
        try:
            self.process.stdin.write("quit\n")
            self.process.stdin.flush()
            self.process.wait(timeout=30)
        except Exception:
            self.process.kill()
        self.log.close()


def _images(folder: Path, out: Path, image_size: int) -> List[Path]:
    """The synthetic category's test images at the model size (anomalib's exported graph takes its
    input size only), written once as PNG for both sides."""
    import cv2

    from mrkd.runtime.images import list_images, read_image
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, path in enumerate(list_images(folder, recursive=True)):
        image = cv2.resize(read_image(path), (image_size, image_size), interpolation=cv2.INTER_AREA)
        target = out / f"{i:03d}.png"
        cv2.imwrite(str(target), image)
        paths.append(target)
    return paths


def _default_export(backbone: str, image_size: int, train: List[str], workdir: Path, int8: bool) -> Dict[str, Path]:
    """`mrkd train` --score both's graph with random weights: the memory bank fitted on ``train``, the
    threshold calibrated on their scores as training does, then exported as `mrkd export --check-images`
    does, so that `--backend auto` runs what it runs for a user (bf16 where the check passes)."""
    from mrkd.benchmarks.bench_quality import _batches
    from mrkd.export.exporter import export_onnx
    from mrkd.export.int8 import quantize_int8
    from mrkd.export.onnx_graph import ExportOptions
    from mrkd.export.precision_check import check_bf16
    from mrkd.runtime.calibration import calibration_from_scores
    from mrkd.train import build_model
    from mrkd.train.memory_bank import fit_memory_bank
    from mrkd.train.trainer import TrainConfig
    import torch
    torch.manual_seed(0)
    model = build_model(backbone, "random", image_size=image_size).eval()
    config = TrainConfig()
    fit_memory_bank(model, train, config.score, max_patches=config.knn_max_patches, progress=False)
    with torch.no_grad():
        scores = torch.cat([model.scores(x) for x in _batches(train, model.config)])
    model.calibration = calibration_from_scores(scores.numpy())
    folder = workdir / backbone
    folder.mkdir()
    exported = export_onnx(model, folder / "model.onnx", ExportOptions(), simplify="never")
    check_bf16(exported.path, exported.metadata, Path(train[0]).parent, echo=lambda line: print(line, file=sys.stderr))
    graphs = {"fp32": exported.path}
    if int8:
        graphs["int8"] = quantize_int8(graphs["fp32"], folder / "model_int8.onnx", Path(train[0]).parent,
                                       limit=8, target="cpu").path
    return graphs


def _mrkd_run_fps(model: Path, folder: Path, frames: int, threads: int) -> dict:
    """`mrkd run` over the image folder (replayed as fast as it is judged), frames/s from its summary."""
    import resource
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "mrkd.cli", "run", str(model), "--source", str(folder), "--loop",
                           "--max-frames", str(frames), "--backend", "auto", "--threads", str(threads)],
                          capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    summary = json.loads(done.stdout[done.stdout.index("{"):])
    judged = sum(c["frames"] for c in summary["cameras"].values())
    return {"frames": judged, "wall_s": round(wall, 2), "frames_per_s_incl_start": round(judged / wall, 2),
            "cpu_s_per_frame_incl_start": round(cpu / max(judged, 1), 4)}


def run(quick: bool = False, image_size: Optional[int] = None, threads: int = 2, rounds: int = 0,
        backbone: Optional[str] = None) -> dict:
    """``backbone``: anomalib's (both its models) and the teacher of our same-network rows; not given:
    wide_resnet50_2 at 256 px (resnet18 at 64 px, also for our default row, when ``quick``)."""
    import torch

    from mrkd.benchmarks.bench_model import bench_data
    from mrkd.benchmarks.timing import machine_description
    from mrkd.runtime.backends import backend_entry
    from mrkd.runtime.detector import Detector
    from mrkd.runtime.images import list_images, read_image
    from mrkd.train import DEFAULT_BACKBONE
    python = anomalib_python()
    if python is None:
        return {"bench": "anomalib", "skipped": f"anomalib is not set up: {SETUP_HINT}, or set MRKD_ANOMALIB_PYTHON"}
    default_backbone = "resnet18" if quick else DEFAULT_BACKBONE
    backbone = backbone or ("resnet18" if quick else "wide_resnet50_2")
    image_size = image_size or (64 if quick else 256)
    same_row = f"mrkd {backbone} teacher (anomalib's), --backend auto"
    rounds = rounds or (2 if quick else 12)
    torch.set_num_threads(threads)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        category = bench_data(image_size, workdir, quick)
        paths = _images(category / "test", workdir / "images", image_size)
        frames = [read_image(p) for p in paths]
        train = [str(p) for p in list_images(category / "train" / "good")]
        side = AnomalibSide(python, workdir, image_size, threads, backbone)
        try:
            exports: Dict[str, Dict[str, Path]] = {}
            for name in dict.fromkeys((default_backbone, backbone)):   # once when both sides use one
                exports[name] = _default_export(name, image_size, train, workdir, int8=True)
            ours, same = exports[default_backbone], exports[backbone]
            plan = [(DEFAULT_ROW, ours["fp32"], "auto"),
                    ("mrkd default export, onnxruntime FP32", ours["fp32"], "onnxruntime"),
                    ("mrkd default export --int8 (cpu form), --backend auto", ours["int8"], "auto"),
                    (same_row, same["fp32"], "auto"),
                    (f"mrkd {backbone} teacher, openvino bf16", same["fp32"], "openvino:bf16"),
                    (f"mrkd {backbone} teacher --int8 (cpu form), --backend auto", same["int8"], "auto")]
            detectors, precision, errors = {}, {}, {}
            for label, graph, spec in plan:
                if spec.startswith("openvino") and not backend_entry("openvino").available():
                    errors[label] = "openvino not installed (pip install 'mrkd[openvino]')"
                    continue
                try:
                    detectors[label] = Detector(graph, backend=spec, threads=threads)
                    precision[label] = f"{detectors[label].backend.name} {detectors[label].precision}"
                except Exception as exc:     # e.g. bf16 on a CPU without it: reported, not hidden
                    errors[label] = f"{type(exc).__name__}: {exc}"
            for detector in detectors.values():
                detector(frames[0])
                detector(frames[0])
            times: Dict[str, List[float]] = {row: [] for row in [*side.rows, *detectors]}
            cpu: Dict[str, float] = dict.fromkeys(times, 0.0)
            position = 0
            for _ in range(rounds):
                for row in side.rows:
                    answer = side.run(row, FRAMES_PER_ROUND)
                    times[row] += answer["ms"]
                    cpu[row] += answer["cpu_s"]
                for label, detector in detectors.items():
                    cpu_start = time.process_time()
                    for _ in range(FRAMES_PER_ROUND):
                        frame = frames[position % len(frames)]
                        position += 1
                        start = time.perf_counter()
                        detector(frame)
                        times[label].append((time.perf_counter() - start) * 1e3)
                    cpu[label] += time.process_time() - cpu_start
            for detector in detectors.values():
                detector.close()
        finally:
            side.close()
        end_to_end = _mrkd_run_fps(ours["fp32"], workdir / "images", 16 if quick else 120, threads)
    rows = []
    for row, values in times.items():
        median = float(np.median(values))
        rows.append({"row": row, "precision": side.precision.get(row) or precision.get(row), "median_ms": round(median, 2),
                     "p90_ms": round(percentile(values, 90), 2), "frames_per_s": round(1000.0 / median, 2),
                     "cpu_s_per_frame": round(cpu[row] / len(values), 4), "frames": len(values)})
    rows += [{"row": label, "error": text} for label, text in errors.items()]
    by_name = {r["row"]: r for r in rows if "median_ms" in r}
    anomalib_default = by_name.get("anomalib rd OpenVINOInferencer (default)")
    goal = {}
    # Issue 24's goal: our default >= 2x faster than anomalib's default, asked two ways: default against
    # default (our default teacher), and with anomalib's backbone as our teacher (the same network size).
    for name, row in (("default", DEFAULT_ROW), ("same_backbone", same_row)):
        ours_default = by_name.get(row)
        if anomalib_default and ours_default:
            ratio = anomalib_default["median_ms"] / ours_default["median_ms"]
            goal[name] = {"row": row, "anomalib_default_over_ours": round(ratio, 3), "goal_2x_faster_met": ratio >= 2.0}
    return {"bench": "anomalib", "anomalib": side.version, "backbone": backbone, "default_backbone": default_backbone,
            "image_size": image_size,
            "threads": threads, "rounds": rounds, "frames_per_round": FRAMES_PER_ROUND, "weights": "random (speed only)",
            "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in os.getloadavg()],
            "machine": machine_description(), "rows": rows, "mrkd_run_end_to_end": end_to_end,
            "default_vs_default": goal or None}


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny models (resnet18, 64 px), two rounds: a smoke run")
    parser.add_argument("--rounds", type=int, default=0, help="alternation rounds (default 12; 2 with --quick)")
    parser.add_argument("--image-size", type=int, default=None, help="input size of both sides (square; default 256, 64 with --quick)")
    parser.add_argument("--threads", type=int, default=2, help="threads of both sides")
    args = parser.parse_args()
    json.dump(run(args.quick, args.image_size, args.threads, args.rounds), sys.stdout, indent=2)
    print()
