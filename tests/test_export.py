"""`agvas export` on tiny: every engine against its PyTorch module, the fused llm, the manifest,
the TensorRT recipe, and an ORT-CPU chain of the engines against ReferencePipeline."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from agvas.train.checkpoint import checkpoint_hash, load_checkpoint
from agvas.export.manifest import ManifestError, load_manifest

TOL = 1e-4  # fp32 max abs difference, every engine


def _session(path):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def tiny_export(trained_tiny_checkpoint, tmp_path_factory):
    """The trained tiny checkpoint (answers with the anchors, decisive maps) and its fp32 export
    (target tensorrt)."""
    from agvas.export.exporter import export_checkpoint

    ckpt = trained_tiny_checkpoint
    out = tmp_path_factory.mktemp("export") / "exp"
    export_checkpoint(ckpt, out, target="tensorrt")
    model, tok, proc, _ = load_checkpoint(ckpt, merge=True)
    return ckpt, load_manifest(out, checkpoint_sha256=checkpoint_hash(ckpt), check_io=True), model, tok, proc


def _max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a) - b.detach().numpy()).max())


def test_vision_side_engines_match_torch(tiny_export):
    _, m, model, _, _ = tiny_export
    cfg = model.cfg
    g = torch.Generator().manual_seed(3)
    s, sam, h, c, grid = (cfg.vision_image_size, cfg.pixel_encoder.img_size, cfg.hidden_size, cfg.pixel_dim,
                          cfg.pixel_encoder.grid)
    with torch.no_grad():
        crops = torch.randn(5, 3, s, s, generator=g)
        out = _session(m.engine_path("vision")).run(None, {"pixel_values": crops.numpy()})[0]
        assert _max_diff(out, model.project_crops(crops)) <= TOL
        x = torch.randn(3, 3, sam, sam, generator=g)
        pix = _session(m.engine_path("sam_encoder")).run(None, {"sam_input": x.numpy()})[0]
        assert _max_diff(pix, model.pixel_embedding(x)) <= TOL
        for n in (17, 88):  # base-only and the full anyres length
            f_s, p = torch.randn(2, n, h, generator=g), torch.randn(2, c, grid, grid, generator=g)
            out = _session(m.engine_path("spam")).run(None, {"semantic_tokens": f_s.numpy(), "pixel_embedding": p.numpy()})[0]
            assert _max_diff(out, model.align(f_s, p)) <= TOL
        a, p = torch.randn(3, 3, h, generator=g), torch.randn(3, c, grid, grid, generator=g)
        outs = _session(m.engine_path("agmd")).run(["prob", "p_seg", "p_ano"],
                                                   {"anchor_states": a.numpy(), "pixel_embedding": p.numpy()})
        for o, ref in zip(outs, model.maps(a, p)):
            assert o.shape == (3, 4 * grid, 4 * grid) and _max_diff(o, ref) <= TOL
        hs = torch.randn(2, 4, h, generator=g)
        out = _session(m.engine_path("lm_head")).run(None, {"hidden_states": hs.numpy()})[0]
        assert _max_diff(out, model.lm_head(hs)) <= TOL
    assert np.array_equal(np.load(m.engine_path("embed_tokens")), model.embed_tokens.weight.detach().numpy())
    assert np.array_equal(np.load(m.engine_path("image_newline")), model.llava.model.image_newline.detach().numpy())


def _llm_feed(m, embeds, past, total):
    feed = {"inputs_embeds": embeds, "attention_mask": np.ones((embeds.shape[0], total), np.int64)}
    for i in range(m.llm["num_layers"]):
        feed[f"past_key_values.{i}.key"], feed[f"past_key_values.{i}.value"] = past[i]
    return feed


def test_llm_prefill_and_decode_match_torch(tiny_export):
    from transformers import DynamicCache

    _, m, model, _, _ = tiny_export
    llm = m.llm
    sess = _session(m.engine_path("llm"))
    names = m.output_names("llm")
    assert "position_ids" not in m.input_names("llm") and llm["positions"] == "from_mask"
    g = torch.Generator().manual_seed(4)
    b, s, h = 2, 41, llm["hidden_size"]
    x = torch.randn(b, s, h, generator=g)
    empty = [(np.zeros((b, llm["num_kv_heads"], 0, llm["head_dim"]), np.float32),) * 2] * llm["num_layers"]
    r = dict(zip(names, sess.run(None, _llm_feed(m, x.numpy(), empty, s))))
    with torch.no_grad():
        o = model.language_model(inputs_embeds=x, past_key_values=DynamicCache(config=model.llava.config.text_config),
                                 use_cache=True)
        assert _max_diff(r["hidden_states"], o.last_hidden_state) <= TOL
        assert "logits" not in r  # the head is the lm_head engine's alone (one vocabulary-sized matrix)
        head = _session(m.engine_path("lm_head"))
        logits = head.run(None, {"hidden_states": r["hidden_states"][:, -1:]})[0]
        assert logits.shape == (b, 1, llm["vocab_size"])
        assert _max_diff(logits, model.lm_head(o.last_hidden_state[:, -1:])) <= TOL
        for i, layer in enumerate(o.past_key_values.layers):
            assert _max_diff(r[f"present.{i}.key"], layer.keys) <= TOL
            assert _max_diff(r[f"present.{i}.value"], layer.values) <= TOL
        # one decode step on the cache
        y = torch.randn(b, 1, h, generator=g)
        past = [(r[f"present.{i}.key"], r[f"present.{i}.value"]) for i in range(llm["num_layers"])]
        r2 = dict(zip(names, sess.run(None, _llm_feed(m, y.numpy(), past, s + 1))))
        o2 = model.language_model(inputs_embeds=y, past_key_values=o.past_key_values, use_cache=True)
        assert _max_diff(r2["hidden_states"], o2.last_hidden_state) <= TOL
        logits2 = head.run(None, {"hidden_states": r2["hidden_states"]})[0]
        assert _max_diff(logits2, model.lm_head(o2.last_hidden_state)) <= TOL
        # several new tokens on a truncated past (batch 1): the fallback after a fast-path mismatch
        k = 30
        past1 = [(p[0][:1, :, :k], p[1][:1, :, :k]) for p in past]
        r3 = dict(zip(names, sess.run(None, _llm_feed(m, x[:1, k:].numpy(), past1, s))))
        assert _max_diff(r3["hidden_states"], o.last_hidden_state[:1, k:]) <= TOL


def test_one_lm_head_in_the_export(tiny_export):
    """The vocabulary-sized matrices of an export: the embedding table (an mmapped .npy: only the
    rows a prompt uses become resident) and one LM head, the lm_head engine's — the llm graph
    carries none (its builder's own last-position head is removed at export)."""
    from agvas.benchmarks.memory import vocabulary_arrays

    _, m, _, _, _ = tiny_export
    found = vocabulary_arrays(m.root, m.llm["vocab_size"], m.llm["hidden_size"])
    assert sorted(v["file"] for v in found) == ["embed_tokens.npy", "lm_head.onnx"], found
    assert "logits" not in m.output_names("llm") and m.llm["logits"].startswith("lm_head engine")


def test_llm_graph_is_fused_after_ort_optimisation(tiny_export, tmp_path):
    _, m, _, _, _ = tiny_export
    assert m.llm["fused_ops"]["GroupQueryAttention"] == m.llm["num_layers"]
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = str(tmp_path / "llm_opt.onnx")
    ort.InferenceSession(str(m.engine_path("llm")), so, providers=["CPUExecutionProvider"])
    ops = {n.op_type for n in onnx.load(str(tmp_path / "llm_opt.onnx"), load_external_data=False).graph.node}
    assert {"GroupQueryAttention", "SkipSimplifiedLayerNormalization"} <= ops
    assert "Softmax" not in ops  # no materialised attention scores


def test_graphs_pass_checker_and_shape_inference(tiny_export):
    from agvas.export.graphs import check_graph

    _, m, _, _, _ = tiny_export
    for name, e in m.engines.items():
        if e["format"] == "onnx":
            check_graph(m.engine_path(name))


def test_manifest_contents_and_refusals(tiny_export, tmp_path):
    ckpt, m, model, _, _ = tiny_export
    d = m.data
    assert d["source"]["config_name"] == "tiny-sam" and d["config"] == model.cfg.to_dict() | {"tokenizer_dir": None}
    assert d["token_ids"] == model.ids.to_dict()
    assert d["postprocess"] == {"alpha": 0.5, "threshold": 0.5}
    assert d["prompt"]["instructions"]["direct"] == "Please segment the anomalies in this image."
    assert d["vision_tokens"]["default"] == "anyres" and d["vision_tokens"]["tokens_per_crop"] == 16
    assert (m.root / "tokenizer" / "tokenizer.json").is_file() and (m.root / "tokenizer" / "preprocessor_config.json").is_file()
    assert m.engine("spam")["inputs"][0] == {"name": "semantic_tokens", "dtype": "float32",
                                             "shape": ["batch", "n_tokens", 128]}
    assert m.engine("llm")["external_data"][0]["file"] == "llm.onnx.data"
    with pytest.raises(ManifestError, match=f"sha256 {d['source']['checkpoint_sha256']} but the expected checkpoint "
                                            f"has sha256 {'0' * 64}"):
        load_manifest(m.root, checkpoint_sha256="0" * 64, verify="none")
    other = model.cfg.to_dict()
    other["agmd"]["alpha"] = 0.7
    with pytest.raises(ManifestError, match=r"agmd\.alpha=0\.5 vs expected agmd\.alpha=0\.7"):
        load_manifest(m.root, config=other, verify="none")
    # the manifest's IO description is what the graph and an ORT session have
    m.verify_session("vision", _session(m.engine_path("vision")))
    with pytest.raises(ManifestError, match="engine 'spam' inputs"):
        m.verify_session("spam", _session(m.engine_path("vision")))


def test_tensorrt_build_script(tiny_export):
    _, m, _, _, _ = tiny_export
    text = (m.root / "build_engines.sh").read_text()
    r = subprocess.run(["bash", "-n", str(m.root / "build_engines.sh")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for name in ("vision", "sam_encoder", "spam", "agmd"):
        assert f"--onnx={name}.onnx --saveEngine=trt/{name}.plan" in text
    assert "llm.onnx" not in text and "lm_head.onnx" not in text
    # profiles from the manifest's dynamic axes (tiny: 64px crops, <= 2x2 grid -> 5 crops; N 17..88)
    assert "--minShapes=pixel_values:1x3x64x64 --optShapes=pixel_values:5x3x64x64 --maxShapes=pixel_values:5x3x64x64" in text
    assert "--minShapes=sam_input:1x3x128x128 --optShapes=sam_input:1x3x128x128 --maxShapes=sam_input:4x3x128x128" in text
    assert "--maxShapes=semantic_tokens:4x88x128,pixel_embedding:4x64x16x16" in text
    assert "--minShapes=semantic_tokens:1x17x128" in text
    assert "--memPoolSize=workspace:4096 " in text  # MiB without a unit: TensorRT 8.6 takes no suffix
    # INT8 reads what `agvas calibrate --out CAL` writes, given as --calib-dir CAL
    assert '"--calib=${CAL}/tensorrt/vision/tensorrt.cache"' in text and "calibration/vision.cache" not in text
    args = [ln for ln in text.splitlines() if "ARGS=(trtexec " in ln]
    assert len(args) == 4 * 2 * 4  # engines x TensorRT 8 / 10 x (--fp16, --int8) on / off
    assert not any("--stronglyTyped" in ln for ln in args)  # an fp32 export: weakly typed on both majors
    assert "--precisionConstraints=obey" in text and "LAYERS_sam_encoder=" in text
    gpu = m.data["gpu"]
    assert gpu["tensorrt_ep"]["per_engine"]["spam"]["trt_profile_max_shapes"] == "semantic_tokens:4x88x128,pixel_embedding:4x64x16x16"
    assert gpu["tensorrt_ep"]["options"]["trt_fp16_enable"] is True
    assert gpu["tensorrt_ep"]["options"]["trt_int8_use_native_calibration_table"] is False
    assert "trt_int8_calibration_table_name" not in json.dumps(gpu)
    assert gpu["tensorrt"]["plans"]["agmd"] == "trt/agmd.plan"
    # TensorRT 8.6 parses ONNX opsets up to 17: the default of --target tensorrt
    assert m.data["export"]["opset"] == 17
    assert {o.version for o in onnx.load(str(m.engine_path("agmd"))).opset_import if o.domain in ("", "ai.onnx")} == {17}
    # without trtexec the script stops with a clear message
    r = subprocess.run(["bash", str(m.root / "build_engines.sh")], capture_output=True, text=True,
                       env={"PATH": "/usr/bin:/bin"})
    assert r.returncode == 2 and "trtexec not found" in r.stderr


def _dry_run(root, *args):
    r = subprocess.run(["bash", str(root / "build_engines.sh"), "--dry-run", *args], capture_output=True, text=True,
                       env={"PATH": "/usr/bin:/bin"})
    return r.returncode, r.stdout, r.stderr


def _named_files(root, out: str) -> list:
    """The files a printed trtexec command reads (--onnx, --calib), relative to the export."""
    from pathlib import Path

    files = []
    for line in out.splitlines():
        for word in line.split():
            for opt in ("--onnx=", "--calib="):
                if word.startswith(opt):
                    p = Path(word[len(opt):])
                    files.append(p if p.is_absolute() else root / p)
    return files


def test_build_engines_dry_run_after_calibrate(tiny_export, tmp_path):
    """The acceptance path: after `agvas export --target tensorrt` and `agvas calibrate`,
    `build_engines.sh --int8 --dry-run` exits 0 and every file it names exists; before
    calibrating it exits 2 naming the missing file and the command that makes it."""
    from PIL import Image

    from agvas.cli import main
    from agvas.train.data.synthetic import make_sample
    from agvas.train.train import QUICK_SPEC

    _, m, _, _, _ = tiny_export
    for major in ("8", "10"):
        rc, out, err = _dry_run(m.root, "--trt-major", major)
        assert rc == 0, err
        files = _named_files(m.root, out)
        assert len(out.splitlines()) == 4 and len(files) == 4 and all(f.is_file() for f in files)
    cal = tmp_path / "cal"
    rc, out, err = _dry_run(m.root, "--int8", "--calib-dir", str(cal))
    assert rc == 2 and not out
    assert f"missing {cal}/tensorrt/vision/tensorrt.cache" in err and f"agvas calibrate --engines {m.root}" in err
    images = tmp_path / "images"
    images.mkdir()
    cats = QUICK_SPEC["train_categories"]
    for i in range(3):
        s = make_sample(cats[i % len(cats)], None, seed=5, index=i)
        Image.fromarray(s.image).resize((96, 80 + 16 * i)).save(images / f"p{i}.png")
    assert main(["calibrate", "--engines", str(m.root), "--images", str(images), "--out", str(cal), "-n", "3",
                 "--held-out", "0", "--no-progress"]) == 0
    for major in ("8", "10"):
        rc, out, err = _dry_run(m.root, "--int8", "--calib-dir", str(cal), "--trt-major", major)
        assert rc == 0, err
        files = _named_files(m.root, out)
        assert len(files) == 8 and all(f.is_file() for f in files), files
        assert all("--int8" in line and "--calib=" in line for line in out.splitlines())
    cache = (cal / "tensorrt" / "sam_encoder" / "tensorrt.cache").read_text().splitlines()
    assert cache[0] == "TRT-0-EntropyCalibration2" and len(cache) > 1  # build_engines.sh sets the version
    assert (cal / "tensorrt" / "sam_encoder" / "calibration.flatbuffers").is_file()  # the TensorRT EP's table
    assert not (cal / "tensorrt" / "sam_encoder" / "calibration.cache").exists()  # ORT's text table: no reader
    # the Python builder's dry run is the same; it also reads the samples of CAL
    py = subprocess.run([sys.executable, "-m", "agvas.export.tensorrt", str(m.root), "--int8", "--calib-dir", str(cal),
                         "--dry-run", "--trt-major", "8"], capture_output=True, text=True)
    assert py.returncode == 0, py.stderr
    assert py.stdout == _dry_run(m.root, "--int8", "--calib-dir", str(cal), "--trt-major", "8")[1]


def test_ov_profiles_match_hf_token_counts():
    """The anyres bounds of the TensorRT profiles at ov-0.5b dims (7,371 tokens for a 1024² image)."""
    from agvas.train.config import get_config
    from agvas.export.tensorrt import axis_ranges

    data = {"config": get_config("ov-0.5b").to_dict()}
    r = axis_ranges(data, max_batch=8)
    assert r["n_crops"] == (1, 10, 37) and r["batch"] == (1, 1, 8)
    lo, opt, hi = r["n_tokens"]
    assert lo == 730 and opt == 7371 and hi >= 7371


def test_external_data_above_threshold(tiny_export, tmp_path):
    from agvas.export.graphs import check_graph
    from agvas.export.manifest import onnx_entry
    from agvas.export.vision import export_graph

    _, m, model, _, _ = tiny_export
    # below the default threshold the tiny graphs are single files
    assert m.engine("agmd")["external_data"] == [] and not (m.root / "agmd.onnx.data").exists()
    path, external = export_graph(model, "agmd", tmp_path, opset=18, external_threshold=1 << 10)
    assert external and (tmp_path / "agmd.onnx.data").stat().st_size > (tmp_path / "agmd.onnx").stat().st_size
    check_graph(path)
    e = onnx_entry(tmp_path, "agmd.onnx", "fp32")
    assert [x["file"] for x in e["external_data"]] == ["agmd.onnx.data"]
    a, p = torch.randn(2, 3, model.cfg.hidden_size), torch.randn(2, model.cfg.pixel_dim, 16, 16)
    out = _session(path).run(["prob"], {"anchor_states": a.numpy(), "pixel_embedding": p.numpy()})[0]
    assert _max_diff(out, model.maps(a, p)[0]) <= TOL


def test_cli_errors(tmp_path, capsys):
    from agvas.cli import main

    assert main(["export", "--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "--checkpoint" in capsys.readouterr().err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    (tmp_path / "ck").mkdir()
    assert main(["export", "--checkpoint", str(tmp_path / "ck"), "--out", str(tmp_path / "busy")]) == 2
    assert "exists and is not empty" in capsys.readouterr().err


def test_tensorrt_builder_and_runner_need_tensorrt(tiny_export):
    pytest.importorskip("tensorrt", reason="TensorRT is not installable on this machine (no GPU; PyPI wheels are stubs)")
    from agvas.export.tensorrt import build_engines
    from agvas.runtime.trt_engine import TRTEngine

    _, m, model, _, _ = tiny_export
    plans = build_engines(m.root, ("agmd",))
    eng = TRTEngine(plans["agmd"])
    a, p = torch.randn(1, 3, 128), torch.randn(1, 64, 16, 16)
    out = eng({"anchor_states": a.numpy(), "pixel_embedding": p.numpy()})
    assert _max_diff(out["prob"], model.maps(a, p)[0]) < 1e-2


# ---- end to end: the engines chained on ORT CPU against the reference --------------------------

class OrtChain:
    """The smallest chain of the exported engines (packing by HF's function on the vision engine's
    output; the runtime has its own torch-free packing and its own parity tests)."""

    def __init__(self, m, model, tok, proc) -> None:
        self.m, self.model, self.tok, self.proc = m, model, tok, proc
        self.s = {n: _session(m.engine_path(n)) for n in ("vision", "sam_encoder", "spam", "llm", "agmd", "lm_head")}
        self.emb = np.load(m.engine_path("embed_tokens"))
        self.newline = torch.from_numpy(np.load(m.engine_path("image_newline")))

    def __call__(self, image):
        from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

        from agvas.train.modeling.agmd import postprocess_map
        from agvas.train.preprocess import prepare_image
        from agvas.train.reference import prompt_ids
        from agvas.train.templates import canonical_instruction

        m, model, cfg = self.m, self.model, self.model.cfg
        prep = prepare_image(image, cfg, self.proc)
        n = image_size_to_num_patches(prep.image_sizes[0], cfg.llava["image_grid_pinpoints"], cfg.vision_image_size)
        feats = self.s["vision"].run(None, {"pixel_values": prep.pixel_values[0, :n].numpy()})[0]
        packed, _ = model.llava.model.pack_image_features([torch.from_numpy(feats)], prep.image_sizes, self.newline,
                                                          cfg.llava["vision_aspect_ratio"])
        f_s = packed[0][None].numpy()
        pix = self.s["sam_encoder"].run(None, {"sam_input": prep.sam_input.numpy()})[0]
        f_align = self.s["spam"].run(None, {"semantic_tokens": f_s, "pixel_embedding": pix})[0]
        visual = np.concatenate([f_s, f_align], axis=1)[0]
        ids = np.array(prompt_ids(self.tok, model, canonical_instruction("direct"), visual.shape[0]))
        x = self.emb[ids]
        x[ids == m.token_ids["image"]] = visual
        llm = m.llm
        past = [(np.zeros((1, llm["num_kv_heads"], 0, llm["head_dim"]), np.float32),) * 2] * llm["num_layers"]
        names, total, x = m.output_names("llm"), len(ids), x[None]
        tokens, states = [], {}
        for _ in range(cfg.max_new_tokens):
            r = dict(zip(names, self.s["llm"].run(None, _llm_feed(m, x, past, total))))
            tok = int(self.s["lm_head"].run(None, {"hidden_states": r["hidden_states"][:, -1:]})[0][0, -1].argmax())
            if tok in m.token_ids["anchors"] and tok not in states:
                states[tok] = r["hidden_states"][0, -1]
            tokens.append(tok)
            if tok == m.token_ids["eos"]:
                break
            past = [(r[f"present.{i}.key"], r[f"present.{i}.value"]) for i in range(llm["num_layers"])]
            x, total = self.emb[[tok]][None], total + 1
        anchors = np.stack([states[a] for a in m.token_ids["anchors"]])[None] if len(states) == 3 else None
        mask = None
        if anchors is not None:
            prob = self.s["agmd"].run(["prob"], {"anchor_states": anchors.astype(np.float32), "pixel_embedding": pix})[0]
            up = postprocess_map(torch.from_numpy(prob), prep.input_size, prep.original_size, cfg.pixel_encoder.img_size)
            mask = up[0].numpy() > m.data["postprocess"]["threshold"]
        return tokens, anchors, mask


def _iou(a, b) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def _test_images(n: int = 20):
    """Synthetic test images of the trained tiny model's categories: every other one normal, the
    rest with a defect; square and non-square sizes."""
    from PIL import Image

    from agvas.train.data.synthetic import make_sample
    from agvas.train.train import QUICK_SPEC

    cats = list(QUICK_SPEC["train_categories"]) + list(QUICK_SPEC["test_categories"])
    defects = list(QUICK_SPEC["train_defects"]) + list(QUICK_SPEC["test_defects"])
    sizes = [(128, 128), (160, 96), (96, 144), (200, 200), (64, 64), (300, 120), (90, 90), (128, 256)]
    for i in range(n):
        sample = make_sample(cats[i % len(cats)], None if i % 2 == 0 else defects[i % len(defects)], 7, i)
        yield sample.defect is None, Image.fromarray(sample.image).resize(sizes[i % len(sizes)], Image.BILINEAR)


@pytest.mark.slow
def test_engines_chain_matches_reference(tiny_export):
    from agvas.train.reference import ReferencePipeline

    _, m, model, tok, proc = tiny_export
    chain, ref = OrtChain(m, model, tok, proc), ReferencePipeline(model, tok, proc)
    cos, ious, verdicts = [], [], []
    for i, (normal, img) in enumerate(_test_images(20)):
        want = ref(img)
        tokens, anchors, mask = chain(img)
        assert tokens == want.tokens, (i, tok.decode(tokens), want.text)
        assert (anchors is not None) == want.anchors_found
        if anchors is not None:
            a, b = anchors[0], want.anchor_states.numpy()
            cos += [float((x * y).sum() / np.linalg.norm(x) / np.linalg.norm(y)) for x, y in zip(a, b)]
            ious.append(_iou(mask, want.mask))
            verdicts.append((normal, bool(mask.any()), want.verdict))
    assert len(ious) == 20 and min(cos) >= 0.9999, (len(ious), min(cos))
    assert min(ious) >= 0.999, min(ious)
    assert all(mine == theirs for _, mine, theirs in verdicts)
    print(f"\nchain vs reference on 20 images ({sum(n for n, _, _ in verdicts)} normal): min anchor cosine "
          f"{min(cos):.7f}, min mask IoU {min(ious):.5f}, {sum(v for _, v, _ in verdicts)} non-empty masks")


def test_export_module_runs_as_console_script(tiny_export):
    r = subprocess.run([sys.executable, "-m", "agvas", "export", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--vision-tokens" in r.stdout and "--target" in r.stdout
    _, m, _, _, _ = tiny_export
    assert json.loads((m.root / "manifest.json").read_text())["format_version"] == 1


@pytest.mark.slow
def test_fp16_export(tiny_export, tmp_path):
    """--precision fp16: fp16 weights with float32 IO for the torch-exported graphs (norms and
    softmax kept fp32), the builder's fp16 llm (CUDA graph; its fp16 IO dtypes in the manifest).
    ORT CPU runs them, so closeness is checked here too (fp16 tolerance)."""
    from agvas.export.exporter import export_checkpoint

    ckpt, _, model, _, _ = tiny_export
    export_checkpoint(ckpt, tmp_path / "fp16", precision="fp16", vision_tokens="base")
    m = load_manifest(tmp_path / "fp16", check_io=True)
    assert m.data["vision_tokens"]["default"] == "base" and m.data["export"]["precision"] == "fp16"
    assert {e["precision"] for n, e in m.engines.items() if n != "image_newline"} == {"fp16"}
    assert m.engine("vision")["inputs"][0]["dtype"] == "float32"
    llm_in = {x["name"]: x["dtype"] for x in m.engine("llm")["inputs"]}
    assert llm_in["inputs_embeds"] == "float16" and m.engine("embed_tokens")["dtype"] == "float16"
    weights = onnx.load(str(m.engine_path("sam_encoder"))).graph.initializer
    assert sum(t.data_type == onnx.TensorProto.FLOAT16 for t in weights) > len(weights) // 2
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, model.cfg.pixel_encoder.img_size, model.cfg.pixel_encoder.img_size, generator=g)
    pix = _session(m.engine_path("sam_encoder")).run(None, {"sam_input": x.numpy()})[0]
    ref = model.pixel_embedding(x).detach().numpy()
    assert np.abs(pix - ref).max() <= 2e-2 * max(1.0, np.abs(ref).max())
    h = torch.randn(1, 9, model.cfg.hidden_size, generator=g)
    llm = m.llm
    empty = [(np.zeros((1, llm["num_kv_heads"], 0, llm["head_dim"]), np.float16),) * 2] * llm["num_layers"]
    out = dict(zip(m.output_names("llm"),
                   _session(m.engine_path("llm")).run(None, _llm_feed(m, h.numpy().astype(np.float16), empty, 9))))
    want = model.language_model(inputs_embeds=h).last_hidden_state.detach().numpy()
    got = out["hidden_states"].astype(np.float32)
    cos = (got * want).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(want, axis=-1)
    assert cos.min() >= 0.999, cos.min()
