"""The `agvas inspect` output folder, written so that a crash never leaves a partial file.

::

    OUT/results.jsonl   one JSON object per input image, key ``path`` (the commit record)
    OUT/results.csv     the same, flat
    OUT/masks/N.png     binary mask at the original size (0/255), also when empty
    OUT/overlays/N.png  heatmap + mask contour over the image
    OUT/maps/N.npy      with --save-maps: float32 [3, H, W] = P, P_seg, P_ano
    OUT/summary.json    counts, latency percentiles, images/s, metrics with ground truth
    OUT/report.html     the same for people, with a thumbnail grid of the anomalous images

Per image the mask, overlay and maps are written atomically (temp file + rename) *before* its
line is appended to results.jsonl in a single ``write``; the line is the commit. ``--resume``
reads the committed lines (a torn last line is dropped), keeps the images whose files exist,
and removes temp files a killed run left behind (results.jsonl is rewritten only when it held a
torn or incomplete line). At the end results.jsonl is rewritten atomically in input order and the
csv/summary/report are (re)built from it.

``agvas inspect --watch`` (``agvas.runtime.watch``) never rewrites results.jsonl while it runs (a line
system may be tailing it): ``live_csv`` appends each line's csv row too, and the csv, summary and
report are rebuilt with :meth:`OutputDir.write_reports` on a period and at exit.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np

from agvas.atomic import atomic_path, write_text_atomic

from .inputs import Item
from .overlay import mask_image, render_overlay

RESULTS, CSV, SUMMARY, REPORT = "results.jsonl", "results.csv", "summary.json", "report.html"
FILE_DIRS = {"mask": "masks", "overlay": "overlays", "maps": "maps"}
CSV_FIELDS = ("path", "status", "verdict", "area_px", "area_pct", "max_score", "anchors_found", "text", "width",
              "height", "total_ms", "category", "gt_anomaly", "iou", "mask", "overlay", "error")


class OutputDir:
    def __init__(self, root: str | os.PathLike, *, resume: bool = False, overwrite: bool = False,
                 save_maps: bool = False, live_csv: bool = False) -> None:
        self.root = Path(root)
        self.save_maps = save_maps
        self.live_csv = live_csv
        if self.root.exists() and not self.root.is_dir():
            raise ValueError(f"--out {self.root}: exists and is not a folder")
        self.root.mkdir(parents=True, exist_ok=True)
        if (self.root / RESULTS).exists() and not (resume or overwrite):
            raise ValueError(f"--out {self.root}: already holds {RESULTS}; pass --resume to continue that run "
                             f"or --overwrite to start over")
        if overwrite:
            for f in (RESULTS, CSV, SUMMARY, REPORT):
                (self.root / f).unlink(missing_ok=True)
            for d in FILE_DIRS.values():
                shutil.rmtree(self.root / d, ignore_errors=True)
        self._remove_temp_files()
        self.records: dict[str, dict] = self._load() if resume else {}
        if not resume:
            write_text_atomic(self.root / RESULTS, "")

    # ---- resume ------------------------------------------------------------------------------
    def _remove_temp_files(self) -> None:
        """Temp files of a killed run (``.NAME.XXXX.ext``, see ``agvas.atomic``)."""
        for d in [self.root, *(self.root / d for d in FILE_DIRS.values())]:
            if d.is_dir():
                for p in d.iterdir():
                    if p.name.startswith(".") and p.is_file():
                        p.unlink()

    def _load(self) -> dict[str, dict]:
        path = self.root / RESULTS
        if not path.exists():
            return {}
        out: dict[str, dict] = {}
        raw = path.read_bytes()
        for line in raw.split(b"\n"):
            try:
                rec = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue  # a line torn by a kill, or empty
            if isinstance(rec, dict) and "path" in rec and self._complete(rec):
                out[rec["path"]] = rec
        text = "".join(json.dumps(r) + "\n" for r in out.values())
        if text.encode("utf-8") != raw:  # a torn line, an incomplete image, a repeat: rewrite; else leave it be
            write_text_atomic(path, text)
        return out

    def _complete(self, rec: dict) -> bool:
        if rec.get("status") == "error":
            return True
        need = ["mask", "overlay"] + (["maps"] if self.save_maps else [])
        return all(rec.get(k) and (self.root / rec[k]).is_file() for k in need)

    def is_done(self, item: Item) -> bool:
        return item.path in self.records

    # ---- per image ---------------------------------------------------------------------------
    def _commit(self, rec: dict) -> dict:
        line = (json.dumps(rec) + "\n").encode("utf-8")
        fd = os.open(self.root / RESULTS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        self.records[rec["path"]] = rec
        if self.live_csv:
            self._append_csv(rec)
        return rec

    def _append_csv(self, rec: dict) -> None:
        path = self.root / CSV
        buf = io.StringIO()
        wr = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
        if not path.exists():
            wr.writeheader()
        wr.writerow(_csv_row(rec))
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            os.write(fd, buf.getvalue().encode("utf-8"))
        finally:
            os.close(fd)

    def _save_png(self, kind: str, name: str, image) -> str:
        rel = f"{FILE_DIRS[kind]}/{name}.png"
        with atomic_path(self.root / rel) as tmp:
            image.save(tmp, format="PNG")
        return rel

    def write_result(self, item: Item, result, extra: dict | None = None) -> dict:
        """Mask, overlay (and maps) for a successful inspection, then its results.jsonl line
        (``extra``: more fields, e.g. the ground-truth comparison)."""
        files = {"mask": self._save_png("mask", item.name, mask_image(result.mask)),
                 "overlay": self._save_png("overlay", item.name, render_overlay(result.image, result.prob, result.mask))}
        if self.save_maps:
            rel = f"{FILE_DIRS['maps']}/{item.name}.npy"
            with atomic_path(self.root / rel) as tmp:
                np.save(tmp, np.stack([result.prob, result.p_seg, result.p_ano]).astype(np.float32))
            files["maps"] = rel
        h, w = result.mask.shape
        rec = {"path": item.path, "name": item.name, "status": "ok",
               "verdict": "anomalous" if result.verdict else "normal", "area_px": result.area_px,
               "area_pct": round(result.area_pct, 4), "max_score": round(result.max_score, 6),
               "anchors_found": result.anchors_found, "text": result.text, "width": w, "height": h,
               "fast_path": result.fast_path, "n_visual": result.n_visual, **files,
               "timings_ms": {k: round(v, 3) for k, v in result.timings_ms.items()}}
        rec.update(extra or {})
        return self._commit(rec)

    def write_error(self, item: Item, error: BaseException | str, extra: dict | None = None) -> dict:
        msg = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if item.path not in msg:
            msg = f"{item.path}: {msg}"
        rec = {"path": item.path, "name": item.name, "status": "error", "error": msg, **(extra or {})}
        return self._commit(rec)

    # ---- the end -----------------------------------------------------------------------------
    def ordered(self, items: list[Item]) -> list[dict]:
        """Records of ``items`` in input order, then older records of images not in this run."""
        now = [self.records[it.path] for it in items if it.path in self.records]
        paths = {it.path for it in items}
        return now + [r for p, r in self.records.items() if p not in paths]

    def finish(self, items: list[Item], summary: dict, report_html: str | None) -> None:
        recs = self.ordered(items)
        write_text_atomic(self.root / RESULTS, "".join(json.dumps(r) + "\n" for r in recs))
        self.write_reports(recs, summary, report_html)

    def write_reports(self, recs: list[dict], summary: dict | None, report_html: str | None) -> None:
        """results.csv (rebuilt from ``recs``), summary.json and report.html, each atomically."""
        buf = io.StringIO()
        wr = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
        wr.writeheader()
        for r in recs:
            wr.writerow(_csv_row(r))
        write_text_atomic(self.root / CSV, buf.getvalue())
        if summary is not None:
            write_text_atomic(self.root / SUMMARY, json.dumps(summary, indent=2) + "\n")
        if report_html is not None:
            write_text_atomic(self.root / REPORT, report_html)


def _csv_row(rec: dict) -> dict:
    return {**rec, "total_ms": rec.get("timings_ms", {}).get("total", "")}

