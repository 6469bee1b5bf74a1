"""`agvas inspect`: inputs, the output folder, ground-truth metrics, determinism, kill -9 + --resume,
usage errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import random_image
from PIL import Image
from test_runtime import tiny_export  # noqa: F401 - the shared export (session fixture)

from agvas.cli import main


def _images(folder: Path, n: int, start: int = 0, sizes=((96, 80), (64, 64), (80, 96))) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(start, start + n):
        p = folder / f"img_{i:03d}.png"
        random_image(1000 + i, *sizes[i % len(sizes)]).save(p)
        out.append(p)
    return out


def _records(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]


def _dataset(root: Path) -> Path:
    """A two-category meta.json test split with masks."""
    meta = {"train": {}, "test": {}}
    for ci, cat in enumerate(("plate", "screw")):
        recs = []
        for k, kind in enumerate(("good", "good", "scratch", "scratch")):
            img = root / cat / "test" / kind / f"{k:03d}.png"
            img.parent.mkdir(parents=True, exist_ok=True)
            random_image(2000 + 10 * ci + k, 96, 80).save(img)
            mask = ""
            if kind != "good":
                m = np.zeros((80, 96), np.uint8)
                m[20:50, 30:70] = 255
                mp = root / cat / "ground_truth" / kind / f"{k:03d}_mask.png"
                mp.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(m).save(mp)
                mask = mp.relative_to(root).as_posix()
            recs.append({"img_path": img.relative_to(root).as_posix(), "mask_path": mask, "cls_name": cat,
                         "specie_name": kind, "anomaly": int(kind != "good")})
        meta["test"][cat] = recs
    (root / "meta.json").write_text(json.dumps(meta))
    return root / "meta.json"


def test_inputs_outputs_and_report(tiny_export, tmp_path, capsys):  # noqa: F811
    a = _images(tmp_path / "in" / "a", 3)
    b = _images(tmp_path / "in" / "b", 2, start=3)
    listing = tmp_path / "list.txt"
    listing.write_text(f"# listed\n{b[0]}\n{a[0]}\n")  # a[0] again: inspected once
    meta = _dataset(tmp_path / "ds")
    out = tmp_path / "out"
    rc = main(["inspect", str(tmp_path / "in" / "a"), str(tmp_path / "in" / "b" / "*.png"), str(listing), str(meta),
               "--engines", str(tiny_export), "--out", str(out), "--batch", "2", "--threads", "2", "--save-maps"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "13 images:" in printed and "report.html" in printed and "| **mean** |" in printed
    recs = _records(out)
    assert len(recs) == 3 + 2 + 8 and len({r["path"] for r in recs}) == len(recs)
    assert [r["path"] for r in recs[:5]] == [str(p) for p in a + b]
    for r in recs:
        assert r["status"] == "ok" and r["anchors_found"] and r["text"] == "Sure, it is [NOR][ANO][SEG]."
        m = np.asarray(Image.open(out / r["mask"]))
        assert m.shape == (r["height"], r["width"]) and set(np.unique(m)) <= {0, 255}
        assert int((m > 0).sum()) == r["area_px"]
        assert r["area_pct"] == pytest.approx(100 * r["area_px"] / m.size, abs=1e-3)
        maps = np.load(out / r["maps"])
        assert maps.shape == (3, r["height"], r["width"]) and maps.dtype == np.float32
        assert r["max_score"] == pytest.approx(float(maps[0].max()), abs=1e-6)
        assert (r["verdict"] == "anomalous") == (r["area_px"] > 0)
        assert {"preprocess", "prefill", "total"} <= set(r["timings_ms"])  # the stages are reported
    gt = [r for r in recs if "gt_anomaly" in r]
    assert len(gt) == 8 and all("iou" in r and r["category"] in ("plate", "screw") for r in gt)
    csv = (out / "results.csv").read_text().splitlines()
    assert csv[0].startswith("path,status,verdict,area_px") and len(csv) == 14
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["images"] == 13 and summary["counts"]["failed"] == 0
    run = summary["run"]
    assert run["images_per_s"] == pytest.approx(13 / run["wall_s"], rel=1e-2)
    for stage in ("total", "prefill"):  # the summary's percentiles are those of the per-image records
        vals = [r["timings_ms"][stage] for r in recs]
        lat = summary["latency_ms"][stage]
        assert lat["count"] == 13  # one per image
        for key, q in (("p50_ms", 50), ("p90_ms", 90), ("p99_ms", 99)):
            assert lat[key] == pytest.approx(float(np.percentile(vals, q)), abs=2e-3), (stage, key)
        assert lat["mean_ms"] == pytest.approx(float(np.mean(vals)), abs=2e-3)
    per_cat = summary["metrics"]["per_category"]
    assert set(per_cat) == {"plate", "screw"}
    for cat in per_cat:  # IoU_ano / IoU_nor from the per-image records of that category
        ano = [r for r in gt if r["category"] == cat and r["gt_anomaly"]]
        nor = [r for r in gt if r["category"] == cat and not r["gt_anomaly"]]
        assert len(ano) == len(nor) == 2
        assert per_cat[cat]["iou_ano"] == pytest.approx(float(np.mean([r["iou"] for r in ano])), abs=1e-5), cat
        assert per_cat[cat]["iou_nor"] == pytest.approx(float(np.mean([r["area_px"] == 0 for r in nor])), abs=1e-9)
    assert summary["fast_path"] == {"hit": 13}
    html = (out / "report.html").read_text()
    n_anom = summary["counts"]["anomalous"]
    assert f"Anomalous images ({n_anom})" in html and html.count("<div class='tile'>") == min(n_anom, 200)
    assert "Latency per stage" in html and "Ground truth" in html
    assert html.count("data:image/jpeg;base64,") == min(n_anom, 200)
    # no temp files anywhere
    assert not [p for p in out.rglob(".*")]


def test_empty_masks_are_written(tiny_export, tmp_path):  # noqa: F811
    imgs = _images(tmp_path / "in", 2)
    out = tmp_path / "out"
    assert main(["inspect", *map(str, imgs), "--engines", str(tiny_export), "--out", str(out), "--threshold", "1.0",
                 "--threads", "2"]) == 0
    for r in _records(out):
        assert r["verdict"] == "normal" and r["area_px"] == 0
        assert not np.asarray(Image.open(out / r["mask"])).any()
    assert "No image was found anomalous." in (out / "report.html").read_text()


def test_two_runs_give_identical_bytes(tiny_export, tmp_path):  # noqa: F811
    imgs = _images(tmp_path / "in", 5)
    outs = [tmp_path / "o1", tmp_path / "o2"]
    for o, batch in zip(outs, ("1", "1")):
        assert main(["inspect", str(tmp_path / "in"), "--engines", str(tiny_export), "--out", str(o), "--batch", batch,
                     "--threads", "2", "--save-maps"]) == 0
    for sub in ("masks", "overlays", "maps"):
        names = sorted(p.name for p in (outs[0] / sub).iterdir())
        assert len(names) == len(imgs)
        for n in names:
            assert (outs[0] / sub / n).read_bytes() == (outs[1] / sub / n).read_bytes(), f"{sub}/{n} differs"

    def strip(recs):
        return [{k: v for k, v in r.items() if k != "timings_ms"} for r in recs]

    assert strip(_records(outs[0])) == strip(_records(outs[1]))


@pytest.mark.slow
def test_kill_mid_batch_then_resume(tiny_export, tmp_path):  # noqa: F811
    imgs = _images(tmp_path / "in", 40)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "agvas.cli", "inspect", str(tmp_path / "in"), "--engines", str(tiny_export),
           "--out", str(out), "--batch", "2", "--threads", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results = out / "results.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if results.exists() and results.read_bytes().count(b"\n") >= 4:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = results.read_bytes().count(b"\n")
    assert 4 <= done_before < len(imgs)

    assert main(["inspect", str(tmp_path / "in"), "--engines", str(tiny_export), "--out", str(out), "--threads", "2"]) == 2
    assert main(["inspect", str(tmp_path / "in"), "--engines", str(tiny_export), "--out", str(out), "--resume",
                 "--threads", "2"]) == 0
    recs = _records(out)
    assert sorted(r["path"] for r in recs) == sorted(map(str, imgs))  # every image exactly once
    assert all(r["status"] == "ok" for r in recs)
    for sub in ("masks", "overlays"):
        files = sorted((out / sub).iterdir())
        assert [p.name for p in files] == sorted(f"{p.stem}.png" for p in imgs)  # no temp or partial files
        for p in files:
            with Image.open(p) as im:
                im.load()  # complete PNGs
    summary = json.loads((out / "summary.json").read_text())
    assert summary["run"]["skipped_resume"] == done_before and summary["counts"]["ok"] == len(imgs)


def test_usage_errors_exit_2(tiny_export, tmp_path, capsys):  # noqa: F811
    img = _images(tmp_path / "in", 1)[0]
    base = ["--engines", str(tiny_export), "--out", str(tmp_path / "o")]
    assert main(["inspect", str(tmp_path / "nope.png"), *base]) == 2
    assert "nope.png: no such file, folder or glob match" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path / "in" / "*.jpg"), *base]) == 2
    assert "matches no files" in capsys.readouterr().err
    assert main(["inspect", str(img), "--engines", str(tmp_path / "noexport"), "--out", str(tmp_path / "o")]) == 2
    assert "noexport" in capsys.readouterr().err
    assert main(["inspect", str(img), *base, "--engine", "llm"]) == 2
    assert "expected NAME=FILE" in capsys.readouterr().err
    assert main(["inspect", str(img), *base, "--batch", "0"]) == 2
    assert main(["inspect", str(img), *base, "--vision-tokens", "base", "--threads", "1"]) == 0
    assert main(["inspect", str(img), *base, "--threads", "1"]) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert main(["inspect", str(img), *base, "--overwrite", "--threads", "1", "--no-fast-path"]) == 0
    assert _records(tmp_path / "o")[0]["fast_path"] == "off"
