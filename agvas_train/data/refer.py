"""Referring segmentation in the REFER layout (refCOCO, refCOCO+, refCOCOg, refCLEF).

On disk (github.com/lichengunc/refer)::

    ROOT/refcoco/refs(unc).p        pickle: [{ref_id, ann_id, image_id, split, sentences: [{sent, ...}], ...}]
    ROOT/refcoco/instances.json     COCO format: images, annotations (polygons or RLE), categories
    ROOT/refcoco+/refs(unc).p   ROOT/refcocog/refs(umd).p (or refs(google).p)
    ROOT/refclef/refs(unc).p (or refs(berkeley).p)
    images: COCO train2014 (refcoco*), saiapr_tc-12 (refclef), by default under ROOT/images/ as
    REFER and LISA keep them (``mscoco/images/train2014``, ``saiapr_tc-12``).

Only the ``train`` split is read. Sampling follows LISA: an image with train refs uniformly,
then one of its (ref, sentence) pairs; the sample is the image, that ref's mask and the
sentence as the phrase. No flips or rotations ("the left man"): photometric jitter only.
The ``.p`` files are pickles — read only files you trust, as with any REFER tooling.
"""

from __future__ import annotations

import pickle
import random
from pathlib import Path

from agvas.imageio import load_image

from .coco import ann_mask, first_dir, first_file, read_coco
from .sources import Example, segment_example

REFER_DATASETS = ("refcoco", "refcoco+", "refcocog", "refclef")
SPLIT_BY = {"refcoco": ("unc", "google"), "refcoco+": ("unc",), "refcocog": ("umd", "google"),
            "refclef": ("unc", "berkeley")}


def image_dirs(name: str, root: Path) -> list[Path]:
    """Default image folders of ``name`` (REFER's own layout first)."""
    if name == "refclef":
        return [root / "images" / "saiapr_tc-12", root / "saiapr_tc-12", root.parent / "saiapr_tc-12"]
    return [root / "images" / "mscoco" / "images" / "train2014", root / "images" / "train2014",
            root / "train2014", root.parent / "train2014", root.parent / "coco" / "train2014"]


class ReferSource:
    """``ReferSource("refcocog", ROOT)``: ROOT holds ``refcocog/`` (or is that folder itself)."""

    def __init__(self, name: str, root: str | Path, images: str | Path | None = None, augment: bool = True) -> None:
        if name not in SPLIT_BY:
            raise ValueError(f"unknown referring dataset {name!r}; expected one of {list(REFER_DATASETS)}")
        root = Path(root)
        base, data = (root, root / name) if (root / name).is_dir() else (root.parent, root)
        refs_path = first_file([data / f"refs({s}).p" for s in SPLIT_BY[name]], f"{name} refs")
        self.name, self.augment = name, augment
        self.image_dir = first_dir([images] if images else image_dirs(name, base), f"{name} images")
        try:
            with open(refs_path, "rb") as f:
                refs = pickle.load(f)
        except Exception as e:  # a truncated or foreign pickle
            raise ValueError(f"{refs_path}: not a REFER refs pickle ({e})") from None
        if not isinstance(refs, list):
            raise ValueError(f"{refs_path}: expected a pickled list of refs")
        inst_path = data / "instances.json"
        inst = read_coco(inst_path)
        self.images = {im["id"]: im for im in inst["images"]}
        self.anns = {a["id"]: a for a in inst["annotations"]}
        per_image: dict[int, list[tuple[str, int]]] = {}
        for r in refs:
            if not isinstance(r, dict) or not {"ann_id", "image_id", "split", "sentences"} <= set(r):
                raise ValueError(f"{refs_path}: expected refs with ann_id, image_id, split, sentences; got {r!r:.80}")
            if r["split"] != "train":
                continue
            if r["ann_id"] not in self.anns or r["image_id"] not in self.images:
                raise ValueError(f"{inst_path}: ref {r.get('ref_id')} names ann {r['ann_id']} / image "
                                 f"{r['image_id']} that the file lacks")
            for s in r["sentences"]:
                text = str(s.get("sent") or s.get("raw") or "").strip() if isinstance(s, dict) else str(s).strip()
                if text:
                    per_image.setdefault(r["image_id"], []).append((text, r["ann_id"]))
        if not per_image:
            raise ValueError(f"{refs_path}: no train-split ref with a sentence")
        self.items = sorted(per_image.items())  # [(image_id, [(sentence, ann_id), ...])]

    def __len__(self) -> int:
        return len(self.items)

    def sample(self, rng: random.Random) -> Example:
        return self.example(rng.randrange(len(self.items)), rng)

    def example(self, i: int, rng: random.Random) -> Example:
        image_id, pairs = self.items[i]
        sentence, ann_id = rng.choice(pairs)
        info = self.images[image_id]
        image = load_image(self.image_dir / info["file_name"])
        h, w = int(info.get("height") or image.height), int(info.get("width") or image.width)
        mask = ann_mask(self.anns[ann_id].get("segmentation"), h, w)
        if mask.shape != (image.height, image.width):
            raise ValueError(f"{self.image_dir / info['file_name']}: image is {image.width}x{image.height}, "
                             f"its annotation {w}x{h}")
        return segment_example(image, mask, sentence, rng, self.augment, geometric=False)
