"""Memory plan: per-engine numbers match the parameter counts, token counts match HF's packing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from agvas.calibration.memory_plan import (ENGINES, PRECISIONS, engine_weights, format_plan, kv_cache_bytes, memory_plan,
                                     token_counts)


@pytest.mark.parametrize("name", ["tiny", "tiny-sam", "ov-0.5b", "ov-7b"])
def test_engine_weights_match_parameter_counts(name):
    plan = memory_plan(name)
    c, w = plan["parameter_counts"], plan["weights"]
    assert w["vision"]["params"] == c["vision_tower"] + c["projector"]
    assert w["sam_encoder"]["params"] == c["pixel_encoder"]
    assert w["spam"]["params"] == c["spam"]
    assert w["agmd"]["params"] == c["refiner"] + c["agmd"]
    assert w["llm"]["params"] + w["embed_tokens"]["params"] == c["llm"]
    tied = w["lm_head"]["tied_to"] is not None
    assert tied == (c["lm_head"] == 0)
    assert w["lm_head"]["params"] == (w["embed_tokens"]["params"] if tied else c["lm_head"])
    unique = sum(w[e]["params"] for e in ENGINES) - (w["lm_head"]["params"] if tied else 0)
    assert unique == c["total"]
    for e in ENGINES:
        b = w[e]["bytes"]
        assert b["fp32"] == 4 * w[e]["params"] and b["fp16"] == 2 * w[e]["params"]
        assert b["int4"] <= b["int8"] <= b["fp32"]
    assert plan["weights_total_bytes"]["fp32"] == 4 * sum(w[e]["params"] for e in ENGINES)
    text = format_plan(plan)
    assert "orin_nx_16gb" in text and "| llm |" in text


def test_int8_int4_bytes_by_hand():
    """ov-0.5b LLM: every Linear of the decoder by hand (int8: 1 B + fp32 scale + int8 zp per
    output channel; int4 block 32: 16 B data + 4 B scale + ½ B zero point per block)."""
    from agvas.train.config import get_config
    from agvas.train.modeling import build_model

    model, _ = build_model(get_config("ov-0.5b"), device="meta")
    llm = engine_weights(model)["llm"]
    t = get_config("ov-0.5b").llava["text_config"]
    h, i, L, kv, d = t["hidden_size"], t["intermediate_size"], t["num_hidden_layers"], t["num_key_value_heads"], 64
    shapes = [(h, h), (kv * d, h), (kv * d, h), (h, h), (i, h), (i, h), (h, i)]  # (N, K): q k v o gate up down
    assert sorted((m.n, m.k) for m in llm.matrices) == sorted(shapes * L)
    mat = L * sum(n * k for n, k in shapes)
    assert llm.matrix_params == mat
    floats = llm.params - mat  # norms and q/k/v biases
    assert llm.bytes("int8") == mat + 5 * L * sum(n for n, _ in shapes) + 4 * floats
    int4 = L * sum(n * (k // 32) * (16 + 4) + n * ((k // 32 + 1) // 2) for n, k in shapes)
    assert llm.bytes("int4") == int4 + 4 * floats
    assert llm.bytes("int4", block_size=128) < llm.bytes("int4", block_size=32)


def test_token_counts_match_hf_rules_and_the_model(tiny_parts):
    from agvas.train.config import get_config
    from agvas.train.modeling import build_model
    from agvas.train.preprocess import prepare_image
    from conftest import random_image

    model, tok = build_model(get_config("ov-0.5b"), device="meta")
    assert token_counts(model, tok, (384, 384)).semantic == 1485  # FACTS: anyres_max_9, SigLIP 384/14
    assert token_counts(model, tok, (1024, 1024)).semantic == 7371
    base = token_counts(model, tok, (1024, 1024), "base")
    assert (base.semantic, base.visual, base.n_crops) == (730, 1460, 1)
    # tiny: the counts equal what the real model packs for images of several sizes
    m, t, proc = tiny_parts
    for w, h in [(64, 64), (100, 80), (50, 130)]:
        prep = prepare_image(random_image(0, w, h), m.cfg, proc)
        with torch.no_grad():
            n = m.semantic_features(prep.pixel_values, prep.image_sizes)[0].shape[0]
        tc = token_counts(m, t, (h, w))
        assert tc.semantic == n and tc.visual == 2 * n and tc.n_crops == prep.pixel_values.shape[1]
        assert tc.prompt > tc.visual and tc.answer >= 5


def test_kv_bytes_and_device_fit():
    from agvas.train.config import get_config

    cfg = get_config("ov-0.5b")
    assert kv_cache_bytes(cfg, 3000, 4) == 2 * 24 * 2 * 64 * 3000 * 4
    plan = memory_plan("ov-7b", images=((384, 384),))
    rows = {(r["scenario"], r["vision_tokens"]): r for r in plan["devices"]}
    fp16 = rows[("fp16", "anyres")]
    # 7B in fp16: weights alone exceed a 16 GB Orin NX; int4 LLM fits it, nothing fits an 8 GB Nano
    assert fp16["weights_bytes"] > 16e9 and not fp16["fits"]["orin_nx_16gb"] and fp16["fits"]["agx_orin_64gb"]
    assert rows[("llm-int4 + vision-int8", "anyres")]["fits"]["orin_nx_16gb"]
    assert not any(r["fits"]["orin_nano_8gb"] for r in plan["devices"])
    assert all(r["total_bytes"] == r["weights_bytes"] + r["kv_bytes"] + r["activation_bytes"] for r in plan["devices"])
    assert np.isclose(plan["tokens"][0]["kv_bytes"]["fp16"] * 2, plan["tokens"][0]["kv_bytes"]["fp32"])
    assert set(PRECISIONS) == set(plan["weights_total_bytes"])
