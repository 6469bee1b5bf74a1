"""Attention kernels of ONNX Runtime's CPU provider at ov-0.5b's two expensive shapes, timed side by
side in one process: the numbers behind the README's "where each stage stands".

- **prefill**: Qwen2-0.5B causal self-attention over the anyres prompt (14 query heads, 2 KV heads,
  head 64, 3,005 tokens) — ``com.microsoft.GroupQueryAttention`` (what the genai builder's graph
  uses, rotary off here) against the ONNX ``Attention`` op (opset 23, ``is_causal=1``,
  ``kv_num_heads=2``).
- **sam**: one global block of SAM ViT-B at 1024² (12 heads, 4,096 tokens, head 64) with its
  decomposed relative positions (``rel_h [heads, 64, 64, 64]``, ``rel_w`` alike, added over
  each head's score matrix) — the export's head-by-head MatMul graph (``export/wrappers.py``)
  against the ONNX ``Attention`` op fed the bias as ``attn_mask`` (materialised per head) and
  against the bias folded into the dot product (``q' = [q·scale, rel_h, rel_w]``,
  ``k' = [k, onehot(row), onehot(col)]``, head 192, no mask: the kernel's unmasked path).

Every variant is checked against a NumPy reference before it is timed. ``python -m
agvas.benchmarks.attention_probe [--threads 2] [--runs 3] [--only prefill|sam]``; prints one JSON
line per variant (median seconds, GFLOP counted as the dense products the variant computes).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

OPSET = 23


def _session(model, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _model(nodes, inputs, outputs, ms_domain: bool = False):
    from onnx import helper

    opsets = [helper.make_opsetid("", OPSET)] + ([helper.make_opsetid("com.microsoft", 1)] if ms_domain else [])
    graph = helper.make_graph(nodes, "probe", inputs, outputs)
    return helper.make_model(graph, opset_imports=opsets, ir_version=10)


def _vi(name, shape, dtype=None):
    from onnx import TensorProto, helper

    return helper.make_tensor_value_info(name, dtype or TensorProto.FLOAT, shape)


def _time(sess, feeds, runs: int) -> tuple[float, dict]:
    out = sess.run(None, feeds)  # warm-up (and the value checked by the caller)
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(None, feeds)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), out


def _softmax(x):
    x = x - x.max(-1, keepdims=True)
    np.exp(x, out=x)
    x /= x.sum(-1, keepdims=True)
    return x


# ---- prefill ----------------------------------------------------------------------------------
def prefill(threads: int, runs: int, seq: int = 3005, heads: int = 14, kv_heads: int = 2, dim: int = 64):
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, seq, heads * dim), np.float32)
    k = rng.standard_normal((1, seq, kv_heads * dim), np.float32)
    v = rng.standard_normal((1, seq, kv_heads * dim), np.float32)
    scale = dim ** -0.5
    # reference on the last 64 query rows (the full product is what the kernels are timed on)
    rows = slice(seq - 64, seq)
    qh = q.reshape(seq, heads, dim).transpose(1, 0, 2)[:, rows]
    kh = np.repeat(k.reshape(seq, kv_heads, dim).transpose(1, 0, 2), heads // kv_heads, 0)
    vh = np.repeat(v.reshape(seq, kv_heads, dim).transpose(1, 0, 2), heads // kv_heads, 0)
    s = qh @ kh.transpose(0, 2, 1) * scale
    s[:, np.arange(64)[:, None] + seq - 64 < np.arange(seq)[None]] = -np.inf
    ref = (_softmax(s) @ vh).transpose(1, 0, 2).reshape(64, heads * dim)
    causal_gflop = 2 * 2 * heads * dim * seq * (seq + 1) / 2 / 1e9
    results = []

    # GroupQueryAttention: BSNH packed heads, empty past, seqlens_k = total - 1
    gqa = helper.make_node("GroupQueryAttention", ["q", "k", "v", "", "", "seqlens_k", "total"], ["o"],
                           domain="com.microsoft", num_heads=heads, kv_num_heads=kv_heads, scale=scale)
    m = _model([gqa], [_vi("q", [1, seq, heads * dim]), _vi("k", [1, seq, kv_heads * dim]),
                       _vi("v", [1, seq, kv_heads * dim]), _vi("seqlens_k", [1], TensorProto.INT32),
                       _vi("total", [], TensorProto.INT32)], [_vi("o", [1, seq, heads * dim])], ms_domain=True)
    feeds = {"q": q, "k": k, "v": v, "seqlens_k": np.array([seq - 1], np.int32), "total": np.array(seq, np.int32)}
    results.append(("prefill", "GroupQueryAttention (com.microsoft)", m, feeds, causal_gflop))

    # ONNX Attention, opset 23: BSNH input (3-D with q/kv_num_heads), is_causal
    att = helper.make_node("Attention", ["q", "k", "v"], ["o"], is_causal=1, q_num_heads=heads,
                           kv_num_heads=kv_heads, scale=scale)
    m = _model([att], [_vi("q", [1, seq, heads * dim]), _vi("k", [1, seq, kv_heads * dim]),
                       _vi("v", [1, seq, kv_heads * dim])], [_vi("o", [1, seq, heads * dim])])
    results.append(("prefill", "Attention (onnx opset 23, is_causal)", m, {"q": q, "k": k, "v": v}, causal_gflop))

    for stage, name, model, feeds, gflop in results:
        yield _run(stage, name, model, feeds, gflop, threads, runs,
                   check=lambda out: float(np.abs(out[0][0, rows] - ref).max()))


# ---- SAM global block -------------------------------------------------------------------------
def sam(threads: int, runs: int, side: int = 64, heads: int = 12, dim: int = 64):
    from onnx import numpy_helper, helper

    n = side * side
    rng = np.random.default_rng(0)
    q = rng.standard_normal((heads, n, dim), np.float32) * 0.5
    k = rng.standard_normal((heads, n, dim), np.float32) * 0.5
    v = rng.standard_normal((heads, n, dim), np.float32)
    rel_h = rng.standard_normal((heads, side, side, side), np.float32)  # [head, qh, qw, kh]
    rel_w = rng.standard_normal((heads, side, side, side), np.float32)  # [head, qh, qw, kw]
    scale = dim ** -0.5
    rows = slice(0, 64)

    def ref_head(i):
        s = (q[i, rows] * scale) @ k[i].T
        s = s.reshape(64, side, side) + rel_h[i].reshape(n, side)[rows, :, None] + rel_w[i].reshape(n, side)[rows, None, :]
        return _softmax(s.reshape(64, n)) @ v[i]

    ref = np.stack([ref_head(i) for i in range(heads)])  # [heads, 64, dim]
    dense = 2 * 2 * heads * n * n * dim / 1e9
    out = []

    # (a) the export's graph: per head MatMul, broadcast adds of rel_h / rel_w, Softmax, MatMul
    nodes, outs = [], []
    sc = numpy_helper.from_array(np.array(scale, np.float32), "scale")
    shp5 = numpy_helper.from_array(np.array([side, side, side, side], np.int64), "shp4")
    shp2 = numpy_helper.from_array(np.array([n, n], np.int64), "shp2")
    inits = [sc, shp5, shp2]
    for i in range(heads):
        for t in ("q", "k", "v", "rh", "rw"):
            nodes.append(helper.make_node("Gather", [t, f"i{i}"], [f"{t}{i}"], axis=0))
        inits.append(numpy_helper.from_array(np.array(i, np.int64), f"i{i}"))
        nodes += [
            helper.make_node("Mul", [f"q{i}", "scale"], [f"qs{i}"]),
            helper.make_node("Transpose", [f"k{i}"], [f"kt{i}"], perm=[1, 0]),
            helper.make_node("MatMul", [f"qs{i}", f"kt{i}"], [f"s{i}"]),
            helper.make_node("Reshape", [f"s{i}", "shp4"], [f"s4{i}"]),
            helper.make_node("Unsqueeze", [f"rh{i}", "ax3"], [f"rh4{i}"]),  # [qh, qw, kh, 1]
            helper.make_node("Unsqueeze", [f"rw{i}", "ax2"], [f"rw4{i}"]),  # [qh, qw, 1, kw]
            helper.make_node("Add", [f"s4{i}", f"rh4{i}"], [f"a{i}"]),
            helper.make_node("Add", [f"a{i}", f"rw4{i}"], [f"b{i}"]),
            helper.make_node("Reshape", [f"b{i}", "shp2"], [f"b2{i}"]),
            helper.make_node("Softmax", [f"b2{i}"], [f"p{i}"], axis=-1),
            helper.make_node("MatMul", [f"p{i}", f"v{i}"], [f"o{i}"]),
            helper.make_node("Unsqueeze", [f"o{i}", "ax0"], [f"ou{i}"]),
        ]
        outs.append(f"ou{i}")
    inits += [numpy_helper.from_array(np.array([a], np.int64), f"ax{a}") for a in (0, 2, 3)]
    nodes.append(helper.make_node("Concat", outs, ["o"], axis=0))
    g = helper.make_graph(nodes, "probe", [_vi("q", [heads, n, dim]), _vi("k", [heads, n, dim]), _vi("v", [heads, n, dim]),
                                           _vi("rh", [heads, side, side, side]), _vi("rw", [heads, side, side, side])],
                          [_vi("o", [heads, n, dim])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=10)
    feeds = {"q": q, "k": k, "v": v, "rh": rel_h, "rw": rel_w}
    out.append(("sam", "head-by-head MatMul + rel-pos adds (export/wrappers.py)", m, feeds, dense,
                lambda o: float(np.abs(o[0][:, rows] - ref).max())))

    # (b) ONNX Attention with the bias as attn_mask, one head per call (the mask built by the graph)
    nodes, outs = [], []
    inits = [numpy_helper.from_array(np.array([a], np.int64), f"ax{a}") for a in (0, 1, 2, 3)]
    inits.append(numpy_helper.from_array(np.array([1, 1, n, n], np.int64), "mshape"))
    for i in range(heads):
        inits.append(numpy_helper.from_array(np.array(i, np.int64), f"i{i}"))
        for t in ("q", "k", "v", "rh", "rw"):
            nodes.append(helper.make_node("Gather", [t, f"i{i}"], [f"{t}{i}"], axis=0))
        nodes += [
            helper.make_node("Unsqueeze", [f"rh{i}", "ax3"], [f"rh4{i}"]),
            helper.make_node("Unsqueeze", [f"rw{i}", "ax2"], [f"rw4{i}"]),
            helper.make_node("Add", [f"rh4{i}", f"rw4{i}"], [f"m4{i}"]),
            helper.make_node("Reshape", [f"m4{i}", "mshape"], [f"m{i}"]),
            helper.make_node("Unsqueeze", [f"q{i}", "ax0"], [f"q3{i}"]),
            helper.make_node("Unsqueeze", [f"k{i}", "ax0"], [f"k3{i}"]),
            helper.make_node("Unsqueeze", [f"v{i}", "ax0"], [f"v3{i}"]),
            helper.make_node("Attention", [f"q3{i}", f"k3{i}", f"v3{i}", f"m{i}"], [f"o{i}"], q_num_heads=1,
                             kv_num_heads=1, scale=scale),
        ]
        outs.append(f"o{i}")
    nodes.append(helper.make_node("Concat", outs, ["o"], axis=0))
    g = helper.make_graph(nodes, "probe", [_vi("q", [heads, n, dim]), _vi("k", [heads, n, dim]), _vi("v", [heads, n, dim]),
                                           _vi("rh", [heads, side, side, side]), _vi("rw", [heads, side, side, side])],
                          [_vi("o", [heads, n, dim])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=10)
    out.append(("sam", "Attention (onnx opset 23) + per-head attn_mask", m, feeds, dense,
                lambda o: float(np.abs(o[0][:, rows] - ref).max())))

    # (c) the bias folded into the dot product: head 192 for q/k, no mask
    onehot = np.eye(side, dtype=np.float32)
    kh_idx, kw_idx = np.divmod(np.arange(n), side)
    q_aug = np.concatenate([q * scale, rel_h.reshape(heads, n, side), rel_w.reshape(heads, n, side)], -1)
    k_aug = np.concatenate([k, np.broadcast_to(onehot[kh_idx], (heads, n, side)),
                            np.broadcast_to(onehot[kw_idx], (heads, n, side))], -1)
    att = helper.make_node("Attention", ["q", "k", "v"], ["o"], scale=1.0)
    m = _model([att], [_vi("q", [1, heads, n, 3 * dim]), _vi("k", [1, heads, n, 3 * dim]), _vi("v", [1, heads, n, dim])],
               [_vi("o", [1, heads, n, dim])])
    out.append(("sam", "Attention (onnx opset 23), bias folded into q·k (head 192, no mask)", m,
                {"q": np.ascontiguousarray(q_aug[None]), "k": np.ascontiguousarray(k_aug[None]), "v": v[None]},
                2 * heads * n * n * (3 * dim + dim) / 1e9, lambda o: float(np.abs(o[0][0][:, rows] - ref).max())))
    for stage, name, model, feeds, gflop, check in out:
        yield _run(stage, name, model, feeds, gflop, threads, runs, check)


def _run(stage, name, model, feeds, gflop, threads, runs, check):
    try:
        sess = _session(model, threads)
        sec, out = _time(sess, feeds, runs)
    except Exception as e:  # a kernel this ORT build lacks is a result too
        return {"stage": stage, "variant": name, "error": f"{type(e).__name__}: {str(e)[:300]}"}
    return {"stage": stage, "variant": name, "seconds": round(sec, 4), "gflop": round(gflop, 1),
            "gflop_per_s": round(gflop / sec, 1), "max_abs_err_vs_numpy": check(out)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--only", choices=("prefill", "sam"))
    a = ap.parse_args(argv)
    for stage in ("prefill", "sam"):
        if a.only in (None, stage):
            for rec in (prefill if stage == "prefill" else sam)(a.threads, a.runs):
                print(json.dumps(rec), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
