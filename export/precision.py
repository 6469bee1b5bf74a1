"""fp16 graphs for GPU targets (ONNX Runtime's ``onnxruntime.transformers.float16`` converter).

Graph IO stays float32 (``keep_io_types``) so the runtime feeds every precision alike. Ops known
to lose accuracy in half precision stay float32: normalisation (``LayerNormalization`` and the
decomposed ``ReduceMean``/``Pow``/``Sqrt`` of SAM's ``LayerNorm2d``) and ``Softmax`` (SAM's
global attention scores with relative positions reach large magnitudes).
"""

from __future__ import annotations

import os
from pathlib import Path

FP32_OPS = ("LayerNormalization", "SimplifiedLayerNormalization", "ReduceMean", "Pow", "Sqrt", "Softmax")


def fp16_model(path: str | os.PathLike, *, keep_io_types: bool | list[str] = True,
               op_block_list: list[str] | None = None):
    """The fp16 ``ModelProto`` of the graph at ``path`` (the file is not changed).

    The converter is given the *path*: it then runs ONNX shape inference on the file
    (``infer_shapes_path``), which works above 2 GB, where the in-memory ``infer_shapes`` that a
    loaded model gets cannot serialize the model (protobuf's 2 GB limit: ov-7b's graphs).
    ``keep_io_types``: True keeps float graph IO float32; False makes it fp16 (the GPU LLM: its
    KV cache then stays fp16 from step to step, no cast per decode step); a list keeps those
    names float32. ``op_block_list``: ops kept float32 (default ORT's list + :data:`FP32_OPS`)."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    blocked = list(DEFAULT_OP_BLOCK_LIST) + list(FP32_OPS) if op_block_list is None else list(op_block_list)
    model = convert_float_to_float16(str(Path(path).resolve()), keep_io_types=keep_io_types, op_block_list=blocked)
    model = _toposorted(_dedupe_casts(model))
    del model.graph.value_info[:]  # stale intermediate types; shape inference recomputes them
    return model


def convert_fp16(path: str | os.PathLike, *, external: bool) -> Path:
    """Convert the graph at ``path`` to fp16 in place (float32 IO, :data:`FP32_OPS` kept fp32)."""
    import onnx

    path = Path(path)
    model = fp16_model(path)
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
    else:
        onnx.save_model(model, str(path))
    return path


def _dedupe_casts(model):
    """The converter emits one Cast per use of an initializer that feeds several fp32-kept nodes
    (the exporter deduplicates equal initializers, e.g. every LayerNorm weight of ones), all with
    the same output name; keep the first of such identical nodes."""
    seen, keep = set(), []
    for n in model.graph.node:
        key = tuple(n.output)
        if n.op_type == "Cast" and key in seen:
            continue
        seen.add(key)
        keep.append(n)
    del model.graph.node[:]
    model.graph.node.extend(keep)
    return model


def _toposorted(model):
    """Topological order (the converter appends its graph-input casts at the end)."""
    import onnx_ir as ir

    m = ir.from_proto(model)
    m.graph.sort()
    return ir.to_proto(m)
