"""``agvas bench``: latency / throughput / memory / agreement of every back-end, side by side."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, choices=["tiny", "ov-0.5b"],
                   help="tiny (a trained checkpoint: accuracy and latency) or ov-0.5b (random weights: latency, memory)")
    p.add_argument("--checkpoint", type=Path, help="checkpoint to benchmark (default: random init + planted answer)")
    p.add_argument("--data", type=Path, help="meta.json whose test split gives the images and the accuracy metrics "
                   "(default: DATA/meta.json beside an `agvas demo` checkpoint; else synthetic images)")
    p.add_argument("--json", type=Path, dest="json_path", help="write the bench record here")
    p.add_argument("--cache", type=Path, default=Path(".cache/bench"), help="where exports / peer models are built")
    p.add_argument("--results", type=Path, default=Path("benchmarks/results"), help="markdown + PNG charts folder")
    p.add_argument("--images", type=int, help="images per round for batch-1 variants (default: tiny 8, ov-0.5b 2)")
    p.add_argument("--image-size", type=int, help="square image side (default: tiny 128, ov-0.5b 384)")
    p.add_argument("--batch", type=int, default=4, help="batch size of the batch-inspection variant")
    p.add_argument("--warmup", type=int, help="warm-up rounds, discarded (default 1)")
    p.add_argument("--iters", type=int, help="measured rounds (default: tiny 5, ov-0.5b 2; --quick 1)")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads per back-end")
    p.add_argument("--quick", action="store_true", help="small peaks micro-benchmark, fewer images and rounds")
    p.add_argument("--autocast", action=argparse.BooleanOptionalAction, default=None,
                   help="also eager bf16 under torch.autocast (default: on for tiny, off for ov-0.5b)")
    p.add_argument("--quantized", nargs="*", choices=("int8", "int4"), default=["int8", "int4"], metavar="LLM",
                   help="LLM precisions of the quantized runtime exports (agvas calibrate + quantize; vision int8); "
                        "none: fp32 runtime only (default: int8 int4)")
    p.add_argument("--no-genai", dest="genai", action="store_false", help="skip the onnxruntime-genai peer")
    p.add_argument("--no-base-tokens", dest="base_tokens", action="store_false",
                   help="skip the --vision-tokens base variant")
    p.add_argument("--sequential", action="store_true",
                   help="load one back-end at a time (least memory); ratios are then not interleaved")
    p.add_argument("--only", nargs="+", default=(), metavar="NAME",
                   help="run only these back-ends (e.g. eager-fp32 eager-bf16 runtime-fp32 ortgenai-int4); one named "
                        "here that cannot run (even for want of an optional package) fails the bench instead of "
                        "being skipped. Agreement is always against a separate eager fp32 reference run")


def run(args) -> int:
    from tqdm import tqdm

    from .report import markdown
    from .run import BenchOptions, bench

    for k in ("images", "iters", "batch", "threads", "image_size"):
        v = getattr(args, k)
        if v is not None and v < 1:
            raise ValueError(f"--{k.replace('_', '-')} must be ≥ 1, got {v}")
    if args.warmup is not None and args.warmup < 0:
        raise ValueError(f"--warmup must be ≥ 0, got {args.warmup}")
    if args.checkpoint and not (args.checkpoint / "checkpoint.json").is_file():
        raise FileNotFoundError(f"--checkpoint {args.checkpoint}: not a checkpoint directory (no checkpoint.json)")
    if args.data is not None and not args.data.is_file():
        raise FileNotFoundError(f"--data {args.data}: not a meta.json file")
    opts = BenchOptions(config=args.config, json_path=args.json_path, checkpoint=args.checkpoint, data=args.data,
                        cache=args.cache,
                        results_dir=args.results, images=args.images, image_size=args.image_size, batch=args.batch,
                        warmup=args.warmup, iters=args.iters, threads=args.threads, quick=args.quick,
                        autocast=args.autocast, base_tokens=args.base_tokens, genai=args.genai, only=tuple(args.only),
                        quantized=tuple(args.quantized), sequential=args.sequential,
                        command="agvas bench " + " ".join(shlex.quote(a) for a in sys.argv[2:]))
    bar = tqdm(desc="bench", bar_format="{desc} [{elapsed}]", file=sys.stderr)

    def progress(msg: str) -> None:
        bar.set_description_str(f"bench {args.config}: {msg}")
        bar.update(0)

    try:
        record = bench(opts, progress)
    finally:
        bar.close()
    print(markdown(record))
    for k, v in record.get("outputs", {}).items():
        print(f"{k}: {v}", file=sys.stderr)
    for k, why in (record["setup"].get("skipped") or {}).items():
        print(f"agvas bench: skipped {k} ({why})", file=sys.stderr)
    failed = [r for r in record["runs"] if r.get("error")]
    if failed:
        print(f"agvas bench: FAILED — {len(failed)} back-end run(s): "
              + "; ".join(f"{r['name']} ({r['error']})" for r in failed) + f" (log: {record['setup']['log']})",
              file=sys.stderr)
    return 1 if failed else 0
