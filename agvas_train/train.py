"""The training loop: teacher forcing over the mixture, AdamW with warm-up then linear decay,
gradient accumulation, checkpoints every N steps and at the end, bit-compatible resume.

One step = ``grad_accum`` micro-batches of ``batch_size`` samples. Sample k of the run is
``mixture.example(k)`` (a pure function of the seed and k), so a run resumed from a checkpoint
sees exactly the data of an uninterrupted run; the optimizer, scheduler and torch RNG states are
saved beside the weights (``train_state.pt``).

Run directory: ``OUT/checkpoint/`` (a normal checkpoint; ``checkpoint.json`` carries a
``training`` record with the step and whether the run finished) and ``OUT/train_log.jsonl``.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .checkpoint import load_checkpoint, read_meta, save_checkpoint
from .data.mixture import Batch, Mixture, collate, expand_visual
from .losses import mask_logits_at_input, segmentation_loss, text_loss
from .lora import apply_lora, configure_trainable
from .modeling import anchor_state_positions, gather_anchor_states

CHECKPOINT = "checkpoint"
LOG = "train_log.jsonl"
TRAIN_STATE = "train_state.pt"


@dataclass
class TrainOptions:
    steps: int = 2000
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 3e-4
    warmup: int = 100
    weight_decay: float = 0.0
    clip_grad: float = 1.0
    save_every: int = 500
    log_every: int = 10
    seed: int = 0
    max_seconds: float | None = None  # stop (and save) after this much wall time
    autocast: str | None = None  # "bf16" / "fp16" (GPU users; CPU bf16 autocast works but is slow)
    grad_checkpointing: bool = False
    adapt_threads: bool = False  # re-pick 1 or 2 torch threads from the load every 20 steps (CPU)


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up over ``warmup`` steps, then linear decay to 0 at ``total`` (WarmupDecayLR)."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def forward_loss(model, batch: Batch, autocast: str | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Teacher-forced loss for one same-size batch: text CE over the answer (anchors and EOS
    included) + the anchor-guided segmentation loss on the anchors' hidden states (p-1)."""
    dev = next(model.parameters()).device
    ctx = (torch.autocast(dev.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[autocast])
           if autocast else contextlib.nullcontext())
    with ctx:
        f_s = torch.stack(model.semantic_features(batch.pixel_values.to(dev), batch.image_sizes.to(dev)))
        pix = model.pixel_embedding(batch.sam_input.to(dev))
        visual = model.visual_tokens(f_s, pix)
        ids, att, labels = (t.to(dev) for t in expand_visual(batch, visual.shape[1], model.ids.image))
        hidden = model.language_model(inputs_embeds=model.embed_prompt(ids, visual), attention_mask=att).last_hidden_state
        loss_text = text_loss(hidden, labels, model.lm_head)
        parts = {"text": float(loss_text.detach())}
        rows = batch.supervise.any(dim=1).to(dev)
        loss = loss_text
        if bool(rows.any()):
            pos = anchor_state_positions(ids[rows], model.ids.anchors)
            states = gather_anchor_states(hidden[rows], pos)
            logits = mask_logits_at_input(model.decode_masks(states, pix[rows]), model.cfg.pixel_encoder.img_size,
                                          batch.input_size)
            loss_seg, seg_parts = segmentation_loss(logits, batch.masks.to(dev)[rows], batch.supervise.to(dev)[rows])
            loss = loss + loss_seg
            parts.update(seg_parts)
    parts["loss"] = float(loss.detach())
    return loss, parts


class Trainer:
    """``Trainer(model, tokenizer, image_processor, mixture, options, out_dir).run()``."""

    def __init__(self, model, tokenizer, image_processor, mixture: Mixture, options: TrainOptions,
                 out_dir: str | Path, base: dict | None = None, extra: dict | None = None) -> None:
        self.model, self.tokenizer, self.image_processor = model, tokenizer, image_processor
        self.mixture, self.opts = mixture, options
        self.out = Path(out_dir)
        self.base = base
        self.extra = extra or {}
        self.step = 0
        self.total = options.steps  # the schedule's length; shrinks to fit max_seconds (see run)
        configure_trainable(model)
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("no trainable parameters")
        self.optimizer = torch.optim.AdamW(params, lr=options.lr, weight_decay=options.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, options.warmup, self.total))
        if options.grad_checkpointing:
            model.llava.gradient_checkpointing_enable()
        torch.manual_seed(options.seed)

    # ---- state ----------------------------------------------------------------------------
    def train_state(self) -> dict:
        return {"step": self.step, "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "torch_rng": torch.get_rng_state(), "options": asdict(self.opts), "total": self.total}

    def load_train_state(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        self.step = int(state["step"])
        self.total = min(self.opts.steps, int(state.get("total", self.opts.steps)))

    def save(self, finished: bool) -> Path:
        record = {"step": self.step, "steps": self.total, "finished": finished,
                  "mixture": self.mixture.describe(), **self.extra}
        return save_checkpoint(self.model, self.tokenizer, self.image_processor, self.out / CHECKPOINT,
                               base=self.base, extra={"training": record}, train_state=self.train_state())

    # ---- loop -----------------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        o = self.opts
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        for micro in range(o.grad_accum):
            k0 = (self.step * o.grad_accum + micro) * o.batch_size
            examples = [self.mixture.example(k)[1] for k in range(k0, k0 + o.batch_size)]
            for batch in collate(examples, self.model, self.tokenizer, self.image_processor):
                w = len(batch) / (o.batch_size * o.grad_accum)
                loss, parts = forward_loss(self.model, batch, o.autocast)
                (loss * w).backward()
                for name, v in parts.items():
                    totals[name] = totals.get(name, 0.0) + v * w
        if o.clip_grad:
            torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], o.clip_grad)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return totals

    def fit_to_budget(self, elapsed: float, rate: float) -> None:
        """With ``max_seconds``: fit the schedule's length (at most ``steps``) so that warm-up and
        decay end when the time budget does, at the measured steps/s, instead of stopping at a high
        learning rate. Re-fitted as the speed changes (a machine that gets busy, then quiet again)."""
        if self.opts.max_seconds is None or rate <= 0:
            return
        fit = self.step + int(rate * max(0.0, self.opts.max_seconds - elapsed))
        self.total = max(self.step + 1, min(self.opts.steps, fit))

    def run(self, progress: bool = True) -> dict:
        """Train to ``options.steps``, or as many as fit in ``max_seconds`` (the LR schedule is
        re-fitted every 20 steps to the measured speed); saves every ``save_every`` steps, at the
        end, and on Ctrl-C (then re-raises ``KeyboardInterrupt``)."""
        from tqdm import tqdm

        from agvas.atomic import atomic_path

        o = self.opts
        self.out.mkdir(parents=True, exist_ok=True)
        log_path = self.out / LOG
        bar = tqdm(total=o.steps, initial=self.step, unit="step", desc="train", disable=not progress,
                   dynamic_ncols=True)
        t0 = time.perf_counter()
        start_step = self.step
        last: dict[str, float] = {}
        ema = None
        stopped = "finished"
        try:
            while self.step < self.total:
                last = self.train_step()
                ema = last["loss"] if ema is None else 0.95 * ema + 0.05 * last["loss"]
                elapsed = time.perf_counter() - t0
                rate = (self.step - start_step) / max(elapsed, 1e-9)
                if (self.step - start_step) % 20 == 0:
                    self.fit_to_budget(elapsed, rate)
                    if o.adapt_threads:
                        adapt_threads()
                    bar.total = self.total
                bar.update(1)
                bar.set_postfix(loss=f"{ema:.3f}", steps_s=f"{rate:.2f}")
                if self.step % o.log_every == 0 or self.step == self.total:
                    rec = {"step": self.step, "lr": self.scheduler.get_last_lr()[0], "steps_per_s": rate,
                           "elapsed_s": elapsed, **last}
                    with open(log_path, "a") as f:
                        f.write(json.dumps(rec) + "\n")
                if o.save_every and self.step % o.save_every == 0 and self.step < self.total:
                    self.save(finished=False)
                if o.max_seconds is not None and elapsed >= o.max_seconds and self.step < self.total:
                    break
        except KeyboardInterrupt:
            bar.close()
            self.save(finished=False)
            raise
        bar.close()
        elapsed = time.perf_counter() - t0
        if self.step < o.steps:
            stopped = f"time budget: schedule fitted to {self.step} of {o.steps} steps"
        self.extra["stopped"] = stopped
        self.save(finished=True)
        summary = {"step": self.step, "steps": o.steps, "stopped": stopped, "seconds": elapsed,
                   "steps_per_s": (self.step - start_step) / max(elapsed, 1e-9), "loss_ema": ema, "last": last}
        with atomic_path(self.out / "train_summary.json") as tmp:
            tmp.write_text(json.dumps(summary, indent=2))
        return summary


def build_trainable(cfg, llava_dir=None, sam_path=None, device="cpu"):
    """A fresh model for training: ``build_model`` + LoRA for configs with ``lora_rank``."""
    from .modeling import build_model, image_processor_for

    model, tok = build_model(cfg, llava_dir=llava_dir, sam_path=sam_path, device=device)
    if cfg.lora_rank is not None:
        apply_lora(model)
    return model, tok, image_processor_for(cfg, cfg.tokenizer_dir)


def resume_trainer(out_dir: str | Path, mixture: Mixture, options: TrainOptions | None = None,
                   device: str = "cpu") -> Trainer:
    """Rebuild the trainer from ``OUT/checkpoint`` (weights, optimizer, scheduler, RNG, step).
    Without ``options`` the saved ones are used."""
    ckpt = Path(out_dir) / CHECKPOINT
    meta = read_meta(ckpt)
    state_path = ckpt / TRAIN_STATE
    if not state_path.is_file():
        raise FileNotFoundError(f"{ckpt}: no {TRAIN_STATE} to resume from")
    state = torch.load(state_path, map_location="cpu", weights_only=True)
    opts = options or TrainOptions(**state["options"])
    model, tok, proc, _ = load_checkpoint(ckpt, device=device)
    trainer = Trainer(model, tok, proc, mixture, opts, out_dir, base=meta.get("base"))
    trainer.load_train_state(state)
    return trainer


def is_finished(out_dir: str | Path) -> bool:
    """Whether ``OUT/checkpoint`` holds a finished run."""
    try:
        return bool(read_meta(Path(out_dir) / CHECKPOINT).get("training", {}).get("finished"))
    except (FileNotFoundError, ValueError):
        return False


# ---- the quick tiny model (tests, export/runtime parity, benchmarks) ------------------------


QUICK_SPEC = dict(n_per_category=16, n_test_per_category=4, n_train_good=0,
                  train_categories=("stripes", "tiles", "marble", "wood", "washer", "pill"),
                  train_defects=("colour_spot", "hole", "stain", "perlin_intrusion", "cut_paste"),
                  test_categories=("fabric",), test_defects=("crack",))


def quick_train_tiny(out_dir: str | Path | None = None, steps: int = 300, seed: int = 0,
                     max_seconds: float | None = None, progress: bool = False):
    """Train `tiny` briefly on a small synthetic set of blob-like defects (direct mode only) so
    that it answers "Sure, it is [NOR][ANO][SEG]." and its maps are decisive — the shared model
    for parity tests and benchmarks (not the embedded default: see ``agvas demo``). Good test
    images: ``agvas_train.data.synthetic.make_sample(cat, kind, ...)`` with ``cat``/``kind`` from
    :data:`QUICK_SPEC`. Returns ``(model, tokenizer, image_processor)`` in eval mode; the run
    (data, checkpoint, log) stays in ``out_dir`` when given."""
    from .config import tiny
    from .data.sources import AnomalySource
    from .data.synthetic import SyntheticSpec, write_dataset

    threads = torch.get_num_threads()
    with contextlib.ExitStack() as stack:
        stack.callback(torch.set_num_threads, threads)
        set_threads()  # 1 thread on a busy machine (see set_threads), restored afterwards
        work = Path(out_dir) if out_dir else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="agvas_quick_")))
        meta = write_dataset(work / "data", SyntheticSpec(seed=seed, **QUICK_SPEC))
        mixture = Mixture({"seg": (AnomalySource.from_meta(meta, "train", {"direct": 1.0}), 1.0)}, seed=seed)
        cfg = tiny()
        cfg.seed = seed
        model, tok, proc = build_trainable(cfg)
        opts = TrainOptions(steps=steps, batch_size=8, lr=1e-3, warmup=min(30, steps // 5 + 1), save_every=0,
                            seed=seed, max_seconds=max_seconds)
        Trainer(model, tok, proc, mixture, opts, work).run(progress=progress)
    model.eval()
    return model, tok, proc


def adapt_threads() -> None:
    """During training: 2 threads while nothing else competes for the cores, else 1 (the load
    average counts this process's own running threads, so they are subtracted)."""
    import os

    cores = os.cpu_count() or 1
    others = os.getloadavg()[0] - torch.get_num_threads()
    torch.set_num_threads(min(2, cores) if others < 0.5 else 1)


def set_threads(n: int | None = None) -> int:
    """Set torch's CPU threads: ``n``, or automatically 2 (at most the cores) on an idle machine
    and 1 when the load average already fills the cores — on a shared machine two OpenMP threads
    that keep being preempted run ~10× slower than one. Returns the count."""
    import os

    cores = os.cpu_count() or 1
    if not n:
        n = 1 if os.getloadavg()[0] >= cores else min(2, cores)
    torch.set_num_threads(max(1, int(n)))
    return torch.get_num_threads()
