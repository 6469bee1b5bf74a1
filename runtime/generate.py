"""Token generation over the `llm` engine: greedy decoding with a KV cache, capturing the
anchor hidden states, and the forced-answer fast path.

Anchor convention (DESIGN §2.5): the hidden state of an anchor is the last-layer state of the
step whose greedy next token *is* the anchor — in the loop below, ``h`` at the moment ``tok``
comes out of ``argmax(logits)``. No extra forward pass.

Forced-answer fast path (DESIGN §4): in Direct mode the answer is known. Append it to the
prompt, run one prefill, and check at every answer position that greedy decoding would have
produced the forced token (``argmax(lm_head(h)) == answer[j]``). If all hold, the result *is*
the greedy result — tokens, and the anchor states read at their positions. At the first
position where it does not hold, keep the verified prefix, take the greedy token there, cut the
KV cache to the verified length and continue the ordinary loop from that point.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .engines import LLM, Engine


@dataclass
class Generation:
    tokens: list[int]
    states: dict[int, np.ndarray]  # anchor id -> [H], the state whose next token is the anchor
    prefill_tokens: int
    fast_path: str = "off"  # "off" | "hit" | "fallback@j" (j = first answer position that differed)
    timings: dict[str, float] = field(default_factory=dict)  # seconds: "prefill", "decode"


def _capture(states: dict, tok: int, h: np.ndarray, anchors: tuple[int, ...]) -> None:
    if tok in anchors and tok not in states:
        states[tok] = np.array(h, np.float32)


def decode_loop(llm: LLM, table: np.ndarray, h: np.ndarray, logits: np.ndarray, past: list,
                tokens: list[list[int]], states: list[dict], anchors: tuple[int, ...], eos: int,
                max_new: int) -> None:
    """Continue greedy decoding for a batch from the last hidden state ``h [B,H]`` / ``logits [B,V]``
    and the KV cache ``past``; appends to ``tokens`` / ``states`` in place. Finished rows keep
    running (their outputs ignored) so that the batch stays rectangular."""
    done = [bool(t) and (t[-1] == eos or len(t) >= max_new) for t in tokens]
    while not all(done):
        tok = logits.argmax(-1)
        for b in range(len(tokens)):
            if done[b]:
                continue
            t = int(tok[b])
            _capture(states[b], t, h[b], anchors)
            tokens[b].append(t)
            done[b] = t == eos or len(tokens[b]) >= max_new
        if all(done):
            break
        hidden, logits, past = llm(table[tok][:, None, :], past)
        h = hidden[:, -1]


def greedy(llm: LLM, table: np.ndarray, embeds: np.ndarray, anchors: tuple[int, ...], eos: int,
           max_new: int, clock) -> list[Generation]:
    """Prefill ``embeds [B,S,H]`` then decode greedily; one :class:`Generation` per row."""
    b, s, _ = embeds.shape
    t0 = clock()
    hidden, logits, past = llm(embeds, None)
    t1 = clock()
    tokens: list[list[int]] = [[] for _ in range(b)]
    states: list[dict] = [{} for _ in range(b)]
    decode_loop(llm, table, hidden[:, -1], logits, past, tokens, states, anchors, eos, max_new)
    t2 = clock()
    return [Generation(tokens[i], states[i], s, "off", {"prefill": (t1 - t0) / b, "decode": (t2 - t1) / b})
            for i in range(b)]


def forced_answer(llm: LLM, lm_head: Engine, table: np.ndarray, embeds: np.ndarray, answer: list[int],
                  anchors: tuple[int, ...], eos: int, max_new: int, clock) -> list[Generation]:
    """The fast path for a batch of prompts ``embeds [B,S,H]`` and the expected ``answer``
    (ending with EOS). One prefill over prompt + answer[:-1]; verification with ``lm_head`` at
    the k answer positions; per-row fallback to :func:`decode_loop` at the first mismatch.

    A fallback row continues alone (batch 1) from a copy of its row of the KV cache cut to the
    prompt and its verified tokens, so the other rows are never touched; a row whose verified
    answer does not end with EOS (an ``answer`` without it) continues the same way."""
    b, s, _ = embeds.shape
    answer = list(answer)
    if eos in answer:  # greedy decoding stops at the first EOS: nothing after it is verified
        answer = answer[:answer.index(eos) + 1]
    k = min(len(answer), max_new)
    if k < 1:
        raise ValueError(f"forced answer needs at least one token and max_new >= 1 "
                         f"(answer {answer}, max_new {max_new})")
    forced = np.concatenate([embeds, np.broadcast_to(table[answer[:k - 1]], (b, k - 1, table.shape[1]))], axis=1)
    t0 = clock()
    hidden, _, past = llm(forced, None, logits=False)
    t1 = clock()
    h = hidden[:, s - 1:s - 1 + k]  # h[:, j] predicts answer[j]
    pred = lm_head.run(hidden_states=h)["logits"].argmax(-1)  # [B, k]
    t2 = clock()
    out = []
    for i in range(b):
        miss = np.flatnonzero(pred[i] != np.asarray(answer[:k]))
        m = int(miss[0]) if miss.size else k
        tokens, states = [], {}
        for j in range(min(m + 1, k)):  # the verified prefix and, at a mismatch, the greedy token there
            t = answer[j] if j < m else int(pred[i, j])
            _capture(states, t, h[i, j], anchors)
            tokens.append(t)
        if tokens[-1] != eos and len(tokens) < max_new:
            # the KV cache holds the prompt + tokens[:-1] (for a mismatch at m: the m verified ones)
            row_past = llm.truncate(past, s + len(tokens) - 1, row=i)
            hid, logits, row_past = llm(table[[tokens[-1]]][None], row_past)
            tt, ss = [tokens], [states]
            decode_loop(llm, table, hid[:, -1], logits, row_past, tt, ss, anchors, eos, max_new)
        t3 = clock()
        out.append(Generation(tokens, states, s, "hit" if m == k else f"fallback@{m}",
                              {"prefill": (t1 - t0) / b, "decode": (t2 - t1) / b + (t3 - t2)}))
        t2 = t3
    return out
