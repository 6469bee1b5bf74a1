"""The real training road: a float16-saved LLaVA-OneVision directory + an official-layout SAM
file, the base in bf16 with fp32 master weights, torchrun with 2 gloo processes equal to one
process with twice the batch, and a kill -9 mid-run resumed to the same parameters."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from agvas.cli import main
from agvas.train.data.synthetic import SyntheticSpec, write_dataset
from agvas.train.train import CHECKPOINT, LOG, MicroBatches, TrainOptions

AGVAS = str(Path(sys.executable).with_name("agvas"))
COMMON = ["--warmup", "1", "--lr", "1e-3", "--workers", "1", "--no-progress", "--no-tensorboard", "--threads", "1"]


@pytest.fixture(scope="module")
def meta(tmp_path_factory):
    spec = SyntheticSpec(seed=2, size=64, n_per_category=8, n_test_per_category=4, n_train_good=0,
                         train_categories=("stripes", "washer"), test_categories=("fabric",))
    return write_dataset(tmp_path_factory.mktemp("dist") / "data", spec)


@pytest.fixture(scope="module")
def real_layout(tmp_path_factory):
    """Tiny-dimension weights in the real on-disk formats: a LLaVA-OneVision directory saved in
    float16 (as llava-hf publishes them) and a SAM file in the official sam_vit_*.pth layout."""
    from agvas.train.config import tiny_sam
    from agvas.train.modeling import build_model, image_processor_for

    out = tmp_path_factory.mktemp("real")
    cfg = tiny_sam()
    model, tok = build_model(cfg)
    llava = out / "llava-onevision-fp16"
    model.llava.to(torch.float16).save_pretrained(llava)
    tok.save_pretrained(llava)
    image_processor_for(cfg).save_pretrained(llava)
    sam = out / "sam_vit_tiny.pth"
    state = {f"image_encoder.{k}": v.clone() for k, v in model.pixel_encoder.state_dict().items()}
    state["mask_decoder.iou_token.weight"] = torch.randn(1, 256)
    torch.save(state, sam)
    return llava, sam


def _params(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / CHECKPOINT / "model.safetensors"))


def _summary(run: Path) -> dict:
    return json.loads((run / "train_summary.json").read_text())


def test_samples_are_sharded_by_rank_like_one_big_batch(meta):
    """Micro-batch n of rank r = samples (n·W + r)·b …: the union over ranks is the batch of
    one process with W·b, whatever the micro-batch."""
    one = MicroBatches(None, _Spec(), None, None, batch_size=4, world=1, rank=0)
    ranks = [MicroBatches(None, _Spec(), None, None, batch_size=2, world=2, rank=r) for r in (0, 1)]
    for n in range(5):
        assert list(one.sample_ids(n)) == [k for r in ranks for k in r.sample_ids(n)]


class _Spec:
    cfg = ids = None


def test_old_saved_options_still_resume():
    o = TrainOptions.from_dict({"steps": 5, "autocast": "bf16", "removed_option": 1})
    assert o.steps == 5 and o.dtype == "bf16"


def test_two_gloo_processes_equal_one_process_with_twice_the_batch(meta, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    base = ["train", "--data", str(meta), "--steps", "3", "--log-every", "1", *COMMON]
    assert main([*base, "--out", str(one), "--batch-size", "4"]) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--no-python",
                          AGVAS, *base, "--out", str(two), "--batch-size", "2"],
                         capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    s1, s2 = _summary(one), _summary(two)
    assert (s2["world_size"], s2["strategy"], s2["global_batch"], s2["per_device_batch"]) == (2, "ddp", 4, 2)
    assert (s1["world_size"], s1["strategy"], s1["global_batch"]) == (1, "single", 4)
    assert s2["dtype"] == s1["dtype"] == "fp32"
    # rank 0 alone logs: one line per step
    assert [json.loads(x)["step"] for x in (two / LOG).read_text().splitlines()] == [1, 2, 3]
    assert run.stdout.count("trained to step") == 1
    a, b = _params(one), _params(two)
    init = _params_at_init()
    assert a.keys() == b.keys()
    moved = max(float((a[k] - init[k]).abs().max()) for k in a)
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert moved > 1e-3  # three AdamW steps at lr 1e-3 moved the weights
    assert diff < 1e-4, diff  # the same trajectory up to float summation order (gloo all-reduce)
    for k in ("loss", "text", "seg"):
        assert s2["last"][k] == pytest.approx(s1["last"][k], rel=1e-4)


def _params_at_init() -> dict[str, torch.Tensor]:
    from agvas.train.config import tiny
    from agvas.train.train import build_trainable

    model = build_trainable(tiny())[0]
    return {k: v.detach() for k, v in model.state_dict().items()}


def test_fp16_saved_llava_trains_in_bf16_with_fp32_masters(meta, real_layout, tmp_path):
    from agvas.train.checkpoint import read_meta
    from agvas.train.config import get_config
    from agvas.train.data.mixture import Mixture
    from agvas.train.data.sources import AnomalySource
    from agvas.train.train import Trainer, build_trainable

    llava, sam = real_layout
    assert json.loads((llava / "config.json").read_text())["dtype"] == "float16"
    model, tok, proc = build_trainable(get_config("ov-0.5b"), llava, sam, dtype="bf16")
    mix = Mixture({"seg": (AnomalySource.from_meta(meta, "train", {"direct": 1.0}), 1.0)}, seed=0)
    trainer = Trainer(model, tok, proc, mix, TrainOptions(steps=2, batch_size=2, warmup=1, workers=0,
                                                          dtype="bf16", tensorboard=False), tmp_path / "unit")
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(p.dtype == torch.float32 for p in trainable.values())
    assert any("lora_" in n for n in trainable) and "spam.pixel_proj.weight" in trainable
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    assert model.pixel_encoder.patch_embed.proj.weight.dtype == torch.bfloat16  # SAM frozen, base dtype
    for _ in range(2):
        parts = trainer.train_step()
        assert all(math.isfinite(v) for v in parts.values()), parts
    assert all(torch.isfinite(p).all() for p in trainable.values())
    state = trainer.optimizer.state_dict()["state"]
    assert state and all(s["exp_avg"].dtype == torch.float32 for s in state.values())

    # the CLI road a user takes: real configs need both files
    out = tmp_path / "run"
    assert main(["train", "--config", "ov-0.5b", "--out", str(out), "--llava", str(llava), "--data", str(meta)]) == 2
    assert main(["train", "--config", "ov-0.5b", "--out", str(out), "--llava", str(llava), "--sam", str(sam),
                 "--data", str(meta), "--steps", "2", "--batch-size", "2", "--dtype", "bf16", *COMMON]) == 0
    s = _summary(out)
    assert s["dtype"] == "bf16" and s["trainable_dtype"] == "fp32" and math.isfinite(s["loss_ema"])
    meta_ck = read_meta(out / CHECKPOINT)
    assert meta_ck["saved"] == "trainable" and meta_ck["lora"] and meta_ck["base"]["llava"] == str(llava.resolve())
    saved = _params(out)
    assert saved and all(v.dtype == torch.float32 for v in saved.values())
    assert not any(k.startswith("pixel_encoder.") for k in saved)  # the frozen base is not copied


def test_real_configs_refuse_to_start_without_their_weights(meta, tmp_path, capsys):
    assert main(["train", "--config", "ov-7b", "--out", str(tmp_path / "r"), "--data", str(meta)]) == 2
    err = capsys.readouterr().err
    assert "--llava DIR and --sam FILE" in err and "ov-7b" in err
    assert main(["train", "--config", "tiny", "--out", str(tmp_path / "f"), "--data", str(meta),
                 "--dtype", "fp16", "--device", "cpu"]) == 2
    assert "fp16 needs CUDA" in capsys.readouterr().err


@pytest.mark.slow
def test_fp16_saved_llava_checkpoint_exports_and_inspects(meta, real_layout, tmp_path):
    llava, sam = real_layout
    out, export, report = tmp_path / "run", tmp_path / "export", tmp_path / "inspect"
    assert main(["train", "--config", "ov-0.5b", "--out", str(out), "--llava", str(llava), "--sam", str(sam),
                 "--data", str(meta), "--steps", "2", "--batch-size", "2", "--dtype", "bf16", *COMMON]) == 0
    assert main(["export", "--checkpoint", str(out / CHECKPOINT), "--out", str(export)]) == 0
    manifest = json.loads((export / "manifest.json").read_text())
    assert manifest["config"]["name"] == "ov-0.5b"
    images = Path(meta).parent / "fabric" / "test"
    assert main(["inspect", str(images), "--engines", str(export), "--out", str(report)]) == 0
    rows = [json.loads(x) for x in (report / "results.jsonl").read_text().splitlines()]
    assert rows and all(r["status"] == "ok" for r in rows)


@pytest.mark.slow
def test_kill_9_mid_run_then_resume_equals_an_uninterrupted_run(meta, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    args = ["train", "--data", str(meta), "--steps", "40", "--save-every", "5", "--batch-size", "2", *COMMON]
    assert main([*args, "--out", str(straight)]) == 0
    proc = subprocess.Popen([AGVAS, *args, "--out", str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    meta_file = killed / CHECKPOINT / "checkpoint.json"
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            if meta_file.is_file() and json.loads(meta_file.read_text())["training"]["step"] >= 5:
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    at = json.loads(meta_file.read_text())["training"]
    assert not at["finished"] and at["step"] < 40
    # --resume alone: batch, dtype, device, strategy and the data come from the run itself
    assert main(["train", "--out", str(killed), "--resume", "--no-progress", "--threads", "1"]) == 0
    a, b = _params(straight), _params(killed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
def test_the_prepared_gpu_check_runs_in_smoke_mode(tmp_path):
    """benchmarks/gpu_train_check.py is what a lent GPU runs; --smoke runs its code on tiny dims."""
    from agvas.benchmarks.gpu_train_check import main as check

    assert check(["--smoke", "--out", str(tmp_path), "--steps-05b", "2", "--steps-7b", "2"]) == 0
    got = json.loads((tmp_path / "gpu_train_check.json").read_text())
    assert got["tiny-sam_train_64"]["losses_finite"] and got["tiny-sam_train_128"]["losses_finite"]
    assert got["tiny-sam_reference_latency_s"]["n_visual"] > 0
