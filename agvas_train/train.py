"""The training loop: one code path for one device and for many (Hugging Face Accelerate over
torch.distributed: DDP, FSDP, or DeepSpeed ZeRO-2), teacher forcing over the mixture, AdamW with
warm-up then linear decay, gradient accumulation, checkpoints every N steps and at the end,
bit-compatible resume.

**Precision.** The frozen base (SigLIP, projector, SAM encoder, LLM base weights) is held in
``dtype`` (bf16 / fp16 / fp32) whatever dtype its files were saved in; everything that trains
(LoRA, SPAM, token refiner, AGMD, embeddings, LM head) keeps fp32 master weights and AdamW runs
on those, with fp32 states. With a bf16 / fp16 base the forward runs under autocast in that dtype
(Accelerate's ``mixed_precision``); fp16 also gets a gradient scaler (CUDA only).

**Data.** One step = ``grad_accum`` micro-batches of ``batch_size`` samples on each of the
``world_size`` processes. Micro-batch n of rank r holds mixture samples
``k = (n·world_size + r)·batch_size + j`` — so the samples of a step are those of a single
process with batch ``world_size·batch_size``, and sample k is a pure function of the seed and k
(``Mixture.example``): a resumed run sees exactly the data of an uninterrupted one. Samples are
read, decoded and collated in DataLoader worker processes. The loss is normalised by the global
batch (see :mod:`agvas.train.losses`), so N processes with batch b train exactly as 1 with N·b.

Run directory (written by rank 0 only): ``OUT/checkpoint/`` (``checkpoint.json`` carries a
``training`` record; ``train_state.pt`` the optimizer, scheduler, RNG states, step and options),
``OUT/train_log.jsonl``, ``OUT/train_summary.json``, ``OUT/tensorboard/`` and, with
``eval_data``, ``OUT/best/`` (the best checkpoint by ``eval_metric``) and ``OUT/eval_log.jsonl``.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
import types
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from accelerate.utils import gather_object

from .checkpoint import load_checkpoint, read_meta, save_checkpoint
from .data.mixture import Batch, Mixture, collate, expand_visual
from .losses import W_BCE, W_DICE, mask_logits_at_input, segmentation_loss_per_sample, text_loss_per_sample
from .lora import apply_lora, configure_trainable
from .modeling import anchor_state_positions

CHECKPOINT = "checkpoint"
BEST = "best"
LOG = "train_log.jsonl"
EVAL_LOG = "eval_log.jsonl"
TRAIN_STATE = "train_state.pt"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
STRATEGIES = ("ddp", "fsdp", "zero2")


@dataclass
class TrainOptions:
    steps: int = 2000
    batch_size: int = 8  # per device
    grad_accum: int = 1
    lr: float = 3e-4
    warmup: int = 100
    weight_decay: float = 0.0
    clip_grad: float = 1.0
    save_every: int = 500
    log_every: int = 10
    seed: int = 0
    max_seconds: float | None = None  # stop (and save) after this much wall time
    dtype: str = "fp32"  # the frozen base's dtype (bf16 / fp16 / fp32); trainable parts stay fp32
    strategy: str = "ddp"  # ddp | fsdp | zero2 (distributed engine; one process = plain training)
    device: str = "cpu"  # cpu | cuda (each process takes cuda:LOCAL_RANK)
    grad_checkpointing: bool = False
    workers: int = 2  # DataLoader worker processes reading and collating samples (0 = in the loop)
    bce_weight: float = W_BCE
    dice_weight: float = W_DICE
    eval_every: int = 0  # with eval_data: evaluate every N steps (and at the end)
    eval_data: str | None = None  # meta.json / MVTec folder for the zero-shot metrics while training
    eval_limit: int | None = 8  # at most N images per category per evaluation
    eval_metric: str = "pixel_ap"  # the metric (mean over categories) that picks OUT/best/
    tensorboard: bool = True
    adapt_threads: bool = False  # re-pick 1 or 2 torch threads from the load every 20 steps (CPU)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainOptions":
        """Saved options (unknown keys of older runs are dropped; ``autocast`` became ``dtype``)."""
        known = {f.name for f in fields(cls)}
        d = dict(d)
        if d.get("autocast") and "dtype" not in d:
            d["dtype"] = d["autocast"]
        return cls(**{k: v for k, v in d.items() if k in known})


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up over ``warmup`` steps, then linear decay to 0 at ``total`` (WarmupDecayLR)."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


# ---- the loss of one micro-batch ----------------------------------------------------------


def sample_losses(model, batch: Batch, w_bce: float = W_BCE, w_dice: float = W_DICE
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Teacher-forced per-sample losses ``[B]`` for one same-size batch: text CE over the
    answer (anchors and EOS included) + the anchor-guided segmentation loss on the anchors'
    hidden states (p-1). Also returns the per-sample parts (``text``, ``nor``, ``ano``, ``seg``;
    0 where a channel is not supervised)."""
    dev = model.embed_tokens.weight.device
    f_s = torch.stack(model.semantic_features(batch.pixel_values.to(dev), batch.image_sizes.to(dev)))
    pix = model.pixel_embedding(batch.sam_input.to(dev))
    visual = model.visual_tokens(f_s, pix)
    ids, att, labels = (t.to(dev) for t in expand_visual(batch, visual.shape[1], model.ids.image))
    hidden = model.language_model(inputs_embeds=model.embed_prompt(ids, visual), attention_mask=att).last_hidden_state
    per = text_loss_per_sample(hidden, labels, model.lm_head)
    parts = {"text": per.detach()}
    supervise = batch.supervise.to(dev)
    rows = supervise.any(dim=1)
    if bool(rows.any()):
        idx = rows.nonzero()[:, 0]
        pos = anchor_state_positions(ids[idx], model.ids.anchors)
        need = supervise[idx]
        if bool(((pos < 0) & need).any()):
            raise ValueError("a supervised anchor token is missing from a training answer")
        # an unsupervised anchor absent from the answer (e.g. [SEG]-only answers) reads position 0
        states = torch.gather(hidden[idx], 1, pos.clamp(min=0).unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        logits = mask_logits_at_input(model.decode_masks(states, pix[idx]), model.cfg.pixel_encoder.img_size,
                                      batch.input_size)
        seg, seg_parts = segmentation_loss_per_sample(logits, batch.masks.to(dev)[idx], need, w_bce, w_dice)
        per = per.index_add(0, idx, seg.to(per.dtype))
        for name, v in seg_parts.items():
            parts[name] = torch.zeros_like(parts["text"]).index_add(0, idx, v.detach().to(per.dtype))
    return per, parts


def forward_loss(model, batch: Batch, w_bce: float = W_BCE, w_dice: float = W_DICE
                 ) -> tuple[torch.Tensor, dict[str, float]]:
    """The mean loss over one batch and its parts (diagnostics; training uses :class:`StepLoss`)."""
    per, parts = sample_losses(model, batch, w_bce, w_dice)
    return per.mean(), {k: float(v.mean()) for k, v in parts.items()} | {"loss": float(per.detach().mean())}


class StepLoss(torch.nn.Module):
    """The model and its loss as one module — what DDP / FSDP / DeepSpeed wrap, since their hooks
    run in ``forward``. ``forward(batches, denom)`` returns the sum of the per-sample losses of
    the micro-batch divided by ``denom``, and the sums and counts of the loss parts."""

    def __init__(self, model, w_bce: float = W_BCE, w_dice: float = W_DICE) -> None:
        super().__init__()
        self.model, self.w_bce, self.w_dice = model, w_bce, w_dice

    def forward(self, batches: list[Batch], denom: float):
        total = None
        stats: dict[str, torch.Tensor] = {}
        for batch in batches:
            per, parts = sample_losses(self.model, batch, self.w_bce, self.w_dice)
            total = per.sum() if total is None else total + per.sum()
            sup = batch.supervise.to(per.device)
            counts = {"text": torch.tensor(float(len(batch)), device=per.device),
                      **{c: sup[:, j].sum().float() for j, c in enumerate(("nor", "ano", "seg"))}}
            for name, v in parts.items():
                stats[name] = stats.get(name, 0) + v.sum().float()
                stats[f"n_{name}"] = stats.get(f"n_{name}", 0) + counts[name]
            stats["loss"] = stats.get("loss", 0) + per.detach().sum().float()
            stats["n_loss"] = stats.get("n_loss", 0) + counts["text"]
        return total / denom, stats


# ---- data: micro-batches read in DataLoader workers -----------------------------------------


class MicroBatches(torch.utils.data.Dataset):
    """Micro-batch ``n`` of rank ``rank``: mixture samples ``(n·world + rank)·b … +b``, collated
    (images decoded, processed and tokenised) into same-size :class:`Batch` es."""

    def __init__(self, mixture: Mixture, model, tokenizer, image_processor, batch_size: int, world: int,
                 rank: int) -> None:
        self.mixture, self.tokenizer, self.image_processor = mixture, tokenizer, image_processor
        self.spec = types.SimpleNamespace(cfg=model.cfg, ids=model.ids)  # what collation reads of the model
        self.batch_size, self.world, self.rank = batch_size, world, rank

    def sample_ids(self, n: int) -> range:
        k0 = (n * self.world + self.rank) * self.batch_size
        return range(k0, k0 + self.batch_size)

    def __len__(self) -> int:
        return 2 ** 62

    def __getitem__(self, n: int) -> list[Batch]:
        examples = [self.mixture.example(k)[1] for k in self.sample_ids(n)]
        return collate(examples, self.spec, self.tokenizer, self.image_processor)


def _keep(x):
    return x


def _worker_init(_):
    torch.set_num_threads(1)


# ---- precision and the distributed engine ---------------------------------------------------


def prepare_precision(model: torch.nn.Module, dtype: str) -> None:
    """Frozen parameters in ``dtype``; trainable ones (fp32 master weights) in float32."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {sorted(DTYPES)}")
    for p in model.parameters():
        want = torch.float32 if p.requires_grad else DTYPES[dtype]
        if p.is_floating_point() and p.dtype != want:
            p.data = p.data.to(want)


def make_accelerator(opts: TrainOptions):
    """The Accelerate engine for ``opts``: DDP (``find_unused_parameters``: VQA micro-batches
    leave the mask decoder unused), FSDP2 (full sharding per Qwen2 decoder layer) or DeepSpeed
    ZeRO-2; ``mixed_precision`` from the base dtype; gradient accumulation over ``grad_accum``."""
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.state import AcceleratorState

    if opts.strategy not in STRATEGIES:
        raise ValueError(f"strategy {opts.strategy!r}: expected one of {STRATEGIES}")
    if opts.dtype not in DTYPES:
        raise ValueError(f"dtype {opts.dtype!r}: expected one of {sorted(DTYPES)}")
    cpu = not str(opts.device).startswith("cuda")
    if not cpu and not torch.cuda.is_available():
        raise ValueError(f"device {opts.device!r}: CUDA is not available to this torch build")
    if opts.dtype == "fp16" and cpu:
        raise ValueError("dtype fp16 needs CUDA (fp16 autocast with a gradient scaler); use bf16 or fp32 on CPU")
    if cpu and opts.strategy != "ddp":
        raise ValueError(f"strategy {opts.strategy}: Accelerate runs FSDP and DeepSpeed on GPUs only; on CPU use "
                         f"--strategy ddp (gloo)")
    if opts.strategy == "zero2":
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            raise ValueError("strategy zero2 needs DeepSpeed: pip install 'agvas-edge[deepspeed]' (or deepspeed)")
    AcceleratorState._reset_state()  # one process may train several times (tests, the demo)
    kw = dict(cpu=cpu, mixed_precision={"bf16": "bf16", "fp16": "fp16", "fp32": "no"}[opts.dtype],
              gradient_accumulation_steps=opts.grad_accum)
    if opts.strategy == "ddp":
        kw["kwargs_handlers"] = [DistributedDataParallelKwargs(find_unused_parameters=True)]
    elif opts.strategy == "fsdp":
        from accelerate import FullyShardedDataParallelPlugin

        kw["fsdp_plugin"] = FullyShardedDataParallelPlugin(
            fsdp_version=2, reshard_after_forward=True, auto_wrap_policy="transformer_based_wrap",
            transformer_cls_names_to_wrap=["Qwen2DecoderLayer"], state_dict_type="FULL_STATE_DICT",
            cpu_ram_efficient_loading=False)
    else:
        from accelerate import DeepSpeedPlugin

        plugin = DeepSpeedPlugin(zero_stage=2, gradient_accumulation_steps=opts.grad_accum,
                                 gradient_clipping=opts.clip_grad or None)
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = opts.batch_size
        kw["deepspeed_plugin"] = plugin
    return Accelerator(**kw)


class Trainer:
    """``Trainer(model, tokenizer, image_processor, mixture, options, out_dir).run()`` — the same
    code in one process and in each of ``torchrun --nproc-per-node N`` processes."""

    def __init__(self, model, tokenizer, image_processor, mixture: Mixture, options: TrainOptions,
                 out_dir: str | Path, base: dict | None = None, extra: dict | None = None) -> None:
        o = self.opts = options
        self.model, self.tokenizer, self.image_processor = model, tokenizer, image_processor
        self.mixture = mixture
        self.out = Path(out_dir)
        self.base = base
        self.extra = extra or {}
        self.step = 0
        self.total = o.steps  # the schedule's length; shrinks to fit max_seconds (see run)
        self.best: float | None = None
        self.acc = make_accelerator(o)
        self.rank, self.world = self.acc.process_index, self.acc.num_processes
        self.is_main = self.acc.is_main_process
        configure_trainable(model)
        prepare_precision(model, o.dtype)
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("no trainable parameters")
        if o.grad_checkpointing:
            model.llava.activation_checkpointing_enable({"use_reentrant": False})  # transformers 5
        optimizer = torch.optim.AdamW(self.params, lr=o.lr, weight_decay=o.weight_decay)
        # stepped once per optimizer step by us (Accelerate's wrapper would step it world-size times)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, o.warmup, self.total))
        self.wrapped, self.optimizer = self.acc.prepare(StepLoss(model, o.bce_weight, o.dice_weight), optimizer)
        self.device = self.acc.device
        torch.manual_seed(o.seed + self.rank)
        self._loader = None
        self._writer = None

    @property
    def global_batch(self) -> int:
        return self.opts.batch_size * self.world * self.opts.grad_accum

    # ---- state ----------------------------------------------------------------------------
    def _rng(self) -> dict:
        return {"cpu": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state() if self.device.type == "cuda" else None}

    def train_state(self, rng_states: list | None = None) -> dict:
        return {"step": self.step, "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "rng": rng_states or [self._rng()], "world_size": self.world, "options": asdict(self.opts),
                "total": self.total, "best": self.best}

    def load_train_state(self, state: dict) -> None:
        saved_world = int(state.get("world_size", 1))
        if saved_world != self.world:
            raise ValueError(f"resume: the run was trained on {saved_world} process(es), this launch has {self.world}; "
                             f"start it with the same number (the data order and global batch depend on it)")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        rng = state.get("rng") or [{"cpu": state.get("torch_rng")}]
        mine = rng[self.rank] if self.rank < len(rng) else None
        if mine and mine.get("cpu") is not None:
            torch.set_rng_state(mine["cpu"])
        if mine and mine.get("cuda") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(mine["cuda"])
        self.step = int(state["step"])
        self.total = min(self.opts.steps, int(state.get("total", self.opts.steps)))
        self.best = state.get("best")
        self._loader = None  # the data position is the step: rebuilt from there

    def _state_dict(self) -> dict | None:
        """The model's full state under a sharded engine (every rank takes part), else None."""
        if self.opts.strategy == "ddp" or self.world == 1:
            return None
        full = self.acc.get_state_dict(self.wrapped)
        return {k.removeprefix("model."): v for k, v in full.items()}

    def save(self, finished: bool, where: str = CHECKPOINT) -> Path | None:
        """Rank 0 writes ``OUT/<where>`` (atomically); the others wait. Call on every rank."""
        rng = gather_object([self._rng()]) if self.world > 1 else [self._rng()]
        state = self._state_dict()
        path = None
        if self.is_main:
            record = {"step": self.step, "steps": self.total, "finished": finished,
                      "mixture": self.mixture.describe(), "world_size": self.world, "strategy": self.strategy_name,
                      "dtype": self.opts.dtype, "global_batch": self.global_batch, **self.extra}
            path = save_checkpoint(self.model, self.tokenizer, self.image_processor, self.out / where,
                                   base=self.base, extra={"training": record}, train_state=self.train_state(rng),
                                   state=state)
        self.acc.wait_for_everyone()
        return path

    @property
    def strategy_name(self) -> str:
        return self.opts.strategy if self.world > 1 else "single"

    # ---- loop -----------------------------------------------------------------------------
    def _next_batches(self) -> list[Batch]:
        if self._loader is None:
            o = self.opts
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
            ds = MicroBatches(self.mixture, self.model, self.tokenizer, self.image_processor, o.batch_size,
                              self.world, self.rank)
            first = self.step * o.grad_accum  # the data position; open-ended (the loop decides when to stop)
            loader = torch.utils.data.DataLoader(
                ds, batch_size=None, sampler=range(first, 2 ** 62), num_workers=o.workers, collate_fn=_keep,
                worker_init_fn=_worker_init if o.workers else None, prefetch_factor=2 if o.workers else None,
                persistent_workers=False)
            self._loader = iter(loader)
        return next(self._loader)

    def train_step(self) -> dict[str, float]:
        o, acc = self.opts, self.acc
        self.wrapped.train()
        sums: dict[str, torch.Tensor] = {}
        for _ in range(o.grad_accum):
            batches = self._next_batches()
            with acc.accumulate(self.wrapped):
                # Accelerate divides by grad_accum: the loss is normalised by the global batch
                loss, stats = self.wrapped(batches, o.batch_size)
                acc.backward(loss)
                if acc.sync_gradients and o.clip_grad:
                    acc.clip_grad_norm_(self.params, o.clip_grad)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            for k, v in stats.items():
                sums[k] = sums.get(k, 0) + v.detach()
        self.scheduler.step()
        self.step += 1
        return self._reduce(sums)

    def _reduce(self, sums: dict[str, torch.Tensor]) -> dict[str, float]:
        """Means over the global batch of each loss part (over the samples that carry it)."""
        names = sorted(k for k in sums if not k.startswith("n_"))
        vec = torch.stack([torch.as_tensor(sums[k], dtype=torch.float32, device=self.device) for k in names]
                          + [torch.as_tensor(sums[f"n_{k}"], dtype=torch.float32, device=self.device) for k in names])
        if self.world > 1:
            vec = self.acc.reduce(vec, reduction="sum")
        n = len(names)
        return {k: float(vec[i] / vec[n + i]) for i, k in enumerate(names) if float(vec[n + i]) > 0}

    def fit_to_budget(self, elapsed: float, rate: float) -> None:
        """With ``max_seconds``: fit the schedule's length (at most ``steps``) so that warm-up and
        decay end when the time budget does, at the measured steps/s, instead of stopping at a high
        learning rate. Re-fitted as the speed changes (a machine that gets busy, then quiet again)."""
        if self.opts.max_seconds is None or rate <= 0:
            return
        fit = self.step + int(rate * max(0.0, self.opts.max_seconds - elapsed))
        self.total = min(self.opts.steps, max(self.step + 1, fit))  # never past the planned steps

    def _memory_gib(self) -> float | None:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2 ** 30
        return None

    def _log(self, rec: dict, prefix: str = "train") -> None:
        if not self.is_main or not self.opts.tensorboard:
            return
        if self._writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard not installed: the JSONL logs remain
                self.opts.tensorboard = False
                return
            self._writer = SummaryWriter(str(self.out / "tensorboard"))
        for k, v in rec.items():
            if isinstance(v, (int, float)) and k != "step" and v is not None:
                self._writer.add_scalar(f"{prefix}/{k}", v, self.step)
        self._writer.flush()

    def evaluate(self) -> dict | None:
        """Zero-shot metrics of the model as it is (``agvas eval``'s code) on ``eval_data``; keeps
        ``OUT/best/`` by ``eval_metric``. Rank 0 evaluates (every rank under FSDP, whose
        parameters are sharded); returns the mean metrics on rank 0."""
        o = self.opts
        if not o.eval_data:
            return None
        result = None
        if self.is_main or o.strategy == "fsdp":
            from .evaluate import evaluate_meta
            from .reference import ReferencePipeline

            self.wrapped.eval()
            with self.acc.autocast():
                result = evaluate_meta(ReferencePipeline(self.model, self.tokenizer, self.image_processor),
                                       o.eval_data, "test", limit=o.eval_limit, progress=False)
            self.wrapped.train()
        better = False
        if self.is_main:
            mean = result["mean"]
            if o.eval_metric not in mean:
                raise ValueError(f"eval metric {o.eval_metric!r}: expected one of {sorted(mean)}")
            value = float(mean[o.eval_metric])
            better = self.best is None or value > self.best
            if better:
                self.best = value
            with open(self.out / EVAL_LOG, "a") as f:
                f.write(json.dumps({"step": self.step, **mean, "best": self.best}) + "\n")
            self._log({k: v for k, v in mean.items() if isinstance(v, (int, float))}, "eval")
        better = gather_object([better])[0] if self.world > 1 else better
        if better:
            self.save(finished=False, where=BEST)
        return result["mean"] if result else None

    def run(self, progress: bool = True) -> dict:
        """Train to ``options.steps``, or as many as fit in ``max_seconds`` (the LR schedule is
        re-fitted every 20 steps to the measured speed); saves every ``save_every`` steps, at the
        end, and on Ctrl-C (then re-raises ``KeyboardInterrupt``)."""
        from tqdm import tqdm

        from agvas.atomic import write_text_atomic

        o = self.opts
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            print(f"training {self.model.cfg.name}: {self.world} process(es) on {self.device.type} "
                  f"({self.strategy_name}), base {o.dtype}, trainable fp32; global batch {self.global_batch} = "
                  f"{o.batch_size} per device × {self.world} × {o.grad_accum} accumulation", flush=True)
        log_path = self.out / LOG
        bar = tqdm(total=o.steps, initial=self.step, unit="step", desc="train",
                   disable=not progress or not self.is_main, dynamic_ncols=True)
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
                    if self.world > 1:  # every rank must agree on the schedule's length
                        rate = float(self.acc.reduce(torch.tensor([rate], device=self.device), "mean")[0])
                    self.fit_to_budget(elapsed, rate)
                    if o.adapt_threads and self.world == 1:
                        adapt_threads()
                    bar.total = self.total
                bar.update(1)
                bar.set_postfix(loss=f"{ema:.3f}", steps_s=f"{rate:.2f}")
                if self.is_main and (self.step % o.log_every == 0 or self.step == self.total):
                    rec = {"step": self.step, "lr": self.scheduler.get_last_lr()[0], "steps_per_s": rate,
                           "samples_per_s": rate * self.global_batch, "elapsed_s": elapsed,
                           "memory_gib": self._memory_gib(), **last}
                    with open(log_path, "a") as f:
                        f.write(json.dumps(rec) + "\n")
                    self._log(rec)
                if o.eval_every and self.step % o.eval_every == 0 and self.step < self.total:
                    self.evaluate()
                if o.save_every and self.step % o.save_every == 0 and self.step < self.total:
                    self.save(finished=False)
                stop = o.max_seconds is not None and elapsed >= o.max_seconds and self.step < self.total
                if self.world > 1:
                    stop = bool(gather_object([stop])[0])
                if stop:
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
        if ema is None and log_path.is_file():  # resumed with no step left: the run's last logged loss
            lines = log_path.read_text().splitlines()
            ema = json.loads(lines[-1]).get("loss") if lines else None
        evaluation = self.evaluate() if o.eval_data else None
        self.save(finished=True)
        rate = (self.step - start_step) / max(elapsed, 1e-9)
        summary = {"step": self.step, "steps": o.steps, "stopped": stopped, "seconds": elapsed,
                   "steps_per_s": rate, "samples_per_s": rate * self.global_batch, "loss_ema": ema, "last": last,
                   "world_size": self.world, "strategy": self.strategy_name, "dtype": o.dtype,
                   "trainable_dtype": "fp32", "device": self.device.type, "per_device_batch": o.batch_size,
                   "grad_accum": o.grad_accum, "global_batch": self.global_batch,
                   "grad_checkpointing": o.grad_checkpointing, "peak_memory_gib": self._memory_gib(),
                   "eval": evaluation, "best": {"metric": o.eval_metric, "value": self.best} if o.eval_data else None}
        if self.is_main:
            write_text_atomic(self.out / "train_summary.json", json.dumps(summary, indent=2))
            if self._writer is not None:
                self._writer.close()
        return summary


def build_trainable(cfg, llava_dir=None, sam_path=None, device="cpu", dtype: str = "fp32"):
    """A fresh model for training: ``build_model`` (the base in ``dtype``, whatever dtype its
    files hold) + LoRA for configs with ``lora_rank``. The Trainer puts it on its device."""
    from .modeling import build_model, image_processor_for

    model, tok = build_model(cfg, llava_dir=llava_dir, sam_path=sam_path, device="cpu", llava_dtype=DTYPES[dtype])
    if cfg.lora_rank is not None:
        apply_lora(model)
    return model, tok, image_processor_for(cfg, cfg.tokenizer_dir)


def read_train_state(out_dir: str | Path) -> dict:
    ckpt = Path(out_dir) / CHECKPOINT
    read_meta(ckpt)
    state_path = ckpt / TRAIN_STATE
    if not state_path.is_file():
        raise FileNotFoundError(f"{ckpt}: no {TRAIN_STATE} to resume from")
    return torch.load(state_path, map_location="cpu", weights_only=True)


def resume_trainer(out_dir: str | Path, mixture: Mixture, options: TrainOptions | None = None) -> Trainer:
    """Rebuild the trainer from ``OUT/checkpoint`` (weights, optimizer, scheduler, RNG states,
    step = data position). Without ``options`` the saved ones are used."""
    ckpt = Path(out_dir) / CHECKPOINT
    meta = read_meta(ckpt)
    state = read_train_state(out_dir)
    opts = options or TrainOptions.from_dict(state["options"])
    model, tok, proc, _ = load_checkpoint(ckpt, dtype=None, llava_dtype=DTYPES[opts.dtype])
    extra = {k: v for k, v in meta.get("training", {}).items() if k == "cli"}
    trainer = Trainer(model, tok, proc, mixture, opts, out_dir, base=meta.get("base"), extra=extra)
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
                     max_seconds: float | None = None, progress: bool = False, config: str = "tiny-sam"):
    """Train ``config`` briefly on a small synthetic set of blob-like defects (direct mode only) so
    that it answers "Sure, it is [NOR][ANO][SEG]." and its maps are decisive — the shared model
    for parity tests and benchmarks (not the embedded default: see ``agvas demo``). Good test
    images: ``agvas.train.data.synthetic.make_sample(cat, kind, ...)`` with ``cat``/``kind`` from
    :data:`QUICK_SPEC`. Returns ``(model, tokenizer, image_processor)`` in eval mode; the run
    (data, checkpoint, log) stays in ``out_dir`` when given. The default `tiny-sam` has SAM's ViT
    as its pixel encoder, exported as the real configs' is, so the parity tests cover that path
    (`tiny`'s EfficientNet encoder has its own tests)."""
    from .config import get_config
    from .data.sources import AnomalySource
    from .data.synthetic import SyntheticSpec, write_dataset

    threads = torch.get_num_threads()
    with contextlib.ExitStack() as stack:
        stack.callback(torch.set_num_threads, threads)
        set_threads()  # 1 thread on a busy machine (see set_threads), restored afterwards
        work = Path(out_dir) if out_dir else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="agvas_quick_")))
        meta = write_dataset(work / "data", SyntheticSpec(seed=seed, **QUICK_SPEC))
        mixture = Mixture({"seg": (AnomalySource.from_meta(meta, "train", {"direct": 1.0}), 1.0)}, seed=seed)
        cfg = get_config(config)
        cfg.seed = seed
        model, tok, proc = build_trainable(cfg)
        opts = TrainOptions(steps=steps, batch_size=8, lr=1e-3, warmup=min(30, steps // 5 + 1), save_every=0,
                            seed=seed, max_seconds=max_seconds, workers=0, tensorboard=False)
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
