"""Bad input (DESIGN §7): every kind is handled correctly or becomes a one-line per-image error
naming the file, and the batch goes on (exit code 1)."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
from conftest import random_image
from PIL import Image
from test_runtime import tiny_export  # noqa: F401 - the shared export (session fixture)

from agvas.cli import main
from agvas.imageio import ImageError, load_image


def _jpeg_bytes(img, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=92, **kw)
    return buf.getvalue()


def _png_bytes(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def build_corpus(d) -> dict[str, str | None]:
    """File name -> expected error fragment (None: must be inspected)."""
    d.mkdir(parents=True, exist_ok=True)
    rgb = random_image(11, 96, 80)
    exp: dict[str, str | None] = {}

    def put(name, data, err):
        (d / name).write_bytes(data)
        exp[name] = err

    put("a_good.png", _png_bytes(rgb), None)
    put("not_an_image.png", b"this is a text file, not a PNG\n" * 4, "not an image")
    put("zero_bytes.jpg", b"", "empty file (0 bytes)")
    put("truncated.jpg", _jpeg_bytes(rgb)[:600], "truncated or corrupt")
    put("truncated.png", _png_bytes(random_image(12, 120, 90))[:900], "truncated or corrupt")
    g16 = (np.arange(80 * 96).reshape(80, 96) * 8).astype(np.uint16)
    put("gray16.png", _png_bytes(Image.fromarray(g16)), None)
    put("gray.png", _png_bytes(rgb.convert("L")), None)
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgb.size))
    put("rgba.png", _png_bytes(rgba), None)
    put("cmyk.jpg", _jpeg_bytes(rgb.convert("CMYK")), None)
    put("palette.png", _png_bytes(rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)), None)
    pal_t = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal_t.info["transparency"] = 0
    put("palette_transparent.png", _png_bytes(pal_t), None)
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated by 90°: 96x80 stored -> 80x96 shown
    put("exif_rotated.jpg", _jpeg_bytes(rgb, exif=exif), None)
    put("one_pixel.png", _png_bytes(Image.new("RGB", (1, 1), (9, 9, 9))), "too small")
    put("huge_20000x20000.png", _png_bytes(Image.new("1", (20000, 20000))), "pixels")
    put("z_good_after_bad.jpg", _jpeg_bytes(random_image(13, 64, 64)), None)
    (d / "folder.png").mkdir(exist_ok=True)
    exp["folder.png"] = "is a directory"
    os.symlink(d / "gone.png", d / "dangling.png")
    exp["dangling.png"] = "file not found"
    os.mkfifo(d / "fifo.png")
    exp["fifo.png"] = "not a regular file"
    exp["missing.png"] = "file not found"
    if os.geteuid() != 0:  # root reads anything
        (d / "no_permission.png").write_bytes(_png_bytes(rgb))
        (d / "no_permission.png").chmod(0)
        exp["no_permission.png"] = "Permission denied"
    return exp


def test_corpus_through_agvas_inspect(tiny_export, tmp_path):  # noqa: F811
    corpus = tmp_path / "corpus"
    exp = build_corpus(corpus)
    listing = tmp_path / "images.txt"
    listing.write_text("# every kind of bad input\n" + "\n".join(f"corpus/{n}" for n in sorted(exp)) + "\n")
    out = tmp_path / "out"
    rc = main(["inspect", str(listing), "--engines", str(tiny_export), "--out", str(out), "--batch", "3",
               "--threads", "2", "--max-pixels", "50000000"])
    assert rc == 1  # some images failed, the others were inspected
    recs = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert [r["path"] for r in recs] == [str(corpus / n) for n in sorted(exp)]  # every input once, in order
    for r in recs:
        name = os.path.basename(r["path"])
        if exp[name] is None:
            assert r["status"] == "ok", r
            mask = Image.open(out / r["mask"])
            shown = load_image(r["path"])
            assert mask.size == shown.size == (r["width"], r["height"])
            assert Image.open(out / r["overlay"]).size == shown.size
        else:
            assert r["status"] == "error", r
            assert exp[name] in r["error"] and r["path"] in r["error"], r["error"]
            assert "\n" not in r["error"]
    sizes = {os.path.basename(r["path"]): (r.get("width"), r.get("height")) for r in recs}
    assert sizes["exif_rotated.jpg"] == (80, 96)
    summary = json.loads((out / "summary.json").read_text())
    n_err = sum(v is not None for v in exp.values())
    assert summary["counts"]["failed"] == n_err and summary["counts"]["ok"] == len(exp) - n_err
    assert len(list((out / "masks").iterdir())) == len(exp) - n_err


def test_load_image_conversions(tmp_path):
    # 16-bit grayscale is scaled by its range, not clipped
    g16 = np.full((16, 16), 65535, np.uint16)
    g16[:8] = 32768
    p = tmp_path / "g16.png"
    Image.fromarray(g16).save(p)
    a = np.asarray(load_image(p))
    assert a.shape == (16, 16, 3) and a[0, 0, 0] == 128 and a[15, 0, 0] == 255
    # RGBA is composited on black (the same for the reference and the runtime)
    rgba = Image.new("RGBA", (16, 16), (200, 100, 50, 128))
    assert np.asarray(load_image(rgba))[0, 0].tolist() == [100, 50, 25]
    # CMYK, palette -> RGB; EXIF orientation applied
    assert load_image(Image.new("CMYK", (16, 16), (0, 0, 0, 0))).mode == "RGB"
    assert load_image(Image.new("P", (16, 16))).mode == "RGB"
    exif = Image.Exif()
    exif[0x0112] = 8
    Image.new("RGB", (40, 20)).save(tmp_path / "r.jpg", exif=exif)
    assert load_image(tmp_path / "r.jpg").size == (20, 40)


def test_load_image_errors_name_the_file(tmp_path):
    p = tmp_path / "big.png"
    Image.new("1", (2000, 1000)).save(p)
    with pytest.raises(ImageError, match=r"big.png: 2000x1000 = 2000000 pixels exceeds the limit of 1000000"):
        load_image(p, max_pixels=1_000_000)
    with pytest.raises(ImageError, match=r"nothere.png: file not found"):
        load_image(tmp_path / "nothere.png")
    (tmp_path / "x.jpg").write_bytes(b"")
    with pytest.raises(ImageError, match=r"x.jpg: empty file \(0 bytes\)"):
        load_image(tmp_path / "x.jpg")


def test_extreme_aspect_ratio_is_a_clear_error(tiny_export):  # noqa: F811
    from agvas.runtime import Inspector

    with pytest.raises(ValueError, match="aspect ratio too extreme"):
        Inspector(tiny_export, threads=1).inspect(Image.new("RGB", (4000, 8), (90, 90, 90)))
