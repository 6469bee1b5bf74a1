"""``agvas train``: train AG-VAS on a mixture of sources.

Examples::

    agvas train --out runs/tiny --data demo_out/data/meta.json            # tiny from scratch
    agvas train --out runs/tiny --resume                                   # continue that run
    agvas train --config ov-7b --llava ~/llava-onevision-qwen2-7b-ov-hf --sam ~/sam_vit_h_4b8939.pth \\
        --data visa/meta.json --split test --general refseg.json --vqa llava_150k.json \\
        --out runs/7b --batch-size 2 --grad-accum 40 --autocast bf16 --grad-checkpointing --device cuda
"""

from __future__ import annotations

import argparse
from pathlib import Path

from agvas.cli import CLIError

from .config import CONFIGS
from .data.mixture import PAPER_MIX


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="run directory: OUT/checkpoint/, OUT/train_log.jsonl")
    p.add_argument("--config", default="tiny", choices=sorted(CONFIGS), help="model config (default tiny)")
    p.add_argument("--resume", action="store_true", help="continue the run in OUT from its last checkpoint")
    p.add_argument("--llava", help="local Hugging Face LLaVA-OneVision directory (real weights)")
    p.add_argument("--sam", help="official SAM checkpoint sam_vit_{b,l,h}_*.pth (real weights)")
    d = p.add_argument_group("data (at least one source)")
    d.add_argument("--data", action="append", default=[], help="anomaly meta.json or MVTec-layout folder (repeatable): Anomaly-Seg and "
                   "Anomaly-Instruct samples from its --split")
    d.add_argument("--split", default="train", choices=["train", "test", "all"],
                   help="split of --data to train on (default train; auxiliary sets like VisA: test)")
    d.add_argument("--general", action="append", default=[], help="general segmentation JSON list "
                   "[{image, mask, phrase}] (repeatable)")
    d.add_argument("--vqa", action="append", default=[], help="LLaVA-style conversation JSON (repeatable)")
    d.add_argument("--vqa-images", help="image root for --vqa (default: the JSON's folder)")
    d.add_argument("--mix", default=None, help="source probabilities, e.g. 'general=0.4,instruct=0.25,seg=0.25,"
                   "vqa=0.1' (paper default; sources without data are dropped and the rest renormalised)")
    d.add_argument("--instruct-modes", default="describe=0.4,describe_plus=0.2,explain=0.4",
                   help="mode mix of the Anomaly-Instruct source")
    t = p.add_argument_group("optimisation")
    t.add_argument("--steps", type=int, default=2000)
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--grad-accum", type=int, default=1)
    t.add_argument("--lr", type=float, default=3e-4)
    t.add_argument("--warmup", type=int, default=100)
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--save-every", type=int, default=500, help="checkpoint every N steps (and at the end)")
    t.add_argument("--log-every", type=int, default=10)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--max-minutes", type=float, help="stop (and save) after this much wall time")
    t.add_argument("--no-augment", action="store_true", help="no flips / 90° rotations")
    g = p.add_argument_group("hardware")
    g.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    g.add_argument("--autocast", choices=["bf16", "fp16"], help="mixed precision (GPU users)")
    g.add_argument("--grad-checkpointing", action="store_true", help="gradient checkpointing in the LLM")
    g.add_argument("--threads", type=int, help="torch CPU threads (default: 2, or 1 while the machine is busy; re-picked during training)")
    g.add_argument("--no-progress", action="store_true")


def parse_probs(text: str, what: str, allowed) -> dict[str, float]:
    out = {}
    for part in filter(None, (s.strip() for s in text.split(","))):
        name, _, val = part.partition("=")
        if name not in allowed:
            raise CLIError(f"{what}: unknown name {name!r}; expected {sorted(allowed)}")
        try:
            out[name] = float(val)
        except ValueError:
            raise CLIError(f"{what}: {part!r} is not NAME=PROBABILITY") from None
        if out[name] < 0:
            raise CLIError(f"{what}: probability of {name} is negative")
    return out


def build_mixture(args):
    """The training mixture from the CLI's sources (shared with ``agvas demo``)."""
    from .data.meta import read_meta
    from .data.mixture import Mixture
    from .data.sources import AnomalySource, GeneralSegSource, VQASource
    from .templates import MODES

    mix = parse_probs(args.mix, "--mix", PAPER_MIX) if args.mix else dict(PAPER_MIX)
    modes = parse_probs(args.instruct_modes, "--instruct-modes", MODES)
    records = [r for path in args.data for r in read_meta(path, args.split)]
    augment = not args.no_augment
    sources = {}
    if records:
        sources["seg"] = (AnomalySource(records, {"direct": 1.0}, augment), mix.get("seg", 0.0))
        sources["instruct"] = (AnomalySource(records, modes, augment), mix.get("instruct", 0.0))
    if args.general:
        gs = [GeneralSegSource(path, augment) for path in args.general]
        sources["general"] = (_Concat(gs), mix.get("general", 0.0))
    if args.vqa:
        sources["vqa"] = (_Concat([VQASource(path, args.vqa_images) for path in args.vqa]), mix.get("vqa", 0.0))
    if not any(p > 0 for _, p in sources.values()):
        raise CLIError("no training data: give --data META (and/or --general / --vqa) with a positive --mix share")
    return Mixture(sources, seed=args.seed)


class _Concat:
    """Several sources of one kind as one."""

    def __init__(self, parts) -> None:
        self.parts = parts

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)

    def example(self, i: int, rng):
        for p in self.parts:
            if i < len(p):
                return p.example(i, rng)
            i -= len(p)
        raise IndexError(i)


def options_from_args(args):
    from .train import TrainOptions

    return TrainOptions(
        steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr, warmup=args.warmup,
        weight_decay=args.weight_decay, save_every=args.save_every, log_every=args.log_every, seed=args.seed,
        max_seconds=args.max_minutes * 60 if args.max_minutes else None, autocast=args.autocast,
        grad_checkpointing=args.grad_checkpointing, adapt_threads=args.threads is None)


def run(args) -> int:
    from .config import get_config
    from .train import CHECKPOINT, Trainer, build_trainable, resume_trainer, set_threads

    set_threads(args.threads)
    out = Path(args.out)
    mixture = build_mixture(args)
    opts = options_from_args(args)
    if args.resume:
        if not (out / CHECKPOINT).is_dir():
            raise CLIError(f"--resume: no checkpoint in {out / CHECKPOINT}")
        trainer = resume_trainer(out, mixture, opts, device=args.device)
        print(f"resuming {out / CHECKPOINT} at step {trainer.step}/{opts.steps}")
    else:
        if (out / CHECKPOINT).exists():
            raise CLIError(f"{out / CHECKPOINT} exists: pass --resume to continue it, or choose another --out")
        cfg = get_config(args.config)
        cfg.seed = args.seed
        for flag, path in (("--llava", args.llava), ("--sam", args.sam)):
            if path and not Path(path).exists():
                raise CLIError(f"{flag} {path}: not found")
        model, tok, proc = build_trainable(cfg, args.llava, args.sam, device=args.device)
        base = {"llava": str(Path(args.llava).resolve()) if args.llava else None,
                "sam": str(Path(args.sam).resolve()) if args.sam else None}
        trainer = Trainer(model, tok, proc, mixture, opts, out, base=base)
    print(f"mixture: {mixture.describe()}")
    summary = trainer.run(progress=not args.no_progress)
    print(f"trained to step {summary['step']}/{summary['steps']} ({summary['stopped']}) in {summary['seconds']:.0f} s, "
          f"{summary['steps_per_s']:.2f} steps/s, loss {summary['loss_ema']:.3f} -> {out / CHECKPOINT}")
    return 0
