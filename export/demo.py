"""Export as a step of ``agvas demo`` (``agvas_train/demo.py``): the demo checkpoint → ``DIR/export``.

A second run reuses an export made from the same checkpoint (the manifest records its SHA-256).
"""

from __future__ import annotations

EXPORT_DIR = "export"


def step_export(d) -> None:
    """The demo step (``d`` is ``agvas.train.demo.Demo``)."""
    from agvas.train.checkpoint import checkpoint_hash

    from .exporter import export_checkpoint
    from .manifest import ManifestError, load_manifest

    out = d.out / EXPORT_DIR
    digest = checkpoint_hash(d.checkpoint)
    reused = False
    if not d.args.retrain:
        try:  # an intact export of this very checkpoint
            manifest = load_manifest(out, checkpoint_sha256=digest, verify="bytes")
            reused = True
        except (FileNotFoundError, ManifestError):
            pass
    if not reused:
        export_checkpoint(d.checkpoint, out, overwrite=True)
        manifest = load_manifest(out, verify="none")
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    d.row("export", f"{'reused ' if reused else ''}{len(manifest.engines)} engines "
                    f"({', '.join(manifest.engines)}), {size / 1e6:.1f} MB -> {out / 'manifest.json'}")
