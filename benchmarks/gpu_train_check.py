"""The GPU check of the training road (issue: "Train the real AG-VAS"), one script for one device
call: measured figures next to the memory plan's.

1. ov-0.5b dimensions, random weights **saved in float16 in the Hugging Face layout** + a random
   SAM ViT-B in the official ``sam_vit_b`` layout → ``--dtype bf16`` training with gradient
   checkpointing on CUDA at 384² (losses finite, samples/s, peak memory vs the plan);
2. ov-7b dimensions (random, bf16 base built on the GPU) → a few steps at 384² and 1024²: peak
   memory vs the plan;
3. the PyTorch reference of the 0.5b model on CUDA in bf16: per-image latency.

``python -m agvas.benchmarks.gpu_train_check --out DIR`` writes ``DIR/gpu_train_check.json`` and prints
one line per figure. ``--smoke`` runs the same code with `tiny` dimensions on the CPU (a check of
the script itself, not a GPU figure).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import tempfile
import time
from pathlib import Path

import torch

from agvas.atomic import write_text_atomic


def _dataset(root: Path, size: int, n: int):
    from agvas.train.data.synthetic import SyntheticSpec, write_dataset

    spec = SyntheticSpec(seed=3, size=size, n_per_category=n, n_test_per_category=2, n_train_good=0,
                         train_categories=("stripes", "washer"), test_categories=("fabric",))
    return write_dataset(root / f"data{size}", spec)


def _save_real_layout(cfg, root: Path) -> tuple[Path, Path]:
    """Random weights of ``cfg`` in the real on-disk formats: a float16 LLaVA-OneVision
    directory and an official-layout SAM file."""
    from agvas.train.modeling import build_model, image_processor_for

    model, tok = build_model(cfg)
    llava, sam = root / "llava-fp16", root / "sam_vit_b_random.pth"
    model.llava.to(torch.float16).save_pretrained(llava)
    tok.save_pretrained(llava)
    image_processor_for(cfg).save_pretrained(llava)
    torch.save({f"image_encoder.{k}": v.half().clone() for k, v in model.pixel_encoder.state_dict().items()}, sam)
    del model
    gc.collect()
    return llava, sam


def _mixture(meta):
    from agvas.train.data.mixture import Mixture
    from agvas.train.data.sources import AnomalySource

    return Mixture({"seg": (AnomalySource.from_meta(meta, "train", {"direct": 1.0}), 1.0)}, seed=0)


def _train(model, tok, proc, meta, out: Path, steps: int, batch: int, device: str, dtype: str) -> dict:
    from agvas.train.train import TrainOptions, Trainer

    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    opts = TrainOptions(steps=steps, batch_size=batch, warmup=2, lr=1e-4, save_every=0, log_every=1, device=device,
                        dtype=dtype, grad_checkpointing=True, workers=2, tensorboard=False)
    trainer = Trainer(model, tok, proc, _mixture(meta), opts, out)
    losses = []
    t0 = None
    for i in range(steps):
        if i == 1:  # the first step pays for kernel selection and the workers' start
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        losses.append(trainer.train_step()["loss"])
    if device == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0 if t0 else float("nan")
    return {"steps": steps, "batch": batch, "losses_finite": all(math.isfinite(v) for v in losses),
            "loss_first": losses[0], "loss_last": losses[-1],
            "samples_per_s": (steps - 1) * batch / dt if steps > 1 else None,
            "peak_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if device == "cuda" else None,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2 ** 30 if device == "cuda" else None}


def _plan(cfg, batch: int, size: int) -> float:
    from agvas.train.train_plan import plan_training

    return round(plan_training(cfg, strategy="ddp", dtype="bf16", world_size=1, micro_batch=batch,
                               grad_checkpointing=True, image_size=size).total_gib, 2)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--smoke", action="store_true", help="tiny dimensions on the CPU (checks the script only)")
    p.add_argument("--steps-05b", type=int, default=30)
    p.add_argument("--steps-7b", type=int, default=5)
    args = p.parse_args(argv)
    from agvas.train.config import get_config
    from agvas.train.lora import apply_lora
    from agvas.train.modeling import build_model, image_processor_for
    from agvas.train.train import build_trainable

    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_train_check: no CUDA device (use --smoke to check the script on CPU)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="agvas_gpu_check_"))
    small, big = ("tiny-sam", "tiny-sam") if args.smoke else ("ov-0.5b", "ov-7b")
    sizes = (64, 128) if args.smoke else (384, 1024)
    dtype = "fp32" if args.smoke else "bf16"
    result: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke)",
                    "torch": torch.__version__}

    def report(key, value):
        result[key] = value
        print(f"{key}: {json.dumps(value)}", flush=True)
        write_text_atomic(out / "gpu_train_check.json", json.dumps(result, indent=2))

    # 1. 0.5b from a float16-saved directory, bf16 base, fp32 masters, checkpointing
    llava, sam = _save_real_layout(get_config(small), work)
    cfg = get_config(small if args.smoke else "ov-0.5b")
    model, tok, proc = build_trainable(cfg, llava, sam, dtype=dtype)
    meta = _dataset(work, sizes[0], 8)
    r = _train(model, tok, proc, meta, work / "run05", args.steps_05b, 2, device, dtype)
    r["plan_gib"] = _plan(model.cfg, 2, 384)
    report(f"{small}_train_{sizes[0]}", r)

    # 3. the reference of that model on the device, bf16: per-image latency
    from PIL import Image

    from agvas.train.reference import ReferencePipeline

    model.eval()
    pipe = ReferencePipeline(model, tok, proc)
    image = Image.open(next(Path(meta).parent.glob("stripes/test/*/*.png"))).convert("RGB")
    times = []
    ctx = torch.autocast(device, dtype=torch.bfloat16) if dtype == "bf16" else torch.autocast(device, enabled=False)
    with ctx:
        for _ in range(4):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            res = pipe(image, max_new_tokens=16)
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    report(f"{small}_reference_latency_s", {"runs": [round(t, 3) for t in times], "warm_median_s":
                                             round(sorted(times[1:])[len(times[1:]) // 2], 3),
                                             "n_visual": res.n_visual})
    del model, pipe, tok, proc
    gc.collect()

    # 2. 7b dims, random bf16 base built on the device, 384² and 1024²
    cfg7 = get_config(big)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16 if dtype == "bf16" else torch.float32)
    try:
        with torch.device(device):
            model7, tok7 = build_model(cfg7, device=device)
    finally:
        torch.set_default_dtype(prev)
    if cfg7.lora_rank is not None:
        apply_lora(model7)
    proc7 = image_processor_for(cfg7, cfg7.tokenizer_dir)
    for size in sizes:
        meta7 = _dataset(work, size, 4)
        r = _train(model7, tok7, proc7, meta7, work / f"run7_{size}", args.steps_7b, 1, device, dtype)
        r["plan_gib"] = _plan(model7.cfg, 1, 384 if size == sizes[0] else 1024)
        report(f"{big}_train_{size}", r)
    print(f"wrote {out / 'gpu_train_check.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
