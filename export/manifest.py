"""The export directory's ``manifest.json``: schema, writer, loader and validator.

Torch-free and import-light (stdlib + numpy; ``onnx`` is imported lazily inside the functions
that read graphs) because the runtime on an edge box imports it. Every refusal raises
:class:`ManifestError` (a ``ValueError``) whose message names both sides of the mismatch.

Fields (``format_version`` 1):

==================  ============================================================================
field               meaning
==================  ============================================================================
format_version      int, :data:`FORMAT_VERSION`; a loader refuses any other value
created             ISO-8601 UTC time of the export
source              ``checkpoint`` (path as given), ``checkpoint_sha256`` (``checkpoint_hash``),
                    ``config_name``
config              the full AG-VAS config dict (``AGVASConfig.to_dict()``)
token_ids           ``image``, ``anchors`` [NOR, ANO, SEG], ``eos``, ``pad``, ``vocab_size``
engines             name -> entry (below); names in :data:`ENGINE_NAMES`
llm                 ``num_layers``, ``num_heads``, ``num_kv_heads``, ``head_dim``, ``hidden_size``,
                    ``vocab_size``, ``max_positions``, ``positions`` ("explicit": ``position_ids`` is an input;
                    "from_mask": positions = past length + i, derived from ``attention_mask``),
                    ``route`` (how the graph was built), ``kv`` (IO name patterns, layout,
                    dtype), ``attention_mask`` (what the mask must hold), ``logits``
                    ("last": ``llm`` returns the last position; other positions via
                    ``lm_head``), ``fused_ops`` (contrib ops present in the graph)
prompt              ``prompt_format``, ``system_prompt``, ``image_token``, ``eos_token``,
                    ``anchor_tokens``, ``instructions`` {mode: text; describe_plus has a
                    ``{normal}`` slot}, ``direct_answer``, ``max_new_tokens``
preprocessing       ``siglip``: size, patch_size, tokens_per_side, mean, std, rescale_factor,
                    resample, image_grid_pinpoints, vision_aspect_ratio,
                    vision_feature_select_strategy; ``sam``: img_size, mean, std, grid
vision_tokens       ``default`` ("anyres" | "base") and ``supported``
postprocess         ``alpha`` (P = α·P_seg + (1−α)·P_ano), ``threshold`` (mask = P > threshold)
tools               versions of the export tools (torch, transformers, onnx, onnxruntime, ...)
gpu                 ``cuda_ep`` / ``tensorrt_ep`` provider options (fp16/int8 flags, engine cache
                    dir, calibration table name) and ``tensorrt`` (native engines, build script)
export              ``precision``, ``opset``, ``target`` the export was made with
calibration         filled by ``agvas calibrate`` / ``agvas quantize`` (null at export)
accuracy_gate       filled by ``agvas quantize`` (null at export)
==================  ============================================================================

Engine entry: ``file`` (relative to the export dir), ``format`` ("onnx" | "npy"),
``precision`` ("fp32" | "fp16" | "int8" | "int4" ...), ``sha256``, ``bytes``,
``external_data`` (list of ``{file, sha256, bytes}``, ONNX only, may be empty) and for ONNX
``inputs`` / ``outputs``: ``[{name, dtype, shape}]`` with ints for fixed axes and strings for
named dynamic axes (exactly what the graph declares); for npy ``dtype`` and ``shape``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

import numpy as np

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
ONNX_ENGINES = ("vision", "sam_encoder", "spam", "llm", "lm_head", "agmd")
ARRAY_ENGINES = ("embed_tokens", "image_newline")
ENGINE_NAMES = ONNX_ENGINES + ARRAY_ENGINES
REQUIRED_FIELDS = ("format_version", "created", "source", "config", "token_ids", "engines", "llm", "prompt",
                   "preprocessing", "vision_tokens", "postprocess", "tools", "gpu")
VERIFY_MODES = ("sha256", "bytes", "none")

# ONNX TensorProto element type -> numpy-style dtype name (the manifest's spelling).
_ONNX_DTYPES = {1: "float32", 2: "uint8", 3: "int8", 5: "int16", 6: "int32", 7: "int64", 9: "bool",
                10: "float16", 11: "float64", 12: "uint32", 13: "uint64", 16: "bfloat16"}
# ONNX Runtime's ``NodeArg.type`` spelling -> manifest spelling.
_ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
               "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int8)": "int8", "tensor(uint8)": "uint8",
               "tensor(bool)": "bool", "tensor(bfloat16)": "bfloat16"}


class ManifestError(ValueError):
    """An export directory that does not match what is expected; the message names both sides."""


# ---- files --------------------------------------------------------------------------------

def file_digest(path: str | os.PathLike) -> tuple[str, int]:
    """``(sha256 hex, size in bytes)`` of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
            n += len(chunk)
    return h.hexdigest(), n


def _file_record(root: Path, rel: str) -> dict[str, Any]:
    sha, n = file_digest(root / rel)
    return {"file": rel, "sha256": sha, "bytes": n}


def onnx_external_files(path: str | os.PathLike) -> list[str]:
    """Names (relative to the graph's folder) of the external-data files an ONNX graph uses."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    files: set[str] = set()
    for t in _initializers(model.graph):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            files.update(e.value for e in t.external_data if e.key == "location")
    return sorted(files)


def _initializers(graph) -> Iterable:
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.g is not None and attr.g.ByteSize():
                yield from _initializers(attr.g)
            for g in attr.graphs:
                yield from _initializers(g)


# ---- graph IO -----------------------------------------------------------------------------

def onnx_io(path: str | os.PathLike) -> tuple[list[dict], list[dict]]:
    """``(inputs, outputs)`` exactly as an ONNX graph declares them (weights are not loaded)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    inits = {t.name for t in graph.initializer}

    def one(v) -> dict:
        tt = v.type.tensor_type
        shape = [d.dim_param if d.HasField("dim_param") else (int(d.dim_value) if d.HasField("dim_value") else "?")
                 for d in tt.shape.dim]
        return {"name": v.name, "dtype": _ONNX_DTYPES.get(tt.elem_type, f"onnx:{tt.elem_type}"), "shape": shape}

    return [one(v) for v in graph.input if v.name not in inits], [one(v) for v in graph.output]


def session_io(session) -> tuple[list[dict], list[dict]]:
    """``(inputs, outputs)`` of an ``onnxruntime.InferenceSession`` in the manifest's spelling."""
    def one(a) -> dict:
        return {"name": a.name, "dtype": _ORT_DTYPES.get(a.type, a.type),
                "shape": [d if isinstance(d, int) else (d or "?") for d in a.shape]}

    return [one(a) for a in session.get_inputs()], [one(a) for a in session.get_outputs()]


def check_io(engine: str, expected: dict, actual_inputs: list[dict], actual_outputs: list[dict],
             actual_name: str) -> None:
    """Refuse when names, dtypes, ranks or fixed dims of an engine's IO differ from the manifest.

    Named dynamic axes are compared by position only (ONNX Runtime may rename them);
    ``actual_name`` says where the actual IO came from (a file, a session)."""
    for kind, want, got in (("inputs", expected.get("inputs", []), actual_inputs),
                            ("outputs", expected.get("outputs", []), actual_outputs)):
        wn, gn = [x["name"] for x in want], [x["name"] for x in got]
        if sorted(wn) != sorted(gn):
            raise ManifestError(f"engine {engine!r} {kind}: manifest has {wn} but {actual_name} has {gn}")
        gd = {x["name"]: x for x in got}
        for w in want:
            g = gd[w["name"]]
            if w["dtype"] != g["dtype"]:
                raise ManifestError(f"engine {engine!r} {kind[:-1]} {w['name']!r}: manifest dtype {w['dtype']} "
                                    f"but {actual_name} has {g['dtype']}")
            ws, gs = list(w["shape"]), list(g["shape"])
            bad = len(ws) != len(gs) or any(isinstance(a, int) and isinstance(b, int) and a != b
                                            for a, b in zip(ws, gs))
            if bad:
                raise ManifestError(f"engine {engine!r} {kind[:-1]} {w['name']!r}: manifest shape {ws} "
                                    f"but {actual_name} has {gs}")


# ---- entries and writing ------------------------------------------------------------------

def onnx_entry(root: str | os.PathLike, rel: str, precision: str) -> dict[str, Any]:
    """The manifest entry of an ONNX graph in ``root``: digests (graph + external data) and IO."""
    root = Path(root)
    inputs, outputs = onnx_io(root / rel)
    folder = Path(rel).parent
    ext = [_file_record(root, str(folder / f) if str(folder) != "." else f) for f in onnx_external_files(root / rel)]
    return {**_file_record(root, rel), "format": "onnx", "precision": precision, "external_data": ext,
            "inputs": inputs, "outputs": outputs}


def array_entry(root: str | os.PathLike, rel: str, precision: str = "fp32") -> dict[str, Any]:
    """The manifest entry of a ``.npy`` array in ``root`` (dtype and shape read from its header)."""
    root = Path(root)
    arr = np.load(root / rel, mmap_mode="r", allow_pickle=False)
    return {**_file_record(root, rel), "format": "npy", "precision": precision, "dtype": str(arr.dtype),
            "shape": [int(s) for s in arr.shape]}


def new_manifest(**fields: Any) -> dict[str, Any]:
    """A manifest dict with ``format_version`` and ``created`` set and the given fields."""
    base = {"format_version": FORMAT_VERSION, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "calibration": None, "accuracy_gate": None}
    base.update(fields)
    return base


def write_manifest(root: str | os.PathLike, data: dict[str, Any]) -> Path:
    """Validate ``data`` (schema + files present with matching digests) and write it atomically."""
    from agvas.atomic import write_text_atomic

    root = Path(root)
    validate_schema(data, str(root / MANIFEST_NAME))
    Manifest(root, data).verify_files("bytes")
    path = root / MANIFEST_NAME
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")  # the umask's mode (agvas.atomic)
    return path


# ---- schema ---------------------------------------------------------------------------------

def validate_schema(data: Any, where: str) -> None:
    """Refuse a manifest lacking fields or with wrongly typed ones (``where`` names the file)."""
    if not isinstance(data, dict):
        raise ManifestError(f"{where}: expected a JSON object, got {type(data).__name__}")
    if data.get("format_version") != FORMAT_VERSION:
        raise ManifestError(f"{where}: format_version {data.get('format_version')!r} but this code reads "
                            f"format_version {FORMAT_VERSION}")
    missing = [k for k in REQUIRED_FIELDS if k not in data]
    if missing:
        raise ManifestError(f"{where}: missing fields {missing}")
    src = data["source"]
    for k in ("checkpoint", "checkpoint_sha256", "config_name"):
        if not isinstance(src, dict) or k not in src:
            raise ManifestError(f"{where}: source.{k} is missing")
    tid = data["token_ids"]
    if not isinstance(tid, dict) or any(k not in tid for k in ("image", "anchors", "eos", "pad", "vocab_size")) \
            or len(tid["anchors"]) != 3:
        raise ManifestError(f"{where}: token_ids must hold image, anchors [NOR, ANO, SEG], eos, pad, vocab_size; "
                            f"got {tid}")
    engines = data["engines"]
    if not isinstance(engines, dict):
        raise ManifestError(f"{where}: engines must be an object, got {type(engines).__name__}")
    missing = [e for e in ENGINE_NAMES if e not in engines]
    if missing:
        raise ManifestError(f"{where}: engines {missing} are missing (an export has {list(ENGINE_NAMES)})")
    for name, e in engines.items():
        need = ["file", "format", "precision", "sha256", "bytes"]
        need += ["inputs", "outputs"] if e.get("format") == "onnx" else ["dtype", "shape"]
        lack = [k for k in need if k not in e]
        if lack or e.get("format") not in ("onnx", "npy"):
            raise ManifestError(f"{where}: engine {name!r} lacks {lack} or has format {e.get('format')!r} "
                                f"(expected 'onnx' or 'npy')")
    llm = data["llm"]
    for k in ("num_layers", "num_kv_heads", "head_dim", "hidden_size", "vocab_size", "positions", "route"):
        if k not in llm:
            raise ManifestError(f"{where}: llm.{k} is missing")
    if llm["positions"] not in ("explicit", "from_mask"):
        raise ManifestError(f"{where}: llm.positions is {llm['positions']!r}; expected 'explicit' or 'from_mask'")


def _config_diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for k in sorted(set(a) | set(b), key=str):
            p = f"{prefix}.{k}" if prefix else str(k)
            if k not in a or k not in b:
                out.append(p)
            else:
                out += _config_diff(a[k], b[k], p)
        return out
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return [] if [json.dumps(x, sort_keys=True) for x in a] == [json.dumps(x, sort_keys=True) for x in b] \
            else [prefix]
    return [] if a == b else [prefix]


# ---- the loaded manifest --------------------------------------------------------------------

@dataclass
class Manifest:
    """A loaded export directory: ``root`` and the manifest ``data`` with typed accessors."""

    root: Path
    data: dict[str, Any]

    @property
    def engines(self) -> dict[str, dict]:
        return self.data["engines"]

    @property
    def token_ids(self) -> dict[str, Any]:
        return self.data["token_ids"]

    @property
    def config(self) -> dict[str, Any]:
        return self.data["config"]

    @property
    def llm(self) -> dict[str, Any]:
        return self.data["llm"]

    def engine(self, name: str) -> dict[str, Any]:
        try:
            return self.engines[name]
        except KeyError:
            raise ManifestError(f"{self.root / MANIFEST_NAME}: no engine {name!r}; it has {sorted(self.engines)}") \
                from None

    def engine_path(self, name: str) -> Path:
        return self.root / self.engine(name)["file"]

    def input_names(self, name: str) -> list[str]:
        return [x["name"] for x in self.engine(name)["inputs"]]

    def output_names(self, name: str) -> list[str]:
        return [x["name"] for x in self.engine(name)["outputs"]]

    # ---- checks ------------------------------------------------------------------------------
    def verify_source(self, checkpoint_sha256: str | None = None, config: str | dict | None = None) -> None:
        """Refuse when the export was made from another checkpoint or config than expected.

        ``config``: a config name or a full config dict (``AGVASConfig.to_dict()``)."""
        where = self.root / MANIFEST_NAME
        src = self.data["source"]
        if checkpoint_sha256 is not None and src["checkpoint_sha256"] != checkpoint_sha256:
            raise ManifestError(f"{where}: exported from checkpoint {src['checkpoint']} with sha256 "
                                f"{src['checkpoint_sha256']} but the expected checkpoint has sha256 {checkpoint_sha256}")
        if isinstance(config, str) and config != src["config_name"]:
            raise ManifestError(f"{where}: exported from config {src['config_name']!r} but config {config!r} "
                                f"is expected")
        if isinstance(config, dict):
            diff = [k for k in _config_diff(self.config, config) if k != "tokenizer_dir"]
            if diff:
                k = diff[0]
                raise ManifestError(f"{where}: config differs from the expected one at {diff[:6]} "
                                    f"(manifest {k}={_lookup(self.config, k)!r} vs expected "
                                    f"{k}={_lookup(config, k)!r})")

    def verify_files(self, mode: str = "sha256") -> None:
        """Refuse missing or changed engine files (``mode``: "sha256", "bytes" = sizes only, "none")."""
        if mode not in VERIFY_MODES:
            raise ValueError(f"verify mode must be one of {VERIFY_MODES}, got {mode!r}")
        if mode == "none":
            return
        for name, e in self.engines.items():
            for rec in [e] + list(e.get("external_data", [])):
                path = self.root / rec["file"]
                if not path.is_file():
                    raise ManifestError(f"engine {name!r}: the manifest lists {rec['file']} ({rec['bytes']} bytes) "
                                        f"but {path} does not exist")
                size = path.stat().st_size
                if size != rec["bytes"]:
                    raise ManifestError(f"engine {name!r}: {path} has {size} bytes but the manifest says "
                                        f"{rec['bytes']} bytes")
                if mode == "sha256":
                    sha, _ = file_digest(path)
                    if sha != rec["sha256"]:
                        raise ManifestError(f"engine {name!r}: {path} has sha256 {sha} but the manifest says "
                                            f"{rec['sha256']}")
            if e["format"] == "npy":
                arr = np.load(self.root / e["file"], mmap_mode="r", allow_pickle=False)
                if str(arr.dtype) != e["dtype"] or list(arr.shape) != list(e["shape"]):
                    raise ManifestError(f"engine {name!r}: {self.root / e['file']} is {arr.dtype} {list(arr.shape)} "
                                        f"but the manifest says {e['dtype']} {e['shape']}")

    def verify_io(self, names: Iterable[str] | None = None) -> None:
        """Refuse when an ONNX graph's declared IO differs from its manifest entry."""
        for name in names or [n for n, e in self.engines.items() if e["format"] == "onnx"]:
            e = self.engine(name)
            ins, outs = onnx_io(self.root / e["file"])
            check_io(name, e, ins, outs, str(self.root / e["file"]))

    def verify_session(self, name: str, session) -> None:
        """Refuse when a loaded ``onnxruntime.InferenceSession`` differs from the manifest entry."""
        ins, outs = session_io(session)
        check_io(name, self.engine(name), ins, outs, f"the ONNX Runtime session for {self.engine(name)['file']}")


def _lookup(d: Any, dotted: str) -> Any:
    for k in dotted.split("."):
        if not isinstance(d, dict) or k not in d:
            return "<absent>"
        d = d[k]
    return d


def load_manifest(root: str | os.PathLike, *, checkpoint_sha256: str | None = None,
                  config: str | dict | None = None, verify: str = "sha256", check_io: bool = False) -> Manifest:
    """Load and validate ``root/manifest.json``.

    Always: schema and format version. ``verify``: engine files by "sha256" (default), "bytes"
    or "none". ``checkpoint_sha256`` / ``config`` (name or dict): refuse an export of another
    checkpoint/config. ``check_io``: compare every ONNX graph's declared IO with the manifest.
    """
    root = Path(root)
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"export directory {root}: no {MANIFEST_NAME} (not an AG-VAS export)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path}: not valid JSON ({e})") from None
    validate_schema(data, str(path))
    m = Manifest(root, data)
    m.verify_source(checkpoint_sha256, config)
    m.verify_files(verify)
    if check_io:
        m.verify_io()
    return m
