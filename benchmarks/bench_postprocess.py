"""Post-processing speed: cpp_ext (C++/OpenMP, CUDA) against the scipy pipeline and PyTorch ops.

For output 256 and 512 px and batches 1..32, three scales at 1/4, 1/8, 1/16 (MRKD's layout) and
sigma 4, all in this process:
  * official - the official evaluation's steps, per image (benchmarks/baseline_pipeline.py):
              torch F.interpolate(align_corners=True) per scale on --threads threads (default 2),
              numpy sum, scipy ndimage.gaussian_filter(sigma=4), max; the goal is cpp >= 10x this
              at batch 1; also with torch on one thread against cpp on one thread (what load on a
              shared machine distorts least);
  * scipy   - the same in scipy alone, per image: ndimage.zoom(order=1) (= align_corners=True) per
              scale, sum, ndimage.gaussian_filter(sigma=4), max;
  * torch   - F.interpolate(align_corners=True) + separable Gaussian conv2d over symmetric
              ('reflect' in scipy's sense) padding, amax; all threads and one thread;
  * cpp     - mrkd.runtime.postprocess.anomaly_map(impl="cpu"), all cores and one thread.
With a GPU also the CUDA kernels against the same torch ops on the GPU, and the bytes the kernels
move against the bandwidth of a device-to-device copy measured here.

    python -m mrkd.benchmarks.bench_postprocess [--quick]
"""

from __future__ import annotations

import json
import os
import sys
from typing import Dict, List

import numpy as np

from mrkd.benchmarks.timing import measure
from mrkd.runtime import postprocess as pp

SIGMA = 4.0
SCALE_FACTORS = (4, 8, 16)


def per_scale_maps(batch: int, size: int, seed: int = 0) -> List[np.ndarray]:
    """Random float32 maps in [0, 1) at 1/4, 1/8, 1/16 of `size` (like 1 - cosine similarity)."""
    rng = np.random.default_rng(seed)
    return [rng.random((batch, size // f, size // f), dtype=np.float32) for f in SCALE_FACTORS]


def scipy_pipeline(per_scale: List[np.ndarray], size: int):
    """The official evaluation's post-processing, one image at a time."""
    from scipy import ndimage

    maps, scores = [], []
    for i in range(per_scale[0].shape[0]):
        total = sum(ndimage.zoom(m[i], (size / m.shape[1], size / m.shape[2]), order=1) for m in per_scale)
        smoothed = ndimage.gaussian_filter(total, sigma=SIGMA, mode="reflect", truncate=4.0)
        maps.append(smoothed)
        scores.append(smoothed.max())
    return np.stack(maps), np.array(scores)


def torch_pipeline(torch, per_scale, size: int, weights):
    """Batched PyTorch ops: interpolate + sum, symmetric padding by index tables, separable conv2d."""
    F = torch.nn.functional
    total = sum(F.interpolate(m[:, None], size=(size, size), mode="bilinear", align_corners=True)
                for m in per_scale)
    radius = weights.numel() // 2
    index = torch.as_tensor(pp._reflected_indices(size, radius), device=total.device)
    padded = total.index_select(3, index).index_select(2, index)
    smoothed = F.conv2d(F.conv2d(padded, weights.view(1, 1, 1, -1)), weights.view(1, 1, -1, 1))[:, 0]
    return smoothed, smoothed.amax(dim=(1, 2))


def _gpu_section(torch, sizes, batches, repeats) -> Dict[str, object]:
    """CUDA kernels vs torch CUDA ops, and achieved bandwidth vs a measured copy bandwidth."""
    weights = torch.as_tensor(pp.gaussian_kernel1d(SIGMA), dtype=torch.float32, device="cuda")
    probe = torch.empty(256 * 2 ** 20 // 4, device="cuda")
    copy = measure(lambda: (probe.clone(), torch.cuda.synchronize()), repeats=repeats)
    copy_bw = 2 * probe.numel() * 4 / (copy["median_ms"] / 1e3)  # read + write
    rows = []
    for size in sizes:
        for batch in batches:
            host = per_scale_maps(batch, size)
            dev = [torch.from_numpy(m).cuda() for m in host]
            cuda = measure(lambda: (pp.anomaly_map(dev, size, SIGMA, impl="cuda"), torch.cuda.synchronize()),
                           repeats=repeats)
            ops = measure(lambda: (torch_pipeline(torch, dev, size, weights), torch.cuda.synchronize()),
                          repeats=repeats)
            maps, scores = pp.anomaly_map(dev, size, SIGMA, impl="cuda")
            cpu_maps, _ = pp.anomaly_map(host, size, SIGMA, impl="cpu")
            # inputs once, workspace written and read, maps written, scores negligible
            moved = sum(m.nbytes for m in host) + 3 * batch * size * size * 4
            seconds = cuda["median_ms"] / 1e3
            rows.append({
                "size": size, "batch": batch, "cuda_ms": cuda["median_ms"], "torch_cuda_ms": ops["median_ms"],
                "speedup_vs_torch_cuda": ops["median_ms"] / cuda["median_ms"],
                "bytes_moved": moved, "achieved_GBps": moved / seconds / 1e9,
                "fraction_of_copy_bandwidth": moved / seconds / copy_bw,
                "max_abs_diff_vs_cpu": float(np.abs(maps.cpu().numpy() - cpu_maps).max()),
            })
    return {"device": torch.cuda.get_device_name(0), "copy_bandwidth_GBps": copy_bw / 1e9, "rows": rows}


def official_pipeline(torch, per_scale, size: int):
    """The official evaluation's post-processing (torch upsampling, scipy smoothing), one image at a time."""
    from mrkd.benchmarks.baseline_pipeline import official_style_postprocess

    maps, scores = [], []
    with torch.inference_mode():
        for i in range(per_scale[0].shape[0]):
            smoothed, score = official_style_postprocess([m[i:i + 1, None] for m in per_scale], size, SIGMA)
            maps.append(smoothed)
            scores.append(score)
    return np.stack(maps), np.array(scores)


def run(quick: bool = False, threads: int = 2) -> dict:
    """Time cpp and torch (all cores and 1 thread), scipy and the official path (torch on `threads`
    threads) per batch and size; ratios against them; a GPU section when CUDA works. Times are
    medians per call (whole batch), ms; batch 1 gets more repeats (its calls are sub-millisecond)."""
    torch = None
    try:
        import torch  # noqa: F811 - optional: the torch rows are skipped without it
    except ImportError:
        pass
    sizes = (256,) if quick else (256, 512)
    batches = (1, 4) if quick else (1, 2, 4, 8, 16, 32)
    repeats = 2 if quick else 5
    cpu_module = pp._load("cpu")[0]
    if cpu_module is None:
        return {"error": "the C++ extension is not compiled: " + pp._load("cpu")[1]}
    weights = torch.as_tensor(pp.gaussian_kernel1d(SIGMA), dtype=torch.float32) if torch else None
    load_before = os.getloadavg()[0]
    rows = []
    for size in sizes:
        for batch in batches:
            host = per_scale_maps(batch, size)
            reps = repeats * 10 if batch == 1 else repeats
            cpp = measure(lambda: pp.anomaly_map(host, size, SIGMA, impl="cpu"), warmup=1, repeats=reps)
            cpp1 = measure(lambda: pp.anomaly_map(host, size, SIGMA, impl="cpu", threads=1), warmup=1,
                           repeats=reps)
            scipy_t = measure(lambda: scipy_pipeline(host, size), warmup=1, repeats=max(2, repeats // 2))
            maps, scores = pp.anomaly_map(host, size, SIGMA, impl="cpu")
            ref_maps, ref_scores = scipy_pipeline(host, size)
            row = {
                "size": size, "batch": batch,
                "cpp_ms": cpp["median_ms"], "cpp_1thread_ms": cpp1["median_ms"], "scipy_ms": scipy_t["median_ms"],
                "speedup_vs_scipy": scipy_t["median_ms"] / cpp["median_ms"],
                "speedup_1thread_vs_scipy": scipy_t["median_ms"] / cpp1["median_ms"],
                "max_abs_diff_vs_scipy": float(np.abs(maps - ref_maps).max()),
            }
            if torch is not None:
                dev = [torch.from_numpy(m) for m in host]
                all_threads = torch.get_num_threads()
                torch.set_num_threads(threads)
                official = measure(lambda: official_pipeline(torch, dev, size), warmup=1, repeats=reps)
                official_maps, _ = official_pipeline(torch, dev, size)
                # on a loaded machine a second torch thread can cost 10-50x: the 1-thread official
                # path against cpp on 1 thread is the comparison load distorts least
                torch.set_num_threads(1)
                official1 = measure(lambda: official_pipeline(torch, dev, size), warmup=1, repeats=reps)
                torch.set_num_threads(all_threads)
                row.update({"official_ms": official["median_ms"], "official_1thread_ms": official1["median_ms"],
                            "speedup_vs_official": official["median_ms"] / cpp["median_ms"],
                            "speedup_1thread_vs_official_1thread": official1["median_ms"] / cpp1["median_ms"],
                            "official_max_abs_diff_vs_scipy": float(np.abs(official_maps - ref_maps).max())})
                with torch.inference_mode():
                    ops = measure(lambda: torch_pipeline(torch, dev, size, weights), warmup=1, repeats=repeats)
                    torch.set_num_threads(1)
                    ops1 = measure(lambda: torch_pipeline(torch, dev, size, weights), warmup=1, repeats=repeats)
                    torch.set_num_threads(all_threads)
                    torch_maps, _ = torch_pipeline(torch, dev, size, weights)
                row.update({"torch_ms": ops["median_ms"], "torch_1thread_ms": ops1["median_ms"],
                            "speedup_vs_torch": ops["median_ms"] / cpp["median_ms"],
                            "speedup_1thread_vs_torch_1thread": ops1["median_ms"] / cpp1["median_ms"],
                            "torch_max_abs_diff_vs_scipy": float(np.abs(torch_maps.numpy() - ref_maps).max())})
            rows.append(row)
    speedups_1thread = [r["speedup_1thread_vs_scipy"] for r in rows]
    result = {
        # other work on the machine distorts multi-threaded times most: the load is reported, and
        # the single-threaded ratios (scipy is single-threaded too) are the robust comparison
        "load_average_before_after": [load_before, os.getloadavg()[0]],
        "min_speedup_1thread_vs_scipy": min(speedups_1thread),
        "median_speedup_1thread_vs_scipy": float(np.median(speedups_1thread)),
        "sigma": SIGMA, "scales": [f"1/{f}" for f in SCALE_FACTORS], "cpp_threads": cpu_module.max_threads(),
        "torch_threads": torch.get_num_threads() if torch else None, "rows": rows,
        "min_speedup_vs_scipy": min(r["speedup_vs_scipy"] for r in rows),
        "median_speedup_vs_scipy": float(np.median([r["speedup_vs_scipy"] for r in rows])),
        "goal_speedup_vs_scipy": 10.0,
    }
    if torch is not None:
        batch1 = [r["speedup_vs_official"] for r in rows if r["batch"] == 1]
        batch1_1thread = [r["speedup_1thread_vs_official_1thread"] for r in rows if r["batch"] == 1]
        result.update({"official_torch_threads": threads, "min_batch1_speedup_vs_official": min(batch1),
                       "min_batch1_speedup_1thread_vs_official_1thread": min(batch1_1thread),
                       "goal_batch1_speedup_vs_official": 10.0})
    if "cuda" in pp.available_impls() and torch is not None and torch.cuda.is_available():
        result["gpu"] = _gpu_section(torch, sizes, batches, repeats)
    else:
        result["gpu"] = {"skipped": "no usable CUDA device (or no torch.cuda to hold device buffers)"}
    return result


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv[1:]), indent=2))
