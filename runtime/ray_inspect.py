"""``agvas inspect INPUT... --engines DIR --out OUT --ray [ADDRESS]``: the same inspection on a
Ray cluster (``pip install 'agvas-edge[ray]'``), with the same output folder.

The job is one streaming Ray Data pipeline::

    from_items(images to do)        the inputs expanded on the driver as `agvas inspect` does
                                    (files, folders, globs, lists, meta.json) plus folder or file
                                    URIs of any pyarrow filesystem (s3://, gs://, hdfs://, file://)
    map_batches(decode)             Ray tasks: read the file and decode it to RGB with
                                    ``agvas.imageio.load_image`` (EXIF, 16-bit, CMYK, pixel limit);
                                    an unreadable or broken file becomes an error row
    map_batches(InspectWorker)      an actor pool of ``runtime.Inspector`` s, engines loaded once per
                                    actor; one GPU per actor (``num_gpus=1``) for the GPU providers,
                                    else ``--ray-cpus-per-actor`` CPUs and ``--threads`` ORT threads;
                                    inside a Ray batch, as in ``agvas inspect --batch N``, up to N
                                    equal-size images share a prefill (N > 1 also encodes ahead)
    driver                          writes each result with ``agvas.runtime.outputs.OutputDir`` as it
                                    arrives (mask, overlay, then its results.jsonl line), and at the
                                    end the csv, summary.json and report.html of ``agvas.runtime.report``

Images are listed on the driver rather than by ``ray.data.read_binary_files`` so that every
input has its output name and resume state before the job starts, and so that a missing or
unreadable file is an error row for that image instead of a failed read task.

Fault tolerance: Ray Data's actor pools restart an actor whose process dies and re-run the
batches it held (its defaults ``max_restarts=-1``, ``max_task_retries=-1``); rows arriving twice are
written once. A batch whose task fails for another reason is dropped by Ray Data
(``max_errored_blocks=-1`` here) and its images get error rows; the job goes on. ``--resume``
skips finished images as in single-machine inspect. Per-image errors never fail the job; exit
code 1 says some images failed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import time
import warnings
from pathlib import Path

import numpy as np

DECODE_CPUS = 0.5  # CPU reserved per decode task (reading + decoding is light next to the engines)
GPU_PROVIDERS = ("cuda", "tensorrt", "tensorrt-native")
_LOCAL = "local"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``--ray*`` flags of ``agvas inspect`` (added by ``runtime/cli.py``)."""
    g = p.add_argument_group("Ray scale-out (pip install 'agvas-edge[ray]')")
    g.add_argument("--ray", nargs="?", const=_LOCAL, default=None, metavar="ADDRESS",
                   help="run on Ray: no ADDRESS starts a local Ray instance (or joins $RAY_ADDRESS); 'auto' joins "
                        "the cluster this node belongs to; HOST:PORT or ray://HOST:PORT a remote one. Put it after "
                        "the inputs. Every node needs agvas-edge installed and the --engines folder and local "
                        "inputs at the same paths (shared storage), or inputs given as URIs (s3://...)")
    g.add_argument("--ray-actors", type=int, default=None, metavar="N",
                   help="Inspector actors (default: one per GPU for GPU providers; else the cluster's CPUs, less "
                        f"{DECODE_CPUS} for decoding, divided by --ray-cpus-per-actor)")
    g.add_argument("--ray-cpus-per-actor", type=float, default=None, metavar="C",
                   help="CPUs Ray reserves per actor (default: --threads, or 1); ONNX Runtime uses --threads "
                        "threads per actor (default: C rounded up)")
    g.add_argument("--ray-batch", type=int, default=8, metavar="N",
                   help="images per Ray batch handed to an actor (default 8; --batch images of one size share a "
                        "prefill inside it)")


def check_address(address: str) -> str:
    """``--ray`` ADDRESS: refuse what is clearly an input path swallowed by ``--ray``."""
    if address in (_LOCAL, "auto") or "://" in address or (":" in address and not os.path.exists(address)):
        return address
    raise ValueError(f"--ray {address!r}: not a Ray address (auto, HOST:PORT or ray://HOST:PORT); "
                     "put --ray after the inputs when no address is given")


# ---- inputs ----------------------------------------------------------------------------------------

def is_uri(arg: str) -> bool:
    return "://" in arg and not os.path.exists(arg)


def list_uri(uri: str) -> list[str]:
    """The image files under a folder URI (recursively, sorted), or the URI of one file."""
    from pyarrow import fs

    from .inputs import IMAGE_EXTS

    try:
        filesystem, root = fs.FileSystem.from_uri(uri)
    except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid / OSError for unknown schemes
        raise ValueError(f"{uri}: cannot open this URI with pyarrow ({str(e).splitlines()[0]})") from None
    info = filesystem.get_file_info(root)
    if info.type == fs.FileType.File:
        return [uri]
    if info.type != fs.FileType.Directory:
        raise FileNotFoundError(f"{uri}: no such file or folder")
    base = uri.rstrip("/")
    found = []
    for f in filesystem.get_file_info(fs.FileSelector(root, recursive=True)):
        rel = os.path.relpath(f.path, root)
        if f.type == fs.FileType.File and f.base_name.lower().endswith(IMAGE_EXTS) \
                and not any(part.startswith(".") for part in Path(rel).parts):
            found.append(f"{base}/{rel}")
    if not found:
        raise ValueError(f"{uri}: folder holds no images ({', '.join(IMAGE_EXTS)})")
    return sorted(found)


def expand(args: list[str], out_dir: str) -> list:
    """``agvas.runtime.inputs.expand_inputs`` for local inputs, plus URIs listed with ``pyarrow.fs``."""
    from .inputs import Item, expand_inputs, name_items

    uris = [a for a in args if is_uri(a)]
    if not uris:
        return expand_inputs(args, out_dir)
    local = [a for a in args if not is_uri(a)]
    items = (expand_inputs(local, out_dir) if local else []) + [Item(u) for a in uris for u in list_uri(a)]
    seen: set[str] = set()
    return name_items([it for it in items if not (it.path in seen or seen.add(it.path))])


def read_image(path: str, max_pixels: int):
    """A local path or a URI -> oriented RGB ``PIL.Image`` (``ImageError`` naming ``path``)."""
    import io

    from agvas.imageio import ImageError, load_image

    if not is_uri(path):
        return load_image(path, max_pixels=max_pixels)
    from pyarrow import fs

    try:
        filesystem, p = fs.FileSystem.from_uri(path)
        with filesystem.open_input_stream(p) as f:
            data = f.read()
    except Exception as e:  # noqa: BLE001 - any read failure is this image's error
        raise ImageError(f"{path}: cannot read: {str(e).strip().splitlines()[0] if str(e).strip() else e!r}") from None
    buf = io.BytesIO(data)
    buf.filename = path  # load_image names the file in its errors
    return load_image(buf, max_pixels=max_pixels)


def _message(e: BaseException) -> str:
    return str(e).strip() or type(e).__name__


# ---- the two Ray stages ------------------------------------------------------------------------------

def decode(batch: dict, max_pixels: int) -> dict:
    """Ray Data task: ``{index, path}`` rows -> ``{index, pixels (raw RGB bytes), height, width, error}``."""
    out: dict[str, list] = {"index": [], "pixels": [], "height": [], "width": [], "error": []}
    for index, path in zip(batch["index"], batch["path"]):
        try:
            a = np.asarray(read_image(str(path), max_pixels))
            pixels, h, w, err = a.tobytes(), a.shape[0], a.shape[1], ""
        except Exception as e:  # noqa: BLE001 - a per-image error; the job goes on
            pixels, h, w, err = b"", 0, 0, _message(e)
        for k, v in zip(out, (int(index), pixels, h, w, err)):
            out[k].append(v)
    return out


class InspectWorker:
    """Ray Data actor: one :class:`runtime.Inspector` (engines loaded once); a batch of decoded
    images -> ``{index, error, result (pickled Result), worker (JSON), busy_s}`` rows."""

    def __init__(self, engines: str, options: dict, batch: int) -> None:
        import ray

        from .inspector import Inspector

        self.insp = Inspector(engines, **options)
        self.batch = batch
        ctx = ray.get_runtime_context()
        with warnings.catch_warnings():  # Ray 2.60 warns from inside this property
            warnings.simplefilter("ignore", DeprecationWarning)
            restarted = bool(ctx.was_current_actor_reconstructed)
        self.worker = json.dumps({
            "actor": ctx.get_actor_id(), "node": ctx.get_node_id(), "pid": os.getpid(),
            "restarted": restarted, "providers": self.insp.engines.providers,
            "settings": {"mode": self.insp.mode, "vision_tokens": self.insp.vision_tokens,
                         "threshold": self.insp.threshold, "min_area": self.insp.min_area,
                         "fast_path": self.insp.fast_path, "threads": self.insp.engines.threads,
                         "spin": options.get("spin", False)}})

    def __call__(self, batch: dict) -> dict:
        t0 = time.perf_counter()
        n = len(batch["index"])
        errors = [str(e) for e in batch["error"]]
        todo = [i for i in range(n) if not errors[i]]
        images = (np.frombuffer(batch["pixels"][i], np.uint8).reshape(int(batch["height"][i]),
                                                                      int(batch["width"][i]), 3) for i in todo)
        results, workers = [b""] * n, [""] * n  # rows that failed decoding never reached an actor
        for j, res in self.insp.stream(images, batch_size=self.batch, overlap=self.batch > 1):  # as agvas inspect
            i = todo[j]
            workers[i] = self.worker
            if isinstance(res, Exception):
                errors[i] = _message(res)
                continue
            results[i] = pickle.dumps(res, protocol=5)  # P_seg/P_ano travel low-res; the driver upsamples
        busy = (time.perf_counter() - t0) / max(len(todo), 1)
        return {"index": [int(x) for x in batch["index"]], "error": errors, "result": results, "worker": workers,
                "busy_s": [busy if w else 0.0 for w in workers]}


# ---- the driver ------------------------------------------------------------------------------------

def _connect(address: str) -> bool:
    import logging

    import ray

    if ray.is_initialized():
        return False
    kw = {"logging_level": logging.WARNING}
    if address == _LOCAL:
        ray.init(include_dashboard=False, **kw)
    else:
        ray.init(address=address, **kw)
    return True


def _pool(args, resources: dict) -> tuple[int, float, float, int]:
    """(actors, cpus per actor, gpus per actor, ORT threads per actor)."""
    gpu = args.provider in GPU_PROVIDERS
    cpus = args.ray_cpus_per_actor if args.ray_cpus_per_actor is not None else float(args.threads or 1)
    threads = args.threads or max(1, math.ceil(cpus))
    if gpu and resources.get("GPU", 0) < 1:
        raise ValueError(f"--provider {args.provider} with --ray: the Ray cluster has no GPUs (resources: "
                         f"{ {k: v for k, v in resources.items() if k in ('CPU', 'GPU')} })")
    if args.ray_actors is not None:
        actors = args.ray_actors
    elif gpu:
        actors = int(resources["GPU"])
    else:
        actors = max(1, int((resources.get("CPU", 1) - DECODE_CPUS) // cpus))
    return actors, cpus, (1.0 if gpu else 0.0), threads


def run(args: argparse.Namespace) -> int:
    """``agvas inspect --ray``: validated arguments of ``runtime/cli.py`` -> exit code."""
    from agvas.export.manifest import load_manifest

    from .common import GroundTruth, engine_files
    from .outputs import OutputDir
    from .report import build_summary, render_html

    address = check_address(args.ray)
    for flag, value in (("--ray-batch", args.ray_batch), ("--ray-actors", args.ray_actors),
                        ("--ray-cpus-per-actor", args.ray_cpus_per_actor), ("--threads", args.threads)):
        if value is not None and value <= 0:
            raise ValueError(f"{flag} must be > 0, got {value}")
    items = expand(args.inputs, args.out)
    engines = Path(args.engines)
    if not engines.is_dir():
        raise FileNotFoundError(f"--engines {engines}: no such export directory")
    manifest = load_manifest(engines, verify=args.verify)  # refuse a broken export before starting a cluster
    try:
        import ray
    except ImportError:
        raise ValueError("--ray needs Ray: pip install 'agvas-edge[ray]' (ray[data])") from None
    out = OutputDir(args.out, resume=args.resume, overwrite=args.overwrite, save_maps=args.save_maps)
    todo = [it for it in items if not out.is_done(it)]
    gt = GroundTruth() if any(it.anomaly is not None for it in todo) else None

    stats, wall, ray_info = _Stats(), 0.0, None
    if todo:
        started = _connect(address)
        try:
            wall, ray_info = _job(ray, args, address, engines, items, todo, out, gt, stats)
        finally:
            if started:
                ray.shutdown()

    first = next(iter(stats.workers.values()), {})
    settings = {"engines": str(engines.resolve()), "provider": args.provider,
                "engine_providers": first.get("providers"), **first.get("settings", {}), "batch": args.batch,
                "engine_files": engine_files(args.engine),
                "precision": {n: e["precision"] for n, e in manifest.engines.items()}}
    run_info = {"images_this_run": len(todo), "skipped_resume": len(items) - len(todo),
                "failed_this_run": stats.failed, "wall_s": round(wall, 3),
                "images_per_s": round(len(todo) / wall, 3) if todo and wall > 0 else None, "ray": ray_info}
    records = out.ordered(items)
    summary = build_summary(records, settings, run_info, gt.result() if gt else None)
    out.finish(items, summary, render_html(summary, records, out.root))

    c = summary["counts"]
    print(f"{c['images']} images: {c['anomalous']} anomalous, {c['normal']} normal, {c['failed']} failed"
          + (f"; {run_info['images_per_s']:.2f} images/s on {ray_info['actors']} Ray actors"
             if run_info["images_per_s"] else "") + f" -> {out.root / 'report.html'}")
    for a in (ray_info or {}).get("per_actor", []):
        print(f"  actor {a['actor']} (node {a['node']}, pid {','.join(map(str, a['pids']))}"
              f"{', restarted' if a['restarted'] else ''}): {a['images']} images, {a['images_per_s']} images/s busy")
    if summary["metrics"]:
        from agvas.train.metrics import markdown_table

        print(markdown_table(summary["metrics"], "ground truth (this run)"))
    return 1 if c["failed"] else 0


def _job(ray, args, address: str, engines: Path, items: list, todo: list, out, gt, stats: "_Stats"
         ) -> tuple[float, dict]:
    """Run the pipeline over ``todo`` and write each result as it arrives; (wall seconds, ray info)."""
    from tqdm import tqdm

    from agvas.cli import CLIError

    from .common import gt_label, inspector_options

    resources = ray.cluster_resources()
    actors, cpus, gpus, threads = _pool(args, resources)
    options = inspector_options(args, threads)
    ctx = ray.data.DataContext.get_current()
    settings = {"max_errored_blocks": -1,  # a failed batch costs its images (error rows below), not the job
                "enable_progress_bars": False,  # the driver's tqdm bar counts written images
                "print_on_execution_start": False}
    saved = {k: getattr(ctx, k) for k in settings if hasattr(ctx, k)}
    for k in saved:
        setattr(ctx, k, settings[k])
    ds = ray.data.from_items([{"index": i, "path": it.path} for i, it in enumerate(todo)],
                             override_num_blocks=max(1, math.ceil(len(todo) / args.ray_batch)))
    ds = ds.map_batches(decode, batch_size=args.ray_batch, num_cpus=DECODE_CPUS,
                        fn_kwargs={"max_pixels": args.max_pixels})
    ds = ds.map_batches(InspectWorker, batch_size=args.ray_batch, compute=ray.data.ActorPoolStrategy(size=actors),
                        num_cpus=cpus, num_gpus=gpus,
                        fn_constructor_kwargs={"engines": str(engines.resolve()), "options": options,
                                               "batch": args.batch})
    t0 = time.perf_counter()
    bar = tqdm(total=len(items), initial=len(items) - len(todo), desc=f"inspect (ray, {actors} actors)", unit="img",
               dynamic_ncols=True)
    try:
        for row in ds.iter_rows():
            i = int(row["index"])
            if not stats.add(i, row):
                continue  # a re-run batch delivered this image again: written once
            it = todo[i]
            if row["error"]:
                out.write_error(it, row["error"], gt_label(it))
            else:
                res = pickle.loads(row["result"])
                extra = gt.add(it, res) if gt and it.anomaly is not None else {}
                out.write_result(it, res, {**(extra or {}), "worker": _short(row["worker"])})
                stats.anomalous += bool(res.verdict)
            bar.update(1)
            bar.set_postfix(anomalous=stats.anomalous, failed=stats.failed, refresh=False)
    except Exception as e:  # noqa: BLE001 - actor start-up / cluster failures: exit 2, finished images kept
        raise CLIError(f"--ray {address}: the job failed after {len(stats.seen)} of {len(todo)} images: "
                       f"{_root_cause(e)} (finished images are kept: rerun with --resume)") from None
    finally:
        bar.close()
        for k, v in saved.items():
            setattr(ctx, k, v)
    wall = time.perf_counter() - t0
    lost = [i for i in range(len(todo)) if i not in stats.seen]
    for i in lost:
        out.write_error(todo[i], f"{todo[i].path}: no result: the Ray task of its batch failed (see the Ray logs)",
                        gt_label(todo[i]))
    stats.failed += len(lost)
    return wall, {"address": address, "ray_version": ray.__version__, "actors": actors, "cpus_per_actor": cpus,
                  "gpus_per_actor": gpus, "threads_per_actor": threads, "ray_batch": args.ray_batch,
                  "cluster_resources": {k: v for k, v in resources.items() if k in ("CPU", "GPU", "memory")},
                  "nodes": len({w["node"] for w in stats.workers.values()}), "per_actor": stats.per_actor(),
                  "duplicates_dropped": stats.duplicates, "lost": len(lost)}


def _root_cause(e: BaseException) -> str:
    """The innermost error Ray wrapped, e.g. ``ValueError: ...`` raised by an actor's Inspector
    (Ray's own messages end with the original traceback's last line)."""
    import re

    chain: list[BaseException] = []
    while isinstance(e, BaseException) and all(e is not c for c in chain):
        chain.append(e)
        e = getattr(e, "cause", None) or e.__cause__
    for exc in reversed(chain):
        lines = [ln.strip() for ln in re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).splitlines() if ln.strip()]
        if lines:
            return lines[-1]
    return type(chain[0]).__name__


def _short(worker: str) -> dict:
    """The ``worker`` field of a results.jsonl line: which actor, node and process inspected it."""
    w = json.loads(worker)
    return {"actor": w["actor"][:12], "node": w["node"][:12], "pid": w["pid"]}


class _Stats:
    """What the driver learns from the rows: which images arrived (once), and per actor."""

    def __init__(self) -> None:
        self.seen: set[int] = set()
        self.duplicates = self.failed = self.anomalous = 0
        self.workers: dict[str, dict] = {}  # actor id -> its (latest) worker record
        self.actors: dict[str, dict] = {}

    def add(self, index: int, row: dict) -> bool:
        if index in self.seen:
            self.duplicates += 1
            return False
        self.seen.add(index)
        self.failed += bool(row["error"])
        w = json.loads(row["worker"]) if row["worker"] else None
        if w:  # rows failed in decoding never reached an actor
            self.workers[w["actor"]] = w
            a = self.actors.setdefault(w["actor"], {"images": 0, "busy_s": 0.0, "pids": [], "restarted": False,
                                                    "node": w["node"]})
            a["images"] += 1
            a["busy_s"] += float(row["busy_s"])
            a["restarted"] |= w["restarted"]
            if w["pid"] not in a["pids"]:
                a["pids"].append(w["pid"])
        return True

    def per_actor(self) -> list[dict]:
        return [{"actor": k[:12], "node": a["node"][:12], "pids": a["pids"], "restarted": a["restarted"],
                 "images": a["images"], "busy_s": round(a["busy_s"], 3),
                 "images_per_s": round(a["images"] / a["busy_s"], 3) if a["busy_s"] > 0 else None}
                for k, a in sorted(self.actors.items())]
