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


def _matmul_model(size: int = 384) -> bytes:
    """A product big enough that ONNX Runtime splits it over its intra-op threads."""
    from onnx import TensorProto, helper, numpy_helper
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [size, size])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [size, size])
    weight = numpy_helper.from_array(np.random.default_rng(0).random((size, size), dtype=np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("MatMul", ["h", "w"], ["y"])]
    graph = helper.make_graph(nodes, "matmul", [x], [y], initializer=[weight])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def test_sessions_put_their_threads_to_sleep_when_a_run_returns():
    """ORT's default leaves its intra-op threads spinning for tens of ms after each run, on the cores
    the camera decoders and the post-processing need between frames; mrkd's sessions stop them."""
    from mrkd.runtime.backends.onnxruntime_backend import STOP_SPINNING_AFTER_RUN
    model = _matmul_model()
    feed = {"x": np.ones((384, 384), np.float32)}
    ours = ort_session(model, ["cpu"], threads=2)
    assert ours.get_session_options().get_session_config_entry(STOP_SPINNING_AFTER_RUN[0]) == "1"
    spinning = ort_session(model, ["cpu"], threads=2, spin_after_run=True)   # ORT's own default
    # CPU the process burns in the 20 ms after run() returns while this thread sleeps (the backend
    # bench's instrument): what threads left spinning take from the decoders between frames. The process's
    # other threads (a suite worker keeps those of earlier tests) burn some too: each is measured against
    # the same window after no call at all, the three taken in turn so they share the machine's load (a CI
    # run under load read 4.0 ms for ours against 11.7 ms spinning without that control).
    import time

    def busy_ms(call) -> float:
        call()
        start = time.process_time()
        time.sleep(0.02)
        return (time.process_time() - start) * 1e3
    calls = {"idle": lambda: None, "ours": lambda: ours.run(None, feed), "spinning": lambda: spinning.run(None, feed)}

    def measured():
        spent = {name: [] for name in calls}
        for _ in range(15):
            for name, call in calls.items():
                time.sleep(0.1)          # the spinning session's threads have stopped before the next window
                spent[name].append(busy_ms(call))
        idle = float(np.median(spent["idle"]))
        return (*(max(0.0, float(np.median(spent[name])) - idle) for name in ("ours", "spinning")), idle)
    # The measurement must see spinning where ORT's default spins, else the bound below proves nothing. With
    # both cores taken by the rest of the suite the spinning threads are not scheduled in the window and it
    # does not (CI once read 4.0 ms for both): measured again, up to four times, until it sees them.
    attempts = []
    for _ in range(4):
        attempts.append(measured())
        if attempts[-1][1] > 5.0:
            break
    busy_ours, busy_spinning, idle = attempts[-1]
    assert busy_spinning > 5.0, attempts
    assert busy_ours < 0.25 * busy_spinning, attempts
