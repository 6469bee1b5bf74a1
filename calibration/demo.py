"""Calibration and quantization as steps of ``agvas demo`` (``agvas_train/demo.py``).

:func:`calibrate_and_quantize` is the whole thing as one call; :func:`step_quantize` is the demo
step over the demo's folders: it calibrates on the normal images of the training categories
(``data/*/train/good``), holds out images of the demo's test split (anomalous ones included, so
verdict agreement means something), and writes the cheapest export that holds the default
budget (``--auto``). Add it after the export step::

    from agvas.calibration.demo import step_quantize
    STEPS.append(("quantize", step_quantize))   # reads d.out / "export", writes d.out / "export_quantized"
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

EXPORT_DIR = "export"
CALIBRATION_DIR = "calibration"
QUANTIZED_DIR = "export_quantized"
LOG_FILE = "logs/quantize.log"  # under the demo folder: ONNX Runtime's quantization chatter, our steps


def calibrate_and_quantize(export_dir: str | os.PathLike, out_root: str | os.PathLike,
                           images: list[str] | str, held_out_images: list[str] | str | None = None, *,
                           n: int = 32, held_out: int = 16, auto: bool = True, llm: str = "int4",
                           vision: str = "int8", progress: bool = True, log=print) -> dict[str, Any]:
    """``agvas calibrate`` then ``agvas quantize`` into ``out_root/calibration`` and
    ``out_root/export_quantized``. Reuses a calibration of the same export. Returns a summary
    (paths, precisions, gate numbers, sizes); ``quantized`` is None when the gate failed."""
    import shutil

    from agvas.export.manifest import file_digest

    from .capture import capture
    from .quantized_export import quantize_export
    from .store import CalibrationStore

    export_dir, out_root = Path(export_dir), Path(out_root)
    cal = out_root / CALIBRATION_DIR
    sha = file_digest(export_dir / "manifest.json")[0]
    try:
        store = CalibrationStore(cal)
        reuse = store.meta["export"]["manifest_sha256"] == sha
    except (FileNotFoundError, ValueError, KeyError):
        reuse = False
    if not reuse:
        if cal.exists():
            shutil.rmtree(cal)
        store = capture(export_dir, images, cal, n=n, held_out=held_out, held_src=held_out_images,
                        progress=progress, log=log)
    out = quantize_export(export_dir, cal, out_root / QUANTIZED_DIR, llm=llm, vision=vision, auto=auto,
                          overwrite=True, progress=progress, log=log)

    def size(root: Path) -> int:
        return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())

    g = out.gate
    return {"calibration": str(cal), "quantized": None if out.out_dir is None else str(out.out_dir),
            "precisions": out.choice, "passed": g.passed, "mean_mask_iou": g.mean_mask_iou,
            "min_mask_iou": g.min_mask_iou, "verdict_agreement": g.verdict_agreement,
            "anchor_cosine": g.anchor_cosine, "images": len(g.rows), "fp32_bytes": size(export_dir),
            "quantized_bytes": None if out.out_dir is None else size(out.out_dir)}


def step_quantize(d) -> None:
    """The demo step (``d`` is ``agvas.train.demo.Demo``). The console shows the capture bar, one
    bar over the quantize/gate steps and the one-line result; ONNX Runtime's quantization chatter
    (root-logger INFO/WARNING lines) and our step notes go to ``DIR/logs/quantize.log``."""
    from tqdm import tqdm

    from agvas.quiet import library_log

    export_dir = d.out / EXPORT_DIR
    if not (export_dir / "manifest.json").is_file():
        d.row("quantize", f"skipped: no export at {export_dir}")
        return
    good = sorted(str(p) for p in d.data_dir.glob("*/train/good/*.png"))
    log_path = d.out / LOG_FILE
    with library_log(log_path) as note:
        # imported here: its import-time logging.basicConfig(INFO) finds the file handler and does nothing
        import onnxruntime.quantization.matmul_nbits_quantizer  # noqa: F401

        with tqdm(desc="quantize", unit="step", disable=d.args.no_progress, dynamic_ncols=True) as bar:
            def log(msg: str) -> None:
                note(msg)
                if msg.startswith("quantize: "):
                    bar.update(1)
                    bar.set_postfix_str(msg.removeprefix("quantize: ")[:60], refresh=True)

            s = calibrate_and_quantize(export_dir, d.out, good or [str(d.meta)], [str(d.meta)],
                                       progress=not d.args.no_progress, log=log)
    prec = ", ".join(f"{e} {p}" for e, p in s["precisions"].items() if e != "lm_head")
    if s["quantized"] is None:
        d.row("quantize", f"gate failed ({prec}): mean IoU {s['mean_mask_iou']:.3f}; nothing written "
                          f"(log: {log_path})")
    else:
        d.row("quantize", f"{prec}: {s['fp32_bytes'] / 1e6:.1f} -> {s['quantized_bytes'] / 1e6:.1f} MB; gate on "
                          f"{s['images']} images: mean IoU {s['mean_mask_iou']:.3f}, min {s['min_mask_iou']:.3f}, "
                          f"verdicts {100 * s['verdict_agreement']:.1f}%, anchor cos {s['anchor_cosine']:.4f} "
                          f"-> {s['quantized']} (log: {log_path})")
    print(f"quantize: {d.rows[-1][2]}", flush=True)
