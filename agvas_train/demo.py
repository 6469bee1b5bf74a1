"""``agvas demo --out DIR``: the embedded default, end to end on a fresh machine.

generate the synthetic dataset → train `tiny` (``--config``; which parts are pretrained and
which are trained from scratch is printed, :func:`pretrained_parts`) → evaluate on the held-out
synthetic categories → zero-shot on the real magnetic-tile set when
``../shared/realdata/mtd/meta.json`` exists (never trained on) → export the engines
(``export/demo.py``) → calibrate and quantize behind the accuracy gate (``calibration/demo.py``) →
inspect the held-out images with the engines only (``runtime/demo.py``, ending at
``inspect/report.html``) → one summary table.

The run is a list of named steps (:data:`STEPS`); each is a function of the shared
:class:`Demo` context and may add rows to the summary. Later parts of the project append their
step function from their own package. A second run reuses what is already done: the dataset
(same spec), a finished checkpoint, evaluations and the export of the same checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MTD = REPO_ROOT.parent / "shared" / "realdata" / "mtd"
SAA_PLUS_MTD_F1 = 0.354  # SAA+ zero-shot pixel F1-max on MTD (Cao et al., SAA+ paper, Table 1)

# The embedded default's recipe: measured on the 2-core machine (see README "Data, training and
# evaluation"); `--steps` / `--max-minutes` override it.
DEMO_STEPS = 2400
DEMO_BATCH = 8
DEMO_LR = 1e-3
DEMO_MIX = "seg=0.7,instruct=0.3"
DEMO_CONFIGS = ("tiny", "tiny-sam")  # the CPU-trainable configs the demo can train
# Per config, the rest of its training recipe as `agvas train` options. The pretrained pixel
# encoder marks unfamiliar normal structure unless rejection is trained: more normal images (70 %
# of the anomaly data instead of the split's 50 %, plus 15 % generic photographs as normals) and
# stronger augmentation (zoom, colour-channel permutation) — chosen on the synthetic set only
# (README "Data, training and evaluation").
DEMO_TRAIN_ARGS: dict[str, tuple[str, ...]] = {
    "tiny-sam": (),
    "tiny": ("--normal-share", "0.7", "--strong-augment", "--photo-normals", "0.15"),
}
QUICK_SPEC = dict(n_per_category=8, n_test_per_category=4, n_train_good=1)  # --quick: a smoke run


@dataclass
class Demo:
    """State shared by the demo steps."""

    out: Path
    args: argparse.Namespace
    rows: list[tuple[str, str, str]] = field(default_factory=list)  # (step, time, result)
    metrics: dict[str, dict] = field(default_factory=dict)  # table name -> mean metrics
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def data_dir(self) -> Path:
        return self.out / "data"

    @property
    def meta(self) -> Path:
        return self.data_dir / "meta.json"

    @property
    def checkpoint(self) -> Path:
        return self.out / "checkpoint"

    def row(self, step: str, result: str) -> None:
        self.rows.append((step, _fmt_time(self.timings.get(step, 0.0)), result))


def _fmt_time(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


# ---- steps ---------------------------------------------------------------------------------


def step_data(d: Demo) -> None:
    from .data.synthetic import SyntheticSpec, write_dataset

    spec = SyntheticSpec(seed=d.args.seed, **(QUICK_SPEC if d.args.quick else {}))
    write_dataset(d.data_dir, spec, progress=not d.args.no_progress)
    n_train = len(spec.train_categories) * spec.n_per_category
    n_test = len(spec.test_categories) * spec.n_test_per_category
    d.row("data", f"{len(spec.train_categories)} training categories ({n_train} images, defects "
                  f"{', '.join(spec.train_defects)}); {len(spec.test_categories)} held-out ({n_test} images, "
                  f"unseen defects {', '.join(spec.test_defects)})")


def step_train(d: Demo) -> None:
    from .train import is_finished

    config = getattr(d.args, "config", "tiny")
    if is_finished(d.out) and not d.args.retrain:
        meta = json.loads((d.checkpoint / "checkpoint.json").read_text())
        if meta["config"]["name"] != config:
            raise ValueError(f"{d.checkpoint} holds a finished {meta['config']['name']!r} model, not --config {config}: "
                             f"pass --retrain or choose another --out")
        d.row("train", f"reused finished checkpoint ({meta['training']['step']} steps) {d.checkpoint}")
        return
    from .config import get_config
    from .train import CHECKPOINT, Trainer, build_trainable, resume_trainer
    from .train_cli import add_arguments, build_mixture, options_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    targs = parser.parse_args([
        "--out", str(d.out), "--data", str(d.meta), "--split", "train", "--mix", DEMO_MIX,
        "--seed", str(d.args.seed), "--steps", str(d.args.steps), "--batch-size", str(DEMO_BATCH),
        "--lr", str(DEMO_LR), "--warmup", "100", "--save-every", "200", "--log-every", "10", "--device", "cpu",
        *DEMO_TRAIN_ARGS.get(config, ()),
        *(["--max-minutes", str(d.args.max_minutes)] if d.args.max_minutes else []),
        *(["--threads", str(d.args.threads)] if d.args.threads else [])])
    mixture = build_mixture(targs)
    opts = options_from_args(targs)
    if (d.out / CHECKPOINT / "train_state.pt").is_file() and not d.args.retrain:
        trainer = resume_trainer(d.out, mixture, opts)  # an interrupted demo run continues
    else:
        cfg = get_config(config)
        cfg.seed = d.args.seed
        model, tok, proc = build_trainable(cfg)
        trainer = Trainer(model, tok, proc, mixture, opts, d.out)
    s = trainer.run(progress=not d.args.no_progress)
    d.row("train", f"{trainer.model.cfg.name} ({pretrained_parts(trainer.model.cfg)}): {s['step']} steps × "
                   f"{DEMO_BATCH} images ({s['stopped']}), {s['steps_per_s']:.2f} steps/s, loss {s['loss_ema']:.3f}")


def pretrained_parts(cfg) -> str:
    """What of ``cfg`` starts from pretrained weights, in words (the demo's summary says it)."""
    if cfg.pixel_encoder.kind == "efficientnet_lite0":
        return ("pixel encoder: frozen EfficientNet-Lite0 pretrained on ImageNet + trained neck; "
                "SigLIP tower, LLM, SPAM and AGMD trained from scratch on the synthetic set")
    return "everything trained from scratch on the synthetic set, no pretrained weights"


def _evaluate(d: Demo, meta: Path, out_json: Path, title: str, limit: int | None = None) -> dict:
    from agvas.atomic import write_text_atomic

    from .checkpoint import checkpoint_hash
    from .evaluate import EmptyPredictor, checkpoint_predictor, evaluate_meta

    digest = checkpoint_hash(d.checkpoint)
    if out_json.is_file() and not d.args.retrain:
        old = json.loads(out_json.read_text())
        if old.get("checkpoint_sha256") == digest and old.get("data") == {"meta": str(meta), "split": "test",
                                                                             "limit": limit}:
            d.metrics[title] = old["mean"]
            if "baseline_empty" in old:
                d.metrics[f"{title}: empty-mask baseline"] = old["baseline_empty"]
            return old
    result = evaluate_meta(checkpoint_predictor(d.checkpoint), meta, "test", limit=limit,
                           progress=not d.args.no_progress)
    result["checkpoint_sha256"] = digest
    result["baseline_empty"] = evaluate_meta(EmptyPredictor(), meta, "test", limit=limit, progress=False)["mean"]
    write_text_atomic(out_json, json.dumps(result, indent=2))
    d.metrics[title] = result["mean"]
    d.metrics[f"{title}: empty-mask baseline"] = result["baseline_empty"]
    return result


def step_eval_synthetic(d: Demo) -> None:
    r = _evaluate(d, d.meta, d.out / "eval_synthetic.json", "synthetic held-out")
    m = r["mean"]
    d.row("eval_synthetic", f"{r['n_images']} images of {len(r['per_category'])} unseen categories: "
                            f"IoU_ano {100 * m['iou_ano']:.1f}, IoU_nor {100 * m['iou_nor']:.1f} -> {d.out / 'eval_synthetic.json'}")


def step_eval_mtd(d: Demo) -> None:
    if d.args.mtd in ("none", ""):
        d.row("eval_mtd", "skipped (--mtd none)")
        return
    meta = Path(d.args.mtd)
    meta = meta / "meta.json" if meta.is_dir() else meta
    if not meta.is_file():
        d.row("eval_mtd", f"skipped: {meta} not found (the real magnetic-tile set lives in ../shared)")
        return
    r = _evaluate(d, meta, d.out / "eval_mtd.json", "MTD (real, zero-shot)", d.args.mtd_limit)
    m, b = r["mean"], r["baseline_empty"]
    d.metrics["MTD: SAA+ (paper)"] = {"f1_max": SAA_PLUS_MTD_F1}
    d.row("eval_mtd", f"{r['n_images']} real images, never trained on: F1-max {100 * m['f1_max']:.1f} "
                      f"(SAA+ {100 * SAA_PLUS_MTD_F1:.1f}, empty mask {100 * b['f1_max']:.1f}) -> {d.out / 'eval_mtd.json'}")


from agvas.calibration.demo import step_quantize  # noqa: E402  (the later stages, each in its own package)
from agvas.export.demo import step_export  # noqa: E402
from agvas.runtime.demo import step_inspect  # noqa: E402

STEPS: list[tuple[str, Callable[[Demo], None]]] = [
    ("data", step_data),
    ("train", step_train),
    ("eval_synthetic", step_eval_synthetic),
    ("eval_mtd", step_eval_mtd),
    ("export", step_export),
    ("quantize", step_quantize),
    ("inspect", step_inspect),
]


# ---- CLI -----------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output directory (data/, checkpoint/, eval_*.json, ...)")
    p.add_argument("--config", default="tiny", choices=DEMO_CONFIGS, help="model to train (default tiny)")
    p.add_argument("--mtd", default=str(DEFAULT_MTD), help=f"real MTD meta.json or its folder (default "
                   f"{DEFAULT_MTD}; 'none' skips)")
    p.add_argument("--steps", type=int, default=DEMO_STEPS, help=f"training steps (default {DEMO_STEPS})")
    p.add_argument("--max-minutes", type=float, default=15.0, help="training time budget (default 15)")
    p.add_argument("--retrain", action="store_true", help="train and evaluate again even if finished")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch threads (default: 2, or 1 while the machine is busy; re-picked during training)")
    p.add_argument("--only", action="append", help="run only these steps (repeatable): "
                   + ", ".join(n for n, _ in STEPS))
    p.add_argument("--mtd-limit", type=int, help="evaluate N MTD images (evenly spaced)")
    p.add_argument("--quick", action="store_true", help="a smoke run: a few images per category, 10 training "
                   "steps, 8 MTD images (numbers meaningless)")
    p.add_argument("--no-progress", action="store_true")


def summary_table(d: Demo) -> str:
    lines = ["| step | time | result |", "|---|---|---|"]
    lines += [f"| {s} | {t} | {r} |" for s, t, r in d.rows]
    if d.metrics:
        cols = ("pixel_ap", "pixel_auroc", "f1_max", "iou_ano", "iou_nor", "image_auroc")
        lines += ["", "| evaluation | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for name, m in d.metrics.items():
            lines.append(f"| {name} | " + " | ".join("–" if m.get(c) is None else f"{100 * m[c]:.1f}" for c in cols) + " |")
    return "\n".join(lines)


def run(args) -> int:
    from agvas.atomic import write_text_atomic

    from .train import set_threads

    threads = set_threads(args.threads)
    if args.quick:
        args.steps, args.mtd_limit = min(args.steps, 10), args.mtd_limit or 8
    d = Demo(Path(args.out), args)
    d.out.mkdir(parents=True, exist_ok=True)
    names = [n for n, _ in STEPS]
    for n in args.only or []:
        if n not in names:
            raise ValueError(f"--only {n}: unknown step; expected one of {names}")
    print(f"agvas demo -> {d.out} (torch threads: {threads}; load average {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} cores)", flush=True)
    for name, fn in STEPS:
        if args.only and name not in args.only:
            continue
        print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        fn(d)
        d.timings[name] = time.perf_counter() - t0
        if d.rows and d.rows[-1][0] == name:
            d.rows[-1] = (name, _fmt_time(d.timings[name]), d.rows[-1][2])
    table = summary_table(d)
    print("\n" + table)
    write_text_atomic(d.out / "summary.md", table + "\n")
    return 0
