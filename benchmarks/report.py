"""The bench record as JSON, a markdown table and PNG charts (matplotlib) in ``benchmarks/results/``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .backends import STAGES

# The issue's goals (benchmark goals, never test assertions): key -> (target, "≥" | "≤").
TARGETS = {
    "e2e_vs_eager_fp32": (5.0, "≥"), "e2e_vs_eager_bf16": (2.0, "≥"), "llm_fast_path": (1.3, "≥"),
    "batch_throughput": (1.3, "≥"), "prefill_fraction_of_peak": (0.60, "≥"), "rss_fraction_vs_eager_fp32": (0.35, "≤"),
}
# fraction of the measured peak per stage (issue 14) and the LLM stage against onnxruntime-genai
STAGE_TARGETS = {"prefill": 0.60, "vision": 0.50, "sam_encoder": 0.50}
GENAI_TARGET = 1.25
REQUIRED_RUN_KEYS = ("name", "config", "backend", "precision", "fast_path", "batch", "vision_tokens", "stages",
                     "e2e_ms", "images_per_s", "peak_rss_mb", "mask_iou_vs_reference", "verdict_agreement")
REQUIRED_STAGE_KEYS = ("p50_ms", "p90_ms", "p99_ms", "mean_ms", "count")


def validate(record: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming the first field that does not follow the bench JSON schema."""
    for k in ("machine", "runs", "speedup", "rss_fraction_vs_eager_fp32"):
        if k not in record:
            raise ValueError(f"bench record lacks {k!r}")
    if "peak_gflops" not in record["machine"]:
        raise ValueError("bench record machine lacks 'peak_gflops'")
    for r in record["runs"]:
        if r.get("error"):
            continue
        missing = [k for k in REQUIRED_RUN_KEYS if k not in r]
        if missing:
            raise ValueError(f"run {r.get('name')!r} lacks {missing}")
        for st, s in r["stages"].items():
            miss = [k for k in REQUIRED_STAGE_KEYS if k not in s]
            if miss:
                raise ValueError(f"run {r['name']!r} stage {st!r} lacks {miss}")
        if r["e2e_ms"] is not None and not all(k in r["e2e_ms"] for k in ("p50", "p90", "p99")):
            raise ValueError(f"run {r['name']!r} e2e_ms lacks p50/p90/p99")
    for k in ("e2e_vs_eager_fp32", "e2e_vs_eager_bf16", "llm_fast_path", "batch_throughput", "llm_vs_ortgenai"):
        if k not in record["speedup"]:
            raise ValueError(f"bench record speedup lacks {k!r}")


def _f(x: Any, fmt: str = "{:,.1f}") -> str:
    return "—" if x is None else fmt.format(x)


def _stage(r: dict, st: str) -> str:
    s = r.get("stages", {}).get(st)
    return "—" if not s else f"{s['p50_ms']:,.1f}"


def _load_note(record: dict[str, Any]) -> str:
    start, end = record["machine"].get("loadavg_1min"), record["setup"].get("loadavg_1min_end")
    cpus = record["machine"].get("logical_cpus") or 1
    if start is None:
        return ""
    busy = max(start, end or 0) > cpus
    return (f" Load average {start:.1f} at start, {end:.1f} at end on {cpus} CPUs"
            + (": **contended — absolute times are inflated; only ratios inside a group mean much**." if busy else "."))


def _acc(a: dict | None) -> str:
    if not a or a.get("error"):
        return "—"
    return " / ".join(_f(a.get(k), "{:.3f}") for k in ("iou_ano", "iou_nor", "pixel_ap", "pixel_auroc"))


def markdown(record: dict[str, Any]) -> str:
    m = record["machine"]
    pk = m["peak_gflops"]
    lines = [
        f"**{record['config']}** — {m.get('cpu')} ({m.get('threads')} threads; {', '.join(m.get('flags', []))}); "
        f"measured peaks fp32 {pk['fp32']:,.0f} / bf16 {pk['bf16']:,.0f} GFLOP/s, int8 {pk['int8']:,.0f} GOP/s "
        f"({m.get('int8_kernel')}), memory {m['memory_bandwidth_gbs']:,.0f} GB/s. "
        f"Weights: {record['setup'].get('weights')}. Images: {record['setup']['images']['count']} × "
        f"{record['setup']['images']['size'][0]}², {record['setup']['warmup']} warm-up + {record['setup']['iters']} "
        f"rounds, {'one back-end at a time' if record['setup'].get('sequential') else 'interleaved per group'}. "
        "Stage columns are p50 ms." + _load_note(record), "",
        "| run | prec | fast | batch | tokens | prompt | pre | vision | SAM | SPAM | prefill | decode | ms/tok | AGMD | post "
        "| TTFT | e2e p50 | e2e p90 | img/s | RSS MB | IoU mean/min | verdict | IoU_ano / IoU_nor / AP / AUROC |",
        "|---|---|---|---|---|---|" + "---|" * 17,
    ]
    for r in record["runs"]:
        if r.get("error") and not r.get("stages"):
            lines.append(f"| {r['name']} | {r.get('precision', '')} | FAILED ({r['error']}) |" + " |" * 20)
            continue
        iou = r.get("mask_iou_vs_reference")
        iou_s = "—" if not iou else f"{iou['mean']:.3f}/{iou['min']:.3f}"
        lines.append(
            f"| {r['name']} | {r['precision']} | {'on' if r['fast_path'] else 'off'} | {r['batch']} | {r['vision_tokens']} | "
            f"{_f(r.get('prompt_tokens'), '{:,}')} | " + " | ".join(_stage(r, s) for s in STAGES[:6]) + " | "
            f"{_f((r.get('decode_ms_per_token') or {}).get('p50'))} | {_stage(r, 'agmd')} | {_stage(r, 'postprocess')} | "
            f"{_f((r.get('ttft_ms') or {}).get('p50'))} | {_f((r.get('e2e_ms') or {}).get('p50'))} | "
            f"{_f((r.get('e2e_ms') or {}).get('p90'))} | {_f(r.get('images_per_s'), '{:.3f}')} | "
            f"{_f(r.get('peak_rss_mb'), '{:,.0f}')} | {iou_s} | {_f(r.get('verdict_agreement'), '{:.2f}')} | "
            f"{_acc(r.get('accuracy'))} |"
            + (f" FAILED ({r['error']})" if r.get("error") else ""))
    sp = record["speedup"]
    ref = record["setup"].get("reference")
    if ref:
        lines += ["", f"IoU / verdict are against `{ref['name']}`: an independent {ref['precision']} eager run "
                  f"(its own process, {ref['images']} images), never a candidate's own outputs."]
    lines += ["", f"Best accuracy-gated back-end: `{record.get('best') or 'none (no runtime back-end ran)'}`.", "",
              "| ratio | value | goal |", "|---|---|---|"]
    for k, v in sp.items():
        if k == "llm_vs_ortgenai":
            continue
        goal = TARGETS.get(k)
        lines.append(f"| {k} | {_f(v, '{:.2f}')} | {'' if not goal else f'{goal[1]} {goal[0]:g}'} |")
    rss = record.get("rss_fraction_vs_eager_fp32")
    lines.append(f"| rss_fraction_vs_eager_fp32 | {_f(rss, '{:.2f}')} | ≤ 0.35 |")
    for prec, v in (sp.get("llm_vs_ortgenai") or {}).items():
        lines.append(f"| llm_vs_ortgenai {prec} (TTFT / ms per token; peer {_f(v['peer_ttft_ms'])} ms / "
                     f"{_f(v['peer_decode_ms_per_token'])} ms at {v['prompt_tokens']} tokens) | "
                     f"{_f(v['ttft'], '{:.2f}')} / {_f(v['decode'], '{:.2f}')} | ≥ {GENAI_TARGET:g} |")
    best = next((r for r in record["runs"] if r["name"] == record.get("best")), None)
    eff = (best or {}).get("efficiency") or {}
    if eff:
        lines += ["", f"Stage efficiency of `{best['name']}` (FLOPs counted by `benchmarks/flops.py`, causal attention "
                  "at its minimum; the peak is the machine's measured peak of the stage's precision):", "",
                  "| stage | GFLOP | achieved GFLOP/s | peak | fraction of peak | goal |", "|---|---|---|---|---|---|"]
        for st, e in eff.items():
            if "fraction_of_peak" in e:
                lines.append(f"| {st} | {e['gflop']:,.3g} | {e['achieved_gflops']:,.0f} | {e['peak_key']} "
                             f"{record['machine']['peak_gflops'][e['peak_key']]:,.0f} | {e['fraction_of_peak']:.2f} | "
                             f"{'≥ %.2f' % STAGE_TARGETS[st] if st in STAGE_TARGETS else ''} |")
            elif "fraction_of_bandwidth" in e:
                lines.append(f"| {st} (weights streamed per token) | {e['weight_gb']:.2f} GB | {e['achieved_gbs']:,.1f} GB/s | "
                             f"memory {record['machine']['memory_bandwidth_gbs']:,.0f} GB/s | {e['fraction_of_bandwidth']:.2f} | |")
    mc = record.get("memory_composition")
    if mc and "error" not in mc:
        from .memory import markdown as memory_markdown

        lines += ["", memory_markdown(mc)]
    elif mc:
        lines += ["", f"Memory composition: FAILED ({mc['error']})"]
    failed = [r["name"] for r in record["runs"] if r.get("error")]
    skipped = record["setup"].get("skipped") or {}
    if failed or skipped:  # FAILED: it was meant to run and did not (exit 1); skipped: unavailable here, not requested
        lines += [""] + [f"- {n}: FAILED (see its row)" for n in failed] + [f"- {k}: skipped ({v})" for k, v in skipped.items()]
    dm = record.get("device_model")
    if dm:
        from .devices import markdown as device_markdown

        lines += ["", "### Edge / data-centre GPUs — " + dm["label"], "", device_markdown(dm["rows"]), "",
                  "Checks against published measurements (the floor must stay below them):", "",
                  "| anchor | predicted | measured | ratio | consistent |", "|---|---|---|---|---|"]
        lines += [f"| {a['name']} ({a['quantity']}) | {a['predicted']:,.1f} | {a['measured']:,.1f} | {a['ratio']:.2f} | "
                  f"{'yes' if a['consistent'] else 'no'} |" for a in dm["anchors"]]
    return "\n".join(lines)


def charts(record: dict[str, Any], out_dir: Path) -> list[Path]:
    """Stacked per-stage latency per run, and e2e latency vs mask IoU."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def save(fig, path: Path) -> Path:
        from agvas.atomic import atomic_path

        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
        plt.close(fig)
        return path

    runs = [r for r in record["runs"] if r.get("stages") and r["backend"] != "onnxruntime-genai" and r["batch"] == 1]
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(runs) + 2), 4.5))
    bottom = [0.0] * len(runs)
    for st in STAGES:
        vals = [r["stages"].get(st, {}).get("p50_ms") or 0.0 for r in runs]
        ax.bar(range(len(runs)), [v / 1e3 for v in vals], bottom=[b / 1e3 for b in bottom], label=st)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_xticks(range(len(runs)), [r["name"].replace("/", "\n") for r in runs], fontsize=7)
    ax.set_ylabel("p50 latency per image (s)")
    ax.set_title(f"AG-VAS {record['config']}: per-stage latency (batch 1)")
    ax.legend(fontsize=7, ncol=2)
    paths.append(save(fig, out_dir / f"{record['config']}_stages.png"))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = "osD^v<>phX*"
    for i, r in enumerate(x for x in runs if x["vision_tokens"] == "anyres"):
        iou = (r.get("mask_iou_vs_reference") or {}).get("mean")
        if iou is None or not r.get("e2e_ms"):
            continue
        ax.scatter(r["e2e_ms"]["p50"] / 1e3, iou, marker=markers[i % len(markers)], label=r["name"])
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.legend(fontsize=6, loc="lower right")
    ax.set_xlabel("e2e p50 latency (s)")
    ax.set_ylabel("mean mask IoU vs fp32 reference")
    ax.set_title(f"AG-VAS {record['config']}: latency vs agreement")
    paths.append(save(fig, out_dir / f"{record['config']}_latency_accuracy.png"))
    return paths


def write_all(record: dict[str, Any], json_path: Path | None, results_dir: Path) -> dict[str, str]:
    """JSON (validated), markdown and charts; returns the written paths."""
    from agvas.atomic import write_text_atomic

    validate(record)
    out: dict[str, str] = {}
    text = json.dumps(record, indent=2, default=float)
    if json_path:
        write_text_atomic(json_path, text)
        out["json"] = str(json_path)
    results_dir = Path(results_dir)
    write_text_atomic(results_dir / f"{record['config']}.json", text)
    write_text_atomic(results_dir / f"{record['config']}.md", markdown(record) + "\n")
    out["markdown"] = str(results_dir / f"{record['config']}.md")
    out["charts"] = [str(p) for p in charts(record, results_dir)]
    record["outputs"] = out
    return out
