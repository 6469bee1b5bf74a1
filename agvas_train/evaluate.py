"""Evaluation of any predictor on a ``meta.json`` split (the zero-shot protocol).

A *predictor* is anything with ``__call__(image)`` or ``inspect(image)`` (image: a path)
returning an object with ``.prob`` (float [H,W] at the image's size), ``.mask`` (bool [H,W])
and ``.verdict``: the PyTorch reference (:class:`agvas.train.reference.ReferencePipeline`), the
runtime over an export (``runtime.Inspector``), or :class:`EmptyPredictor` (the empty-mask
baseline).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from agvas.imageio import load_image

from .data.meta import Record, load_mask, read_meta
from .metrics import CategoryStats, Protocol, summarize


@dataclass
class Prediction:
    prob: np.ndarray
    mask: np.ndarray
    verdict: bool


class EmptyPredictor:
    """The empty-mask baseline: P = 0 everywhere, no anomaly anywhere."""

    def __call__(self, image) -> Prediction:
        im = load_image(image)
        return Prediction(np.zeros((im.height, im.width), np.float32), np.zeros((im.height, im.width), bool), False)


def as_predictor(obj: Any) -> Callable:
    """``obj.inspect`` when it has one (the runtime's Inspector), else ``obj`` itself."""
    fn = getattr(obj, "inspect", None)
    if callable(fn):
        return fn
    if callable(obj):
        return obj
    raise TypeError(f"{type(obj).__name__} is not a predictor (needs __call__(image) or inspect(image))")


def checkpoint_predictor(checkpoint: str | Path, mode: str = "direct", vision_tokens: str = "anyres",
                         normal_sentence: str | None = None, device: str = "cpu") -> Callable:
    """The PyTorch reference over a checkpoint (on ``device``: cpu or cuda)."""
    from .reference import ReferencePipeline

    pipe = ReferencePipeline.from_checkpoint(checkpoint, device=device)

    def predict(image):
        return pipe(image, mode=mode, normal_sentence=normal_sentence, vision_tokens=vision_tokens)

    return predict


def engines_predictor(export_dir: str | Path, provider: str = "cpu", mode: str = "direct", **kw) -> Callable:
    """The runtime over an export directory (``runtime.Inspector(export_dir, provider=, mode=,
    **kw)``), imported lazily."""
    try:
        from agvas.runtime import Inspector
    except ImportError as e:
        raise ValueError(f"--engines {export_dir}: the runtime (runtime.Inspector) is not available: {e}") from None
    return as_predictor(Inspector(export_dir, provider=provider, mode=mode, **kw))


def evaluate(predictor: Any, records: list[Record], protocol: Protocol | None = None,
             progress: bool = True, on_error: str = "raise") -> dict:
    """Run ``predictor`` on every record and compute the metrics (:func:`metrics.summarize`).

    ``on_error="skip"`` records per-image failures under ``"errors"`` and goes on."""
    from tqdm import tqdm

    predict = as_predictor(predictor)
    protocol = protocol or Protocol()
    stats: dict[str, CategoryStats] = {}
    errors: list[dict] = []
    for rec in tqdm(records, desc="eval", unit="img", disable=not progress, dynamic_ncols=True):
        try:
            im = load_image(rec.image)
            gt = load_mask(rec, (im.height, im.width))
            out = predict(str(rec.image))
            prob, mask = np.asarray(out.prob), np.asarray(out.mask).astype(bool)
            if prob.shape != gt.shape:
                raise ValueError(f"{rec.image}: predictor returned a {prob.shape} map for a {gt.shape} image")
            stats.setdefault(rec.category, CategoryStats(protocol=protocol)).add(
                prob, mask, bool(out.verdict), gt, rec.anomaly)
        except Exception as e:  # noqa: BLE001 - reported per image
            if on_error != "skip":
                raise
            errors.append({"image": str(rec.image), "error": f"{type(e).__name__}: {e}"})
    if not stats:
        raise ValueError(f"no image could be evaluated ({len(errors)} errors; first: {errors[:1]})")
    result = summarize({cat: s.compute() for cat, s in stats.items()})
    result["protocol"] = {"resize": protocol.resize, "sigma": protocol.sigma}
    if errors:
        result["errors"] = errors
    return result


def evaluate_meta(predictor: Any, meta: str | Path, split: str = "test", categories: list[str] | None = None,
                  limit: int | None = None, **kw) -> dict:
    """:func:`evaluate` on ``split`` of a meta file. ``limit``: at most N images per category,
    evenly spaced through the file's order (so both normal and anomalous images are kept)."""
    records = read_meta(meta, split, categories)
    if limit:
        by_cat: dict[str, list[Record]] = {}
        for r in records:
            by_cat.setdefault(r.category, []).append(r)
        records = [recs[int(i)] for recs in by_cat.values()
                   for i in np.unique(np.linspace(0, len(recs) - 1, min(limit, len(recs))).round())]
    result = evaluate(predictor, records, **kw)
    result["data"] = {"meta": str(meta), "split": split, "limit": limit}
    return result
