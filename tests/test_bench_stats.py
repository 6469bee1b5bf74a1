"""agvas.benchmarks.stats: percentiles, summaries and the peak-RSS reading (no timings asserted)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from agvas.benchmarks.stats import e2e_summary, peak_rss_mb, percentile, summarize


def test_percentiles_interpolate_linearly_between_order_statistics():
    xs = [5.0, 1.0, 4.0, 2.0, 3.0]  # sorted 1..5: rank (n-1)·q
    assert percentile(xs, 0) == 1.0
    assert percentile(xs, 50) == 3.0
    assert percentile(xs, 90) == pytest.approx(4.6)  # 4 + 0.6·(5-4)
    assert percentile(xs, 99) == pytest.approx(4.96)
    assert percentile(xs, 100) == 5.0
    assert percentile([7.0], 99) == 7.0


def test_percentile_rejects_empty_and_out_of_range():
    with pytest.raises(ValueError, match="empty"):
        percentile([], 50)
    with pytest.raises(ValueError, match=r"\[0, 100\]"):
        percentile([1.0], 101)


def test_summarize_has_the_bench_stage_keys():
    s = summarize([10.0, 20.0, 30.0, 40.0])
    assert set(s) == {"count", "mean_ms", "p50_ms", "p90_ms", "p99_ms"}
    assert s["count"] == 4 and s["mean_ms"] == 25.0 and s["p50_ms"] == 25.0
    assert s["p90_ms"] == pytest.approx(37.0) and s["p99_ms"] == pytest.approx(39.7)
    assert summarize([])["count"] == 0
    e = e2e_summary([1.0, 2.0, 3.0])
    assert (e["p50"], e["mean"]) == (2.0, 2.0)


def test_peak_rss_is_the_process_high_water_mark():
    code = (
        "import numpy as np\n"
        "from agvas.benchmarks.stats import peak_rss_mb\n"
        "before = peak_rss_mb()\n"
        "a = np.ones(300 * 2**20 // 8)\n"  # 300 MiB, touched
        "del a\n"
        "print(before, peak_rss_mb())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    before, after = map(float, out)
    assert after - before >= 290  # the peak stays after the array is freed
    # a fresh process does not inherit this (bigger) process's peak across exec
    assert before < peak_rss_mb() or before < 200
