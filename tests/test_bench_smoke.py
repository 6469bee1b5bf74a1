"""`agvas bench` end to end on tiny with tiny iteration counts (random init + planted answer), and
the rules that keep the bench honest. No timing is asserted: only that every requested back-end
ran (a failed one fails the bench, by name), the record follows the schema, and the agreement
numbers are measured against an independent reference run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REF = "reference-eager-fp32"


def _bench(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "agvas.cli", "bench", "--config", "tiny", "--quick", "--cache", str(tmp_path / "cache"),
           "--results", str(tmp_path / "results"), "--json", str(out), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900), out


@pytest.mark.slow
def test_agvas_bench_tiny_smoke(tmp_path):
    r, out = _bench(tmp_path, "--images", "2", "--batch", "2", "--warmup", "0", "--iters", "1", "--no-genai",
                    "--no-autocast", "--quantized", "int8")
    assert r.returncode == 0, r.stderr[-3000:]
    rec = json.loads(out.read_text())
    from agvas.benchmarks.report import validate

    validate(rec)
    assert rec["setup"]["planted"]["ok"]  # the random tiny answers with the anchors
    # every requested back-end ran: nothing failed, nothing skipped, and each has its measured rows
    assert rec["setup"]["failed"] == {} and rec["setup"]["skipped"] == {}, (rec["setup"]["failed"], rec["setup"]["skipped"])
    requested = {
        "eager-fp32": ["loop-b1-anyres", "loop-b1-base"],
        "eager-bf16": ["loop-b1-anyres"],
        "runtime-fp32": ["fast-b1-anyres", "loop-b1-anyres", "fast-b2-anyres"],
        "runtime-llmint8-vis8": ["fast-b1-anyres", "loop-b1-anyres", "fast-b2-anyres", "fast-b1-base"],
    }
    expected = {f"{w}/{v}" for w, vs in requested.items() for v in vs}
    runs = {x["name"]: x for x in rec["runs"]}
    assert set(runs) == expected, sorted(set(runs) ^ expected)
    for name, row in runs.items():
        assert row["status"] == "ok" and not row.get("error"), (name, row.get("error"))
        assert row["samples"] >= 1 and row["e2e_ms"]["p50"] > 0 and row["stages"], name
        # agreement: always against the independent reference run, over every image the candidate saw
        ag = row["agreement"]
        assert ag["reference"] == f"{REF}/loop-b1-{row['vision_tokens']}", name
        assert ag["images"] == 2 and 0.0 <= row["mask_iou_vs_reference"]["min"] <= 1.0, name
        assert row["verdict_agreement"] is not None, name

    # the reference is its own process's outputs, never a candidate's file
    ref = rec["setup"]["reference"]
    assert ref["name"] == REF and ref["images"] == 2
    assert sorted(ref["outputs"]) == ["loop-b1-anyres", "loop-b1-base"]
    assert all(Path(p).name.startswith(f"{REF}__") for p in ref["outputs"].values())
    assert not any(n.startswith(REF) for n in runs)

    fp32 = runs["eager-fp32/loop-b1-anyres"]
    assert fp32["stages"]["prefill"]["count"] == 2 and fp32["prompt_tokens"] > 2 * 36 and fp32["peak_rss_mb"] > 0
    # a second eager fp32 process on the same weights and threads reproduces the reference exactly
    assert fp32["mask_iou_vs_reference"] == {"mean": 1.0, "min": 1.0} and fp32["verdict_agreement"] == 1.0
    assert fp32["agreement"]["text_agreement"] == 1.0
    assert runs["eager-fp32/loop-b1-base"]["prompt_tokens"] < fp32["prompt_tokens"]
    assert rec["machine"]["peak_gflops"]["int8"] > 0
    assert "| eager-fp32/loop-b1-anyres | fp32 | off | 1 | anyres |" in r.stdout
    assert "FAILED" not in r.stdout and "skipped" not in r.stdout
    assert (tmp_path / "results" / "tiny_stages.png").exists()

    fast, loop = runs["runtime-fp32/fast-b1-anyres"], runs["runtime-fp32/loop-b1-anyres"]
    assert fast["agreement"]["text_agreement"] == loop["agreement"]["text_agreement"]
    assert runs["runtime-fp32/fast-b2-anyres"]["batch"] == 2
    assert rec["speedup"]["llm_fast_path"] is not None
    q = runs["runtime-llmint8-vis8/fast-b1-anyres"]
    assert q["engine_precisions"]["llm"] == "int8"
    assert q["efficiency"]["prefill"]["peak_key"] == "int8"


@pytest.mark.slow
def test_agvas_bench_fails_and_names_a_backend_that_cannot_be_built(tmp_path):
    """A corrupt checkpoint: `agvas export` really fails, so runtime-fp32 (asked for by name) is a
    FAILED row with its error — never "skipped" — and the bench exits non-zero; eager fp32 and the
    independent reference (both load the same checkpoint in their own worker) fail and are named too."""
    ckpt = tmp_path / "corrupt"
    ckpt.mkdir()
    (ckpt / "checkpoint.json").write_text(json.dumps({"config": "tiny"}))
    (ckpt / "model.safetensors").write_bytes(b"not a safetensors file")
    r, out = _bench(tmp_path, "--checkpoint", str(ckpt), "--only", "runtime-fp32", "eager-fp32", "--quantized", "--no-genai",
                    "--images", "1", "--batch", "1", "--warmup", "0", "--iters", "1")
    assert r.returncode == 1, r.stderr[-3000:]
    rec = json.loads(out.read_text())
    runs = {x["name"]: x for x in rec["runs"]}
    rt = runs["runtime-fp32"]
    assert rt["status"] == "failed" and "export failed" in rt["error"] and "agvas export" in rt["error"], rt
    assert set(runs) == {"runtime-fp32", "eager-fp32", REF}, sorted(runs)  # nothing else was asked for
    assert runs["eager-fp32"]["status"] == "failed" and runs["eager-fp32"]["error"]
    assert runs[REF]["status"] == "failed" and "agreement reference failed" in runs[REF]["error"]
    assert runs["eager-fp32"].get("mask_iou_vs_reference") is None
    assert rec["setup"]["skipped"] == {}  # a failure is never recorded as a skip
    assert "| runtime-fp32 | fp32 | FAILED (export failed:" in r.stdout
    assert "- runtime-fp32: FAILED" in r.stdout
    assert "FAILED" in r.stderr and "runtime-fp32 (export failed" in r.stderr


def test_agreement_pairs_by_image_and_refuses_a_candidate_compared_with_itself(tmp_path):
    from agvas.benchmarks.backends import Output
    from agvas.benchmarks.run import agreement
    from agvas.benchmarks.worker import save_outputs

    full, diag = np.ones((4, 4), bool), np.eye(4, dtype=bool)
    outs = [Output(full, True, None, "a"), Output(diag, False, None, "b")]
    save_outputs(tmp_path / "ref.npz", outs, ["x.png", "y.png"])
    save_outputs(tmp_path / "cand.npz", outs[::-1], ["y.png", "x.png"])  # a batch order: paired by image, not position
    with pytest.raises(ValueError, match="itself"):
        agreement(tmp_path / "ref.npz", tmp_path / "ref.npz")
    with pytest.raises(ValueError, match="itself"):
        agreement(tmp_path / "ref.npz", tmp_path / "." / "ref.npz")
    ag = agreement(tmp_path / "ref.npz", tmp_path / "cand.npz")
    assert ag["images"] == 2 and ag["mask_iou"]["min"] == 1.0 and ag["verdict_agreement"] == 1.0
    save_outputs(tmp_path / "other.npz", outs[:1], ["z.png"])
    with pytest.raises(ValueError, match="no output for 1"):
        agreement(tmp_path / "ref.npz", tmp_path / "other.npz")
    with pytest.raises(ValueError, match="outputs for"):
        save_outputs(tmp_path / "bad.npz", outs, ["x.png"])


def test_unavailable_is_a_skip_only_when_not_requested_by_name():
    from agvas.benchmarks.run import BenchOptions, _fail, _unavailable

    def info():
        return {"skipped": {}, "failed": {}}

    i = info()
    _unavailable(BenchOptions("tiny"), i, "onnxruntime-genai", ["ortgenai-fp32", "ortgenai-int4"], "x not installed")
    assert i == {"skipped": {"onnxruntime-genai": "x not installed"}, "failed": {}}
    i = info()
    _unavailable(BenchOptions("tiny", only=("ortgenai-int4",)), i, "onnxruntime-genai", ["ortgenai-int4"], "x not installed")
    assert i["skipped"] == {} and "requested with --only" in i["failed"]["ortgenai-int4"]
    i = info()
    _fail(i, ["runtime-fp32"], "export failed: boom")
    assert i == {"skipped": {}, "failed": {"runtime-fp32": "export failed: boom"}}
