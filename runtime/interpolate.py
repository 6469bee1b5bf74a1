"""``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)`` in numpy.

Used by the anyres packing (HF's ``anyres_max_N`` downsampling) and by the map postprocessing
(SAM's ``postprocess_masks``). Follows ATen's CPU kernel: float32 source indices
``max(scale*(i+0.5)-0.5, 0)`` with ``scale = in/out``, weights ``1-λ, λ``, the width
interpolated first and then the height, each step one fused multiply-add as the compiled kernel
does. Upsampling matches torch bit for bit on x86-64; downsampling to ≤ 1 ulp.
"""

from __future__ import annotations

import numpy as np


def _fma(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """``a*b + c`` rounded once to float32 (the product of two float32 is exact in float64)."""
    return (a.astype(np.float64) * b + c).astype(np.float32)


def _axis(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Source indices i0, i1 and weights w0, w1 (float32) for one axis."""
    if in_size == out_size:
        i = np.arange(out_size)
        return i, i, np.ones(out_size, np.float32), np.zeros(out_size, np.float32)
    scale = np.float32(in_size) / np.float32(out_size)
    src = _fma(np.full(out_size, scale, np.float32), np.arange(out_size, dtype=np.float32) + np.float32(0.5),
               np.float32(-0.5))
    src = np.maximum(src, np.float32(0))
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    lam = np.clip(src - i0.astype(np.float32), 0, 1).astype(np.float32)
    return i0, np.minimum(i0 + 1, in_size - 1), (np.float32(1) - lam).astype(np.float32), lam


def resize_bilinear(x: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """Resize the last two axes of float32 ``x [..., h, w]`` to ``out_hw``."""
    x = np.asarray(x, np.float32)
    y0, y1, wy0, wy1 = _axis(x.shape[-2], int(out_hw[0]))
    x0, x1, wx0, wx1 = _axis(x.shape[-1], int(out_hw[1]))
    rows0, rows1 = x[..., y0, :], x[..., y1, :]
    top = _fma(rows0[..., x0], wx0, rows0[..., x1] * wx1)
    bot = _fma(rows1[..., x0], wx0, rows1[..., x1] * wx1)
    return _fma(top, wy0[:, None], bot * wy1[:, None])
