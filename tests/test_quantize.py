"""`agvas calibrate` + `agvas quantize` on the trained tiny model's export: capture,
every quantized format in ORT CPU, the accuracy gate on identical / damaged engines, `--auto`,
and the written export loading in the runtime."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from agvas.cli import main
from agvas.calibration.gate import Budget, snr_db
from agvas.calibration.store import CalibrationStore

N_CAL, N_HELD = 6, 3


@pytest.fixture(scope="module")
def calibrated(trained_tiny_checkpoint, tmp_path_factory):
    """(fp32 export dir, calibration dir, images dir) of the shared trained tiny model, made through
    the CLI; images: synthetic parts of its training categories, every other one with a defect."""
    from PIL import Image

    from agvas.train.data.synthetic import make_sample
    from agvas.train.train import QUICK_SPEC
    from agvas.export.exporter import export_checkpoint

    root = tmp_path_factory.mktemp("quant")
    export_checkpoint(trained_tiny_checkpoint, root / "exp")
    images = root / "images"
    images.mkdir()
    cats, defects = QUICK_SPEC["train_categories"], QUICK_SPEC["train_defects"]
    for i in range(N_CAL + N_HELD):
        s = make_sample(cats[i % len(cats)], defects[i % len(defects)] if i % 2 else None, seed=11, index=200 + i)
        Image.fromarray(s.image).resize((96 + 16 * (i % 3), 96), Image.BILINEAR).save(images / f"part{i:02d}.png")
    assert main(["calibrate", "--engines", str(root / "exp"), "--images", str(images), "--out", str(root / "cal"),
                 "-n", str(N_CAL), "--held-out", str(N_HELD), "--no-progress"]) == 0
    return root / "exp", root / "cal", images


def _session(path):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def test_capture_stores_every_engine_input_and_the_references(calibrated):
    exp, cal, _ = calibrated
    store = CalibrationStore(cal)
    assert sorted(store.engines) == ["agmd", "llm", "lm_head", "sam_encoder", "spam", "vision"]
    assert all(store.count(e) == N_CAL for e in store.engines)  # held-out images store no inputs
    refs = store.references()
    assert [r.split for r in refs].count("held_out") == N_HELD and len(refs) == N_CAL + N_HELD
    assert all(r.outputs.anchor_states is not None and r.outputs.anchor_states.shape == (3, 128) for r in refs)
    # the llm samples are the real multimodal prefills: 2N visual positions + the same template/answer text
    cal_imgs = [im for im in store.images if im["split"] == "calibration"]
    lens = [f["inputs_embeds"].shape[1] for f in store.samples("llm")]
    text = {s - im["n_visual"] for s, im in zip(lens, cal_imgs)}
    assert len(text) == 1 and text.pop() > 10
    f = next(store.samples("llm"))
    assert f["attention_mask"].shape == (1, lens[0]) and f["past_key_values.0.key"].shape[2] == 0
    # SAM input as the runtime preprocesses it (float16 storage)
    from agvas.runtime.preprocess import SamParams, sam_input
    from agvas.export.manifest import load_manifest

    from agvas.imageio import load_image

    sam = SamParams.from_manifest(load_manifest(exp).data["preprocessing"]["sam"])
    x, _ = sam_input(load_image(cal_imgs[0]["path"]), sam)
    np.testing.assert_allclose(next(store.samples("sam_encoder"))["sam_input"], x, atol=3e-3)
    # TensorRT EP tables from ORT's calibrator; the native cache says why it was skipped
    for e in ("vision", "sam_encoder", "spam", "agmd"):
        assert (cal / "tensorrt" / e / "calibration.flatbuffers").stat().st_size > 0
        assert store.meta["tensorrt"][e]["tensors"] > 0
        assert "tensorrt is not importable" in store.meta["tensorrt"][e]["native_cache"]["skipped"]


@pytest.mark.parametrize("engine,fmt", [("llm", "int4-rtn"), ("llm", "int4-hqq"), ("llm", "int4-gptq"),
                                        ("llm", "int8"), ("llm", "fp16"), ("sam_encoder", "int8-static"),
                                        ("vision", "int8"), ("spam", "fp16")])
def test_quantized_engines_run_in_ort_cpu(calibrated, tmp_path, engine, fmt):
    from agvas.calibration import quantize as q
    from agvas.calibration.quantized_export import PRIMARY_OUTPUT, _feeds_for
    from agvas.calibration.readers import StoreReader
    from agvas.export.manifest import load_manifest

    exp, cal, _ = calibrated
    src = load_manifest(exp).engine_path(engine)
    dst = tmp_path / f"{engine}.onnx"
    store = CalibrationStore(cal)
    if fmt.startswith("int4"):
        algo = fmt.split("-")[1]
        rec = q.quantize_nbits(src, dst, algorithm=algo, block_size=32,
                               reader=StoreReader(store, "llm", limit=2) if algo == "gptq" else None,
                               rtn_nodes=q.lm_head_nodes(onnx.load(str(src), load_external_data=False)))
        assert rec["quantized_nodes"] == 4 * 5  # qkv, o, gate, up, down per layer (the LM head is the lm_head engine)
        op = "MatMulNBits"
    elif fmt == "int8":
        rec = q.quantize_int8_dynamic(src, dst)
        op = "MatMulInteger"
    elif fmt == "int8-static":
        rec = q.quantize_int8_static(src, dst, StoreReader(store, engine), symmetric=True)
        op = "QuantizeLinear"
    else:
        rec = q.convert_fp16(src, dst)
        op = "Cast"
    assert op in {n.op_type for n in onnx.load(str(dst), load_external_data=False).graph.node}
    assert rec["bytes"] < rec["source_bytes"]
    a, b = _session(src), _session(dst)
    name = PRIMARY_OUTPUT[engine]
    for feeds in store.samples(engine, limit=2):
        ref = a.run([name], _feeds_for(a, feeds))[0]
        got = b.run([name], _feeds_for(b, feeds))[0]
        assert got.shape == ref.shape and got.dtype == np.float32  # IO stays float32
        assert snr_db(ref, got) > (12 if fmt.startswith(("int4", "int8")) else 30)


def test_gpu_fp16_llm_keeps_its_kv_cache_fp16(calibrated, tmp_path):
    """`quantize --target cuda|tensorrt --llm fp16`: the llm graph gets fp16 IO, so the present KV
    is bound as the next step's past as is (no cast per decode step) — and the runtime's LLM
    wrapper runs it (prefill + one decode step) close to the fp32 graph (ORT CPU runs fp16 GQA)."""
    from agvas.calibration import quantize as q
    from agvas.export.manifest import load_manifest
    from agvas.runtime.engines import LLM, Engine, ort_providers

    exp, cal, _ = calibrated
    m = load_manifest(exp)
    store = CalibrationStore(cal)
    src, dst = m.engine_path("llm"), tmp_path / "llm_fp16.onnx"
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST

    q.convert_fp16(src, dst, fp16_io=True, op_block_list=list(DEFAULT_OP_BLOCK_LIST))
    g = onnx.load(str(dst), load_external_data=False).graph
    types = {v.name: v.type.tensor_type.elem_type for v in list(g.input) + list(g.output)}
    kv = [n for n in types if n.startswith(("past_key_values.", "present."))]
    assert kv and all(types[n] == onnx.TensorProto.FLOAT16 for n in kv)
    assert types["attention_mask"] == onnx.TensorProto.INT64
    # the decode step's graph has no Cast on the KV path: every past input feeds GQA directly
    consumers = {i: n.op_type for n in g.node for i in n.input}
    assert all(consumers[n] == "GroupQueryAttention" for n in kv if n.startswith("past_"))
    runs = {}
    for name, path in (("fp32", src), ("fp16", dst)):
        head = Engine("lm_head", m.engine_path("lm_head"), ["CPUExecutionProvider"], 2, None)
        llm = LLM(Engine("llm", path, ort_providers("cpu", "llm", m), 2, None), m.llm, head)
        assert llm.kv_dtype == (np.float16 if name == "fp16" else np.float32)
        emb = next(store.samples("llm"))["inputs_embeds"]
        h0, logits, past = llm(emb, None)
        step = np.asarray(emb[:, -1:], np.float32)
        h1, _, _ = llm(step, past)  # the present fp16 KV goes straight back in as past
        runs[name] = (h0[:, -1], h1[:, -1], logits)
    for a, b in zip(runs["fp32"], runs["fp16"]):
        cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
        assert cos.min() > 0.995, cos.min()


def test_int4_bytes_match_the_memory_plan(calibrated, tmp_path):
    """The MatMulNBits tensors of the int4 llm equal the plan's int4 matrix bytes of the decoder (the
    LM head is the lm_head engine's, planned apart)."""
    from agvas.calibration import quantize as q
    from agvas.calibration.memory_plan import engine_weights
    from agvas.export.manifest import load_manifest

    exp, _, _ = calibrated
    m = load_manifest(exp)
    q.quantize_nbits(m.engine_path("llm"), tmp_path / "llm.onnx", block_size=32)
    g = onnx.load(str(tmp_path / "llm.onnx"))
    inits = {t.name: t for t in g.graph.initializer}
    got = sum(len(inits[i].raw_data) for n in g.graph.node if n.op_type == "MatMulNBits" for i in n.input[1:]
              if i in inits)
    from agvas.train.config import AGVASConfig
    from agvas.train.modeling import build_model

    cfg = AGVASConfig.from_dict(m.config)
    model, _ = build_model(cfg, device="meta")
    w = engine_weights(model)
    plan = w["llm"].bytes("int4") - 4 * w["llm"].float_params
    assert got == plan


def test_gate_identical_engines_pass_and_a_damaged_engine_fails(calibrated, tmp_path):
    from agvas.calibration.quantized_export import QuantOptions, evaluate
    from agvas.export.manifest import load_manifest

    exp, cal, _ = calibrated
    store = CalibrationStore(cal)
    m = load_manifest(exp)
    same = evaluate(exp, store, {"sam_encoder": m.engine_path("sam_encoder")}, Budget(), QuantOptions())
    assert same.passed and same.mean_mask_iou == 1.0 and same.min_mask_iou == 1.0
    assert same.verdict_agreement == 1.0 and same.anchor_cosine == pytest.approx(1.0)
    assert len(same.rows) == N_CAL + N_HELD
    # damage: flip the sign of SAM's neck output convolution -> a different pixel embedding
    g = onnx.load(str(m.engine_path("sam_encoder")))
    conv = [n for n in g.graph.node if n.op_type == "Conv"][-1]
    w = next(t for t in g.graph.initializer if t.name == conv.input[1])
    arr = -onnx.numpy_helper.to_array(w)
    w.CopyFrom(onnx.numpy_helper.from_array(arr, w.name))
    bad = tmp_path / "sam_encoder.onnx"
    onnx.save(g, str(bad))
    r = evaluate(exp, store, {"sam_encoder": bad}, Budget(), QuantOptions())
    assert not r.passed and r.mean_mask_iou < 0.95
    assert any(f.startswith("mean_mask_iou") for f in r.failures())
    assert r.engine_snr_db["sam_encoder"] < 0  # the damage shows in the engine's own SNR


def test_quantize_cli_writes_an_export_the_runtime_loads(calibrated, tmp_path, capsys):
    from agvas.export.manifest import load_manifest
    from agvas.runtime import Inspector

    exp, cal, images = calibrated
    out = tmp_path / "q"
    assert main(["quantize", "--engines", str(exp), "--calib", str(cal), "--out", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "accuracy gate" in text and "PASS" in text and "| mean mask IoU |" in text
    m = load_manifest(out, verify="sha256", check_io=True)
    assert m.engines["llm"]["precision"] == "int4" and m.engines["lm_head"]["precision"] == "int4"
    assert m.engines["agmd"]["precision"] == "fp32"
    assert m.engines["llm"]["bytes"] + sum(x["bytes"] for x in m.engines["llm"]["external_data"]) < \
        load_manifest(exp).engines["llm"]["external_data"][0]["bytes"] / 3
    gate = m.data["accuracy_gate"]
    for k in ("mean_mask_iou", "min_mask_iou", "verdict_agreement", "anchor_cosine", "images"):
        assert k in gate
    assert gate["passed"] and gate["images"]["held_out"]["count"] == N_HELD
    forced = gate["teacher_forced"]  # the int4 llm on the captured prefills, anchors decoded by agmd
    assert forced["images"] == 2 and forced["anchor_cosine"] > 0.99 and 0 <= forced["min_mask_iou"] <= 1
    calib = m.data["calibration"]
    assert calib["precisions"]["llm"] == "int4" and calib["engines"]["llm"]["algorithm"] == "rtn"
    for e in ("vision", "sam_encoder", "spam"):  # CPU: int8 kept only where measured faster, else fp32
        rec = calib["engines"][e]
        assert rec["precision"] in ("int8", "fp32") and set(rec["cpu_ms_median"]) >= {"fp32", "dynamic"}
        assert m.engines[e]["precision"] == rec["precision"]
    # the runtime accepts it and reproduces the gate's masks
    store = CalibrationStore(cal)
    ref = store.references()[0]
    res = Inspector(out).inspect(ref.path)
    inter = np.logical_and(res.mask, ref.outputs.mask).sum()
    union = np.logical_or(res.mask, ref.outputs.mask).sum()
    assert union == 0 or inter / union >= 0.9
    # refusals
    assert main(["quantize", "--engines", str(exp), "--calib", str(cal), "--out", str(out)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    other = tmp_path / "exp2"
    shutil.copytree(exp, other)
    data = json.loads((other / "manifest.json").read_text())
    data["created"] = "2000-01-01T00:00:00+00:00"
    (other / "manifest.json").write_text(json.dumps(data))
    assert main(["quantize", "--engines", str(other), "--calib", str(cal), "--out", str(tmp_path / "q3")]) == 2
    assert "was captured from an export whose manifest has sha256" in capsys.readouterr().err


@pytest.mark.slow
def test_auto_backs_off_when_the_budget_is_tight(calibrated, tmp_path, capsys):
    exp, cal, images = calibrated
    # a budget int4 cannot hold: the LLM search moves up the ladder
    assert main(["quantize", "--engines", str(exp), "--calib", str(cal), "--out", str(tmp_path / "tight"), "--auto",
                 "--budget", "mean_iou=0.99999,min_iou=0.9999,anchor_cosine=0.99999,text=1", "--no-progress"]) == 0
    tight = json.loads((tmp_path / "tight" / "manifest.json").read_text())
    trials = tight["calibration"]["trials"]
    assert trials[0]["choice"]["llm"] == "int4" and not trials[0]["passed"]
    assert tight["engines"]["llm"]["precision"] in ("fp16", "fp32")
    assert tight["accuracy_gate"]["passed"]
    # the default budget keeps the cheapest; through the function `agvas demo` calls, held-out
    # images from another source
    from agvas.calibration.demo import calibrate_and_quantize

    s = calibrate_and_quantize(exp, tmp_path / "demo", str(images / "part0[0-3].png"), str(images / "part0[4-8].png"),
                               n=4, held_out=3, progress=False, log=lambda *_: None)
    assert s["passed"] and s["precisions"]["llm"] == "int4" and s["quantized_bytes"] < s["fp32_bytes"]
    demo_store = CalibrationStore(s["calibration"])
    held = [im["name"] for im in demo_store.images if im["split"] == "held_out"]
    assert len(held) == 3 and all(int(n[-2:]) >= 4 for n in held)
    # without --auto the same tight budget fails, prints the table and writes nothing
    capsys.readouterr()
    assert main(["quantize", "--engines", str(exp), "--calib", str(cal), "--out", str(tmp_path / "fail"),
                 "--budget", "mean_iou=0.99999,anchor_cosine=0.99999,text=1", "--no-progress"]) == 1
    text = capsys.readouterr().out
    assert "FAIL" in text and "below budget" in text and not (tmp_path / "fail").exists()
