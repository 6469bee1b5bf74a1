"""agvas.benchmarks.flops against hand counts and against torch's FLOP counter on the real tiny modules;
agvas.benchmarks.devices against its published anchors (a model, not a measurement)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from agvas.train.config import PixelEncoderConfig, get_config, tiny_sam
from agvas.benchmarks import flops as F


def _small_cfg():
    cfg = tiny_sam()
    t = cfg.llava["text_config"]
    t.update(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
             vocab_size=10)
    cfg.pixel_encoder = PixelEncoderConfig(img_size=32, patch_size=8, embed_dim=8, depth=2, num_heads=2, window_size=3,
                                           global_attn_indexes=(1,), out_chans=4)
    return cfg


def test_llm_flops_hand_count():
    cfg = _small_cfg()
    # one layer, H=8, kv dim 4 (1 head of 4), I=16, S=4 new tokens, no past:
    # q 4·8·8 + k 4·8·4 + v 4·8·4 + o 4·8·8 + MLP 3·4·8·16 = 256+128+128+256+1536 MACs
    linear = 2 * (256 + 128 + 128 + 256 + 1536)
    # causal pairs 1+2+3+4 = 10; QK and AV: 10 pairs · 2 heads · 4 dims each
    attention = 2 * (10 * 8 + 10 * 8)
    got = F.llm_flops(cfg, 4)
    assert got == {"linear": linear, "attention": attention, "total": linear + attention}
    # dense: 16 pairs; decode at past 6: 7 pairs
    assert F.llm_flops(cfg, 4, causal=False)["attention"] == 2 * (16 * 8 + 16 * 8)
    assert F.llm_flops(cfg, 1, past=6)["attention"] == 2 * (7 * 8 + 7 * 8)
    assert F.lm_head_flops(cfg, 3, vocab=10) == 2 * 3 * 8 * 10


def test_sam_flops_hand_count_windowed_vs_global():
    cfg = _small_cfg()
    # grid 4×4 = 16 tokens, dim 8; window 3 -> grid padded to 6 -> 4 windows of 9 tokens
    patch = 16 * (3 * 64) * 8
    def attn(t, side):  # qkv + proj, QK + AV (t² · 8 each), decomposed rel-pos t·(2·side)·8
        return t * 8 * 24 + t * 8 * 8 + 2 * t * t * 8 + t * 2 * side * 8
    windowed = 4 * attn(9, 3)
    glob = attn(16, 4)
    mlp = 2 * (16 * 8 * 32 + 16 * 32 * 8)  # MACs of both blocks' MLPs (depth 2)
    neck = 16 * 8 * 4 + 16 * 36 * 4
    got = F.sam_encoder_flops(cfg)
    assert got["patch_embed"] == 2 * patch
    assert got["windowed_attention"] == 2 * windowed
    assert got["global_attention"] == 2 * glob
    assert got["mlp"] == 2 * mlp
    assert got["neck"] == 2 * neck
    assert got["total"] == 2 * (patch + windowed + glob + mlp + neck)


@pytest.fixture(scope="module")
def tiny_model():
    from agvas.train.modeling import build_model

    model, _ = build_model(tiny_sam())
    return model


def _counted(fn) -> int:
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc, torch.no_grad():
        fn()
    return fc.get_total_flops()


def test_flops_match_torch_flop_counter_on_tiny(tiny_model):
    """torch counts matmuls/convs as executed (math SDPA: dense attention), so compare dense."""
    m, cfg = tiny_model, tiny_model.cfg
    g = cfg.pixel_encoder.grid
    pix = torch.randn(1, cfg.pixel_dim, g, g)
    assert _counted(lambda: m.project_crops(torch.randn(5, 3, 64, 64))) == F.siglip_flops(cfg, 5) + F.projector_flops(cfg, 5)
    assert _counted(lambda: m.pixel_embedding(torch.randn(1, 3, 128, 128))) == F.sam_encoder_flops(cfg)["total"]
    assert _counted(lambda: m.align(torch.randn(1, 56, cfg.hidden_size), pix)) == F.spam_flops(cfg, 56)
    emb = torch.randn(1, 50, cfg.hidden_size)
    assert _counted(lambda: m.language_model(inputs_embeds=emb)) == F.llm_flops(cfg, 50, causal=False)["total"]
    assert _counted(lambda: m.decode_masks(torch.randn(1, 3, cfg.hidden_size), pix)) == F.agmd_flops(cfg)
    assert _counted(lambda: m.lm_head(emb[:, -1:])) == F.lm_head_flops(cfg, 1, m.ids.vocab_size)


def test_pipeline_flops_use_the_token_counts(tiny_model):
    from agvas.calibration.memory_plan import token_counts
    from agvas.train.modeling import build_model

    meta, tok = build_model(tiny_sam(), device="meta")
    tc = token_counts(meta, tok, (96, 160))
    f = F.pipeline_flops(tiny_model.cfg, tc, vocab=tiny_model.ids.vocab_size)
    assert set(f) == set(F.STAGES)
    assert f["prefill"] == F.llm_flops(tiny_model.cfg, tc.prompt)["total"]
    assert f["vision"] == F.siglip_flops(tiny_model.cfg, tc.n_crops) + F.projector_flops(tiny_model.cfg, tc.n_crops)


def test_device_model_is_labelled_and_checked_against_published_anchors():
    from agvas.benchmarks import devices as D

    anchors = D.check_anchors()
    assert len(anchors) == 3
    for a in anchors:
        assert a["label"] == "model, not measured"
        assert a["consistent"], a  # the floor stays below what was measured, and explains ≥ 30 % of it
    inv = D.ModelInventory.of(get_config("ov-0.5b"))
    orin = next(d for d in D.DEVICES if d.name.startswith("Jetson AGX"))
    nano = next(d for d in D.DEVICES if d.name.startswith("Jetson Orin Nano"))
    r32 = D.predict(inv, orin, "fp32", image=384)
    r4 = D.predict(inv, orin, "int4", image=384)
    assert r32["label"] == "model, not measured" and r32["prompt_tokens"] > 2 * 1485
    assert r4["decode_ms_per_token"] < r32["decode_ms_per_token"]  # decode is bandwidth bound
    assert r4["stages"]["decode_per_token"]["bound"] == "memory"
    assert r32["weights_gb"] == pytest.approx(4 * 0.99155e9 / 1e9 + 4 * 151936 * 896 / 1e9, rel=0.01)  # + LM-head copy
    big = D.predict(D.ModelInventory.of(get_config("ov-7b")), nano, "fp16", image=1024)
    assert not big["fits"]
