"""Inspection as the last step of ``agvas demo`` (``agvas_train/demo.py``): ``agvas inspect`` over the
demo's held-out test split with the quantized export when the accuracy gate let one be written,
else the fp32 export — engines only, no PyTorch model — ending at ``DIR/inspect/report.html``."""

from __future__ import annotations

import json
from pathlib import Path

INSPECT_DIR = "inspect"


def pick_engines(out: Path) -> Path | None:
    """The quantized export when present, else the fp32 one, else None."""
    for name in ("export_quantized", "export"):
        if (out / name / "manifest.json").is_file():
            return out / name
    return None


def step_inspect(d) -> None:
    """The demo step (``d`` is ``agvas.train.demo.Demo``)."""
    from agvas.cli import main

    engines = pick_engines(d.out)
    if engines is None:
        d.row("inspect", f"skipped: no export in {d.out}")
        return
    out = d.out / INSPECT_DIR
    argv = ["inspect", str(d.meta), "--engines", str(engines), "--out", str(out), "--batch", "4", "--overwrite"]
    code = main(argv)
    s = json.loads((out / "summary.json").read_text())
    c, lat = s["counts"], s["latency_ms"]["total"]
    m = (s.get("metrics") or {}).get("mean") or {}  # ground truth: the meta.json's test split
    iou = "" if m.get("iou_ano") is None else f", IoU_ano {100 * m['iou_ano']:.1f}, IoU_nor {100 * m['iou_nor']:.1f}"
    d.row("inspect", f"{engines.name}: {c['images']} held-out images, {c['anomalous']} anomalous, {c['failed']} failed"
                     f"{iou}; p50 {lat.get('p50_ms') or 0:.1f} ms/image, {s['run'].get('images_per_s') or 0:.1f} images/s "
                     f"(exit {code}) -> {out / 'report.html'}")
