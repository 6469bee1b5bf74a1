"""``agvas eval``: metrics of a checkpoint (PyTorch reference) or an export (runtime) on the
``test`` split of a meta.json; prints a markdown table, ``--json`` writes the result."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from agvas.cli import CLIError


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="checkpoint directory (PyTorch reference inference)")
    src.add_argument("--engines", help="export directory (runtime over the ONNX engines)")
    src.add_argument("--baseline", choices=["empty"], help="the empty-mask baseline (P = 0 everywhere)")
    p.add_argument("--data", required=True, help="meta.json (AnomalyCLIP or Bayes-PFL form) or an MVTec-layout folder")
    p.add_argument("--split", default="test", choices=["test", "train", "all"], help="split to evaluate (default test)")
    p.add_argument("--category", action="append", help="only these categories (repeatable)")
    p.add_argument("--limit", type=int, help="at most N images per category (evenly spaced)")
    p.add_argument("--json", help="write the result JSON here")
    p.add_argument("--mode", default="direct", help="inference mode (direct, describe, describe_plus, explain)")
    p.add_argument("--normal-sentence", help="describe_plus: a sentence on the object's normal appearance")
    p.add_argument("--vision-tokens", choices=["anyres", "base"],
                   help="semantic token packing (default: anyres; an export's manifest default)")
    p.add_argument("--device", default="cpu", help="--checkpoint: torch device of the reference (cpu or cuda[:N])")
    p.add_argument("--provider", default="cpu", help="runtime provider for --engines (cpu, cuda, tensorrt)")
    p.add_argument("--resize", type=int, default=256, help="AP/F1 protocol: resize maps to N×N (0 = native size)")
    p.add_argument("--sigma", type=float, default=4.0, help="AP/F1 protocol: Gaussian smoothing σ (0 = off)")
    p.add_argument("--skip-errors", action="store_true", help="record failing images and go on (exit 1)")
    p.add_argument("--threads", type=int, help="torch threads (default: 2, or 1 when the machine is already busy)")
    p.add_argument("--no-progress", action="store_true")


def run(args) -> int:
    from .evaluate import EmptyPredictor, checkpoint_predictor, engines_predictor, evaluate_meta
    from .metrics import Protocol, markdown_table

    if args.checkpoint:
        from .train import set_threads

        set_threads(args.threads)
        if not Path(args.checkpoint).is_dir():
            raise CLIError(f"--checkpoint {args.checkpoint}: not a directory")
        if args.device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise CLIError(f"--device {args.device}: CUDA is not available to this torch build")
        predictor = checkpoint_predictor(args.checkpoint, args.mode, args.vision_tokens or "anyres",
                                         args.normal_sentence, device=args.device)
        source = args.checkpoint
    elif args.engines:
        if not Path(args.engines).is_dir():
            raise CLIError(f"--engines {args.engines}: not a directory")
        predictor = engines_predictor(args.engines, args.provider, args.mode, normal_sentence=args.normal_sentence,
                                      vision_tokens=args.vision_tokens)
        source = args.engines
    else:
        predictor, source = EmptyPredictor(), "empty-mask baseline"
    result = evaluate_meta(predictor, args.data, args.split, args.category, args.limit,
                           protocol=Protocol(args.resize or None, args.sigma), progress=not args.no_progress,
                           on_error="skip" if args.skip_errors else "raise")
    result["source"] = source
    print(markdown_table(result, title=f"{source} on {args.data} ({args.split})"))
    if args.json:
        from agvas.atomic import write_text_atomic

        write_text_atomic(args.json, json.dumps(result, indent=2))
    if result.get("errors"):
        print(f"{len(result['errors'])} images failed (listed under 'errors' in the JSON)")
        return 1
    return 0
