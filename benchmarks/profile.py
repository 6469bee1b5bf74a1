"""ONNX Runtime's profiler over one ``Inspector`` run: where each engine's time goes, by op type.

    python -m agvas.benchmarks.profile EXPORT_DIR --image IMG [--image IMG2] [--engine-file llm=llm_int8.onnx]

Every session is created with ``enable_profiling`` (``Inspector(profile_dir=...)``); the first
image warms up, the traces of the later ones are summed: per engine, the kernel time per op type
(``Node`` events, ``*_kernel_time``), its share, and the slowest nodes. The traces stay in
``--out`` for chrome://tracing / Perfetto.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any


def summarize_trace(path: str | Path, skip_runs: int = 1, top: int = 8) -> dict[str, Any]:
    """Kernel time by op type and the slowest nodes of one ORT profile trace, skipping the first
    ``skip_runs`` ``model_run`` events (warm-up)."""
    events = json.loads(Path(path).read_text())
    runs = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    start = runs[skip_runs] if len(runs) > skip_runs else (runs[0] if runs else 0)
    by_op: dict[str, float] = defaultdict(float)
    by_node: dict[str, float] = defaultdict(float)
    kept_runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run" and e["ts"] >= start]
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time") or e["ts"] < start:
            continue
        op = e.get("args", {}).get("op_name", "?")
        by_op[op] += e["dur"] / 1000.0
        by_node[f"{e['name'][:-len('_kernel_time')]} ({op})"] += e["dur"] / 1000.0
    total = sum(by_op.values())
    return {
        "runs": len(kept_runs), "run_ms": sum(e["dur"] for e in kept_runs) / 1000.0, "kernel_ms": total,
        "by_op_ms": dict(sorted(by_op.items(), key=lambda kv: -kv[1])),
        "top_nodes_ms": dict(sorted(by_node.items(), key=lambda kv: -kv[1])[:top]),
    }


def profile(export_dir: str | Path, images: list[str], out: str | Path, engine_files: dict | None = None,
            threads: int | None = None, vision_tokens: str | None = None, fast_path: bool = True) -> dict[str, Any]:
    from agvas.runtime import Inspector

    insp = Inspector(export_dir, engine_files=engine_files, threads=threads, vision_tokens=vision_tokens,
                     profile_dir=out, fast_path=fast_path)
    stages, warmup_runs = [], {}
    skip = 1 if len(images) > 1 else 0
    for i, img in enumerate(images):
        r = insp.inspect(img)
        stages.append({k: round(v, 1) for k, v in r.timings_ms.items()})
        if i + 1 == skip:  # the runs each session made for the warm-up image (decode steps vary per image)
            warmup_runs = {n: e.runs for n, e in insp.engines.sessions().items()}
    traces = insp.engines.end_profiling()
    return {"export": str(export_dir), "images": len(images), "warmup_images": skip, "stages_ms": stages,
            "engines": {n: {"trace": t, "warmup_runs": warmup_runs.get(n, 0),
                            **summarize_trace(t, skip_runs=warmup_runs.get(n, 0))}
                        for n, t in traces.items()}}


def markdown(p: dict[str, Any], ops: int = 6) -> str:
    lines = [f"ONNX Runtime profile of `{p['export']}` ({p['images']} image(s), {p['warmup_images']} warm-up)", "",
             "| engine | runs | run ms | kernel ms | top op types (ms, share) |", "|---|---|---|---|---|"]
    for name, e in p["engines"].items():
        k = e["kernel_ms"] or 1.0
        top = ", ".join(f"{op} {ms:,.0f} ({ms / k:.0%})" for op, ms in list(e["by_op_ms"].items())[:ops])
        lines.append(f"| {name} | {e['runs']} | {e['run_ms']:,.0f} | {e['kernel_ms']:,.0f} | {top} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m agvas.benchmarks.profile", description=__doc__.split("\n\n")[0])
    ap.add_argument("export", type=Path)
    ap.add_argument("--image", action="append", required=True, help="image to inspect (repeatable; the first warms up)")
    ap.add_argument("--engine-file", action="append", default=[], metavar="ENGINE=FILE")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--vision-tokens")
    ap.add_argument("--no-fast-path", action="store_true",
                    help="decode step by step instead of the forced-answer fast path (one llm run per image)")
    ap.add_argument("--out", type=Path, help="folder for the traces (default: a temporary folder)")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    out = a.out or Path(tempfile.mkdtemp(prefix="agvas_profile_"))
    p = profile(a.export, a.image, out, dict(x.split("=", 1) for x in a.engine_file) or None, a.threads,
                a.vision_tokens, fast_path=not a.no_fast_path)
    print(markdown(p))
    for name, e in p["engines"].items():
        print(f"\n{name}: " + "; ".join(f"{n} {ms:,.0f}" for n, ms in e["top_nodes_ms"].items()))
    if a.json:
        from agvas.atomic import write_text_atomic

        write_text_atomic(a.json, json.dumps(p, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
