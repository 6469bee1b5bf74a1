"""``agvas quantize``: an fp32 export + a calibration directory -> a quantized export that passed
the accuracy gate (or, with ``auto``, the cheapest per-engine precisions that pass it).

Per engine and precision (built once into a work folder and reused by the search):

- ``llm`` (+ ``lm_head``, which always gets the LLM's precision and the same quantizer so the
  fast path's verification logits equal the decode loop's): ``int4`` = ``MatMulNBits``
  (rtn / hqq / gptq on the captured multimodal prefills); ``int8`` = ``quantize_dynamic`` on CPU,
  8-bit ``MatMulNBits`` on GPU targets; ``fp16``. For GPU targets the quantized LLM is built on
  the fp16 graph (GroupQueryAttention runs on CUDA in fp16 only).
- ``vision``, ``sam_encoder``, ``spam``: ``int8`` on GPU/TensorRT targets = static QDQ
  (symmetric, per-channel); on CPU both dynamic int8 and static QDQ are built and timed against
  fp32 on a captured input, side by side, and the fastest is kept — fp32 itself when no int8
  variant is faster (recorded with the timings; the manifest then says fp32). ``fp16``.
- ``agmd`` stays fp32 (small, and it shapes the mask directly).

Candidates run through the runtime's ``Inspector`` with engine-file overrides on the fp32
export, on every calibration and held-out image of CAL; see :mod:`agvas.calibration.gate`.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .gate import Budget, GateResult, Outputs, compare, snr_db
from .store import CalibrationStore

LLM_LADDER = ("int4", "int8", "fp16", "fp32")
VISION_ENGINES = ("vision", "sam_encoder", "spam")
TARGETS = ("cpu", "cuda", "tensorrt")
CPU_INT8_MARGIN = 0.95  # on CPU an int8 vision engine must be >= 5 % faster than fp32 (timing noise)
PRIMARY_OUTPUT = {"vision": "image_features", "sam_encoder": "pixel_embedding", "spam": "f_align",
                  "llm": "hidden_states", "lm_head": "logits", "agmd": "prob"}


def vision_ladder(target: str) -> tuple[str, ...]:
    """Cheapest first. fp16 is a GPU format: ONNX Runtime's CPU provider runs it slower than fp32."""
    return ("int8", "fp32") if target == "cpu" else ("int8", "fp16", "fp32")


@dataclass
class QuantOptions:
    target: str = "cpu"
    algorithm: str = "rtn"  # int4: rtn | hqq | gptq
    block_size: int = 32
    accuracy_level: int | None = None  # None: 4 on CPU (int8 compute on VNNI/AMX), ORT default on GPU
    keep_last_layers: int = 0  # LLM layers (feeding the anchor states) kept in float
    keep_lm_head: bool = False
    gptq_samples: int = 16
    gptq_max_tokens: int | None = None
    static_method: str = "minmax"
    static_samples: int = 32
    measure_runs: int = 3
    snr_samples: int = 2  # captured inputs per changed engine for SNR and the teacher-forced check
    provider: str = "cpu"  # where the gate runs the candidates
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ValueError(f"--target {self.target!r}: expected one of {list(TARGETS)}")
        if self.accuracy_level is None and self.target == "cpu":
            self.accuracy_level = 4


class EngineBuilder:
    """Builds engine files per precision into ``work`` (cached) from the fp32 export."""

    def __init__(self, manifest, store: CalibrationStore, work: Path, opts: QuantOptions,
                 log: Callable[[str], None] = print) -> None:
        self.m, self.store, self.work, self.opts, self.log = manifest, store, Path(work), opts, log
        self.cache: dict[tuple[str, str], tuple[Path, dict[str, Any]]] = {}

    def src(self, engine: str) -> Path:
        return self.m.engine_path(engine)

    def files(self, choice: dict[str, str]) -> tuple[dict[str, Path], dict[str, dict[str, Any]]]:
        """Engine files and build records for ``choice`` (engine -> precision); lm_head follows llm."""
        files, recs = {}, {}
        for engine, prec in choice.items():
            path, rec = self.build(engine, prec)
            files[engine], recs[engine] = path, rec
            if engine == "llm":
                files["lm_head"], recs["lm_head"] = self.build("lm_head", prec)
        return files, recs

    def build(self, engine: str, precision: str) -> tuple[Path, dict[str, Any]]:
        key = (engine, precision)
        if key not in self.cache:
            if precision == "fp32" or (engine == "lm_head" and self.opts.keep_lm_head):
                self.cache[key] = (self.src(engine), {"precision": "fp32", "method": "unchanged"})
            else:
                self.log(f"quantize: building {engine} {precision} ...")
                dst = self.work / precision / Path(self.m.engine(engine)["file"]).name
                if engine in ("llm", "lm_head"):
                    rec = self._llm(engine, precision, dst)
                else:
                    rec = self._vision(engine, precision, dst)
                path = Path(rec.pop("path", dst))
                self.cache[key] = (path, rec)
        return self.cache[key]

    # ---- LLM side -------------------------------------------------------------------------------
    def _llm(self, engine: str, precision: str, dst: Path) -> dict[str, Any]:
        import onnx

        from . import quantize as q
        from .readers import StoreReader

        o = self.opts
        src = self.src(engine)
        gpu = o.target != "cpu"
        if precision == "fp16":
            from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST

            # as the genai builder's CUDA graph: fp16 throughout and, on GPU targets, fp16 KV IO
            # (the present KV is bound as the next step's past with no cast per decode step)
            return {"precision": "fp16", **q.convert_fp16(src, dst, fp16_io=gpu and engine == "llm",
                                                          op_block_list=list(DEFAULT_OP_BLOCK_LIST))}
        if gpu:  # GroupQueryAttention runs on CUDA in fp16 only: quantize the fp16 graph
            src = self.build(engine, "fp16")[0]
        header = onnx.load(str(src), load_external_data=False)
        head = q.lm_head_nodes(header)
        exclude = q.sensitive_nodes(header, int(self.m.llm["num_layers"]), o.keep_last_layers, o.keep_lm_head) \
            if engine == "llm" else []
        del header
        if precision == "int8" and not gpu:
            rec = q.quantize_int8_dynamic(src, dst, exclude=exclude)
        elif precision in ("int4", "int8"):
            algorithm = o.algorithm if precision == "int4" and engine == "llm" else "rtn"
            reader = None
            if algorithm == "gptq":
                reader = StoreReader(self.store, "llm", limit=o.gptq_samples, max_tokens=o.gptq_max_tokens)
            if precision == "int8":
                rec = q.quantize_nbits(src, dst, bits=8, block_size=o.block_size, accuracy_level=o.accuracy_level,
                                       exclude=exclude)
            else:
                rec = q.quantize_nbits(src, dst, algorithm=algorithm, block_size=o.block_size,
                                      accuracy_level=o.accuracy_level, reader=reader, exclude=exclude,
                                      rtn_nodes=[n for n in head if n not in exclude] if algorithm == "gptq" else ())
        else:
            raise ValueError(f"--llm {precision!r}: expected one of {list(LLM_LADDER)}")
        return {"precision": precision, **rec}

    # ---- vision side ----------------------------------------------------------------------------
    def _vision(self, engine: str, precision: str, dst: Path) -> dict[str, Any]:
        from . import quantize as q
        from .readers import StoreReader

        o = self.opts
        src = self.src(engine)
        if precision == "fp16":
            return {"precision": "fp16", **q.convert_fp16(src, dst)}
        if precision != "int8":
            raise ValueError(f"--vision {precision!r}: expected one of int8, fp16, fp32")
        reader = StoreReader(self.store, engine, limit=o.static_samples)
        if o.target != "cpu":
            return {"precision": "int8", **q.quantize_int8_static(src, dst, reader, symmetric=True,
                                                                  method=o.static_method)}
        # CPU: build both int8 variants, time them against fp32 side by side, keep the fastest
        dyn = dst.with_name(dst.stem + ".dynamic.onnx")
        sta = dst.with_name(dst.stem + ".static.onnx")
        variants = {"dynamic": q.quantize_int8_dynamic(src, dyn)}
        try:
            variants["static"] = q.quantize_int8_static(src, sta, reader, symmetric=False, method=o.static_method)
        except Exception as e:  # noqa: BLE001 - a graph ORT's static quantizer cannot take: recorded
            variants["static"] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
        paths = {"fp32": src, "dynamic": dyn, **({"static": sta} if "error" not in variants["static"] else {})}
        feeds = next(iter(StoreReader(self.store, engine, limit=1)))
        ms = time_sessions(paths, feeds, o.measure_runs, o.threads)
        best = min((k for k in paths if k != "fp32"), key=lambda k: ms[k])
        measured = {"cpu_ms_median": ms, "note": "timed side by side on one captured input, contended shared CPU"}
        if ms[best] > CPU_INT8_MARGIN * ms["fp32"]:
            return {"precision": "fp32", "method": "unchanged", "requested": "int8", "path": str(src),
                    "reason": f"no int8 variant is >= 5 % faster than fp32 on this CPU ({_fmt_ms(ms)})",
                    "variants": variants, **measured}
        return {"precision": "int8", "path": str(paths[best]), "variant": best, **variants[best],
                "variants": variants, **measured}


def _fmt_ms(ms: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.3g} ms" for k, v in ms.items())


def time_sessions(paths: dict[str, Path], feeds: dict[str, np.ndarray], runs: int = 3,
                  threads: int | None = None) -> dict[str, float]:
    """Median ms per graph over ``runs`` interleaved runs after one warm-up each (A/B side by side),
    in sessions configured as the runtime's (:class:`agvas.runtime.engines.Engine`: no CPU arena, no
    spin-waiting), so the variant chosen is the one that is fastest where it will run."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or min(2, os.cpu_count() or 1)
    so.log_severity_level = 3
    so.enable_cpu_mem_arena = False
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sessions = {k: ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"]) for k, p in paths.items()}
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for k, s in sessions.items():
        s.run(None, _feeds_for(s, feeds))
    for _ in range(max(1, runs)):
        for k, s in sessions.items():
            f = _feeds_for(s, feeds)
            t = time.perf_counter()
            s.run(None, f)
            times[k].append((time.perf_counter() - t) * 1000.0)
    return {k: round(statistics.median(v), 2) for k, v in times.items()}


def _feeds_for(session, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    types = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}
    return {a.name: np.asarray(feeds[a.name], types.get(a.type, None)) for a in session.get_inputs()}


# ---- the gate on a candidate ----------------------------------------------------------------------

def engine_checks(export_dir: Path, fp32: dict[str, Path], cand: dict[str, Path], store: CalibrationStore,
                  samples: int = 2, threads: int | None = None) -> tuple[dict[str, float], dict[str, float] | None]:
    """Per changed engine, the output SNR (dB) against its fp32 graph on the first captured inputs;
    for a changed ``llm`` also the teacher-forced check (see :class:`agvas.calibration.gate.GateResult`)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or min(2, os.cpu_count() or 1)
    so.log_severity_level = 3
    snr, forced = {}, None
    for engine, path in cand.items():
        if Path(path) == Path(fp32[engine]) or engine not in store.engines:
            continue
        a = ort.InferenceSession(str(fp32[engine]), so, providers=["CPUExecutionProvider"])
        b = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        name = PRIMARY_OUTPUT[engine]
        pairs = []
        feeds_used = []
        for feeds in store.samples(engine, limit=samples):
            pairs.append((a.run([name], _feeds_for(a, feeds))[0].astype(np.float32),
                          b.run([name], _feeds_for(b, feeds))[0].astype(np.float32)))
            feeds_used.append(feeds)
        del a, b
        snr[engine] = snr_db(np.concatenate([r.ravel() for r, _ in pairs]), np.concatenate([g.ravel() for _, g in pairs]))
        if engine == "llm" and "spam" in store.engines:
            forced = _teacher_forced(export_dir, fp32["agmd"], feeds_used, pairs, store, so)
    return snr, forced


def _teacher_forced(export_dir: Path, agmd_path: Path, feeds: list[dict], hidden: list[tuple], store, so):
    """Anchor states of the fp32 and the candidate llm at the forced answer's anchors (state at p-1
    for an anchor at p; anchors found by their embedding rows), decoded by the fp32 agmd with the
    image's pixel embedding (from the captured spam inputs; one prefill per image at batch 1)."""
    import onnxruntime as ort

    from .gate import anchor_cosine, mask_iou

    m = load_export(export_dir, verify="none")
    table = np.load(m.engine_path("embed_tokens"), mmap_mode="r")
    anchors = [int(a) for a in m.token_ids["anchors"]]
    thr = float(m.data["postprocess"]["threshold"])
    agmd = ort.InferenceSession(str(agmd_path), so, providers=["CPUExecutionProvider"])
    pix = [s["pixel_embedding"] for s in store.samples("spam", limit=len(feeds))]
    ious, coss = [], []
    for f, (ref, got), p in zip(feeds, hidden, pix):
        emb = f["inputs_embeds"][0]
        pos = []
        for a in anchors:
            row = np.asarray(table[a], np.float32)
            d = np.linalg.norm(emb - row, axis=1)
            i = int(d.argmin())
            if d[i] > 1e-2 * (np.linalg.norm(row) + 1e-6) or i == 0:
                break
            pos.append(i - 1)
        if len(pos) != len(anchors):
            continue  # this prefill holds no forced answer (fast path off)
        ha, hb = ref[0, pos], got[0, pos]
        ma = agmd.run(["prob"], {"anchor_states": ha[None], "pixel_embedding": p})[0][0] > thr
        mb = agmd.run(["prob"], {"anchor_states": hb[None], "pixel_embedding": p})[0][0] > thr
        ious.append(mask_iou(ma, mb))
        coss.append(anchor_cosine(ha, hb))
    if not ious:
        return None
    return {"images": len(ious), "mask_iou": float(np.mean(ious)), "min_mask_iou": float(np.min(ious)),
            "anchor_cosine": float(np.mean(coss)), "min_anchor_cosine": float(np.min(coss))}


def evaluate(export_dir: Path, store: CalibrationStore, files: dict[str, Path], budget: Budget,
             opts: QuantOptions, progress: bool = True) -> GateResult:
    """Run the export with ``files`` overriding its engines over every image of ``store``."""
    from tqdm import tqdm

    from agvas.runtime import Inspector

    meta = store.meta
    fp32 = {e: Path(export_dir) / ent["file"] for e, ent in load_export(export_dir).engines.items()}
    changed = {e: p for e, p in files.items() if Path(p) != fp32[e]}
    insp = Inspector(export_dir, provider=opts.provider, mode=meta.get("mode", "direct"),
                     vision_tokens=meta.get("vision_tokens"), threads=opts.threads, engine_files=changed,
                     fast_path=meta.get("fast_path", True), threshold=meta.get("threshold"), verify="bytes")
    refs = store.references()
    cands = []
    for r in tqdm(refs, desc="gate", unit="img", disable=not progress, leave=False):
        if not r.path or not Path(r.path).is_file():
            raise FileNotFoundError(f"calibration image {r.path} (recorded in {store.root}) is missing; "
                                    f"the gate reruns every calibration and held-out image")
        cands.append(Outputs.of(insp.inspect(r.path)))
    del insp
    snr, forced = engine_checks(Path(export_dir), fp32, changed, store, opts.snr_samples, opts.threads)
    return compare([r.outputs for r in refs], cands, [r.name for r in refs], [r.split for r in refs], budget, snr,
                   forced)


def load_export(export_dir: str | os.PathLike, verify: str = "bytes"):
    from agvas.export.manifest import load_manifest

    return load_manifest(export_dir, verify=verify)


# ---- writing the quantized export -----------------------------------------------------------------

def write_export(src_manifest, out_dir: Path, files: dict[str, Path], recs: dict[str, dict[str, Any]],
                 calibration: dict[str, Any], gate: dict[str, Any]) -> Path:
    """Copy the fp32 export's other files, place the chosen engine files, write the manifest with
    ``agvas.export.manifest``'s writer (precisions, hashes, calibration record, gate results)."""
    from agvas.export.manifest import onnx_entry, onnx_external_files, write_manifest

    src_root = Path(src_manifest.root)
    engines = src_manifest.engines
    engine_files = set()
    for e, ent in engines.items():
        engine_files.add(ent["file"])
        engine_files.update(x["file"] for x in ent.get("external_data", []))
    out_dir.mkdir(parents=True, exist_ok=True)
    for p in sorted(src_root.rglob("*")):
        rel = p.relative_to(src_root).as_posix()
        # TensorRT plans and caches were built from the fp32 graphs: not carried over
        if p.is_dir() or rel in engine_files or rel == "manifest.json" or rel.split("/")[0] in ("trt", "trt_cache"):
            continue
        (out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(p, out_dir / rel)
    data = copy.deepcopy(src_manifest.data)
    for e, ent in engines.items():
        if ent["format"] != "onnx":
            shutil.copy2(src_root / ent["file"], out_dir / ent["file"])
            continue
        path = Path(files.get(e, src_root / ent["file"]))
        rel = ent["file"]
        (out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, out_dir / rel)
        for x in onnx_external_files(path):
            shutil.copy2(path.parent / x, out_dir / Path(rel).parent / x)
        prec = recs.get(e, {}).get("precision", ent["precision"])
        data["engines"][e] = onnx_entry(out_dir, rel, prec)
    data["created"] = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())
    data["calibration"] = calibration
    data["accuracy_gate"] = gate
    if isinstance(data.get("gpu"), dict) and "tensorrt_ep" in data["gpu"]:
        # the GPU settings follow the new precisions (agvas.export.tensorrt.gpu_settings): a QDQ int8
        # engine gets trt_int8_enable and no calibration table (ORT: a QDQ model takes none), and
        # the TensorRT build recipe builds it as explicitly quantized; build_engines.sh is rewritten
        from agvas.export.tensorrt import BUILD_SCRIPT, DEFAULT_WORKSPACE_MB, gpu_settings, write_build_script

        native = data["gpu"].get("tensorrt") or {}
        max_batch = int(native.get("max_batch", 4))
        workspace_mb = int(native.get("workspace_mb", DEFAULT_WORKSPACE_MB))
        data["gpu"] = gpu_settings(data, max_batch, workspace_mb)
        if (src_root / BUILD_SCRIPT).is_file():
            write_build_script(out_dir, data, max_batch, workspace_mb)
    write_manifest(out_dir, data)
    return out_dir


@dataclass
class Outcome:
    out_dir: Path | None
    gate: GateResult
    choice: dict[str, str]
    trials: list[dict[str, Any]]


def quantize_export(engines_dir: str | os.PathLike, calib_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                    llm: str = "int4", vision: str = "int8", auto: bool = False, budget: Budget | None = None,
                    opts: QuantOptions | None = None, force: bool = False, overwrite: bool = False,
                    progress: bool = True, log: Callable[[str], None] = print) -> Outcome:
    """Quantize ``engines_dir`` with the calibration data of ``calib_dir`` into ``out_dir``.

    Without ``auto`` the requested precisions are built and gated; below budget nothing is
    written unless ``force`` (then the manifest records the failed gate). With ``auto`` each engine
    walks its ladder cheapest first (LLM, then vision, sam_encoder, spam) keeping the first
    precision whose cumulative candidate passes the gate."""
    from agvas.export.manifest import file_digest

    opts = opts or QuantOptions()
    budget = budget or Budget()
    engines_dir, out_dir = Path(engines_dir), Path(out_dir)
    m = load_export(engines_dir, verify="sha256")
    store = CalibrationStore(calib_dir)
    want = store.meta["export"]["manifest_sha256"]
    have = file_digest(m.root / "manifest.json")[0]
    if want != have:
        raise ValueError(f"--calib {calib_dir} was captured from an export whose manifest has sha256 {want} "
                         f"({store.meta['export']['dir']}), but --engines {engines_dir} has {have}")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise ValueError(f"--out {out_dir} exists and is not empty (use --overwrite to replace it)")
    if llm not in LLM_LADDER:
        raise ValueError(f"--llm {llm!r}: expected one of {list(LLM_LADDER)}")
    if vision not in ("int8", "fp16", "fp32"):
        raise ValueError(f"--vision {vision!r}: expected one of int8, fp16, fp32")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}.work.") as tmp:
        builder = EngineBuilder(m, store, Path(tmp), opts, log)
        trials: list[dict[str, Any]] = []

        def trial(choice: dict[str, str]) -> tuple[GateResult, dict, dict]:
            files, recs = builder.files(choice)
            g = evaluate(engines_dir, store, files, budget, opts, progress)
            trials.append({"choice": dict(choice), "delivered": {e: r["precision"] for e, r in recs.items()},
                           "passed": g.passed, "mean_mask_iou": g.mean_mask_iou, "min_mask_iou": g.min_mask_iou,
                           "verdict_agreement": g.verdict_agreement, "anchor_cosine": g.anchor_cosine,
                           "text_agreement": g.text_agreement,
                           "bytes": {e: r.get("bytes") for e, r in recs.items()}})
            log(f"quantize: gate {'PASS' if g.passed else 'FAIL'} for {choice} (mean IoU {g.mean_mask_iou:.4f}, "
                f"verdict {g.verdict_agreement:.2%}, anchor cos {g.anchor_cosine:.5f})")
            return g, files, recs

        if auto:
            choice = {"llm": "fp32", **{e: "fp32" for e in VISION_ENGINES}}
            last = None
            for engine, ladder in [("llm", LLM_LADDER)] + [(e, vision_ladder(opts.target)) for e in VISION_ENGINES]:
                for prec in ladder:
                    if prec == "fp32":
                        choice[engine] = "fp32"
                        break
                    built = builder.build(engine, prec)[1]
                    if built["precision"] != prec:  # int8 not faster than fp32 on this CPU: nothing to gate
                        trials.append({"choice": {**choice, engine: prec}, "skipped": built.get("reason")})
                        continue
                    result = trial({**choice, engine: prec})
                    if result[0].passed:
                        choice[engine] = prec
                        last = result
                        break
            gate, files, recs = last if last is not None else trial(choice)
        else:
            choice = {"llm": llm, **{e: vision for e in VISION_ENGINES}}
            gate, files, recs = trial(choice)
        calibration = {
            "calibration_dir": str(Path(calib_dir).resolve()), "captured": store.meta.get("created"),
            "source_export": {"dir": str(engines_dir.resolve()), "manifest_sha256": have},
            "images": {s: sum(im["split"] == s for im in store.images) for s in ("calibration", "held_out")},
            "samples": {e: store.count(e) for e in store.engines}, "store_dtype": store.meta.get("store_dtype"),
            "options": asdict(opts), "auto": auto, "requested": {"llm": llm, "vision": vision} if not auto else "auto",
            "precisions": {e: r["precision"] for e, r in recs.items()},
            "engines": {e: _jsonable(r) for e, r in recs.items()}, "trials": _jsonable(trials),
            "tensorrt_tables": store.meta.get("tensorrt"),
        }
        gate_rec = {**gate.to_manifest(), "provider": opts.provider}
        if not gate.passed and not force:
            return Outcome(None, gate, {e: r["precision"] for e, r in recs.items()}, trials)
        staging = Path(tmp) / "export"
        write_export(m, staging, files, recs, calibration, _jsonable(gate_rec))
        from agvas.atomic import publish_dir

        publish_dir(staging, out_dir)  # the umask's modes on every file, then the rename
    return Outcome(out_dir, gate, {e: r["precision"] for e, r in recs.items()}, trials)


def _jsonable(x: Any) -> Any:
    """JSON-safe copy: non-finite floats (the SNR of identical outputs) become None, paths strings."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return float(x) if np.isfinite(x) else None
    if isinstance(x, (np.integer, np.bool_)):
        return x.item()
    if x is None or isinstance(x, (str, int, bool)):
        return x
    return str(x)
