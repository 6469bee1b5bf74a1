"""FLOPs per pipeline stage, counted from the config and the token counts.

Convention: 2 FLOPs per multiply-accumulate of every matrix product (linear layers, convolutions,
attention scores and values, SAM's decomposed relative-position einsums); element-wise work
(norms, activations, softmax, residual adds, interpolation) is not counted — it is memory-bound and
small next to the products. Causal attention in the LLM counts only the keys a query can see
(``causal=True``, the algorithmic minimum); ``causal=False`` counts the dense ``S×(P+S)`` product
that unfused kernels execute (what ``torch.utils.flop_counter`` reports for SDPA).

Written by hand (no library counts FLOPs from a config without building the model); checked in
``tests/test_bench_flops.py`` against hand counts and against ``torch.utils.flop_counter`` on the
real ``tiny`` modules.
"""

from __future__ import annotations

from agvas.train.config import AGVASConfig

STAGES = ("vision", "sam_encoder", "spam", "prefill", "lm_head", "decode", "agmd")


# ---- stages ---------------------------------------------------------------------------------

def _linear(tokens: int, d_in: int, d_out: int) -> int:
    return 2 * tokens * d_in * d_out


def siglip_flops(cfg: AGVASConfig, n_crops: int) -> int:
    """SigLIP tower on ``n_crops`` crops (patch-embedding conv + every encoder layer)."""
    v = cfg.llava["vision_config"]
    d, inter, layers = int(v["hidden_size"]), int(v["intermediate_size"]), int(v["num_hidden_layers"])
    p = int(v["patch_size"])
    n = (int(v["image_size"]) // p) ** 2
    embed = _linear(n, 3 * p * p, d)
    layer = 4 * _linear(n, d, d) + 2 * (2 * n * n * d) + _linear(n, d, inter) + _linear(n, inter, d)
    return n_crops * (embed + layers * layer)


def projector_flops(cfg: AGVASConfig, n_crops: int) -> int:
    """The two-layer MLP projector over every crop's patch tokens (it runs before packing)."""
    v = cfg.llava["vision_config"]
    n = (int(v["image_size"]) // int(v["patch_size"])) ** 2
    h = cfg.hidden_size
    return n_crops * (_linear(n, int(v["hidden_size"]), h) + _linear(n, h, h))


def sam_encoder_flops(cfg: AGVASConfig, batch: int = 1) -> dict[str, int]:
    """SAM ``ImageEncoderViT``: patch conv, windowed blocks (on the window-padded grid), global
    blocks, decomposed relative positions, neck. Returns the parts and ``total``. For the frozen
    EfficientNet-Lite0 encoder (``kind`` ``efficientnet_lite0``): ``backbone``, ``neck``, ``total``."""
    pe = cfg.pixel_encoder
    if pe.kind == "efficientnet_lite0":
        from agvas.train.modeling.effnet import effnet_flops

        return effnet_flops(pe, batch)
    g, d, w = pe.grid, pe.embed_dim, pe.window_size
    mlp = int(d * pe.mlp_ratio)
    tokens = g * g
    patch = _linear(tokens, 3 * pe.patch_size**2, d)

    def attention(side: int, windows: int) -> int:  # one attention over `windows` squares of side²
        t = side * side
        proj = _linear(t, d, 3 * d) + _linear(t, d, d)
        scores = 2 * (2 * t * t * d)
        rel = 2 * t * (side + side) * d  # decomposed relative positions: einsums bhwc,hkc and bhwc,wkc
        return windows * (proj + scores + rel)

    padded = -(-g // w) * w if w else g
    windowed = attention(w, (padded // w) ** 2) if w else 0
    glob = attention(g, 1)
    n_global = len(pe.global_attn_indexes)
    n_window = pe.depth - n_global
    mlp_f = _linear(tokens, d, mlp) + _linear(tokens, mlp, d)
    neck = _linear(tokens, d, pe.out_chans) + _linear(tokens, 9 * pe.out_chans, pe.out_chans)
    parts = {
        "patch_embed": patch,
        "windowed_attention": n_window * windowed,
        "global_attention": n_global * glob,
        "mlp": pe.depth * mlp_f,
        "neck": neck,
    }
    parts = {k: batch * v for k, v in parts.items()}
    parts["total"] = sum(parts.values())
    return parts


def spam_flops(cfg: AGVASConfig, n_semantic: int, batch: int = 1) -> int:
    """SPAM: ``Linear_p`` over the pixel tokens, then cross-attention (Q = N semantic tokens)."""
    h, c, hw = cfg.hidden_size, cfg.pixel_dim, cfg.pixel_encoder.grid ** 2
    f = _linear(hw, c, h)  # pixel_proj
    f += _linear(n_semantic, h, h) + 2 * _linear(hw, h, h)  # in-projections q, k, v
    f += 2 * (2 * n_semantic * hw * h)  # scores + values
    f += _linear(n_semantic, h, h)  # out-projection
    return batch * f


def _text(cfg: AGVASConfig) -> dict:
    return cfg.llava["text_config"]


def llm_flops(cfg: AGVASConfig, new_tokens: int, past: int = 0, causal: bool = True, batch: int = 1) -> dict[str, int]:
    """Qwen2 decoder (no LM head) on ``new_tokens`` positions after ``past`` cached ones.
    Returns ``linear``, ``attention`` (the S² / S·P terms) and ``total``."""
    t = _text(cfg)
    h, inter, layers = int(t["hidden_size"]), int(t["intermediate_size"]), int(t["num_hidden_layers"])
    heads, kv = int(t["num_attention_heads"]), int(t["num_key_value_heads"])
    hd = h // heads
    s = new_tokens
    lin = _linear(s, h, h) * 2 + _linear(s, h, kv * hd) * 2 + 3 * _linear(s, h, inter)
    keys = s * past + (s * (s + 1) // 2 if causal else s * s)  # query-key pairs
    att = 2 * (2 * keys * heads * hd)  # QK^T and AV
    out = {"linear": batch * layers * lin, "attention": batch * layers * att}
    out["total"] = out["linear"] + out["attention"]
    return out


def lm_head_flops(cfg: AGVASConfig, positions: int = 1, vocab: int | None = None, batch: int = 1) -> int:
    """The LM head at ``positions`` positions (last only in the runtime; the answer positions on the
    fast path; every position in a naive forward)."""
    v = vocab or int(_text(cfg)["vocab_size"])
    return batch * _linear(positions, cfg.hidden_size, v)


def agmd_flops(cfg: AGVASConfig, batch: int = 1) -> int:
    """Token refiner + AGMD (positional encoding, two-way blocks, final token→image attention,
    upscaling, hypernetworks, mask products)."""
    h, c, g = cfg.hidden_size, cfg.pixel_dim, cfg.pixel_encoder.grid
    a = cfg.agmd
    hw, q = g * g, 6
    refiner = _linear(3, h, h) + _linear(3, h, c)

    def attn(nq: int, nk: int, internal: int) -> int:
        return _linear(nq, c, internal) + 2 * _linear(nk, c, internal) + 2 * (2 * nq * nk * internal) + _linear(nq, internal, c)

    block = attn(q, q, c) + attn(q, hw, c // 2) + _linear(q, c, a.mlp_dim) + _linear(q, a.mlp_dim, c) + attn(hw, q, c // 2)
    final = attn(q, hw, c // 2)
    upscale = _linear(hw, c, (c // 4) * 4) + _linear(4 * hw, c // 4, (c // 8) * 4)  # 2×2 transposed convs
    hyper = 3 * (_linear(1, c, c) * 2 + _linear(1, c, c // 8))
    masks = 3 * 2 * (c // 8) * (16 * hw)
    pos = _linear(hw, 2, c // 2)  # SAM's random-Fourier positional encoding of the grid
    return batch * (refiner + pos + a.depth * block + final + upscale + hyper + masks)


def pipeline_flops(cfg: AGVASConfig, tokens, *, vocab: int | None = None, causal: bool = True) -> dict[str, int]:
    """FLOPs of every stage for one image with the counts of ``tokens``
    (a :class:`agvas.calibration.memory_plan.TokenCount`: crops, N, prompt, answer): ``prefill`` is the
    whole prompt, ``decode`` is one generated token at the end of the prompt, ``lm_head`` one
    position (the runtime computes logits only where needed)."""
    return {
        "vision": siglip_flops(cfg, tokens.n_crops) + projector_flops(cfg, tokens.n_crops),
        "sam_encoder": sam_encoder_flops(cfg)["total"],
        "spam": spam_flops(cfg, tokens.semantic),
        "prefill": llm_flops(cfg, tokens.prompt, causal=causal)["total"],
        "lm_head": lm_head_flops(cfg, 1, vocab),
        "decode": llm_flops(cfg, 1, past=tokens.prompt, causal=causal)["total"] + lm_head_flops(cfg, 1, vocab),
        "agmd": agmd_flops(cfg),
    }
