"""Semantic-token packing in numpy: HF LLaVA-OneVision's ``pack_image_features``.

The `vision` engine returns unpacked features ``[1 + rows*cols, T, H]`` (the base tile first).
``anyres`` packing (what ``AGVAS.semantic_features`` does through HF): lay the grid tiles out
as one ``[H, rows*t, cols*t]`` feature map, remove the rows/columns that correspond to the
centre padding, downsample bilinearly if larger than ``anyres_max_N`` allows, append
``image_newline`` at the end of every row, flatten, and put the base tile's T tokens first.
``base`` packing: the base tile's tokens + one newline.
"""

from __future__ import annotations

import math

import numpy as np

from .interpolate import resize_bilinear
from .preprocess import SiglipParams, grid_shape


def unpad_shape(current_hw: tuple[int, int], original_hw: tuple[int, int]) -> tuple[slice, slice]:
    """Rows/cols of the grid feature map that hold the image (HF ``unpad_image``)."""
    ch, cw = current_hw
    oh, ow = original_hw
    if ow / oh > cw / ch:
        new_h = int(round(oh * (cw / ow), 7))
        pad = (ch - new_h) // 2
        return slice(pad, ch - pad), slice(0, cw)
    new_w = int(round(ow * (ch / oh), 7))
    pad = (cw - new_w) // 2
    return slice(0, ch), slice(pad, cw - pad)


def max_tiles(vision_aspect_ratio: str) -> int:
    """``"anyres_max_9"`` -> 9 (HF strips the characters of ``anyres_max_``)."""
    return int(vision_aspect_ratio.strip("anyres_max_"))


def pack_features(features: np.ndarray, original_hw: tuple[int, int], newline: np.ndarray, p: SiglipParams,
                  vision_tokens: str = "anyres") -> np.ndarray:
    """``features [n_crops, T, H]`` -> packed ``f_s [N, H]`` float32."""
    base = features[0]
    if vision_tokens == "base" or features.shape[0] == 1:
        return np.concatenate([base, newline[None]], 0).astype(np.float32)
    if vision_tokens != "anyres":
        raise ValueError(f"vision_tokens must be 'anyres' or 'base', got {vision_tokens!r}")
    t = math.isqrt(base.shape[0])
    if t * t != base.shape[0]:
        raise ValueError(f"the vision engine returned {base.shape[0]} tokens per crop, not a square grid")
    rows, cols = grid_shape(original_hw, p)
    grid = features[1:]
    if grid.shape[0] != rows * cols:
        raise ValueError(f"{grid.shape[0]} grid crops for a {rows}x{cols} anyres grid")
    hidden = grid.shape[-1]
    fmap = grid.reshape(rows, cols, t, t, hidden).transpose(4, 0, 2, 1, 3).reshape(hidden, rows * t, cols * t)
    ys, xs = unpad_shape(fmap.shape[1:], original_hw)
    fmap = fmap[:, ys, xs]
    _, ch, cw = fmap.shape
    ratio = math.sqrt(ch * cw / (max_tiles(p.vision_aspect_ratio) * t * t))
    if ratio > 1.1:
        fmap = resize_bilinear(fmap, (int(ch // ratio), int(cw // ratio)))
    nl = np.broadcast_to(newline.astype(fmap.dtype)[:, None, None], (hidden, fmap.shape[1], 1))
    fmap = np.concatenate([fmap, nl], axis=2)
    packed = fmap.reshape(hidden, -1).T
    return np.ascontiguousarray(np.concatenate([base, packed], 0), dtype=np.float32)

