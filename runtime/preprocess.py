"""Preprocessing in numpy/PIL, equal to the reference's (no torch, no transformers).

- SigLIP anyres crops: the arithmetic of transformers' ``LlavaOnevisionImageProcessorPil``
  (select the best grid pinpoint, resize keeping the aspect ratio, centre-pad with zeros, cut
  into S×S tiles, prepend the whole image resized to S×S; rescale in float64 then cast to
  float32, normalise in float32). Written out here because the runtime must not import
  transformers; ``tests/test_preprocess_runtime.py`` pins it to the HF processor bit for bit.
- SAM: resize the longest side (PIL bilinear), normalise, pad bottom/right — as
  ``agvas_train/preprocess.py`` (segment-anything's ``ResizeLongestSide``).

Parameters come from the export manifest's ``preprocessing`` block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class SiglipParams:
    size: int  # crop side S
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    rescale: float  # 1/255
    resample: int  # PIL resampling filter (3 = bicubic)
    grid_pinpoints: tuple[tuple[int, int], ...]  # (height, width) candidates
    vision_aspect_ratio: str  # "anyres_max_9"

    @classmethod
    def from_manifest(cls, d: dict) -> "SiglipParams":
        """From ``manifest["preprocessing"]["siglip"]`` (``resample``: a PIL filter number or name)."""
        r = d["resample"]
        resample = int(Image.Resampling[r.upper()]) if isinstance(r, str) else int(r)
        return cls(int(d["size"]), tuple(map(float, d["mean"])), tuple(map(float, d["std"])),
                   float(d["rescale_factor"]), resample, tuple((int(h), int(w)) for h, w in d["image_grid_pinpoints"]),
                   str(d["vision_aspect_ratio"]))


@dataclass(frozen=True)
class SamParams:
    img_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def from_manifest(cls, d: dict) -> "SamParams":
        """From ``manifest["preprocessing"]["sam"]``."""
        return cls(int(d["img_size"]), tuple(map(float, d["mean"])), tuple(map(float, d["std"])))


# ---- SigLIP anyres ------------------------------------------------------------------------

def select_best_resolution(size_hw: tuple[int, int], pinpoints) -> tuple[int, int]:
    """The pinpoint that keeps the most of the image's resolution, then wastes the least."""
    oh, ow = size_hw
    best, best_eff, best_waste = None, 0, float("inf")
    for h, w in pinpoints:
        scale = min(w / ow, h / oh)
        eff = min(int(ow * scale) * int(oh * scale), ow * oh)
        waste = w * h - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (h, w), eff, waste
    return best


def grid_shape(size_hw: tuple[int, int], p: SiglipParams) -> tuple[int, int]:
    """Tiles (rows, cols) of the anyres grid for an image of ``size_hw``."""
    h, w = select_best_resolution(size_hw, p.grid_pinpoints)
    return h // p.size, w // p.size


def _fit_size(size_hw: tuple[int, int], target_hw: tuple[int, int]) -> tuple[int, int]:
    """Aspect-preserving size inside ``target_hw`` (HF ``get_patch_output_size``)."""
    oh, ow = size_hw
    th, tw = target_hw
    sw, sh = tw / ow, th / oh
    if sw < sh:
        return min(math.ceil(oh * sw), th), tw
    return th, min(math.ceil(ow * sh), tw)


def _normalise(tiles_u8: np.ndarray, p: SiglipParams) -> np.ndarray:
    """uint8 ``[n,S,S,3]`` -> float32 ``[n,3,S,S]``: ``x*rescale`` in float64 cast to float32, then
    ``(x - mean) / std`` in float32 (HF's ``rescale`` then ``normalize``)."""
    x = (tiles_u8.astype(np.float64) * p.rescale).astype(np.float32)
    x = (x - np.asarray(p.mean, np.float32)) / np.asarray(p.std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def siglip_crops(image: Image.Image, p: SiglipParams, base_only: bool = False) -> np.ndarray:
    """Crops ``[1 + rows*cols, 3, S, S]`` (the base tile first); ``base_only`` -> ``[1,3,S,S]``."""
    s = p.size
    size_hw = (image.height, image.width)
    tiles = [np.asarray(image.resize((s, s), p.resample))]
    if not base_only:
        th, tw = select_best_resolution(size_hw, p.grid_pinpoints)
        nh, nw = _fit_size(size_hw, (th, tw))
        resized = np.asarray(image.resize((nw, nh), p.resample))
        top, left = (th - nh) // 2, (tw - nw) // 2
        canvas = np.zeros((th, tw, 3), np.uint8)
        canvas[top:top + nh, left:left + nw] = resized
        tiles += [canvas[i:i + s, j:j + s] for i in range(0, th, s) for j in range(0, tw, s)]
    return _normalise(np.stack(tiles), p)


# ---- SAM ----------------------------------------------------------------------------------

def sam_resize_shape(h: int, w: int, long_side: int) -> tuple[int, int]:
    """segment-anything's ``ResizeLongestSide.get_preprocess_shape``."""
    scale = long_side * 1.0 / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def sam_input(image: Image.Image, p: SamParams) -> tuple[np.ndarray, tuple[int, int]]:
    """``[1,3,S,S]`` float32 (resized, normalised, zero-padded) and the resized ``(h, w)``."""
    s = p.img_size
    nh, nw = sam_resize_shape(image.height, image.width, s)
    if min(nh, nw) < 1:
        raise ValueError(f"{image.width}x{image.height}: aspect ratio too extreme for the {s}x{s} pixel-encoder "
                         f"input (a side would be {min(nh, nw)} pixels)")
    x = np.asarray(image.resize((nw, nh), Image.BILINEAR), dtype=np.float32)
    x = (x - np.asarray(p.mean, np.float32)) / np.asarray(p.std, np.float32)
    out = np.zeros((1, 3, s, s), np.float32)
    out[0, :, :nh, :nw] = x.transpose(2, 0, 1)
    return out, (nh, nw)
