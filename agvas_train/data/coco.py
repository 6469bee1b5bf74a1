"""Small helpers shared by the COCO-format readers (REFER, PASCAL-Part, PACO-LVIS, PartImageNet):
reading an ``instances``-style JSON, decoding one annotation's segmentation (polygons,
uncompressed or compressed RLE) to a mask, and finding an image among candidate folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def read_coco(path: Path) -> dict:
    """A COCO-format JSON with ``images``, ``annotations`` and ``categories`` lists."""
    from .sources import read_json

    data = read_json(path, "a COCO-format JSON")
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations", "categories")):
        raise ValueError(f"{path}: expected a COCO-format JSON with 'images', 'annotations' and 'categories' lists")
    return data


def ann_mask(segmentation, height: int, width: int) -> np.ndarray:
    """bool ``[height, width]`` of a COCO ``segmentation``: a list of polygons, an uncompressed
    RLE (``counts`` a list, e.g. crowd regions) or a compressed RLE (``counts`` a string)."""
    from pycocotools import mask as mask_utils

    if not segmentation:
        return np.zeros((height, width), bool)
    if isinstance(segmentation, list):  # polygons [[x0, y0, x1, y1, ...], ...]
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation.get("counts"), list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        counts = segmentation["counts"]
        rle = {"size": segmentation["size"], "counts": counts.encode() if isinstance(counts, str) else counts}
    m = mask_utils.decode(rle)
    return (m.reshape(height, width, -1).max(-1) if m.ndim == 3 else m).astype(bool)


def first_dir(candidates, what: str) -> Path:
    """The first existing folder of ``candidates`` (error naming them all otherwise)."""
    candidates = [Path(c) for c in candidates if c]
    for c in candidates:
        if c.is_dir():
            return c
    raise FileNotFoundError(f"{what}: no image folder; looked in {', '.join(map(str, candidates))}")


def first_file(candidates, what: str) -> Path:
    candidates = [Path(c) for c in candidates]
    for c in candidates:
        if c.is_file():
            return c
    raise FileNotFoundError(f"{what}: expected one of {', '.join(map(str, candidates))}")
