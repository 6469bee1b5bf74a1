"""report.html tiles: named by the path relative to the inputs' common folder (unique: the same
file name in two categories stays apart), sorted by score, the category shown (issue 15)."""

from __future__ import annotations

import re

from agvas.runtime.report import build_summary, render_html, tile_names


def _rec(path: str, score: float, category: str | None = None, name: str = "") -> dict:
    r = {"path": path, "name": name or path.replace("/", "__"), "status": "ok", "verdict": "anomalous",
         "area_px": 10, "area_pct": 1.0, "max_score": score, "anchors_found": True, "mask": "masks/x.png",
         "overlay": "overlays/x.png", "timings_ms": {"total": 5.0}}
    if category:
        r.update(category=category, gt_anomaly=True)
    return r


def test_tile_names_are_relative_to_the_common_root_and_unique(tmp_path):
    ds = tmp_path / "ds"
    a = str(ds / "carpet" / "test" / "colour_spot" / "0047.png")
    b = str(ds / "tile" / "test" / "colour_spot" / "0047.png")
    names = tile_names([a, b])
    assert names == {a: "carpet/test/colour_spot/0047.png", b: "tile/test/colour_spot/0047.png"}
    assert tile_names([a]) == {a: "0047.png"}
    assert tile_names([a, b], root=ds) == names  # --watch passes its folder
    assert tile_names([a], root=ds) == {a: "carpet/test/colour_spot/0047.png"}
    assert tile_names([a], root=tmp_path / "elsewhere") == {a: "0047.png"}  # a root that does not hold them
    uris = ["s3://bucket/line1/cam/1.png", "s3://bucket/line2/cam/1.png"]
    assert tile_names(uris) == {uris[0]: "line1/cam/1.png", uris[1]: "line2/cam/1.png"}


def test_report_tiles_unique_sorted_with_category(tmp_path):
    ds = tmp_path / "ds"
    recs = [_rec(str(ds / "carpet/test/colour_spot/0047.png"), 0.7, "carpet", "carpet__0047"),
            _rec(str(ds / "tile/test/colour_spot/0047.png"), 0.9, "tile", "tile__0047"),
            _rec(str(ds / "tile/test/hole/0001.png"), 0.8, "tile", "tile__0001"),
            {"path": str(ds / "tile/test/hole/bad.png"), "name": "bad", "status": "error", "error": "not an image"}]
    metrics = {"mean": {"pixel_ap": 0.5, "pixel_auroc": 0.9}, "n_images": 3,
               "per_category": {"carpet": {"pixel_ap": 0.4, "pixel_auroc": 0.8, "n_images": 1},
                                "tile": {"pixel_ap": 0.6, "pixel_auroc": 1.0, "n_images": 2}},
               "notes": ["carpet: image AUROC/AP skipped: only anomalous images"]}
    summary = build_summary(recs, {"engines": "e", "provider": "cpu", "mode": "direct", "threshold": 0.5,
                                   "min_area": 0}, {"images_this_run": 4, "wall_s": 1.0}, metrics)
    html = render_html(summary, recs, tmp_path)
    tiles = re.findall(r"<div class='name' title='[^']*'>([^<]*)</div>(?:<div class='cat'>([^<]*)</div>)?", html)
    assert tiles == [("tile/test/colour_spot/0047.png", "tile"), ("tile/test/hole/0001.png", "tile"),
                     ("carpet/test/colour_spot/0047.png", "carpet")]  # by score, unique, category shown
    # the per-category ground-truth table as before, with pixel AUROC and the note
    assert "<h2>Ground truth</h2>" in html and "<th>pixel_auroc</th>" in html
    assert "<td>carpet</td>" in html and "<td>tile</td>" in html and "<td>mean</td>" in html
    assert "left out of that mean" in html
