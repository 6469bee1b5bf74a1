"""Loaders for real weights in their official formats, from local paths only.

- ``--llava DIR``: a Hugging Face LLaVA-OneVision directory (``config.json``, safetensors,
  tokenizer and ``preprocessor_config.json``), loaded with ``local_files_only=True``.
- ``--sam FILE``: an official SAM checkpoint (``sam_vit_{b,l,h}_*.pth``): the ``image_encoder.``
  entries, read with ``torch.load(weights_only=True)`` and checked key by key.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from ..config import SAM_VARIANTS, PixelEncoderConfig


def load_llava_dir(directory: str | Path, dtype: torch.dtype | None = None):
    from transformers import LlavaOnevisionForConditionalGeneration

    d = Path(directory)
    if not (d / "config.json").is_file():
        raise FileNotFoundError(f"--llava {d}: not a Hugging Face model directory (no config.json)")
    if not any(d.glob("*.safetensors")) and not any(d.glob("*.bin")):
        raise FileNotFoundError(f"--llava {d}: no weight files (*.safetensors) next to config.json")
    try:
        return LlavaOnevisionForConditionalGeneration.from_pretrained(str(d), local_files_only=True, dtype=dtype)
    except Exception as e:  # name the directory in the one-line error
        raise RuntimeError(f"--llava {d}: could not load LLaVA-OneVision weights: {e}") from e


def read_sam_encoder_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The ``image_encoder.*`` tensors of an official SAM ``.pth`` (prefix removed)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--sam {p}: file not found")
    try:
        state = torch.load(str(p), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"--sam {p}: not a weights-only checkpoint (refusing to unpickle arbitrary objects): "
                         f"{str(e).splitlines()[0]}") from None
    except Exception as e:
        raise ValueError(f"--sam {p}: cannot read as a PyTorch checkpoint: {e}") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise ValueError(f"--sam {p}: expected a state dict, got {type(state).__name__}")
    enc = {k[len("image_encoder."):]: v for k, v in state.items() if k.startswith("image_encoder.")}
    if not enc:
        raise ValueError(f"--sam {p}: no 'image_encoder.*' keys (is this an official sam_vit_*.pth?)")
    return enc


def sam_encoder_config(state: dict[str, torch.Tensor], base: PixelEncoderConfig, path) -> PixelEncoderConfig:
    """The encoder config implied by the weights: the config's own encoder when the widths agree,
    else the official SAM variant of that width (SAM's 1024 px / 16 px-patch geometry)."""
    w = state.get("patch_embed.proj.weight")
    if w is None:
        raise ValueError(f"--sam {path}: missing image_encoder.patch_embed.proj.weight")
    embed_dim, patch = int(w.shape[0]), int(w.shape[-1])
    if embed_dim == base.embed_dim and patch == base.patch_size:
        return base
    for v in SAM_VARIANTS.values():
        if v["embed_dim"] == embed_dim:
            return PixelEncoderConfig(img_size=1024, patch_size=16, window_size=14, out_chans=256, **v)
    raise ValueError(f"--sam {path}: embed_dim {embed_dim} (patch {patch}) matches neither the config's encoder "
                     f"(embed_dim {base.embed_dim}, patch {base.patch_size}) nor a SAM variant "
                     f"{ {k: v['embed_dim'] for k, v in SAM_VARIANTS.items()} }")


def load_sam_encoder_state(encoder: torch.nn.Module, state: dict[str, torch.Tensor], path) -> None:
    """Strict load whose error names the file and the missing / unexpected / mis-shaped keys."""
    own = encoder.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(state)) if tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or shapes:
        raise ValueError(f"--sam {path}: image_encoder weights do not match the SAM encoder: "
                         f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                         f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}, "
                         f"wrong shape {shapes[:4]}")
    encoder.load_state_dict(state, strict=True)
