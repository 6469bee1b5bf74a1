"""``agvas doctor``: what this machine can run, and (``--engines DIR``) which engine of an export
would run where.

    agvas doctor [--engines DIR] [--json]

Checks, each by trying rather than by trusting a version string: Python and platform (Jetson from
``/etc/nv_tegra_release``), torch and its CUDA device, the installed ONNX Runtime distribution(s)
— two at once (``onnxruntime`` next to ``onnxruntime-gpu``) shadow each other, the usual way the
CUDA and TensorRT providers vanish — its providers, and whether the CUDA and TensorRT execution
providers *really* load (a one-node session on each; cuDNN missing shows here), onnxruntime-genai,
TensorRT (Python module and ``trtexec``), cuda-python and the driver's CUDA version, the GPU
(``nvidia-smi``), tritonclient. Exit 0 whatever it finds (a CPU machine prints "GPU: none");
exit 2 only for a bad ``--engines`` directory.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata as md
import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

ORT_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino",
                     "onnxruntime-qnn")
GENAI_DISTRIBUTIONS = ("onnxruntime-genai", "onnxruntime-genai-cuda")
TRTEXEC_DIRS = ("/usr/src/tensorrt/bin",)  # JetPack puts trtexec here, off PATH


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engines", default=None, help="an export directory: which engine runs on which provider")
    p.add_argument("--json", action="store_true", help="print the findings as JSON")


def _dist(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def _try_import(module: str):
    try:
        return importlib.import_module(module), None
    except Exception as e:  # noqa: BLE001 - e.g. the PyPI `tensorrt` stub raises at import
        return None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def _platform() -> dict[str, Any]:
    tegra = Path("/etc/nv_tegra_release")
    return {"python": platform.python_version(), "platform": f"{platform.system()} {platform.machine()}",
            "jetson": tegra.read_text().splitlines()[0].strip() if tegra.is_file() else None}


def _torch() -> dict[str, Any]:
    torch, err = _try_import("torch")
    if torch is None:
        return {"installed": False, "note": "not installed (only agvas train / export need it)"}
    out: dict[str, Any] = {"installed": True, "version": torch.__version__, "cuda_build": torch.version.cuda}
    try:
        out["cuda_available"] = bool(torch.cuda.is_available())
        if out["cuda_available"]:
            p = torch.cuda.get_device_properties(0)
            out["device"] = f"{p.name}, {p.total_memory / 2**30:.1f} GiB"
    except Exception as e:  # noqa: BLE001
        out["cuda_error"] = str(e)
    return out


def _tiny_model_bytes() -> bytes:
    """A one-node float graph (Add) to open a session on each provider."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])
    g = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])], "doctor", [x], [y])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8).SerializeToString()


def provider_loads(provider: str) -> tuple[bool, str]:
    """Whether ONNX Runtime really enables ``provider`` for a session (not only lists it)."""
    import onnxruntime as ort

    if provider not in ort.get_available_providers():
        return False, "not in this build"
    from .engines import preload_cuda_libraries

    preload_cuda_libraries()
    so = ort.SessionOptions()
    so.log_severity_level = 3
    try:
        s = ort.InferenceSession(_tiny_model_bytes(), so, providers=[provider, "CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001
        return False, f"session creation failed: {str(e).splitlines()[0]}"
    if provider not in s.get_providers():
        return False, "listed but did not load (missing CUDA / cuDNN / TensorRT libraries?)"
    return True, "loads"


def _onnxruntime() -> tuple[dict[str, Any], list[str]]:
    problems = []
    dists = {d: v for d in ORT_DISTRIBUTIONS if (v := _dist(d))}
    if len(dists) > 1:
        problems.append(f"several ONNX Runtime distributions are installed ({', '.join(dists)}); they share the "
                        f"`onnxruntime` module and the last one installed wins — uninstall all but one")
    ort, err = _try_import("onnxruntime")
    if ort is None:
        problems.append("no ONNX Runtime: pip install 'agvas-edge[cpu]' (or [gpu]; Jetson: NVIDIA's onnxruntime-gpu)")
        return {"installed": False, "distributions": dists, "error": err}, problems
    out: dict[str, Any] = {"installed": True, "version": ort.__version__, "distributions": dists,
                           "device": ort.get_device(), "providers": ort.get_available_providers()}
    for p in ("CUDAExecutionProvider", "TensorrtExecutionProvider"):
        if p in out["providers"]:
            ok, why = provider_loads(p)
            out[p] = why
            if not ok:
                problems.append(f"{p}: {why}")
    genai = {d: v for d in GENAI_DISTRIBUTIONS if (v := _dist(d))}
    out["genai"] = genai or None
    if "onnxruntime-genai" in genai and "onnxruntime-gpu" in dists:
        problems.append("onnxruntime-genai (CPU) depends on CPU onnxruntime; with onnxruntime-gpu use "
                        "onnxruntime-genai-cuda (extra [export-gpu])")
    return out, problems


def _cuda_python() -> tuple[dict[str, Any], list[str]]:
    ver = _dist("cuda-bindings") or _dist("cuda-python")
    if ver is None:
        return {"installed": False, "note": "not installed (only the native TensorRT runner needs it)"}, []
    out: dict[str, Any] = {"installed": True, "version": ver}
    problems = []
    try:
        from .trt_engine import _cudart

        cudart = _cudart()
        err, driver = cudart.cudaDriverGetVersion()
        if int(err) == 0 and driver:
            out["driver_cuda"] = f"{driver // 1000}.{driver % 1000 // 10}"
            if int(ver.split(".")[0]) > driver // 1000:
                problems.append(f"cuda-python {ver} needs a CUDA {ver.split('.')[0]} driver but the driver is CUDA "
                                f"{out['driver_cuda']}: install cuda-python<{driver // 1000 + 1} (extra [jetson]/[cuda12])")
        else:
            out["driver_cuda"] = None
    except Exception as e:  # noqa: BLE001 - no driver on a CPU machine
        out["driver_cuda"] = None
        out["note"] = f"no CUDA driver ({type(e).__name__})"
    return out, problems


def _tensorrt() -> dict[str, Any]:
    trt, err = _try_import("tensorrt")
    trtexec = shutil.which("trtexec") or next((str(Path(d) / "trtexec") for d in TRTEXEC_DIRS
                                               if (Path(d) / "trtexec").is_file()), None)
    return {"python": getattr(trt, "__version__", None) if trt else None, "import_error": err if trt is None else None,
            "trtexec": trtexec}


def _gpu() -> list[dict[str, str]]:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return []
    try:
        r = subprocess.run([smi, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return []
    rows = []
    for line in r.stdout.strip().splitlines():
        parts = [x.strip() for x in line.split(",")]
        if len(parts) == 3:
            rows.append({"name": parts[0], "memory": parts[1], "driver": parts[2]})
    return rows


def engine_plan(engines_dir: str, findings: dict[str, Any]) -> tuple[list[dict[str, str]], list[str]]:
    """For each provider choice, where each engine of the export would run, or why it cannot."""
    from agvas.export.manifest import load_manifest

    from .engines import NATIVE_TRT_ENGINES, PROVIDERS

    m = load_manifest(engines_dir, verify="none")
    gpu = m.data.get("gpu") or {}
    have = set((findings["onnxruntime"] or {}).get("providers") or [])
    loads = {p: (findings["onnxruntime"] or {}).get(p) == "loads" for p in ("CUDAExecutionProvider",
                                                                             "TensorrtExecutionProvider")}
    trt_ep_engines = set((gpu.get("tensorrt_ep") or {}).get("engines") or ())
    plans = (gpu.get("tensorrt") or {}).get("plans") or {}
    rows, problems = [], []
    for provider in PROVIDERS:
        for name, entry in m.engines.items():
            if entry.get("format") != "onnx" and not (provider == "tensorrt-native" and name in NATIVE_TRT_ENGINES):
                continue
            if provider == "cpu":
                where, ok = "CPUExecutionProvider", "CPUExecutionProvider" in have
            elif provider == "tensorrt-native" and name in NATIVE_TRT_ENGINES:
                plan = m.root / plans.get(name, f"trt/{name}.plan")
                where = f"TensorRT plan {plan.relative_to(m.root)}"
                ok = findings["tensorrt"]["python"] is not None and plan.is_file()
                if not plan.is_file():
                    where += " (not built: ./build_engines.sh)"
            elif provider == "tensorrt" and name in trt_ep_engines:
                where, ok = "TensorrtExecutionProvider", loads["TensorrtExecutionProvider"]
            else:
                where, ok = "CUDAExecutionProvider", loads["CUDAExecutionProvider"]
                if name == "llm" and entry.get("precision") == "fp32":
                    where += " (fp32 llm: GroupQueryAttention runs fp16/bf16 only on CUDA; export --precision fp16)"
                    ok = False
            rows.append({"provider": provider, "engine": name, "precision": entry.get("precision", "?"),
                         "runs_on": where, "ok": "yes" if ok else "no"})
    opts = (gpu.get("tensorrt_ep") or {}).get("options") or {}
    per = (gpu.get("tensorrt_ep") or {}).get("per_engine") or {}
    for name, o in per.items():
        table = o.get("trt_int8_calibration_table_name")
        if table and opts.get("trt_int8_enable") and not (Path(m.root) / table).is_file() \
                and not Path(table).is_absolute():
            problems.append(f"{name}: trt_int8_enable with calibration table {table}, which does not exist "
                            f"(run agvas calibrate and pass --calib-dir)")
    return rows, problems


def collect() -> dict[str, Any]:
    problems: list[str] = []
    ort, p1 = _onnxruntime()
    cuda, p2 = _cuda_python()
    problems += p1 + p2
    return {"platform": _platform(), "torch": _torch(), "onnxruntime": ort, "cuda_python": cuda,
            "tensorrt": _tensorrt(), "gpu": _gpu(), "tritonclient": _dist("tritonclient"), "problems": problems}


def _table(rows: list[tuple[str, str]]) -> str:
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


def render(f: dict[str, Any]) -> str:
    pl, t, o, c, trt = f["platform"], f["torch"], f["onnxruntime"], f["cuda_python"], f["tensorrt"]
    gpus = "; ".join(f"{g['name']} ({g['memory']}, driver {g['driver']})" for g in f["gpu"]) or "none"
    rows = [("Python", f"{pl['python']} ({pl['platform']})"), ("Jetson", pl["jetson"] or "no"), ("GPU", gpus)]
    if t["installed"]:
        dev = t.get("device") or ("no CUDA device" if t.get("cuda_build") else "CPU build")
        rows.append(("torch", f"{t['version']} (CUDA {t.get('cuda_build') or '-'}; {dev})"))
    else:
        rows.append(("torch", t["note"]))
    if o["installed"]:
        rows.append(("onnxruntime", f"{o['version']} [{', '.join(f'{k} {v}' for k, v in o['distributions'].items())}]"))
        rows.append(("  providers", ", ".join(o["providers"])))
        for p in ("CUDAExecutionProvider", "TensorrtExecutionProvider"):
            rows.append((f"  {p}", o.get(p, "not in this build")))
        rows.append(("onnxruntime-genai", ", ".join(f"{k} {v}" for k, v in (o["genai"] or {}).items())
                     or "not installed (only agvas export needs it)"))
    else:
        rows.append(("onnxruntime", "not installed"))
    rows.append(("TensorRT", trt["python"] or f"not importable ({trt['import_error'] or 'absent'})"))
    rows.append(("trtexec", trt["trtexec"] or "not found"))
    rows.append(("cuda-python", f"{c['version']} (driver CUDA {c.get('driver_cuda') or 'none'})"
                 if c["installed"] else c["note"]))
    rows.append(("tritonclient", f["tritonclient"] or "not installed"))
    out = _table(rows)
    if f.get("engines"):
        eng = f["engines"]
        w = max(len(r["engine"]) for r in eng["rows"])
        lines = [f"\nengines of {eng['dir']} (provider choice -> where each engine runs):"]
        for r in eng["rows"]:
            lines.append(f"  --provider {r['provider']:<16} {r['engine']:<{w}}  {r['precision']:<5} "
                         f"{'ok ' if r['ok'] == 'yes' else 'NO '} {r['runs_on']}")
        usable = sorted({r["provider"] for r in eng["rows"]} - {r["provider"] for r in eng["rows"] if r["ok"] == "no"})
        lines.append("  usable here: " + (", ".join(f"--provider {p}" for p in usable) or "none"))
        out += "\n".join(lines)
    if f["problems"]:
        out += "\n\nproblems:\n" + "\n".join(f"  - {p}" for p in f["problems"])
    return out + "\n"


def run(args) -> int:
    f = collect()
    if args.engines:
        if not (Path(args.engines) / "manifest.json").is_file():
            raise FileNotFoundError(f"--engines {args.engines}: no manifest.json (not an agvas export directory)")
        rows, problems = engine_plan(args.engines, f)
        f["engines"] = {"dir": str(args.engines), "rows": rows}
        f["problems"] += problems
    sys.stdout.write(json.dumps(f, indent=2) + "\n" if args.json else render(f))
    return 0
