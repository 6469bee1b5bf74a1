"""Per-GPU training memory plan (``agvas train --plan``) and the pre-launch fit check.

Parameters are counted exactly: the model is built on the meta device
(:func:`agvas.train.modeling.build_model`), LoRA applied for configs with ``lora_rank`` and
``configure_trainable`` run, as the trainer does. Trainable = LoRA + SPAM + refiner + AGMD +
token embeddings + LM head (full vocabulary rows); frozen = SigLIP, projector, SAM encoder,
LLM base (``tiny`` trains everything). Token counts are HF's own anyres packing
(:func:`agvas.calibration.memory_plan.token_counts`: 1,485 semantic tokens at 384², 7,371 at 1024²),
doubled by SPAM, plus the prompt's text and a ``max_new_tokens`` answer (the worst case of the
describe/explain modes).

Per GPU, for a strategy (N = world size):

============  ==========  ===========  =========  ==============
strategy      frozen      trainable    grads      AdamW states
============  ==========  ===========  =========  ==============
ddp           full        full         full       full
zero2         full        full         1/N        1/N          (DeepSpeed ZeRO-2)
fsdp          1/N         1/N          1/N        1/N          (FULL_SHARD)
============  ==========  ===========  =========  ==============

Components (bytes; ``w`` = base-dtype bytes, ``a`` = compute (autocast) dtype bytes, ``T`` /
``F`` = trainable / frozen parameters, ``b`` = micro-batch per GPU):

- ``frozen``: ``w·F``. ``trainable``: ``4·T`` — everything that trains is an fp32 master; there
  is no second low-precision copy in the optimizer. ``grads``: ``4·T``. ``adam``: ``8·T``.
- ``autocast``: with a 16-bit compute dtype, autocast caches a 16-bit cast of every trainable
  weight that goes through a matmul/conv (LoRA, SPAM, refiner, AGMD, LM head — not the input
  embedding table, a lookup) for the forward and the backward: ``a·T_cast`` (0 under FSDP,
  whose mixed-precision gather replaces the cast; that gather is in ``comm``).
- ``comm`` (0 at N = 1): ddp: DDP's gradient buckets, a second fp32 copy of the gradients
  (``gradient_as_bucket_view=False``, the default): ``4·T``; zero2: DeepSpeed's reduce bucket,
  ``4·min(T, reduce_bucket_size)`` (default 5e8 elements, DeepSpeed's default); fsdp: the
  unsharded compute-dtype copy of the two largest units in flight (current + prefetch, units =
  decoder layers and the embedding / LM head) + the largest trainable unit's unsharded fp32
  gradient before its reduce-scatter.
- ``llm_act``: activations saved for backward, see :func:`llm_layer_bytes_per_token`
  (formula there), per sequence of S = 2N + text positions; with gradient checkpointing
  ``L·S·r·H`` (each layer's input, the fp32 residual stream) + one layer's full activations
  being recomputed; without, ``L`` layers' full activations. Both plus the final norm's input
  ``S·r·H`` and HF's boolean 4-D SDPA mask for a padded batch ``S²`` (1 byte).
- ``lm_ce``: LM head + cross-entropy at the answer positions only (``text_loss``):
  ``A·(a·H + (a + 8)·V)`` (logits, their fp32 copy, the softmax gradient).
- ``spam_agmd``: SPAM ``a·(P·C + 3·P·H + 4·N·H)`` (pixel tokens and their projection, K, V, Q,
  SDPA output and out-projection input; SDPA, no N×P matrix), refiner (3 tokens, ~0), AGMD
  ``a·(8·depth + 17)·P·C`` (two-way blocks, final attention, 4x upscaling, hypernetwork product)
  and the loss maps at SAM input resolution ``18·img²·4`` (3 maps x ~6 fp32 copies).
- ``siglip_fwd`` / ``sam_fwd``: frozen, no graph, only the forward transient of one block (as
  in :func:`agvas.calibration.memory_plan.activation_estimates`: MLP intermediates + residual, and the
  eager attention scores + softmax — SAM's global-attention blocks materialise
  ``2·heads·4096²`` per image, segment-anything does not use SDPA), for ``b`` images; SAM's
  peak also holds ``f_s`` (``a·N·H``). Trainable encoders (``tiny``) are counted as saved
  activations instead (``depth`` x one block).
- ``context``: CUDA context, cuBLAS/cuDNN workspaces, NCCL, allocator fragmentation:
  :data:`CONTEXT_GIB` (1.5 GiB, an assumption).
- ``adam_step``: the ``foreach`` AdamW step's temporaries (``sqrt(v)`` for every parameter of
  the shard): ``4·T_shard``.

Phases never coexist: the frozen encoders run before anything is saved for backward, and the
optimizer step runs after the activations are freed. So::

    total = frozen + trainable + grads + adam + comm + context
            + max(siglip_fwd, sam_fwd, llm_act + lm_ce + spam_agmd + autocast, adam_step)

Gradients are counted as resident throughout (they are, across gradient-accumulation
micro-batches). All of it is an estimate of the peak allocated memory, not a measurement.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
from dataclasses import dataclass, field
from typing import Any

GIB = 1024 ** 3
STRATEGIES = ("ddp", "zero2", "fsdp")
DTYPES = ("bf16", "fp16", "fp32")
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
IMAGE_SIZES = (384, 1024)
CONTEXT_GIB = 1.5
ZERO2_BUCKET_ELEMENTS = 500_000_000  # DeepSpeed's default reduce_bucket_size
RESIDUAL_BYTES = 4  # the LLM residual stream is fp32: fp32 master embeddings, residual adds promote

COMPONENTS = ("frozen", "trainable", "grads", "adam", "comm", "context", "llm_act", "lm_ce", "spam_agmd",
              "autocast", "siglip_fwd", "sam_fwd", "adam_step")
LABELS = {
    "frozen": "frozen weights", "trainable": "trainable fp32 weights", "grads": "fp32 gradients",
    "adam": "AdamW states", "comm": "communication buffers", "context": "CUDA context + allocator",
    "llm_act": "LLM activations", "lm_ce": "LM head + CE", "spam_agmd": "SPAM/AGMD activations",
    "autocast": "autocast weight copies", "siglip_fwd": "SigLIP forward peak", "sam_fwd": "SAM encoder forward peak",
    "adam_step": "AdamW step temporaries",
}
STATIC = ("frozen", "trainable", "grads", "adam", "comm", "context")
PHASES = {"siglip": ("siglip_fwd",), "sam": ("sam_fwd",), "fwd/bwd": ("llm_act", "lm_ce", "spam_agmd", "autocast"),
          "adam step": ("adam_step",)}


@dataclass
class TrainPlan:
    """One (config, strategy, dtype, world size, micro-batch, checkpointing, image size) plan.

    ``components`` are GiB per GPU (names in :data:`COMPONENTS`); ``total_gib`` is the peak
    (module docstring: static components + the largest phase)."""

    config: str
    strategy: str
    dtype: str
    compute_dtype: str
    world_size: int
    micro_batch: int
    grad_checkpointing: bool
    image_size: int
    semantic_tokens: int  # N per image
    sequence: int  # LLM positions per sample: 2N + prompt text + answer
    trainable_params: int
    frozen_params: int
    components: dict[str, float] = field(default_factory=dict)
    total_gib: float = 0.0
    peak_phase: str = ""

    @property
    def static_gib(self) -> float:
        return sum(self.components[k] for k in STATIC)

    def largest(self) -> tuple[str, float]:
        """The largest component (label, GiB)."""
        k = max(self.components, key=self.components.get)
        return LABELS[k], self.components[k]

    def fits(self, gpu_gib: float) -> bool:
        return self.total_gib <= gpu_gib

    def describe(self) -> str:
        ck = "on" if self.grad_checkpointing else "off"
        cd = "" if self.compute_dtype == self.dtype else f" (autocast {self.compute_dtype})"
        return (f"{self.config} {self.strategy} {self.dtype}{cd} {self.image_size}² micro-batch {self.micro_batch} "
                f"world size {self.world_size} checkpointing {ck}")

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return {**asdict(self), "static_gib": self.static_gib}


# ---- the meta-device inventory (cached per config) -------------------------------------------

@dataclass
class _Inventory:
    counts: dict[str, int]
    trainable: int
    frozen: int
    cast_params: int  # trainable params used by matmul/conv (autocast caches their casts)
    largest_unit: int  # params of the largest FSDP unit (decoder layer / embedding / LM head)
    largest_trainable_unit: int
    model: Any
    tokenizer: Any
    tokens: dict[int, Any] = field(default_factory=dict)


_CACHE: dict[str, _Inventory] = {}


def _inventory(cfg) -> _Inventory:
    key = json.dumps(cfg.to_dict(), sort_keys=True)
    inv = _CACHE.get(key)
    if inv is not None:
        return inv
    from torch import nn

    from .lora import apply_lora, configure_trainable
    from .modeling import build_model
    from .modeling.build import count_parameters

    cfg = copy.deepcopy(cfg)
    model, tok = build_model(cfg, device="meta")
    if cfg.lora_rank is not None:
        apply_lora(model)
    configure_trainable(model)
    counts = count_parameters(model)
    cast: dict[int, int] = {}
    for mod in model.modules():
        if isinstance(mod, nn.Embedding):
            continue
        for p in mod.parameters(recurse=False):
            if p.requires_grad and p.dim() >= 2:
                cast[id(p)] = p.numel()

    def n(m, trainable_only=False) -> int:
        return sum(p.numel() for p in {id(p): p for p in m.parameters()}.values()
                   if p.requires_grad or not trainable_only)

    layers = list(model.language_model.layers)
    units = [n(layers[0]), model.embed_tokens.weight.numel(), model.lm_head.weight.numel()]
    t_units = [n(layers[0], True), n(model.embed_tokens, True), n(model.lm_head, True)]
    inv = _Inventory(counts=counts, trainable=counts["trainable"], frozen=counts["total"] - counts["trainable"],
                     cast_params=sum(cast.values()), largest_unit=max(units), largest_trainable_unit=max(t_units),
                     model=model, tokenizer=tok)
    _CACHE[key] = inv
    return inv


def _tokens(inv: _Inventory, image_size: int):
    tc = inv.tokens.get(image_size)
    if tc is None:
        from agvas.calibration.memory_plan import token_counts

        tc = inv.tokens[image_size] = token_counts(inv.model, inv.tokenizer, (image_size, image_size))
    return tc


# ---- activation formulas ---------------------------------------------------------------------

def llm_layer_bytes_per_token(cfg, a: int, r: int = RESIDUAL_BYTES) -> int:
    """Bytes one Qwen2 decoder layer saves for backward, per token (``a`` = compute dtype bytes,
    ``r`` = residual-stream bytes, fp32 here). Attention is SDPA/flash: no S×S matrix.

    ``2·r·H`` (the two RMSNorms save their fp32 input; their frozen weights save nothing)
    ``+ a·(Hq + 2·Hq + Hq) + 4·heads`` (SDPA's q, k, v after RoPE — HF's SDPA path repeats the
    GQA K/V heads, counted repeated — the output, and the fp32 logsumexp)
    ``+ 3·a·I`` (SwiGLU: gate pre-activation, SiLU output, up output)
    ``+ linear inputs``: LoRA (frozen base Linears save nothing; each of the 7 adapters saves its
    own dropout mask + compute-dtype input): ``(a + [p>0])·(6·H + I)`` plus the rank-r
    intermediates ``7·a·rank``; full fine-tuning (no LoRA): ``a·(6·H + I)`` under autocast
    (each projection casts its input), ``a·(3·H + I)`` in fp32 (q/k/v and gate/up share one).

    For ov-7b in bf16 (H 3584, I 18944) that is ~0.31 MB per token per layer.
    """
    t = cfg.llava["text_config"]
    h, i, heads = t["hidden_size"], t["intermediate_size"], t["num_attention_heads"]
    hq = heads * (t.get("head_dim") or h // heads)
    out = 2 * r * h + a * 4 * hq + 4 * heads + 3 * a * i
    if cfg.lora_rank is not None:
        out += (a + (1 if cfg.lora_dropout > 0 else 0)) * (6 * h + i) + 7 * a * cfg.lora_rank
    else:
        out += a * ((6 * h + i) if a < r else (3 * h + i))
    return out


def _encoder_saved(cfg, tc, a: int) -> tuple[int, int]:
    """Saved activations of *trainable* SigLIP / SAM encoders (tiny): depth x one block's estimate."""
    from agvas.calibration.memory_plan import activation_estimates

    est = activation_estimates(cfg, tc, a)
    v, pe = cfg.llava["vision_config"], cfg.pixel_encoder
    siglip = est["vision"] * v["num_hidden_layers"] if cfg.train_vision_tower else 0
    sam = est["sam_encoder"] * pe.depth if cfg.train_pixel_encoder else 0
    return siglip, sam


# ---- the plan --------------------------------------------------------------------------------

def resolve_strategy(strategy: str | None, world_size: int) -> str:
    """``auto`` (or None): plain ``ddp`` on one GPU, ZeRO-2 (the paper's) on several."""
    if strategy in (None, "auto"):
        return "ddp" if world_size <= 1 else "zero2"
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES} or 'auto', got {strategy!r}")
    return strategy


def plan_training(cfg, *, strategy: str, dtype: str, world_size: int = 1, micro_batch: int = 1,
                  grad_checkpointing: bool = True, image_size: int = 1024, compute_dtype: str | None = None,
                  answer_tokens: int | None = None, context_gib: float = CONTEXT_GIB,
                  zero2_bucket_elements: int = ZERO2_BUCKET_ELEMENTS) -> TrainPlan:
    """The per-GPU memory plan of training ``cfg`` (an :class:`AGVASConfig`); see the module
    docstring for every component. ``dtype`` is the base (frozen-weight) dtype; ``compute_dtype``
    the autocast dtype (default: ``dtype``); ``answer_tokens`` defaults to ``cfg.max_new_tokens``."""
    strategy = resolve_strategy(strategy, world_size)
    compute_dtype = compute_dtype or dtype
    for name, d in (("dtype", dtype), ("compute_dtype", compute_dtype)):
        if d not in DTYPE_BYTES:
            raise ValueError(f"{name} must be one of {DTYPES}, got {d!r}")
    if world_size < 1 or micro_batch < 1:
        raise ValueError(f"world_size and micro_batch must be >= 1, got {world_size}, {micro_batch}")
    from agvas.calibration.memory_plan import activation_estimates

    inv = _inventory(cfg)
    tc = _tokens(inv, image_size)
    w, a, n, b = DTYPE_BYTES[dtype], DTYPE_BYTES[compute_dtype], world_size, micro_batch
    T, F = inv.trainable, inv.frozen
    t = cfg.llava["text_config"]
    h, L, vocab = t["hidden_size"], t["num_hidden_layers"], inv.model.lm_head.weight.shape[0]
    answer = cfg.max_new_tokens if answer_tokens is None else answer_tokens
    s = tc.prompt + answer
    shard_p = n if strategy == "fsdp" else 1
    shard_s = n if strategy in ("fsdp", "zero2") else 1

    c: dict[str, float] = {}
    c["frozen"] = w * F / shard_p
    c["trainable"] = 4 * T / shard_p
    c["grads"] = 4 * T / shard_s
    c["adam"] = 8 * T / shard_s
    if n == 1:
        c["comm"] = 0
    elif strategy == "ddp":
        c["comm"] = 4 * T
    elif strategy == "zero2":
        c["comm"] = 4 * min(T, zero2_bucket_elements)
    else:
        c["comm"] = 2 * a * inv.largest_unit + 4 * inv.largest_trainable_unit
    c["context"] = context_gib * GIB
    layer = llm_layer_bytes_per_token(cfg, a)
    per_seq = (L * RESIDUAL_BYTES * h + layer) if grad_checkpointing else L * layer
    c["llm_act"] = b * (s * per_seq + s * RESIDUAL_BYTES * h + s * s)
    c["lm_ce"] = b * answer * (a * h + (a + 8) * vocab)
    pe = cfg.pixel_encoder
    p_tok, pc, nsem = pe.grid ** 2, cfg.pixel_dim, tc.semantic
    spam = a * (p_tok * pc + 3 * p_tok * h + 4 * nsem * h)
    agmd = a * (8 * cfg.agmd.depth + 17) * p_tok * pc + 18 * pe.img_size ** 2 * 4
    sig_saved, sam_saved = _encoder_saved(cfg, tc, a)
    c["spam_agmd"] = b * (spam + agmd + sig_saved + sam_saved)
    c["autocast"] = a * inv.cast_params if (a < 4 and strategy != "fsdp") else 0
    est = activation_estimates(cfg, tc, a)
    c["siglip_fwd"] = b * est["vision"]
    c["sam_fwd"] = b * (est["sam_encoder"] + a * nsem * h)
    c["adam_step"] = 4 * T / shard_s

    phases = {k: sum(c[x] for x in v) for k, v in PHASES.items()}
    peak = max(phases, key=phases.get)
    total = sum(c[k] for k in STATIC) + phases[peak]
    return TrainPlan(config=cfg.name, strategy=strategy, dtype=dtype, compute_dtype=compute_dtype, world_size=n,
                     micro_batch=b, grad_checkpointing=grad_checkpointing, image_size=image_size,
                     semantic_tokens=nsem, sequence=s, trainable_params=T, frozen_params=F,
                     components={k: c[k] / GIB for k in COMPONENTS}, total_gib=total / GIB, peak_phase=peak)


# ---- the table -------------------------------------------------------------------------------

def _g(x: float) -> str:
    return f"{x:,.2f}"


def _row(p: TrainPlan, gpu_gib: float | None) -> str:
    c = p.components
    other = c["comm"] + c["context"] + c["autocast"] + c["lm_ce"]
    enc = max(c["siglip_fwd"], c["sam_fwd"])
    cells = [p.strategy, p.dtype, f"{p.image_size}²", "on" if p.grad_checkpointing else "off", f"{p.sequence:,}",
             _g(c["frozen"]), _g(c["trainable"]), _g(c["grads"]), _g(c["adam"]), _g(c["llm_act"]),
             _g(c["spam_agmd"]), _g(enc), _g(other), p.peak_phase, f"**{_g(p.total_gib)}**"]
    if gpu_gib is not None:
        cells.append("yes" if p.fits(gpu_gib) else "**no**")
    return "| " + " | ".join(cells) + " |"


def plan_table(cfg, world_size: int = 1, micro_batch: int = 1, gpu_gib: float | None = None) -> str:
    """Markdown table of :func:`plan_training` over strategies x base dtypes x {384², 1024²} x
    checkpointing on/off (GiB per GPU; compute dtype = base dtype), with a "fits" column when
    ``gpu_gib`` is given."""
    inv = _inventory(cfg)
    head = ["strategy", "dtype", "image", "ckpt", "seq", "frozen", "trainable", "grads", "AdamW", "LLM act.",
            "SPAM/AGMD act.", "encoders fwd", "comm+ctx+autocast+CE", "peak phase", "total"]
    if gpu_gib is not None:
        head.append(f"fits {gpu_gib:g} GiB")
    lines = [f"### Training memory plan: `{cfg.name}`, world size {world_size}, micro-batch {micro_batch} per GPU",
             "",
             f"Parameters: {inv.trainable:,} trainable (fp32 masters + fp32 grads + 2x fp32 AdamW), "
             f"{inv.frozen:,} frozen (base dtype). GiB per GPU; total = static + the largest phase "
             f"(encoders' forward, LLM forward/backward, AdamW step); context {CONTEXT_GIB} GiB; answer "
             f"{cfg.max_new_tokens} tokens. An estimate, not a measurement.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for strategy in STRATEGIES:
        for dtype in DTYPES:
            for size in IMAGE_SIZES:
                for ckpt in (True, False):
                    p = plan_training(cfg, strategy=strategy, dtype=dtype, world_size=world_size,
                                      micro_batch=micro_batch, grad_checkpointing=ckpt, image_size=size)
                    lines.append(_row(p, gpu_gib))
    return "\n".join(lines)


# ---- CLI glue --------------------------------------------------------------------------------

def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    """``--plan``, ``--gpu-memory GIB`` and ``--force`` for ``agvas train``."""
    g = parser.add_argument_group("memory plan")
    g.add_argument("--plan", action="store_true",
                   help="print the per-GPU training memory plan (strategies x dtypes x image sizes x checkpointing, "
                        "and the line for the chosen setting) and exit")
    g.add_argument("--gpu-memory", type=float, metavar="GIB", default=None,
                   help="GPU memory per device in GiB for the fit check (default: the CUDA device's total memory "
                        "when CUDA is available, else no check)")
    g.add_argument("--force", action="store_true", help="launch even when the memory plan says it will not fit")


def world_size_from_env() -> int:
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def gpu_memory_gib(args) -> float | None:
    """``--gpu-memory``, else the CUDA device's total memory, else None."""
    v = getattr(args, "gpu_memory", None)
    if v is not None:
        return float(v)
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        dev = str(getattr(args, "device", "") or "")
        idx = int(dev.split(":")[1]) if dev.startswith("cuda:") else torch.cuda.current_device()
        return torch.cuda.get_device_properties(idx).total_memory / GIB
    except Exception:
        return None


def _dtypes(args) -> tuple[str, str]:
    """(base dtype, compute dtype) as the trainer resolves them: ``--dtype``, else bf16 on CUDA
    and fp32 on CPU; a bf16/fp16 base computes under autocast in that dtype."""
    base = getattr(args, "dtype", None)
    if not base:
        dev = str(getattr(args, "device", None) or "")
        if not dev:
            import torch

            dev = "cuda" if torch.cuda.is_available() else "cpu"
        base = "bf16" if dev.startswith("cuda") else "fp32"
    return base, base


def _setting(args, world_size: int) -> dict[str, Any]:
    base, compute = _dtypes(args)
    return dict(strategy=resolve_strategy(getattr(args, "strategy", None), world_size), dtype=base,
                compute_dtype=compute, world_size=world_size, micro_batch=int(getattr(args, "batch_size", 1) or 1),
                grad_checkpointing=bool(getattr(args, "grad_checkpointing", False)),
                image_size=int(getattr(args, "image_size", None) or 1024))


def config_from_args(args):
    """The config of ``args.config`` with the real dimensions of ``--llava`` (its ``config.json``
    only; no weights are read) and ``--sam`` (the variant from the file name, else its weights)."""
    from pathlib import Path

    from agvas.cli import CLIError

    from .config import SAM_VARIANTS, PixelEncoderConfig, get_config

    cfg = get_config(getattr(args, "config", None) or "tiny")
    llava = getattr(args, "llava", None)
    if llava:
        from transformers import LlavaOnevisionConfig

        from .modeling.build import _llava_kwargs

        if not (Path(llava) / "config.json").is_file():
            raise CLIError(f"--llava {llava}: not a Hugging Face model directory (no config.json)")
        cfg.llava = _llava_kwargs(LlavaOnevisionConfig.from_pretrained(str(llava), local_files_only=True))
        cfg.tokenizer_dir = str(Path(llava).resolve())
    sam = getattr(args, "sam", None)
    if sam:
        name = Path(sam).name.lower()
        variant = next((v for k, v in SAM_VARIANTS.items() if k in name), None)
        if variant is not None:
            cfg.pixel_encoder = PixelEncoderConfig(img_size=1024, patch_size=16, window_size=14, out_chans=256,
                                                   **variant)
        else:
            from .modeling.weights import read_sam_encoder_state, sam_encoder_config

            cfg.pixel_encoder = sam_encoder_config(read_sam_encoder_state(sam), cfg.pixel_encoder, sam)
    return cfg


def print_plan(args) -> int:
    """Print the table for the config and world size of ``args`` and the chosen setting's line."""
    cfg = config_from_args(args)
    n = world_size_from_env()
    st = _setting(args, n)
    gpu = gpu_memory_gib(args)
    print(plan_table(cfg, n, st["micro_batch"], gpu))
    p = plan_training(cfg, **st)
    label, big = p.largest()
    fit = "" if gpu is None else (f"; fits {gpu:.1f} GiB" if p.fits(gpu) else f"; does NOT fit {gpu:.1f} GiB")
    print()
    print(f"chosen: {p.describe()}: {p.total_gib:.2f} GiB per GPU (largest: {label} {big:.2f} GiB, "
          f"peak phase {p.peak_phase}){fit}")
    return 0


def _suggestions(cfg, st: dict[str, Any], gpu: float) -> list[str]:
    """Changes of the setting that fit ``gpu`` GiB (single changes first, then combinations)."""
    out = []
    tries: list[tuple[str, dict[str, Any]]] = []
    for s in STRATEGIES:
        if s != st["strategy"] and not (s == "ddp" and st["world_size"] > 1):
            tries.append((f"--strategy {s}", dict(strategy=s)))
    if not st["grad_checkpointing"]:
        tries.append(("--grad-checkpointing", dict(grad_checkpointing=True)))
    if st["micro_batch"] > 2:
        tries.append((f"--batch-size {st['micro_batch'] // 2} (more --grad-accum)", dict(micro_batch=st["micro_batch"] // 2)))
    if st["micro_batch"] > 1:
        tries.append(("--batch-size 1 (more --grad-accum)", dict(micro_batch=1)))
    if DTYPE_BYTES[st["dtype"]] == 4:
        tries.append(("--dtype bf16", dict(dtype="bf16", compute_dtype="bf16")))
    for label, change in tries:
        if plan_training(cfg, **{**st, **change}).fits(gpu):
            out.append(label)
    if out:
        return out
    best = dict(grad_checkpointing=True, micro_batch=1)
    if DTYPE_BYTES[st["dtype"]] == 4:
        best.update(dtype="bf16", compute_dtype="bf16")
    flags = {"grad_checkpointing": "--grad-checkpointing", "micro_batch": "--batch-size 1", "dtype": "--dtype bf16"}
    combo = " ".join(flags[k] for k, v in best.items() if k in flags and st.get(k) != v)
    for n in (st["world_size"], 2, 4, 8, 16):
        if n < st["world_size"]:
            continue
        p = plan_training(cfg, **{**st, **best, "strategy": "fsdp" if n > 1 else st["strategy"], "world_size": n})
        if p.fits(gpu):
            more = f"{n} GPUs (WORLD_SIZE={n}) with --strategy fsdp" if n != st["world_size"] else "--strategy fsdp"
            out.append(" ".join(x for x in (more, combo) if x) + f" (~{p.total_gib:.1f} GiB)")
            return out
    out.append(f"more or larger GPUs ({combo or 'the smallest setting'} with fsdp on 16 GPUs still needs "
               f"~{p.total_gib:.1f} GiB)")
    return out


def check_fits(args, cfg, world_size: int) -> None:
    """Raise :class:`agvas.cli.CLIError` when ``--gpu-memory`` (or the CUDA device's memory) is
    known, the plan for ``args`` exceeds it and ``--force`` is not set."""
    from agvas.cli import CLIError

    gpu = gpu_memory_gib(args)
    if gpu is None or getattr(args, "force", False):
        return
    st = _setting(args, world_size)
    p = plan_training(cfg, **st)
    if p.fits(gpu):
        return
    label, big = p.largest()
    tips = "; ".join(_suggestions(cfg, st, gpu))
    raise CLIError(f"training will not fit: {p.describe()} needs ~{p.total_gib:.1f} GiB per GPU but "
                   f"{gpu:.1f} GiB are available (largest component: {label} {big:.1f} GiB); try {tips}; "
                   f"or pass --force to launch anyway (agvas train --plan shows the breakdown)")
