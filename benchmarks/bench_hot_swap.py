"""The hot swap's cost, in one run: frames per second before, while and after a new model loads
beside the running one, the longest gap between two judged frames, and the process's memory while
two models are held.

    python -m mrkd.benchmarks.bench_hot_swap --checkpoint CKPT [--frames 300] [--work DIR]

CKPT: a --score both checkpoint (e.g. one bench_refit trained). It is exported (v1, the running
model) and refit from a few of the ELPV cells it streams (v2, the bank grown), then a line scores a
folder of ELPV cells in a loop with v1; at frame ``frames // 3`` v2 is moved to v1's path and the
slots reload it (as SIGHUP does). Each judged frame's time is recorded by an observer.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np


def _rss_mb() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run(checkpoint, frames: int = 300, work="/tmp/mrkd_bench_hot_swap", log=print) -> dict:
    import torch

    from mrkd.export.pipeline import export_checkpoint
    from mrkd.runtime.detector import Detector
    from mrkd.runtime.line.loop import Camera, Line, run_line
    from mrkd.runtime.line.swap import ModelSlots
    from mrkd.runtime.outputs.base import LineObserver
    from mrkd.train.checkpoint import load_checkpoint
    from mrkd.train.elpv import read_labels
    from mrkd.train.refit import refit_model
    torch.set_num_threads(1)
    work = Path(work)
    shutil.rmtree(work, ignore_errors=True)
    cells = sorted((c for c in read_labels() if c.module_type == "mono" and c.probability == 0.0),
                   key=lambda c: c.name)[:40]
    folder = work / "cells"
    folder.mkdir(parents=True)
    for cell in cells:
        shutil.copy(cell.path, folder / cell.name)
    v1, v2 = work / "v1", work / "v2"
    export_checkpoint(checkpoint, v1, echo=lambda text: None)
    model = load_checkpoint(checkpoint)
    refit_model(model, [c.path for c in cells[:5]], [c.path for c in cells[5:15]])
    model.save(work / "v2.ckpt")
    export_checkpoint(work / "v2.ckpt", v2, echo=lambda text: None)
    live = v1 / "model.onnx"
    detectors = {str(live.resolve()): Detector(live)}
    slots = ModelSlots(detectors, Detector, status=log)
    times, rss = [], []
    swap_at = frames // 3
    sampling = threading.Event()

    def sample_memory():
        while not sampling.wait(0.05):
            rss.append((time.monotonic(), _rss_mb()))

    class Clock(LineObserver):
        def on_frame(self, result):
            times.append(time.monotonic())
            if len(times) == swap_at:
                for name in ("model.onnx.json", "model.onnx"):
                    shutil.copy(v2 / name, v1 / f".{name}.tmp")
                    os.replace(v1 / f".{name}.tmp", v1 / name)
                marks["requested"] = time.monotonic()
                slots.request_reload("bench")
    marks = {}
    sampler = threading.Thread(target=sample_memory, daemon=True)
    sampler.start()
    rss_before = _rss_mb()
    line = Line((Camera("cam0", str(folder), str(live), loop=True, cooldown=0.0),))
    run_line(line, [Clock(), slots], detectors=detectors, slots=slots, max_frames=frames, status=lambda text: None)
    sampling.set()
    for detector in detectors.values():
        detector.close()
    swap = next(r for r in slots.records if r.outcome == "swapped")
    swapped_at = swap.frames_before
    t = np.asarray(times)
    gaps = np.diff(t)

    def fps(a, b):
        return float((b - a) / (t[b - 1] - t[a])) if b - a > 1 else float("nan")
    loading = [i for i in range(len(t)) if marks["requested"] <= t[i]][:max(1, swapped_at - swap_at)]
    result = {
        "frames": len(times), "swap_requested_at_frame": swap_at, "swapped_before_frame": swapped_at,
        "load_and_check_s": round(swap.load_s, 3),
        "fps_before": round(fps(0, swap_at), 2),
        "fps_while_loading": round(fps(loading[0], swapped_at), 2) if len(loading) > 1 else None,
        "fps_after": round(fps(swapped_at, len(t)), 2),
        "median_gap_ms": round(float(np.median(gaps)) * 1000, 2),
        "longest_gap_ms": round(float(gaps.max()) * 1000, 2),
        "longest_gap_at_frame": int(np.argmax(gaps)) + 1,
        "rss_mb_before": round(rss_before, 1),
        "rss_mb_peak_two_models": round(max(v for _, v in rss), 1) if rss else None,
        "rss_mb_end": round(rss[-1][1], 1) if rss else None,
        "load_avg_1min": os.getloadavg()[0],
    }
    return result


def main(argv=None) -> None:
    import argparse
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a --score both checkpoint")
    parser.add_argument("--frames", type=int, default=300, help="frames the line judges")
    parser.add_argument("--work", default="/tmp/mrkd_bench_hot_swap", help="scratch folder (emptied)")
    args = parser.parse_args(argv)
    print(json.dumps(run(args.checkpoint, args.frames, args.work), indent=2))


if __name__ == "__main__":
    main()
