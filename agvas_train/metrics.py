"""Zero-shot anomaly segmentation metrics (paper appendix B.3, DESIGN §5).

Per category, then the mean over categories:

- ``pixel_ap`` — scikit-learn ``average_precision_score`` on the raveled pixels of all the
  category's images; ``f1_max`` — the maximum F1 over the same precision-recall curve. Community
  protocol (on by default): score maps and ground truth resized to a fixed size, maps smoothed
  with a Gaussian of σ = 4 before AP/F1.
- ``pixel_auroc`` — scikit-learn ``roc_auc_score`` on the same raveled pixels (as AdaCLIP's and
  Bayes-PFL's evaluation code compute it: per category over all its pixels, then the mean).
- ``iou_ano`` — mean per-image IoU of the model's own binary mask with the ground truth over
  anomalous images; ``iou_nor`` — share of normal images whose mask is empty.
- ``image_auroc`` / ``image_ap`` — image score = max of P; ``image_acc`` — verdict == label.

A metric that is undefined for a category (no anomalous pixels, a single image class) is
``None`` there and left out of the mean; the category's ``notes`` say which and why (the peers
skip such categories for the pixel metrics too: an AUROC needs both classes).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image

METRICS = ("pixel_ap", "pixel_auroc", "f1_max", "iou_ano", "iou_nor", "image_auroc", "image_ap", "image_acc")


@dataclass
class Protocol:
    """AP/F1 protocol: ``resize`` (square side, None = keep each image's size) and Gaussian
    ``sigma`` (0 = no smoothing). IoU always uses the model's binary mask at full size."""

    resize: int | None = 256
    sigma: float = 4.0


def f1_max(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Max F1 over the precision-recall curve (scikit-learn's thresholds)."""
    from sklearn.metrics import precision_recall_curve

    p, r, _ = precision_recall_curve(y_true, scores)
    f1 = np.divide(2 * p * r, p + r, out=np.zeros_like(p), where=(p + r) > 0)
    return float(f1.max())


def iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """|pred ∩ gt| / |pred ∪ gt|; 1.0 when both are empty."""
    union = np.logical_or(pred, gt).sum()
    return 1.0 if union == 0 else float(np.logical_and(pred, gt).sum() / union)


def protocol_map(prob: np.ndarray, protocol: Protocol) -> np.ndarray:
    x = prob.astype(np.float32)
    if protocol.resize:
        x = np.asarray(Image.fromarray(x, mode="F").resize((protocol.resize, protocol.resize), Image.BILINEAR))
    if protocol.sigma:
        from scipy.ndimage import gaussian_filter

        x = gaussian_filter(x, sigma=protocol.sigma)
    return x


def protocol_gt(gt: np.ndarray, protocol: Protocol) -> np.ndarray:
    if not protocol.resize:
        return gt.astype(bool)
    im = Image.fromarray(gt.astype(np.uint8) * 255).resize((protocol.resize, protocol.resize), Image.NEAREST)
    return np.asarray(im) > 127


@dataclass
class CategoryStats:
    """Accumulates one category's images."""

    protocol: Protocol = field(default_factory=Protocol)
    maps: list[np.ndarray] = field(default_factory=list)
    gts: list[np.ndarray] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    verdicts: list[bool] = field(default_factory=list)
    ious: list[float] = field(default_factory=list)  # anomalous images
    empties: list[bool] = field(default_factory=list)  # normal images

    def add(self, prob: np.ndarray, mask: np.ndarray, verdict: bool, gt: np.ndarray, anomaly: bool) -> None:
        """``prob`` float [H,W], the model's binary ``mask`` [H,W], ``gt`` bool [H,W]."""
        if prob.shape != gt.shape or mask.shape != gt.shape:
            raise ValueError(f"prediction {prob.shape}/{mask.shape} and ground truth {gt.shape} differ in size")
        self.maps.append(protocol_map(prob, self.protocol))
        self.gts.append(protocol_gt(gt, self.protocol))
        self.labels.append(int(anomaly))
        self.scores.append(float(prob.max()) if prob.size else 0.0)
        self.verdicts.append(bool(verdict))
        if anomaly:
            self.ious.append(iou(mask, gt))
        else:
            self.empties.append(not bool(mask.any()))

    def compute(self) -> dict[str, float | None]:
        from sklearn.metrics import average_precision_score, roc_auc_score

        out: dict[str, float | None] = dict.fromkeys(METRICS)
        notes: list[str] = []
        if self.maps:
            y = np.concatenate([g.ravel() for g in self.gts])
            s = np.concatenate([m.ravel() for m in self.maps])
            if y.any() and not y.all():
                out["pixel_ap"] = float(average_precision_score(y, s))
                out["pixel_auroc"] = float(roc_auc_score(y, s))
                out["f1_max"] = f1_max(y, s)
            else:
                notes.append(f"pixel metrics skipped: only {'anomalous' if y.all() else 'normal'} pixels")
        if self.ious:
            out["iou_ano"] = float(np.mean(self.ious))
        if self.empties:
            out["iou_nor"] = float(np.mean(self.empties))
        labels = np.array(self.labels)
        if 0 < labels.sum() < len(labels):
            out["image_auroc"] = float(roc_auc_score(labels, self.scores))
            out["image_ap"] = float(average_precision_score(labels, self.scores))
        elif self.labels:
            notes.append(f"image AUROC/AP skipped: only {'anomalous' if labels.all() else 'normal'} images")
        if self.labels:
            out["image_acc"] = float(np.mean(np.array(self.verdicts) == labels.astype(bool)))
        out["n_images"] = len(self.labels)
        out["n_anomalous"] = int(labels.sum())
        if notes:
            out["notes"] = notes
        return out


def summarize(per_category: dict[str, dict]) -> dict:
    """``{"mean": {metric: mean over categories where defined}, "per_category", "n_images"}``."""
    mean = {}
    for m in METRICS:
        vals = [c[m] for c in per_category.values() if c.get(m) is not None]
        mean[m] = float(np.mean(vals)) if vals else None
    out = {"mean": mean, "per_category": per_category,
           "n_images": int(sum(c.get("n_images", 0) for c in per_category.values()))}
    notes = [f"{cat}: {n}" for cat, c in sorted(per_category.items()) for n in c.get("notes", [])]
    if notes:
        out["notes"] = notes  # categories left out of a metric's mean, and why
    return out


def markdown_table(result: dict, title: str | None = None) -> str:
    """Per-category rows and the mean, values in percent."""
    def cell(v):
        return "–" if v is None else f"{100 * v:.1f}"

    cols = ("pixel_ap", "pixel_auroc", "f1_max", "iou_ano", "iou_nor", "image_auroc")
    lines = [f"**{title}**", ""] if title else []
    lines.append("| category | images | " + " | ".join(cols) + " |")
    lines.append("|---" * (len(cols) + 2) + "|")
    for cat, r in sorted(result["per_category"].items()):
        lines.append(f"| {cat} | {r.get('n_images', '')} | " + " | ".join(cell(r.get(c)) for c in cols) + " |")
    lines.append(f"| **mean** | {result['n_images']} | " + " | ".join(cell(result['mean'].get(c)) for c in cols) + " |")
    if result.get("notes"):
        lines += ["", *(f"_{n} (left out of that mean)_" for n in result["notes"])]
    return "\n".join(lines)
