"""TensorRT on CPU: the build recipes per TensorRT major version (against a stand-in ``tensorrt``
module that has only the documented API, ``tests/stubs/tensorrt``), the Python builder and its
INT8 entropy calibration, ``build_engines.sh`` run with a stand-in ``trtexec``, the calibration
cache format, the manifest's TensorRT-EP options for fp32 / fp16 / QDQ exports, the runtime's
provider options, and Triton's plan batch size. Nothing here fakes a GPU result: the stand-ins
only check that the calls follow the documented rules.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from stubs.tensorrt import make_module
from test_runtime import tiny_export  # noqa: F401 - the shared session export

from agvas.export.manifest import Manifest, load_manifest, write_manifest
from agvas.export.tensorrt import (EP_TABLE, TRT_CACHE, build_engines, build_recipe, fp32_layer_names, gpu_settings,
                             network_flags, profiles, trt_major, trtexec_flags, write_build_script)

TRT8, TRT10 = "8.6.1.6", "10.3.0.30"
QDQ_RECORD = {"precision": "int8", "method": "quantize_static QDQ int8 per-channel", "activation_symmetric": True}


@pytest.fixture(scope="module")
def base_export(tiny_export, tmp_path_factory) -> Path:  # noqa: F811
    """A private copy of the session export with its build script (as `--target tensorrt` writes it)."""
    root = tmp_path_factory.mktemp("trt") / "exp"
    shutil.copytree(tiny_export, root)
    write_build_script(root, load_manifest(root).data)
    return root


@pytest.fixture
def export(base_export, tmp_path) -> Path:
    root = tmp_path / "exp"
    shutil.copytree(base_export, root)
    return root


def with_precisions(root: Path, precisions: dict[str, str], records: dict | None = None) -> dict:
    """Relabel engines of the export at ``root`` (fp16 / int8 with an ``agvas quantize`` record),
    rewrite its GPU settings and build script as ``agvas quantize`` does; returns the manifest data."""
    data = load_manifest(root).data
    for e, p in precisions.items():
        data["engines"][e]["precision"] = p
    if records:
        data["calibration"] = {"engines": records}
    data["gpu"] = gpu_settings(data, 4)
    write_build_script(root, data)
    write_manifest(root, data)
    return data


def install_trt(monkeypatch, version: str):
    trt = make_module(version)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    return trt


def fake_cudart(monkeypatch, where: str = "bindings") -> types.SimpleNamespace:
    """cuda-python's runtime bindings as far as the calibrator uses them (``cuda.bindings.runtime``
    of cuda-python >= 12.6, or the older ``cuda.cudart``), recording allocations."""
    rec = types.SimpleNamespace(mallocs=[], frees=[], copies=0)
    rt = types.ModuleType("runtime")
    rt.cudaMemcpyKind = types.SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2)

    def malloc(n):
        rec.mallocs.append(n)
        return 0, 0x1000 * len(rec.mallocs)

    def memcpy(dst, src, n, kind):
        assert dst and kind == 1 and n > 0
        rec.copies += 1
        return (0,)

    rt.cudaMalloc, rt.cudaMemcpy = malloc, memcpy
    rt.cudaFree = lambda p: (rec.frees.append(p), (0,))[1]
    cuda = types.ModuleType("cuda")
    if where == "bindings":
        bindings = types.ModuleType("cuda.bindings")
        bindings.runtime = rt
        cuda.bindings = bindings
        monkeypatch.setitem(sys.modules, "cuda.bindings", bindings)
        monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", rt)
    else:  # cuda-python < 12.6
        cuda.cudart = rt
        monkeypatch.setitem(sys.modules, "cuda.bindings", None)
        monkeypatch.setitem(sys.modules, "cuda.cudart", rt)
    monkeypatch.setitem(sys.modules, "cuda", cuda)
    return rec


def calls(trt, kind: str) -> list:
    return [c[1:] if len(c) > 2 else c[1] for c in trt.log if c[0] == kind]


# ---- the version-dispatch seam -------------------------------------------------------------------

def test_network_flags_per_major():
    """Below TensorRT 10 the ONNX parser needs 1 << EXPLICIT_BATCH (create_network(0) is implicit
    batch and parsing fails); in 10 the flag is deprecated and ignored, and fp16/QDQ graphs are
    strongly typed."""
    t8, t10 = make_module(TRT8), make_module(TRT10)
    assert trt_major(t8) == 8 and trt_major(t10) == 10 and trt_major("10.3.0") == 10
    assert network_flags(t8, build_recipe(8, "fp32")) == 1 << int(t8.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    assert network_flags(t10, build_recipe(10, "fp32")) == 0
    for mode in ("fp16", "qdq"):
        assert network_flags(t10, build_recipe(10, mode)) == 1 << int(t10.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        assert network_flags(t8, build_recipe(8, mode)) == 1  # TensorRT 8.6 has no STRONGLY_TYPED
    assert not hasattr(t8.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
    # the stand-in keeps the documented rule that made create_network(0) fail on 8.x
    net = t8.Builder(t8.Logger()).create_network(0)
    assert not t8.OnnxParser(net, t8.Logger()).parse_from_file("unused.onnx")


def test_recipes_and_trtexec_flags_per_major_and_graph():
    ln = ("ln_1", "softmax_2")
    spec = "ln_1:fp32,softmax_2:fp32"
    kept = ["--precisionConstraints=obey", f"--layerPrecisions={spec}", f"--layerOutputTypes={spec}"]
    # fp32 graph: --fp16 with the LayerNorm/Softmax layers held in fp32, on both majors
    for major in (8, 10):
        r = build_recipe(major, "fp32", fp32_layers=ln)
        assert r.flags == ("FP16", "OBEY_PRECISION_CONSTRAINTS") and not r.strongly_typed and r.fp32_layers == ln
        assert trtexec_flags(r) == ["--fp16", *kept]
        r8 = build_recipe(major, "fp32", int8=True, fp32_layers=ln)
        assert r8.calibrate and trtexec_flags(r8, calib="C") == ["--fp16", "--int8", "--calib=C", *kept]
        assert trtexec_flags(build_recipe(major, "fp32", fp16=False, fp32_layers=ln)) == []
        assert trtexec_flags(build_recipe(major, "fp32", fp16=False, int8=True), calib="C") == ["--int8", "--calib=C"]
    # fp16 graph: strongly typed on 10 (the ONNX types), --fp16 + constraints on 8.6
    assert trtexec_flags(build_recipe(10, "fp16", fp32_layers=ln)) == ["--stronglyTyped"]
    assert trtexec_flags(build_recipe(8, "fp16", fp16=False, fp32_layers=ln)) == ["--fp16", *kept]
    # QDQ graph: strongly typed on 10; --int8 and no calibration cache on 8.6
    assert trtexec_flags(build_recipe(10, "qdq")) == ["--stronglyTyped"]
    assert trtexec_flags(build_recipe(8, "qdq")) == ["--int8", "--fp16"]
    assert trtexec_flags(build_recipe(8, "qdq", fp16=False)) == ["--int8"]
    assert not build_recipe(8, "qdq").calibrate
    with pytest.raises(ValueError, match="calibrates the fp32 graphs"):
        build_recipe(10, "fp16", int8=True)
    with pytest.raises(ValueError, match="8.6 and 10"):
        build_recipe(11, "fp32")
    with pytest.raises(ValueError, match="8.6 and 10"):
        build_recipe(7, "fp32")


# ---- the Python builder against the documented API -------------------------------------------------

@pytest.mark.parametrize("version", [TRT8, TRT10])
def test_python_builder_fp32_export(export, monkeypatch, version):
    trt = install_trt(monkeypatch, version)
    m = load_manifest(export)
    built = build_engines(export, ("agmd", "spam"))
    assert sorted(built) == ["agmd", "spam"] and all(p.is_file() for p in built.values())
    assert calls(trt, "create_network") == [1 if version == TRT8 else 0] * 2
    assert calls(trt, "set_flag") == ["FP16", "OBEY_PRECISION_CONSTRAINTS"] * 2
    assert "build_failed" not in [c[0] for c in trt.log] and not calls(trt, "set_calibration_profile")
    # one optimisation profile per engine, from the manifest's dynamic axes
    profs = profiles(m.data)
    want = [{k: (tuple(v["min"]), tuple(v["opt"]), tuple(v["max"])) for k, v in profs[e].items()} for e in ("agmd", "spam")]
    assert calls(trt, "add_optimization_profile") == want
    # the fp32-kept layers (named after their ONNX nodes) held in fp32
    assert calls(trt, "fp32_layers") == [fp32_layer_names(export / "agmd.onnx"), fp32_layer_names(export / "spam.onnx")]
    assert calls(trt, "fp32_layers")[0]
    rec = json.loads((export / "trt" / "agmd.plan.json").read_text())
    assert rec["tensorrt_version"] == version and rec["profile"] == profs["agmd"] and rec["mode"] == "fp32"
    # without the tensorrt package the builder says so
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(RuntimeError, match="needs the `tensorrt` Python package"):
        build_engines(export, ("agmd",))


@pytest.mark.parametrize("version", [TRT8, TRT10])
def test_python_builder_fp16_and_qdq_exports(export, monkeypatch, version):
    with_precisions(export, {"agmd": "fp16", "sam_encoder": "int8"}, {"sam_encoder": QDQ_RECORD})
    trt = install_trt(monkeypatch, version)
    build_engines(export, ("agmd", "sam_encoder"))
    strong = 1 << 1
    if version == TRT10:
        assert calls(trt, "create_network") == [strong, strong] and calls(trt, "set_flag") == []
        assert calls(trt, "fp32_layers") == [[], []]  # the graph's own types
    else:
        assert calls(trt, "create_network") == [1, 1]
        assert calls(trt, "set_flag") == ["FP16", "OBEY_PRECISION_CONSTRAINTS", "INT8", "FP16"]
        assert calls(trt, "fp32_layers")[0] == fp32_layer_names(export / "agmd.onnx")
    assert not calls(trt, "set_calibration_profile") and not calls(trt, "calibrated")
    assert "build_failed" not in [c[0] for c in trt.log]
    trt = install_trt(monkeypatch, version)  # --int8: a QDQ engine is int8 by its graph, no calibration
    build_engines(export, ("sam_encoder",), int8=True)
    assert not calls(trt, "set_calibration_profile") and "build_failed" not in [c[0] for c in trt.log]
    with pytest.raises(ValueError, match="calibrates the fp32 graphs"):
        build_engines(export, ("agmd",), int8=True)


@pytest.mark.parametrize("record,match", [
    ({"precision": "int8", "method": "quantize_dynamic int8 per-channel (MatMul)", "variant": "dynamic"}, "dynamic"),
    ({**QDQ_RECORD, "activation_symmetric": False}, "asymmetric"),
])
def test_cpu_quantized_engines_are_refused(export, monkeypatch, record, match):
    with_precisions(export, {"vision": "int8"}, {"vision": record})
    install_trt(monkeypatch, TRT10)
    with pytest.raises(ValueError, match=match):
        build_engines(export, ("vision",))
    r = subprocess.run(["bash", str(export / "build_engines.sh"), "--dry-run", "vision"], capture_output=True, text=True)
    assert r.returncode == 2 and match in r.stderr


def _spam_store(export: Path, cal: Path) -> None:
    """A calibration directory with SPAM samples of two token counts and batch sizes (rows of 70
    tokens: 3; of 40: 1), and the trtexec cache beside them."""
    from agvas.calibration.readers import write_tensorrt_cache
    from agvas.calibration.store import StoreWriter

    m = load_manifest(export)
    w = StoreWriter(cal, {"export": {"checkpoint_sha256": m.data["source"]["checkpoint_sha256"]}})
    rng = np.random.default_rng(0)
    for b, n in ((1, 70), (2, 70), (1, 40)):
        w.add_sample("spam", {"semantic_tokens": rng.standard_normal((b, n, 128)).astype(np.float32),
                              "pixel_embedding": rng.standard_normal((b, 64, 16, 16)).astype(np.float32)})
    w.close()
    write_tensorrt_cache({"semantic_tokens": 4.0}, cal / TRT_CACHE.format(engine="spam"))


def test_python_builder_int8_entropy_calibration(export, monkeypatch, tmp_path):
    """INT8 of an fp32 engine: entropy calibration on the captured samples at the calibration
    profile's kOPT shape (the most common token count, rows of batch 1), the cache written and
    reused while TensorRT accepts it (same version), recalibrated when it does not."""
    cal = tmp_path / "cal"
    _spam_store(export, cal)
    cuda = fake_cudart(monkeypatch)
    trt = install_trt(monkeypatch, TRT8)
    build_engines(export, ("spam",), int8=True, calib_dir=cal)
    assert calls(trt, "set_flag") == ["FP16", "INT8", "OBEY_PRECISION_CONSTRAINTS"]
    assert calls(trt, "set_calibration_profile") == [{"semantic_tokens": (1, 70, 128), "pixel_embedding": (1, 64, 16, 16)}]
    assert calls(trt, "calibrated")[0][0] == 3
    cache = cal / "tensorrt" / "spam" / "entropy.cache"
    assert cache.read_text().startswith("TRT-8601-EntropyCalibration2\n")
    assert sorted(cuda.mallocs) == sorted([70 * 128 * 4, 64 * 16 * 16 * 4]) and cuda.copies == 6
    assert len(cuda.frees) == 2  # freed after the build
    rec = json.loads((export / "trt" / "spam.plan.json").read_text())["calibration"]
    assert rec["batches"] == 3 and rec["shape"]["semantic_tokens"] == [1, 70, 128]
    # the same TensorRT reuses the cache; another version ignores it and calibrates again
    trt = install_trt(monkeypatch, TRT8)
    build_engines(export, ("spam",), int8=True, calib_dir=cal)
    assert calls(trt, "calibration_cache_used") == ["TRT-8601-EntropyCalibration2"] and not calls(trt, "calibrated")
    trt = install_trt(monkeypatch, TRT10)
    build_engines(export, ("spam",), int8=True, calib_dir=cal)
    assert calls(trt, "calibrated")[0][0] == 3 and cache.read_text().startswith("TRT-100300-")
    # a calibration directory of another checkpoint is refused
    meta = json.loads((cal / "calibration.json").read_text())
    meta["export"]["checkpoint_sha256"] = "0" * 64
    (cal / "calibration.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="another|captured from checkpoint"):
        build_engines(export, ("spam",), int8=True, calib_dir=cal)


def test_entropy_calibrator_buffers_and_cuda_modules(export, monkeypatch, tmp_path):
    from agvas.calibration.readers import calibration_batches, calibration_shape, entropy_calibrator, tensorrt_entropy_cache
    from agvas.calibration.store import CalibrationStore

    cal = tmp_path / "cal"
    _spam_store(export, cal)
    store = CalibrationStore(cal)
    inputs = load_manifest(export).engine("spam")["inputs"]
    shape, n = calibration_shape(store.samples("spam"), inputs)
    assert n == 3 and shape == {"semantic_tokens": (1, 70, 128), "pixel_embedding": (1, 64, 16, 16)}
    assert len(list(calibration_batches(store.samples("spam"), inputs, shape))) == 3
    # the old import path (cuda-python < 12.6) through the one shared helper; buffers grow on demand
    cuda = fake_cudart(monkeypatch, where="cudart")
    trt = make_module(TRT10)
    calib, _, _ = entropy_calibrator(trt, store, "spam", inputs, cal / "e.cache")
    p = calib._device("x", 64)
    assert calib._device("x", 32) == p and cuda.mallocs == [64]
    assert calib._device("x", 128) != p and cuda.mallocs == [64, 128] and cuda.frees == [p]
    calib.free()
    # no cuda-python: skipped with the reason, no cache
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "cuda", None)
    r = tensorrt_entropy_cache(export / "spam.onnx", store, "spam", inputs, profiles(load_manifest(export).data)["spam"],
                               cal / "x.cache")
    assert "cuda-python" in r["skipped"] and not (cal / "x.cache").exists()


# ---- TensorRT's calibration cache format ---------------------------------------------------------

def test_tensorrt_cache_format_and_stamp(tmp_path):
    from agvas.calibration.readers import (cache_version, read_tensorrt_cache, stamp_tensorrt_cache, tensorrt_cache_text,
                                     write_tensorrt_cache)

    assert cache_version("8.6.1.6") == 8601 and cache_version("8.6.2") == 8602 and cache_version("10.3.0.30") == 100300
    text = tensorrt_cache_text({"input": 127.0, "conv_out": 1.0})  # scale 1/127: 3c010204, as TensorRT writes
    assert text.splitlines() == ["TRT-0-EntropyCalibration2", "conv_out: 3c010204", "input: 3f800000"]
    p = write_tensorrt_cache({"input": 127.0, "conv_out": 1.0}, tmp_path / "c.cache")
    assert stamp_tensorrt_cache(p, 8601) and not stamp_tensorrt_cache(p, 8601)
    header, scales = read_tensorrt_cache(p)
    assert header == "TRT-8601-EntropyCalibration2" and scales["input"] == 1.0
    assert abs(scales["conv_out"] - 1.0 / 127) < 1e-9


# ---- build_engines.sh with a stand-in trtexec ------------------------------------------------------

FAKE_TRTEXEC = """#!/usr/bin/env bash
# stand-in trtexec: the banner of TensorRT v{v}; --version fails as the real one does without a model
echo "&&&& RUNNING TensorRT.trtexec [TensorRT v{v}] # trtexec $*"
out=""; cal=""
for a in "$@"; do case "$a" in --saveEngine=*) out="${{a#*=}}";; --calib=*) cal="${{a#*=}}";; --version) exit 1;; esac; done
[ -z "$cal" ] || head -n 1 "$cal" >> "$TRTEXEC_LOG"
echo "$*" >> "$TRTEXEC_LOG"
touch "$out"
"""


def _fake_trtexec(tmp_path: Path, version: int) -> dict:
    bin_dir = tmp_path / f"bin{version}"
    bin_dir.mkdir()
    (bin_dir / "trtexec").write_text(FAKE_TRTEXEC.format(v=version))
    (bin_dir / "trtexec").chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin", "TRTEXEC_LOG": str(tmp_path / f"log{version}")}


def test_build_script_runs_trtexec_per_version(export, tmp_path):
    from agvas.calibration.readers import write_tensorrt_cache

    cal = tmp_path / "cal"
    for e in ("agmd", "spam"):
        write_tensorrt_cache({"x": 1.0}, cal / TRT_CACHE.format(engine=e))
    script = str(export / "build_engines.sh")
    env = _fake_trtexec(tmp_path, 8601)
    r = subprocess.run(["bash", script, "--int8", "--calib-dir", str(cal), "agmd", "spam"], capture_output=True,
                       text=True, env=env)
    assert r.returncode == 0, r.stderr
    log = (tmp_path / "log8601").read_text().splitlines()
    # the cache header was set to the installed version before trtexec read it (engines in their order)
    assert log[0] == log[2] == "TRT-8601-EntropyCalibration2"
    assert log[1].startswith("--onnx=spam.onnx") and log[3].startswith("--onnx=agmd.onnx")
    assert "--int8" in log[3] and f"--calib={cal}/tensorrt/agmd/tensorrt.cache" in log[3]
    assert "--fp16" in log[3] and "--precisionConstraints=obey" in log[3] and "--stronglyTyped" not in log[3]
    rec = json.loads((export / "trt" / "agmd.plan.json").read_text())
    assert rec["tensorrt_version"] == "8601" and rec["builder"] == "trtexec"
    assert rec["profile"] == profiles(load_manifest(export).data)["agmd"]
    # --trt-major must agree with the installed trtexec
    r = subprocess.run(["bash", script, "--trt-major", "10", "agmd"], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "trtexec is TensorRT 8" in r.stderr
    # TensorRT 10: an fp16 graph is built strongly typed (no --fp16), a QDQ graph too (no --int8, no --calib)
    with_precisions(export, {"agmd": "fp16", "sam_encoder": "int8"}, {"sam_encoder": QDQ_RECORD})
    env = _fake_trtexec(tmp_path, 100300)
    r = subprocess.run(["bash", script, "--int8", "--calib-dir", str(tmp_path / "none"), "agmd", "sam_encoder"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "agmd (fp16 graph)" in r.stderr  # --int8 of an fp16 graph: refused
    r = subprocess.run(["bash", script, "agmd", "sam_encoder"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    for line in (tmp_path / "log100300").read_text().splitlines():
        assert "--stronglyTyped" in line and "--fp16" not in line and "--int8" not in line and "--calib" not in line


def test_dry_runs_agree_and_check_files(export, tmp_path):
    """The script's --dry-run and the Python builder's print the same trtexec commands; with --int8
    both exit 2 naming the missing cache and the command that makes it."""
    script = str(export / "build_engines.sh")
    env = {**os.environ, "PATH": "/usr/bin:/bin"}
    for major in ("8", "10"):
        r = subprocess.run(["bash", script, "--dry-run", "--trt-major", major], capture_output=True, text=True, env=env)
        assert r.returncode == 0, r.stderr
        py = subprocess.run([sys.executable, "-m", "agvas.export.tensorrt", str(export), "--dry-run", "--trt-major", major],
                            capture_output=True, text=True)
        assert py.returncode == 0 and py.stdout == r.stdout and len(r.stdout.splitlines()) == 4
    cal = tmp_path / "cal"
    r = subprocess.run(["bash", script, "--dry-run", "--int8", "--calib-dir", str(cal), "spam"], capture_output=True,
                       text=True, env=env)
    want = f"missing {cal}/tensorrt/spam/tensorrt.cache (run: agvas calibrate --engines {export}"
    assert r.returncode == 2 and want in r.stderr and not r.stdout
    py = subprocess.run([sys.executable, "-m", "agvas.export.tensorrt", str(export), "spam", "--dry-run", "--int8",
                         "--calib-dir", str(cal)], capture_output=True, text=True)
    assert py.returncode == 2 and want in py.stderr


# ---- the manifest's provider options and the runtime's -------------------------------------------

def test_manifest_gpu_settings_per_export_kind(export):
    data = load_manifest(export).data
    ep = data["gpu"]["tensorrt_ep"]
    assert ep["options"]["trt_int8_enable"] is False and ep["options"]["trt_int8_use_native_calibration_table"] is False
    assert ep["options"]["trt_layer_norm_fp32_fallback"] is True
    assert not any(k.startswith("trt_int8") for opts in ep["per_engine"].values() for k in opts)
    assert ep["int8_calibration_table"] == EP_TABLE and data["gpu"]["tensorrt"]["modes"]["vision"] == "fp32"
    fp16 = with_precisions(export, {e: "fp16" for e in ("vision", "sam_encoder", "spam", "agmd")})
    assert not any(k.startswith("trt_int8") for opts in fp16["gpu"]["tensorrt_ep"]["per_engine"].values() for k in opts)
    assert set(fp16["gpu"]["tensorrt"]["modes"].values()) == {"fp16"}
    # QDQ: INT8 on for that engine, and no calibration table anywhere
    qdq = with_precisions(export, {"sam_encoder": "int8"}, {"sam_encoder": QDQ_RECORD})["gpu"]["tensorrt_ep"]
    assert qdq["per_engine"]["sam_encoder"]["trt_int8_enable"] is True
    assert "trt_int8_enable" not in qdq["per_engine"]["vision"]
    assert "trt_int8_calibration_table_name" not in json.dumps(qdq)


def test_quantized_export_rewrites_gpu_settings_and_build_script(export, tmp_path):
    """`agvas quantize`'s writer: the GPU block and build_engines.sh follow the new precisions."""
    from agvas.calibration.quantized_export import write_export

    m = load_manifest(export)
    out = write_export(m, tmp_path / "q", {}, {"sam_encoder": QDQ_RECORD}, {"engines": {"sam_encoder": QDQ_RECORD}}, {})
    q = load_manifest(out)
    assert q.engine("sam_encoder")["precision"] == "int8"
    assert q.data["gpu"]["tensorrt_ep"]["per_engine"]["sam_encoder"]["trt_int8_enable"] is True
    assert q.data["gpu"]["tensorrt"]["modes"]["sam_encoder"] == "qdq"
    r = subprocess.run(["bash", str(out / "build_engines.sh"), "--dry-run", "--trt-major", "8", "--int8", "sam_encoder"],
                       capture_output=True, text=True, env={**os.environ, "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    assert "--int8" in r.stdout and "--calib" not in r.stdout


def _ort_trt(monkeypatch):
    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])


def test_ort_providers_int8_table(export, monkeypatch, tmp_path):
    from agvas.runtime.engines import ort_providers

    _ort_trt(monkeypatch)
    monkeypatch.delenv("AGVAS_TRT_CALIB_DIR", raising=False)
    m = load_manifest(export)
    (name, opts), cuda, cpu = ort_providers("tensorrt", "vision", m)
    assert name == "TensorrtExecutionProvider" and cuda[0] == "CUDAExecutionProvider" and cpu == "CPUExecutionProvider"
    assert opts["trt_int8_enable"] is False and "trt_int8_calibration_table_name" not in opts
    cache = Path(opts["trt_engine_cache_path"])
    assert cache == (export / "trt_cache").resolve() and opts["trt_profile_min_shapes"].startswith("pixel_values:")
    # a calibration directory: ORT's table, relative to the engine cache path, native flag off
    cal = tmp_path / "cal"
    with pytest.raises(FileNotFoundError, match="agvas calibrate"):
        ort_providers("tensorrt", "vision", m, calib_dir=cal)
    table = cal / EP_TABLE.format(engine="vision")
    table.parent.mkdir(parents=True)
    table.write_bytes(b"flatbuffers")
    monkeypatch.setenv("AGVAS_TRT_CALIB_DIR", str(cal))
    opts = ort_providers("tensorrt", "vision", m)[0][1]
    assert opts["trt_int8_enable"] is True and opts["trt_int8_use_native_calibration_table"] is False
    assert not os.path.isabs(opts["trt_int8_calibration_table_name"])
    assert (cache / opts["trt_int8_calibration_table_name"]).resolve() == table.resolve()
    # the LLM stays on CUDA
    assert ort_providers("tensorrt", "llm", m)[0][0] == "CUDAExecutionProvider"
    # a QDQ engine: INT8 on and never a table, calibration directory or not; an older manifest's names dropped
    data = json.loads(json.dumps(m.data))
    data["engines"]["sam_encoder"]["precision"] = "int8"
    data["calibration"] = {"engines": {"sam_encoder": QDQ_RECORD}}
    data["gpu"]["tensorrt_ep"]["per_engine"]["sam_encoder"]["trt_int8_calibration_table_name"] = "calibration/x.cache"
    data["gpu"]["tensorrt_ep"]["options"]["trt_int8_use_native_calibration_table"] = True
    opts = ort_providers("tensorrt", "sam_encoder", Manifest(export, data), calib_dir=cal)[0][1]
    assert opts["trt_int8_enable"] is True
    assert "trt_int8_calibration_table_name" not in opts and "trt_int8_use_native_calibration_table" not in opts
    monkeypatch.delenv("AGVAS_TRT_CALIB_DIR")
    opts = ort_providers("tensorrt", "spam", Manifest(export, data))[0][1]
    assert opts["trt_int8_enable"] is False and "trt_int8_calibration_table_name" not in opts


# ---- Triton: a plan's batch size is its own profile's ------------------------------------------------

def test_triton_plan_batch_from_the_plan_record(export):
    from agvas.export.triton import engine_config

    m = load_manifest(export)
    plan = export / "trt" / "sam_encoder.plan"
    plan.parent.mkdir(exist_ok=True)
    plan.write_bytes(b"a serialized engine")
    assert engine_config(m, "sam_encoder", plan=True)["max_batch_size"] == 4  # no record: the export's profile
    prof = profiles(m.data, max_batch=2)["sam_encoder"]  # rebuilt with --max-batch 2
    (export / "trt" / "sam_encoder.plan.json").write_text(json.dumps({"engine": "sam_encoder", "profile": prof}))
    assert engine_config(m, "sam_encoder", plan=True)["max_batch_size"] == 2
