"""Builders: an AG-VAS model (random, from real local weights, or on the meta device)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch

from ..config import AGVASConfig
from ..tokenizer import add_anchor_tokens, load_tokenizer
from .agvas import AGVAS, TokenIds


def image_processor_for(cfg: AGVASConfig, directory: str | Path | None = None):
    """The LLaVA-OneVision image processor (the PIL one: torchvision cannot import here)."""
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    src = directory or cfg.tokenizer_dir
    if src and (Path(src) / "preprocessor_config.json").exists():
        return LlavaOnevisionImageProcessorPil.from_pretrained(str(src), local_files_only=True)
    s = cfg.vision_image_size
    return LlavaOnevisionImageProcessorPil(
        size={"height": s, "width": s}, image_grid_pinpoints=cfg.llava["image_grid_pinpoints"],
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )


def token_ids(tokenizer, vocab_size: int, cfg: AGVASConfig) -> TokenIds:
    anchors = add_anchor_tokens(tokenizer, cfg.anchor_tokens)
    image = tokenizer.convert_tokens_to_ids(cfg.image_token)
    eos = tokenizer.convert_tokens_to_ids(cfg.eos_token)
    if image is None or eos is None:
        raise ValueError(f"tokenizer lacks {cfg.image_token!r} or {cfg.eos_token!r}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return TokenIds(image=int(image), anchors=tuple(anchors), eos=int(eos), pad=int(pad),
                    vocab_size=max(vocab_size, len(tokenizer)))


def build_model(cfg: AGVASConfig, *, tokenizer=None, llava_dir: str | Path | None = None,
                sam_path: str | Path | None = None, device: str | torch.device = "cpu",
                dtype: torch.dtype | None = None, llava_dtype: torch.dtype | None = None,
                pretrained_pixel: bool = True) -> tuple[AGVAS, Any]:
    """Build AG-VAS for ``cfg``.

    - random init (seeded by ``cfg.seed``) when no weights are given — the `tiny` default and
      the `ov-*` latency/memory work;
    - ``llava_dir``: a local HF LLaVA-OneVision directory (weights, tokenizer, image processor);
    - ``sam_path``: an official ``sam_vit_{b,l,h}`` ``.pth``; its ``image_encoder.`` weights;
    - ``device="meta"``: no memory at all, for parameter counts and memory planning;
    - ``dtype``: the whole model in that dtype (default: as built, float32);
    - ``llava_dtype``: the dtype the LLaVA-OneVision weights are loaded in (default ``dtype``, else
      float32 — never the files' own dtype: llava-hf directories are saved in float16);
    - ``pretrained_pixel``: a pixel encoder with packaged pretrained weights (``kind``
      ``efficientnet_lite0``) loads them (a checkpoint that holds them passes False).
    The anchors are added to the tokenizer and the embeddings/LM head resized when needed.
    """
    from .weights import load_llava_dir, read_sam_encoder_state, sam_encoder_config

    sam_state = None
    if sam_path is not None:
        sam_state = read_sam_encoder_state(sam_path)
        cfg.pixel_encoder = sam_encoder_config(sam_state, cfg.pixel_encoder, sam_path)
    llava = None
    if llava_dir is not None:
        llava = load_llava_dir(llava_dir, dtype=llava_dtype or dtype or torch.float32)
        cfg.tokenizer_dir = str(Path(llava_dir).resolve())
        cfg.llava = _llava_kwargs(llava.config)
        # SPAM attends in the LLM's width with the LLM's head count (14 for 0.5B, 28 for 7B)
        cfg.spam_heads = int(llava.config.text_config.num_attention_heads)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg)
    base_vocab = (llava.config.text_config.vocab_size if llava is not None
                  else int(cfg.llava["text_config"]["vocab_size"]) or len(tokenizer))
    ids = token_ids(tokenizer, base_vocab, cfg)

    torch.manual_seed(cfg.seed)
    ctx = torch.device(device) if str(device) == "meta" else contextlib.nullcontext()
    with ctx:
        model = AGVAS(cfg, TokenIds(ids.image, ids.anchors, ids.eos, ids.pad, base_vocab), llava=llava)
    if ids.vocab_size > base_vocab:
        # same path as LISA: new special tokens -> resize input embeddings and LM head
        model.llava.resize_token_embeddings(ids.vocab_size, mean_resizing=llava is not None and str(device) != "meta")
    model.ids = ids
    if sam_state is not None:
        from .weights import load_sam_encoder_state

        load_sam_encoder_state(model.pixel_encoder, sam_state, sam_path)
    if pretrained_pixel and str(device) != "meta" and hasattr(model.pixel_encoder, "load_pretrained"):
        model.pixel_encoder.load_pretrained()
    if str(device) != "meta":
        model.to(device)
        if dtype is not None:
            model.to(dtype)
    model.eval()
    return model, tokenizer


def _llava_kwargs(config) -> dict[str, Any]:
    d = config.to_dict()
    keep = ("vision_config", "text_config", "image_grid_pinpoints", "vision_feature_select_strategy",
            "vision_feature_layer", "vision_aspect_ratio", "projector_hidden_act", "multimodal_projector_bias",
            "tie_word_embeddings")
    out = {k: d[k] for k in keep if k in d}
    for sub in ("vision_config", "text_config"):
        out[sub] = {k: v for k, v in out[sub].items() if k not in ("transformers_version", "architectures",
                                                                    "_name_or_path", "id2label", "label2id")}
    return out


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    """Parameter counts per AG-VAS component (works on the meta device)."""
    def n(m: torch.nn.Module) -> int:
        seen, total = set(), 0
        for p in m.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
        return total

    lm = model.llava.model
    return {
        "vision_tower": n(lm.vision_tower),
        "projector": n(lm.multi_modal_projector) + lm.image_newline.numel(),  # + the anyres newline
        "llm": n(lm.language_model),
        "lm_head": 0 if model.lm_head.weight is model.embed_tokens.weight else model.lm_head.weight.numel(),
        "pixel_encoder": n(model.pixel_encoder),
        "spam": n(model.spam),
        "refiner": n(model.refiner),
        "agmd": n(model.agmd),
        "total": n(model),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
