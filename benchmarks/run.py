"""Orchestration: back-ends in their own processes, interleaved rounds, then the bench record.

Each back-end is a :class:`Worker` (a subprocess running :mod:`agvas.benchmarks.worker`); a *group* of
workers is alive at once and driven in rounds — one pass of every variant of every worker per
round — so A/B ratios inside a group are measured side by side under the same load. The first
``warmup`` rounds are discarded; the first recorded round stores the outputs for agreement.
Groups run one after another (to bound memory); put the pairs whose ratio matters in one group.

Agreement is always measured against an independent reference: a separate eager fp32 worker
(``reference-eager-fp32``, its own process, run once before the timed groups) whose saved outputs
no candidate ever is — a candidate compared with its own file raises. A back-end that fails to
build (export, quantize, peer model) or to run is a *failure* (its row says ``FAILED``, `agvas
bench` exits 1); only a back-end unavailable on this machine (an optional package absent) that
the user did not name in ``--only`` is *skipped*, with the reason.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .backends import STAGES, Variant
from .stats import e2e_summary, summarize


@dataclass
class WorkerSpec:
    name: str  # unique, e.g. "eager-fp32"
    kind: str  # eager | runtime | genai
    backend: str  # label in the report
    precision: str
    args: dict[str, Any]
    variants: list[str]  # Variant keys (genai: ["llm"])
    images: list[str] = field(default_factory=list)
    role: str = "candidate"  # candidate (timed, in the table) | reference (the agreement baseline)

    def to_json(self, outputs_dir: Path, threads: int) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "args": self.args, "images": self.images,
                "outputs_dir": str(outputs_dir), "threads": threads}


class Worker:
    """A back-end process speaking :mod:`agvas.benchmarks.worker`'s JSON-lines protocol."""

    def __init__(self, spec: WorkerSpec, outputs_dir: Path, log: Path, threads: int = 2) -> None:
        self.spec = spec
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
               "TOKENIZERS_PARALLELISM": "false"}
        self._log = open(log, "a")
        self.proc = subprocess.Popen([sys.executable, "-m", "agvas.benchmarks.worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._log, text=True, env=env,
                                     cwd=str(Path(__file__).resolve().parent.parent))
        self.setup = self.call({"cmd": "setup", "spec": spec.to_json(outputs_dir, threads)})

    def call(self, msg: dict[str, Any]) -> dict[str, Any]:
        if self.proc.poll() is not None:
            return {"ok": False, "error": f"worker exited with code {self.proc.returncode}"}
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            return {"ok": False, "error": f"worker died (exit code {code}; see {self._log.name})"}
        return json.loads(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=60)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@dataclass
class VariantResult:
    samples: list[dict[str, Any]] = field(default_factory=list)
    peak_rss_mb: float | None = None
    error: str | None = None
    outputs_path: str | None = None  # the outputs this run saved (never a file from an earlier run)


@dataclass
class WorkerResult:
    spec: WorkerSpec
    load_s: float | None = None
    error: str | None = None
    engine_precisions: dict[str, str] | None = None
    variants: dict[str, VariantResult] = field(default_factory=dict)


def run_group(specs: list[WorkerSpec], *, warmup: int, iters: int, outputs_dir: Path, log: Path,
              threads: int = 2, llm_prompt: Callable[[], tuple[int, int]] | None = None,
              on_reply: Callable[[WorkerSpec, str, dict], None] | None = None,
              progress: Callable[[str], None] | None = None) -> list[WorkerResult]:
    """Start every worker of the group, run ``warmup + iters`` interleaved rounds, stop them.
    ``llm_prompt()`` gives the peers' (prompt tokens, new tokens); ``on_reply`` sees every reply."""
    outputs_dir.mkdir(parents=True, exist_ok=True)
    workers: list[tuple[WorkerResult, Worker | None]] = []
    try:
        for spec in specs:
            if progress:
                progress(f"load {spec.name}")
            res = WorkerResult(spec)
            w = Worker(spec, outputs_dir, log, threads)
            if not w.setup.get("ok"):
                res.error = w.setup.get("error", "setup failed")
                w.close()
                w = None
            else:
                res.load_s = w.setup["load_s"]
                res.engine_precisions = w.setup.get("engine_precisions")
            workers.append((res, w))
        for r in range(warmup + iters):
            for res, w in workers:
                if w is None:
                    continue
                for key in res.spec.variants:
                    vr = res.variants.setdefault(key, VariantResult())
                    if vr.error:
                        continue
                    if progress:
                        progress(f"round {r + 1}/{warmup + iters} {res.spec.name} {key}")
                    msg = {"cmd": "round", "variant": key, "save_outputs": r == warmup}
                    if res.spec.kind == "genai":
                        msg["prompt_tokens"], msg["new_tokens"] = llm_prompt() if llm_prompt else (512, 10)
                    reply = w.call(msg)
                    if not reply.get("ok"):
                        vr.error = reply.get("error", "failed")
                        continue
                    if reply.get("outputs_path"):
                        vr.outputs_path = reply["outputs_path"]
                    if on_reply:
                        on_reply(res.spec, key, reply)
                    if r == 0:  # peaks after each variant's first run (batch-1 variants run first)
                        vr.peak_rss_mb = reply["peak_rss_mb"]
                    if r >= warmup:
                        vr.samples += reply["samples"]
    finally:
        for _, w in workers:
            if w is not None:
                w.close()
    return [res for res, _ in workers]


# ---- aggregation --------------------------------------------------------------------------

def load_outputs(path: Path) -> list[Any]:
    """The ``.npz`` a worker wrote, as :class:`agvas.calibration.gate.Outputs` (plus ``prob``)."""
    from agvas.calibration.gate import Outputs

    z = np.load(path)
    out = []
    for i in range(int(z["n"])):
        o = Outputs(z[f"mask_{i}"], bool(z[f"verdict_{i}"]),
                    z[f"anchors_{i}"] if f"anchors_{i}" in z else None, str(z[f"text_{i}"]))
        o.prob = z[f"prob_{i}"].astype(np.float32) if f"prob_{i}" in z else None
        o.image = str(z[f"image_{i}"]) if f"image_{i}" in z else None
        out.append(o)
    return out


def agreement(reference: Path, candidate: Path) -> dict[str, Any]:
    """Mask IoU, verdict, anchor-state cosine and text agreement against the fp32 reference
    (calibration's gate metrics, so bench and ``agvas quantize`` agree on definitions), paired by
    input image. ``reference`` must be another run's file: comparing a file with itself raises."""
    from agvas.calibration.gate import compare

    reference, candidate = Path(reference), Path(candidate)
    if reference.resolve() == candidate.resolve():
        raise ValueError(f"agreement of {candidate} with itself: the reference must be an independent run")
    ref, cand = load_outputs(reference), load_outputs(candidate)
    if not cand:
        raise ValueError(f"{candidate} holds no outputs to compare")
    if all(o.image is not None for o in ref + cand):
        by_image = {o.image: o for o in ref}
        missing = [o.image for o in cand if o.image not in by_image]
        if missing:
            raise ValueError(f"the reference {reference.name} has no output for {len(missing)} of the candidate's "
                             f"images (first: {missing[0]})")
        pairs = [(by_image[o.image], o) for o in cand]
    else:  # files without image paths: pair by position
        pairs = list(zip(ref, cand))
    n = len(pairs)
    g = compare([r for r, _ in pairs], [c for _, c in pairs], [str(i) for i in range(n)], ["bench"] * n)
    return {"images": n, "mask_iou": {"mean": g.mean_mask_iou, "min": g.min_mask_iou},
            "verdict_agreement": g.verdict_agreement, "anchor_cosine": {"mean": g.anchor_cosine, "min": g.min_anchor_cosine},
            "text_agreement": g.text_agreement}


def _counts(items) -> dict[str, int] | None:
    out: dict[str, int] = {}
    for x in items:
        if x:
            out[x] = out.get(x, 0) + 1
    return out or None


def summarize_variant(res: WorkerResult, key: str, vr: VariantResult, config: str) -> dict[str, Any]:
    """One ``runs[]`` record of the bench JSON."""
    v = Variant(False, 1, "anyres") if key == "llm" else Variant.from_key(key)
    s = vr.samples
    stages = {}
    for st in STAGES:
        vals = [x["stages_ms"][st] for x in s if st in x["stages_ms"]]
        if vals:
            stages[st] = summarize(vals)
    images = sum(x["images"] for x in s)
    total_s = sum(x["e2e_ms"] for x in s) / 1e3
    per_tok = [x["decode_ms_per_token"] for x in s if x.get("decode_ms_per_token") is not None]
    ttft = [x["ttft_ms"] for x in s if x.get("ttft_ms") is not None]
    return {
        "name": f"{res.spec.name}/{key}", "config": config, "backend": res.spec.backend,
        "precision": res.spec.precision, "fast_path": v.fast_path, "batch": v.batch,
        "vision_tokens": v.vision_tokens, "stages": stages,
        "e2e_ms": e2e_summary([x["e2e_ms"] / (x["images"] if v.batch > 1 else 1) for x in s]) if s else None,
        "batch_ms": e2e_summary([x["e2e_ms"] for x in s]) if s and v.batch > 1 else None,
        "images_per_s": images / total_s if total_s > 0 else None,
        "ttft_ms": e2e_summary(ttft) if ttft else None,
        "decode_ms_per_token": e2e_summary(per_tok) if per_tok else None,
        "prompt_tokens": s[0].get("prompt_tokens") if s else None,
        "generated_tokens": s[0].get("tokens") if s else None,
        "fast_path_outcomes": _counts(x.get("fast_path_outcome") for x in s),
        "samples": len(s), "peak_rss_mb": vr.peak_rss_mb, "load_s": res.load_s,
        "engine_precisions": res.engine_precisions,
        "mask_iou_vs_reference": None, "verdict_agreement": None, "error": vr.error or res.error,
    }


# ---- the whole comparison -----------------------------------------------------------------

@dataclass
class BenchOptions:
    config: str
    json_path: Path | None = None
    checkpoint: Path | None = None
    data: Path | None = None  # a meta.json whose test split gives the images (and accuracy metrics)
    cache: Path = Path(".cache/bench")
    results_dir: Path = Path("benchmarks/results")
    images: int | None = None  # images per round (batch-1 variants)
    image_size: int | None = None
    batch: int = 4
    warmup: int | None = None
    iters: int | None = None
    threads: int = 2
    quick: bool = False
    autocast: bool | None = None  # eager bf16 autocast too (default: tiny only)
    base_tokens: bool = True  # a `--vision-tokens base` variant of the best back-end
    genai: bool = True
    quantized: tuple[str, ...] = ("int8", "int4")  # LLM precisions of the quantized runtime exports
    only: tuple[str, ...] = ()  # restrict to these worker names
    sequential: bool = False  # one back-end alive at a time (least memory; ratios no longer interleaved)
    command: str = ""

    def resolved(self) -> "BenchOptions":
        big = self.config != "tiny"
        d = dict(images=2 if big else (4 if self.quick else 8), warmup=1, iters=(1 if self.quick else (2 if big else 5)),
                 autocast=not big or "eager-bf16-autocast" in self.only)
        for k, v in d.items():
            if getattr(self, k) is None:
                setattr(self, k, v)
        self.images = max(self.images, 1)
        possible = ["eager-fp32", "eager-bf16", "eager-bf16-autocast", "runtime-fp32",
                    *[f"runtime-llm{q}-vis8" for q in self.quantized], "ortgenai-fp32", "ortgenai-int4"]
        unknown = sorted(set(self.only) - set(possible))
        if unknown:
            raise ValueError(f"--only {' '.join(unknown)}: unknown back-end; expected some of {', '.join(possible)}")
        return self


# precision -> the machine peak it is compared with. fp16 ONNX graphs run in fp32 on this CPU;
# MatMulNBits int4 computes in int8 (accuracy level 4, the quantizer's CPU default).
PEAK_KEY = {"fp32": "fp32", "fp16": "fp32", "bf16": "bf16", "bf16-autocast": "bf16", "int8": "int8", "int4": "int8"}
STAGE_ENGINE = {"vision": "vision", "sam_encoder": "sam_encoder", "prefill": "llm"}


# A ModuleNotFoundError naming one of these is a broken install (a failure), never an absent option.
PROJECT_PACKAGES = ("agvas", "agvas_train", "export", "runtime", "calibration", "benchmarks")
REFERENCE = "reference-eager-fp32"  # the independent eager fp32 run every agreement is measured against


def missing_packages(*names: str) -> list[str]:
    """The optional third-party packages among ``names`` that are not installed here."""
    import importlib.util

    out = []
    for n in names:
        try:
            if importlib.util.find_spec(n) is None:
                out.append(n)
        except (ImportError, ValueError):
            out.append(n)
    return out


def _fail(info: dict[str, Any], names: list[str], error: str) -> None:
    """Back-ends ``names`` failed before they could run (a build step): a failure, never a skip."""
    for n in names:
        info["failed"].setdefault(n, error)


def _unavailable(opts: "BenchOptions", info: dict[str, Any], key: str, names: list[str], reason: str) -> None:
    """Back-ends ``names`` cannot run on this machine (``reason``: an optional package absent).
    Skipped with the reason — unless the user asked for one of them by name (``--only``): then it
    is a failure."""
    asked = [n for n in names if n in opts.only]
    if asked:
        _fail(info, asked, f"requested with --only but unavailable here: {reason}")
    elif not opts.only:
        info["skipped"][key] = reason


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".splitlines()[0]


def _runtime_specs(opts: BenchOptions, ckpt: Path, cfg_dir: Path, log: Path, images: list[str],
                   info: dict[str, Any]) -> list[WorkerSpec]:
    """Runtime back-ends over the exports `agvas export` / `agvas quantize` build. A build that
    fails is recorded in ``info["failed"]`` (the run fails); only absent optional packages skip."""
    from . import prepare

    names = ["runtime-fp32"] + [f"runtime-llm{q}-vis8" for q in opts.quantized]
    wanted = [n for n in names if not opts.only or n in opts.only]
    if not wanted:
        return []
    miss = missing_packages("onnxruntime", "onnxscript")
    if miss:
        _unavailable(opts, info, "runtime", wanted, f"{', '.join(miss)} not installed (the runtime back-ends need it)")
        return []
    why = prepare.verb_available("export") or prepare.verb_available("inspect")
    if why is None:
        try:
            from agvas import runtime

            if not hasattr(runtime, "Inspector"):
                why = "runtime.Inspector is missing"
        except ImportError as e:
            why = f"runtime does not import: {_error(e)}"
    if why:
        _fail(info, wanted, why)
        return []
    specs = []
    try:
        exp = prepare.export_dir(ckpt, cfg_dir, log)
    except Exception as e:  # noqa: BLE001 — any build error is this back-end's failure, reported by name
        _fail(info, wanted, f"export failed: {_error(e)}")
        return []
    nb = f"fast-b{opts.batch}-anyres"
    specs.append(WorkerSpec("runtime-fp32", "runtime", "runtime-ort", "fp32", {"export_dir": str(exp)},
                            ["fast-b1-anyres", "loop-b1-anyres", nb], images))
    quantized = [q for q in opts.quantized if f"runtime-llm{q}-vis8" in wanted]
    why = (prepare.verb_available("calibrate") or prepare.verb_available("quantize")) if quantized else None
    if why:
        _fail(info, [f"runtime-llm{q}-vis8" for q in quantized], why)
        return specs
    for llm in quantized:
        try:
            q = prepare.quantized_export(exp, cfg_dir, images, llm, "int8", log, n_calib=max(1, len(images) - 1),
                                         held_out=min(1, len(images) - 1))
        except Exception as e:  # noqa: BLE001
            _fail(info, [f"runtime-llm{llm}-vis8"], f"calibrate/quantize failed: {_error(e)}")
            continue
        specs.append(WorkerSpec(f"runtime-llm{llm}-vis8", "runtime", "runtime-ort", llm, {"export_dir": str(q)},
                                ["fast-b1-anyres", "loop-b1-anyres", nb], images))
    return specs


def heldout_records(meta: Path, n: int) -> list:
    """``n`` records of the meta file's test split, spread evenly over it (normal and anomalous)."""
    from agvas.train.data.meta import read_meta

    recs = read_meta(meta, "test")
    if not recs:
        raise ValueError(f"--data {meta}: the test split is empty")
    step = max(1, len(recs) // n)
    return recs[::step][:n]


def accuracy(outputs: Path, meta: Path, images: list[str]) -> dict[str, Any]:
    """IoU_ano, IoU_nor, pixel AP, ... (agvas.train.metrics, mean over categories) of one run's
    saved outputs against the ground truth of the images it inspected."""
    from agvas.train.data.meta import load_mask, read_meta
    from agvas.train.metrics import CategoryStats, summarize

    by_path = {str(r.image): r for r in read_meta(meta, "test")}
    cats: dict[str, CategoryStats] = {}
    for path, o in zip(images, load_outputs(outputs)):
        rec = by_path[o.image or path]
        if o.prob is None:
            continue
        gt = load_mask(rec, o.mask.shape)
        cats.setdefault(rec.category, CategoryStats()).add(o.prob, o.mask, o.verdict, gt, rec.anomaly)
    return summarize({c: st.compute() for c, st in cats.items()})["mean"] | {"images": sum(len(st.labels) for st in cats.values())}


def plan(opts: BenchOptions, progress: Callable[[str], None]
         ) -> tuple[list[list[WorkerSpec]], dict[str, Any], WorkerSpec]:
    """Build what is missing in the cache and decide the worker groups (timed) and the reference
    (an independent eager fp32 run over every image, the baseline of all agreement numbers).
    ``info["failed"]``: back-ends whose build failed (name -> error); ``info["skipped"]``: the
    ones unavailable here and not requested by name (key -> reason)."""
    from . import prepare

    cfg_dir = opts.cache / opts.config
    cfg_dir.mkdir(parents=True, exist_ok=True)
    log = cfg_dir / "bench.log"
    info: dict[str, Any] = {"skipped": {}, "failed": {}, "log": str(log)}
    n_img = max(opts.images, opts.batch)
    data = opts.data
    if data is None and opts.checkpoint and (Path(opts.checkpoint).parent / "data" / "meta.json").is_file():
        data = Path(opts.checkpoint).parent / "data" / "meta.json"  # `agvas demo` writes data/ beside checkpoint/
    if data is not None:
        from PIL import Image

        records = heldout_records(data, n_img)
        images = [str(r.image) for r in records]
        with Image.open(images[0]) as im:
            size = im.height
        info["images"] = {"count": len(images), "size": [size, size], "source": f"{data} (test split)",
                          "meta": str(data)}
    else:
        size = opts.image_size or prepare.DEFAULT_IMAGE_SIZE.get(opts.config, 384)
        images = prepare.synthetic_images(cfg_dir / "images", n_img, size)
        info["images"] = {"count": n_img, "size": [size, size], "source": "synthetic (seeded)"}
    if opts.checkpoint:
        ckpt = Path(opts.checkpoint)
        info["weights"] = f"checkpoint {ckpt}"
    else:
        progress("checkpoint (random init + planted answer)")
        ckpt, planted = prepare.planted_checkpoint(opts.config, cfg_dir / "checkpoint", images)
        info["weights"] = planted["weights"]
        info["planted"] = {k: planted[k] for k in ("ok", "gain", "ratio", "layer", "probes") if k in planted}
    info["checkpoint"] = str(ckpt)
    one = images[: opts.images]

    vt_ref = ["loop-b1-anyres"] + (["loop-b1-base"] if opts.base_tokens else [])
    eager = [WorkerSpec("eager-fp32", "eager", "pytorch-eager", "fp32", {"checkpoint": str(ckpt), "dtype": "fp32"}, vt_ref, one),
             WorkerSpec("eager-bf16", "eager", "pytorch-eager", "bf16", {"checkpoint": str(ckpt), "dtype": "bf16"},
                        ["loop-b1-anyres"], one)]
    if opts.autocast:
        eager.append(WorkerSpec("eager-bf16-autocast", "eager", "pytorch-eager", "bf16-autocast",
                                {"checkpoint": str(ckpt), "dtype": "autocast"}, ["loop-b1-anyres"], one))
    # the agreement baseline: its own eager fp32 process over every image any candidate sees
    reference = WorkerSpec(REFERENCE, "eager", "pytorch-eager", "fp32", {"checkpoint": str(ckpt), "dtype": "fp32"},
                           list(vt_ref), list(images), role="reference")
    runtime = _runtime_specs(opts, ckpt, cfg_dir, log, images, info)
    peers: list[WorkerSpec] = []
    gnames = [f"ortgenai-{p}" for p in ("fp32", "int4") if not opts.only or f"ortgenai-{p}" in opts.only]
    if opts.genai and gnames:
        miss = missing_packages("onnxruntime_genai", "transformers")
        if miss:
            _unavailable(opts, info, "onnxruntime-genai", gnames, f"peer: {', '.join(miss)} not installed")
        else:
            for name in gnames:
                prec = name.split("-")[1]
                progress(f"onnxruntime-genai peer model ({prec})")
                try:
                    d = prepare.genai_model(ckpt, cfg_dir, prec, log)
                except Exception as e:  # noqa: BLE001
                    _fail(info, [name], f"peer model build failed: {_error(e)}")
                    continue
                peers.append(WorkerSpec(name, "genai", "onnxruntime-genai", prec,
                                        {"model_dir": str(d), "precision": prec}, ["llm"]))
    # the a-priori best runtime (int8 LLM + int8 vision where it helps) runs beside the eager baselines
    lead = next((s for s in runtime if s.precision == "int8"), runtime[0] if runtime else None)
    if lead and opts.base_tokens:
        lead.variants.append("fast-b1-base")
    rest = [s for s in runtime if s is not lead]
    groups = ([eager + ([lead] if lead else []), rest + peers] if opts.config != "tiny" else [eager + runtime + peers])
    groups = [[s for s in g if not opts.only or s.name in opts.only] for g in groups]
    if opts.sequential:
        groups = [[s] for g in groups for s in g]
    planned = {s.name for g in groups for s in g}
    for n in opts.only:  # asked for by name, yet neither planned nor failed: say so (e.g. --only ortgenai-fp32 --no-genai)
        if n not in planned and n not in info["failed"]:
            info["failed"][n] = "requested with --only but not planned (a flag such as --no-genai leaves it out)"
    return [g for g in groups if g], info, reference


def bench(opts: BenchOptions, progress: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Run the comparison for ``opts.config``; returns the bench record (and writes the outputs)."""
    import datetime

    from agvas.train.config import get_config

    from . import report
    from .machine import measure_machine

    opts.resolved()
    progress("machine peaks")
    machine = measure_machine(quick=opts.quick, threads=opts.threads)
    groups, info, reference = plan(opts, progress)
    cfg_dir = opts.cache / opts.config
    outputs_dir = cfg_dir / "outputs"
    shutil.rmtree(outputs_dir, ignore_errors=True)  # agreement only ever reads files this run wrote
    results: list[WorkerResult] = []
    prompt_len: dict[str, int] = {}

    def llm_prompt() -> tuple[int, int]:
        return prompt_len.get("tokens", 512), prompt_len.get("new", 10)

    def on_reply(spec: WorkerSpec, key: str, reply: dict) -> None:
        if spec.name in (REFERENCE, "eager-fp32") and key == "loop-b1-anyres" and reply["samples"]:
            prompt_len["tokens"] = reply["samples"][0]["prompt_tokens"]
            prompt_len["new"] = reply["samples"][0]["tokens"]

    runs: list[dict[str, Any]] = []
    ref_files: dict[str, str] = {}  # reference variant key -> the outputs it saved in this run
    ref_failed = False
    if groups and all(s.kind == "genai" for g in groups for s in g):  # nothing to compare: the prompt length only
        reference.variants, reference.images = ["loop-b1-anyres"], reference.images[:1]
    if groups:  # the independent reference first, alone: one untimed round over every image
        ref = run_group([reference], warmup=0, iters=1, outputs_dir=outputs_dir, log=Path(info["log"]),
                        threads=opts.threads, on_reply=on_reply, progress=lambda s: progress(f"reference: {s}"))[0]
        ref_files = {k: vr.outputs_path for k, vr in ref.variants.items() if vr.outputs_path and not vr.error}
        errors = {k: vr.error for k, vr in ref.variants.items() if vr.error}
        if ref.error or errors or len(ref_files) != len(reference.variants):
            ref_failed = True
            err = ref.error or "; ".join(f"{k}: {e}" for k, e in errors.items()) or "saved no outputs"
            runs.append({"name": REFERENCE, "config": opts.config, "backend": reference.backend,
                         "precision": reference.precision, "error": f"agreement reference failed: {err}"})
        info["reference"] = {"name": REFERENCE, "backend": reference.backend, "precision": reference.precision,
                             "images": len(reference.images), "load_s": ref.load_s, "outputs": ref_files,
                             "note": "an independent eager fp32 process; every agreement number is against it"}
    for gi, group in enumerate(groups):
        results += run_group(group, warmup=opts.warmup, iters=opts.iters, outputs_dir=outputs_dir,
                             log=Path(info["log"]), threads=opts.threads, llm_prompt=llm_prompt, on_reply=on_reply,
                             progress=lambda s, gi=gi: progress(f"group {gi + 1}/{len(groups)}: {s}"))
    for name, err in info["failed"].items():  # failed before they could run (a build step, an unmet --only)
        runs.append({"name": name, "config": opts.config, **_describe(name), "error": err})
    for r in results:
        if r.error and not r.variants:
            runs.append({"name": r.spec.name, "config": opts.config, "backend": r.spec.backend,
                         "precision": r.spec.precision, "error": r.error})
            continue
        for key, vr in r.variants.items():
            rec = summarize_variant(r, key, vr, opts.config)
            rec["image_size"] = info["images"]["size"]
            cand = vr.outputs_path
            if r.spec.kind != "genai" and not rec["error"]:
                ref_key = f"loop-b1-{rec['vision_tokens']}"
                if cand is None:
                    rec["error"] = "saved no outputs: its agreement cannot be measured"
                elif ref_key in ref_files:
                    # never the candidate's own file: the reference is another process's output
                    assert r.spec.role != "reference" and Path(ref_files[ref_key]).resolve() != Path(cand).resolve()
                    try:
                        ag = agreement(Path(ref_files[ref_key]), Path(cand))
                    except (ValueError, KeyError, OSError) as e:
                        rec["error"] = f"agreement: {_error(e)}"
                    else:
                        ag["reference"] = f"{REFERENCE}/{ref_key}"
                        rec["mask_iou_vs_reference"] = ag["mask_iou"]
                        rec["verdict_agreement"] = ag["verdict_agreement"]
                        rec["agreement"] = ag
                elif ref_failed:  # the reference's own FAILED row says why there is no agreement
                    rec["agreement"] = {"error": f"no {REFERENCE}/{ref_key} outputs: the reference failed"}
                else:
                    rec["error"] = f"no {REFERENCE}/{ref_key} outputs to measure its agreement against"
            meta = info["images"].get("meta")
            if meta and r.spec.kind != "genai" and cand:
                try:
                    rec["accuracy"] = accuracy(Path(cand), Path(meta), r.spec.images)
                except (ImportError, ValueError, KeyError) as e:
                    rec["accuracy"] = {"error": f"{type(e).__name__}: {e}"}
            runs.append(rec)
    for rec in runs:
        rec["status"] = "failed" if rec.get("error") else "ok"
    cfg = get_config(opts.config)
    efficiency(runs, cfg, machine)
    record = {
        "schema": "agvas-bench/1",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": opts.command,
        "config": opts.config,
        "machine": machine,
        "setup": {**info, "warmup": opts.warmup, "iters": opts.iters, "images_per_round": opts.images,
                  "batch": opts.batch, "threads": opts.threads, "sequential": opts.sequential,
                  "loadavg_1min_end": os.getloadavg()[0],
                  "note": "contended timings are only comparable as ratios inside one group (interleaved rounds)"},
        "groups": [[s.name for s in g] for g in groups],
        "runs": runs,
    }
    record["speedup"], record["rss_fraction_vs_eager_fp32"], record["best"] = speedups(runs)
    best_spec = next((sp for g in groups for sp in g if record["best"] and record["best"].startswith(sp.name + "/")), None)
    if best_spec is not None and best_spec.kind == "runtime":
        progress(f"memory composition of {best_spec.name}")
        record["memory_composition"] = memory_composition(best_spec, Path(info["log"]), opts.threads)
    if opts.config != "tiny":
        from . import devices

        progress("device model")
        record["device_model"] = {"label": devices.LABEL, "devices": devices.devices_data(),
                                  "anchors": devices.check_anchors(),
                                  "rows": devices.device_table(configs=(opts.config, "ov-7b"))}
    report.write_all(record, opts.json_path, opts.results_dir)
    return record


def memory_composition(spec: WorkerSpec, log: Path, threads: int) -> dict[str, Any]:
    """:mod:`agvas.benchmarks.memory` for a runtime back-end, in a fresh process (its own peak):
    weights resident by engine next to their files, each stage's peak, what stays after the
    images, the vocabulary-sized arrays. Two images (the first loads pages, both count)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="agvas_mem_") as tmp:
        out = Path(tmp) / "memory.json"
        cmd = [sys.executable, "-m", "agvas.benchmarks.memory", spec.args["export_dir"], "--threads", str(threads),
               "--json", str(out)]
        for k, v in (spec.args.get("engine_files") or {}).items():
            cmd += ["--engine-file", f"{k}={v}"]
        for img in spec.images[:2]:
            cmd += ["--image", img]
        with open(log, "a") as f:
            r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT,
                               env={**os.environ, "OMP_NUM_THREADS": str(threads)})
        if r.returncode != 0 or not out.is_file():
            return {"error": f"python -m agvas.benchmarks.memory exited {r.returncode} (log: {log})"}
        return json.loads(out.read_text())


def _describe(name: str) -> dict[str, str]:
    """Back-end label and precision of a worker name (for the row of one that never started)."""
    if name.startswith("runtime-"):
        return {"backend": "runtime-ort", "precision": "fp32" if name == "runtime-fp32" else name[len("runtime-llm"):].split("-")[0]}
    if name.startswith("ortgenai-"):
        return {"backend": "onnxruntime-genai", "precision": name.split("-")[1]}
    return {"backend": "pytorch-eager", "precision": {"eager-fp32": "fp32", "eager-bf16": "bf16"}.get(name, "bf16-autocast")}


def _find(runs: list[dict], name: str, key: str | None = None) -> dict | None:
    for r in runs:
        if r["name"] == (f"{name}/{key}" if key else name) and not r.get("error"):
            return r
    return None


def _p50(r: dict | None, *path: str) -> float | None:
    x: Any = r
    for p in path:
        x = x.get(p) if isinstance(x, dict) else None
    return x


def _llm_ms(r: dict | None) -> float | None:
    if not r:
        return None
    pre, dec = _p50(r, "stages", "prefill", "p50_ms"), _p50(r, "stages", "decode", "p50_ms")
    return None if pre is None else pre + (dec or 0.0)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b not in (None, 0) else None


def efficiency(runs: list[dict], cfg, machine: dict) -> None:
    """Achieved FLOP/s per compute-bound stage and its fraction of the machine's measured peak of
    the precision the stage runs in (prefill, vision, SAM encoder); decode as a share of the
    measured memory bandwidth (weights streamed once per token)."""
    from agvas.calibration.memory_plan import engine_weights, token_counts
    from agvas.train.modeling import build_model

    from .flops import lm_head_flops, llm_flops, pipeline_flops

    meta_model, tok = build_model(cfg, device="meta")
    weights = engine_weights(meta_model)
    cache: dict[tuple, Any] = {}
    for r in runs:
        if r.get("error") or not r.get("stages"):
            continue
        size = tuple(r.get("image_size") or (0, 0))
        key = (r["vision_tokens"], size)
        eff: dict[str, Any] = {}
        if r["backend"] != "onnxruntime-genai" and size[0]:
            if key not in cache:
                cache[key] = token_counts(meta_model, tok, size, r["vision_tokens"])
            tc = cache[key]
            f = pipeline_flops(cfg, tc, vocab=meta_model.ids.vocab_size)
            flops = {"vision": f["vision"], "sam_encoder": f["sam_encoder"]}
        else:
            flops = {}
        if r.get("prompt_tokens"):  # the prompt actually prefilled (the fast path adds the answer)
            flops["prefill"] = llm_flops(cfg, r["prompt_tokens"])["total"] + lm_head_flops(cfg, 1, meta_model.ids.vocab_size)
        engines = r.get("engine_precisions") or {}
        for st, fl in flops.items():
            ms = _p50(r, "stages", st, "p50_ms")
            if ms:
                pk = PEAK_KEY.get(engines.get(STAGE_ENGINE[st], r["precision"]), "fp32")
                g = fl / (ms / 1e3) / 1e9
                peak = machine["peak_gflops"][pk]
                eff[st] = {"gflop": fl / 1e9, "achieved_gflops": g, "peak_key": pk, "fraction_of_peak": g / peak}
        tok_ms = _p50(r, "decode_ms_per_token", "p50")
        prec = {"bf16": "fp16", "bf16-autocast": "fp32"}.get(r["precision"], r["precision"])
        if tok_ms and prec in ("fp32", "fp16", "int8", "int4"):
            nbytes = sum(weights[e].bytes(prec) for e in ("llm", "lm_head"))  # streamed once per token
            gbs = nbytes / (tok_ms / 1e3) / 1e9
            eff["decode"] = {"weight_gb": nbytes / 1e9, "achieved_gbs": gbs,
                             "fraction_of_bandwidth": gbs / machine["memory_bandwidth_gbs"]}
        r["efficiency"] = eff


def speedups(runs: list[dict]) -> tuple[dict[str, Any], float | None, str | None]:
    """Ratios > 1 mean faster, for the best accuracy-gated runtime back-end (batch 1, anyres,
    fast path; mean mask IoU vs reference ≥ 0.95 and verdict agreement ≥ 0.99)."""
    cands = [r for r in runs if not r.get("error") and r["backend"].startswith("runtime") and r["batch"] == 1
             and r["fast_path"] and r["vision_tokens"] == "anyres" and r.get("e2e_ms")
             and (r.get("mask_iou_vs_reference") or {}).get("mean", 0) >= 0.95 and (r.get("verdict_agreement") or 0) >= 0.99]
    best = min(cands, key=lambda r: r["e2e_ms"]["p50"]) if cands else None
    fp32, bf16 = _find(runs, "eager-fp32", "loop-b1-anyres"), _find(runs, "eager-bf16", "loop-b1-anyres")
    auto = _find(runs, "eager-bf16-autocast", "loop-b1-anyres")
    sp: dict[str, Any] = {
        "e2e_vs_eager_fp32": None, "e2e_vs_eager_bf16": None, "llm_fast_path": None, "batch_throughput": None,
        "prefill_fraction_of_peak": None,
        "e2e_bf16_vs_eager_fp32": _ratio(_p50(fp32, "e2e_ms", "p50"), _p50(bf16, "e2e_ms", "p50")),
        "e2e_bf16_vs_bf16_autocast": _ratio(_p50(auto, "e2e_ms", "p50"), _p50(bf16, "e2e_ms", "p50")),
    }
    rss = None
    if best:
        wname = best["name"].split("/")[0]
        loop = _find(runs, wname, "loop-b1-anyres")
        batch = next((r for r in runs if r["name"].startswith(wname + "/") and r["batch"] > 1 and not r.get("error")), None)
        sp["e2e_vs_eager_fp32"] = _ratio(_p50(fp32, "e2e_ms", "p50"), best["e2e_ms"]["p50"])
        sp["e2e_vs_eager_bf16"] = _ratio(_p50(bf16, "e2e_ms", "p50"), best["e2e_ms"]["p50"])
        sp["llm_fast_path"] = _ratio(_llm_ms(loop), _llm_ms(best))
        sp["batch_throughput"] = _ratio(_p50(batch, "images_per_s"), best.get("images_per_s"))
        sp["prefill_fraction_of_peak"] = _p50(best, "efficiency", "prefill", "fraction_of_peak")
        rss = _ratio(best.get("peak_rss_mb"), _p50(fp32, "peak_rss_mb"))  # a fraction: best / eager fp32
    vs = {}
    for prec in ("fp32", "int4"):
        peer = _find(runs, f"ortgenai-{prec}", "llm")
        ours = next((r for r in runs if not r.get("error") and r["backend"].startswith("runtime") and r["precision"] == prec
                     and not r["fast_path"] and r["batch"] == 1 and r["vision_tokens"] == "anyres"), None)
        if peer:
            vs[prec] = {"prompt_tokens": peer.get("prompt_tokens"),
                        "peer_ttft_ms": _p50(peer, "ttft_ms", "p50"), "peer_decode_ms_per_token": _p50(peer, "decode_ms_per_token", "p50"),
                        "ttft": _ratio(_p50(peer, "ttft_ms", "p50"), _p50(ours, "stages", "prefill", "p50_ms")),
                        "decode": _ratio(_p50(peer, "decode_ms_per_token", "p50"), _p50(ours, "decode_ms_per_token", "p50"))}
    sp["llm_vs_ortgenai"] = vs or None
    return sp, rss, best["name"] if best else None
