"""``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)`` in numpy.

Used by the anyres packing (HF's ``anyres_max_N`` downsampling) and by the map postprocessing
(SAM's ``postprocess_masks``). Follows ATen's CPU kernel: float32 source indices
``max(scale*(i+0.5)-0.5, 0)`` with ``scale = in/out``, weights ``1-λ, λ``, the width
interpolated first and then the height, each step one fused multiply-add as the compiled kernel
does. Upsampling matches torch bit for bit on x86-64; downsampling to ≤ 1 ulp.
"""

from __future__ import annotations

import numpy as np


def _blend(a: np.ndarray, wa: np.ndarray, b: np.ndarray, wb: np.ndarray) -> np.ndarray:
    """``fma(a, wa, b*wb)``: ``b*wb`` rounded to float32 (torch's separate product), then
    ``a*wa + that`` rounded once (the product of two float32 is exact in float64).
    ``a`` and ``b`` are fresh gathers and are overwritten."""
    acc = a.astype(np.float64)
    acc *= wa
    b *= wb
    acc += b
    return acc.astype(np.float32)


def _axis(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Source indices i0, i1 and weights w0, w1 (float32) for one axis."""
    if in_size == out_size:
        i = np.arange(out_size)
        return i, i, np.ones(out_size, np.float32), np.zeros(out_size, np.float32)
    scale = np.float32(in_size) / np.float32(out_size)
    src = (np.float64(scale) * (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0))
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    lam = np.clip(src - i0.astype(np.float32), 0, 1).astype(np.float32)
    return i0, np.minimum(i0 + 1, in_size - 1), (np.float32(1) - lam).astype(np.float32), lam


def resize_bilinear(x: np.ndarray, out_hw: tuple[int, int], crop_hw: tuple[int, int] | None = None) -> np.ndarray:
    """Resize the last two axes of float32 ``x [..., h, w]`` to ``out_hw``; with ``crop_hw`` only
    the top-left ``crop_hw`` of the result is computed (= ``resize(x, out_hw)[..., :ch, :cw]``).

    Each input row is interpolated along the width once (torch does the same arithmetic per
    output row), then the rows are blended along the height."""
    x = np.asarray(x, np.float32)
    oh, ow = int(out_hw[0]), int(out_hw[1])
    ch, cw = crop_hw if crop_hw is not None else (oh, ow)
    if (oh, ow) == x.shape[-2:]:
        return x[..., :ch, :cw].copy()
    y0, y1, wy0, wy1 = (a[:ch] for a in _axis(x.shape[-2], oh))
    x0, x1, wx0, wx1 = (a[:cw] for a in _axis(x.shape[-1], ow))
    rows = _blend(np.take(x, x0, axis=-1), wx0, np.take(x, x1, axis=-1), wx1)  # [..., h, cw]
    return _blend(np.take(rows, y0, axis=-2), wy0[:, None], np.take(rows, y1, axis=-2), wy1[:, None])
