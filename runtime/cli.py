"""``agvas inspect INPUT... --engines DIR --out OUT``: batch inspection for production lines;
``agvas inspect --watch DIR --engines DIR --out OUT``: continuous inspection of a folder that fills
up (``runtime/watch.py``); ``--ray``: the batch on a Ray cluster (``runtime/ray_inspect.py``).

Exit codes: 0 every image inspected (a watch stopped by SIGTERM/SIGINT: 0), 1 some images failed
(each has an ``error`` line in results.jsonl), 2 usage / engine errors (nothing inspected). Torch-free.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from agvas.imageio import DEFAULT_MAX_PIXELS

from .common import GroundTruth, gt_label, load_inspector, run_settings
from .engines import PROVIDERS
from .prompt import MODE_ALIASES, MODES


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="*", metavar="INPUT",
                   help="image files, folders (recursive), glob patterns, .txt/.lst lists of paths, or a meta.json "
                        "(its test split; then metrics against the ground truth are printed)")
    p.add_argument("--engines", required=True, metavar="DIR", help="export directory (agvas export / quantize)")
    p.add_argument("--out", required=True, metavar="OUT", help="output folder (results.jsonl, masks/, overlays/, "
                   "summary.json, report.html)")
    p.add_argument("--batch", type=int, default=1, metavar="N",
                   help="images per LLM pass (equal-size images share one prefill) and, when > 1, the next images "
                        "are encoded in a second thread while the LLM runs (default 1: one image at a time)")
    p.add_argument("--batch-llm", action=argparse.BooleanOptionalAction, default=None,
                   help="run the equal-size images of a --batch chunk through the LLM as one batch (--batch-llm) or "
                        "one after another (--no-batch-llm); default: batched on GPU providers, one by one on the CPU "
                        "(same results; --batch-llm on the CPU runs the GPU's batched code path)")
    p.add_argument("--calib-dir", default=None, metavar="CAL",
                   help="--provider tensorrt: the agvas calibrate directory whose TensorRT-EP tables "
                        "(CAL/tensorrt/<engine>/calibration.flatbuffers) run the fp32 vision engines in INT8 "
                        "(a quantized QDQ export needs none)")
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
    from .watch import add_arguments as add_watch_arguments

    add_watch_arguments(p)  # --watch DIR and its options (runtime/watch.py)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .inputs import expand_inputs
    from .outputs import OutputDir
    from .report import build_summary, render_html

    if args.batch < 1:
        raise ValueError(f"--batch must be >= 1, got {args.batch}")
    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        raise ValueError(f"--threshold must be within [0, 1], got {args.threshold}")
    if args.min_area < 0:
        raise ValueError(f"--min-area must be >= 0, got {args.min_area}")
    if args.watch is not None:  # continuous inspection of a folder that fills up: runtime/watch.py
        from .watch import run as run_watch

        return run_watch(args)
    if not args.inputs:
        took = args.ray is not None and Path(args.ray).exists()  # `--ray PATH`: argparse gave the path to --ray
        raise ValueError("no INPUT given: images, folders, globs, lists or a meta.json (or --watch DIR)"
                         + (f"; --ray took {args.ray} as its ADDRESS: put --ray after the inputs" if took else ""))
    if args.ray is not None:  # the same inspection on a Ray cluster: runtime/ray_inspect.py
        from .ray_inspect import run as run_ray

        return run_ray(args)
    items = expand_inputs(args.inputs, args.out)
    insp = load_inspector(args)
    out = OutputDir(args.out, resume=args.resume, overwrite=args.overwrite, save_maps=args.save_maps)
    todo = [it for it in items if not out.is_done(it)]
    gt = GroundTruth() if any(it.anomaly is not None for it in todo) else None

    t0 = time.perf_counter()
    n_fail = n_anomalous = 0
    bar = tqdm(total=len(items), initial=len(items) - len(todo), desc="inspect", unit="img", dynamic_ncols=True)
    try:
        for i, res in insp.stream([it.path for it in todo], batch_size=args.batch, overlap=args.batch > 1):
            it = todo[i]
            if isinstance(res, Exception):
                out.write_error(it, res, gt_label(it))
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
    settings = run_settings(args, insp)
    run_info = {"images_this_run": len(todo), "skipped_resume": len(items) - len(todo), "failed_this_run": n_fail,
                "wall_s": round(wall, 3), "images_per_s": round(len(todo) / wall, 3) if todo and wall > 0 else None,
                "batched_llm_passes": insp.batched_llm_passes, "batch_retries": insp.batch_retries}
    metrics = gt.result() if gt else None
    summary = build_summary(records, settings, run_info, metrics)
    out.finish(items, summary, render_html(summary, records, out.root))

    c = summary["counts"]
    print(f"{c['images']} images: {c['anomalous']} anomalous, {c['normal']} normal, {c['failed']} failed"
          + (f"; {run_info['images_per_s']:.2f} images/s" if run_info["images_per_s"] else "")
          + f" -> {out.root / 'report.html'}")
    if insp.batch_retries:
        print(f"warning: {insp.batch_retries} batched LLM pass(es) failed and were retried image by image "
              f"(summary.json run.batch_retries; see the log)", file=sys.stderr)
    if metrics:
        from agvas.train.metrics import markdown_table

        print(markdown_table(metrics, "ground truth (this run)"))
    return 1 if c["failed"] else 0
