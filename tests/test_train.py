"""Training: a few steps lower the loss, resume is bit-compatible, the quick tiny model is usable."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from agvas.train.config import tiny
from agvas.train.data.mixture import Mixture, collate
from agvas.train.data.sources import AnomalySource
from agvas.train.data.synthetic import SyntheticSpec, make_sample, write_dataset
from agvas.train.train import (CHECKPOINT, LOG, TrainOptions, Trainer, build_trainable, forward_loss, lr_factor,
                               resume_trainer)


@pytest.fixture(scope="module")
def small_meta(tmp_path_factory):
    spec = SyntheticSpec(seed=2, size=64, n_per_category=8, n_test_per_category=4, n_train_good=0,
                         train_categories=("stripes", "washer"), test_categories=("fabric",))
    return write_dataset(tmp_path_factory.mktemp("small") / "data", spec)


def _mixture(meta):
    return Mixture({"seg": (AnomalySource.from_meta(meta, "train", {"direct": 1.0}), 0.5),
                    "instruct": (AnomalySource.from_meta(meta, "train", {"describe": 0.5, "explain": 0.5}), 0.5)},
                   seed=1)


def _opts(**kw):
    base = dict(steps=4, batch_size=4, lr=1e-3, warmup=1, save_every=0, log_every=1, seed=1)
    base.update(kw)
    return TrainOptions(**base)


def test_lr_schedule():
    assert lr_factor(0, 100, 1000) == pytest.approx(0.01)
    assert lr_factor(99, 100, 1000) == pytest.approx(1.0)
    assert lr_factor(100, 100, 1000) == pytest.approx(1.0)
    assert lr_factor(550, 100, 1000) == pytest.approx(0.5)
    assert lr_factor(1000, 100, 1000) == 0.0


def test_schedule_fits_the_time_budget(small_meta, tmp_path):
    trainer = Trainer(*build_trainable(tiny()), _mixture(small_meta), _opts(steps=1000, warmup=10, max_seconds=100.0),
                      tmp_path)
    trainer.step = 20
    trainer.fit_to_budget(elapsed=50.0, rate=2.0)  # 50 s left at 2 steps/s -> 100 more steps
    assert trainer.total == 120
    trainer.fit_to_budget(elapsed=40.0, rate=10.0)  # faster now: grows back (60 s left at 10 steps/s)
    assert trainer.total == 620
    trainer.fit_to_budget(elapsed=0.0, rate=100.0)  # never beyond the planned steps
    assert trainer.total == 1000
    trainer.fit_to_budget(elapsed=200.0, rate=2.0)  # over budget: stop after this step
    assert trainer.total == 21
    unbounded = Trainer(*build_trainable(tiny()), _mixture(small_meta), _opts(steps=1000), tmp_path)
    unbounded.fit_to_budget(elapsed=1e6, rate=0.001)
    assert unbounded.total == 1000


def test_few_steps_lower_the_loss(small_meta, tmp_path):
    mix = _mixture(small_meta)
    model, tok, proc = build_trainable(tiny())
    fixed = collate([mix.example(k)[1] for k in range(1000, 1004)], model, tok, proc)
    with torch.no_grad():
        before = sum(float(forward_loss(model, b)[0]) for b in fixed)
    trainer = Trainer(model, tok, proc, mix, _opts(steps=8), tmp_path)
    summary = trainer.run(progress=False)
    with torch.no_grad():
        after = sum(float(forward_loss(model.eval(), b)[0]) for b in fixed)
    assert after < before * 0.9, (before, after)
    assert summary["step"] == 8 and summary["stopped"] == "finished"
    log = [json.loads(x) for x in (tmp_path / LOG).read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 9)) and {"text", "ano", "seg", "nor", "lr"} <= set(log[0])
    meta = json.loads((tmp_path / CHECKPOINT / "checkpoint.json").read_text())
    assert meta["training"]["finished"] and meta["training"]["step"] == 8


@pytest.mark.slow
def test_resume_continues_bit_compatibly(small_meta, tmp_path):
    mix = _mixture(small_meta)
    straight = Trainer(*build_trainable(tiny()), mix, _opts(), tmp_path / "a")
    straight.run(progress=False)

    first = Trainer(*build_trainable(tiny()), mix, _opts(), tmp_path / "b")
    for _ in range(2):
        first.train_step()
    first.save(finished=False)
    resumed = resume_trainer(tmp_path / "b", mix)
    assert resumed.step == 2
    resumed.run(progress=False)
    assert resumed.step == 4
    a = dict(straight.model.named_parameters())
    for name, p in resumed.model.named_parameters():
        assert torch.equal(p, a[name]), name


def test_train_cli_guards(small_meta, tmp_path, capsys):
    from agvas.cli import main

    assert main(["train", "--out", str(tmp_path), "--resume", "--data", str(small_meta)]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path), "--data", str(small_meta), "--mix", "seg=x"]) == 2
    assert "not NAME=PROBABILITY" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path), "--mix", "seg=1"]) == 2
    assert "no training data" in capsys.readouterr().err
    code = main(["train", "--out", str(tmp_path), "--data", str(small_meta), "--steps", "2", "--batch-size", "2",
                 "--warmup", "1", "--no-progress"])
    assert code == 0 and (tmp_path / CHECKPOINT / "train_state.pt").is_file()
    assert main(["train", "--out", str(tmp_path), "--data", str(small_meta)]) == 2
    assert "pass --resume" in capsys.readouterr().err


def test_trained_tiny_answers_with_anchors_and_decisive_maps(trained_tiny):
    """The shared fixture other parts use for parity: anchors in direct mode, decisive maps."""
    from PIL import Image

    from agvas.train.reference import ReferencePipeline

    pipe = ReferencePipeline(*trained_tiny)
    decisive, anomalous_hits, normal_empty = [], [], []
    for i, (cat, kind) in enumerate([("stripes", "stain"), ("tiles", "hole"), ("washer", "contamination"),
                                     ("marble", "perlin_intrusion"), ("stripes", None), ("tiles", None),
                                     ("washer", None), ("marble", None)]):
        s = make_sample(cat, kind, seed=11, index=500 + i)
        r = pipe(Image.fromarray(s.image))
        assert r.text == "Sure, it is [NOR][ANO][SEG]." and r.anchors_found
        decisive.append(float(((r.prob < 0.2) | (r.prob > 0.8)).mean()))
        (anomalous_hits if kind else normal_empty).append(bool(r.mask.any()) if kind else not r.mask.any())
    assert np.mean(decisive) > 0.97, decisive
    assert sum(anomalous_hits) >= 2, anomalous_hits
    assert sum(normal_empty) >= 3, normal_empty


def test_eval_while_training_keeps_the_best_and_logs_tensorboard(small_meta, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from agvas.cli import main

    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--data", str(small_meta), "--steps", "2", "--batch-size", "2",
                 "--warmup", "1", "--log-every", "1", "--workers", "0", "--eval-data", str(small_meta),
                 "--eval-every", "1", "--eval-limit", "2", "--eval-metric", "iou_nor", "--no-progress"]) == 0
    evals = [json.loads(x) for x in (out / "eval_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [1, 2] and all("pixel_ap" in e and "iou_nor" in e for e in evals)
    assert (out / "best" / "checkpoint.json").is_file()
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["best"] == {"metric": "iou_nor", "value": max(e["iou_nor"] for e in evals)}
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/text", "train/seg", "train/lr", "train/samples_per_s", "eval/pixel_ap"} <= tags


def test_a_launch_the_plan_says_will_not_fit_is_refused(small_meta, tmp_path, capsys):
    from agvas.cli import main

    args = ["train", "--config", "ov-7b", "--random-init", "--out", str(tmp_path / "r"), "--data", str(small_meta),
            "--gpu-memory", "24", "--dtype", "bf16"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "will not fit" in err and "24" in err and "--force" in err
    assert main(["train", "--config", "ov-7b", "--plan", "--dtype", "bf16", "--strategy", "zero2"]) == 0
    assert "zero2" in capsys.readouterr().out


def test_schedule_never_runs_past_the_planned_steps(small_meta, tmp_path):
    trainer = Trainer(*build_trainable(tiny()), _mixture(small_meta), _opts(steps=40, max_seconds=1e6), tmp_path)
    trainer.step = 40  # the last step done while the budget still had room
    trainer.fit_to_budget(elapsed=10.0, rate=5.0)
    assert trainer.total == 40


def test_resuming_a_run_with_no_step_left_reports_its_last_loss(small_meta, tmp_path):
    from agvas.cli import main

    args = ["train", "--out", str(tmp_path), "--data", str(small_meta), "--steps", "2", "--batch-size", "2",
            "--warmup", "1", "--log-every", "1", "--workers", "0", "--no-progress", "--no-tensorboard"]
    assert main(args) == 0
    assert main(["train", "--out", str(tmp_path), "--resume", "--no-progress"]) == 0
    summary = json.loads((tmp_path / "train_summary.json").read_text())
    assert summary["step"] == 2 and summary["loss_ema"] is not None
