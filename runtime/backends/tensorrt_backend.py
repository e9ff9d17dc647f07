"""TensorRT engine backend (TensorRT 10 tensor API, pycuda for memory and the stream).

Buffers are allocated once for the engine's largest batch and reused: pinned host buffers so the
copies run asynchronously, device buffers bound with ``set_tensor_address``. Each call sets the
input shape, copies in, runs ``execute_async_v3`` and copies out on one pycuda stream.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import ContextManager, Dict, Iterator, Optional

import numpy as np

from mrkd.deps import require
from mrkd.runtime.backends import Backend, BackendError, BackendOptions
from mrkd.runtime.gpu import gpu_identity
from mrkd.runtime.metadata import MetadataError, ModelMetadata, check_engine_compatible, sidecar_path


def running_gpu() -> Dict[str, str]:
    """Name and compute capability of CUDA device 0 (runtime.gpu: what the engine build recorded)."""
    name, capability = gpu_identity(0)
    return {"gpu_name": name, "compute_capability": capability}


class TensorRTBackend(Backend):
    """Runs a serialized TensorRT engine; outputs come back as host numpy arrays."""

    name = "tensorrt"

    def __init__(self, engine_path: str | Path, options: Optional[BackendOptions] = None, *,
                 metadata: Optional[ModelMetadata] = None):
        """``options.metadata`` (or ``metadata``): the engine's sidecar, checked against this GPU."""
        metadata = metadata if metadata is not None else (options.metadata if options else None)
        trt = require("tensorrt")
        cuda = require("pycuda.driver", "the TensorRT backend moves buffers with pycuda")
        self.model_path = Path(engine_path)
        cuda.init()
        self._cuda = cuda
        # The primary context is the one the CUDA runtime (and so TensorRT) uses.
        self._context = cuda.Device(0).retain_primary_context()
        self._context.push()
        try:
            if metadata is None:
                raise MetadataError(f"{sidecar_path(self.model_path)}: an engine needs its sidecar (written by "
                                    f"mrkd export next to {self.model_path.name}) to check where it was built")
            gpu = running_gpu()
            check_engine_compatible(metadata, trt.__version__, gpu["gpu_name"], gpu["compute_capability"],
                                    source=str(sidecar_path(self.model_path)))
            self._logger = trt.Logger(trt.Logger.WARNING)
            runtime = trt.Runtime(self._logger)
            engine = runtime.deserialize_cuda_engine(self.model_path.read_bytes())
            if engine is None:
                raise BackendError(f"{self.model_path}: TensorRT {trt.__version__} cannot deserialize this "
                                   f"engine (built by another TensorRT version or for another GPU?)")
            self._runtime, self.engine = runtime, engine
            self.execution = engine.create_execution_context()
            self._setup_tensors(trt)
            self.stream = cuda.Stream()
        finally:
            self._context.pop()

    def _setup_tensors(self, trt) -> None:
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        if len(inputs) != 1:
            raise BackendError(f"{self.model_path}: expected one engine input, found {inputs}")
        self.input_name = inputs[0]
        self.output_names = tuple(n for n in names if n not in inputs)
        self.input_shape = tuple(self.engine.get_tensor_shape(self.input_name))
        self.input_dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(self.input_name)))
        if -1 in self.input_shape[1:]:
            raise BackendError(f"{self.model_path}: only the batch dimension may be dynamic, input shape "
                               f"is {self.input_shape}")
        if self.input_shape[0] == -1:
            profile_min, _, profile_max = self.engine.get_tensor_profile_shape(self.input_name, 0)
            self.batch_range = (int(profile_min[0]), int(profile_max[0]))
        else:
            self.batch_range = (self.input_shape[0], self.input_shape[0])
        max_batch = self.batch_range[1]
        # Output shapes at the largest batch size size the reusable buffers.
        self.execution.set_input_shape(self.input_name, (max_batch,) + self.input_shape[1:])
        self._host, self._device = {}, {}
        for name in (self.input_name,) + self.output_names:
            shape = tuple(self.execution.get_tensor_shape(name))
            dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(name)))
            self._host[name] = self._cuda.pagelocked_empty(shape, dtype)
            self._device[name] = self._cuda.mem_alloc(self._host[name].nbytes)
            self.execution.set_tensor_address(name, int(self._device[name]))

    def _enqueue(self, batch: np.ndarray) -> None:
        """Stage the batch in pinned memory, copy it in and launch the engine (context pushed)."""
        n = batch.shape[0]
        if not self.batch_range[0] <= n <= self.batch_range[1]:
            raise BackendError(f"{self.model_path}: batch of {n} outside the engine's range {self.batch_range}")
        self.execution.set_input_shape(self.input_name, batch.shape)
        staged = self._host[self.input_name].reshape(-1)[:batch.size].reshape(batch.shape)
        np.copyto(staged, batch, casting="same_kind")
        self._cuda.memcpy_htod_async(self._device[self.input_name], staged, self.stream)
        if not self.execution.execute_async_v3(self.stream.handle):
            raise BackendError(f"{self.model_path}: execute_async_v3 failed")

    @property
    def has_device_outputs(self) -> bool:
        return True

    def infer(self, batch: np.ndarray, device_outputs: bool = False) -> Dict[str, object]:
        """Host numpy copies; with ``device_outputs`` pycuda GPUArrays over the reused device buffers
        (valid until the next call), so the CUDA post-processing reads them without a copy."""
        if device_outputs:
            return self._infer_device(batch)
        cuda = self._cuda
        self._context.push()
        try:
            self._enqueue(batch)
            results = {}
            for name in self.output_names:
                shape = tuple(self.execution.get_tensor_shape(name))
                host = self._host[name].reshape(-1)[:int(np.prod(shape))].reshape(shape)
                cuda.memcpy_dtoh_async(host, self._device[name], self.stream)
                results[name] = host
            self.stream.synchronize()
        finally:
            self._context.pop()
        # Copies: the pinned buffers are overwritten by the next call.
        return {name: np.array(array) for name, array in results.items()}

    def describe(self) -> str:
        return f"tensorrt batch {self.batch_range}, precision as built ({self.model_path.name})"

    def close(self) -> None:
        if getattr(self, "_device", None):
            self._context.push()
            try:
                for buffer in self._device.values():
                    buffer.free()
                self._device = {}
            finally:
                self._context.pop()
            self._context.detach()

    def cuda_context(self) -> Optional[ContextManager[None]]:
        """Makes this backend's CUDA context current (for post-processing its device outputs)."""
        return self._pushed_context()

    @contextlib.contextmanager
    def _pushed_context(self) -> Iterator[None]:
        self._context.push()
        try:
            yield
        finally:
            self._context.pop()

    def _infer_device(self, batch: np.ndarray) -> Dict[str, object]:
        gpuarray = require("pycuda.gpuarray", "device outputs are pycuda GPUArrays")
        self._context.push()
        try:
            self._enqueue(batch)
            self.stream.synchronize()
            return {name: gpuarray.GPUArray(tuple(self.execution.get_tensor_shape(name)),
                                            self._host[name].dtype, gpudata=self._device[name])
                    for name in self.output_names}
        finally:
            self._context.pop()
