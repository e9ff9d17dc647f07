"""Measurement shared by every benchmark: timing (warm-up, repeats, median and p90), FLOP counting
and the machine description."""

from __future__ import annotations

import os
import platform
import time
from typing import Callable, Dict, List


def measure(fn: Callable[[], object], warmup: int = 2, repeats: int = 10, min_seconds: float = 0.0) -> Dict[str, float]:
    """Run ``fn`` ``warmup`` times untimed, then at least ``repeats`` times (and ``min_seconds``);
    return median/p90/min in milliseconds and the number of timed runs."""
    for _ in range(warmup):
        fn()
    samples: List[float] = []
    started = time.perf_counter()
    while len(samples) < repeats or time.perf_counter() - started < min_seconds:
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    samples.sort()
    return {
        "median_ms": samples[len(samples) // 2],
        "p90_ms": samples[min(len(samples) - 1, int(round(0.9 * (len(samples) - 1))))],
        "min_ms": samples[0],
        "runs": len(samples),
    }


def gflop_per_image(fn: Callable, image_size: int) -> float:
    """GFLOP (2 × multiply-adds, torch's FlopCounterMode) of ``fn`` on one 1×3×size×size input."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        fn(torch.randn(1, 3, image_size, image_size))
    return counter.get_total_flops() / 1e9


def percentile(values, q: float) -> float:
    values = sorted(values)
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_description() -> Dict[str, object]:
    """CPU model, cores, GPU and library versions: every result file carries it."""
    info: Dict[str, object] = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    for name in ("numpy", "scipy", "cv2", "onnxruntime", "torch", "tensorrt"):
        try:
            module = __import__(name)
            info[name] = getattr(module, "__version__", "?")
        except Exception:
            info[name] = None
    try:
        import torch
        info["torch_threads"] = torch.get_num_threads()
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:
        info["gpu"] = None
    return info
