"""Latency statistics and process peaks: the numbers every bench row is made of."""

from __future__ import annotations

import resource
import sys
from typing import Iterable

import numpy as np


def percentile(values: Iterable[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation between order statistics
    (numpy's default ``method="linear"``, the same as ``statistics.quantiles(..., method="inclusive")``)."""
    arr = np.asarray(list(values), dtype=np.float64)
    if arr.size == 0:
        raise ValueError("percentile of an empty sample")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q must be within [0, 100], got {q}")
    return float(np.percentile(arr, q))


def summarize(samples_ms: Iterable[float]) -> dict[str, float | int]:
    """``{"count", "mean_ms", "p50_ms", "p90_ms", "p99_ms"}`` of a sample of milliseconds
    (the bench JSON's per-stage record)."""
    s = [float(x) for x in samples_ms]
    if not s:
        return {"count": 0, "mean_ms": None, "p50_ms": None, "p90_ms": None, "p99_ms": None}
    return {
        "count": len(s),
        "mean_ms": float(np.mean(s)),
        "p50_ms": percentile(s, 50),
        "p90_ms": percentile(s, 90),
        "p99_ms": percentile(s, 99),
    }


def e2e_summary(samples_ms: Iterable[float]) -> dict[str, float | None]:
    """End-to-end percentiles ``{"p50", "p90", "p99", "mean"}`` (ms)."""
    s = summarize(samples_ms)
    return {"p50": s["p50_ms"], "p90": s["p90_ms"], "p99": s["p99_ms"], "mean": s["mean_ms"]}


def peak_rss_mb() -> float:
    """This process's peak resident set size so far (MiB): the kernel's high-water mark ``VmHWM``
    of ``/proc/self/status``. (``getrusage``'s ``ru_maxrss`` is not used: Linux carries it across
    ``execve``, so a worker would inherit its parent's peak.) Run each back-end in its own process
    so peaks do not mix."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return ru / 1024.0 if sys.platform != "darwin" else ru / (1024.0 * 1024.0)


def current_rss_mb() -> float:
    """This process's current resident set size (MiB), from ``/proc/self/statm``."""
    import os

    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / (1024.0 * 1024.0)
