"""Loss values on hand-computed cases (paper §3.2, DESIGN §2.9)."""

from __future__ import annotations

import math

import pytest
import torch

from agvas.train.losses import (IGNORE, bce_per_mask, dice_per_mask, mask_logits_at_input, segmentation_loss,
                                text_loss)


def test_bce_and_dice_by_hand():
    logits = torch.zeros(1, 2, 2)  # p = 0.5 everywhere
    target = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    assert float(bce_per_mask(logits, target)) == pytest.approx(math.log(2))
    # 1 - (2*0.5*1 + 1) / (4*0.5 + 1 + 1) = 0.5
    assert float(dice_per_mask(logits, target)) == pytest.approx(0.5)
    # a confident, correct prediction: both ~0
    good = torch.tensor([[[20.0, -20.0], [-20.0, -20.0]]])
    assert float(bce_per_mask(good, target)) < 1e-6 and float(dice_per_mask(good, target)) < 1e-6
    # empty target: dice = Σp / (Σp + 1)
    assert float(dice_per_mask(logits, torch.zeros(1, 2, 2))) == pytest.approx(2 / 3)


def test_segmentation_loss_channels_and_complement():
    logits = torch.zeros(1, 3, 2, 2)
    target = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    total, parts = segmentation_loss(logits, target, torch.tensor([[True, True, True]]))
    nor = 0.5 * math.log(2) + 2.0 * (1 - (2 * 0.5 * 3 + 1) / (2 + 3 + 1))  # NOR target = complement
    ano = 0.5 * math.log(2) + 2.0 * 0.5
    assert parts["nor"] == pytest.approx(nor) and parts["ano"] == pytest.approx(ano) and parts["seg"] == pytest.approx(ano)
    assert float(total) == pytest.approx(nor + 2 * ano)
    # general segmentation: [SEG] only
    total, parts = segmentation_loss(logits, target, torch.tensor([[False, False, True]]))
    assert set(parts) == {"seg"} and float(total) == pytest.approx(ano)
    # per-channel mean over the samples that carry it
    two = torch.zeros(2, 3, 2, 2)
    two[1, 2] = torch.tensor([[20.0, -20.0], [-20.0, -20.0]])  # sample 1's SEG is perfect
    total, parts = segmentation_loss(two, target.expand(2, -1, -1), torch.tensor([[False, False, True], [True, True, True]]))
    assert parts["seg"] == pytest.approx(ano / 2, rel=1e-5)
    assert parts["nor"] == pytest.approx(nor) and parts["ano"] == pytest.approx(ano)
    # nothing supervised (VQA)
    total, parts = segmentation_loss(logits, target, torch.tensor([[False, False, False]]))
    assert float(total) == 0.0 and parts == {}


def test_text_loss_by_hand():
    v = 5
    head = torch.nn.Identity()  # hidden states = logits
    labels = torch.tensor([[IGNORE, IGNORE, 3, 1]])  # the answer is tokens 3, 1
    logits = torch.zeros(1, 4, v)  # uniform -> ln V per answer token
    assert float(text_loss(logits, labels, head)) == pytest.approx(math.log(v))
    logits[0, 1, 3] = 30.0  # position 1 predicts token 3 (position 2)
    logits[0, 2, 1] = 30.0
    assert float(text_loss(logits, labels, head)) < 1e-6
    logits[0, 0, 0] = -30.0  # the prompt positions do not count
    logits[0, 3, 0] = -30.0  # nor does the last position
    assert float(text_loss(logits, labels, head)) < 1e-6
    # only the answer positions go through the head
    seen = []
    text_loss(logits, labels, lambda h: seen.append(h.shape) or h)
    assert seen == [torch.Size([2, v])]


def test_mask_logits_to_input_frame():
    low = torch.zeros(1, 3, 4, 4)
    low[..., :2, :2] = 1.0
    out = mask_logits_at_input(low, 8, (8, 6))
    assert out.shape == (1, 3, 8, 6)
    assert float(out[0, 0, 0, 0]) == pytest.approx(1.0) and float(out[0, 0, 7, 5]) == pytest.approx(0.0)


def test_relative_anchors_trained_on_the_softmax_inference_reads():
    """[NOR]/[ANO] are supervised through softmax([m_nor, m_ano]) (what inference thresholds):
    shifting both logits together changes nothing; [SEG] stays a sigmoid."""
    from agvas.train.losses import channel_logits, segmentation_loss_per_sample

    g = torch.Generator().manual_seed(0)
    m = torch.randn(2, 3, 4, 4, generator=g)
    target = (torch.rand(2, 4, 4, generator=g) > 0.5).float()
    sup = torch.tensor([[True, True, True], [False, False, True]])
    p_ano = torch.softmax(m[:, :2], dim=1)[:, 1]
    assert torch.allclose(torch.sigmoid(channel_logits(m)[:, 1]), p_ano, atol=1e-6)
    assert torch.allclose(torch.sigmoid(channel_logits(m)[:, 0]), 1 - p_ano, atol=1e-6)
    shifted = m.clone()
    shifted[:, :2] += 3.0
    a, pa = segmentation_loss_per_sample(m, target, sup)
    b, pb = segmentation_loss_per_sample(shifted, target, sup)
    assert torch.allclose(a, b, atol=1e-5) and torch.allclose(pa["ano"], pb["ano"], atol=1e-5)
    assert float(pa["nor"][1]) == 0.0 and float(pa["ano"][1]) == 0.0 and float(pa["seg"][1]) > 0  # [SEG] only
    # per-sample losses are the sum over the supervised channels
    assert torch.allclose(a, pa["nor"] + pa["ano"] + pa["seg"])
    # configurable weights (LISA's code: 2.0 BCE / 0.5 Dice)
    c, _ = segmentation_loss_per_sample(m, target, sup, w_bce=2.0, w_dice=0.5)
    assert not torch.allclose(a, c)


def test_text_loss_per_sample_is_each_samples_token_mean():
    from agvas.train.losses import text_loss_per_sample

    v = 5
    logits = torch.zeros(2, 4, v)
    logits[0, 1, 3] = 30.0
    labels = torch.tensor([[IGNORE, IGNORE, 3, 1], [IGNORE, IGNORE, IGNORE, IGNORE]])
    per = text_loss_per_sample(logits, labels, torch.nn.Identity())
    assert float(per[0]) == pytest.approx(math.log(v) / 2, rel=1e-4)  # one token right, one uniform
    assert float(per[1]) == 0.0  # no answer tokens
