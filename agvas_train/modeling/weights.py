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
    """The encoder config implied by the weights: the config's own encoder when they match it,
    else the geometry read off the tensors (so ViT-B/L/H and any other ``ImageEncoderViT`` in
    the official layout load): width and patch from ``patch_embed``, input size from
    ``pos_embed``, depth from the blocks, head width and window size from the relative position
    tables (global-attention blocks span the whole grid), neck width from ``neck.0``."""
    w = state.get("patch_embed.proj.weight")
    if w is None:
        raise ValueError(f"--sam {path}: missing image_encoder.patch_embed.proj.weight")
    embed_dim, patch = int(w.shape[0]), int(w.shape[-1])
    try:
        grid = int(state["pos_embed"].shape[1])
        depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
        spans = [int(state[f"blocks.{i}.attn.rel_pos_h"].shape[0]) for i in range(depth)]
        head_dim = int(state["blocks.0.attn.rel_pos_h"].shape[1])
        mlp = int(state["blocks.0.mlp.lin1.weight"].shape[0])
        out_chans = int(state["neck.0.weight"].shape[0])
        consistent = (tuple(state["neck.0.weight"].shape) == (out_chans, embed_dim, 1, 1)
                      and tuple(state["neck.2.weight"].shape) == (out_chans, out_chans, 3, 3)
                      and embed_dim % head_dim == 0 and len({s for s in spans if s != 2 * grid - 1}) <= 1)
    except (KeyError, ValueError, IndexError):
        consistent = False
    if not consistent:  # not a whole encoder: the strict load below names what is missing or mis-shaped
        return base
    full = 2 * grid - 1
    windows = {s for s in spans if s != full}
    found = PixelEncoderConfig(
        img_size=grid * patch, patch_size=patch, embed_dim=embed_dim, depth=depth, num_heads=embed_dim // head_dim,
        window_size=(windows.pop() + 1) // 2 if windows else base.window_size,
        global_attn_indexes=tuple(i for i, s in enumerate(spans) if s == full), out_chans=out_chans,
        mlp_ratio=mlp / embed_dim)
    return base if found == base else found


def state_dict_mismatch(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor]
                        ) -> tuple[list[str], list[str], list[str]]:
    """``(missing, unexpected, wrong shape)`` keys of a file's ``state`` against a model's ``own``
    state dict, sorted; a wrong shape reads ``"key: file (..) vs model (..)"``."""
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(state)) if tuple(own[k].shape) != tuple(state[k].shape)]
    return missing, unexpected, shapes


def load_sam_encoder_state(encoder: torch.nn.Module, state: dict[str, torch.Tensor], path) -> None:
    """Strict load whose error names the file and the missing / unexpected / mis-shaped keys."""
    missing, unexpected, shapes = state_dict_mismatch(encoder.state_dict(), state)
    if missing or unexpected or shapes:
        raise ValueError(f"--sam {path}: image_encoder weights do not match the SAM encoder: "
                         f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                         f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}, "
                         f"wrong shape {shapes[:4]}")
    encoder.load_state_dict(state, strict=True)
