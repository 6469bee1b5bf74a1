"""Foundation: anchor convention, map fusion/postprocessing, configs, trainable sets, prompts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import random_image

from agvas.train.config import CONFIGS, get_config
from agvas.train.modeling import anchor_state_positions, build_model, count_parameters, gather_anchor_states
from agvas.train.modeling.agmd import fuse_maps, postprocess_map
from agvas.train.reference import ReferencePipeline, prompt_ids, prompt_text
from agvas.train.templates import canonical_instruction


def test_anchor_convention_generation_equals_teacher_forcing(anchor_model):
    """The state captured in cached greedy decoding == full-sequence state at p-1 of each anchor."""
    model, tok, proc = anchor_model
    pipe = ReferencePipeline(model, tok, proc)
    prep = pipe.prepare(random_image(7, 96, 80))
    visual, _ = pipe.encode(prep)
    ids = prompt_ids(tok, model, canonical_instruction("direct"), visual.shape[1])
    emb = model.embed_prompt(torch.tensor([ids]), visual)
    tokens, states = pipe.generate(emb, 32)
    assert all(a in tokens for a in model.ids.anchors), tok.decode(tokens)

    full = torch.tensor([ids + tokens])
    with torch.no_grad():
        h = model.language_model(inputs_embeds=model.embed_prompt(full, visual)).last_hidden_state
    pos = anchor_state_positions(full, model.ids.anchors)
    for j, a in enumerate(model.ids.anchors):
        p = ids.__len__() + tokens.index(a)  # the anchor's own position in the sequence
        assert full[0, p] == a
        assert pos[0, j] == p - 1
        torch.testing.assert_close(states[a], h[0, p - 1], atol=1e-5, rtol=1e-5)
        # a wrong offset (the anchor's own position) is a different state
        assert (states[a] - h[0, p]).abs().max() > 1e-3
    got = gather_anchor_states(h, pos)[0]
    torch.testing.assert_close(got, torch.stack([states[a] for a in model.ids.anchors]), atol=1e-5, rtol=1e-5)
    # the captured state is the one whose next-token prediction is the anchor
    for a in model.ids.anchors:
        assert int(model.lm_head(states[a]).argmax()) == a


def test_anchor_positions_missing_anchor():
    ids = torch.tensor([[5, 6, 7, 8]])
    pos = anchor_state_positions(ids, (6, 8, 99))
    assert pos.tolist() == [[0, 2, -1]]
    with pytest.raises(ValueError, match="anchor token is missing"):
        gather_anchor_states(torch.zeros(1, 4, 2), pos)


def test_map_fusion_and_threshold():
    logits = torch.tensor([[[[0.0]], [[2.0]], [[-1.0]]]])  # NOR, ANO, SEG at one pixel
    p, p_seg, p_ano = fuse_maps(logits, 0.5)
    exp_seg = 1 / (1 + np.exp(1.0))
    exp_ano = np.exp(2.0) / (np.exp(0.0) + np.exp(2.0))
    assert float(p_seg) == pytest.approx(exp_seg, rel=1e-6)
    assert float(p_ano) == pytest.approx(exp_ano, rel=1e-6)
    assert float(p) == pytest.approx(0.5 * exp_seg + 0.5 * exp_ano, rel=1e-6)
    assert bool(p > 0.5) == (0.5 * exp_seg + 0.5 * exp_ano > 0.5)
    p2, _, _ = fuse_maps(logits, 1.0)
    assert float(p2) == pytest.approx(exp_seg, rel=1e-6)


@pytest.mark.parametrize("orig", [(300, 200), (120, 400), (64, 64)])
def test_postprocess_to_non_square_original(orig):
    img = 128
    h, w = orig
    scale = img / max(h, w)
    inp = (int(h * scale + 0.5), int(w * scale + 0.5))
    low = torch.zeros(1, 64, 64)
    # a blob in the valid (unpadded) area of the low-res map
    low[0, 10:20, 5:15] = 1.0
    out = postprocess_map(low, inp, orig, img)
    assert out.shape == (1, h, w)
    ref = torch.nn.functional.interpolate(low[None], (img, img), mode="bilinear", align_corners=False)
    ref = torch.nn.functional.interpolate(ref[..., : inp[0], : inp[1]], orig, mode="bilinear", align_corners=False)
    torch.testing.assert_close(out, ref[0])
    # the blob lands where it should: centre of low-res (15, 10) -> original coordinates
    cy, cx = np.argwhere(out[0].numpy() > 0.5).mean(0)
    assert abs(cy - 15 * 2 / scale) < 3 / scale + 2 and abs(cx - 10 * 2 / scale) < 3 / scale + 2
    const = postprocess_map(torch.full((1, 64, 64), 0.7), inp, orig, img)
    assert torch.allclose(const, torch.full_like(const, 0.7))


def test_reference_inference_outputs(anchor_model):
    pipe = ReferencePipeline(*anchor_model)
    r = pipe(random_image(3, 150, 90))
    assert r.text == "Sure, it is [NOR][ANO][SEG]."
    assert r.anchors_found and r.anchor_states.shape == (3, pipe.cfg.hidden_size)
    assert r.prob.shape == r.mask.shape == (90, 150) and r.mask.dtype == bool
    np.testing.assert_array_equal(r.mask, r.prob > 0.5)
    np.testing.assert_allclose(r.prob, 0.5 * r.p_seg + 0.5 * r.p_ano, atol=1e-5)
    assert r.verdict == bool(r.mask.any())
    for mode, extra in [("describe", None), ("describe_plus", "A normal tile is flat and grey."), ("explain", None)]:
        out = pipe(random_image(4, 80, 80), mode=mode, normal_sentence=extra, max_new_tokens=12)
        assert isinstance(out.text, str) and len(out.tokens) <= 12
    with pytest.raises(ValueError, match="normal appearance"):
        pipe(random_image(4, 80, 80), mode="describe_plus")
    with pytest.raises(ValueError, match="unknown mode"):
        pipe(random_image(4, 80, 80), mode="bogus")


def test_prompt_matches_chat_template(tiny_parts):
    model, tok, _ = tiny_parts
    instr = canonical_instruction("direct")
    msgs = [{"role": "system", "content": model.cfg.system_prompt},
            {"role": "user", "content": f"{model.cfg.image_token}\n{instr}"}]
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == prompt_text(model.cfg, instr)
    ids = prompt_ids(tok, model, instr, 10)
    assert ids.count(model.ids.image) == 10
    with pytest.raises(ValueError, match="image token"):
        prompt_text(model.cfg, "look at <image> please")


def test_anchor_tokens_are_single_special_tokens(tiny_parts):
    model, tok, _ = tiny_parts
    ids = tok.encode("Sure, it is [NOR][ANO][SEG].", add_special_tokens=False)
    assert [i for i in ids if i in model.ids.anchors] == list(model.ids.anchors)
    assert model.ids.vocab_size == len(tok)
    assert model.embed_tokens.weight.shape[0] == len(tok) == model.lm_head.weight.shape[0]
    assert model.llava.config.text_config.vocab_size == len(tok)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_configs_build_on_meta_and_round_trip(name):
    from agvas.train.config import AGVASConfig

    cfg = get_config(name)
    assert AGVASConfig.from_dict(cfg.to_dict()) == cfg
    model, _ = build_model(cfg, device="meta")
    counts = count_parameters(model)
    assert counts["total"] == sum(v for k, v in counts.items() if k not in ("total", "trainable"))
    if name == "ov-7b":
        assert 7.0e9 < counts["llm"] < 7.2e9 and 6.2e8 < counts["pixel_encoder"] < 6.5e8  # Qwen2-7B, ViT-H
    if name == "ov-0.5b":
        assert 4.8e8 < counts["llm"] < 5.0e8 and 8.8e7 < counts["pixel_encoder"] < 9.1e7  # Qwen2-0.5B, ViT-B


def test_unknown_config_and_fields():
    from agvas.train.config import AGVASConfig

    with pytest.raises(ValueError, match="unknown config 'nope'"):
        get_config("nope")
    d = get_config("tiny").to_dict()
    d["bogus"] = 1
    with pytest.raises(ValueError, match="unknown fields"):
        AGVASConfig.from_dict(d)


def test_trainable_sets_real_config():
    """ov-0.5b: LoRA on the LLM only; SAM encoder, SigLIP, projector, LLM base frozen."""
    from agvas.train.lora import apply_lora, configure_trainable

    cfg = get_config("ov-0.5b")
    cfg.llava["text_config"]["num_hidden_layers"] = 2  # same classes, fewer layers: fast
    cfg.llava["vision_config"]["num_hidden_layers"] = 2
    cfg.pixel_encoder.depth = 2
    cfg.pixel_encoder.global_attn_indexes = (1,)
    model, _ = build_model(cfg, device="meta")
    apply_lora(model)
    configure_trainable(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith("pixel_encoder.") for n in trainable)
    assert not any(".vision_tower." in n or "multi_modal_projector" in n for n in trainable)
    assert not any("lora_" in n for n in model.state_dict() if ".vision_tower." in n)
    lora = {n for n in trainable if "lora_" in n}
    assert lora and all(".language_model.layers." in n for n in lora)
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} == {
        n.split(".")[-4] for n in lora}
    base = [n for n in trainable if ".language_model.layers." in n and "lora_" not in n]
    assert base == []
    for prefix in ("spam.", "refiner.", "agmd.", "llava.model.language_model.embed_tokens."):
        assert any(n.startswith(prefix) for n in trainable), prefix


def test_tiny_trains_everything(tiny_parts):
    from agvas.train.lora import configure_trainable

    model, _, _ = tiny_parts
    configure_trainable(model)
    assert all(p.requires_grad for p in model.parameters())
