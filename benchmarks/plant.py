"""A planted answer for randomly initialised models, so their latency is the real pipeline's.

A random model never emits the anchors: greedy decoding runs to ``max_new_tokens``, the
forced-answer fast path always falls back, and AGMD never runs — timings that no trained model
would have. For `ov-0.5b` latency work (and quick `tiny` smoke runs) we therefore *plant* the
canonical direct answer ("Sure, it is [NOR][ANO][SEG]." + EOS) in the *first* decoder layer's
MLP: a bigram circuit that maps each answer token (and the prompt's last token) to the next one.
For the transition ``cur → nxt`` (one intermediate unit i each):

    gate_proj[i] = up_proj[i] = g · ê(cur),   down_proj[:, i] = d_i · ŵ(nxt)

(ê = the unit input embedding, ŵ = the unit LM-head row). In the first layer the residual at a
position holding ``cur`` is still mostly its embedding, so only unit i fires (``silu(a)·a`` for a
large ``a``) and writes ŵ(nxt) into the residual stream. The random layers after it add
contributions whose size does not grow with the residual (pre-norm blocks), so with ``d_i`` set to
``ratio`` × the norm of the unplanted last-layer residual the final hidden state points along
ŵ(nxt) and the greedy token is ``nxt``. The smallest ratio that works is kept, so the anchor states
still carry image-dependent parts. Everything else keeps its
random weights; the result is checked (:func:`plant_answer` returns whether greedy decoding
follows the answer on a probe prompt) and recorded in the checkpoint's metadata. Weights of a
trained checkpoint are never touched.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from agvas.train.modeling.agvas import AGVAS
from agvas.train.reference import prompt_ids
from agvas.train.templates import CANONICAL_DIRECT_ANSWER, canonical_instruction


def answer_chain(model: AGVAS, tokenizer) -> list[int]:
    """The prompt's last token followed by the direct answer's tokens and EOS."""
    prompt = prompt_ids(tokenizer, model, canonical_instruction("direct"), 0)
    answer = tokenizer.encode(CANONICAL_DIRECT_ANSWER + model.cfg.eos_token, add_special_tokens=False)
    chain = [prompt[-1], *answer]
    if len(set(chain[:-1])) != len(chain) - 1:
        raise ValueError(f"the answer's tokens {chain} repeat; a bigram circuit cannot plant it")
    return chain


@torch.no_grad()
def _probe(model: AGVAS, tokenizer, chain: list[int], visual: torch.Tensor, layer: int
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Run prompt (with ``visual`` tokens ``[1, N, H]``) + answer once; return (residual into the
    last layer, MLP input of ``layer``, final hidden states, index of the prompt's last position)."""
    ids = prompt_ids(tokenizer, model, canonical_instruction("direct"), visual.shape[1]) + chain[1:-1]
    n_prompt = len(ids) - (len(chain) - 2)
    emb = model.embed_prompt(torch.tensor([ids]), visual.to(model.embed_tokens.weight.dtype))
    seen: dict[str, torch.Tensor] = {}
    mlp = model.language_model.layers[layer].mlp
    h = mlp.register_forward_pre_hook(lambda mod, args: seen.__setitem__("x", args[0]))
    try:
        out = model.language_model(inputs_embeds=emb, output_hidden_states=True)
    finally:
        h.remove()
    return out.hidden_states[-2][0], seen["x"][0], out.last_hidden_state[0], n_prompt - 1


def random_visual(model: AGVAS, n_visual: int = 16) -> torch.Tensor:
    """Stand-in visual tokens (embedding-sized noise) for a probe without an image."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, n_visual, model.cfg.hidden_size, generator=g) * model.embed_tokens.weight.std()


@torch.no_grad()
def plant_answer(model: AGVAS, tokenizer, visuals: list[torch.Tensor] | None = None,
                 ratios: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0),
                 gains: tuple[float, ...] = (1.0, 4.0, 16.0), layer: int = 0) -> dict:
    """Plant the canonical answer in ``model`` (in place), trying the smallest ``gain`` (how
    sharply a unit fires on its token) and ``ratio`` (how loudly it writes the next token) that
    make greedy decoding follow the answer on every probe prompt. ``visuals``: the probes' visual
    tokens ``[1, N, H]`` — pass the real ones of the images to be benchmarked (a long real visual
    context mixes much more into the answer positions than embedding-sized noise does); default
    one noise probe. Returns ``{"ok", "chain", "greedy", "gain", "ratio", "probes", ...}``."""
    chain = answer_chain(model, tokenizer)
    visuals = visuals or [random_visual(model)]
    mlp = model.language_model.layers[layer].mlp
    dtype = mlp.down_proj.weight.dtype
    read = F.normalize(model.embed_tokens.weight.float(), dim=-1)  # what the residual carries
    write = F.normalize(model.lm_head.weight.float(), dim=-1)  # what the LM head reads
    pairs = list(zip(chain[:-1], chain[1:]))
    greedy: list[list[int]] = []
    gain = ratio = None
    for gain in gains:
        for i, (cur, _) in enumerate(pairs):
            mlp.gate_proj.weight[i] = (gain * read[cur]).to(dtype)
            mlp.up_proj.weight[i] = (gain * read[cur]).to(dtype)
            mlp.down_proj.weight[:, i] = 0
        resid, x, _, last = _probe(model, tokenizer, chain, visuals[0], layer)
        acts = []
        for i, _ in enumerate(pairs):
            xi = x[last + i].float()
            a = float(mlp.gate_proj.weight[i].float() @ xi)
            acts.append(F.silu(torch.tensor(a)).item() * float(mlp.up_proj.weight[i].float() @ xi))
        for ratio in ratios:
            for i, (_, nxt) in enumerate(pairs):
                scale = ratio * float(resid[last + i].float().norm()) / max(abs(acts[i]), 1e-6)
                mlp.down_proj.weight[:, i] = (scale * write[nxt]).to(dtype)
            greedy = []
            for visual in visuals:
                _, _, hidden, last = _probe(model, tokenizer, chain, visual, layer)
                greedy.append(model.lm_head(hidden[last:last + len(pairs)]).argmax(-1).tolist())
                if greedy[-1] != chain[1:]:
                    break
            if len(greedy) == len(visuals) and all(g == chain[1:] for g in greedy):
                return {"ok": True, "chain": chain, "greedy": greedy[0], "gain": gain, "ratio": ratio,
                        "layer": layer, "units": list(range(len(pairs))), "probes": len(visuals)}
    return {"ok": False, "chain": chain, "greedy": greedy[-1] if greedy else [], "gain": gain, "ratio": ratio,
            "layer": layer, "units": list(range(len(pairs))), "probes": len(visuals)}
