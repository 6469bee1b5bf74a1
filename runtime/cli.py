"""``agvas inspect INPUT... --engines DIR --out OUT``: batch inspection for production lines.

Exit codes: 0 every image inspected, 1 some images failed (each has an ``error`` line in
results.jsonl), 2 usage / engine errors (nothing inspected). Torch-free.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from agvas.imageio import DEFAULT_MAX_PIXELS

from .engines import PROVIDERS
from .prompt import MODE_ALIASES, MODES


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="image files, folders (recursive), glob patterns, .txt/.lst lists of paths, or a meta.json "
                        "(its test split; then metrics against the ground truth are printed)")
    p.add_argument("--engines", required=True, metavar="DIR", help="export directory (agvas export / quantize)")
    p.add_argument("--out", required=True, metavar="OUT", help="output folder (results.jsonl, masks/, overlays/, "
                   "summary.json, report.html)")
    p.add_argument("--batch", type=int, default=1, metavar="N",
                   help="images per LLM pass (equal-size images share one prefill) and, when > 1, the next images "
                        "are encoded in a second thread while the LLM runs (default 1: one image at a time)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="continue a run in OUT: skip images already done")
    g.add_argument("--overwrite", action="store_true", help="start over in an OUT that holds results")
    p.add_argument("--threshold", type=float, default=None, help="mask = P > threshold (default: the manifest's)")
    p.add_argument("--min-area", type=int, default=0, metavar="PX",
                   help="anomalous only when the mask has more than PX pixels (default 0)")
    p.add_argument("--mode", default="direct", choices=sorted(MODES + tuple(MODE_ALIASES)),
                   help="inference mode (default direct)")
    p.add_argument("--normal-sentence", default=None,
                   help="describe_plus: a sentence on the object's normal appearance")
    p.add_argument("--vision-tokens", default=None, choices=("anyres", "base"),
                   help="anyres (HF packing) or base tile only (default: the export's)")
    p.add_argument("--save-maps", action="store_true", help="also write maps/NAME.npy (float32 [3,H,W]: P, P_seg, P_ano)")
    p.add_argument("--provider", default="cpu", choices=PROVIDERS, help="execution provider (default cpu)")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: all cores)")
    p.add_argument("--spin", action="store_true",
                   help="let ONNX Runtime threads spin-wait (lower latency on a dedicated machine; much slower when "
                        "other work shares the cores)")
    p.add_argument("--arena", action="store_true",
                   help="use ONNX Runtime's CPU memory arena (off by default: it keeps and grows every session's peak "
                        "buffers; ov-0.5b int8 after 3 images: 9.5 GB with it, 4.8 GB without, same speed)")
    p.add_argument("--no-fast-path", action="store_true",
                   help="decode token by token instead of the forced-answer fast path (direct mode)")
    p.add_argument("--engine", action="append", default=[], metavar="NAME=FILE",
                   help="use another file for an engine, e.g. llm=llm_int4.onnx (repeatable)")
    p.add_argument("--verify", default="bytes", choices=("sha256", "bytes", "none"),
                   help="check engine files against the manifest at load (default bytes: sizes)")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help=f"refuse larger images as per-image errors (default {DEFAULT_MAX_PIXELS:,})")
    from .ray_inspect import add_arguments as add_ray_arguments

    add_ray_arguments(p)  # --ray [ADDRESS] and its --ray-* options (runtime/ray_inspect.py)


def _engine_files(specs: list[str]) -> dict[str, str]:
    out = {}
    for s in specs:
        name, sep, path = s.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--engine {s!r}: expected NAME=FILE, e.g. llm=llm_int4.onnx")
        out[name] = path
    return out


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from agvas.cli import CLIError

    from .inputs import expand_inputs
    from .inspector import Inspector
    from .outputs import OutputDir
    from .report import build_summary, render_html

    if args.batch < 1:
        raise ValueError(f"--batch must be >= 1, got {args.batch}")
    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        raise ValueError(f"--threshold must be within [0, 1], got {args.threshold}")
    if args.min_area < 0:
        raise ValueError(f"--min-area must be >= 0, got {args.min_area}")
    if args.ray is not None:  # the same inspection on a Ray cluster: runtime/ray_inspect.py
        from .ray_inspect import run as run_ray

        return run_ray(args)
    items = expand_inputs(args.inputs, args.out)
    engines = Path(args.engines)
    if not engines.is_dir():
        raise FileNotFoundError(f"--engines {engines}: no such export directory")
    try:
        insp = Inspector(engines, provider=args.provider, mode=args.mode, normal_sentence=args.normal_sentence,
                         vision_tokens=args.vision_tokens, threads=args.threads, fast_path=not args.no_fast_path,
                         threshold=args.threshold, min_area=args.min_area, engine_files=_engine_files(args.engine),
                         verify=args.verify, max_pixels=args.max_pixels, spin=args.spin, arena=args.arena)
    except (ValueError, FileNotFoundError):
        raise
    except Exception as e:  # ONNX Runtime / provider failures: an engine error, exit 2
        raise CLIError(f"--engines {engines}: {str(e).strip().splitlines()[0] if str(e).strip() else e!r}") from None
    out = OutputDir(args.out, resume=args.resume, overwrite=args.overwrite, save_maps=args.save_maps)
    todo = [it for it in items if not out.is_done(it)]
    gt = _GroundTruth() if any(it.anomaly is not None for it in todo) else None

    t0 = time.perf_counter()
    n_fail = n_anomalous = 0
    bar = tqdm(total=len(items), initial=len(items) - len(todo), desc="inspect", unit="img", dynamic_ncols=True)
    try:
        for i, res in insp.stream([it.path for it in todo], batch_size=args.batch, overlap=args.batch > 1):
            it = todo[i]
            if isinstance(res, Exception):
                out.write_error(it, res, _gt_label(it))
                n_fail += 1
            else:
                out.write_result(it, res, gt.add(it, res) if gt and it.anomaly is not None else None)
                n_anomalous += bool(res.verdict)
            bar.update(1)
            bar.set_postfix(anomalous=n_anomalous, failed=n_fail, refresh=False)
    finally:
        bar.close()
    wall = time.perf_counter() - t0

    records = out.ordered(items)
    settings = {"engines": str(engines.resolve()), "provider": args.provider, "engine_providers": insp.engines.providers,
                "mode": insp.mode, "vision_tokens": insp.vision_tokens, "threshold": insp.threshold,
                "min_area": insp.min_area, "batch": args.batch, "fast_path": insp.fast_path,
                "threads": insp.engines.threads, "spin": args.spin, "arena": args.arena,
                "engine_files": _engine_files(args.engine),
                "precision": {n: e["precision"] for n, e in insp.manifest.engines.items()}}
    run_info = {"images_this_run": len(todo), "skipped_resume": len(items) - len(todo), "failed_this_run": n_fail,
                "wall_s": round(wall, 3), "images_per_s": round(len(todo) / wall, 3) if todo and wall > 0 else None}
    metrics = gt.result() if gt else None
    summary = build_summary(records, settings, run_info, metrics)
    out.finish(items, summary, render_html(summary, records, out.root))

    c = summary["counts"]
    print(f"{c['images']} images: {c['anomalous']} anomalous, {c['normal']} normal, {c['failed']} failed"
          + (f"; {run_info['images_per_s']:.2f} images/s" if run_info["images_per_s"] else "")
          + f" -> {out.root / 'report.html'}")
    if metrics:
        from agvas_train.metrics import markdown_table

        print(markdown_table(metrics, "ground truth (this run)"))
    return 1 if c["failed"] else 0


def _gt_label(item) -> dict:
    return {} if item.anomaly is None else {"category": item.category, "gt_anomaly": bool(item.anomaly)}


class _GroundTruth:
    """Metrics against a meta.json's ground truth (``agvas_train.metrics``) for the images
    inspected in this run, and the per-image mask IoU for results.jsonl."""

    def __init__(self) -> None:
        self.stats: dict = {}

    def add(self, item, res) -> dict:
        from agvas_train.data.meta import Record, load_mask
        from agvas_train.metrics import CategoryStats, iou

        fields = _gt_label(item)
        if item.anomaly and not item.gt_mask:
            return fields  # no mask for an anomalous image: nothing to compare pixels with
        rec = Record(Path(item.path), Path(item.gt_mask) if item.gt_mask else None, item.category or "", "",
                     bool(item.anomaly))
        try:
            gt = load_mask(rec, res.mask.shape)
        except ValueError as e:
            return {**fields, "gt_error": str(e)}
        self.stats.setdefault(item.category or "all", CategoryStats()).add(res.prob, res.mask, res.verdict, gt,
                                                                         bool(item.anomaly))
        return {**fields, "iou": round(iou(res.mask, gt), 6)}

    def result(self) -> dict | None:
        from agvas_train.metrics import summarize

        return summarize({c: s.compute() for c, s in self.stats.items()}) if self.stats else None
