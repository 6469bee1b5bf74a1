"""Checkpoint round trip, the real-format loaders and their errors."""

from __future__ import annotations

import pickle

import pytest
import torch
from conftest import random_image

from agvas.train.checkpoint import load_checkpoint, save_checkpoint
from agvas.train.config import tiny_sam
from agvas.train.modeling import build_model, image_processor_for
from agvas.train.reference import ReferencePipeline


def test_round_trip_bit_exact(anchor_model, tmp_path):
    model, tok, proc = anchor_model
    out = save_checkpoint(model, tok, proc, tmp_path / "ckpt")
    m2, tok2, proc2, meta = load_checkpoint(out)
    s1, s2 = model.state_dict(), m2.state_dict()
    assert s1.keys() == s2.keys()
    for k in s1:
        assert torch.equal(s1[k], s2[k]), k
    assert meta["token_ids"] == model.ids.to_dict()
    assert tok2.encode("Sure, it is [NOR][ANO][SEG].") == tok.encode("Sure, it is [NOR][ANO][SEG].")
    r1 = ReferencePipeline(model, tok, proc)(random_image(1, 70, 90))
    r2 = ReferencePipeline(m2, tok2, proc2)(random_image(1, 70, 90))
    assert r1.text == r2.text and (r1.prob == r2.prob).all()
    # overwriting is atomic and leaves no temp dirs behind
    save_checkpoint(model, tok, proc, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_lora_checkpoint_saves_trainable_and_merges(tmp_path):
    """A LoRA checkpoint (base weights from a --llava dir) stores the trainable parts; merge matches."""
    from agvas.train.lora import apply_lora, configure_trainable

    cfg = tiny_sam()
    cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout = 4, 8, 0.0
    model, tok = build_model(cfg)
    proc = image_processor_for(cfg)
    llava_dir = tmp_path / "llava"
    model.llava.save_pretrained(llava_dir)
    tok.save_pretrained(llava_dir)
    proc.save_pretrained(llava_dir)
    apply_lora(model)
    configure_trainable(model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    out = save_checkpoint(model, tok, proc, tmp_path / "ckpt", base={"llava": str(llava_dir), "sam": None})
    m2, _, _, meta = load_checkpoint(out)
    assert meta["saved"] == "trainable" and meta["lora"] is True
    x = torch.randn(1, 5, cfg.hidden_size)
    with torch.no_grad():
        want = model.language_model(inputs_embeds=x).last_hidden_state
        torch.testing.assert_close(m2.language_model(inputs_embeds=x).last_hidden_state, want)
    m3, _, _, _ = load_checkpoint(out, merge=True)
    assert not any("lora_" in n for n in m3.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(m3.language_model(inputs_embeds=x).last_hidden_state, want, atol=1e-5, rtol=1e-5)


def _official_sam_file(path, model):
    """A file in the official sam_vit_*.pth layout: the whole Sam state dict, flat."""
    state = {f"image_encoder.{k}": v.clone() for k, v in model.pixel_encoder.state_dict().items()}
    state["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"] = torch.randn(2, 128)
    state["mask_decoder.iou_token.weight"] = torch.randn(1, 256)
    torch.save(state, path)
    return state


def test_sam_loader_official_layout(tiny_parts, tmp_path):
    model, _, _ = tiny_parts
    f = tmp_path / "sam_vit_tiny.pth"
    state = _official_sam_file(f, model)
    m2, _ = build_model(tiny_sam(), sam_path=f)
    for k, v in m2.pixel_encoder.state_dict().items():
        assert torch.equal(v, state[f"image_encoder.{k}"])


def test_sam_loader_errors(tiny_parts, tmp_path):
    model, _, _ = tiny_parts
    with pytest.raises(FileNotFoundError, match="missing.pth: file not found"):
        build_model(tiny_sam(), sam_path=tmp_path / "missing.pth")
    bad = tmp_path / "wrong_shape.pth"
    state = {f"image_encoder.{k}": v for k, v in model.pixel_encoder.state_dict().items()}
    state["image_encoder.neck.0.weight"] = torch.zeros(3, 3, 1, 1)
    torch.save(state, bad)
    with pytest.raises(ValueError, match=r"wrong_shape\.pth.*neck\.0\.weight"):
        build_model(tiny_sam(), sam_path=bad)
    miss = tmp_path / "missing_keys.pth"
    state = {f"image_encoder.{k}": v for k, v in model.pixel_encoder.state_dict().items() if "blocks.0." not in k}
    torch.save(state, miss)
    with pytest.raises(ValueError, match=r"missing_keys\.pth.*missing \['blocks\.0\."):
        build_model(tiny_sam(), sam_path=miss)
    evil = tmp_path / "pickle.pth"
    with open(evil, "wb") as fh:
        pickle.dump({"image_encoder.x": _Opaque()}, fh)
    with pytest.raises(ValueError, match=r"pickle\.pth: not a weights-only checkpoint"):
        build_model(tiny_sam(), sam_path=evil)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth"):
        build_model(tiny_sam(), sam_path=junk)


class _Opaque:  # an arbitrary class: a weights-only load must refuse it
    pass


def test_llava_dir_loader(tiny_parts, tmp_path):
    model, tok, proc = tiny_parts
    d = tmp_path / "llava-onevision-tiny-hf"
    model.llava.save_pretrained(d)
    tok.save_pretrained(d)
    proc.save_pretrained(d)
    m2, tok2 = build_model(tiny_sam(), llava_dir=d)
    for k, v in model.llava.state_dict().items():
        assert torch.equal(v, m2.llava.state_dict()[k]), k
    assert m2.ids == model.ids and m2.cfg.tokenizer_dir == str(d.resolve())
    with pytest.raises(FileNotFoundError, match="no config.json"):
        build_model(tiny_sam(), llava_dir=tmp_path)


def test_checkpoint_errors(anchor_model, tmp_path):
    model, tok, proc = anchor_model
    with pytest.raises(FileNotFoundError, match="not an AG-VAS checkpoint"):
        load_checkpoint(tmp_path)
    out = save_checkpoint(model, tok, proc, tmp_path / "ck")
    (out / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="missing model.safetensors"):
        load_checkpoint(out)
    # wrong-shape weight: a checkpoint of another size
    from safetensors.torch import save_file

    state = {k: v.clone().contiguous() for k, v in model.state_dict().items()}
    state["spam.pixel_proj.weight"] = torch.zeros(3, 3)
    save_file(state, str(out / "model.safetensors"))
    with pytest.raises(ValueError, match=r"spam\.pixel_proj\.weight: file \(3, 3\)"):
        load_checkpoint(out)
