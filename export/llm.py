"""The ``llm`` engine: the Qwen2 decoder as one fused ONNX Runtime graph.

Route (measured fastest here, FACTS.md): onnxruntime-genai's model builder on the merged
decoder saved as a local Hugging Face ``Qwen2ForCausalLM`` directory, with
``exclude_embeds=true include_hidden_states=true prune_lm_head=true``. The graph uses ORT's
contrib ops — ``GroupQueryAttention`` (rotary embedding fused inside, ``do_rotary=1``; no S×S
tensors are materialised), ``SkipSimplifiedLayerNormalization`` — and computes logits for the
last position only. IO:

- inputs: ``inputs_embeds [batch_size, sequence_length, H]``, ``attention_mask`` int64
  ``[batch_size, total_sequence_length]`` (all ones over past + new tokens: GQA reads only its
  row sums), ``past_key_values.{i}.key|value [batch_size, kv_heads, past_sequence_length, head_dim]``;
- outputs: ``hidden_states`` (last layer, after the final norm),
  ``present.{i}.key|value [batch_size, kv_heads, total_sequence_length, head_dim]``.

One vocabulary-sized matrix for logits: the builder's graph carries its own copy of the LM head
(last-position ``logits``); :func:`drop_lm_head` removes it, and every logit — the decode loop's
last position and the fast path's answer positions — comes from the ``lm_head`` engine
(ov-0.5b: 544 MB fp32 / 136 MB int8 less in memory and on disk). The runtime still reads a
``logits`` output when an older export has one.

There is no ``position_ids`` input: positions are ``past_length + i`` (manifest
``llm.positions = "from_mask"``), which is what Qwen2's 1-D RoPE uses for unpadded prompts.

Memory: the decoder's weights are in memory once at any time — the caller saves the merged
decoder with :func:`save_causal_lm`, releases its model, then :func:`build_llm` lets the
builder load the directory (it casts and writes tensors lazily, into one external-data file).
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agvas.train.modeling.agvas import AGVAS

BUILDER_OPTIONS = ("exclude_embeds=true", "include_hidden_states=true", "prune_lm_head=true", "hf_token=false")
# export precision -> (builder precision, builder execution provider)
BUILDER_TARGETS = {"fp32": ("fp32", "cpu"), "fp16": ("fp16", "cuda")}
REQUIRED_FUSED_OPS = ("GroupQueryAttention", "SkipSimplifiedLayerNormalization")
ROUTE = "onnxruntime-genai model builder (" + " ".join(BUILDER_OPTIONS[:3]) + ")"


def save_causal_lm(model: AGVAS, tokenizer, out_dir: str | Path) -> Path:
    """Write the merged decoder + LM head as a Hugging Face ``Qwen2ForCausalLM`` directory.

    The ``Qwen2ForCausalLM`` shell is built on the meta device and takes the model's own modules,
    so no weight is copied in memory."""
    from transformers import Qwen2ForCausalLM

    text_config = model.llava.config.text_config
    with torch.device("meta"):
        lm = Qwen2ForCausalLM(text_config)
    lm.model = model.language_model
    lm.lm_head = model.lm_head
    lm.config.architectures = ["Qwen2ForCausalLM"]
    out = Path(out_dir)
    with _quiet_transformers():
        lm.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


@contextlib.contextmanager
def _quiet_transformers():
    """No per-shard progress bars from transformers under the export's own progress bar."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def build_llm(hf_dir: str | Path, out_dir: str | Path, precision: str = "fp32", filename: str = "llm.onnx") -> Path:
    """Run onnxruntime-genai's builder on ``hf_dir``; move ``filename`` and its external data
    into ``out_dir`` and remove the builder's own LM head (:func:`drop_lm_head`: logits come from
    the ``lm_head`` engine). ``precision``: "fp32" (CPU graph) or "fp16" (CUDA graph)."""
    try:
        from onnxruntime_genai.models.builder import create_model, parse_extra_options
    except ImportError as e:
        raise RuntimeError("the llm engine is built with onnxruntime-genai's model builder: "
                           "pip install onnxruntime-genai==0.18.0 (extra 'genai')") from e
    if precision not in BUILDER_TARGETS:
        raise ValueError(f"llm precision must be one of {sorted(BUILDER_TARGETS)}, got {precision!r}")
    b_prec, b_ep = BUILDER_TARGETS[precision]
    out = Path(out_dir)
    with tempfile.TemporaryDirectory(dir=out, prefix=".llm_build.") as tmp:
        build, cache = Path(tmp) / "onnx", Path(tmp) / "cache"
        opts = [*BUILDER_OPTIONS, f"filename={filename}"]
        env_before = os.environ.get("HF_HUB_OFFLINE")
        os.environ["HF_HUB_OFFLINE"] = "1"  # local directory only; never reach a hub
        try:
            # the builder narrates on stdout and draws a bar per saved tensor on stderr
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
                    _quiet_transformers():
                extra = parse_extra_options(None, str(hf_dir), str(build), b_prec, b_ep, str(cache), opts)
                create_model(None, str(hf_dir), str(build), b_prec, b_ep, str(cache), **extra)
        finally:
            if env_before is None:
                os.environ.pop("HF_HUB_OFFLINE", None)
            else:
                os.environ["HF_HUB_OFFLINE"] = env_before
        for f in (filename, filename + ".data"):
            if (build / f).exists():
                shutil.move(str(build / f), str(out / f))
    drop_lm_head(out / filename)
    return out / filename


def drop_lm_head(path: str | Path) -> int:
    """Remove the graph output ``logits`` and everything only it needed (the last-position slice
    and the LM-head MatMul with its weight) from the llm graph at ``path``, in place; the external
    data file is rewritten without the dead weights. Returns the bytes of weights removed (0 when
    the graph has no ``logits`` output)."""
    import onnx

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    g = model.graph
    if "logits" not in [o.name for o in g.output]:
        return 0
    keep_out = [o for o in g.output if o.name != "logits"]
    del g.output[:]
    g.output.extend(keep_out)
    needed = {o.name for o in g.output}
    kept = []
    for node in reversed(list(g.node)):  # nodes are topologically sorted: walk back from the outputs
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(i for i in node.input if i)
    dead_inits = [t for t in g.initializer if t.name not in needed]
    removed = sum(int({e.key: e.value for e in t.external_data}.get("length", 0)) or len(t.raw_data)
                  for t in dead_inits)
    del g.node[:]
    g.node.extend(reversed(kept))
    live = [t for t in g.initializer if t.name in needed]
    del g.initializer[:]
    g.initializer.extend(live)
    from onnx.external_data_helper import load_external_data_for_model

    load_external_data_for_model(model, str(path.parent))
    data = path.name + ".data"
    for stale in (path, path.with_name(data)):
        stale.unlink(missing_ok=True)
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data,
                    size_threshold=1024)
    return removed


def llm_record(tc, vocab_size: int, fused: dict[str, int]) -> dict[str, Any]:
    """The manifest's ``llm`` block from the decoder config ``tc`` and the graph's contrib ops."""
    missing = [op for op in REQUIRED_FUSED_OPS if op not in fused]
    if missing:
        raise RuntimeError(f"the llm graph lacks the fused ops {missing}; it has {fused}")
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    return {
        "num_layers": tc.num_hidden_layers, "num_heads": tc.num_attention_heads,
        "num_kv_heads": tc.num_key_value_heads, "head_dim": head_dim, "hidden_size": tc.hidden_size,
        "vocab_size": vocab_size, "max_positions": tc.max_position_embeddings,
        "positions": "from_mask", "route": ROUTE, "fused_ops": fused,
        "rotary": "fused in GroupQueryAttention (do_rotary=1)",
        "logits": "lm_head engine (the llm graph has no head of its own: one vocabulary-sized matrix)",
        "kv": {"past_key": "past_key_values.{i}.key", "past_value": "past_key_values.{i}.value",
               "present_key": "present.{i}.key", "present_value": "present.{i}.value",
               "layout": "[batch, kv_heads, seq, head_dim]"},
        "attention_mask": "int64 ones [batch, past + new]; no padding (GQA reads row sums only). With "
                          "past > 0 and more than one new token, batch must be 1 (GQA CPU).",
    }


def save_arrays(model: AGVAS, out_dir: str | Path, embed_dtype: str = "float32") -> tuple[Path, Path]:
    """``embed_tokens.npy`` (the [V,H] input-embedding table, in the llm's input dtype) and
    ``image_newline.npy`` ([H] float32, for the runtime's anyres packing)."""
    out = Path(out_dir)
    emb = model.embed_tokens.weight.detach().to(torch.float32).cpu().numpy().astype(embed_dtype, copy=False)
    nl = model.llava.model.image_newline.detach().to(torch.float32).cpu().numpy()
    np.save(out / "embed_tokens.npy", emb)
    np.save(out / "image_newline.npy", nl)
    return out / "embed_tokens.npy", out / "image_newline.npy"
