"""``agvas export``: a checkpoint -> ONNX engines + manifest (+ TensorRT build recipe)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .exporter import PRECISIONS, TARGETS, VISION_TOKENS
from .graphs import DEFAULT_OPSET, EXTERNAL_DATA_THRESHOLD
from .tensorrt import TENSORRT_OPSET

STEPS = 10  # progress-bar length: load, 5 graphs, arrays, hf dir, llm, manifest


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (agvas train output)")
    p.add_argument("--out", required=True, help="export directory to write (manifest.json + engines)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="fp32 (ORT CPU and everywhere) or fp16 (GPU targets: CUDA / TensorRT EPs)")
    p.add_argument("--opset", type=int, default=None, help=f"ONNX opset of the torch-exported graphs (default "
                   f"{DEFAULT_OPSET}; {TENSORRT_OPSET} with --target tensorrt, the newest TensorRT 8.6 parses; the llm "
                   f"graph is the builder's)")
    p.add_argument("--vision-tokens", choices=VISION_TOKENS, default="anyres",
                   help="default visual-token mode recorded in the manifest: anyres (HF packing) or base "
                        "(the base tile only: ~5-10x fewer LLM tokens)")
    p.add_argument("--target", choices=(*TARGETS, "triton"), default="onnx",
                   help="tensorrt: also write build_engines.sh (trtexec) for the vision-side engines; triton: "
                        "--out is a Triton model repository (--checkpoint may also be an export directory)")
    p.add_argument("--max-batch", type=int, default=4, help="largest batch of the TensorRT optimisation profiles")
    p.add_argument("--external-data-mb", type=int, default=EXTERNAL_DATA_THRESHOLD >> 20,
                   help="graphs with more weight than this are saved with ONNX external data")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")


def run(args: argparse.Namespace) -> int:
    if args.target == "triton":  # a Triton model repository: export/triton.py
        from .triton import run as run_triton

        return run_triton(args)
    from tqdm import tqdm

    from .exporter import export_checkpoint
    from .manifest import load_manifest

    if args.max_batch < 1:
        raise ValueError(f"--max-batch must be >= 1, got {args.max_batch}")
    with tqdm(total=STEPS, desc="export", unit="step") as bar:
        started: list[str] = []

        def progress(msg: str) -> None:  # called when a step starts: the previous one is done
            if started:
                bar.update(1)
            started.append(msg)
            bar.set_postfix_str(msg)

        path = export_checkpoint(args.checkpoint, args.out, precision=args.precision, opset=args.opset,
                                 vision_tokens=args.vision_tokens, target=args.target, max_batch=args.max_batch,
                                 external_threshold=args.external_data_mb << 20, overwrite=args.overwrite,
                                 progress=progress)
        bar.update(bar.total - bar.n)
    m = load_manifest(path.parent, verify="bytes")
    rows = []
    for name, e in m.engines.items():
        size = e["bytes"] + sum(x["bytes"] for x in e.get("external_data", []))
        rows.append({"engine": name, "file": e["file"], "precision": e["precision"], "mb": round(size / 2**20, 2)})
    print(json.dumps({"out": str(Path(args.out)), "checkpoint_sha256": m.data["source"]["checkpoint_sha256"],
                      "llm_fused_ops": m.llm["fused_ops"], "engines": rows}, indent=1))
    return 0
