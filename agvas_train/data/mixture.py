"""The mixture sampler and the collation of examples into model batches.

The sampler is a pure function of ``(seed, sample index)``: the k-th training sample is the
same whatever happened before, so a resumed run sees exactly the data an uninterrupted run
would (bit-compatible ``--resume``). Paper mix (appendix B.2): general segmentation 0.4,
Anomaly-Instruct 0.25, Anomaly-Seg (direct) 0.25, VQA 0.1.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..preprocess import sam_preprocess
from ..reference import followup_text, prompt_ids, prompt_text, text_ids
from .sources import Example, draw

PAPER_MIX = {"general": 0.4, "instruct": 0.25, "seg": 0.25, "vqa": 0.1}
IGNORE = -100


class Mixture:
    """``Mixture({"seg": (source, 0.25), ...}, seed)``; ``mixture.example(k)`` is sample k."""

    def __init__(self, sources: dict[str, tuple[object, float]], seed: int = 0) -> None:
        live = {n: (s, float(p)) for n, (s, p) in sources.items() if p > 0}
        if not live:
            raise ValueError("the training mixture has no source with a positive probability")
        for n, (s, _) in live.items():
            if len(s) == 0:
                raise ValueError(f"training source {n!r} is empty")
        self.names = list(live)
        self.sources = [live[n][0] for n in self.names]
        total = sum(p for _, p in live.values())
        self.probs = [live[n][1] / total for n in self.names]
        self.seed = seed

    def example(self, k: int) -> tuple[str, Example]:
        rng = random.Random(f"{self.seed}:{k}")
        j = rng.choices(range(len(self.sources)), self.probs)[0]
        return self.names[j], draw(self.sources[j], rng)  # the source's own sample(rng), else a uniform item

    def describe(self) -> str:
        def one(n, s, p):
            sub = s.describe() if hasattr(s, "describe") and len(getattr(s, "parts", ())) > 1 else ""
            return f"{n} {p:.2f} ({len(s)} items{': ' + sub if sub else ''})"

        return ", ".join(one(n, s, p) for n, s, p in zip(self.names, self.sources, self.probs))


@dataclass
class Batch:
    """Examples of one image size (equal visual token counts), ready for the model."""

    pixel_values: torch.Tensor
    image_sizes: torch.Tensor
    sam_input: torch.Tensor  # [B,3,S,S]
    input_size: tuple[int, int]  # SAM resize (h, w) before padding
    input_ids: torch.Tensor  # [B,T] right-padded
    attention_mask: torch.Tensor  # [B,T]
    labels: torch.Tensor  # [B,T]; IGNORE outside the answer (+EOS)
    masks: torch.Tensor  # float [B,h,w] at input_size
    supervise: torch.Tensor  # bool [B,3] (NOR, ANO, SEG)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def collate(examples: list[Example], model, tokenizer, image_processor) -> list[Batch]:
    """Group ``examples`` by image size and build one :class:`Batch` per size."""
    groups: dict[tuple[int, int], list[Example]] = {}
    for ex in examples:
        groups.setdefault(ex.image.size, []).append(ex)
    return [_batch(g, model, tokenizer, image_processor) for g in groups.values()]


def _batch(examples: list[Example], model, tokenizer, image_processor) -> Batch:
    cfg = model.cfg
    images = [ex.image for ex in examples]
    proc = image_processor(images=images, return_tensors="pt")
    sams, input_size = zip(*(sam_preprocess(im, cfg) for im in images))
    seqs, labels = [], []
    for ex in examples:
        full, lab = example_ids(ex, model, tokenizer)
        seqs.append(full)
        labels.append(lab)
    t = max(len(s) for s in seqs)
    pad = model.ids.pad
    ids = torch.tensor([s + [pad] * (t - len(s)) for s in seqs])
    att = torch.tensor([[1] * len(s) + [0] * (t - len(s)) for s in seqs])
    lab = torch.tensor([lb + [IGNORE] * (t - len(lb)) for lb in labels])
    h, w = input_size[0]
    masks = torch.from_numpy(np.stack([
        np.asarray(Image.fromarray(ex.mask.astype(np.uint8) * 255).resize((w, h), Image.NEAREST)) > 127
        for ex in examples])).float()
    return Batch(proc["pixel_values"], proc["image_sizes"], torch.cat(sams), (h, w), ids, att, lab, masks,
                 torch.tensor([ex.supervise for ex in examples]))


def example_ids(ex: Example, model, tokenizer) -> tuple[list[int], list[int]]:
    """(ids, labels) of one example with one image placeholder (``expand_visual`` widens it to
    2N once f_s is known). Labels are IGNORE except each assistant answer and its EOS; a
    multi-turn example continues the chat, the image only in its first user turn."""
    eos = model.cfg.eos_token
    missing = [a for a, sup in zip(model.cfg.anchor_tokens, ex.supervise) if sup and a not in ex.answer]
    if missing:  # the mask loss of a channel reads its anchor's hidden state
        raise ValueError(f"answer {ex.answer!r} lacks the anchor {''.join(missing)} of a mask-supervised channel")
    if not ex.more_turns:
        prompt = prompt_ids(tokenizer, model, ex.instruction, 1)
        full = prompt_ids(tokenizer, model, ex.instruction, 1, answer=ex.answer + eos)
        if full[:len(prompt)] != prompt:
            raise ValueError(f"answer {ex.answer!r} changes the prompt's tokenization")
        return full, [IGNORE] * len(prompt) + full[len(prompt):]
    text, spans = prompt_text(model.cfg, ex.instruction), []
    for t, (instruction, answer) in enumerate(ex.turns):
        if t:
            text += followup_text(model.cfg, instruction)
        start = text
        text += answer + eos
        spans.append((start, text))
    full = text_ids(tokenizer, model, text, 1)
    lab = [IGNORE] * len(full)
    for start, end in spans:
        a, b = (text_ids(tokenizer, model, x, 1) for x in (start, end))
        if full[:len(b)] != b or b[:len(a)] != a:
            raise ValueError(f"a turn of {ex.instruction!r} changes the conversation's tokenization")
        lab[len(a):len(b)] = full[len(a):len(b)]
    return full, lab


def expand_visual(batch: Batch, n_visual: int, image_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, attention mask, labels) with the single image placeholder widened to ``n_visual``
    positions (the system/user prefix is shared, so the placeholder sits at one column)."""
    cols = (batch.input_ids == image_id).nonzero()
    if cols.shape[0] != len(batch) or not bool((cols[:, 1] == cols[0, 1]).all()):
        raise ValueError("each prompt must hold exactly one image placeholder at the same position")
    i = int(cols[0, 1])

    def widen(x: torch.Tensor, fill: int) -> torch.Tensor:
        mid = torch.full((x.shape[0], n_visual), fill, dtype=x.dtype)
        return torch.cat([x[:, :i], mid, x[:, i + 1:]], dim=1)

    return widen(batch.input_ids, image_id), widen(batch.attention_mask, 1), widen(batch.labels, IGNORE)
