"""MRKD anomaly-map post-processing: per-scale maps -> full-size anomaly maps and image scores.

The official protocol, per image: upsample every scale's map (1 - cosine similarity at feature
resolution) bilinearly with align_corners=True to H x W, sum over scales, smooth with a Gaussian
with scipy.ndimage.gaussian_filter semantics (truncate 4.0, radius int(4*sigma + 0.5), 'reflect'
border = symmetric, the edge pixel repeated), and take the maximum as the image score.

Three implementations compute the same thing:
  "cuda"  - cpp_ext's CUDA kernels on device buffers (CuPy, torch.cuda, pycuda or raw pointers),
  "cpu"   - cpp_ext's C++ code on numpy arrays (threads chosen by the work's size, helpers that
            sleep between calls: it stays fast on cores shared with other programs),
  "numpy" - the slow, readable reference below (numpy only).
"auto" picks cuda for device inputs when it works, else cpu when compiled, else numpy.
This module never imports torch.
"""

from __future__ import annotations

import functools
import importlib
import logging
import math
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from mrkd import deps

logger = logging.getLogger(__name__)

IMPLS = ("cuda", "cpu", "numpy")
TRUNCATE = 4.0

Size = Union[int, Tuple[int, int], Sequence[int]]

_modules: dict = {}       # "cpu"/"cuda" -> (module or None, reason it is unusable or "")
_announced: set = set()   # impls already reported in the log
_last_impl: Optional[str] = None


# ---------------------------------------------------------------- Gaussian kernel (all impls)

def gaussian_radius(sigma: float, truncate: float = TRUNCATE) -> int:
    """Kernel radius as scipy.ndimage.gaussian_filter computes it: int(truncate * sigma + 0.5)."""
    return int(truncate * float(sigma) + 0.5)


def gaussian_kernel1d(sigma: float, truncate: float = TRUNCATE) -> np.ndarray:
    """Normalised 1-D Gaussian taps (float64, length 2*radius+1), scipy's gaussian_filter weights.

    A sigma of (almost) zero gives the identity kernel [1.0], as scipy skips such axes.
    """
    return _cached_kernel1d(float(sigma), float(truncate)).copy()


@functools.lru_cache(maxsize=64)
def _cached_kernel1d(sigma: float, truncate: float) -> np.ndarray:
    """gaussian_kernel1d, computed once per (sigma, truncate) and read-only: every frame's
    anomaly_map call asks for the same taps (a few microseconds each time otherwise)."""
    if not math.isfinite(sigma) or sigma < 0:
        raise ValueError(f"sigma must be a finite number >= 0, got {sigma}")
    if sigma <= 1e-15:
        identity = np.ones(1)
        identity.flags.writeable = False
        return identity
    radius = gaussian_radius(sigma, truncate)
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    taps = np.exp(-0.5 * (offsets / sigma) ** 2)
    taps /= taps.sum()
    taps.flags.writeable = False
    return taps


# ---------------------------------------------------------------- numpy reference

def _reflected_indices(n: int, radius: int) -> np.ndarray:
    """Indices into a length-n axis for positions -radius .. n-1+radius, scipy 'reflect' border
    (symmetric, periodic with 2n, so offsets beyond one image length reflect again)."""
    positions = np.arange(-radius, n + radius)
    if n == 1:
        return np.zeros_like(positions)
    period = 2 * n
    positions %= period
    return np.where(positions < n, positions, period - 1 - positions)


def _linear_taps(out_size: int, in_size: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """align_corners=True sampling along one axis: (i0, i1, w1) with value = (1-w1)*v[i0] + w1*v[i1]."""
    scale = np.float32((in_size - 1) / (out_size - 1)) if out_size > 1 else np.float32(0)
    src = np.arange(out_size, dtype=np.float32) * scale
    i0 = np.minimum(src.astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    return i0, i1, (src - i0).astype(np.float64)


def _upsample_align_corners(maps: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear N x h x w -> N x H x W (float64), along columns then rows."""
    x0, x1, wx = _linear_taps(width, maps.shape[2])
    y0, y1, wy = _linear_taps(height, maps.shape[1])
    maps = maps.astype(np.float64)
    cols = maps[:, :, x0] * (1 - wx) + maps[:, :, x1] * wx
    return cols[:, y0, :] * (1 - wy)[:, None] + cols[:, y1, :] * wy[:, None]


def _correlate_reflect(x: np.ndarray, weights: np.ndarray, axis: int) -> np.ndarray:
    """1-D correlation along `axis` with scipy's 'reflect' border."""
    radius = len(weights) // 2
    n = x.shape[axis]
    padded = np.take(x, _reflected_indices(n, radius), axis=axis)
    out = np.zeros_like(x)
    for k, weight in enumerate(weights):
        out += weight * np.take(padded, np.arange(k, k + n), axis=axis)
    return out


def _anomaly_map_numpy(maps: List[np.ndarray], height: int, width: int,
                       weights: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    total = sum(_upsample_align_corners(m, height, width) for m in maps)
    smoothed = _correlate_reflect(_correlate_reflect(total, weights, axis=2), weights, axis=1)
    smoothed = smoothed.astype(np.float32)
    return smoothed, smoothed.max(axis=(1, 2))


# ---------------------------------------------------------------- implementations available

def _load(name: str) -> Tuple[Any, str]:
    """The compiled module for "cpu" or "cuda" and "", or None and why it is unusable."""
    if name not in _modules:
        try:
            module = importlib.import_module(f"mrkd.runtime._postprocess_{name}")
            reason = ""
            if name == "cuda" and module.device_count() == 0:
                module, reason = None, "the CUDA extension is built but no CUDA device is usable"
        except ImportError as exc:
            module = None
            reason = (f"the {name.upper()} extension is not compiled ({exc}); rebuild with "
                      "`pip install -e . --no-deps --no-build-isolation`"
                      + (" on a machine with nvcc" if name == "cuda" else ""))
        _modules[name] = (module, reason)
    return _modules[name]


def available_impls() -> List[str]:
    """Implementations usable in this process, best first (numpy is always there)."""
    return [name for name in ("cuda", "cpu") if _load(name)[0] is not None] + ["numpy"]


def resolve_impl(impl: str = "auto", on_device: bool = False) -> str:
    """The implementation `anomaly_map` would use for `impl` with host or device inputs.

    Raises ValueError for an unknown name or "cuda" with host inputs, RuntimeError when the named
    implementation is not usable here (the message says why).
    """
    if impl == "auto":
        if on_device and _load("cuda")[0] is not None:
            return "cuda"
        return "cpu" if _load("cpu")[0] is not None else "numpy"
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of auto, {', '.join(IMPLS)}; got {impl!r}")
    if impl == "cuda" and not on_device:
        raise ValueError("impl='cuda' needs device inputs (objects with __cuda_array_interface__: CuPy, "
                         "torch.cuda, pycuda); got host arrays: use impl='cpu' or upload them first")
    if impl != "numpy":
        module, reason = _load(impl)
        if module is None:
            raise RuntimeError(f"post-processing impl={impl!r} is unavailable: {reason}")
    return impl


def last_impl() -> Optional[str]:
    """The implementation the latest `anomaly_map` call used (None before the first call)."""
    return _last_impl


def _record(impl: str) -> None:
    global _last_impl
    _last_impl = impl
    if impl not in _announced:
        _announced.add(impl)
        reasons = {name: _load(name)[1] for name in ("cuda", "cpu")}
        unused = "; ".join(f"{n}: {r}" for n, r in reasons.items() if r and n != impl)
        logger.info("anomaly-map post-processing uses impl=%s%s", impl, f" ({unused})" if unused else "")


# ---------------------------------------------------------------- input checks

def _output_size(size: Size) -> Tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        size = (int(size), int(size))
    try:
        height, width = (int(s) for s in size)
    except (TypeError, ValueError):
        raise ValueError(f"size must be an int or (H, W), got {size!r}") from None
    if height < 1 or width < 1:
        raise ValueError(f"size must be positive, got {(height, width)}")
    return height, width


def _spatial_shape(shape: Tuple[int, ...], index: int) -> Tuple[int, int, int]:
    """(N, h, w) from N x h x w or N x 1 x h x w (the model's NCHW output)."""
    if len(shape) == 4 and shape[1] == 1:
        shape = (shape[0], shape[2], shape[3])
    if len(shape) != 3:
        raise ValueError(f"per_scale[{index}] must be N x h x w (or N x 1 x h x w), got shape {tuple(shape)}")
    if shape[1] < 1 or shape[2] < 1:
        raise ValueError(f"per_scale[{index}] has an empty spatial size: shape {tuple(shape)}")
    return tuple(int(s) for s in shape)


def _check_batches(shapes: List[Tuple[int, int, int]]) -> int:
    batch = shapes[0][0]
    for i, shape in enumerate(shapes):
        if shape[0] != batch:
            raise ValueError(f"per_scale[{i}] has batch size {shape[0]} but per_scale[0] has {batch} "
                             f"(shapes: {[tuple(s) for s in shapes]})")
    return batch


def _host_maps(per_scale: Sequence[Any]) -> List[np.ndarray]:
    """Contiguous float32 N x h x w numpy arrays; device arrays are copied to the host."""
    maps = []
    for i, m in enumerate(per_scale):
        if type(m) is np.ndarray and m.dtype == np.float32 and m.ndim == 3 and m.flags.c_contiguous \
                and m.shape[1] > 0 and m.shape[2] > 0:
            maps.append(m)  # the runtime's usual input: taken as it is (a per-frame fast path)
            continue
        if hasattr(m, "__cuda_array_interface__"):
            m = m.get() if hasattr(m, "get") else m.detach().cpu().numpy()  # CuPy/pycuda, torch
        m = np.asarray(m)
        if not np.issubdtype(m.dtype, np.floating):
            raise TypeError(f"per_scale[{i}] has dtype {m.dtype}; anomaly maps must be floating point "
                            "(float32 preferred)")
        shape = _spatial_shape(m.shape, i)
        maps.append(np.ascontiguousarray(m.reshape(shape), dtype=np.float32))
    _check_batches([m.shape for m in maps])
    return maps


def _device_view(m: Any, index: int) -> Tuple[int, Tuple[int, int, int]]:
    """(device pointer, (N, h, w)) of a C-contiguous float32 device array."""
    iface = m.__cuda_array_interface__
    if np.dtype(iface["typestr"]) != np.float32:
        raise TypeError(f"per_scale[{index}] is {np.dtype(iface['typestr'])} on the device; the CUDA "
                        "post-processing needs float32 (convert with .astype(float32) / .float())")
    shape = tuple(iface["shape"])
    strides = iface.get("strides")
    if strides is not None and tuple(strides) != tuple(int(np.prod(shape[d + 1:])) * 4 for d in range(len(shape))):
        raise ValueError(f"per_scale[{index}] is not C-contiguous on the device (strides {strides}); "
                         "make it contiguous first")
    return int(iface["data"][0]), _spatial_shape(shape, index)


def _device_empty(like: Any, shape: Tuple[int, ...]) -> Any:
    """A float32 device array of `shape` from the library that made `like` (torch, CuPy, pycuda)."""
    module = type(like).__module__.split(".")[0]
    if hasattr(like, "new_empty"):  # torch: allocate through the tensor, without importing torch here
        return like.new_empty(shape)
    if module == "cupy":
        cupy = deps.require("cupy")
        with cupy.cuda.Device(like.device.id):
            return cupy.empty(shape, dtype=np.float32)
    if module == "pycuda":
        return deps.require("pycuda.gpuarray").empty(shape, np.float32)
    raise TypeError(f"cannot allocate outputs like {type(like).__name__}; call anomaly_map_device() with "
                    "your own output buffers")


def _current_stream(like: Any) -> int:
    """The stream the input's library is working on (so results are ordered after its kernels)."""
    module = type(like).__module__.split(".")[0]
    if module == "cupy":
        return int(deps.require("cupy").cuda.get_current_stream().ptr)
    if module == "torch":  # already imported by whoever made the tensor
        return int(sys.modules["torch"].cuda.current_stream(like.device).cuda_stream)
    return 0


# ---------------------------------------------------------------- public entry points

def anomaly_map_device(ptrs: Sequence[int], shapes: Sequence[Tuple[int, int]], n: int, height: int, width: int,
                       sigma: float, out_map_ptr: int, out_score_ptr: int, stream: int = 0,
                       workspace_ptr: int = 0) -> None:
    """Enqueue the CUDA post-processing on raw device pointers (pycuda, cuda-python, CuPy, torch).

    ptrs: C-contiguous float32 N x h x w maps, shapes their (h, w); out_map_ptr: N x H x W float32;
    out_score_ptr: N float32; workspace_ptr: N*H*W float32 scratch or 0 (allocated stream-ordered).
    Asynchronous on `stream` (a cudaStream_t as int, 0 = legacy default stream).
    """
    module, reason = _load("cuda")
    if module is None:
        raise RuntimeError(f"CUDA post-processing is unavailable: {reason}")
    module.anomaly_map([int(p) for p in ptrs], [(int(h), int(w)) for h, w in shapes], int(n), int(height),
                       int(width), _cached_kernel1d(float(sigma), TRUNCATE), int(out_map_ptr), int(out_score_ptr), int(stream),
                       int(workspace_ptr))
    _record("cuda")


def anomaly_map(per_scale: Sequence[Any], size: Size, sigma: float = 4.0, impl: str = "auto", *,
                stream: Optional[int] = None, threads: int = 0) -> Tuple[Any, Any]:
    """Full-size anomaly maps and image scores from per-scale maps (MRKD's official protocol).

    per_scale: list of N x h x w float32 maps (N x 1 x h x w accepted), all numpy or all device
    arrays (__cuda_array_interface__). size: H or (H, W). sigma: Gaussian sigma (model metadata).
    impl: "auto", "cuda", "cpu" or "numpy" (see resolve_impl; last_impl() says which ran).
    stream (cuda): a cudaStream_t as int; default: the inputs' library's current stream.
    threads (cpu): at most this many threads, 0 = OMP_NUM_THREADS when set, else all cores; small
    work runs on fewer (cpp_ext's work_split: work // 393,216 threads at most, work = output pixels x
    images x scales, at least one: 256 px batch 1 or 2 -> 1, 512 px batch 1 or 256 px batch 4 -> 2).
    Returns (maps N x H x W float32, scores N float32): numpy for cpu/numpy; for cuda, arrays of the
    inputs' library, enqueued on the stream and not synchronised.
    """
    if isinstance(per_scale, np.ndarray) or not isinstance(per_scale, (list, tuple)) or len(per_scale) == 0:
        raise ValueError("per_scale must be a non-empty list of N x h x w maps, one per scale")
    height, width = _output_size(size)
    weights = _cached_kernel1d(float(sigma), TRUNCATE)
    on_device = [hasattr(m, "__cuda_array_interface__") for m in per_scale]
    if any(on_device) and not all(on_device):
        raise ValueError(f"per_scale mixes host and device arrays (on device: {on_device}); pass all on one side")
    chosen = resolve_impl(impl, on_device=all(on_device))

    if chosen == "cuda":
        views = [_device_view(m, i) for i, m in enumerate(per_scale)]
        n = _check_batches([shape for _, shape in views])
        maps = _device_empty(per_scale[0], (n, height, width))
        scores = _device_empty(per_scale[0], (n,))
        anomaly_map_device([p for p, _ in views], [shape[1:] for _, shape in views], n, height, width, sigma,
                           maps.__cuda_array_interface__["data"][0], scores.__cuda_array_interface__["data"][0],
                           _current_stream(per_scale[0]) if stream is None else stream)
        return maps, scores

    maps = _host_maps(per_scale)
    if chosen == "cpu":
        result = _load("cpu")[0].anomaly_map(maps, height, width, weights, int(threads))
    else:
        result = _anomaly_map_numpy(maps, height, width, weights)
    _record(chosen)
    return result



def maps_and_scores(outputs: Dict[str, np.ndarray], metadata, impl: str = "auto") -> Tuple[np.ndarray, np.ndarray]:
    """Anomaly maps (N x S x S) and scores (N) from a graph's host outputs, in any export layout the
    metadata describes: the graph's own ``score``, or per-scale maps finished here with ``impl``."""
    size, names = metadata.image_size, metadata.outputs   # names: a metadata.GraphOutputs
    if metadata.per_scale_outputs:
        per_scale = [np.ascontiguousarray(outputs[name], dtype=np.float32) for name in names.scales]
    else:
        n = len(outputs[names.anomaly_map])
        maps = np.asarray(outputs[names.anomaly_map], dtype=np.float32).reshape(n, size, size)
        if metadata.smoothing_in_graph:
            scores = (np.asarray(outputs[names.score], dtype=np.float32).reshape(n) if names.score is not None
                      else maps.reshape(n, -1).max(axis=1))
            return maps, scores
        per_scale = [maps]   # the unsmoothed full-size sum: one "scale" that needs no upsampling
    maps, scores = anomaly_map(per_scale, size, metadata.sigma, impl=impl)
    return np.asarray(maps, np.float32), np.asarray(scores, np.float32)
