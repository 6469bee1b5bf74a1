"""Export as a step of ``agvas demo`` (``agvas_train/demo.py``): the demo checkpoint → ``DIR/export``.

A second run reuses an export made from the same checkpoint (the manifest records its SHA-256).
"""

from __future__ import annotations

import json
from pathlib import Path

EXPORT_DIR = "export"


def step_export(d) -> None:
    """The demo step (``d`` is ``agvas_train.demo.Demo``)."""
    from agvas_train.checkpoint import checkpoint_hash

    from .exporter import export_checkpoint

    out = d.out / EXPORT_DIR
    digest = checkpoint_hash(d.checkpoint)
    manifest = out / "manifest.json"
    reused = False
    if manifest.is_file() and not d.args.retrain:
        try:
            reused = json.loads(manifest.read_text())["source"]["checkpoint_sha256"] == digest
        except (ValueError, KeyError):
            reused = False
    if not reused:
        export_checkpoint(d.checkpoint, out, overwrite=True)
    m = json.loads(manifest.read_text())
    files = sorted({p for p in out.rglob("*") if p.is_file()})
    size = sum(p.stat().st_size for p in files)
    d.row("export", f"{'reused ' if reused else ''}{len(m['engines'])} engines "
                    f"({', '.join(m['engines'])}), {size / 1e6:.1f} MB -> {manifest}")
