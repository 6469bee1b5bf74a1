"""``Inspector``: images -> masks and verdicts with the exported engines only (no torch).

Stages per image (DESIGN §4)::

    load + preprocess  (agvas.imageio, agvas.runtime.preprocess)       "preprocess"
    vision engine + anyres packing                               "vision"
    sam_encoder engine                                           "sam_encoder"
    spam engine -> visual tokens concat(f_s, f_align)            "spam"
    prompt embeddings, LLM prefill                               "prefill"
    greedy decode / fast-path verification                       "decode"
    agmd engine (refiner + AGMD + fusion)                        "agmd"
    upsample to the original size, threshold, verdict            "postprocess"

``timings_ms`` holds those keys plus the reference's aggregates ``encode`` (vision +
sam_encoder + spam), ``llm`` (prefill + decode), ``decode_mask`` (agmd + postprocess) and
``total`` (the sum of the stages). In a batched prefill each image is charged its share.

``Result`` carries the attribute names of ``agvas.train.reference.ReferenceResult`` so that
evaluation code takes either.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from PIL import Image

from agvas.imageio import DEFAULT_MAX_PIXELS, load_image
from agvas.export.manifest import Manifest, load_manifest

from .engines import Engines, release_memory
from .generate import Generation, forced_answer, greedy
from .packing import pack_features
from .postprocess import decide, upsample_maps
from .preprocess import SamParams, SiglipParams, sam_input, siglip_crops
from .prompt import Prompt, embed_prompt, normalize_mode

log = logging.getLogger(__name__)

STAGES = ("preprocess", "vision", "sam_encoder", "spam", "prefill", "decode", "agmd", "postprocess")
AGGREGATES = {"encode": ("vision", "sam_encoder", "spam"), "llm": ("prefill", "decode"),
              "decode_mask": ("agmd", "postprocess")}


@dataclass
class Result:
    """``p_seg`` / ``p_ano`` at the original size are diagnostics: computed on first access."""

    text: str
    tokens: list[int]
    anchors_found: bool
    anchor_states: np.ndarray | None  # [3, H] in NOR, ANO, SEG order
    prob: np.ndarray  # P at the original size, float32 [H, W]
    low_res: np.ndarray  # low-res P [4h, 4w]
    mask: np.ndarray  # bool [H, W]
    verdict: bool  # anomalous
    n_visual: int
    timings_ms: dict[str, float] = field(default_factory=dict)
    # extras
    area_px: int = 0
    area_pct: float = 0.0
    max_score: float = 0.0
    fast_path: str = "off"
    image: Image.Image | None = field(default=None, repr=False)  # the oriented RGB image inspected
    low_maps: np.ndarray | None = field(default=None, repr=False)  # low-res [P, P_seg, P_ano]
    geometry: tuple | None = field(default=None, repr=False)  # (input_size, original_size, img_size)

    @property
    def p_seg(self) -> np.ndarray:
        return self._full(1)

    @property
    def p_ano(self) -> np.ndarray:
        return self._full(2)

    def _full(self, i: int) -> np.ndarray:
        if self.low_maps is None:
            return np.zeros_like(self.prob)
        cache = self.__dict__.setdefault("_maps", {})
        if i not in cache:
            cache[i] = upsample_maps(self.low_maps[i:i + 1], *self.geometry)[0]
        return cache[i]


@dataclass
class _Encoded:
    image: Image.Image
    visual: np.ndarray  # [2N, H]
    pixel_embedding: np.ndarray  # [1, C, h, w]
    input_size: tuple[int, int]
    timings: dict[str, float]


class Inspector:
    """``Inspector(export_dir, provider="cpu", mode="direct")``; ``.inspect(image)``,
    ``.inspect_batch(images, batch_size=8)``, ``.stream(images, batch_size)``.

    - ``engine_files``: override engine files by name, e.g. ``{"llm": "llm_int4.onnx"}``
      (relative to ``export_dir`` or absolute); IO names must match the manifest.
    - ``fast_path``: the forced-answer fast path in Direct mode (on by default).
    - ``verify``: engine file check at load — "bytes" (sizes; default), "sha256" (hashes every
      file: seconds for an ov-0.5b export), "none".
    - ``threads`` (default: all cores) and ``spin`` (ONNX Runtime workers spin-wait; off: on a
      shared machine spinning costs far more than it saves).
    - ``arena``: ONNX Runtime's CPU memory arena (off by default: with it every session keeps
      and grows its peak activation buffers — ov-0.5b 9.5 GB instead of 4.8 GB, same speed).
    - ``batch_llm``: images of equal visual length in one ``stream`` chunk share one batched LLM
      pass (``True``) or run row by row (``False``); ``None`` (default): batched on GPU providers,
      rows on the CPU. ``True`` on the CPU runs the GPU's batched code path (same results).
    - ``profile_dir``: ONNX Runtime's profiler per engine (``engines.end_profiling()`` writes the
      traces; ``python -m agvas.benchmarks.profile`` runs and summarises it).
    - ``strict``: a batched LLM pass that raises is re-raised instead of being retried image by
      image. Without it the retry isolates a failing image, but it is counted
      (``batch_retries``), logged as a warning and reported in ``agvas inspect``'s summary: on
      valid input it means a bug in the batched path. ``batched_llm_passes`` / ``batched_llm_rows``
      count the passes that ran with more than one row.
    """

    def __init__(self, export_dir: str | os.PathLike, provider: str = "cpu", mode: str = "direct", *,
                 normal_sentence: str | None = None, vision_tokens: str | None = None, threads: int | None = None,
                 fast_path: bool = True, threshold: float | None = None, min_area: int = 0,
                 max_new_tokens: int | None = None, engine_files: dict | None = None, verify: str = "bytes",
                 max_pixels: int = DEFAULT_MAX_PIXELS, spin: bool = False, arena: bool = False,
                 batch_llm: bool | None = None, strict: bool = False,
                 calib_dir: str | os.PathLike | None = None, profile_dir: str | os.PathLike | None = None) -> None:
        self.manifest: Manifest = load_manifest(export_dir, verify=verify)
        m = self.manifest.data
        self.mode = normalize_mode(mode)
        self.normal_sentence = normal_sentence
        vt = m["vision_tokens"]
        self.vision_tokens = vision_tokens or vt["default"]
        if self.vision_tokens not in vt["supported"]:
            raise ValueError(f"--vision-tokens {self.vision_tokens!r}: the export {export_dir} supports "
                             f"{vt['supported']}")
        self.engines = Engines(self.manifest, provider, threads, engine_files, spin, arena, batch_llm=batch_llm,
                               calib_dir=calib_dir, profile_dir=profile_dir)
        self.prompt = Prompt(m["prompt"], Path(export_dir) / "tokenizer")
        self.pre_ids, self.post_ids = self.prompt.split_ids(self.mode, normal_sentence)  # validates the mode now
        self.siglip = SiglipParams.from_manifest(m["preprocessing"]["siglip"])
        self.sam = SamParams.from_manifest(m["preprocessing"]["sam"])
        self.sam_grid = int(m["preprocessing"]["sam"]["grid"])
        tid = m["token_ids"]
        self.anchors = tuple(int(a) for a in tid["anchors"])
        self.eos = int(tid["eos"])
        if self.prompt.eos_id != self.eos or self.prompt.image_id != int(tid["image"]):
            raise ValueError(f"{export_dir}: tokenizer ids (image {self.prompt.image_id}, eos {self.prompt.eos_id}) "
                             f"differ from the manifest's token_ids (image {tid['image']}, eos {tid['eos']})")
        self.answer = self.prompt.answer_ids()
        self.fast_path = fast_path and self.mode == "direct"
        self.threshold = float(m["postprocess"]["threshold"] if threshold is None else threshold)
        self.min_area = int(min_area)
        self.max_new_tokens = int(max_new_tokens or m["config"].get("max_new_tokens", 64))
        self.max_pixels = max_pixels
        self.strict = bool(strict)
        self.batch_retries = 0  # batched LLM passes that raised and were retried image by image
        self.batched_llm_passes = self.batched_llm_rows = 0  # LLM passes over more than one row, and their rows

    # ---- stages -------------------------------------------------------------------------------
    def _load(self, image) -> Image.Image:
        if isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        return load_image(image, max_pixels=self.max_pixels)

    def encode(self, image) -> _Encoded:
        """Load, preprocess, vision + packing, SAM encoder, SPAM -> the 2N visual tokens."""
        e = self.engines
        t: dict[str, float] = {}
        c = time.perf_counter()
        img = self._load(image)
        crops = siglip_crops(img, self.siglip, base_only=self.vision_tokens == "base")
        x_sam, input_size = sam_input(img, self.sam)
        t["preprocess"], c = _lap(c)
        feats = e.vision.run(pixel_values=crops)["image_features"]
        f_s = pack_features(feats, (img.height, img.width), e.image_newline, self.siglip, self.vision_tokens)[None]
        t["vision"], c = _lap(c)
        pix = e.sam_encoder.run(sam_input=x_sam)["pixel_embedding"]
        t["sam_encoder"], c = _lap(c)
        f_align = e.spam.run(semantic_tokens=f_s, pixel_embedding=pix)["f_align"]
        visual = np.concatenate([f_s, f_align], axis=1)[0]
        t["spam"], c = _lap(c)
        return _Encoded(img, visual, pix, input_size, t)

    def generate(self, batch: list[_Encoded]) -> list[Generation]:
        """Prefill + decode for encodings of equal visual length: one batched LLM pass when
        ``engines.batch_llm`` (GPU providers by default, or ``batch_llm=True``); otherwise one row
        after the other (the CPU default; the same results: ONNX Runtime's CPU GroupQueryAttention
        gains nothing from a batch, and a long batched prefill was measured many times slower than
        the rows one by one at ov-0.5b dims). Equal visual lengths make equal prompt lengths (the
        text around the image is the same for every row), so a batch is never padded."""
        if len(batch) > 1 and not self.engines.batch_llm:
            return [g for b in batch for g in self.generate([b])]
        e = self.engines
        if len({b.visual.shape for b in batch}) > 1:  # the prompt around them is the same for every row
            raise ValueError(f"one LLM batch needs equal visual lengths, got {[b.visual.shape[0] for b in batch]}")
        visual = np.stack([b.visual for b in batch])
        if len(batch) > 1:
            self.batched_llm_passes += 1
            self.batched_llm_rows += len(batch)
        embeds = embed_prompt(e.embed_tokens, self.pre_ids, visual, self.post_ids)
        if self.fast_path:
            return forced_answer(e.llm, e.lm_head, e.embed_tokens, embeds, self.answer, self.anchors, self.eos,
                                 self.max_new_tokens, time.perf_counter)
        return greedy(e.llm, e.embed_tokens, embeds, self.anchors, self.eos, self.max_new_tokens, time.perf_counter)

    def finish(self, enc: _Encoded, gen: Generation) -> Result:
        """AGMD on the anchor states, maps at the original size, mask and verdict."""
        t = dict(enc.timings)
        t.update(gen.timings)
        c = time.perf_counter()
        h, w = enc.image.height, enc.image.width
        found = all(a in gen.states for a in self.anchors)
        geometry = (enc.input_size, (h, w), self.sam.img_size)
        if found:
            states = np.stack([gen.states[a] for a in self.anchors])
            out = self.engines.agmd.run(anchor_states=states[None], pixel_embedding=enc.pixel_embedding)
            low = np.stack([out["prob"][0], out["p_seg"][0], out["p_ano"][0]])
            t["agmd"], c = _lap(c)
            prob = upsample_maps(low[:1], *geometry)[0]
        else:
            states = low = None
            t["agmd"], c = _lap(c)
            prob = np.zeros((h, w), np.float32)
        g = self.sam_grid * 4
        low_res = low[0] if low is not None else np.zeros((g, g), np.float32)
        v = decide(prob, self.threshold, self.min_area)
        t["postprocess"], c = _lap(c)
        ms = {k: t[k] * 1000.0 for k in STAGES}
        ms.update({k: sum(ms[s] for s in parts) for k, parts in AGGREGATES.items()})
        ms["total"] = sum(ms[s] for s in STAGES)
        return Result(text=self.prompt.decode(gen.tokens), tokens=gen.tokens, anchors_found=found,
                      anchor_states=states, prob=prob, low_res=low_res, mask=v.mask, verdict=v.anomalous,
                      n_visual=int(enc.visual.shape[0]), timings_ms=ms, area_px=v.area_px, area_pct=v.area_pct,
                      max_score=v.max_score, fast_path=gen.fast_path, image=enc.image, low_maps=low,
                      geometry=geometry)

    # ---- public API -----------------------------------------------------------------------------
    def inspect(self, image) -> Result:
        """One image (path, file object, PIL image or HxWx3 uint8 array) -> :class:`Result`."""
        enc = self.encode(image)
        try:
            return self.finish(enc, self.generate([enc])[0])
        finally:
            release_memory()  # the stages' freed buffers (KV cache, activations) back to the system

    def inspect_batch(self, images: Iterable, batch_size: int = 8) -> list[Result]:
        """Several images; raises the first per-image error (use :meth:`stream` to go on past it)."""
        out = []
        for _, r in self.stream(images, batch_size):
            if isinstance(r, BaseException):
                raise r
            out.append(r)
        return out

    def stream(self, images: Iterable, batch_size: int = 1, overlap: bool = True
               ) -> Iterator[tuple[int, Result | Exception]]:
        """Yield ``(index, Result or the exception)`` in input order.

        Up to ``batch_size`` consecutive images with equal visual-token counts share one LLM
        prefill (no padding needed). With ``overlap`` a worker thread loads and encodes the next
        images (preprocess, vision, SAM encoder, SPAM) while this thread runs the LLM, AGMD and
        postprocessing of the current ones; ONNX Runtime releases the GIL while it computes."""
        batch_size = max(1, int(batch_size))
        pool = ThreadPoolExecutor(1, thread_name_prefix="agvas-encode") if overlap else None
        pending: deque = deque()
        source = enumerate(images)

        def fill(n: int) -> None:
            while len(pending) < n:
                nxt = next(source, None)
                if nxt is None:
                    return
                i, img = nxt
                pending.append((i, pool.submit(self.encode, img) if pool else img))

        def take(job) -> _Encoded | Exception:
            try:
                return job.result() if pool else self.encode(job)
            except Exception as e:  # noqa: BLE001 - a per-image error; the batch goes on
                return e

        try:
            fill(2 * batch_size)
            while pending:
                chunk = [(i, take(job)) for i, job in (pending.popleft() for _ in range(min(batch_size, len(pending))))]
                fill(2 * batch_size)  # the worker encodes ahead while the LLM runs below
                results = dict(self._run_chunk(chunk))
                release_memory()
                for i, _ in chunk:
                    yield i, results[i]
        finally:
            if pool:
                pool.shutdown(wait=True, cancel_futures=True)

    def _run_chunk(self, chunk: list) -> Iterator[tuple[int, Result | Exception]]:
        """LLM + finish for a chunk of encodings, batching runs of equal visual length."""
        run: list = []
        for i, enc in chunk + [(None, None)]:
            if run and (enc is None or isinstance(enc, Exception) or enc.visual.shape != run[0][1].visual.shape):
                yield from self._run_group(run)
                run = []
            if isinstance(enc, Exception):
                yield i, enc
            elif enc is not None:
                run.append((i, enc))

    def _run_group(self, group: list) -> Iterator[tuple[int, Result | Exception]]:
        try:
            gens = self.generate([enc for _, enc in group])
        except Exception as e:  # noqa: BLE001
            if len(group) == 1:
                yield group[0][0], e
                return
            # isolate the failing image; count it and say so, so that a batch-path bug does not pass unseen
            if self.strict:
                raise
            self.batch_retries += 1
            log.warning("batched LLM pass over %d images failed (%s: %s); retrying them one by one "
                        "(retry %d of this run)", len(group), type(e).__name__, e, self.batch_retries)
            alone = [r for g in group for r in self._run_group([g])]
            if not any(isinstance(r, Exception) for _, r in alone):
                log.error("every image of that batch succeeded alone: the batched LLM path failed on valid input "
                          "(a bug; rerun with strict=True / batch_llm=False to investigate)")
            yield from alone
            return
        for (i, enc), gen in zip(group, gens):
            try:
                yield i, self.finish(enc, gen)
            except Exception as e:  # noqa: BLE001
                yield i, e


def _lap(c: float) -> tuple[float, float]:
    now = time.perf_counter()
    return now - c, now
