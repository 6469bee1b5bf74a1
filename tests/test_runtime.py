"""The runtime (ONNX Runtime fp32 engines, no torch) against the PyTorch reference.

Parity on a tiny model that emits the anchors: same text and tokens, anchor-state cosine
>= 0.9999, mask IoU >= 0.999 over 24 images (square and non-square, normal and anomalous);
the forced-answer fast path equals the decode loop, and falls back correctly on a mismatch;
batched == one by one; the runtime imports and runs with torch/transformers unimportable.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import random_image

SIZES = [(64, 64), (96, 80), (80, 96), (200, 37), (37, 200), (131, 67), (300, 299), (64, 128), (128, 64),
         (100, 100), (57, 91), (160, 120)]


def export_for(checkpoint: Path, tmp_path_factory) -> Path:
    """`agvas export` of ``checkpoint``, once per session (shared by the runtime test files)."""
    from export.exporter import export_checkpoint

    out = tmp_path_factory.getbasetemp() / "runtime_export"
    if not (out / "manifest.json").exists():
        export_checkpoint(checkpoint, out)
    return out


@pytest.fixture(scope="session")
def tiny_export(trained_tiny_checkpoint, tmp_path_factory) -> Path:
    return export_for(trained_tiny_checkpoint, tmp_path_factory)


@pytest.fixture(scope="session")
def inspector(tiny_export):
    from runtime import Inspector

    return Inspector(tiny_export, threads=2)


@pytest.fixture(scope="session")
def reference(trained_tiny):
    from agvas_train.reference import ReferencePipeline

    return ReferencePipeline(*trained_tiny)


def parity_images() -> list:
    """24 synthetic images of the trained model's categories: half normal, half with defects, at
    square and non-square sizes."""
    from PIL import Image

    from agvas_train.data.synthetic import make_sample
    from agvas_train.train import QUICK_SPEC

    cats, defects = QUICK_SPEC["train_categories"], QUICK_SPEC["train_defects"]
    out = []
    for i, (w, h) in enumerate(SIZES):
        for anomalous in (False, True):
            cat = cats[i % len(cats)]
            sample = make_sample(cat, defects[i % len(defects)] if anomalous else None, seed=7, index=100 + i)
            out.append(Image.fromarray(sample.image).resize((w, h), Image.BILINEAR))
    return out


def iou(a, b) -> float:
    u = (a | b).sum()
    return 1.0 if u == 0 else float((a & b).sum() / u)


def cosines(a, b) -> list[float]:
    return [float(np.dot(x, y) / (np.linalg.norm(x) * np.linalg.norm(y))) for x, y in zip(a, b)]


@pytest.mark.slow
def test_parity_with_reference(inspector, reference, record_property):
    imgs = parity_images()
    assert len(imgs) >= 20
    worst_cos, worst_iou, normals, anomalous, max_dp = 1.0, 1.0, 0, 0, 0.0
    for img in imgs:
        ref = reference(img)
        got = inspector.inspect(img)
        assert got.text == ref.text and got.tokens == ref.tokens, (img.size, got.text, ref.text)
        assert got.anchors_found == ref.anchors_found
        assert got.n_visual == ref.n_visual
        if ref.anchors_found:
            worst_cos = min(worst_cos, *cosines(got.anchor_states, ref.anchor_states.numpy()))
        assert got.prob.shape == ref.prob.shape == (img.height, img.width)
        assert got.low_res.shape == ref.low_res.shape
        max_dp = max(max_dp, float(np.abs(got.prob - ref.prob).max()),
                     float(np.abs(got.p_seg - ref.p_seg).max()), float(np.abs(got.p_ano - ref.p_ano).max()))
        worst_iou = min(worst_iou, iou(got.mask, ref.mask))
        assert got.verdict == ref.verdict
        normals += not ref.verdict
        anomalous += ref.verdict
        assert got.area_px == int(ref.mask.sum()) or iou(got.mask, ref.mask) >= 0.999
    record_property("parity", {"images": len(imgs), "min_anchor_cosine": worst_cos, "min_mask_iou": worst_iou,
                               "max_abs_prob_diff": max_dp, "normal": normals, "anomalous": anomalous})
    print(f"parity over {len(imgs)} images: min cosine {worst_cos:.7f}, min IoU {worst_iou:.5f}, "
          f"max |dP| {max_dp:.2e}, {normals} normal / {anomalous} anomalous")
    assert worst_cos >= 0.9999
    assert worst_iou >= 0.999
    assert max_dp < 1e-3
    assert anomalous > 0 and normals > 0


def test_parity_base_vision_tokens(tiny_export, reference):
    from runtime import Inspector

    insp = Inspector(tiny_export, threads=2, vision_tokens="base")
    for i, (w, h) in enumerate(SIZES[:4]):
        img = random_image(900 + i, w, h)
        ref = reference(img, vision_tokens="base")
        got = insp.inspect(img)
        assert got.n_visual == ref.n_visual == 2 * (16 + 1)
        assert got.tokens == ref.tokens
        assert iou(got.mask, ref.mask) >= 0.999


def test_other_modes_match_reference(tiny_export, reference):
    from runtime import Inspector

    img = random_image(77, 96, 80)
    for mode in ("describe", "explain"):
        got = Inspector(tiny_export, threads=2, mode=mode).inspect(img)
        ref = reference(img, mode=mode)
        assert got.text == ref.text and got.tokens == ref.tokens and got.fast_path == "off"
        assert got.anchors_found == ref.anchors_found
    sentence = "A clean surface without scratches."
    got = Inspector(tiny_export, threads=2, mode="describe_plus", normal_sentence=sentence).inspect(img)
    assert got.tokens == reference(img, mode="describe_plus", normal_sentence=sentence).tokens
    with pytest.raises(ValueError, match="normal appearance"):
        Inspector(tiny_export, threads=2, mode="describe_plus")
    with pytest.raises(ValueError, match="unknown mode 'shout'"):
        Inspector(tiny_export, threads=2, mode="shout")


def _same_generation(a, b):
    assert a.tokens == b.tokens and a.text == b.text
    assert a.anchors_found == b.anchors_found
    if a.anchors_found:
        np.testing.assert_allclose(a.anchor_states, b.anchor_states, rtol=0, atol=2e-5)
        assert min(cosines(a.anchor_states, b.anchor_states)) >= 0.99999
    assert iou(a.mask, b.mask) >= 0.999


def test_fast_path_equals_decode_loop(inspector):
    from runtime import Inspector

    loop = Inspector(inspector.manifest.root, threads=2, fast_path=False)
    for i, (w, h) in enumerate(SIZES[:6]):
        img = random_image(300 + i, w, h)
        fast, slow = inspector.inspect(img), loop.inspect(img)
        assert fast.fast_path == "hit" and slow.fast_path == "off"
        _same_generation(fast, slow)


@pytest.mark.parametrize("where", [0, 2, "anchor", "eos"])
def test_fast_path_mismatch_falls_back(inspector, where):
    """Force a wrong answer token: the prefix up to it is kept and decoding continues from there,
    giving exactly the decode loop's output."""
    from runtime import Inspector

    loop = Inspector(inspector.manifest.root, threads=2, fast_path=False)
    img = random_image(41, 80, 96)
    expected = loop.inspect(img)
    answer = list(inspector.answer)
    j = {"anchor": answer.index(inspector.anchors[1]), "eos": len(answer) - 1}.get(where, where)
    wrong = list(answer)
    wrong[j] = next(t for t in range(10, 900) if t not in answer)
    forced = Inspector(inspector.manifest.root, threads=2)
    forced.answer = wrong
    got = forced.inspect(img)
    assert got.fast_path == f"fallback@{j}"
    _same_generation(got, expected)


def test_batch_equals_one_by_one(tiny_export, inspector):
    # three of one size (batched together), others of other sizes; a bad one in the middle
    imgs = [random_image(700 + i, 96, 80) for i in range(3)] + [random_image(710, 64, 64), b"not an image",
                                                                 random_image(711, 64, 64), random_image(712, 131, 67)]
    import io

    imgs[4] = io.BytesIO(imgs[4])
    one = [inspector.inspect(im) if not isinstance(im, io.BytesIO) else None for im in imgs]
    got = list(inspector.stream(imgs, batch_size=4))
    assert [i for i, _ in got] == list(range(len(imgs)))
    for (i, r), ref in zip(got, one):
        if ref is None:
            assert isinstance(r, ValueError) and "not an image" in str(r)
            continue
        assert not isinstance(r, Exception), r
        _same_generation(r, ref)
        assert r.n_visual == ref.n_visual
    with pytest.raises(ValueError, match="not an image"):
        inspector.inspect_batch(imgs, batch_size=2)
    assert len(inspector.inspect_batch(imgs[:4], batch_size=3)) == 4


def test_result_has_reference_attribute_names(inspector):
    import dataclasses

    from agvas_train.reference import ReferenceResult

    got = inspector.inspect(random_image(1, 64, 64))
    ref_fields = [f.name for f in dataclasses.fields(ReferenceResult)]
    for name in ref_fields:
        assert hasattr(got, name), name
    assert set(got.timings_ms) >= {"preprocess", "vision", "sam_encoder", "spam", "prefill", "decode", "agmd",
                                   "postprocess", "encode", "llm", "decode_mask", "total"}
    assert got.timings_ms["total"] == pytest.approx(sum(got.timings_ms[k] for k in
                                                        ("preprocess", "encode", "llm", "decode_mask")))


def test_manifest_mismatch_refused(tiny_export, tmp_path):
    from export.manifest import ManifestError
    from runtime import Inspector

    bad = tmp_path / "export"
    shutil.copytree(tiny_export, bad)
    m = json.loads((bad / "manifest.json").read_text())
    m["engines"]["spam"]["inputs"][0]["name"] = "tokens"
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ManifestError, match=r"engine 'spam' inputs: manifest has \['tokens', 'pixel_embedding'\] "
                                            r"but the ONNX Runtime session .* has \['semantic_tokens', "):
        Inspector(bad, threads=1)
    shutil.copy(tiny_export / "manifest.json", bad / "manifest.json")
    with open(bad / "agmd.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ManifestError, match=r"agmd.onnx has \d+ bytes but the manifest says \d+ bytes"):
        Inspector(bad, threads=1, verify="bytes")


def test_engine_override_and_gpu_provider_errors(tiny_export, tmp_path):
    import onnxruntime as ort

    from runtime import Inspector

    shutil.copy(tiny_export / "lm_head.onnx", tmp_path / "head_copy.onnx")
    insp = Inspector(tiny_export, threads=1, engine_files={"lm_head": tmp_path / "head_copy.onnx"})
    assert insp.engines.lm_head.path == tmp_path / "head_copy.onnx"
    with pytest.raises(ValueError, match=r"engine 'spam': manifest IO .* but override .*lm_head.onnx has"):
        Inspector(tiny_export, threads=1, engine_files={"spam": tiny_export / "lm_head.onnx"})
    with pytest.raises(ValueError, match=r"overrides \['nope'\] are not engines"):
        Inspector(tiny_export, threads=1, engine_files={"nope": "x.onnx"})
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(ValueError, match="has no CUDAExecutionProvider"):
            Inspector(tiny_export, provider="cuda")
        with pytest.raises(ValueError, match="has no TensorrtExecutionProvider"):
            Inspector(tiny_export, provider="tensorrt")


@pytest.mark.gpu
@pytest.mark.parametrize("provider", ["cuda", "tensorrt"])
def test_gpu_providers(tiny_export, provider):
    import onnxruntime as ort

    from runtime import Inspector

    need = {"cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}[provider]
    if need not in ort.get_available_providers():
        pytest.skip(f"no GPU here: onnxruntime {ort.__version__} lacks {need} (needs onnxruntime-gpu and a CUDA GPU)")
    got = Inspector(tiny_export, provider=provider).inspect(random_image(3, 96, 80))
    ref = Inspector(tiny_export).inspect(random_image(3, 96, 80))
    assert got.tokens == ref.tokens and iou(got.mask, ref.mask) >= 0.99


BLOCK_TORCH = textwrap.dedent("""
    import importlib.abc, sys
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "transformers", "torchvision"):
                raise ImportError(f"blocked import of {name} (the runtime must not need it)")
    sys.meta_path.insert(0, Block())
""")


def test_runtime_runs_without_torch_and_transformers(tiny_export, tmp_path):
    random_image(5, 96, 80).save(tmp_path / "a.png")
    code = BLOCK_TORCH + textwrap.dedent(f"""
        from runtime import Inspector
        r = Inspector({str(tiny_export)!r}, threads=1).inspect({str(tmp_path / 'a.png')!r})
        from agvas.cli import main
        rc = main(["inspect", {str(tmp_path / 'a.png')!r}, "--engines", {str(tiny_export)!r},
                   "--out", {str(tmp_path / 'out')!r}, "--threads", "1"])
        print("RESULT", r.text, r.mask.shape, rc, sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers")))
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT")][0]
    assert line.endswith("(80, 96) 0 []"), line
    assert (tmp_path / "out" / "masks" / "a.png").is_file()
