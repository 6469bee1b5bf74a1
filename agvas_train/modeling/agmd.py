"""Token refiner and Anchor-Guided Mask Decoder (DESIGN §2.6-2.8), on segment-anything's blocks."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..config import AGMDConfig
from .pixel_encoder import sam_modeling


class TokenRefiner(nn.Module):
    """Shared ``Linear(H,H) -> ReLU -> Linear(H,C)`` mapping anchor states into the pixel space."""

    def __init__(self, hidden_size: int, pixel_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.ReLU(), nn.Linear(hidden_size, pixel_dim))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)


class AGMD(nn.Module):
    """Anchor-Guided Mask Decoder.

    ``Z0 = [t_nor, t_ano, t_seg, h_nor, h_ano, h_seg]``; L SAM two-way blocks between Z and the
    pixel embedding (with SAM's dense random-Fourier positional encoding); SAM's 4x output
    upscaling; one hypernetwork MLP per learnable token; masks = tokens · upscaled embedding.
    Returns the three low-resolution mask logits ``[B, 3, 4h, 4w]`` in the order NOR, ANO, SEG.
    """

    def __init__(self, pixel_dim: int, cfg: AGMDConfig) -> None:
        super().__init__()
        m = sam_modeling()
        from segment_anything.modeling.common import LayerNorm2d
        from segment_anything.modeling.mask_decoder import MLP
        from segment_anything.modeling.prompt_encoder import PositionEmbeddingRandom

        c = pixel_dim
        self.query_tokens = nn.Embedding(3, c)
        self.pe_layer = PositionEmbeddingRandom(c // 2)
        self.transformer = m.TwoWayTransformer(depth=cfg.depth, embedding_dim=c, num_heads=cfg.num_heads, mlp_dim=cfg.mlp_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(c, c // 4, kernel_size=2, stride=2),
            LayerNorm2d(c // 4),
            nn.GELU(),
            nn.ConvTranspose2d(c // 4, c // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.hypernetworks = nn.ModuleList([MLP(c, c, c // 8, 3) for _ in range(3)])

    def forward(self, anchors: torch.Tensor, pixel_embedding: torch.Tensor) -> torch.Tensor:
        """anchors: refined anchor embeddings ``[B, 3, C]``; pixel_embedding ``[B, C, h, w]``."""
        b, c, h, w = pixel_embedding.shape
        queries = self.query_tokens.weight.unsqueeze(0).expand(b, -1, -1)
        tokens = torch.cat([queries, anchors], dim=1)  # [B, 6, C]
        pos = self.pe_layer((h, w)).unsqueeze(0).expand(b, -1, -1, -1)
        hs, src = self.transformer(pixel_embedding, pos, tokens)
        up = self.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
        hyper = torch.stack([mlp(hs[:, i]) for i, mlp in enumerate(self.hypernetworks)], dim=1)  # [B,3,C/8]
        bu, cu, hu, wu = up.shape
        return (hyper @ up.flatten(2)).view(bu, 3, hu, wu)


def fuse_maps(logits: torch.Tensor, alpha: float = 0.5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From mask logits ``[B,3,h,w]`` (NOR, ANO, SEG): ``P_seg = sigmoid(m_seg)``,
    ``P_ano = softmax([m_nor, m_ano])[1]``, ``P = alpha*P_seg + (1-alpha)*P_ano``."""
    p_seg = torch.sigmoid(logits[:, 2])
    p_ano = torch.softmax(logits[:, :2], dim=1)[:, 1]
    return alpha * p_seg + (1.0 - alpha) * p_ano, p_seg, p_ano


def postprocess_map(prob: torch.Tensor, input_size: tuple[int, int], original_size: tuple[int, int], img_size: int) -> torch.Tensor:
    """SAM's ``postprocess_masks`` applied to a probability map ``[B,h,w]``: upscale to the padded
    encoder input, remove the padding, resize to the original image size (bilinear)."""
    x = F.interpolate(prob.unsqueeze(1), (img_size, img_size), mode="bilinear", align_corners=False)
    x = x[..., : input_size[0], : input_size[1]]
    x = F.interpolate(x, tuple(original_size), mode="bilinear", align_corners=False)
    return x[:, 0]
