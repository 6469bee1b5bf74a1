"""Robust image loading shared by the reference, training and the runtime (torch-free).

Every decodable image becomes an 8-bit RGB ``PIL.Image`` in its display orientation:
EXIF rotation applied; grayscale, palette, CMYK, RGBA (composited on black), 16-bit and
float images converted. Anything else raises :class:`ImageError` naming the file.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 100_000_000  # refuse decompression bombs beyond this many pixels
MIN_SIDE = 8  # smaller images carry nothing to inspect


class ImageError(ValueError):
    """An input image that cannot be used; the message names the file and the reason."""


def to_rgb(im: Image.Image, name: str = "<image>") -> Image.Image:
    """Convert any PIL mode to 8-bit RGB (16-bit and float are scaled by their range)."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if im.mode.startswith("I;16") or (im.mode == "I" and a.max() > 255) else 255.0
        if im.mode == "F":
            lo_, hi_ = float(np.nanmin(a)), float(np.nanmax(a))
            a = (a - lo_) / (hi_ - lo_) * 255.0 if hi_ > lo_ else np.zeros_like(a)
            hi = 255.0
        a = np.clip(np.round(a * (255.0 / hi)), 0, 255).astype(np.uint8)
        im = Image.fromarray(a, mode="L")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (0, 0, 0, 255))
        im = Image.alpha_composite(bg, im)
    if im.mode != "RGB":
        im = im.convert("RGB")
    return im


def load_image(src, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open ``src`` (path, bytes file or PIL image) as an oriented 8-bit RGB image."""
    name = str(src) if isinstance(src, (str, os.PathLike)) else getattr(src, "filename", "<image>") or "<image>"
    if isinstance(src, Image.Image):
        im = src
    else:
        p = Path(src) if isinstance(src, (str, os.PathLike)) else None
        if p is not None:
            if not p.exists():
                raise ImageError(f"{name}: file not found")
            if p.is_dir():
                raise ImageError(f"{name}: is a directory, expected an image file")
            if not p.is_file():  # a FIFO or device would block or never end
                raise ImageError(f"{name}: not a regular file, expected an image file")
            if p.stat().st_size == 0:
                raise ImageError(f"{name}: empty file (0 bytes)")
        try:
            im = Image.open(src)
        except Image.DecompressionBombError as e:
            raise ImageError(f"{name}: {e}") from None
        except UnidentifiedImageError:
            raise ImageError(f"{name}: not an image (PIL cannot identify the format)") from None
        except OSError as e:  # errno set: the file system (permissions, I/O); else PIL's decoder
            what = "cannot open" if e.errno is not None else "truncated or corrupt image data"
            raise ImageError(f"{name}: {what}: {e}") from None
    w, h = im.size
    if w * h > max_pixels:
        raise ImageError(f"{name}: {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels} pixels")
    if min(w, h) < MIN_SIDE:
        raise ImageError(f"{name}: {w}x{h} is too small (each side must be at least {MIN_SIDE} pixels)")
    try:
        im.load()
        im = ImageOps.exif_transpose(im)
        return to_rgb(im, name)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"{name}: truncated or corrupt image data: {e}") from None
