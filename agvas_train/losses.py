"""AG-VAS training losses (paper §3.2, DESIGN §2.9).

``L = L_text + Σ_{c ∈ {NOR, ANO, SEG}} (w_bce·BCE(m_c, g_c) + w_dice·Dice(m_c, g_c))``,
by default w_bce = 0.5 and w_dice = 2.0 (the paper's text read in order; LISA's code uses 2.0 /
0.5 — both are options of ``agvas train``). The text loss is token cross-entropy over every answer
token (anchors and EOS included).

The maps are supervised as inference reads them (DESIGN §2.8): [SEG] through a sigmoid,
the relative anchors through the **softmax over [m_nor, m_ano]** — ``P_ano = σ(m_ano − m_nor)``
against the anomaly mask and ``P_nor = σ(m_nor − m_ano)`` against its complement — so the map
that inference thresholds is the one trained. A channel is supervised only for the samples that
carry it (relative anchors from anomaly data only; general segmentation supervises [SEG] only;
VQA none).

**Per-sample normalisation.** Every loss is first a per-sample value (text CE = mean over that
sample's answer tokens; mask loss = the sum over its supervised channels) and a batch's loss is
the sum over its samples divided by the *global* batch (per device × devices × accumulation).
That makes the gradient independent of how the global batch is split into micro-batches,
image-size groups and processes: 2 processes with batch b give the gradient of 1 process with
batch 2b (tests/test_distributed_train.py).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

W_BCE = 0.5
W_DICE = 2.0
DICE_SMOOTH = 1.0
IGNORE = -100
CHANNELS = ("nor", "ano", "seg")


def text_loss_per_sample(hidden: torch.Tensor, labels: torch.Tensor, lm_head: torch.nn.Module) -> torch.Tensor:
    """Next-token CE over the answer, per sample ``[B]``: the hidden state at position t predicts
    ``labels`` at t+1 (labels are the input ids with ``IGNORE`` outside the answer); a sample
    without answer tokens gives 0. The LM head runs only at the answer positions (a 152k-word
    head over ~7k visual positions would not fit)."""
    target = labels[:, 1:]
    keep = target != IGNORE
    logits = lm_head(hidden[:, :-1][keep])
    ce = F.cross_entropy(logits.float(), target[keep], reduction="none")
    rows = keep.nonzero()[:, 0]
    per = torch.zeros(labels.shape[0], dtype=ce.dtype, device=ce.device).index_add(0, rows, ce)
    count = keep.sum(1).clamp(min=1).to(ce.dtype)
    return per / count


def text_loss(hidden: torch.Tensor, labels: torch.Tensor, lm_head: torch.nn.Module) -> torch.Tensor:
    """Token-mean CE over all answer tokens of the batch (diagnostics and single-sample use)."""
    target = labels[:, 1:]
    keep = target != IGNORE
    return F.cross_entropy(lm_head(hidden[:, :-1][keep]).float(), target[keep])


def bce_per_mask(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean pixel BCE per mask: ``[N,h,w] -> [N]``."""
    return F.binary_cross_entropy_with_logits(logits.float(), target, reduction="none").flatten(1).mean(1)


def dice_per_mask(logits: torch.Tensor, target: torch.Tensor, smooth: float = DICE_SMOOTH) -> torch.Tensor:
    """``1 - (2Σpt + s) / (Σp + Σt + s)`` per mask with p = sigmoid(logits): ``[N,h,w] -> [N]``.
    With an empty target it is ``Σp / (Σp + s)``, which pushes the map to zero."""
    p = torch.sigmoid(logits.float()).flatten(1)
    t = target.flatten(1)
    return 1.0 - (2.0 * (p * t).sum(1) + smooth) / (p.sum(1) + t.sum(1) + smooth)


def channel_logits(mask_logits: torch.Tensor) -> torch.Tensor:
    """``[B,3,h,w]`` (m_nor, m_ano, m_seg) -> the logits of the maps inference reads:
    ``(m_nor − m_ano, m_ano − m_nor, m_seg)``, i.e. σ of each is P_nor, P_ano (the softmax over
    [m_nor, m_ano]) and P_seg."""
    m = mask_logits.float()
    d = m[:, 1] - m[:, 0]
    return torch.stack([-d, d, m[:, 2]], dim=1)


def segmentation_loss_per_sample(mask_logits: torch.Tensor, target: torch.Tensor, supervise: torch.Tensor,
                                 w_bce: float = W_BCE, w_dice: float = W_DICE
                                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``mask_logits [B,3,h,w]`` (NOR, ANO, SEG), anomaly ``target [B,h,w]`` in {0,1},
    ``supervise [B,3]`` bool. Returns the per-sample loss ``[B]`` (sum over the supervised
    channels) and, per channel, the per-sample values (0 where not supervised)."""
    logits = channel_logits(mask_logits)
    targets = (1.0 - target, target, target)
    total = logits.new_zeros(logits.shape[0])
    parts: dict[str, torch.Tensor] = {}
    for c, name in enumerate(CHANNELS):
        rows = supervise[:, c].to(total.dtype)
        if not bool(rows.any()):
            continue
        loss_c = w_bce * bce_per_mask(logits[:, c], targets[c]) + w_dice * dice_per_mask(logits[:, c], targets[c])
        parts[name] = loss_c * rows
        total = total + parts[name]
    return total, parts


def segmentation_loss(mask_logits: torch.Tensor, target: torch.Tensor, supervise: torch.Tensor,
                      w_bce: float = W_BCE, w_dice: float = W_DICE) -> tuple[torch.Tensor, dict[str, float]]:
    """Batch view of :func:`segmentation_loss_per_sample`: the sum over channels of each
    channel's mean over the samples that carry it, and those means."""
    _, per = segmentation_loss_per_sample(mask_logits, target, supervise, w_bce, w_dice)
    total = mask_logits.new_zeros((), dtype=torch.float32)
    parts: dict[str, float] = {}
    for c, name in enumerate(CHANNELS):
        if name in per:
            mean = per[name].sum() / supervise[:, c].sum()
            parts[name] = float(mean.detach())
            total = total + mean
    return total, parts


def mask_logits_at_input(mask_logits: torch.Tensor, img_size: int, input_size: tuple[int, int]) -> torch.Tensor:
    """Low-res logits ``[B,3,4h,4w]`` -> the SAM input frame (upsampled to ``img_size``, padding
    removed): where the targets live, as in SAM's/LISA's ``postprocess_masks``."""
    x = F.interpolate(mask_logits.float(), (img_size, img_size), mode="bilinear", align_corners=False)
    return x[..., : input_size[0], : input_size[1]]
