"""The zero-shot community's ``meta.json`` (DESIGN §5) and the MVTec folder layout.

Two forms are read:

- **AnomalyCLIP** — ``ROOT/meta.json``, paths relative to ``ROOT``;
- **Bayes-PFL** — ``meta_<name>.json`` beside the dataset folders, paths prefixed with the
  dataset folder (``KSDD2/Metal/test/...``), an extra ``dataset_name`` field, and placeholder
  records with an empty ``img_path`` in ``train``.

Both are ``{"train": {cls: [rec, ...]}, "test": {cls: [rec, ...]}}`` with records
``{"img_path", "mask_path", "cls_name", "specie_name", "anomaly"}``. Masks are binarised
(> 127 of 255 for 8-bit masks); a missing mask or one whose size differs from its image is an
error naming the file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

SCHEMA_KEYS = ("img_path", "mask_path", "cls_name", "specie_name", "anomaly")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
SPLITS = ("train", "test")


@dataclass(frozen=True)
class Record:
    """One labelled image; paths are resolved (absolute)."""

    image: Path
    mask: Path | None  # None for normal images (empty mask)
    category: str
    specie: str  # defect kind, "good" for normal
    anomaly: bool


def _bayes_pfl_form(path: Path, data: dict) -> bool:
    if path.name.startswith("meta_"):
        return True
    for split in data.values():
        for recs in (split.values() if isinstance(split, dict) else []):
            return bool(recs) and isinstance(recs[0], dict) and "dataset_name" in recs[0]
    return False


def read_meta(path: str | Path, split: str = "test", categories: list[str] | None = None,
              root: str | Path | None = None, require_masks: bool = True) -> list[Record]:
    """Records of ``split`` (``train``, ``test`` or ``all``) in file order. ``path`` is a meta
    file, or a dataset folder (its ``meta.json``, else its MVTec layout scanned in memory).

    ``root`` overrides the dataset root (default: the meta file's folder; for the Bayes-PFL form
    paths that do not resolve there are tried from its parent). ``require_masks``: an anomalous
    record without ``mask_path`` is an error (pixel metrics need it)."""
    path = Path(path)
    if path.is_dir():  # a dataset folder: its meta.json, else a scan of its MVTec layout
        if (path / "meta.json").is_file():
            path = path / "meta.json"
        else:
            data, path = meta_from_mvtec(path), path / "meta.json"
    elif not path.is_file():
        raise FileNotFoundError(f"{path}: meta file not found")
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or not any(k in data for k in SPLITS):
        raise ValueError(f"{path}: expected an object with 'train' and/or 'test' splits, got "
                         f"{type(data).__name__} with keys {sorted(data)[:5] if isinstance(data, dict) else '-'}")
    splits = SPLITS if split == "all" else (split,)
    if split not in (*SPLITS, "all"):
        raise ValueError(f"split must be one of {(*SPLITS, 'all')}, got {split!r}")
    bayes = _bayes_pfl_form(path, data)
    roots = [Path(root)] if root else ([path.parent, path.parent.parent] if bayes else [path.parent])
    out: list[Record] = []
    for sp in splits:
        part = data.get(sp, {})
        if not isinstance(part, dict):
            raise ValueError(f"{path}: split '{sp}' must map category -> list of records, got {type(part).__name__}")
        for cls, recs in part.items():
            if categories and cls not in categories:
                continue
            if not isinstance(recs, list):
                raise ValueError(f"{path}: {sp}/{cls} must be a list of records, got {type(recs).__name__}")
            for i, rec in enumerate(recs):
                where = f"{path}: {sp}/{cls}[{i}]"
                if not isinstance(rec, dict) or not all(k in rec for k in SCHEMA_KEYS):
                    missing = [k for k in SCHEMA_KEYS if not isinstance(rec, dict) or k not in rec]
                    raise ValueError(f"{where}: record lacks {missing} (expected keys {list(SCHEMA_KEYS)})")
                if not rec["img_path"]:
                    if bayes:  # Bayes-PFL's placeholder train records
                        continue
                    raise ValueError(f"{where}: empty img_path")
                anomaly = _as_flag(rec["anomaly"], where)
                image = _resolve(rec["img_path"], roots, f"{where}: image")
                mask = None
                if anomaly:
                    if rec["mask_path"]:
                        mask = _resolve(rec["mask_path"], roots, f"{where}: mask")
                    elif require_masks:
                        raise ValueError(f"{where}: anomalous image {rec['img_path']} has no mask_path")
                out.append(Record(image, mask, str(rec["cls_name"] or cls), str(rec["specie_name"]), anomaly))
    if not out:
        raise ValueError(f"{path}: no records in split {split!r}"
                         + (f" for categories {categories}" if categories else ""))
    return out


def _as_flag(v, where: str) -> bool:
    if v in (0, 1, True, False):
        return bool(v)
    raise ValueError(f"{where}: 'anomaly' must be 0 or 1, got {v!r}")


def _resolve(rel: str, roots: list[Path], what: str) -> Path:
    for r in roots:
        p = r / rel
        if p.is_file():
            return p
    raise FileNotFoundError(f"{what} {rel} not found under {roots[0]}")


def load_mask(record: Record, size: tuple[int, int]) -> np.ndarray:
    """The binary mask ``[H, W]`` of ``record`` for an image of ``size = (H, W)``; all False
    for normal images. Grayscale masks are binarised at half their range (> 127 for 8-bit)."""
    h, w = size
    if record.mask is None:
        if record.anomaly:
            raise ValueError(f"{record.image}: anomalous image without a mask")
        return np.zeros((h, w), bool)
    try:
        with Image.open(record.mask) as im:
            arr = np.asarray(im)
    except Exception as e:
        raise ValueError(f"{record.mask}: cannot read mask: {e}") from None
    if arr.ndim == 3:
        arr = arr.max(-1)
    if arr.shape != (h, w):
        raise ValueError(f"{record.mask}: mask is {arr.shape[1]}x{arr.shape[0]} but its image {record.image} "
                         f"is {w}x{h}")
    hi = 1 if arr.dtype == bool or arr.max() <= 1 else (65535 if arr.dtype == np.uint16 and arr.max() > 255 else 255)
    return arr > hi / 2 if hi > 1 else arr.astype(bool)


# ---- MVTec layout -> meta.json --------------------------------------------------------------


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS) if folder.is_dir() else []


def meta_from_mvtec(root: str | Path) -> dict:
    """Scan an MVTec-layout folder (``{cat}/train/good``, ``{cat}/test/{good|kind}``,
    ``{cat}/ground_truth/{kind}/{stem}_mask.png``) into a meta dict (paths relative to root).
    A defect image without its mask is an error naming both paths."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: dataset folder not found")
    meta: dict[str, dict[str, list]] = {"train": {}, "test": {}}
    cats = sorted(p for p in root.iterdir() if p.is_dir() and ((p / "test").is_dir() or (p / "train").is_dir()))
    if not cats:
        raise ValueError(f"{root}: no MVTec-layout categories (expected {root}/CATEGORY/test/...)")
    for cat in cats:
        for img in _images(cat / "train" / "good"):
            meta["train"].setdefault(cat.name, []).append(
                dict(zip(SCHEMA_KEYS, (img.relative_to(root).as_posix(), "", cat.name, "good", 0))))
        for kind_dir in sorted(p for p in (cat / "test").iterdir() if p.is_dir()) if (cat / "test").is_dir() else []:
            kind = kind_dir.name
            for img in _images(kind_dir):
                mask_rel = ""
                if kind != "good":
                    gt = cat / "ground_truth" / kind
                    cands = [gt / f"{img.stem}_mask.png", gt / f"{img.stem}.png"] + \
                            [gt / f"{img.stem}{e}" for e in IMAGE_EXTS if e != ".png"]
                    mask = next((c for c in cands if c.is_file()), None)
                    if mask is None:
                        raise FileNotFoundError(f"{img}: no mask in {gt} (expected {img.stem}_mask.png)")
                    mask_rel = mask.relative_to(root).as_posix()
                meta["test"].setdefault(cat.name, []).append(dict(zip(
                    SCHEMA_KEYS, (img.relative_to(root).as_posix(), mask_rel, cat.name, kind, int(kind != "good")))))
    return meta


def write_meta(root: str | Path, meta: dict | None = None, name: str = "meta.json") -> Path:
    """Write ``meta`` (default: :func:`meta_from_mvtec(root)`) to ``root/name`` atomically."""
    from agvas.atomic import write_text_atomic

    meta = meta if meta is not None else meta_from_mvtec(root)
    out = Path(root) / name
    write_text_atomic(out, json.dumps(meta, indent=1))
    return out
