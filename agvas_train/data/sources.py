"""Training sources. Each turns its items into :class:`Example` s (image, mask, instruction,
answer, which mask channels are supervised):

- :class:`AnomalySource` — labelled anomaly data from a ``meta.json`` (Anomaly-Seg: direct
  segmentation; Anomaly-Instruct: describe / describe-plus / explain from the generated fields);
  supervises [SEG], [NOR] and [ANO];
- :class:`GeneralSegSource` — general segmentation (image + binary mask + target phrase, e.g.
  ADE20K / COCO-Stuff / refCOCO converted to a JSON list); supervises [SEG] only;
- :class:`VQASource` — LLaVA-style conversation JSON (LLaVA-Instruct-150k, WebAD): the whole
  conversation, every assistant turn supervised; text loss only.

Native readers of the paper's general-segmentation datasets live in ``refer.py`` (refCOCO,
refCOCO+, refCOCOg, refCLEF) and ``semseg.py`` (ADE20K, COCO-Stuff, PASCAL-Part, PACO-LVIS,
PartImageNet). A source draws its own items with ``sample(rng)`` (uniform over its items by
default); :class:`SubDatasets` draws a sub-dataset first, uniformly or by weight, as LISA does.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from agvas.imageio import load_image

from .instruct import conversation, describe, general_conversation
from .meta import Record, load_mask, read_meta

SEG_ALL = (True, True, True)  # supervised mask channels in NOR, ANO, SEG order
SEG_ONLY = (False, False, True)
SEG_NONE = (False, False, False)


@dataclass
class Example:
    image: Image.Image  # RGB
    mask: np.ndarray  # bool [H, W] (all False for normal images / text-only samples)
    instruction: str
    answer: str  # without the EOS token
    supervise: tuple[bool, bool, bool]  # mask loss for NOR, ANO, SEG
    more_turns: tuple[tuple[str, str], ...] = field(default=())  # later (instruction, answer) turns

    @property
    def turns(self) -> list[tuple[str, str]]:
        """Every (instruction, answer) turn; the first one carries the image."""
        return [(self.instruction, self.answer), *self.more_turns]


def augment(image: Image.Image, mask: np.ndarray, rng: random.Random,
            geometric: bool = True, strong: bool = False) -> tuple[Image.Image, np.ndarray]:
    """Flips and 90° rotations (image and mask alike; skipped when not ``geometric``, e.g. for
    referring phrases such as "the left man"), then photometric jitter: grayscale with
    p = 0.25 (many line cameras are monochrome) and a random gain/offset with p = 0.5.
    ``strong`` first adds, each with p = 0.5, a random zoom (a crop of 60-100 % of each side,
    resized back: image bilinear, mask nearest) and a random permutation of the colour channels,
    so that "normal" is not one scale and one palette per texture."""
    if strong:
        image, mask = _zoom_and_permute(image, mask, rng)
    k, flip = (rng.randrange(4), rng.random() < 0.5) if geometric else (0, False)
    arr = np.rot90(np.asarray(image), k)
    m = np.rot90(mask, k)
    if flip:
        arr, m = arr[:, ::-1], m[:, ::-1]
    if rng.random() < 0.25:
        arr = np.repeat(arr.astype(np.float32) @ np.array([[0.299], [0.587], [0.114]], np.float32), 3, axis=2)
    if rng.random() < 0.5:
        arr = arr.astype(np.float32) * rng.uniform(0.7, 1.3) + rng.uniform(-25.0, 25.0)
    arr = np.clip(arr, 0, 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(arr)), np.ascontiguousarray(m)


def _zoom_and_permute(image: Image.Image, mask: np.ndarray, rng: random.Random) -> tuple[Image.Image, np.ndarray]:
    w, h = image.size
    if rng.random() < 0.5:
        cw, ch = max(1, round(w * rng.uniform(0.6, 1.0))), max(1, round(h * rng.uniform(0.6, 1.0)))
        x0, y0 = rng.randrange(w - cw + 1), rng.randrange(h - ch + 1)
        box = (x0, y0, x0 + cw, y0 + ch)
        image = image.crop(box).resize((w, h), Image.BILINEAR)
        m = Image.fromarray(mask.astype(np.uint8) * 255).crop(box).resize((w, h), Image.NEAREST)
        mask = np.asarray(m) > 127
    if rng.random() < 0.5:
        order = [0, 1, 2]
        while order == [0, 1, 2]:
            rng.shuffle(order)
        image = Image.fromarray(np.ascontiguousarray(np.asarray(image.convert("RGB"))[..., order]))
    return image, mask


class AnomalySource:
    """Labelled anomaly images; ``modes`` maps inference mode -> probability (direct only is
    the paper's Anomaly-Seg; describe/describe_plus/explain is Anomaly-Instruct)."""

    def __init__(self, records: list[Record], modes: dict[str, float], augment: bool = True,
                 normal_share: float | None = None, strong_augment: bool = False) -> None:
        if not records:
            raise ValueError("anomaly source has no records")
        self.records = records
        self.modes = list(modes)
        self.weights = [modes[m] for m in self.modes]
        self.augment = augment
        self.strong_augment = strong_augment  # augment(strong=True): zoom and colour-channel permutation too
        # normal_share: draw a normal image with this probability (else an anomalous one), instead
        # of uniformly over the records (None: uniform; the split's own share)
        self.normal_share = normal_share
        if normal_share is not None:
            if not 0.0 <= normal_share <= 1.0:
                raise ValueError(f"normal share {normal_share} is not within [0, 1]")
            self._normal = [i for i, r in enumerate(records) if not r.anomaly]
            self._anomalous = [i for i, r in enumerate(records) if r.anomaly]
            if (normal_share > 0 and not self._normal) or (normal_share < 1 and not self._anomalous):
                raise ValueError(f"normal share {normal_share}: the records have {len(self._normal)} normal and "
                                 f"{len(self._anomalous)} anomalous images")

    @classmethod
    def from_meta(cls, path: str | Path, split: str, modes: dict[str, float], **kw) -> "AnomalySource":
        return cls(read_meta(path, split), modes, **kw)

    def __len__(self) -> int:
        return len(self.records)

    def sample(self, rng: random.Random) -> Example:
        """Uniform over the records (what ``draw`` does for any source), or by ``normal_share``."""
        if self.normal_share is None:
            return self.example(rng.randrange(len(self.records)), rng)
        pool = self._normal if rng.random() < self.normal_share else self._anomalous
        return self.example(pool[rng.randrange(len(pool))], rng)

    def example(self, i: int, rng: random.Random) -> Example:
        rec = self.records[i]
        image = load_image(rec.image)
        mask = load_mask(rec, (image.height, image.width))
        if self.augment:
            image, mask = augment(image, mask, rng, strong=self.strong_augment)
        mode = rng.choices(self.modes, self.weights)[0]
        fields = None if mode == "direct" else describe(np.asarray(image), mask, rec.category, rec.specie)
        instruction, answer = conversation(fields, mode, rng)
        return Example(image, mask, instruction, answer, SEG_ALL)


# scikit-image's bundled photographs (offline, no download): generic scenes and objects, none of
# them industrial or medical, used as extra *normal* images (PhotoNormalSource)
PHOTO_NORMALS = ("astronaut", "camera", "chelsea", "coffee", "coins", "rocket", "clock")


class PhotoNormalSource:
    """Normal images that are not parts: random square crops (25-100 % of the short side) of
    scikit-image's bundled photographs, resized to ``size``, with empty masks and the direct
    answer, all mask channels supervised (as a normal Anomaly-Seg image). A model that has only
    seen the training categories' normal textures reads any unfamiliar structure (a gland, a
    through-hole) as a defect; these teach it that structure alone is not an anomaly."""

    def __init__(self, names: tuple[str, ...] = PHOTO_NORMALS, size: int = 128, augment: bool = True,
                 strong_augment: bool = False) -> None:
        import skimage.data

        self.names = tuple(names)
        self.images = [Image.fromarray(getattr(skimage.data, n)()).convert("RGB") for n in self.names]
        self.size, self.augment, self.strong_augment = size, augment, strong_augment

    def __len__(self) -> int:
        return len(self.images)

    def example(self, i: int, rng: random.Random) -> Example:
        im = self.images[i]
        w, h = im.size
        side = max(1, int(min(w, h) * rng.uniform(0.25, 1.0)))
        x0, y0 = rng.randrange(w - side + 1), rng.randrange(h - side + 1)
        image = im.crop((x0, y0, x0 + side, y0 + side)).resize((self.size, self.size), Image.BILINEAR)
        mask = np.zeros((self.size, self.size), bool)
        if self.augment:
            image, mask = augment(image, mask, rng, strong=self.strong_augment)
        instruction, answer = conversation(None, "direct", rng)
        return Example(image, mask, instruction, answer, SEG_ALL)


class GeneralSegSource:
    """General segmentation: a JSON list of ``{"image", "mask", "phrase"}`` (paths relative to
    the JSON file). The answer is a direct-segmentation template; only [SEG] is supervised."""

    def __init__(self, path: str | Path, augment: bool = True) -> None:
        self.path = Path(path)
        items = _read_json_list(self.path)
        for i, it in enumerate(items):
            if not isinstance(it, dict) or not all(k in it for k in ("image", "mask", "phrase")):
                raise ValueError(f"{self.path}[{i}]: expected {{'image', 'mask', 'phrase'}}, got {it!r:.80}")
        self.items = items
        self.augment = augment

    def __len__(self) -> int:
        return len(self.items)

    def example(self, i: int, rng: random.Random) -> Example:
        it = self.items[i]
        image = load_image(self.path.parent / it["image"])
        rec = Record(self.path.parent / it["image"], self.path.parent / it["mask"], "", "", True)
        mask = load_mask(rec, (image.height, image.width))
        if self.augment:
            image, mask = augment(image, mask, rng)
        phrase = rng.choice(it["phrase"]) if isinstance(it["phrase"], list) else it["phrase"]
        instruction, answer = general_conversation(phrase, rng)
        return Example(image, mask, instruction, answer, SEG_ONLY)


class VQASource:
    """LLaVA-style conversations ``[{"image", "conversations": [{"from": "human"|"gpt", "value"}]}]``
    (LLaVA-Instruct-150k, WebAD): an example is the whole conversation — every human -> gpt
    turn, in order, each assistant answer supervised; ``<image>`` tags are removed (the prompt
    carries the one image in its first turn); text loss only."""

    def __init__(self, path: str | Path, image_root: str | Path | None = None) -> None:
        self.path = Path(path)
        self.root = Path(image_root) if image_root else self.path.parent
        self.items = []
        for i, it in enumerate(_read_json_list(self.path)):
            conv = it.get("conversations") if isinstance(it, dict) else None
            if not it.get("image") or not isinstance(conv, list) or len(conv) < 2:
                raise ValueError(f"{self.path}[{i}]: expected {{'image', 'conversations': [human, gpt, ...]}}")
            turns, j = [], 0
            while j + 1 < len(conv):
                if conv[j].get("from") == "human" and conv[j + 1].get("from") == "gpt":
                    q = str(conv[j]["value"]).replace("<image>", "").strip()
                    turns.append((q, str(conv[j + 1]["value"]).strip()))
                    j += 2
                else:
                    j += 1
            if not turns:
                raise ValueError(f"{self.path}[{i}]: no human -> gpt turn pair")
            self.items.append((it["image"], tuple(turns)))

    def __len__(self) -> int:
        return len(self.items)

    def example(self, i: int, rng: random.Random) -> Example:
        image_rel, turns = self.items[i]
        image = load_image(self.root / image_rel)
        (q, a), *more = turns
        return Example(image, np.zeros((image.height, image.width), bool), q, a, SEG_NONE, tuple(more))


def segment_example(image: Image.Image, mask: np.ndarray, phrase: str, rng: random.Random,
                    augment_: bool = True, geometric: bool = True) -> Example:
    """A general-segmentation :class:`Example`: "segment ``phrase``", [SEG] supervised."""
    if augment_:
        image, mask = augment(image, mask, rng, geometric)
    instruction, answer = general_conversation(phrase, rng)
    return Example(image, mask, instruction, answer, SEG_ONLY)


class SubDatasets:
    """Several sources of one kind as one (``SubDatasets({"ade20k": src, ...}, weights)``):
    ``sample`` picks a sub-dataset uniformly (or by ``weights``, name -> weight), then an item
    in it — not in proportion to the sub-datasets' sizes (LISA's sampling)."""

    def __init__(self, parts: dict[str, object], weights: dict[str, float] | None = None) -> None:
        if not parts:
            raise ValueError("no sub-datasets")
        weights = weights or {}
        unknown = sorted(set(weights) - set(parts))
        if unknown:
            raise ValueError(f"weights for unknown sub-datasets {unknown}; known: {sorted(parts)}")
        self.names = list(parts)
        self.parts = [parts[n] for n in self.names]
        self.weights = [float(weights.get(n, 1.0)) for n in self.names]
        if any(w < 0 for w in self.weights) or not any(w > 0 for w in self.weights):
            raise ValueError(f"sub-dataset weights must be >= 0 with one positive, got {weights}")

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)

    def example(self, i: int, rng: random.Random) -> Example:
        for p in self.parts:
            if i < len(p):
                return p.example(i, rng)
            i -= len(p)
        raise IndexError(i)

    def sample(self, rng: random.Random) -> Example:
        part = self.parts[0] if len(self.parts) == 1 else rng.choices(self.parts, self.weights)[0]
        return draw(part, rng)

    def describe(self) -> str:
        total = sum(self.weights)
        return ", ".join(f"{n} {w / total:.2f}" for n, w in zip(self.names, self.weights))


def draw(source, rng: random.Random) -> Example:
    """One example from ``source``: its own ``sample(rng)`` or a uniform item."""
    if hasattr(source, "sample"):
        return source.sample(rng)
    return source.example(rng.randrange(len(source)), rng)


def read_json(path: Path, expected: str = "a JSON file"):
    """The parsed JSON at ``path``; one-line errors naming the file and what was expected."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found (expected {expected})")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def _read_json_list(path: Path) -> list:
    data = read_json(path, "a JSON list")
    if not isinstance(data, list) or not data:
        raise ValueError(f"{path}: expected a non-empty JSON list")
    return data
