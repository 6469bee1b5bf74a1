"""Prompt assembly with the `tokenizers` library (no transformers): the manifest's chat format,
the mode's instruction, the image placeholder expanded to the 2N visual positions.

Token ids equal ``agvas.train.reference.prompt_ids`` (same text, same tokenizer.json).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

MODES = ("direct", "describe", "describe_plus", "explain")
MODE_ALIASES = {"direct-segmentation": "direct", "describe-then-segment": "describe",
                "describe-then-segment-plus": "describe_plus", "describe-plus": "describe_plus",
                "segment-then-explain": "explain"}


def normalize_mode(mode: str) -> str:
    m = MODE_ALIASES.get(mode, mode)
    if m not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {sorted(MODES + tuple(MODE_ALIASES))}")
    return m


class Prompt:
    """``Prompt(manifest.data["prompt"], tokenizer_dir)``."""

    def __init__(self, spec: dict, tokenizer_dir: str | Path) -> None:
        from tokenizers import Tokenizer

        path = Path(tokenizer_dir) / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing (the export's tokenizer)")
        self.tok = Tokenizer.from_file(str(path))
        self.spec = spec
        self.image_id = self._single_id(spec["image_token"])
        self.eos_id = self._single_id(spec["eos_token"])

    def _single_id(self, token: str) -> int:
        i = self.tok.token_to_id(token)
        if i is None:
            raise ValueError(f"the export's tokenizer has no token {token!r}")
        return int(i)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def instruction(self, mode: str, normal_sentence: str | None = None) -> str:
        mode = normalize_mode(mode)
        text = self.spec["instructions"][mode]
        if "{normal}" in text:
            if not normal_sentence or not normal_sentence.strip():
                raise ValueError("mode describe-then-segment-plus needs a sentence on the object's normal appearance")
            text = text.replace("{normal}", normal_sentence.strip())
        return text

    def split_ids(self, mode: str, normal_sentence: str | None = None) -> tuple[list[int], list[int]]:
        """Token ids before and after the image placeholder."""
        s = self.spec
        text = s["prompt_format"].format(system=s["system_prompt"], image=s["image_token"],
                                         instruction=self.instruction(mode, normal_sentence))
        ids = self.encode(text)
        at = [i for i, t in enumerate(ids) if t == self.image_id]
        if len(at) != 1:
            raise ValueError(f"prompt must contain exactly one image token, found {len(at)}")
        return ids[:at[0]], ids[at[0] + 1:]

    def ids(self, mode: str, n_visual: int, normal_sentence: str | None = None) -> list[int]:
        pre, post = self.split_ids(mode, normal_sentence)
        return pre + [self.image_id] * n_visual + post

    def answer_ids(self) -> list[int]:
        """The canonical Direct-mode answer followed by EOS (what greedy decoding should produce)."""
        return self.encode(self.spec["direct_answer"]) + [self.eos_id]

    def decode(self, tokens: list[int]) -> str:
        body = tokens[:-1] if tokens and tokens[-1] == self.eos_id else tokens
        return self.tok.decode(body, skip_special_tokens=False)


def embed_prompt(table: np.ndarray, pre: list[int], visual: np.ndarray, post: list[int]) -> np.ndarray:
    """``[B, len(pre) + 2N + len(post), H]`` float32: token embeddings around the visual tokens ``[B,2N,H]``."""
    b = visual.shape[0]
    parts = [np.broadcast_to(table[pre], (b, len(pre), table.shape[1])), visual,
             np.broadcast_to(table[post], (b, len(post), table.shape[1]))]
    return np.ascontiguousarray(np.concatenate(parts, axis=1), dtype=np.float32)
