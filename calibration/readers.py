"""ONNX Runtime calibration data readers over a calibration directory, and the TensorRT
calibration artefacts made from them.

- :class:`StoreReader` — an ``onnxruntime.quantization.CalibrationDataReader`` over one engine's
  captured feeds (static QDQ quantization, GPTQ's calibration set). A deep copy restarts it
  (ORT's GPTQ path deep-copies its reader before iterating).
- :func:`tensorrt_ep_table` — the INT8 calibration table the ONNX Runtime TensorRT execution
  provider reads (``trt_int8_calibration_table_name``): ORT's MinMax calibrator (symmetric
  ranges, as TensorRT uses) over the captured feeds, written by ``write_calibration_table``.
- :func:`tensorrt_entropy_cache` — a native TensorRT INT8 cache from ``IInt8EntropyCalibrator2``
  when ``tensorrt`` imports (for ``trtexec --calib``); skipped with the reason otherwise.
"""

from __future__ import annotations

import itertools
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from .store import CalibrationStore

# Tensors the TensorRT EP table covers by default: inputs/outputs of the weight-bearing ops.
TABLE_OP_TYPES = ("MatMul", "Gemm", "Conv", "ConvTranspose")


class StoreReader(CalibrationDataReader):
    """Feeds of ``engine`` from ``store``, at most ``limit`` samples.

    ``max_tokens`` (the ``llm`` engine): keep the first ``max_tokens`` positions of each
    prefill (``inputs_embeds`` and ``attention_mask`` with an empty past) — GPTQ runs the whole
    graph once per quantized MatMul input, so long multimodal prompts are cut for big models.
    """

    def __init__(self, store: CalibrationStore | str | os.PathLike, engine: str, limit: int | None = None,
                 max_tokens: int | None = None) -> None:
        self.store = store if isinstance(store, CalibrationStore) else CalibrationStore(store)
        self.engine = engine
        self.limit = limit
        self.max_tokens = max_tokens
        self.store.count(engine)  # refuses an engine without samples
        self._it: Iterator[dict[str, np.ndarray]] | None = None
        self._range = (0, len(self))

    def __len__(self) -> int:
        n = self.store.count(self.engine)
        return n if self.limit is None else min(n, self.limit)

    def __deepcopy__(self, memo: dict) -> "StoreReader":
        return StoreReader(self.store, self.engine, self.limit, self.max_tokens)

    def set_range(self, start_index: int, end_index: int) -> None:
        """Serve samples ``[start_index, end_index)`` next (ORT's strided calibration, which keeps
        the calibrator's memory to one stride of intermediate outputs)."""
        self._range = (start_index, min(end_index, len(self)))
        self._it = None

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._it is None:
            start, end = self._range
            self._it = itertools.islice(self.store.samples(self.engine, self.limit), start, end)
        feeds = next(self._it, None)
        if feeds is not None and self.max_tokens is not None and "inputs_embeds" in feeds:
            feeds = truncate_prefill(feeds, self.max_tokens)
        return feeds


def truncate_prefill(feeds: dict[str, np.ndarray], max_tokens: int) -> dict[str, np.ndarray]:
    """The first ``max_tokens`` positions of an ``llm`` prefill (empty past only)."""
    past = [v for k, v in feeds.items() if k.startswith("past_key_values.")]
    if any(p.shape[2] for p in past):
        raise ValueError("truncate_prefill: the sample has a non-empty past; only prefills can be cut")
    out = dict(feeds)
    out["inputs_embeds"] = feeds["inputs_embeds"][:, :max_tokens]
    out["attention_mask"] = feeds["attention_mask"][:, :max_tokens]
    if "position_ids" in feeds:
        out["position_ids"] = feeds["position_ids"][:, :max_tokens]
    return out


def tensorrt_ep_table(model_path: str | os.PathLike, reader: StoreReader, out_dir: str | os.PathLike,
                      op_types: tuple[str, ...] | None = TABLE_OP_TYPES) -> dict[str, Any]:
    """Write ``calibration.flatbuffers`` (what the TensorRT EP reads), ``calibration.cache`` and
    ``calibration.json`` into ``out_dir``; returns a record (tensor count, files)."""
    from onnxruntime.quantization import CalibrationMethod, create_calibrator, write_calibration_table

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".augment.") as tmp:
        cal = create_calibrator(str(model_path), list(op_types) if op_types else [],
                                augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                calibrate_method=CalibrationMethod.MinMax,
                                use_external_data_format=_has_external_data(model_path),
                                extra_options={"symmetric": True})
        for i in range(len(reader)):  # one sample at a time: ranges merge, memory stays bounded
            reader.set_range(i, i + 1)
            cal.collect_data(reader)
        ranges = cal.compute_data()
        del cal
    write_calibration_table(ranges, dir=str(out))
    return {"files": ["calibration.flatbuffers", "calibration.cache", "calibration.json"],
            "tensors": len(list(ranges.keys())), "method": "minmax-symmetric",
            "op_types": list(op_types) if op_types else "all"}


def _has_external_data(path: str | os.PathLike) -> bool:
    from export.manifest import onnx_external_files

    return bool(onnx_external_files(path))


def tensorrt_entropy_cache(onnx_path: str | os.PathLike, reader: CalibrationDataReader, cache_path: str | os.PathLike,
                           input_shapes: dict[str, tuple[int, ...]] | None = None) -> dict[str, Any]:
    """Build a native TensorRT INT8 calibration cache with ``IInt8EntropyCalibrator2``.

    Needs ``tensorrt`` and a CUDA device (``cuda-python`` for the device buffers). Returns
    ``{"skipped": reason}`` when they are missing — never a fake cache."""
    try:
        import tensorrt as trt
    except Exception as e:  # the PyPI stubs raise at import on machines without NVIDIA's wheels
        return {"skipped": f"tensorrt is not importable here ({type(e).__name__}: {e}); build the cache on the "
                           f"target with this function or with trtexec --int8 --calib"}
    try:
        from cuda import cudart
    except ImportError as e:
        return {"skipped": f"cuda-python is not importable ({e}); it holds the calibration batches on the GPU"}

    class _Calibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            super().__init__()
            self.batches = iter(reader)
            self.buffers: dict[str, Any] = {}

        def get_batch_size(self) -> int:
            return 1

        def get_batch(self, names):
            feeds = next(self.batches, None)
            if feeds is None:
                return None
            ptrs = []
            for n in names:
                a = np.ascontiguousarray(feeds[n])
                if n not in self.buffers:
                    self.buffers[n] = cudart.cudaMalloc(a.nbytes)[1]
                cudart.cudaMemcpy(self.buffers[n], a.ctypes.data, a.nbytes, cudart.cudaMemcpyKind.cudaMemcpyHostToDevice)
                ptrs.append(int(self.buffers[n]))
            return ptrs

        def read_calibration_cache(self):
            return None

        def write_calibration_cache(self, cache) -> None:
            Path(cache_path).write_bytes(bytes(cache))

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        raise RuntimeError(f"TensorRT cannot parse {onnx_path}: {parser.get_error(0)}")
    config = builder.create_builder_config()
    config.set_flag(trt.BuilderFlag.INT8)
    config.int8_calibrator = _Calibrator()
    if input_shapes:
        profile = builder.create_optimization_profile()
        for name, shape in input_shapes.items():
            profile.set_shape(name, shape, shape, shape)
        config.add_optimization_profile(profile)
        config.set_calibration_profile(profile)
    if builder.build_serialized_network(network, config) is None:
        raise RuntimeError(f"TensorRT INT8 calibration of {onnx_path} failed")
    return {"file": str(cache_path), "calibrator": "IInt8EntropyCalibrator2", "tensorrt": trt.__version__}
