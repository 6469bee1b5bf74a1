"""Export wrappers: one small ``nn.Module`` per ONNX engine over the model's stage methods.

Kept apart from ``agvas_train/modeling`` (as segment-anything keeps ``utils/onnx.py`` apart from
its model) so the model stays export-agnostic. Each wrapper's ``forward`` is exactly the stage
the runtime calls, with the engine's input/output names in :data:`ENGINE_IO`.
"""

from __future__ import annotations

import torch
from torch import nn

from agvas.train.modeling.agmd import fuse_maps
from agvas.train.modeling.agvas import AGVAS

# engine -> (input names, output names); the `llm` engine is built by export/llm.py.
ENGINE_IO: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "vision": (("pixel_values",), ("image_features",)),
    "sam_encoder": (("sam_input",), ("pixel_embedding",)),
    "spam": (("semantic_tokens", "pixel_embedding"), ("f_align",)),
    "agmd": (("anchor_states", "pixel_embedding"), ("prob", "p_seg", "p_ano")),
    "lm_head": (("hidden_states",), ("logits",)),
}


class VisionEngine(nn.Module):
    """SigLIP + projector per crop: ``pixel_values [n,3,S,S] -> image_features [n,T,H]`` (unpacked)."""

    def __init__(self, model: AGVAS) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.project_crops(pixel_values)


class SamEncoderEngine(nn.Module):
    """SAM image encoder: ``sam_input [B,3,S,S] -> pixel_embedding [B,C,h,w]``."""

    def __init__(self, model: AGVAS) -> None:
        super().__init__()
        self.encoder = model.pixel_encoder

    def forward(self, sam_input: torch.Tensor) -> torch.Tensor:
        return self.encoder(sam_input)


class SpamEngine(nn.Module):
    """SPAM: ``semantic_tokens [B,N,H], pixel_embedding [B,C,h,w] -> f_align [B,N,H]``."""

    def __init__(self, model: AGVAS) -> None:
        super().__init__()
        self.spam = model.spam

    def forward(self, semantic_tokens: torch.Tensor, pixel_embedding: torch.Tensor) -> torch.Tensor:
        return self.spam(semantic_tokens, pixel_embedding)


class AgmdEngine(nn.Module):
    """Token refiner + AGMD + map fusion: ``anchor_states [B,3,H]`` (NOR, ANO, SEG) and the
    pixel embedding -> low-res ``prob, p_seg, p_ano [B,4h,4w]`` (α fused in-graph)."""

    def __init__(self, model: AGVAS) -> None:
        super().__init__()
        self.model = model
        self.alpha = float(model.cfg.agmd.alpha)

    def forward(self, anchor_states: torch.Tensor, pixel_embedding: torch.Tensor):
        return fuse_maps(self.model.decode_masks(anchor_states, pixel_embedding), self.alpha)


class LmHeadEngine(nn.Module):
    """LM head at chosen positions: ``hidden_states [B,K,H] -> logits [B,K,V]``."""

    def __init__(self, model: AGVAS) -> None:
        super().__init__()
        self.lm_head = model.lm_head

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden_states)
