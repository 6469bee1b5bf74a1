"""The SAM pixel encoder: segment-anything's ``ImageEncoderViT``, built from a config.

``segment_anything/__init__.py`` imports its predictor, which imports torchvision; torchvision
cannot import beside the CPU torch used here. We therefore import ``segment_anything.modeling``
without running the package ``__init__`` (always, so behaviour does not depend on torchvision).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from functools import partial

import torch
from torch import nn

from ..config import PIXEL_ENCODER_KINDS, PixelEncoderConfig


def sam_modeling() -> types.ModuleType:
    """Return ``segment_anything.modeling`` without executing ``segment_anything/__init__``."""
    if "segment_anything.modeling" in sys.modules:
        return sys.modules["segment_anything.modeling"]
    if "segment_anything" not in sys.modules:
        spec = importlib.util.find_spec("segment_anything")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("segment-anything is not installed (pip install segment-anything==1.0)")
        pkg = types.ModuleType("segment_anything")
        pkg.__path__ = list(spec.submodule_search_locations)
        pkg.__spec__ = spec
        sys.modules["segment_anything"] = pkg
    return importlib.import_module("segment_anything.modeling")


def build_pixel_encoder(cfg: PixelEncoderConfig) -> nn.Module:
    """An ``ImageEncoderViT`` with SAM's settings (as in segment-anything's ``build_sam.py``);
    for ``cfg.kind == "efficientnet_lite0"`` the frozen EfficientNet-Lite0 encoder of
    ``effnet.py`` (random until its ``load_pretrained``: ``build_model`` loads it)."""
    m = sam_modeling()
    if cfg.kind == "efficientnet_lite0":
        from .effnet import EffNetPixelEncoder

        return EffNetPixelEncoder(cfg)
    if cfg.kind != "sam":
        raise ValueError(f"pixel encoder kind {cfg.kind!r}: expected one of {PIXEL_ENCODER_KINDS}")
    return m.ImageEncoderViT(
        img_size=cfg.img_size,
        patch_size=cfg.patch_size,
        in_chans=3,
        embed_dim=cfg.embed_dim,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        mlp_ratio=cfg.mlp_ratio,
        out_chans=cfg.out_chans,
        qkv_bias=True,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        use_rel_pos=True,
        window_size=cfg.window_size,
        global_attn_indexes=tuple(cfg.global_attn_indexes),
    )
