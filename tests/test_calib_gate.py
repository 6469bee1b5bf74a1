"""The accuracy gate's numbers on constructed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from agvas.calibration.gate import Budget, Outputs, anchor_cosine, compare, format_gate, mask_iou, snr_db


def _out(mask, states, text="Sure, it is [NOR][ANO][SEG]."):
    mask = np.asarray(mask, bool)
    return Outputs(mask, bool(mask.any()), states, text)


def test_metrics_by_hand():
    a = np.zeros((4, 4), bool)
    b = a.copy()
    assert mask_iou(a, b) == 1.0  # both empty: perfect agreement
    a[0, :2] = True
    b[0, 1:3] = True
    assert mask_iou(a, b) == pytest.approx(1 / 3)
    s = np.random.RandomState(0).randn(3, 8).astype(np.float32)
    assert anchor_cosine(s, s) == pytest.approx(1.0)
    assert anchor_cosine(s, -s) == pytest.approx(-1.0)
    assert anchor_cosine(None, None) == 1.0 and anchor_cosine(s, None) == 0.0
    x = np.ones(100)
    assert math.isinf(snr_db(x, x))
    assert snr_db(x, x + 0.1) == pytest.approx(20.0)  # signal 100, noise 1 -> 20 dB
    with pytest.raises(ValueError, match=r"reference \(4, 4\) vs candidate \(2, 2\)"):
        mask_iou(np.zeros((4, 4)), np.zeros((2, 2)))


def test_identical_outputs_pass_and_damaged_fail():
    rng = np.random.RandomState(1)
    refs = []
    for i in range(10):
        m = np.zeros((16, 16), bool)
        if i % 2:
            m[rng.randint(0, 8):, rng.randint(0, 8):] = True
        refs.append(_out(m, rng.randn(3, 32)))
    same = compare(refs, refs, [f"img{i}" for i in range(10)], ["calibration"] * 5 + ["held_out"] * 5)
    assert same.passed and same.mean_mask_iou == 1.0 and same.min_mask_iou == 1.0
    assert same.verdict_agreement == 1.0 and same.anchor_cosine == pytest.approx(1.0)
    rec = same.to_manifest()
    assert rec["images"]["held_out"]["count"] == 5 and rec["passed"] and rec["failures"] == []
    # damaged: one image's anomaly vanishes (verdict flips), another's mask shifts
    bad = list(refs)
    bad[1] = _out(np.zeros((16, 16), bool), refs[1].anchor_states + 3, "Sure, it is [NOR].")
    shifted = np.roll(refs[3].mask, 4, axis=1)
    bad[3] = _out(shifted, refs[3].anchor_states)
    r = compare(refs, bad, [f"img{i}" for i in range(10)], ["calibration"] * 10,
                budget=Budget.parse("mean_iou=0.95,verdict=0.99,text=1"))
    assert not r.passed
    assert r.verdict_agreement == pytest.approx(0.9)
    assert r.min_mask_iou == 0.0
    expected = (8 + 0 + mask_iou(refs[3].mask, shifted)) / 10
    assert r.mean_mask_iou == pytest.approx(expected)
    assert r.text_agreement == pytest.approx(0.9)
    fails = " ".join(r.failures())
    assert "mean_mask_iou" in fails and "verdict_agreement 0.9000 < 0.99" in fails and "text_agreement" in fails
    table = format_gate(r)
    assert "FAIL" in table and "| verdict agreement | 90.00% | ≥ 0.99 |" in table
    # a teacher-forced budget needs the teacher-forced check
    f = compare(refs, refs, [f"img{i}" for i in range(10)], ["calibration"] * 10, budget=Budget(forced_iou=0.9))
    assert not f.passed and "no teacher-forced check ran" in f.failures()[0]
    f.forced = {"images": 2, "mask_iou": 0.95, "min_mask_iou": 0.9, "anchor_cosine": 0.999, "min_anchor_cosine": 0.998}
    assert f.passed and f.to_manifest()["teacher_forced"]["mask_iou"] == 0.95
    assert "teacher-forced mask IoU" in format_gate(f)


def test_budget_parsing():
    b = Budget.parse("mean_iou=0.9, min_iou=0.5,anchor_cosine=none,forced_iou=0.9")
    assert (b.mean_iou, b.min_iou, b.verdict, b.anchor_cosine, b.forced_iou) == (0.9, 0.5, 0.99, None, 0.9)
    with pytest.raises(ValueError, match="KEY in"):
        Budget.parse("iou=0.9")
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        Budget.parse("verdict=99")
