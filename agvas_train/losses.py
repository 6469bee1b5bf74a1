"""AG-VAS training losses (paper §3.2, DESIGN §2.9).

``L = L_text + Σ_{c ∈ {NOR, ANO, SEG}} (w_bce·BCE(m_c, g_c) + w_dice·Dice(m_c, g_c))``,
w_bce = 0.5, w_dice = 2.0. The text loss is token cross-entropy over every answer token
(anchors and EOS included). Each anchor's mask logit map is supervised through a sigmoid, as in
LISA: g_ANO = g_SEG = the anomaly mask, g_NOR = its complement. A channel is only supervised
for the samples that carry it (relative anchors from anomaly data only; general segmentation
supervises [SEG] only; VQA none); each channel's loss is the mean over those samples.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

W_BCE = 0.5
W_DICE = 2.0
DICE_SMOOTH = 1.0
IGNORE = -100


def text_loss(hidden: torch.Tensor, labels: torch.Tensor, lm_head: torch.nn.Module) -> torch.Tensor:
    """Next-token CE over the answer: the hidden state at position t predicts ``labels`` at t+1
    (labels are the input ids with ``IGNORE`` outside the answer). The LM head runs only at
    those positions (a 152k-word head over ~7k visual positions would not fit)."""
    target = labels[:, 1:]
    keep = target != IGNORE
    logits = lm_head(hidden[:, :-1][keep])
    return F.cross_entropy(logits.float(), target[keep])


def bce_per_mask(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean pixel BCE per mask: ``[N,h,w] -> [N]``."""
    return F.binary_cross_entropy_with_logits(logits.float(), target, reduction="none").flatten(1).mean(1)


def dice_per_mask(logits: torch.Tensor, target: torch.Tensor, smooth: float = DICE_SMOOTH) -> torch.Tensor:
    """``1 - (2Σpt + s) / (Σp + Σt + s)`` per mask with p = sigmoid(logits): ``[N,h,w] -> [N]``.
    With an empty target it is ``Σp / (Σp + s)``, which pushes the map to zero."""
    p = torch.sigmoid(logits.float()).flatten(1)
    t = target.flatten(1)
    return 1.0 - (2.0 * (p * t).sum(1) + smooth) / (p.sum(1) + t.sum(1) + smooth)


def segmentation_loss(mask_logits: torch.Tensor, target: torch.Tensor, supervise: torch.Tensor,
                      w_bce: float = W_BCE, w_dice: float = W_DICE) -> tuple[torch.Tensor, dict[str, float]]:
    """``mask_logits [B,3,h,w]`` (NOR, ANO, SEG), anomaly ``target [B,h,w]`` in {0,1},
    ``supervise [B,3]`` bool. Returns the summed loss and its per-channel parts."""
    targets = (1.0 - target, target, target)
    total = mask_logits.new_zeros((), dtype=torch.float32)
    parts: dict[str, float] = {}
    for c, name in enumerate(("nor", "ano", "seg")):
        rows = supervise[:, c]
        if not bool(rows.any()):
            continue
        lg, tg = mask_logits[rows, c], targets[c][rows]
        loss_c = w_bce * bce_per_mask(lg, tg).mean() + w_dice * dice_per_mask(lg, tg).mean()
        parts[name] = float(loss_c.detach())
        total = total + loss_c
    return total, parts


def mask_logits_at_input(mask_logits: torch.Tensor, img_size: int, input_size: tuple[int, int]) -> torch.Tensor:
    """Low-res logits ``[B,3,4h,4w]`` -> the SAM input frame (upsampled to ``img_size``, padding
    removed): where the targets live, as in SAM's/LISA's ``postprocess_masks``."""
    x = F.interpolate(mask_logits.float(), (img_size, img_size), mode="bilinear", align_corners=False)
    return x[..., : input_size[0], : input_size[1]]
