"""Reference preprocessing: the HF LLaVA-OneVision image processor and SAM's own transforms."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .config import AGVASConfig


@dataclass
class Prepared:
    pixel_values: torch.Tensor  # [1, n_crops, 3, S, S] SigLIP crops (anyres)
    image_sizes: torch.Tensor  # [1, 2] original (H, W)
    sam_input: torch.Tensor  # [1, 3, img, img] normalised, padded
    input_size: tuple[int, int]  # (h, w) after resize-longest-side, before padding
    original_size: tuple[int, int]  # (H, W)


def sam_resize_shape(h: int, w: int, long_side: int) -> tuple[int, int]:
    """segment-anything's ``ResizeLongestSide.get_preprocess_shape``."""
    scale = long_side * 1.0 / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def sam_preprocess(image: Image.Image, cfg: AGVASConfig) -> tuple[torch.Tensor, tuple[int, int]]:
    """SAM's preprocessing: resize the longest side to ``img_size`` (PIL bilinear, as
    ``ResizeLongestSide.apply_image`` does through torchvision), normalise, pad bottom/right."""
    s = cfg.pixel_encoder.img_size
    nh, nw = sam_resize_shape(image.height, image.width, s)
    arr = np.asarray(image.resize((nw, nh), Image.BILINEAR), dtype=np.float32)
    x = torch.from_numpy(arr).permute(2, 0, 1)
    mean = torch.tensor(cfg.sam_pixel_mean).view(3, 1, 1)
    std = torch.tensor(cfg.sam_pixel_std).view(3, 1, 1)
    x = (x - mean) / std
    x = torch.nn.functional.pad(x, (0, s - nw, 0, s - nh))
    return x.unsqueeze(0), (nh, nw)


def prepare_image(image: Image.Image, cfg: AGVASConfig, image_processor) -> Prepared:
    """Both encoders' inputs for one RGB image."""
    out = image_processor(images=[image], return_tensors="pt")
    sam, input_size = sam_preprocess(image, cfg)
    return Prepared(out["pixel_values"], out["image_sizes"], sam, input_size, (image.height, image.width))
