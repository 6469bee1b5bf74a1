"""Export wrappers: one small ``nn.Module`` per ONNX engine over the model's stage methods.

Kept apart from ``agvas_train/modeling`` (as segment-anything keeps ``utils/onnx.py`` apart from
its model) so the model stays export-agnostic. Each wrapper's ``forward`` is exactly the stage
the runtime calls, with the engine's input/output names in :data:`ENGINE_IO`.
"""

from __future__ import annotations

import contextlib
import types

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


def _rel_pos_bias(q: torch.Tensor, rh: torch.Tensor, rw: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """segment-anything's decomposed relative positions (``einsum("bhwc,hkc->bhwk")`` and
    ``einsum("bhwc,wkc->bhwk")`` of ``add_decomposed_rel_pos``) as batched MatMuls: ONNX Runtime's
    CPU Einsum was 9 % of the int8 SAM encoder at 1024² (0.39 of 4.5 s) for 0.1 % of its FLOPs.
    ``q [B, h·w, C]``, ``rh [h, h, C]``, ``rw [w, w, C]`` -> ``rel_h [B, h, w, h]``, ``rel_w [B, h, w, w]``."""
    b, _, c = q.shape
    r_q = q.reshape(b, h, w, c)
    rel_h = (r_q.permute(1, 0, 2, 3).reshape(h, b * w, c) @ rh.transpose(1, 2)).reshape(h, b, w, -1).permute(1, 0, 2, 3)
    rel_w = (r_q.permute(2, 0, 1, 3).reshape(w, b * h, c) @ rw.transpose(1, 2)).reshape(w, b, h, -1).permute(1, 2, 0, 3)
    return rel_h, rel_w


def _head_by_head_attention(self, x: torch.Tensor) -> torch.Tensor:
    """segment-anything's ``Attention.forward`` (decomposed relative positions included), one head
    at a time: the same products, but only one head's ``[HW, HW]`` score matrix is alive at once.
    For a global block at 1024² (HW = 4,096, 12 heads) ONNX Runtime's peak for the SAM encoder
    falls from +3.1 GB to +1.0 GB, and the adds over the scores run on 64 MiB instead of 768 MiB
    tensors (fp32 8.5 -> 7.9 s, dynamic int8 6.1 -> 5.0 s on 2 cores, outputs identical)."""
    from agvas.train.modeling.pixel_encoder import sam_modeling

    get_rel_pos = sam_modeling().image_encoder.get_rel_pos
    b, h, w, _ = x.shape
    qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)  # (3, B, heads, HW, C)
    q, k, v = qkv.unbind(0)
    if self.use_rel_pos:
        rh, rw = get_rel_pos(h, h, self.rel_pos_h), get_rel_pos(w, w, self.rel_pos_w)
    outs = []
    for i in range(self.num_heads):
        qi, ki, vi = q[:, i], k[:, i], v[:, i]  # (B, HW, C)
        attn = (qi * self.scale) @ ki.transpose(-2, -1)
        if self.use_rel_pos:
            rel_h, rel_w = _rel_pos_bias(qi, rh, rw, h, w)
            attn = (attn.view(b, h, w, h, w) + rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]).view(b, h * w, h * w)
        outs.append(attn.softmax(dim=-1) @ vi)
    x = torch.stack(outs, 1).view(b, self.num_heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)
    return self.proj(x)


@contextlib.contextmanager
def head_by_head_global_attention(encoder: nn.Module):
    """Within the block, the global-attention blocks of a SAM ``ImageEncoderViT`` (``window_size``
    0) run :func:`_head_by_head_attention`; the windowed blocks (196-token windows) are unchanged."""
    patched = [blk.attn for blk in getattr(encoder, "blocks", ()) if getattr(blk, "window_size", None) == 0]
    for attn in patched:
        attn.forward = types.MethodType(_head_by_head_attention, attn)
    try:
        yield len(patched)
    finally:
        for attn in patched:
            del attn.forward


class SamEncoderEngine(nn.Module):
    """SAM image encoder: ``sam_input [B,3,S,S] -> pixel_embedding [B,C,h,w]``, its global
    attention exported head by head (:func:`head_by_head_global_attention`: same numbers, a
    twelfth of the score memory)."""

    def __init__(self, model: AGVAS) -> None:
        super().__init__()
        self.encoder = model.pixel_encoder

    def forward(self, sam_input: torch.Tensor) -> torch.Tensor:
        with head_by_head_global_attention(self.encoder):
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
