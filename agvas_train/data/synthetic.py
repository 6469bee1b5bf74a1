"""Synthetic anomaly data: the embedded default's training and held-out evaluation set.

Normal images come from procedural textures and objects and from the texture photographs that
ship inside scikit-image (``brick``, ``grass``, ``gravel``, ``moon``, ``immunohistochemistry``
load offline). Defects of several kinds are drawn on them with **exact** masks: every pixel
outside the mask is identical to the normal image and every pixel inside is changed.

Zero-shot protocol: categories *and* defect kinds are split — the held-out categories are
evaluated with defect kinds never seen in training. Everything is deterministic from a seed and
written in the MVTec layout with a ``meta.json`` (see :func:`write_dataset`), so every tool
reads it like a real dataset.

Written by hand (no library ships these): 2-D Perlin gradient noise and the defect painters.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

Array = np.ndarray

# ---- noise and drawing helpers -------------------------------------------------------------


def perlin(h: int, w: int, res: int, rng: np.random.Generator) -> Array:
    """2-D Perlin gradient noise on an ``res``×``res`` lattice, roughly in [-0.7, 0.7]."""
    n = res + 1
    angles = rng.uniform(0, 2 * np.pi, (n, n))
    gx, gy = np.cos(angles), np.sin(angles)
    y = np.linspace(0, res, h, endpoint=False)
    x = np.linspace(0, res, w, endpoint=False)
    yy, xx = np.meshgrid(y, x, indexing="ij")
    y0, x0 = yy.astype(int), xx.astype(int)
    fy, fx = yy - y0, xx - x0

    def dot(oy: int, ox: int) -> Array:
        return gx[y0 + oy, x0 + ox] * (fx - ox) + gy[y0 + oy, x0 + ox] * (fy - oy)

    def fade(t: Array) -> Array:
        return t * t * t * (t * (t * 6 - 15) + 10)

    u, v = fade(fx), fade(fy)
    top = dot(0, 0) * (1 - u) + dot(0, 1) * u
    bot = dot(1, 0) * (1 - u) + dot(1, 1) * u
    return top * (1 - v) + bot * v


def fractal(h: int, w: int, rng: np.random.Generator, base: int = 2, octaves: int = 4) -> Array:
    """Sum of Perlin octaves, normalised to [0, 1]."""
    out = sum(perlin(h, w, base * 2 ** o, rng) / 2 ** o for o in range(octaves))
    lo, hi = out.min(), out.max()
    return (out - lo) / (hi - lo + 1e-8)


def draw_mask(size: int, paint: Callable[[ImageDraw.ImageDraw], None]) -> Array:
    """A boolean mask drawn with PIL (no anti-aliasing, so it is exact)."""
    im = Image.new("L", (size, size), 0)
    paint(ImageDraw.Draw(im))
    return np.asarray(im) > 127


def palette(rng: np.random.Generator, n: int, lo: float = 0.1, hi: float = 0.9) -> Array:
    return rng.uniform(lo, hi, (n, 3))


def coords(s: int) -> tuple[Array, Array]:
    return np.meshgrid(np.arange(s, dtype=np.float64), np.arange(s, dtype=np.float64), indexing="ij")


# ---- normal images: (image float [S,S,3] in [0,1], foreground mask or None) -----------------


def _rotated(s: int, rng: np.random.Generator) -> tuple[Array, Array]:
    yy, xx = coords(s)
    a = rng.uniform(0, np.pi)
    return xx * np.cos(a) + yy * np.sin(a), -xx * np.sin(a) + yy * np.cos(a)


def tex_stripes(s, rng):
    u, _ = _rotated(s, rng)
    c = palette(rng, 2)
    t = 0.5 + 0.5 * np.sin(2 * np.pi * u / rng.uniform(6, 16) + rng.uniform(0, 6.3))
    img = c[0] * t[..., None] + c[1] * (1 - t[..., None])
    return img + 0.03 * fractal(s, s, rng)[..., None], None


def tex_tiles(s, rng):
    yy, xx = coords(s)
    period = int(rng.integers(14, 28))
    grout = (yy % period < 2) | (xx % period < 2)
    base = palette(rng, 1, 0.4, 0.9)[0]
    tile_id = (yy // period) * 100 + xx // period
    jitter = np.sin(tile_id * 12.9898 + rng.uniform(0, 100)) * 0.04
    img = base + jitter[..., None] + 0.04 * fractal(s, s, rng, 4)[..., None]
    img[grout] = base * 0.45
    return img, None


def tex_fabric(s, rng):
    u, v = _rotated(s, rng)
    p = rng.uniform(3, 6)
    warp = 0.5 + 0.5 * np.sin(2 * np.pi * u / p)
    weft = 0.5 + 0.5 * np.sin(2 * np.pi * v / p)
    t = np.where((np.floor(u / p) + np.floor(v / p)) % 2 == 0, warp, weft)
    c = palette(rng, 2, 0.2, 0.8)
    return c[0] * t[..., None] + c[1] * (1 - t[..., None]), None


def tex_marble(s, rng):
    n = fractal(s, s, rng, 2, 5)
    u, _ = _rotated(s, rng)
    t = 0.5 + 0.5 * np.sin(u / rng.uniform(8, 20) + 8 * n)
    c = palette(rng, 2, 0.5, 0.95)
    return c[0] * t[..., None] + c[1] * (1 - t[..., None]), None


def tex_wood(s, rng):
    yy, xx = coords(s)
    cy, cx = rng.uniform(-2 * s, 3 * s, 2)
    r = np.hypot(yy - cy, xx - cx)
    t = 0.5 + 0.5 * np.sin(r / rng.uniform(2, 5) + 6 * fractal(s, s, rng, 2, 3))
    base = np.array([0.55, 0.35, 0.18]) * rng.uniform(0.7, 1.3)
    return base * (0.75 + 0.35 * t[..., None]), None


def tex_carpet(s, rng):
    c = palette(rng, 1, 0.2, 0.8)[0]
    n = fractal(s, s, rng, 8, 3)
    return c * (0.7 + 0.6 * n[..., None]) + 0.05 * (rng.random((s, s, 1)) - 0.5), None


def tex_perforated(s, rng):
    yy, xx = coords(s)
    p = rng.uniform(9, 16)
    oy, ox = rng.uniform(0, p, 2)
    d = np.hypot((yy - oy) % p - p / 2, (xx - ox) % p - p / 2)
    base = palette(rng, 1, 0.5, 0.9)[0]
    img = np.broadcast_to(base, (s, s, 3)) * (0.95 + 0.1 * fractal(s, s, rng, 4, 2)[..., None])
    return np.where((d < p * 0.22)[..., None], base * 0.2, img), None


def tex_brushed(s, rng):
    u, v = _rotated(s, rng)
    streak = np.sin(v * 1.7 + 3 * np.sin(v * 0.37)) * 0.5 + np.sin(v * 4.1) * 0.3
    g = rng.uniform(0.45, 0.8)
    t = g + 0.06 * streak + 0.05 * fractal(s, s, rng, 4, 2)
    tint = rng.uniform(0.92, 1.08, 3)
    return t[..., None] * tint, None


@lru_cache(maxsize=None)
def _photo(name: str) -> Array:
    import skimage.data

    a = getattr(skimage.data, name)().astype(np.float64) / 255.0
    return np.stack([a] * 3, -1) if a.ndim == 2 else a[..., :3]


def _photo_crop(name: str, s: int, rng: np.random.Generator, tint: bool = True) -> Array:
    a = _photo(name)
    h, w = a.shape[:2]
    side = int(rng.integers(int(min(h, w) * 0.35), int(min(h, w) * 0.6)))
    y, x = int(rng.integers(0, h - side)), int(rng.integers(0, w - side))
    crop = Image.fromarray((a[y:y + side, x:x + side] * 255).astype(np.uint8)).resize((s, s), Image.BILINEAR)
    out = np.asarray(crop).astype(np.float64) / 255.0
    out = np.rot90(out, int(rng.integers(0, 4)))
    return out * rng.uniform(0.8, 1.2, 3) if tint else out


def photo_texture(name: str) -> Callable:
    def make(s, rng):
        return _photo_crop(name, s, rng), None

    make.__name__ = f"photo_{name}"
    return make


def _object(s, rng, shape: str):
    yy, xx = coords(s)
    bg = palette(rng, 1, 0.05, 0.35)[0]
    col = palette(rng, 1, 0.45, 0.95)[0]
    cy, cx = s / 2 + rng.uniform(-s * 0.06, s * 0.06, 2)
    r = s * rng.uniform(0.3, 0.4)
    shade = 0.85 + 0.25 * fractal(s, s, rng, 2, 2)
    if shape == "washer":
        d = np.hypot(yy - cy, xx - cx)
        fg = (d < r) & (d > r * rng.uniform(0.3, 0.5))
        shade = shade * (0.9 + 0.1 * np.cos(d / 2))
    elif shape == "pill":
        a = rng.uniform(0, np.pi)
        u = (xx - cx) * np.cos(a) + (yy - cy) * np.sin(a)
        v = -(xx - cx) * np.sin(a) + (yy - cy) * np.cos(a)
        half = r * 0.6
        fg = np.hypot(np.clip(np.abs(u) - half, 0, None), v) < r * 0.45
        shade = shade * (1 - 0.3 * (v / (r * 0.45)) ** 2)
    elif shape == "hex_nut":
        a = rng.uniform(0, np.pi / 3)
        ang = np.arctan2(yy - cy, xx - cx) - a
        d = np.hypot(yy - cy, xx - cx)
        hexr = r * np.cos(np.pi / 6) / np.cos((ang % (np.pi / 3)) - np.pi / 6)
        fg = (d < hexr) & (d > r * 0.38)
    elif shape == "bottle_cap":
        d = np.hypot(yy - cy, xx - cx)
        ang = np.arctan2(yy - cy, xx - cx)
        ridges = np.sin(ang * int(rng.integers(18, 30)))
        fg = d < r * (1 + 0.03 * ridges)
        shade = shade * np.where(d > r * 0.82, 0.85 + 0.1 * ridges, 1.0)
    else:
        raise ValueError(f"unknown object shape {shape!r}")
    img = np.where(fg[..., None], col * shade[..., None], bg * (0.9 + 0.2 * fractal(s, s, rng, 4, 2))[..., None])
    return img, fg


def object_maker(shape: str) -> Callable:
    def make(s, rng):
        return _object(s, rng, shape)

    make.__name__ = f"object_{shape}"
    return make


# category -> (normal-image maker, is_object)
CATEGORIES: dict[str, Callable] = {
    "stripes": tex_stripes, "tiles": tex_tiles, "marble": tex_marble, "wood": tex_wood,
    "carpet": tex_carpet, "brushed_metal": tex_brushed, "fabric": tex_fabric, "perforated_plate": tex_perforated,
    "brick": photo_texture("brick"), "grass": photo_texture("grass"), "gravel": photo_texture("gravel"),
    "moon_surface": photo_texture("moon"), "tissue": photo_texture("immunohistochemistry"),
    "washer": object_maker("washer"), "pill": object_maker("pill"), "hex_nut": object_maker("hex_nut"),
    "bottle_cap": object_maker("bottle_cap"),
}

# ---- defects: (image, foreground or None, rng) -> (image, exact mask) -----------------------


def _region_center(s: int, fg: Array | None, rng: np.random.Generator) -> tuple[float, float]:
    if fg is not None and fg.any():
        ys, xs = np.nonzero(fg)
        i = int(rng.integers(0, len(ys)))
        return float(ys[i]), float(xs[i])
    m = s * 0.12
    return float(rng.uniform(m, s - m)), float(rng.uniform(m, s - m))


def _contrast(img: Array, mask: Array, rng: np.random.Generator) -> Array:
    """A colour clearly different from the image's mean colour under ``mask``."""
    mean = img[mask].mean(0) if mask.any() else img.reshape(-1, 3).mean(0)
    lum = float(mean.mean())
    target = rng.uniform(0.0, 0.18) if lum > 0.45 else rng.uniform(0.8, 1.0)
    return np.clip(mean * 0.3 + target * 0.7, 0, 1)


def _curve(s: int, y0: float, x0: float, rng: np.random.Generator, length: float, bend: float) -> list[tuple]:
    ang = rng.uniform(0, 2 * np.pi)
    pts = [(x0, y0)]
    for _ in range(12):
        ang += rng.normal(0, bend)
        x0, y0 = x0 + np.cos(ang) * length / 12, y0 + np.sin(ang) * length / 12
        pts.append((x0, y0))
    return pts


def defect_scratch(img, fg, rng):
    s = img.shape[0]
    y, x = _region_center(s, fg, rng)
    pts = _curve(s, y, x, rng, rng.uniform(0.25, 0.6) * s, 0.08)
    width = int(rng.integers(2, 4))
    mask = draw_mask(s, lambda d: d.line(pts, fill=255, width=width, joint="curve"))
    return mask, lambda im, m: _contrast(im, m, rng)


def defect_crack(img, fg, rng):
    s = img.shape[0]
    y, x = _region_center(s, fg, rng)
    branches = [_curve(s, y, x, rng, rng.uniform(0.25, 0.5) * s, 0.5)]
    for _ in range(int(rng.integers(1, 3))):
        p = branches[0][int(rng.integers(3, 10))]
        branches.append(_curve(s, p[1], p[0], rng, rng.uniform(0.1, 0.25) * s, 0.6))

    def paint(d):
        for b in branches:
            d.line(b, fill=255, width=2)

    return draw_mask(s, paint), lambda im, m: _contrast(im, m, rng)


def defect_hole(img, fg, rng):
    s = img.shape[0]
    y, x = _region_center(s, fg, rng)
    ry, rx = rng.uniform(0.04, 0.09, 2) * s
    mask = draw_mask(s, lambda d: d.ellipse([x - rx, y - ry, x + rx, y + ry], fill=255))
    return mask, lambda im, m: _contrast(im, m, rng)


def _blob(s: int, y: float, x: float, r: float, rng: np.random.Generator) -> Array:
    yy, xx = coords(s)
    d = np.hypot((yy - y) / r, (xx - x) / (r * rng.uniform(0.6, 1.4)))
    return d + 0.8 * perlin(s, s, 8, rng) < 1.0


def defect_stain(img, fg, rng):
    s = img.shape[0]
    y, x = _region_center(s, fg, rng)
    mask = _blob(s, y, x, rng.uniform(0.07, 0.15) * s, rng)
    tint = palette(rng, 1, 0.0, 1.0)[0]  # any hue: a stain is a tinted darkening, not a colour
    dark = rng.uniform(0.3, 0.55)
    return mask, lambda im, m: dark * im[m] + (1 - dark) * 0.5 * tint


def defect_contamination(img, fg, rng):
    s = img.shape[0]
    y, x = _region_center(s, fg, rng)
    parts = [(y + rng.normal(0, s * 0.05), x + rng.normal(0, s * 0.05), rng.uniform(1.5, 4.0))
             for _ in range(int(rng.integers(4, 9)))]

    def paint(d):
        for py, px, r in parts:
            d.ellipse([px - r, py - r, px + r, py + r], fill=255)

    colour = palette(rng, 1, 0.0, 1.0)[0]
    return draw_mask(s, paint), lambda im, m: colour


def defect_missing_chunk(img, fg, rng):
    s = img.shape[0]
    if fg is not None:
        ys, xs = np.nonzero(fg)
        edge = fg & ~np.roll(fg, 3, 0) | fg & ~np.roll(fg, 3, 1) | fg & ~np.roll(fg, -3, 0) | fg & ~np.roll(fg, -3, 1)
        ey, ex = np.nonzero(edge)
        i = int(rng.integers(0, len(ey)))
        y, x = ey[i], ex[i]
    else:
        y, x = _region_center(s, None, rng)
    r = rng.uniform(0.08, 0.15) * s
    n = int(rng.integers(5, 9))
    ang = np.sort(rng.uniform(0, 2 * np.pi, n))
    poly = [(x + r * rng.uniform(0.5, 1.2) * np.cos(a), y + r * rng.uniform(0.5, 1.2) * np.sin(a)) for a in ang]
    mask = draw_mask(s, lambda d: d.polygon(poly, fill=255))
    if fg is not None:
        mask &= fg
        bg = img[~fg].mean(0)
        return mask, lambda im, m: bg
    return mask, lambda im, m: np.array([0.08, 0.08, 0.08])


def defect_colour_spot(img, fg, rng):
    s = img.shape[0]
    y, x = _region_center(s, fg, rng)
    ry, rx = rng.uniform(0.05, 0.1, 2) * s
    mask = draw_mask(s, lambda d: d.ellipse([x - rx, y - ry, x + rx, y + ry], fill=255))
    colour = np.array(rng.choice([[0.9, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.2, 0.9], [0.9, 0.8, 0.0], [0.8, 0.1, 0.8]]))
    return mask, lambda im, m: colour


def defect_cutpaste(img, fg, rng):
    """CutPaste-style: a patch of the same image, rotated and colour-shifted, pasted elsewhere."""
    s = img.shape[0]
    ph, pw = (rng.uniform(0.1, 0.22, 2) * s).astype(int)
    sy, sx = int(rng.integers(0, s - ph)), int(rng.integers(0, s - pw))
    patch = np.rot90(img[sy:sy + ph, sx:sx + pw], 1)
    patch = np.clip(patch * rng.uniform(0.5, 0.7) + rng.uniform(0.2, 0.4) * (patch.mean() < 0.5), 0, 1)
    y, x = _region_center(s, fg, rng)
    h2, w2 = patch.shape[:2]
    ty, tx = int(np.clip(y - h2 / 2, 0, s - h2)), int(np.clip(x - w2 / 2, 0, s - w2))
    mask = np.zeros((s, s), bool)
    mask[ty:ty + h2, tx:tx + w2] = True
    full = np.zeros_like(img)
    full[ty:ty + h2, tx:tx + w2] = patch
    return mask, lambda im, m: full[m]


def defect_perlin(img, fg, rng):
    """DRAEM-style: a thresholded Perlin region filled with a foreign texture."""
    s = img.shape[0]
    y, x = _region_center(s, fg, rng)
    yy, xx = coords(s)
    window = np.hypot(yy - y, xx - x) < rng.uniform(0.12, 0.22) * s
    mask = window & (perlin(s, s, 4, rng) > 0.0)
    foreign = 1.0 - tex_marble(s, rng)[0]
    return mask, lambda im, m: 0.2 * im[m] + 0.8 * foreign[m]


DEFECTS: dict[str, Callable] = {
    "scratch": defect_scratch, "crack": defect_crack, "hole": defect_hole, "stain": defect_stain,
    "contamination": defect_contamination, "missing_chunk": defect_missing_chunk,
    "colour_spot": defect_colour_spot, "cut_paste": defect_cutpaste, "perlin_intrusion": defect_perlin,
}

# The zero-shot split: held-out categories are evaluated with held-out defect kinds only.
TRAIN_CATEGORIES = ("stripes", "tiles", "marble", "wood", "carpet", "brushed_metal", "brick", "grass",
                    "moon_surface", "washer", "pill", "bottle_cap")
TEST_CATEGORIES = ("fabric", "perforated_plate", "gravel", "tissue", "hex_nut")
TRAIN_DEFECTS = ("scratch", "hole", "stain", "contamination", "cut_paste", "perlin_intrusion")
TEST_DEFECTS = ("crack", "missing_chunk", "colour_spot")
MIN_DEFECT_PIXELS = 12
MIN_CHANGE = 0.06  # mean |Δ| inside the mask (0..1 scale) for a defect to count as visible


@dataclass
class SyntheticSample:
    category: str
    defect: str | None  # None = normal
    image: Array  # uint8 [S,S,3]
    mask: Array  # bool [S,S]
    normal: Array  # the same image before the defect, uint8


def _rng(seed: int, *keys: int | str) -> np.random.Generator:
    words = [seed] + [k if isinstance(k, int) else int.from_bytes(k.encode()[:8].ljust(8, b"\0"), "little")
                      for k in keys]
    return np.random.default_rng(np.random.SeedSequence(words))


def to_uint8(img: Array) -> Array:
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def make_sample(category: str, defect: str | None, seed: int, index: int, size: int = 128) -> SyntheticSample:
    """One deterministic sample. The defect is re-drawn (same stream) until it is visible:
    at least :data:`MIN_DEFECT_PIXELS` pixels and a mean change ≥ :data:`MIN_CHANGE`."""
    if category not in CATEGORIES:
        raise ValueError(f"unknown synthetic category {category!r}; expected one of {sorted(CATEGORIES)}")
    if defect is not None and defect not in DEFECTS:
        raise ValueError(f"unknown defect kind {defect!r}; expected one of {sorted(DEFECTS)}")
    rng = _rng(seed, category, index)
    img, fg = CATEGORIES[category](size, rng)
    normal = to_uint8(img)
    if defect is None:
        return SyntheticSample(category, None, normal, np.zeros((size, size), bool), normal)
    base = normal.astype(np.float64) / 255.0
    drng = _rng(seed, category, index, defect)
    for _ in range(50):
        mask, fill = DEFECTS[defect](base, fg, drng)
        if fg is not None:
            mask = mask & fg  # defects live on the object
        if mask.sum() < MIN_DEFECT_PIXELS:
            continue
        out = base.copy()
        out[mask] = fill(base, mask)
        out8 = to_uint8(out)
        changed = np.abs(out8.astype(np.int16) - normal.astype(np.int16)).max(-1) > 0
        mask = mask & changed  # exact: the mask is precisely the set of changed pixels
        if mask.sum() >= MIN_DEFECT_PIXELS and np.abs(out8[mask].astype(float) - normal[mask]).mean() / 255 >= MIN_CHANGE:
            return SyntheticSample(category, defect, out8, mask, normal)
    raise RuntimeError(f"could not draw a visible {defect} on {category} (seed {seed}, index {index})")


# ---- the dataset on disk ------------------------------------------------------------------


@dataclass
class SyntheticSpec:
    """What :func:`write_dataset` generates. Per category: ``n_per_category`` labelled images,
    half normal, half anomalous (defect kinds cycled), plus ``n_train_good`` normal images in
    MVTec's ``train/good``."""

    seed: int = 0
    size: int = 128
    n_per_category: int = 160
    n_test_per_category: int = 60
    n_train_good: int = 4
    train_categories: tuple[str, ...] = TRAIN_CATEGORIES
    test_categories: tuple[str, ...] = TEST_CATEGORIES
    train_defects: tuple[str, ...] = TRAIN_DEFECTS
    test_defects: tuple[str, ...] = TEST_DEFECTS

    def validate(self) -> None:
        if set(self.train_categories) & set(self.test_categories):
            raise ValueError(f"train and test categories overlap: {sorted(set(self.train_categories) & set(self.test_categories))}")
        if set(self.train_defects) & set(self.test_defects):
            raise ValueError(f"train and test defect kinds overlap: {sorted(set(self.train_defects) & set(self.test_defects))}")


def _plan(n: int, kinds: tuple[str, ...]) -> list[str | None]:
    """Balanced: first half normal, then the defect kinds cycled."""
    n_normal = n // 2
    return [None] * n_normal + [kinds[i % len(kinds)] for i in range(n - n_normal)]


def write_dataset(root: str | Path, spec: SyntheticSpec | None = None, progress: bool = False) -> Path:
    """Generate the dataset in the MVTec layout under ``root`` and write ``root/meta.json``.

    Layout per category: ``{cat}/train/good/*.png``, ``{cat}/test/{good|kind}/*.png``,
    ``{cat}/ground_truth/{kind}/*_mask.png``. ``meta.json`` (AnomalyCLIP form, paths relative to
    ``root``): ``train`` lists the training categories' labelled test images (the auxiliary data
    of the zero-shot protocol), ``test`` the held-out categories'. A ``synthetic.json`` records
    the spec. Returns the meta.json path. Images are written atomically; an existing complete
    dataset with the same spec is kept as is.
    """
    from agvas.atomic import atomic_path, write_text_atomic

    from .meta import SCHEMA_KEYS

    spec = spec or SyntheticSpec()
    spec.validate()
    root = Path(root)
    meta_path = root / "meta.json"
    spec_json = json.dumps(spec.__dict__, indent=2, default=list)
    if meta_path.is_file() and (root / "synthetic.json").is_file() and (root / "synthetic.json").read_text() == spec_json:
        return meta_path
    jobs = []
    for split, cats, kinds, n in (("train", spec.train_categories, spec.train_defects, spec.n_per_category),
                                  ("test", spec.test_categories, spec.test_defects, spec.n_test_per_category)):
        for cat in cats:
            jobs += [(split, cat, kind, i) for i, kind in enumerate(_plan(n, kinds))]
            jobs += [("good", cat, None, n + i) for i in range(spec.n_train_good)]
    it = jobs
    if progress:
        from tqdm import tqdm

        it = tqdm(jobs, desc="synthetic data", unit="img")
    meta: dict[str, dict[str, list]] = {"train": {}, "test": {}}
    for split, cat, kind, i in it:
        s = make_sample(cat, kind, spec.seed, i, spec.size)
        folder = "train/good" if split == "good" else f"test/{kind or 'good'}"
        rel = f"{cat}/{folder}/{i:04d}.png"
        with atomic_path(root / rel) as tmp:
            Image.fromarray(s.image).save(tmp, format="PNG")
        mask_rel = ""
        if kind is not None:
            mask_rel = f"{cat}/ground_truth/{kind}/{i:04d}_mask.png"
            with atomic_path(root / mask_rel) as tmp:
                Image.fromarray(s.mask.astype(np.uint8) * 255).save(tmp, format="PNG")
        if split == "good":
            continue
        rec = dict(zip(SCHEMA_KEYS, (rel, mask_rel, cat, kind or "good", int(kind is not None))))
        meta[split].setdefault(cat, []).append(rec)
    write_text_atomic(meta_path, json.dumps(meta, indent=1))
    write_text_atomic(root / "synthetic.json", spec_json)
    return meta_path
