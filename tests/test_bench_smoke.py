"""A smoke run of `agvas bench` on tiny with tiny iteration counts (random init + planted answer).
No timing is asserted: only that every back-end ran, the record follows the schema, and the
agreement numbers mean what they say."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_agvas_bench_tiny_smoke(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "agvas.cli", "bench", "--config", "tiny", "--quick", "--images", "2", "--batch", "2",
           "--warmup", "0", "--iters", "1", "--no-genai", "--no-autocast", "--quantized", "int8", "--cache", str(tmp_path / "cache"),
           "--results", str(tmp_path / "results"), "--json", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    rec = json.loads(out.read_text())
    from benchmarks.report import validate

    validate(rec)
    assert rec["setup"]["planted"]["ok"]  # the random tiny answers with the anchors
    runs = {x["name"]: x for x in rec["runs"]}
    ref = runs["eager-fp32/loop-b1-anyres"]
    assert ref["stages"]["prefill"]["count"] == 2 and ref["e2e_ms"]["p50"] > 0
    assert ref["mask_iou_vs_reference"] == {"mean": 1.0, "min": 1.0} and ref["verdict_agreement"] == 1.0
    assert ref["agreement"]["text_agreement"] == 1.0 and ref["prompt_tokens"] > 2 * 36
    assert ref["peak_rss_mb"] > 0
    bf16 = runs["eager-bf16/loop-b1-anyres"]
    assert 0.0 <= bf16["mask_iou_vs_reference"]["min"] <= 1.0
    assert runs["eager-fp32/loop-b1-base"]["prompt_tokens"] < ref["prompt_tokens"]
    assert rec["machine"]["peak_gflops"]["int8"] > 0
    assert "| eager-fp32/loop-b1-anyres | fp32 | off | 1 | anyres |" in r.stdout
    assert (tmp_path / "results" / "tiny_stages.png").exists()
    if "runtime" not in rec["setup"]["skipped"]:
        fast, loop = runs["runtime-fp32/fast-b1-anyres"], runs["runtime-fp32/loop-b1-anyres"]
        assert fast["agreement"]["text_agreement"] == loop["agreement"]["text_agreement"]
        assert runs["runtime-fp32/fast-b2-anyres"]["batch"] == 2
        assert rec["speedup"]["llm_fast_path"] is not None
        if "runtime-llmint8" not in rec["setup"]["skipped"]:
            q = runs["runtime-llmint8-vis8/fast-b1-anyres"]
            assert q["engine_precisions"]["llm"] == "int8" and q["mask_iou_vs_reference"] is not None
            assert q["efficiency"]["prefill"]["peak_key"] == "int8"
