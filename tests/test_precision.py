"""fp16 conversion of graphs above protobuf's 2 GB limit (ov-7b's engines): the converter is
given the file, so ONNX shape inference runs on the path (``infer_shapes_path``) instead of on a
serialized in-memory model, which cannot exceed 2 GB."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

K = 16384  # two K x K float32 weights: 2 x 1.07 GB > 2 GiB


def _big_graph(path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, K])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, K])
    inits, nodes, prev = [], [], "x"
    for i in range(2):
        w = np.full((K, K), 1.0 / K, np.float32)
        w[0, 0] = 0.5 + i
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        del w
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"h{i}"]))
        prev = f"h{i}"
    nodes.append(helper.make_node("LayerNormalization", [prev, "scale", "bias"], ["y"], axis=-1))
    inits += [numpy_helper.from_array(np.ones(K, np.float32), "scale"),
              numpy_helper.from_array(np.zeros(K, np.float32), "bias")]
    model = helper.make_model(helper.make_graph(nodes, "big", [x], [y], inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)
    del model, inits


@pytest.mark.slow
def test_fp16_conversion_of_a_graph_over_2gb(tmp_path):
    from agvas.export.precision import convert_fp16

    path = tmp_path / "big.onnx"
    _big_graph(path)
    assert (tmp_path / "big.onnx.data").stat().st_size > 2 * 1024 ** 3
    convert_fp16(path, external=True)
    onnx.checker.check_model(str(path))  # by path: the >2 GB-safe checker
    g = onnx.load(str(path), load_external_data=False).graph
    types = {t.name: t.data_type for t in g.initializer}
    assert types["w0"] == types["w1"] == TensorProto.FLOAT16
    assert g.input[0].type.tensor_type.elem_type == TensorProto.FLOAT  # float32 IO kept
    assert "LayerNormalization" in {n.op_type for n in g.node}
    ln = next(n for n in g.node if n.op_type == "LayerNormalization")
    casts = {n.output[0]: n for n in g.node if n.op_type == "Cast"}
    assert ln.input[0] in casts  # LayerNormalization kept float32 behind a Cast
    size = (tmp_path / "big.onnx.data").stat().st_size
    assert 1.0 * 1024 ** 3 < size < 1.2 * 1024 ** 3  # half the bytes
