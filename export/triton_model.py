"""The Triton Python-backend model ``agvas`` (copied to ``REPO/agvas/1/model.py`` by
``agvas export --target triton``; Triton imports it, nothing else does).

One request carries one encoded image file (``image``: BYTES [1]) and gets ``mask`` (uint8 0/1,
[H, W] at the image's size), ``prob`` (float32 [H, W]), ``verdict``, ``area_px``, ``max_score``
and ``text``; a bad image is an error response for that request only.

The orchestration is the runtime's own: a ``runtime.Inspector`` (preprocessing, anyres packing,
prompt assembly, the forced-answer fast path and the greedy decode loop with the KV cache, anchor
capture, AGMD, postprocessing) whose engines are the repository's engine models, called through
BLS (``pb_utils.InferenceRequest(...).exec()``). The requests Triton hands one ``execute`` go
through ``Inspector.stream``: images of one size share an LLM prefill. The KV cache travels
through this process between decode steps (in Direct mode the fast path needs one prefill and
one ``lm_head`` call, no decode steps). The Triton image's Python needs the agvas-edge package
installed (its torch-free part runs here: numpy, pillow, tokenizers, onnx); see the README.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from agvas.export.manifest import Manifest, load_manifest
from agvas.runtime.engines import LLM
from agvas.runtime.inspector import Inspector

CPU = pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0)  # BLS outputs as numpy


class BLSEngine:
    """An engine model behind the call shape of ``agvas.runtime.engines.Engine``: ``run(**feeds)``
    returns the outputs by name (fp16 as float32)."""

    def __init__(self, model: str, entry: dict) -> None:
        self.name = model
        self.provider = f"triton:{model}"
        self.input_dtypes = {x["name"]: np.dtype(x["dtype"]) for x in entry["inputs"]}
        self.output_names = [x["name"] for x in entry["outputs"]]

    def run(self, **feeds: np.ndarray) -> dict[str, np.ndarray]:
        inputs = [pb_utils.Tensor(n, np.ascontiguousarray(v, dtype=self.input_dtypes[n])) for n, v in feeds.items()]
        response = pb_utils.InferenceRequest(model_name=self.name, requested_output_names=self.output_names,
                                             inputs=inputs, preferred_memory=CPU).exec()
        if response.has_error():
            raise pb_utils.TritonModelException(f"model {self.name}: {response.error().message()}")
        out = {}
        for n in self.output_names:
            a = pb_utils.get_output_tensor_by_name(response, n).as_numpy()
            out[n] = a.astype(np.float32) if a.dtype == np.float16 else a
        return out


class BLSLLM(LLM):
    """``agvas.runtime.engines.LLM`` (same IO names, positions and call shape) with the cache held as
    numpy arrays and each step sent to the ``llm`` model."""

    def __init__(self, engine: BLSEngine, spec: dict, lm_head=None) -> None:
        super().__init__(engine, spec, lm_head)
        self.device = "cpu"

    def empty_past(self, batch: int) -> list:
        z = np.zeros((batch, self.kv_heads, 0, self.head_dim), self.kv_dtype)
        return [(z, z)] * len(self.past_names)

    @staticmethod
    def past_length(past: list) -> int:
        return int(past[0][0].shape[2])

    def __call__(self, embeds: np.ndarray, past: list | None, logits: bool = True):
        b, s, _ = embeds.shape
        past = past if past is not None else self.empty_past(b)
        p = self.past_length(past)
        feeds = {"inputs_embeds": embeds, "attention_mask": np.ones((b, p + s), np.int64)}
        if self.explicit_positions:
            feeds["position_ids"] = np.broadcast_to(np.arange(p, p + s, dtype=np.int64), (b, s))
        for (kn, vn), (k, v) in zip(self.past_names, past):
            feeds[kn], feeds[vn] = k, v
        out = self.engine.run(**feeds)
        present = [(out[kn].astype(self.kv_dtype, copy=False), out[vn].astype(self.kv_dtype, copy=False))
                   for kn, vn in self.present_names]
        if "logits" in out:  # an older export whose llm graph has its own head
            return out["hidden_states"], out["logits"][:, -1], present
        return out["hidden_states"], self.last_logits(out["hidden_states"]) if logits else None, present

    def truncate(self, past: list, length: int, row: int | None = None) -> list:
        rows = slice(None) if row is None else slice(row, row + 1)
        return [tuple(np.ascontiguousarray(x[rows, :, :length]) for x in kv) for kv in past]


class BLSEngines:
    """What ``agvas.runtime.inspector.Inspector`` reads from ``agvas.runtime.engines.Engines``."""

    def __init__(self, manifest: Manifest, models: dict[str, str]) -> None:
        self.manifest, self.threads = manifest, None
        self.batch_llm = True  # the Triton llm model takes the whole group in one request
        self.vision, self.sam_encoder, self.spam, self.agmd, self.lm_head = (
            BLSEngine(models[n], manifest.engine(n)) for n in ("vision", "sam_encoder", "spam", "agmd", "lm_head"))
        self.llm = BLSLLM(BLSEngine(models["llm"], manifest.engine("llm")), manifest.llm, self.lm_head)
        self.embed_tokens = np.load(manifest.engine_path("embed_tokens"), mmap_mode="r", allow_pickle=False)
        self.image_newline = np.load(manifest.engine_path("image_newline"), allow_pickle=False).astype(np.float32)

    @property
    def providers(self) -> dict[str, str]:
        return {n: getattr(self, n).provider for n in ("vision", "sam_encoder", "spam", "agmd", "lm_head")} | {
            "llm": self.llm.engine.provider}


def bls_inspector(export_dir: Path, engines: BLSEngines, **options) -> Inspector:
    """A ``runtime.Inspector`` over ``engines``. Its constructor opens ONNX Runtime sessions
    through the module name ``agvas.runtime.inspector.Engines``; that name points at ``engines`` while
    it runs (the files it would open are not in this folder; the engine models hold them)."""
    import agvas.runtime.inspector as ri

    sessions = ri.Engines
    ri.Engines = lambda *_args, **_kwargs: engines
    try:
        return Inspector(export_dir, verify="none", **options)
    finally:
        ri.Engines = sessions


def _error(message: str):
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message))


def _response(res) -> object:
    t = pb_utils.Tensor
    return pb_utils.InferenceResponse(output_tensors=[
        t("mask", res.mask.astype(np.uint8)[None]), t("prob", np.asarray(res.prob, np.float32)[None]),
        t("verdict", np.array([[res.verdict]], bool)), t("area_px", np.array([[res.area_px]], np.int64)),
        t("max_score", np.array([[res.max_score]], np.float32)),
        t("text", np.array([[res.text.encode("utf-8")]], dtype=object))])


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        p = {k: v.get("string_value", "") for k, v in (config.get("parameters") or {}).items()}
        export_dir = Path(args["model_repository"]) / args["model_version"] / "export"
        manifest = load_manifest(export_dir, verify="none")
        engines = BLSEngines(manifest, json.loads(p["engine_models"]))
        options = {"mode": p.get("mode") or "direct", "normal_sentence": p.get("normal_sentence") or None,
                   "vision_tokens": p.get("vision_tokens") or None, "fast_path": p.get("fast_path", "true") == "true",
                   "threshold": float(p["threshold"]) if p.get("threshold") else None,
                   "min_area": int(p.get("min_area") or 0)}
        if p.get("max_pixels"):
            options["max_pixels"] = int(p["max_pixels"])
        self.inspector = bls_inspector(export_dir, engines, **options)
        self.prefill_batch = int(p.get("prefill_batch") or 4)

    def execute(self, requests: list) -> list:
        responses: list = [None] * len(requests)
        images, owner = [], []
        for k, request in enumerate(requests):
            data = pb_utils.get_input_tensor_by_name(request, "image").as_numpy().reshape(-1)
            if data.size != 1:
                responses[k] = _error(f"input 'image': send one encoded image per request, got {data.size}")
                continue
            raw = data[0]
            buf = io.BytesIO(raw if isinstance(raw, bytes) else bytes(raw))
            buf.filename = f"request {request.request_id() or k}"  # load_image names it in errors
            images.append(buf)
            owner.append(k)
        # one thread: BLS calls stay on the thread Triton called execute on
        for j, res in self.inspector.stream(images, batch_size=self.prefill_batch, overlap=False):
            k = owner[j]
            responses[k] = _error(str(res).strip() or type(res).__name__) if isinstance(res, Exception) \
                else _response(res)
        return responses
