"""The bench JSON schema (issue 7 "Outputs"), the markdown table and the charts."""

from __future__ import annotations

import json

import pytest

from agvas.benchmarks.report import markdown, validate, write_all


def _record():
    stage = {"p50_ms": 10.0, "p90_ms": 12.0, "p99_ms": 13.0, "mean_ms": 10.5, "count": 4}
    run = {"name": "runtime-fp32/fast-b1-anyres", "config": "tiny", "backend": "runtime-ort", "precision": "fp32",
           "fast_path": True, "batch": 1, "vision_tokens": "anyres", "stages": {"prefill": stage, "vision": stage},
           "e2e_ms": {"p50": 20.0, "p90": 24.0, "p99": 26.0, "mean": 21.0}, "images_per_s": 50.0, "peak_rss_mb": 300.0,
           "mask_iou_vs_reference": {"mean": 0.99, "min": 0.97}, "verdict_agreement": 1.0, "prompt_tokens": 211,
           "decode_ms_per_token": None, "ttft_ms": {"p50": 15.0, "p90": 16.0, "p99": 16.5, "mean": 15.2}}
    return {
        "machine": {"cpu": "x", "threads": 2, "flags": [], "peak_gflops": {"fp32": 300.0, "bf16": 2000.0, "int8": 2700.0},
                    "int8_kernel": "DynamicQuantizeMatMul", "memory_bandwidth_gbs": 32.0},
        "config": "tiny", "setup": {"weights": "w", "images": {"count": 4, "size": [128, 128]}, "warmup": 1, "iters": 1,
                                    "skipped": {"onnxruntime-genai": "peer skipped: absent"}},
        "runs": [run, {"name": "ortgenai-fp32", "config": "tiny", "backend": "onnxruntime-genai", "precision": "fp32",
                       "error": "failed"}],
        "speedup": {"e2e_vs_eager_fp32": 5.2, "e2e_vs_eager_bf16": 1.6, "llm_fast_path": 1.4, "batch_throughput": 1.3,
                    "llm_vs_ortgenai": {"fp32": {"prompt_tokens": 211, "peer_ttft_ms": 30.0, "peer_decode_ms_per_token": 2.0,
                                                 "ttft": 2.0, "decode": 1.1}}},
        "rss_fraction_vs_eager_fp32": 0.3, "best": "runtime-fp32/fast-b1-anyres",
    }


def test_schema_accepts_the_issue_layout_and_names_what_is_missing():
    rec = _record()
    validate(rec)
    bad = _record()
    del bad["runs"][0]["stages"]["prefill"]["p99_ms"]
    with pytest.raises(ValueError, match="stage 'prefill' lacks"):
        validate(bad)
    bad = _record()
    del bad["speedup"]["llm_fast_path"]
    with pytest.raises(ValueError, match="llm_fast_path"):
        validate(bad)
    bad = _record()
    del bad["rss_fraction_vs_eager_fp32"]
    with pytest.raises(ValueError, match="rss_fraction_vs_eager_fp32"):
        validate(bad)


def test_markdown_and_charts(tmp_path):
    rec = _record()
    md = markdown(rec)
    assert "| runtime-fp32/fast-b1-anyres | fp32 | on | 1 | anyres | 211 |" in md
    # a failure and a skip read differently: FAILED (error) in the row and the list, skipped (reason) in the list
    assert "| ortgenai-fp32 | fp32 | FAILED (failed) |" in md and "- ortgenai-fp32: FAILED" in md
    assert "- onnxruntime-genai: skipped (peer skipped: absent)" in md and "FAILED (peer" not in md
    assert "| e2e_vs_eager_fp32 | 5.20 | ≥ 5 |" in md
    out = write_all(rec, tmp_path / "b.json", tmp_path / "results")
    assert json.loads((tmp_path / "b.json").read_text())["runs"][0]["stages"]["prefill"]["count"] == 4
    for p in out["charts"]:
        assert open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "results" / "tiny.md").read_text().startswith("**tiny**")
