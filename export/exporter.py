"""``export_checkpoint``: a checkpoint -> an export directory (engines + tokenizer + manifest).

Order of work (weights are in memory once):
1. load the checkpoint with LoRA merged;
2. export ``vision``, ``sam_encoder``, ``spam``, ``agmd``, ``lm_head`` (torch.onnx, dynamo),
   check each (checker, shape inference, ORT load), optionally convert to fp16;
3. save ``embed_tokens.npy``, ``image_newline.npy`` and the tokenizer/processor files;
4. save the merged decoder as a Hugging Face directory, **release the model**, build ``llm``
   with onnxruntime-genai's builder (which loads that directory) and delete the directory;
5. write the manifest (and for ``target="tensorrt"`` the TensorRT build script).

Everything is written into a hidden sibling directory that is renamed to ``out`` at the end, so
a failed export never leaves a half-written export behind.
"""

from __future__ import annotations

import gc
import os
import shutil
from pathlib import Path
from typing import Any, Callable

from agvas.atomic import make_temp_dir, publish_dir

from .graphs import DEFAULT_OPSET, EXTERNAL_DATA_THRESHOLD, check_graph, contrib_ops
from .manifest import MANIFEST_NAME, array_entry, new_manifest, onnx_entry, write_manifest
from .tensorrt import TENSORRT_OPSET

PRECISIONS = ("fp32", "fp16")
VISION_TOKENS = ("anyres", "base")
TARGETS = ("onnx", "tensorrt")


def _tool_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("agvas-edge", "torch", "transformers", "onnx", "onnxruntime", "onnxscript", "onnxruntime-genai",
                "segment-anything"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "absent"
    return out


def _prompt(cfg) -> dict[str, Any]:
    from agvas.train.templates import CANONICAL_DIRECT_ANSWER, DESCRIBE_PLUS_INSTRUCTIONS, MODES, canonical_instruction

    instr = {m: canonical_instruction(m) for m in MODES if m != "describe_plus"}
    instr["describe_plus"] = DESCRIBE_PLUS_INSTRUCTIONS[0].format(normal="{normal}", target="anomalies")
    return {"prompt_format": cfg.prompt_format, "system_prompt": cfg.system_prompt, "image_token": cfg.image_token,
            "eos_token": cfg.eos_token, "anchor_tokens": list(cfg.anchor_tokens), "instructions": instr,
            "direct_answer": CANONICAL_DIRECT_ANSWER, "max_new_tokens": cfg.max_new_tokens}


def _preprocessing(cfg, proc) -> dict[str, Any]:
    vc = cfg.llava["vision_config"]
    side = int(vc["image_size"]) // int(vc["patch_size"])
    return {
        "siglip": {"size": int(vc["image_size"]), "patch_size": int(vc["patch_size"]), "tokens_per_side": side,
                   "mean": list(proc.image_mean), "std": list(proc.image_std), "rescale_factor": proc.rescale_factor,
                   "resample": int(proc.resample), "do_pad": bool(getattr(proc, "do_pad", True)),
                   "image_grid_pinpoints": cfg.llava["image_grid_pinpoints"],
                   "vision_aspect_ratio": cfg.llava["vision_aspect_ratio"],
                   "vision_feature_select_strategy": cfg.llava["vision_feature_select_strategy"],
                   "processor_config": "tokenizer/preprocessor_config.json"},
        "sam": {"img_size": cfg.pixel_encoder.img_size, "mean": list(cfg.sam_pixel_mean),
                "std": list(cfg.sam_pixel_std), "grid": cfg.pixel_encoder.grid, "pad": "bottom-right zeros",
                "resize": "longest side, PIL bilinear"},
    }


def convert_opset(path: str | os.PathLike, opset: int) -> None:
    """Bring the graph at ``path`` down to ``opset`` when the exporter left it higher.

    torch's dynamo exporter writes opset 18 and, when its own down-conversion fails, keeps 18
    without an error (e.g. ``ReduceMean``'s axes input, which opset 17 has as an attribute):
    ``--opset 17`` — what TensorRT 8.6's parser reads — would be a label only. ONNX's version
    converter on the saved graph (constant axes by then) does it; ``noop_with_empty_axes``, which
    the opset-13 Reduce ops do not know, is dropped (at its default 0). External data stays where
    it is (the graph is loaded without it)."""
    import onnx
    from onnx import version_converter

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    have = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=opset)
    if have <= opset:
        return
    model = version_converter.convert_version(model, opset)
    for node in model.graph.node:
        for attr in list(node.attribute):
            if node.op_type.startswith("Reduce") and attr.name == "noop_with_empty_axes":
                if attr.i:
                    raise ValueError(f"{path}: node {node.name} reduces nothing on empty axes "
                                     f"(noop_with_empty_axes=1), which opset {opset} cannot express")
                node.attribute.remove(attr)
    onnx.save(model, str(path))


def export_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike, *, precision: str = "fp32",
                      opset: int | None = None, vision_tokens: str = "anyres", target: str = "onnx",
                      max_batch: int = 4, external_threshold: int = EXTERNAL_DATA_THRESHOLD, overwrite: bool = False,
                      progress: Callable[[str], None] | None = None) -> Path:
    """Export ``checkpoint`` into ``out``; returns the path of the written manifest. ``opset``:
    default 17 for ``target="tensorrt"`` (the newest TensorRT 8.6 parses), else ``DEFAULT_OPSET``."""
    from agvas.train.checkpoint import checkpoint_hash, load_checkpoint

    from .llm import BUILDER_TARGETS, build_llm, llm_record, save_arrays, save_causal_lm
    from .precision import convert_fp16
    from .tensorrt import gpu_settings, write_build_script
    from .vision import GRAPH_ENGINES, export_graph

    if precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {PRECISIONS}, got {precision!r}")
    if vision_tokens not in VISION_TOKENS:
        raise ValueError(f"--vision-tokens must be one of {VISION_TOKENS}, got {vision_tokens!r}")
    if target not in TARGETS:
        raise ValueError(f"--target must be one of {TARGETS}, got {target!r}")
    if opset is None:  # TensorRT 8.6's ONNX parser reads opsets up to 17 (JetPack 6.0)
        opset = TENSORRT_OPSET if target == "tensorrt" else DEFAULT_OPSET
    if not 17 <= opset <= 23:
        raise ValueError(f"--opset must be within 17..23 (LayerNormalization needs 17), got {opset}")
    ckpt, out = Path(checkpoint), Path(out)
    if not ckpt.is_dir():
        raise FileNotFoundError(f"--checkpoint {ckpt}: not a directory")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"--out {out} exists and is not empty (pass --overwrite to replace it)")
    step = progress or (lambda _msg: None)

    step("load checkpoint")
    model, tokenizer, proc, meta = load_checkpoint(ckpt, merge=True)
    sha = checkpoint_hash(ckpt)
    cfg, ids = model.cfg, model.ids
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(out.parent, f".{out.name}.partial.")  # mkdtemp's 0700 -> the umask's mode
    try:
        engines: dict[str, Any] = {}
        for name in GRAPH_ENGINES:
            step(f"export {name}")
            path, external = export_graph(model, name, tmp, opset=opset, external_threshold=external_threshold)
            convert_opset(path, opset)
            if precision == "fp16":
                convert_fp16(path, external=external)
            check_graph(path)
            engines[name] = onnx_entry(tmp, path.name, precision)

        step("save embeddings and tokenizer")
        llm_dtype = "float16" if precision == "fp16" else "float32"
        emb, nl = save_arrays(model, tmp, embed_dtype=llm_dtype)
        engines["embed_tokens"] = array_entry(tmp, emb.name, precision)
        engines["image_newline"] = array_entry(tmp, nl.name, "fp32")
        shutil.copytree(ckpt / "tokenizer", tmp / "tokenizer")

        step("save decoder for the builder")
        hf_dir = tmp / ".llm_hf"
        save_causal_lm(model, tokenizer, hf_dir)
        config_dict, token_ids = cfg.to_dict(), ids.to_dict()
        text_config = model.llava.config.text_config
        del model
        gc.collect()  # the builder loads the decoder again: never hold it twice
        step(f"build llm ({BUILDER_TARGETS[precision][0]}, {BUILDER_TARGETS[precision][1]})")
        llm_path = build_llm(hf_dir, tmp, precision)
        shutil.rmtree(hf_dir)
        check_graph(llm_path)
        engines["llm"] = onnx_entry(tmp, llm_path.name, precision)
        llm = llm_record(text_config, token_ids["vocab_size"], contrib_ops(llm_path))

        step("write manifest")
        pre = _preprocessing(cfg, proc)
        data = new_manifest(
            source={"checkpoint": str(ckpt), "checkpoint_sha256": sha, "config_name": cfg.name,
                    "checkpoint_format_version": meta.get("format_version"),
                    **({"pixel_encoder_weights": meta["pixel_encoder_weights"]}
                       if meta.get("pixel_encoder_weights") else {})},
            config=config_dict, token_ids=token_ids, engines=engines, llm=llm, prompt=_prompt(cfg),
            preprocessing=pre,
            vision_tokens={"default": vision_tokens, "supported": list(VISION_TOKENS),
                           "tokens_per_crop": pre["siglip"]["tokens_per_side"] ** 2},
            postprocess={"alpha": cfg.agmd.alpha, "threshold": cfg.agmd.threshold},
            tools=_tool_versions(), gpu={}, export={"precision": precision, "opset": opset, "target": target},
        )
        data["gpu"] = gpu_settings(data, max_batch)
        if target == "tensorrt":
            write_build_script(tmp, data, max_batch)
        write_manifest(tmp, data)
        publish_dir(tmp, out)  # files and folders get the umask's modes, then the rename
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out / MANIFEST_NAME
