"""LoRA on the Qwen2 decoder only (peft), trainable-parameter selection and merging (DESIGN §2.10)."""

from __future__ import annotations

from torch import nn

# SigLIP also has q/k/v_proj: target the LLM's modules only, by full-name pattern.
LLM_LORA_TARGETS = (
    r"llava\.model\.language_model\.layers\.\d+\."
    r"(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))"
)


def apply_lora(model: nn.Module) -> nn.Module:
    """Inject LoRA adapters (rank/alpha/dropout from ``model.cfg``) into the LLM's attention and
    MLP projections, in place."""
    from peft import LoraConfig, inject_adapter_in_model

    cfg = model.cfg
    if cfg.lora_rank is None:
        raise ValueError(f"config {cfg.name!r} has lora_rank=None (full fine-tuning); no LoRA to apply")
    conf = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=LLM_LORA_TARGETS, bias="none")
    inject_adapter_in_model(conf, model)
    return model


def has_lora(model: nn.Module) -> bool:
    from peft.tuners.lora import LoraLayer

    return any(isinstance(m, LoraLayer) for m in model.modules())


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA adapter into its base layer and put the plain layer back (for export)."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
    return model


def configure_trainable(model: nn.Module) -> None:
    """Set ``requires_grad`` per DESIGN §2.10 for the model's config.

    Real configs: LoRA weights, SPAM, token refiner, AGMD, token embeddings and LM head train;
    SigLIP, projector, SAM encoder and the LLM base weights stay frozen. ``tiny-sam`` (no pretrained
    weights exist) trains everything, the SigLIP tower and the SAM pixel encoder included; ``tiny``
    too, except its pixel encoder's ``frozen_modules`` (the ImageNet EfficientNet-Lite0 backbone).
    """
    cfg = model.cfg
    for p in model.parameters():
        p.requires_grad_(False)
    trainable: list[nn.Module] = [model.spam, model.refiner, model.agmd, model.embed_tokens, model.lm_head]
    if cfg.lora_rank is None:
        trainable.append(model.llava)  # full fine-tuning of the LLM (and, for tiny, the vision tower)
    if cfg.train_pixel_encoder:
        trainable.append(model.pixel_encoder)
    for m in trainable:
        for p in m.parameters():
            p.requires_grad_(True)
    if cfg.lora_rank is not None:
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.requires_grad_(True)
    if not cfg.train_vision_tower:
        for p in model.llava.model.vision_tower.parameters():
            p.requires_grad_(False)
        for p in model.llava.model.multi_modal_projector.parameters():
            p.requires_grad_(False)
    if not cfg.train_pixel_encoder:
        for p in model.pixel_encoder.parameters():
            p.requires_grad_(False)
    for m in getattr(model.pixel_encoder, "frozen_modules", ()):  # a pretrained backbone (kind efficientnet_lite0)
        for p in m.parameters():
            p.requires_grad_(False)
