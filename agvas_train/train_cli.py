"""``agvas train``: train AG-VAS on a mixture of sources, in one process or under torchrun.

Examples::

    agvas train --out runs/tiny --data demo_out/data/meta.json            # tiny from scratch
    agvas train --out runs/tiny --resume                                   # continue that run
    # the paper's recipe: ov-7b on 4 GPUs, DeepSpeed ZeRO-2, global batch 4 × 2 × 10 = 80
    torchrun --nproc-per-node 4 --no-python agvas train --config ov-7b \\
        --llava ~/llava-onevision-qwen2-7b-ov-hf --sam ~/sam_vit_h_4b8939.pth --device cuda \\
        --data visa/meta.json --split test --out runs/7b --strategy zero2 --dtype bf16 \\
        --batch-size 2 --grad-accum 10 --grad-checkpointing
    agvas train --config ov-7b --llava ... --sam ... --plan              # the memory plan only
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from agvas.cli import CLIError

from .config import CONFIGS
from .data.mixture import PAPER_MIX
from .data.sources import SubDatasets


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", help="run directory: OUT/checkpoint/, OUT/train_log.jsonl, ... (required unless --plan)")
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
    t.add_argument("--steps", type=int, help="optimizer steps (default 2000)")
    t.add_argument("--batch-size", type=int, default=8, help="samples per device per micro-batch")
    t.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step; the global batch "
                   "is batch-size × processes × grad-accum")
    t.add_argument("--lr", type=float, default=3e-4)
    t.add_argument("--warmup", type=int, default=100)
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--bce-weight", type=float, default=0.5, help="mask BCE weight (paper text 0.5; LISA's code 2.0)")
    t.add_argument("--dice-weight", type=float, default=2.0, help="mask Dice weight (paper text 2.0; LISA's code 0.5)")
    t.add_argument("--save-every", type=int, default=500, help="checkpoint every N steps (and at the end)")
    t.add_argument("--log-every", type=int, default=10)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--max-minutes", type=float, help="stop (and save) after this much wall time")
    t.add_argument("--no-augment", action="store_true", help="no flips / 90° rotations")
    t.add_argument("--strong-augment", action="store_true", help="anomaly sources: also random zoom and colour-channel "
                   "permutation (see data/sources.py augment)")
    t.add_argument("--photo-normals", type=float, metavar="P", help="add scikit-image's bundled photographs as "
                   "normal images with mixture probability P (the other sources share 1-P; data/sources.py "
                   "PhotoNormalSource)")
    t.add_argument("--normal-share", type=float, help="anomaly sources: draw a normal image with this probability "
                   "(default: uniformly over the split's images)")
    e = p.add_argument_group("evaluation while training")
    e.add_argument("--eval-data", help="meta.json / MVTec folder: zero-shot metrics on its test split (agvas eval)")
    e.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (and at the end)")
    e.add_argument("--eval-limit", type=int, default=8, help="at most N images per category per evaluation")
    e.add_argument("--eval-metric", default="pixel_ap", help="mean metric that picks OUT/best/ (default pixel_ap)")
    e.add_argument("--no-tensorboard", action="store_true", help="no TensorBoard scalars in OUT/tensorboard/")
    g = p.add_argument_group("hardware, precision and distribution")
    g.add_argument("--device", choices=["cpu", "cuda"], help="cpu or cuda (under torchrun each process takes "
                   "cuda:LOCAL_RANK); default cuda when available")
    g.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="dtype of the frozen base, whatever its "
                   "files hold (default bf16 on CUDA, fp32 on CPU); trainable parts keep fp32 master weights")
    g.add_argument("--strategy", choices=["ddp", "fsdp", "zero2"], default="ddp", help="distributed engine "
                   "(Accelerate): DDP, FSDP2 full sharding, or DeepSpeed ZeRO-2 (pip install deepspeed)")
    g.add_argument("--grad-checkpointing", action="store_true", help="gradient checkpointing in the LLM")
    g.add_argument("--workers", type=int, default=2, help="DataLoader workers decoding images (0 = in the loop)")
    g.add_argument("--threads", type=int, help="torch CPU threads (default: 2, or 1 while the machine is busy; "
                   "re-picked during training)")
    g.add_argument("--random-init", action="store_true", help="real configs: train from random weights "
                   "(memory and speed work only; without it --llava and --sam are required)")
    g.add_argument("--no-progress", action="store_true")
    from .train_plan import add_plan_arguments

    add_plan_arguments(p)


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
    share, strong = getattr(args, "normal_share", None), bool(getattr(args, "strong_augment", False))
    if seg:
        sources["seg"] = (AnomalySource(seg, {"direct": 1.0}, augment, share, strong), mix.get("seg", 0.0))
    if instruct:
        sources["instruct"] = (AnomalySource(instruct, modes, augment, share, strong), mix.get("instruct", 0.0))
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
    photos = getattr(args, "photo_normals", None)
    if photos:
        if not 0.0 < photos < 1.0:
            raise CLIError(f"--photo-normals {photos}: expected a probability in (0, 1)")
        from .data.sources import PhotoNormalSource

        total = sum(p for _, p in sources.values())
        sources = {n: (s, p / total * (1.0 - photos)) for n, (s, p) in sources.items()}
        sources["photos"] = (PhotoNormalSource(augment=augment, strong_augment=strong), photos)
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


def default_device(args) -> str:
    import torch

    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def options_from_args(args):
    from .train import TrainOptions

    device = default_device(args)
    return TrainOptions(
        steps=args.steps or 2000, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
        warmup=args.warmup, weight_decay=args.weight_decay, save_every=args.save_every, log_every=args.log_every,
        seed=args.seed, max_seconds=args.max_minutes * 60 if args.max_minutes else None,
        dtype=args.dtype or ("bf16" if device == "cuda" else "fp32"), strategy=args.strategy, device=device,
        grad_checkpointing=args.grad_checkpointing, workers=args.workers, bce_weight=args.bce_weight,
        dice_weight=args.dice_weight, eval_every=args.eval_every, eval_data=args.eval_data,
        eval_limit=args.eval_limit, eval_metric=args.eval_metric, tensorboard=not args.no_tensorboard,
        adapt_threads=args.threads is None and device == "cpu")


# what --resume restores when the command line does not give it again
DATA_ARGS = ("data", "instruct", "seg", "split", "general", "refer", "refer_images", "sem_seg", "general_weights",
             "vqa", "vqa_images", "mix", "instruct_modes", "no_augment", "normal_share",
             "strong_augment", "photo_normals")


def _saved_cli(args) -> dict:
    return {k: getattr(args, k) for k in DATA_ARGS if hasattr(args, k)}


def _has_data(args) -> bool:
    return any(getattr(args, k, None) for k in ("data", "instruct", "seg", "general", "refer", "sem_seg", "vqa"))


def run(args) -> int:
    from .config import get_config
    from .train import CHECKPOINT, TrainOptions, Trainer, build_trainable, read_train_state, resume_trainer, set_threads
    from .train_plan import check_fits, config_from_args, print_plan, world_size_from_env

    if args.plan:
        return print_plan(args)
    if not args.out:
        raise CLIError("--out DIR is required (the run directory)")
    world = world_size_from_env()
    # several processes share the cores: each takes its part (one process: 2, or 1 on a busy machine)
    set_threads(args.threads or (max(1, (os.cpu_count() or 1) // world) if world > 1 else None))
    out = Path(args.out)
    if args.resume:
        if not (out / CHECKPOINT).is_dir():
            raise CLIError(f"--resume: no checkpoint in {out / CHECKPOINT}")
        try:
            state = read_train_state(out)
        except (FileNotFoundError, ValueError) as e:
            raise CLIError(f"--resume: {e}") from None
        # the run's own options (batch, dtype, device, strategy, ...); a new --steps / --max-minutes may extend it
        opts = TrainOptions.from_dict(state["options"])
        if args.steps:
            opts.steps = args.steps
        if args.max_minutes:
            opts.max_seconds = args.max_minutes * 60
        from .checkpoint import read_meta

        saved = read_meta(out / CHECKPOINT).get("training", {}).get("cli") or {}
        if not _has_data(args):
            for k, v in saved.items():
                setattr(args, k, v)
        mixture = build_mixture(args)
        try:
            trainer = resume_trainer(out, mixture, opts)
        except ValueError as e:
            raise CLIError(f"--resume: {e}") from None
        trainer.extra["cli"] = _saved_cli(args)
        if trainer.is_main:
            print(f"resuming {out / CHECKPOINT} at step {trainer.step}/{opts.steps}")
    else:
        mixture = build_mixture(args)
        opts = options_from_args(args)
        if (out / CHECKPOINT).exists():
            raise CLIError(f"{out / CHECKPOINT} exists: pass --resume to continue it, or choose another --out")
        cfg = get_config(args.config)
        cfg.seed = args.seed
        if not cfg.name.startswith("tiny") and not args.random_init:  # tiny*: from scratch / packaged weights
            missing = [f for f, v in (("--llava DIR", args.llava), ("--sam FILE", args.sam)) if not v]
            if missing:
                raise CLIError(f"config {cfg.name} trains from real weights: give {' and '.join(missing)} "
                               f"(a local LLaVA-OneVision directory, an official sam_vit_*.pth), or --random-init "
                               f"for memory/speed work")
        for flag, path in (("--llava", args.llava), ("--sam", args.sam)):
            if path and not Path(path).exists():
                raise CLIError(f"{flag} {path}: not found")
        check_fits(args, config_from_args(args), world)  # before any weight is loaded
        model, tok, proc = build_trainable(cfg, args.llava, args.sam, dtype=opts.dtype)
        base = {"llava": str(Path(args.llava).resolve()) if args.llava else None,
                "sam": str(Path(args.sam).resolve()) if args.sam else None}
        try:
            trainer = Trainer(model, tok, proc, mixture, opts, out, base=base, extra={"cli": _saved_cli(args)})
        except ValueError as e:
            raise CLIError(str(e)) from None
    if trainer.is_main:
        print(f"mixture: {mixture.describe()}")
    summary = trainer.run(progress=not args.no_progress)
    if trainer.is_main:
        print(f"trained to step {summary['step']}/{summary['steps']} ({summary['stopped']}) in "
              f"{summary['seconds']:.0f} s, {summary['samples_per_s']:.2f} samples/s, loss {summary['loss_ema']:.3f}, "
              f"{summary['world_size']} process(es) ({summary['strategy']}), global batch {summary['global_batch']} "
              f"-> {out / CHECKPOINT}")
    return 0
