"""The runtime (ONNX Runtime fp32 engines, no torch) against the PyTorch reference.

Parity on a tiny model that emits the anchors: same text and tokens, anchor-state cosine
>= 0.9999, mask IoU >= 0.999 over 24 images (square and non-square, normal and anomalous);
the forced-answer fast path equals the decode loop, and falls back correctly on a mismatch;
batched == one by one; the runtime imports and runs with torch/transformers unimportable.

The batched LLM path (GPU providers, Triton) runs here on the CPU with ``batch_llm=True`` and
``strict=True``: against one by one and the reference, on a decoder fine-tuned so that one image
of a batch hits the fast path while others fall back at different tokens and end at different
lengths (fixture ``diverging``).
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
    from agvas.export.exporter import export_checkpoint

    out = tmp_path_factory.getbasetemp() / "runtime_export"
    if not (out / "manifest.json").exists():
        export_checkpoint(checkpoint, out)
    return out


@pytest.fixture(scope="session")
def tiny_export(trained_tiny_checkpoint, tmp_path_factory) -> Path:
    return export_for(trained_tiny_checkpoint, tmp_path_factory)


@pytest.fixture(scope="session")
def inspector(tiny_export):
    from agvas.runtime import Inspector

    return Inspector(tiny_export, threads=2)


@pytest.fixture(scope="session")
def reference(trained_tiny):
    from agvas.train.reference import ReferencePipeline

    return ReferencePipeline(*trained_tiny)


def parity_images() -> list:
    """24 synthetic images of the trained model's categories: half normal, half with defects, at
    square and non-square sizes."""
    from PIL import Image

    from agvas.train.data.synthetic import make_sample
    from agvas.train.train import QUICK_SPEC

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
    from agvas.runtime import Inspector

    insp = Inspector(tiny_export, threads=2, vision_tokens="base")
    for i, (w, h) in enumerate(SIZES[:4]):
        img = random_image(900 + i, w, h)
        ref = reference(img, vision_tokens="base")
        got = insp.inspect(img)
        assert got.n_visual == ref.n_visual == 2 * (16 + 1)
        assert got.tokens == ref.tokens
        assert iou(got.mask, ref.mask) >= 0.999


def test_other_modes_match_reference(tiny_export, reference):
    from agvas.runtime import Inspector

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
    from agvas.runtime import Inspector

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
    from agvas.runtime import Inspector

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
    """The batched LLM path (``batch_llm=True``, what GPU providers run; strict: a failing batch
    raises instead of being retried one by one) against the CPU's default one-by-one path."""
    from agvas.runtime import Inspector

    # three of one size (batched together), others of other sizes; a bad one in the middle
    imgs = [random_image(700 + i, 96, 80) for i in range(3)] + [random_image(710, 64, 64), b"not an image",
                                                                 random_image(711, 64, 64), random_image(712, 131, 67)]
    import io

    imgs[4] = io.BytesIO(imgs[4])
    one = [inspector.inspect(im) if not isinstance(im, io.BytesIO) else None for im in imgs]
    batched = Inspector(tiny_export, threads=2, batch_llm=True, strict=True)
    got = list(batched.stream(imgs, batch_size=4))
    assert (batched.batched_llm_passes, batched.batched_llm_rows, batched.batch_retries) == (1, 3, 0)
    assert [i for i, _ in got] == list(range(len(imgs)))
    for (i, r), ref in zip(got, one):
        if ref is None:
            assert isinstance(r, ValueError) and "not an image" in str(r)
            continue
        assert not isinstance(r, Exception), r
        _same_generation(r, ref)
        assert r.n_visual == ref.n_visual
        assert r.fast_path == ref.fast_path == "hit"
    with pytest.raises(ValueError, match="not an image"):
        inspector.inspect_batch(imgs, batch_size=2)
    assert len(inspector.inspect_batch(imgs[:4], batch_size=3)) == 4
    assert inspector.batch_retries == 0


def test_result_has_reference_attribute_names(inspector):
    import dataclasses

    from agvas.train.reference import ReferenceResult

    got = inspector.inspect(random_image(1, 64, 64))
    ref_fields = [f.name for f in dataclasses.fields(ReferenceResult)]
    for name in ref_fields:
        assert hasattr(got, name), name
    assert set(got.timings_ms) >= {"preprocess", "vision", "sam_encoder", "spam", "prefill", "decode", "agmd",
                                   "postprocess", "encode", "llm", "decode_mask", "total"}
    assert got.timings_ms["total"] == pytest.approx(sum(got.timings_ms[k] for k in
                                                        ("preprocess", "encode", "llm", "decode_mask")))


def test_manifest_mismatch_refused(tiny_export, tmp_path):
    from agvas.export.manifest import ManifestError
    from agvas.runtime import Inspector

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

    from agvas.runtime import Inspector

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

    from agvas.runtime import Inspector

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
        from agvas.runtime import Inspector
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


# ---- the batched LLM path (GPU providers, Triton) run on the CPU: Inspector(batch_llm=True) ----------------------
# Rows of one batch share one prefill; the fast path falls back per row; greedy decoding runs the rows together
# until the last one ends. A real LLM whose greedy answer differs per image drives it: the trained tiny model's
# decoder fine-tuned (text loss) so that three images of one size answer differently.

DIVERGE_ANSWERS = ("Sure, it is [NOR][ANO][SEG].",  # the canonical answer: the fast path hits
                   "Sure, [NOR][ANO][SEG].",  # shorter: falls back at token 2, ends first
                   "Sure, it is [NOR][ANO][SEG], it is.")  # longer: falls back at token 8 (after the anchors)


@pytest.fixture(scope="session")
def diverging(trained_tiny_checkpoint, tmp_path_factory):
    """``(llm_path, images, reference)``: the trained tiny checkpoint's decoder fine-tuned so that
    ``images[i]`` (three of one size) answers ``DIVERGE_ANSWERS[i]``, built as an ``llm`` engine alone
    (used through ``engine_files``: the other engines, the embeddings and the LM head are unchanged), and
    the PyTorch reference of that model. ~20 s."""
    import torch

    from agvas.train.checkpoint import load_checkpoint
    from agvas.train.reference import ReferencePipeline, prompt_ids
    from agvas.train.templates import CANONICAL_DIRECT_ANSWER, canonical_instruction
    from agvas.export.llm import build_llm, save_causal_lm

    assert DIVERGE_ANSWERS[0] == CANONICAL_DIRECT_ANSWER
    torch.manual_seed(0)
    model, tok, proc, _ = load_checkpoint(trained_tiny_checkpoint, merge=True)
    ref = ReferencePipeline(model, tok, proc)
    images = [random_image(600 + i, 96, 80) for i in range(len(DIVERGE_ANSWERS))]
    instruction = canonical_instruction("direct")
    rows = []
    with torch.no_grad():
        for img, answer in zip(images, DIVERGE_ANSWERS):
            visual, _ = ref.encode(ref.prepare(img))
            n_prompt = len(prompt_ids(tok, model, instruction, visual.shape[1]))
            ids = torch.tensor([prompt_ids(tok, model, instruction, visual.shape[1], answer + model.cfg.eos_token)])
            rows.append((model.embed_prompt(ids, visual), ids[0, n_prompt:], n_prompt))
    for p in model.parameters():
        p.requires_grad_(False)
    layers = list(model.language_model.layers.parameters())  # not the embeddings / norm / LM head: their engines stay
    for p in layers:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(layers, lr=1e-3)
    for step in range(150):
        loss, right = 0.0, True
        for emb, target, n_prompt in rows:
            h = model.language_model(inputs_embeds=emb).last_hidden_state
            logits = model.lm_head(h[0, n_prompt - 1:-1])
            loss = loss + torch.nn.functional.cross_entropy(logits, target)
            right &= bool((logits.argmax(-1) == target).all())
        if right and float(loss.detach()) < 0.3:  # argmax right at every teacher-forced answer token: greedy
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    for img, answer in zip(images, DIVERGE_ANSWERS):
        assert ref(img).text == answer, "the fine-tuned decoder does not give each image its answer"
    out = tmp_path_factory.mktemp("diverging_llm")
    save_causal_lm(model, tok, out / "hf")
    llm = build_llm(out / "hf", out, "fp32", filename="llm_diverging.onnx")
    shutil.rmtree(out / "hf")
    return llm, images, ref


def _gen_equal(a, b):
    """Two Generations: same tokens, fast-path label and anchor states (float noise only)."""
    assert a.tokens == b.tokens and a.fast_path == b.fast_path, (a.tokens, b.tokens, a.fast_path, b.fast_path)
    assert sorted(a.states) == sorted(b.states)
    for k in a.states:
        np.testing.assert_allclose(a.states[k], b.states[k], rtol=0, atol=2e-5)


def _against_reference(insp, ref, img, gen, max_new=None):
    """An Inspector generation (finished into a Result) against the PyTorch reference of the same model."""
    enc = insp.encode(img)
    got = insp.finish(enc, gen)
    want = ref(img, max_new_tokens=max_new)
    assert got.tokens == want.tokens and got.text == want.text
    assert got.anchors_found == want.anchors_found
    if want.anchors_found:
        assert min(cosines(got.anchor_states, want.anchor_states.numpy())) >= 0.9999
        assert iou(got.mask, want.mask) >= 0.999


def _pair(tiny_export, llm, **kw):
    """The batched path (strict: a failing batch raises) and the one-by-one path over the same engines."""
    from agvas.runtime import Inspector

    files = {"llm": llm}
    return (Inspector(tiny_export, threads=2, engine_files=files, batch_llm=True, strict=True, **kw),
            Inspector(tiny_export, threads=2, engine_files=files, batch_llm=False, **kw))


def test_batch_llm_option_defaults(inspector):
    assert inspector.engines.batch_llm is False  # CPU default: rows one by one
    assert inspector.strict is False and inspector.batch_retries == 0


def test_batched_fast_path_one_row_hits_others_fall_back(tiny_export, diverging):
    llm, images, ref = diverging
    batched, single = _pair(tiny_export, llm)
    assert batched.engines.batch_llm and not single.engines.batch_llm
    order = [1, 0, 2, 1]  # the short answer twice: two rows fall back at the same token
    encs = [batched.encode(images[i]) for i in order]
    gens = batched.generate(encs)
    assert [g.fast_path for g in gens] == ["fallback@2", "hit", "fallback@8", "fallback@2"]
    assert [len(g.tokens) for g in gens] == [8, 10, 13, 8]
    assert (batched.batched_llm_passes, batched.batched_llm_rows, batched.batch_retries) == (1, 4, 0)
    for i, enc, gen in zip(order, encs, gens):
        _gen_equal(gen, single.generate([enc])[0])
        assert set(gen.timings) == {"prefill", "decode"}
        assert all(np.isfinite(v) and v >= 0 for v in gen.timings.values())
        assert gen.prefill_tokens == encs[0].visual.shape[0] + len(batched.pre_ids) + len(batched.post_ids)
    for i, gen in zip(order[:3], gens[:3]):
        _against_reference(batched, ref, images[i], gen)
    # an answer without its EOS: verified rows go on decoding to EOS; still the greedy result
    batched.answer = single.answer = batched.answer[:-1]
    gens = batched.generate(encs)
    assert [g.fast_path for g in gens] == ["fallback@2", "hit", "fallback@8", "fallback@2"]
    for enc, gen in zip(encs, gens):
        _gen_equal(gen, single.generate([enc])[0])
    assert gens[1].tokens[-1] == batched.eos and len(gens[1].tokens) == 10


@pytest.mark.parametrize("max_new", [None, 9, 1])
def test_batched_greedy_rows_end_at_different_lengths(tiny_export, diverging, max_new):
    """No fast path: one prefill for the batch, then one decode step per token for all rows until
    the longest ends; finished rows' outputs are ignored. ``max_new=9``: row 1 ends by EOS (8
    tokens), rows 0 and 2 by the limit."""
    llm, images, ref = diverging
    batched, single = _pair(tiny_export, llm, fast_path=False, max_new_tokens=max_new)
    encs = [batched.encode(img) for img in images]
    gens = batched.generate(encs)
    n = {None: [10, 8, 13], 9: [9, 8, 9], 1: [1, 1, 1]}[max_new]
    assert [len(g.tokens) for g in gens] == n and all(g.fast_path == "off" for g in gens)
    assert (gens[1].tokens[-1] == batched.eos) is (max_new != 1)
    for enc, gen in zip(encs, gens):
        _gen_equal(gen, single.generate([enc])[0])
    if max_new != 1:
        for img, gen in zip(images, gens):
            _against_reference(batched, ref, img, gen, max_new)
    # the fast path under the same limit gives the same tokens
    fast, _ = _pair(tiny_export, llm, max_new_tokens=max_new)
    assert [g.tokens for g in fast.generate(encs)] == [g.tokens for g in gens]


def test_batched_stream_groups_equal_visual_lengths(tiny_export, diverging):
    """``stream`` batches runs of equal visual length (their prompts are then equal too: the text
    around the image is the same for every row, so no row is ever padded); another size or a failed
    image ends a group. Batched == one by one, and the retry fallback never fires."""
    import io

    llm, images, _ = diverging
    batched, single = _pair(tiny_export, llm)
    other = random_image(620, 64, 64)
    imgs = [images[0], images[1], other, images[2], images[1], io.BytesIO(b"not an image"), images[0], images[2],
            random_image(621, 131, 67)]
    n_visual = [batched.encode(im).visual.shape[0] if not isinstance(im, io.BytesIO) else None for im in imgs]
    assert n_visual[0] == n_visual[1] != n_visual[2] != n_visual[8]
    got = list(batched.stream(imgs, batch_size=len(imgs)))
    assert [i for i, _ in got] == list(range(len(imgs)))
    # groups: [0, 1] [2] [3, 4] (error 5) [6, 7] [8]
    assert (batched.batched_llm_passes, batched.batched_llm_rows, batched.batch_retries) == (3, 6, 0)
    for (i, r), im in zip(got, imgs):
        if isinstance(im, io.BytesIO):
            assert isinstance(r, ValueError) and "not an image" in str(r)
            continue
        assert not isinstance(r, Exception), r
        want = single.inspect(im)
        _same_generation(r, want)
        assert r.fast_path == want.fast_path and r.n_visual == want.n_visual
    assert [r.fast_path for _, r in got[:2]] == ["hit", "fallback@2"]
    with pytest.raises(ValueError, match="equal visual lengths"):
        batched.generate([batched.encode(images[0]), batched.encode(other)])


def test_batch_retry_is_counted_and_strict_reraises(tiny_export, caplog):
    """A batched LLM pass that raises: strict re-raises; otherwise the images are retried one by
    one, and the retry is counted and logged (an error when each image then succeeds alone)."""
    from agvas.runtime import Inspector

    class BrokenBatch(Inspector):
        def generate(self, batch):
            if len(batch) > 1:
                raise RuntimeError("broken batched path")
            return super().generate(batch)

    imgs = [random_image(630 + i, 96, 80) for i in range(2)]
    strict = BrokenBatch(tiny_export, threads=2, batch_llm=True, strict=True)
    with pytest.raises(RuntimeError, match="broken batched path"):
        list(strict.stream(imgs, batch_size=2))
    lenient = BrokenBatch(tiny_export, threads=2, batch_llm=True)
    with caplog.at_level("WARNING", logger="agvas.runtime.inspector"):
        got = list(lenient.stream(imgs, batch_size=2))
    assert all(not isinstance(r, Exception) for _, r in got)
    assert lenient.batch_retries == 1
    assert "retrying them one by one" in caplog.text and "failed on valid input" in caplog.text


def test_inspect_cli_batch_llm(tiny_export, tmp_path):
    """``agvas inspect --batch 3 --batch-llm`` on the CPU: the batched path ran (summary), nothing
    was retried, and the results equal ``--no-batch-llm``."""
    from agvas.cli import main

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, size in enumerate([(96, 80)] * 3 + [(64, 64)]):
        random_image(640 + i, *size).save(folder / f"{i}.png")
    runs = {}
    for flag in ("--batch-llm", "--no-batch-llm"):
        out = tmp_path / flag
        assert main(["inspect", str(folder), "--engines", str(tiny_export), "--out", str(out), "--threads", "2",
                     "--batch", "3", flag]) == 0
        summary = json.loads((out / "summary.json").read_text())
        assert summary["settings"]["batch_llm"] is (flag == "--batch-llm")
        assert summary["run"]["batch_retries"] == 0
        assert summary["run"]["batched_llm_passes"] == (1 if flag == "--batch-llm" else 0)
        runs[flag] = sorted((json.loads(x)["path"], json.loads(x)["text"], json.loads(x)["verdict"])
                            for x in (out / "results.jsonl").read_text().splitlines())
    assert runs["--batch-llm"] == runs["--no-batch-llm"] and len(runs["--batch-llm"]) == 4


def test_memory_composition_and_profile(tiny_export, tmp_path):
    """`python -m agvas.benchmarks.memory` (a fresh process) names every engine's resident weights
    and on-disk bytes, every stage's peak, the vocabulary-sized arrays (embedding table + the one
    LM head); the per-engine ONNX Runtime profiler (Inspector(profile_dir=...)) sums kernel time by
    op type, skipping exactly the warm-up image's runs; freed heap pages go back to the system
    (glibc here)."""
    from agvas.benchmarks.profile import profile, summarize_trace
    from agvas.runtime.engines import release_memory

    img = tmp_path / "a.png"
    random_image(5, 96, 80).save(img)
    out = tmp_path / "mem.json"
    subprocess.run([sys.executable, "-m", "agvas.benchmarks.memory", str(tiny_export), "--image", str(img),
                    "--threads", "2", "--json", str(out)], check=True, capture_output=True, text=True)
    c = json.loads(out.read_text())
    engines = {"vision", "sam_encoder", "spam", "agmd", "lm_head", "llm"}
    assert set(c["weights"]) == engines and all(w["on_disk_mb"] > 0 for w in c["weights"].values())
    assert set(c["activations_peak_mb"]) == engines and all(v >= 0 for v in c["activations_peak_mb"].values())
    assert c["peak_rss_mb"] >= c["loaded_rss_mb"] > c["baseline_mb"] > 0
    assert sorted(v["file"] for v in c["vocabulary_arrays"]) == ["embed_tokens.npy", "lm_head.onnx"]
    assert c["results"][0]["n_visual"] > 0

    # the same image twice, decoded step by step (no forced-answer fast path): the summary skips
    # exactly the warm-up image's session runs (prefill and every decode step for the llm), so what
    # is kept equals what the warm-up made
    p = profile(tiny_export, [img, img], tmp_path / "prof", threads=2, fast_path=False)
    assert set(p["engines"]) == engines and all(Path(e["trace"]).is_file() for e in p["engines"].values())
    for name, e in p["engines"].items():
        total = sum(1 for ev in json.loads(Path(e["trace"]).read_text())
                    if ev.get("cat") == "Session" and ev.get("name") == "model_run")
        assert e["warmup_runs"] >= 1 and e["runs"] == e["warmup_runs"] == total - e["warmup_runs"], name
    assert p["engines"]["llm"]["warmup_runs"] > 1  # prefill + decode steps
    llm = p["engines"]["llm"]
    assert "GroupQueryAttention" in llm["by_op_ms"] and llm["kernel_ms"] > 0
    assert summarize_trace(llm["trace"], skip_runs=0)["runs"] == 2 * llm["warmup_runs"]
    assert release_memory() is True
