"""Everything `agvas bench` needs, built once into a cache folder (``.cache/bench/`` by default):

    CACHE/<config>/checkpoint/      random init (config seed) + planted answer, unless --checkpoint
    CACHE/<config>/images/          the bench images (synthetic, seeded) or a meta.json test split
    CACHE/<config>/export-<prec>/   `agvas export` / `agvas quantize` outputs (when those verbs exist)
    CACHE/<config>/genai-<prec>/    onnxruntime-genai's own model of the same Qwen2 weights (the peer)

Each item is rebuilt only when missing (or when its source checkpoint changed: exports and peer
models record the checkpoint hash they were built from).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

# Image size per config: the smallest anyres image of each (SigLIP crop size) and SAM's input.
DEFAULT_IMAGE_SIZE = {"tiny": 128, "ov-0.5b": 384, "ov-7b": 384}


def synthetic_images(out_dir: Path, n: int, size: int, seed: int = 0) -> list[str]:
    """``n`` seeded RGB images of ``size``² with a textured background and a few blobs."""
    from PIL import Image, ImageDraw

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = out_dir / f"img_{size}_{seed}_{i:03d}.png"
        if not p.exists():
            rng = np.random.default_rng(seed * 1000 + i)
            base = rng.uniform(40, 200, size=3)
            arr = np.clip(base + rng.normal(0, 20, size=(size, size, 3)), 0, 255).astype(np.uint8)
            img = Image.fromarray(arr)
            d = ImageDraw.Draw(img)
            for _ in range(int(rng.integers(0, 3))):
                x, y = rng.integers(0, size, 2)
                r = int(rng.integers(size // 20 + 1, size // 6 + 2))
                d.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
            from agvas.atomic import atomic_path

            with atomic_path(p) as tmp:
                img.save(tmp, format="PNG")
        paths.append(str(p))
    return paths


def planted_checkpoint(config: str, out: Path, images: list[str] | None = None
                       ) -> tuple[Path, dict[str, Any]]:
    """Random-init ``config`` (its seed) with the planted answer (:mod:`agvas.benchmarks.plant`), probed
    on the real visual tokens of ``images`` (at most two of them), saved as a full checkpoint.
    Reused when present."""
    meta_path = out / "checkpoint.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if "bench_planted" in meta:
            return out, meta["bench_planted"]
    from agvas.train.checkpoint import save_checkpoint
    from agvas.train.config import get_config
    from agvas.train.modeling import build_model, image_processor_for

    from .plant import plant_answer

    cfg = get_config(config)
    model, tok = build_model(cfg)
    visuals = None
    if images:
        from agvas.train.reference import ReferencePipeline

        pipe = ReferencePipeline(model, tok, image_processor_for(cfg))
        visuals = [pipe.encode(pipe.prepare(p))[0] for p in images[:2]]
    info = plant_answer(model, tok, visuals)
    info["weights"] = f"random init (seed {cfg.seed}) + planted answer circuit (benchmarks/plant.py)"
    save_checkpoint(model, tok, image_processor_for(cfg), out, extra={"bench_planted": info})
    return out, info


def _hash_file(ckpt: Path) -> str:
    from agvas.train.checkpoint import checkpoint_hash

    return checkpoint_hash(ckpt)


def _stamp_ok(folder: Path, source_hash: str) -> bool:
    stamp = folder / ".bench_source"
    return stamp.exists() and stamp.read_text().strip() == source_hash


def _stamp(folder: Path, source_hash: str) -> None:
    from agvas.atomic import write_text_atomic

    write_text_atomic(folder / ".bench_source", source_hash)


def agvas_cmd(*args: str, log: Path, produces: Path | None = None) -> None:
    """Run ``agvas VERB ...`` in a subprocess (its memory is released when it ends). Exit code 1
    (partial: e.g. a quantized export written with ``--force`` below its gate) is accepted when
    ``produces`` exists."""
    cmd = [sys.executable, "-m", "agvas.cli", *args]
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "2"})
    if r.returncode != 0 and not (r.returncode == 1 and produces is not None and produces.exists()):
        raise RuntimeError(f"`agvas {' '.join(args)}` failed with exit code {r.returncode} (log: {log})")


def verb_available(verb: str) -> str | None:
    """``None`` when ``agvas VERB`` is implemented, else the reason it is not."""
    import importlib.util

    from agvas.cli import VERBS

    module = VERBS[verb][0]
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        found = False
    return None if found else f"`agvas {verb}` is not built yet ({module} missing)"


def export_dir(ckpt: Path, cache: Path, log: Path, extra: tuple[str, ...] = ()) -> Path:
    """`agvas export` of ``ckpt`` into ``cache/export-fp32`` (rebuilt when the checkpoint changed)."""
    out = cache / "export-fp32"
    h = _hash_file(ckpt)
    if not (_stamp_ok(out, h) and (out / "manifest.json").exists()):
        if out.exists():
            shutil.rmtree(out)
        agvas_cmd("export", "--checkpoint", str(ckpt), "--out", str(out), *extra, log=log)
        _stamp(out, h)
    return out


def genai_model(ckpt: Path, cache: Path, precision: str, log: Path) -> Path:
    """onnxruntime-genai's builder (stock options: input_ids in, logits out) on the checkpoint's
    Qwen2 decoder + LM head, ``precision`` "fp32" or "int4", CPU."""
    out = cache / f"genai-{precision}"
    h = _hash_file(ckpt)
    if _stamp_ok(out, h) and (out / "genai_config.json").exists():
        return out
    code = (
        "import sys, contextlib, io, os\n"
        "os.environ['HF_HUB_OFFLINE']='1'\n"
        "from agvas.train.checkpoint import load_checkpoint\n"
        "from agvas.export.llm import save_causal_lm\n"
        "from onnxruntime_genai.models.builder import create_model, parse_extra_options\n"
        "ckpt, hf, out, prec, cache = sys.argv[1:6]\n"
        "model, tok, _, _ = load_checkpoint(ckpt, merge=True)\n"
        "save_causal_lm(model, tok, hf)\n"
        "del model\n"
        "extra = parse_extra_options(None, hf, out, prec, 'cpu', cache, ['hf_token=false'])\n"
        "create_model(None, hf, out, prec, 'cpu', cache, **extra)\n"
    )
    if out.exists():
        shutil.rmtree(out)
    hf, bcache = cache / f".genai-hf-{precision}", cache / f".genai-cache-{precision}"
    with open(log, "a") as f:
        r = subprocess.run([sys.executable, "-c", code, str(ckpt), str(hf), str(out), precision, str(bcache)],
                           stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "2"})
    shutil.rmtree(hf, ignore_errors=True)
    shutil.rmtree(bcache, ignore_errors=True)
    if r.returncode != 0:
        raise RuntimeError(f"onnxruntime-genai builder ({precision}) failed with exit code {r.returncode} (log: {log})")
    _stamp(out, h)
    return out


def quantized_export(exp: Path, cache: Path, images: list[str], llm: str, vision: str, log: Path,
                     n_calib: int, held_out: int) -> Path:
    """`agvas calibrate` (once per fp32 export) then `agvas quantize --llm LLM --vision VISION --force`
    into ``cache/export-llm<LLM>-vis<VISION>``. ``--force`` writes the export even below the gate's
    budget: the bench measures its own agreement and gates the speed-ups on it."""
    h = (exp / ".bench_source").read_text().strip()
    calib = cache / "calib"
    if not (_stamp_ok(calib, h) and any(calib.iterdir())):
        if calib.exists():
            shutil.rmtree(calib)
        agvas_cmd("calibrate", "--engines", str(exp), "--images", *images, "--out", str(calib), "-n", str(n_calib),
                  "--held-out", str(held_out), "--threads", "2", "--no-tensorrt", "--no-progress", log=log)
        _stamp(calib, h)
    out = cache / f"export-llm{llm}-vis{vision}"
    if not (_stamp_ok(out, h) and (out / "manifest.json").exists()):
        if out.exists():
            shutil.rmtree(out)
        agvas_cmd("quantize", "--engines", str(exp), "--calib", str(calib), "--out", str(out), "--llm", llm,
                  "--vision", vision, "--force", "--threads", "2", "--no-progress", log=log,
                  produces=out / "manifest.json")
        _stamp(out, h)
    return out
