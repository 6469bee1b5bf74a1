"""Engine-level quantization with ONNX Runtime's tools (one function per format).

- :func:`quantize_nbits` — weight-only 4-bit (or 8-bit) ``MatMulNBits`` (``MatMulNBitsQuantizer``):
  ``rtn`` = ORT's blockwise round-to-nearest (its default quantizer), ``hqq``, ``gptq`` (fed by
  a ``CalibrationDataReader`` over the captured multimodal prefills; symmetric, see below).
- :func:`quantize_int8_dynamic` — ``quantize_dynamic`` per-channel int8 on the MatMuls that have
  a constant weight (ORT fuses them into ``DynamicQuantizeMatMul``, which runs on VNNI/AMX).
  ORT's dynamic mode has no Gemm kernel; Gemm nodes stay float.
- :func:`quantize_int8_static` — ``quantize_static`` QDQ, per-channel int8 weights, on the
  weight-bearing ops only (MatMul with a constant weight, Gemm, Conv, ConvTranspose); symmetric
  int8 activations for TensorRT / CUDA.
- :func:`convert_fp16` — ``onnxruntime.transformers.float16`` with ``keep_io_types`` (the
  engine IO stays float32, as the manifest contract says).

Norms, softmax and every other op are never quantized (weight-only and MatMul-only modes), and
``exclude`` keeps chosen MatMuls in float: :func:`sensitive_nodes` names the last decoder
layers and the LM head by their weights' names.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import onnx

INT4_ALGORITHMS = ("rtn", "hqq", "gptq")
STATIC_METHODS = ("minmax", "entropy", "percentile")
EXTERNAL_DATA_THRESHOLD = 1 << 30  # graphs with more weight bytes are saved with external data
_LAYER = re.compile(r"layers[./_](\d+)[./_]")


# ---- graph helpers ---------------------------------------------------------------------------

def weight_matmuls(model: onnx.ModelProto, op_types: Iterable[str] = ("MatMul", "Gemm")) -> list[tuple[str, str]]:
    """``(node name, weight initializer name)`` of the nodes whose second input is a constant weight
    matrix (2-D: per-channel quantization is per output column; a constant 3-D right operand, such
    as SAM's relative-position tables in a batched MatMul, is not a weight and stays float)."""
    inits = {t.name for t in model.graph.initializer if len(t.dims) == 2}
    return [(n.name, n.input[1]) for n in model.graph.node
            if n.op_type in set(op_types) and len(n.input) > 1 and n.input[1] in inits]


def layer_index(*names: str) -> int | None:
    """The decoder layer a node or weight belongs to (``layers.12.`` / ``/layers.12/``), if any."""
    for name in names:
        m = _LAYER.search(name)
        if m:
            return int(m.group(1))
    return None


def sensitive_nodes(model: onnx.ModelProto, num_layers: int, keep_last_layers: int = 0,
                    keep_lm_head: bool = False) -> list[str]:
    """MatMul nodes to keep in float: those of the last ``keep_last_layers`` decoder layers (they
    produce the anchor hidden states) and, with ``keep_lm_head``, the LM head."""
    out = []
    for node, weight in weight_matmuls(model):
        layer = layer_index(node, weight)
        if layer is not None and layer >= num_layers - keep_last_layers:
            out.append(node)
        elif keep_lm_head and "lm_head" in (node + weight):
            out.append(node)
    return out


def lm_head_nodes(model: onnx.ModelProto) -> list[str]:
    return [n for n, w in weight_matmuls(model) if "lm_head" in n + w]


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the initializers (external ones by their recorded length)."""
    total = 0
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            total += int({e.key: e.value for e in t.external_data}.get("length", 0))
        else:
            total += len(t.raw_data) or int(np.prod(t.dims)) * 4
    return total


def save_onnx(model: onnx.ModelProto, path: str | os.PathLike) -> list[Path]:
    """Save ``model`` to ``path`` (external data ``<name>.data`` when its weights exceed 1 GiB);
    returns the files written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = path.with_name(path.name + ".data")
    for p in (path, data):
        p.unlink(missing_ok=True)
    if weight_bytes(model) > EXTERNAL_DATA_THRESHOLD:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024, convert_attribute=True)
        return [path, data]
    onnx.save_model(model, str(path))
    return [path]


def copy_onnx(src: str | os.PathLike, dst: str | os.PathLike) -> list[Path]:
    """Copy a graph and its external-data files (the names the graph references)."""
    from agvas.export.manifest import onnx_external_files

    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    out = [dst]
    shutil.copy2(src, dst)
    for f in onnx_external_files(src):
        shutil.copy2(src.parent / f, dst.parent / f)
        out.append(dst.parent / f)
    return out


def _record(method: str, src: Path, files: list[Path], t0: float, **details: Any) -> dict[str, Any]:
    return {"method": method, "bytes": sum(f.stat().st_size for f in files), "seconds": round(time.perf_counter() - t0, 2),
            "source_bytes": sum(f.stat().st_size for f in [src, *[src.parent / x for x in _ext(src)]]), **details}


def _ext(path: Path) -> list[str]:
    from agvas.export.manifest import onnx_external_files

    return onnx_external_files(path)


# ---- formats ---------------------------------------------------------------------------------

def quantize_nbits(src: str | os.PathLike, dst: str | os.PathLike, *, bits: int = 4, algorithm: str = "rtn",
                   block_size: int = 32, accuracy_level: int | None = 4, reader=None, exclude: Iterable[str] = (),
                   rtn_nodes: Iterable[str] = ()) -> dict[str, Any]:
    """Weight-only ``MatMulNBits`` (4 or 8 bits). ``accuracy_level`` 4 lets the CPU kernel compute
    in int8 (VNNI/AMX); ``None`` leaves ORT's default. GPTQ (4-bit only) quantizes symmetrically
    (ORT's GPTQ path packs asymmetric zero points wrongly when K/block_size is odd) and quantizes
    ``rtn_nodes`` (the LM head, which must match the ``lm_head`` engine bit for bit) with RTN
    afterwards."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig,
                                                                 GPTQWeightOnlyQuantConfig,
                                                                 HQQWeightOnlyQuantConfig, MatMulNBitsQuantizer)

    if algorithm not in INT4_ALGORITHMS:
        raise ValueError(f"weight-only algorithm must be one of {INT4_ALGORITHMS}, got {algorithm!r}")
    if bits not in (4, 8) or (algorithm == "gptq" and bits != 4):
        raise ValueError(f"MatMulNBits here takes 4 bits (rtn, hqq, gptq) or 8 bits (rtn, hqq), got {bits} with {algorithm}")
    src, dst, t0 = Path(src), Path(dst), time.perf_counter()
    exclude, rtn_nodes = list(exclude), list(rtn_nodes)

    class _Quantizer(MatMulNBitsQuantizer):
        # ORT honours nodes_to_exclude for GPTQ only through the per-node config ("fp32").
        def _generate_q4_node_config(self):
            cfg = super()._generate_q4_node_config()
            cfg.update({n: "fp32" for n in self.nodes_to_exclude})
            return cfg

    def rtn_cfg() -> Any:
        return DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=False, accuracy_level=accuracy_level,
                                            bits=bits)

    details: dict[str, Any] = {"bits": bits, "algorithm": algorithm, "block_size": block_size,
                               "accuracy_level": accuracy_level, "excluded_nodes": exclude}
    if algorithm == "gptq":
        if reader is None:
            raise ValueError("int4 GPTQ needs calibration data (agvas calibrate) for the llm engine")
        # ORT's GPTQ runs the graph from memory below 2 GB (protobuf's limit), from the file above
        header = onnx.load(str(src), load_external_data=False)
        big = weight_bytes(header) > 2 * EXTERNAL_DATA_THRESHOLD - (64 << 20)
        q = _Quantizer(str(src) if big else onnx.load(str(src)), block_size=block_size, is_symmetric=True,
                       accuracy_level=accuracy_level, nodes_to_exclude=exclude + rtn_nodes,
                       algo_config=GPTQWeightOnlyQuantConfig(calibration_data_reader=reader))
        with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):  # ORT prints a progress bar
            q.process()
        model = q.model.model
        details.update(symmetric=True, calibration_samples=len(reader))
        if rtn_nodes:
            keep = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in rtn_nodes]
            q2 = _Quantizer(model, block_size=block_size, accuracy_level=accuracy_level, nodes_to_exclude=keep,
                            algo_config=rtn_cfg())
            q2.process()
            model = q2.model.model
            details["rtn_nodes"] = rtn_nodes
    else:
        cfg = rtn_cfg() if algorithm == "rtn" else HQQWeightOnlyQuantConfig(block_size=block_size, bits=bits)
        q = _Quantizer(str(src), bits=bits, block_size=block_size, is_symmetric=False, accuracy_level=accuracy_level,
                       nodes_to_exclude=exclude, algo_config=cfg)
        q.process()
        model = q.model.model
        if algorithm == "hqq" and accuracy_level is not None:
            _set_attr(model, "MatMulNBits", "accuracy_level", accuracy_level)
    details["quantized_nodes"] = sum(n.op_type == "MatMulNBits" for n in model.graph.node)
    files = save_onnx(model, dst)
    return _record(f"MatMulNBits {bits}-bit weight-only", src, files, t0, **details)


def _set_attr(model: onnx.ModelProto, op_type: str, name: str, value: int) -> None:
    for n in model.graph.node:
        if n.op_type == op_type:
            kept = [a for a in n.attribute if a.name != name]
            del n.attribute[:]
            n.attribute.extend(kept + [onnx.helper.make_attribute(name, value)])


def quantize_int8_dynamic(src: str | os.PathLike, dst: str | os.PathLike, *,
                          exclude: Iterable[str] = ()) -> dict[str, Any]:
    """``quantize_dynamic``: per-channel int8 weights of the MatMuls with a constant weight,
    activations quantized at run time."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst, t0 = Path(src), Path(dst), time.perf_counter()
    dst.parent.mkdir(parents=True, exist_ok=True)
    model = onnx.load(str(src), load_external_data=False)
    exclude = set(exclude)
    nodes = [n for n, _ in weight_matmuls(model, ("MatMul",)) if n not in exclude]
    del model
    for p in (dst, dst.with_name(dst.name + ".data")):
        p.unlink(missing_ok=True)
    big = sum(f.stat().st_size for f in [src, *[src.parent / x for x in _ext(src)]]) > 4 * EXTERNAL_DATA_THRESHOLD
    quantize_dynamic(str(src), str(dst), op_types_to_quantize=["MatMul"], per_channel=True, reduce_range=False,
                     weight_type=QuantType.QInt8, nodes_to_quantize=nodes, use_external_data_format=big,
                     extra_options={"MatMulConstBOnly": True})
    files = [dst] + [dst.parent / f for f in _ext(dst)]
    return _record("quantize_dynamic int8 per-channel (MatMul)", src, files, t0, quantized_nodes=len(nodes),
                   excluded_nodes=sorted(exclude))


def weight_op_ranges(model_path: str | os.PathLike, reader, nodes: Iterable[str], symmetric: bool):
    """Min/max ranges of the activation input and the output of each node in ``nodes`` over all
    samples of ``reader``, one sample at a time (ORT's own calibrator records every tensor of the
    chosen op types — for SAM's global attention that is gigabytes per sample, the activation x
    activation MatMuls included). Returns ORT's ``TensorsData`` (MinMax)."""
    import tempfile

    import onnxruntime as ort
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorsData

    model = onnx.load(str(model_path))
    wanted = set(nodes)
    names: list[str] = []
    for n in model.graph.node:
        if n.name in wanted:
            names += [t for t in (n.input[0], n.output[0]) if t not in names]
    have = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None)
                              for t in names if t not in have)
    lo: dict[str, float] = {}
    hi: dict[str, float] = {}
    with tempfile.TemporaryDirectory(dir=Path(model_path).parent, prefix=".ranges.") as tmp:
        save_onnx(model, Path(tmp) / "augmented.onnx")
        del model
        so = ort.SessionOptions()
        so.log_severity_level = 3
        sess = ort.InferenceSession(str(Path(tmp) / "augmented.onnx"), so, providers=["CPUExecutionProvider"])
        inputs = [a.name for a in sess.get_inputs()]
        for feeds in reader:
            for t, v in zip(names, sess.run(names, {k: feeds[k] for k in inputs})):
                lo[t] = min(lo.get(t, np.inf), float(v.min()))
                hi[t] = max(hi.get(t, -np.inf), float(v.max()))
        del sess
    ranges = {}
    for t in names:
        a, b = lo[t], hi[t]
        if symmetric:
            a, b = -max(abs(a), abs(b)), max(abs(a), abs(b))
        ranges[t] = (np.array(a, np.float32), np.array(b, np.float32))
    return TensorsData(CalibrationMethod.MinMax, ranges)


def quantize_int8_static(src: str | os.PathLike, dst: str | os.PathLike, reader, *, symmetric: bool,
                         method: str = "minmax", exclude: Iterable[str] = ()) -> dict[str, Any]:
    """``quantize_static`` QDQ: per-channel int8 weights on MatMul(const)/Gemm/Conv/ConvTranspose,
    int8 activations calibrated on the captured inputs (symmetric for TensorRT / CUDA). MinMax ranges
    come from :func:`weight_op_ranges` (bounded memory) through ORT's calibration cache; entropy and
    percentile use ORT's calibrator."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import save_tensors_data
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if method not in STATIC_METHODS:
        raise ValueError(f"static calibration method must be one of {STATIC_METHODS}, got {method!r}")
    src, dst, t0 = Path(src), Path(dst), time.perf_counter()
    dst.parent.mkdir(parents=True, exist_ok=True)
    big = bool(_ext(src))
    pre = dst.with_name(dst.stem + ".pre.onnx")
    cache = dst.with_name(dst.stem + ".ranges.json")
    ops = ("MatMul", "Gemm", "Conv", "ConvTranspose")
    try:
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True, save_as_external_data=big)
        exclude = set(exclude)
        nodes = [n for n, _ in weight_matmuls(onnx.load(str(pre), load_external_data=False), ops) if n not in exclude]
        if method == "minmax":
            save_tensors_data(weight_op_ranges(pre, reader, nodes, symmetric), cache)
        quantize_static(
            str(pre), str(dst), None if method == "minmax" else reader, quant_format=QuantFormat.QDQ,
            per_channel=True, nodes_to_quantize=nodes, op_types_to_quantize=list(ops),
            activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8, weight_type=QuantType.QInt8,
            calibrate_method={"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                              "percentile": CalibrationMethod.Percentile}[method],
            use_external_data_format=big, calibration_cache_path=str(cache) if method == "minmax" else None,
            extra_options={"ActivationSymmetric": symmetric, "WeightSymmetric": True},
        )
    finally:
        for p in (pre, pre.with_name(pre.name + ".data"), cache):
            p.unlink(missing_ok=True)
    files = [dst] + [dst.parent / f for f in _ext(dst)]
    return _record("quantize_static QDQ int8 per-channel", src, files, t0, quantized_nodes=len(nodes),
                   calibration=method, activation_symmetric=symmetric, calibration_samples=len(reader))


def convert_fp16(src: str | os.PathLike, dst: str | os.PathLike, *, fp16_io: bool = False,
                 op_block_list: list[str] | None = None) -> dict[str, Any]:
    """fp16 weights and compute (``agvas.export.precision.fp16_model``: the file-based converter, so
    graphs above 2 GB convert). ``fp16_io=False`` keeps float graph IO float32; ``True`` makes it
    fp16 — the GPU LLM, whose KV cache then stays fp16 from one decode step to the next.
    ``op_block_list``: the ops kept float32 (default: ORT's list + LayerNorm/Softmax)."""
    from agvas.export.precision import fp16_model

    src, dst, t0 = Path(src), Path(dst), time.perf_counter()
    model = fp16_model(src, keep_io_types=not fp16_io, op_block_list=op_block_list)
    files = save_onnx(model, dst)
    return _record("float16 (onnxruntime.transformers.float16, " + ("fp16 IO" if fp16_io else "keep_io_types") + ")",
                   src, files, t0)
