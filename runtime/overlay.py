"""The picture an inspector looks at: the anomaly heatmap over the image and the mask contour."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter

CONTOUR_RGB = (0, 255, 0)
_LUT: np.ndarray | None = None


def _lut() -> np.ndarray:
    """matplotlib's ``jet`` as a 256-entry uint8 RGB table (blue = 0, red = 1)."""
    global _LUT
    if _LUT is None:
        from matplotlib import colormaps

        _LUT = (colormaps["jet"](np.linspace(0, 1, 256))[:, :3] * 255 + 0.5).astype(np.uint8)
    return _LUT


def heatmap(prob: np.ndarray) -> np.ndarray:
    """``prob [H,W]`` in [0,1] -> uint8 RGB ``[H,W,3]``."""
    return _lut()[np.clip(np.rint(prob * 255), 0, 255).astype(np.uint8)]


def contour(mask: np.ndarray, thickness: int) -> np.ndarray:
    """Boundary pixels of a binary mask, ``thickness`` pixels wide (bool ``[H,W]``)."""
    m = Image.fromarray(mask.astype(np.uint8) * 255)
    inner = np.asarray(m.filter(ImageFilter.MinFilter(3))) > 0
    edge = mask & ~inner
    if thickness > 1:
        edge = np.asarray(Image.fromarray(edge.astype(np.uint8) * 255)
                          .filter(ImageFilter.MaxFilter(2 * (thickness // 2) + 1))) > 0
    return edge


def render_overlay(image: Image.Image, prob: np.ndarray, mask: np.ndarray) -> Image.Image:
    """Blend the heatmap over ``image`` with opacity ``0.5·P`` (the defect stays visible under it) and
    draw the mask contour in green, about 1/200 of the short side thick."""
    img = np.asarray(image.convert("RGB"), dtype=np.float32)
    a = (0.5 * np.clip(prob, 0, 1))[..., None]
    out = img * (1 - a) + heatmap(prob).astype(np.float32) * a
    out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    if mask.any():
        out[contour(mask, max(1, round(min(mask.shape) / 200)))] = CONTOUR_RGB
    return Image.fromarray(out)


def mask_image(mask: np.ndarray) -> Image.Image:
    """A binary mask as an 8-bit PNG-ready image (0 / 255)."""
    return Image.fromarray(mask.astype(np.uint8) * 255)
