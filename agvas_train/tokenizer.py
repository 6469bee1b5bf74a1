"""Tokenizers: the locally trained byte-level BPE for `tiny`, loading for real configs, anchors.

The tiny tokenizer is trained with the `tokenizers` library on ``assets/tiny_corpus.txt`` (the
instruction templates and the anomaly vocabulary) and shipped in ``assets/tiny_tokenizer``.
Rebuild it with ``python -m agvas.train.tokenizer``. Anchor tokens are *not* part of the shipped
tokenizer: they are added by :func:`add_anchor_tokens`, the same path as for a real
LLaVA-OneVision tokenizer.
"""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from .config import ANCHOR_TOKENS, EOS_TOKEN, IMAGE_TOKEN, TINY_TOKENIZER_DIR, AGVASConfig

CORPUS = Path(__file__).parent / "assets" / "tiny_corpus.txt"
BASE_SPECIALS = ["<|endoftext|>", "<|im_start|>", EOS_TOKEN, IMAGE_TOKEN]
TINY_VOCAB_SIZE = 1024
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_tokenizer(out_dir: str | Path = TINY_TOKENIZER_DIR, corpus: str | Path = CORPUS) -> PreTrainedTokenizerFast:
    """Train the tiny byte-level BPE tokenizer on the shipped corpus and save it to ``out_dir``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE, special_tokens=BASE_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    lines = [ln for ln in Path(corpus).read_text().splitlines() if ln.strip()]
    tok.train_from_iterator(lines, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token="<|endoftext|>",
        additional_special_tokens=[IMAGE_TOKEN, "<|im_start|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))
    return fast


def load_tokenizer(cfg: AGVASConfig, directory: str | Path | None = None) -> PreTrainedTokenizerBase:
    """Load the tokenizer from ``directory`` (a checkpoint or LLaVA-OneVision dir), else the config's."""
    src = Path(directory or cfg.tokenizer_dir or TINY_TOKENIZER_DIR)
    if not (src / "tokenizer_config.json").exists() and not (src / "tokenizer.json").exists():
        raise FileNotFoundError(f"no tokenizer files in {src} (expected tokenizer.json / tokenizer_config.json)")
    return AutoTokenizer.from_pretrained(str(src), local_files_only=True)


def add_anchor_tokens(tokenizer: PreTrainedTokenizerBase, anchors: tuple[str, ...] = ANCHOR_TOKENS) -> list[int]:
    """Add ``[NOR] [ANO] [SEG]`` as special tokens (idempotent); return their ids in that order."""
    missing = [a for a in anchors if a not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    ids = tokenizer.convert_tokens_to_ids(list(anchors))
    for a, i in zip(anchors, ids):
        if i is None or i == tokenizer.unk_token_id:
            raise RuntimeError(f"anchor token {a} did not get an id in the tokenizer")
    # each anchor must encode to exactly one id, also inside text
    for a, i in zip(anchors, ids):
        enc = tokenizer.encode(f"is {a}.", add_special_tokens=False)
        if i not in enc:
            raise RuntimeError(f"anchor {a} is split by the tokenizer: {enc}")
    return list(ids)


if __name__ == "__main__":  # pragma: no cover - maintenance entry point
    t = build_tiny_tokenizer()
    print(f"tiny tokenizer: {len(t)} tokens -> {TINY_TOKENIZER_DIR}")
