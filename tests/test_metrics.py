"""Metrics on hand-computed cases (DESIGN §5, paper appendix B.3)."""

from __future__ import annotations

import numpy as np
import pytest

from agvas.train.metrics import CategoryStats, Protocol, f1_max, iou, markdown_table, summarize

RAW = Protocol(resize=None, sigma=0.0)


def test_iou_and_f1_max_by_hand():
    a = np.array([[1, 1, 0, 0]], bool)
    b = np.array([[0, 1, 1, 0]], bool)
    assert iou(a, b) == pytest.approx(1 / 3)
    assert iou(np.zeros((2, 2), bool), np.zeros((2, 2), bool)) == 1.0
    assert iou(np.ones((2, 2), bool), np.zeros((2, 2), bool)) == 0.0
    # scores 0.9 (pos), 0.8 (neg), 0.7 (pos), 0.1 (neg): best F1 at threshold 0.7: P=2/3, R=1 -> 0.8
    y = np.array([1, 0, 1, 0])
    s = np.array([0.9, 0.8, 0.7, 0.1])
    assert f1_max(y, s) == pytest.approx(0.8)
    # a constant map: P = prevalence, R = 1
    assert f1_max(np.array([1, 0, 0, 0]), np.zeros(4)) == pytest.approx(2 * 0.25 / 1.25)


def test_category_metrics_by_hand():
    st = CategoryStats(protocol=RAW)
    gt = np.array([[1, 1], [0, 0]], bool)
    prob_a = np.array([[0.9, 0.4], [0.2, 0.1]], np.float32)
    st.add(prob_a, prob_a > 0.5, True, gt, anomaly=True)  # IoU 1/2
    prob_n = np.array([[0.3, 0.2], [0.1, 0.0]], np.float32)
    st.add(prob_n, prob_n > 0.5, False, np.zeros((2, 2), bool), anomaly=False)  # empty mask
    prob_n2 = np.array([[0.6, 0.0], [0.0, 0.0]], np.float32)
    st.add(prob_n2, prob_n2 > 0.5, True, np.zeros((2, 2), bool), anomaly=False)  # not empty
    r = st.compute()
    assert r["iou_ano"] == pytest.approx(0.5)
    assert r["iou_nor"] == pytest.approx(0.5)
    # image scores: anomalous 0.9, normals 0.3 and 0.6 -> AUROC 1, AP 1
    assert r["image_auroc"] == pytest.approx(1.0) and r["image_ap"] == pytest.approx(1.0)
    assert r["image_acc"] == pytest.approx(2 / 3)
    # pixels: positives 0.9, 0.4; negatives 0.2 0.1 0.3 0.2 0.1 0.0 0.6 0 0 0
    # ranking: 0.9(+) 0.6(-) 0.4(+) ... -> AP = (1/1 + 2/3) / 2
    assert r["pixel_ap"] == pytest.approx((1 + 2 / 3) / 2)
    assert r["f1_max"] == pytest.approx(0.8)
    assert r["n_images"] == 3 and r["n_anomalous"] == 1


def test_single_class_and_empty_categories():
    normal_only = CategoryStats(protocol=RAW)
    normal_only.add(np.zeros((3, 3), np.float32), np.zeros((3, 3), bool), False, np.zeros((3, 3), bool), False)
    r = normal_only.compute()
    assert r["pixel_ap"] is None and r["f1_max"] is None and r["image_auroc"] is None and r["iou_ano"] is None
    assert r["iou_nor"] == 1.0 and r["image_acc"] == 1.0
    anomalous_only = CategoryStats(protocol=RAW)
    gt = np.eye(3, dtype=bool)
    anomalous_only.add(np.zeros((3, 3), np.float32), np.zeros((3, 3), bool), False, gt, True)  # empty prediction
    r2 = anomalous_only.compute()
    assert r2["iou_ano"] == 0.0 and r2["iou_nor"] is None and r2["image_auroc"] is None
    assert r2["pixel_ap"] == pytest.approx(3 / 9)  # constant scores: AP = prevalence
    s = summarize({"a": r, "b": r2})
    assert s["mean"]["iou_nor"] == 1.0 and s["mean"]["iou_ano"] == 0.0 and s["mean"]["image_auroc"] is None
    assert s["mean"]["image_acc"] == pytest.approx(0.5) and s["n_images"] == 2
    table = markdown_table(s, "t")
    assert "| **mean** | 2 |" in table and "–" in table


def test_protocol_resize_and_smoothing():
    st = CategoryStats(protocol=Protocol(resize=32, sigma=4.0))
    gt = np.zeros((50, 70), bool)
    gt[10:20, 10:30] = True
    prob = gt.astype(np.float32)
    st.add(prob, gt, True, gt, True)
    assert st.maps[0].shape == (32, 32) and st.gts[0].shape == (32, 32)
    assert 0 < st.maps[0].max() < 1  # smoothed
    r = st.compute()
    assert r["iou_ano"] == 1.0  # IoU on the model's own mask at full size
    with pytest.raises(ValueError, match="differ in size"):
        st.add(prob, gt, True, np.zeros((5, 5), bool), True)


def test_pixel_auroc_equals_sklearn_per_category_then_mean():
    """Pixel AUROC as AdaCLIP / Bayes-PFL compute it: roc_auc_score over each category's raveled
    pixels (after the protocol's resize and smoothing), then the mean over categories."""
    from sklearn.metrics import roc_auc_score

    rng = np.random.RandomState(0)
    cats, want = {}, {}
    for c, (h, w) in (("a", (40, 56)), ("b", (33, 33))):
        st = CategoryStats()  # the default protocol: 256², sigma 4
        ys, ss = [], []
        for i in range(4):
            gt = np.zeros((h, w), bool)
            if i % 2:
                gt[5 + i:20 + i, 10:30] = True
            prob = np.clip(gt * 0.6 + rng.rand(h, w) * 0.5, 0, 1).astype(np.float32)
            st.add(prob, prob > 0.5, bool((prob > 0.5).any()), gt, bool(gt.any()))
            ys.append(st.gts[-1].ravel())
            ss.append(st.maps[-1].ravel())
        cats[c] = st.compute()
        want[c] = roc_auc_score(np.concatenate(ys), np.concatenate(ss))
        assert cats[c]["pixel_auroc"] == want[c]  # the very same number
    s = summarize(cats)
    assert s["mean"]["pixel_auroc"] == pytest.approx(np.mean(list(want.values())), abs=1e-15)
    assert "pixel_auroc" in markdown_table(s)
    # fixed hand-made inputs, no protocol: positives 0.9, 0.4 vs 10 negatives -> AUROC by counting
    st = CategoryStats(protocol=RAW)
    gt = np.array([[1, 1], [0, 0]], bool)
    st.add(np.array([[0.9, 0.4], [0.2, 0.1]], np.float32), gt, True, gt, True)
    st.add(np.array([[0.3, 0.2], [0.1, 0.0]], np.float32), np.zeros((2, 2), bool), False, np.zeros((2, 2), bool), False)
    st.add(np.array([[0.6, 0.0], [0.0, 0.0]], np.float32), np.zeros((2, 2), bool), False, np.zeros((2, 2), bool), False)
    # (positive, negative) pairs ranked right: 0.9 beats all 10 negatives, 0.4 all but 0.6 -> 19 of 20
    assert st.compute()["pixel_auroc"] == pytest.approx((10 + 9) / 20)


def test_single_class_categories_are_skipped_with_a_note():
    one = CategoryStats(protocol=RAW)
    one.add(np.zeros((3, 3), np.float32), np.zeros((3, 3), bool), False, np.zeros((3, 3), bool), False)
    two = CategoryStats(protocol=RAW)
    gt = np.eye(3, dtype=bool)
    two.add(np.eye(3, dtype=np.float32), gt, True, gt, True)
    two.add(np.zeros((3, 3), np.float32), np.zeros((3, 3), bool), False, np.zeros((3, 3), bool), False)
    r1, r2 = one.compute(), two.compute()
    assert r1["pixel_auroc"] is None and any("only normal pixels" in n for n in r1["notes"])
    assert r2["pixel_auroc"] == 1.0 and "notes" not in r2
    s = summarize({"one": r1, "two": r2})
    assert s["mean"]["pixel_auroc"] == 1.0  # the mean over the categories where it is defined
    assert any(n.startswith("one: pixel metrics skipped") for n in s["notes"])
    assert "left out of that mean" in markdown_table(s)
