"""export/manifest.py: schema, writing, and refusals that name both sides (torch-free)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from agvas.export.manifest import (
    ENGINE_NAMES,
    ManifestError,
    array_entry,
    load_manifest,
    new_manifest,
    onnx_entry,
    onnx_external_files,
    write_manifest,
)


def _identity_graph(path, inp, out, shape, dtype=TensorProto.FLOAT, external=False):
    w = numpy_helper.from_array(np.arange(4, dtype=np.float32), "w")
    g = helper.make_graph([helper.make_node("Identity", [inp], [out])], "g",
                          [helper.make_tensor_value_info(inp, dtype, shape)],
                          [helper.make_tensor_value_info(out, dtype, shape)], initializer=[w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    if external:
        onnx.save_model(m, str(path), save_as_external_data=True, location=path.name + ".data", size_threshold=0)
    else:
        onnx.save_model(m, str(path))


def _export_dir(root, ckpt_sha="a" * 64, config=None):
    config = config or {"name": "tiny", "llava": {"text_config": {"hidden_size": 8}}, "seed": 0}
    engines = {}
    for name in ENGINE_NAMES[:6]:
        _identity_graph(root / f"{name}.onnx", f"{name}_in", f"{name}_out", ["batch", 8], external=name == "llm")
        engines[name] = onnx_entry(root, f"{name}.onnx", "fp32")
    np.save(root / "embed_tokens.npy", np.zeros((10, 8), np.float32))
    np.save(root / "image_newline.npy", np.zeros((8,), np.float32))
    engines["embed_tokens"] = array_entry(root, "embed_tokens.npy")
    engines["image_newline"] = array_entry(root, "image_newline.npy")
    data = new_manifest(
        source={"checkpoint": "ckpt", "checkpoint_sha256": ckpt_sha, "config_name": config["name"]},
        config=config, token_ids={"image": 3, "anchors": [7, 8, 9], "eos": 2, "pad": 0, "vocab_size": 10},
        engines=engines,
        llm={"num_layers": 1, "num_kv_heads": 1, "head_dim": 8, "hidden_size": 8, "vocab_size": 10,
             "positions": "from_mask", "route": "test"},
        prompt={}, preprocessing={}, vision_tokens={"default": "anyres", "supported": ["anyres", "base"]},
        postprocess={"alpha": 0.5, "threshold": 0.5}, tools={}, gpu={},
    )
    write_manifest(root, data)
    return data


def test_round_trip_and_external_data(tmp_path):
    data = _export_dir(tmp_path)
    m = load_manifest(tmp_path, checkpoint_sha256="a" * 64, config="tiny", check_io=True)
    assert m.data == json.loads((tmp_path / "manifest.json").read_text()) == data
    assert m.engine("llm")["external_data"][0]["file"] == "llm.onnx.data"
    assert onnx_external_files(tmp_path / "llm.onnx") == ["llm.onnx.data"]
    assert m.input_names("vision") == ["vision_in"]
    assert m.engine("vision")["inputs"][0] == {"name": "vision_in", "dtype": "float32", "shape": ["batch", 8]}
    assert m.engine("embed_tokens")["shape"] == [10, 8]


def test_refuses_other_checkpoint_and_config(tmp_path):
    cfg = {"name": "tiny", "llava": {"text_config": {"hidden_size": 8}}, "seed": 0}
    _export_dir(tmp_path, config=cfg)
    with pytest.raises(ManifestError, match=f"sha256 {'a' * 64} but the expected checkpoint has sha256 {'b' * 64}"):
        load_manifest(tmp_path, checkpoint_sha256="b" * 64)
    with pytest.raises(ManifestError, match="config 'tiny' but config 'ov-0.5b' is expected"):
        load_manifest(tmp_path, config="ov-0.5b")
    other = json.loads(json.dumps(cfg))
    other["llava"]["text_config"]["hidden_size"] = 16
    with pytest.raises(ManifestError, match=r"llava\.text_config\.hidden_size=8 vs expected .*hidden_size=16"):
        load_manifest(tmp_path, config=other)
    load_manifest(tmp_path, config=json.loads(json.dumps(cfg)))


def test_refuses_changed_or_missing_files(tmp_path):
    data = _export_dir(tmp_path)
    # same size, different content: only sha256 catches it
    raw = bytearray((tmp_path / "llm.onnx.data").read_bytes())
    raw[0] ^= 0xFF
    (tmp_path / "llm.onnx.data").write_bytes(bytes(raw))
    load_manifest(tmp_path, verify="bytes")
    want = data["engines"]["llm"]["external_data"][0]["sha256"]
    with pytest.raises(ManifestError, match=f"llm.onnx.data has sha256 [0-9a-f]+ but the manifest says {want}"):
        load_manifest(tmp_path)
    (tmp_path / "vision.onnx").unlink()
    with pytest.raises(ManifestError, match=r"lists vision.onnx \(\d+ bytes\) but .*vision.onnx does not exist"):
        load_manifest(tmp_path, verify="bytes")


def test_refuses_io_mismatch(tmp_path):
    _export_dir(tmp_path)
    # the graph is replaced by one with another input name; re-record its digest so only IO differs
    _identity_graph(tmp_path / "spam.onnx", "other_in", "spam_out", ["batch", 8])
    data = json.loads((tmp_path / "manifest.json").read_text())
    fresh = onnx_entry(tmp_path, "spam.onnx", "fp32")
    data["engines"]["spam"].update(sha256=fresh["sha256"], bytes=fresh["bytes"])
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=r"'spam' inputs: manifest has \['spam_in'\] but .*spam.onnx has \['other_in'\]"):
        load_manifest(tmp_path, check_io=True)
    # a fixed dim that differs
    _identity_graph(tmp_path / "spam.onnx", "spam_in", "spam_out", ["batch", 9])
    fresh = onnx_entry(tmp_path, "spam.onnx", "fp32")
    data["engines"]["spam"].update(sha256=fresh["sha256"], bytes=fresh["bytes"])
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=r"manifest shape \['batch', 8\] but .* has \['batch', 9\]"):
        load_manifest(tmp_path, check_io=True)


def test_refuses_session_io_mismatch(tmp_path):
    import onnxruntime as ort

    _export_dir(tmp_path)
    m = load_manifest(tmp_path)
    sess = ort.InferenceSession(str(m.engine_path("agmd")), providers=["CPUExecutionProvider"])
    m.verify_session("agmd", sess)
    with pytest.raises(ManifestError, match="manifest has \\['spam_in'\\] but the ONNX Runtime session"):
        m.verify_session("spam", sess)


def test_schema_errors(tmp_path):
    data = _export_dir(tmp_path)
    bad = dict(data, format_version=99)
    (tmp_path / "manifest.json").write_text(json.dumps(bad))
    with pytest.raises(ManifestError, match="format_version 99 but this code reads format_version 1"):
        load_manifest(tmp_path)
    bad = dict(data)
    del bad["engines"]["agmd"]
    (tmp_path / "manifest.json").write_text(json.dumps(bad))
    with pytest.raises(ManifestError, match=r"engines \['agmd'\] are missing"):
        load_manifest(tmp_path)
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        load_manifest(tmp_path / "nowhere")


def test_import_is_torch_free():
    code = "import sys, agvas.export.manifest; assert 'torch' not in sys.modules and 'onnx' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
