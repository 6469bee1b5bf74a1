"""The accuracy gate: a quantized export against the fp32 reference outputs.

Per image: mask IoU (two empty masks agree perfectly: IoU 1), verdict agreement, anchor-state
cosine (mean over NOR/ANO/SEG; 0 when one side found no anchors, 1 when neither did), text
agreement. Per engine: output SNR in dB, ``10·log10(Σ ref² / Σ (ref − out)²)``, on the engine's
captured inputs. The default budget is mean mask IoU ≥ 0.95 and verdict agreement ≥ 99 %.
Torch-free (numpy only).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

BUDGET_KEYS = {
    "mean_iou": "mean_mask_iou", "min_iou": "min_mask_iou", "verdict": "verdict_agreement",
    "anchor_cosine": "anchor_cosine", "text": "text_agreement", "forced_iou": "forced_mask_iou",
}


@dataclass
class Budget:
    """Lower bounds a quantized export must hold; ``None`` = not checked."""

    mean_iou: float | None = 0.95
    verdict: float | None = 0.99
    min_iou: float | None = None
    anchor_cosine: float | None = None
    text: float | None = None
    forced_iou: float | None = None  # teacher-forced low-res mask IoU (meaningful without learned anchors)

    @classmethod
    def parse(cls, spec: str | None) -> "Budget":
        """``"mean_iou=0.95,verdict=0.99,min_iou=0.8,anchor_cosine=0.99,text=1,forced_iou=0.95"``
        (missing keys keep their defaults; ``key=none`` switches a check off)."""
        b = cls()
        if not spec:
            return b
        for part in spec.split(","):
            if not part.strip():
                continue
            key, sep, val = part.partition("=")
            key = key.strip()
            if not sep or key not in BUDGET_KEYS:
                raise ValueError(f"--budget {spec!r}: expected comma-separated KEY=VALUE with KEY in "
                                 f"{sorted(BUDGET_KEYS)}, got {part!r}")
            if val.strip().lower() == "none":
                setattr(b, key, None)
                continue
            try:
                x = float(val)
            except ValueError:
                raise ValueError(f"--budget {spec!r}: {key} must be a number in [0, 1], got {val!r}") from None
            if not 0.0 <= x <= 1.0:
                raise ValueError(f"--budget {spec!r}: {key} must be in [0, 1], got {x}")
            setattr(b, key, x)
        return b

    def to_dict(self) -> dict[str, float | None]:
        return asdict(self)


@dataclass
class Outputs:
    """What the gate compares for one image (from the runtime's result or the stored reference)."""

    mask: np.ndarray  # bool [H, W]
    verdict: bool
    anchor_states: np.ndarray | None  # [3, H] NOR, ANO, SEG; None when the anchors were not generated
    text: str = ""

    @classmethod
    def of(cls, result: Any) -> "Outputs":
        """From anything with ``mask``, ``verdict``, ``anchor_states``, ``text`` attributes."""
        a = getattr(result, "anchor_states", None)
        return cls(np.asarray(result.mask, dtype=bool), bool(result.verdict),
                   None if a is None else np.asarray(a, dtype=np.float32), str(getattr(result, "text", "")))


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two boolean masks of one shape; 1.0 when both are empty."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"mask shapes differ: reference {a.shape} vs candidate {b.shape}")
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def anchor_cosine(a: np.ndarray | None, b: np.ndarray | None) -> float:
    """Mean cosine over the anchors of ``[3, H]`` states; 1 if neither side has anchors, 0 if one lacks them."""
    if a is None or b is None:
        return 1.0 if a is None and b is None else 0.0
    a, b = np.asarray(a, np.float64).reshape(3, -1), np.asarray(b, np.float64).reshape(3, -1)
    num = (a * b).sum(-1)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return float(np.mean(np.where(den > 0, num / np.maximum(den, 1e-300), (num == 0).astype(float))))


def snr_db(ref: np.ndarray, out: np.ndarray) -> float:
    """``10·log10(Σ ref² / Σ (ref − out)²)``; ``inf`` for identical outputs."""
    ref, out = np.asarray(ref, np.float64), np.asarray(out, np.float64)
    if ref.shape != out.shape:
        raise ValueError(f"output shapes differ: reference {ref.shape} vs candidate {out.shape}")
    noise = float(((ref - out) ** 2).sum())
    signal = float((ref ** 2).sum())
    if noise == 0.0:
        return math.inf
    return 10.0 * math.log10(max(signal, 1e-300) / noise)


@dataclass
class ImageRow:
    name: str
    split: str  # "calibration" | "held_out"
    mask_iou: float
    verdict_agree: bool
    anchor_cosine: float
    text_agree: bool


@dataclass
class GateResult:
    rows: list[ImageRow]
    budget: Budget
    engine_snr_db: dict[str, float] = field(default_factory=dict)
    # teacher-forced check of the llm: its anchor states at the forced answer's anchor positions of
    # the captured prefills, decoded by the fp32 agmd (keys: images, anchor_cosine, min_anchor_cosine,
    # mask_iou, min_mask_iou) — meaningful for models that never emit the anchors (random weights)
    forced: dict[str, float] | None = None

    @property
    def forced_mask_iou(self) -> float:
        return float(self.forced["mask_iou"]) if self.forced else float("nan")

    # ---- aggregates -------------------------------------------------------------------------
    @property
    def mean_mask_iou(self) -> float:
        return float(np.mean([r.mask_iou for r in self.rows])) if self.rows else float("nan")

    @property
    def min_mask_iou(self) -> float:
        return float(np.min([r.mask_iou for r in self.rows])) if self.rows else float("nan")

    @property
    def verdict_agreement(self) -> float:
        return float(np.mean([r.verdict_agree for r in self.rows])) if self.rows else float("nan")

    @property
    def anchor_cosine(self) -> float:
        return float(np.mean([r.anchor_cosine for r in self.rows])) if self.rows else float("nan")

    @property
    def min_anchor_cosine(self) -> float:
        return float(np.min([r.anchor_cosine for r in self.rows])) if self.rows else float("nan")

    @property
    def text_agreement(self) -> float:
        return float(np.mean([r.text_agree for r in self.rows])) if self.rows else float("nan")

    def failures(self) -> list[str]:
        """One line per budget entry that is not held (empty list = passed)."""
        if not self.rows:
            return ["no images were compared"]
        out = []
        for key, metric in BUDGET_KEYS.items():
            bound = getattr(self.budget, key)
            if bound is None:
                continue
            if metric == "forced_mask_iou" and not self.forced:
                out.append("forced_mask_iou: no teacher-forced check ran (the llm is unchanged or no prefills "
                           "were captured)")
                continue
            value = getattr(self, metric)
            if not value >= bound:
                out.append(f"{metric} {value:.4f} < {bound:g}")
        return out

    @property
    def passed(self) -> bool:
        return not self.failures()

    def to_manifest(self) -> dict[str, Any]:
        """The manifest's ``accuracy_gate`` record."""
        splits: dict[str, list[str]] = {}
        for r in self.rows:
            splits.setdefault(r.split, []).append(r.name)
        return {
            "mean_mask_iou": self.mean_mask_iou, "min_mask_iou": self.min_mask_iou,
            "verdict_agreement": self.verdict_agreement, "anchor_cosine": self.anchor_cosine,
            "min_anchor_cosine": self.min_anchor_cosine, "text_agreement": self.text_agreement,
            "engine_snr_db": {k: (None if math.isinf(v) else v) for k, v in self.engine_snr_db.items()},
            "teacher_forced": self.forced,
            "images": {k: {"count": len(v), "names": v} for k, v in splits.items()},
            "budget": self.budget.to_dict(), "passed": self.passed, "failures": self.failures(),
        }


def compare(reference: Sequence[Outputs], candidate: Sequence[Outputs], names: Iterable[str],
            splits: Iterable[str], budget: Budget | None = None,
            engine_snr_db: dict[str, float] | None = None, forced: dict[str, float] | None = None) -> GateResult:
    """Compare per-image outputs of a candidate export with the fp32 reference."""
    names, splits = list(names), list(splits)
    if not len(reference) == len(candidate) == len(names) == len(splits):
        raise ValueError(f"gate inputs differ in length: {len(reference)} reference, {len(candidate)} candidate, "
                         f"{len(names)} names, {len(splits)} splits")
    rows = [ImageRow(n, s, mask_iou(r.mask, c.mask), r.verdict == c.verdict,
                     anchor_cosine(r.anchor_states, c.anchor_states), r.text == c.text)
            for r, c, n, s in zip(reference, candidate, names, splits)]
    return GateResult(rows, budget or Budget(), dict(engine_snr_db or {}), forced)


def format_gate(result: GateResult, title: str = "accuracy gate") -> str:
    """The gate as a markdown table (what the command prints, pass or fail)."""
    b = result.budget

    def bound(key: str) -> str:
        v = getattr(b, key)
        return "—" if v is None else f"≥ {v:g}"

    lines = [f"{title}: {'PASS' if result.passed else 'FAIL'} ({len(result.rows)} images: "
             + ", ".join(f"{s} {sum(r.split == s for r in result.rows)}" for s in sorted({r.split for r in result.rows}))
             + ")", "", "| metric | value | budget |", "|---|---|---|",
             f"| mean mask IoU | {result.mean_mask_iou:.4f} | {bound('mean_iou')} |",
             f"| min mask IoU | {result.min_mask_iou:.4f} | {bound('min_iou')} |",
             f"| verdict agreement | {result.verdict_agreement:.2%} | {bound('verdict')} |",
             f"| anchor cosine (mean / min) | {result.anchor_cosine:.5f} / {result.min_anchor_cosine:.5f} | "
             f"{bound('anchor_cosine')} |",
             f"| text agreement | {result.text_agreement:.2%} | {bound('text')} |"]
    if result.forced:
        f = result.forced
        lines += [f"| teacher-forced mask IoU, low-res (mean / min, {f['images']} prefills) | "
                  f"{f['mask_iou']:.4f} / {f['min_mask_iou']:.4f} | {bound('forced_iou')} |",
                  f"| teacher-forced anchor cosine (mean / min) | {f['anchor_cosine']:.5f} / "
                  f"{f['min_anchor_cosine']:.5f} | |"]
    for eng, v in result.engine_snr_db.items():
        lines.append(f"| SNR `{eng}` | {'inf' if math.isinf(v) else f'{v:.1f} dB'} | |")
    fails = result.failures()
    if fails:
        lines += ["", "below budget: " + "; ".join(fails)]
    return "\n".join(lines)
