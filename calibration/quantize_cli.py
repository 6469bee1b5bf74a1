"""``agvas quantize``: quantize an export behind the accuracy gate, or print the memory plan.

    agvas quantize --engines DIR --calib CAL --out DIR2 [--llm int4] [--vision int8] [--target cpu]
    agvas quantize --engines DIR --calib CAL --out DIR2 --auto [--budget mean_iou=0.95,verdict=0.99]
    agvas quantize --plan ov-0.5b [--json plan.json]
"""

from __future__ import annotations

import argparse
import json
import logging


def add_arguments(p: argparse.ArgumentParser) -> None:
    from agvas.train.config import CONFIGS

    from .gate import BUDGET_KEYS
    from .quantize import INT4_ALGORITHMS, STATIC_METHODS
    from .quantized_export import LLM_LADDER, TARGETS

    p.add_argument("--engines", help="the fp32 export directory (agvas export)")
    p.add_argument("--calib", help="the calibration directory (agvas calibrate)")
    p.add_argument("--out", help="where to write the quantized export")
    p.add_argument("--llm", choices=LLM_LADDER, default="int4", help="LLM precision (default int4; lm_head follows)")
    p.add_argument("--vision", choices=("int8", "fp16", "fp32"), default="int8",
                   help="vision, sam_encoder, spam precision (default int8; on CPU int8 is kept only where it "
                        "measures faster than fp32)")
    p.add_argument("--target", choices=TARGETS, default="cpu",
                   help="execution target: cpu (ORT CPU), cuda (ORT CUDA EP), tensorrt (TensorRT EP / engines)")
    p.add_argument("--auto", action="store_true",
                   help="per engine try int4/int8 -> fp16 -> fp32 and keep the cheapest within the budget")
    p.add_argument("--budget", default=None,
                   help=f"gate budget, comma-separated KEY=VALUE, KEY in {sorted(BUDGET_KEYS)} "
                        f"(default mean_iou=0.95,verdict=0.99)")
    p.add_argument("--algorithm", choices=INT4_ALGORITHMS, default="rtn", help="int4 algorithm (default rtn)")
    p.add_argument("--block-size", type=int, default=32, help="int4 block size along K (default 32)")
    p.add_argument("--accuracy-level", type=int, choices=(0, 1, 2, 3, 4), default=None,
                   help="MatMulNBits compute type (default 4 = int8 compute on CPU)")
    p.add_argument("--keep-last-layers", type=int, default=0,
                   help="keep the MatMuls of the last K decoder layers (they produce the anchor states) in float")
    p.add_argument("--keep-lm-head", action="store_true", help="keep the LM head (llm and lm_head engines) in float")
    p.add_argument("--gptq-samples", type=int, default=16, help="captured prefills fed to GPTQ (default 16)")
    p.add_argument("--gptq-max-tokens", type=int, default=None,
                   help="cut each GPTQ prefill to its first T positions (GPTQ reruns the graph per MatMul input)")
    p.add_argument("--static-method", choices=STATIC_METHODS, default="minmax",
                   help="activation calibration for static int8 (default minmax)")
    p.add_argument("--static-samples", type=int, default=32, help="captured inputs for static int8 (default 32)")
    p.add_argument("--snr-samples", type=int, default=2,
                   help="captured inputs per changed engine for its SNR and the llm's teacher-forced check (default 2)")
    p.add_argument("--provider", default="cpu", help="ONNX Runtime provider the gate runs on (default cpu)")
    p.add_argument("--threads", type=int, default=None, help="ORT intra-op threads")
    p.add_argument("--force", action="store_true", help="write the export even below budget (gate recorded as failed)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--plan", metavar="CONFIG", choices=sorted(CONFIGS),
                   help="print the memory plan of a registered config (weights per engine/precision, KV cache, "
                        "activations, Jetson fit) and exit")
    p.add_argument("--json", help="with --plan: also write the plan as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args) -> int:
    from agvas.cli import CLIError

    if args.plan:
        from .memory_plan import format_plan, memory_plan

        plan = memory_plan(args.plan, block_size=args.block_size)
        print(format_plan(plan))
        if args.json:
            from agvas.atomic import write_text_atomic

            write_text_atomic(args.json, json.dumps(plan, indent=2) + "\n")
        return 0
    missing = [f"--{k}" for k in ("engines", "calib", "out") if not getattr(args, k)]
    if missing:
        raise CLIError(f"{' '.join(missing)} required (or --plan CONFIG)")
    from .gate import Budget, format_gate
    from .quantized_export import QuantOptions, quantize_export

    import onnxruntime.quantization.matmul_nbits_quantizer  # noqa: F401 - configures logging at import

    for name in (None, "onnxruntime.quantization.matmul_nbits_quantizer"):  # ORT's per-node INFO chatter
        logging.getLogger(name).setLevel(logging.WARNING)
    # quantize_dynamic advises pre-processing, which only static quantization needs (it runs it)
    logging.getLogger().addFilter(lambda r: not r.getMessage().startswith("Please consider to run pre-processing"))
    opts = QuantOptions(target=args.target, algorithm=args.algorithm, block_size=args.block_size,
                        accuracy_level=args.accuracy_level, keep_last_layers=args.keep_last_layers,
                        keep_lm_head=args.keep_lm_head, gptq_samples=args.gptq_samples,
                        gptq_max_tokens=args.gptq_max_tokens, static_method=args.static_method,
                        static_samples=args.static_samples, snr_samples=args.snr_samples, provider=args.provider,
                        threads=args.threads)
    out = quantize_export(args.engines, args.calib, args.out, llm=args.llm, vision=args.vision, auto=args.auto,
                          budget=Budget.parse(args.budget), opts=opts, force=args.force, overwrite=args.overwrite,
                          progress=not args.no_progress)
    print(format_gate(out.gate, title=f"accuracy gate ({', '.join(f'{k} {v}' for k, v in out.choice.items())})"))
    if out.out_dir is None:
        print(f"agvas quantize: below budget; nothing written to {args.out} (--auto backs off, --force writes anyway)")
        return 1
    print(f"wrote {out.out_dir} ({_size(out.out_dir)})")
    return 0 if out.gate.passed else 1


def _size(root) -> str:
    from pathlib import Path

    n = sum(p.stat().st_size for p in Path(root).rglob("*") if p.is_file())
    return f"{n / 1e6:,.1f} MB"
