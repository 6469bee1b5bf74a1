"""The AG-VAS model: LLaVA-OneVision + anchors + SAM pixel encoder + SPAM + refiner + AGMD.

The model is export-agnostic: each stage is a method over plain tensors (semantic features,
pixel embedding, SPAM, LLM, anchor decoding) so the export wrappers in ``export/`` and the
reference pipeline in ``agvas_train/reference.py`` compose the same pieces.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

from ..config import AGVASConfig
from .agmd import AGMD, TokenRefiner, fuse_maps
from .pixel_encoder import build_pixel_encoder
from .spam import SPAM


@dataclass
class TokenIds:
    """Special token ids the model and every engine agree on."""

    image: int
    anchors: tuple[int, int, int]  # NOR, ANO, SEG
    eos: int
    pad: int
    vocab_size: int

    def to_dict(self) -> dict:
        return {"image": self.image, "anchors": list(self.anchors), "eos": self.eos, "pad": self.pad,
                "vocab_size": self.vocab_size}

    @classmethod
    def from_dict(cls, d: dict) -> "TokenIds":
        return cls(int(d["image"]), tuple(int(a) for a in d["anchors"]), int(d["eos"]), int(d["pad"]),
                   int(d["vocab_size"]))


def llava_config(cfg: AGVASConfig, ids: TokenIds) -> LlavaOnevisionConfig:
    kw = {k: v for k, v in cfg.llava.items()}
    text = dict(kw.pop("text_config"))
    text["vocab_size"] = ids.vocab_size
    text["pad_token_id"] = ids.pad
    text["eos_token_id"] = ids.eos
    return LlavaOnevisionConfig(text_config=text, image_token_index=ids.image, **kw)


class AGVAS(nn.Module):
    def __init__(self, cfg: AGVASConfig, ids: TokenIds,
                 llava: LlavaOnevisionForConditionalGeneration | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.ids = ids
        self.llava = llava if llava is not None else LlavaOnevisionForConditionalGeneration(llava_config(cfg, ids))
        self.pixel_encoder = build_pixel_encoder(cfg.pixel_encoder)
        self.spam = SPAM(cfg.hidden_size, cfg.pixel_dim, cfg.spam_heads)
        self.refiner = TokenRefiner(cfg.hidden_size, cfg.pixel_dim)
        self.agmd = AGMD(cfg.pixel_dim, cfg.agmd)

    # ---- handles --------------------------------------------------------------------------
    @property
    def language_model(self) -> nn.Module:
        """The Qwen2 decoder (``Qwen2Model``, no LM head); its last hidden state is after the final norm."""
        return self.llava.model.language_model

    @property
    def lm_head(self) -> nn.Linear:
        return self.llava.lm_head

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.llava.model.language_model.embed_tokens

    # ---- stages ---------------------------------------------------------------------------
    def semantic_features(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor,
                          vision_tokens: str = "anyres") -> list[torch.Tensor]:
        """``f_s`` per image: SigLIP + projector, packed exactly as HF LLaVA-OneVision packs them.

        ``vision_tokens="base"`` keeps only the base tile (plus HF's newline token), the HF
        single-patch packing path.
        """
        if vision_tokens == "base":
            crops = pixel_values[:, :1].flatten(0, 1) if pixel_values.dim() == 5 else pixel_values[:1]
            feats = self.project_crops(crops)  # [B, n, H]
            newline = self.llava.model.image_newline.to(feats.dtype)
            return [torch.cat([f, newline[None]], dim=0) for f in feats]
        if vision_tokens != "anyres":
            raise ValueError(f"vision_tokens must be 'anyres' or 'base', got {vision_tokens!r}")
        out = self.llava.model.get_image_features(pixel_values=pixel_values, image_sizes=image_sizes, return_dict=True)
        return list(out.pooler_output)

    def project_crops(self, crops: torch.Tensor) -> torch.Tensor:
        """SigLIP + projector on crops ``[n,3,S,S]`` -> unpacked features ``[n, tokens, H]``
        (the `vision` engine; the anyres packing is HF's ``pack_image_features``)."""
        m = self.llava.model
        hs = m.vision_tower(crops, output_hidden_states=True, return_dict=True).hidden_states
        layer = self.llava.config.vision_feature_layer
        feat = hs[layer] if isinstance(layer, int) else torch.cat([hs[i] for i in layer], dim=-1)
        if self.llava.config.vision_feature_select_strategy == "default":
            feat = feat[:, 1:]
        return m.multi_modal_projector(feat)

    def pixel_embedding(self, sam_input: torch.Tensor) -> torch.Tensor:
        """``F_p`` = SAM encoder on the normalised, padded input ``[B,3,S,S]`` -> ``[B,C,h,w]``."""
        return self.pixel_encoder(sam_input)

    def align(self, f_s: torch.Tensor, pixel_embedding: torch.Tensor) -> torch.Tensor:
        """SPAM: ``f_align`` for semantic tokens ``[B,N,H]``."""
        return self.spam(f_s, pixel_embedding)

    def visual_tokens(self, f_s: torch.Tensor, pixel_embedding: torch.Tensor) -> torch.Tensor:
        """The 2N visual positions ``concat(f_s, f_align)`` for a batch of equal-length ``f_s``."""
        return torch.cat([f_s, self.align(f_s, pixel_embedding)], dim=1)

    def embed_prompt(self, input_ids: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        """Token embeddings with the image positions (``ids == image``) replaced by ``visual [B,2N,H]``."""
        emb = self.embed_tokens(input_ids)
        mask = input_ids == self.ids.image
        n = int(mask.sum(dim=1).max()) if mask.numel() else 0
        if not bool((mask.sum(dim=1) == visual.shape[1]).all()) or n != visual.shape[1]:
            raise ValueError(
                f"prompt has {mask.sum(dim=1).tolist()} image positions but the visual tokens are {visual.shape[1]} long"
            )
        return emb.masked_scatter(mask.unsqueeze(-1), visual.to(emb.dtype))

    def decode_masks(self, anchor_states: torch.Tensor, pixel_embedding: torch.Tensor) -> torch.Tensor:
        """Anchor hidden states ``[B,3,H]`` (NOR, ANO, SEG) -> low-res mask logits ``[B,3,4h,4w]``."""
        return self.agmd(self.refiner(anchor_states), pixel_embedding)

    def maps(self, anchor_states: torch.Tensor, pixel_embedding: torch.Tensor):
        """Low-res ``(P, P_seg, P_ano)`` (DESIGN §2.8)."""
        return fuse_maps(self.decode_masks(anchor_states, pixel_embedding), self.cfg.agmd.alpha)


def anchor_state_positions(ids: torch.Tensor, anchor_ids: tuple[int, int, int]) -> torch.Tensor:
    """For each row of ``ids [B,T]`` and each anchor, the index of the hidden state that carries it:
    **p-1 for the first occurrence of the anchor at p** (LISA's shifted convention, DESIGN §2.5).
    Returns ``[B,3]``; -1 where an anchor is missing."""
    out = torch.full((ids.shape[0], len(anchor_ids)), -1, dtype=torch.long, device=ids.device)
    for j, a in enumerate(anchor_ids):
        hit = ids == a
        has = hit.any(dim=1)
        first = hit.float().argmax(dim=1)
        out[:, j] = torch.where(has & (first > 0), first - 1, torch.full_like(first, -1))
    return out


def gather_anchor_states(hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``hidden [B,T,H]`` at ``positions [B,3]`` -> ``[B,3,H]`` (positions must be valid)."""
    if bool((positions < 0).any()):
        raise ValueError("an anchor token is missing from the sequence")
    return torch.gather(hidden, 1, positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
