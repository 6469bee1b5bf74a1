"""TensorRT engines for the vision side (``vision``, ``sam_encoder``, ``spam``, ``agmd``).

TensorRT engines are specific to the GPU and the TensorRT version, so they are built on the
target (e.g. a Jetson) from the export's ONNX files, by either

- ``build_engines.sh`` (written into the export by ``agvas export --target tensorrt``):
  ``trtexec`` with one optimisation profile per engine from the manifest's dynamic axes,
  ``--fp16`` and, with ``--int8``, the calibration cache of ``agvas calibrate``; or
- ``python -m export.tensorrt EXPORT_DIR [--int8]``: the same with the ``tensorrt`` Python API.

The LLM is not built here: it runs in ONNX Runtime (CUDA EP, or TensorRT EP with CUDA fallback
for ``GroupQueryAttention``). Torch-free; ``tensorrt`` is imported only when building.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from .manifest import ONNX_ENGINES, load_manifest

TRT_ENGINES = ("vision", "sam_encoder", "spam", "agmd")
PLAN_DIR = "trt"
CALIBRATION_CACHE = "calibration/{engine}.cache"
BUILD_SCRIPT = "build_engines.sh"
DEFAULT_WORKSPACE_MB = 4096


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
            shp = {k: [] for k in ("min", "opt", "max")}
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


def trtexec_command(name: str, prof: dict[str, dict[str, list[int]]], workspace_mb: int = DEFAULT_WORKSPACE_MB) -> list[str]:
    """``trtexec`` arguments building ``trt/{name}.plan`` (fp16/int8 flags are added by the script)."""
    return ["trtexec", f"--onnx={name}.onnx", f"--saveEngine={PLAN_DIR}/{name}.plan",
            f"--minShapes={_shape_arg(prof, 'min')}", f"--optShapes={_shape_arg(prof, 'opt')}",
            f"--maxShapes={_shape_arg(prof, 'max')}", f"--memPoolSize=workspace:{workspace_mb}M",
            f"--timingCacheFile={PLAN_DIR}/timing.cache", "--skipInference"]


def build_script(data: dict[str, Any], max_batch: int = 4, workspace_mb: int = DEFAULT_WORKSPACE_MB) -> str:
    """The text of ``build_engines.sh`` for an export's manifest data."""
    profs = profiles(data, max_batch)
    lines = [
        "#!/usr/bin/env bash",
        "# Build TensorRT engines for the vision-side engines of this AG-VAS export, on the target GPU.",
        "# Usage: ./build_engines.sh [--int8] [--no-fp16] [ENGINE ...]   (default: all of "
        + " ".join(TRT_ENGINES) + ")",
        "# --int8 uses the calibration cache calibration/<engine>.cache written by `agvas calibrate`.",
        "# The LLM is not built here: it runs in ONNX Runtime (CUDA EP / TensorRT EP), see manifest.json `gpu`.",
        "set -euo pipefail",
        'cd "$(dirname "$0")"',
        "FP16=1; INT8=0; ONLY=()",
        'for a in "$@"; do case "$a" in --int8) INT8=1;; --no-fp16) FP16=0;; -h|--help) sed -n 2,5p "$0"; exit 0;;',
        '  --*) echo "build_engines.sh: unknown option $a" >&2; exit 2;; *) ONLY+=("$a");; esac; done',
        "command -v trtexec >/dev/null || { echo 'build_engines.sh: trtexec not found (install TensorRT; on Jetson: "
        "/usr/src/tensorrt/bin)' >&2; exit 2; }",
        f"mkdir -p {PLAN_DIR}",
        "want() { [ ${#ONLY[@]} -eq 0 ] && return 0; for e in \"${ONLY[@]}\"; do [ \"$e\" = \"$1\" ] && return 0; done; return 1; }",
        "build() {  # build ENGINE trtexec-args...",
        '  local name="$1"; shift',
        '  local flags=()',
        '  [ "$FP16" = 1 ] && flags+=(--fp16)',
        '  if [ "$INT8" = 1 ]; then',
        '    local cache="calibration/${name}.cache"',
        '    [ -f "$cache" ] || { echo "build_engines.sh: --int8 needs $cache (run agvas calibrate)" >&2; exit 2; }',
        '    flags+=(--int8 "--calib=$cache")',
        "  fi",
        '  echo "== $name"',
        '  "$@" "${flags[@]}"',
        "}",
    ]
    for name in TRT_ENGINES:
        cmd = " ".join(shlex.quote(a) for a in trtexec_command(name, profs[name], workspace_mb))
        lines.append(f"want {name} && build {name} {cmd}")
    lines.append('echo "engines in $(pwd)/' + PLAN_DIR + '"')
    return "\n".join(lines) + "\n"


def gpu_settings(data: dict[str, Any], max_batch: int = 4, workspace_mb: int = DEFAULT_WORKSPACE_MB) -> dict[str, Any]:
    """The manifest's ``gpu`` block: ONNX Runtime CUDA-EP / TensorRT-EP provider options and the
    native TensorRT recipe. Paths are relative to the export directory; ORT's TensorRT EP reads
    ``trt_int8_calibration_table_name`` relative to ``trt_engine_cache_path``, so a runtime
    passes both as absolute paths under the export directory."""
    profs = profiles(data, max_batch)
    llm_prec = data["engines"]["llm"]["precision"]
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
                        "trt_int8_use_native_calibration_table": True, "trt_engine_cache_enable": True,
                        "trt_engine_cache_path": "trt_cache", "trt_timing_cache_enable": True,
                        "trt_max_workspace_size": workspace_mb << 20},
            "per_engine": {name: {**trt_ep_profile_options(profs[name]),
                                  "trt_int8_calibration_table_name": CALIBRATION_CACHE.format(engine=name)}
                           for name in TRT_ENGINES},
        },
        "tensorrt": {
            "build_script": BUILD_SCRIPT,
            "python_builder": "python -m export.tensorrt <export_dir> [--int8]",
            "runner": "runtime.trt_engine.TRTEngine",
            "plans": {name: f"{PLAN_DIR}/{name}.plan" for name in TRT_ENGINES},
            "calibration_cache": CALIBRATION_CACHE,
            "fp16": True, "int8": False, "max_batch": max_batch, "workspace_mb": workspace_mb,
            "profiles": profs,
        },
    }



def write_build_script(root: str | os.PathLike, data: dict[str, Any], max_batch: int = 4) -> Path:
    from agvas.atomic import write_text_atomic

    path = Path(root) / BUILD_SCRIPT
    write_text_atomic(path, build_script(data, max_batch))
    path.chmod(0o755)
    return path


# ---- the Python builder (needs `tensorrt`) -------------------------------------------------------

def _require_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as e:
        raise RuntimeError("building TensorRT engines needs the `tensorrt` Python package of the target's "
                           "TensorRT (JetPack / NVIDIA's wheels); it is not installed here") from e
    return trt


def build_engine(onnx_path: str | os.PathLike, plan_path: str | os.PathLike, prof: dict[str, dict[str, list[int]]], *,
                 fp16: bool = True, int8: bool = False, calibration_cache: str | os.PathLike | None = None,
                 workspace_mb: int = DEFAULT_WORKSPACE_MB) -> Path:
    """Build one serialized TensorRT engine from an ONNX file with one optimisation profile."""
    trt = _require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch (the only mode in TensorRT 10)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT cannot parse {onnx_path}: {errs}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    if int8:
        if calibration_cache is None or not Path(calibration_cache).is_file():
            raise FileNotFoundError(f"--int8 needs the calibration cache {calibration_cache} (run agvas calibrate)")
        config.set_flag(trt.BuilderFlag.INT8)
        config.int8_calibrator = _cache_calibrator(trt, Path(calibration_cache))
    profile = builder.create_optimization_profile()
    for name, s in prof.items():
        profile.set_shape(name, s["min"], s["opt"], s["max"])
    config.add_optimization_profile(profile)
    if int8:
        config.set_calibration_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path}")
    from agvas.atomic import write_bytes_atomic

    write_bytes_atomic(plan_path, bytes(serialized))
    return Path(plan_path)


def _cache_calibrator(trt, cache: Path):
    """An INT8 calibrator that only replays a calibration cache (no calibration batches)."""

    class CacheCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            super().__init__()

        def get_batch_size(self) -> int:
            return 1

        def get_batch(self, names):  # noqa: ARG002 - the cache carries every scale
            return None

        def read_calibration_cache(self) -> bytes:
            return cache.read_bytes()

        def write_calibration_cache(self, data) -> None:  # the cache is the input; never overwritten
            return None

    return CacheCalibrator()


def build_engines(root: str | os.PathLike, engines: tuple[str, ...] = TRT_ENGINES, *, fp16: bool = True,
                  int8: bool = False, max_batch: int = 4, workspace_mb: int = DEFAULT_WORKSPACE_MB) -> dict[str, Path]:
    """Build ``trt/{engine}.plan`` for each engine of the export at ``root`` (manifest verified)."""
    m = load_manifest(root, verify="bytes")
    profs = profiles(m.data, max_batch)
    out = {}
    for name in engines:
        if name not in TRT_ENGINES:
            raise ValueError(f"no TensorRT engine {name!r}; expected some of {TRT_ENGINES}")
        cache = m.root / CALIBRATION_CACHE.format(engine=name) if int8 else None
        out[name] = build_engine(m.engine_path(name), m.root / PLAN_DIR / f"{name}.plan", profs[name], fp16=fp16,
                                 int8=int8, calibration_cache=cache, workspace_mb=workspace_mb)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m export.tensorrt", description=__doc__.splitlines()[0])
    p.add_argument("export_dir")
    p.add_argument("engines", nargs="*", default=list(TRT_ENGINES), help=f"default: {' '.join(TRT_ENGINES)}")
    p.add_argument("--int8", action="store_true", help="INT8 with calibration/<engine>.cache")
    p.add_argument("--no-fp16", action="store_true")
    p.add_argument("--max-batch", type=int, default=4)
    p.add_argument("--workspace-mb", type=int, default=DEFAULT_WORKSPACE_MB)
    a = p.parse_args(argv)
    try:
        built = build_engines(a.export_dir, tuple(a.engines), fp16=not a.no_fp16, int8=a.int8, max_batch=a.max_batch,
                              workspace_mb=a.workspace_mb)
    except (RuntimeError, ValueError, FileNotFoundError) as e:
        print(f"export.tensorrt: error: {e}", file=sys.stderr)
        return 2
    for name, path in built.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
