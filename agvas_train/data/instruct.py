"""Our Anomaly-Instruct: structured fields from an image + mask, and instruction/answer pairs.

The paper asks a 241B LMM for five fields per defect image (§3.3). Here they are derived from
the mask geometry instead — location on a 3×3 grid, size relative to the image, elongation,
number of connected regions — plus the defect name and the colour inside the mask, so any
user's masked defect data becomes instruction data without an LMM. Normal images get fields
whose Summary still carries the anchors (their mask is empty).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

from .. import templates as T

GRID = (("the top left", "the top", "the top right"),
        ("the left side", "the center", "the right side"),
        ("the bottom left", "the bottom", "the bottom right"))
SIZE_WORDS = ((0.005, "tiny"), (0.02, "small"), (0.06, "medium-sized"), (0.15, "large"), (1.01, "very large"))
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
GENERIC_DEFECTS = {"", "anomaly", "anomalous", "bad", "defect", "defective", "ng", "abnormal"}


@dataclass
class MaskGeometry:
    """What the instruction fields say about a non-empty mask."""

    location: str  # "the top left", ..., "the center" (centroid of all defect pixels on a 3×3 grid)
    area_fraction: float  # defect pixels / image pixels
    size: str  # tiny / small / medium-sized / large / very large
    elongation: float  # major / minor axis of the largest region
    shape: str  # "thin linear" / "elongated" / "compact"
    regions: int  # 8-connected components


@dataclass
class InstructFields:
    expectation: str
    observation: str
    diagnosis: str
    summary: str  # carries [NOR][ANO][SEG]
    explanation: str


def humanize(name: str) -> str:
    """'metal_nut' -> 'metal nut'; 'MT_Blowhole' -> 'mt blowhole'."""
    return " ".join(str(name).replace("_", " ").replace("-", " ").lower().split())


def mask_geometry(mask: np.ndarray) -> MaskGeometry | None:
    """Geometry of a binary mask ``[H, W]``; ``None`` when it is empty."""
    from skimage.measure import label, regionprops

    m = np.asarray(mask).astype(bool)
    if not m.any():
        return None
    h, w = m.shape
    ys, xs = np.nonzero(m)
    row = min(2, int(3 * ys.mean() / h))
    col = min(2, int(3 * xs.mean() / w))
    frac = float(m.sum()) / (h * w)
    size = next(word for limit, word in SIZE_WORDS if frac < limit)
    lab = label(m, connectivity=2)
    props = regionprops(lab)
    big = max(props, key=lambda p: p.area)
    elong = float(big.axis_major_length) / max(float(big.axis_minor_length), 1.0)
    shape = "thin linear" if elong >= 4.0 else "elongated" if elong >= 2.0 else "compact"
    return MaskGeometry(GRID[row][col], frac, size, elong, shape, len(props))


def colour_word(image: np.ndarray, mask: np.ndarray) -> str:
    """A plain colour word for the pixels inside ``mask`` ('dark', 'bright', 'red', ...)."""
    from skimage.color import rgb2hsv

    img = np.asarray(image)
    if img.ndim == 2:
        img = np.stack([img] * 3, -1)
    m = np.asarray(mask).astype(bool)
    inside = img[m].reshape(-1, 3).astype(np.float64).mean(0) / 255.0
    rest = img[~m].reshape(-1, 3).astype(np.float64).mean(0) / 255.0 if (~m).any() else inside
    hue, sat, val = rgb2hsv(inside.reshape(1, 1, 3))[0, 0]
    if sat > 0.35 and val > 0.2:
        names = ((0.04, "red"), (0.11, "orange"), (0.19, "yellow"), (0.45, "green"), (0.55, "cyan"),
                 (0.72, "blue"), (0.88, "purple"), (0.96, "pink"), (1.01, "red"))
        return next(n for limit, n in names if hue < limit)
    return "dark" if inside.mean() < rest.mean() else "bright"


def describe(image: np.ndarray, mask: np.ndarray, category: str, defect: str | None = None) -> InstructFields:
    """The five Anomaly-Instruct fields for one image. ``mask`` empty (or all False) = normal."""
    cat = humanize(category)
    d = humanize(defect or "")
    defect_word = "defect" if d in GENERIC_DEFECTS or d == "good" else d
    geo = mask_geometry(mask)
    if geo is None:
        return InstructFields(
            expectation=T.EXPECTATION.format(cat=cat, defect="defects"),
            observation=T.NORMAL_OBSERVATION.format(cat=cat),
            diagnosis=T.NORMAL_DIAGNOSIS.format(cat=cat),
            summary=T.NORMAL_SUMMARY.format(cat=cat),
            explanation=T.NORMAL_EXPLANATION.format(cat=cat),
        )
    slots = dict(
        cat=cat, defect=defect_word, count=COUNT_WORDS.get(geo.regions, "several"), size=geo.size,
        shape=geo.shape, colour=colour_word(image, mask), where=geo.location,
        percent=max(1, round(100 * geo.area_fraction)),
        be="is" if geo.regions == 1 else "are", plural="" if geo.regions == 1 else "s",
    )
    return InstructFields(
        expectation=T.EXPECTATION.format(**slots),
        observation=T.OBSERVATION.format(**slots),
        diagnosis=T.DIAGNOSIS.format(**slots),
        summary=T.SUMMARY.format(**slots),
        explanation=T.EXPLANATION.format(**slots),
    )


def conversation(fields: InstructFields | None, mode: str, rng: random.Random,
                 target: str | None = None) -> tuple[str, str]:
    """(instruction, answer) for ``mode`` with templates and the target word drawn from ``rng``.

    direct: a direct-segmentation template (``fields`` may be None); describe / describe_plus:
    the answer is the Summary (describe_plus prefixes the Expectation to the instruction);
    explain: the anchors first, then the Explanation."""
    mode = T.normalize_mode(mode)
    target = target or rng.choice(T.TARGET_WORDS)
    if mode == "direct":
        return rng.choice(T.DIRECT_INSTRUCTIONS).format(target=target), rng.choice(T.DIRECT_ANSWERS)
    if fields is None:
        raise ValueError(f"mode {mode!r} needs the instruction fields of the image")
    if mode == "describe":
        return rng.choice(T.DESCRIBE_INSTRUCTIONS).format(target=target), fields.summary
    if mode == "describe_plus":
        instr = rng.choice(T.DESCRIBE_PLUS_INSTRUCTIONS).format(normal=fields.expectation, target=target)
        return instr, fields.summary
    return (rng.choice(T.EXPLAIN_INSTRUCTIONS).format(target=target),
            rng.choice(T.EXPLAIN_ANSWERS).format(explanation=fields.explanation))


def general_conversation(phrase: str, rng: random.Random) -> tuple[str, str]:
    """(instruction, answer) for a general-segmentation sample: segment ``phrase``."""
    return rng.choice(T.GENERAL_INSTRUCTIONS).format(target=phrase), rng.choice(T.DIRECT_ANSWERS)
