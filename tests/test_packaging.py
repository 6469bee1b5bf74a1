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


def test_installed_wheel_exposes_one_namespace(tmp_path):
    """The wheel in a fresh virtual environment: only `agvas` (and its dist-info) in site-packages,
    the repository's folders mapped under it (agvas.export, agvas.runtime, ...), the `agvas`
    script, and no top-level `export` / `runtime` / `calibration` / `benchmarks` / `agvas_train`."""
    import venv

    wheels = tmp_path / "wheels"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(wheels), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    wheel = next(wheels.glob("agvas_edge-*.whl"))
    env = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env)
    py = env / "bin" / "python"
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    ours = {p.name for p in site.iterdir()} - {"pip", "_distutils_hack", "setuptools", "pkg_resources",
                                               "distutils-precedence.pth", "__pycache__"}
    ours = {n for n in ours if not n.startswith(("pip-", "setuptools-"))}
    assert {n for n in ours if not n.endswith(".dist-info")} == {"agvas"}, ours
    for sub in ("train", "train/modeling", "train/data", "export", "runtime", "calibration", "benchmarks"):
        assert (site / "agvas" / sub / "__init__.py").is_file(), sub
    assert (site / "agvas" / "train" / "assets" / "tiny_tokenizer").is_dir()  # package data travels
    probe = ("import importlib.util as u; "
             "print([n for n in ('export', 'runtime', 'calibration', 'benchmarks', 'agvas_train') if u.find_spec(n)]); "
             "print(u.find_spec('agvas.export.manifest').origin)")
    r = subprocess.run([str(py), "-I", "-c", probe], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    found, origin = r.stdout.splitlines()
    assert found == "[]" and origin.startswith(str(site))
    r = subprocess.run([str(env / "bin" / "agvas"), "--version"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.startswith("agvas "), r.stdout + r.stderr
