"""Packaging for GPU machines and Jetson: the code parses and imports on Python 3.10 semantics
(JetPack 6), and no GPU extra pulls CPU ONNX Runtime (which would shadow onnxruntime-gpu's CUDA
and TensorRT providers: both install the same `onnxruntime` module)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["agvas", "agvas_train", "export", "runtime", "calibration", "benchmarks"]


def test_code_needs_no_more_than_python_3_10():
    """vermin's static analysis (no 3.10 interpreter can be installed here): the minimum version
    the syntax, modules and members need must be <= 3.10."""
    vermin = Path(sys.executable).with_name("vermin")
    r = subprocess.run([str(vermin), "-t=3.10-", "--no-tips", "--violations",
                        "--eval-annotations", *PACKAGES], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_requires_python_admits_jetpack_6():
    import tomllib

    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert data["project"]["requires-python"] == ">=3.10"
    deps = " ".join(data["project"]["dependencies"])
    assert "onnxruntime" not in deps and "torch" not in deps  # the core forces no ORT build, no torch
    for extra in ("gpu", "jetson", "cuda12"):
        assert not any(d.split(">")[0].split("=")[0].strip() == "onnxruntime"
                       for d in data["project"]["optional-dependencies"][extra])


def _resolve(spec: str) -> set[str]:
    """pip's resolver on ``spec`` as a fresh environment would see it (nothing installed counts)."""
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                        "--report", "-", spec], cwd=ROOT, capture_output=True, text=True, timeout=600)
    if r.returncode != 0 and ("No matching distribution" in r.stderr or "NewConnectionError" in r.stderr):
        pytest.skip(f"no package index reachable: {r.stderr.strip().splitlines()[-1]}")
    assert r.returncode == 0, r.stderr[-2000:]
    return {i["metadata"]["name"].lower().replace("_", "-") for i in json.loads(r.stdout)["install"]}


@pytest.mark.parametrize("extra", ["gpu", "jetson"])
def test_gpu_extras_resolve_without_cpu_onnxruntime(extra):
    names = _resolve(f".[{extra}]")
    assert "onnxruntime" not in names, sorted(names)
    assert "torch" not in names  # the edge install: runtime only
    if extra == "gpu":
        assert "onnxruntime-gpu" in names
        cuda = [n for n in names if n.startswith("cuda-bindings")]
        assert cuda
    else:
        assert "onnxruntime-gpu" not in names  # NVIDIA's Jetson wheel is installed first, never replaced
