"""The machine's physical limits, measured in the same run as the back-ends.

- GEMM peaks: fp32 and bf16 with torch (MKL / oneDNN), int8 with ONNX Runtime's dynamic
  quantization of a single MatMul (it runs as ``DynamicQuantizeMatMul`` / ``MatMulInteger`` on the
  CPU's VNNI / AMX units) — the same kernels our int8 engines use.
- Memory bandwidth: a large tensor copy (bytes read + bytes written per second).
Each number is the best of a few repetitions (a peak, not a typical value); on a shared machine
contention lowers all of them.
"""

from __future__ import annotations

import logging
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8",
             "avx512_fp16")


def cpu_info() -> dict[str, Any]:
    """CPU model, core count and the matrix / vector extensions that decide the peaks."""
    model, flags = platform.processor() or "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("unknown", "", "x86_64"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {"cpu": model, "logical_cpus": os.cpu_count(), "flags": [f for f in CPU_FLAGS if f in flags]}


def _best_seconds(fn, reps: int, min_time: float = 0.0) -> float:
    fn()  # warm-up (thread pools, kernel selection, packing)
    best, spent = float("inf"), 0.0
    for _ in range(max(1, reps)):
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        best, spent = min(best, dt), spent + dt
    while spent < min_time:
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        best, spent = min(best, dt), spent + dt
    return best


def gemm_peak_torch(dtype: str = "float32", n: int = 2048, reps: int = 5, threads: int | None = None) -> float:
    """Best achieved GFLOP/s of an ``n×n @ n×n`` matmul in ``dtype`` (2·n³ FLOPs)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(dt)
    b = torch.randn(n, n, generator=g).to(dt)
    out = torch.empty(n, n, dtype=dt)
    with torch.inference_mode():
        s = _best_seconds(lambda: torch.matmul(a, b, out=out), reps)
    return 2.0 * n**3 / s / 1e9


def gemm_peak_ort_int8(n: int = 2048, reps: int = 5, threads: int = 2) -> tuple[float, str]:
    """Best achieved GOP/s of ONNX Runtime's dynamic int8 MatMul (``quantize_dynamic``,
    per-channel int8 weights) for ``[n,n] @ [n,n]``; also returns the op type ORT runs."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import QuantType, quantize_dynamic

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((n, n), dtype=np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["A", "W"], ["Y"])], "gemm",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [n, n])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [n, n])], initializer=[w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    with tempfile.TemporaryDirectory() as tmp:
        f32, q8 = os.path.join(tmp, "gemm.onnx"), os.path.join(tmp, "gemm.int8.onnx")
        onnx.save(model, f32)
        logging.getLogger().setLevel(logging.ERROR)  # quantize_dynamic's pre-processing hint
        quantize_dynamic(f32, q8, weight_type=QuantType.QInt8, per_channel=True)
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        so.optimized_model_filepath = os.path.join(tmp, "gemm.opt.onnx")
        sess = ort.InferenceSession(q8, so, providers=["CPUExecutionProvider"])
        ops = sorted({node.op_type for node in onnx.load(so.optimized_model_filepath).graph.node})
        a = rng.standard_normal((n, n), dtype=np.float32)
        s = _best_seconds(lambda: sess.run(None, {"A": a}), reps)
    return 2.0 * n**3 / s / 1e9, "+".join(ops)


def memory_bandwidth_gbs(mb: int = 512, reps: int = 5) -> float:
    """Best achieved copy bandwidth in GB/s (read + write) of a ``mb`` MiB tensor copy (torch,
    multi-threaded, like the kernels that stream weights during decode)."""
    import torch

    n = mb * (1 << 20) // 4
    src = torch.ones(n, dtype=torch.float32)
    dst = torch.empty_like(src)
    s = _best_seconds(lambda: dst.copy_(src), reps)
    return 2.0 * n * 4 / s / 1e9


def measure_machine(quick: bool = False, threads: int = 2) -> dict[str, Any]:
    """All peaks in one record (the bench JSON's ``machine``)."""
    import torch

    torch.set_num_threads(threads)
    n = 1024 if quick else 2048
    reps = 3 if quick else 8
    int8, int8_ops = gemm_peak_ort_int8(n, reps, threads)
    return {
        **cpu_info(),
        "threads": threads,
        "torch": torch.__version__,
        "gemm_n": n,
        "peak_gflops": {
            "fp32": gemm_peak_torch("float32", n, reps),
            "bf16": gemm_peak_torch("bfloat16", n, reps),
            "int8": int8,
        },
        "int8_kernel": int8_ops,
        "memory_bandwidth_gbs": memory_bandwidth_gbs(256 if quick else 512, reps),
        "loadavg_1min": os.getloadavg()[0],  # > logical CPUs: other work shares the machine (contended)
        "note": "best of repetitions; int8 = ONNX Runtime quantize_dynamic MatMul (GOP/s)",
    }


if __name__ == "__main__":  # pragma: no cover - `python -m agvas.benchmarks.machine`
    import json

    print(json.dumps(measure_machine(), indent=2))
