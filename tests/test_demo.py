"""`agvas demo`: the embedded default end to end (a --quick smoke run) and its reuse on rerun."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agvas.train.demo import STEPS

MTD = Path(__file__).resolve().parents[1].parent / "shared" / "realdata" / "mtd"


@pytest.mark.slow
def test_demo_quick_end_to_end_and_reuse(tmp_path, capsys):
    from agvas.cli import main

    out = tmp_path / "demo"
    mtd = str(MTD) if (MTD / "meta.json").is_file() else "none"
    assert main(["demo", "--out", str(out), "--quick", "--mtd", mtd, "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert [n for n, _ in STEPS][:4] == ["data", "train", "eval_synthetic", "eval_mtd"]
    for name in ("data/meta.json", "checkpoint/checkpoint.json", "train_log.jsonl", "eval_synthetic.json", "summary.md"):
        assert (out / name).is_file(), name
    meta = json.loads((out / "data/meta.json").read_text())
    assert set(meta["test"]).isdisjoint(meta["train"])  # held-out categories only in test
    ev = json.loads((out / "eval_synthetic.json").read_text())
    assert set(ev["per_category"]) == set(meta["test"]) and "baseline_empty" in ev
    assert "| synthetic held-out |" in printed and "| train |" in printed
    if mtd != "none":
        mtd_eval = json.loads((out / "eval_mtd.json").read_text())
        assert mtd_eval["n_images"] == 8 and "| MTD: SAA+ (paper) |" in printed
    else:
        assert "skipped" in printed
    # a second run reuses the finished checkpoint and the evaluations of it
    stamp = (out / "checkpoint/model.safetensors").stat().st_mtime_ns
    assert main(["demo", "--out", str(out), "--quick", "--mtd", mtd, "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "reused finished checkpoint" in printed
    assert (out / "checkpoint/model.safetensors").stat().st_mtime_ns == stamp


def test_demo_unknown_step(tmp_path, capsys):
    from agvas.cli import main

    assert main(["demo", "--out", str(tmp_path), "--only", "nope"]) == 2
    assert "--only nope: unknown step" in capsys.readouterr().err


def test_demo_skips_a_missing_mtd_set(tmp_path, capsys):
    from agvas.cli import main

    assert main(["demo", "--out", str(tmp_path), "--only", "eval_mtd", "--mtd", str(tmp_path / "x")]) == 0
    assert "skipped:" in capsys.readouterr().out
