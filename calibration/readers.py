"""ONNX Runtime calibration data readers over a calibration directory, and the TensorRT
calibration artefacts made from them (``CAL/tensorrt/<engine>/``, one file per consumer):

- :class:`StoreReader` — an ``onnxruntime.quantization.CalibrationDataReader`` over one engine's
  captured feeds (static QDQ quantization, GPTQ's calibration set). A deep copy restarts it
  (ORT's GPTQ path deep-copies its reader before iterating).
- :func:`tensorrt_ep_table` — ORT's MinMax calibrator (symmetric ranges, as TensorRT uses) over
  the captured feeds, written twice: ``calibration.flatbuffers`` (``write_calibration_table``),
  the table the ONNX Runtime TensorRT execution provider reads with
  ``trt_int8_use_native_calibration_table`` false; and ``tensorrt.cache``, the same ranges in
  TensorRT's own calibration-cache format for ``trtexec --int8 --calib`` (``build_engines.sh``).
  ``calibration.json`` keeps the ranges readable; ORT's plain-text ``calibration.cache``, which no
  consumer reads, is not kept.
- :func:`entropy_calibrator` / :func:`tensorrt_entropy_cache` — TensorRT's own entropy
  calibration (``IInt8EntropyCalibrator2``) on the captured samples, where ``tensorrt`` and
  ``cuda-python`` import (the Python builder; ``agvas calibrate`` on a TensorRT machine), cache
  ``entropy.cache``; skipped with the reason elsewhere.

TensorRT's calibration cache is text: a header ``TRT-<version>-<algorithm>`` (the version as
``NV_TENSORRT_VERSION``: 8601 for 8.6.1, 100300 for 10.3.0) and one ``<tensor>: <scale>`` line per
tensor, the scale (amax / 127) as the hex of its IEEE-754 float32 bits. TensorRT ignores a cache
whose header does not match its version and calibrator, so a cache written here (no TensorRT to
ask) carries version 0 and ``build_engines.sh`` sets the installed version before the build.
"""

from __future__ import annotations

import itertools
import os
import struct
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

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


TRT_CACHE_NAME = "tensorrt.cache"
ENTROPY_CACHE_NAME = "entropy.cache"
EP_TABLE_NAME = "calibration.flatbuffers"
CACHE_ALGORITHM = "EntropyCalibration2"
UNSTAMPED_VERSION = 0  # the header version of a cache written without TensorRT


def tensorrt_ep_table(model_path: str | os.PathLike, reader: StoreReader, out_dir: str | os.PathLike,
                      op_types: tuple[str, ...] | None = TABLE_OP_TYPES) -> dict[str, Any]:
    """Write ``calibration.flatbuffers`` (the TensorRT EP's table), ``tensorrt.cache`` (trtexec's)
    and ``calibration.json`` into ``out_dir``; returns a record (tensor count, files)."""
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
    (out / "calibration.cache").unlink(missing_ok=True)  # ORT's plain-text table: read by no consumer
    amax = {}
    for k in ranges.keys():
        d = ranges[k].to_dict()
        amax[k] = max(float(np.abs(np.asarray(d.get(b, 0.0), np.float64)).max(initial=0.0)) for b in ("lowest", "highest"))
    write_tensorrt_cache(amax, out / TRT_CACHE_NAME)
    return {"files": [EP_TABLE_NAME, TRT_CACHE_NAME, "calibration.json"], "tensors": len(amax),
            "method": "minmax-symmetric", "op_types": list(op_types) if op_types else "all",
            "consumers": {EP_TABLE_NAME: "ONNX Runtime TensorRT EP (trt_int8_use_native_calibration_table false)",
                          TRT_CACHE_NAME: "build_engines.sh --int8 --calib-dir CAL (trtexec --calib)"}}


def _has_external_data(path: str | os.PathLike) -> bool:
    from agvas.export.manifest import onnx_external_files

    return bool(onnx_external_files(path))


# ---- TensorRT's calibration cache format ---------------------------------------------------------

def cache_version(version: str) -> int:
    """``NV_TENSORRT_VERSION`` of a TensorRT version string, as in the cache header and trtexec's
    banner: major*1000 + minor*100 + patch below 10 (8.6.1 -> 8601), major*10000 + minor*100 +
    patch from 10 on (10.3.0 -> 100300)."""
    parts = [int(p) for p in str(version).split(".")[:3]] + [0, 0, 0]
    major, minor, patch = parts[:3]
    return major * (10000 if major >= 10 else 1000) + minor * 100 + patch


def _scale_hex(scale: float) -> str:
    return format(struct.unpack(">I", struct.pack(">f", scale))[0], "x")


def tensorrt_cache_text(amax: dict[str, float], version: int = UNSTAMPED_VERSION,
                        algorithm: str = CACHE_ALGORITHM) -> str:
    """A TensorRT calibration cache for symmetric ranges ``amax`` (scale = amax / 127)."""
    lines = [f"TRT-{int(version)}-{algorithm}"]
    for name in sorted(amax):
        a = float(amax[name])
        if not np.isfinite(a):
            continue
        lines.append(f"{name}: {_scale_hex(a / 127.0)}")
    return "\n".join(lines) + "\n"


def write_tensorrt_cache(amax: dict[str, float], path: str | os.PathLike, version: int = UNSTAMPED_VERSION) -> Path:
    from agvas.atomic import write_text_atomic

    write_text_atomic(Path(path), tensorrt_cache_text(amax, version))
    return Path(path)


def read_tensorrt_cache(path: str | os.PathLike) -> tuple[str, dict[str, float]]:
    """``(header, {tensor: scale})`` of a TensorRT calibration cache."""
    lines = Path(path).read_text().splitlines()
    if not lines or not lines[0].startswith("TRT-"):
        raise ValueError(f"{path}: not a TensorRT calibration cache (no TRT-<version>-<algorithm> header)")
    scales = {}
    for ln in lines[1:]:
        name, sep, val = ln.rpartition(":")
        if sep:
            scales[name.strip()] = struct.unpack(">f", struct.pack(">I", int(val.strip(), 16)))[0]
    return lines[0], scales


def stamp_tensorrt_cache(path: str | os.PathLike, version: int, algorithm: str = CACHE_ALGORITHM) -> bool:
    """Set the header of the cache at ``path`` to ``TRT-<version>-<algorithm>`` (what
    ``build_engines.sh`` does before trtexec reads it); True when it changed."""
    from agvas.atomic import write_text_atomic

    p = Path(path)
    lines = p.read_text().splitlines(keepends=True)
    want = f"TRT-{int(version)}-{algorithm}\n"
    if lines and lines[0] == want:
        return False
    write_text_atomic(p, want + "".join(lines[1:]))
    return True


# ---- TensorRT entropy calibration on the captured samples ----------------------------------------

ROW_AXES = ("batch", "n_crops")  # dynamic axis 0 names whose rows are independent samples


def _rows(feeds: dict[str, np.ndarray], inputs: list[dict]) -> list[dict[str, np.ndarray]]:
    """A sample split into single rows when every input's axis 0 is a row axis (batch / crops)."""
    if not inputs or not all(str(x["shape"][0]) in ROW_AXES for x in inputs if x["shape"]):
        return [feeds]
    n = {feeds[x["name"]].shape[0] for x in inputs}
    if len(n) != 1:
        return [feeds]
    return [{k: v[i:i + 1] for k, v in feeds.items()} for i in range(n.pop())]


def calibration_shape(samples: Iterable[dict[str, np.ndarray]], inputs: list[dict]) -> tuple[dict[str, tuple[int, ...]], int]:
    """The one shape TensorRT calibrates at and how many sample rows have it.

    With dynamic shapes TensorRT calibrates at the kOPT dimensions of the calibration profile
    (``set_calibration_profile``: "MIN and MAX values will be overwritten by kOPT"), so every batch
    must have that shape: rows of a batch-like axis 0 are split to 1, and of the other dynamic
    axes (SPAM's token count, which follows the image size) the most common value is taken."""
    counts: dict[tuple, int] = {}
    for feeds in samples:
        for row in _rows(feeds, inputs):
            key = tuple((x["name"], tuple(row[x["name"]].shape)) for x in inputs)
            counts[key] = counts.get(key, 0) + 1
    if not counts:
        raise ValueError("no calibration samples")
    key = max(counts, key=lambda k: (counts[k], k))
    return dict(key), counts[key]


def calibration_batches(samples: Iterable[dict[str, np.ndarray]], inputs: list[dict],
                        shape: dict[str, tuple[int, ...]]) -> Iterator[dict[str, np.ndarray]]:
    """The sample rows of exactly ``shape`` (float32 arrays, C-contiguous)."""
    for feeds in samples:
        for row in _rows(feeds, inputs):
            if all(tuple(row[n].shape) == tuple(s) for n, s in shape.items()):
                yield {n: np.ascontiguousarray(row[n], dtype=row[n].dtype) for n in shape}


def entropy_calibrator(trt, store: CalibrationStore, engine: str, inputs: list[dict], cache_path: str | os.PathLike,
                       cudart=None):
    """``(calibrator, calibration shape, record)`` for one engine: an ``IInt8EntropyCalibrator2``
    feeding the store's samples of that shape from device buffers (grown when a batch needs more),
    reading ``cache_path`` first (TensorRT skips a cache it cannot use and calibrates) and writing
    the cache TensorRT produces. ``cudart``: cuda-python's runtime module (default: imported)."""
    from agvas.runtime.trt_engine import cuda_check, cuda_runtime

    cudart = cudart if cudart is not None else cuda_runtime()
    shape, n = calibration_shape(store.samples(engine), inputs)
    cache = Path(cache_path)

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self._batches = calibration_batches(store.samples(engine), inputs, shape)
            self._buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, bytes)
            self.fed = 0

        def get_batch_size(self) -> int:  # explicit batch: the batch is in the shapes
            return 1

        def _device(self, name: str, nbytes: int) -> int:
            ptr, size = self._buffers.get(name, (0, 0))
            if size < nbytes:
                if ptr:
                    cuda_check(cudart.cudaFree(ptr))
                ptr = cuda_check(cudart.cudaMalloc(max(nbytes, 1)))
                self._buffers[name] = (ptr, nbytes)
            return ptr

        def get_batch(self, names):
            feeds = next(self._batches, None)
            if feeds is None:
                return None
            ptrs = []
            for name in names:
                a = np.ascontiguousarray(feeds[name])
                ptr = self._device(name, a.nbytes)
                cuda_check(cudart.cudaMemcpy(ptr, a.ctypes.data, a.nbytes, cudart.cudaMemcpyKind.cudaMemcpyHostToDevice))
                ptrs.append(int(ptr))
            self.fed += 1
            return ptrs

        def read_calibration_cache(self):
            return cache.read_bytes() if cache.is_file() else None

        def write_calibration_cache(self, data) -> None:
            from agvas.atomic import write_bytes_atomic

            cache.parent.mkdir(parents=True, exist_ok=True)
            write_bytes_atomic(cache, bytes(data))

        def free(self) -> None:
            for ptr, _ in self._buffers.values():
                cudart.cudaFree(ptr)
            self._buffers.clear()

    rec = {"calibrator": "IInt8EntropyCalibrator2", "shape": {k: list(v) for k, v in shape.items()}, "batches": n,
           "samples": store.count(engine), "cache": str(cache)}
    return EntropyCalibrator(), shape, rec


def tensorrt_entropy_cache(onnx_path: str | os.PathLike, store: CalibrationStore, engine: str, inputs: list[dict],
                           profile: dict[str, dict[str, list[int]]], cache_path: str | os.PathLike) -> dict[str, Any]:
    """TensorRT's entropy calibration of one fp32 engine on the store's samples, writing the
    native cache ``cache_path`` (``entropy.cache``) for the Python builder and ``trtexec --calib``.

    Needs ``tensorrt`` and a CUDA device (``cuda-python`` for the device buffers). Returns
    ``{"skipped": reason}`` when they are missing — never a fake cache."""
    try:
        import tensorrt as trt
    except Exception as e:  # the PyPI stubs raise at import on machines without NVIDIA's wheels
        return {"skipped": f"tensorrt is not importable here ({type(e).__name__}: {e}); the Python builder "
                           f"(python -m agvas.export.tensorrt EXPORT --int8 --calib-dir CAL) calibrates on the target"}
    try:
        from agvas.runtime.trt_engine import cuda_runtime

        cudart = cuda_runtime()
    except RuntimeError as e:
        return {"skipped": f"{e}: it holds the calibration batches on the GPU"}
    from agvas.export.tensorrt import build_recipe, build_serialized, trt_major

    recipe = build_recipe(trt_major(trt), "fp32", fp16=False, int8=True)
    calibrator, shape, rec = entropy_calibrator(trt, store, engine, inputs, cache_path, cudart=cudart)
    try:
        build_serialized(trt, onnx_path, profile, recipe, calibrator=calibrator, calibration_shape=shape)
    finally:
        calibrator.free()
    if not Path(cache_path).is_file():
        raise RuntimeError(f"TensorRT INT8 calibration of {onnx_path} wrote no cache")
    return {**rec, "file": str(cache_path), "tensorrt": trt.__version__}
