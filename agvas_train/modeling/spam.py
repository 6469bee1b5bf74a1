"""Semantic-Pixel Alignment Module (DESIGN §2.3)."""

from __future__ import annotations

import torch
from torch import nn


class SPAM(nn.Module):
    """``f_align = MHA(Q=f_s, K=f_p, V=f_p)`` with ``f_p = Linear_p(F_p)`` over the pixel tokens.

    f_s: semantic tokens ``[B, N, H]``; F_p: pixel embedding ``[B, C, h, w]``. Returns ``[B, N, H]``.
    """

    def __init__(self, hidden_size: int, pixel_dim: int, num_heads: int) -> None:
        super().__init__()
        self.pixel_proj = nn.Linear(pixel_dim, hidden_size)
        self.attn = nn.MultiheadAttention(hidden_size, num_heads, batch_first=True)

    def forward(self, f_s: torch.Tensor, pixel_embedding: torch.Tensor) -> torch.Tensor:
        f_p = self.pixel_proj(pixel_embedding.flatten(2).transpose(1, 2))  # [B, h*w, H]
        f_align, _ = self.attn(f_s, f_p, f_p, need_weights=False)
        return f_align
