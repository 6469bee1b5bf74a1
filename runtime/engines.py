"""ONNX Runtime sessions for an export directory, with the provider selected explicitly.

Providers (``provider=``):

- ``cpu``: ``CPUExecutionProvider`` with ``threads`` intra-op threads;
- ``cuda``: ``CUDAExecutionProvider`` (options from the manifest's ``gpu.cuda_ep``);
- ``tensorrt``: ``TensorrtExecutionProvider`` (``gpu.tensorrt_ep``: fp16/int8 flags, engine
  cache) with CUDA for the nodes TensorRT does not take;
- ``tensorrt-native``: the vision-side engines (``vision``, ``sam_encoder``, ``spam``, ``agmd``)
  as native TensorRT engines through ``runtime/trt_engine.py``, the LLM on the CUDA EP.

A GPU provider that ONNX Runtime does not have, or that a session silently drops in favour of
the CPU, is an error — a CPU run is never reported under a GPU name. Every session's IO is
checked against the manifest before use.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from agvas.export.manifest import Manifest, ManifestError

PROVIDERS = ("cpu", "cuda", "tensorrt", "tensorrt-native")
NATIVE_TRT_ENGINES = ("vision", "sam_encoder", "spam", "agmd")
_NP_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32}


def default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


_PRELOADED: str | None = None
_LIBC = None


def release_memory() -> bool:
    """Give the C heap's free memory back to the system (glibc ``malloc_trim(0)``; a no-op returning
    False elsewhere). ONNX Runtime parses each graph into heap buffers and frees them once the
    session holds its weights; glibc keeps those pages mapped, so without this the process keeps
    the size of every engine file on top of its weights (ov-0.5b int8: 1,529 MB resident after
    loading, 1,226 MB after the trim). Called after the engines load and after each image."""
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            libc = ctypes.CDLL("libc.so.6")
            _LIBC = libc if hasattr(libc, "malloc_trim") else False
        except OSError:
            _LIBC = False
    if not _LIBC:
        return False
    _LIBC.malloc_trim(0)
    return True


def preload_cuda_libraries() -> str:
    """Load CUDA and cuDNN before the first GPU session (``onnxruntime.preload_dlls``, ORT >= 1.21:
    from a compatible torch, else pip's ``nvidia-*`` packages, else the system's library path), so
    the CUDA / TensorRT providers load with a pip-installed CUDA. Once per process; a no-op where the
    function is absent (older or NVIDIA-built wheels, which use the system's CUDA). Returns what it did."""
    global _PRELOADED
    if _PRELOADED is None:
        import onnxruntime as ort

        fn = getattr(ort, "preload_dlls", None)
        if fn is None:
            _PRELOADED = "onnxruntime has no preload_dlls (system CUDA libraries)"
        else:
            try:
                fn()
                _PRELOADED = "onnxruntime.preload_dlls()"
            except Exception as e:  # noqa: BLE001 - the session creation then names what is missing
                _PRELOADED = f"onnxruntime.preload_dlls() failed: {e}"
    return _PRELOADED


def ort_providers(provider: str, engine: str, manifest: Manifest, calib_dir: str | os.PathLike | None = None) -> list:
    """The ONNX Runtime provider list for one engine (GPU providers checked to exist).

    ``tensorrt`` puts the engines the manifest lists under ``gpu.tensorrt_ep.engines`` on the
    TensorRT EP (its options + the engine's optimisation profile; the engine cache directory made
    absolute under the export directory) and the rest (the LLM) on the CUDA EP.

    INT8 on the TensorRT EP (ONNX Runtime's TensorRT-EP documentation): a QDQ engine runs with
    ``trt_int8_enable`` and no calibration table (TensorRT loads none for a Q/DQ model); an fp32
    engine runs INT8 only with the table ``agvas calibrate`` wrote: ``calib_dir`` (default: the
    environment variable ``AGVAS_TRT_CALIB_DIR``) / ``tensorrt/<engine>/calibration.flatbuffers``,
    ORT's format (``trt_int8_use_native_calibration_table`` false), passed relative to
    ``trt_engine_cache_path`` as the EP reads it. Without one, INT8 is off and no table is named."""
    import onnxruntime as ort

    if provider not in PROVIDERS:
        raise ValueError(f"--provider {provider!r}: expected one of {list(PROVIDERS)}")
    if provider == "cpu":
        return ["CPUExecutionProvider"]
    gpu = manifest.data.get("gpu") or {}
    trt = gpu.get("tensorrt_ep") or {}
    use_trt = provider == "tensorrt" and engine in trt.get("engines", ())
    need = "TensorrtExecutionProvider" if use_trt else "CUDAExecutionProvider"
    have = ort.get_available_providers()
    if need not in have:
        raise ValueError(f"--provider {provider}: this onnxruntime ({ort.__version__}) has no {need} "
                         f"(available: {have}); install onnxruntime-gpu on a CUDA machine")
    cuda = ("CUDAExecutionProvider", dict((gpu.get("cuda_ep") or {}).get("options") or {}))
    if not use_trt:
        return [cuda, "CPUExecutionProvider"]
    from agvas.export.tensorrt import EP_TABLE, calibrate_hint, engine_mode

    opts = {**(trt.get("options") or {}), **((trt.get("per_engine") or {}).get(engine) or {})}
    cache = (manifest.root / opts.get("trt_engine_cache_path", "trt_cache")).resolve()
    opts["trt_engine_cache_path"] = str(cache)
    table_keys = ("trt_int8_calibration_table_name", "trt_int8_use_native_calibration_table")
    for key in table_keys:  # an older manifest's table names: never a path that is not wanted
        opts.pop(key, None)
    try:
        qdq = engine_mode(manifest.data, engine) == "qdq"
    except ValueError:
        qdq = False
    calib_dir = calib_dir if calib_dir is not None else os.environ.get("AGVAS_TRT_CALIB_DIR") or None
    if qdq:
        opts["trt_int8_enable"] = True  # explicit quantization: INT8 on, no table
    elif calib_dir is not None:
        table = (Path(calib_dir) / EP_TABLE.format(engine=engine)).resolve()
        if not table.is_file():
            raise FileNotFoundError(f"engine {engine!r}: no INT8 calibration table {table} "
                                    f"({calibrate_hint(manifest.root, calib_dir)})")
        opts.update(trt_int8_enable=True, trt_int8_use_native_calibration_table=False,
                    trt_int8_calibration_table_name=os.path.relpath(table, cache))
    else:
        opts["trt_int8_enable"] = False
    return [("TensorrtExecutionProvider", opts), cuda, "CPUExecutionProvider"]


class Engine:
    """One ONNX Runtime session. ``run(**feeds)`` casts float feeds to the graph's declared dtype
    (fp16 engines take float32 arrays) and returns float32 outputs by name."""

    def __init__(self, name: str, path: Path, providers: list, threads: int, manifest: Manifest | None,
                 spin: bool = False, arena: bool = False, profile_dir: str | os.PathLike | None = None) -> None:
        import onnxruntime as ort

        if not path.is_file():
            raise FileNotFoundError(f"engine {name!r}: {path} does not exist")
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        # spin-waiting workers cut latency on an idle machine but, on a busy one (or with the
        # overlapped stages of Inspector.stream), steal the cores the other threads need: measured
        # 20x slower for tiny on a loaded 2-core box. Off unless asked for.
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        # the CPU arena keeps each session's peak activation memory for reuse and grows from run to
        # run: with seven sessions the process holds the sum of their peaks (ov-0.5b int8: 9.5 GB
        # after three images with it, 4.8 GB without, same speed). Off by default.
        so.enable_cpu_mem_arena = arena
        if profile_dir is not None:  # ONNX Runtime's profiler: one JSON trace per session (end_profiling)
            Path(profile_dir).mkdir(parents=True, exist_ok=True)
            so.enable_profiling = True
            so.profile_file_prefix = str(Path(profile_dir) / name)
        self.name, self.path = name, path
        if (providers[0] if isinstance(providers[0], str) else providers[0][0]) != "CPUExecutionProvider":
            preload_cuda_libraries()
        self.session = ort.InferenceSession(str(path), so, providers=providers)
        want = providers[0] if isinstance(providers[0], str) else providers[0][0]
        got = self.session.get_providers()
        if want not in got:
            raise RuntimeError(f"engine {name!r}: ONNX Runtime did not enable {want} for {path} "
                               f"(session providers: {got})")
        self.provider = want
        if manifest is not None:
            manifest.verify_session(name, self.session)
        self.inputs = {a.name: a for a in self.session.get_inputs()}
        self.input_dtypes = {a.name: _dtype(a.type) for a in self.session.get_inputs()}
        self.output_names = [a.name for a in self.session.get_outputs()]
        self.runs = 0  # session runs so far (the profiler's summary skips the warm-up image's)

    def feed(self, name: str, x: np.ndarray) -> np.ndarray:
        dt = self.input_dtypes[name]
        return np.ascontiguousarray(x, dtype=dt) if x.dtype != dt or not x.flags.c_contiguous else x

    def run(self, **feeds: np.ndarray) -> dict[str, np.ndarray]:
        outs = self.session.run(None, {k: self.feed(k, v) for k, v in feeds.items()})
        self.runs += 1
        return {n: (o.astype(np.float32) if o.dtype == np.float16 else o) for n, o in zip(self.output_names, outs)}


class NativeTRT:
    """A native TensorRT plan (``runtime/trt_engine.py``, built by ``export/tensorrt.py``) behind
    the :class:`Engine` call shape: ``run(**feeds)`` with float32 outputs."""

    provider = "TensorRT (native)"

    def __init__(self, name: str, plan: Path) -> None:
        from .trt_engine import TRTEngine

        self.name, self.path = name, Path(plan)
        self.trt = TRTEngine(plan)

    def run(self, **feeds: np.ndarray) -> dict[str, np.ndarray]:
        return {n: (o.astype(np.float32) if o.dtype == np.float16 else o) for n, o in self.trt(feeds).items()}


def _dtype(ort_type: str):
    name = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64",
            "tensor(int32)": "int32"}.get(ort_type)
    if name is None:
        raise ManifestError(f"unsupported engine input type {ort_type}")
    return _NP_DTYPES[name]


class LLM:
    """The ``llm`` engine with its KV cache kept in ONNX Runtime's memory (IO binding): the
    present KV of one call is bound as the next call's past without a round trip through numpy.

    ``__call__(embeds [B,S,H], past, logits=True) -> (hidden [B,S,H], logits [B,V] | None, present)``;
    ``past`` is ``None`` for a prefill. Logits (last position) come from the ``lm_head`` engine on
    the last hidden state — the export's one vocabulary-sized matrix — or from the graph's own
    ``logits`` output when an older export has one; ``logits=False`` skips them (the fast path's
    prefill verifies with ``lm_head`` at the answer positions instead). Positions come from the attention mask (manifest
    ``llm.positions = "from_mask"``) or are fed explicitly (``"explicit"``)."""

    def __init__(self, engine: Engine, spec: dict, lm_head=None) -> None:
        self.engine = engine
        self.spec = spec
        self.lm_head = lm_head
        self.graph_logits = "logits" in engine.output_names
        if not self.graph_logits and lm_head is None:
            raise ValueError(f"llm engine {getattr(engine, 'path', '')}: the graph has no logits output and no "
                             "lm_head engine was given")
        kv = spec.get("kv") or {}
        n = int(spec["num_layers"])
        self.past_names = [(kv.get("past_key", "past_key_values.{i}.key").format(i=i),
                            kv.get("past_value", "past_key_values.{i}.value").format(i=i)) for i in range(n)]
        self.present_names = [(kv.get("present_key", "present.{i}.key").format(i=i),
                               kv.get("present_value", "present.{i}.value").format(i=i)) for i in range(n)]
        self.kv_heads, self.head_dim = int(spec["num_kv_heads"]), int(spec["head_dim"])
        self.explicit_positions = spec["positions"] == "explicit"
        self.kv_dtype = engine.input_dtypes[self.past_names[0][0]]
        self.device = "cuda" if engine.provider != "CPUExecutionProvider" else "cpu"

    def empty_past(self, batch: int) -> list:
        import onnxruntime as ort

        z = np.zeros((batch, self.kv_heads, 0, self.head_dim), self.kv_dtype)
        v = ort.OrtValue.ortvalue_from_numpy(z)
        return [(v, v)] * len(self.past_names)

    @staticmethod
    def past_length(past: list) -> int:
        return int(past[0][0].shape()[2])

    def __call__(self, embeds: np.ndarray, past: list | None, logits: bool = True):
        b, s, _ = embeds.shape
        past = past if past is not None else self.empty_past(b)
        p = self.past_length(past)
        io = self.engine.session.io_binding()
        io.bind_cpu_input("inputs_embeds", self.engine.feed("inputs_embeds", embeds))
        io.bind_cpu_input("attention_mask", np.ones((b, p + s), np.int64))
        if self.explicit_positions:
            io.bind_cpu_input("position_ids", np.broadcast_to(np.arange(p, p + s, dtype=np.int64), (b, s)).copy())
        for (kn, vn), (k, v) in zip(self.past_names, past):
            io.bind_ortvalue_input(kn, k)
            io.bind_ortvalue_input(vn, v)
        io.bind_output("hidden_states", "cpu")
        if self.graph_logits:
            io.bind_output("logits", "cpu")
        for kn, vn in self.present_names:
            io.bind_output(kn, self.device)
            io.bind_output(vn, self.device)
        self.engine.session.run_with_iobinding(io)
        self.engine.runs += 1
        outs = io.get_outputs()
        hidden = outs[0].numpy().astype(np.float32, copy=False)
        k = 2 if self.graph_logits else 1
        present = [(outs[k + 2 * i], outs[k + 1 + 2 * i]) for i in range(len(self.present_names))]
        if self.graph_logits:
            return hidden, outs[1].numpy().astype(np.float32, copy=False)[:, -1], present
        return hidden, self.last_logits(hidden) if logits else None, present

    def last_logits(self, hidden: np.ndarray) -> np.ndarray:
        """``[B,V]`` logits of the last position of ``hidden [B,S,H]`` by the ``lm_head`` engine."""
        return self.lm_head.run(hidden_states=np.ascontiguousarray(hidden[:, -1:]))["logits"][:, -1]

    def truncate(self, past: list, length: int, row: int | None = None) -> list:
        """The first ``length`` positions of a KV cache (optionally one batch row) — for the
        fast path's fallback: KV at position i depends only on tokens <= i."""
        import onnxruntime as ort

        rows = slice(None) if row is None else slice(row, row + 1)
        return [tuple(ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(x.numpy()[rows, :, :length]),
                                                       self.device, 0) for x in kv) for kv in past]


class Engines:
    """All engines of an export. ``files`` overrides engine files by name (e.g. a quantized
    ``{"llm": "llm_int4.onnx"}``); an override's IO is checked against the manifest by name.
    ``spin``: let ONNX Runtime's intra-op workers spin-wait; ``arena``: ORT's CPU memory arena
    (see :class:`Engine`).

    ``batch_llm``: run a group of equal-length prompts through the LLM as one batch (``True``) or
    row by row (``False``); ``None`` (default) picks batched on GPU providers and rows on the CPU,
    where ONNX Runtime's GroupQueryAttention gains nothing from a batch. Both give the same
    tokens; ``True`` on the CPU runs (and tests) the GPU's batched code path.

    ``calib_dir``: the ``agvas calibrate`` directory whose TensorRT-EP tables turn INT8 on for the
    fp32 engines on ``provider="tensorrt"`` (see :func:`ort_providers`).

    ``profile_dir``: ONNX Runtime's profiler on every session, one trace per engine in that folder
    (written by :meth:`end_profiling`; ``python -m agvas.benchmarks.profile`` sums it by op type)."""

    def __init__(self, manifest: Manifest, provider: str = "cpu", threads: int | None = None,
                 files: dict[str, str | os.PathLike] | None = None, spin: bool = False, arena: bool = False,
                 batch_llm: bool | None = None, calib_dir: str | os.PathLike | None = None,
                 profile_dir: str | os.PathLike | None = None) -> None:
        self.manifest = manifest
        self.provider = provider
        self.threads = threads or default_threads()
        self.batch_llm = provider != "cpu" if batch_llm is None else bool(batch_llm)
        files = dict(files or {})
        unknown = sorted(set(files) - set(manifest.engines))
        if unknown:
            raise ValueError(f"engine overrides {unknown} are not engines of {manifest.root} "
                             f"(it has {sorted(manifest.engines)})")
        ep = "cuda" if provider == "tensorrt-native" else provider

        def onnx(name: str) -> Engine:
            path = self._path(name, files)
            return Engine(name, path, ort_providers(ep, name, manifest, calib_dir), self.threads,
                          manifest if name not in files else None, spin, arena, profile_dir)

        if provider == "tensorrt-native":
            plans = (manifest.data.get("gpu") or {}).get("tensorrt", {}).get("plans", {})
            self.vision, self.sam_encoder, self.spam, self.agmd = (
                NativeTRT(n, self._path(n, files) if n in files else manifest.root / plans[n])
                for n in NATIVE_TRT_ENGINES)
        else:
            self.vision, self.sam_encoder, self.spam, self.agmd = (onnx(n) for n in NATIVE_TRT_ENGINES)
        self.lm_head = onnx("lm_head")
        self.llm = LLM(onnx("llm"), manifest.llm, self.lm_head)
        self.embed_tokens = self._array("embed_tokens", files)
        self.image_newline = self._array("image_newline", files).astype(np.float32)
        for name in files:
            e = getattr(self, name, None)
            if isinstance(e, Engine):
                _check_names(name, manifest.engine(name), e)
            elif isinstance(e, LLM):
                _check_names(name, manifest.engine(name), e.engine)
        release_memory()  # the parsed graphs' buffers, freed by ONNX Runtime, back to the system

    def _path(self, name: str, files: dict) -> Path:
        if name not in files:
            return self.manifest.engine_path(name)
        p = Path(files[name])
        return p if p.is_absolute() or p.exists() else self.manifest.root / p

    def _array(self, name: str, files: dict) -> np.ndarray:
        return np.load(self._path(name, files), mmap_mode="r", allow_pickle=False)

    def sessions(self) -> dict[str, Engine]:
        """Engine name -> its ONNX Runtime :class:`Engine` (the LLM's own session included)."""
        out = {}
        for n in ("vision", "sam_encoder", "spam", "agmd", "lm_head", "llm"):
            e = getattr(self, n)
            e = e.engine if isinstance(e, LLM) else e
            if isinstance(e, Engine):
                out[n] = e
        return out

    def end_profiling(self) -> dict[str, str]:
        """Engine -> its ONNX Runtime profile trace (sessions created with ``profile_dir``)."""
        return {n: e.session.end_profiling() for n, e in self.sessions().items()
                if e.session.get_session_options().enable_profiling}

    @property
    def providers(self) -> dict[str, str]:
        """Engine -> the provider that actually runs it."""
        out = {n: getattr(self, n).provider for n in ("vision", "sam_encoder", "spam", "agmd", "lm_head")}
        out["llm"] = self.llm.engine.provider
        return out


def _check_names(name: str, entry: dict, engine: Engine) -> None:
    want = sorted(x["name"] for x in entry["inputs"]), sorted(x["name"] for x in entry["outputs"])
    got = sorted(engine.inputs), sorted(engine.output_names)
    if want != got:
        raise ManifestError(f"engine {name!r}: manifest IO {want} but override {engine.path} has {got}")
