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
from .data.sources import SubDatasets


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="run directory: OUT/checkpoint/, OUT/train_log.jsonl")
    p.add_argument("--config", default="tiny", choices=sorted(CONFIGS), help="model config (default tiny)")
    p.add_argument("--resume", action="store_true", help="continue the run in OUT from its last checkpoint")
    p.add_argument("--llava", help="local Hugging Face LLaVA-OneVision directory (real weights)")
    p.add_argument("--sam", help="official SAM checkpoint sam_vit_{b,l,h}_*.pth (real weights)")
    d = p.add_argument_group("data (at least one source)")
    d.add_argument("--data", action="append", default=[], help="anomaly meta.json or MVTec-layout folder (repeatable): Anomaly-Seg and "
                   "Anomaly-Instruct samples from its --split")
    d.add_argument("--seg", action="append", default=[], metavar="DATA",
                   help="anomaly data for Anomaly-Seg only (direct segmentation; repeatable)")
    d.add_argument("--instruct", action="append", default=[], metavar="DATA",
                   help="anomaly data for Anomaly-Instruct only (describe / explain; repeatable)")
    d.add_argument("--split", default="train", choices=["train", "test", "all"],
                   help="split of --data/--seg/--instruct to train on (default train; auxiliary sets like VisA: test)")
    d.add_argument("--general", action="append", default=[], help="general segmentation JSON list "
                   "[{image, mask, phrase}] (repeatable)")
    d.add_argument("--refer", action="append", default=[], metavar="NAME=ROOT",
                   help="referring segmentation in the REFER layout, NAME in refcoco, refcoco+, refcocog, refclef; ROOT "
                   "holds NAME/refs(*).p + instances.json (train split only; repeatable)")
    d.add_argument("--refer-images", action="append", default=[], metavar="[NAME=]DIR",
                   help="COCO train2014 folder for refcoco* (NAME=DIR for one dataset, e.g. refclef=saiapr_tc-12; "
                   "default ROOT/images/mscoco/images/train2014, ROOT/images/saiapr_tc-12)")
    d.add_argument("--sem-seg", action="append", default=[], metavar="NAME=ROOT",
                   help="semantic / part segmentation, NAME in ade20k, cocostuff, pascal_part, paco_lvis, partimagenet "
                   "(repeatable; layouts in agvas_train/data/semseg.py)")
    d.add_argument("--sem-seg-images", action="append", default=[], metavar="NAME=DIR",
                   help="image folder of one --sem-seg dataset (e.g. cocostuff=coco/train2017)")
    d.add_argument("--general-weights", metavar="NAME=W,...",
                   help="sub-dataset weights inside the general source (default uniform over the datasets, as LISA), "
                   "e.g. 'ade20k=3,refcoco=1'; a --general JSON is named by its file stem")
    d.add_argument("--vqa", action="append", default=[], metavar="[NAME=]JSON",
                   help="LLaVA-style conversation JSON, e.g. llava=llava_instruct_150k.json, webad=webad.json "
                   "(repeatable; whole conversations, every answer supervised)")
    d.add_argument("--vqa-images", action="append", default=[], metavar="[NAME=]DIR",
                   help="image root for --vqa (default: the JSON's folder)")
    d.add_argument("--vqa-weights", metavar="NAME=W,...", help="sub-dataset weights inside the VQA source (default uniform)")
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
    """'a=0.4,b=0.6' -> {'a': 0.4, 'b': 0.6}; names must be in ``allowed``."""
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
    """The training mixture from the CLI's sources (shared with ``agvas demo``). Inside the
    general and VQA sources a sub-dataset is drawn uniformly (or by --general-weights /
    --vqa-weights), then an item in it, as LISA samples."""
    from .data.meta import read_meta
    from .data.mixture import Mixture
    from .data.refer import REFER_DATASETS, ReferSource
    from .data.semseg import SEMSEG_DATASETS, semseg_source
    from .data.sources import AnomalySource, GeneralSegSource, VQASource
    from .templates import MODES

    mix = parse_probs(args.mix, "--mix", PAPER_MIX) if args.mix else dict(PAPER_MIX)
    modes = parse_probs(args.instruct_modes, "--instruct-modes", MODES)
    opt = lambda name, default=(): getattr(args, name, None) or default  # noqa: E731 - older Namespaces (demo)
    augment = not args.no_augment
    seg = [r for path in [*args.data, *opt("seg")] for r in read_meta(path, args.split)]
    instruct = [r for path in [*args.data, *opt("instruct")] for r in read_meta(path, args.split)]
    sources = {}
    if seg:
        sources["seg"] = (AnomalySource(seg, {"direct": 1.0}, augment), mix.get("seg", 0.0))
    if instruct:
        sources["instruct"] = (AnomalySource(instruct, modes, augment), mix.get("instruct", 0.0))
    general = {}
    refer_images = dict(_named(v, "--refer-images", REFER_DATASETS, default_name="*") for v in opt("refer_images"))
    for value in opt("refer"):
        name, root = _named(value, "--refer", REFER_DATASETS)
        images = refer_images.get(name) or (refer_images.get("*") if name != "refclef" else None)
        _add(general, name, ReferSource(name, root, images, augment), "--refer")
    seg_images = dict(_named(v, "--sem-seg-images", SEMSEG_DATASETS) for v in opt("sem_seg_images"))
    for value in opt("sem_seg"):
        name, root = _named(value, "--sem-seg", SEMSEG_DATASETS)
        _add(general, name, semseg_source(name, root, seg_images.get(name), augment), "--sem-seg")
    for path in args.general:
        _add(general, _stem_name(path, general), GeneralSegSource(path, augment), "--general")
    if general:
        sources["general"] = (_Concat(general, _weights(args, "general_weights", general)), mix.get("general", 0.0))
    vqa = {}
    vqa_images = opt("vqa_images")
    vqa_images = dict(_named(v, "--vqa-images", None, default_name="*")
                      for v in ([vqa_images] if isinstance(vqa_images, str) else vqa_images))
    for value in args.vqa:
        name, path = _named(value, "--vqa", None, default_name=None)
        name = name or _stem_name(path, vqa)
        _add(vqa, name, VQASource(path, vqa_images.get(name) or vqa_images.get("*")), "--vqa")
    if vqa:
        sources["vqa"] = (_Concat(vqa, _weights(args, "vqa_weights", vqa)), mix.get("vqa", 0.0))
    if not any(p > 0 for _, p in sources.values()):
        raise CLIError("no training data: give --data META (and/or --seg / --instruct / --general / --refer / --sem-seg "
                       "/ --vqa) with a positive --mix share")
    return Mixture(sources, seed=args.seed)


def _named(value: str, flag: str, allowed, default_name: str | None = "") -> tuple[str | None, str]:
    """'NAME=PATH' -> (NAME, PATH); a plain PATH -> (default_name, PATH) where that is allowed."""
    name, sep, path = value.partition("=")
    if not sep or "/" in name or Path(value).exists():
        if default_name == "":
            raise CLIError(f"{flag} {value!r}: expected NAME=PATH with NAME in {sorted(allowed)}")
        return default_name, value
    if allowed is not None and name not in allowed:
        raise CLIError(f"{flag} {value!r}: unknown name {name!r}; expected one of {sorted(allowed)}")
    if not path:
        raise CLIError(f"{flag} {value!r}: expected NAME=PATH")
    return name, path


def _add(parts: dict, name: str, source, flag: str) -> None:
    if name in parts:
        raise CLIError(f"{flag}: sub-dataset {name!r} given twice")
    parts[name] = source


def _stem_name(path: str, taken: dict) -> str:
    stem, n = Path(path).stem, 2
    name = stem
    while name in taken:
        name, n = f"{stem}{n}", n + 1
    return name


def _weights(args, attr: str, parts: dict) -> dict[str, float] | None:
    text = getattr(args, attr, None)
    return parse_probs(text, "--" + attr.replace("_", "-"), parts) if text else None


class _Concat(SubDatasets):
    """Several sources of one kind as one: a list (uniform) or ``{name: source}`` with weights."""

    def __init__(self, parts, weights: dict[str, float] | None = None) -> None:
        if not isinstance(parts, dict):
            parts = {str(i): p for i, p in enumerate(parts)}
        super().__init__(parts, weights)


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
