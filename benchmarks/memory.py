"""The memory composition of the runtime process: what an ``Inspector`` holds, by engine and stage.

    python -m agvas.benchmarks.memory EXPORT_DIR [--engine-file llm=llm_int8.onnx ...] [--images N]

In a fresh process it records the resident set (``/proc/self/statm``, file-backed pages
included: a memory-mapped array counts once its pages are touched):

- ``baseline``: python + numpy + onnxruntime imported, nothing loaded;
- ``weights``: per engine, the resident growth while its ONNX Runtime session is created, next
  to the bytes of its files on disk (``held / on disk`` above 1 means the weights are held more
  than once: a pre-packed copy, an unreleased initializer);
- ``activations``: per stage, the high-water mark (``VmHWM``, reset through
  ``/proc/self/clear_refs``) while the stage runs, above the resident set it started from;
- ``retained``: what stays resident after the images, above the loaded engines (allocator
  caches, touched pages of the memory-mapped embedding table; the runtime runs without ONNX
  Runtime's arena and returns freed heap pages after each image);
- ``peak``: the process's high-water mark over loading and every stage;
- ``vocabulary``: the vocabulary-sized arrays of the export (``[V, H]`` or ``[H, V]``), by file.

The same numbers go into the bench record (``memory`` of a runtime run) when ``agvas bench``
measures it."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

MB = 1024.0 * 1024.0


from .stats import current_rss_mb as rss_mb  # noqa: E402 - /proc/self/statm
from .stats import peak_rss_mb as hwm_mb  # noqa: E402 - VmHWM


def reset_hwm() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux ``clear_refs`` value 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def file_mb(path: Path) -> float:
    """Bytes of an engine file and its external-data files (``*.data`` beside it)."""
    total = path.stat().st_size
    for extra in path.parent.glob(path.name + "*.data"):
        total += extra.stat().st_size
    for extra in path.parent.glob(path.stem + ".onnx_data"):
        total += extra.stat().st_size
    return total / MB


class _Peak:
    """Wraps an engine-like object: each call records the stage's peak above the RSS it started at."""

    def __init__(self, inner: Any, stage: str, peaks: dict[str, float]) -> None:
        self._inner, self._stage, self._peaks = inner, stage, peaks

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def _measure(self, fn, *a, **kw):
        reset_hwm()
        start = rss_mb()
        try:
            return fn(*a, **kw)
        finally:
            top = hwm_mb()
            self._peaks[self._stage] = max(self._peaks.get(self._stage, 0.0), top - start)
            self._peaks["_process"] = max(self._peaks.get("_process", 0.0), top)

    def run(self, **feeds):
        return self._measure(self._inner.run, **feeds)

    def __call__(self, *a, **kw):
        return self._measure(self._inner, *a, **kw)


def vocabulary_arrays(export_dir: Path, vocab: int, hidden: int) -> list[dict[str, Any]]:
    """Every array of the export with a ``vocab`` × ``hidden`` shape (either order): ``.npy`` files
    and ONNX initializers (external or inline), with their dtype and bytes."""
    import onnx

    out = []
    for p in sorted(export_dir.glob("*.npy")):
        a = np.load(p, mmap_mode="r")
        if sorted(a.shape[-2:]) == sorted((vocab, hidden)):
            out.append({"file": p.name, "tensor": p.stem, "dtype": str(a.dtype), "mb": a.nbytes / MB})
    for p in sorted(export_dir.glob("*.onnx")):
        m = onnx.load(str(p), load_external_data=False)
        for t in m.graph.initializer:
            dims = list(t.dims)
            if len(dims) >= 2 and sorted(dims[-2:]) == sorted((vocab, hidden)):
                dt = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
                out.append({"file": p.name, "tensor": t.name, "dtype": str(dt),
                            "mb": int(np.prod(dims)) * np.dtype(dt).itemsize / MB})
    return out


def composition(export_dir: str | os.PathLike, engine_files: dict[str, str] | None = None, images: list | None = None,
                threads: int | None = None, vision_tokens: str | None = None) -> dict[str, Any]:
    """Load an :class:`~agvas.runtime.Inspector` engine by engine and inspect ``images``, measuring
    the resident memory as described in the module docstring. Run it in a fresh process."""
    import onnxruntime  # noqa: F401 - part of the baseline

    from agvas.export.manifest import load_manifest
    from agvas.runtime import engines as eng

    export_dir = Path(export_dir)
    baseline = rss_mb()
    weights: dict[str, dict[str, float]] = {}
    real_engine = eng.Engine

    class MeasuredEngine(real_engine):  # records each session's resident growth at load
        def __init__(self, name, path, *a, **kw):
            before = rss_mb()
            super().__init__(name, path, *a, **kw)
            weights[name] = {"resident_mb": rss_mb() - before, "on_disk_mb": file_mb(Path(path))}

    eng.Engine = MeasuredEngine
    try:
        from agvas.runtime import Inspector

        t0 = time.perf_counter()
        insp = Inspector(export_dir, engine_files=engine_files, threads=threads, vision_tokens=vision_tokens)
        load_s = time.perf_counter() - t0
    finally:
        eng.Engine = real_engine
    loaded = rss_mb()
    load_peak = hwm_mb()  # before any reset: the high-water mark of loading (a graph parsed + its session)
    peaks: dict[str, float] = {}
    e = insp.engines
    for name in ("vision", "sam_encoder", "spam", "agmd", "lm_head"):
        setattr(e, name, _Peak(getattr(e, name), name, peaks))
    e.llm = _Peak(e.llm, "llm", peaks)
    results = []
    for img in images or []:
        r = insp.inspect(img)
        results.append({"n_visual": r.n_visual, "fast_path": r.fast_path,
                        "timings_ms": {k: round(v, 1) for k, v in r.timings_ms.items()}})
    after = rss_mb()
    process_peak = max(peaks.pop("_process", 0.0), hwm_mb(), load_peak)
    m = load_manifest(export_dir, verify="none").data
    vocab, hidden = m["llm"]["vocab_size"], m["llm"]["hidden_size"]
    held = sum(w["resident_mb"] for w in weights.values())
    return {
        "export": str(export_dir), "engine_files": engine_files or {}, "images": len(images or []),
        "load_s": load_s, "baseline_mb": baseline, "weights": weights, "weights_resident_mb": held,
        "weights_on_disk_mb": sum(w["on_disk_mb"] for w in weights.values()),
        "loaded_rss_mb": loaded, "load_peak_mb": load_peak, "activations_peak_mb": peaks,
        "after_images_rss_mb": after, "retained_after_images_mb": after - loaded,
        "peak_rss_mb": process_peak,
        "vocabulary_arrays": vocabulary_arrays(export_dir, int(vocab), int(hidden)) if vocab and hidden else [],
        "results": results,
    }


def markdown(c: dict[str, Any]) -> str:
    """The composition as a small markdown table."""
    lines = [f"Memory composition of `{c['export']}` ({c['images']} image(s); MiB, resident):", "",
             "| part | resident MiB | on disk MiB | peak above start MiB |", "|---|---|---|---|",
             f"| python + numpy + onnxruntime | {c['baseline_mb']:,.0f} | | |"]
    for name, w in c["weights"].items():
        act = c["activations_peak_mb"].get(name)
        lines.append(f"| weights: {name} | {w['resident_mb']:,.0f} | {w['on_disk_mb']:,.0f} | "
                     f"{'' if act is None else f'{act:,.0f}'} |")
    lines.append(f"| loaded (all engines) / high-water mark while loading | {c['loaded_rss_mb']:,.0f} / "
                 f"{c['load_peak_mb']:,.0f} | | |")
    lines.append(f"| retained after the images (arena, caches, mmapped tables) | {c['retained_after_images_mb']:,.0f} | | |")
    lines.append(f"| **peak RSS** | {c['peak_rss_mb']:,.0f} | | |")
    vocab = c.get("vocabulary_arrays") or []
    lines += ["", "Vocabulary-sized arrays: " + ("; ".join(f"{v['file']}:{v['tensor']} {v['dtype']} {v['mb']:,.0f} MiB"
                                                     for v in vocab) or "none")]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m agvas.benchmarks.memory", description=__doc__.split("\n\n")[0])
    p.add_argument("export", type=Path)
    p.add_argument("--engine-file", action="append", default=[], metavar="ENGINE=FILE")
    p.add_argument("--image", action="append", default=[], type=Path, help="an image to inspect (repeatable)")
    p.add_argument("--threads", type=int)
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    files = dict(x.split("=", 1) for x in a.engine_file)
    c = composition(a.export, files or None, [str(i) for i in a.image], a.threads)
    print(markdown(c))
    if a.json:
        from agvas.atomic import write_text_atomic

        write_text_atomic(a.json, json.dumps(c, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
