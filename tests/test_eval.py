"""Evaluation: the predictor protocol, the empty-mask baseline, `agvas eval` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from agvas.train.data.meta import load_mask, read_meta
from agvas.train.data.synthetic import SyntheticSpec, write_dataset
from agvas.train.evaluate import EmptyPredictor, Prediction, as_predictor, evaluate, evaluate_meta
from agvas.train.metrics import Protocol

MTD_META = Path(__file__).resolve().parents[1].parent / "shared" / "realdata" / "mtd" / "meta.json"


@pytest.fixture(scope="module")
def eval_meta(tmp_path_factory):
    spec = SyntheticSpec(seed=5, size=64, n_per_category=2, n_test_per_category=6, n_train_good=0,
                         train_categories=("stripes",), test_categories=("fabric", "hex_nut"))
    return write_dataset(tmp_path_factory.mktemp("evaldata") / "data", spec)


class Oracle:
    """Predicts the ground truth (via ``inspect``, the runtime's method name)."""

    def __init__(self, meta):
        self.masks = {str(r.image): r for r in read_meta(meta, "test")}

    def inspect(self, image):
        rec = self.masks[str(image)]
        gt = load_mask(rec, (64, 64))
        return Prediction(gt.astype(np.float32), gt, bool(gt.any()))


def test_oracle_scores_perfectly(eval_meta):
    r = evaluate(Oracle(eval_meta), read_meta(eval_meta, "test"), Protocol(resize=None, sigma=0), progress=False)
    assert sorted(r["per_category"]) == ["fabric", "hex_nut"] and r["n_images"] == 12
    for k in ("pixel_ap", "f1_max", "iou_ano", "iou_nor", "image_auroc", "image_ap", "image_acc"):
        assert r["mean"][k] == pytest.approx(1.0), k


def test_empty_mask_baseline(eval_meta):
    r = evaluate(EmptyPredictor(), read_meta(eval_meta, "test"), Protocol(resize=None, sigma=0), progress=False)
    for cat, m in r["per_category"].items():
        recs = [x for x in read_meta(eval_meta, "test") if x.category == cat]
        prev = sum(load_mask(x, (64, 64)).sum() for x in recs) / (len(recs) * 64 * 64)
        assert m["pixel_ap"] == pytest.approx(prev) and m["f1_max"] == pytest.approx(2 * prev / (1 + prev))
        assert m["iou_ano"] == 0.0 and m["iou_nor"] == 1.0 and m["image_auroc"] == pytest.approx(0.5)


def test_predictor_protocol_and_errors(eval_meta):
    with pytest.raises(TypeError, match="not a predictor"):
        as_predictor(3)

    def wrong_size(image):
        return Prediction(np.zeros((5, 5), np.float32), np.zeros((5, 5), bool), False)

    with pytest.raises(ValueError, match=r"returned a \(5, 5\) map for a \(64, 64\) image"):
        evaluate(wrong_size, read_meta(eval_meta, "test"), progress=False)
    r = evaluate_meta(EmptyPredictor(), eval_meta, limit=2, progress=False)
    assert r["n_images"] == 4 and r["data"]["split"] == "test"


def test_agvas_eval_checkpoint_end_to_end(trained_tiny_checkpoint, eval_meta, tmp_path, capsys):
    from agvas.cli import main

    out = tmp_path / "eval.json"
    code = main(["eval", "--checkpoint", str(trained_tiny_checkpoint), "--data", str(eval_meta), "--json", str(out),
                 "--limit", "4", "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| **mean** | 8 |" in printed
    r = json.loads(out.read_text())
    assert set(r["mean"]) >= {"pixel_ap", "f1_max", "iou_ano", "iou_nor", "image_auroc"}
    assert r["n_images"] == 8 and set(r["per_category"]) == {"fabric", "hex_nut"}
    assert all(v is None or 0.0 <= v <= 1.0 for v in r["mean"].values())


def test_agvas_eval_input_errors(eval_meta, tmp_path, capsys):
    from agvas.cli import main

    assert main(["eval", "--checkpoint", str(tmp_path / "nope"), "--data", str(eval_meta)]) == 2
    assert "--checkpoint" in capsys.readouterr().err
    assert main(["eval", "--engines", str(tmp_path / "nope"), "--data", str(eval_meta)]) == 2
    assert "--engines" in capsys.readouterr().err
    assert main(["eval", "--baseline", "empty", "--data", str(tmp_path / "missing.json")]) == 2
    assert "meta file not found" in capsys.readouterr().err


@pytest.mark.skipif(not MTD_META.is_file(), reason=f"real MTD set not present ({MTD_META})")
def test_mtd_reads_and_baseline(capsys):
    from agvas.cli import main

    code = main(["eval", "--baseline", "empty", "--data", str(MTD_META), "--limit", "6", "--no-progress"])
    assert code == 0
    assert "magnetic_tile" in capsys.readouterr().out


@pytest.mark.slow
def test_agvas_eval_engines_matches_checkpoint(trained_tiny_checkpoint, eval_meta, tmp_path):
    """`--engines` (the runtime over an export) gives the reference's metrics."""
    from agvas.cli import main

    export = tmp_path / "export"
    assert main(["export", "--checkpoint", str(trained_tiny_checkpoint), "--out", str(export)]) == 0
    results = {}
    for flag, src in (("--engines", export), ("--checkpoint", trained_tiny_checkpoint)):
        out = tmp_path / f"{flag[2:]}.json"
        assert main(["eval", flag, str(src), "--data", str(eval_meta), "--limit", "4", "--json", str(out),
                     "--no-progress"]) == 0
        results[flag] = json.loads(out.read_text())
    eng, ref = results["--engines"], results["--checkpoint"]
    for cat, r in ref["per_category"].items():
        for k in ("iou_ano", "iou_nor", "image_acc"):
            assert eng["per_category"][cat][k] == pytest.approx(r[k], abs=0.02), (cat, k)
        for k in ("pixel_ap", "f1_max", "image_auroc"):
            assert eng["per_category"][cat][k] == pytest.approx(r[k], abs=0.02), (cat, k)
