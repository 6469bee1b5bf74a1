"""Helpers shared by the `agvas inspect` drivers: batch (``agvas.runtime.cli``), Ray
(``agvas.runtime.ray_inspect``) and watch (``agvas.runtime.watch``). They import this module, never each
other. Torch-free (``GroundTruth`` imports ``agvas_train`` only when a meta.json is inspected).
"""

from __future__ import annotations

from pathlib import Path


def engine_files(specs: list[str]) -> dict[str, str]:
    """``--engine NAME=FILE`` (repeatable) -> ``{name: file}``."""
    out = {}
    for s in specs:
        name, sep, path = s.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--engine {s!r}: expected NAME=FILE, e.g. llm=llm_int4.onnx")
        out[name] = path
    return out


def gt_label(item) -> dict:
    """The ground-truth fields of a results.jsonl line (a meta.json input), else nothing."""
    return {} if item.anomaly is None else {"category": item.category, "gt_anomaly": bool(item.anomaly)}


class GroundTruth:
    """Metrics against a meta.json's ground truth (``agvas.train.metrics``) for the images
    inspected in this run, and the per-image mask IoU for results.jsonl."""

    def __init__(self) -> None:
        self.stats: dict = {}

    def add(self, item, res) -> dict:
        from agvas.train.data.meta import Record, load_mask
        from agvas.train.metrics import CategoryStats, iou

        fields = gt_label(item)
        if item.anomaly and not item.gt_mask:
            return fields  # no mask for an anomalous image: nothing to compare pixels with
        rec = Record(Path(item.path), Path(item.gt_mask) if item.gt_mask else None, item.category or "", "",
                     bool(item.anomaly))
        try:
            gt = load_mask(rec, res.mask.shape)
        except ValueError as e:
            return {**fields, "gt_error": str(e)}
        self.stats.setdefault(item.category or "all", CategoryStats()).add(res.prob, res.mask, res.verdict, gt,
                                                                         bool(item.anomaly))
        return {**fields, "iou": round(iou(res.mask, gt), 6)}

    def result(self) -> dict | None:
        from agvas.train.metrics import summarize

        return summarize({c: s.compute() for c, s in self.stats.items()}) if self.stats else None


def inspector_options(args, threads: int | None = None) -> dict:
    """The ``Inspector`` keyword arguments an `agvas inspect` run's arguments describe (batch, watch
    and each Ray actor build theirs from here)."""
    opts = dict(provider=args.provider, mode=args.mode, normal_sentence=args.normal_sentence,
                vision_tokens=args.vision_tokens, threads=threads if threads is not None else args.threads,
                fast_path=not args.no_fast_path, threshold=args.threshold, min_area=args.min_area,
                engine_files=engine_files(args.engine), verify=args.verify, max_pixels=args.max_pixels,
                spin=args.spin, arena=args.arena)
    if getattr(args, "batch_llm", None) is not None:
        opts["batch_llm"] = args.batch_llm
    if getattr(args, "calib_dir", None):
        opts["calib_dir"] = args.calib_dir
    return opts


def load_inspector(args):
    """The ``Inspector`` an `agvas inspect` run's arguments describe; an engine / provider
    failure becomes a one-line ``CLIError`` (exit 2) naming --engines."""
    from agvas.cli import CLIError

    from .inspector import Inspector

    engines = Path(args.engines)
    if not engines.is_dir():
        raise FileNotFoundError(f"--engines {engines}: no such export directory")
    try:
        return Inspector(engines, **inspector_options(args))
    except (ValueError, FileNotFoundError):
        raise
    except Exception as e:  # ONNX Runtime / provider failures: an engine error, exit 2
        raise CLIError(f"--engines {engines}: {str(e).strip().splitlines()[0] if str(e).strip() else e!r}") from None


def run_settings(args, insp) -> dict:
    """The ``settings`` block of summary.json for a single-machine run."""
    return {"engines": str(Path(args.engines).resolve()), "provider": args.provider,
            "engine_providers": insp.engines.providers, "mode": insp.mode, "vision_tokens": insp.vision_tokens,
            "threshold": insp.threshold, "min_area": insp.min_area, "batch": args.batch,
            "batch_llm": getattr(insp.engines, "batch_llm", None), "fast_path": insp.fast_path,
            "threads": insp.engines.threads, "spin": args.spin, "arena": args.arena,
            "engine_files": engine_files(args.engine),
            "precision": {n: e["precision"] for n, e in insp.manifest.engines.items()}}
