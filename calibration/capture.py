"""Calibration capture: run the fp32 export over production images and store what every engine
sees, plus the fp32 results the accuracy gate compares against.

The runtime's :class:`runtime.Inspector` runs the images; capture only wraps what it exposes:

- ``Engine.session`` of ``vision``, ``sam_encoder``, ``spam``, ``lm_head`` and ``agmd`` is replaced
  by a recording proxy of the ONNX Runtime session (its ``run`` feeds are stored as given —
  already cast to the graph's dtypes);
- ``engines.llm`` (its ``LLM`` object, which drives the session through IO binding) is wrapped:
  every *prefill* (``past is None``) is stored in the graph's own input names —
  ``inputs_embeds`` (the real multimodal prompt: template tokens + ``concat(f_s, f_align)``,
  plus the forced answer on the fast path), ``attention_mask``, empty ``past_key_values.*``.
  Decode steps are not stored (their inputs are a KV cache).

Images come from a folder, glob, list file or ``meta.json`` (``agvas.runtime.inputs.expand_inputs``);
a seeded shuffle picks ``n`` calibration images and ``held_out`` others (from the same source or
from ``held_src``), whose inputs are not stored (the gate measures them as unseen data).
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .gate import Outputs
from .store import CalibrationStore, StoreWriter

RECORDED_ENGINES = ("vision", "sam_encoder", "spam", "lm_head", "agmd")
TENSORRT_ENGINES = ("vision", "sam_encoder", "spam", "agmd")


class _RecordingSession:
    """An ``onnxruntime.InferenceSession`` stand-in that stores the feeds of every ``run``."""

    def __init__(self, session, sink: Callable[[dict[str, np.ndarray]], None]) -> None:
        self._session = session
        self._sink = sink

    def run(self, output_names, input_feed, run_options=None):
        self._sink({k: np.asarray(v) for k, v in input_feed.items()})
        return self._session.run(output_names, input_feed, run_options)

    def __getattr__(self, name: str):
        return getattr(self._session, name)


class _RecordingLLM:
    """Wraps the runtime's ``LLM``: stores each prefill's feeds in the graph's input names."""

    def __init__(self, llm, sink: Callable[[dict[str, np.ndarray]], None]) -> None:
        self._llm = llm
        self._sink = sink

    def __call__(self, embeds: np.ndarray, past, logits: bool = True):
        if past is None:
            b, s, _ = embeds.shape
            llm = self._llm
            feeds = {"inputs_embeds": np.asarray(embeds, np.float32), "attention_mask": np.ones((b, s), np.int64)}
            if llm.explicit_positions:
                feeds["position_ids"] = np.broadcast_to(np.arange(s, dtype=np.int64), (b, s)).copy()
            empty = np.zeros((b, llm.kv_heads, 0, llm.head_dim), llm.kv_dtype)
            for kn, vn in llm.past_names:
                feeds[kn] = feeds[vn] = empty
            self._sink(feeds)
        return self._llm(embeds, past, logits)

    def __getattr__(self, name: str):
        return getattr(self._llm, name)


def _images(src: list[str] | str, flag: str) -> list:
    from agvas.runtime.inputs import expand_inputs

    items = [it for it in expand_inputs([src] if isinstance(src, str) else list(src)) if Path(it.path).is_file()]
    if not items:
        raise ValueError(f"{flag} {src}: no image files found")
    return items


def select_images(src: list[str] | str, n: int, held_out: int, seed: int = 0,
                  held_src: list[str] | str | None = None) -> tuple[list, list]:
    """``(calibration items, held-out items)``, each a seeded shuffle. Held-out images come from
    ``held_src`` when given (e.g. a ``meta.json`` with anomalous images; calibration images are
    excluded from it), else from SRC (fewer images than ``n + held_out``: a quarter at most is
    held out, the rest calibrates)."""
    items = _images(src, "--images")
    random.Random(seed).shuffle(items)
    if held_src is not None:
        calib = items[:n]
        seen = {str(Path(it.path).resolve()) for it in calib}
        held = [it for it in _images(held_src, "--held-out-images") if str(Path(it.path).resolve()) not in seen]
        random.Random(seed).shuffle(held)
        return calib, held[:held_out]
    if len(items) < n + held_out:
        held_out = min(held_out, len(items) // 4)
        n = len(items) - held_out
    return items[:n], items[n:n + held_out]


def capture(engines_dir: str | os.PathLike, src: list[str] | str, out_dir: str | os.PathLike, *, n: int = 64,
            held_out: int = 16, held_src: list[str] | str | None = None, seed: int = 0, provider: str = "cpu",
            threads: int | None = None,
            vision_tokens: str | None = None, store_dtype: str = "float16", shard_size: int = 16,
            tensorrt: bool = True, progress: bool = True, log: Callable[[str], None] = print) -> CalibrationStore:
    """Run the fp32 export ``engines_dir`` over the images of ``src``; write ``out_dir``."""
    from tqdm import tqdm

    from agvas.export.manifest import file_digest
    from agvas.runtime import Inspector

    engines_dir, out_dir = Path(engines_dir), Path(out_dir)
    insp = Inspector(engines_dir, provider=provider, mode="direct", vision_tokens=vision_tokens, threads=threads)
    m = insp.manifest
    not_fp32 = {k: e["precision"] for k, e in m.engines.items() if e["format"] == "onnx" and e["precision"] != "fp32"}
    if not_fp32:
        raise ValueError(f"--engines {engines_dir}: calibration needs the fp32 export, but engines {not_fp32} "
                         f"are not fp32")
    calib, held = select_images(src, n, held_out, seed, held_src)
    meta: dict[str, Any] = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "export": {"dir": str(engines_dir.resolve()), "manifest_sha256": file_digest(m.root / "manifest.json")[0],
                   "checkpoint_sha256": m.data["source"]["checkpoint_sha256"],
                   "config_name": m.data["source"]["config_name"]},
        "source": src if isinstance(src, str) else list(src),
        "held_out_source": held_src if held_src is None or isinstance(held_src, str) else list(held_src),
        "seed": seed, "provider": provider,
        "mode": "direct", "fast_path": insp.fast_path, "vision_tokens": insp.vision_tokens,
        "threshold": insp.threshold,
    }
    writer = StoreWriter(out_dir, meta, shard_size=shard_size, store_dtype=store_dtype)
    recording = {"on": True}

    def sink(engine: str) -> Callable[[dict[str, np.ndarray]], None]:
        def add(feeds: dict[str, np.ndarray]) -> None:
            if recording["on"]:
                writer.add_sample(engine, feeds)
        return add

    e = insp.engines
    for name in RECORDED_ENGINES:
        eng = getattr(e, name)
        eng.session = _RecordingSession(eng.session, sink(name))
    e.llm = _RecordingLLM(e.llm, sink("llm"))

    skipped = []
    bar = tqdm([(it, "calibration") for it in calib] + [(it, "held_out") for it in held], desc="calibrate",
               unit="img", disable=not progress)
    for item, split in bar:
        recording["on"] = split == "calibration"
        try:
            r = insp.inspect(item.path)
        except Exception as ex:  # noqa: BLE001 - a bad image is skipped and reported, the rest goes on
            skipped.append({"path": str(item.path), "error": str(ex).splitlines()[0] if str(ex) else type(ex).__name__})
            continue
        writer.add_reference(item.name, str(Path(item.path).resolve()), split, Outputs.of(r), prob=r.prob,
                             extra={"anchors_found": bool(r.anchors_found), "fast_path": r.fast_path,
                                    "n_visual": int(r.n_visual)})
    writer.meta["skipped"] = skipped
    store = writer.close()
    if skipped:
        log(f"calibrate: skipped {len(skipped)} image(s): " + "; ".join(f"{s['path']}: {s['error']}" for s in skipped[:5]))
    if tensorrt:
        store = write_tensorrt_calibration(store, m, progress=progress, log=log)
    return store


def write_tensorrt_calibration(store: CalibrationStore, manifest, progress: bool = True,
                               log: Callable[[str], None] = print) -> CalibrationStore:
    """The TensorRT calibration files of the vision-side engines, under ``CAL/tensorrt/<engine>/``,
    one per consumer (paths as ``agvas.export.tensorrt`` reads them):

    - ``calibration.flatbuffers``: the ONNX Runtime TensorRT EP's table (ORT's format:
      ``trt_int8_use_native_calibration_table`` false);
    - ``tensorrt.cache``: the same min-max ranges in TensorRT's cache format, for
      ``build_engines.sh --int8 --calib-dir CAL`` (``trtexec --calib``; the script sets its header
      to the installed TensorRT version);
    - ``entropy.cache``: TensorRT's own entropy calibration, only where ``tensorrt`` and
      ``cuda-python`` import (else the reason is recorded; ``python -m agvas.export.tensorrt --int8
      --calib-dir CAL`` calibrates on the target from the same samples).

    The record goes into ``calibration.json`` under ``tensorrt``."""
    import json

    from agvas.atomic import write_text_atomic
    from agvas.export.tensorrt import ENTROPY_CACHE, profiles

    from .readers import StoreReader, tensorrt_entropy_cache, tensorrt_ep_table
    from .store import META_NAME

    max_batch = int(((manifest.data.get("gpu") or {}).get("tensorrt") or {}).get("max_batch", 4))
    profs = profiles(manifest.data, max_batch)
    rec: dict[str, Any] = {}
    for name in TENSORRT_ENGINES:
        if name not in store.engines:
            continue
        out = store.root / "tensorrt" / name
        path = manifest.engine_path(name)
        r = tensorrt_ep_table(path, StoreReader(store, name), out)
        r["native_cache"] = tensorrt_entropy_cache(path, store, name, manifest.engine(name)["inputs"], profs[name],
                                                   store.root / ENTROPY_CACHE.format(engine=name))
        rec[name] = {**r, "dir": f"tensorrt/{name}"}
    skipped = {r["native_cache"]["skipped"] for r in rec.values() if "skipped" in r["native_cache"]}
    if skipped:
        log(f"calibrate: TensorRT entropy caches skipped: {skipped.pop()}")
    meta = dict(store.meta)
    meta["tensorrt"] = rec
    write_text_atomic(store.root / META_NAME, json.dumps(meta, indent=2) + "\n")
    return CalibrationStore(store.root)
