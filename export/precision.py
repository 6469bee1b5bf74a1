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


def convert_fp16(path: str | os.PathLike, *, external: bool) -> Path:
    """Convert the graph at ``path`` to fp16 in place (float32 IO, :data:`FP32_OPS` kept fp32)."""
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    path = Path(path)
    model = onnx.load(str(path), load_external_data=True)
    model = convert_float_to_float16(model, keep_io_types=True, op_block_list=list(DEFAULT_OP_BLOCK_LIST) + list(FP32_OPS))
    model = _toposorted(_dedupe_casts(model))
    del model.graph.value_info[:]  # stale intermediate types; shape inference recomputes them
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
