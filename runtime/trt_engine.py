"""A native TensorRT engine runner for the vision-side engines (``trt/{engine}.plan``).

Same call shape as an ONNX Runtime session wrapper: ``TRTEngine(plan)(feeds) -> {name: array}``
with numpy in and out. Uses the tensor API of TensorRT 8.5+ and 10 (``set_input_shape`` /
``set_tensor_address`` / ``execute_async_v3``, the only one TensorRT 10 has) and NVIDIA's
``cuda-python`` runtime bindings for device memory, so the runtime stays torch-free.
``tensorrt`` and ``cuda`` are imported when an engine is created; neither exists on a machine
without an NVIDIA GPU. :func:`cuda_runtime` / :func:`cuda_check` are shared with the INT8
calibrator (``calibration/readers.py``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def cuda_runtime():
    """cuda-python's CUDA runtime module: ``cuda.bindings.runtime`` (cuda-python >= 12.6; the
    only location in cuda-bindings 13, which removed the ``cuda.cudart`` trampoline), else the
    older ``cuda.cudart``. RuntimeError naming the package when neither imports."""
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError as e:
            raise RuntimeError("NVIDIA's cuda-python is not importable (pip install 'cuda-python<13' with CUDA 12, "
                               "as on JetPack 6)") from e
    return cudart


def cuda_check(result):
    """cuda-python returns ``(err, *values)``; raise on an error, return the values."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RuntimeError(f"CUDA runtime error {err}")
    return values[0] if len(values) == 1 else values


def stream_handle(stream) -> int:
    """The address of a cuda-python stream as the int ``execute_async_v3`` takes
    (``cuda.bindings.utils.get_cuda_native_handle`` where it exists: ``int(obj)`` is deprecated
    in cuda-bindings 13)."""
    try:
        from cuda.bindings.utils import get_cuda_native_handle
    except ImportError:
        return int(stream)
    return int(get_cuda_native_handle(stream))


_cudart, _check = cuda_runtime, cuda_check  # the names this module used before


class TRTEngine:
    """One deserialised TensorRT engine with an execution context and a CUDA stream."""

    def __init__(self, plan: str | os.PathLike, device: int = 0) -> None:
        try:
            import tensorrt as trt
        except ImportError as e:
            raise RuntimeError("running TensorRT engines needs the `tensorrt` package of the target's TensorRT") from e
        self.trt, self.cudart = trt, cuda_runtime()
        self.plan = Path(plan)
        if not self.plan.is_file():
            raise FileNotFoundError(f"TensorRT engine {self.plan} not found (build it with build_engines.sh)")
        cuda_check(self.cudart.cudaSetDevice(device))
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(self.plan.read_bytes())
        if self.engine is None:
            raise RuntimeError(f"TensorRT could not deserialise {self.plan} (built for another GPU or TensorRT version?)")
        self.context = self.engine.create_execution_context()
        self.stream = cuda_check(self.cudart.cudaStreamCreate())
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, bytes)

    def _dtype(self, name: str) -> np.dtype:
        return np.dtype(self.trt.nptype(self.engine.get_tensor_dtype(name)))

    def _device(self, name: str, nbytes: int) -> int:
        ptr, size = self._buffers.get(name, (0, 0))
        if size < nbytes:
            if ptr:
                cuda_check(self.cudart.cudaFree(ptr))
            ptr = cuda_check(self.cudart.cudaMalloc(max(nbytes, 1)))
            self._buffers[name] = (ptr, nbytes)
        return ptr

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [n for n in self.inputs if n not in feeds]
        if missing:
            raise ValueError(f"{self.plan.name}: missing inputs {missing}; the engine takes {self.inputs}")
        h2d = self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        d2h = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for name in self.inputs:
            arr = np.ascontiguousarray(feeds[name], dtype=self._dtype(name))
            if not self.context.set_input_shape(name, arr.shape):
                raise ValueError(f"{self.plan.name}: input {name} shape {arr.shape} is outside the engine's "
                                 f"optimisation profile")
            ptr = self._device(name, arr.nbytes)
            cuda_check(self.cudart.cudaMemcpyAsync(ptr, arr.ctypes.data, arr.nbytes, h2d, self.stream))
            self.context.set_tensor_address(name, ptr)
        results = {}
        for name in self.outputs:
            out = np.empty(tuple(self.context.get_tensor_shape(name)), dtype=self._dtype(name))
            self.context.set_tensor_address(name, self._device(name, out.nbytes))
            results[name] = out
        if not self.context.execute_async_v3(stream_handle(self.stream)):
            raise RuntimeError(f"{self.plan.name}: TensorRT execution failed")
        for name, out in results.items():
            cuda_check(self.cudart.cudaMemcpyAsync(out.ctypes.data, self._buffers[name][0], out.nbytes, d2h, self.stream))
        cuda_check(self.cudart.cudaStreamSynchronize(self.stream))
        return results

    def close(self) -> None:
        for ptr, _ in self._buffers.values():
            self.cudart.cudaFree(ptr)
        self._buffers.clear()
        if self.stream is not None:
            self.cudart.cudaStreamDestroy(self.stream)
            self.stream = None

    def __del__(self) -> None:  # best effort; close() is the explicit path
        try:
            self.close()
        except Exception:
            pass
