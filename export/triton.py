"""``agvas export --target triton --out REPO``: a Triton Inference Server model repository.

::

    REPO/
      agvas/                  entry point, Python backend (BLS): encoded image -> mask, prob, verdict, text
        config.pbtxt
        1/model.py            export/triton_model.py: runtime.Inspector with its engines called over BLS
        1/export/             manifest.json, tokenizer/, embed_tokens.npy, image_newline.npy
      agvas_vision/           one model per engine: onnxruntime backend, or tensorrt_plan where
      agvas_sam_encoder/      ``python -m agvas.export.tensorrt`` built a plan (trt/NAME.plan)
      agvas_spam/             the vision parts and lm_head: dynamic batching (the batch axis is the
      agvas_agmd/             engine's first, dynamic axis: crops for vision, images for the rest)
      agvas_lm_head/
      agvas_llm/              max_batch_size 0: the KV cache travels with every call, so requests of
                              different lengths cannot be merged; the BLS model batches prefills itself

Every engine model's inputs and outputs are the manifest's (names, dtypes; dims without the batch
axis when batched, named axes as -1). ``--checkpoint`` may be a checkpoint (exported first, into a
temporary folder) or an existing export directory (fp32, fp16 or ``agvas quantize`` output),
which is repackaged as it is.

The ``config.pbtxt`` files are written by :func:`to_pbtxt` (protobuf text format) rather than
through Triton's ``model_config.proto``: that schema ships only in ``tritonclient[grpc]``, whose
protobuf pin clashes with ours. ``tests/test_triton_repo.py`` parses every file against it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .manifest import MANIFEST_NAME, Manifest, load_manifest

ENTRY_MODEL = "agvas"
PREFIX = "agvas_"
ENGINE_MODELS = ("vision", "sam_encoder", "spam", "agmd", "lm_head", "llm")
UNBATCHED = ("llm",)
QUEUE_DELAY_US = 2000
ENTRY_MAX_BATCH = 8  # requests one `execute` of the entry model may take (their prefills are shared)
TRITON_DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16", "int64": "TYPE_INT64",
                 "int32": "TYPE_INT32", "int8": "TYPE_INT8", "uint8": "TYPE_UINT8", "bool": "TYPE_BOOL"}
MODEL_PY = Path(__file__).with_name("triton_model.py")
ENTRY_IO = {  # the entry model's tensors (per request; the batch axis of 1 is Triton's)
    "input": [("image", "TYPE_STRING", [1])],
    "output": [("mask", "TYPE_UINT8", [-1, -1]), ("prob", "TYPE_FP32", [-1, -1]), ("verdict", "TYPE_BOOL", [1]),
               ("area_px", "TYPE_INT64", [1]), ("max_score", "TYPE_FP32", [1]), ("text", "TYPE_STRING", [1])],
}


class Enum(str):
    """A protobuf enum value: written bare (``TYPE_FP32``), not quoted."""


# ---- protobuf text format ---------------------------------------------------------------------------

def _quote(s: str) -> str:
    out = []
    for b in s.encode("utf-8"):
        c = chr(b)
        out.append("\\" + c if c in '"\\' else c if 32 <= b < 127 else f"\\{b:03o}")
    return '"' + "".join(out) + '"'


def _scalar(v: Any) -> str:
    if isinstance(v, Enum):
        return str(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return _quote(str(v))


def to_pbtxt(msg: dict[str, Any], indent: int = 0) -> str:
    """A message as protobuf text: dicts are messages, lists of dicts repeated messages
    (``field [ {...}, {...} ]``), lists of scalars ``field: [ 1, 2 ]``, :class:`Enum` bare."""
    pad = "  " * indent
    lines = []
    for key, v in msg.items():
        if isinstance(v, dict):
            lines += [f"{pad}{key} {{", to_pbtxt(v, indent + 1), f"{pad}}}"]
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            lines.append(f"{pad}{key} [")
            for j, x in enumerate(v):
                lines += [f"{pad}  {{", to_pbtxt(x, indent + 2), f"{pad}  }}" + ("," if j < len(v) - 1 else "")]
            lines.append(f"{pad}]")
        elif isinstance(v, list):
            lines.append(f"{pad}{key}: [ {', '.join(_scalar(x) for x in v)} ]")
        else:
            lines.append(f"{pad}{key}: {_scalar(v)}")
    return "\n".join(ln for ln in lines if ln)


# ---- configs -----------------------------------------------------------------------------------------

def _tensor(engine: str, x: dict, batched: bool) -> dict:
    if x["dtype"] not in TRITON_DTYPES:
        raise ValueError(f"engine {engine!r} tensor {x['name']!r}: dtype {x['dtype']} has no Triton type "
                         f"(known: {sorted(TRITON_DTYPES)})")
    dims = x["shape"][1:] if batched else x["shape"]
    return {"name": x["name"], "data_type": Enum(TRITON_DTYPES[x["dtype"]]),
            "dims": [d if isinstance(d, int) else -1 for d in dims]}


def _max_batch(m: Manifest, engine: str, max_batch: int, plan: bool) -> int:
    """The largest batch Triton may form: a TensorRT plan's profile maximum; for ONNX Runtime
    ``max_batch`` images (the vision engine batches crops: that many images' worth of them).

    A plan's profile is the one its builder recorded beside it (``trt/<engine>.plan.json``, written
    by ``build_engines.sh`` and ``python -m agvas.export.tensorrt``, so a plan rebuilt with another
    ``--max-batch`` is served with its own); a plan without that record is taken to have the
    export's profile (``gpu.tensorrt.profiles``)."""
    from .tensorrt import axis_ranges, plan_record

    native = (m.data.get("gpu") or {}).get("tensorrt") or {}
    profiles = native.get("profiles") or {}
    if plan:
        rel = (native.get("plans") or {}).get(engine)
        rec = plan_record(m.root / rel) if rel else None
        prof = (rec or {}).get("profile") or profiles.get(engine)
        if prof:
            return min(int(p["max"][0]) for p in prof.values())
    return axis_ranges(m.data, max_batch)["n_crops"][2] * max_batch if engine == "vision" else max_batch


def engine_config(m: Manifest, engine: str, *, max_batch: int = 4, plan: bool = False, instances: int = 1,
                  prefix: str = PREFIX) -> dict[str, Any]:
    """``config.pbtxt`` of one engine model (as a dict for :func:`to_pbtxt`)."""
    e = m.engine(engine)
    ios = e["inputs"] + e["outputs"]
    batched = engine not in UNBATCHED and max_batch > 0 and all(isinstance(x["shape"][0], str) for x in ios)
    cfg: dict[str, Any] = {"name": prefix + engine}
    if plan:
        cfg.update(platform="tensorrt_plan", default_model_filename="model.plan")
    else:
        cfg.update(backend="onnxruntime", default_model_filename=Path(e["file"]).name)
    cfg["max_batch_size"] = _max_batch(m, engine, max_batch, plan) if batched else 0
    cfg["input"] = [_tensor(engine, x, batched) for x in e["inputs"]]
    cfg["output"] = [_tensor(engine, x, batched) for x in e["outputs"]]
    if batched:
        cfg["dynamic_batching"] = {"max_queue_delay_microseconds": QUEUE_DELAY_US}
    # KIND_AUTO: the GPUs when the server has them (else its CPUs); a TensorRT plan needs a GPU
    cfg["instance_group"] = [{"count": instances, "kind": Enum("KIND_GPU" if plan else "KIND_AUTO")}]
    return cfg


def entry_config(models: dict[str, str], *, mode: str = "direct", prefill_batch: int = 4, instances: int = 1,
                 name: str = ENTRY_MODEL) -> dict[str, Any]:
    """``config.pbtxt`` of the Python-backend entry model; ``parameters`` reach ``model.py``."""
    params = {"engine_models": json.dumps(models, sort_keys=True), "mode": mode, "normal_sentence": "",
              "vision_tokens": "", "threshold": "", "min_area": "0", "fast_path": "true",
              "prefill_batch": str(prefill_batch), "max_pixels": ""}
    return {
        "name": name, "backend": "python", "max_batch_size": ENTRY_MAX_BATCH,
        "input": [{"name": n, "data_type": Enum(t), "dims": d} for n, t, d in ENTRY_IO["input"]],
        "output": [{"name": n, "data_type": Enum(t), "dims": d} for n, t, d in ENTRY_IO["output"]],
        "dynamic_batching": {"max_queue_delay_microseconds": QUEUE_DELAY_US},
        # the orchestration runs on the CPU; the engine models it calls sit where their configs say
        "instance_group": [{"count": instances, "kind": Enum("KIND_CPU")}],
        "parameters": [{"key": k, "value": {"string_value": v}} for k, v in params.items()],
    }


# ---- the repository --------------------------------------------------------------------------------------

def _plan(m: Manifest, engine: str) -> Path | None:
    rel = (((m.data.get("gpu") or {}).get("tensorrt") or {}).get("plans") or {}).get(engine)
    return m.root / rel if rel and (m.root / rel).is_file() else None


def write_repository(export_dir: str | os.PathLike, out: str | os.PathLike, *, max_batch: int = 4,
                     instances: int = 1, mode: str = "direct", overwrite: bool = False) -> Path:
    """Build the model repository for ``export_dir`` in ``out`` (written into a hidden sibling
    folder and renamed at the end, as ``agvas export`` does). Returns ``out``."""
    from agvas.atomic import make_temp_dir, publish_dir, write_text_atomic

    m = load_manifest(export_dir, verify="bytes")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"--out {out} exists and is not empty (pass --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(out.parent, f".{out.name}.partial.")
    try:
        models = {}
        for engine in ENGINE_MODELS:
            plan = _plan(m, engine)
            cfg = engine_config(m, engine, max_batch=max_batch, plan=plan is not None, instances=instances)
            version = tmp / cfg["name"] / "1"
            version.mkdir(parents=True)
            if plan is not None:
                shutil.copy2(plan, version / "model.plan")
            else:
                e = m.engine(engine)
                for rec in [e, *e.get("external_data", [])]:  # external data keeps its name beside the graph
                    shutil.copy2(m.root / rec["file"], version / Path(rec["file"]).name)
            write_text_atomic(tmp / cfg["name"] / "config.pbtxt", to_pbtxt(cfg) + "\n")
            models[engine] = cfg["name"]
        entry = tmp / ENTRY_MODEL / "1"
        (entry / "export").mkdir(parents=True)
        shutil.copy2(MODEL_PY, entry / "model.py")
        shutil.copy2(m.root / MANIFEST_NAME, entry / "export" / MANIFEST_NAME)
        shutil.copytree(m.root / "tokenizer", entry / "export" / "tokenizer")
        for name in ("embed_tokens", "image_newline"):
            shutil.copy2(m.engine_path(name), entry / "export" / m.engine(name)["file"])
        write_text_atomic(tmp / ENTRY_MODEL / "config.pbtxt",
                          to_pbtxt(entry_config(models, mode=mode, instances=instances)) + "\n")
        publish_dir(tmp, out)  # the umask's modes (model.py keeps its x bit if it has one), then the rename
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def run(args: argparse.Namespace) -> int:
    """``agvas export --target triton``: the repository from an export directory, or from a
    checkpoint exported first (``--precision``, ``--opset``, ``--vision-tokens`` apply)."""
    from tqdm import tqdm

    if args.max_batch < 1:
        raise ValueError(f"--max-batch must be >= 1, got {args.max_batch}")
    src, out = Path(args.checkpoint), Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise ValueError(f"--out {out} exists and is not empty (pass --overwrite to replace it)")
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.engines.", dir=out.parent if out.parent.exists() else None) \
            as work:
        export_dir = src
        if not (src / MANIFEST_NAME).is_file():
            from .exporter import export_checkpoint

            with tqdm(total=10, desc="export", unit="step") as bar:
                export_checkpoint(src, Path(work) / "export", precision=args.precision, opset=args.opset,
                                  vision_tokens=args.vision_tokens, max_batch=args.max_batch,
                                  external_threshold=args.external_data_mb << 20,
                                  progress=lambda msg: (bar.set_postfix_str(msg), bar.update(1)))
            export_dir = Path(work) / "export"
        write_repository(export_dir, out, max_batch=args.max_batch, overwrite=args.overwrite)
    tree = {p.name: sorted(str(f.relative_to(p)) for f in p.rglob("*") if f.is_file() and "tokenizer" not in f.parts)
            for p in sorted(out.iterdir())}
    print(json.dumps({"repository": str(out), "models": tree,
                      "serve": f"tritonserver --model-repository {out.resolve()}",
                      "client": "python -m agvas.export.triton_client IMAGE --url localhost:8000"}, indent=1))
    return 0
