"""Semantic and part segmentation datasets of LISA's mix, read in their own on-disk layouts.

Label maps (:class:`LabelMapSource`)::

    ade20k      ROOT = ADEChallengeData2016 (or its parent): images/training/*.jpg,
                annotations/training/*.png; value v in 1..150 is ADE20K_CLASSES[v-1], 0 ignored
    cocostuff   ROOT holds stuffthingmaps_trainval2017/train2017/*.png (values 0..181, 255 =
                unlabeled; hyphenated "-other"/"-stuff" classes ignored as LISA does) and the
                COCO train2017/*.jpg images (ROOT/train2017, ROOT/../coco/train2017 or --images)

COCO-format part annotations (:class:`PartSource`), categories named ``object:part``
(PASCAL-Part, PACO-LVIS) or ``Object Part`` with supercategory ``Object`` (PartImageNet)::

    pascal_part   ROOT/train.json, images ROOT/VOCdevkit/VOC2010/JPEGImages
    paco_lvis     ROOT/annotations/paco_lvis_v1_train.json, images: COCO root (file_name is
                  train2017/...): ROOT, ROOT/.., ROOT/../coco
    partimagenet  ROOT/train.json (or annotations/train.json, annotations/train/train.json),
                  images ROOT/images/train (flat or in synset folders)

Sampling as LISA: an image uniformly, then a class present in it uniformly; phrase = the class
name ("the wheel of the car" or "car wheel" for parts), mask = that class's pixels.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np
from PIL import Image

from agvas.imageio import load_image

from .classes import ADE20K_CLASSES, COCOSTUFF_CLASSES
from .coco import ann_mask, first_dir, first_file, read_coco
from .sources import Example, segment_example

LABEL_DATASETS = ("ade20k", "cocostuff")
PART_DATASETS = ("pascal_part", "paco_lvis", "partimagenet")
SEMSEG_DATASETS = LABEL_DATASETS + PART_DATASETS
TRIES = 20  # images without any usable class are skipped (deterministically, from the same rng)


def _has(d: Path, pattern: str) -> bool:
    return d.is_dir() and next(d.glob(pattern), None) is not None


class LabelMapSource:
    """ADE20K or COCO-Stuff label maps: ``LabelMapSource("ade20k", ROOT)``."""

    def __init__(self, name: str, root: str | Path, images: str | Path | None = None, augment: bool = True) -> None:
        root = Path(root)
        self.name, self.augment = name, augment
        if name == "ade20k":
            data = root if (root / "images" / "training").is_dir() else root / "ADEChallengeData2016"
            img_dir = Path(images) if images else data / "images" / "training"
            lab_dir = data / "annotations" / "training"
            self.classes = {v: ADE20K_CLASSES[v - 1] for v in range(1, 151)}
        elif name == "cocostuff":
            lab_dir = next((d for d in (root / "stuffthingmaps_trainval2017" / "train2017", root / "train2017", root)
                            if _has(d, "*.png")), root / "stuffthingmaps_trainval2017" / "train2017")
            img_dir = first_dir([images] if images else [d for d in (
                root / "train2017", root / "images" / "train2017", root.parent / "coco" / "train2017",
                root.parent / "train2017") if _has(d, "*.jpg")] or [root / "train2017"], "cocostuff")
            self.classes = {v: c for v, c in enumerate(COCOSTUFF_CLASSES) if "-" not in c}
        else:
            raise ValueError(f"unknown label-map dataset {name!r}; expected one of {list(LABEL_DATASETS)}")
        if not lab_dir.is_dir():
            raise FileNotFoundError(f"{lab_dir}: {name} label folder not found (expected *.png label maps)")
        labels = {p.stem: p for p in lab_dir.glob("*.png")}
        self.items = [(p, labels[p.stem]) for p in sorted(img_dir.glob("*.jpg")) if p.stem in labels]
        if not self.items:
            raise ValueError(f"{img_dir}: no *.jpg image with a label map in {lab_dir}")

    def __len__(self) -> int:
        return len(self.items)

    def sample(self, rng: random.Random) -> Example:
        return self.example(rng.randrange(len(self.items)), rng)

    def example(self, i: int, rng: random.Random) -> Example:
        for _ in range(TRIES):
            img_path, lab_path = self.items[i]
            label = np.asarray(Image.open(lab_path))
            if label.ndim != 2:
                raise ValueError(f"{lab_path}: expected a single-channel label map, got shape {label.shape}")
            present = [v for v in np.unique(label).tolist() if v in self.classes]
            if present:
                v = rng.choice(present)
                image = load_image(img_path)
                if label.shape != (image.height, image.width):
                    raise ValueError(f"{lab_path}: label map is {label.shape[::-1]}, image {image.size}")
                return segment_example(image, label == v, self.classes[v], rng, self.augment)
            i = rng.randrange(len(self.items))
        raise ValueError(f"{self.name}: {TRIES} images in a row without a usable class (last: {lab_path})")


def _clean(name: str) -> str:
    """'trash_can_(bin)' -> 'trash can'."""
    return " ".join(re.sub(r"_\(.*?\)", "", name).replace("_", " ").lower().split())


def part_name(cat: dict) -> str | tuple[str, str]:
    """(object, part) for a part category, the plain name otherwise."""
    name, sup = str(cat.get("name", "")), str(cat.get("supercategory") or "")
    if ":" in name:
        obj, part = name.split(":", 1)
        return _clean(obj), _clean(part)
    if sup and name.lower().startswith(sup.lower() + " "):  # PartImageNet "Quadruped Head"
        return _clean(sup), _clean(name[len(sup) + 1:])
    return _clean(name)


class PartSource:
    """COCO-format part segmentation: ``PartSource("paco_lvis", ROOT)`` (ROOT may be the JSON)."""

    JSONS = {"pascal_part": ("train.json",),
             "paco_lvis": ("annotations/paco_lvis_v1_train.json", "paco_lvis_v1_train.json"),
             "partimagenet": ("train.json", "annotations/train.json", "annotations/train/train.json")}

    def __init__(self, name: str, root: str | Path, images: str | Path | None = None, augment: bool = True) -> None:
        if name not in self.JSONS:
            raise ValueError(f"unknown part dataset {name!r}; expected one of {list(PART_DATASETS)}")
        root = Path(root)
        path = root if root.is_file() else first_file([root / j for j in self.JSONS[name]], f"{name} annotations")
        base = root.parent if root.is_file() else root
        self.name, self.augment = name, augment
        data = read_coco(path)
        self.cats = {c["id"]: part_name(c) for c in data["categories"]}
        infos = {im["id"]: im for im in data["images"]}
        per_image: dict[int, list[dict]] = {}
        for a in data["annotations"]:
            if a.get("segmentation") and a.get("category_id") in self.cats and a.get("image_id") in infos:
                per_image.setdefault(a["image_id"], []).append(a)
        if not per_image:
            raise ValueError(f"{path}: no annotation with a segmentation")
        self.items = [(infos[k], per_image[k]) for k in sorted(per_image)]
        self.dirs = [Path(images)] if images else self._image_dirs(base)
        first = self.items[0][0]["file_name"]
        if self._find(first) is None:
            raise FileNotFoundError(f"{name} images: {first} not found under {', '.join(map(str, self.dirs))}")

    def _image_dirs(self, base: Path) -> list[Path]:
        if self.name == "pascal_part":
            return [base / "VOCdevkit" / "VOC2010" / "JPEGImages", base / "JPEGImages", base / "images", base]
        if self.name == "paco_lvis":
            return [base, base.parent, base.parent / "coco", base.parent.parent / "coco"]
        return [base / "images" / "train", base / "train", base / "images", base]

    def _find(self, file_name: str) -> Path | None:
        for d in self.dirs:
            for p in (d / file_name, d / file_name.split("_")[0] / file_name):
                if p.is_file():
                    return p
        return None

    def __len__(self) -> int:
        return len(self.items)

    def sample(self, rng: random.Random) -> Example:
        return self.example(rng.randrange(len(self.items)), rng)

    def example(self, i: int, rng: random.Random) -> Example:
        info, anns = self.items[i]
        cat = rng.choice(sorted({a["category_id"] for a in anns}))
        path = self._find(info["file_name"])
        if path is None:
            raise FileNotFoundError(f"{self.name} image {info['file_name']}: not found under {self.dirs[0]}")
        image = load_image(path)
        mask = np.zeros((image.height, image.width), bool)
        for a in anns:
            if a["category_id"] == cat:
                m = ann_mask(a["segmentation"], image.height, image.width)
                mask |= m
        name = self.cats[cat]
        if isinstance(name, tuple):
            obj, part = name
            name = f"{obj} {part}" if rng.random() < 0.5 else f"the {part} of the {obj}"
        return segment_example(image, mask, name, rng, self.augment)


def semseg_source(name: str, root, images=None, augment: bool = True):
    if name in LABEL_DATASETS:
        return LabelMapSource(name, root, images, augment)
    if name in PART_DATASETS:
        return PartSource(name, root, images, augment)
    raise ValueError(f"unknown semantic segmentation dataset {name!r}; expected one of {list(SEMSEG_DATASETS)}")
