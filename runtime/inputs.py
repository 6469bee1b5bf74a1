"""What `agvas inspect` reads: files, folders, globs, list files, a meta.json with ground truth.

Each INPUT argument is, in this order of checks:

- a folder: every image file below it (recursively, hidden entries skipped), sorted;
- a ``.json`` file: a zero-shot ``meta.json`` (its ``test`` split; ground truth kept for metrics);
- a ``.txt`` / ``.lst`` / ``.list`` file: one path per line (``#`` comments, relative to the list's
  folder); listed paths that do not exist become per-image errors, not a usage error;
- any other existing file: an image (whatever its name says; decoding decides);
- a glob pattern (``*``, ``?``, ``[``, ``**``): its matches, sorted.

An argument that is none of these is a usage error naming it. Duplicates are inspected once;
anything under the output folder is skipped (so a rerun never inspects its own overlays).
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
LIST_EXTS = (".txt", ".lst", ".list")


@dataclass(frozen=True)
class Item:
    """One image to inspect. ``path`` is the key in results.jsonl; ``name`` the output file stem."""

    path: str
    name: str = ""
    category: str | None = None  # from meta.json
    anomaly: bool | None = None  # ground truth, from meta.json
    gt_mask: str | None = None


def _under(p: Path, folder: Path | None) -> bool:
    if folder is None:
        return False
    try:
        p.resolve().relative_to(folder)
        return True
    except ValueError:
        return False


def _folder_images(folder: Path, skip: Path | None) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and not _under(Path(dirpath) / d, skip))
        out += [Path(dirpath) / f for f in filenames if not f.startswith(".") and f.lower().endswith(IMAGE_EXTS)]
    return sorted(out)


def _list_file(path: Path) -> list[Item]:
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read the list of images ({e})") from None
    items = []
    for line in lines:
        line = line.strip()
        if line and not line.startswith("#"):
            p = Path(line).expanduser()
            items.append(Item(str(p if p.is_absolute() else path.parent / p)))
    return items


def _meta_file(path: Path) -> list[Item]:
    from agvas.train.data.meta import read_meta

    return [Item(str(r.image), category=r.category, anomaly=r.anomaly, gt_mask=str(r.mask) if r.mask else None)
            for r in read_meta(path, "test", require_masks=False)]


def expand_inputs(args: list[str], out_dir: str | os.PathLike | None = None) -> list[Item]:
    """The images named by the INPUT arguments, in order, each with a unique output ``name``."""
    skip = Path(out_dir).resolve() if out_dir is not None else None
    items: list[Item] = []
    for a in args:
        p = Path(a).expanduser()
        if p.is_dir():
            found = [Item(str(f)) for f in _folder_images(p, skip)]
            if not found:
                raise ValueError(f"{a}: folder holds no images ({', '.join(IMAGE_EXTS)})")
        elif p.is_file() and p.suffix.lower() == ".json":
            found = _meta_file(p)
        elif p.is_file() and p.suffix.lower() in LIST_EXTS:
            found = _list_file(p)
        elif p.exists() or os.path.lexists(p):
            found = [Item(str(p))]
        elif glob.has_magic(a):
            found = [Item(m) for m in sorted(glob.glob(os.path.expanduser(a), recursive=True))
                     if not Path(m).is_dir() and not _under(Path(m), skip)]
            if not found:
                raise ValueError(f"{a}: the pattern matches no files")
        else:
            raise FileNotFoundError(f"{a}: no such file, folder or glob match")
        items += found
    if not items:
        raise ValueError("no input images")
    seen: set[str] = set()
    unique = [it for it in items if not (it.path in seen or seen.add(it.path))]
    return name_items(unique)


def name_items(items: list[Item]) -> list[Item]:
    """Output stems: the path relative to the inputs' common folder, ``/`` -> ``__``, extension
    dropped (kept when two inputs would collide)."""
    paths = [os.path.abspath(it.path) for it in items]
    root = os.path.commonpath([os.path.dirname(p) for p in paths])
    rel = [Path(os.path.relpath(p, root)) for p in paths]
    stems = ["__".join(r.with_suffix("").parts) for r in rel]
    counts: dict[str, int] = {}
    for s in stems:
        counts[s] = counts.get(s, 0) + 1
    out, used = [], set()
    for it, r, s in zip(items, rel, stems):
        name = base = safe_name("__".join(r.parts).replace(".", "_") if counts[s] > 1 else s)
        k = 1
        while name in used:  # names that only differ in characters safe_name replaced
            k += 1
            name = f"{base}-{k}"
        used.add(name)
        out.append(Item(it.path, name, it.category, it.anomaly, it.gt_mask))
    return out


def safe_name(name: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-_.=+" else "_" for c in name)
    return keep.lstrip(".") or "image"
