"""Roofline latency and memory model for GPUs we cannot run here — MODEL, NOT MEASURED.

For each stage: lower-bound latency = max(FLOPs / peak FLOP/s of the precision,
bytes moved / memory bandwidth), with the FLOPs of :mod:`agvas.benchmarks.flops` and the bytes = the
stage's weights at that precision (+ the KV cache read by each decode step). It ignores kernel
launch overhead, non-matrix ops, activation traffic and imperfect utilisation, so real latency is
higher; it is a floor, useful to rank devices and precisions and to see what fits.

Peaks are the vendors' published *dense* (non-sparse) tensor-core numbers; sources are noted per
device. Precision semantics: ``fp32`` = CUDA cores (no TF32); ``fp16`` = fp16/bf16 tensor cores;
``int8`` = W8A8 on int8 tensor cores; ``int4`` = 4-bit weight-only LLM (W4A16: fp16 math, ½-byte
weights) with fp16 vision engines. KV cache is fp16 except in fp32.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from agvas.train.config import AGVASConfig, get_config
from agvas.calibration.memory_plan import ENGINES, engine_weights, kv_cache_bytes, token_counts

from .flops import pipeline_flops

LABEL = "model, not measured"


@dataclass(frozen=True)
class Device:
    name: str
    memory_gb: float
    bandwidth_gbs: float
    peak_tflops: dict[str, float]  # dense, per compute precision: fp32, fp16, int8
    reserved_gb: float  # OS / CUDA context / runtime not available to the model
    source: str
    notes: str = ""


# Jetson Orin GPUs (Ampere GA10B): 4 tensor cores per SM, each 256 fp16 FMA / clock dense (int8 2×);
# the published sparse TOPS are 2× dense. DLA engines are not counted.
DEVICES: tuple[Device, ...] = (
    Device("Jetson AGX Orin 64GB", 64, 204.8, {"fp32": 5.3, "fp16": 42.5, "int8": 85.0}, 3.0,
           "NVIDIA Jetson AGX Orin Series data sheet / technical brief: GPU 170 sparse INT8 TOPS, "
           "5.3 FP32 TFLOPS, 2048 CUDA / 64 tensor cores @1.3 GHz, 204.8 GB/s LPDDR5",
           "memory shared with the CPU"),
    Device("Jetson Orin NX 16GB", 16, 102.4, {"fp32": 1.88, "fp16": 15.0, "int8": 30.0}, 2.5,
           "NVIDIA Jetson Orin NX Series data sheet: 100 sparse TOPS module (GPU ~60 + 2 DLA), "
           "1024 CUDA / 32 tensor cores @918 MHz, 102.4 GB/s LPDDR5",
           "memory shared with the CPU"),
    Device("Jetson Orin Nano 8GB", 8, 68.0, {"fp32": 1.28, "fp16": 10.2, "int8": 20.5}, 2.0,
           "NVIDIA Jetson Orin Nano Series data sheet: 40 sparse INT8 TOPS, 1024 CUDA / 32 tensor cores "
           "@625 MHz, 68 GB/s LPDDR5",
           "memory shared with the CPU; the JetPack 6.2 'Super' mode raises it to 1020 MHz / 102 GB/s"),
    Device("NVIDIA L4", 24, 300.0, {"fp32": 30.3, "fp16": 121.0, "int8": 242.5}, 1.0,
           "NVIDIA L4 Tensor Core GPU data sheet: FP32 30.3 TF, FP16/BF16 242 TF and INT8 485 TOPS with "
           "sparsity, 24 GB GDDR6 at 300 GB/s"),
    Device("NVIDIA A100 80GB SXM", 80, 2039.0, {"fp32": 19.5, "fp16": 312.0, "int8": 624.0}, 1.0,
           "NVIDIA A100 Tensor Core GPU data sheet: FP32 19.5 TF, BF16 312 TF, INT8 624 TOPS (dense), "
           "2,039 GB/s HBM2e"),
    Device("NVIDIA H100 SXM", 80, 3350.0, {"fp32": 67.0, "fp16": 989.0, "int8": 1979.0}, 1.0,
           "NVIDIA H100 Tensor Core GPU data sheet: FP32 67 TF, BF16 989 TF, INT8 1,979 TOPS (dense), "
           "3.35 TB/s HBM3"),
)

# Deployment precision -> (compute precision of the LLM, of the vision engines; per-engine weight
# precision in agvas.calibration.memory_plan's layouts). int4 = 4-bit weight-only LLM (W4A16), fp16 vision.
PRECISIONS: dict[str, tuple[str, str, dict[str, str]]] = {
    "fp32": ("fp32", "fp32", {e: "fp32" for e in ENGINES}),
    "fp16": ("fp16", "fp16", {e: "fp16" for e in ENGINES}),
    "int8": ("int8", "int8", {**{e: "int8" for e in ENGINES}, "embed_tokens": "fp16"}),
    "int4": ("fp16", "fp16", {**{e: "fp16" for e in ENGINES}, "llm": "int4", "lm_head": "int4"}),
}

# Published anchors the model is checked against (measured elsewhere; the model must stay below them).
ANCHORS = (
    {"name": "7B INT4 decode on Jetson AGX Orin (TinyChat / AWQ)", "device": "Jetson AGX Orin 64GB",
     "config": "ov-7b", "precision": "int4", "quantity": "decode_ms_per_token", "measured": 28.0,
     "source": "AWQ paper / TinyChat: ~28 ms per token for a 7B model on Orin"},
    {"name": "AG-VAS paper, 1 image on an A100-class GPU", "device": "NVIDIA A100 80GB SXM",
     "config": "ov-7b", "precision": "fp16", "quantity": "e2e_ms", "measured": 1000.0, "image": 1024,
     "source": "Qu et al., CVPR 2026: ~1.0 s per image"},
    {"name": "AG-VAS paper, GPU memory", "device": "NVIDIA A100 80GB SXM", "config": "ov-7b",
     "precision": "fp16", "quantity": "memory_gb", "measured": 20.8, "image": 1024,
     "source": "Qu et al., CVPR 2026: 20.8 GB"},
)


@dataclass
class ModelInventory:
    """What the roofline needs from a config: the model on the meta device, its per-engine weights
    (:func:`agvas.calibration.memory_plan.engine_weights`) and tokenizer (for exact token counts)."""

    cfg: AGVASConfig
    model: Any
    tokenizer: Any
    weights: dict[str, Any]

    @classmethod
    def of(cls, cfg: AGVASConfig) -> "ModelInventory":
        from agvas.train.modeling import build_model

        model, tok = build_model(cfg, device="meta")
        return cls(cfg, model, tok, engine_weights(model))


def _stage_ms(flops: float, nbytes: float, dev: Device, compute: str) -> dict[str, Any]:
    compute_ms = flops / (dev.peak_tflops[compute] * 1e12) * 1e3
    memory_ms = nbytes / (dev.bandwidth_gbs * 1e9) * 1e3
    return {"ms": max(compute_ms, memory_ms), "compute_ms": compute_ms, "memory_ms": memory_ms,
            "bound": "compute" if compute_ms >= memory_ms else "memory"}


def predict(inv: ModelInventory, dev: Device, precision: str, *, image: int = 384,
            vision_tokens: str = "anyres") -> dict[str, Any]:
    """Per-stage lower-bound latency and weight + KV memory for one square ``image`` (batch 1,
    direct mode: the prompt prefilled, the answer decoded token by token)."""
    cfg = inv.cfg
    llm_compute, vis_compute, prec = PRECISIONS[precision]
    float_bytes = 4 if precision == "fp32" else 2  # GPU layout: float parts of quantized engines in fp16
    kv_b = 4 if precision == "fp32" else 2

    def wbytes(*engines: str) -> float:
        return sum(inv.weights[e].bytes(prec[e], float_bytes=float_bytes) for e in engines)

    tc = token_counts(inv.model, inv.tokenizer, (image, image), vision_tokens)
    f = pipeline_flops(cfg, tc, vocab=inv.model.ids.vocab_size)
    kv_prompt = kv_cache_bytes(cfg, tc.prompt, kv_b)
    stages = {
        "vision": _stage_ms(f["vision"], wbytes("vision"), dev, vis_compute),
        "sam_encoder": _stage_ms(f["sam_encoder"], wbytes("sam_encoder"), dev, vis_compute),
        "spam": _stage_ms(f["spam"], wbytes("spam"), dev, vis_compute),
        "prefill": _stage_ms(f["prefill"] + f["lm_head"], wbytes("llm", "lm_head") + kv_prompt, dev, llm_compute),
        "decode_per_token": _stage_ms(f["decode"], wbytes("llm", "lm_head") + kv_prompt, dev, llm_compute),
        "agmd": _stage_ms(f["agmd"], wbytes("agmd"), dev, vis_compute),
    }
    e2e = sum(s["ms"] for k, s in stages.items() if k != "decode_per_token") + (tc.answer - 1) * stages["decode_per_token"]["ms"]
    weights_gb = wbytes(*ENGINES) / 1e9
    kv_gb = kv_cache_bytes(cfg, tc.sequence, kv_b) / 1e9
    usable = dev.memory_gb - dev.reserved_gb
    return {
        "label": LABEL, "device": dev.name, "config": cfg.name, "precision": precision, "image": image,
        "vision_tokens": vision_tokens, "prompt_tokens": tc.prompt, "answer_tokens": tc.answer,
        "stages": {k: {kk: (round(vv, 3) if isinstance(vv, float) else vv) for kk, vv in v.items()} for k, v in stages.items()},
        "e2e_ms": round(e2e, 2), "decode_ms_per_token": round(stages["decode_per_token"]["ms"], 3),
        "weights_gb": round(weights_gb, 3), "kv_cache_gb": round(kv_gb, 3),
        "memory_gb": round(weights_gb + kv_gb, 3), "usable_gb": usable, "fits": weights_gb + kv_gb <= usable,
    }


def device_table(configs=("ov-0.5b", "ov-7b"), precisions=("fp32", "fp16", "int8", "int4"),
                 images=(384, 1024)) -> list[dict[str, Any]]:
    rows = []
    for name in configs:
        inv = ModelInventory.of(get_config(name))
        for dev in DEVICES:
            for prec in precisions:
                for img in images:
                    rows.append(predict(inv, dev, prec, image=img))
    return rows


def check_anchors() -> list[dict[str, Any]]:
    """Compare the model with the published anchors: a lower bound must not exceed what was
    measured; ``ratio`` = predicted / measured (how much of the measured time the floor explains)."""
    out, inventories = [], {}
    for a in ANCHORS:
        dev = next(d for d in DEVICES if d.name == a["device"])
        if a["config"] not in inventories:
            inventories[a["config"]] = ModelInventory.of(get_config(a["config"]))
        r = predict(inventories[a["config"]], dev, a["precision"], image=a.get("image", 384))
        pred = {"decode_ms_per_token": r["decode_ms_per_token"], "e2e_ms": r["e2e_ms"], "memory_gb": r["memory_gb"]}[a["quantity"]]
        out.append({**a, "predicted": pred, "ratio": round(pred / a["measured"], 3),
                    "consistent": pred <= a["measured"] * 1.05 and pred >= 0.3 * a["measured"], "label": LABEL})
    return out


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [f"Roofline lower bounds ({LABEL}); batch 1, anyres vision tokens, the 10-token direct answer decoded token by token.", "",
             "| device | config | precision | image | prompt tok | vision ms | SAM ms | prefill ms | decode ms/tok | e2e ms | weights+KV GB | fits |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r["stages"]
        lines.append(f"| {r['device']} | {r['config']} | {r['precision']} | {r['image']}² | {r['prompt_tokens']} | "
                     f"{s['vision']['ms']:.1f} | {s['sam_encoder']['ms']:.1f} | {s['prefill']['ms']:.1f} | "
                     f"{r['decode_ms_per_token']:.2f} | {r['e2e_ms']:.0f} | {r['memory_gb']:.2f} | {'yes' if r['fits'] else 'no'} |")
    return "\n".join(lines)


def devices_data() -> list[dict[str, Any]]:
    return [asdict(d) for d in DEVICES]


if __name__ == "__main__":  # pragma: no cover - `python -m agvas.benchmarks.devices [--json FILE]`
    import argparse
    import json

    ap = argparse.ArgumentParser(prog="python -m agvas.benchmarks.devices", description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="also write rows, devices and anchors as JSON")
    a = ap.parse_args()
    rows = device_table()
    anchors = check_anchors()
    print(markdown(rows))
    for x in anchors:
        print(f"anchor {x['name']}: predicted {x['predicted']} vs measured {x['measured']} "
              f"(ratio {x['ratio']}, consistent={x['consistent']})")
    if a.json:
        from agvas.atomic import write_text_atomic

        write_text_atomic(a.json, json.dumps({"label": LABEL, "devices": devices_data(), "anchors": anchors,
                                              "rows": rows}, indent=2))
