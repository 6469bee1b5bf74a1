"""A plain folder or glob of images (inspection input, or unlabelled evaluation)."""

from __future__ import annotations

import glob
from pathlib import Path

from .meta import IMAGE_EXTS


def list_images(source: str | Path, recursive: bool = False) -> list[Path]:
    """Images of ``source``: a file, a folder (its image files, sorted; ``recursive`` descends)
    or a glob pattern (``"shots/*.png"``). An empty result is an error naming the source."""
    src = str(source)
    p = Path(src)
    if p.is_file():
        return [p]
    if p.is_dir():
        it = p.rglob("*") if recursive else p.iterdir()
        out = sorted(q for q in it if q.is_file() and q.suffix.lower() in IMAGE_EXTS)
        if not out:
            raise ValueError(f"{src}: folder has no images (extensions {', '.join(IMAGE_EXTS)})")
        return out
    if any(c in src for c in "*?["):
        out = sorted(Path(q) for q in glob.glob(src, recursive=True) if Path(q).is_file())
        if not out:
            raise ValueError(f"{src}: glob matches no files")
        return out
    raise FileNotFoundError(f"{src}: no such file, folder or glob pattern")
