"""`agvas export --target triton`: the model repository's structure and configs, and the BLS
model's orchestration run against the repository's own engine files.

Tritonserver cannot run here. Every ``config.pbtxt`` is parsed with Triton's own schema
(``model_config.proto`` as shipped in tritonclient) and checked against the manifest. The
``agvas`` model.py is imported with a stand-in ``triton_python_backend_utils`` whose
``InferenceRequest.exec()`` runs the requested model's file from the repository in ONNX Runtime,
after checking the request against that model's config (names, dtypes, dims, batch axis) — so
the BLS loop itself runs, and its outputs must equal the runtime Inspector's.
"""

from __future__ import annotations

import importlib.util
import io
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from conftest import random_image
from test_runtime import tiny_export  # noqa: F401 - the shared session export

from agvas.cli import main

DTYPES = {"TYPE_FP32": np.float32, "TYPE_FP16": np.float16, "TYPE_INT64": np.int64, "TYPE_INT32": np.int32,
          "TYPE_UINT8": np.uint8, "TYPE_BOOL": np.bool_, "TYPE_STRING": np.object_}


def model_config_proto():
    """Triton's ``model_config_pb2`` from tritonclient, loaded from its file (``tritonclient.grpc``'s
    package init needs grpcio, which this project does not install)."""
    spec = importlib.util.find_spec("tritonclient")
    if spec is None:
        pytest.skip("tritonclient is not installed (the dev extra brings it): no Triton config schema")
    path = Path(spec.submodule_search_locations[0]) / "grpc" / "model_config_pb2.py"
    mod_spec = importlib.util.spec_from_file_location("triton_model_config_pb2", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def repo(tiny_export, tmp_path_factory) -> Path:  # noqa: F811
    out = tmp_path_factory.mktemp("triton") / "repo"
    assert main(["export", "--checkpoint", str(tiny_export), "--target", "triton", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def configs(repo) -> dict:
    """model name -> its parsed ``ModelConfig`` (unknown fields or enum values fail the parse)."""
    from google.protobuf import text_format

    pb2 = model_config_proto()
    out = {}
    for f in sorted(repo.glob("*/config.pbtxt")):
        cfg = text_format.Parse(f.read_text(), pb2.ModelConfig())
        assert cfg.name == f.parent.name
        out[cfg.name] = cfg
    return out


def dtype_name(t) -> str:
    return t.DESCRIPTOR.fields_by_name["data_type"].enum_type.values_by_number[t.data_type].name


def kind_name(g) -> str:
    return g.DESCRIPTOR.fields_by_name["kind"].enum_type.values_by_number[g.kind].name


def test_repository_structure(repo, tiny_export):  # noqa: F811
    from agvas.export.manifest import load_manifest

    m = load_manifest(tiny_export)
    names = sorted(p.name for p in repo.iterdir())
    assert names == sorted(["agvas"] + [f"agvas_{e}" for e in ("vision", "sam_encoder", "spam", "agmd", "lm_head",
                                                                  "llm")])
    for engine in ("vision", "sam_encoder", "spam", "agmd", "lm_head", "llm"):
        e = m.engine(engine)
        files = sorted(p.name for p in (repo / f"agvas_{engine}" / "1").iterdir())
        assert files == sorted(Path(r["file"]).name for r in [e, *e.get("external_data", [])])
        for r in [e, *e.get("external_data", [])]:
            assert (repo / f"agvas_{engine}" / "1" / Path(r["file"]).name).read_bytes() == \
                (tiny_export / r["file"]).read_bytes()
    entry = repo / "agvas" / "1"
    assert (entry / "model.py").read_text() == (Path(__file__).parents[1] / "export" / "triton_model.py").read_text()
    assert json.loads((entry / "export" / "manifest.json").read_text()) == m.data
    assert (entry / "export" / "tokenizer" / "tokenizer.json").is_file()
    assert (entry / "export" / "embed_tokens.npy").is_file() and (entry / "export" / "image_newline.npy").is_file()


def test_configs_match_the_manifest(configs, tiny_export):  # noqa: F811
    from agvas.export.manifest import load_manifest
    from agvas.export.triton import TRITON_DTYPES

    m = load_manifest(tiny_export)
    for engine in ("vision", "sam_encoder", "spam", "agmd", "lm_head", "llm"):
        cfg, e = configs[f"agvas_{engine}"], m.engine(engine)
        assert cfg.backend == "onnxruntime" and cfg.default_model_filename == Path(e["file"]).name
        if engine == "llm":
            assert cfg.max_batch_size == 0 and not cfg.HasField("dynamic_batching")
        else:
            assert cfg.max_batch_size >= 4 and cfg.HasField("dynamic_batching")
        for kind, tensors in (("inputs", cfg.input), ("outputs", cfg.output)):
            got = {t.name: t for t in tensors}
            assert sorted(got) == sorted(x["name"] for x in e[kind])
            for x in e[kind]:
                t = got[x["name"]]
                assert dtype_name(t) == TRITON_DTYPES[x["dtype"]]
                shape = x["shape"][1:] if cfg.max_batch_size else x["shape"]
                assert list(t.dims) == [d if isinstance(d, int) else -1 for d in shape], (engine, x)
        assert [(g.count, kind_name(g)) for g in cfg.instance_group] == [(1, "KIND_AUTO")]
    assert configs["agvas_vision"].max_batch_size > configs["agvas_agmd"].max_batch_size  # it batches crops
    entry = configs["agvas"]
    assert entry.backend == "python" and entry.max_batch_size >= 1 and entry.HasField("dynamic_batching")
    assert [(t.name, dtype_name(t), list(t.dims)) for t in entry.input] == [("image", "TYPE_STRING", [1])]
    assert {t.name for t in entry.output} == {"mask", "prob", "verdict", "area_px", "max_score", "text"}
    assert [(g.count, kind_name(g)) for g in entry.instance_group] == [(1, "KIND_CPU")]
    models = json.loads(entry.parameters["engine_models"].string_value)
    assert models == {e: f"agvas_{e}" for e in ("vision", "sam_encoder", "spam", "agmd", "lm_head", "llm")}


def test_a_built_tensorrt_plan_is_served_as_tensorrt_plan(tiny_export, tmp_path):  # noqa: F811
    """Where `python -m agvas.export.tensorrt` left a plan, that engine's model is a tensorrt_plan on the
    GPU with its optimisation profile's largest batch (the plan here is a stand-in file)."""
    import shutil

    from google.protobuf import text_format

    from agvas.export.manifest import load_manifest
    from agvas.export.triton import write_repository

    export = tmp_path / "export"
    shutil.copytree(tiny_export, export)
    m = load_manifest(export)
    plan = export / m.data["gpu"]["tensorrt"]["plans"]["sam_encoder"]
    plan.parent.mkdir(parents=True, exist_ok=True)
    plan.write_bytes(b"a serialized engine")
    repo = write_repository(export, tmp_path / "repo")
    pb2 = model_config_proto()
    cfg = text_format.Parse((repo / "agvas_sam_encoder" / "config.pbtxt").read_text(), pb2.ModelConfig())
    assert cfg.platform == "tensorrt_plan" and not cfg.backend and cfg.default_model_filename == "model.plan"
    assert sorted(p.name for p in (repo / "agvas_sam_encoder" / "1").iterdir()) == ["model.plan"]
    assert cfg.max_batch_size == m.data["gpu"]["tensorrt"]["profiles"]["sam_encoder"]["sam_input"]["max"][0]
    assert [(g.count, kind_name(g)) for g in cfg.instance_group] == [(1, "KIND_GPU")]
    assert [t.name for t in cfg.input] == m.input_names("sam_encoder")
    vision = text_format.Parse((repo / "agvas_vision" / "config.pbtxt").read_text(), pb2.ModelConfig())
    assert vision.backend == "onnxruntime"  # no plan built for it


def test_pbtxt_writer_quotes_and_nests():
    from google.protobuf import text_format

    from agvas.export.triton import Enum, to_pbtxt

    pb2 = model_config_proto()
    text = to_pbtxt({"name": 'a"b\\c é', "max_batch_size": 2,
                     "input": [{"name": "x", "data_type": Enum("TYPE_FP32"), "dims": [-1, 3]}],
                     "dynamic_batching": {"max_queue_delay_microseconds": 10},
                     "parameters": [{"key": "k", "value": {"string_value": "{\"a\": 1}"}}]})
    cfg = text_format.Parse(text, pb2.ModelConfig())
    assert cfg.name == 'a"b\\c é' and list(cfg.input[0].dims) == [-1, 3]
    assert cfg.parameters["k"].string_value == '{"a": 1}'


# ---- the BLS model against ONNX Runtime ------------------------------------------------------------------

class _Tensor:
    def __init__(self, name: str, array) -> None:
        self._name, self._array = name, np.asarray(array)

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._array


class _Error:
    def __init__(self, message: str) -> None:
        self._message = message

    def message(self) -> str:
        return self._message


class _Response:
    def __init__(self, output_tensors=(), error=None) -> None:
        self._outputs, self._error = list(output_tensors), error

    def has_error(self) -> bool:
        return self._error is not None

    def error(self):
        return self._error

    def output_tensors(self) -> list:
        return self._outputs


def fake_pb_utils(repo: Path, configs: dict, calls: list) -> types.ModuleType:
    """``triton_python_backend_utils`` for the BLS model: ``InferenceRequest.exec()`` checks the
    request against the called model's config and runs its file in ONNX Runtime."""
    import onnxruntime as ort

    sessions: dict = {}

    class InferenceRequest:
        def __init__(self, model_name, requested_output_names, inputs, preferred_memory=None, request_id=""):
            self.model_name, self.outputs, self.inputs = model_name, requested_output_names, inputs
            self._id = request_id

        def request_id(self) -> str:
            return self._id

        def exec(self):
            cfg = configs[self.model_name]
            spec = {t.name: t for t in cfg.input}
            assert sorted(t.name() for t in self.inputs) == sorted(spec), self.model_name
            feeds = {}
            for t in self.inputs:
                a, s = t.as_numpy(), spec[t.name()]
                assert a.dtype == DTYPES[dtype_name(s)], (self.model_name, t.name(), a.dtype)
                shape = list(a.shape[1:]) if cfg.max_batch_size else list(a.shape)
                assert len(shape) == len(s.dims) and all(d in (-1, n) for d, n in zip(s.dims, shape)), \
                    (self.model_name, t.name(), a.shape)
                assert not cfg.max_batch_size or a.shape[0] <= cfg.max_batch_size
                feeds[t.name()] = a
            assert set(self.outputs) <= {t.name for t in cfg.output}
            if self.model_name not in sessions:
                so = ort.SessionOptions()
                so.intra_op_num_threads = 2
                sessions[self.model_name] = ort.InferenceSession(
                    str(repo / self.model_name / "1" / cfg.default_model_filename), so,
                    providers=["CPUExecutionProvider"])
            calls.append(self.model_name)
            outs = sessions[self.model_name].run(self.outputs, feeds)
            return _Response([_Tensor(n, o) for n, o in zip(self.outputs, outs)])

    m = types.ModuleType("triton_python_backend_utils")
    m.Tensor, m.InferenceRequest, m.InferenceResponse, m.TritonError = _Tensor, InferenceRequest, _Response, _Error
    m.TritonModelException = type("TritonModelException", (Exception,), {})
    m.PreferredMemory = lambda kind, device_id: (kind, device_id)
    m.TRITONSERVER_MEMORY_CPU = 0
    m.get_input_tensor_by_name = lambda request, name: next((t for t in request.inputs if t.name() == name), None)
    m.get_output_tensor_by_name = lambda response, name: next(
        (t for t in response.output_tensors() if t.name() == name), None)
    return m


@pytest.fixture(scope="module")
def bls(repo, configs):
    """The repository's ``agvas/1/model.py``, initialised as Triton would."""
    from google.protobuf import json_format

    calls: list = []
    saved = sys.modules.get("triton_python_backend_utils")
    sys.modules["triton_python_backend_utils"] = pb = fake_pb_utils(repo, configs, calls)
    try:
        spec = importlib.util.spec_from_file_location("agvas_triton_model", repo / "agvas" / "1" / "model.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        model = mod.TritonPythonModel()
        config = json_format.MessageToJson(configs["agvas"], preserving_proto_field_name=True)  # as Triton does
        model.initialize({"model_config": config, "model_repository": str(repo / "agvas"),
                          "model_version": "1", "model_name": "agvas", "model_instance_kind": "CPU"})
        yield model, pb, calls
    finally:
        if saved is None:
            sys.modules.pop("triton_python_backend_utils", None)
        else:
            sys.modules["triton_python_backend_utils"] = saved


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_bls_model_equals_the_runtime(bls, tiny_export):  # noqa: F811
    from agvas.train.data.synthetic import make_sample
    from PIL import Image

    from agvas.export.triton_client import image_tensor
    from agvas.runtime import Inspector

    model, pb, calls = bls
    imgs = [Image.fromarray(make_sample("stripes", "hole", 3, 0, size=96).image), random_image(61, 96, 80),
            random_image(62, 96, 80), None, Image.fromarray(make_sample("tiles", "stain", 3, 1, size=64).image),
            random_image(63, 131, 67)]
    datas = [_png(im) if im is not None else b"not an image" for im in imgs]
    requests = [pb.InferenceRequest("agvas", [], [pb.Tensor("image", image_tensor(d))], request_id=f"r{i}")
                for i, d in enumerate(datas)]
    del calls[:]
    responses = model.execute(requests)
    assert len(responses) == len(requests)
    # fast path: one prefill and one lm_head check per group, no decode step; the two 96x80 images share one
    assert calls.count("agvas_llm") == calls.count("agvas_lm_head") < 5 and calls.count("agvas_agmd") == 5
    insp = Inspector(tiny_export, threads=2)
    for im, r in zip(imgs, responses):
        if im is None:
            assert r.has_error() and r.error().message() == "request r3: not an image (PIL cannot identify the format)"
            continue
        assert not r.has_error(), r.error().message()
        out = {t.name(): t.as_numpy() for t in r.output_tensors()}
        ref = insp.inspect(im)
        assert out["mask"].shape == (1, im.height, im.width) and out["mask"].dtype == np.uint8
        assert np.array_equal(out["mask"][0].astype(bool), ref.mask)
        np.testing.assert_allclose(out["prob"][0], ref.prob, rtol=0, atol=1e-6)
        assert bool(out["verdict"][0, 0]) == ref.verdict and int(out["area_px"][0, 0]) == ref.area_px
        assert float(out["max_score"][0, 0]) == pytest.approx(ref.max_score, abs=1e-6)
        assert out["text"][0, 0].decode() == ref.text == "Sure, it is [NOR][ANO][SEG]."



def test_bls_decode_loop_without_fast_path(bls, tiny_export):  # noqa: F811
    """Token-by-token decoding through BLS (KV cache sent with every step) == the runtime's."""
    from agvas.runtime import Inspector

    model, pb, calls = bls
    model.inspector.fast_path = False
    try:
        img = random_image(64, 80, 96)
        del calls[:]
        r = model.execute([pb.InferenceRequest("agvas", [], [pb.Tensor("image", np.array([[_png(img)]], object))])])[0]
    finally:
        model.inspector.fast_path = True
    ref = Inspector(tiny_export, threads=2, fast_path=False).inspect(img)
    assert calls.count("agvas_llm") == len(ref.tokens)  # prefill + one step per token after the first
    out = {t.name(): t.as_numpy() for t in r.output_tensors()}
    assert out["text"][0, 0].decode() == ref.text and np.array_equal(out["mask"][0].astype(bool), ref.mask)


def test_perf_analyzer_data_is_a_length_prefixed_bytes_element():
    import base64
    import struct

    from agvas.export.triton_client import perf_analyzer_data

    d = perf_analyzer_data(b"\x89PNG...")
    raw = base64.b64decode(d["data"][0]["image"]["content"]["b64"])
    assert struct.unpack("<I", raw[:4])[0] == 7 and raw[4:] == b"\x89PNG..."
    assert d["data"][0]["image"]["shape"] == [1]


def test_triton_target_refuses_a_non_empty_out(tiny_export, tmp_path):  # noqa: F811
    (tmp_path / "x").write_text("keep")
    assert main(["export", "--checkpoint", str(tiny_export), "--target", "triton", "--out", str(tmp_path)]) == 2
    assert (tmp_path / "x").read_text() == "keep"
