"""The calibration directory (``agvas calibrate --out CAL``): captured engine inputs and the fp32
reference outputs, stored compactly as compressed ``.npz`` shards.

Layout::

    CAL/calibration.json            what was captured, from which export, on which images
    CAL/inputs/{engine}-{k:03d}.npz  engine inputs, keys "{sample:05d}/{input name}"
    CAL/reference-{k:03d}.npz        per image "{image:05d}/mask" (packed bits), "/prob", "/anchor_states"
    CAL/tensorrt/{engine}/           TensorRT INT8 files, one per consumer (calibration/readers.py):
                                     tensorrt.cache (trtexec --calib via build_engines.sh --int8 --calib-dir CAL),
                                     calibration.flatbuffers (ONNX Runtime TensorRT EP), calibration.json (the
                                     ranges), entropy.cache (TensorRT's entropy calibration, where it ran)

Float inputs are stored as float16 by default (half the size; readers hand them back as float32;
an array that does not fit float16 is kept float32). Torch-free (numpy only).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from agvas.atomic import atomic_path, write_text_atomic

from .gate import Outputs

STORE_VERSION = 1
META_NAME = "calibration.json"
STORE_DTYPES = ("float16", "float32")


class StoreError(ValueError):
    """A calibration directory that cannot be used; the message names it and what is wrong."""


def _savez(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez_compressed(tmp, **arrays)


def _compact(a: np.ndarray, store_dtype: str) -> np.ndarray:
    a = np.ascontiguousarray(a)
    if store_dtype == "float16" and a.dtype == np.float32 and a.size and np.isfinite(a).all() \
            and float(np.abs(a).max()) < float(np.finfo(np.float16).max):
        return a.astype(np.float16)
    return a


class StoreWriter:
    """Append samples per engine and reference outputs per image; :meth:`close` writes the index."""

    def __init__(self, root: str | os.PathLike, meta: dict[str, Any], shard_size: int = 16,
                 store_dtype: str = "float16") -> None:
        if store_dtype not in STORE_DTYPES:
            raise ValueError(f"store dtype must be one of {STORE_DTYPES}, got {store_dtype!r}")
        self.root = Path(root)
        (self.root / "inputs").mkdir(parents=True, exist_ok=True)
        self.meta = dict(meta)
        self.shard_size = shard_size
        self.store_dtype = store_dtype
        self._pending: dict[str, dict[str, np.ndarray]] = {}
        self._counts: dict[str, int] = {}
        self._shards: dict[str, list[str]] = {}
        self._inputs: dict[str, list[str]] = {}
        self._ref: dict[str, np.ndarray] = {}
        self._ref_shards: list[str] = []
        self._images: list[dict[str, Any]] = []

    def add_sample(self, engine: str, feeds: dict[str, np.ndarray]) -> None:
        """One run of ``engine``: its input feeds by name."""
        i = self._counts.get(engine, 0)
        names = sorted(feeds)
        known = self._inputs.setdefault(engine, names)
        if names != known:
            raise StoreError(f"engine {engine!r}: sample {i} has inputs {names} but earlier samples had {known}")
        pend = self._pending.setdefault(engine, {})
        for k, v in feeds.items():
            pend[f"{i:05d}/{k}"] = _compact(np.asarray(v), self.store_dtype)
        self._counts[engine] = i + 1
        if (i + 1) % self.shard_size == 0:
            self._flush(engine)

    def add_reference(self, name: str, path: str | None, split: str, out: Outputs, prob: np.ndarray | None = None,
                      extra: dict[str, Any] | None = None) -> None:
        """The fp32 export's result for one image (``split``: "calibration" or "held_out")."""
        j = len(self._images)
        mask = np.asarray(out.mask, bool)
        self._ref[f"{j:05d}/mask"] = np.packbits(mask.ravel())
        if prob is not None:
            self._ref[f"{j:05d}/prob"] = np.asarray(prob, np.float16)
        if out.anchor_states is not None:
            self._ref[f"{j:05d}/anchor_states"] = np.asarray(out.anchor_states, np.float32)
        self._images.append({"name": name, "path": path, "split": split, "mask_shape": list(mask.shape),
                             "verdict": bool(out.verdict), "text": out.text, **(extra or {})})
        if len(self._images) % self.shard_size == 0:
            self._flush_ref()

    def _flush(self, engine: str) -> None:
        pend = self._pending.pop(engine, {})
        if not pend:
            return
        shards = self._shards.setdefault(engine, [])
        rel = f"inputs/{engine}-{len(shards):03d}.npz"
        _savez(self.root / rel, pend)
        shards.append(rel)

    def _flush_ref(self) -> None:
        if not self._ref:
            return
        rel = f"reference-{len(self._ref_shards):03d}.npz"
        _savez(self.root / rel, self._ref)
        self._ref_shards.append(rel)
        self._ref = {}

    def close(self) -> "CalibrationStore":
        for engine in list(self._pending):
            self._flush(engine)
        self._flush_ref()
        meta = {
            "store_version": STORE_VERSION, **self.meta, "store_dtype": self.store_dtype,
            "shard_size": self.shard_size, "images": self._images, "reference_shards": self._ref_shards,
            "engines": {e: {"samples": self._counts[e], "inputs": self._inputs[e], "shards": self._shards.get(e, [])}
                        for e in self._counts},
        }
        write_text_atomic(self.root / META_NAME, json.dumps(meta, indent=2) + "\n")
        return CalibrationStore(self.root)


@dataclass
class ReferenceImage:
    name: str
    path: str | None
    split: str
    outputs: Outputs
    prob: np.ndarray | None


class CalibrationStore:
    """A finished calibration directory (read side)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        p = self.root / META_NAME
        if not p.is_file():
            raise FileNotFoundError(f"calibration directory {self.root}: no {META_NAME} "
                                    f"(make one with `agvas calibrate`)")
        try:
            self.meta = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise StoreError(f"{p}: not valid JSON ({e})") from None
        if self.meta.get("store_version") != STORE_VERSION:
            raise StoreError(f"{p}: store_version {self.meta.get('store_version')!r} but this code reads "
                             f"store_version {STORE_VERSION}")

    @property
    def engines(self) -> list[str]:
        return list(self.meta["engines"])

    @property
    def images(self) -> list[dict[str, Any]]:
        return self.meta["images"]

    def count(self, engine: str) -> int:
        return int(self._engine(engine)["samples"])

    def input_names(self, engine: str) -> list[str]:
        return list(self._engine(engine)["inputs"])

    def _engine(self, engine: str) -> dict[str, Any]:
        try:
            return self.meta["engines"][engine]
        except KeyError:
            raise StoreError(f"calibration directory {self.root} has no samples for engine {engine!r}; "
                             f"it has {self.engines}") from None

    def samples(self, engine: str, limit: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        """The captured feeds of ``engine`` in capture order, float arrays as float32."""
        info = self._engine(engine)
        n = 0
        for rel in info["shards"]:
            with np.load(self.root / rel, allow_pickle=False) as z:
                by_sample: dict[str, dict[str, np.ndarray]] = {}
                for key in z.files:
                    idx, _, name = key.partition("/")
                    a = z[key]
                    by_sample.setdefault(idx, {})[name] = a.astype(np.float32) if a.dtype == np.float16 else a
            for idx in sorted(by_sample):
                if limit is not None and n >= limit:
                    return
                yield by_sample[idx]
                n += 1

    def references(self) -> list[ReferenceImage]:
        """The fp32 results for every image, calibration and held-out, in capture order."""
        arrays: dict[str, np.ndarray] = {}
        for rel in self.meta["reference_shards"]:
            with np.load(self.root / rel, allow_pickle=False) as z:
                arrays.update({k: z[k] for k in z.files})
        out = []
        for j, im in enumerate(self.images):
            shape = tuple(im["mask_shape"])
            mask = np.unpackbits(arrays[f"{j:05d}/mask"], count=int(np.prod(shape))).reshape(shape).astype(bool)
            a = arrays.get(f"{j:05d}/anchor_states")
            prob = arrays.get(f"{j:05d}/prob")
            out.append(ReferenceImage(im["name"], im.get("path"), im["split"],
                                      Outputs(mask, bool(im["verdict"]), a, im.get("text", "")),
                                      None if prob is None else prob.astype(np.float32)))
        return out
