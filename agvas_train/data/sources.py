"""Training sources. Each turns its items into :class:`Example` s (image, mask, instruction,
answer, which mask channels are supervised):

- :class:`AnomalySource` — labelled anomaly data from a ``meta.json`` (Anomaly-Seg: direct
  segmentation; Anomaly-Instruct: describe / describe-plus / explain from the generated fields);
  supervises [SEG], [NOR] and [ANO];
- :class:`GeneralSegSource` — general segmentation (image + binary mask + target phrase, e.g.
  ADE20K / COCO-Stuff / refCOCO converted to a JSON list); supervises [SEG] only;
- :class:`VQASource` — LLaVA-style conversation JSON; text loss only.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
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


def augment(image: Image.Image, mask: np.ndarray, rng: random.Random) -> tuple[Image.Image, np.ndarray]:
    """Flips and 90° rotations (image and mask alike), then photometric jitter: grayscale with
    p = 0.25 (many line cameras are monochrome) and a random gain/offset with p = 0.5."""
    k = rng.randrange(4)
    flip = rng.random() < 0.5
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


class AnomalySource:
    """Labelled anomaly images; ``modes`` maps inference mode -> probability (direct only is
    the paper's Anomaly-Seg; describe/describe_plus/explain is Anomaly-Instruct)."""

    def __init__(self, records: list[Record], modes: dict[str, float], augment: bool = True) -> None:
        if not records:
            raise ValueError("anomaly source has no records")
        self.records = records
        self.modes = list(modes)
        self.weights = [modes[m] for m in self.modes]
        self.augment = augment

    @classmethod
    def from_meta(cls, path: str | Path, split: str, modes: dict[str, float], **kw) -> "AnomalySource":
        return cls(read_meta(path, split), modes, **kw)

    def __len__(self) -> int:
        return len(self.records)

    def example(self, i: int, rng: random.Random) -> Example:
        rec = self.records[i]
        image = load_image(rec.image)
        mask = load_mask(rec, (image.height, image.width))
        if self.augment:
            image, mask = augment(image, mask, rng)
        mode = rng.choices(self.modes, self.weights)[0]
        fields = None if mode == "direct" else describe(np.asarray(image), mask, rec.category, rec.specie)
        instruction, answer = conversation(fields, mode, rng)
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
    """LLaVA-style conversations ``[{"image", "conversations": [{"from": "human"|"gpt", "value"}]}]``;
    one human/gpt turn pair per example (the ``<image>`` tag removed); text loss only."""

    def __init__(self, path: str | Path, image_root: str | Path | None = None) -> None:
        self.path = Path(path)
        self.root = Path(image_root) if image_root else self.path.parent
        self.items = []
        for i, it in enumerate(_read_json_list(self.path)):
            conv = it.get("conversations") if isinstance(it, dict) else None
            if not it.get("image") or not isinstance(conv, list) or len(conv) < 2:
                raise ValueError(f"{self.path}[{i}]: expected {{'image', 'conversations': [human, gpt, ...]}}")
            pairs = [(conv[j]["value"], conv[j + 1]["value"]) for j in range(0, len(conv) - 1, 2)
                     if conv[j].get("from") == "human" and conv[j + 1].get("from") == "gpt"]
            if not pairs:
                raise ValueError(f"{self.path}[{i}]: no human -> gpt turn pair")
            self.items.append((it["image"], pairs))

    def __len__(self) -> int:
        return len(self.items)

    def example(self, i: int, rng: random.Random) -> Example:
        image_rel, pairs = self.items[i]
        image = load_image(self.root / image_rel)
        q, a = rng.choice(pairs)
        q = q.replace("<image>", "").strip()
        return Example(image, np.zeros((image.height, image.width), bool), q, a.strip(), SEG_NONE)


def _read_json_list(path: Path) -> list:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, list) or not data:
        raise ValueError(f"{path}: expected a non-empty JSON list")
    return data
