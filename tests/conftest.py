"""Shared fixtures: the `tiny-sam` config (tiny with SAM's ViT pixel encoder, exported as the
real configs' is; `tiny`'s EfficientNet encoder has tests/test_effnet_encoder.py) built from its
registry entry, and a tiny model that emits the anchors (a randomly initialised model never does; learning the answer template is quick)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def random_image(seed: int, w: int, h: int) -> Image.Image:
    rng = np.random.RandomState(seed)
    base = rng.rand(1, 1, 3) * 200
    noise = rng.rand(h, w, 3) * 55
    return Image.fromarray((base + noise).astype(np.uint8))


@pytest.fixture(scope="session")
def tiny_parts():
    from agvas.train.config import tiny_sam
    from agvas.train.modeling import build_model, image_processor_for

    cfg = tiny_sam()
    model, tok = build_model(cfg)
    return model, tok, image_processor_for(cfg)


@pytest.fixture(scope="session")
def trained_tiny_checkpoint(tmp_path_factory):
    """Checkpoint dir of a tiny model trained with the real trainer (`quick_train_tiny`: ~300
    steps on blob-like synthetic defects, direct mode). ``AGVAS_TEST_CHECKPOINT=DIR`` uses DIR."""
    from pathlib import Path

    env = os.environ.get("AGVAS_TEST_CHECKPOINT")
    if env:
        return Path(env)
    from agvas.train.train import CHECKPOINT, quick_train_tiny

    out = tmp_path_factory.mktemp("trained_tiny")
    quick_train_tiny(out)
    return out / CHECKPOINT


@pytest.fixture(scope="session")
def trained_tiny(trained_tiny_checkpoint):
    """``(model, tokenizer, image_processor)`` of that checkpoint: answers "Sure, it is
    [NOR][ANO][SEG]." in direct mode with decisive maps. Anomalous test images:
    ``agvas.train.data.synthetic.make_sample(cat, kind, seed, i)`` (see ``train.QUICK_SPEC``)."""
    from agvas.train.checkpoint import load_checkpoint

    model, tok, proc, _ = load_checkpoint(trained_tiny_checkpoint)
    return model, tok, proc


@pytest.fixture(scope="session")
def anchor_model():
    """A tiny model taught (text loss only) to answer the direct instruction with the anchors."""
    from agvas.train.config import tiny_sam
    from agvas.train.modeling import build_model, image_processor_for
    from agvas.train.reference import ReferencePipeline, prompt_ids
    from agvas.train.templates import CANONICAL_DIRECT_ANSWER, canonical_instruction

    torch.manual_seed(0)
    cfg = tiny_sam()
    model, tok = build_model(cfg)
    proc = image_processor_for(cfg)
    pipe = ReferencePipeline(model, tok, proc)
    opt = torch.optim.AdamW([p for p in model.parameters()], lr=2e-3)
    model.train()
    answer = CANONICAL_DIRECT_ANSWER + cfg.eos_token
    for step in range(150):
        img = random_image(step, 64 + 16 * (step % 3), 64 + 16 * ((step // 3) % 3))
        prep = pipe.prepare(img)
        f_s = model.semantic_features(prep.pixel_values, prep.image_sizes)[0][None]
        pix = model.pixel_embedding(prep.sam_input)
        vis = model.visual_tokens(f_s, pix)
        ids = prompt_ids(tok, model, canonical_instruction("direct"), vis.shape[1], answer=answer)
        n_prompt = len(prompt_ids(tok, model, canonical_instruction("direct"), vis.shape[1]))
        ids_t = torch.tensor([ids])
        h = model.language_model(inputs_embeds=model.embed_prompt(ids_t, vis)).last_hidden_state
        logits = model.lm_head(h[:, n_prompt - 1:-1])
        loss = torch.nn.functional.cross_entropy(logits[0], ids_t[0, n_prompt:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model, tok, proc

