"""Exporting one wrapper to ONNX and checking the result.

``torch.onnx.export(dynamo=True)`` (torch.export + onnxscript's optimizer) with named dynamic
axes; weights go to an external-data file next to the graph when they exceed
``external_threshold`` bytes (protobuf caps a single file at 2 GB). Every written graph passes
``onnx.checker``, strict shape inference and loads in ONNX Runtime (CPU) — :func:`check_graph`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
import warnings
from pathlib import Path

import torch

DEFAULT_OPSET = 18
# Above this many weight bytes a graph is saved with ONNX external data (protobuf limit: 2 GiB).
EXTERNAL_DATA_THRESHOLD = 1 << 30


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of the unique parameters and buffers of ``module``."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def export_module(module: torch.nn.Module, example: tuple[torch.Tensor, ...], path: str | os.PathLike, *,
                  input_names: tuple[str, ...], output_names: tuple[str, ...],
                  dynamic: dict[str, dict[int, str]], opset: int = DEFAULT_OPSET, external: bool = False) -> Path:
    """Export ``module(*example)`` to ``path``.

    ``dynamic``: input name -> {axis: axis name}; one name is one ``torch.export.Dim`` shared by
    every input that uses it (e.g. ``batch``). Examples need size >= 2 on dynamic axes, or
    torch.export specialises them. Returns ``path``; with ``external`` the weights go to
    ``path.data`` (ONNX external data).
    """
    path = Path(path)
    dims: dict[str, torch.export.Dim] = {}
    shapes = {name: {ax: dims.setdefault(n, torch.export.Dim(n)) for ax, n in dynamic.get(name, {}).items()}
              for name in input_names}
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in (path, path.with_name(path.name + ".data")):
        stale.unlink(missing_ok=True)
    module = module.eval()
    # the exporter narrates every step on stdout and warns about torchvision (absent by design);
    # keep the CLI's progress bar readable
    logs = [logging.getLogger(n) for n in ("torch.onnx", "onnxscript", "onnx_ir")]
    levels = [log.level for log in logs]
    for log in logs:
        log.setLevel(logging.ERROR)
    try:
        with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, example, str(path), input_names=list(input_names),
                              output_names=list(output_names), dynamic_shapes=shapes, opset_version=opset,
                              dynamo=True, external_data=external, verbose=False)
    finally:
        for log, level in zip(logs, levels):
            log.setLevel(level)
    return path


# ORT-only ops that the onnxruntime-genai builder places in the default ONNX domain.
ORT_OPS_IN_ONNX_DOMAIN = ("SimplifiedLayerNormalization",)


def check_graph(path: str | os.PathLike, *, load_session: bool = True) -> None:
    """``onnx.checker``, shape inference, and an ONNX Runtime CPU session.

    Standard-op graphs get onnx's strict shape inference. Graphs with ONNX Runtime contrib ops
    (the ``llm``) are checked by onnx.checker with those ops' nodes moved to the contrib domain
    (onnx does not know them; ORT registers ``SimplifiedLayerNormalization`` in the default
    domain) and shape-inferred by ORT's symbolic shape inference, which knows them."""
    import onnx

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    ort_ops = [n for n in model.graph.node
               if n.domain == "com.microsoft" or (n.domain in ("", "ai.onnx") and n.op_type in ORT_OPS_IN_ONNX_DOMAIN)]
    try:
        if not ort_ops:
            onnx.checker.check_model(str(path), full_check=False)
            with tempfile.TemporaryDirectory() as tmp:
                onnx.shape_inference.infer_shapes_path(str(path), str(Path(tmp) / "inferred.onnx"), check_type=True,
                                                       strict_mode=True)
        else:
            from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

            for n in ort_ops:
                n.domain = "com.microsoft"
            if not any(o.domain == "com.microsoft" for o in model.opset_import):
                model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
            probe = path.with_name(f"checker_probe_{path.name}")  # next to its external data
            try:
                onnx.save_model(model, str(probe))
                onnx.checker.check_model(str(probe), full_check=False)
            finally:
                probe.unlink(missing_ok=True)
            SymbolicShapeInference.infer_shapes(_with_small_tensors(path), auto_merge=False)
    except Exception as e:
        raise ValueError(f"exported graph {path} fails the ONNX checker / shape inference: {e}") from e
    if load_session:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = min(2, os.cpu_count() or 1)
        try:
            ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise ValueError(f"exported graph {path} does not load in ONNX Runtime: {e}") from e


def _with_small_tensors(path: Path, max_elements: int = 1 << 16):
    """The graph with only its small external initializers loaded (what shape inference reads)."""
    import onnx
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    model = onnx.load(str(path), load_external_data=False)
    for t in model.graph.initializer:
        n = 1
        for d in t.dims:
            n *= d
        if uses_external_data(t) and n <= max_elements:
            load_external_data_for_tensor(t, str(path.parent))
            t.data_location = onnx.TensorProto.DEFAULT
            del t.external_data[:]
    return model


def contrib_ops(path: str | os.PathLike) -> dict[str, int]:
    """Counts of ``com.microsoft`` (ONNX Runtime contrib) ops in a graph."""
    import onnx

    out: dict[str, int] = {}
    for n in onnx.load(str(path), load_external_data=False).graph.node:
        if n.domain == "com.microsoft":
            out[n.op_type] = out.get(n.op_type, 0) + 1
    return dict(sorted(out.items()))
