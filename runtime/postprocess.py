"""Low-res maps -> maps at the original size, mask, verdict, area (numpy).

The `agmd` engine already fuses ``P = α·P_seg + (1-α)·P_ano`` in-graph; here the maps are
brought to the original image size exactly as ``agvas.train.modeling.agmd.postprocess_map``
(SAM's ``postprocess_masks``: bilinear to the padded encoder input, crop the padding, bilinear
to the original size) and thresholded.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .interpolate import resize_bilinear


def upsample_maps(low: np.ndarray, input_size: tuple[int, int], original_size: tuple[int, int],
                  img_size: int) -> np.ndarray:
    """``low [k, h, w]`` -> ``[k, H, W]`` at the original size (float32)."""
    x = resize_bilinear(low, (img_size, img_size), crop_hw=input_size)  # the padding is never computed
    return resize_bilinear(x, original_size)


@dataclass
class Verdict:
    mask: np.ndarray  # bool [H, W]
    anomalous: bool
    area_px: int
    area_pct: float
    max_score: float


def decide(prob: np.ndarray, threshold: float, min_area: int = 0) -> Verdict:
    """``mask = P > threshold``; anomalous when the mask has more than ``min_area`` pixels
    (the reference's ``mask.sum() > min_area``)."""
    mask = prob > threshold
    area = int(mask.sum())
    return Verdict(mask, area > min_area, area, 100.0 * area / mask.size, float(prob.max()) if prob.size else 0.0)
