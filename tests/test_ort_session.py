"""runtime.backends.onnxruntime_backend.ort_session: the one way mrkd opens an ONNX Runtime session
(runtime backend, export reports, benchmarks, tests)."""

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from mrkd.runtime.backends import BackendError  # noqa: E402
from mrkd.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend, ort_session  # noqa: E402


def _doubling_model() -> bytes:
    from onnx import TensorProto, helper
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])
    graph = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])], "double", [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def test_path_and_bytes_open_the_same_session(tmp_path):
    data = _doubling_model()
    path = tmp_path / "double.onnx"
    path.write_bytes(data)
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    for model in (data, path, str(path)):
        session = ort_session(model, ["cpu"], threads=1, quiet=True)
        np.testing.assert_array_equal(session.run(None, {"x": x})[0], 2 * x)
    backend = OnnxRuntimeBackend(path, providers=["cpu"])   # the runtime's backend opens it the same way
    np.testing.assert_array_equal(backend.infer(x)["y"], 2 * x)


def test_refusals_name_the_model_or_the_provider(tmp_path):
    with pytest.raises(BackendError, match="serialised model: onnxruntime cannot load"):
        ort_session(b"not an onnx model", ["cpu"])
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"garbage")
    with pytest.raises(BackendError, match="bad.onnx: onnxruntime cannot load"):
        ort_session(bad)
    with pytest.raises(BackendError, match="'warp-drive' is not in this onnxruntime build"):
        ort_session(_doubling_model(), ["warp-drive"])
