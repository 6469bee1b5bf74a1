"""Memory plan from a config alone (meta device): weights per engine per precision, KV cache at
the real token count, an activation estimate, and what fits a Jetson Orin.

Weights: every parameter is assigned to the engine that holds it and classified as a *matrix*
(``nn.Linear`` / ``MultiheadAttention`` projections -> ONNX MatMul/Gemm, convolutions -> Conv)
or a *float* tensor (norms, biases, embeddings, positional tables). Per precision:

- ``fp32`` / ``fp16``: 4 / 2 bytes per parameter;
- ``int8``: matrices 1 byte + per output channel an fp32 scale and an int8 zero point
  (``quantize_dynamic(per_channel=True)`` / QDQ per-channel), float tensors fp32;
- ``int4``: MatMul matrices in ``MatMulNBits`` layout — K padded to the block size, 4 bits per
  weight, per block an fp32 scale and a 4-bit zero point; convolutions int8 as above (MatMulNBits
  is MatMul only); float tensors fp32.

That is what ``agvas quantize`` writes for ORT CPU. The device check (:func:`fits`) counts the
float parts of quantized engines in fp16, as a GPU build keeps them.

Tokens: the HF LLaVA-OneVision packing (anyres grid, unpad, ``anyres_max_N`` interpolation,
newlines) is run on meta tensors, so the count is exactly HF's (1,485 image tokens for 384²,
7,371 for 1024² at SigLIP 384/14); ``base`` is the base tile plus its newline. SPAM doubles them
(``concat(f_s, f_align)``); the prompt's text and the answer come from the config's tokenizer.

Activations are an *estimate* of the largest transient working set of one stage at batch 1
(documented per stage in :func:`activation_estimates`), not a measurement.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

PRECISIONS = ("fp32", "fp16", "int8", "int4")
ENGINES = ("vision", "sam_encoder", "spam", "llm", "lm_head", "embed_tokens", "agmd")
GIB = 1024 ** 3
# Jetson Orin modules: unified memory shared by CPU and GPU (GiB). The reserve is an assumption
# for the OS, the CUDA context and the runtime itself (JetPack desktop-less image).
DEVICES: dict[str, float] = {"orin_nano_8gb": 8.0, "orin_nx_16gb": 16.0, "agx_orin_64gb": 64.0}
DEVICE_RESERVE_GIB = 2.0
DEFAULT_IMAGES: tuple[tuple[int, int], ...] = ((384, 384), (1024, 1024))


@dataclass
class Matrix:
    """A weight that quantizes: ``n`` output channels, ``k`` reduction length."""

    n: int
    k: int
    kind: str  # "matmul" | "conv"


@dataclass
class EngineWeights:
    name: str
    params: int = 0
    float_params: int = 0  # stays float in every precision
    matrices: list[Matrix] = field(default_factory=list)
    tied_to: str | None = None  # the same tensor is counted by another engine (tied LM head)

    @property
    def matrix_params(self) -> int:
        return sum(m.n * m.k for m in self.matrices)

    def bytes(self, precision: str, block_size: int = 32, float_bytes: int = 4) -> int:
        """Bytes of this engine's weights in ``precision`` (see the module docstring)."""
        if precision == "fp32":
            return 4 * self.params
        if precision == "fp16":
            return 2 * self.params
        if precision not in ("int8", "int4"):
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        total = float_bytes * self.float_params
        for m in self.matrices:
            if precision == "int4" and m.kind == "matmul":
                blocks = math.ceil(m.k / block_size)
                total += m.n * blocks * (block_size // 2)  # packed 4-bit data, K padded
                total += m.n * blocks * 4  # fp32 scale per block
                total += m.n * math.ceil(blocks / 2)  # 4-bit zero points, packed per column
            else:
                total += m.n * m.k + m.n * (4 + 1)  # int8 data + fp32 scale + int8 zero point
        return total


def _engine_of(name: str) -> str | None:
    """Which engine a parameter of :class:`AGVAS` belongs to (by its qualified name)."""
    rules = (
        ("llava.model.vision_tower.", "vision"), ("llava.model.multi_modal_projector.", "vision"),
        ("llava.model.image_newline", "vision"),
        ("llava.model.language_model.embed_tokens.", "embed_tokens"),
        ("llava.model.language_model.", "llm"), ("llava.lm_head.", "lm_head"),
        ("pixel_encoder.", "sam_encoder"), ("spam.", "spam"), ("refiner.", "agmd"), ("agmd.", "agmd"),
    )
    for prefix, engine in rules:
        if name.startswith(prefix):
            return engine
    return None


def engine_weights(model) -> dict[str, EngineWeights]:
    """Per-engine parameter inventory of an AG-VAS model (meta device is fine)."""
    from torch import nn

    out = {e: EngineWeights(e) for e in ENGINES}
    first_owner: dict[int, str] = {}
    for mod_name, mod in model.named_modules():
        for p_name, p in mod.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            engine = _engine_of(full)
            if engine is None:
                raise ValueError(f"parameter {full!r} belongs to no engine; update agvas.calibration.memory_plan._engine_of")
            ew = out[engine]
            if id(p) in first_owner:  # a tied tensor: the engine holds a copy of it
                ew.tied_to = first_owner[id(p)]
            first_owner.setdefault(id(p), engine)
            ew.params += p.numel()
            if isinstance(mod, nn.Linear) and p_name == "weight":
                ew.matrices.append(Matrix(n=p.shape[0], k=p.shape[1], kind="matmul"))
            elif isinstance(mod, nn.MultiheadAttention) and p_name == "in_proj_weight":
                ew.matrices.append(Matrix(n=p.shape[0], k=p.shape[1], kind="matmul"))
            elif isinstance(mod, nn.ConvTranspose2d) and p_name == "weight":
                ew.matrices.append(Matrix(n=p.shape[1], k=p.numel() // p.shape[1], kind="conv"))
            elif isinstance(mod, nn.Conv2d) and p_name == "weight":
                ew.matrices.append(Matrix(n=p.shape[0], k=p.numel() // p.shape[0], kind="conv"))
            else:
                ew.float_params += p.numel()
    return out


# ---- tokens ------------------------------------------------------------------------------

@dataclass
class TokenCount:
    image: tuple[int, int]  # (H, W)
    vision_tokens: str  # anyres | base
    n_crops: int
    semantic: int  # N = len(f_s)
    visual: int  # 2N (SPAM doubling)
    prompt: int  # the whole prompt: text + 2N
    answer: int  # direct-mode answer incl. EOS
    max_new_tokens: int

    @property
    def sequence(self) -> int:
        """Positions in the KV cache after the direct answer."""
        return self.prompt + self.answer

    @property
    def sequence_max(self) -> int:
        """Positions after a full ``max_new_tokens`` answer (describe / explain modes)."""
        return self.prompt + self.max_new_tokens


def token_counts(model, tokenizer, image: tuple[int, int], vision_tokens: str = "anyres") -> TokenCount:
    """Token counts for one image of size ``image`` = (H, W), by HF's own packing on meta tensors."""
    import torch
    from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

    from agvas.train.reference import prompt_ids
    from agvas.train.templates import CANONICAL_DIRECT_ANSWER, canonical_instruction

    cfg = model.cfg
    lm, hf = model.llava.model, model.llava.config
    v = cfg.llava["vision_config"]
    per_crop = (v["image_size"] // v["patch_size"]) ** 2
    n_crops = image_size_to_num_patches(list(image), hf.image_grid_pinpoints, v["image_size"])
    if vision_tokens == "anyres":
        feats = torch.empty(n_crops, per_crop, cfg.hidden_size, device="meta")
        packed, _ = lm.pack_image_features([feats], torch.tensor([list(image)]), image_newline=lm.image_newline,
                                           vision_aspect_ratio=hf.vision_aspect_ratio)
        semantic = int(packed[0].shape[0])
    elif vision_tokens == "base":
        n_crops, semantic = 1, per_crop + 1  # base tile + newline (AGVAS.semantic_features)
    else:
        raise ValueError(f"vision_tokens must be 'anyres' or 'base', got {vision_tokens!r}")
    prompt = len(prompt_ids(tokenizer, model, canonical_instruction("direct"), 2 * semantic))
    answer = len(tokenizer.encode(CANONICAL_DIRECT_ANSWER + cfg.eos_token, add_special_tokens=False))
    return TokenCount(tuple(image), vision_tokens, n_crops, semantic, 2 * semantic, prompt, answer,
                      cfg.max_new_tokens)


def kv_cache_bytes(cfg, positions: int, dtype_bytes: int = 4, batch: int = 1) -> int:
    """K and V of every layer for ``positions`` tokens: 2·L·kv_heads·head_dim·S·bytes."""
    t = cfg.llava["text_config"]
    head_dim = t.get("head_dim") or t["hidden_size"] // t["num_attention_heads"]
    return 2 * t["num_hidden_layers"] * t["num_key_value_heads"] * head_dim * positions * dtype_bytes * batch


def activation_estimates(cfg, tc: TokenCount, dtype_bytes: int = 4) -> dict[str, int]:
    """Largest transient working set per stage at batch 1 (bytes; an estimate, not a measurement).

    - vision: per crop batch ``n·T·(3·I + 2·H)`` (MLP intermediates + residual) plus eager
      attention scores and softmax ``2·n·heads·T²``;
    - sam_encoder: ``tokens·(3·mlp + 2·D)`` plus a global-attention block's scores and softmax
      ``2·heads·tokens²`` (the largest; windowed blocks are smaller);
    - spam: the projected pixel tokens ``P·H`` plus cross-attention scores ``2·heads·N·P``;
    - llm (fused attention, prefill of the whole prompt): ``S·(3·I + 2·H)``; ``llm_unfused_scores``
      is the extra ``2·heads·S²`` of a graph that materialises attention;
    - agmd: the 4x upscaled embedding and the token-to-image attention, small;
    - persistent: pixel embedding + visual tokens + ``inputs_embeds`` kept across stages.
    """
    t, v, pe = cfg.llava["text_config"], cfg.llava["vision_config"], cfg.pixel_encoder
    per_crop = (v["image_size"] // v["patch_size"]) ** 2
    n = tc.n_crops
    vision = n * per_crop * (3 * v["intermediate_size"] + 2 * v["hidden_size"]) + 2 * n * v["num_attention_heads"] * per_crop ** 2
    p_tokens = pe.grid ** 2
    mlp = int(pe.embed_dim * pe.mlp_ratio)
    sam = p_tokens * (3 * mlp + 2 * pe.embed_dim) + 2 * pe.num_heads * p_tokens ** 2
    h = t["hidden_size"]
    spam = p_tokens * h + 2 * cfg.spam_heads * tc.semantic * p_tokens + 2 * tc.semantic * h
    s = tc.prompt
    llm = s * (3 * t["intermediate_size"] + 2 * h)
    c = cfg.pixel_dim
    up = (4 * pe.grid) ** 2
    agmd = up * (c // 4 + c // 8) + 2 * cfg.agmd.num_heads * 6 * p_tokens + 3 * up
    persistent = c * p_tokens + tc.visual * h + s * h
    out = {"vision": vision, "sam_encoder": sam, "spam": spam, "llm": llm, "agmd": agmd}
    out = {k: val * dtype_bytes for k, val in out.items()}
    out["persistent"] = persistent * dtype_bytes
    out["peak"] = max(out[k] for k in ("vision", "sam_encoder", "spam", "llm", "agmd")) + out["persistent"]
    out["llm_unfused_scores"] = 2 * t["num_attention_heads"] * s * s * dtype_bytes
    return out


# ---- the plan ----------------------------------------------------------------------------

# Deployments checked against the devices: engine -> precision (embed table fp16 on GPU).
SCENARIOS: dict[str, dict[str, str]] = {
    "fp16": {e: "fp16" for e in ENGINES},
    "llm-int8 + vision-fp16": {**{e: "fp16" for e in ENGINES}, "llm": "int8", "lm_head": "int8"},
    "llm-int4 + vision-fp16": {**{e: "fp16" for e in ENGINES}, "llm": "int4", "lm_head": "int4"},
    "llm-int4 + vision-int8": {**{e: "int8" for e in ENGINES}, "llm": "int4", "lm_head": "int4",
                               "embed_tokens": "fp16"},
}


def weights_bytes(weights: dict[str, EngineWeights], precisions: dict[str, str], block_size: int = 32,
                  float_bytes: int = 4) -> int:
    return sum(weights[e].bytes(precisions[e], block_size, float_bytes) for e in ENGINES)


def memory_plan(config, images: tuple[tuple[int, int], ...] = DEFAULT_IMAGES, block_size: int = 32,
                reserve_gib: float = DEVICE_RESERVE_GIB) -> dict[str, Any]:
    """The plan for ``config`` (a registry name or an :class:`AGVASConfig`) as a JSON-able dict:

    ``weights``: per engine params, matrix params and bytes per precision (ORT CPU layout);
    ``tokens``: per image and vision-token mode the counts, KV-cache bytes (fp32 and fp16) at
    the direct-answer and the ``max_new_tokens`` length, and activation estimates;
    ``devices``: per scenario x image x mode, total GiB (GPU layout: fp16 KV/activations and
    float parts) and whether it fits each Orin after ``reserve_gib``.
    """
    from agvas.train.config import get_config
    from agvas.train.modeling import build_model, count_parameters

    cfg = get_config(config) if isinstance(config, str) else config
    model, tok = build_model(cfg, device="meta")
    weights = engine_weights(model)
    counts = count_parameters(model)
    plan: dict[str, Any] = {
        "config": cfg.name, "block_size": block_size, "parameter_counts": counts,
        "weights": {e: {"params": w.params, "matrix_params": w.matrix_params, "tied_to": w.tied_to,
                        "bytes": {p: w.bytes(p, block_size) for p in PRECISIONS}} for e, w in weights.items()},
        "tokens": [], "devices": [], "reserve_gib": reserve_gib, "device_gib": dict(DEVICES),
    }
    plan["weights_total_bytes"] = {p: weights_bytes(weights, {e: p for e in ENGINES}, block_size) for p in PRECISIONS}
    for image in images:
        for mode in ("anyres", "base"):
            tc = token_counts(model, tok, image, mode)
            row = {**asdict(tc), "sequence": tc.sequence, "sequence_max": tc.sequence_max,
                   "kv_bytes": {"fp32": kv_cache_bytes(cfg, tc.sequence, 4), "fp16": kv_cache_bytes(cfg, tc.sequence, 2)},
                   "kv_bytes_max": {"fp32": kv_cache_bytes(cfg, tc.sequence_max, 4),
                                    "fp16": kv_cache_bytes(cfg, tc.sequence_max, 2)},
                   "activations": {"fp32": activation_estimates(cfg, tc, 4), "fp16": activation_estimates(cfg, tc, 2)}}
            plan["tokens"].append(row)
            for scen, prec in SCENARIOS.items():
                w = weights_bytes(weights, prec, block_size, float_bytes=2)
                kv = row["kv_bytes_max"]["fp16"]
                act = row["activations"]["fp16"]["peak"]
                total = w + kv + act
                plan["devices"].append({
                    "scenario": scen, "image": list(image), "vision_tokens": mode, "weights_bytes": w,
                    "kv_bytes": kv, "activation_bytes": act, "total_bytes": total,
                    "fits": {d: total <= (gib - reserve_gib) * GIB for d, gib in DEVICES.items()},
                })
    return plan


def _gb(b: float) -> str:
    """Bytes in MB below 0.1 GB, else GB (10⁶ / 10⁹)."""
    return f"{b / 1e6:,.2f} MB" if b < 1e8 else f"{b / 1e9:,.2f} GB"


def format_plan(plan: dict[str, Any]) -> str:
    """Markdown tables of a :func:`memory_plan` (MB/GB = 10⁶/10⁹ bytes; device sizes in GiB)."""
    lines = [f"### Memory plan: `{plan['config']}` (int4 block size {plan['block_size']})", "",
             "Weights per engine (int8/int4 as `agvas quantize` writes them for ORT CPU):", "",
             "| engine | params | fp32 | fp16 | int8 | int4 |", "|---|---|---|---|---|---|"]
    for e, w in plan["weights"].items():
        note = f" (copy of {w['tied_to']})" if w["tied_to"] else ""
        lines.append(f"| {e}{note} | {w['params'] / 1e6:,.2f}M | " + " | ".join(_gb(w["bytes"][p]) for p in PRECISIONS) + " |")
    tot = plan["weights_total_bytes"]
    lines.append("| **total** | | " + " | ".join(_gb(tot[p]) for p in PRECISIONS) + " |")
    lines += ["", "Tokens, KV cache (after the direct answer / after max_new_tokens) and activation estimate:", "",
              "| image | tokens | crops | N | prompt (2N+text) | +answer | KV fp32 | KV fp16 | KV fp16 @max | act. peak fp32 | unfused attn scores fp32 |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in plan["tokens"]:
        a = r["activations"]["fp32"]
        lines.append(f"| {r['image'][0]}x{r['image'][1]} | {r['vision_tokens']} | {r['n_crops']} | {r['semantic']:,} | "
                     f"{r['prompt']:,} | {r['sequence']:,} | {_gb(r['kv_bytes']['fp32'])} | {_gb(r['kv_bytes']['fp16'])} | "
                     f"{_gb(r['kv_bytes_max']['fp16'])} | {_gb(a['peak'])} | {_gb(a['llm_unfused_scores'])} |")
    devs = list(plan["device_gib"])
    lines += ["", f"Fits (GPU layout: fp16 KV at max_new_tokens, fp16 activations; {plan['reserve_gib']} GiB reserved "
              "for OS + CUDA context):", "",
              "| scenario | image | tokens | weights | KV | act. | total | " + " | ".join(devs) + " |",
              "|---|---|---|---|---|---|---|" + "---|" * len(devs)]
    for r in plan["devices"]:
        lines.append(f"| {r['scenario']} | {r['image'][0]}x{r['image'][1]} | {r['vision_tokens']} | {_gb(r['weights_bytes'])} | "
                     f"{_gb(r['kv_bytes'])} | {_gb(r['activation_bytes'])} | {_gb(r['total_bytes'])} | "
                     + " | ".join("yes" if r["fits"][d] else "**no**" for d in devs) + " |")
    return "\n".join(lines)
