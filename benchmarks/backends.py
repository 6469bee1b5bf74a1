"""The back-ends `agvas bench` compares, behind one small interface.

A back-end is loaded once in its own worker process (:mod:`agvas.benchmarks.worker`) and then runs
*variants* — fast path on/off, batch 1/N, vision tokens anyres/base — on the same images:

- :class:`EagerBackend`: the PyTorch reference (:class:`agvas.train.reference.ReferencePipeline`)
  in fp32, in bf16 (``model.to(torch.bfloat16)``: the strong CPU baseline) or under bf16
  ``torch.autocast`` (re-casts the fp32 weights at every op: slower, measured for the record).
  Stage times come from forward hooks on the model's own modules (no copy of the pipeline).
- :class:`RuntimeBackend`: the torch-free runtime (``runtime.Inspector``) over an export directory.
- :class:`GenAIPeer`: onnxruntime-genai's own model (its builder on the same Qwen2 weights), LLM
  only: time to first token and ms/token at our prompt length.

Every ``run`` returns one :class:`Sample` per call (one image, or one batch of images).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# The per-stage names of the bench JSON, in pipeline order.
STAGES = ("preprocess", "vision", "sam_encoder", "spam", "prefill", "decode", "agmd", "postprocess")


@dataclass(frozen=True)
class Variant:
    fast_path: bool = False
    batch: int = 1
    vision_tokens: str = "anyres"

    @property
    def key(self) -> str:
        return f"{'fast' if self.fast_path else 'loop'}-b{self.batch}-{self.vision_tokens}"

    @classmethod
    def from_key(cls, key: str) -> "Variant":
        fp, b, vt = key.split("-")
        return cls(fp == "fast", int(b[1:]), vt)


@dataclass
class Output:
    """What agreement is computed on (one image)."""

    mask: np.ndarray
    verdict: bool
    anchor_states: np.ndarray | None
    text: str
    prob: np.ndarray | None = None  # P at the original size, for accuracy metrics


@dataclass
class Sample:
    stages_ms: dict[str, float]
    e2e_ms: float
    images: int = 1
    ttft_ms: float | None = None
    decode_ms_per_token: float | None = None
    tokens: int | None = None
    prompt_tokens: int | None = None
    fast_path_outcome: str | None = None  # runtime: "off" | "hit" | "fallback@j"
    outputs: list[Output] = field(default_factory=list)


class _Timer:
    """Forward hooks accumulating wall time per named module (and call counts)."""

    def __init__(self) -> None:
        self.ms: dict[str, list[float]] = {}
        self._t0: dict[int, float] = {}
        self.handles: list[Any] = []

    def watch(self, name: str, module) -> None:
        def pre(mod, args, kwargs):
            self._t0[id(mod)] = time.perf_counter()

        def post(mod, args, kwargs, out):
            self.ms.setdefault(name, []).append((time.perf_counter() - self._t0.pop(id(mod))) * 1e3)

        self.handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        self.handles.append(module.register_forward_hook(post, with_kwargs=True))

    def reset(self) -> None:
        self.ms.clear()

    def total(self, name: str) -> float:
        return float(sum(self.ms.get(name, [])))


class EagerBackend:
    """The PyTorch reference in ``dtype`` = "fp32" | "bf16" | "autocast" (bf16 autocast over fp32 weights)."""

    backend = "pytorch-eager"

    def __init__(self, checkpoint: str | Path, dtype: str = "fp32", threads: int = 2) -> None:
        import torch

        from agvas.train.reference import ReferencePipeline, prompt_ids
        from agvas.train.templates import canonical_instruction

        if dtype not in ("fp32", "bf16", "autocast"):
            raise ValueError(f"eager dtype must be fp32, bf16 or autocast, got {dtype!r}")
        torch.set_num_threads(threads)
        self.dtype = dtype
        self.precision = {"fp32": "fp32", "bf16": "bf16", "autocast": "bf16-autocast"}[dtype]
        self.pipe = ReferencePipeline.from_checkpoint(checkpoint)
        m = self.pipe.model
        self.text_tokens = len(prompt_ids(self.pipe.tokenizer, m, canonical_instruction("direct"), 0))
        if dtype == "bf16":
            m.to(torch.bfloat16)
            # SAM's encoder takes the fp32 SAM tensor as is (SigLIP casts its own input)
            m.pixel_encoder.register_forward_pre_hook(lambda mod, args: (args[0].to(torch.bfloat16),))
            # SAM's random-Fourier positional encoding builds fp32 coordinates: keep its matrix fp32
            m.agmd.pe_layer.float()
            m.agmd.pe_layer.register_forward_hook(lambda mod, args, out: out.to(torch.bfloat16))
        if dtype != "fp32":
            # maps, thresholds and numpy conversions stay fp32 as in the reference
            m.agmd.register_forward_hook(lambda mod, args, out: out.float())
        self.timer = _Timer()
        lm = m.llava.model
        for name, mod in (("siglip", lm.vision_tower), ("projector", lm.multi_modal_projector),
                          ("sam_encoder", m.pixel_encoder), ("spam", m.spam), ("llm", m.language_model),
                          ("lm_head", m.lm_head), ("refiner", m.refiner), ("agmd", m.agmd)):
            self.timer.watch(name, mod)

    def variants(self, wanted: list[Variant]) -> list[Variant]:
        return [v for v in wanted if not v.fast_path and v.batch == 1]

    def run(self, variant: Variant, images: list[str]) -> list[Sample]:
        import contextlib

        import torch

        out = []
        for path in images:
            self.timer.reset()
            ctx = torch.autocast("cpu", dtype=torch.bfloat16) if self.dtype == "autocast" else contextlib.nullcontext()
            t0 = time.perf_counter()
            with ctx:
                r = self.pipe(path, mode="direct", vision_tokens=variant.vision_tokens)
            e2e = (time.perf_counter() - t0) * 1e3
            tm = self.timer
            llm_calls, head_calls = tm.ms.get("llm", []), tm.ms.get("lm_head", [])
            prefill = (llm_calls[0] if llm_calls else 0.0) + (head_calls[0] if head_calls else 0.0)
            decode = r.timings_ms["llm"] - prefill
            n_steps = max(len(llm_calls) - 1, 0)
            sam, spam = tm.total("sam_encoder"), tm.total("spam")
            agmd = tm.total("refiner") + tm.total("agmd")
            stages = {
                "preprocess": r.timings_ms["preprocess"],
                "vision": r.timings_ms["encode"] - sam - spam,
                "sam_encoder": sam, "spam": spam, "prefill": prefill, "decode": decode, "agmd": agmd,
                "postprocess": r.timings_ms["decode_mask"] - agmd,
            }
            a = None if r.anchor_states is None else r.anchor_states.float().numpy()
            out.append(Sample(
                stages_ms=stages, e2e_ms=e2e, ttft_ms=r.timings_ms["preprocess"] + r.timings_ms["encode"] + prefill,
                decode_ms_per_token=decode / n_steps if n_steps else None, tokens=len(r.tokens),
                prompt_tokens=self.text_tokens + r.n_visual, outputs=[Output(r.mask, r.verdict, a, r.text, r.prob)],
            ))
        return out


class GenAIPeer:
    """onnxruntime-genai's own model for the same Qwen2 weights (its builder, ``precision`` int4 or
    fp32, CPU): time to first token at ``prompt_tokens`` and ms per generated token."""

    backend = "onnxruntime-genai"

    def __init__(self, model_dir: str | Path, precision: str, threads: int = 2) -> None:
        import onnxruntime_genai as og

        self.og = og
        self.precision = precision
        self.vocab = int(json.loads((Path(model_dir) / "genai_config.json").read_text())["model"]["vocab_size"])
        cfg = og.Config(str(model_dir))
        cfg.clear_providers()  # CPU
        cfg.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
        self.model = og.Model(cfg)

    def run_llm(self, prompt_tokens: int, new_tokens: int, seed: int = 0) -> Sample:
        """Greedy generation of ``new_tokens`` after a ``prompt_tokens`` prompt of fixed random ids."""
        og = self.og
        ids = np.random.default_rng(seed).integers(0, min(self.vocab, 1000), size=prompt_tokens).astype(np.int32)
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=prompt_tokens + new_tokens, min_length=prompt_tokens + new_tokens,
                                  do_sample=False)
        gen = og.Generator(self.model, params)
        t0 = time.perf_counter()
        gen.append_tokens(ids)
        gen.generate_next_token()  # the first token: prefill done and sampled
        ttft = (time.perf_counter() - t0) * 1e3
        steps = 0
        t1 = time.perf_counter()
        while not gen.is_done() and steps < new_tokens - 1:
            gen.generate_next_token()
            steps += 1
        decode = (time.perf_counter() - t1) * 1e3
        return Sample(stages_ms={"prefill": ttft, "decode": decode}, e2e_ms=ttft + decode, ttft_ms=ttft,
                      decode_ms_per_token=decode / steps if steps else None, tokens=steps + 1,
                      prompt_tokens=prompt_tokens)


class RuntimeBackend:
    """The torch-free runtime (``runtime.Inspector``) over an export directory. Variants switch the
    inspector's ``fast_path`` / ``vision_tokens`` on the one loaded set of engines (same process,
    same sessions), so A/B pairs share everything but the switch."""

    backend = "runtime-ort"

    def __init__(self, export_dir: str | Path, provider: str = "cpu", threads: int = 2,
                 label: str | None = None, engine_files: dict[str, str] | None = None) -> None:
        from agvas.runtime import Inspector

        self.label = label
        self.insp = Inspector(export_dir, provider=provider, mode="direct", threads=threads,
                              engine_files=engine_files or None)
        self.supported = list(self.insp.manifest.data["vision_tokens"]["supported"])
        self.engine_precisions = {k: v.get("precision") for k, v in self.insp.manifest.data["engines"].items()}
        self.n_text = len(self.insp.pre_ids) + len(self.insp.post_ids)

    def _set(self, v: Variant) -> None:
        if v.vision_tokens not in self.supported:
            raise ValueError(f"the export supports vision tokens {self.supported}, not {v.vision_tokens!r}")
        self.insp.fast_path = v.fast_path
        self.insp.vision_tokens = v.vision_tokens

    def _sample(self, r, e2e_ms: float, images: int = 1) -> Sample:
        t = r.timings_ms
        stages = {k: t[k] for k in STAGES if k in t}
        n_steps = len(r.tokens) - 1 if r.fast_path == "off" else 0
        prompt = self.n_text + r.n_visual
        return Sample(stages_ms=stages, e2e_ms=e2e_ms, images=images,
                      ttft_ms=sum(t[k] for k in ("preprocess", "vision", "sam_encoder", "spam", "prefill")),
                      decode_ms_per_token=t["decode"] / n_steps if n_steps > 0 else None, tokens=len(r.tokens),
                      prompt_tokens=prompt, fast_path_outcome=r.fast_path,
                      outputs=[Output(r.mask, r.verdict, r.anchor_states, r.text, r.prob)])

    def run(self, variant: Variant, images: list[str]) -> list[Sample]:
        self._set(variant)
        if variant.batch == 1:
            out = []
            for path in images:
                t0 = time.perf_counter()
                r = self.insp.inspect(path)
                out.append(self._sample(r, (time.perf_counter() - t0) * 1e3))
            return out
        t0 = time.perf_counter()
        rs = self.insp.inspect_batch(images, batch_size=variant.batch)
        wall = (time.perf_counter() - t0) * 1e3
        per = [self._sample(r, wall) for r in rs]
        stages = {k: float(np.mean([p.stages_ms[k] for p in per])) for k in per[0].stages_ms}
        outcomes = sorted({p.fast_path_outcome for p in per})
        return [Sample(stages_ms=stages, e2e_ms=wall, images=len(rs), tokens=per[0].tokens,
                       prompt_tokens=per[0].prompt_tokens, fast_path_outcome=",".join(outcomes),
                       outputs=[o for p in per for o in p.outputs])]
