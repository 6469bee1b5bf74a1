"""TensorRT engines for the vision side (``vision``, ``sam_encoder``, ``spam``, ``agmd``).

TensorRT engines are specific to the GPU and the TensorRT version, so they are built on the
target (a Jetson with JetPack 6: TensorRT 8.6 or 10.3; an x86 server: TensorRT 10) from the
export's ONNX files, by either

- ``build_engines.sh`` (written into the export by ``agvas export --target tensorrt`` and by
  ``agvas quantize``): ``trtexec`` with one optimisation profile per engine from the manifest's
  dynamic axes; or
- ``python -m agvas.export.tensorrt EXPORT_DIR``: the same with the ``tensorrt`` Python API.

Both take ``--int8 --calib-dir CAL`` (CAL: what ``agvas calibrate --out CAL`` wrote; default
``EXPORT/calibration``) and ``--dry-run`` (print one ``trtexec`` command per engine, exit 0 only
when every file it names exists, else name the missing file and the command that makes it).

How an engine is built depends on its graph (:func:`engine_mode`) and on the TensorRT major
version (:func:`build_recipe`, the one place the version-specific choices live):

- ``fp32`` graph: ``--fp16`` (weakly typed; the LayerNorm/Softmax-family layers held in fp32 by
  precision constraints) and, with ``--int8``, implicit INT8 from a calibration cache:
  ``trtexec --int8 --calib=CAL/tensorrt/<engine>/tensorrt.cache`` (ONNX Runtime's min-max ranges in
  TensorRT's cache format; the script stamps its header with the installed TensorRT version, as
  TensorRT ignores a cache of another version) or, in the Python builder, entropy calibration on
  the captured samples (``IInt8EntropyCalibrator2``, cache ``CAL/tensorrt/<engine>/entropy.cache``);
- ``fp16`` graph (``--precision fp16``): TensorRT 10 builds it strongly typed (the ONNX types are
  the engine's: fp16 compute, the fp32-kept layers in fp32); TensorRT 8.6 with ``--fp16`` and the
  same precision constraints;
- ``qdq`` graph (``agvas quantize --target tensorrt``, explicit quantization): TensorRT 10 strongly
  typed; TensorRT 8.6 ``--int8`` without a calibration cache.

Networks are explicit-batch: below TensorRT 10 that is the ``EXPLICIT_BATCH`` creation flag the
ONNX parser requires; from 10 on it is the only mode (the flag is deprecated and ignored).
The LLM is not built here: it runs in ONNX Runtime (CUDA EP, or TensorRT EP with CUDA fallback
for ``GroupQueryAttention``). Torch-free; ``tensorrt`` is imported only when building.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .manifest import ONNX_ENGINES, load_manifest, onnx_external_files

TRT_ENGINES = ("vision", "sam_encoder", "spam", "agmd")
PLAN_DIR = "trt"
PLAN_RECORD = "trt/{engine}.plan.json"  # what a builder built: profile, TensorRT version, flags
BUILD_SCRIPT = "build_engines.sh"
DEFAULT_WORKSPACE_MB = 4096
TENSORRT_OPSET = 17  # the newest opset TensorRT 8.6's ONNX parser reads; `agvas export --target tensorrt` default
TRT_MAJORS = (8, 10)  # what the build script knows flags for (TensorRT 8.6 and 10.x)

# The calibration directory (`agvas calibrate --out CAL`), relative paths under it:
DEFAULT_CALIB_DIR = "calibration"  # relative to the export directory, when --calib-dir is not given
TRT_CACHE = "tensorrt/{engine}/tensorrt.cache"  # trtexec --calib: TensorRT cache format, ORT min-max ranges
ENTROPY_CACHE = "tensorrt/{engine}/entropy.cache"  # the Python builder's IInt8EntropyCalibrator2 cache
EP_TABLE = "tensorrt/{engine}/calibration.flatbuffers"  # ORT TensorRT EP (trt_int8_use_native_calibration_table 0)
CACHE_ALGORITHM = "EntropyCalibration2"  # trtexec's calibrator is an IInt8EntropyCalibrator2
MODES = ("fp32", "fp16", "qdq")


def calibrate_hint(export_dir: str | os.PathLike, calib_dir: str | os.PathLike) -> str:
    return f"run: agvas calibrate --engines {export_dir} --images IMAGES --out {calib_dir}"


# ---- profiles ------------------------------------------------------------------------------------

def axis_ranges(data: dict[str, Any], max_batch: int) -> dict[str, tuple[int, int, int]]:
    """(min, opt, max) for each named dynamic axis of the export, from its config.

    ``n_crops``: 1 .. base tile + every crop of the largest anyres grid (opt: base + 9);
    ``n_tokens`` (SPAM's N): base-only (T+1) .. the anyres_max_9 bound; ``batch``: 1 .. max_batch.
    """
    cfg = data["config"]
    vc = cfg["llava"]["vision_config"]
    side = int(vc["image_size"]) // int(vc["patch_size"])
    t = side * side
    pins = cfg["llava"]["image_grid_pinpoints"]
    size = int(vc["image_size"])
    max_crops = max(int(h) // size * (int(w) // size) for h, w in pins)
    max_rows = max(int(h) // size for h, _ in pins)
    k = int(str(cfg["llava"].get("vision_aspect_ratio", "anyres_max_9")).rsplit("_", 1)[-1])
    # after unpadding HF keeps up to 1.1² x k tiles before it downsamples; one newline per row
    n_max = t + min(max_crops * t, math.ceil(1.21 * k * t)) + side * max_rows
    n_opt = min(n_max, t + k * t + side * min(max_rows, round(math.sqrt(k))))
    return {"n_crops": (1, min(1 + k, 1 + max_crops), 1 + max_crops), "n_tokens": (t + 1, n_opt, n_max),
            "batch": (1, 1, max_batch)}


def profiles(data: dict[str, Any], max_batch: int = 4) -> dict[str, dict[str, dict[str, list[int]]]]:
    """engine -> input -> {min, opt, max} shapes for the TensorRT optimisation profiles."""
    ranges = axis_ranges(data, max_batch)
    out: dict[str, dict[str, dict[str, list[int]]]] = {}
    for name in TRT_ENGINES:
        out[name] = {}
        for inp in data["engines"][name]["inputs"]:
            shp: dict[str, list[int]] = {k: [] for k in ("min", "opt", "max")}
            for d in inp["shape"]:
                if isinstance(d, int):
                    lo = opt = hi = d
                elif d in ranges:
                    lo, opt, hi = ranges[d]
                else:
                    raise ValueError(f"engine {name!r} input {inp['name']!r}: no profile for dynamic axis {d!r} "
                                     f"(known: {sorted(ranges)})")
                for k, v in zip(("min", "opt", "max"), (lo, opt, hi)):
                    shp[k].append(v)
            out[name][inp["name"]] = shp
    return out


def _shape_arg(prof: dict[str, dict[str, list[int]]], which: str) -> str:
    return ",".join(f"{name}:{'x'.join(str(d) for d in s[which])}" for name, s in prof.items())


def trt_ep_profile_options(prof: dict[str, dict[str, list[int]]]) -> dict[str, str]:
    """The same profile as ONNX Runtime TensorRT-EP provider options."""
    return {f"trt_profile_{w}_shapes": _shape_arg(prof, w) for w in ("min", "opt", "max")}


# ---- what kind of graph an engine is ---------------------------------------------------------------

def engine_mode(data: dict[str, Any], name: str) -> str:
    """``fp32``, ``fp16`` or ``qdq`` (explicitly quantized int8) for engine ``name`` of a manifest.

    An int8 engine is QDQ when ``agvas quantize`` recorded static QDQ quantization with symmetric
    activations (``--target tensorrt``/``cuda``); a dynamic-quantized graph or asymmetric (uint8)
    activations (``--target cpu``) are not TensorRT graphs — ValueError naming the engine."""
    prec = data["engines"][name]["precision"]
    if prec in ("fp32", "fp16"):
        return prec
    if prec != "int8":
        raise ValueError(f"engine {name!r}: precision {prec!r} has no TensorRT build (expected fp32, fp16 or int8)")
    rec = ((data.get("calibration") or {}).get("engines") or {}).get(name) or {}
    method = str(rec.get("method", ""))
    if "dynamic" in method or rec.get("variant") == "dynamic":
        raise ValueError(f"engine {name!r} is dynamic-quantized int8 ({method}): TensorRT cannot build it; "
                         f"quantize with `agvas quantize --target tensorrt` (static QDQ, symmetric)")
    if rec.get("activation_symmetric") is False:
        raise ValueError(f"engine {name!r} is QDQ int8 with asymmetric (uint8) activations (agvas quantize "
                         f"--target cpu); TensorRT quantizes symmetrically: use `agvas quantize --target tensorrt`")
    return "qdq"


def engine_modes(data: dict[str, Any]) -> dict[str, str]:
    """engine -> mode, or ``"unsupported: <reason>"``."""
    out = {}
    for name in TRT_ENGINES:
        try:
            out[name] = engine_mode(data, name)
        except ValueError as e:
            out[name] = f"unsupported: {e}"
    return out


def fp32_layer_names(onnx_path: str | os.PathLike) -> list[str]:
    """Names of the graph's LayerNorm/Softmax-family nodes (``agvas.export.precision.FP32_OPS``), which
    the fp16 export keeps in fp32. TensorRT's ONNX parser names a node's layer after the node, so
    these are the layers a weakly typed ``--fp16`` build constrains to fp32. Left out: names
    trtexec's ``--layerPrecisions`` grammar cannot carry (``,`` or ``:``) and nodes with more than
    one output (``--layerOutputTypes`` would need one type per output)."""
    import onnx

    from .precision import FP32_OPS

    model = onnx.load(str(onnx_path), load_external_data=False)
    return [n.name for n in model.graph.node
            if n.op_type in FP32_OPS and n.name and "," not in n.name and ":" not in n.name and len(n.output) == 1]


# ---- the version-dispatch seam ----------------------------------------------------------------------

@dataclass(frozen=True)
class BuildRecipe:
    """How to build one engine with one TensorRT major version.

    ``flags``: ``trt.BuilderFlag`` member names; ``strongly_typed``: the network creation flag
    ``STRONGLY_TYPED`` (TensorRT >= 10: the ONNX types are the engine's; no precision flags);
    ``calibrate``: implicit INT8 from a calibrator / calibration cache; ``fp32_layers``: layers held
    in fp32 (``layer.precision`` + output types, with ``OBEY_PRECISION_CONSTRAINTS``)."""

    major: int
    mode: str
    strongly_typed: bool = False
    flags: tuple[str, ...] = ()
    calibrate: bool = False
    fp32_layers: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default=(), compare=False)


def trt_major(version: str | Any) -> int:
    """The major version of a ``tensorrt`` module or a version string (``"8.6.2.3"``, ``"10.3.0"``)."""
    v = version if isinstance(version, str) else getattr(version, "__version__", "")
    try:
        return int(str(v).split(".")[0])
    except ValueError:
        raise ValueError(f"cannot read a TensorRT major version from {v!r}") from None


def build_recipe(major: int, mode: str, *, fp16: bool = True, int8: bool = False,
                 fp32_layers: tuple[str, ...] | list[str] = ()) -> BuildRecipe:
    """The build choices for an engine of ``mode`` on TensorRT ``major`` (8: 8.6; 10: 10.x).

    ValueError for a version this code has no flags for (TensorRT 11 removed ``--fp16``, ``--int8``
    and calibration caches) and for a combination TensorRT cannot build (``--int8`` calibration of
    an fp16 graph)."""
    if major not in TRT_MAJORS:
        raise ValueError(f"TensorRT {major}.x: the builders know the flags of TensorRT 8.6 and 10.x")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    layers = tuple(fp32_layers)
    if mode == "qdq":  # explicit quantization: the Q/DQ nodes say where int8 runs; never a calibrator
        if major >= 10:
            return BuildRecipe(major, mode, strongly_typed=True,
                               notes=("explicit quantization, strongly typed (no precision flags)",))
        return BuildRecipe(major, mode, flags=("INT8",) + (("FP16",) if fp16 else ()),
                           notes=("explicit quantization: INT8 enabled, no calibration cache",))
    if int8 and mode == "fp16":
        raise ValueError("--int8 calibrates the fp32 graphs (agvas calibrate runs the fp32 export): build int8 "
                         "engines from the fp32 export, or quantize with `agvas quantize --target tensorrt`")
    if mode == "fp16" and major >= 10:
        return BuildRecipe(major, mode, strongly_typed=True,
                           notes=("strongly typed: the fp16 graph's types, fp32-kept layers in fp32",))
    weak_fp16 = fp16 or mode == "fp16"  # an fp16 graph needs FP16 enabled on a weakly typed network
    flags: tuple[str, ...] = ()
    if weak_fp16:
        flags += ("FP16",)
    if int8:
        flags += ("INT8",)
    kept = layers if weak_fp16 else ()
    if kept:
        flags += ("OBEY_PRECISION_CONSTRAINTS",)
    return BuildRecipe(major, mode, flags=flags, calibrate=int8, fp32_layers=kept)


def network_flags(trt, recipe: BuildRecipe) -> int:
    """``create_network`` flags: ``EXPLICIT_BATCH`` below TensorRT 10 (the ONNX parser needs an
    explicit-batch network; in 10 the flag is deprecated and ignored), ``STRONGLY_TYPED`` when the
    recipe says so."""
    flags = 0
    if recipe.major < 10:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    if recipe.strongly_typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    return flags


_TRTEXEC_FLAGS = {"FP16": "--fp16", "INT8": "--int8"}


def trtexec_flags(recipe: BuildRecipe, *, calib: str | None = None, layers: str | None = None) -> list[str]:
    """``trtexec`` options for a recipe. ``calib``: the calibration cache path; ``layers``: the
    ``--layerPrecisions`` list (default: from the recipe)."""
    out = ["--stronglyTyped"] if recipe.strongly_typed else []
    out += [_TRTEXEC_FLAGS[f] for f in recipe.flags if f in _TRTEXEC_FLAGS]
    if recipe.calibrate:
        if not calib:
            raise ValueError("an INT8-calibrated build needs its calibration cache")
        out.append(f"--calib={calib}")
    if recipe.fp32_layers:
        spec = layers if layers is not None else ",".join(f"{n}:fp32" for n in recipe.fp32_layers)
        out += ["--precisionConstraints=obey", f"--layerPrecisions={spec}", f"--layerOutputTypes={spec}"]
    return out


def trtexec_command(name: str, prof: dict[str, dict[str, list[int]]], workspace_mb: int = DEFAULT_WORKSPACE_MB,
                    onnx: str | None = None) -> list[str]:
    """``trtexec`` arguments building ``trt/{name}.plan`` from ``onnx`` (default ``{name}.onnx``;
    precision flags: :func:`trtexec_flags`). ``--memPoolSize=workspace:N`` is in MiB in both
    TensorRT 8.6 and 10 (8.6 takes no unit suffix)."""
    return ["trtexec", f"--onnx={onnx or name + '.onnx'}", f"--saveEngine={PLAN_DIR}/{name}.plan",
            f"--minShapes={_shape_arg(prof, 'min')}", f"--optShapes={_shape_arg(prof, 'opt')}",
            f"--maxShapes={_shape_arg(prof, 'max')}", f"--memPoolSize=workspace:{int(workspace_mb)}",
            f"--timingCacheFile={PLAN_DIR}/timing.cache", "--skipInference"]


# ---- the build plan (shared by the script, the Python builder and both dry runs) ---------------------

@dataclass
class EnginePlan:
    name: str
    mode: str
    recipe: BuildRecipe | None
    command: list[str]
    needs: list[tuple[str, str]]  # (file, the command that makes it)
    error: str | None = None


def engine_plan(root: Path, data: dict[str, Any], name: str, prof: dict, *, major: int, fp16: bool = True,
                int8: bool = False, calib_dir: Path | None = None, workspace_mb: int = DEFAULT_WORKSPACE_MB,
                fp32_layers: list[str] | None = None) -> EnginePlan:
    """What building engine ``name`` takes on TensorRT ``major``: the trtexec command and the files."""
    entry = data["engines"][name]
    try:
        mode = engine_mode(data, name)
    except ValueError as e:
        return EnginePlan(name, "unsupported", None, [], [], str(e))
    if fp32_layers is None:
        fp32_layers = fp32_layer_names(root / entry["file"]) if (root / entry["file"]).is_file() else []
    layers = fp32_layers
    try:
        recipe = build_recipe(major, mode, fp16=fp16, int8=int8 and mode != "qdq", fp32_layers=layers)
    except ValueError as e:
        return EnginePlan(name, mode, None, [], [], f"engine {name!r} ({mode} graph): {e}")
    redo = "re-run agvas export (the export directory is incomplete)"
    needs = [(entry["file"], redo)] + [(x["file"], redo) for x in entry.get("external_data", [])]
    calib = None
    if recipe.calibrate:
        cal = calib_dir if calib_dir is not None else root / DEFAULT_CALIB_DIR
        calib = str(cal / TRT_CACHE.format(engine=name))
        needs.append((calib, calibrate_hint(root, cal)))
    cmd = trtexec_command(name, prof, workspace_mb, entry["file"]) + trtexec_flags(recipe, calib=calib)
    return EnginePlan(name, mode, recipe, cmd, needs)


def missing_files(root: Path, plans: list[EnginePlan]) -> list[tuple[str, str]]:
    out = []
    for p in plans:
        for f, how in p.needs:
            if not (root / f).exists() and (f, how) not in out:
                out.append((f, how))
    return out


# ---- build_engines.sh ----------------------------------------------------------------------------

def _word(arg: str) -> str:
    """One bash word: literal text single-quoted as needed; text with ``${...}`` double-quoted."""
    return f'"{arg}"' if "${" in arg else shlex.quote(arg)


_SCRIPT_USAGE = [
    "# Build TensorRT engines for the vision-side engines of this AG-VAS export, on the target GPU.",
    "# Usage: ./build_engines.sh [--int8 [--calib-dir CAL]] [--no-fp16] [--dry-run] [--trt-major 8|10] [ENGINE ...]",
    "#   ENGINE        some of {engines} (default: all)",
    "#   --int8        INT8 for the fp32 engines, calibrated by CAL/tensorrt/<engine>/tensorrt.cache, which",
    "#                 `agvas calibrate --engines EXPORT --images IMAGES --out CAL` writes. CAL: --calib-dir",
    "#                 (default: calibration/ in this export). The cache's header is set to the installed",
    "#                 TensorRT before trtexec reads it (TRT-<version>-{algo}): TensorRT ignores a cache",
    "#                 written for another version. QDQ engines (agvas quantize --target tensorrt) are int8",
    "#                 by their graph and never take a cache.",
    "#   --no-fp16     no fp16 kernels for the fp32 engines (fp16 graphs are fp16 by their types)",
    "#   --dry-run     print the trtexec command of each engine; exit 0 only when every file they read exists,",
    "#                 else name each missing file and the command that makes it (exit 2)",
    "#   --trt-major   the TensorRT major version whose flags to use: default the installed trtexec's",
    "#                 (`trtexec --version`), or 10 for a --dry-run without trtexec. TensorRT 10 builds fp16 and",
    "#                 QDQ graphs --stronglyTyped; 8.6 uses --fp16 with the LayerNorm/Softmax layers held in fp32",
    "#                 (--precisionConstraints=obey) and builds QDQ graphs with --int8 and no --calib.",
    "# Each built plan gets trt/<engine>.plan.json (profile, TensorRT version), which the Triton repository",
    "# writer reads. The LLM is not built here: it runs in ONNX Runtime (manifest.json `gpu`).",
]


def build_script(data: dict[str, Any], max_batch: int = 4, workspace_mb: int = DEFAULT_WORKSPACE_MB,
                 root: str | os.PathLike | None = None) -> str:
    """The text of ``build_engines.sh`` for an export's manifest data. ``root``: the export
    directory (its ONNX files give the fp32-kept layer names; without it no layer is constrained).

    The flags of every engine for every (TensorRT major, --fp16, --int8) come from
    :func:`build_recipe`, so the script and the Python builder cannot disagree."""
    profs = profiles(data, max_batch)
    root = Path(root) if root is not None else None
    usage = [u.format(engines=" ".join(TRT_ENGINES), algo=CACHE_ALGORITHM) for u in _SCRIPT_USAGE]
    redo = "re-run agvas export: the export directory is incomplete"
    calib_hint = "run: agvas calibrate --engines ${HERE} --images IMAGES --out ${CAL}"
    layer_vars, files_arms, flag_arms = [], [], []
    for name in TRT_ENGINES:
        entry = data["engines"][name]
        try:
            mode = engine_mode(data, name)
        except ValueError as e:
            files_arms.append(f"    {name}) die {shlex.quote(str(e))};;")
            continue
        layers = fp32_layer_names(root / entry["file"]) if root is not None and (root / entry["file"]).is_file() else []
        var = f"LAYERS_{name}"
        if layers:
            layer_vars.append(f"{var}={shlex.quote(','.join(f'{n}:fp32' for n in layers))}")
        needs = " ".join(f"need {shlex.quote(f)} {shlex.quote(redo)};"
                         for f in [entry["file"]] + [x["file"] for x in entry.get("external_data", [])])
        prof = profs[name]
        profile = json.dumps(prof, separators=(",", ":"))
        files_arms.append(f"    {name}) MODE={mode}; PROFILE={shlex.quote(profile)}; {needs};")
        for major in TRT_MAJORS:
            for fp16 in (1, 0):
                for int8 in (0, 1):
                    key = f"{name}:{major}:{fp16}:{int8}"
                    try:
                        recipe = build_recipe(major, mode, fp16=bool(fp16), int8=bool(int8) and mode != "qdq",
                                              fp32_layers=layers)
                    except ValueError as e:
                        flag_arms.append(f"    {key}) die {shlex.quote(f'engine {name} ({mode} graph): {e}')};;")
                        continue
                    calib = f"${{CAL}}/{TRT_CACHE.format(engine=name)}" if recipe.calibrate else None
                    cmd = trtexec_command(name, prof, workspace_mb, entry["file"]) + trtexec_flags(
                        recipe, calib=calib, layers=f"${{{var}}}" if recipe.fp32_layers else None)
                    cache = f' CACHE="{calib}"; need "$CACHE" "{calib_hint}";' if calib else ""
                    flag_arms.append(f"    {key}){cache} ARGS=({' '.join(_word(a) for a in cmd)});;")
    lines = [
        "#!/usr/bin/env bash", *usage,
        "set -euo pipefail",
        'HERE="$(cd "$(dirname "$0")" && pwd)"',
        'FP16=1; INT8=0; DRY=0; MAJOR=""; CAL=""; ONLY=()',
        'die() { echo "build_engines.sh: $*" >&2; exit 2; }',
        "while [ $# -gt 0 ]; do",
        '  case "$1" in',
        "    --int8) INT8=1;; --no-fp16) FP16=0;; --dry-run) DRY=1;;",
        '    --calib-dir) [ $# -ge 2 ] || die "--calib-dir needs a directory"; CAL="$2"; shift;;',
        '    --calib-dir=*) CAL="${1#*=}";;',
        '    --trt-major) [ $# -ge 2 ] || die "--trt-major needs 8 or 10"; MAJOR="$2"; shift;;',
        '    --trt-major=*) MAJOR="${1#*=}";;',
        f'    -h|--help) sed -n 2,{len(usage) + 1}p "$0"; exit 0;;',
        '    -*) die "unknown option $1 (see --help)";;',
        '    *) ONLY+=("$1");;',
        "  esac",
        "  shift",
        "done",
        'for e in ${ONLY[@]+"${ONLY[@]}"}; do',
        f'  case "$e" in {"|".join(TRT_ENGINES)}) ;; *) die "unknown engine $e (expected some of {" ".join(TRT_ENGINES)})";; esac',
        "done",
        'if [ "$INT8" = 1 ]; then',
        f'  CAL="${{CAL:-$HERE/{DEFAULT_CALIB_DIR}}}"',
        '  case "$CAL" in /*) ;; *) CAL="$PWD/$CAL";; esac',
        'elif [ -n "$CAL" ]; then',
        '  die "--calib-dir is read with --int8"',
        "fi",
        'cd "$HERE"',
        "# the TensorRT version, from trtexec's banner: [TensorRT v8601] (8.6.1), [TensorRT v100300] (10.3.0)",
        'TRT_VERSION=""',
        "if command -v trtexec >/dev/null 2>&1; then",
        "  TRT_VERSION=\"$( (trtexec --version 2>&1 || true) | sed -n '/\\[TensorRT v[0-9]/{s/.*\\[TensorRT v\\([0-9][0-9]*\\)\\].*/\\1/p;q;}')\"",
        'elif [ "$DRY" = 0 ]; then',
        "  die 'trtexec not found (install TensorRT; on Jetson it is /usr/src/tensorrt/bin/trtexec)'",
        "fi",
        'if [ -n "$TRT_VERSION" ]; then',
        '  if [ "$TRT_VERSION" -ge 100000 ]; then FOUND=$((TRT_VERSION / 10000)); else FOUND=$((TRT_VERSION / 1000)); fi',
        '  [ -z "$MAJOR" ] || [ "$MAJOR" = "$FOUND" ] || die "--trt-major $MAJOR, but trtexec is TensorRT $FOUND (v$TRT_VERSION)"',
        '  MAJOR="$FOUND"',
        'elif [ "$DRY" = 0 ]; then',
        "  die 'cannot read the TensorRT version from the output of trtexec --version'",
        "fi",
        'MAJOR="${MAJOR:-10}"',
        'case "$MAJOR" in 8|10) ;; *) die "this script knows the flags of TensorRT 8.6 and 10.x, not $MAJOR";; esac',
        *layer_vars,
        "MISSING=0",
        "need() {  # need FILE HOW: a file the build reads, and the command that makes it",
        '  [ -e "$1" ] && return 0',
        '  echo "build_engines.sh: missing $1 ($2)" >&2',
        "  MISSING=1",
        "}",
        "shq() {  # the words as one shell line, quoted as Python's shlex.join quotes them",
        "  local a out=() safe='^[A-Za-z0-9_@%+=:,./-]+$' sq=\"'\" dq='\"'",
        '  for a in "$@"; do',
        '    if [[ "$a" =~ $safe ]]; then out+=("$a"); else out+=("$sq${a//$sq/$sq$dq$sq$dq$sq}$sq"); fi',
        "  done",
        '  echo "${out[*]}"',
        "}",
        f"stamp() {{  # stamp CACHE: the header line of this TensorRT (TRT-<version>-{CACHE_ALGORITHM})",
        f'  local want="TRT-${{TRT_VERSION}}-{CACHE_ALGORITHM}"',
        '  [ "$(head -n 1 "$1")" = "$want" ] && return 0',
        '  { echo "$want"; tail -n +2 "$1"; } > "$1.tmp.$$" && mv -f "$1.tmp.$$" "$1" || die "cannot rewrite the header of $1"',
        "}",
        "plan() {  # plan ENGINE: MODE, PROFILE, ARGS (the trtexec command), CACHE (its calibration cache, if any)",
        '  MODE=""; PROFILE=""; ARGS=(); CACHE=""',
        '  case "$1" in',
        *files_arms,
        "  esac",
        '  case "$1:$MAJOR:$FP16:$INT8" in',
        *flag_arms,
        "  esac",
        "}",
        "ENGINES=()",
        f"for e in {' '.join(TRT_ENGINES)}; do",
        '  if [ ${#ONLY[@]} -eq 0 ] || [[ " ${ONLY[*]} " == *" $e "* ]]; then ENGINES+=("$e"); fi',
        "done",
        'for e in "${ENGINES[@]}"; do plan "$e"; done  # every file is checked before anything is built',
        '[ "$MISSING" = 0 ] || exit 2',
        'if [ "$DRY" = 1 ]; then',
        '  echo "# TensorRT $MAJOR flags${TRT_VERSION:+ (trtexec v$TRT_VERSION)}" >&2',
        '  for e in "${ENGINES[@]}"; do',
        '    plan "$e"',
        '    [ -z "$CACHE" ] || echo "# $e: the header of $CACHE is set to this TensorRT\'s version before the build" >&2',
        '    shq "${ARGS[@]}"',
        "  done",
        "  exit 0",
        "fi",
        f"mkdir -p {PLAN_DIR}",
        'for e in "${ENGINES[@]}"; do',
        '  plan "$e"',
        '  echo "== $e ($MODE graph, TensorRT v$TRT_VERSION)"',
        '  [ -z "$CACHE" ] || stamp "$CACHE"',
        '  "${ARGS[@]}"',
        "  printf '{\"engine\":\"%s\",\"mode\":\"%s\",\"builder\":\"trtexec\",\"tensorrt_version\":\"%s\",\"profile\":%s}\\n' "
        f'"$e" "$MODE" "$TRT_VERSION" "$PROFILE" > "{PLAN_DIR}/$e.plan.json"',
        "done",
        f'echo "engines in $(pwd)/{PLAN_DIR}"',
    ]
    return "\n".join(lines) + "\n"


def write_build_script(root: str | os.PathLike, data: dict[str, Any], max_batch: int = 4,
                       workspace_mb: int = DEFAULT_WORKSPACE_MB) -> Path:
    from agvas.atomic import write_text_atomic

    path = Path(root) / BUILD_SCRIPT
    write_text_atomic(path, build_script(data, max_batch, workspace_mb, root=root))
    path.chmod(0o755)
    return path


# ---- the manifest's GPU settings ---------------------------------------------------------------------

def gpu_settings(data: dict[str, Any], max_batch: int = 4, workspace_mb: int = DEFAULT_WORKSPACE_MB) -> dict[str, Any]:
    """The manifest's ``gpu`` block: ONNX Runtime CUDA-EP / TensorRT-EP provider options and the
    native TensorRT recipe, from the engines' precisions (call again when they change).

    TensorRT EP and INT8 (ONNX Runtime's TensorRT-EP documentation): a QDQ engine gets
    ``trt_int8_enable`` and *no* ``trt_int8_calibration_table_name`` (TensorRT does not load a
    calibration table for a model with Q/DQ nodes); an fp32 engine runs INT8 only with the table
    ``agvas calibrate`` wrote — ORT's own flatbuffers format, so
    ``trt_int8_use_native_calibration_table`` is False — which the runtime takes from a calibration
    directory (``agvas.runtime.engines.ort_providers``), read relative to ``trt_engine_cache_path``.
    ``trt_layer_norm_fp32_fallback`` keeps the layer-norm Pow/Reduce ops of the fp16 builds in fp32."""
    profs = profiles(data, max_batch)
    llm_prec = data["engines"]["llm"]["precision"]
    modes = engine_modes(data)
    per_engine = {}
    for name in TRT_ENGINES:
        opts: dict[str, Any] = dict(trt_ep_profile_options(profs[name]))
        if modes[name] == "qdq":
            opts["trt_int8_enable"] = True  # explicit quantization; TensorRT 8.x needs INT8 enabled for it
        per_engine[name] = opts
    return {
        "cuda_ep": {
            "provider": "CUDAExecutionProvider",
            "options": {"device_id": 0, "arena_extend_strategy": "kSameAsRequested",
                        "cudnn_conv_algo_search": "EXHAUSTIVE", "do_copy_in_default_stream": True},
            "engines": list(ONNX_ENGINES),
            "llm_note": ("GroupQueryAttention runs on CUDA in fp16/bf16 only: use an export made with "
                         "--precision fp16 (or a quantized one) for the llm on GPU"
                         if llm_prec == "fp32" else "llm graph built for the CUDA EP"),
        },
        "tensorrt_ep": {
            "provider": "TensorrtExecutionProvider",
            "fallback": "CUDAExecutionProvider",
            "engines": list(TRT_ENGINES),
            "options": {"device_id": 0, "trt_fp16_enable": True, "trt_int8_enable": False,
                        "trt_int8_use_native_calibration_table": False, "trt_layer_norm_fp32_fallback": True,
                        "trt_engine_cache_enable": True, "trt_engine_cache_path": "trt_cache",
                        "trt_timing_cache_enable": True, "trt_max_workspace_size": workspace_mb << 20},
            "per_engine": per_engine,
            "int8_calibration_table": EP_TABLE,
            "int8_note": ("QDQ engines are int8 by their graph (trt_int8_enable, no calibration table); fp32 "
                          "engines run int8 with --calib-dir CAL: CAL/" + EP_TABLE + " (ORT's table format, "
                          "trt_int8_use_native_calibration_table false)"),
        },
        "tensorrt": {
            "build_script": BUILD_SCRIPT,
            "python_builder": "python -m agvas.export.tensorrt <export_dir> [--int8 --calib-dir CAL] [--dry-run]",
            "runner": "agvas.runtime.trt_engine.TRTEngine",
            "plans": {name: f"{PLAN_DIR}/{name}.plan" for name in TRT_ENGINES},
            "plan_records": PLAN_RECORD,
            "modes": modes,
            "calibration": {"default_dir": DEFAULT_CALIB_DIR, "trtexec_cache": TRT_CACHE,
                            "entropy_cache": ENTROPY_CACHE, "ort_tensorrt_ep_table": EP_TABLE,
                            "written_by": "agvas calibrate --engines EXPORT --images IMAGES --out CAL"},
            "fp16": True, "int8": False, "max_batch": max_batch, "workspace_mb": workspace_mb,
            "profiles": profs,
        },
    }


def plan_record(plan: str | os.PathLike) -> dict[str, Any] | None:
    """What the builder recorded for ``plan`` (``trt/<engine>.plan.json``), or None."""
    p = Path(plan)
    rec = p.with_name(p.name + ".json")
    if not rec.is_file():
        return None
    try:
        return json.loads(rec.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{rec}: not valid JSON ({e})") from None


# ---- the Python builder (needs `tensorrt`) -------------------------------------------------------

def _require_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as e:
        raise RuntimeError("building TensorRT engines needs the `tensorrt` Python package of the target's "
                           "TensorRT (JetPack / NVIDIA's wheels); it is not installed here") from e
    return trt


def _hold_fp32(trt, network, names: tuple[str, ...]) -> int:
    """``layer.precision`` and output types float32 for the named layers (weakly typed builds,
    with ``BuilderFlag.OBEY_PRECISION_CONSTRAINTS``); returns how many layers matched."""
    wanted, n = set(names), 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.name in wanted:
            layer.precision = trt.float32
            for j in range(layer.num_outputs):
                layer.set_output_type(j, trt.float32)
            n += 1
    return n


def build_serialized(trt, onnx_path: str | os.PathLike, prof: dict[str, dict[str, list[int]]], recipe: BuildRecipe, *,
                     workspace_mb: int = DEFAULT_WORKSPACE_MB, calibrator=None,
                     calibration_shape: dict[str, tuple[int, ...]] | None = None):
    """Parse ``onnx_path`` and build it with one optimisation profile as ``recipe`` says; returns
    the serialized engine. An INT8-calibrated build needs ``calibrator`` and the shape TensorRT
    calibrates at: with dynamic shapes calibration runs at the kOPT dimensions of the calibration
    profile (``set_calibration_profile``: min and max are overwritten by opt), so the calibrator
    must feed exactly ``calibration_shape``."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt, recipe))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT cannot parse {onnx_path}: {errs}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    for flag in recipe.flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    if recipe.fp32_layers and not _hold_fp32(trt, network, recipe.fp32_layers):
        print(f"agvas.export.tensorrt: note: no layer of {onnx_path} is named after its LayerNorm/Softmax nodes; "
              f"nothing held in fp32", file=sys.stderr)
    profile = builder.create_optimization_profile()
    for name, s in prof.items():
        profile.set_shape(name, s["min"], s["opt"], s["max"])
    if config.add_optimization_profile(profile) < 0:
        raise RuntimeError(f"TensorRT rejected the optimisation profile {prof} of {onnx_path}")
    if recipe.calibrate:
        if calibrator is None or not calibration_shape:
            raise ValueError(f"{onnx_path}: an INT8-calibrated build needs a calibrator and its calibration shape")
        cal = builder.create_optimization_profile()
        for name, shape in calibration_shape.items():
            cal.set_shape(name, tuple(shape), tuple(shape), tuple(shape))
        if not config.set_calibration_profile(cal):
            raise RuntimeError(f"TensorRT rejected the calibration profile {calibration_shape} of {onnx_path}")
        config.int8_calibrator = calibrator
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see its log above)")
    return serialized


def _write_plan(plan_path: Path, serialized, record: dict[str, Any]) -> Path:
    from agvas.atomic import write_bytes_atomic, write_text_atomic

    plan_path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(plan_path, bytes(serialized))
    write_text_atomic(plan_path.with_name(plan_path.name + ".json"), json.dumps(record, indent=1) + "\n")
    return plan_path


@dataclass
class Plans:
    """The build plan of an export: its manifest, one :class:`EnginePlan` per engine, missing files."""

    manifest: Any
    major: int
    plans: list[EnginePlan]
    missing: list[tuple[str, str]]
    calib_dir: Path | None
    profiles: dict[str, Any]


def plan_engines(root: str | os.PathLike, engines: tuple[str, ...] = TRT_ENGINES, *, major: int, fp16: bool = True,
                 int8: bool = False, calib_dir: str | os.PathLike | None = None, max_batch: int | None = None,
                 workspace_mb: int = DEFAULT_WORKSPACE_MB, python: bool = False) -> Plans:
    """Plan the builds (no TensorRT needed): ValueError for an unknown engine or an engine that
    cannot be built as asked; the missing files are listed, not raised. ``python``: the Python
    builder's plan, which also reads the calibration samples (``CAL/calibration.json``)."""
    m = load_manifest(root, verify="bytes")
    unknown = [e for e in engines if e not in TRT_ENGINES]
    if unknown:
        raise ValueError(f"no TensorRT engine {unknown[0]!r}; expected some of {TRT_ENGINES}")
    if max_batch is None:
        max_batch = int(((m.data.get("gpu") or {}).get("tensorrt") or {}).get("max_batch", 4))
    profs = profiles(m.data, max_batch)
    cal = None
    if int8:
        cal = Path(calib_dir).resolve() if calib_dir is not None else m.root.resolve() / DEFAULT_CALIB_DIR
    elif calib_dir is not None:
        raise ValueError("--calib-dir is read with --int8")
    plans = []
    for name in engines:
        p = engine_plan(m.root, m.data, name, profs[name], major=major, fp16=fp16, int8=int8, calib_dir=cal,
                        workspace_mb=workspace_mb)
        if p.error:
            raise ValueError(p.error)
        if python and p.recipe is not None and p.recipe.calibrate:
            p.needs.append((str(cal / "calibration.json"), calibrate_hint(m.root, cal)))
        plans.append(p)
    return Plans(m, major, plans, missing_files(m.root, plans), cal, profs)


def _check_calibration(m, cal: Path) -> Any:
    """The calibration store of ``cal``, refused when it was captured from another checkpoint."""
    from agvas.calibration.store import CalibrationStore

    store = CalibrationStore(cal)
    want = (store.meta.get("export") or {}).get("checkpoint_sha256")
    have = m.data["source"]["checkpoint_sha256"]
    if want and want != have:
        raise ValueError(f"--calib-dir {cal} was captured from checkpoint {want[:12]}..., but {m.root} is an export of "
                         f"{have[:12]}...; {calibrate_hint(m.root, cal)}")
    return store


def build_engines(root: str | os.PathLike, engines: tuple[str, ...] = TRT_ENGINES, *, fp16: bool = True,
                  int8: bool = False, calib_dir: str | os.PathLike | None = None, max_batch: int | None = None,
                  workspace_mb: int = DEFAULT_WORKSPACE_MB, log: Callable[[str], None] = print) -> dict[str, Path]:
    """Build ``trt/{engine}.plan`` (+ ``.plan.json``) for each engine of the export at ``root``.

    INT8 calibration of an fp32 engine (``int8``): entropy calibration on the calibration
    directory's samples of that engine (``IInt8EntropyCalibrator2``), reusing
    ``CAL/tensorrt/<engine>/entropy.cache`` when TensorRT accepts it and writing it otherwise."""
    trt = _require_tensorrt()
    major = trt_major(trt)
    p = plan_engines(root, engines, major=major, fp16=fp16, int8=int8, calib_dir=calib_dir, max_batch=max_batch,
                     workspace_mb=workspace_mb, python=True)
    if p.missing:
        f, how = p.missing[0]
        raise FileNotFoundError(f"missing {f} ({how})")
    m = p.manifest
    store = _check_calibration(m, p.calib_dir) if any(e.recipe and e.recipe.calibrate for e in p.plans) else None
    out = {}
    for ep in p.plans:
        name, recipe = ep.name, ep.recipe
        calibrator, shape, cal_rec = None, None, None
        if recipe.calibrate:
            from agvas.calibration.readers import entropy_calibrator

            calibrator, shape, cal_rec = entropy_calibrator(trt, store, name, m.engine(name)["inputs"],
                                                            p.calib_dir / ENTROPY_CACHE.format(engine=name))
            log(f"{name}: entropy calibration at {shape} ({cal_rec['batches']} samples of that shape)")
        try:
            serialized = build_serialized(trt, m.engine_path(name), p.profiles[name], recipe, workspace_mb=workspace_mb,
                                          calibrator=calibrator, calibration_shape=shape)
        finally:
            if calibrator is not None:
                calibrator.free()
        record = {"engine": name, "mode": ep.mode, "builder": "python", "tensorrt_version": trt.__version__,
                  "flags": list(recipe.flags), "strongly_typed": recipe.strongly_typed,
                  "fp32_layers": len(recipe.fp32_layers), "profile": p.profiles[name]}
        if cal_rec is not None:
            record["calibration"] = cal_rec
        out[name] = _write_plan(m.root / PLAN_DIR / f"{name}.plan", serialized, record)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m agvas.export.tensorrt", description=__doc__.splitlines()[0])
    p.add_argument("export_dir")
    p.add_argument("engines", nargs="*", default=list(TRT_ENGINES), help=f"default: {' '.join(TRT_ENGINES)}")
    p.add_argument("--int8", action="store_true",
                   help="INT8 for the fp32 engines, calibrated on the samples of --calib-dir (QDQ engines are int8 "
                        "by their graph)")
    p.add_argument("--calib-dir", default=None,
                   help=f"what `agvas calibrate --out CAL` wrote (default: EXPORT/{DEFAULT_CALIB_DIR})")
    p.add_argument("--no-fp16", action="store_true", help="no fp16 kernels for the fp32 engines")
    p.add_argument("--max-batch", type=int, default=None, help="largest batch of the profiles (default: the export's)")
    p.add_argument("--workspace-mb", type=int, default=DEFAULT_WORKSPACE_MB)
    p.add_argument("--dry-run", action="store_true",
                   help="print the equivalent trtexec command of each engine; exit 0 only when every file it reads "
                        "exists")
    p.add_argument("--trt-major", type=int, choices=TRT_MAJORS, default=None,
                   help="with --dry-run: the TensorRT major version whose flags to print (default: the installed "
                        "tensorrt's, else 10)")
    a = p.parse_args(argv)
    try:
        if a.dry_run:
            major = a.trt_major
            if major is None:
                try:
                    major = trt_major(_require_tensorrt())
                except RuntimeError:
                    major = 10
            plan = plan_engines(a.export_dir, tuple(a.engines), major=major, fp16=not a.no_fp16, int8=a.int8,
                                calib_dir=a.calib_dir, max_batch=a.max_batch, workspace_mb=a.workspace_mb, python=True)
            for f, how in plan.missing:
                print(f"agvas.export.tensorrt: missing {f} ({how})", file=sys.stderr)
            if plan.missing:
                return 2
            print(f"# TensorRT {major} flags; run in {plan.manifest.root}", file=sys.stderr)
            for ep in plan.plans:
                print(shlex.join(ep.command))
            return 0
        built = build_engines(a.export_dir, tuple(a.engines), fp16=not a.no_fp16, int8=a.int8, calib_dir=a.calib_dir,
                              max_batch=a.max_batch, workspace_mb=a.workspace_mb)
    except (RuntimeError, ValueError, FileNotFoundError) as e:
        print(f"agvas.export.tensorrt: error: {e}", file=sys.stderr)
        return 2
    for name, path in built.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
