"""``summary.json`` and ``report.html`` of an `agvas inspect` run.

The report is one self-contained HTML file (inline CSS, thumbnails as data URIs, no script):
headline counts, throughput and latency, a thumbnail grid of the anomalous images sorted by
score (overlay; name = the path relative to the inputs' common folder, unique; category; anomalous
area, max score; linked to the full-size overlay and mask), per-stage latency, ground-truth
metrics per category when the input was a meta.json, and the failed images with their errors.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import posixpath
from datetime import datetime, timezone
from pathlib import Path

from PIL import Image

from agvas.benchmarks.stats import summarize

from .inspector import AGGREGATES, STAGES

MAX_THUMBS = 200
THUMB_SIDE = 240


def build_summary(records: list[dict], settings: dict, run: dict, metrics: dict | None) -> dict:
    ok = [r for r in records if r.get("status") == "ok"]
    failed = [r for r in records if r.get("status") != "ok"]
    anomalous = [r for r in ok if r["verdict"] == "anomalous"]
    latency = {}
    for stage in (*STAGES, *AGGREGATES, "total"):
        vals = [r["timings_ms"][stage] for r in ok if stage in r.get("timings_ms", {})]
        latency[stage] = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in summarize(vals).items()}
    fast = {}
    for r in ok:
        key = r.get("fast_path", "off").split("@")[0]
        fast[key] = fast.get(key, 0) + 1
    return {
        "tool": "agvas inspect",
        "settings": settings,
        "counts": {"images": len(records), "ok": len(ok), "failed": len(failed), "anomalous": len(anomalous),
                   "normal": len(ok) - len(anomalous),
                   "no_anchors": sum(1 for r in ok if not r.get("anchors_found"))},
        "run": run,
        "latency_ms": latency,
        "fast_path": fast,
        "metrics": metrics,
        "errors": [{"path": r["path"], "error": r.get("error", "")} for r in failed],
    }


def _thumb(path: Path) -> str | None:
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            im.thumbnail((THUMB_SIDE, THUMB_SIDE), Image.BILINEAR)
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=82)
    except OSError:
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def tile_names(paths: list[str], root: str | os.PathLike | None = None) -> dict[str, str]:
    """Display name of each input path: relative to ``root`` (default: the common folder of the
    inputs), ``/``-separated. Distinct paths get distinct names (``test/colour_spot/0047.png`` of
    two categories keeps the part that tells them apart). URIs (``s3://...``) are named relative to
    their common prefix likewise."""
    local = [p for p in paths if "://" not in p]
    uris = [p for p in paths if "://" in p]
    out: dict[str, str] = {}
    if local:
        absolute = {p: os.path.abspath(p) for p in local}
        base = os.path.abspath(root) if root is not None else None
        if base is None or not all(_inside(a, base) for a in absolute.values()):
            base = os.path.commonpath([os.path.dirname(a) for a in absolute.values()])
        for p, a in absolute.items():
            out[p] = Path(os.path.relpath(a, base)).as_posix()
    if uris:
        base = posixpath.dirname(os.path.commonprefix(uris) + "x")  # a folder prefix, not a partial name
        for p in uris:
            out[p] = p[len(base):].lstrip("/") or p
    return out


def _inside(path: str, folder: str) -> bool:
    return os.path.commonpath([path, folder]) == folder


def _fmt(v, digits: int = 1) -> str:
    return "–" if v is None else f"{v:,.{digits}f}"


CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;background:#f4f5f7;color:#1d2433}
header{background:#1d2433;color:#fff;padding:18px 28px}header h1{margin:0;font-size:21px;font-weight:600}
header p{margin:4px 0 0;color:#b8c0d0;font-size:13px}main{padding:20px 28px;max-width:1400px}
.cards{display:flex;gap:14px;flex-wrap:wrap;margin-bottom:22px}
.card{background:#fff;border-radius:8px;padding:12px 18px;min-width:130px;box-shadow:0 1px 2px #0002}
.card .v{font-size:26px;font-weight:650}.card .k{color:#5b6475;font-size:12px;text-transform:uppercase;letter-spacing:.04em}
.bad .v{color:#c62828}.good .v{color:#2e7d32}.warn .v{color:#b26a00}
h2{font-size:17px;margin:26px 0 10px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(250px,1fr));gap:12px}
.tile{background:#fff;border-radius:8px;overflow:hidden;box-shadow:0 1px 2px #0002}
.tile img{display:block;width:100%;height:200px;object-fit:contain;background:#222}
.tile .cap{padding:7px 10px;font-size:12.5px}.tile .name{font-weight:600;word-break:break-all}
.tile .meta{color:#5b6475}.tile .cat{display:inline-block;background:#e8eaf6;color:#283593;border-radius:3px;padding:0 6px;margin:2px 0;font-size:11.5px}.tile a{color:#1565c0;text-decoration:none;margin-right:8px}
table{border-collapse:collapse;background:#fff;box-shadow:0 1px 2px #0002;border-radius:8px;overflow:hidden}
th,td{padding:6px 12px;text-align:right;border-bottom:1px solid #eceef2;font-variant-numeric:tabular-nums}
th{background:#eef0f4;font-weight:600}td:first-child,th:first-child{text-align:left}
td.err{text-align:left;color:#c62828;font-family:ui-monospace,monospace;font-size:12px}
.bar{display:inline-block;height:9px;background:#5c7cfa;border-radius:2px;vertical-align:middle}
.note{color:#5b6475;font-size:12.5px}pre{background:#fff;padding:12px;border-radius:8px;overflow:auto;font-size:12px}
"""


def render_html(summary: dict, records: list[dict], root: Path, inputs_root: str | os.PathLike | None = None) -> str:
    """``root``: the output folder (thumbnails are read from it); ``inputs_root``: the folder
    tile names are relative to (default: the inputs' common folder; `--watch` passes its DIR)."""
    s, c, run = summary["settings"], summary["counts"], summary["run"]
    e = html.escape
    tot = summary["latency_ms"]["total"]
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width,initial-scale=1'>",
        f"<title>AG-VAS inspection — {c['anomalous']} anomalous of {c['images']}</title><style>{CSS}</style></head><body>",
        "<header><h1>AG-VAS inspection report</h1>",
        f"<p>{e(str(s.get('engines')))} · provider {e(str(s.get('provider')))} · mode {e(str(s.get('mode')))} · "
        f"threshold {s.get('threshold')} · min area {s.get('min_area')} px · "
        f"{e(datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC'))}</p></header><main>",
        "<div class='cards'>",
        f"<div class='card'><div class='v'>{c['images']}</div><div class='k'>images</div></div>",
        f"<div class='card bad'><div class='v'>{c['anomalous']}</div><div class='k'>anomalous</div></div>",
        f"<div class='card good'><div class='v'>{c['normal']}</div><div class='k'>normal</div></div>",
        f"<div class='card{' warn' if c['failed'] else ''}'><div class='v'>{c['failed']}</div>"
        f"<div class='k'>failed</div></div>",
        f"<div class='card'><div class='v'>{_fmt(run.get('images_per_s'), 2)}</div><div class='k'>images / s</div></div>",
        f"<div class='card'><div class='v'>{_fmt(tot.get('p50_ms'), 0)}</div><div class='k'>p50 ms / image</div></div>",
        f"<div class='card'><div class='v'>{_fmt(tot.get('p99_ms'), 0)}</div><div class='k'>p99 ms / image</div></div>",
        "</div>",
    ]
    anomalous = sorted((r for r in records if r.get("status") == "ok" and r["verdict"] == "anomalous"),
                       key=lambda r: (-r["max_score"], r["path"]))
    parts.append(f"<h2>Anomalous images ({len(anomalous)})</h2>")
    if len(anomalous) > MAX_THUMBS:
        parts.append(f"<p class='note'>Showing the {MAX_THUMBS} with the highest scores; all are in results.csv.</p>")
    if not anomalous:
        parts.append("<p class='note'>No image was found anomalous.</p>")
    parts.append("<div class='grid'>")
    names = tile_names([r["path"] for r in records], inputs_root)
    for r in anomalous[:MAX_THUMBS]:
        src = _thumb(root / r["overlay"])
        img = f"<img src='{src}' alt='overlay of {e(r['name'])}'>" if src else "<img alt='(overlay missing)'>"
        cat = f"<div class='cat'>{e(str(r['category']))}</div>" if r.get("category") else ""
        parts.append(
            f"<div class='tile'><a href='{e(r['overlay'])}'>{img}</a><div class='cap'>"
            f"<div class='name' title='{e(r['path'])}'>{e(names[r['path']])}</div>{cat}"
            f"<div class='meta'>area {r['area_pct']:.2f} % ({r['area_px']:,} px) · max score {r['max_score']:.3f}</div>"
            f"<a href='{e(r['overlay'])}'>overlay</a><a href='{e(r['mask'])}'>mask</a></div></div>")
    parts.append("</div>")

    parts.append("<h2>Latency per stage</h2><p class='note'>Milliseconds per image "
                 f"({e(str(run.get('images_this_run')))} inspected in this run in {_fmt(run.get('wall_s'), 1)} s; "
                 "a batched LLM pass is shared between its images; stages of different images overlap, so images/s "
                 "can exceed 1000 / mean total).</p>")
    parts.append("<table><tr><th>stage</th><th>count</th><th>mean</th><th>p50</th><th>p90</th><th>p99</th>"
                 "<th>share of total</th></tr>")
    tmean = tot.get("mean_ms") or 0.0
    for stage in (*STAGES, "total"):
        st = summary["latency_ms"][stage]
        share = (st["mean_ms"] or 0.0) / tmean * 100 if tmean and stage != "total" else None
        bar = f"<span class='bar' style='width:{share * 1.6:.0f}px'></span> {share:.0f} %" if share is not None else ""
        parts.append(f"<tr><td>{stage}</td><td>{st['count']}</td><td>{_fmt(st['mean_ms'])}</td>"
                     f"<td>{_fmt(st['p50_ms'])}</td><td>{_fmt(st['p90_ms'])}</td><td>{_fmt(st['p99_ms'])}</td>"
                     f"<td style='text-align:left'>{bar}</td></tr>")
    parts.append("</table>")

    m = summary.get("metrics")
    if m:
        cols = ("pixel_ap", "pixel_auroc", "f1_max", "iou_ano", "iou_nor", "image_auroc", "image_ap", "image_acc")
        parts.append("<h2>Ground truth</h2><p class='note'>Percent; per category, then the mean over categories "
                     f"({m['n_images']} images inspected in this run).</p><table><tr><th>category</th><th>images</th>"
                     + "".join(f"<th>{k}</th>" for k in cols) + "</tr>")
        rows = sorted(m["per_category"].items()) + [("mean", {**m["mean"], "n_images": m["n_images"]})]
        for cat, r in rows:
            parts.append(f"<tr><td>{e(cat)}</td><td>{r.get('n_images', '')}</td>" + "".join(
                f"<td>{_fmt(None if r.get(k) is None else 100 * r[k])}</td>" for k in cols) + "</tr>")
        parts.append("</table>")
        for note in m.get("notes", []):  # categories left out of a metric's mean (a single class of pixels)
            parts.append(f"<p class='note'>{e(note)} (left out of that mean)</p>")

    failed = [r for r in records if r.get("status") != "ok"]
    parts.append(f"<h2>Failed images ({len(failed)})</h2>")
    if failed:
        parts.append("<table><tr><th>image</th><th style='text-align:left'>error</th></tr>")
        for r in failed:
            parts.append(f"<tr><td>{e(r['path'])}</td><td class='err'>{e(r.get('error', ''))}</td></tr>")
        parts.append("</table>")
    else:
        parts.append("<p class='note'>None.</p>")
    parts.append("<h2>Settings</h2><details><summary>run settings and engines</summary><pre>"
                 + e(json.dumps({"settings": s, "run": run, "fast_path": summary.get("fast_path")}, indent=1))
                 + "</pre></details></main></body></html>\n")
    return "\n".join(parts)
