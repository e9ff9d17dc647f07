"""Inference backends behind one interface (``Backend``) and one list of them (``REGISTRY``).

Every backend runs one model file: ``infer(batch, device_outputs=False) -> {output name: array}``.
ONNX Runtime runs ``.onnx`` files (TensorRT, CUDA or CPU execution providers); OpenVINO runs the same
``.onnx`` files on x86 (Intel and AMD) CPUs; the TensorRT backend runs serialized engines
(``.engine``/``.plan``).
Each backend imports its library lazily inside its own module, so a Jetson with only TensorRT never
needs onnxruntime and a laptop never needs TensorRT. A new backend is one new module here plus one
``BackendEntry`` line in ``REGISTRY``; `mrkd run --backend` and ``open_backend`` read that list.

A backend spec is ``name`` or ``name:precision`` (``openvino:bf16``): the precision the backend
computes the graph's float layers at, for backends that choose one (``BackendEntry.precisions``).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ContextManager, Dict, FrozenSet, Optional, Sequence, Tuple

import numpy as np

from mrkd.errors import MrkdError

ENGINE_SUFFIXES = (".engine", ".plan", ".trt")
AUTO = "auto"
# Backend.precision of a backend that runs every tensor at the type the graph gives it.
GRAPH_PRECISION = "graph"
# Precisions are named "fp32", "fp16", "bf16", "int8" wherever a user reads them (startup line, events,
# /metrics, the sidecar); OpenVINO's own name for fp32 is still taken as input (--backend openvino:f32).
PRECISION_ALIASES = {"f32": "fp32"}


class BackendError(MrkdError, RuntimeError):
    """A model file cannot be loaded or run by the chosen backend; the message names the file."""


# What a backend says of a file its parser refuses or that holds no graph (a copy or download cut short,
# an empty file, another kind of file under the name): the backends' own words ("expected one model
# input, found []", "Protobuf parsing failed") do not say that the file itself is broken.
NOT_ONNX = "not a valid ONNX model (cut short, or another kind of file)"


def check_model_file(path: Path) -> Path:
    """``path`` if it is a model file worth handing to a backend: BackendError naming it when it is
    missing or empty (0 bytes: no backend reads anything from it, and some read it as a model without
    inputs)."""
    path = Path(path)
    if path.is_dir():       # "not found" sent people looking for a file that is there, as a folder
        raise BackendError(f"{path}: a folder, not a model file (give the .onnx or engine file in it)")
    if not path.is_file():
        raise BackendError(f"{path}: model file not found")
    if path.stat().st_size == 0:
        raise BackendError(f"{path}: the file is empty (0 bytes), not a model; export or copy it again")
    return path


class Backend:
    """What every backend provides (Polygraphy's runners are the model). Subclasses fill the
    attributes in ``__init__``.

    input_name / input_shape (dims, -1 where dynamic) / input_dtype (numpy dtype) describe the one
    model input; output_names lists the outputs; batch_range is (min, max) of the batch dimension.
    precision: what the backend computes at — GRAPH_PRECISION ("graph": the graph's own tensor types
    decide, FP32/FP16/Q-DQ INT8) or the inference precision it imposes on float layers ("fp32", "bf16").
    model_metadata_props: the metadata the export embedded in the model file, where the backend can
    read it (ONNX metadata_props), else empty.
    """

    name = "backend"
    precision = GRAPH_PRECISION
    model_path: Path
    input_name: str
    input_shape: Tuple[int, ...]
    input_dtype: np.dtype
    output_names: Tuple[str, ...]
    batch_range: Tuple[int, int]
    model_metadata_props: Dict[str, str] = {}

    @property
    def has_device_outputs(self) -> bool:
        """True when ``infer(..., device_outputs=True)`` can leave outputs on the GPU."""
        return False

    def infer(self, batch: np.ndarray, device_outputs: bool = False) -> Dict[str, Any]:
        """Run one batch (already pre-processed, contiguous, of ``input_dtype``). Outputs are host
        numpy arrays; with ``device_outputs`` (only where ``has_device_outputs``) GPU arrays valid
        until the next call, to be read inside ``cuda_context()``."""
        raise NotImplementedError

    def cuda_context(self) -> Optional[ContextManager[None]]:
        """A context manager making this backend's CUDA context current (for post-processing its
        device outputs), or None on backends without one (every CPU backend)."""
        return None

    def describe(self) -> str:
        """One line for logs: backend, device/providers, precision, model file."""
        return f"{self.name} ({self.model_path})"

    def close(self) -> None:
        """Free sessions/buffers. Safe to call twice."""

    def _no_device_outputs(self) -> None:
        raise BackendError(f"{self.model_path}: the {self.name} backend keeps no outputs on a GPU "
                           f"(device_outputs=True needs the TensorRT backend)")


def run_precision(graph_precision: str, backend_precision: str) -> str:
    """The precision a model runs at, for logs and CameraInfo: the graph's ("fp32", "fp16", "int8")
    when the backend runs it as typed or at fp32; "bf16" for a float graph at bf16; "int8+bf16" for
    the Q/DQ graph whose float layers run at bf16."""
    if backend_precision in (GRAPH_PRECISION, "fp32"):
        return graph_precision
    return f"int8+{backend_precision}" if graph_precision == "int8" else backend_precision


@dataclass(frozen=True)
class BackendOptions:
    """Settings a backend may use; each reads the ones that apply to it.

    providers: ONNX Runtime execution providers in order ("tensorrt", "cuda", "cpu" or full names).
    threads: CPU threads for inference (ONNX Runtime intra-op, OpenVINO INFERENCE_NUM_THREADS; None/0:
    the library's default). precision: the spec's ``:precision`` part (None: the backend's default).
    metadata: the model's ModelMetadata (the TensorRT backend checks where an engine was built; OpenVINO's
    "checked" precision reads its precision_checks). decision_thresholds: the thresholds the run decides
    at (None: the model's calibrated one; empty: only that one), which OpenVINO's "checked" judges bf16 at.
    """

    providers: Optional[Tuple[str, ...]] = None
    threads: Optional[int] = None
    precision: Optional[str] = None
    metadata: Any = None
    decision_thresholds: Tuple[Optional[float], ...] = ()


@dataclass(frozen=True)
class BackendEntry:
    """One backend in the registry: its name, where its class lives, which model files it runs, the
    module whose presence makes it available, and the precisions a spec may ask for (first: default)."""

    name: str
    module: str                        # module under mrkd.runtime.backends
    class_name: str
    suffixes: Tuple[str, ...]
    requires: str                      # importable module that makes this backend available
    precisions: Tuple[str, ...] = ()   # () = runs the graph as typed; no ":precision" accepted
    summary: str = ""
    auto_precision: Optional[str] = None   # the precision --backend auto runs it at (None: its default)

    def available(self) -> bool:
        """Its library is installed (found without importing it; a GPU may still be missing)."""
        try:
            return importlib.util.find_spec(self.requires) is not None
        except (ImportError, ValueError):
            return False

    def backend_class(self):
        return getattr(importlib.import_module(f"mrkd.runtime.backends.{self.module}"), self.class_name)


REGISTRY: Tuple[BackendEntry, ...] = (
    BackendEntry("onnxruntime", "onnxruntime_backend", "OnnxRuntimeBackend", (".onnx",), "onnxruntime",
                 summary="ONNX Runtime: TensorRT > CUDA > CPU execution providers"),
    BackendEntry("tensorrt", "tensorrt_backend", "TensorRTBackend", ENGINE_SUFFIXES, "tensorrt",
                 summary="TensorRT engines built by mrkd export on this GPU"),
    BackendEntry("openvino", "openvino_backend", "OpenVinoBackend", (".onnx",), "openvino",
                 ("fp32", "bf16", "auto", "checked"), auto_precision="checked",
                 summary="OpenVINO on the CPU: fp32 (default), bf16, auto (bf16 where native), checked (bf16 where "
                         "native and the model's bf16 check passed: what --backend auto runs)"),
)


def backend_entry(name: str) -> BackendEntry:
    for entry in REGISTRY:
        if entry.name == name:
            return entry
    raise BackendError(f"backend {name!r} unknown; choose from {', '.join(backend_choices())}")


def backend_choices() -> Tuple[str, ...]:
    """Every spec `--backend` accepts: auto, each backend, and name:precision where it has them."""
    return (AUTO,) + tuple(spec for entry in REGISTRY
                           for spec in (entry.name,) + tuple(f"{entry.name}:{p}" for p in entry.precisions))


def canonical_backend_spec(spec: object) -> object:
    """``spec`` with an alias precision named as mrkd names it ("openvino:f32" -> "openvino:fp32"); any
    other value as it is (checked by parse_backend_spec or the option's choices)."""
    if not isinstance(spec, str):
        return spec
    name, sep, precision = spec.partition(":")
    return f"{name}:{PRECISION_ALIASES[precision]}" if sep and precision in PRECISION_ALIASES else spec


def parse_backend_spec(spec: str) -> Tuple[str, Optional[str]]:
    """"openvino:bf16" -> ("openvino", "bf16"); "auto"/"onnxruntime" -> (name, None); an alias taken
    (canonical_backend_spec). Checked against the registry: an unknown name or precision is a
    BackendError listing the choices."""
    spec = canonical_backend_spec(spec)
    if not isinstance(spec, str) or spec not in backend_choices():
        raise BackendError(f"backend {spec!r} unknown; choose from {', '.join(backend_choices())}")
    name, _, precision = spec.partition(":")
    return name, precision or None


# --- --backend auto -------------------------------------------------------------------------

@dataclass(frozen=True)
class MachineFacts:
    """What the auto choice depends on, gathered by ``machine_facts()`` (tests pass their own)."""

    nvidia_gpu: bool                       # a CUDA device answers (runtime.gpu)
    cpu_vendor: str                        # /proc/cpuinfo vendor_id: "GenuineIntel", "AuthenticAMD", ...
    installed: FrozenSet[str]              # registry names whose library is installed
    ort_gpu_providers: bool = False        # onnxruntime has the TensorRT or CUDA execution provider


def machine_facts() -> MachineFacts:
    """The facts of this machine (reads /proc/cpuinfo and the CUDA driver; imports onnxruntime only
    when a GPU answers, to ask for its providers)."""
    from mrkd.runtime.gpu import NoGpuError, gpu_identity
    try:
        gpu_identity(0)
        gpu = True
    except NoGpuError:
        gpu = False
    installed = frozenset(entry.name for entry in REGISTRY if entry.available())
    ort_gpu = False
    if gpu and "onnxruntime" in installed:
        try:
            from mrkd.deps import require
            providers = require("onnxruntime").get_available_providers()
            ort_gpu = bool({"TensorrtExecutionProvider", "CUDAExecutionProvider"} & set(providers))
        except MrkdError:
            pass
    return MachineFacts(nvidia_gpu=gpu, cpu_vendor=cpu_vendor(), installed=installed, ort_gpu_providers=ort_gpu)


def cpu_vendor() -> str:
    """The CPU's vendor id (x86 Linux: /proc/cpuinfo), "" where it cannot be read."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


# OpenVINO runs the .onnx on Intel and AMD x86 CPUs: it was measured never slower than ONNX Runtime on
# either (README "Which backend on a line PC"). AMD was left out while a crash with OpenVINO loaded was
# unexplained; it was torch's DataLoader SIGCHLD handler, which training and evaluation now put back.
X86_VENDORS = ("GenuineIntel", "AuthenticAMD")


def choose_auto_backend(model_path: str | Path, facts: MachineFacts) -> str:
    """The backend `--backend auto` runs ``model_path`` with, from the machine's facts:

    * ``.engine``/``.plan``/``.trt`` -> tensorrt (nothing else runs an engine);
    * ``.onnx`` on a machine with an NVIDIA GPU and ONNX Runtime's TensorRT/CUDA provider -> onnxruntime
      (its providers then run TensorRT > CUDA);
    * ``.onnx`` on an x86 CPU of ``X86_VENDORS`` (Intel, AMD) with OpenVINO installed -> openvino (its own CPU
      kernels; measured faster than ONNX Runtime, README "Which backend on a line PC"), at the
      precision ``auto_precision`` of its registry entry: bf16 only where the model's check passed;
    * else onnxruntime when installed, else any installed backend that runs ``.onnx``.
    """
    suffix = Path(model_path).suffix.lower()
    if suffix in ENGINE_SUFFIXES:
        return "tensorrt"
    if suffix in CHECKPOINT_SUFFIXES:
        raise BackendError(export_first(model_path))
    if suffix == ".json":
        raise BackendError(f"{model_path}: a model's sidecar, not a model: give the model file it describes "
                           f"({Path(model_path).with_suffix('')})")
    if suffix != ".onnx":
        raise BackendError(f"{model_path}: cannot tell the backend from the suffix {suffix!r} "
                           f"(expected .onnx or one of {ENGINE_SUFFIXES}); name it with --backend "
                           f"(Python: backend=)")
    if facts.nvidia_gpu and facts.ort_gpu_providers and "onnxruntime" in facts.installed:
        return "onnxruntime"
    if facts.cpu_vendor in X86_VENDORS and "openvino" in facts.installed:
        return "openvino"
    runs_onnx = [e.name for e in REGISTRY if ".onnx" in e.suffixes and e.name in facts.installed]
    if "onnxruntime" in runs_onnx or not runs_onnx:
        return "onnxruntime"     # missing onnxruntime then fails with the install hint (mrkd.deps)
    return runs_onnx[0]


CHECKPOINT_SUFFIXES = (".ckpt", ".pt", ".pth")     # what training writes; no backend runs them


def export_first(model_path) -> str:
    """The hint for a training checkpoint given where an exported model belongs."""
    return (f"{model_path} is a training checkpoint, not an exported model: export it first "
            f"(mrkd export {model_path} -o exported/), then run the .onnx (or .engine) it writes")


def resolve_backend_name(model_path: str | Path, backend: str = AUTO,
                         facts: Optional[MachineFacts] = None) -> str:
    """The registry name a spec runs ``model_path`` with ("auto" decided by choose_auto_backend on
    ``facts``, default this machine's); a backend that cannot run the file's suffix is refused."""
    name, _ = parse_backend_spec(backend)
    if name == AUTO:
        return choose_auto_backend(model_path, facts or machine_facts())
    entry = backend_entry(name)
    suffix = Path(model_path).suffix.lower()
    if suffix in CHECKPOINT_SUFFIXES:
        raise BackendError(export_first(model_path))
    if suffix not in entry.suffixes:
        raise BackendError(f"{model_path}: the {name} backend runs {'/'.join(entry.suffixes)} files, not "
                           f"{suffix or 'files without a suffix'}")
    return name


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def check_threads(threads: Optional[int]) -> None:
    """BackendError for more inference threads than usable CPUs: ONNX Runtime starts every one it is
    given, and 1024 threads on 2 CPUs took 7 s a frame instead of 7 ms (OpenVINO caps them itself)."""
    cpus = usable_cpus()
    if threads and threads > cpus:
        raise BackendError(f"threads {threads}: more than the {cpus} CPUs this process may use (ONNX Runtime would "
                           f"start them all and run many times slower); give at most {cpus}, or 0 for the "
                           f"library's default")


def open_backend(model_path: str | Path, backend: str = AUTO, providers: Optional[Sequence[str]] = None,
                 threads: Optional[int] = None, metadata=None,
                 decision_thresholds: Sequence[Optional[float]] = ()) -> Backend:
    """Load ``model_path`` with the backend ``backend`` names (a spec of backend_choices(); "auto"
    decides by the file and the machine, see choose_auto_backend).

    providers: ONNX Runtime execution providers in order of preference (short names "tensorrt",
    "cuda", "cpu" or full names); None = every available one of TensorRT, CUDA, CPU. Given with
    "auto", they choose ONNX Runtime for an .onnx file.
    threads: CPU inference threads (None = the library's default).
    metadata: the model's ModelMetadata (an engine's is checked against the running TensorRT and GPU;
    OpenVINO under auto runs bf16 only where its precision_checks record a passing bf16 check).
    decision_thresholds: the thresholds the run decides at (BackendOptions).
    """
    path = check_model_file(Path(model_path))
    check_threads(threads)
    name = resolve_backend_name(path, backend)
    asked, precision = parse_backend_spec(backend)
    if providers and asked not in (AUTO, "onnxruntime"):
        # they were ignored: a run said nothing of the providers it was told to use
        raise BackendError(f"--providers {','.join(providers)}: execution providers are ONNX Runtime's; the "
                           f"{name} backend takes none (leave --providers out, or use --backend onnxruntime)")
    if asked == AUTO and providers and name != "tensorrt":
        name = "onnxruntime"      # ONNX Runtime's execution providers were named: that is the backend asked for
    elif asked == AUTO:
        precision = backend_entry(name).auto_precision
    options = BackendOptions(providers=tuple(providers) if providers else None, threads=threads,
                             precision=precision, metadata=metadata,
                             decision_thresholds=tuple(decision_thresholds))
    return backend_entry(name).backend_class()(path, options)
