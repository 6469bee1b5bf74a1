"""Checkpoints: a directory with the config, token ids, tokenizer/processor files and safetensors.

Layout::

    CKPT/checkpoint.json      format, AG-VAS config, token ids, base-weight sources, LoRA state
    CKPT/model.safetensors    the saved tensors (all for `tiny`; trainable parts for real configs)
    CKPT/tokenizer/           tokenizer (anchors included) + preprocessor_config.json
    CKPT/train_state.pt       optional optimizer/scheduler/step for --resume (weights-only pickle)

A real-config checkpoint saves only what trains (LoRA, SPAM, refiner, AGMD, embeddings, LM head)
and records where the frozen base weights come from (``--llava`` / ``--sam`` paths).
Save is atomic (written to a temp dir, then renamed); load is exact.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from agvas.atomic import make_temp_dir, publish_dir

from .config import AGVASConfig
from .lora import apply_lora, has_lora, merge_lora
from .modeling.agvas import AGVAS, TokenIds

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
META = "checkpoint.json"


def _unique_state(model: torch.nn.Module, only_trainable: bool,
                  full_state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    keep = {n for n, p in model.named_parameters() if p.requires_grad} | {n for n, _ in model.named_buffers()}
    state, seen = {}, set()
    for name, t in (full_state if full_state is not None else model.state_dict(keep_vars=False)).items():
        if only_trainable and name not in keep and "lora_" not in name:
            continue
        key = (t.data_ptr(), t.shape, t.stride()) if t.numel() else (name,)
        if key in seen:  # tied weights (e.g. Qwen2-0.5B's LM head) are stored once
            continue
        seen.add(key)
        state[name] = t.detach().contiguous().cpu()
    return state


def save_checkpoint(model: AGVAS, tokenizer, image_processor, out_dir: str | Path, *,
                    base: dict[str, str | None] | None = None, extra: dict[str, Any] | None = None,
                    train_state: dict[str, Any] | None = None, state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``out_dir`` atomically. ``base`` holds the ``llava``/``sam`` source paths, if any;
    without base weights everything is saved (the model can be rebuilt from the file alone).
    ``state``: the model's full state dict when its parameters are sharded (FSDP), gathered by
    the caller; by default ``model.state_dict()``."""
    out = Path(out_dir)
    base = dict(base or {"llava": None, "sam": None})
    full = not (base.get("llava") or base.get("sam"))
    tmp = make_temp_dir(out.parent, f".{out.name}.")  # the umask's mode, not mkdtemp's 0700
    try:
        state = _unique_state(model, only_trainable=not full, full_state=state)
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
        tok_dir = tmp / "tokenizer"
        tokenizer.save_pretrained(str(tok_dir))
        image_processor.save_pretrained(str(tok_dir))
        cfg_dict = model.cfg.to_dict()
        cfg_dict["tokenizer_dir"] = None  # the checkpoint's own tokenizer/ is used on load
        meta = {
            "format_version": FORMAT_VERSION,
            "config": cfg_dict,
            "token_ids": model.ids.to_dict(),
            "base": base,
            "saved": "full" if full else "trainable",
            "lora": has_lora(model),
            "tensors": len(state),
            **({"pixel_encoder_weights": record} if (record := getattr(model.pixel_encoder, "weights_record", None))
               else {}),
            **(extra or {}),
        }
        (tmp / META).write_text(json.dumps(meta, indent=2))
        if train_state is not None:
            torch.save(train_state, tmp / "train_state.pt")
        publish_dir(tmp, out)  # every file gets the umask's mode (safetensors writes 0600), then the rename
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_meta(ckpt: str | Path) -> dict[str, Any]:
    p = Path(ckpt) / META
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint {ckpt}: no {META} (not an AG-VAS checkpoint directory)")
    meta = json.loads(p.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"checkpoint {ckpt}: format_version {meta.get('format_version')} but this "
                         f"code reads {FORMAT_VERSION}")
    return meta


def load_checkpoint(ckpt: str | Path, device: str = "cpu", merge: bool = False,
                    dtype: torch.dtype | None = torch.float32, llava_dtype: torch.dtype | None = None):
    """Rebuild the model exactly; returns ``(model, tokenizer, image_processor, meta)``.

    The whole model is held in ``dtype`` (float32 by default, whatever dtype the base weights
    were saved in: llava-hf directories hold float16). ``dtype=None`` (resuming a training run):
    the saved tensors keep the dtype they were saved in (fp32 master weights) and the base weights
    are loaded in ``llava_dtype``.
    ``merge=True`` folds LoRA into the LLM (what ``export`` needs)."""
    from .modeling.build import build_model, image_processor_for
    from .tokenizer import load_tokenizer

    ckpt = Path(ckpt)
    meta = read_meta(ckpt)
    cfg = AGVASConfig.from_dict(meta["config"])
    wpath = ckpt / WEIGHTS
    if not wpath.is_file():
        raise FileNotFoundError(f"checkpoint {ckpt}: missing {WEIGHTS}")
    tokenizer = load_tokenizer(cfg, ckpt / "tokenizer")
    base = meta.get("base") or {}
    for k in ("llava", "sam"):
        if base.get(k) and not Path(base[k]).exists():
            raise FileNotFoundError(f"checkpoint {ckpt}: base weights --{k} {base[k]} not found")
    model, tokenizer = build_model(cfg, tokenizer=tokenizer, llava_dir=base.get("llava"), sam_path=base.get("sam"),
                                   dtype=dtype, llava_dtype=llava_dtype, pretrained_pixel=meta.get("saved") != "full")
    if meta.get("pixel_encoder_weights") and hasattr(model.pixel_encoder, "weights_record"):
        model.pixel_encoder.weights_record = meta["pixel_encoder_weights"]  # the packaged weights it was built from
    expected = TokenIds.from_dict(meta["token_ids"])
    if model.ids.to_dict() != expected.to_dict():
        raise ValueError(f"checkpoint {ckpt}: token ids {expected.to_dict()} do not match the rebuilt "
                         f"tokenizer/model {model.ids.to_dict()}")
    if meta.get("lora"):
        apply_lora(model)
    try:
        state = load_file(str(wpath))
    except Exception as e:
        raise ValueError(f"checkpoint {ckpt}: cannot read {wpath.name}: {e}") from None
    own = model.state_dict()
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in state if k in own and own[k].shape != state[k].shape]
    if unexpected or shapes:
        raise ValueError(f"checkpoint {ckpt}/{WEIGHTS} does not match config {cfg.name!r}: "
                         f"unexpected {unexpected[:8]}, wrong shape {shapes[:4]}")
    if meta.get("saved") == "full":
        tied = {n for n in own if n == "llava.lm_head.weight" and model.lm_head.weight is model.embed_tokens.weight}
        missing = sorted(set(own) - set(state) - tied)
        if missing:
            raise ValueError(f"checkpoint {ckpt}/{WEIGHTS} lacks tensors {missing[:8]} for config {cfg.name!r}")
    if dtype is None:  # the saved tensors keep their own dtype (tied weights share one Parameter)
        params = dict(model.named_parameters())
        for name, t in state.items():
            target = params.get(name)
            if target is not None and target.is_floating_point() and target.dtype != t.dtype:
                target.data = target.data.to(t.dtype)
    model.load_state_dict(state, strict=False)
    if merge and meta.get("lora"):
        merge_lora(model)
    model.eval().to(device)
    return model, tokenizer, image_processor_for(cfg, ckpt / "tokenizer"), meta


def checkpoint_hash(ckpt: str | Path) -> str:
    """SHA-256 over the checkpoint's metadata and weights (the export manifest's source hash)."""
    h = hashlib.sha256()
    for name in (META, WEIGHTS):
        with open(Path(ckpt) / name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()
