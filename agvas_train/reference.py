"""PyTorch reference inference: image + mode -> text, anchor states, maps, mask, verdict.

Every engine and the runtime are checked against this. It is deliberately plain: the HF image
processor and SAM's transforms for preprocessing, the model's stages in order, and a greedy
decode loop with a KV cache that captures the anchor hidden states (DESIGN §2.5):
the hidden state of the step whose greedy output *is* the anchor.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import DynamicCache

from .modeling.agmd import postprocess_map
from .modeling.agvas import AGVAS
from .preprocess import Prepared, prepare_image
from .templates import canonical_instruction


def prompt_text(cfg, instruction: str) -> str:
    """The chat prompt for ``instruction`` with one image placeholder (before expansion)."""
    if cfg.image_token in instruction:
        raise ValueError(f"instruction must not contain the image token {cfg.image_token!r}")
    return cfg.prompt_format.format(system=cfg.system_prompt, image=cfg.image_token, instruction=instruction)


def followup_text(cfg, instruction: str) -> str:
    """The text after an assistant answer's EOS that opens the next turn (no image) and its
    assistant reply: for Qwen2 ``"\n<|im_start|>user\n{instruction}<|im_end|>\n<|im_start|>assistant\n"``,
    i.e. the user/assistant part of ``cfg.prompt_format`` preceded by what follows the system
    turn's EOS."""
    fmt = cfg.prompt_format
    end_sys = fmt.index("{system}") + len("{system}")
    user = fmt.index("\n", end_sys) + 1
    sep = fmt[end_sys:user].replace(cfg.eos_token, "", 1)
    turn = fmt[user:].replace("{image}\n", "").replace("{image}", "")
    if cfg.image_token in instruction:
        raise ValueError(f"instruction must not contain the image token {cfg.image_token!r}")
    return sep + turn.format(instruction=instruction)


def prompt_ids(tokenizer, model: AGVAS, instruction: str, n_visual: int, answer: str | None = None) -> list[int]:
    """Token ids of the prompt with the image placeholder expanded to ``n_visual`` (=2N) positions;
    ``answer`` (teacher forcing / forced answer) is appended as plain text."""
    return text_ids(tokenizer, model, prompt_text(model.cfg, instruction) + (answer or ""), n_visual)


def text_ids(tokenizer, model: AGVAS, text: str, n_visual: int) -> list[int]:
    """Token ids of a chat ``text`` holding one image placeholder, expanded to ``n_visual``."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    at = [i for i, t in enumerate(ids) if t == model.ids.image]
    if len(at) != 1:
        raise ValueError(f"prompt must contain exactly one image token, found {len(at)}")
    i = at[0]
    return ids[:i] + [model.ids.image] * n_visual + ids[i + 1:]


@dataclass
class ReferenceResult:
    text: str
    tokens: list[int]
    anchors_found: bool
    anchor_states: torch.Tensor | None  # [3, H] in NOR, ANO, SEG order
    prob: np.ndarray  # P at the original size, float32 [H, W]
    p_seg: np.ndarray
    p_ano: np.ndarray
    low_res: np.ndarray  # low-res P [h, w]
    mask: np.ndarray  # bool [H, W]
    verdict: bool  # anomalous
    n_visual: int
    timings_ms: dict[str, float] = field(default_factory=dict)


class ReferencePipeline:
    """``ReferencePipeline(model, tokenizer, image_processor)(image, mode="direct")``."""

    def __init__(self, model: AGVAS, tokenizer, image_processor) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.cfg = model.cfg

    @classmethod
    def from_checkpoint(cls, ckpt: str | Path, device: str = "cpu") -> "ReferencePipeline":
        from .checkpoint import load_checkpoint

        model, tok, proc, _ = load_checkpoint(ckpt, device=device)
        return cls(model, tok, proc)

    # ---- stages ---------------------------------------------------------------------------
    def prepare(self, image) -> Prepared:
        from agvas.imageio import load_image

        prep = prepare_image(load_image(image), self.cfg, self.image_processor)
        dev = self.device
        if dev.type != "cpu":
            prep.pixel_values, prep.image_sizes = prep.pixel_values.to(dev), prep.image_sizes.to(dev)
            prep.sam_input = prep.sam_input.to(dev)
        return prep

    @property
    def device(self) -> torch.device:
        """Where the model is (inputs follow it: ``agvas eval --device cuda``)."""
        return self.model.embed_tokens.weight.device

    @torch.no_grad()
    def encode(self, prep: Prepared, vision_tokens: str = "anyres") -> tuple[torch.Tensor, torch.Tensor]:
        """-> (visual tokens ``[1, 2N, H]`` = concat(f_s, f_align), pixel embedding ``[1,C,h,w]``)."""
        m = self.model
        f_s = m.semantic_features(prep.pixel_values, prep.image_sizes, vision_tokens)[0].unsqueeze(0)
        pix = m.pixel_embedding(prep.sam_input)
        return m.visual_tokens(f_s, pix), pix

    @torch.no_grad()
    def generate(self, inputs_embeds: torch.Tensor, max_new_tokens: int) -> tuple[list[int], dict[int, torch.Tensor]]:
        """Greedy decoding with a KV cache. Returns the generated ids (EOS included when reached)
        and, per anchor id, the last-layer hidden state of the step that predicted it."""
        m = self.model
        anchors = set(m.ids.anchors)
        cache = DynamicCache(config=m.llava.config.text_config)
        out = m.language_model(inputs_embeds=inputs_embeds, past_key_values=cache, use_cache=True)
        h = out.last_hidden_state[:, -1]
        tokens: list[int] = []
        states: dict[int, torch.Tensor] = {}
        for _ in range(max_new_tokens):
            tok = int(m.lm_head(h).argmax(-1)[0])
            if tok in anchors and tok not in states:
                states[tok] = h[0].clone()  # the state whose next-token prediction is the anchor
            tokens.append(tok)
            if tok == m.ids.eos:
                break
            emb = m.embed_tokens(torch.tensor([[tok]], device=h.device))
            out = m.language_model(inputs_embeds=emb, past_key_values=out.past_key_values, use_cache=True)
            h = out.last_hidden_state[:, -1]
        return tokens, states

    def decode_text(self, tokens: list[int]) -> str:
        body = tokens[:-1] if tokens and tokens[-1] == self.model.ids.eos else tokens
        return self.tokenizer.decode(body, skip_special_tokens=False)

    # ---- the whole thing -------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, image, mode: str = "direct", normal_sentence: str | None = None,
                 vision_tokens: str = "anyres", max_new_tokens: int | None = None,
                 threshold: float | None = None, min_area: int = 0) -> ReferenceResult:
        m, cfg = self.model, self.cfg
        t: dict[str, float] = {}
        t0 = time.perf_counter()
        prep = self.prepare(image)
        t["preprocess"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        visual, pix = self.encode(prep, vision_tokens)
        t["encode"] = time.perf_counter() - t0
        ids = prompt_ids(self.tokenizer, m, canonical_instruction(mode, normal_sentence), visual.shape[1])
        emb = m.embed_prompt(torch.tensor([ids], device=visual.device), visual)
        t0 = time.perf_counter()
        tokens, states = self.generate(emb, max_new_tokens or cfg.max_new_tokens)
        t["llm"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        found = all(a in states for a in m.ids.anchors)
        oh, ow = prep.original_size
        if found:
            anchor_states = torch.stack([states[a] for a in m.ids.anchors])
            p, p_seg, p_ano = m.maps(anchor_states[None], pix)
            p, p_seg, p_ano = p.float().cpu(), p_seg.float().cpu(), p_ano.float().cpu()
            low = p[0].numpy()
            up = postprocess_map(torch.stack([p, p_seg, p_ano], 1)[0], prep.input_size, prep.original_size,
                                 cfg.pixel_encoder.img_size).numpy()
            prob, ps, pa = up[0], up[1], up[2]
        else:
            anchor_states = None
            g = cfg.pixel_encoder.grid * 4
            low = np.zeros((g, g), np.float32)
            prob = ps = pa = np.zeros((oh, ow), np.float32)
        thr = cfg.agmd.threshold if threshold is None else threshold
        mask = prob > thr
        t["decode_mask"] = time.perf_counter() - t0
        return ReferenceResult(
            text=self.decode_text(tokens), tokens=tokens, anchors_found=found, anchor_states=anchor_states,
            prob=prob.astype(np.float32), p_seg=ps.astype(np.float32), p_ano=pa.astype(np.float32),
            low_res=low.astype(np.float32), mask=mask, verdict=bool(mask.sum() > min_area),
            n_visual=int(visual.shape[1]), timings_ms={k: v * 1000 for k, v in t.items()},
        )
